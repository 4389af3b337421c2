"""The pruning engine's public API: ``prune(model, rates, ...)`` -> compact model + report.

Actual pruning of AutoCompress (Liu et al., AAAI 2020, §3; brief §1 step 4, §2-§4), in order:

1. build the :class:`autocompress.space.PruningSpace` (filter groups, column layers, irregular weights);
2. ADMM structured pruning towards the rates (:func:`autocompress.admm.admm_prune`);
3. hard pruning ``W = Proj_S(W)`` (:func:`autocompress.admm.hard_prune`);
4. purification: unused path removal and redundant weight removal (:func:`autocompress.purification.purify`);
5. masked retraining (:func:`autocompress.admm.masked_retrain`);
6. physical compaction (:func:`autocompress.compaction.compact`), checked against the masked model.

Rates are ``{"filter": {group: r}, "column": {layer: r}, "irregular": {layer: r}}`` (fractions removed in
``[0, 1)``; see docs/ARCHITECTURE.md). :func:`expand_rates` turns the user's ``RATES.yaml`` form (with a
``default`` rate) into that.

Purification needs filter groups to remove unused channels, so the space always includes filter groups when
``purify=True``, even when filters are not among the pruned ``dims`` (their rate is then 0: only channels
that purification finds unused or redundant are removed).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .admm import ADMMConfig, admm_prune, hard_prune, masked_retrain
from .compaction import compact
from .errors import UserError
from .masks import Masks
from .metrics import count_macs, count_nonzero_params, count_params
from .purification import DEFAULT_THRESHOLDS, purify as purify_masks
from .space import KINDS, PruningSpace, check_rate
from .text import plural
from .training import TrainConfig, evaluate, seeded

#: user-facing dimension names -> unit kinds (``--dims``)
DIMS = {"filter,column": ("filter", "column"), "filter": ("filter",), "column": ("column",),
        "irregular": ("irregular",), "filter,column,irregular": ("filter", "column", "irregular")}


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        compact_model: the physically pruned model (eval mode); computes what the masked model computes.
        masked_model: the same network before compaction (dense, pruned entries zero).
        masks: the final unit keep masks (after purification).
        param_masks: their per-parameter expansion, for the *uncompacted* model.
        architecture: ``serialization.describe_architecture`` of the compact model (for ``save_compact``).
        report: plain data, see :func:`prune`.
    """

    compact_model: nn.Module
    masked_model: nn.Module
    masks: Masks
    param_masks: dict[str, torch.Tensor]
    architecture: dict
    report: dict = field(default_factory=dict)


def expand_rates(space: PruningSpace, spec: Mapping, dims: Sequence[str]) -> dict[str, dict[str, float]]:
    """Rates dict from the ``RATES.yaml`` form.

    ``spec`` may hold ``filter: {group: rate}``, ``column: {layer: rate}``, ``irregular: {layer: rate}`` and
    ``default: rate`` (every unit of every kind in ``dims`` not named explicitly).

    Raises:
        UserError: not a mapping, an unknown key, a kind outside ``dims``, an unknown unit name (the message
            lists the valid names) or a rate outside ``[0, 1)`` (a bad ``default`` is named as such).
    """
    if not isinstance(spec, Mapping):
        raise UserError("the rates must be a mapping with keys filter / column / irregular / default",
                        "write e.g. `default: 0.5` or `filter: {conv1: 0.5}`")
    unknown = [k for k in spec if k not in (*KINDS, "default")]
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in the rates", "use filter, column, irregular or default")
    rates: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        given = spec.get(kind) or {}
        if not isinstance(given, Mapping):
            raise UserError(f"rates[{kind!r}] must map unit names to rates", f"write `{kind}: {{name: 0.5}}`")
        if given and kind not in dims:
            raise UserError(f"rates for {kind} units given, but --dims is {','.join(dims)}",
                            f"add {kind} to --dims or remove the {kind} rates")
        rates[kind] = dict(given)
    if "default" in spec:
        default = check_rate(spec["default"], "the default rate")
        for kind in dims:
            for unit in space.units(kind):
                rates[kind].setdefault(unit.name, default)
    return space.check_rates(rates)


def _kept_units(masks: Masks) -> dict[str, dict[str, list[int]]]:
    return {"filters": {k: [int(v.sum()), v.numel()] for k, v in masks.filters.items()},
            "columns": {k: [int(v.sum()), v.numel()] for k, v in masks.columns.items()},
            "weights": {k: [int(v.sum()), v.numel()] for k, v in masks.weights.items()}}


def prune(model: nn.Module, rates: Mapping, *, example_inputs: torch.Tensor, splits,
          dims: Sequence[str] = ("filter", "column"), admm: ADMMConfig | None = None,
          retrain: TrainConfig | None = None, purify: bool = True, purify_tolerance: float = 0.005,
          purify_thresholds: Sequence[float] = DEFAULT_THRESHOLDS, batch_size: int = 128, seed: int = 0,
          ignored_layers: Sequence[str] = (), progress: bool = True,
          log: Callable[[str], None] | None = None) -> PruneResult:
    """Prune ``model`` at ``rates`` and compact it (AutoCompress, Liu et al. AAAI 2020, §3; brief §2-§4).

    Args:
        model: a trained network (not modified: a copy is pruned).
        rates: ``{"filter": {group: r}, "column": {layer: r}, "irregular": {layer: r}}`` (see
            :func:`expand_rates` for the ``default`` form); names as in ``PruningSpace``.
        example_inputs: one batch the model accepts, e.g. ``torch.zeros(1, 3, 32, 32)``; MACs are counted
            per forward of it (use batch 1 for MACs per image).
        splits: a :class:`autocompress.data.DataSplits`; ADMM and retraining use ``train``, top-1 and
            purification use ``val`` (skipped when it is empty).
        dims: unit kinds pruned, a subset of ``("filter", "column", "irregular")``.
        admm: ADMM settings (default :class:`ADMMConfig`); ``epochs=0`` is one-shot projection.
        retrain: masked retraining settings (default ``TrainConfig(epochs=10, lr=0.01)``); ``epochs=0``
            skips it.
        purify: run purification (unused path removal + redundant weight removal).
        purify_tolerance, purify_thresholds: see :func:`autocompress.purification.purify`.
        batch_size: training batch size; seed: data order / augmentation / dropout seed.
        ignored_layers: module names never pruned.
        progress: tqdm bars; log: called with one line per step.

    Returns:
        :class:`PruneResult`. ``report`` holds ``params_before`` / ``params_after`` (parameters of the
        original and of the compact model, :func:`autocompress.metrics.count_params`; with ``irregular``
        in ``dims`` the compact model's non-zero parameters,
        :func:`~autocompress.metrics.count_nonzero_params`), ``macs_before`` /
        ``macs_after`` (MACs per forward of ``example_inputs``, :func:`autocompress.metrics.count_macs`;
        FLOPs = 2 x MACs), ``compression_rate`` (params before / after, "x"), ``mac_reduction`` (before /
        after), ``top1`` (validation top-1 fractions: ``before``, ``hard_pruned``, ``purified``, ``after``
        measured on the compact model), ``rates`` (as validated), ``clipped`` (rates that would have removed
        every unit of a layer), ``kept`` (per unit: ``[kept, total]``), ``excluded`` (module -> reason),
        ``admm`` (final residuals), ``purification`` and ``compaction`` summaries.

    Raises:
        UserError: bad rates / dims / names, a model the space or compaction cannot handle.
        RuntimeError: the compact model differs from the masked one (a bug; names the layer).
    """
    dims = tuple(dims)
    if not dims or any(d not in KINDS for d in dims):
        raise UserError(f"unknown pruning dimensions {list(dims)}", f"choose from {', '.join(KINDS)}")
    admm = admm if admm is not None else ADMMConfig()
    retrain = retrain if retrain is not None else TrainConfig(epochs=10, lr=0.01)
    say = log if log is not None else (lambda _line: None)
    device = next(model.parameters()).device
    example_inputs = example_inputs.to(device)
    model = copy.deepcopy(model)
    space_dims = tuple(dict.fromkeys((("filter",) if purify else ()) + dims))
    space = PruningSpace.build(model, example_inputs, dims=space_dims, ignored_layers=ignored_layers)
    rates = expand_rates(space, rates, dims)
    has_val = len(splits.val) > 0
    generator = torch.Generator().manual_seed(seed)
    train_loader = splits.loader("train", batch_size, generator=generator)
    val_loader = splits.loader("val", max(256, batch_size)) if has_val else None

    def top1() -> float | None:
        return evaluate(model, val_loader)["top1"] if has_val else None

    report: dict = {"dims": list(dims), "rates": rates, "excluded": dict(space.excluded),
                    "params_before": count_params(model), "macs_before": count_macs(model, example_inputs),
                    "top1": {"before": top1()}}
    with seeded(seed):
        if admm.epochs > 0:
            say(f"ADMM: {plural(admm.epochs, 'epoch')}")
            result = admm_prune(model, space, rates, train_loader, admm, progress=progress, log=log)
            report["admm"] = {"updates": len(result.history) - 1,
                              "max_residual": result.history[-1]["max_residual"],
                              "residuals": result.history[-1]["residuals"]}
        masks, param_masks = hard_prune(model, space, rates)
        report["clipped"] = [c._asdict() for c in masks.clipped]
        report["top1"]["hard_pruned"] = hard = top1()
        say(f"hard pruning: val top-1 {'n/a' if hard is None else f'{100 * hard:.2f}%'}")
        if purify:
            purified = purify_masks(model, space, masks, example_inputs=example_inputs,
                                    val_loader=val_loader, tolerance=purify_tolerance,
                                    thresholds=purify_thresholds, log=log)
            masks, param_masks = purified.masks, purified.param_masks
            report["purification"] = {"removed_filters": purified.removed_filters,
                                      "removed_columns": purified.removed_columns,
                                      "threshold": purified.threshold, "folded": purified.folded,
                                      "trials": purified.trials}
            report["top1"]["purified"] = top1()
        if retrain.epochs > 0:
            say(f"masked retraining: {plural(retrain.epochs, 'epoch')}")
            report["retrain"] = masked_retrain(model, param_masks, train_loader, retrain, val_loader=val_loader,
                                               progress=progress, log=log)
    compacted = compact(model, param_masks, example_inputs)
    compact_model = compacted.model
    count = count_nonzero_params if "irregular" in dims else count_params  # irregular zeros are stored sparsely
    params_after, macs_after = count(compact_model), count_macs(compact_model, example_inputs)
    if has_val:
        report["top1"]["after"] = evaluate(compact_model, val_loader)["top1"]
    report.update({"params_after": params_after, "macs_after": macs_after,
                   "compression_rate": report["params_before"] / params_after,
                   "mac_reduction": report["macs_before"] / max(macs_after, 1),
                   "kept": _kept_units(masks), "compaction": compacted.report})
    say(f"compact model: {params_after} parameters ({report['compression_rate']:.2f}x fewer), "
        f"{macs_after} MACs ({report['mac_reduction']:.2f}x fewer)")
    return PruneResult(compact_model=compact_model, masked_model=model, masks=masks, param_masks=param_masks,
                       architecture=compacted.architecture, report=report)
