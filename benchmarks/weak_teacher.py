"""Distillation from a weak (under-trained) base: does the budget's default distillation cost top-1?

A user's own model is often not converged. This script builds such a base the way a fresh user did (session 17:
a small residual CNN trained 2 epochs with Adam on 6,000 Fashion-MNIST images), compresses it with
``autocompress.compress`` at ``flops=2x`` (``--target``) and ``budget: 3`` under distillation variants, and, as a
reference, with Torch-Pruning's global magnitude pruning at the same MACs followed by the same 3 epochs of plain
training.
Each variant's result (test top-1 on 2,000 test images, MACs reduction) is one JSON line in ``--out``; variants
already there are skipped (the run resumes).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/weak_teacher.py \
        --variants kd,nokd,alpha0.5,stop --seeds 0,1 --out benchmarks/results/weak_teacher.jsonl
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import autocompress
from autocompress import metrics
from autocompress.data import get_dataset

VARIANTS = {
    "kd": {"distillation": {"alpha": 0.9, "stop_margin": None}},  # the budget's default until session 19
    "nokd": {"distillation": {"enabled": False}},
    "alpha0.5": {"distillation": {"alpha": 0.5, "stop_margin": None}},  # session 19's default
    # the default since session 20: alpha 0.5, distillation stops once the student passes the base on validation
    # (tested at quarters of the first retraining epoch and after each epoch; rows "stop_epoch_end": the first
    # version of session 20, commit f653f52, tested after each epoch only)
    "stop": {},
    # session 20: a fresh user's Torch-Pruning fine-tuning at lr 0.05 beat the default retraining lr 0.01 on such a base
    "stop_lr0.05": {"retrain": {"lr": 0.05}},
    "nokd_lr0.05": {"distillation": {"enabled": False}, "retrain": {"lr": 0.05}},
    # session 22: what the search buys at a 3-epoch budget, where it costs several times the retraining
    "search1": {"search": {"max_evaluations": 1}},  # the search's starting action only
    "search8": {"search": {"max_evaluations": 8}},
    "search5": {"search": {"max_evaluations": 5}},  # what the budget derives since session 22 (3 x 94 steps / 50)
    "uniform": {"search_mode": "uniform"},  # no search: one rate for every unit (a fresh user's 2 points, session 22)
    # session 24: with 100-799 steps an epoch the budget spent an epoch per round on ADMM (the rows "stop" at
    # batch 32 ran so); the schedule written out (the budget refuses admm.epochs; see schedule()) with that epoch
    # spent on retraining (what the budget derives since), or on ADMM as before
    "noadmm": {"admm": {"epochs": 0}},
    "admm1": {"admm": {"epochs": 1}},
    # session 25: retraining on the schedule of a fresh user's loop (one-cycle, 15 % warm-up to lr 0.05), which won
    # +0.3 on their sequence model
    "onecycle": {"retrain": {"lr": 0.05, "schedule": "onecycle", "pct_start": 0.15}},
    "onecycle_lr0.01": {"retrain": {"schedule": "onecycle", "pct_start": 0.15}},
    # session 27: the search (here its one unscored candidate) starts from one global magnitude threshold
    "magnitude": {"search": {"start": "magnitude"}},
}
#: Torch-Pruning references: their fine-tuning settings (session 21: a fresh user fine-tuned at lr 0.05)
TP_VARIANTS = {"torch_pruning": {}, "torch_pruning_lr0.05": {"lr": 0.05}}


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


class ResidualCNN(nn.Module):
    """``[B, 1, 28, 28]`` -> ``[B, 10]``: a 32-channel stem, blocks of 32, 64 (stride 2), 128 (stride 2), GAP."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(Block(32, 32, 1), Block(32, 64, 2), Block(64, 128, 2))
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def loaders(seed: int, batch_size: int = 64) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train (6,000 images in batches of ``batch_size``, shuffled by a seeded generator), validation (2,000) and
    test (2,000) loaders."""
    data = get_dataset("fashion-mnist", val_size=2000, seed=seed, max_train=6000, max_test=2000)

    def tensors(split):
        images = (split.images.float() / 255.0 - data.mean[0]) / data.std[0]
        return TensorDataset(images, split.labels)

    generator = torch.Generator().manual_seed(seed)
    return (DataLoader(tensors(data.train), batch_size=batch_size, shuffle=True, generator=generator),
            DataLoader(tensors(data.val), batch_size=256), DataLoader(tensors(data.test), batch_size=256))


def top1(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def train(model: nn.Module, loader: DataLoader, epochs: int, optimizer: torch.optim.Optimizer,
          schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """``epochs`` of cross-entropy steps; ``schedule`` (if given) steps after every optimiser step."""
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()


def weak_base(train_loader: DataLoader, seed: int, epochs: int = 2) -> nn.Module:
    """The base: Adam at lr 1e-3 for ``epochs`` (2: the fresh user's weak base; more: a base closer to converged,
    with the lr decayed by a cosine schedule)."""
    torch.manual_seed(seed)
    model = ResidualCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if epochs <= 2:
        train(model, train_loader, epochs, optimizer)
        return model.eval()
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for _ in range(epochs):
        train(model, train_loader, 1, optimizer)
        schedule.step()
    return model.eval()


def schedule(variant: str, budget: int, steps_per_epoch: int, target: str = "flops=2x") -> dict:
    """The variant's settings over ``budget`` epochs: the budget's own schedule, or, for a variant that sets
    ``admm.epochs`` (which the budget refuses), the budget's schedule written out with that setting and the
    freed epochs moved to the final retraining."""
    settings = VARIANTS[variant]
    if "admm" not in settings:
        return {"budget": budget, **settings}
    from autocompress.budget import budget_schedule
    from autocompress.config import CompressConfig, Target

    written = budget_schedule(Target.parse(target).factor, budget, steps_per_epoch,
                              CompressConfig().quick_eval.finetune_steps)
    written["final_retrain_epochs"] = budget - written["rounds"] * settings["admm"]["epochs"]
    return {**written, **settings}


def run_autocompress(base: nn.Module, loaders_: tuple, variant: str, seed: int, budget: int = 3,
                     target: str = "flops=2x") -> dict:
    train_loader, val_loader, test_loader = loaders_
    config = {"seed": seed, **schedule(variant, budget, len(train_loader), target)}
    result = autocompress.compress(base, torch.zeros(1, 1, 28, 28), target, train_loader=train_loader,
                                   val_loader=val_loader, config=config, progress=False, log=lambda line: None)
    retrain = [epoch for r in result.records if r["event"] == "retrain" for epoch in r["history"]]
    purified = next((r for r in result.records if r["event"] == "purification"), {})
    return {"top1": top1(result.model, test_loader), "macs_x": result.mac_reduction,
            "admm_epochs": sum(r["epochs"] for r in result.records if r["event"] == "admm"),
            "hard_pruned_val": purified.get("val_top1_before"),
            "distilled_epochs": sum(bool(epoch["distilled"]) for epoch in retrain), "retrain_epochs": len(retrain),
            "distilled_steps": next((e["distilled_steps"] for e in retrain if "distilled_steps" in e), None),
            "phase_seconds": {phase: round(s, 1) for phase, s in result.phase_seconds.items()}}


def run_torch_pruning(base: nn.Module, loaders_: tuple, seed: int, lr: float = 0.01, budget: int = 3,
                      target: str = "flops=2x") -> dict:
    """Torch-Pruning global magnitude to the target's MACs (counted by ``metrics.count_macs``), then ``budget``
    epochs of SGD at ``lr`` as in the budget."""
    import copy

    import torch_pruning as tp

    from autocompress.config import Target

    train_loader, _, test_loader = loaders_
    model, example = copy.deepcopy(base), torch.zeros(1, 1, 28, 28)
    base_macs = metrics.count_macs(base, example)
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       global_pruning=True, pruning_ratio=0.9, iterative_steps=200,
                                       ignored_layers=[model.head])
    factor = Target.parse(target).factor
    for _ in range(200):
        if metrics.count_macs(model, example) <= base_macs / factor:
            break
        pruner.step()
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    train(model, train_loader, budget, optimizer)
    return {"top1": top1(model, test_loader), "macs_x": base_macs / metrics.count_macs(model, example)}


def append_row(out: Path, row: dict) -> None:
    """Print ``row`` and append it to ``out`` as one JSON line (a rerun skips the rows already there)."""
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="kd,nokd,alpha0.5,torch_pruning")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="benchmarks/results/weak_teacher.jsonl")
    parser.add_argument("--base-epochs", type=int, default=2,
                        help="epochs that train the base (2: the weak base; 15: close to converged)")
    parser.add_argument("--budget", type=int, default=3, help="the compression's training budget in epochs")
    parser.add_argument("--target", default="flops=2x", help="a flops target (rows before session 27: flops=2x)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="training batch size (64: 94 steps an epoch, below the budget's 100 for ADMM; 32: 188)")
    args = parser.parse_args()
    setup = {"base_epochs": args.base_epochs, "budget": args.budget, "batch_size": args.batch_size,
             "target": args.target}
    out = Path(args.out)
    done = set()
    if out.exists():
        rows = map(json.loads, out.read_text().splitlines())
        done = {(r["variant"], r["seed"], r.get("base_epochs", 2), r.get("budget", 3), r.get("batch_size", 64),
                 r.get("target", "flops=2x")) for r in rows}
    for seed in (int(s) for s in args.seeds.split(",")):
        data = loaders(seed, args.batch_size)
        base = weak_base(data[0], seed, args.base_epochs)
        base_top1 = top1(base, data[2])
        for variant in args.variants.split(","):
            if (variant, seed, *setup.values()) in done:
                continue
            started = time.perf_counter()
            row = (run_torch_pruning(base, data, seed, budget=args.budget, target=args.target, **TP_VARIANTS[variant])
                   if variant in TP_VARIANTS else run_autocompress(base, data, variant, seed, args.budget, args.target))
            row = {"variant": variant, "seed": seed, **setup, "base_top1": base_top1,
                   **row,
                   "seconds": round(time.perf_counter() - started, 1)}
            append_row(out, row)


if __name__ == "__main__":
    main()
