"""Search wall time and one training epoch with 1 vs N processes (issue 14 benchmark; goal: N = 2 search wall
<= 0.6x of 1 process at the same number of candidates).

Runs ``autocompress compress`` (one round, the fmnist_cnn base on real Fashion-MNIST) once per process count:
``python -m autocompress compress`` for 1 process, ``torchrun --nproc_per_node N -m autocompress compress`` for
N, each process with ``OMP_NUM_THREADS=--threads``. Every run uses the same settings, so the search proposes the
same candidates (``search.candidates_per_step``) and makes the same decisions whatever N; N processes score
their share of each step's candidates in parallel. One ADMM epoch (DistributedDataParallel, each
process taking its slice of every global batch, ``--max-train`` images) is the training epoch. Times are rank 0's phase
records (``metrics.jsonl``: ``search`` and ``admm`` seconds), so interpreter start and data loading are not
counted. Prints one Markdown row per process count.

Example::

    .venv/bin/python benchmarks/distributed_bench.py assets/fmnist_cnn_base.pt --processes 1,2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def settings(args: argparse.Namespace) -> dict:
    """The run's config file: one round, the search budget, one ADMM epoch, no retraining."""
    return {"target": args.target, "rounds": 1, "val_size": 2000, "max_train": args.max_train, "max_test": 500,
            "batch_size": args.batch_size, "latency_runs": 2,
            "search": {"max_evaluations": args.evaluations, "candidates_per_step": args.candidates},
            "quick_eval": {"bn_batches": 5, "val_batches": 8}, "admm": {"epochs": 1}, "retrain": {"epochs": 0},
            "purification": {"enabled": False}}


def run(args: argparse.Namespace, processes: int, work: Path) -> dict:
    """One compress run with ``processes`` processes; rank 0's phase seconds and the search trajectory."""
    out = work / f"run-{processes}"
    config = work / "run.yaml"
    config.write_text(yaml.safe_dump(settings(args)))
    launcher = [sys.executable, "-m", "autocompress"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
         str(args.port), "-m", "autocompress"]
    command = [*launcher, "compress", str(args.checkpoint), "--config", str(config), "--out", str(out),
               "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = {r["phase"]: r["seconds"] for r in records if r.get("event") == "phase"}
    search = next(r for r in records if r.get("event") == "search")
    return {"processes": processes, "search_s": seconds["search"], "epoch_s": seconds["admm"],
            "decisions": [(s["candidate_score"], s["accepted"]) for s in search["trajectory"]],
            "evaluations": len(search["trajectory"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a trained checkpoint, e.g. assets/fmnist_cnn_base.pt")
    parser.add_argument("--processes", default="1,2", help="process counts to compare, e.g. 1,2")
    parser.add_argument("--target", default="params=3x")
    parser.add_argument("--evaluations", type=int, default=17, help="search.max_evaluations")
    parser.add_argument("--candidates", type=int, default=2, help="search.candidates_per_step")
    parser.add_argument("--max-train", type=int, default=6000, help="training images (one ADMM epoch)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (global: split across the processes)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--port", type=int, default=29531, help="torchrun's master port")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for processes in [int(p) for p in args.processes.split(",")]:
            rows.append(run(args, processes, Path(work)))
    base = rows[0]
    print("| processes | search wall (s) | vs 1 process | ADMM epoch (s) | vs 1 process | evaluations | "
          "same decisions as 1 process |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} | {row['search_s']:.2f} | {row['search_s'] / base['search_s']:.2f}x | "
              f"{row['epoch_s']:.2f} | {row['epoch_s'] / base['epoch_s']:.2f}x | {row['evaluations']} | "
              f"{'yes' if row['decisions'] == base['decisions'] else 'no'} |")


if __name__ == "__main__":
    main()
