"""What ``compact``'s rebuild check costs: one compaction of a torchvision model (filter pruning at rate 0.5 in
every group, 64x64 input, 1 thread) with ``check_rebuild`` on and off, best of two each, side by side.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/rebuild_check_cost.py [--models resnet18,...]
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

from autocompress import compaction, projection
from autocompress.space import PruningSpace


def seconds(model, masks, x, check: bool) -> float:
    """Best of two wall times of one ``compact`` call."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        compaction.compact(model, masks, x, check_rebuild=check)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,resnet50")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, x = getattr(torchvision.models, name)(num_classes=10).eval(), torch.randn(1, 3, 64, 64)
        space = PruningSpace.build(model, x, dims=("filter",))
        masks = space.param_masks(projection.project(space, model,
                                                     {"filter": {g.name: 0.5 for g in space.filter_groups}}))
        on, off = seconds(model, masks, x, True), seconds(model, masks, x, False)
        print(f"{name}: {on:.2f} s with the rebuild check, {off:.2f} s without ({(on - off) / on:.0%} of the call)",
              flush=True)


if __name__ == "__main__":
    main()
