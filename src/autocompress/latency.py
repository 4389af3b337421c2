"""Deployed speed: latency measured in a named runtime, and a per-layer lookup table that estimates it.

Runtimes (:data:`RUNTIMES`): ``"onnxruntime"`` (the model exported to ONNX with
:func:`autocompress.export.onnx_bytes`, run by onnxruntime's CPU execution provider with ``threads`` intra-op
threads, one inter-op thread, sequential execution, all graph optimisations) and ``"torch"`` (eager PyTorch
in eval mode under no_grad, on ``"cpu"`` with ``torch.set_num_threads(threads)`` or on CUDA, synchronised).

**Measurement** (:func:`measure_models`): for each batch size, every model gets ``warmup`` untimed runs, then
rounds in which each model runs :data:`RUN_BLOCK` timed calls in a row after one untimed call, the order alternating
between rounds (interleaved: a load change on a shared machine hits base and compact alike; in blocks: each model
is timed with its weights warm in the caches, as deployed), until each has ``runs`` timed calls; the median of
each model's runs is its latency (milliseconds).

**Lookup table** (:class:`LatencyTable`, the idea of HALP, Shen et al. NeurIPS 2022, and NetAdapt, Yang et
al. ECCV 2018): every Conv1d / Conv2d / Conv3d and Linear layer of the base model is timed alone (with a
ReLU after it, which runtimes fuse) in the runtime at the widths the search can choose: the allowed widths
of its input and output channels (:func:`autocompress.alignment.allowed_widths` at the run's channel
multiple, thinned to at most :data:`GRID_POINTS` per side and interpolated bilinearly in between; layers
of the same shape share cells). A cell's time is the median of ``table_runs`` runs minus the runtime's
per-call overhead (a one-ReLU model timed the same way), made non-decreasing in both widths (a running
maximum, so noise never makes a narrower layer look slower). The rest of the model (pooling, additions,
layers the table does not model, one call's overhead) is a fixed cost: the measured base latency minus
the table's sum at full width, scaled: the base and its narrowest reachable model (every filter group at
the space's largest rate, aligned, compacted) are both measured, and ``fixed + scale * table sum`` is fitted
through the two. The fixed cost may come out negative (layers timed alone carry per-layer costs that the
whole graph does not pay); below the narrowest model (reachable only by pruning columns too) the estimate is
proportional to the table sum through that model's measurement, so it stays positive. Layers timed alone do
not add up to the whole model (fusion across layers, per-node overhead, caches); without the second point a
resnet20 at 7x fewer MACs was under-estimated by 68 %, and with the fixed cost clamped at 0 a narrow one was
over-estimated by 10-17 % (BENCHMARKS.md). So the estimate equals the measured base latency at full width and
the narrowest model's at its widths, is non-increasing in every pruning rate, and is checked against the
measured compact model at the end.

**Columns**: a column-pruned layer (:class:`autocompress.columns.ColumnConv2d`, ``ColumnConvNd``,
``ColumnLinear``) is timed as exported at full width with :data:`COLUMN_FRACTIONS` of its columns kept; its
cost ratio to the dense layer (running minimum towards fewer columns, at most 1) scales its cells. A layer
whose columns save less than :data:`COLUMN_SAVING` at half of them is marked ``column_useless``: a latency
target does not prune its columns (the table records it, so the report says why).

The table is built once per model architecture, runtime, device, CPU, threads, batch size and channel
multiple, and cached as JSON (atomic write) under ``cache_dir`` (default ``$AUTOCOMPRESS_CACHE`` or
``~/.cache/autocompress``), named by a SHA-256 of all of these (:func:`table_key`). A table loaded from the
cache is rescaled to a fresh measurement of the base model (:meth:`LatencyTable.rescale`): a machine busier
or quieter than when it was built changes every time, and a ``latency=Nms`` target is converted against
the base as it runs now.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .alignment import allowed_widths
from .analysis import analysis_mode, at_batch, example_tuple, hooked_forward, output_tensors
from .atomic import atomic_write_text
from .columns import ColumnConv2d, ColumnConvNd, ColumnLinear
from .errors import SettingError, UserError, first_line, show
from .export import input_names, onnx_bytes
from .metrics import layer_table

RUNTIMES = ("onnxruntime", "torch")
#: at most this many widths per side of a layer's table (evenly spread over the allowed widths)
GRID_POINTS = 8
#: fractions of a layer's columns kept when its column pruning is timed
COLUMN_FRACTIONS = (0.25, 0.5, 0.75)
#: a layer whose time at half of its columns is above ``1 - COLUMN_SAVING`` of the dense time saves nothing
COLUMN_SAVING = 0.05
TABLE_VERSION = 4


@dataclass
class LatencyConfig:
    """Where and how deployed latency is measured (final table, latency targets, lookup table).

    Attributes:
        runtime: ``"onnxruntime"`` (CPU) or ``"torch"``.
        device: ``"cpu"``, or ``"cuda"`` / ``"cuda:N"`` with the torch runtime.
        threads: intra-op CPU threads of the runtime.
        batch: batch size of a latency target and of its lookup table.
        large_batch: the larger batch of the final table (it also shows batch 1); lower it when memory is
            short.
        runs: timed runs per model and batch size in the final table (after ``warmup``).
        warmup: untimed runs before timing.
        table_runs: timed runs per lookup-table cell.
        tolerance: a latency target is met when the measured speedup is at least ``(1 - tolerance)`` x the
            target (measurement noise; the search aims at the target itself).
        cache_dir: folder of the lookup-table cache (None: ``$AUTOCOMPRESS_CACHE`` or
            ``~/.cache/autocompress``).
    """

    runtime: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    large_batch: int = 64
    runs: int = 30
    warmup: int = 5
    table_runs: int = 15
    tolerance: float = 0.1
    cache_dir: str | None = None

    def validate(self) -> None:
        """Check the values and that the runtime is installed, before any work; SettingError naming the
        setting (``latency.runtime``)."""
        if self.runtime not in RUNTIMES:
            raise SettingError("latency.runtime", f"unknown latency.runtime {show(self.runtime)}",
                               f"use one of {', '.join(RUNTIMES)}")
        if not (self.device == "cpu" or (self.runtime == "torch" and str(self.device).startswith("cuda"))):
            raise SettingError("latency.device", f"latency.device={show(self.device)} is not available with "
                               f"the {self.runtime} runtime", "use cpu (or cuda with latency.runtime torch)")
        checks = [("threads", 1, 1024), ("batch", 1, 65536), ("large_batch", 1, 65536), ("runs", 1, 100_000),
                  ("warmup", 0, 100_000), ("table_runs", 1, 100_000)]
        for name, low, high in checks:
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
                raise SettingError(f"latency.{name}", f"latency.{name}={show(value)} is not valid",
                                   f"use an integer from {low} to {high}")
        if not (isinstance(self.tolerance, (int, float)) and 0 <= self.tolerance < 1):
            raise SettingError("latency.tolerance", f"latency.tolerance={show(self.tolerance)} is not valid",
                               "use a fraction from 0 (inclusive) to 1, e.g. 0.1: the target is met at >= 0.9 x it")
        check_runtime(self.runtime, self.device)

    @property
    def batches(self) -> tuple[int, ...]:
        """Batch sizes of the final table: 1 and ``large_batch``."""
        return tuple(dict.fromkeys((1, self.large_batch)))


def check_runtime(runtime: str, device: str = "cpu") -> None:
    """UserError unless ``runtime`` can run here: onnxruntime importable; CUDA present for a CUDA device."""
    if runtime == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise SettingError("latency.runtime", "latency.runtime onnxruntime is not installed",
                               "install it (pip install onnxruntime) or use latency.runtime torch") from None
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("latency.device", f"latency.device={device} but CUDA is not available",
                           "use latency.device cpu")


# ------------------------------------------------------------------------------------------ measuring
def _inputs(example: Any) -> tuple[torch.Tensor, ...]:
    """``example`` (a tensor ``[B, ...]`` or a tuple of them, one per forward argument) as a tuple of tensors."""
    return example_tuple(example, "deployed latency")


def runner(model: nn.Module, example: Any, runtime: str, *, device: str = "cpu",
           threads: int = 1) -> Callable[[Any], Callable[[], Any]]:
    """Prepare ``model`` for ``runtime`` once; the result binds inputs like ``example`` (a tensor ``[B, ...]`` or
    a tuple of them, one per forward argument, at any batch ``B``) and returns a function running one forward.

    onnxruntime: the model (a copy, on the CPU) is exported once, traced on ``example``, with a dynamic
    batch axis; the bound function runs the session. torch: the model and inputs are moved to ``device``;
    each call runs under no_grad in eval mode and synchronises CUDA (set the thread count around the calls:
    :func:`time_runners` does).

    Raises:
        UserError: the model cannot be exported (onnxruntime), or ``example`` is not tensors of one batch size;
            the bound function's binding, when onnxruntime cannot run the exported model on that input (names the
            batch size).
    """
    example = _inputs(example)
    if runtime == "onnxruntime":
        import onnxruntime as ort

        session = _onnx_session(model, example, threads)
        graph_inputs = {graph_input.name for graph_input in session.get_inputs()}

        def bind_onnx(x: Any) -> Callable[[], Any]:
            xs = _inputs(x)
            feed = {name: t.cpu().contiguous().numpy() for name, t in zip(input_names(len(xs)), xs)
                    if name in graph_inputs}
            quiet = ort.RunOptions()
            quiet.log_severity_level = 4  # its own error line on stderr would come before ours
            try:
                session.run(None, feed, quiet)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types (e.g. a Reshape that fails)
                raise UserError(f"onnxruntime cannot run the exported model at batch {xs[0].shape[0]} "
                                f"({first_line(exc)})", "compute shapes in the forward from the input (x.shape, -1) "
                                "rather than numbers that held at export (len(x) is one)") from None
            return lambda: session.run(None, feed)

        return bind_onnx
    on_device = copy.deepcopy(model).to(device).eval()
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def bind_torch(x: Any) -> Callable[[], Any]:
        xs = tuple(t.to(device) for t in _inputs(x))

        def run() -> None:
            with torch.no_grad():
                on_device(*xs)
            sync()

        return run

    return bind_torch


class _TensorsOut(nn.Module):
    """``model`` returning the tensors of its output as a tuple (:func:`~autocompress.analysis.output_tensors`): a
    forward that returns a dict or a dataclass (Hugging Face's outputs) is timed as the tensors it computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return tuple(output_tensors(self.model(*inputs)))


def _onnx_session(model: nn.Module, example: tuple[torch.Tensor, ...], threads: int,
                  optimized: str | None = None):
    """An onnxruntime CPU session of ``model`` (a copy, exported on the first item of each ``example`` input with a
    dynamic batch axis), every graph optimisation on, ``threads`` intra-op threads; ``optimized``: where
    onnxruntime writes the optimised graph. UserError when the model cannot be exported or onnxruntime cannot load
    it."""
    import onnxruntime as ort

    try:
        data = onnx_bytes(_TensorsOut(copy.deepcopy(model).cpu().eval()),
                          tuple(t.cpu() for t in at_batch(example, 1)), 17)
    except Exception as exc:  # the exporter raises many types for unsupported ops
        raise UserError(f"the model cannot be exported to ONNX for latency ({first_line(exc)})",
                        "use latency.runtime torch") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # writing a graph optimised for this CPU is what is asked here
    if optimized is not None:
        options.optimized_model_filepath = optimized
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types (an op it lacks for a dtype)
        raise UserError(f"onnxruntime cannot load the exported model ({first_line(exc)})",
                        "use latency.runtime torch (a float64 model: onnxruntime's CPU convolutions take float32)"
                        ) from None


#: which convolutions onnxruntime runs outside its blocked channel layout (:func:`blocked_convolutions`), in words
LAYOUT_RULE = ("only 2-D convolutions take it (1-D and 3-D ones never do); of those, input widths of 16 or more "
               "channels that are not a multiple of 4, and grouped convolutions whose channels per group are not a "
               "multiple of the CPU's channel block (16 on AVX-512), run outside it")


def blocked_convolutions(model: nn.Module, example: Any) -> tuple[int, int]:
    """How many of ``model``'s convolutions onnxruntime runs in its blocked channel layout (NCHWc) on this CPU,
    and how many convolutions its optimised graph holds: ``(blocked, convolutions)``. It moves a convolution
    there only where its input channels are a multiple of 4 or fewer than its channel block (16 on AVX-512),
    and, for a grouped convolution other than depthwise, where its input and output channels per group are
    multiples of the block (measured: 16 per group ran blocked, 8, 12 and 24 did not); the others run the
    plain kernels, with a layout conversion on each side, which made filter-pruned models at any width up to 2.6x
    slower than their base at batch 1 (BENCHMARKS.md, "Session 33"; :data:`autocompress.alignment.LAYOUT_MULTIPLE`;
    grouped: "Session 44"). Only onnxruntime's CPU provider on x86.

    Raises:
        UserError: the model cannot be exported, or ``example`` is not tensors of one batch size.
    """
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/optimized.onnx"
        _onnx_session(model, _inputs(example), 1, path)
        nodes = [node for node in onnx.load(path).graph.node if "Conv" in node.op_type]
    return sum(node.domain == "com.microsoft.nchwc" for node in nodes), len(nodes)


@dataclass
class Timing:
    """Median and spread of one model's runs at one batch size (milliseconds)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


def _timing(times: list[float]) -> Timing:
    ordered = sorted(times)
    return Timing(statistics.median(ordered), float(np.percentile(ordered, 10)),
                  float(np.percentile(ordered, 90)), len(ordered))


class _Threads:
    """``torch.set_num_threads(n)`` for the torch CPU runtime within a ``with`` block (restored after)."""

    def __init__(self, threads: int):
        self.threads, self.previous = threads, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)


#: timed calls of one model in a row when several are timed together (:func:`time_runners`)
RUN_BLOCK = 10


def time_runners(runs_of: Mapping[str, Callable[[], Any]], *, runs: int, warmup: int, threads: int,
                 block: int = RUN_BLOCK) -> dict[str, Timing]:
    """Time the runners interleaved in blocks: ``warmup`` untimed calls each, then rounds in which each runner in
    turn makes one untimed call and ``block`` timed ones in a row (the order reversed every other round), until each
    has ``runs`` timed calls. Returns name -> :class:`Timing` (milliseconds).

    Blocks, not one call each: a deployed model runs alone with its weights warm in the caches. Alternating every
    call evicted the other model's weights: a torchvision resnet18 at 32x32, every group at rate 0.5, measured
    3.7-4.1x faster than its base at batch 1 that way, 8.1-9.0x in blocks and 8.2-9.0x timed alone (onnxruntime,
    1 thread; batch 64 and a CIFAR resnet20 the same all three ways; BENCHMARKS.md, "Session 45"). The rounds
    still share a load change on a busy machine between the models."""
    names = list(runs_of)
    times: dict[str, list[float]] = {name: [] for name in names}
    with _Threads(threads):
        for name in names:
            for _ in range(warmup):
                runs_of[name]()
        for index in range(math.ceil(runs / block)):
            for name in names if index % 2 == 0 else names[::-1]:
                runs_of[name]()
                for _ in range(min(block, runs - len(times[name]))):
                    start = time.perf_counter()
                    runs_of[name]()
                    times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: _timing(values) for name, values in times.items()}


def measure_models(models: Mapping[str, nn.Module], example: Any, config: LatencyConfig,
                   batches: Sequence[int] | None = None, runs: int | None = None) -> dict[int, dict[str, Timing]]:
    """Deployed latency of several models (e.g. ``{"base": m0, "compressed": m1}``), interleaved.

    Args:
        example: one forward's input ``[B, ...]`` (a tuple of them for several forward arguments); its first item
            is repeated to each batch size.
        config: runtime, device, threads, warm-up and runs (:class:`LatencyConfig`).
        batches: batch sizes (default ``config.batches``: 1 and ``large_batch``); runs: default ``config.runs``.
    Returns:
        batch -> model name -> :class:`Timing` (milliseconds).
    Raises:
        UserError: inputs that are not tensors of one batch size, or a model the runtime cannot take.
    """
    inputs = _inputs(example)
    with _Threads(config.threads):
        bound = {name: runner(m, inputs, config.runtime, device=config.device, threads=config.threads)
                 for name, m in models.items()}
    out = {}
    for batch in batches or config.batches:
        xb = at_batch(inputs, batch)
        out[batch] = time_runners({name: bind(xb) for name, bind in bound.items()}, runs=runs or config.runs,
                                  warmup=config.warmup, threads=config.threads)
    return out


def deployed_summary(timings: dict[int, dict[str, Timing]], config: LatencyConfig) -> dict:
    """Plain data for the final record: per batch the base and compressed medians (ms), their spread (10th
    and 90th percentiles of the runs, ms) and the speedup, the settings, and ``slower``: the batch sizes at
    which the compressed model takes more than :data:`SLOWER` times the base's time. Timings of a ``"uniform"``
    model as well (a flops target's reference, :func:`autocompress.deployment.uniform_reference`) add its median
    (``uniform_ms``) to each batch's row."""
    rows = {str(b): {"base_ms": t["base"].median_ms, "compressed_ms": t["compressed"].median_ms,
                     "speedup": t["base"].median_ms / max(t["compressed"].median_ms, 1e-9),
                     "base_p10_p90_ms": [t["base"].p10_ms, t["base"].p90_ms],
                     "compressed_p10_p90_ms": [t["compressed"].p10_ms, t["compressed"].p90_ms],
                     **({"uniform_ms": t["uniform"].median_ms} if "uniform" in t else {})}
            for b, t in timings.items()}
    return {"runtime": config.runtime, "device": config.device, "threads": config.threads,
            "runs": config.runs, "warmup": config.warmup, "batches": rows,
            "slower": [int(b) for b, t in timings.items()
                       if t["compressed"].median_ms > SLOWER * t["base"].median_ms]}


def noisy_spreads(spreads: Mapping[Any, Mapping[str, Sequence[float]]]) -> list[str]:
    """The timings of ``spreads`` (batch -> model name -> its runs' 10th and 90th percentile, ms) whose 90th
    percentile passes :data:`NOISY` times their 10th, as ``"batch B: name p10-p90 ms"``."""
    return [f"batch {batch}: {name} {low:.3g}-{high:.3g} ms" for batch, models in spreads.items()
            for name, (low, high) in models.items() if high > NOISY * low]


def noisy_timing_warning(summary: dict | None) -> str | None:
    """The warning when a :func:`deployed_summary`'s timings spread so widely (a 90th percentile over
    :data:`NOISY` times the 10th, for the base or the compressed model at some batch) that its speedups are
    uncertain: two fresh users read 1.79x and 3.57x from a loaded machine where their own interleaved timing gave
    1.37x (base spreads 0.42-4.3 ms and 0.27-0.80 ms); None otherwise."""
    rows = (summary or {}).get("batches", {})
    noisy = noisy_spreads({batch: {name: row[f"{name}_p10_p90_ms"] for name in ("base", "compressed")}
                           for batch, row in rows.items()})
    if not noisy:
        return None
    return (f"the deployed timings were noisy (10th-90th percentile: {'; '.join(noisy)}), so the speedups in the "
            "table are uncertain: time the models again on an idle machine (autocompress inspect, or more "
            "latency.runs) before relying on them")


#: a timing whose 90th percentile passes this many times its 10th makes :func:`noisy_timing_warning` warn (on a
#: quiet machine the spread was 1.02-1.1x, under another job's load 1.4-1.5x)
NOISY = 2.0
#: a compressed model taking more than this times its base's time counts as slower (5 %: timing noise below; a
#: fresh user was warned of "113 ms vs 113 ms")
SLOWER = 1.05
#: a compressed model under this speedup over its base, at :data:`FEWER_MACS` times fewer MACs or more, is warned
#: about (:func:`speed_warning`): the MACs it lost did not turn into speed where it is deployed
LITTLE_SPEEDUP = 1.1
FEWER_MACS = 1.5


def speed_warning(summary: dict, *, macs_factor: float | None = None, aligned: bool = False,
                  layout: Mapping[str, Sequence[int]] | None = None) -> str | None:
    """The loud warning when the compressed model is slower than the base in the deployment runtime (``slower``
    of :func:`deployed_summary`), or (given ``macs_factor``, the base's MACs over the deployed model's) when it
    runs under :data:`LITTLE_SPEEDUP` times as fast at :data:`FEWER_MACS` times fewer MACs or more; None when
    neither. The fix it gives is a latency target, and also ``channel_multiple`` unless the widths were
    ``aligned`` already. ``layout``: :func:`blocked_convolutions` of the ``"base"`` and the ``"compressed"`` model
    (onnxruntime); the warning names it where the compressed model runs more convolutions outside the blocked
    layout."""
    rows = summary["batches"]
    if summary["slower"]:
        batches, head = summary["slower"], "the compressed model is SLOWER than the base"
    else:
        batches = [int(b) for b, row in rows.items() if row["speedup"] < LITTLE_SPEEDUP]
        if not batches or macs_factor is None or macs_factor < FEWER_MACS:
            return None
        head = (f"the compressed model is not much faster than the base (under {LITTLE_SPEEDUP:g}x) at "
                f"{macs_factor:.3g}x fewer MACs (MACs count operations, not time)")
    parts = [f"batch {b}: {rows[str(b)]['compressed_ms']:.3g} ms vs {rows[str(b)]['base_ms']:.3g} ms"
             + ("" if summary["slower"] else f" ({rows[str(b)]['speedup']:.2f}x)") for b in batches]
    fix = "use a latency target (target latency=2x), which times candidates in the runtime" + (
        "" if aligned else ", and/or channel_multiple (e.g. auto)")
    why = ""
    if layout and layout["compressed"][1] - layout["compressed"][0] > layout["base"][1] - layout["base"][0]:
        why = (f" (it runs {layout['compressed'][0]} of its {layout['compressed'][1]} convolutions in onnxruntime's "
               f"blocked channel layout, the base {layout['base'][0]} of {layout['base'][1]}: {LAYOUT_RULE})")
    return f"{head} in {summary['runtime']} ({summary['threads']} thread(s)): {'; '.join(parts)}{why}; {fix}"


def unpriced_warning(model: nn.Module, example: Any) -> str | None:
    """The warning, before a latency target's search, when recurrent layers (``nn.RNNBase``: LSTM, GRU, RNN), which
    the lookup table does not time (it times Conv and Linear layers, :class:`LayerSpec`), hold
    :data:`UNPRICED_SHARE` or more of the model's MACs: the search cannot see their time, so it prunes around them
    and its estimates miss (a fresh user's stacked-LSTM model: 0.039 ms estimated, 0.119 ms measured). None
    otherwise."""
    modules = dict(model.named_modules())
    rows = layer_table(model, example)
    total = sum(r.macs for r in rows)
    unpriced = {r.name: r.macs for r in rows if isinstance(modules.get(r.name), nn.RNNBase) and r.macs}
    if not total or sum(unpriced.values()) < UNPRICED_SHARE * total:
        return None
    return (f"the latency lookup table times Conv and Linear layers, not recurrent ones: "
            f"{', '.join(unpriced)} hold{'s' if len(unpriced) == 1 else ''} {sum(unpriced.values()) / total:.0%} "
            "of the MACs, whose time the search "
            "cannot see (it prunes around them and its estimates miss); give a params or flops target, which prunes "
            "their hidden units")


#: recurrent layers holding this share of the MACs or more make a latency target warn (:func:`unpriced_warning`)
UNPRICED_SHARE = 0.3


def uniform_warning(summary: dict, fix: str) -> str | None:
    """The warning when the compressed model of a :func:`deployed_summary` with ``uniform_ms`` rows runs over
    :data:`UNIFORM_SLOWER` times the time of the uniform-rate model at the same MACs at some batch size: its
    widths save MACs the runtime does not turn into time. ``fix``: what to change, as the caller can name it.
    None when it is as fast (or no row has a uniform timing)."""
    rows = {b: row for b, row in summary["batches"].items() if "uniform_ms" in row}
    slow = [f"batch {b}: {row['compressed_ms']:.3g} ms vs {row['uniform_ms']:.3g} ms "
            f"({row['compressed_ms'] / row['uniform_ms']:.2f}x)" for b, row in rows.items()
            if row["compressed_ms"] > UNIFORM_SLOWER * row["uniform_ms"]]
    if not slow:
        return None
    return (f"the compressed model runs slower than one pruned at a uniform rate to the same MACs (untrained, "
            f"timed beside it) in {summary['runtime']} ({summary['threads']} thread(s)): {'; '.join(slow)}; its "
            f"widths save MACs that do not turn into time there (e.g. a narrow layer feeding a wide one, whose "
            f"activations still pass through memory): {fix}")


#: a flops target's compressed model over this many times the time of the uniform-rate reference at the same MACs
#: is warned about (:func:`uniform_warning`; a fresh user's PointNet ran 1.26x at batch 64, 1.2x at batch 1)
UNIFORM_SLOWER = 1.15


# ------------------------------------------------------------------------------------------ lookup table
@dataclass(frozen=True)
class LayerSpec:
    """One timed layer of the base model: a Conv1d/2d/3d or Linear at its full width.

    Attributes:
        name: module name; kind: ``"conv"`` or ``"linear"``; in_channels / out_channels: full widths;
        kernel, stride, padding, dilation: conv settings (empty for Linear); groups: conv groups
        (``depthwise``: groups == in == out, pruned together); bias; spatial: per-sample input size after
        the channel dimension (Linear: the leading dims between batch and features); calls: forward calls.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    depthwise: bool
    bias: bool
    spatial: tuple[int, ...]
    calls: int

    def signature(self) -> str:
        """The layer's shape without its name, widths and call count: layers sharing it share cells."""
        return json.dumps([self.kind, self.kernel, self.stride, self.padding, self.dilation,
                           self.groups if not self.depthwise else "dw", self.bias, self.spatial])

    def build(self, cin: int, cout: int) -> nn.Module:
        """A fresh layer of this shape at widths ``cin`` -> ``cout`` (depthwise: ``cout``), with a ReLU."""
        if self.kind == "linear":
            return nn.Sequential(nn.Linear(cin, cout, bias=self.bias), nn.ReLU())
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(self.kernel)]
        groups = cout if self.depthwise else self.groups
        cin = cout if self.depthwise else cin
        return nn.Sequential(conv(cin, cout, self.kernel, self.stride, self.padding, self.dilation, groups,
                                  bias=self.bias), nn.ReLU())

    def input(self, cin: int, batch: int) -> torch.Tensor:
        """A seeded random input of ``cin`` channels at ``batch``."""
        generator = torch.Generator().manual_seed(0)
        shape = (batch, *self.spatial, cin) if self.kind == "linear" else (batch, cin, *self.spatial)
        return torch.randn(shape, generator=generator)


def _tuple(value) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),)


def layer_specs(model: nn.Module, example_inputs: Any) -> dict[str, LayerSpec]:
    """The timed layers of ``model`` (non-transposed Conv1d/2d/3d with zero padding, Linear), from one
    analysis forward on ``example_inputs``; name -> :class:`LayerSpec`. Other layers are part of the fixed
    cost."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    seen: dict[str, list] = {}
    modules = {n: m for n, m in model.named_modules() if (isinstance(m, nn.Linear) or (
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)))}

    def hook(name):
        def fn(_module, args, _output):
            entry = seen.setdefault(name, [args[0].shape, 0])
            entry[1] += 1
        return fn

    hooked_forward(model, inputs, {m: hook(n) for n, m in modules.items()})
    specs = {}
    for name, (shape, calls) in seen.items():
        m = modules[name]
        if isinstance(m, nn.Linear):
            specs[name] = LayerSpec(name, "linear", m.in_features, m.out_features, (), (), (), (), 1, False,
                                    m.bias is not None, tuple(int(s) for s in shape[1:-1]), calls)
        else:
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            specs[name] = LayerSpec(name, "conv", m.in_channels, m.out_channels, _tuple(m.kernel_size),
                                    _tuple(m.stride), _tuple(m.padding), _tuple(m.dilation), m.groups, depthwise,
                                    m.bias is not None, tuple(int(s) for s in shape[2:]), calls)
    return specs


def _grid(size: int, multiple: int, prunable: bool) -> list[int]:
    """The widths a side of a layer is timed at: its allowed widths, at most GRID_POINTS (ends included)."""
    if not prunable:
        return [size]
    widths = allowed_widths(size, multiple)
    if len(widths) <= GRID_POINTS:
        return widths
    picks = np.linspace(0, len(widths) - 1, GRID_POINTS).round().astype(int)
    return sorted({widths[i] for i in picks})


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_key(model: nn.Module, example_inputs: Any, config: LatencyConfig, multiple: int,
              prunable: Mapping[str, tuple[bool, bool]], columns: Sequence[str], layer_norm: str = "padded") -> str:
    """SHA-256 (hex) naming a lookup table: the model's architecture (its module tree and input shape), what
    is prunable, the runtime and its version, device, CPU, threads, batch, channel multiple and LayerNorm form."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    version = torch.__version__
    if config.runtime == "onnxruntime":
        import onnxruntime

        version += f"/ort {onnxruntime.__version__}"
    parts = [TABLE_VERSION, repr(model), [list(t.shape[1:]) for t in inputs], config.runtime, config.device,
             _cpu_name(), torch.backends.cpu.get_cpu_capability(), config.threads, config.batch,
             config.table_runs, multiple, sorted(prunable.items()), sorted(columns), version, layer_norm]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def cache_folder(config: LatencyConfig) -> Path:
    """The lookup-table cache folder: ``config.cache_dir``, else ``$AUTOCOMPRESS_CACHE``, else
    ``~/.cache/autocompress`` (``latency/`` inside the latter two)."""
    if config.cache_dir:
        return Path(config.cache_dir)
    root = os.environ.get("AUTOCOMPRESS_CACHE") or Path.home() / ".cache" / "autocompress"
    return Path(root) / "latency"


@dataclass
class LatencyTable:
    """The lookup table of one model (see the module doc). Build with :func:`build_table`.

    Attributes:
        specs: layer name -> :class:`LayerSpec`.
        grids: layer name -> ``[input widths, output widths]`` timed.
        cells: layer signature -> ``"cin,cout"`` -> milliseconds (overhead removed, monotone).
        column_ratio: layer name -> ``[[kept fraction, time ratio to dense], ...]`` (ascending fractions,
            ending at ``[1, 1]``); column_useless: layers whose column pruning saves nothing here.
        fixed_ms: the cost of what the table does not model (may be negative, see the module doc);
            base_ms: the measured base latency.
        scale: every layer's time is scaled by it (fitted with ``fixed_ms`` through the measured base and
            narrowest models, see the module doc).
        floor_ms: the measured narrowest model (0 when not measured); below it estimates are proportional to
            the layers' sum.
        overhead_ms: the runtime's per-call overhead removed from each cell.
        meta: runtime, device, threads, batch, CPU, key; cached: loaded from the cache.
    """

    specs: dict[str, LayerSpec]
    grids: dict[str, list[list[int]]]
    cells: dict[str, dict[str, float]]
    column_ratio: dict[str, list[list[float]]]
    column_useless: list[str]
    fixed_ms: float
    base_ms: float
    overhead_ms: float
    meta: dict
    scale: float = 1.0
    floor_ms: float = 0.0
    cached: bool = False

    # --- lookups ----------------------------------------------------------------------------------------
    def layer_ms(self, name: str, cin: int, cout: int, fraction: float = 1.0) -> float:
        """Estimated time (ms) of layer ``name`` at ``cin`` -> ``cout`` channels with ``fraction`` of its
        columns kept: bilinear interpolation of its cells, times its column ratio, times its calls."""
        spec = self.specs[name]
        grid_in, grid_out = self.grids[name]
        table = self.cells[spec.signature()]

        def at(i: int, o: int) -> float:
            return table[f"{i},{o}"]

        (i0, i1, wi), (o0, o1, wo) = _bracket(grid_in, cin), _bracket(grid_out, cout)
        value = ((1 - wi) * ((1 - wo) * at(i0, o0) + wo * at(i0, o1))
                 + wi * ((1 - wo) * at(i1, o0) + wo * at(i1, o1)))
        return self.scale * spec.calls * value * self.column_factor(name, fraction)

    def column_factor(self, name: str, fraction: float) -> float:
        """Time ratio of layer ``name`` with ``fraction`` of its columns kept to the dense layer (1 when its
        columns were not timed)."""
        points = self.column_ratio.get(name)
        if not points or fraction >= 1.0:
            return 1.0
        xs, ys = zip(*points)
        return float(np.interp(fraction, xs, ys))

    def estimate_space(self, space, rates: Mapping[str, Mapping[str, float]]) -> float:
        """Estimated latency (ms) of the model of ``space`` pruned at ``rates`` (the engine's rates dict):
        each timed layer at the widths :meth:`PruningSpace.kept_shapes` gives and its kept column fraction,
        plus the fixed cost. Non-increasing in every rate."""
        rates = space.check_rates(rates)
        shapes = space.kept_shapes(rates)
        columns = {c.name: c for c in space.column_layers}
        total = 0.0
        for name, spec in self.specs.items():
            param = space.layer_macs.get(name, (None,))[0]
            if param is None:
                total += self.layer_ms(name, spec.in_channels, spec.out_channels)
                continue
            shape = shapes.get(param, list(space.param_shapes[param]))
            cin, cout = _widths(spec, shape)
            fraction = 1.0
            layer = columns.get(name)
            if layer is not None and rates["column"].get(name, 0.0) > 0:
                cols = math.prod(shape[1:])
                fraction = space.column_keep(layer, cols, rates["column"][name]) / cols
            total += self.layer_ms(name, cin, cout, fraction)
        return self._total(total)

    def estimate_model(self, model: nn.Module) -> float:
        """Estimated latency (ms) of a (compact) model with the base model's layer names: each timed layer
        at its current widths (a column layer at its kept column fraction), plus the fixed cost."""
        total = 0.0
        modules = dict(model.named_modules())
        for name, spec in self.specs.items():
            m = modules.get(name)
            if m is None:
                continue
            if isinstance(m, (ColumnConv2d, ColumnConvNd)):
                full = m.in_channels // m.groups * math.prod(_tuple(m.kernel_size))
                cin, cout, fraction = m.in_channels, m.out_channels, m.num_columns / full
            elif isinstance(m, ColumnLinear):
                cin, cout, fraction = m.in_features, m.out_features, m.num_columns / m.in_features
            else:
                cin, cout = _widths(spec, list(m.weight.shape))
                fraction = 1.0
            total += self.layer_ms(name, cin, cout, fraction)
        return self._total(total)

    def rescale(self, base_ms: float) -> None:
        """Scale every estimate by ``base_ms / self.base_ms`` (a fresh measurement of the base model, e.g. of a
        table loaded from the cache on a machine now more or less loaded than when it was built); the table's
        shape (which widths cost what, relatively) is kept. ``meta["built_base_ms"]`` keeps the original."""
        factor = base_ms / self.base_ms
        self.meta.setdefault("built_base_ms", self.base_ms)
        self.scale, self.fixed_ms, self.floor_ms, self.base_ms = (self.scale * factor, self.fixed_ms * factor,
                                                                  self.floor_ms * factor, base_ms)

    def _total(self, layers_ms: float) -> float:
        """The whole model's estimate (ms) from its layers' scaled sum: ``fixed_ms + layers_ms``, and below the
        measured narrowest model ``floor_ms`` proportional to ``layers_ms`` (continuous at the floor)."""
        linear = self.fixed_ms + layers_ms
        if linear >= self.floor_ms or self.floor_ms <= self.fixed_ms:
            return linear
        return self.floor_ms * layers_ms / (self.floor_ms - self.fixed_ms)

    def summary(self) -> dict:
        """Plain data for the records: size of the table, fixed cost, column findings, cache use."""
        return {"layers": len(self.specs), "cells": sum(len(c) for c in self.cells.values()),
                "fixed_ms": self.fixed_ms, "scale": self.scale, "base_ms": self.base_ms, "floor_ms": self.floor_ms,
                "overhead_ms": self.overhead_ms,
                "column_useless": list(self.column_useless),
                "column_ratio_half": {n: self.column_factor(n, 0.5) for n in self.column_ratio},
                "cached": self.cached, **self.meta}

    # --- storage ----------------------------------------------------------------------------------------
    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k != "cached"}
        return json.dumps({"version": TABLE_VERSION, **data})

    @classmethod
    def from_json(cls, text: str) -> "LatencyTable":
        data = json.loads(text)
        if data.pop("version", None) != TABLE_VERSION:
            raise ValueError("other table version")
        data["specs"] = {n: LayerSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                         for n, s in data["specs"].items()}
        return cls(**data, cached=True)


def _widths(spec: LayerSpec, shape: Sequence[int]) -> tuple[int, int]:
    """(input, output) channels of a layer whose weight has ``shape`` (Linear: [out, in])."""
    cout = int(shape[0])
    cin = cout if spec.depthwise else int(shape[1]) * (1 if spec.kind == "linear" else spec.groups)
    return cin, cout


def _bracket(grid: Sequence[int], width: int) -> tuple[int, int, float]:
    """Neighbouring grid widths around ``width`` and the interpolation weight of the upper one (clamped)."""
    if width <= grid[0]:
        return grid[0], grid[0], 0.0
    if width >= grid[-1]:
        return grid[-1], grid[-1], 0.0
    upper = next(i for i, g in enumerate(grid) if g >= width)
    lo, hi = grid[upper - 1], grid[upper]
    return lo, hi, (width - lo) / (hi - lo)


def _monotone(table: dict[str, float], grid_in: list[int], grid_out: list[int]) -> bool:
    """Make cells non-decreasing in both widths over one layer's grid (running maximum), in place; returns
    whether a cell changed."""
    changed = False
    for i_index, cin in enumerate(grid_in):
        for o_index, cout in enumerate(grid_out):
            best = table[f"{cin},{cout}"]
            if i_index:
                best = max(best, table[f"{grid_in[i_index - 1]},{cout}"])
            if o_index:
                best = max(best, table[f"{cin},{grid_out[o_index - 1]}"])
            changed |= best != table[f"{cin},{cout}"]
            table[f"{cin},{cout}"] = best
    return changed


def _time_one(module: nn.Module, x: torch.Tensor, config: LatencyConfig) -> float:
    with _Threads(config.threads):
        run = runner(module, x, config.runtime, device=config.device, threads=config.threads)(x)
    return time_runners({"m": run}, runs=config.table_runs, warmup=2, threads=config.threads)["m"].median_ms


def _column_layer(spec: LayerSpec, fraction: float) -> nn.Module:
    """The layer at full width with ``fraction`` of its GEMM columns kept (seeded random choice), compacted
    into a column layer as compaction would, followed by a ReLU."""
    dense = spec.build(spec.in_channels, spec.out_channels)[0]
    total = dense.weight[0].numel()
    generator = torch.Generator().manual_seed(0)
    kept = torch.sort(torch.randperm(total, generator=generator)[:max(1, round(fraction * total))]).values
    if isinstance(dense, nn.Linear):
        layer = ColumnLinear.from_linear(dense, kept)
    elif isinstance(dense, nn.Conv2d):
        layer = ColumnConv2d.from_conv(dense, kept)
    else:
        layer = ColumnConvNd.from_conv(dense, kept)
    return nn.Sequential(layer, nn.ReLU())


def build_table(model: nn.Module, example_inputs: Any, space, config: LatencyConfig, *, multiple: int,
                columns: bool, layer_norm: str = "padded", log: Callable[[str], None] = lambda _l: None
                ) -> LatencyTable:
    """The lookup table of ``model`` (the base model) in ``config``'s runtime at ``config.batch``, loaded
    from the cache when it holds one for the same key (:func:`table_key`), else measured and cached.

    Args:
        example_inputs: one forward's input ``[B, ...]`` (a tuple of them for several forward arguments).
        space: the model's :class:`~autocompress.space.PruningSpace` (which sides of which layers prune).
        multiple: the run's channel multiple (the widths timed).
        columns: time column pruning too (the run prunes columns).
        layer_norm: the form the run compacts a LayerNorm that lost channels to (``"kept"`` or ``"padded"``):
            the narrowest model, timed for the table's fixed cost, is compacted so.
    Raises:
        UserError: inputs that are not tensors of one batch size, or a model the runtime cannot take.
    """
    x = at_batch(_inputs(example_inputs), 1)
    specs = layer_specs(model, x)
    prunable = _prunable(space, specs)
    column_names = [c.name for c in space.column_layers if c.name in specs] if columns else []
    key = table_key(model, x, config, multiple, prunable, column_names, layer_norm)
    path = cache_folder(config) / f"table-{key[:24]}.json"
    if path.exists():
        try:
            table = LatencyTable.from_json(path.read_text())
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            table = None  # a damaged or old cache file is measured again and replaced
        if table is not None:
            built = table.base_ms
            now = measure_models({"base": model}, x, config, batches=[config.batch])[config.batch]["base"]
            table.rescale(now.median_ms)
            log(f"latency table: loaded from the cache {path}; the base runs in {now.median_ms:.3g} ms now "
                f"({built:.3g} ms when the table was built): estimates scaled by {now.median_ms / built:.3g}")
            return table
    started = time.perf_counter()
    table = _measure_table(model, x, specs, prunable, column_names, config, multiple, space, layer_norm)
    table.meta.update(key=key, seconds=time.perf_counter() - started)
    try:
        atomic_write_text(path, table.to_json())
    except OSError as exc:
        log(f"latency table: not cached ({exc})")
    log(f"latency table: {len(table.specs)} layers, {sum(len(c) for c in table.cells.values())} cells in "
        f"{time.perf_counter() - started:.1f} s, cached in {path}")
    return table


def _prunable(space, specs: Mapping[str, LayerSpec]) -> dict[str, tuple[bool, bool]]:
    """Layer name -> (input channels prunable, output channels prunable) from the space's filter groups."""
    sides: dict[str, list[bool]] = {name: [False, False] for name in specs}
    for group in space.filter_groups:
        for s in group.slices:
            if s.module in sides and s.role in ("weight", "input"):
                sides[s.module][1 if s.role == "weight" else 0] = True
    for name, spec in specs.items():
        if spec.depthwise and any(sides[name]):
            sides[name] = [True, True]
    return {name: (a, b) for name, (a, b) in sides.items()}


def _measure_table(model, x, specs, prunable, column_names, config: LatencyConfig, multiple: int,
                   space, layer_norm: str) -> LatencyTable:
    batch = config.batch
    overhead = _time_one(nn.ReLU(), torch.zeros(batch, 8), config)
    grids, cells = {}, {}
    for name, spec in specs.items():
        grid_in = [spec.out_channels] if spec.depthwise else _grid(spec.in_channels, multiple, prunable[name][0])
        grid_out = _grid(spec.out_channels, multiple, prunable[name][1])
        if spec.depthwise:
            grid_in = grid_out
        grids[name] = [grid_in, grid_out]
        table = cells.setdefault(spec.signature(), {})
        for cin in grid_in:
            for cout in grid_out:
                if spec.depthwise and cin != cout:
                    continue
                if f"{cin},{cout}" not in table:
                    table[f"{cin},{cout}"] = max(0.0, _time_one(spec.build(cin, cout), spec.input(cin, batch),
                                                                config) - overhead)
    for name, spec in specs.items():  # depthwise layers: fill the off-diagonal cells for bilinear lookups
        if spec.depthwise:
            table = cells[spec.signature()]
            for cin in grids[name][0]:
                for cout in grids[name][1]:
                    table.setdefault(f"{cin},{cout}", table[f"{min(cin, cout)},{min(cin, cout)}"])
    while any([_monotone(cells[spec.signature()], *grids[name]) for name, spec in specs.items()]):
        pass  # layers sharing a signature share cells: repeat until every grid is monotone (values only grow)
    column_ratio, useless = {}, []
    for name in column_names:
        spec = specs[name]
        dense = cells[spec.signature()][f"{grids[name][0][-1]},{grids[name][1][-1]}"] + overhead
        points = [[f, (_time_one(_column_layer(spec, f), spec.input(spec.in_channels, batch), config))
                   / max(dense, 1e-9)] for f in COLUMN_FRACTIONS] + [[1.0, 1.0]]
        for i in range(len(points) - 2, -1, -1):  # fewer columns never cost more than more columns
            points[i][1] = min(points[i][1], points[i + 1][1])
        column_ratio[name] = points
        if float(np.interp(0.5, *zip(*points))) > 1.0 - COLUMN_SAVING:
            useless.append(name)
    smallest = _smallest(model, x, space, multiple, layer_norm)
    models = {"base": model} if smallest is None else {"base": model, "smallest": smallest}
    full = measure_models(models, x, config, batches=[batch], runs=max(config.runs, 3 * config.table_runs))
    base_ms = full[batch]["base"].median_ms
    table = LatencyTable(specs=specs, grids=grids, cells=cells, column_ratio=column_ratio, column_useless=useless,
                         fixed_ms=0.0, base_ms=base_ms, overhead_ms=overhead,
                         meta={"runtime": config.runtime, "device": config.device, "threads": config.threads,
                               "batch": batch, "cpu": _cpu_name(), "multiple": multiple})
    layers_ms = table.estimate_model(model)  # the layers' plain sums: scale 1, no fixed cost yet
    small_layers = table.estimate_model(smallest) if smallest is not None else None
    table.scale, table.fixed_ms = min(1.0, base_ms / max(layers_ms, 1e-9)), max(0.0, base_ms - layers_ms)
    if small_layers is not None:
        small_ms = full[batch]["smallest"].median_ms
        if base_ms > small_ms and layers_ms > small_layers:  # exact at both ends, linear in between
            table.scale = (base_ms - small_ms) / (layers_ms - small_layers)
            table.fixed_ms, table.floor_ms = base_ms - table.scale * layers_ms, small_ms
    return table


def _smallest(model: nn.Module, x: tuple[torch.Tensor, ...], space, multiple: int, layer_norm: str) -> nn.Module | None:
    """``model`` with every filter group projected at the space's largest rate (aligned) and compacted (its
    LayerNorms in the ``layer_norm`` form): the narrowest model the search can reach, timed to fit the table's
    fixed cost (None without filter groups)."""
    from .compaction import compact
    from .projection import project

    if not space.filter_groups:
        return None
    masks = project(space, model, {"filter": {g.name: space.max_rate for g in space.filter_groups}})
    return compact(model, space.param_masks(masks), x, channel_multiple=multiple, layer_norm=layer_norm,
                   check_rebuild=False).model


__all__ = ["COLUMN_FRACTIONS", "FEWER_MACS", "GRID_POINTS", "LAYOUT_RULE", "LITTLE_SPEEDUP", "LatencyConfig",
           "LatencyTable", "LayerSpec", "RUNTIMES", "SLOWER", "Timing", "blocked_convolutions", "build_table",
           "cache_folder", "check_runtime", "deployed_summary", "layer_specs", "measure_models", "noisy_spreads",
           "runner",
           "speed_warning", "table_key", "time_runners",
           "UNIFORM_SLOWER", "UNPRICED_SHARE", "uniform_warning", "unpriced_warning"]
