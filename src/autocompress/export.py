"""Deployable files of (compact) models, each checked against PyTorch before it is written (atomically).

* :func:`export_onnx`: ONNX with the TorchScript-based exporter (``dynamo=False``): it needs no
  onnxscript translation of our modules, folds constants (ColumnConv2d's index tensors and gathered
  weights become initializers, so a "dense"-path layer is one Conv over its kept input channels) and
  supports a dynamic batch axis; a model it cannot export goes through the ``torch.export``-based exporter
  instead (:func:`onnx_bytes`); checked in onnxruntime.
* :func:`export_program`: a ``torch.export`` program (``torch.export.save``, ``.pt2``) with a dynamic
  batch axis; checked by loading the file back (``torch.export.load``) and running it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .analysis import analysis_mode, example_tuple, random_like
from .atomic import atomic_write_bytes
from .columns import export_form
from .errors import UserError, first_line


@dataclasses.dataclass
class ExportResult:
    """Result of :func:`export_onnx` and :func:`export_program`.

    Attributes:
        path: the written ``.onnx`` / ``.pt2`` file.
        max_abs_diff: max |exported - PyTorch| over the checked batches (NaN when ``check=False``).
        tolerance: the allowed difference, ``atol_scale * max(1, max|PyTorch output|)``.
        opset: ONNX opset version of the file (at least 18 when the torch.export-based exporter wrote it;
            None for a ``torch.export`` program).
        num_bytes: file size in bytes.
        checked_batch_sizes: batch sizes run (the example's and one more, for the dynamic batch axis).
    """

    path: Path
    max_abs_diff: float
    tolerance: float
    opset: int | None
    num_bytes: int
    checked_batch_sizes: list[int]


#: what an export takes as one forward's inputs: a tensor, or a tuple of tensors (positional arguments, all with
#: the batch axis first)
Inputs = torch.Tensor | tuple[torch.Tensor, ...]


#: the axes an export keeps dynamic beyond the batch axis: graph input (or ONNX output) name -> axis -> axis name,
#: as torch.onnx.export's ``dynamic_axes`` (e.g. ``{"input": {1: "sequence"}, "input_1": {1: "sequence"}}``)
Axes = dict[str, dict[int, str]]


def checked_axes(axes: Axes | None, example: tuple[torch.Tensor, ...], outputs_count: int = 0) -> Axes:
    """``axes`` checked against ``example`` (the forward's inputs) and completed with the batch axis of every input
    and of the ``outputs_count`` outputs: name -> {axis: axis name}, axis 0 ``"batch"``.

    Raises:
        UserError: an unknown name (not an input or output of the graph), an axis that is not an int in
            ``[1, dims)`` of its input, an axis name that is not a non-empty str, an input axis of size 1 in the
            example (torch.export fixes those), or one axis name on input axes of different sizes in the example.
    """
    inputs, outputs_ = input_names(len(example)), _names("output", outputs_count)
    done: Axes = {name: {0: "batch"} for name in [*inputs, *outputs_]}
    sizes: dict[str, int] = {}
    for name, entry in (axes or {}).items():
        if name not in done:
            raise UserError(f"dynamic_axes names {name!r}, not an input or output of the graph",
                            f"use the graph's names: inputs {', '.join(inputs)}; outputs {', '.join(outputs_)}")
        if not isinstance(entry, dict):
            raise UserError(f"dynamic_axes[{name!r}] is a {type(entry).__name__}, not a dict of axis -> name",
                            f"pass e.g. {{{name!r}: {{1: 'sequence'}}}}")
        for axis, label in entry.items():
            dims = example[inputs.index(name)].dim() if name in inputs else None
            if isinstance(axis, bool) or not isinstance(axis, int) or axis < 1 or (dims is not None and axis >= dims):
                raise UserError(f"dynamic_axes[{name!r}] has axis {axis!r}, not an axis past the batch of "
                                f"{name}" + (f" (it has {dims})" if dims is not None else ""),
                                "name axes 1, 2, ... (axis 0, the batch, is always dynamic)")
            if not isinstance(label, str) or not label:
                raise UserError(f"dynamic_axes[{name!r}][{axis}] is {label!r}, not an axis name",
                                f"name the axis, e.g. {{{axis}: 'sequence'}}")
            if dims is not None:
                size = int(example[inputs.index(name)].shape[axis])
                if size < 2:
                    raise UserError(f"dynamic axis {label!r} ({name} axis {axis}) has size 1 in example_inputs",
                                    "give an example of size 2 or more on a dynamic axis")
                if sizes.setdefault(label, size) != size:
                    raise UserError(f"dynamic axis {label!r} has sizes {sizes[label]} and {size} in example_inputs",
                                    "give axes that share a name one size in the example, or name them apart")
            done[name][axis] = label
    return done


def _shrunk(tensor: torch.Tensor, axes: dict[int, str]) -> torch.Tensor:
    """``tensor`` one shorter on each of its dynamic ``axes`` past the batch (of size > 1): its last position
    dropped, so a padding mask keeps its pattern and a learned position table is not overrun."""
    for axis in axes:
        if axis and tensor.shape[axis] > 1:
            tensor = tensor.narrow(axis, 0, tensor.shape[axis] - 1)
    return tensor


def _doubled(tensor: torch.Tensor, axes: dict[int, str]) -> torch.Tensor:
    """``tensor`` twice as long on each of its dynamic ``axes`` past the batch (itself twice over): a size every
    stride that divides the example's size divides too (a U-Net's pooling and upsampling)."""
    for axis in axes:
        if axis:
            tensor = torch.cat([tensor, tensor], axis)
    return tensor


def _other_batch(model: nn.Module, example: tuple[torch.Tensor, ...], axes: Axes
                 ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """A seeded random batch of N + 1 of each input, one shorter on each further dynamic axis of ``axes`` or, where
    the model cannot run at that size, twice as long; and the model's outputs on it (:func:`outputs`).

    Raises:
        UserError: the model runs at neither size (the sizes and its error on the longer one).
    """
    names = input_names(len(example))
    changes = (_shrunk, _doubled) if any(len(axes[name]) > 1 for name in names) else (_shrunk,)
    tried = []
    for change in changes:
        generator = torch.Generator().manual_seed(0)
        batch = tuple(change(random_like(tensor, tensor.shape[0] + 1, generator), axes[name])
                      for name, tensor in zip(names, example))
        try:
            return batch, outputs(model, batch)
        except Exception as exc:  # noqa: BLE001 - the caller's forward may raise anything
            if len(changes) == 1:
                raise
            tried.append((batch, exc))
    shapes = " or ".join(str([list(t.shape[1:]) for t in batch]) for batch, _ in tried)
    raise UserError(f"the check of the dynamic axes runs the model at other sizes, and it fails at {shapes} "
                    f"({first_line(tried[-1][1])})",
                    "leave those axes static, or export with check=False") from tried[-1][1]


def _names(first: str, count: int) -> list[str]:
    """``[first, first_1, first_2, ...]``, ``count`` names."""
    return [first, *(f"{first}_{index}" for index in range(1, count))][:count]


def input_names(count: int) -> list[str]:
    """The exported graph's input names: ``"input"``, then ``"input_1"``, ``"input_2"``, ... for further inputs."""
    return _names("input", count)


def outputs(model: nn.Module, batch: Inputs) -> list[torch.Tensor]:
    """The tensors ``model`` (eval mode, no grad) returns for ``batch`` (a tensor or a tuple of them, the forward's
    arguments), flattened in order as an exporter orders a model's outputs (:func:`flat_outputs`)."""
    with analysis_mode(model):
        return flat_outputs(model(*((batch,) if isinstance(batch, torch.Tensor) else batch)))


def flat_outputs(output) -> list[torch.Tensor]:
    """The tensors of a forward's ``output`` (a tensor, or nested tuples / lists of tensors), flattened in order.

    Raises:
        UserError: an output that is not a tensor (a dict, None, a number).
    """
    leaves = _tensors(output)
    if leaves is None:
        what = (f"a {type(output).__name__}" if not isinstance(output, (tuple, list)) else
                f"a {type(output).__name__} holding {type(_not_tensor(output)).__name__} values")
        example = ("model(x)['logits'] for a dict" if isinstance(output, dict) else
                   "model(x).logits for a dataclass or another object of attributes"
                   if not isinstance(output, (tuple, list)) and hasattr(output, "__dict__") else
                   "model(x)[0], the tuple's tensors without its other items")
        raise UserError(f"the model returns {what}, which an exported graph cannot return (tensors, or tuples of "
                        f"them)", f"export a wrapper module whose forward returns the tensors (e.g. {example})")
    return leaves


def _not_tensor(output):
    """The first item of nested tuples / lists that is neither a tensor nor a tuple / list."""
    for item in output:
        if isinstance(item, (tuple, list)):
            if (inner := _not_tensor(item)) is not None:
                return inner
        elif not isinstance(item, torch.Tensor):
            return item
    return None


def _tensors(output) -> list[torch.Tensor] | None:
    """The tensors of nested tuples / lists, in order, or None when something else is in them."""
    if isinstance(output, torch.Tensor):
        return [output]
    if not isinstance(output, (tuple, list)):
        return None
    leaves = [_tensors(item) for item in output]
    return None if any(leaf is None for leaf in leaves) else [t for leaf in leaves for t in leaf]


def _compare(model: nn.Module, run: Callable[[tuple[torch.Tensor, ...]], list[torch.Tensor]],
             example: tuple[torch.Tensor, ...], atol_scale: float, runtime: str, fix: str, axes: Axes
             ) -> tuple[float, float, list[int]]:
    """Run ``model`` (eval mode) and the exported ``run`` (its output tensors, in :func:`outputs`' order) on
    ``example`` (the forward's inputs) and on :func:`_other_batch` (N + 1 of each, at other sizes on further
    dynamic axes of ``axes``); returns ``(max abs difference over every output, tolerance, batch sizes)``.

    Raises:
        UserError: the model outputs NaN / inf or runs at no other size of a dynamic axis, or ``runtime``
            differs beyond the tolerance.
    """
    diff, scale, sizes = 0.0, 1.0, []
    for batch, expected in ((example, outputs(model, example)), _other_batch(model, example, axes)):
        if not all(torch.isfinite(tensor).all() for tensor in expected):
            raise UserError(f"the model outputs NaN or infinite values for a batch of {batch[0].shape[0]}",
                            "check the checkpoint's weights (a diverged training run?)")
        got = run(batch)
        if len(got) != len(expected):
            raise UserError(f"{runtime} returns {len(got)} outputs where the model returns {len(expected)}", fix)
        for want, have in zip(expected, got):
            scale = max(scale, float(want.abs().max()) if want.numel() else 0.0)
            diff = max(diff, float((have - want).abs().max()) if want.numel() else 0.0)
        sizes.append(int(batch[0].shape[0]))
    tolerance = atol_scale * scale
    if not diff <= tolerance:
        raise UserError(f"{runtime} output differs from PyTorch by {diff:.3g} (tolerance {tolerance:.3g})", fix)
    return diff, tolerance, sizes


def onnx_bytes(model: nn.Module, example: Inputs, opset: int = 17, axes: Axes | None = None) -> bytes:
    """ONNX bytes of ``model`` (eval mode) traced on ``example`` (a tensor or a tuple of them) with a dynamic batch
    axis (inputs :func:`input_names`, outputs ``"output"``, ``"output_1"``, ... in :func:`outputs`' order) and the
    dynamic ``axes`` (:func:`checked_axes`' result; None: the batch axes only).

    Column-pruned convolutions other than 2-D ones are exported in their gathered form
    (:func:`autocompress.columns.export_form`). The TorchScript exporter first (constants folded; its
    diagnostics on stderr are swallowed); when it cannot export the model (an op it lacks, e.g. adaptive pooling
    to a size that does not divide the input), the ``torch.export``-based exporter (``dynamo=True``, opset at
    least 18). The exception of the first exporter propagates when both fail.
    """
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if axes is None:
        names = _output_names(model, example)
        axes = checked_axes(None, example, len(names))
    else:  # checked_axes names every output: the model is not run again for them
        names = [name for name in axes if name not in input_names(len(example))]
    model = export_form(model)
    try:
        with _output_silenced():
            return _torchscript_bytes(model, example, opset, names, axes)
    except Exception as first:  # the exporter raises many types for unsupported ops
        try:
            return _dynamo_bytes(model, example, opset, names, axes)
        except Exception:
            raise first from None


def _output_names(model: nn.Module, example: tuple[torch.Tensor, ...]) -> list[str]:
    """``["output", "output_1", ...]``, one name per tensor ``model`` returns for ``example`` (UserError: a
    value that is not a tensor, :func:`flat_outputs`)."""
    return _names("output", len(outputs(model, example)))


def _torchscript_bytes(model: nn.Module, example: tuple[torch.Tensor, ...], opset: int, names: list[str],
                       axes: Axes) -> bytes:
    buffer = io.BytesIO()
    inputs = input_names(len(example))
    with analysis_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation / tracer notes
        torch.onnx.export(model, example, buffer, dynamo=False, opset_version=opset,
                          input_names=inputs, output_names=names, do_constant_folding=True,
                          dynamic_axes=axes)
    return buffer.getvalue()


def _traced(example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``example``, a batch of 1 doubled: torch.export specialises a dimension of size 1, so it is traced as 2 to
    keep the batch axis dynamic."""
    return example if example[0].shape[0] > 1 else tuple(torch.cat([t, t]) for t in example)


def _dynamic_shapes(model: nn.Module, axes: Axes, count: int) -> tuple:
    """torch.export's dynamic shapes of ``count`` inputs from :func:`checked_axes`' ``axes``: one ``Dim`` named
    ``batch``, the first axis of every input, and ``Dim.AUTO`` on each further dynamic axis (torch.export infers
    its range and which axes are equal: a learned table of 8 positions caps a sequence at 8). For a forward that
    takes its inputs as ``*inputs`` they are one entry, as torch.export binds them (a tuple of the inputs' specs)."""
    batch = torch.export.Dim("batch")
    specs = tuple({axis: batch if axis == 0 else torch.export.Dim.AUTO for axis in axes[name]}
                  for name in input_names(count))
    parameters = list(inspect.signature(model.forward).parameters.values())
    return (specs,) if parameters and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL else specs


def _dynamo_bytes(model: nn.Module, example: tuple[torch.Tensor, ...], opset: int, names: list[str],
                  axes: Axes) -> bytes:
    buffer = io.BytesIO()
    with analysis_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, _traced(example), dynamo=True, opset_version=max(opset, 18),
                                    verbose=False, input_names=input_names(len(example)), output_names=names,
                                    dynamic_shapes=_dynamic_shapes(model, axes, len(example)))
        program.save(buffer)
    return buffer.getvalue()


@contextlib.contextmanager
def _output_silenced():
    """File descriptors 1 and 2 pointed at a temporary file within the block: when the TorchScript exporter
    fails (e.g. adaptive pooling to a size that does not divide the input) it prints the whole graph, ~60 lines
    of "Torch IR graph at exception" on stdout for a small CNN, before the fallback exports the model."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy_ in zip((1, 2), saved):
                os.dup2(copy_, fd)
                os.close(copy_)


def opset_of(data: bytes) -> int:
    """The default-domain opset version of ONNX model bytes."""
    import onnx

    model = onnx.load_from_string(data)
    return next(int(entry.version) for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when its parameters and buffers are on the CPU, else a CPU copy (``nn.Module.cpu()``
    would move the caller's model)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return model if all(t.device.type == "cpu" for t in tensors) else copy.deepcopy(model).cpu()


def export_onnx(model: nn.Module, example_inputs: Inputs, path: str | os.PathLike, *, opset: int = 17,
                check: bool = True, atol_scale: float = 1e-4, dynamic_axes: Axes | None = None) -> ExportResult:
    """Export ``model`` (eval mode) to ONNX at ``path`` and check it in onnxruntime.

    Args:
        model: a PyTorch model with tensor inputs and a tensor (or a tuple of tensors) as output (e.g. a
            compact model); moved to the CPU.
        example_inputs: ``[N, C, H, W]`` input used for tracing, or a tuple of ``[N, ...]`` tensors (the
            forward's arguments: token ids and a padding mask; graph inputs :func:`input_names`); the batch axis is
            exported as dynamic.
        path: output ``.onnx`` file (written atomically; nothing is written when the check fails).
        opset: ONNX opset version (>= 11).
        check: run onnxruntime (CPU) on ``example_inputs`` and on a seeded random batch of size N + 1 (one
            shorter on each dynamic axis of ``dynamic_axes``, or twice as long where the model cannot run one
            shorter: a U-Net's height and width) and compare with PyTorch.
        atol_scale: allowed max abs difference relative to ``max(1, max|PyTorch output|)``.
        dynamic_axes: further dynamic axes, as torch.onnx.export's: graph input or output name -> {axis: axis
            name}, e.g. ``{"input": {1: "sequence"}, "input_1": {1: "sequence"}, "output": {1: "sequence"}}``
            for token ids, a padding mask and per-token scores (:func:`checked_axes`).

    Returns:
        :class:`ExportResult`.

    Raises:
        UserError: bad ``dynamic_axes`` (:func:`checked_axes`), the exporter cannot export the model, the model
            outputs NaN / inf, or onnxruntime disagrees with PyTorch beyond the tolerance (the message gives the
            difference).
    """
    example = tuple(t.cpu() for t in example_tuple(example_inputs, "ONNX export"))
    model = on_cpu(model)
    axes = checked_axes(dynamic_axes, example, len(outputs(model, example)))
    try:
        data = onnx_bytes(model, example, opset, axes)
    except UserError:  # the model's outputs: the reason is its own
        raise
    except Exception as exc:  # the exporter raises many types for unsupported ops
        raise UserError(f"torch.onnx.export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                        "try another opset, or export the model before compaction") from exc
    diff, tolerance, sizes = float("nan"), float("nan"), []
    if check:
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        diff, tolerance, sizes = _compare(
            model, lambda batch: [torch.from_numpy(a) for a in session.run(
                None, dict(zip(input_names(len(batch)), (t.numpy() for t in batch))))], example,
            atol_scale, "onnxruntime", "report this model; try another opset", axes)
    written = atomic_write_bytes(path, data)
    return ExportResult(path=written, max_abs_diff=diff, tolerance=tolerance, opset=opset_of(data),
                        num_bytes=len(data), checked_batch_sizes=sizes)


def _program_bytes(model: nn.Module, example: tuple[torch.Tensor, ...], axes: Axes) -> bytes:
    model = export_form(model)
    with analysis_mode(model):
        program = torch.export.export(model, _traced(example),
                                      dynamic_shapes=_dynamic_shapes(model, axes, len(example)))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def export_program(model: nn.Module, example_inputs: Inputs, path: str | os.PathLike, *, check: bool = True,
                   atol_scale: float = 1e-5, dynamic_axes: Axes | None = None) -> ExportResult:
    """Export ``model`` (eval mode) as a ``torch.export`` program at ``path`` (``torch.export.save``;
    conventionally ``.pt2``), load it back and check it against the model.

    The program is the model's eval-mode forward as an ATen graph with its weights; load it with
    ``torch.export.load(path).module()`` (no autocompress needed) or compile it ahead of time
    (AOTInductor).

    Args:
        model: a PyTorch model with tensor inputs and a tensor (or a tuple of tensors) as output; moved to
            the CPU.
        example_inputs: ``[N, C, H, W]`` input used for tracing, or a tuple of ``[N, ...]`` tensors (the forward's
            arguments); the batch axis is exported as dynamic (a batch of 1 is traced as a batch of 2, since
            torch.export specialises size-1 dimensions).
        path: output file (written atomically; nothing is written when the export or the check fails).
        check: load the written program back and run it on ``example_inputs`` and on a seeded random
            batch of size N + 1 (one shorter on each dynamic axis of ``dynamic_axes``, or twice as long where the
            model cannot run one shorter), compared with the model.
        atol_scale: allowed max abs difference relative to ``max(1, max|PyTorch output|)``.
        dynamic_axes: further dynamic input axes, named as :func:`export_onnx`'s (inputs ``"input"``,
            ``"input_1"``, ...; an output's axes follow from its inputs' here); torch.export infers each axis' range
            (``Dim.AUTO``).

    Returns:
        :class:`ExportResult` (``opset`` None).

    Raises:
        UserError: bad ``dynamic_axes`` (:func:`checked_axes`), torch.export cannot trace the model, the model
            outputs NaN / inf, or the loaded program disagrees with the model beyond the tolerance.
    """
    example = tuple(t.cpu() for t in example_tuple(example_inputs, "torch.export"))
    model = on_cpu(model)
    axes = checked_axes(dynamic_axes, example, len(outputs(model, example)))
    try:
        data = _program_bytes(model, example, axes)
    except Exception as exc:  # torch.export raises many types for untraceable code
        raise UserError(f"torch.export failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})",
                        "make the model's forward traceable (no data-dependent Python control flow), "
                        "or export it to ONNX") from exc
    diff, tolerance, sizes = float("nan"), float("nan"), []
    if check:
        loaded = torch.export.load(io.BytesIO(data)).module()

        def run(batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
            with torch.no_grad():
                return flat_outputs(loaded(*batch))

        diff, tolerance, sizes = _compare(model, run, example, atol_scale, "the loaded torch.export program",
                                          "report this model", axes)
    written = atomic_write_bytes(path, data)
    return ExportResult(path=written, max_abs_diff=diff, tolerance=tolerance, opset=None, num_bytes=len(data),
                        checked_batch_sizes=sizes)


__all__ = ["Axes", "ExportResult", "checked_axes", "export_onnx", "export_program", "flat_outputs", "input_names",
           "onnx_bytes", "outputs"]
