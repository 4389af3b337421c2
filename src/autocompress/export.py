"""ONNX export of (compact) models, checked in onnxruntime against PyTorch.

Uses ``torch.onnx.export`` with the TorchScript-based exporter (``dynamo=False``): it needs no
onnxscript translation of our modules, folds constants (ColumnConv2d's index tensors and per-position
weights become initializers) and supports a dynamic batch axis. One forward before tracing fills each
ColumnConv2d's weight cache, so a "dense"-path layer is traced as one Conv with a constant weight over its
kept input channels (and BatchNorm folds into it) rather than a per-run scatter of the stored columns.
The file is written atomically.
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .analysis import analysis_mode
from .atomic import atomic_write_bytes
from .errors import UserError


@dataclasses.dataclass
class ExportResult:
    """Result of :func:`export_onnx`.

    Attributes:
        path: the written ``.onnx`` file.
        max_abs_diff: max |onnxruntime - PyTorch| over the checked batches (NaN when ``check=False``).
        tolerance: the allowed difference, ``atol_scale * max(1, max|PyTorch output|)``.
        opset: ONNX opset version.
        num_bytes: file size in bytes.
        checked_batch_sizes: batch sizes run in onnxruntime (the example's and one more, for the dynamic
            batch axis).
    """

    path: Path
    max_abs_diff: float
    tolerance: float
    opset: int
    num_bytes: int
    checked_batch_sizes: list[int]


def _onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    buffer = io.BytesIO()
    with analysis_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation / tracer notes
        model(example)  # fills ColumnConv2d's weight caches: traced as constants, not rebuilt per run
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["output"], do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buffer.getvalue()


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | os.PathLike, *, opset: int = 17,
                check: bool = True, atol_scale: float = 1e-4) -> ExportResult:
    """Export ``model`` (eval mode) to ONNX at ``path`` and check it in onnxruntime.

    Args:
        model: a PyTorch model with one tensor input and one tensor output (e.g. a compact model).
        example_inputs: ``[N, C, H, W]`` input used for tracing; the batch axis is exported as dynamic.
        path: output ``.onnx`` file (written atomically; nothing is written when the check fails).
        opset: ONNX opset version (>= 11).
        check: run onnxruntime (CPU) on ``example_inputs`` and on a seeded random batch of size N + 1 and
            compare with PyTorch.
        atol_scale: allowed max abs difference relative to ``max(1, max|PyTorch output|)``.

    Returns:
        :class:`ExportResult`.

    Raises:
        UserError: the exporter cannot export the model, the model outputs NaN / inf, or onnxruntime
            disagrees with PyTorch beyond the tolerance (the message gives the difference).
    """
    if not isinstance(example_inputs, torch.Tensor):
        raise UserError("ONNX export takes one input tensor", "pass example_inputs as a [N, C, H, W] tensor")
    example = example_inputs.detach().cpu()
    model = model.cpu()
    try:
        data = _onnx_bytes(model, example, opset)
    except Exception as exc:  # the exporter raises many types for unsupported ops
        raise UserError(f"torch.onnx.export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                        "try another --opset, or export the model before compaction") from exc
    diff, tolerance, sizes = float("nan"), float("nan"), []
    if check:
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        generator = torch.Generator().manual_seed(0)
        extra = torch.randn((example.shape[0] + 1, *example.shape[1:]), generator=generator, dtype=example.dtype)
        diff, scale = 0.0, 1.0
        for batch in (example, extra):
            with analysis_mode(model):
                expected = model(batch)
            if not torch.isfinite(expected).all():
                raise UserError(f"the model outputs NaN or infinite values for a batch of {batch.shape[0]}",
                                "check the checkpoint's weights (a diverged training run?)")
            got = torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])
            scale = max(scale, float(expected.abs().max()))
            diff = max(diff, float((got - expected).abs().max()))
            sizes.append(int(batch.shape[0]))
        tolerance = atol_scale * scale
        if not diff <= tolerance:
            raise UserError(f"onnxruntime output differs from PyTorch by {diff:.3g} (tolerance {tolerance:.3g})",
                            "report this model; try another --opset")
    written = atomic_write_bytes(path, data)
    return ExportResult(path=written, max_abs_diff=diff, tolerance=tolerance, opset=opset, num_bytes=len(data),
                        checked_batch_sizes=sizes)


__all__ = ["ExportResult", "export_onnx"]
