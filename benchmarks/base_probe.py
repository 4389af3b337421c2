"""Does a base still improve under the default loop? A candidate signal for "distillation from this base costs
top-1" (session 31; it did not separate the cases, see BENCHMARKS.md).

For each base: its validation score, then the score after a quarter, a half and a whole epoch of the default
loop's optimiser (SGD, lr 0.01, momentum 0.9, Nesterov, weight decay 5e-4) on the labels alone, from the unpruned
base. Bases: ``residual2`` / ``residual15`` (``weak_teacher.py``'s residual CNN after 2 / 15 epochs, seeds 0-3),
``segmenter``, ``classifier_sgd``, ``classifier_adamw`` (``custom_loss.py``'s; bases cached beside its --out),
``fmnist_demo`` (``assets/fmnist_cnn_base.pt``), ``resnet20_e40`` (the realistic grid's CIFAR-10 base).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/base_probe.py --bases residual2,segmenter \\
        --custom-loss-out benchmarks/results/custom_loss.jsonl --out benchmarks/results/base_probe_s31.jsonl
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
from pathlib import Path

import torch
from torch.nn import functional as F

import custom_loss
import weak_teacher
from autocompress.checkpoint import load_checkpoint, model_from_checkpoint
from autocompress.data import get_dataset
from autocompress.training import TrainConfig, build_optimizer

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = {"fmnist_demo": (ROOT / "assets/fmnist_cnn_base.pt", None),
               "resnet20_e40": (ROOT / "benchmarks/results/bases/resnet20_cifar10_e40.pt",
                                ROOT.parent / "shared/datasets/cifar10-jpeg.tar.gz")}


def probe(model, train, score, steps: int) -> dict:
    """``score`` of ``model``, then of a copy after ``steps // 4``, ``steps // 2`` and ``steps`` SGD steps on
    ``train`` (a list or loader of (inputs, class targets) batches, cycled) with the cross-entropy."""
    rows = {"before": score(model)}
    trained = copy.deepcopy(model).train()
    optimizer = build_optimizer(trained, TrainConfig(lr=0.01, optimizer="sgd"))
    checkpoints = {steps // 4, steps // 2, steps}
    for step, (x, y) in enumerate(itertools.islice(itertools.cycle(train), steps), 1):
        optimizer.zero_grad()
        F.cross_entropy(trained(x), y).backward()
        optimizer.step()
        if step in checkpoints:
            rows[f"after_{step}"] = score(trained.eval())
            trained.train()
    return rows


def cases(base: str, custom_loss_out: Path):
    """(name, model, training batches, score, steps an epoch) of ``base``."""
    if base.startswith("residual"):
        for seed in range(4):
            train, val, _ = weak_teacher.loaders(seed, 64)
            model = weak_teacher.weak_base(train, seed, int(base.removeprefix("residual")))
            yield f"{base}_seed{seed}", model, list(train), lambda m, val=val: weak_teacher.top1(m, val), len(train)
    elif base in ("segmenter", "classifier_sgd", "classifier_adamw"):
        task = {"segmenter": "segment", "classifier_sgd": "classify", "classifier_adamw": "classify_adamw"}[base]
        data = custom_loss.setup(task, custom_loss_out)
        yield base, data["base"], data["train"], lambda m: data["score"](m, data["val"]), len(data["train"])
    else:
        path, data_dir = CHECKPOINTS[base]
        checkpoint = load_checkpoint(path)
        splits = get_dataset(checkpoint["dataset"]["name"], data_dir, val_size=5000, seed=0)
        train = splits.loader("train", 128, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0))
        val = list(itertools.islice(splits.loader("val", 256, shuffle=True, augment=False,
                                                  generator=torch.Generator().manual_seed(1)), 20))
        yield base, model_from_checkpoint(checkpoint).eval(), train, lambda m: custom_loss.top1(m, val), len(train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", default="residual2,residual15,segmenter,classifier_sgd,classifier_adamw,"
                                           "fmnist_demo")
    parser.add_argument("--custom-loss-out", type=Path, default=ROOT / "benchmarks/results/custom_loss.jsonl")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for base in args.bases.split(","):
        for name, model, train, score, steps in cases(base, args.custom_loss_out):
            row = {"base": name, **probe(model, train, score, steps)}
            print(json.dumps(row), flush=True)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
