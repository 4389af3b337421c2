"""The sampler's give-back at aligned widths (issue 12): targets met from below without overshoot, top-1 kept.

With ``channel_multiple`` 8 a fit that scales every rate together moves a 16-channel layer from 16 to 8 in one
step, so a ``flops=3x`` target could end at 3.67x. Since session 13 every fit gives back, unit by unit, what
the target does not need (:func:`autocompress.sampling.give_back`). This benchmark compresses two small CNNs
of a fresh user's kind (a plain 16-16-32-32-64 chain and a residual 16/32/64 net, Fashion-MNIST, 6,000
training images) at flops targets with ``channel_multiple: 8`` and ``budget: 3``, over seeds, and appends one
JSON line per run to ``--out``: MACs reduction reached, test top-1 (2,000 images), onnxruntime speedup.

The library version is whatever ``autocompress`` imports, so the before / after comparison runs this script
once per source tree, side by side (``PYTHONPATH=<tree>/src``, see BENCHMARKS.md "Give-back"), each run
labelled with ``--tag``. The bases are trained once (seed 0, 4 epochs) and cached in ``--bases``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import autocompress
from autocompress.data import get_dataset
from autocompress.training import evaluate


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PlainCNN(nn.Module):
    """``[B, 1, 28, 28]`` -> ``[B, 10]``: 16-16-pool-32-32-pool-64 3x3 convs, global pooling, a linear layer."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_cbr(1, 16), _cbr(16, 16), nn.MaxPool2d(2), _cbr(16, 32), _cbr(32, 32),
                                      nn.MaxPool2d(2), _cbr(32, 64))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class ResidualCNN(nn.Module):
    """``[B, 1, 28, 28]`` -> ``[B, 10]``: a stem, one residual block at 16 and one at 32 channels (strided
    convs between), a 64-channel conv, global pooling, a linear layer."""

    def __init__(self):
        super().__init__()
        self.stem, self.block1a = _cbr(1, 16), _cbr(16, 16)
        self.block1b = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.down1, self.block2a = _cbr(16, 32, 2), _cbr(32, 32)
        self.block2b = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
        self.down2, self.head = _cbr(32, 64, 2), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block1b(self.block1a(x)))
        x = self.down1(x)
        x = F.relu(x + self.block2b(self.block2a(x)))
        return self.head(self.down2(x).mean((2, 3)))


MODELS = {"plain": PlainCNN, "res": ResidualCNN}


def _base(name: str, splits, bases: Path) -> nn.Module:
    """The trained base of ``name`` in eval mode (AdamW 2e-3, one-cycle, 4 epochs, seed 0), cached in
    ``bases``."""
    path = bases / f"give_back_{name}.pt"
    torch.manual_seed(0)  # the initial weights
    model = MODELS[name]()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        _train(model, splits)
        bases.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def _train(model: nn.Module, splits) -> None:
    """4 epochs of AdamW (lr 2e-3, weight decay 1e-4) under a one-cycle schedule, batch 64, batch order seed 0."""
    loader = splits.loader("train", 64, augment=False, generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 2e-3, total_steps=4 * len(loader))
    model.train()
    for _ in range(4):
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", required=True, help="label of the source tree under test, e.g. before / after")
    parser.add_argument("--models", default="plain,res")
    parser.add_argument("--targets", default="flops=3x,flops=4x,flops=2x")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--multiple", type=lambda v: v if v == "auto" else int(v), default=8,
                        help="channel_multiple of every run: an integer or auto")
    parser.add_argument("--bases", default=str(Path.home() / ".cache" / "autocompress-bench" / "give_back"))
    parser.add_argument("--out", default="benchmarks/results/give_back.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    splits = get_dataset("fashion-mnist", val_size=1000, max_train=6000, max_test=2000, seed=0)
    test = splits.loader("test", 256)
    for name in args.models.split(","):
        base = _base(name, splits, Path(args.bases))
        base_top1 = evaluate(base, test)["top1"]
        for target in args.targets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                began = time.perf_counter()
                result = autocompress.compress(
                    base, torch.randn(1, 1, 28, 28), target,
                    train_loader=splits.loader("train", 64, augment=False,
                                                generator=torch.Generator().manual_seed(seed)),
                    val_loader=splits.loader("val", 256),
                    config={"budget": 3, "seed": seed, "channel_multiple": args.multiple}, progress=False,
                    log=lambda line: None)
                deployed = (result.final.get("deployed") or {}).get("batches", {})
                row = {"tag": args.tag, "model": name, "target": target, "seed": seed,
                       "macs_x": round(result.mac_reduction, 3), "params_x": round(result.compression_rate, 3),
                       "base_top1": base_top1, "top1": evaluate(result.model.cpu().eval(), test)["top1"],
                       "ort_speedup": {b: round(v["speedup"], 2) for b, v in deployed.items()},
                       "multiple": result.final.get("channel_multiple"),
                       "seconds": round(time.perf_counter() - began)}
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
