"""Benchmark: a column-pruned grouped convolution's two ColumnConv2d paths against the dense conv (session 40).

A fresh user's MBConv net came out of a ``flops=2x`` run 1.9x slower than its base in onnxruntime: its two
depthwise convs, column-pruned, ran ColumnConv2d's per-position path (one grouped 1x1 conv per kept kernel
position, accumulated), 10-18x slower than the dense depthwise conv each. This times, per layer shape, the
per-position path (``mode="positions"``), the dense path (``mode="dense"``: the conv over the kept input channels,
dropped columns as zeros) and the plain ``nn.Conv2d``, interleaved (:func:`autocompress.latency.measure_models`),
at batch 1 in the chosen runtime; the columns kept are a seeded random ``--keep`` fraction of the GEMM columns.
An ungrouped conv is included for reference (its per-position path is a GEMM over the kept columns).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grouped_column_paths.py --runtime onnxruntime --runs 100
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from autocompress.columns import ColumnConv2d
from autocompress.latency import LatencyConfig, measure_models

#: (in = out channels, kernel, groups, spatial size, kept fraction of the GEMM columns)
SHAPES = [(128, 3, 8, 16, 0.4), (128, 3, 32, 16, 0.4), (256, 3, 8, 8, 0.3), (192, 5, 192, 8, 0.6),
          (416, 3, 416, 4, 0.5), (128, 3, 1, 16, 0.4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "torch"])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    print("channels kernel groups size keep | positions_us dense_us conv_us | positions/dense")
    for channels, kernel, groups, size, keep in SHAPES:
        conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=groups).eval()
        columns = channels // groups * kernel * kernel
        kept = torch.randperm(columns, generator=generator)[: int(columns * keep)]
        forms = {"positions": ColumnConv2d.from_conv(conv, kept, mode="positions").eval(),
                 "dense": ColumnConv2d.from_conv(conv, kept, mode="dense").eval(), "conv": conv}
        timing = measure_models(forms, torch.randn(1, channels, size, size),
                                LatencyConfig(runtime=args.runtime, threads=1), batches=[1], runs=args.runs)[1]
        us = {name: timing[name].median_ms * 1000 for name in forms}
        print(f"{channels} {kernel}x{kernel} {groups} {size}x{size} {keep} | {us['positions']:.1f} "
              f"{us['dense']:.1f} {us['conv']:.1f} | {us['positions'] / us['dense']:.2f}", flush=True)


if __name__ == "__main__":
    main()
