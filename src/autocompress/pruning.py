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
import dataclasses
import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .admm import ADMMConfig
from .analysis import prunable_model
from .compaction import check_compactable, densify
from .config import CompressConfig, PurificationConfig, RetrainConfig, check_choice, from_dict
from .errors import SettingError, UserError, show
from .masks import Masks
from .projection import project
from .padded_norm import LAYER_NORM_FORMS
from .purification import DEFAULT_THRESHOLDS, check_purification
from .rounds import Pipeline, RoundState, TrainFn
from .space import KINDS, PruningSpace, check_rate, ignored_modules
from .task import ForwardFn, LossFn, ScoreFn, Task, as_inputs, check_functions, resolve_device
from .training import TrainConfig


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        compact_model: the physically pruned model (eval mode, on the device), also as :attr:`model`; computes
            what the masked model computes: the input model with ``space.param_masks(masks)`` applied
            (:meth:`autocompress.space.PruningSpace.param_masks`, :func:`autocompress.masks.apply_masks`).
        masks: the final unit keep masks (after purification).
        report: plain data, see :func:`prune`.
    """

    compact_model: nn.Module
    masks: Masks = field(repr=False)
    report: dict = field(default_factory=dict, repr=False)

    @property
    def model(self) -> nn.Module:
        """:attr:`compact_model` (the name :class:`autocompress.CompressResult` gives it)."""
        return self.compact_model


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
            raise UserError(f"rates for {kind} units given, but dims is {','.join(dims)}",
                            f"add {kind} to dims or remove the {kind} rates")
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


#: the settings of a :class:`~autocompress.config.CompressConfig` that :func:`prune` reads from its ``config``
ROUND_SETTINGS = ("dims", "seed", "ignored_layers", "layer_norm", "admm", "retrain", "purification")


def round_settings(config: CompressConfig | Mapping, keywords: Sequence[str] = ()) -> CompressConfig:
    """``config`` (a CompressConfig, or a dict as a config file holds it, ``retrain`` defaulting to 10 epochs) as
    :func:`prune` reads it: only :data:`ROUND_SETTINGS` may differ from :class:`CompressConfig`'s defaults.

    Raises:
        SettingError: an unknown or ill-typed setting (:func:`autocompress.config.from_dict`); a setting
            outside :data:`ROUND_SETTINGS`; one of them named in ``keywords`` (the keyword arguments given
            beside ``config``).
    """
    default = CompressConfig(retrain=RetrainConfig(epochs=10))
    given = set(config) if isinstance(config, Mapping) else None
    if isinstance(config, Mapping):
        config = from_dict(CompressConfig, dict(config), base=default)
    elif not isinstance(config, CompressConfig):
        raise SettingError("config", f"config must be a CompressConfig or a dict of settings, not "
                           f"{type(config).__name__}", "pass config={'admm': {'epochs': 0}, ...}")
    for f in dataclasses.fields(CompressConfig):
        if f.name not in ROUND_SETTINGS and getattr(config, f.name) != getattr(default, f.name):
            raise SettingError(f.name, f"prune does not use {f.name} (it prunes at the given rates, in one round)",
                               f"drop {f.name} from config, or call autocompress.compress for a target")
    if keywords:
        name = keywords[0]
        if (name in given) if given is not None else getattr(config, name) != getattr(default, name):
            raise SettingError(name, f"{name} is given both as prune's keyword argument and in config",
                               f"give {name} in one place")
        raise SettingError(name, f"{name} is given as prune's keyword argument beside config, which holds every "
                                 "round setting when given", f"move {name} into config")
    return config


def _keywords_given(values: Mapping[str, object]) -> list[str]:
    """The :data:`ROUND_SETTINGS` that :func:`prune`'s keyword arguments ``values`` (name -> value) set away from
    their defaults (``purify*`` set ``purification``)."""
    defaults = inspect.signature(prune).parameters

    def same(value, default) -> bool:
        return tuple(value) == tuple(default) if isinstance(default, tuple) else value == default

    given = {"purification" if name.startswith("purify") else name for name, value in values.items()
             if not same(value, defaults[name].default)}
    return [name for name in ROUND_SETTINGS if name in given]


def prune(model: nn.Module, rates: Mapping, *, example_inputs, train_loader: Iterable | None = None,
          val_loader: Iterable | None = None, score_fn: ScoreFn | None = None, loss_fn: LossFn | None = None,
          forward_fn: ForwardFn | None = None, train_fn: TrainFn | None = None, device: str | torch.device = "auto",
          dims: Sequence[str] = ("filter", "column"), admm: ADMMConfig | Mapping | None = None,
          retrain: TrainConfig | RetrainConfig | Mapping | None = None, purify: bool = True,
          purify_tolerance: float = 0.005,
          purify_thresholds: Sequence[float] = DEFAULT_THRESHOLDS, seed: int = 0,
          ignored_layers: Sequence[str] = (), layer_norm: str = "kept", progress: bool = True,
          log: Callable[[str], None] | None = None, config: CompressConfig | Mapping | None = None) -> PruneResult:
    """Prune ``model`` at ``rates`` and compact it: one round of AutoCompress's actual pruning (Liu et al.
    AAAI 2020, §3) without the search -- ADMM, hard pruning, purification, masked retraining, compaction
    (:meth:`autocompress.rounds.Pipeline.run_round`, the round function :func:`autocompress.compress` runs).

    Args:
        model: a trained network (not modified: a copy is pruned); a ``torch.compile`` / ``DataParallel`` /
            ``DistributedDataParallel`` wrapper is pruned as the module it holds (rates name its layers).
        rates: ``{"filter": {group: r}, "column": {layer: r}, "irregular": {layer: r}}`` (see
            :func:`expand_rates` for the ``default`` form); names as in ``PruningSpace``.
        example_inputs: one batch the model accepts (a tensor ``[B, ...]`` or a tuple), e.g.
            ``torch.zeros(1, 3, 32, 32)``; MACs are counted per input item.
        train_loader, val_loader, score_fn, loss_fn, forward_fn, train_fn, device: as
            :func:`autocompress.compress`. ``train_loader`` may be None when ADMM and retraining are off
            (``epochs=0``); without ``val_loader`` and ``score_fn`` purification only removes unused paths.
        dims: unit kinds pruned, a subset of ``("filter", "column", "irregular")``, or the config's text form
            (``"filter,column"``).
        admm: ADMM settings (default :class:`ADMMConfig`: 10 epochs), or a dict of them as a config file's ``admm``
            section (``{"epochs": 0}``: one-shot projection).
        retrain: masked retraining settings (default 10 epochs of ``retrain.optimizer: auto``: for a classifier
            SGD at lr 0.01 or AdamW at 0.001 as a short probe on the pruned model finds, AdamW otherwise), or a
            dict of them as a config file's ``retrain`` section; ``epochs=0`` skips it.
        purify: run purification (unused path removal + redundant weight removal).
        purify_tolerance, purify_thresholds: see :func:`autocompress.purification.purify`.
        seed: seed of the global generator per phase (dropout, a DataLoader's shuffling).
        ignored_layers: module names never pruned (``CompressConfig.ignored_layers``).
        layer_norm: ``"kept"`` or ``"padded"``: a LayerNorm that loses channels normalises over the kept ones
            from the retraining on, or over all its original ones (``CompressConfig.layer_norm``).
        progress: tqdm bars; log: called with one line per step.
        config: the round's settings as :func:`autocompress.compress` takes them (a
            :class:`~autocompress.config.CompressConfig` or a dict as a config file holds it): its
            :data:`ROUND_SETTINGS` (``dims``, ``seed``, ``ignored_layers``, ``layer_norm``, ``admm``, ``retrain``,
            ``purification``) replace the keyword arguments of the same names, which then stay at their defaults;
            a section it omits keeps compress's default (``admm``: 2 epochs; ``retrain``: prune's 10 epochs).

    Returns:
        :class:`PruneResult`. ``report`` holds ``params_before`` / ``params_after`` (parameters of the
        original and of the compact model; with ``irregular`` in ``dims`` those a sparse format stores:
        :func:`autocompress.metrics.count_sparse_params`),
        ``macs_before`` / ``macs_after`` (MACs per input item; FLOPs = 2 x MACs), ``compression_rate``,
        ``mac_reduction``, ``score`` (validation score -- top-1 as a fraction unless ``score_fn`` --
        ``before``, ``purified`` and ``after``, measured on the compact model; None without a score; ``before``
        is the base's score once its BatchNorm statistics were re-estimated where that raised it by more than a
        point: :meth:`autocompress.rounds.Pipeline.reestimate_base_batchnorm`, a ``batchnorm`` record of round 0),
        ``rates``, ``clipped``, ``kept`` (per unit: ``[kept, total]``), ``excluded`` (module -> reason),
        ``records`` (the phase records, as in a compress run's ``metrics.jsonl``).

    Raises:
        SettingError: ``config`` holds a setting prune does not use (``target``, ``budget``, ``search``, ...: it
            prunes at ``rates`` in one round), or one that a keyword argument also gives.
        UserError: a model that is not an eager ``nn.Module`` with values (a state dict, TorchScript, meta
            tensors: :func:`autocompress.analysis.prunable_model`), bad rates / dims / names / settings / arguments
            (a rate naming a unit left out of the space says why), a model the space or compaction cannot handle,
            a training phase without ``train_loader``. A filter group whose channels the compact model cannot
            lose (a channel count written into a shape) is left out before any work, as in ``compress`` (logged;
            ``report["excluded"]``).
        RuntimeError: the compact model differs from the masked one (a bug; names the layer).
    """
    check_functions(score_fn=score_fn, loss_fn=loss_fn, forward_fn=forward_fn, train_fn=train_fn, log=log)
    if config is not None:
        round_config = round_settings(config, _keywords_given(dict(
            dims=dims, admm=admm, retrain=retrain, purify=purify, purify_tolerance=purify_tolerance,
            purify_thresholds=purify_thresholds, seed=seed, ignored_layers=ignored_layers, layer_norm=layer_norm)))
        dims, seed, ignored_layers, layer_norm = (round_config.resolved_dims, round_config.seed,
                                                  round_config.ignored_layers, round_config.layer_norm)
        admm, retrain, purification = round_config.admm, round_config.retrain, round_config.purification
        purify, purify_tolerance, purify_thresholds = (purification.enabled, purification.tolerance,
                                                       purification.thresholds)
    model = prunable_model(model, log if log is not None else (lambda _line: None))
    dims = tuple(d.strip() for d in dims.split(",")) if isinstance(dims, str) else tuple(dims)  # as in the config
    if not dims or any(d not in KINDS for d in dims):
        raise SettingError("dims", f"dims={show(','.join(dims))} names an unknown pruning dimension",
                           f"choose from {', '.join(KINDS)}")
    if isinstance(admm, Mapping):  # as a config file's section
        admm = from_dict(ADMMConfig, dict(admm), prefix="admm.")
    retrain = retrain if retrain is not None else RetrainConfig(epochs=10)
    if isinstance(retrain, Mapping):
        retrain = from_dict(RetrainConfig, dict(retrain), prefix="retrain.", base=RetrainConfig(epochs=10))
    if isinstance(retrain, TrainConfig):
        retrain = RetrainConfig(**{f.name: getattr(retrain, f.name) for f in dataclasses.fields(RetrainConfig)})
    ignored_layers = sorted(ignored_modules(model, ignored_layers))  # a wrong name is refused before any work
    check_choice("layer_norm", layer_norm, LAYER_NORM_FORMS)
    config = CompressConfig(dims=",".join(dims), seed=seed, ignored_layers=ignored_layers, layer_norm=layer_norm,
                            admm=admm if admm is not None else ADMMConfig(),
                            retrain=retrain, purification=PurificationConfig(purify, purify_tolerance,
                                                                             list(purify_thresholds)))
    check_purification(purify_tolerance, purify_thresholds)
    retrain.train_config()
    device = resolve_device(device)
    example = as_inputs(example_inputs, device, "prune")
    base = copy.deepcopy(model).to(device).eval()
    training = config.admm.epochs > 0 or retrain.epochs > 0
    if training and train_loader is None:
        raise UserError("ADMM or retraining epochs are set, but train_loader is None",
                        "pass train_loader, or set admm.epochs and retrain epochs to 0")
    task = Task(train_loader, val_loader, device, forward_fn, loss_fn, score_fn)
    task.check(base, example, needs_training=training,  # the outputs it scores, where training batches show them
               needs_score=task.can_score and train_loader is not None, needs_length=train_fn is None)
    before = task.score(base) if task.can_score else None
    if before is not None:
        task.check_score_direction(base, before)
    pipeline = Pipeline(task=task, config=config, example_inputs=example, base_model=base, train_fn=train_fn,
                        progress=progress, log=log,
                        base_score=before)
    base_records = pipeline.reestimate_base_batchnorm()
    before = pipeline.base_score
    work = densify(base)
    space = pipeline.compactable_space(work)
    pipeline.log_exclusions(space)
    warning = space.unreached_warning()
    if warning is not None and log is not None:
        log(f"WARNING: {warning}")
    elif warning is not None:
        logging.getLogger("autocompress").warning(warning)
    state = RoundState(1, None, work, space, rates=expand_rates(space, rates, dims))
    check_compactable(work, space.param_masks(project(space, work, state.rates)), example,
                      channel_multiple=pipeline.channel_multiple)
    pipeline.run_round(state, last=True)
    compact_model = state.compact_model
    records = [*base_records, *pipeline.store.records]
    purified = next((r for r in records if r.get("event") == "purification"), {})
    after = task.score(compact_model) if task.can_score else None
    params_before, params_after = pipeline.params(base), pipeline.params(compact_model)
    macs_before, macs_after = pipeline.macs(base), pipeline.macs(compact_model)
    report = {"dims": list(dims), "rates": state.rates, "excluded": dict(space.excluded),
              "params_before": params_before, "params_after": params_after,
              "macs_before": macs_before, "macs_after": macs_after,
              "compression_rate": params_before / max(params_after, 1),
              "mac_reduction": macs_before / max(macs_after, 1),
              "score": {"before": before, "purified": pipeline.score_of(purified, "_after"), "after": after},
              "clipped": [c._asdict() for c in state.masks.clipped], "kept": _kept_units(state.masks),
              "records": records}
    pipeline.log(f"compact model: {params_after} parameters ({report['compression_rate']:.2f}x fewer), "
                 f"{macs_after} MACs ({report['mac_reduction']:.2f}x fewer)")
    return PruneResult(compact_model=compact_model, masks=state.masks, report=report)
