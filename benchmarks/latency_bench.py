"""Deployed-speed benchmarks (issue 12): aligned widths, the latency target and Torch-Pruning round_to=8.

Three sub-commands, all measuring onnxruntime (CPU, ``--threads`` threads, batch 1 and 64, the models timed
interleaved; :func:`autocompress.latency.measure_models`):

* ``align``: no training (speed does not depend on the weights). Each model's filter groups are projected
  at one uniform rate with channel multiples 1 (no alignment), 4, 8 and 16, compacted, and timed next to the
  base. Shows what alignment buys and which multiple to default to::

      OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency_bench.py align --models resnet20,torchvision:mobilenet_v2 \\
          --rate 0.5 --runs 50

* ``form``: no training. Each model is projected at one filter rate and one column rate (hybrid pruning,
  channel multiple ``--multiple``), compacted, and timed next to the base as stored and in its deployed form
  (:func:`autocompress.deployed_form`: each column layer stored or dense, whichever runs faster)::

      OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency_bench.py form --models resnet20,fmnist_cnn \
          --rate 0.3 --column-rate 0.3 --multiple 8 --runs 50

* ``timing``: no training. Each model projected at one filter rate (multiple 16) and compacted, timed next to the
  base three ways: alternating call by call, in blocks of calls (the final table's way since session 45), and each
  model alone::

      OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency_bench.py timing \\
          --models torchvision:resnet18,resnet20 --rate 0.5 --runs 50 --repeats 3

* ``compare``: the same training budget for every method on a trained checkpoint, at each latency level L:
  autocompress ``latency=Lx`` (channel multiple auto), autocompress ``flops=Fx`` with channel multiple 8
  (F = L / 0.8, the MACs reduction that the issue's goal of 0.8 speedup per MACs reduction needs) and
  Torch-Pruning global magnitude with ``round_to=8`` at the same F. Each run is a subprocess (the CLI /
  benchmarks/peers/torch_pruning_baseline.py, one thread); results go to ``--out`` as JSON lines::

      OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency_bench.py compare \\
          benchmarks/results/bases/resnet20_cifar10.pt --data-dir ../shared/datasets/cifar10-jpeg.tar.gz \\
          --levels 1.5,2.5 --max-train 2000 --max-test 2000 --epochs 1 --out /tmp/latency_bench.jsonl
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from autocompress import metrics
from autocompress.checkpoint import load_checkpoint, load_model, model_from_checkpoint
from autocompress.compaction import compact
from autocompress.data import get_dataset
from autocompress.latency import LatencyConfig, measure_models
from autocompress.models import create_model, model_info
from autocompress.projection import project
from autocompress.space import PruningSpace
from autocompress.training import evaluate

ROOT = Path(__file__).resolve().parents[1]


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if name.startswith("torchvision:"):
        return create_model(name, num_classes=10).eval(), (3, 32, 32)
    return create_model(name, num_classes=10).eval(), tuple(model_info(name).input_size)


def align(args: argparse.Namespace) -> None:
    """Project each model at ``--rate`` with each multiple, compact, time next to the base (one JSON line each)."""
    config = LatencyConfig(threads=args.threads, runs=args.runs, warmup=5)
    for name in args.models.split(","):
        model, size = _model(name)
        x = torch.randn(1, *size)
        variants = {"base": model}
        for multiple in [int(m) for m in args.multiples.split(",")]:
            space = PruningSpace.build(model, x, dims=("filter",), channel_multiple=multiple)
            masks = project(space, model, {"filter": {g.name: args.rate for g in space.filter_groups}})
            variants[f"multiple {multiple}"] = compact(model, space.param_masks(masks), x,
                                                       channel_multiple=multiple).model
        timings = measure_models(variants, x, config)
        for label, net in variants.items():
            widths = sorted({m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)})
            row = {"model": name, "variant": label, "rate": args.rate, "macs": metrics.count_macs(net, x),
                   "threads": args.threads, "conv_widths": widths,
                   **{f"ort_b{b}_ms": t[label].median_ms for b, t in timings.items()}}
            print(json.dumps(row), flush=True)


def form(args: argparse.Namespace) -> None:
    """Project each model at filter ``--rate`` and column ``--column-rate``, compact, time base / stored /
    deployed form interleaved (one JSON line per model)."""
    from autocompress import deployed_form

    config = LatencyConfig(threads=args.threads, runs=args.runs, warmup=5)
    for name in args.models.split(","):
        model, size = _model(name)
        x = torch.randn(1, *size)
        space = PruningSpace.build(model, x, dims=("filter", "column"), channel_multiple=args.multiple)
        rates = {"filter": {g.name: args.rate for g in space.filter_groups},
                 "column": {c.name: args.column_rate for c in space.column_layers}}
        stored = compact(model, space.param_masks(project(space, model, rates)), x,
                         channel_multiple=args.multiple).model
        deployed = deployed_form(stored, x, config)
        timings = measure_models({"base": model, "stored": stored, "deployed": deployed.model}, x, config)
        row = {"model": name, "rate": args.rate, "column_rate": args.column_rate, "multiple": args.multiple,
               "macs_reduction": metrics.count_macs(model, x) / metrics.count_macs(stored, x),
               "threads": args.threads, "deployed_form": deployed.summary(),
               **{f"ort_b{b}_ms": {k: v.median_ms for k, v in t.items()} for b, t in timings.items()}}
        print(json.dumps(row), flush=True)


def timing(args: argparse.Namespace) -> None:
    """Project each model at ``--rate`` (channel multiple 16), compact, and time base and compact in onnxruntime three
    ways, ``--repeats`` times: one call each in turn (``block`` 1, the final table until session 45), in blocks of
    :data:`~autocompress.latency.RUN_BLOCK` calls (``time_runners``'s default) and each model alone (all its runs,
    then the other's: what a service running one model sees). One JSON line per model and repeat."""
    from autocompress.latency import runner, time_runners

    for name in args.models.split(","):
        model, size = _model(name)
        x = torch.randn(1, *size)
        space = PruningSpace.build(model, x, dims=("filter",), channel_multiple=16)
        masks = project(space, model, {"filter": {g.name: args.rate for g in space.filter_groups}})
        models = {"base": model, "compact": compact(model, space.param_masks(masks), x, channel_multiple=16).model}
        for batch in (1, 64):
            calls = {label: runner(m, x, "onnxruntime", threads=args.threads)(x.expand(batch, *size).contiguous())
                     for label, m in models.items()}
            for repeat in range(args.repeats):
                kw = dict(runs=args.runs, warmup=5, threads=args.threads)
                ways = {"alternating": time_runners(calls, block=1, **kw), "blocks": time_runners(calls, **kw),
                        "alone": {label: time_runners({label: call}, block=args.runs, **kw)[label]
                                  for label, call in calls.items()}}
                row = {"model": name, "rate": args.rate, "batch": batch, "repeat": repeat, "threads": args.threads,
                       **{way: {"base_ms": t["base"].median_ms, "compact_ms": t["compact"].median_ms,
                                "speedup": t["base"].median_ms / t["compact"].median_ms} for way, t in ways.items()}}
                print(json.dumps(row), flush=True)


def _cli_compress(args, target: str, extra: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "autocompress", "compress", args.checkpoint, "--target", target, "--out",
               str(out), *_schedule(args), "--max-train", str(args.max_train), "--val-size",
               str(args.val_size), "--quiet", "--config", str(out.parent / "bench.yaml"), "--resume-if-exists", *extra]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    final = next((r for r in records if r.get("event") == "final"), None)
    return {"seconds": time.perf_counter() - started, "returncode": done.returncode,
            "error": done.stderr.strip().splitlines()[-1] if done.returncode else None,
            "latency_estimate": (final or {}).get("latency_estimate"), "model_path": str(out / "model.pt")}


def _schedule(args) -> list[str]:
    """autocompress's epochs: the budget rule's split of ``2 x --epochs`` (``--budget``), else one round of
    ``--epochs`` ADMM and ``--epochs`` retraining epochs (the schedule of the session-10 rows)."""
    if args.budget:
        return ["--epochs", str(2 * args.epochs)]
    return ["--rounds", "1", "--admm-epochs", str(args.epochs), "--retrain-epochs", str(args.epochs)]


def _tp(args, target: str, out: Path) -> dict:
    if out.exists():  # finished before (a re-run of the benchmark)
        return {"seconds": None, "returncode": 0, "error": None, "model_path": str(out)}
    command = [sys.executable, str(ROOT / "benchmarks" / "peers" / "torch_pruning_baseline.py"), args.checkpoint,
               "--target", target, "--epochs", str(2 * args.epochs), "--max-train", str(args.max_train),
               "--val-size", str(args.val_size), "--round-to", str(args.tp_round_to), "--out", str(out)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return {"seconds": time.perf_counter() - started, "returncode": done.returncode,
            "error": done.stderr.strip().splitlines()[-1] if done.returncode else None, "model_path": str(out)}


#: ``compare``'s methods, in the order of its rows (``--methods`` takes a comma-separated subset)
METHODS = ("latency", "latency_hybrid", "flops", "tp")


def compare(args: argparse.Namespace) -> None:
    """Each level: the three methods at the same epoch budget, then all compact models measured here."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "bench.yaml").write_text(f"search: {{max_evaluations: {args.evaluations}}}\nmax_test: {args.max_test}\n"
                                     f"latency: {{threads: {args.threads}, runs: {args.runs}}}\n")
    ckpt = load_checkpoint(args.checkpoint)
    base = model_from_checkpoint(ckpt).eval()
    splits = get_dataset(ckpt["dataset"]["name"], args.data_dir, val_size=args.val_size, seed=0,
                         max_train=args.max_train, max_test=args.max_test)
    test = splits.loader("test", 256, shuffle=False, augment=False)
    x = torch.zeros(1, *splits.input_size)
    config = LatencyConfig(threads=args.threads, runs=args.runs, warmup=5)
    for level in [float(v) for v in args.levels.split(",")]:
        flops = f"flops={level / 0.8:.3g}x"
        extra = args.latency_args.split()
        methods = {"latency": (f"ac latency={level:g}x {args.latency_args or '(default dims: filter)'}",
                               lambda: _cli_compress(args, f"latency={level:g}x", extra,
                                                     work / f"ac_lat_filter_{level:g}{'_'.join(['', *extra])}")),
                   "latency_hybrid": (f"ac latency={level:g}x dims filter,column", lambda: _cli_compress(
                       args, f"latency={level:g}x", ["--dims", "filter,column"], work / f"ac_lat_{level:g}")),
                   "flops": (f"ac {flops} multiple 8", lambda: _cli_compress(
                       args, flops, ["--channel-multiple", "8"], work / f"ac_flops_{level:g}")),
                   "tp": (f"tp {flops} round_to {args.tp_round_to}",
                          lambda: _tp(args, flops, work / f"tp_r{args.tp_round_to}_{level:g}.pt"))}
        chosen = METHODS if args.methods is None else args.methods.split(",")
        runs = {label: run() for key, (label, run) in methods.items() if key in chosen}
        models = {"base": base}
        for label, run in runs.items():  # a missed latency target is refused but its model.pt is measured too
            if Path(run["model_path"]).exists():
                models[label] = load_model(run["model_path"]).eval()
        timings = measure_models(models, x, config)
        for label, net in models.items():
            run = runs.get(label, {})
            row = {"level": level, "method": label, "test_top1": 100 * evaluate(net, test)["top1"],
                   "macs_reduction": metrics.count_macs(base, x) / metrics.count_macs(net, x), "threads": args.threads,
                   **{f"ort_b{b}_ms": t[label].median_ms for b, t in timings.items()},
                   **{f"speedup_b{b}": t["base"].median_ms / t[label].median_ms for b, t in timings.items()},
                   **{k: v for k, v in run.items() if k != "model_path"}}
            if row.get("latency_estimate"):
                row["estimate_error"] = row.pop("latency_estimate")["error"]
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("align")
    a.add_argument("--models", default="resnet20")
    a.add_argument("--rate", type=float, default=0.5)
    a.add_argument("--multiples", default="1,4,8,16")
    a.add_argument("--runs", type=int, default=50)
    a.add_argument("--threads", type=int, default=1)
    f = sub.add_parser("form")
    f.add_argument("--models", default="resnet20")
    f.add_argument("--rate", type=float, default=0.3, help="filter pruning rate of every group")
    f.add_argument("--column-rate", type=float, default=0.3, help="column pruning rate of every layer")
    f.add_argument("--multiple", type=int, default=1)
    f.add_argument("--runs", type=int, default=50)
    f.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("timing")
    t.add_argument("--models", default="torchvision:resnet18,resnet20")
    t.add_argument("--rate", type=float, default=0.5)
    t.add_argument("--runs", type=int, default=50)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("compare")
    c.add_argument("checkpoint")
    c.add_argument("--data-dir")
    c.add_argument("--levels", default="1.5,2.5")
    c.add_argument("--epochs", type=int, default=1, help="ADMM and retraining epochs (Torch-Pruning: twice)")
    c.add_argument("--budget", action="store_true",
                   help="give autocompress a budget of 2 x --epochs epochs (the budget rule splits it) instead")
    c.add_argument("--latency-args", default="", help="further compress flags of the latency method")
    c.add_argument("--tp-round-to", type=int, default=8, help="Torch-Pruning's round_to")
    c.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    c.add_argument("--max-train", type=int, default=2000)
    c.add_argument("--max-test", type=int, default=2000)
    c.add_argument("--val-size", type=int, default=1000)
    c.add_argument("--evaluations", type=int, default=6)
    c.add_argument("--runs", type=int, default=50)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--work", default="/tmp/latency_bench")
    c.add_argument("--out", default="/tmp/latency_bench.jsonl")
    args = parser.parse_args()
    {"align": align, "form": form, "timing": timing, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
