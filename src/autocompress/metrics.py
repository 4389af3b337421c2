"""Model metrics: parameters, MACs, a per-layer table, file size and measured CPU latency.

Conventions (used everywhere in autocompress):

* **Parameters** count the elements of ``model.parameters()`` (BatchNorm running statistics and other
  buffers are not parameters).
* **MACs** (multiply-accumulates) come from :class:`torch.utils.flop_counter.FlopCounterMode`, which
  counts convolutions and matrix products (``conv``, ``mm``, ``addmm``, ``bmm``, attention; on CPU
  ``F.scaled_dot_product_attention`` and ``nn.LSTM`` by :data:`UNCOUNTED_OPS`). It reports
  FLOPs = 2 x MACs, so MACs = FLOPs / 2. A convolution costs
  ``C_out * C_in / groups * kh * kw * H_out * W_out`` MACs per sample, a Linear ``in * out``.
  BatchNorm, activations, pooling and residual additions are not counted (the usual convention).
* Counting and timing forwards run under :func:`autocompress.analysis.analysis_mode` (eval, no_grad,
  train/eval flags and BatchNorm buffers restored afterwards).
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .analysis import analysis_mode, random_inputs
from .errors import UserError

@dataclass(frozen=True)
class LayerStats:
    """One row of :func:`layer_table`.

    Attributes:
        name: qualified module name (``"layer1.0.conv1"``; ``""`` is the model itself).
        type: module class name (``"Conv2d"``).
        weight_shape: shape of the module's ``weight`` parameter, or ``None``.
        params: parameters the module owns directly (not those of its children).
        macs: MACs of the module's own computation for the example inputs, summed over every call
            (children excluded; a module called twice counts twice, one never called counts 0).
        zero_fraction: fraction of exactly-zero entries of ``weight`` (0..1), or ``None``.
    """

    name: str
    type: str
    weight_shape: tuple[int, ...] | None
    params: int
    macs: int
    zero_fraction: float | None


@dataclass(frozen=True)
class LatencyResult:
    """Measured CPU latency of one forward pass at a fixed batch size.

    Attributes:
        median_ms: median wall time of one forward, milliseconds.
        p10_ms / p90_ms: 10th and 90th percentiles, milliseconds.
        batch: batch size of the timed inputs.
        threads: ``torch.get_num_threads()`` during the runs.
        runs: timed runs (after ``warmup`` untimed ones).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    batch: int
    threads: int
    runs: int


@dataclass
class ModelSummary:
    """Everything ``autocompress inspect`` reports about a model (see :func:`model_summary`).

    Attributes:
        input_size: one sample's input as (C, H, W).
        params: parameters; nonzero_params: those not exactly zero.
        macs: MACs of one sample (batch 1); flops = 2 x macs.
        layers: per-module rows at batch 1.
        latency: batch size -> :class:`LatencyResult` (empty when latency was not measured).
    """

    input_size: tuple[int, ...]
    params: int
    nonzero_params: int
    macs: int
    flops: int
    layers: list[LayerStats]
    latency: dict[int, LatencyResult] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (tuples become lists, latency keys become strings)."""
        data = asdict(self)
        data["latency"] = {str(batch): asdict(result) for batch, result in self.latency.items()}
        return data


def _as_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (buffers such as BatchNorm running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` that are not exactly zero."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def count_sparse_params(model: nn.Module) -> int:
    """Parameters a sparse format stores for ``model`` (what irregular pruning's params target counts): the non-zero
    entries of weights of two or more dimensions (kernels, matrices, tables: where irregular pruning zeroes
    entries) and every entry of the others (biases, norm scales), whose zeros are values, not pruned weights. A
    never-trained BatchNorm's bias (all zero) counted as pruned let a fresh user's run meet its target before
    retraining gave the biases values, then miss it (3.97x for 4x)."""
    return sum(int(torch.count_nonzero(p.detach())) if p.dim() >= 2 else p.numel() for p in model.parameters())


@contextlib.contextmanager
def _attention_counted() -> Iterator[None]:
    """nn.MultiheadAttention (and the Transformer layers) off their fused fast path for the duration: in eval mode
    under no_grad it runs one native op that FlopCounterMode does not count (a fresh user's ViT counted 886,400 of
    its 1.83 M MACs, so a flops target was "met" at 1.33x); the slow path computes the same through counted ops."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
    """FLOPs of ``F.scaled_dot_product_attention``'s CPU kernel: the two products ``Q K^T`` and ``(.) V``
    (``torch.utils.flop_counter.sdpa_flop_count``), the formula torch registers for its GPU kernels only."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_rnn_layer_flops(input_shape, input_weight_shape, hidden_weight_shape, *_args, out_shape=None,
                         **_kwargs) -> int:
    """FLOPs of one layer and direction of an LSTM on CPU's oneDNN kernel (``aten.mkldnn_rnn_layer``, which torch
    runs for ``nn.LSTM`` without projections): the input and hidden products of every step, ``2 x T x N x
    (gates x input + gates x hidden)`` for an input of shape [T, N, input] (batch-first inputs arrive transposed;
    the gates' element-wise work is not counted, as for a GRU, whose products torch counts as ``addmm``)."""
    steps, batch = input_shape[0], input_shape[1]
    return 2 * steps * batch * (math.prod(input_weight_shape) + math.prod(hidden_weight_shape))


def _cudnn_rnn_flops(input_shape, weight_shapes, *_args, out_shape=None, **_kwargs) -> int:
    """FLOPs of a whole ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` on cuDNN (``aten._cudnn_rnn``, every layer and
    direction in one call): each step of each layer and direction multiplies its input and hidden state by its
    weight matrices, ``2 x tokens x sum(rows x columns of the matrices)``, tokens being ``T x N`` of an input of
    shape [T, N, input] or [N, T, input], or the rows of a packed one [tokens, input]."""
    tokens = math.prod(input_shape[:-1])
    return 2 * tokens * sum(math.prod(shape) for shape in weight_shapes if len(shape) == 2)


#: FlopCounterMode's formulas for the ops it leaves uncounted (on CPU; recurrent layers on cuDNN): a fresh user's
#: ViT with ``F.scaled_dot_product_attention`` counted none of its attention products on CPU, a CRNN none of its
#: LSTM's (a quarter of its MACs: a flops target "met" at 2.45x was 1.79x)
UNCOUNTED_OPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
                 torch.ops.aten.mkldnn_rnn_layer: _cpu_rnn_layer_flops, torch.ops.aten._cudnn_rnn: _cudnn_rnn_flops}


def _inclusive_macs(model: nn.Module, example_inputs) -> dict[str, int]:
    """Run one analysis forward under FlopCounterMode; return module name -> MACs of all its calls,
    children included (FLOPs / 2). Modules never called are absent. What runs is what counts: a column layer
    (:mod:`autocompress.columns`) that runs the dense conv over its kept input channels counts the zero
    columns of those channels too (:func:`autocompress.columns.executed_columns`).

    Raises:
        UserError: the model cannot take inputs of this shape.
    """
    inputs = _as_tuple(example_inputs)
    counter = FlopCounterMode(display=False, custom_mapping=UNCOUNTED_OPS)
    inclusive: dict[str, int] = {}
    starts: dict[str, list[int]] = {}
    handles = []

    for name, module in model.named_modules():
        def pre_hook(_module, _args, name=name):
            starts.setdefault(name, []).append(counter.get_total_flops())

        def post_hook(_module, _args, _output, name=name):
            flops = counter.get_total_flops() - starts[name].pop()
            inclusive[name] = inclusive.get(name, 0) + flops // 2

        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    try:
        with analysis_mode(model), _attention_counted(), counter:
            try:
                with torch.enable_grad():  # under no_grad a view of a parameter (a learned query expanded to the
                    model(*inputs)  # batch) requires grad without a grad_fn, which the counter's module hooks refuse
            except (RuntimeError, AssertionError, ValueError) as exc:
                shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"the model cannot take inputs of shape {shapes} ({first_line})",
                                "use inputs of the size the model was built for (its dataset's C,H,W; "
                                "`autocompress inspect --list-models` shows each model's)") from exc
    finally:
        for handle in handles:
            handle.remove()
    return inclusive


def count_macs(model: nn.Module, example_inputs) -> int:
    """MACs of one forward of ``model`` on ``example_inputs`` (a tensor or tuple of tensors, batch
    included), counted by ``torch.utils.flop_counter.FlopCounterMode`` as FLOPs / 2.

    Raises:
        UserError: the model cannot take inputs of this shape.
    """
    return _inclusive_macs(model, example_inputs).get("", 0)


def _own_macs(model: nn.Module, inclusive: dict[str, int]) -> dict[str, int]:
    """Module name -> MACs of its own computation (its inclusive MACs minus its direct children's). A container the
    forward never calls (an ``nn.ModuleList`` indexed by its parent, whose children run alone) includes its
    children's MACs, so that it owns none and its parent not theirs."""
    inclusive = dict(inclusive)
    totals: dict[str, int] = {}
    for name, module in reversed(list(model.named_modules())):  # children before their parents
        prefix = f"{name}." if name else ""
        totals[name] = sum(inclusive.get(prefix + child, 0) for child, _ in module.named_children())
        inclusive.setdefault(name, totals[name])
    return {name: inclusive[name] - totals[name] for name, _ in model.named_modules()}


def _zero_fraction(weight: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight.detach())) / weight.numel() if weight.numel() else 0.0


def _table(model: nn.Module, inclusive: dict[str, int]) -> list[LayerStats]:
    own = _own_macs(model, inclusive)
    rows = []
    for name, module in model.named_modules():
        own_macs = own[name]
        params = sum(p.numel() for p in module.parameters(recurse=False))
        if params == 0 and own_macs == 0:
            continue
        weight = getattr(module, "weight", None)
        has_weight = isinstance(weight, torch.Tensor)
        rows.append(LayerStats(name=name, type=type(module).__name__,
                               weight_shape=tuple(weight.shape) if has_weight else None,
                               params=params, macs=own_macs,
                               zero_fraction=_zero_fraction(weight) if has_weight else None))
    return rows


def layer_table(model: nn.Module, example_inputs) -> list[LayerStats]:
    """Per-module rows (in ``named_modules`` order) for every module that owns parameters or computes
    MACs itself, from one analysis forward on ``example_inputs``. The rows' MACs sum to
    :func:`count_macs`.

    Raises:
        UserError: the model cannot take inputs of this shape.
    """
    return _table(model, _inclusive_macs(model, example_inputs))


def file_size(path: str | os.PathLike) -> int:
    """Size of the file at ``path`` in bytes.

    Raises:
        UserError: the file does not exist.
    """
    try:
        return os.path.getsize(path)
    except FileNotFoundError as exc:
        raise UserError(f"file {os.fspath(path)} does not exist", "check the path") from exc


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of already sorted values."""
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def measure_latency(model: nn.Module, example_inputs, *, runs: int = 30, warmup: int = 5,
                    threads: int | None = None) -> LatencyResult:
    """Wall time of one forward of ``model`` on ``example_inputs`` on the CPU thread pool.

    ``warmup`` untimed forwards, then ``runs`` timed ones (``time.perf_counter``), under
    :func:`~autocompress.analysis.analysis_mode` with ``torch.set_num_threads(threads)`` (default: the
    current setting); the previous thread count is restored afterwards. Inputs and model stay on their
    device; for CUDA models each run is synchronised.

    Returns:
        :class:`LatencyResult` with median / p10 / p90 in milliseconds.

    Raises:
        UserError: ``runs`` < 1, ``warmup`` < 0 or ``threads`` < 1.
    """
    return measure_latencies({"model": model}, example_inputs, runs=runs, warmup=warmup, threads=threads)["model"]


def measure_latencies(models: Mapping[str, nn.Module], example_inputs, *, runs: int = 30, warmup: int = 5,
                      threads: int | None = None) -> dict[str, LatencyResult]:
    """:func:`measure_latency` of several models on the same inputs, interleaved: after each model's warm-up,
    every round times each model once (the order reversed every other round), so a load change on a shared
    machine hits them alike. Returns name -> :class:`LatencyResult`; raises as :func:`measure_latency`."""
    if runs < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise UserError(f"invalid latency settings runs={runs}, warmup={warmup}, threads={threads}",
                        "use runs >= 1, warmup >= 0 and threads >= 1")
    inputs = _as_tuple(example_inputs)
    sync = torch.cuda.synchronize if any(t.is_cuda for t in inputs) else (lambda: None)
    previous = torch.get_num_threads()
    used = threads or previous
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    torch.set_num_threads(used)
    try:
        with contextlib.ExitStack() as stack:
            for model in models.values():
                stack.enter_context(analysis_mode(model))
            for name in names:
                for _ in range(warmup):
                    models[name](*inputs)
            for index in range(runs):
                for name in names if index % 2 == 0 else names[::-1]:
                    sync()
                    start = time.perf_counter()
                    models[name](*inputs)
                    sync()
                    times[name].append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    results = {}
    for name, values in times.items():
        values.sort()
        results[name] = LatencyResult(median_ms=statistics.median(values), p10_ms=_percentile(values, 10),
                                      p90_ms=_percentile(values, 90), batch=int(inputs[0].shape[0]), threads=used,
                                      runs=runs)
    return results


def example_inputs_for(input_size: Sequence[int], batch: int = 1, seed: int = 0, *,
                       kind: Mapping | None = None) -> torch.Tensor:
    """A random input ``[batch, *input_size]`` from a seeded generator (for counting/timing): standard normal, or
    of the dtype and range ``kind`` records (:func:`input_kind`: token ids, masks)."""
    kind = kind or {}
    dtype = getattr(torch, kind.get("input_dtype", "float32"), None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"the recorded input dtype {kind.get('input_dtype')!r} is not a torch dtype",
                        "the checkpoint is damaged or was not written by autocompress")
    low, high = (kind.get("input_range") or [0, 0])[:2]
    return random_inputs((batch, *input_size), dtype, torch.Generator().manual_seed(seed), int(low), int(high))


def input_kind(example: torch.Tensor) -> dict:
    """What a checkpoint records of an example input beyond its size (:func:`example_inputs_for` reads it back):
    nothing for floats, ``{"input_dtype": "int64", "input_range": [low, high]}`` for integers (token ids),
    ``{"input_dtype": "bool"}`` for booleans."""
    if example.is_floating_point() or example.is_complex():
        return {}
    dtype = str(example.dtype).removeprefix("torch.")
    if example.dtype == torch.bool:
        return {"input_dtype": dtype}
    return {"input_dtype": dtype, "input_range": [int(example.min()), int(example.max())]}


def model_summary(model: nn.Module, input_size: Sequence[int], *, latency_batches: Sequence[int] = (1, 64),
                  latency_runs: int = 30, warmup: int = 5, threads: int | None = None,
                  latency: bool = True, kind: Mapping | None = None) -> ModelSummary:
    """Parameters, MACs / FLOPs and the per-layer table at batch 1, and (when ``latency``) the latency at
    each of ``latency_batches`` (see :func:`measure_latency`) on the model's device.

    Args:
        input_size: one sample as (C, H, W), e.g. ``(3, 32, 32)``.
        kind: the inputs' dtype and range when they are not floats (:func:`input_kind`, e.g. token ids).

    Raises:
        UserError: the model cannot take this input size; invalid latency settings.
    """
    size = tuple(int(v) for v in input_size)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    inclusive = _inclusive_macs(model, example_inputs_for(size, kind=kind).to(device))
    macs = inclusive.get("", 0)
    summary = ModelSummary(input_size=size, params=count_params(model),
                           nonzero_params=count_nonzero_params(model), macs=macs, flops=2 * macs,
                           layers=_table(model, inclusive))
    if latency:
        for batch in latency_batches:
            summary.latency[batch] = measure_latency(model, example_inputs_for(size, batch, kind=kind).to(device),
                                                     runs=latency_runs, warmup=warmup, threads=threads)
    return summary
