"""Benchmark: measured CPU latency speedup of filter-pruned models vs their MACs reduction (issue 3).

Goal: speedup >= 0.8 x MACs reduction. For each model (resnet20 and full-width vgg16, CIFAR 3x32x32; random
init, BatchNorm affine and running statistics randomised from a seeded generator) and each uniform filter
rate, the model goes through the engine exactly as ``autocompress prune`` does it:
``PruningSpace.build(dims=("filter",))`` -> ``project`` (L2-norm top-k of every coupled filter group,
AutoCompress, Liu et al. AAAI 2020 §3) -> ``param_masks`` -> ``compact`` (torch-pruning channel removal,
output checked against the masked model). MACs come from ``metrics.count_macs`` (batch 1).

Latency is ``metrics.measure_latency`` (eval, no_grad, warm-up, median of ``--runs``) at fixed thread counts
and batch sizes, in ``--rounds`` interleaved rounds so that original and compact models
see the same background load: in each round the original and each compact model are timed back to back
and the speedup is the median over rounds of these paired ratios (latencies: median over all measurements).
Variants: ``eager`` (contiguous NCHW), ``channels_last`` (model and input in NHWC), and ``fused`` (Conv+BN
folded for inference with ``torch.fx.experimental.optimization.fuse``, contiguous).

    .venv/bin/python benchmarks/filter_speedup.py --threads 1,2 --batches 1,64 --rates 0.25,0.5,0.75
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from autocompress.compaction import compact
from autocompress.metrics import count_macs, count_params, measure_latency
from autocompress.models import create_model
from autocompress.projection import project
from autocompress.pruning import expand_rates
from autocompress.space import PruningSpace
from autocompress.training import seeded

VARIANTS = ("eager", "channels_last", "fused")


def randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm random affine parameters and running statistics (so a fresh model behaves
    like a trained one for compaction's output check; latency does not depend on the values)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def filter_pruned(model: nn.Module, rate: float, example: torch.Tensor, multiple: int = 1) -> nn.Module:
    """The compact model after uniform filter pruning at ``rate`` (every filter group) through the engine, every
    group's width aligned to ``multiple`` channels (1: any width)."""
    space = PruningSpace.build(model, example, dims=("filter",), channel_multiple=multiple)
    masks = project(space, model, expand_rates(space, {"default": rate}, ("filter",)))
    return compact(model, space.param_masks(masks), example, channel_multiple=multiple).model


def variant(model: nn.Module, kind: str) -> nn.Module:
    """``model`` prepared for the timing variant ``kind`` (see :data:`VARIANTS`)."""
    if kind == "channels_last":
        return model.to(memory_format=torch.channels_last)
    if kind == "fused":
        return fuse(model.eval())
    return model


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def paired(models: dict[tuple, nn.Module], rates: list[float], variants: list[str], x: torch.Tensor,
           threads: int, runs: int, rounds: int) -> tuple[dict[tuple, float], dict[tuple, float]]:
    """Paired timing: in every round, for every (rate, variant), the original and the compact model are
    timed back to back (order alternating by round) and their ratio taken, so load changes between pairs
    cancel. Returns (median latency ms per (rate, variant) key incl. rate 0.0, median paired speedup per
    (rate, variant) key)."""
    times: dict[tuple, list[float]] = {key: [] for key in models}
    ratios: dict[tuple, list[float]] = {(rate, kind): [] for rate in rates for kind in variants}
    inputs = {"channels_last": x.contiguous(memory_format=torch.channels_last)}
    for round_index in range(rounds):
        for rate in rates:
            for kind in variants:
                pair = [(0.0, kind), (rate, kind)][:: 1 if round_index % 2 == 0 else -1]
                ms = {key: measure_latency(models[key], inputs.get(kind, x), runs=runs, warmup=2,
                                           threads=threads).median_ms for key in pair}
                for key, value in ms.items():
                    times[key].append(value)
                ratios[(rate, kind)].append(ms[(0.0, kind)] / ms[(rate, kind)])
    return ({key: statistics.median(v) for key, v in times.items()},
            {key: statistics.median(v) for key, v in ratios.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,vgg16")
    parser.add_argument("--rates", default="0.25,0.5,0.75", help="uniform filter pruning rates")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--runs", type=int, default=10, help="timed forwards per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median taken)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    variants = args.variants.split(",")
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, runs={args.runs}, rounds={args.rounds}, loadavg at start {loadavg()}\n")
    rows = []
    for name in args.models.split(","):
        with seeded(0):
            original = create_model(name).eval()  # vgg16: full width (width=1.0)
        randomise_batchnorm(original, generator)
        example = torch.zeros(1, 3, 32, 32)
        pruned = {0.0: original, **{rate: filter_pruned(original, rate, example) for rate in rates}}
        macs = {rate: count_macs(m, example) for rate, m in pruned.items()}
        params = {rate: count_params(m) for rate, m in pruned.items()}
        models = {(rate, kind): variant(m, kind) for rate, m in pruned.items() for kind in variants}
        for threads in [int(t) for t in args.threads.split(",")]:
            for batch in [int(b) for b in args.batches.split(",")]:
                x = torch.randn(batch, 3, 32, 32, generator=generator)
                before = loadavg()
                ms, speedups = paired(models, rates, variants, x, threads, args.runs, args.rounds)
                load = f"{before} / {loadavg()}"
                for rate in rates:
                    reduction = macs[0.0] / macs[rate]
                    cells = []
                    for kind in variants:
                        speedup = speedups[(rate, kind)]
                        cells += [f"{ms[(0.0, kind)]:.2f} -> {ms[(rate, kind)]:.2f}", f"{speedup:.2f}x",
                                  f"{speedup / reduction:.2f}"]
                    row = (f"| {name} | {rate:.0%} | {params[rate]:,} | {macs[rate] / 1e6:.2f} | "
                           f"{reduction:.2f}x | {threads} | {batch} | " + " | ".join(cells) + f" | {load} |")
                    rows.append(row)
                    print(row, flush=True)
    header = ("| model | filter rate | params | MACs (M, batch 1) | MACs reduction | threads | batch | "
              + " | ".join(f"{k} ms orig -> compact | {k} speedup | {k} speedup / MACs red." for k in variants)
              + " | loadavg before / after |")
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
