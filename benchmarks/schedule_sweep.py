"""One autocompress run at a grid model's budget with setting overrides (issue 5's schedule exploration).

The ``ac_kd`` variant of ``run_grid.py`` came out of this exploration (session 4).

The base settings are ``run_grid.py``'s one-round schedule for the model (its data subsets, every ADMM and
retraining epoch of the budget in one round, the compress command's default rho); ``OVERRIDES`` (JSON) is
merged over them, a section key by key. Prints one JSON line: test top-1 (%), parameters, MACs, the
validation top-1 of the hard-pruned model before purification in each round, wall seconds. Not a grid cell
(no latency, no peers): use it to compare schedules, then run the winner through ``run_grid.py``.

Example (Fashion-MNIST 10x, 2 ADMM + 6 retraining epochs with distillation; 8 epochs like the grid)::

    .venv/bin/python benchmarks/schedule_sweep.py fmnist_cnn params=10x a2r6kd \\
        '{"admm": {"epochs": 2}, "retrain": {"epochs": 6}, "distillation": {"enabled": true}}'
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def settings_for(model: str, target: str, overrides: dict) -> dict:
    """``run_grid``'s one-round settings for ``model`` at ``target`` with ``overrides`` merged over them."""
    import run_grid

    spec = run_grid.MODELS[model]
    settings = {**run_grid.grid_settings(spec, target), **run_grid.one_round_settings(spec, target),
                "latency_runs": 1}
    return run_grid.merge_settings(settings, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a run_grid model: fmnist_cnn, resnet20, vgg16")
    parser.add_argument("target", help="e.g. params=10x")
    parser.add_argument("name", help="names the run folder")
    parser.add_argument("overrides", nargs="?", default="{}", help="JSON object of compress settings")
    parser.add_argument("--work", default="/tmp/autocompress-sweep", help="parent of the run folders")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import run_grid
    from autocompress.atomic import atomic_write_text
    from autocompress.cli import main as cli

    if args.model not in run_grid.MODELS:
        parser.error(f"unknown model {args.model!r}; use one of {', '.join(run_grid.MODELS)}")
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as exc:
        parser.error(f"overrides are not valid JSON ({exc.msg}); "
                     "give an object such as '{\"admm\": {\"epochs\": 1}}'")
    if not isinstance(overrides, dict):
        parser.error("overrides must be a JSON object of compress settings")
    torch.set_num_threads(args.threads)
    work = Path(args.work) / f"{args.model}_{args.target}_{args.name}"
    began = time.perf_counter()
    config = work.parent / f"{work.name}.yaml"
    atomic_write_text(config, json.dumps(settings_for(args.model, args.target, overrides)))
    status = cli(["compress", str(ROOT / run_grid.MODELS[args.model].checkpoint), "--config", str(config),
                  "--out", str(work), "--quiet", "--device", "cpu", "--resume-if-exists"])
    if status != 0:
        parser.exit(status, f"{parser.prog}: compress failed (exit {status})\n")
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if r["event"] == "final"][-1]["rows"][1]
    print(json.dumps({"model": args.model, "target": args.target, "name": args.name, "overrides": overrides,
                      "top1": final["test_top1"], "params": final["params"], "macs": final["macs"],
                      "hard_pruned_val_top1": [r["val_top1_before"] for r in records
                                               if r["event"] == "purification"],
                      "seconds": round(time.perf_counter() - began)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
