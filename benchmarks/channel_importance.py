"""Which channels one-shot filter pruning keeps: the weights a channel owns, or its producer rows alone (session 35).

At a short budget (fewer than 800 optimiser steps an epoch: no ADMM, no search) the hard pruning of the base
decides which channels survive, by :func:`autocompress.projection.group_scores`. Until session 35 it scored a
channel by its producer rows only; behind a BatchNorm, which normalises their scale away, that says little
about what the channel contributes. This script prunes each of ``short_budget.py``'s bases once at the widths of
the library's guided start for ``flops=2x`` (``compress`` with no training epochs, no search, no distillation),
scoring channels as the library does (``owned``: producer rows and consumer input columns) or by the producer
rows alone (``producers``, the scoring patched in), then trains the compact model for 3 epochs of the user's
loop (``short_budget.user_loop``: AdamW lr 1e-3, cosine) and prints test top-1 on the full test split.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/channel_importance.py --models resnet,resnext \\
        --scorings owned,producers --seeds 0
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import autocompress
from autocompress import projection
from short_budget import EXAMPLE, ROOT, base_model, loaders, top1, user_loop  # benchmarks/ is on sys.path

LIBRARY = projection.group_scores


def producer_scores(group, params):
    """The scoring before session 35: each channel's squared L2 norm over its producer weight rows only."""
    scores = torch.zeros(group.size, dtype=torch.float64)
    for s in group.slices:
        if s.role == "weight":
            scores.index_add_(0, s.channel, s.energy(params[s.param]))
    return scores


SCORINGS = {"owned": LIBRARY, "producers": producer_scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet,resnext,vgg,mobile")
    parser.add_argument("--scorings", default="owned,producers")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--base-epochs", type=int, default=8)
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / "results" / "short_budget_bases"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, val, test = loaders(0, 10000)
    for name in args.models.split(","):
        base = base_model(name, train, args.base_epochs, Path(args.cache))
        for seed in (int(s) for s in args.seeds.split(",")):
            for scoring in args.scorings.split(","):
                projection.group_scores = SCORINGS[scoring]
                shuffled = DataLoader(train.dataset, batch_size=64, shuffle=True,
                                      generator=torch.Generator().manual_seed(seed))
                config = {"rounds": 1, "admm": {"epochs": 0}, "retrain": {"epochs": 0}, "final_retrain_epochs": 0,
                          "search": {"max_evaluations": 1}, "distillation": {"enabled": False}, "seed": seed}
                result = autocompress.compress(base, EXAMPLE, "flops=2x", train_loader=shuffled, val_loader=val,
                                               device="cpu", progress=False, log=lambda line: None, config=config)
                model = copy.deepcopy(result.model)
                torch.manual_seed(seed)
                user_loop(model, shuffled, 3, 1e-3)
                print(json.dumps({"model": name, "scoring": scoring, "seed": seed, "one_shot": top1(result.model, test),
                                  "retrained": top1(model, test), "macs_x": round(result.mac_reduction, 3)}),
                      flush=True)
    projection.group_scores = LIBRARY


if __name__ == "__main__":
    main()
