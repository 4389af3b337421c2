"""The deployed form of a compact model: every column-pruned layer either as stored (its kept GEMM columns
only) or as its exact dense equivalent with the dropped columns as zeros, whichever runs faster where the
model is deployed.

Column pruning (AutoCompress, Liu et al. AAAI 2020, §3) removes GEMM columns, but whether that saves time
depends on the runtime: in onnxruntime a column layer whose input channels are only partly kept runs a
Gather over its input and a conv at an unaligned width, which can cost more than the dense conv it replaces
(BENCHMARKS.md, "Deployed speed"). Both forms compute the same function, so the choice is free of accuracy:

1. each column layer is timed alone on its own input (captured on the example, batch ``config.batch``) as
   stored and as dense (:func:`autocompress.latency.measure_models`, interleaved); dense is chosen when it is
   faster by at least :data:`MARGIN`;
2. the whole model is then timed in three forms, interleaved, at the final table's batch sizes: as stored,
   every column layer dense, and the per-layer choice; the form with the lowest mean time ratio to "as
   stored" wins if that ratio is below ``1 - MARGIN``, else the model stays as stored (layers timed alone do
   not add up to the whole model, so the whole-model check decides). The margin keeps the choice stable
   under timing noise; it is still a measurement, so two calls on a busy machine may differ.

The parameter count of the compact model (what a params target counts) is the stored one; the dense form
holds zeros in place of the dropped columns.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .analysis import analysis_mode, at_batch, example_tuple
from .columns import ColumnConv2d, ColumnConvNd, ColumnLinear
from .compaction import compact
from .config import from_dict
from .errors import UserError
from .latency import LatencyConfig, measure_models
from .metrics import count_macs
from .projection import project
from .sampling import ActionSampler

COLUMN_LAYERS = (ColumnConv2d, ColumnConvNd, ColumnLinear)
#: the whole-model forms compared in step 2
FORMS = ("stored", "dense", "per_layer")
#: a dense layer or another whole-model form must be this much faster than "as stored" to be chosen, so that
#: timing noise on a busy machine does not flip the choice from run to run
MARGIN = 0.05


@dataclass
class DeployedForm:
    """Result of :func:`deployed_form`.

    Attributes:
        model: the deployed form (``model`` itself when no column layer is turned dense, else a copy).
        dense_layers: qualified names of the column layers replaced by their dense equivalent.
        column_layers: qualified names of every column layer of the compact model.
        form: which whole-model form won: ``"stored"``, ``"dense"`` or ``"per_layer"`` (``"stored"`` when the
            model has no column layer).
        ratios: the winning step's mean time ratio to "as stored" of each form (empty without column layers).
        held: the column layers that ran faster dense alone but stay stored, as dense they would execute more
            MACs than ``max_macs`` allows (a flops target's limit).
    """

    model: nn.Module
    dense_layers: list[str] = field(default_factory=list)
    column_layers: list[str] = field(default_factory=list)
    form: str = "stored"
    ratios: dict[str, float] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Plain data for the final record and the export report."""
        return {"form": self.form, "column_layers": len(self.column_layers), "dense_layers": list(self.dense_layers),
                "ratios": dict(self.ratios), "held_by_macs": list(self.held)}


def column_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the column-pruned layers of ``model`` (ColumnConv2d, ColumnConvNd, ColumnLinear)."""
    return [name for name, module in model.named_modules() if isinstance(module, COLUMN_LAYERS)]


def with_dense_layers(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` whose column layers ``names`` are replaced by their dense equivalents
    (``to_dense()``: the same function, dropped columns as zeros); ``model`` itself when ``names`` is empty.

    Raises:
        UserError: a name that is not a column layer of ``model`` (``model`` is unchanged).
    """
    if not names:
        return model
    known = set(column_layer_names(model))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(f"{unknown[0]!r} is not a column-pruned layer of this model",
                        f"name one of {sorted(known)[:5]}")
    result = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = result.get_submodule(parent_name)
        setattr(parent, child, parent.get_submodule(child).to_dense())
    return result


def _layer_inputs(model: nn.Module, example: tuple[torch.Tensor, ...], names: Sequence[str]
                  ) -> dict[str, torch.Tensor]:
    """Each named layer's input for ``example`` (the forward's arguments; eval mode, no_grad; the model's mode
    restored)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda _module, args, name=name: inputs.setdefault(name, args[0].detach())) for name in names]
    try:
        with analysis_mode(model):
            model(*example)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def _faster_dense(layer: nn.Module, x: torch.Tensor, config: LatencyConfig) -> bool:
    """Whether ``layer``'s dense equivalent runs faster than the stored column layer on ``x``."""
    timing = measure_models({"stored": layer, "dense": layer.to_dense()}, x, config, batches=[config.batch],
                            runs=config.table_runs)[config.batch]
    return timing["dense"].median_ms < (1 - MARGIN) * timing["stored"].median_ms


def latency_config(config: LatencyConfig | Mapping[str, Any] | None) -> LatencyConfig:
    """``config`` as a validated :class:`LatencyConfig` (None: the defaults; a mapping: its fields, read like a
    compress config's ``latency`` section by :func:`autocompress.config.from_dict`). Raises SettingError naming
    ``latency.<field>``."""
    if not isinstance(config, LatencyConfig):
        config = LatencyConfig() if config is None else from_dict(LatencyConfig, config, prefix="latency.")
    config.validate()
    return config


def _within(model: nn.Module, x: tuple[torch.Tensor, ...], names: Sequence[str], max_macs: float) -> list[str]:
    """The column layers of ``names`` that can run dense with ``model`` still executing at most ``max_macs``
    MACs on ``x``: the ones adding the fewest MACs first (each layer's addition is independent of the others)."""
    stored = count_macs(model, x)
    added = {name: count_macs(with_dense_layers(model, [name]), x) - stored for name in names}
    kept, total = set(), stored
    for name in sorted(names, key=lambda name: added[name]):
        if total + added[name] <= max_macs:
            kept.add(name)
            total += added[name]
    return [name for name in names if name in kept]


def deployed_form(model: nn.Module, example: Any, config: LatencyConfig | Mapping[str, Any] | None = None,
                  batches: Sequence[int] | None = None, max_macs: float | None = None) -> DeployedForm:
    """The faster of the stored and dense forms of each column layer in the deployment runtime.

    Args:
        model: a compact model (any nn.Module; one without column layers is returned as it is, untimed).
        example: one input ``[B, ...]`` of the model (a tuple of them for several forward arguments); the first
            item of each is used.
        config: runtime, threads, batch sizes and runs (:class:`autocompress.latency.LatencyConfig` or a
            mapping of its fields; default: onnxruntime, 1 thread). Validated.
        batches: the batch sizes whose mean time ratio decides (default ``config.batches``: 1 and the large
            batch; a latency target's calibration passes its own batch only).
        max_macs: MACs per input item the deployed form may execute at most (a flops target's limit: a dense
            layer multiplies its dropped columns as zeros); layers are run dense only within it, those adding
            the fewest MACs first, and the all-dense form only when it fits. None: no limit.

    Returns:
        :class:`DeployedForm`; its ``model`` computes what ``model`` computes (up to float rounding).

    Raises:
        SettingError: an unknown or invalid setting, an unavailable runtime (``latency.runtime``).
        UserError: ``example`` is not tensors of one batch size, or the runtime cannot take the model (an op it
            cannot export).
    """
    config = latency_config(config)
    names = column_layer_names(model)
    if not names:
        return DeployedForm(model)
    x = at_batch(example_tuple(example, "deployed_form"), 1)
    inputs = _layer_inputs(model, x, names)
    chosen = [name for name in names if name in inputs
              and _faster_dense(model.get_submodule(name), inputs[name], config)]
    forms = {"stored": model, "dense": with_dense_layers(model, names)}
    faster = chosen
    if max_macs is not None:
        chosen = _within(model, x, chosen, max_macs)
        if count_macs(forms["dense"], x) > max_macs:
            del forms["dense"]
    if 0 < len(chosen) < len(names):
        forms["per_layer"] = with_dense_layers(model, chosen)
    timings = measure_models(forms, x, config, batches=batches)
    ratios = {form: sum(t[form].median_ms / t["stored"].median_ms for t in timings.values()) / len(timings)
              for form in forms}
    best = min(forms, key=lambda form: (ratios[form], FORMS.index(form)))
    best = best if ratios[best] < 1 - MARGIN else "stored"
    dense = {"stored": [], "dense": names, "per_layer": chosen}[best]
    return DeployedForm(forms[best], list(dense), names, best, ratios, [n for n in faster if n not in chosen])


def uniform_reference(space, model: nn.Module, example: Any, target: float, *, r_max: float, block: int = 1
                      ) -> nn.Module | None:
    """The speed reference of a flops target: ``model`` with every filter group of ``space`` (a
    :class:`~autocompress.space.PruningSpace` of ``model``) pruned at one rate, fitted to ``target`` times fewer
    MACs at the space's channel multiple (as a uniform-rate baseline, e.g. Torch-Pruning's, prunes; its weights
    are the magnitude projection of ``model``'s, untrained: it is timed, never scored). Widths that save MACs
    but not time (a narrow layer feeding a wide one: memory traffic the MACs do not count) run slower than it at
    the same MACs (a fresh user's PointNet at ``flops=4x``: 1.26x in onnxruntime at batch 64).

    Returns:
        the compact reference model, or None when filter pruning alone cannot reach ``target`` at ``r_max``.
    """
    try:
        sampler = ActionSampler.from_space(space, "flops", target, kinds=("filter",), r_max=r_max, block=block)
    except UserError:
        return None
    masks = project(space, model, sampler.to_rates(sampler.initial_action(spread=0.0)))
    return compact(model, space.param_masks(masks), example, channel_multiple=space.channel_multiple,
                   check_rebuild=False).model


__all__ = ["COLUMN_LAYERS", "DeployedForm", "column_layer_names", "deployed_form", "uniform_reference",
           "with_dense_layers"]
