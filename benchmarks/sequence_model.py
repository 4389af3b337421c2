"""A fresh user's 1D-convolution sequence classifier (session 24): which default costs the points that Torch-Pruning
wins by at ``flops=2x`` and a 4-epoch budget?

The model reads each Fashion-MNIST image as a sequence of 28 rows of 28 features: a Conv1d stem, three dilated
residual blocks with squeeze-excitation gates, a stride-2 Conv1d, one more gated block, global average pooling and a
Linear head (487,714 parameters, 8.78 M MACs). The base trains for 8 epochs (SGD, one-cycle lr 0.05) on 10,000
training images; 2,000 more validate, 4,000 test images score. Each variant is ``autocompress.compress`` with
``budget: 4`` and its overrides, or (``torch_pruning``) Torch-Pruning's global magnitude pruning to the same MACs
followed by 4 epochs of the base's own training loop; ``tp_widths`` runs our pipeline from Torch-Pruning's
global-magnitude widths (does the width allocation decide the gap?). One JSON line per (variant, seed) in ``--out``;
rows already there are skipped.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/sequence_model.py \\
        --variants default,nokd,torch_pruning,filter,tp_widths,onecycle --seeds 0,1,2 \\
        --out benchmarks/results/sequence_model.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import autocompress
from autocompress import metrics
from autocompress.data import get_dataset
from autocompress.sampling import ActionSampler
from weak_teacher import append_row, top1  # a sibling script: benchmarks/ is on sys.path when run as a script
from weak_teacher import train as train_steps

VARIANTS = {"default": {}, "nokd": {"distillation": {"enabled": False}}, "m1": {"channel_multiple": 1},
            "lr0.05": {"retrain": {"lr": 0.05}}, "uniform": {"search_mode": "uniform"}, "filter": {"dims": "filter"},
            "tp_widths": {"dims": "filter"}, "onecycle": {"retrain": {"lr": 0.05, "schedule": "onecycle",
                                                                      "pct_start": 0.15}},
            "magnitude": {"search": {"start": "magnitude"}}}  # session 27
EXAMPLE = torch.zeros(1, 28, 28)


class Gate(nn.Module):
    """Squeeze-excitation over the channels of ``[B, C, L]``."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(channels, channels // reduction), nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(-1))))).unsqueeze(-1)


class Block(nn.Module):
    """Dilated conv-BN-ReLU, conv-BN, gate, residual add, ReLU."""

    def __init__(self, channels: int, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2, self.bn2 = nn.Conv1d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm1d(channels)
        self.gate = Gate(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.gate(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))


class SequenceNet(nn.Module):
    """``[B, 28, 28]`` (rows, columns) -> ``[B, 10]``, the rows as the sequence."""

    def __init__(self, width: int = 96):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(28, width, 3, padding=1, bias=False), nn.BatchNorm1d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width, 1), Block(width, 2), Block(width, 4))
        self.down = nn.Sequential(nn.Conv1d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm1d(2 * width), nn.ReLU())
        self.block4 = Block(2 * width)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.down(self.blocks(self.stem(x.transpose(1, 2)))))
        return self.head(x.mean(-1))


def loaders(seed: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train (10,000 images, batches of 128 shuffled by a seeded generator), validation (2,000), test (4,000)."""
    data = get_dataset("fashion-mnist", val_size=2000, seed=0, max_train=10000, max_test=4000)

    def sequences(split):
        return TensorDataset((split.images.float().squeeze(1) / 255.0 - data.mean[0]) / data.std[0], split.labels)

    generator = torch.Generator().manual_seed(seed)
    return (DataLoader(sequences(data.train), batch_size=128, shuffle=True, generator=generator),
            DataLoader(sequences(data.val), batch_size=256), DataLoader(sequences(data.test), batch_size=500))


def train(model: nn.Module, loader: DataLoader, epochs: int) -> None:
    """SGD (momentum 0.9, Nesterov, weight decay 5e-4) with a one-cycle lr peaking at 0.05: the user's own loop."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.05, total_steps=epochs * len(loader), pct_start=0.15)
    train_steps(model, loader, epochs, optimizer, schedule)


def base_model(path: Path, build: Callable[[], nn.Module] = SequenceNet,
               fit: Callable[[nn.Module, DataLoader, int], None] | None = None) -> nn.Module:
    """The base: ``build()`` trained once (initialised and trained under seed 0, 8 epochs of ``fit``, default
    :func:`train`) and kept at ``path``."""
    torch.manual_seed(0)  # torch's default seed differs per process: the initialisation needs it too
    model = build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    (fit or train)(model, loaders(0)[0], 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def run_autocompress(base: nn.Module, data: tuple, variant: str, seed: int, target: str = "flops=2x") -> dict:
    """``compress`` with ``budget: 4`` and the variant's settings; ``tp_widths`` starts (and, with the budget's
    single candidate, ends) its search at the per-layer widths Torch-Pruning's global magnitude ranking keeps."""
    start = tp_start(base) if variant == "tp_widths" else ActionSampler.initial_action
    with mock.patch.object(ActionSampler, "initial_action", start):
        result = autocompress.compress(base, EXAMPLE, target, train_loader=data[0], val_loader=data[1],
                                       config={"budget": 4, "seed": seed, **VARIANTS[variant]}, device="cpu",
                                       progress=False, log=lambda line: None)
    return {"top1": top1(result.model, data[2]), "macs_x": result.mac_reduction, "params_x": result.compression_rate}


def tp_global(base: nn.Module) -> nn.Module:
    """A copy of ``base`` pruned by Torch-Pruning's global magnitude ranking (head kept) to half the MACs."""
    import torch_pruning as tp

    model, base_macs = copy.deepcopy(base), metrics.count_macs(base, EXAMPLE)
    pruner = tp.pruner.MagnitudePruner(model, EXAMPLE, importance=tp.importance.MagnitudeImportance(p=2),
                                       global_pruning=True, pruning_ratio=0.9, iterative_steps=200,
                                       ignored_layers=[model.head])
    while metrics.count_macs(model, EXAMPLE) > base_macs / 2:
        pruner.step()
    return model


def tp_start(base: nn.Module):
    """An ``ActionSampler.initial_action`` returning the filter rates of :func:`tp_global`'s widths (each filter
    group's root layer as Torch-Pruning left it)."""
    modules = dict(tp_global(base).named_modules())
    widths = {name: getattr(m, "out_channels", getattr(m, "out_features", None)) for name, m in modules.items()}

    def start(sampler: ActionSampler, spread: float = 0.5) -> np.ndarray:
        return np.array([1.0 - widths[unit.name] / unit.size for unit in sampler.units])

    return start


def run_torch_pruning(base: nn.Module, data: tuple, seed: int) -> dict:
    """Torch-Pruning global magnitude pruning (head kept) to half the MACs, then 4 epochs of :func:`train`."""
    base_macs = metrics.count_macs(base, EXAMPLE)
    model = tp_global(base)
    torch.manual_seed(seed)
    train(model, data[0], 4)
    return {"top1": top1(model, data[2]), "macs_x": base_macs / metrics.count_macs(model, EXAMPLE),
            "params_x": sum(p.numel() for p in base.parameters()) / sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="default,nokd,torch_pruning")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--base", default=str(Path.home() / ".cache/autocompress-bench/sequence_net_base.pt"))
    parser.add_argument("--out", default="benchmarks/results/sequence_model.jsonl")
    parser.add_argument("--target", default="flops=2x", help="autocompress's target (Torch-Pruning: flops=2x only)")
    args = parser.parse_args()
    if args.target != "flops=2x" and "torch_pruning" in args.variants.split(","):
        parser.error("torch_pruning runs at flops=2x only")
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = map(json.loads, out.read_text().splitlines()) if out.exists() else []
    done = {(r["variant"], r["seed"], r.get("target", "flops=2x")) for r in rows}
    base = base_model(Path(args.base))
    for seed in (int(s) for s in args.seeds.split(",")):
        data = loaders(seed)
        for variant in (v for v in args.variants.split(",") if (v, seed, args.target) not in done):
            started = time.perf_counter()
            row = run_torch_pruning(base, data, seed) if variant == "torch_pruning" else \
                run_autocompress(base, data, variant, seed, args.target)
            row = {"variant": variant, "seed": seed, "target": args.target, "base_top1": top1(base, data[2]), **row,
                   "seconds": round(time.perf_counter() - started, 1)}
            append_row(out, row)


if __name__ == "__main__":
    main()
