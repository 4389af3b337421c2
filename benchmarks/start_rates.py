"""The per-unit filter rates of both search starts (guided, magnitude) as a run computes them, for
``short_budget.py``'s models at a target, without training: the pipeline's set-up runs up to its start probe
and stops there.

Session 51 looked here for a rule read from the rates (the largest rate, their spread) that would say which start
retrains better at flops=4x without probing: none separated the nets (the guided start's largest rate was 0.95 on
both MobileNet-style nets, where it won on one base and lost on another, and 0.80 on the residual net, where it
lost), so short runs at deep targets probe instead (``optimizer_probe.start_probe_steps``).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/start_rates.py MODEL TARGET CACHE OUT.jsonl
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import short_budget as sb  # noqa: E402

import autocompress  # noqa: E402
from autocompress import rounds  # noqa: E402


class _Stop(Exception):
    """Raised by the patched start probe once both starts are known."""


def start_rates(name: str, target: str, cache: str) -> dict:
    """Both starts' rates (start -> unit -> rate), why one is missing (or ""), and the filter groups' widths."""
    train, val, _ = sb.loaders(0, 10000)
    base = sb.base_model(name, train, 6, Path(cache))
    got = {}

    def settle(self, state, starts, rounds=1):
        got["starts"], got["why"] = starts()
        got["sizes"] = {u.name: u.size for u in state.space.filter_groups}
        raise _Stop

    with mock.patch.object(rounds.Pipeline, "settle_start", settle):
        try:
            autocompress.compress(base, sb.EXAMPLE, target, train_loader=train, val_loader=val, device="cpu",
                                  progress=False, log=lambda line: None, config={"budget": 2, "seed": 0})
        except _Stop:
            pass
    return got


def main() -> None:
    torch.set_num_threads(1)
    name, target, cache, out = sys.argv[1:5]
    got = start_rates(name, target, cache)
    row = {"model": name, "target": target, "why": got["why"], "sizes": got["sizes"],
           "starts": {start: rates["filter"] for start, rates in got["starts"].items()}}
    for start, rates in row["starts"].items():
        values = np.array(list(rates.values()))
        print(f"{name} {target} {start}: largest rate {values.max():.3f}, spread (std) {values.std():.3f}, "
              f"{len(values)} filter units")
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
