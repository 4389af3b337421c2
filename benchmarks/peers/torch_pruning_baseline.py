"""Torch-Pruning baseline: global magnitude channel pruning to a parameter / MACs reduction, then
fine-tuning with autocompress's trainer.

Peer method of the benchmark grid (issue 5). Torch-Pruning (Fang et al., "DepGraph: Towards Any Structural
Pruning", CVPR 2023) removes whole channels of coupled layer groups; ``GroupMagnitudeImportance(p=2)``
scores a channel by the L2 norm of all its coupled weights and ``global_pruning=True`` ranks channels of
all layers together. ``pruning_ratio`` is a *channel* ratio, so :func:`prune_to_target` bisects it until
the physically pruned model meets the requested reduction (parameters or MACs, counted with
:mod:`autocompress.metrics`, FLOPs = 2 x MACs).

Run alone::

    .venv/bin/python benchmarks/peers/torch_pruning_baseline.py CHECKPOINT --target params=10x \\
        --epochs 8 --max-train 20000 --out /tmp/tp.pt
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from autocompress import metrics
from autocompress.checkpoint import load_checkpoint, model_from_checkpoint
from autocompress.admm import masked_retrain
from autocompress.atomic import atomic_torch_save
from autocompress.config import Target
from autocompress.data import get_dataset
from autocompress.distillation import DistillationConfig, Distiller
from autocompress.epoch_checkpoint import EpochCheckpoint
from autocompress.serialization import save_compact
from autocompress.task import loader_generators
from autocompress.training import TrainConfig, evaluate, fit


@dataclass
class TPResult:
    """Outcome of :func:`prune_to_target`.

    Attributes:
        model: the physically pruned model (a new module; the input model is untouched).
        pruning_ratio: the global channel ratio used (fraction of prunable channels removed).
        reduction: reached reduction, original count / remaining count (params or MACs per the objective).
        trials: number of pruned candidates built by the bisection.
    """

    model: nn.Module
    pruning_ratio: float
    reduction: float
    trials: int


def _output_layers(model: nn.Module, ignored: tuple[str, ...]) -> list[nn.Module]:
    """The layers never pruned: the last Linear (its outputs are the classes) and the ``ignored`` ones (the
    output layer of a model without a Linear, e.g. a segmentation net's last conv)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:] + [model.get_submodule(n) for n in ignored]
    if not layers:
        raise ValueError("the model has no Linear classifier to protect: name its output layer in ignored")
    return layers


def global_magnitude_prune(model: nn.Module, example: torch.Tensor, ratio: float,
                           max_layer_ratio: float = 0.95, round_to: int | None = None,
                           ignored: tuple[str, ...] = ()) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of all prunable channels removed globally by group L2 magnitude.

    Args:
        example: ``[1, C, H, W]`` tracing input.
        ratio: global channel pruning ratio in [0, 1).
        max_layer_ratio: no layer loses more than this fraction of its channels (never pruned to zero).
        round_to: Torch-Pruning's ``round_to``: every pruned layer keeps a multiple of this many channels.
        ignored: names of further modules for Torch-Pruning's ``ignored_layers`` (e.g. the chunked qkv projections
            of a ViT, on which its importance fails with an IndexError).
    """
    pruned = copy.deepcopy(model).eval()
    layers = _output_layers(pruned, ignored)
    heads = {m: m.num_heads for m in pruned.modules() if isinstance(m, nn.MultiheadAttention)}  # as its README
    if isinstance(pruned, VisionTransformer):  # as its torchvision example: widths a multiple of the head count
        heads, round_to = {}, math.lcm(round_to or 1, pruned.encoder.layers[0].num_heads)
    pruner = tp.pruner.BasePruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=True, max_pruning_ratio=max_layer_ratio,
                                  ignored_layers=layers, round_to=round_to, num_heads=heads)
    pruner.step()
    if isinstance(pruned, VisionTransformer):  # as its torchvision example: the width its forward reads from here
        pruned.hidden_dim = pruned.conv_proj.out_channels
    return pruned


def prune_to_widths(model: nn.Module, example: torch.Tensor, widths: dict[str, int]) -> nn.Module:
    """A copy of ``model`` whose named convs keep ``widths[name]`` output channels, the ones of highest group
    L2 magnitude (Torch-Pruning's dependency graph removes the coupled channels with them). A diagnostic, not a
    peer: it gives Torch-Pruning's channel choice and fine-tuning the widths another method's search chose.

    Raises:
        ValueError: a name that is not a conv of the model, or a width above the conv's channels.
    """
    pruned = copy.deepcopy(model).eval()
    modules = dict(pruned.named_modules())
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    for name, kept in widths.items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d) or not 1 <= kept <= conv.out_channels:
            raise ValueError(f"{name}: not a conv of the model with at least {kept} output channels")
        if kept == conv.out_channels:  # unchanged, or already narrowed through a coupled layer
            continue
        everything = graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)))
        order = torch.argsort(importance(everything)).tolist()
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, order[:conv.out_channels - kept])
        group.prune()
    return pruned


def searched_widths(run_dir: str) -> dict[str, int]:
    """The kept filters of every narrowed layer in an autocompress run folder's last round (``metrics.jsonl``)."""
    rounds = [record for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line.strip()
              and (record := json.loads(line)).get("event") == "round"]
    return {layer["name"]: layer["filters"] for layer in rounds[-1]["layers"]
            if layer["filters"] < layer["filters_total"]}


def _counter(objective: str, example: torch.Tensor):
    """The model -> count function of an objective: parameters, or MACs of one forward of ``example``."""
    return metrics.count_params if objective == "params" else (lambda m: metrics.count_macs(m, example))


def prune_to_target(model: nn.Module, example: torch.Tensor, target: Target, *, steps: int = 8,
                    round_to: int | None = None, ignored: tuple[str, ...] = ()) -> TPResult:
    """The pruned model that reaches ``target`` most narrowly: global channel ratios swept in steps of 0.05, then
    ``steps`` bisections in each step where the reach crosses the target, the least reduction that reaches it
    kept. The reach is not monotone in the ratio: with ``round_to`` on resnet20 at round_to=8 it peaks at 3.00x,
    ratio 0.55, and ratios >= 0.9 prune nothing; on a ViT of ``nn.MultiheadAttention`` with head counts given it
    jumps from 2.95x at 0.55 to 30.6x at 0.65.

    Raises:
        ValueError: no swept ratio reaches the target; the message gives the most any reaches.
    """
    count = _counter(target.objective, example)
    original = count(model)
    tried: dict[float, tuple[nn.Module, float]] = {}

    def reach(ratio: float) -> float:
        candidate = global_magnitude_prune(model, example, ratio, round_to=round_to, ignored=ignored)
        tried[ratio] = (candidate, original / count(candidate))
        return tried[ratio][1]

    ratios = [0.0] + [float(r) for r in np.arange(0.05, 0.951, 0.05)]
    reaches = [1.0] + [reach(r) for r in ratios[1:]]
    for low, high, below, above in zip(ratios, ratios[1:], reaches, reaches[1:]):
        if below < target.factor <= above:  # bisect the crossing
            for _ in range(steps):
                mid = (low + high) / 2
                low, high = (mid, high) if reach(mid) < target.factor else (low, mid)
    hits = {r: found for r, found in tried.items() if found[1] >= target.factor}
    if not hits:
        ratio = max(tried, key=lambda r: tried[r][1])
        raise ValueError(f"Torch-Pruning (round_to={round_to}) reaches at most {tried[ratio][1]:.2f}x (global ratio "
                         f"{ratio:.2f}; swept 0.05-0.95) < {target}")
    ratio = min(hits, key=lambda r: (hits[r][1], r))
    return TPResult(model=hits[ratio][0], pruning_ratio=ratio, reduction=hits[ratio][1], trials=len(tried))


def run(checkpoint: str, target: str, *, epochs: int, lr: float, max_train: int | None, val_size: int,
        data_dir: str | None, seed: int, out: str, distill: float | None = None, progress: bool = False,
        round_to: int | None = None, widths_from: str | None = None) -> dict:
    """Prune the checkpoint's model to ``target``, fine-tune ``epochs`` epochs (SGD, cosine, ``lr``), save the
    pruned model as an autocompress checkpoint at ``out``. Returns timings and the search outcome.

    ``distill=alpha`` fine-tunes with autocompress's distillation from the unpruned model (T 4, that alpha; not
    part of Torch-Pruning): a reference for how much of autocompress's gain is distillation.
    ``widths_from``: an autocompress run folder; prune to its searched widths (:func:`prune_to_widths`)
    instead of bisecting a global ratio to ``target``."""
    began = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    splits = get_dataset(ckpt["dataset"]["name"], data_dir, val_size=val_size, seed=seed, max_train=max_train,
                         max_test=1)
    example = torch.zeros(1, *splits.input_size)
    if widths_from:
        pruned = prune_to_widths(model, example, searched_widths(widths_from))
        count = _counter(Target.parse(target).objective, example)
        result = TPResult(model=pruned, pruning_ratio=float("nan"), reduction=count(model) / count(pruned), trials=1)
    else:
        result = prune_to_target(model, example, Target.parse(target), round_to=round_to)
    search_seconds = time.perf_counter() - began
    config = TrainConfig(epochs=epochs, lr=lr, seed=seed)
    if distill is not None:
        loader = splits.loader("train", config.batch_size, shuffle=True, augment=True,
                               generator=torch.Generator().manual_seed(seed))
        state = Path(f"{out}.epochs.pt")  # resumable per epoch (the pruning above is deterministic)
        checkpoint = EpochCheckpoint(lambda: torch.load(state, weights_only=True) if state.exists() else None,
                                     lambda payload: atomic_torch_save(payload, state),
                                     generators=loader_generators(loader), label="Torch-Pruning fine-tuning")
        distiller = Distiller(model, DistillationConfig(alpha=distill))
        masked_retrain(result.model, {}, loader, config, distiller=distiller, progress=progress, checkpoint=checkpoint)
        top1 = evaluate(result.model, splits.loader("val", 256, shuffle=False, augment=False))["top1"]
        history = {"val_top1": top1}
    else:
        history = fit(result.model, splits, config, progress=progress)
    save_compact(out, result.model, base_checkpoint=ckpt, metrics={"method": "torch-pruning"})
    Path(f"{out}.epochs.pt").unlink(missing_ok=True)
    return {"pruning_ratio": result.pruning_ratio, "reduction": result.reduction, "trials": result.trials,
            "search_seconds": search_seconds, "epochs": epochs, "val_top1": history["val_top1"],
            "wall_seconds": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--target", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--data-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--distill", type=float, metavar="ALPHA",
                        help="fine-tune with distillation from the unpruned model at this alpha (e.g. 0.5)")
    parser.add_argument("--round-to", type=int, help="Torch-Pruning round_to: kept channels a multiple of it")
    parser.add_argument("--widths-from", help="an autocompress run folder: prune to its searched widths")
    args = parser.parse_args()
    print(json.dumps(run(args.checkpoint, args.target, epochs=args.epochs, lr=args.lr, max_train=args.max_train,
                         val_size=args.val_size, data_dir=args.data_dir, seed=args.seed, out=args.out,
                         distill=args.distill, progress=True, round_to=args.round_to,
                         widths_from=args.widths_from)))


if __name__ == "__main__":
    main()
