"""``autocompress inspect``: parameters, MACs / FLOPs, a per-layer table, file size and CPU latency.

Examples::

    autocompress inspect runs/fmnist_cnn_fashion-mnist.pt
    autocompress inspect --model resnet20 --json
    autocompress inspect --list-models

MACs are counted by ``torch.utils.flop_counter`` for one image (FLOPs = 2 x MACs); latency is the
median of ``--latency-runs`` timed forwards after a warm-up, at batch 1 and 64, with a fixed thread
count, on ``--device`` (see :mod:`autocompress.metrics`). The deployed latency is measured the same way in
``--runtime`` (onnxruntime by default, ``--runtime-threads`` threads, :mod:`autocompress.latency`); for a
compact checkpoint its base architecture (fresh weights: speed does not depend on them) is timed interleaved
with it, and a compact model slower than its base is a loud warning. Column-pruned layers are timed in their
deployed form (:mod:`autocompress.deployment`: each stored or dense, whichever runs faster there). In
onnxruntime the report also counts the convolutions it runs in its blocked channel layout
(:func:`autocompress.latency.blocked_convolutions`; widths off its grid run slower).
"""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from ..text import plural
from . import parse_model_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``autocompress inspect``."""
    parser.add_argument("checkpoint", nargs="?", help="checkpoint (.pt) written by autocompress")
    parser.add_argument("--model", help="inspect a freshly initialised zoo model instead of a checkpoint")
    parser.add_argument("--num-classes", type=int, default=10, help="with --model: classifier outputs")
    parser.add_argument("--list-models", action="store_true", help="list the zoo's model names and exit")
    parser.add_argument("--input-size", help="one input as C,H,W (default: the checkpoint's dataset, "
                        "else the model's registered input size)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--latency-runs", type=int, default=30, help="timed forwards per batch size")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forwards before timing")
    parser.add_argument("--threads", type=int, help="CPU threads for timing (default: torch's current setting)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    parser.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "torch", "none"),
                        help="runtime of the deployed latency columns (default onnxruntime; none: skip them; "
                        "the eager PyTorch latency stays: --no-latency skips every timing)")
    parser.add_argument("--runtime-threads", type=int, default=1, help="threads of the deployment runtime")
    parser.add_argument("--device", default="cpu", help="where to count and time: cpu (default), cuda, cuda:N "
                        "or auto")


def parse_input_size(text: str) -> tuple[int, int, int]:
    """``"3,32,32"`` -> ``(3, 32, 32)``.

    Raises:
        UserError: not three positive integers.
    """
    try:
        size = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise UserError(f"--input-size {text!r} is not C,H,W", "write three positive integers, e.g. 3,32,32")
    return size


def _load(args: argparse.Namespace):
    """-> (model, label, input size, checkpoint path or None, the base architecture of a compact checkpoint
    with fresh weights or None) from the arguments."""
    from ..models import create_model, model_info

    if bool(args.checkpoint) == bool(args.model):
        raise UserError("inspect needs exactly one of CHECKPOINT or --model NAME",
                        "e.g. `autocompress inspect runs/base.pt` or `autocompress inspect --model resnet20`")
    if args.model:
        info = model_info(args.model)
        model = create_model(args.model, num_classes=args.num_classes, **parse_model_args(args.model_arg))
        return model, args.model, info.input_size, None, None, {}
    from . import read_checkpoint
    from ..checkpoint import build_model, model_from_checkpoint, model_label

    ckpt = read_checkpoint(args.checkpoint, args.model_arg)
    model = model_from_checkpoint(ckpt)
    name = model_label(ckpt["model"])
    size = ckpt["dataset"].get("input_size") or (args.input_size and parse_input_size(args.input_size))
    if not size and ckpt["model"].get("name"):
        size = model_info(ckpt["model"]["name"]).input_size
    if not size:
        raise UserError(f"checkpoint {args.checkpoint} records no input size", "pass --input-size C,H,W")
    base = build_model(ckpt["model"]) if ckpt.get("architecture") is not None else None
    _check_base(base, ckpt)
    return model, name, tuple(size), args.checkpoint, base, ckpt["dataset"]


def _check_base(base, ckpt: dict) -> None:
    """ModelMismatch when the base architecture built for a compact checkpoint (fresh, from its recorded class and
    constructor arguments) has another parameter count than the model it was pruned from (``base_params`` in the
    checkpoint's metrics, written by ``compress``): the compact model itself is right (its shapes are recorded),
    but it would be timed against another base."""
    from ..checkpoint import model_label
    from ..errors import ModelMismatch
    from ..metrics import count_params

    recorded = (ckpt.get("metrics") or {}).get("base_params")
    if base is None or not isinstance(recorded, int):
        return
    built = count_params(base)
    if built != recorded:
        raise ModelMismatch(f"the base model built as {model_label(ckpt['model'])} {ckpt['model']['kwargs']} has "
                            f"{built:,} parameters, the model this one was pruned from {recorded:,}",
                            "pass the constructor arguments it was built with")


def _report(args: argparse.Namespace) -> dict:
    from ..metrics import file_size, model_summary
    from ..task import resolve_device

    device = resolve_device(args.device)
    model, name, size, path, base, kind = _load(args)
    model = model.to(device)
    if args.input_size:
        size = parse_input_size(args.input_size)
    summary = model_summary(model, size, latency_runs=args.latency_runs, warmup=args.warmup,
                            threads=args.threads, latency=not args.no_latency, kind=kind)
    deployed = None if args.no_latency or args.runtime == "none" else _deployed(args, model, base, size, kind)
    return {"model": name, "checkpoint": path, "file_size_bytes": file_size(path) if path else None,
            "device": str(device), **summary.to_dict(), "deployed": deployed}


def _deployed(args: argparse.Namespace, model, base, size, kind: dict) -> dict:
    """Deployed latency of ``model`` (and of ``base``, interleaved, for a compact checkpoint) at batch 1 and
    64 in ``--runtime``; with a base, the speedups and a warning when the model is slower or not much faster at
    many fewer MACs (:func:`autocompress.latency.speed_warning`)."""
    from ..deployment import deployed_form
    from ..latency import LatencyConfig, blocked_convolutions, deployed_summary, measure_models, speed_warning
    from ..metrics import count_macs, example_inputs_for

    device = str(args.device) if args.runtime == "torch" and str(args.device) != "auto" else "cpu"
    config = LatencyConfig(runtime=args.runtime, device=device, threads=args.runtime_threads,
                           runs=args.latency_runs, warmup=args.warmup)
    config.validate()
    example = example_inputs_for(size, kind=kind)
    form = deployed_form(model.cpu(), example, config)
    models = {"compressed": form.model} if base is None else {"base": base, "compressed": form.model}
    timings = measure_models(models, example, config)
    layout = {name: list(blocked_convolutions(m, example)) for name, m in models.items()} \
        if config.runtime == "onnxruntime" else None
    if base is None:
        return {"runtime": config.runtime, "threads": config.threads, "runs": config.runs,
                "batches": {str(b): {"model_ms": t["compressed"].median_ms} for b, t in timings.items()},
                "deployed_form": form.summary(), "blocked_convolutions": layout}
    summary = deployed_summary(timings, config)
    macs_factor = count_macs(base, example) / max(count_macs(form.model, example), 1)
    warning = speed_warning(summary, macs_factor=macs_factor, aligned=_aligned(model, base), layout=layout)
    return {**summary, "warning": warning,
            "deployed_form": form.summary(), "blocked_convolutions": layout}


def _aligned(model, base) -> bool:
    """Whether every output width pruned in ``model`` (against ``base``, layer by layer) is a multiple of the
    smallest multiple ``auto`` picks (8): the widths of a run with a channel multiple (auto, 8 or 16), for which
    the slower warning does not suggest one."""
    from ..alignment import AUTO_MULTIPLES
    from ..space import is_weight_layer, out_dim

    def widths(net) -> dict[str, int]:
        return {name: m.weight.shape[out_dim(m)] for name, m in net.named_modules() if is_weight_layer(m)}

    before = widths(base)
    pruned = [width for name, width in widths(model).items() if before.get(name, width) != width]
    return bool(pruned) and all(width % min(AUTO_MULTIPLES) == 0 for width in pruned)


def _millions(value: int) -> str:
    return f"{value:,} ({value / 1e6:.2f}M)"


def format_report(report: dict) -> str:
    """Human-readable text of a report from :func:`run` (the ``--json`` object)."""
    size = "x".join(map(str, report["input_size"]))
    lines = [f"model        {report['model']}" + (f" (checkpoint {report['checkpoint']})"
                                                   if report["checkpoint"] else " (fresh initialisation)"),
             f"input        {size} per image",
             f"parameters   {_millions(report['params'])}, nonzero {_millions(report['nonzero_params'])}",
             f"MACs         {_millions(report['macs'])} per image (multiply-accumulates, torch.utils.flop_counter; "
             "on CPU also F.scaled_dot_product_attention)",
             f"FLOPs        {_millions(report['flops'])} per image (FLOPs = 2 x MACs)"]
    if report["file_size_bytes"] is not None:
        lines.append(f"file size    {report['file_size_bytes']:,} bytes ({report['file_size_bytes'] / 1e6:.2f} MB)")
    for batch, result in report["latency"].items():
        lines.append(f"latency      batch {batch}: median {result['median_ms']:.2f} ms (p10 {result['p10_ms']:.2f}, "
                     f"p90 {result['p90_ms']:.2f}) over {plural(result['runs'], 'run')} in eager PyTorch on "
                     f"{report['device']}, {plural(result['threads'], 'CPU thread')}")
    lines += _deployed_lines(report.get("deployed"))
    header = ("layer", "type", "weight shape", "params", "MACs", "zeros")
    rows = [(row["name"] or "(model)", row["type"],
             "x".join(map(str, row["weight_shape"])) if row["weight_shape"] else "-",
             f"{row['params']:,}", f"{row['macs']:,}",
             "-" if row["zero_fraction"] is None else f"{100 * row['zero_fraction']:.1f}%")
            for row in report["layers"]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines.append("")
    for index, row in enumerate([header, *rows]):
        lines.append("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _deployed_lines(deployed: dict | None) -> list[str]:
    """Text lines of the deployed latency (see :func:`_deployed`)."""
    from ..latency import LAYOUT_RULE
    from ..report import column_layers_text

    if not deployed:
        return []
    lines = []
    for batch, row in deployed["batches"].items():
        where = f"{deployed['runtime']}, {plural(deployed['threads'], 'thread')}, {plural(deployed['runs'], 'run')}"
        if "model_ms" in row:
            lines.append(f"deployed     batch {batch}: {row['model_ms']:.3f} ms ({where})")
        else:
            lines.append(f"deployed     batch {batch}: {row['compressed_ms']:.3f} ms, base {row['base_ms']:.3f} ms, "
                         f"speedup {row['speedup']:.2f}x ({where}, interleaved)")
    layout = deployed.get("blocked_convolutions")
    if layout:
        blocked, convolutions = layout["compressed"]
        line = (f"layout       onnxruntime runs {blocked} of {convolutions} convolutions in its blocked channel "
                "layout (NCHWc)")
        if "base" in layout:
            line += f"; the base {layout['base'][0]} of {layout['base'][1]}"
        lines.append(f"{line} ({LAYOUT_RULE})")
    form = deployed.get("deployed_form") or {}
    if form.get("column_layers"):
        dense = len(form["dense_layers"])
        lines.append(f"deployed     form: {dense} of {form['column_layers']} column-pruned layers dense (faster there; "
                     "`autocompress export --columns auto` times them again)" if dense else
                     f"deployed     form: {column_layers_text(form['column_layers'])} run as stored (faster than dense "
                     "there)")
    if deployed.get("warning"):
        lines.append(f"WARNING: {deployed['warning']}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Print the report (text or ``--json``); returns 0. Raises UserError on bad input (exit 2)."""
    if args.list_models:
        from ..models import list_models, model_info

        for name in list_models():
            info = model_info(name)
            print(f"{name:12s} {'x'.join(map(str, info.input_size)):9s} {info.description}")
        print("torchvision:<name>  any torchvision classifier, e.g. torchvision:resnet50 (no weights downloaded)")
        return 0
    from ..text import json_text

    report = _report(args)
    print(json_text(report, indent=2) if args.json else format_report(report))
    if (report.get("deployed") or {}).get("warning"):
        print(f"autocompress: warning: {report['deployed']['warning']}", file=sys.stderr)
    return 0
