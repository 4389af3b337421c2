"""ADMM epoch time / plain training epoch time (issue 3 benchmark; goal <= 1.10).

Times ``training.train_epoch`` over the same fixed number of CIFAR-10 training batches twice: plainly, and as
an ADMM W-step (``regularizer=ADMMState.penalty``, i.e. the ``rho/2 ||W - Z + U||^2`` penalty of every
masked parameter, AutoCompress §3), interleaved ``--repeats`` times so both see the same CPU load. The Z/U
update (projection, once per epoch by default) is timed separately and added once per full epoch
(``ceil(train images / batch size)`` batches) for the per-epoch ratio.

Example::

    .venv/bin/python benchmarks/admm_overhead.py --model resnet20 --batches 50 --batch-size 128
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from autocompress.admm import ADMMConfig, ADMMState
from autocompress.data import get_dataset
from autocompress.models import create_model
from autocompress.pruning import expand_rates
from autocompress.space import PruningSpace
from autocompress.training import TrainConfig, build_optimizer, seeded, train_epoch


def _timed_epoch(model, splits, batch_size: int, regularizer=None) -> float:
    loader = splits.loader("train", batch_size, generator=torch.Generator().manual_seed(0))
    optimizer = build_optimizer(model, TrainConfig(lr=0.01))
    began = time.perf_counter()
    train_epoch(model, loader, optimizer, regularizer=regularizer, progress=False)
    return time.perf_counter() - began


def _penalty_cost(state: ADMMState, steps: int = 50) -> float:
    """Seconds per step of the penalty alone: forward + backward of ``rho/2 ||W - Z + U||^2``."""
    began = time.perf_counter()
    for _ in range(steps):
        state.penalty().backward()
    for w in state.weights:
        w.grad = None
    return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 location (default: the dataset lookup order)")
    parser.add_argument("--batches", type=int, default=50, help="training batches timed per run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved plain / ADMM runs")
    parser.add_argument("--rate", type=float, default=0.5, help="filter and column rate of every unit")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = get_dataset("cifar10", args.data_dir, max_train=args.batches * args.batch_size, max_test=1)
    with seeded(0):
        model = create_model(args.model, num_classes=splits.num_classes)
    example = torch.zeros(1, *splits.input_size)
    space = PruningSpace.build(model, example)
    rates = expand_rates(space, {"default": args.rate}, ("filter", "column"))
    state = ADMMState(model, space, rates, ADMMConfig(rho_init=1e-3))
    _timed_epoch(model, splits, args.batch_size)  # warm-up
    plain, admm, updates = [], [], []
    for repeat in range(args.repeats):
        order = ("plain", "admm") if repeat % 2 == 0 else ("admm", "plain")
        for kind in order:
            if kind == "plain":
                plain.append(_timed_epoch(model, splits, args.batch_size))
            else:
                admm.append(_timed_epoch(model, splits, args.batch_size, regularizer=state.penalty))
        began = time.perf_counter()
        state.update()
        updates.append(time.perf_counter() - began)
    t_penalty = statistics.median(_penalty_cost(state) for _ in range(3))
    t_plain, t_admm, t_update = statistics.median(plain), statistics.median(admm), statistics.median(updates)
    epoch_batches = math.ceil(50000 * 0.9 / args.batch_size)  # 45k training images after the 5k val carve
    per_batch_plain, per_batch_admm = t_plain / args.batches, t_admm / args.batches
    epoch_ratio = (epoch_batches * per_batch_admm + t_update) / (epoch_batches * per_batch_plain)
    print(f"{args.model}, {args.batches} batches of {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved repeats (medians)")
    print(f"plain W-step:  {t_plain:.2f} s  ({1000 * per_batch_plain:.1f} ms/batch)  runs {[round(t, 2) for t in plain]}")
    print(f"ADMM W-step:   {t_admm:.2f} s  ({1000 * per_batch_admm:.1f} ms/batch)  runs {[round(t, 2) for t in admm]}")
    print(f"Z/U update:    {1000 * t_update:.1f} ms (once per epoch)")
    print(f"penalty alone: {1000 * t_penalty:.2f} ms/step (forward + backward, "
          f"{sum(w.numel() for w in state.weights):,} ADMM parameters) = "
          f"{100 * t_penalty / per_batch_plain:.2f} % of a plain step")
    print(f"ratio over the timed batches: {t_admm / t_plain:.3f}")
    print(f"ratio per full epoch ({epoch_batches} batches + one Z/U update): {epoch_ratio:.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
