"""Benchmark: compact column conv (ColumnConv2d) vs the dense nn.Conv2d, PyTorch CPU (issue 3).

For resnet20-like and vgg16-like (CIFAR) 3x3 layer shapes (stride 1, padding 1, channels in = out),
random GEMM columns are zeroed at each column sparsity (seeded, uniform over the ``C*9`` columns); the dense
conv runs the zeroed weight, ColumnConv2d stores only the kept columns. Both of ColumnConv2d's exact paths
are timed -- ``dense``: conv on the kept input channels, dropped columns as zeros; ``positions``: the
kept-column im2col gathered per kernel position and one GEMM -- and the path that ``mode="auto"`` picks
(see ``compaction.DENSE_DENSITY_THRESHOLD`` / ``GEMM_MIN_FILTERS``) is reported.

Timing: in each of ``--rounds`` rounds the dense conv and both paths are timed back to back (order rotated
every round; each a median of ``--runs`` forwards after warm-up, no_grad); a path's speedup is the median
over rounds of ``dense ms / path ms`` from the same round, so background load cancels in the ratio.
Latencies are medians over rounds. The load average is printed per layer.

    .venv/bin/python benchmarks/column_conv.py --threads 1,2 --runs 10 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from autocompress.compaction import ColumnConv2d

SHAPES = {  # name -> (channels in = out, spatial size)
    "resnet20 16ch 32x32": (16, 32), "resnet20 32ch 16x16": (32, 16), "resnet20 64ch 8x8": (64, 8),
    "vgg16 64ch 32x32": (64, 32), "vgg16 128ch 16x16": (128, 16), "vgg16 256ch 8x8": (256, 8),
    "vgg16 512ch 4x4": (512, 4),
}


def median_ms(fn, x: torch.Tensor, runs: int, warmup: int = 2) -> float:
    """Median wall time (ms) of ``fn(x)`` over ``runs`` calls after ``warmup`` calls, under no_grad."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def column_pruned(conv: nn.Conv2d, sparsity: float, gen: torch.Generator) -> tuple[nn.Conv2d, torch.Tensor]:
    """A copy of ``conv`` with ``round(sparsity * K)`` random GEMM columns zeroed, and the kept columns."""
    channels, kk = conv.in_channels, conv.kernel_size[0] * conv.kernel_size[1]
    total = channels * kk
    kept = torch.randperm(total, generator=gen)[: total - round(sparsity * total)]
    masked = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, padding=conv.padding, bias=False).eval()
    with torch.no_grad():
        mask = torch.zeros(total)
        mask[kept] = 1
        masked.weight.copy_(conv.weight * mask.reshape(1, channels, *conv.kernel_size))
    return masked, kept


def paired(modules: dict[str, nn.Module], x: torch.Tensor, runs: int, rounds: int):
    """Per-module median ms over rounds and median speedup vs ``modules["conv"]`` of the same round."""
    names = list(modules)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(median_ms(modules[name], x, runs))
    speedups = {name: statistics.median(c / t for c, t in zip(times["conv"], times[name])) for name in names}
    return {name: statistics.median(values) for name, values in times.items()}, speedups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--sparsities", default="0.5,0.75,0.9")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated keys of SHAPES")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, runs={args.runs}, rounds={args.rounds}, loadavg {loadavg()}\n")
    print("| layer | threads | batch | col. sparsity | dense conv ms | dense-slice path ms (speedup) | "
          "positions path ms (speedup) | auto picks | auto speedup | best path | loadavg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label in args.shapes.split(","):
        channels, size = SHAPES[label]
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for batch in [int(b) for b in args.batches.split(",")]:
                x = torch.randn(batch, channels, size, size, generator=gen)
                for sparsity in [float(s) for s in args.sparsities.split(",")]:
                    masked, kept = column_pruned(conv, sparsity, gen)
                    modules = {"conv": masked, **{mode: ColumnConv2d.from_conv(masked, kept, mode=mode).eval()
                                                  for mode in ("dense", "positions")}}
                    auto = ColumnConv2d.from_conv(masked, kept).path
                    with torch.no_grad():
                        ref = masked(x)
                        assert all(torch.allclose(m(x), ref, atol=1e-4, rtol=1e-4) for m in modules.values())
                    ms, speedup = paired(modules, x, args.runs, args.rounds)
                    best = max(("dense", "positions"), key=lambda mode: speedup[mode])
                    print(f"| {label} | {threads} | {batch} | {sparsity:.0%} | {ms['conv']:.3f} | "
                          f"{ms['dense']:.3f} ({speedup['dense']:.2f}x) | "
                          f"{ms['positions']:.3f} ({speedup['positions']:.2f}x) | {auto} | "
                          f"{speedup[auto]:.2f}x | {best} | {loadavg()} |", flush=True)


if __name__ == "__main__":
    main()
