"""Benchmark: onnxruntime latency of filter-pruned models at any width and at widths on a grid of 4 / 8 / 16.

Why: onnxruntime's CPU convolutions run in its blocked channel layout (NCHWc) only when a convolution's input
channels are multiples of 4 (read from the optimised graphs: :func:`autocompress.latency.blocked_convolutions`,
the "NCHWc convs" column); any other width sends the layer, and a layout conversion on each side, to the plain
kernels. A params target's compact model used to keep any width (``channel_multiple`` 1); this measures what
that cost and what the default of a params target (:data:`autocompress.alignment.LAYOUT_MULTIPLE`) buys.

Models (random init, BatchNorm statistics randomised; latency does not depend on the values): ``dwse``, a
small depthwise-separable CNN with squeeze-excitation (the kind of network fresh users brought, 1x28x28),
and zoo models (``fmnist_cnn``, ``resnet20``: 3x32x32). Each is filter-pruned uniformly at every ``--rates``
through the engine (``PruningSpace.build`` at the channel multiple -> ``project`` -> ``compact``, output
checked against the masked model), so the aligned models are the widths the library would keep at that
multiple. Timing: :func:`autocompress.latency.measure_models` (onnxruntime, 1 thread, batch ``--batch``; every
model of one rate interleaved with the base), median of ``--runs``; speedup = base / model.

    .venv/bin/python benchmarks/ort_widths.py --models dwse,fmnist_cnn,resnet20 --rates 0.1,0.15,0.25,0.4

``--kind column`` (session 44) column-prunes instead: every column unit of a flops target's space
(``executed_macs_only``: 1x1 kernels and Linear layers at one position of an input item, wide Conv2d layers) at the
rate, a layer of kernel area 1 keeping as many input channels as the rate gives (multiple 1) or the nearest multiple
of 4 / 16 (what :meth:`autocompress.space.PruningSpace.column_keep` keeps at that ``channel_multiple``). Models may
also be torchvision names (10 classes, 3x32x32), e.g. fresh user 60's ``regnet_x_400mf``, whose column-pruned 1x1
convolutions kept widths off the grid:

    .venv/bin/python benchmarks/ort_widths.py --kind column --models regnet_x_400mf --rates 0.27,0.43,0.5
"""
from __future__ import annotations

import argparse

import torch
import torchvision
from torch import nn

from autocompress.alignment import aligned_keep
from autocompress.compaction import compact
from autocompress.latency import LatencyConfig, blocked_convolutions, measure_models
from autocompress.metrics import count_macs
from autocompress.models import create_model
from autocompress.projection import project
from autocompress.space import PruningSpace, keep_count
from autocompress.training import seeded
from filter_speedup import filter_pruned, randomise_batchnorm  # benchmarks/ is the script's folder

MULTIPLES = {"filter": (1, 4, 8, 16), "column": (1, 4, 16)}


class SqueezeExcite(nn.Module):
    """Channel gates from the pooled input: ``x * sigmoid(fc2(relu(fc1(mean(x)))))``, ``[B, C, H, W]``."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, squeeze-excitation, 1x1 projection; a skip when the shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(_conv_bn(cin, hidden), nn.ReLU(), _conv_bn(hidden, hidden, 3, stride, hidden),
                                  nn.ReLU(), SqueezeExcite(hidden), _conv_bn(hidden, cout))
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.skip else self.body(x)


def dwse() -> nn.Module:
    """The depthwise / squeeze-excitation CNN (122k parameters, 1x28x28 inputs, 10 classes)."""
    return nn.Sequential(_conv_bn(1, 32, 3), nn.ReLU(), InvertedResidual(32, 32, 1), InvertedResidual(32, 48, 2),
                         InvertedResidual(48, 48, 1), InvertedResidual(48, 64, 2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


def model_and_example(name: str, generator: torch.Generator) -> tuple[nn.Module, torch.Tensor]:
    with seeded(0):
        model = (dwse() if name == "dwse" else getattr(torchvision.models, name)(num_classes=10)
                 if hasattr(torchvision.models, name) else create_model(name))
    randomise_batchnorm(model, generator)
    size = (1, 28, 28) if name in ("dwse", "fmnist_cnn", "lenet5") else (3, 32, 32)
    return model.eval(), torch.randn(1, *size, generator=generator)


def column_pruned(model: nn.Module, rate: float, example: torch.Tensor, multiple: int) -> nn.Module:
    """The compact model after column pruning at ``rate`` of every column unit of a flops target's space, a layer
    of kernel area 1 keeping the multiple of ``multiple`` input channels nearest the rate's count."""
    space = PruningSpace.build(model, example, dims=("column",), executed_macs_only=True)
    rates = {}
    for layer in space.column_layers:
        keep = keep_count(layer.size, rate)
        rates[layer.name] = 1 - (aligned_keep(layer.size, keep, multiple) if layer.area == 1 else keep) / layer.size
    masks = project(space, model, {"column": rates})
    return compact(model, space.param_masks(masks), example).model


PRUNERS = {"filter": filter_pruned, "column": column_pruned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dwse,fmnist_cnn,resnet20")
    parser.add_argument("--rates", default="0.1,0.15,0.25,0.4")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--kind", choices=sorted(PRUNERS), default="filter")
    args = parser.parse_args()
    config = LatencyConfig(runtime="onnxruntime", threads=1, batch=args.batch, runs=args.runs)
    generator = torch.Generator().manual_seed(0)
    print("| model | rate | multiple | MACs reduction | NCHWc convs | base ms | pruned ms | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        base, example = model_and_example(name, generator)
        base_macs = count_macs(base, example)
        for rate in (float(r) for r in args.rates.split(",")):
            pruned = {m: PRUNERS[args.kind](base, rate, example, m).eval() for m in MULTIPLES[args.kind]}
            times = measure_models({"base": base, **{str(m): p for m, p in pruned.items()}}, example, config,
                                   batches=[args.batch])[args.batch]
            for m, model in pruned.items():
                base_ms, ms = times["base"].median_ms, times[str(m)].median_ms
                blocked = "/".join(map(str, blocked_convolutions(model, example)))
                print(f"| {name} | {rate:g} | {m} | {base_macs / count_macs(model, example):.2f}x | {blocked} | "
                      f"{base_ms:.3f} | {ms:.3f} | {base_ms / ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
