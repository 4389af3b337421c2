"""Benchmark: compact column conv (ColumnConv2d) vs the dense nn.Conv2d, PyTorch CPU.

For resnet20-like and vgg16-like (CIFAR) 3x3 layer shapes, random GEMM columns are zeroed at column
sparsity 50 / 75 / 90 % (seeded); the dense conv runs the zeroed weight, ColumnConv2d stores only the kept
columns. Prints a markdown table of median latencies (ms) and the speedup dense / column for ColumnConv2d's
automatic path and for each of its two paths (``dense``: conv on the kept input channels; ``positions``:
one 1x1 conv per kernel position).

    .venv/bin/python benchmarks/column_conv.py --threads 2 --runs 10
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


def median_ms(fn, x, runs: int, warmup: int = 2) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--sparsities", default="0.5,0.75,0.9")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads={args.threads}, runs={args.runs}, torch {torch.__version__}\n")
    print("| layer | batch | col. sparsity | dense conv ms | ColumnConv2d ms (path) | speedup | "
          "dense-slice path ms | positions path ms |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (channels, size) in SHAPES.items():
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
        for batch in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(batch, channels, size, size, generator=gen)
            dense_ms = median_ms(conv, x, args.runs)
            for sparsity in [float(s) for s in args.sparsities.split(",")]:
                total = channels * 9
                kept = torch.randperm(total, generator=gen)[: total - round(sparsity * total)]
                masked = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
                with torch.no_grad():
                    mask = torch.zeros(total)
                    mask[kept] = 1
                    masked.weight.copy_(conv.weight * mask.reshape(1, channels, 3, 3))
                modules = {mode: ColumnConv2d.from_conv(masked, kept, mode=mode).eval()
                           for mode in ("auto", "dense", "positions")}
                with torch.no_grad():
                    ref = masked(x)
                    assert all(torch.allclose(m(x), ref, atol=1e-4, rtol=1e-4) for m in modules.values())
                ms = {mode: median_ms(m, x, args.runs) for mode, m in modules.items()}
                print(f"| {label} | {batch} | {sparsity:.0%} | {dense_ms:.3f} | {ms['auto']:.3f} "
                      f"({modules['auto'].path}) | {dense_ms / ms['auto']:.2f}x | {ms['dense']:.3f} | "
                      f"{ms['positions']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
