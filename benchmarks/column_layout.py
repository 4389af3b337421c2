"""Benchmark: onnxruntime latency of column-pruned 1x1 convolutions kept at any width and at widths on a grid.

Why: a column-pruned 1x1 convolution (or Linear) keeps some of its input channels: its compact form gathers them
and runs a narrower convolution. onnxruntime's CPU convolutions run in the blocked channel layout (NCHWc) only when
their input channels are multiples of 4 (:data:`autocompress.alignment.LAYOUT_MULTIPLE`); fresh user 60's
torchvision ``regnet_x_400mf`` at ``flops=2x`` (default dims) ran slower than its base, 23 column-pruned 1x1 convs
keeping widths off that grid. This prunes the columns of every column unit of a flops target's space
(``executed_macs_only``: 1x1 kernels at one position of an input item, Linear layers, and wide Conv2d layers) at
a uniform rate, with each layer's kept columns as the rate gives them (multiple 1) or rounded to the nearest
multiple of 4 / 16 of the layer's input channels (kernel area 1 only), and times the compact models in
onnxruntime against the base, interleaved (:func:`autocompress.latency.measure_models`, 1 thread).

    .venv/bin/python benchmarks/column_layout.py --models regnet_x_400mf,resnet20 --rates 0.3,0.5
"""
from __future__ import annotations

import argparse

import torch
import torchvision

from autocompress.alignment import aligned_keep
from autocompress.compaction import compact
from autocompress.latency import LatencyConfig, blocked_convolutions, measure_models
from autocompress.metrics import count_macs
from autocompress.models import create_model
from autocompress.projection import project
from autocompress.space import PruningSpace, keep_count
from autocompress.training import seeded
from filter_speedup import randomise_batchnorm  # benchmarks/ is the script's folder

MULTIPLES = (1, 4, 16)


def model_and_example(name: str, generator: torch.Generator) -> tuple[torch.nn.Module, torch.Tensor]:
    with seeded(0):
        model = (getattr(torchvision.models, name)(num_classes=10) if hasattr(torchvision.models, name)
                 else create_model(name))
    randomise_batchnorm(model, generator)
    return model.eval(), torch.randn(1, 3, 32, 32, generator=generator)


def column_pruned(model, space: PruningSpace, example, rate: float, multiple: int) -> torch.nn.Module:
    """The compact model with every column layer pruned at ``rate``, 1x1 layers' kept columns aligned."""
    rates = {}
    for layer in space.column_layers:
        keep = keep_count(layer.size, rate)
        if layer.area == 1:
            keep = aligned_keep(layer.size, keep, multiple)
        rates[layer.name] = 1 - keep / layer.size
    masks = project(space, model, {"filter": {}, "column": rates, "irregular": {}})
    return compact(model, space.param_masks(masks), example).model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="regnet_x_400mf,resnet20")
    parser.add_argument("--rates", default="0.3,0.5")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    config = LatencyConfig(runtime="onnxruntime", threads=1, batch=args.batch, runs=args.runs)
    generator = torch.Generator().manual_seed(0)
    print("| model | rate | multiple | column layers (1x1) | MACs reduction | NCHWc convs | base ms | pruned ms "
          "| speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        base, example = model_and_example(name, generator)
        space = PruningSpace.build(base, example, dims=("column",), executed_macs_only=True)
        ones = sum(layer.area == 1 for layer in space.column_layers)
        base_macs = count_macs(base, example)
        for rate in (float(r) for r in args.rates.split(",")):
            pruned = {m: column_pruned(base, space, example, rate, m) for m in MULTIPLES}
            times = measure_models({"base": base, **{str(m): p for m, p in pruned.items()}}, example, config,
                                   batches=[args.batch])[args.batch]
            for m, model in pruned.items():
                base_ms, ms = times["base"].median_ms, times[str(m)].median_ms
                blocked = "/".join(map(str, blocked_convolutions(model, example)))
                print(f"| {name} | {rate:g} | {m} | {len(space.column_layers)} ({ones}) | "
                      f"{base_macs / count_macs(model, example):.2f}x | {blocked} | {base_ms:.3f} | {ms:.3f} | "
                      f"{base_ms / ms:.2f}x |", flush=True)
            print(f"| {name} | base | | | 1.00x | {'/'.join(map(str, blocked_convolutions(base, example)))} | | | |")


if __name__ == "__main__":
    main()
