"""``autocompress export``: write a checkpoint (base or compact model) as ONNX, checked in onnxruntime.

Example::

    autocompress export runs/demo/compress/final.pt --onnx runs/demo/final.onnx --opset 17

The batch axis is dynamic; the input size is the checkpoint's dataset ``input_size`` (or --input-size).
onnxruntime is run on the traced batch and a second batch size and compared with PyTorch; the file is
written (atomically) only when they agree.
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
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx", help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    parser.add_argument("--input-size", help="one input as C,H,W (default: the checkpoint's dataset)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT.onnx file")


def _check_out(out: Path, checkpoint: str, overwrite: bool) -> None:
    """UserError when ``--onnx`` names a folder, or an existing file without ``--overwrite``."""
    if out.is_dir():
        raise UserError(f"--onnx {out} is a folder",
                        f"pass a file path ending in .onnx, e.g. --onnx {out / Path(checkpoint).stem}.onnx")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists", "choose another --onnx file name, or pass --overwrite to replace it")


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


def run(args: argparse.Namespace) -> int:
    """Export and print the check's result. Returns 0."""
    from ..checkpoint import load_checkpoint, model_from_checkpoint
    from ..export import export_onnx

    if args.opset < 11:
        raise UserError(f"--opset {args.opset} is too old", "use --opset 11 or newer (default 17)")
    _check_out(Path(args.onnx), args.checkpoint, args.overwrite)
    ckpt = load_checkpoint(args.checkpoint)
    recorded = ckpt["dataset"].get("input_size")
    size = parse_input_size(args.input_size) if args.input_size else recorded
    if not size:
        raise UserError(f"checkpoint {args.checkpoint} records no input size", "pass --input-size C,H,W")
    model = model_from_checkpoint(ckpt).eval()
    example = torch.randn((1, *[int(s) for s in size]), generator=torch.Generator().manual_seed(0))
    _check_input_size(model, ckpt["model"]["name"], example, recorded)
    result = export_onnx(model, example, args.onnx, opset=args.opset, check=not args.no_check)
    check = ("not checked" if args.no_check else
             f"onnxruntime max |diff| = {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g}, "
             f"batch sizes {result.checked_batch_sizes})")
    print(f"wrote {result.path} ({result.num_bytes / 1e6:.2f} MB, opset {result.opset}); {check}")
    return 0
