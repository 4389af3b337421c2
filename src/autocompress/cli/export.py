"""``autocompress export``: write a checkpoint (base or compact model) as ONNX, checked in onnxruntime,
and / or as a ``torch.export`` program, checked by loading it back.

Example::

    autocompress export runs/demo/compress/final.pt --onnx runs/demo/final.onnx --opset 17 \
        --torch-export runs/demo/final.pt2

The batch axis is dynamic (and the axes of --dynamic-axes); the input size is the checkpoint's dataset
``input_size`` (or --input-size).
Each file is run on the traced batch and a second batch size and compared with PyTorch; it is written
(atomically) only when they agree. Column-pruned layers are written in their deployed form (``--columns auto``:
each layer stored or dense, whichever runs faster in onnxruntime, or in eager torch for ``--torch-export``
alone; :mod:`autocompress.deployment`); for the ``model.pt`` of a compress run folder, the choice that run
recorded when it timed the same runtime and threads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .inspect import parse_input_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``autocompress export``."""
    parser.add_argument("checkpoint", help="checkpoint (.pt) written by autocompress")
    parser.add_argument("--onnx", metavar="OUT.onnx", help="ONNX file to write")
    parser.add_argument("--torch-export", metavar="OUT.pt2",
                        help="torch.export program to write (load it with torch.export.load(path).module())")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    parser.add_argument("--input-size", help="one input as C,H,W (default: the checkpoint's dataset)")
    parser.add_argument("--dynamic-axes", metavar="AXES",
                        help="comma list of the input's axes past the batch to keep dynamic too, e.g. 2,3 for an "
                             "image's height and width, 1 for a token sequence (the batch axis always is)")
    parser.add_argument("--columns", choices=("auto", "stored", "dense"), default="auto",
                        help="column-pruned layers as stored (kept columns only), dense (dropped columns as zeros), "
                             "or auto: each the faster on this machine (default), timed in onnxruntime (with "
                             "--onnx) or eager torch (--torch-export alone)")
    parser.add_argument("--runtime-threads", type=int, default=1,
                        help="runtime threads for --columns auto's timing (default 1)")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the written files with PyTorch")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors (the exit status tells)")


def _check_out(out: Path, flag: str, suffix: str, checkpoint: str, overwrite: bool) -> None:
    """UserError when output ``flag`` (``--onnx``, ``--torch-export``) names a folder, a file in a folder that
    does not exist, or an existing file without ``--overwrite``."""
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder",
                        f"pass a file path ending in {suffix}, e.g. {flag} {out / Path(checkpoint).stem}{suffix}")
    if not out.parent.is_dir():
        raise UserError(f"{flag} {out}: folder {out.parent} does not exist", "create it first, or choose another path")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists", f"choose another {flag} file name, or pass --overwrite to replace it")


def _check_input_size(model: nn.Module, name: str, example: torch.Tensor, recorded: list | None) -> None:
    """UserError when ``model`` (zoo name ``name``) cannot take ``example`` (a dry forward), suggesting the
    checkpoint's ``recorded`` input size."""
    from ..analysis import analysis_mode

    try:
        with analysis_mode(model):
            model(example)
    except RuntimeError as exc:
        size = ",".join(map(str, example.shape[1:]))
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        fix = (f"pass the checkpoint's recorded input size, --input-size {','.join(map(str, recorded))}"
               if recorded and list(recorded) != list(example.shape[1:]) else
               "pass --input-size C,H,W of the inputs the model was trained on")
        raise UserError(f"input size {size} does not fit model {name} ({detail})", fix) from exc


def _summary(result, checked: bool, runtime: str) -> str:
    opset = f", opset {result.opset}" if result.opset is not None else ""
    check = (f"{runtime} max |diff| = {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g}, "
             f"batch sizes {result.checked_batch_sizes})" if checked else "not checked")
    return f"wrote {result.path} ({result.num_bytes / 1e6:.2f} MB{opset}); {check}"


def _recorded_dense_layers(checkpoint: Path, runtime: str, threads: int, names: list[str]) -> list[str] | None:
    """The column layers a compress run chose to deploy dense, when ``checkpoint`` is the ``model.pt`` of that
    run's folder and its final record timed them in ``runtime`` with ``threads`` threads (so that ``export``
    writes the form whose speed the run reported, not a second timing's choice); None otherwise."""
    from ..report import read_metrics

    records = checkpoint.parent / "metrics.jsonl"
    if checkpoint.name != "model.pt" or not records.is_file():
        return None
    finals = [r for r in read_metrics(records) if r.get("event") == "final" and r.get("deployed_form")]
    if not finals:
        return None
    final = finals[-1]
    timed = final.get("deployed") or {}
    dense = list(final["deployed_form"].get("dense_layers", []))
    if (timed.get("runtime"), timed.get("threads")) != (runtime, threads) or not set(dense) <= set(names):
        return None
    return dense


def _columns_form(model: nn.Module, example: torch.Tensor, args: argparse.Namespace) -> nn.Module:
    """``model`` with its column-pruned layers as ``--columns`` says (printing what ``auto`` chose: the compress
    run's own choice when the checkpoint is its run folder's ``model.pt`` timed in the same runtime and threads,
    else a new timing)."""
    from ..deployment import column_layer_names, deployed_form, with_dense_layers
    from ..latency import LatencyConfig

    names = column_layer_names(model)
    if not names or args.columns == "stored":
        return model
    if args.columns == "dense":
        return with_dense_layers(model, names)
    runtime = "onnxruntime" if args.onnx else "torch"
    recorded = _recorded_dense_layers(Path(args.checkpoint), runtime, args.runtime_threads, names)
    if recorded is not None:
        _say(args, f"column-pruned layers: {len(recorded)} of {len(names)} dense, as the compress run chose in "
                   f"{runtime} ({args.runtime_threads} thread(s), its metrics.jsonl); --columns stored / dense "
                   "override it")
        return with_dense_layers(model, recorded)
    form = deployed_form(model, example, LatencyConfig(runtime=runtime, threads=args.runtime_threads))
    _say(args, f"column-pruned layers: {len(form.dense_layers)} of {len(names)} dense (faster in {runtime}, "
               f"{args.runtime_threads} thread(s); --columns stored keeps them all)")
    return form.model


def parse_axes(text: str | None) -> dict[str, dict[int, str]] | None:
    """``--dynamic-axes 2,3`` as export's ``dynamic_axes`` (``{"input": {2: "axis_2", 3: "axis_3"}}``); None for
    None. UserError unless a comma list of integers."""
    if text is None:
        return None
    try:
        axes = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--dynamic-axes {text} is not a comma list of axes", "pass e.g. --dynamic-axes 2,3") from None
    return {"input": {axis: f"axis_{axis}" for axis in axes}}


def _say(args: argparse.Namespace, line: str) -> None:
    if not args.quiet:
        print(line)


def run(args: argparse.Namespace) -> int:
    """Export and print each check's result. Returns 0."""
    from . import read_checkpoint
    from ..checkpoint import model_from_checkpoint, model_label
    from ..export import export_onnx, export_program
    from ..metrics import example_inputs_for

    outputs = [(flag, suffix, value) for flag, suffix, value in
               (("--onnx", ".onnx", args.onnx), ("--torch-export", ".pt2", args.torch_export)) if value]
    if not outputs:
        raise UserError("nothing to write", "pass --onnx OUT.onnx and / or --torch-export OUT.pt2")
    if args.runtime_threads < 1:
        raise UserError(f"--runtime-threads {args.runtime_threads} is not positive", "pass --runtime-threads 1 or more")
    if args.onnx and args.opset < 11:
        raise UserError(f"--opset {args.opset} is too old", "use --opset 11 or newer (default 17)")
    for flag, suffix, value in outputs:
        _check_out(Path(value), flag, suffix, args.checkpoint, args.overwrite)
    axes = parse_axes(args.dynamic_axes)
    ckpt = read_checkpoint(args.checkpoint, args.model_arg)
    recorded = ckpt["dataset"].get("input_size")
    size = parse_input_size(args.input_size) if args.input_size else recorded
    if not size:
        raise UserError(f"checkpoint {args.checkpoint} records no input size", "pass --input-size C,H,W")
    model = model_from_checkpoint(ckpt).eval()
    example = example_inputs_for([int(s) for s in size], kind=ckpt["dataset"])  # token ids where it records them
    _check_input_size(model, model_label(ckpt["model"]), example, recorded)
    model = _columns_form(model, example, args)
    if args.onnx:
        result = export_onnx(model, example, args.onnx, opset=args.opset, check=not args.no_check, dynamic_axes=axes)
        _say(args, _summary(result, not args.no_check, "onnxruntime"))
    if args.torch_export:
        result = export_program(model, example, args.torch_export, check=not args.no_check, dynamic_axes=axes)
        _say(args, _summary(result, not args.no_check, "loaded program"))
    return 0
