"""``search.start`` on the CIFAR-10 ResNet-20 at a short budget: guided start vs magnitude start (session 27).

The realistic grid's base (``results/bases/resnet20_cifar10_e40.pt``, 40 epochs on the full training split) is
compressed to ``--target`` with ``budget: --budget`` epochs over ``--max-train`` seeded training images (batch 64,
no augmentation: an epoch of 157 steps, so no ADMM and one unscored candidate), 2,000 validation images carved
from the training split (which the base saw) and 3,000 seeded test images scored here. Each start is run once per
seed (the seed draws the subsets and seeds the run); one JSON line per (start, seed) in ``--out``, rows already
there skipped.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/search_start_cifar.py --starts guided,magnitude \\
        --seeds 0,1,2 --out benchmarks/results/search_start_cifar.jsonl
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import autocompress
from autocompress.checkpoint import load_checkpoint, model_from_checkpoint
from autocompress.data import get_dataset
from weak_teacher import append_row, top1  # a sibling script: benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "benchmarks" / "results" / "bases" / "resnet20_cifar10_e40.pt"
ARCHIVE = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def loaders(seed: int, max_train: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    data = get_dataset("cifar10", ARCHIVE, val_size=2000, seed=seed, max_train=max_train, max_test=3000)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (data.mean, data.std))

    def tensors(split) -> TensorDataset:
        return TensorDataset((split.images.float() / 255.0 - mean) / std, split.labels)

    shuffle = torch.Generator().manual_seed(seed)
    return (DataLoader(tensors(data.train), batch_size=64, shuffle=True, generator=shuffle),
            DataLoader(tensors(data.val), batch_size=256), DataLoader(tensors(data.test), batch_size=256))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", default="guided,magnitude")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--target", default="flops=4x")
    parser.add_argument("--budget", type=int, default=3)
    parser.add_argument("--max-train", type=int, default=10000)
    parser.add_argument("--out", default="benchmarks/results/search_start_cifar.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    setup = {"target": args.target, "budget": args.budget, "max_train": args.max_train}
    rows = map(json.loads, out.read_text().splitlines()) if out.exists() else []
    done = {(r["start"], r["seed"], r["target"], r["budget"], r["max_train"]) for r in rows}
    base = model_from_checkpoint(load_checkpoint(BASE)).eval()
    for seed in (int(s) for s in args.seeds.split(",")):
        train, val, test = loaders(seed, args.max_train)
        for start in (s for s in args.starts.split(",") if (s, seed, *setup.values()) not in done):
            began = time.perf_counter()
            result = autocompress.compress(base, torch.zeros(1, 3, 32, 32), args.target, train_loader=train,
                                           val_loader=val, device="cpu", progress=False, log=lambda line: None,
                                           config={"budget": args.budget, "seed": seed, "search": {"start": start}})
            row = {"start": start, "seed": seed, **setup, "base_top1": top1(base, test),
                   "top1": top1(result.model, test), "macs_x": result.mac_reduction,
                   "seconds": round(time.perf_counter() - began, 1)}
            append_row(out, row)


if __name__ == "__main__":
    main()
