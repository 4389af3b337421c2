"""``autocompress.compress``: AutoCompress over the caller's own model, data, loss and loop.

AutoCompress (Liu et al., AAAI 2020, arXiv 1907.03141), the generic flow in progressive rounds: each round
raises the target (default doubling: 2x, 4x, 8x, ... then the final target), searches per-layer rates with
guided simulated annealing scored by quick evaluation, then prunes at those rates
(:meth:`autocompress.rounds.Pipeline.run_round`: ADMM, hard pruning, purification, masked retraining,
compaction) starting from the previous round's compact model.

With ``run_dir`` every phase is stored in a run folder (:class:`autocompress.runfolder.RunFolder`): a run
killed at any point continues when :func:`compress` is called again with the same model, settings and
``run_dir``, and ends with the same result. Without ``run_dir`` nothing is written to disk.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__, distributed, metrics, report
from .alignment import (AUTO, LAYOUT_MULTIPLE, NOT_BLOCKED, blocked, channel_block, check_multiple, kept_channels,
                        log_whole_groups)
from .analysis import at_batch, model_digest, output_tensors, prunable_model, structure_digest, unread_inputs
from .annealing import AnnealingResult, simulated_annealing
from .budget import RULE, apply_budget, describe, given_settings, search_share_warning
from .compaction import compact, densify
from .config import CompressConfig, SettingError, Target, round_targets
from .deployment import COLUMN_LAYERS, deployed_form, uniform_reference, with_dense_layers
from .distillation import AUTO_RULE, FIT_SHARE, UNLIKE_POINTS, distillable, time_major
from .errors import CallArgument, TargetMissed, UserError
from .latency import (SLOWER, LatencyTable, blocked_convolutions, build_table, deployed_summary, measure_models,
                      noisy_spreads, noisy_timing_warning, speed_warning, uniform_warning, unpriced_warning)
from .mainstore import MainStore
from .padded_norm import PADDED_NORMS
from .projection import project, relative_importance
from .quick_eval import QuickEvaluator, fine_tunes
from .rounds import BASE_BN_WARNING, Budget, PhaseStore, Pipeline, RoundState, TrainFn, phase_seed
from .runfolder import RunFolder, run_dir_path
from .sampling import (FAR, ActionSampler, ActionUnit, Unreachable, guidance_weight, on_block, rates_dict, space_keeps,
                       units_from_space)
from .serialization import constructor_arguments, save_compact
from .space import KINDS, ignored_modules, ignored_summary
from .task import ForwardFn, LossFn, ScoreFn, Task, as_inputs, check_functions, kept_randomness, resolve_device
from .text import kind_of, short_of


#: the channel multiple a target falls back to first when ``auto``'s larger one cannot reach it
FALLBACK = 8
#: a params / flops target N x is met at ``N x (1 - TARGET_TOLERANCE)`` or more (shown to 3 digits it reads N x); the
#: search fits, the refit's limit and the final check all use it. Met exactly, halving every layer of a small CNN but
#: its classifier came 0.02 % short of flops=2x, and the next widths at multiple 16 reached 2.61x (fresh user 61)
TARGET_TOLERANCE = 1e-3
#: a filter group the compact model keeps at this many channels or fewer is named in the final table's warnings
BOTTLENECK = 2
#: measurements of a latency target's search result (see calibrate)
CALIBRATION_STEPS = 4
#: a measured speedup up to this factor above a latency target ends the calibration (a closer one saves accuracy)
CALIBRATION_BAND = 1.1


def latency_guidance(units: list[ActionUnit], space, table: LatencyTable, guidance: str = "layer"
                     ) -> list[ActionUnit]:
    """``units`` weighted by the latency each governs instead of its MACs: the lookup table's estimated saving
    (ms) when that unit alone is pruned at rate 0.5, per producing layer (a filter group shared by several
    layers counts once per layer) or per layer and channel (``guidance``, see
    :func:`autocompress.sampling.guidance_weight`). The
    experience-based guidance of AutoCompress (Liu et al., AAAI 2020, §4: prune harder what governs more of
    the objective) with the objective measured in the runtime, so a latency target prunes harder the layers
    whose widths buy time there (with aligned widths at batch 1 these are not always the MAC-heavy ones)."""
    by_name = {(kind, u.name): u for kind in KINDS for u in space.units(kind)}
    full = table.estimate_space(space, rates_dict(units, np.zeros(len(units))))
    weighted = []
    for i, unit in enumerate(units):
        probe = np.zeros(len(units))
        probe[i] = 0.5
        saving = full - table.estimate_space(space, rates_dict(units, probe))
        weight = guidance_weight(by_name[unit.kind, unit.name], max(0.0, saving), guidance)
        weighted.append(dataclasses.replace(unit, weight=weight))
    return weighted


def calibrate(target: float, fit: Callable[[float], tuple[Any, float]], measure: Callable[[Any], float], *,
              steps: int = CALIBRATION_STEPS, band: float = CALIBRATION_BAND, floor: float = 1.0
              ) -> tuple[Any, list[dict]]:
    """Close a latency target's lookup-table estimate with measurements (beyond the paper; the table is the
    idea of HALP, Shen et al. NeurIPS 2022, the measured loop that of NetAdapt, Yang et al. ECCV 2018).

    ``fit(aim)`` gives a candidate meeting the speedup ``aim`` by the table and its estimated speedup;
    ``measure(candidate)`` its measured speedup; a candidate meets the target at ``floor * target`` or more
    (``floor`` <= 1 leaves room for the measurement's noise). Starting at ``aim = target``, each step measures
    the candidate and, unless its speedup lies in ``[floor * target, band * target]``, re-aims
    (:func:`next_aim`), at most ``steps`` measurements; a ``fit`` that raises UserError (an aim the table cannot
    reach) ends the loop after the first measurement, and so does a re-aim at an aim already measured. Returns
    the least-pruned measured candidate that met the target (the smallest such speedup), else the fastest one,
    and one record per measurement (``aimed``, ``estimated``, ``measured``).
    """
    aim, records, kept, fastest = target, [], None, None
    for _ in range(steps):
        try:
            candidate, estimated = fit(aim)
        except UserError:
            if not records:
                raise
            break
        speedup = measure(candidate)
        records.append({"aimed": aim, "estimated": estimated, "measured": speedup})
        if speedup >= floor * target and (kept is None or speedup < kept[1]):
            kept = (candidate, speedup)
        if fastest is None or speedup > fastest[1]:
            fastest = (candidate, speedup)
        if floor * target <= speedup <= band * target:
            break
        aim = next_aim(target, [(r["aimed"], r["measured"]) for r in records], floor=floor, band=band)
        if any(math.isclose(aim, r["aimed"]) for r in records):  # (an aim clamped at 1) nothing new to measure
            break
    return (kept or fastest)[0], records


def next_aim(target: float, points: list[tuple[float, float]], *, floor: float, band: float) -> float:
    """The next aim of :func:`calibrate` from its ``(aim, measured speedup)`` points so far (none in the band).

    Until the target is bracketed, the last aim times ``target / measured`` (the table's error there; not below
    1). Once one point measured below ``floor * target`` and one above ``band * target``, the closest of each
    side are interpolated, log aim against log speedup (exact where speedup follows a power of the aim), which
    converges where the multiplicative re-aim oscillates: on a model of tens of microseconds it went 1.27x,
    1.83x, 1.19x, 1.73x around a 1.5x target. A bracket the measurements' noise turned around (the larger aim
    measured slower) takes the two aims' geometric mean.
    """
    slow = [p for p in points if p[1] < floor * target]
    fast = [p for p in points if p[1] > band * target]
    if not slow or not fast:
        aim, measured = points[-1]
        return max(1.0, aim * target / measured)
    (low_aim, low), (high_aim, high) = max(slow, key=lambda p: p[1]), min(fast, key=lambda p: p[1])
    if high_aim <= low_aim:
        return math.sqrt(low_aim * high_aim)
    return low_aim * (high_aim / low_aim) ** (math.log(target / low) / math.log(high / low))


@dataclass
class CompressResult:
    """What :func:`compress` returns.

    Attributes:
        model: the compact nn.Module (physically pruned), on the run's device, in eval mode; it computes
            what the masked model computes.
        rounds: one dict per round: ``round``, ``target``, ``rates`` (per unit kind and unit), ``params``,
            ``macs`` (per input item; FLOPs = 2 x MACs), ``val_top1`` (%) or ``val_score`` (with a
            ``score_fn``), ``layers`` (kept / total filters and columns per layer).
        final: the final table: ``rows`` for ``"base"`` and ``"compressed"`` (params, MACs, validation
            score, latency in ms at batch 1 and 64 on ``device``), ``threads``, ``device``.
        records: every metrics record (what a run folder's ``metrics.jsonl`` holds), phase times included.
        compression_rate: base parameters / compact parameters ("x"); mac_reduction: base MACs / compact.
        run_dir: the run folder, or None.
    """

    model: nn.Module
    rounds: list[dict]
    final: dict
    records: list[dict]
    compression_rate: float
    mac_reduction: float
    run_dir: Path | None = None
    phase_seconds: dict = field(default_factory=dict)

    @property
    def deployed_model(self) -> nn.Module:
        """The deployed form the final table timed (``final["deployed_form"]``: the column layers it runs dense,
        within a flops target's MACs; :func:`autocompress.deployment.deployed_form`), computing what ``model``
        computes: the model to export. ``model`` itself when the final table did not time one."""
        form = self.final.get("deployed_form") or {}
        return with_dense_layers(self.model, form.get("dense_layers", []))

    def summary(self) -> str:
        """The final table as plain text, the lines the ``compress`` command prints: base vs compressed
        parameters, MACs, validation score and latencies (ms) with a "compressed vs base" row, then how deployed latency
        was measured and every warning (``final["warnings"]``). ``print(result.summary())``."""
        return report.final_text(self.final)


def compress(model: nn.Module, example_inputs: torch.Tensor | tuple, target: str | None = None, *,
             train_loader: Iterable, val_loader: Iterable | None = None, score_fn: ScoreFn | None = None,
             loss_fn: LossFn | None = None, forward_fn: ForwardFn | None = None, train_fn: TrainFn | None = None,
             device: str | torch.device = "auto", config: CompressConfig | dict | None = None,
             run_dir: str | Path | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> CompressResult:
    """Compress ``model`` to ``target`` with AutoCompress (Liu et al., AAAI 2020): progressive rounds of
    guided simulated-annealing rate search, ADMM structured pruning, purification, masked retraining and
    physical compaction.

    Args:
        model: any trained nn.Module (not modified: a copy is compressed); a ``torch.compile``,
            ``nn.DataParallel`` or ``DistributedDataParallel`` wrapper is compressed as the module it holds, and the
            result is that eager module (compile or wrap it again).
        example_inputs: a tensor ``[B, ...]`` or a tuple of tensors, one forward's inputs, batch ``B >= 1``;
            the model is traced with them and MACs are counted per input item.
        target: ``"params=12x"`` (compression rate), ``"flops=4x"`` (reduction of the MACs the compact model
            executes, counted by ``torch.utils.flop_counter``), or a measured latency
            target ``"latency=2x"`` (speedup over the base) / ``"latency=5ms"`` in ``config["latency"]``'s runtime
            at its batch size (default onnxruntime on the CPU, 1 thread, batch 1); may instead be given as
            ``config["target"]``.
        train_loader: training batches, re-iterated once per epoch (ADMM, retraining, BatchNorm
            re-estimation). By default each batch is ``(inputs, targets)``, or ``(input_1, ..., input_N, targets)``
            where ``example_inputs`` is a tuple of N tensors (e.g. token ids and a padding mask).
        val_loader: validation batches; top-1 on them is the score, unless ``score_fn`` is given.
        score_fn: ``fn(model) -> float``, higher is better, replacing validation top-1 (e.g. mean IoU);
            called in eval mode under no_grad.
        loss_fn: ``fn(model, batch) -> scalar loss`` (default: cross-entropy of ``forward_fn``'s output
            against the targets, ``batch[1]`` (``batch[N]`` for N inputs)).
        forward_fn: ``fn(model, batch) -> output`` (default ``model(batch[0])``, ``model(*batch[:N])`` for N
            inputs).
        train_fn: ``fn(model, phase)``: the caller's own training loop for the ADMM and retraining epochs
            (see :class:`autocompress.rounds.TrainingPhase`); default: the library's loop (``retrain.optimizer``:
            for a classifier SGD or AdamW as a short probe on the pruned model finds, AdamW otherwise).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; the model, the
            teacher, the example inputs and every batch are moved there.
        config: a :class:`autocompress.config.CompressConfig` or its dict form (sections given in part
            keep their other defaults).
        run_dir: a folder for a resumable run (config.yaml, metrics.jsonl, per-phase artifacts, model.pt,
            report.html); called again with the same model and settings it continues the run there.
        progress: tqdm progress bars; log: called with one line per step (default: none), including the layers
            left out of pruning (``not filter-pruned: ...``, ``not column-pruned: ...``; without ``log`` they go to
            the ``autocompress`` logger at INFO). The final table's warnings (WARNING, also in
            ``result.final["warnings"]``) go to the standard ``logging`` loggers under ``autocompress``: Python
            prints warnings to stderr until logging is configured.
            ``print(result.summary())`` prints the final table and its warnings as the ``compress`` command does.

    Under ``torch.distributed`` (called in every process of an initialised process group, e.g. under
    ``torchrun``) the ranks score the search's candidates in parallel and train under DistributedDataParallel;
    rank 0 owns ``run_dir``, and every rank returns the same result (:mod:`autocompress.distributed`).

    Returns:
        :class:`CompressResult`.

    Raises:
        UserError: bad settings (:class:`autocompress.config.SettingError` names the setting), bad
            arguments (a forward that fails on ``example_inputs``, an empty loader, batches the defaults
            cannot run, a non-scalar loss, a non-number score, an unavailable device), a target the model
            cannot reach without pruning a layer away, a missing ``train_loader`` or a Dataset given for a
            loader, or a ``run_dir`` that holds another run (other settings, weights or loader sizes, refused
            before any other work; its base scoring otherwise on ``val_loader``, or on the training data its
            BatchNorm statistics were re-estimated on), holds files of no run, or is in use; all before any
            training, with nothing written (a folder or lock file the call created is removed).
        TargetMissed: (a UserError) a latency target the trained model misses when measured at the end,
            twice, or a params / flops target its compact model misses (channels compaction had to keep); its
            ``result`` is the :class:`CompressResult` (the run folder keeps it too).
    """
    with kept_randomness(train_loader, val_loader):  # the caller's generators draw on as before
        return Compression(model, example_inputs, target, task_args=dict(
            train_loader=train_loader, val_loader=val_loader, score_fn=score_fn, loss_fn=loss_fn,
            forward_fn=forward_fn), train_fn=train_fn, device=device, config=config, run_dir=run_dir,
            progress=progress, log=log).run()


def _check_call_arguments(data: Any) -> None:
    """:class:`~autocompress.errors.CallArgument` for a config mapping holding an argument of :func:`compress`
    that is not a setting (a fresh user's ``config={"device": "cuda"}`` was asked whether they meant
    ``latency.device``)."""
    if not isinstance(data, dict):
        return
    arguments = set(inspect.signature(compress).parameters) - {"config"} - {
        field.name for field in dataclasses.fields(CompressConfig)}
    named = sorted(str(key) for key in data if key in arguments)
    if named:
        raise CallArgument(named[0], f"{named[0]} is an argument of autocompress.compress, not a config setting",
                           f"pass it to compress: compress(..., {named[0]}=...)")


def resolve_config(config: CompressConfig | dict | None, target: str | None,
                   steps_per_epoch: int | None = None) -> CompressConfig:
    """The run's validated config: ``config`` (a CompressConfig, its dict form or None) with ``target`` set and
    a ``budget`` applied (:func:`autocompress.budget.apply_budget`; ``steps_per_epoch``: optimiser steps of one
    training epoch, when known)."""
    given = None  # the settings the user gave, known for plain data only
    if isinstance(config, CompressConfig):  # read back as plain data: its sections and values are checked alike
        config = CompressConfig.from_dict(dataclasses.asdict(config), validate=False)
    else:
        data = {} if config is None else config
        _check_call_arguments(data)
        config = CompressConfig.from_dict(data, validate=False)
        given = given_settings(data)
    if target is not None:
        if config.target is not None and config.target != str(target):
            raise SettingError("target", f"target {target!r} given, but the config says target {config.target!r}",
                               "give the target once")
        config.target = str(target)
    dataclasses.replace(config, budget=None).validate()  # the settings a budget derives are compared valid
    config = apply_budget(config, given, steps_per_epoch)
    config.validate()
    return config


#: a setting one side of :func:`setting_changes` does not have
ABSENT = object()


def setting_changes(stored: Any, wanted: Any, name: str) -> list[str]:
    """How a run folder's stored setting ``name`` differs from this run's, leaf by leaf: ``["distillation.alpha:
    0.9 in the folder, 0.5 now"]``; a setting only one side has (``ABSENT`` on the other) is said to be one of
    another autocompress version's. Empty when they are equal."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return [change for key in dict.fromkeys([*stored, *wanted])
                for change in setting_changes(stored.get(key, ABSENT), wanted.get(key, ABSENT), f"{name}.{key}")]
    if stored == wanted:
        return []
    if stored is ABSENT or wanted is ABSENT:
        side = "the folder" if wanted is ABSENT else "this run"
        return [f"{name} is a setting in {side} only (a folder of another autocompress version?)"]
    return [f"{name}: {stored!r} in the folder, {wanted!r} now"]


class Compression:
    """One compress run (what :func:`compress` does), split in steps; adapters (the CLI) use it to keep a
    record of their own in the run folder (``source``) and to save the final model their way (``save``).

    Args:
        source: plain data stored in ``config.yaml`` when the run starts (the CLI: where the checkpoint and
            the data are); not compared on resume (the settings, the base model's digest and the
            loaders' sizes are).
        save: ``fn(path, compact_model)`` writing the final ``model.pt`` (default:
            :func:`autocompress.serialization.save_compact`, loadable with ``autocompress.load``).
        final_columns: ``fn(name, model) -> dict`` of further columns of the final table for the ``"base"``
            and the ``"compressed"`` model (the CLI: test top-1 and file size; called after ``save``).
    """

    def __init__(self, model: nn.Module, example_inputs, target, *, task_args: dict, train_fn=None,
                 device="auto", config=None, run_dir=None, progress: bool = True, log=None,
                 source: dict | None = None, save: Callable[[Path, nn.Module], Any] | None = None,
                 final_columns: Callable[[str, nn.Module], dict] | None = None):
        self.threads = torch.get_num_threads()  # a resumed run works at its own thread count, then restores this
        self.run_dir = run_dir_path(run_dir)
        self.config = resolve_config(config, target, distributed.length(task_args.get("train_loader")))
        self.given = dataclasses.asdict(self.config)  # before the data, the model and the device resolve any auto
        self.target = Target.parse(self.config.target)
        self.device = resolve_device(distributed.local_device(device))
        self.multiple, why = self.config.resolved_multiple(str(self.device))
        check_functions(train_fn=train_fn, log=log, **{k: v for k, v in task_args.items() if k.endswith("_fn")})
        self.own_loop = train_fn is not None  # the caller's loop distils only where it calls phase.distill
        self.from_data: set[str] = set()  # settings given as auto that the base's data decide
        self.world = distributed.world()
        say = log if log is not None and self.world.is_main else (lambda _line: None)
        model = prunable_model(model, say)
        self.example = as_inputs(example_inputs, self.device, "compress")
        ignored_modules(model, self.config.ignored_layers)  # a wrong name is refused before any work
        base = copy.deepcopy(model).to(self.device).eval()
        self.base_digest = model_digest(base)  # the caller's weights, before any BatchNorm re-estimation
        self.structure = structure_digest(model)
        amp = None if self.config.amp == "none" else self.config.amp
        if amp is not None and self.device.type != "cuda":
            logging.getLogger("autocompress").warning(f"amp {amp} is ignored on {self.device.type}: autocast runs "
                                                      "on CUDA only")  # a setting asked for and not applied
        if not blocked(self.multiple):  # said before any work: the run would end in a SLOWER warning
            logging.getLogger("autocompress").warning(f"channel_multiple {self.multiple} is {NOT_BLOCKED}")
        self.task = Task(device=self.device, amp=amp, **task_args)
        if self.run_dir is not None:  # another run's folder is refused before the base is scored
            distributed.on_main(self._refuse_other_given, share=False)
        progress, log = (progress, log) if self.world.is_main else (False, None)  # rank 0 speaks for the run
        self._check_world(base, train_fn is None, log or (lambda _line: None))
        train_output = self.task.check(base, self.example, needs_training=True, needs_score=True,
                                       needs_length=train_fn is None)
        base_score = self.task.score(base)  # a score_fn returning NaN / text is refused here, before work
        self.task.check_score_direction(base, base_score)
        self._check_distillation(train_output, say, base, base_score)
        # outputs with positions (dense prediction, per-token scores) in any tensor the forward returns, where
        # task.positions reads a class-score tensor only
        self.dense_output = any(t.dim() > 2 for t in output_tensors(train_output))
        self.guidance = self.config.resolved_guidance(self.dense_output)
        if self.config.budget is not None:  # once the loader's length is known to be there (its epoch's steps)
            say(describe(self.config, self.own_loop))
        given = self.config
        self.pipeline = Pipeline(task=self.task, config=self.config, example_inputs=self.example, base_model=base,
                                 train_fn=train_fn, chance=self._chance(base), progress=progress,
                                 log=log, channel_multiple=self.multiple,
                                 base_score=base_score)
        self.config = self.pipeline.config  # the optimiser resolved for the task
        if train_fn is None:
            self.pipeline.log(self.config.describe_loop(given, self.task.classifies, self.task.positions))
        self.source, self.save, self.final_columns = source or {}, save, final_columns
        self._start_choice: str | None = None  # search.start auto, once settled (_search)
        self.folder = distributed.on_main(self._open_folder, share=False) if self.run_dir is not None else None
        if self.folder is not None and self.folder.holds_run():
            self.pipeline.log(self._continued())
        if self.world.active:  # rank 0 owns the run folder; the threads of the run are rank 0's
            torch.set_num_threads(distributed.broadcast_object(torch.get_num_threads()))
        try:
            self._prepare(base, why)
        except BaseException:
            self._release()
            raise
        store = self.folder if self.folder is not None else PhaseStore()
        self.store = MainStore(store if self.world.is_main else None) if self.world.active else store
        self.pipeline.store = self.store

    def _prepare(self, base: nn.Module, why: str) -> None:
        """The set-up that costs work, after the run folder's refusals (:meth:`_open_folder`): the base's
        BatchNorm re-estimation, the pruning space, a latency target's lookup table, the reachability of the
        target; then the run folder is claimed for a new run (its ``config.yaml``)."""
        self.base_records = self.pipeline.reestimate_base_batchnorm()
        if self.run_dir is not None:
            distributed.on_main(self._check_same_validation, share=False)
        self.first_model = densify(base)
        self.first_space = self.pipeline.space(self.first_model)
        self.block = self._give_back_block()
        self.pipeline.log(f"channel multiple: {why}" + (
            f"; channels a fit does not need are given back only in whole {self.block}-channel blocks (of 2-D "
            "convolutions and Linear outputs, which CPU kernels process in blocks)"
            if on_block(self.block, self.multiple) else ""))
        if self.config.ignored_layers:
            self.pipeline.log(ignored_summary(self.first_space))
        if not self.task.layout:
            self.pipeline.log("channels-last layout: off (the model's forward fails with channels-last tensors, e.g. "
                              ".view on a convolution's output); training and scoring run in the default layout, "
                              "up to ~1.5x slower on a CPU (.reshape would allow it)")
        if self.config.dims is None:
            self.pipeline.log(f"dims: {self.config.resolved_dims} (default for a {self.target.objective} target)" + (
                "" if self.first_space.units("filter") else f"; no filter unit can be pruned in this model "
                f"({self.first_space.missing('filter')[0]}): columns only"))
        if self.config.search.guidance == AUTO:
            self.pipeline.log(f"search guidance: per {self.guidance} (auto for a {self.target.objective} target" + (
                " of a model whose outputs have positions" if self.dense_output else "") + ")")
        check_multiple(self.first_space, self.multiple,
                       explicit=not self.config.auto_multiple)  # before any work
        self.first_space = self.pipeline.compactable_space(self.first_model, self.first_space)
        if self.world.is_main:
            self.pipeline.log_exclusions(self.first_space)
        self.table = self._latency_table(base) if self.target.objective == "latency" else None
        self.factor = self._factor()
        self.targets = round_targets(self.factor, self.config.rounds)
        if self.pipeline.train_fn is None and (warning := search_share_warning(
                self.config, len(self.targets), self.pipeline.training_steps(len(self.targets)))):
            logging.getLogger("autocompress").warning(warning)  # before any work
        self._check_reachable(base)  # an unreachable target: refused now
        # at the multiple a fall-back settled on
        log_whole_groups(self.first_space, self.multiple, self.pipeline.callers_log())
        if self.run_dir is not None:
            distributed.on_main(self._claim_folder, share=False)

    @property
    def base_score(self) -> float:
        """The base model's validation score (``task.score``), of the re-estimated base where
        :meth:`~autocompress.rounds.Pipeline.reestimate_base_batchnorm` replaced its BatchNorm statistics."""
        return self.pipeline.base_score

    # --- set-up ---------------------------------------------------------------------------------------
    def _check_world(self, base: nn.Module, default_loop: bool, log: Callable[[str], None]) -> None:
        """Several processes: the same settings and base model on every rank, and training data that can feed
        every rank (:mod:`autocompress.distributed`; ``log`` is told how it is sharded); UserError naming what
        differs, before any work."""
        if not self.world.active:
            return
        given = {"target": self.config.target, "budget": self.config.budget}  # named before what they derive
        distributed.check_same({**given, **dataclasses.asdict(self.config), "device type": self.device.type,
                                "model weights": self.base_digest})
        if self.config.distributed.sync_batchnorm and self.device.type != "cuda":
            raise SettingError("distributed.sync_batchnorm", "SyncBatchNorm needs CUDA devices",
                               "set distributed.sync_batchnorm: false on the CPU")
        if default_loop:
            with torch.random.fork_rng(devices=[]):
                distributed.shard_loader(self.task.train_loader, shard_data=self.config.distributed.shard_data,
                                         log=log)

    def _check_distillation(self, output: Any, say: Callable[[str], None], base: nn.Module,
                            base_score: float) -> None:
        """``distillation.enabled: auto`` resolved for the task (:meth:`CompressConfig.with_distillation_for`, and
        off for a base that has not fitted its training data past what it generalises: :meth:`_fit_gap`,
        :data:`~autocompress.distillation.FIT_SHARE`; off is said with ``say``).
        Distillation (``distillation.enabled``, ``quick_eval.finetune_distill``) turned off,
        with a warning on
        the ``autocompress`` logger, when the base's forward ``output`` on a training batch (:meth:`Task.check`'s)
        holds no class scores to distil (:func:`distillable`: a regression output of one channel, a dict: its soft
        term would be 0 or fail mid-run; :func:`time_major`: scores ``[T, N, classes]``, whose softmax over axis 1
        would mix the batch's items), or when the batch's targets say it regresses (``Task.classifies`` False:
        a softmax over a regressor's values means nothing). The settings stored for the run (``config.yaml``) say
        it is off."""
        time_axis = time_major(output, self.task.items)
        classes = distillable(output) and not time_axis
        scores = classes and self.task.classifies is not False  # class scores to distil
        if self.config.distillation.enabled == AUTO:
            self.from_data.add("distillation.enabled")
            self.config = self.config.with_distillation_for(self.task.classifies, self.task.positions)
            if self.config.distillation.enabled and scores:  # (else off below, with the reason)
                self._distil_by_fit(base, base_score, say)
            elif not self.config.distillation.enabled:
                say(f"distillation from the base: off ({AUTO_RULE})")
        if scores and self.config.distillation.enabled and self.task.loss_fn is not None and not self.own_loop:
            alpha = self.config.distillation.alpha
            say(f"distillation mixes your loss: (1 - {alpha:g}) x loss_fn + {alpha:g} x the distillation term of "
                f"forward_fn's class scores, so the other outputs your loss trains (other heads) get {1 - alpha:g} of "
                "their weight (distillation.alpha; distillation.enabled false trains with your loss alone)")
        quick = self.config.quick_eval
        scorer_distils = fine_tunes(quick.scorer) and quick.finetune_distill
        if not (self.config.distillation.enabled or scorer_distils) or scores:
            return
        asked = self.config.distillation.enabled and "distillation.enabled" not in self.from_data
        self.config = dataclasses.replace(
            self.config, distillation=dataclasses.replace(self.config.distillation, enabled=False),
            quick_eval=dataclasses.replace(quick, finetune_distill=False))
        targets = f"training targets (batch[{self.task.inputs}])"
        why = (f"its batch of {self.task.items} items on axis 1 ([T, N, classes]), not class scores [B, classes, ...]"
               if time_axis else
               "not class scores [B, classes >= 2, ...]" if not classes else
               f"whose {targets} hold {self.task.ignore_label} besides its class indices (an ignore label)"
               if self.task.ignore_label is not None else
               f"features (an embedding), not class scores for its {targets} ({self.task.unscored})"
               if self.task.unscored else
               f"whose {targets} are not class indices or probabilities for it (a regression, or several labels "
               "an item: multi-hot targets)")
        fix = ("pass forward_fn returning them batch first to distil: output.permute(1, 2, 0) gives [N, classes, T]"
               if time_axis else
               "pass forward_fn returning class scores to distil" if not classes else
               "distillation compares one softmax over the classes, which an embedding's features are not"
               if self.task.unscored else
               "distillation compares one softmax over the classes, which several labels an item or a regression "
               "does not have")
        warning = (f"distillation from the base is off{' although distillation.enabled is true' if asked else ''}: "
                   f"the forward returns {kind_of(output)} on a training batch, {why}, and distillation compares "
                   "softened class scores (distillation.enabled and quick_eval.finetune_distill set false); training "
                   f"and the search's fine-tuning use your loss alone ({fix})")
        logging.getLogger("autocompress").warning(warning)

    def _distil_by_fit(self, base: nn.Module, base_score: float, say: Callable[[str], None]) -> None:
        """Distillation kept on, or turned off, by the base's fit share on the training batches
        (:data:`~autocompress.distillation.FIT_SHARE`), said with ``say``; unchanged where :meth:`_fit_gap` cannot
        measure it."""
        gap = self._fit_gap(base, base_score)
        if gap is None:
            say("distillation from the base: on (distillation.enabled auto: the base's fit share is read with the "
                "default top-1 score on class-index targets, not with a score_fn or other targets; set "
                "distillation.enabled false to train without it)")
            return
        if gap < -UNLIKE_POINTS:
            say(f"distillation from the base: on (distillation.enabled auto: the base scores {-gap:.1f} points "
                "of top-1 lower on training batches than on validation: they are augmented or drawn unlike "
                "validation, so they cannot tell whether it has fitted its training data)")
            return
        errors = 100.0 * (1.0 - base_score)
        share, fit = fit_share(gap, errors)
        if share >= FIT_SHARE:
            say(f"distillation from the base: on (distillation.enabled auto: {fit}, {FIT_SHARE:.0%} or more: it has "
                "fitted its training data)")
            return
        self.config = dataclasses.replace(self.config, distillation=dataclasses.replace(
            self.config.distillation, enabled=False))
        say(f"distillation from the base: off (distillation.enabled auto: {fit}, under {FIT_SHARE:.0%}: it has not "
            "fitted its training data past what it generalises, and its soft targets would hold its student back; "
            "set distillation.enabled true to distil)")

    def _fit_gap(self, base: nn.Module, base_score: float) -> float | None:
        """Points of top-1 by which ``base`` scores higher on up to :data:`FIT_GAP_BATCHES` training batches (eval
        mode, drawn as the run's seed draws them, one on the device at a time) than on validation (``base_score``, a
        fraction); rank 0's value on every rank. None for a caller's ``score_fn`` or targets that are not class
        indices per item (read on the first batch)."""
        if self.task.score_fn is not None or self.task.classifies is not True or self.task.positions:
            return None
        with self.task.seeded(self.config.seed):
            batches = itertools.islice(self.task.train_loader, FIT_GAP_BATCHES)
            first = next(batches, None)
            if first is None or self.task.targets(first).dim() != 1:
                return None
            train_top1 = self.task.top1(base, itertools.chain([first], batches))
        return distributed.broadcast_object(100.0 * (train_top1 - base_score))

    def _chance(self, base: nn.Module) -> float | None:
        """1 / classes for the default top-1 score (the class dimension of the output), else None."""
        if self.task.score_fn is not None:
            return None
        with torch.no_grad():
            batch = self.task.batches(self.task.val_loader, 1)[0]
            output = self.task.forward(base.eval(), batch)
        return 1.0 / output.shape[1] if isinstance(output, torch.Tensor) and output.dim() >= 2 else None

    def _stored_settings(self) -> dict:
        return {**dataclasses.asdict(self.config),
                "run": {"base_model_sha256": self.base_digest, "base_structure_sha256": self.structure,
                        "threads": torch.get_num_threads(),
                        "world_size": self.world.size,
                        "device": str(self.device), "autocompress": __version__,
                        "dims": self.config.resolved_dims, "channel_multiple": self.multiple,
                        "guidance": self.guidance,
                        "data": self._data_sizes(), "given": self.given,
                        **({"schedule": describe(self.config, self.own_loop), "rule": RULE}
                           if self.config.budget is not None
                           else {})},
                "source": self.source}

    def _data_sizes(self) -> dict:
        """Batches and items of the training and validation loaders (None where they have no length): a run
        folder continued with other data is refused (sizes only: a loader's content may be drawn at random)."""
        return {name: {"batches": distributed.length(loader),
                       "items": distributed.length(getattr(loader, "dataset", None))}
                for name, loader in (("train_loader", self.task.train_loader), ("val_loader", self.task.val_loader))}

    def _open_folder(self) -> RunFolder:
        """Open (lock) the run folder before any work. A folder holding a run continues it only with the same
        settings, base model, loader sizes and number of processes, at the thread count it started with (float
        sums, hence results, depend on it); a folder holding other files is refused. An empty folder is claimed
        once the set-up has succeeded (:meth:`_claim_folder`).

        Raises:
            UserError: what differs, or the folder cannot be used (the lock file it created is removed)."""
        folder = RunFolder(self.run_dir).open()
        try:
            if folder.holds_run():
                stored, wanted = folder.read_config(), self._stored_settings()
                changed = [change for key in wanted if key not in ("run", "source")
                           for change in setting_changes(stored.get(key, ABSENT), wanted[key], key)]
                self._refuse_changes(stored, changed)
                if not folder.is_done("final", "final"):  # a finished run's result is read back as it is
                    self._refuse_other_multiple(stored)
                torch.set_num_threads(int(stored["run"].get("threads") or torch.get_num_threads()))
            elif not folder.is_empty():
                raise UserError(f"run_dir {self.run_dir} is not empty and holds no run",
                                "pass an empty or new folder")
        except BaseException:
            folder.release()
            raise
        return folder

    def _refuse_other_given(self) -> None:
        """Before the base is scored: a run folder holding a run started with other settings as given (before
        the data, the model and the device resolved their ``auto`` values; folders of version 0.9.0 and earlier
        hold none), other base weights, loader sizes or number of processes is refused (:meth:`_refuse_changes`).
        What the given settings resolve to is compared once resolved (:meth:`_open_folder`)."""
        folder = RunFolder(self.run_dir)
        if not folder.holds_run():
            return
        stored = folder.read_config()
        if "given" in stored["run"]:
            self._refuse_changes(stored, [change.removeprefix("given.") for change in
                                          setting_changes(stored["run"]["given"], self.given, "given")])

    def _refuse_other_multiple(self, stored: dict) -> None:
        """UserError when the unfinished run of a folder (its ``config.yaml``, ``stored``) resolved ``channel_multiple:
        auto`` to a larger multiple than this version's ``auto`` starts at (a fall-back only lowers it): autocompress
        0.14 took 16 for a params / flops target on an AVX-512 CPU, 0.15 takes 8, and the run's later phases would fit
        other widths than its first."""
        started = stored["run"].get("channel_multiple")
        if self.config.auto_multiple and isinstance(started, int) and started > self.multiple:
            version = stored["run"].get("autocompress")
            raise UserError(f"run_dir {self.run_dir} holds a run of autocompress {version} whose channel_multiple "
                            f"auto is {started}; this version ({__version__}) takes {self.multiple} here",
                            f"continue it with autocompress {version}, or start it again in another run_dir")

    def _refuse_changes(self, stored: dict, changed: list[str]) -> None:
        """UserError naming what differs between a run folder's ``config.yaml`` (``stored``) and this call: the
        base model's weights first, its structure (:func:`~autocompress.analysis.structure_digest`), then the
        loaders' sizes, the settings (``changed``), and last the settings the data decide (:attr:`from_data`: alone,
        the data differ); or the number of processes."""
        if "data" in stored["run"]:  # folders of earlier versions hold no sizes
            changed = changed + setting_changes(stored["run"]["data"], self._data_sizes(), "data")
        from_data = [change for change in changed if change.partition(":")[0] in self.from_data]
        changed = sorted(changed, key=lambda change: (not change.startswith("data."), change in from_data))
        if stored["run"].get("base_structure_sha256", self.structure) != self.structure:  # none before 0.10.0
            changed.insert(0, "model structure (its printed form, or an attribute of a module of your own such as a "
                              "drop-path rate)")
        if stored["run"].get("base_model_sha256") != self.base_digest:
            changed.insert(0, "model weights")
        if changed and from_data == changed:  # only what the data decide: the data differ
            raise UserError(f"run_dir {self.run_dir} was started on other data: the settings it decides "
                            f"differ ({'; '.join(changed)}, set auto)",
                            "pass the train_loader / val_loader the run started with, or another run_dir")
        if changed:
            version = stored["run"].get("autocompress")
            other = f" of autocompress {version} (this is {__version__}, whose defaults may differ)" \
                if version != __version__ else ""
            raise UserError(f"run_dir {self.run_dir} holds a run{other} with other settings "
                            f"({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''})",
                            "pass the same model and settings to continue it, or another run_dir")
        started = int(stored["run"].get("world_size") or 1)
        if started != self.world.size:
            raise UserError(f"run_dir {self.run_dir} holds a run of {started} process(es), not "
                            f"{self.world.size}", f"continue it with {started} process(es)")

    def _continued(self) -> str:
        """The log line of a continued run: what its folder holds and that finished phases are not run again."""
        same = "the same settings, base weights and loader sizes; training data is compared by its size only"
        if self.folder.is_done("final", "final"):
            return (f"run_dir {self.run_dir} holds this run, finished ({same}): its result is read back after the "
                    "set-up's checks, nothing is trained")
        done = len(self.folder.done())
        threads = torch.get_num_threads()  # the run's own (_open_folder), which its results depend on
        at = f", at the {threads} thread(s) it started with (not {self.threads})" if threads != self.threads else ""
        return (f"run_dir {self.run_dir} holds this run ({same}): continuing it{at}, {done} finished phase(s) read "
                "back and not run again")

    def _check_same_validation(self) -> None:
        """A continued run scores its base as when it started (the ``base`` record of its folder), within
        :data:`VALIDATION_DRIFT` of the score scale; else UserError: the validation data (or ``score_fn``) differ,
        or the training data where the base's BatchNorm statistics were re-estimated on it, and the run's stored
        scores and choices were made on other data (the run folder compares the loaders' sizes, not their
        content). Nothing to compare in a new folder."""
        records = self.folder.records if self.folder.holds_run() else []
        stored = next((r for r in records if r.get("event") == "base"), None)
        then = None if stored is None else self.pipeline.score_of(stored)
        if then is None or abs(then - self.base_score) <= VALIDATION_DRIFT * self.pipeline.score_scale:
            return
        trained = any(r.get("event") == "batchnorm" and r.get("round") == 0 and r.get("kept")
                      for r in [*records, *self.base_records])  # then or now: statistics from training batches
        raise UserError(f"run_dir {self.run_dir} was started on other data: the base model scores "
                        f"{self.pipeline.describe(self.base_score)} on the validation data now, "
                        f"{self.pipeline.describe(then)} when the run started" + (
                            " (its BatchNorm statistics are re-estimated on training batches, so other training "
                            "data changes its score too)" if trained else ""),
                        "pass the " + ("train_loader / " if trained else "") + "val_loader / score_fn the run "
                        "started with, or another run_dir")

    def _claim_folder(self) -> None:
        """A new run's folder holds its settings from now on (``config.yaml``, with the channel multiple and the
        schedule the set-up resolved)."""
        if not self.folder.holds_run():
            self.folder.claim(self._stored_settings())

    def _release(self) -> None:
        """Release the run folder (rank 0's; a lock file it created for a run that never started is removed)
        and restore the caller's thread count."""
        if self.folder is not None:
            self.folder.release()
        torch.set_num_threads(self.threads)

    def _give_back_block(self) -> int:
        """The channel block a params / flops fit gives channels back on (:func:`~autocompress.sampling.on_block`):
        under ``auto`` the device's (:func:`~autocompress.alignment.channel_block`; its multiple may be below it)
        where a filter group of the first space sets channels CPU kernels process in blocks
        (:meth:`~autocompress.space.PruningSpace.sets_blocked_channels`), else the multiple (a model of Conv1d
        layers: neither the log nor an overshoot warning names a block that is not used)."""
        blocked = any(self.first_space.sets_blocked_channels(g.name) for g in self.first_space.filter_groups)
        return channel_block(str(self.device)) if self.config.auto_multiple and blocked else self.multiple

    def _check_reachable(self, base: nn.Module) -> None:
        """UserError, before any work, when the target cannot be reached even at the narrowest widths allowed.
        A channel multiple that ``auto`` chose (set, or the default) falls back to the smaller ones of
        :meth:`_fallbacks` in turn when it cannot reach the target, each logged once one reaches it (a latency
        target with a new lookup table)."""
        chain, said = [self.multiple, *self._fallbacks()], []  # fall-backs are logged once one reaches the target
        for index, multiple in enumerate(chain):
            last = index == len(chain) - 1
            if index:
                said.append(f"channel multiple: {self.multiple} (auto) cannot reach {self.target}; falling back to "
                            f"{multiple}, which runs slower per MAC removed on this CPU" + (
                                f" (channels a fit does not need are given back on the {self.block}-channel "
                                "block only)" if self.table is None and on_block(self.block, multiple) else ""))
                self.multiple = self.pipeline.channel_multiple = multiple
                # groups the coarser multiple kept whole may narrow now: their compaction is probed again
                self.first_space = self.pipeline.compactable_space(self.first_model,
                                                                   self.first_space.at_multiple(multiple))
                if self.table is not None:
                    self.table = self._latency_table(base)
            try:
                self._sampler(self.first_space, self.factor, 1.0)
            except UserError:
                if last:
                    raise
                continue
            for line in said:
                self.pipeline.log(line)
            return

    def _fallbacks(self) -> list[int]:
        """The smaller channel multiples ``auto`` may fall back to, in order: 8 (the smaller CPU block), then for a
        flops or params target :data:`~autocompress.alignment.LAYOUT_MULTIPLE` and 1 (any width; a latency target's
        table would time every width); none for a multiple set explicitly."""
        if not self.config.auto_multiple:
            return []
        finer = () if self.table is not None else (LAYOUT_MULTIPLE, 1)
        return [m for m in (FALLBACK, *finer) if m < self.multiple]

    def _latency_table(self, base: nn.Module) -> LatencyTable:
        """The lookup table of a latency target (measured, or from the cache), before any training; under
        torch.distributed rank 0 builds it and every rank uses that one (timings differ between processes). Warns
        first when recurrent layers, which it does not time, hold much of the MACs
        (:func:`autocompress.latency.unpriced_warning`)."""
        if self.world.is_main and (warning := unpriced_warning(base, self.example)):
            logging.getLogger("autocompress").warning(warning)
        table = distributed.on_main(lambda: build_table(base, self.example, self.first_space, self.config.latency,
                                                        multiple=self.multiple, columns="column" in self.config.kinds,
                                                        layer_norm=self.config.layer_norm, log=self.pipeline.log))
        if table.column_useless and "column" in self.config.kinds:
            self.pipeline.log(f"latency target: column pruning saves nothing in {self.config.latency.runtime} for "
                              f"{len(table.column_useless)} layer(s) ({', '.join(table.column_useless[:4])}...); "
                              "their columns are not pruned")
        return table

    def _factor(self) -> float:
        """The target as a factor over the base: the target's own, or for ``latency=Nms`` the measured base
        latency over N (UserError when the base is already that fast)."""
        if self.target.ms is None:
            return float(self.target.factor)
        factor = self.table.base_ms / self.target.ms
        self.pipeline.log(f"target {self.target}: the base runs in {self.table.base_ms:.3g} ms now "
                          f"({self.config.latency.runtime}, batch {self.config.latency.batch}), so the target is "
                          f"a {factor:.3g}x speedup")
        if factor <= 1.0:
            raise UserError(f"target {self.target}: the base model already runs in {self.table.base_ms:.3g} ms "
                            f"({self.config.latency.runtime}, batch {self.config.latency.batch})",
                            "give a latency below the base's, or no compression is needed")
        return factor

    def _sampler(self, space, target: float, base_ratio: float) -> ActionSampler:
        """Sampler for a round's ``target`` (relative to the base) on a model ``base_ratio`` times smaller: a params
        or flops target's fits aim :data:`TARGET_TOLERANCE` below it (:class:`~autocompress.sampling.Unreachable`
        names the target itself); a latency target's cost is the lookup table's estimate (columns that save
        nothing are not pruned)."""
        factor = max(1.0, target / base_ratio)
        if self.table is None:
            try:
                return ActionSampler.from_space(space, self.target.objective, max(1.0, factor * (1 - TARGET_TOLERANCE)),
                                                kinds=self.config.kinds, r_max=self.config.max_r, block=self.block,
                                                guidance=self.guidance)
            except Unreachable as exc:
                raise exc.nominal(factor) from None
        units = [u for u in units_from_space(space, "flops") if u.kind in self.config.kinds
                 and not (u.kind == "column" and u.name in self.table.column_useless)]
        table = self.table
        units = latency_guidance(units, space, table, self.guidance)

        def cost(action: np.ndarray) -> float:
            return table.estimate_space(space, rates_dict(units, action))

        try:
            return ActionSampler(units, cost, factor, r_max=self.config.max_r, give_back="lightest",
                                 keeps=space_keeps(space, units))
        except UserError as exc:  # unreachable: say so in the terms of a latency target
            reached = cost(np.zeros(len(units))) / cost(np.full(len(units), self.config.max_r))
            raise Unreachable(factor, reached, self.config.max_r, problem=(
                f"target {self.target} cannot be reached in {self.config.latency.runtime}: by the lookup table the "
                f"narrowest widths allowed (max_r {self.config.max_r:g}, channel multiple {self.multiple}) run only "
                f"{short_of(reached, factor)}x as fast as this round's model (fixed costs dominate a model this small "
                "or fast)"), fix="lower the target" + (", or give a smaller channel_multiple" if self.multiple > 1
                                                       else "")) from exc

    def _count(self, model: nn.Module) -> float:
        if self.table is not None:
            return self.table.estimate_model(model)
        return self.pipeline.params(model) if self.target.objective == "params" else self.pipeline.macs(model)

    def _base_count(self) -> float:
        if self.table is not None:
            return self.table.base_ms
        return self.base_params if self.target.objective == "params" else self.base_macs

    # --- the run --------------------------------------------------------------------------------------
    def run(self) -> CompressResult:
        """Run (or finish) every round and the final table; release the run folder."""
        try:
            return self._run()
        finally:
            self._release()

    def _run(self) -> CompressResult:
        base = self.pipeline.base_model
        self.base_params, self.base_macs = self.pipeline.params(base), self.pipeline.macs(base)
        if not self.store.is_done("base", "base"):
            self.store.finish("base", "base", [{"event": "base", "params": self.base_params, "macs": self.base_macs,
                                                **self.pipeline.scored(self.base_score)}, *self.base_records])
        model, space = self.first_model, self.first_space
        compact_model = None
        for index, target in enumerate(self.targets, start=1):
            if index > 1:
                space = self.pipeline.space(model)
            state = RoundState(index, target, model, space)
            self._search(state)
            self.pipeline.run_round(state, last=index == len(self.targets))
            model, compact_model = state.model, state.compact_model
        if not self.store.is_done("final", "final"):  # rank 0 saves model.pt and measures
            records = self.store.records  # a collective: every rank reads the records
            seconds, searched = report.phase_seconds(records), _searched_reduction(records)
            self.store.finish("final", "final", [distributed.on_main(lambda: self._final(compact_model, seconds,
                                                                                         searched))])
        result = self._result(compact_model)
        self._check_target(result, compact_model)
        self._check_latency(result, compact_model)
        return result

    def _search(self, state: RoundState) -> None:
        """The round's rates: guided simulated annealing (or one uniform rate) meeting the round's target."""
        base = self._base_count()
        base_ratio = base / self._count(state.model)
        try:
            sampler = self._sampler(state.space, state.target, base_ratio)
        except UserError as exc:
            if state.index == 1:
                raise
            raise UserError(f"round {state.index} cannot go on to {self.target}: the model the earlier rounds left is "
                            f"{base_ratio:.3g}x, and from it {exc}", "lower the target, or give fewer rounds "
                            "(rounds, or a smaller budget)") from None
        # no search: the start is the round's rates, chosen once on the first round's model (or read back)
        if self.config.search.start == AUTO and self.config.search.max_evaluations == 1 and \
                self.config.search_mode != "uniform" and self._start_choice is None:
            self._start_choice = self.pipeline.settle_start(state, lambda: self._starts(state, sampler),
                                                            rounds=len(self.targets))
            self.config = self.pipeline.config  # the optimiser, when the start's probe settled it
        if self.config.retrain.optimizer == AUTO:  # the search's fine-tuning scorer trains with it: settled first
            self._settle_optimizer(state, sampler)
        if self.store.is_done(state.index, "search"):
            state.rates = self.store.load(state.index, "search")["rates"]
            state.budget = self._budget(state, sampler, base, base_ratio)
            return
        started = time.perf_counter()
        if self.config.search_mode == "uniform":  # ablation: one rate for every unit, no search
            result = AnnealingResult(best_action=self._first_action(state, sampler), best_score=float("nan"),
                                     trajectory=[])
        elif self.config.search.max_evaluations == 1:  # one candidate: nothing to compare, so nothing to score
            self.pipeline.log(f"round {state.index} search: the {self._start_name()} start, not scored "
                              "(search.max_evaluations 1: no candidate to compare it with)")
            result = AnnealingResult(best_action=self._start(state, sampler), best_score=float("nan"),
                                     trajectory=[])
        else:
            result = self._anneal(state, sampler)
        action, calibration = result.best_action, []
        if self.table is not None:
            action, sampler, calibration = self._calibrate(state, action, base_ratio)
        state.rates = sampler.to_rates(action)
        state.budget = self._budget(state, sampler, base, base_ratio)
        kept = {unit.name: width for unit, width in zip(sampler.units, sampler.keeps(action)) if unit.kind == "filter"}
        record = {"round": state.index, "target": state.target, "rates": state.rates, "filters": kept,
                  "best_score": result.best_score,
                  "compression": sampler.compression(action) * base_ratio, "counted": self._counted(),
                  **({"calibration": calibration} if calibration else {})}
        early = _overshoot_warning(record["compression"], self.target, self.multiple, self.block,
                                   what=f"round {state.index}'s rates give")
        for early in (early, _bottleneck_warning(state.space, kept, what=f"round {state.index}'s rates keep")):
            if early:  # known before the round trains; the final table says it again of the compact model
                logging.getLogger("autocompress").warning(f"before retraining, {early}")
        self.store.save(state.index, "search", {**record, "trajectory": result.trajectory})
        trajectory = [{k: v for k, v in step.items() if k != "action"} for step in result.trajectory]
        self.store.finish(state.index, "search", [
            {"event": "search", **record, "trajectory": trajectory},
            {"event": "phase", "round": state.index, "phase": "search", "seconds": time.perf_counter() - started}])

    def _settle_optimizer(self, state: RoundState, sampler: ActionSampler) -> None:
        """``retrain.optimizer: auto`` for a classifier, chosen by the probe on the base hard-pruned at the first
        round's start (uniform rates for ``search_mode: uniform``):
        :meth:`autocompress.rounds.Pipeline.settle_optimizer`."""
        self.pipeline.settle_optimizer(state, rounds=len(self.targets),
                                       rates=lambda: sampler.to_rates(self._first_action(state, sampler)))
        self.config = self.pipeline.config

    def _first_action(self, state: RoundState, sampler: ActionSampler) -> np.ndarray:
        """The action the round starts from: one rate for every unit under ``search_mode: uniform`` (the
        ablation's result), else the search's start (:meth:`_start`)."""
        if self.config.search_mode == "uniform":
            return sampler.meet(np.ones(len(sampler.units)))
        return self._start(state, sampler)

    def _start_name(self) -> str:
        """``search.start``, or for ``auto`` the start the probe chose (:meth:`_search`; guided before it, and for a
        search)."""
        start = self.config.search.start
        return (self._start_choice or "guided") if start == AUTO else start

    def _starts(self, state: RoundState, sampler: ActionSampler) -> tuple[dict[str, dict], str]:
        """The rates of the guided and magnitude starts (start name -> rates), and why the magnitude start is not
        among them ("" when it is): it cannot meet the round's target with filters alone, or it keeps the guided
        one's widths."""
        guided = sampler.initial_action()
        starts = {"guided": sampler.to_rates(guided)}
        magnitude = sampler.magnitude_action(relative_importance(state.space, state.model))
        if magnitude is None:
            return starts, "the magnitude start cannot meet the target with filters alone"
        if list(sampler.keeps(magnitude)) == list(sampler.keeps(guided)):
            return starts, "the magnitude start keeps the guided start's widths"
        starts["magnitude"] = sampler.to_rates(magnitude)
        return starts, ""

    def _start(self, state: RoundState, sampler: ActionSampler) -> np.ndarray:
        """The round's starting action (:meth:`_start_name`): the guided start (:meth:`ActionSampler.initial_action`),
        or the magnitude start on the round's model (:meth:`ActionSampler.magnitude_action`; the guided one when
        the filters alone cannot meet the round's target, logged)."""
        if self._start_name() == "magnitude":
            action = sampler.magnitude_action(relative_importance(state.space, state.model))
            if action is not None:
                return action
            self.pipeline.log(f"round {state.index} search: the filters alone cannot meet the round's target, so it "
                              "starts from the guided start (search.start)")
        return sampler.initial_action()

    def _counted(self) -> str:
        """What the search record's ``compression`` divides (base / candidate): ``"params"``, ``"macs"`` (a flops
        target) or ``"latency estimate"`` (a latency target's lookup table)."""
        if self.table is not None:
            return "latency estimate"
        return "macs" if self.target.objective == "flops" else "params"

    def _budget(self, state: RoundState, sampler: ActionSampler, base: float, base_ratio: float) -> Budget | None:
        """The round's :class:`Budget`: at most ``base / (target x (1 - TARGET_TOLERANCE))``; refits scale the
        searched rates (read back from ``state.rates``) to the round's target divided by a slack. None for a
        latency target: its rates were measured in the runtime (:meth:`_calibrate`), and purification only makes
        that model faster."""
        if self.table is not None:
            return None
        action = np.array([state.rates[unit.kind][unit.name] for unit in sampler.units])

        def refit(slack: float) -> dict:
            looser = self._sampler(state.space, state.target / slack, base_ratio)
            return looser.to_rates(looser.rescale(action))

        return Budget(limit=base / (state.target * (1 - TARGET_TOLERANCE)), count=self._count, refit=refit,
                      unit="MACs" if self.target.objective == "flops" else "parameters")

    def _calibrate(self, state: RoundState, action: np.ndarray, base_ratio: float
                   ) -> tuple[np.ndarray, ActionSampler, list[dict]]:
        """A latency target's search result, measured before any training (:func:`calibrate`): the round's
        model projected at the search's rates re-fitted to an aim and compacted is timed against the base in
        the runtime. Training does not change the widths, so the final model runs at what was measured here (up
        to noise). A candidate within half of ``latency.tolerance`` below the target meets it here (the final
        check allows the whole tolerance). UserError, before any training, when no measured candidate comes
        within ``latency.tolerance`` of the target. Returns the action, its sampler and one record per
        measurement."""
        def fit(aim: float) -> tuple[tuple[np.ndarray, ActionSampler, float], float]:
            sampler = self._sampler(state.space, aim, base_ratio)
            fitted = sampler.rescale(action)
            return (fitted, sampler, aim), sampler.compression(fitted) * base_ratio

        def measure(candidate: tuple[np.ndarray, ActionSampler, float]) -> float:
            fitted, sampler, aim = candidate  # rank 0 measures, so every rank keeps the same candidate
            speedup = distributed.on_main(lambda: self._measured_speedup(state, sampler.to_rates(fitted)))
            self.pipeline.log(f"round {state.index} search: aimed at {aim:.3g}x by the lookup table, measured "
                              f"{speedup:.3g}x")
            return speedup

        settings = self.config.latency
        (fitted, sampler, _aim), records = calibrate(state.target, fit, measure, floor=1 - settings.tolerance / 2)
        best = max(r["measured"] for r in records)
        if best < state.target * (1 - settings.tolerance):
            stopped = ("; the faster aim the measurements called for is beyond the lookup table's narrowest widths"
                       if len(records) < CALIBRATION_STEPS else "")
            raise UserError(f"target {self.target} cannot be met in {settings.runtime}: the search's candidates "
                            f"measured at most {best:.3g}x in {len(records)} measurement(s) before any training "
                            f"(round target {state.target:.3g}x, latency.tolerance {settings.tolerance:g}){stopped}",
                            "lower the target, or use another runtime / batch size")
        return fitted, sampler, records

    def _measured_speedup(self, state: RoundState, rates: dict) -> float:
        """Measured speedup over the base of the round's model projected at ``rates`` and compacted (no training; its
        LayerNorms in the run's ``layer_norm`` form, as the final model will have them)."""
        masks = project(state.space, state.model, rates)
        candidate = compact(state.model, state.space.param_masks(masks), self.example,
                            channel_multiple=self.multiple, layer_norm=self.config.layer_norm).model
        return self._timed_against_base(candidate)["speedup"]

    def _timed_against_base(self, compact_model: nn.Module, runs: int | None = None) -> dict:
        """``base_ms``, ``compressed_ms`` (its deployed form) and ``speedup`` at the latency target's batch,
        interleaved in the runtime (``runs``: default ``latency.runs``)."""
        settings = self.config.latency
        form = deployed_form(compact_model, self.example, settings, batches=[settings.batch]).model
        timing = measure_models({"base": self.pipeline.base_model, "compressed": form}, self.example, settings,
                                batches=[settings.batch], runs=runs)[settings.batch]
        base_ms, compressed_ms = timing["base"].median_ms, timing["compressed"].median_ms
        return {"base_ms": base_ms, "compressed_ms": compressed_ms, "speedup": base_ms / compressed_ms}

    def _anneal(self, state: RoundState, sampler: ActionSampler) -> AnnealingResult:
        """Guided simulated annealing over the sampler's actions, scored by quick evaluation (in % for top-1)."""
        settings = self.config.quick_eval
        with self.task.seeded(phase_seed(self.config.seed, state.index, "search")):
            evaluator = QuickEvaluator(state.model, state.space, self.task, **dataclasses.asdict(settings),
                                       optimizer=self.config.retrain.optimizer,
                                       teacher=self.pipeline.base_model, example_inputs=self.example,
                                       seed=phase_seed(self.config.seed, state.index, "search"),
                                       layer_norm=self.config.layer_norm)
        self.pipeline.log(f"round {state.index} search: quick evaluation by {evaluator.describe()}")
        scale = 100.0 if self.task.score_fn is None else 1.0
        config = self.config.search.annealing(phase_seed(self.config.seed, state.index, "search"))
        planned = config.planned_evaluations()
        with tqdm(total=planned, desc=f"round {state.index} search", disable=not self.pipeline.progress,
                  leave=False) as bar:
            perturb, record = sampler.explorer(config.perturbation_magnitude, self.config.search.moves)
            started = time.perf_counter()

            def on_step(step) -> None:
                record(step)
                cost = ""
                if bar.n == 0 and planned > 1:  # the first step: what the whole search will cost
                    each = (time.perf_counter() - started) / step.evaluations
                    bound = ("search.max_evaluations" if planned >= config.max_evaluations else
                             f"the temperature falling below search.stop_temperature {config.stop_temperature:g} "
                             f"first; search.max_evaluations {config.max_evaluations} is not reached")
                    cost = (f"; {each:.3g} s each, about {each * planned / 60:.2g} min for the search's {planned} "
                            f"({bound})")
                bar.update(step.evaluations - bar.n)
                bar.set_postfix(best=f"{step.best_score:.4g}", T=f"{step.temperature:.4f}")
                self.pipeline.log(f"round {state.index} search: evaluation {step.evaluations}/{planned}, best score "
                                  f"{step.best_score:.4g}, temperature {step.temperature:.4f}{cost}")

            result = simulated_annealing(self._start(state, sampler),
                                         lambda action: scale * evaluator.score(sampler.to_rates(action)).top1,
                                         perturb, config, on_step=on_step, map_fn=distributed.parallel_map)
        evaluations = len(result.trajectory)
        why = (f"max_evaluations {config.max_evaluations} reached" if evaluations >= config.max_evaluations else
               f"the temperature fell below search.stop_temperature {config.stop_temperature:g}")
        distinct = "" if self.world.active else (  # each rank scores its share of the candidates
            f"; {evaluator.distinct} distinct candidates scored (the others project to widths already scored, "
            "whose score is reused)")
        self.pipeline.log(f"round {state.index} search: stopped after {evaluations} evaluations ({why}){distinct}")
        return result

    def _check_target(self, result: CompressResult, compact_model: nn.Module) -> None:
        """A target is met or refused: :class:`TargetMissed` carrying ``result`` when the compact model's own count
        misses it (compaction kept channels dense that the search counted as removed, or no refit after
        purification met the limit); the run folder keeps every phase and the model. A latency target is checked
        on the final record's measurement (:meth:`_check_latency`)."""
        if self.table is not None:
            return
        count = self._count(compact_model)  # a flops target's count runs a traced forward: once
        reached = self._base_count() / max(count, 1)
        if reached < self.factor * (1 - TARGET_TOLERANCE):
            unit = "MACs" if self.target.objective == "flops" else "parameters"
            raise TargetMissed(f"target {self.target} missed: the trained compact model has "
                               f"{count:,.0f} {unit}, {reached:.4g}x fewer than the base (see "
                               "the round records: refit, dead_channels_kept)",
                               f"the trained model is in the error's result"
                               f"{'' if self.run_dir is None else f' and in {self.run_dir}'}; to meet the target, "
                               f"run again asking for slightly more (e.g. {self.target.objective}="
                               f"{self.factor * self.factor / reached:.3g}x)", result=result)

    def _check_latency(self, result: CompressResult, compact_model: nn.Module) -> None:
        """A latency target is met or refused. Met when the final record's measured speedup at the target's batch
        is at least ``(1 - latency.tolerance)`` x the target; below it, base and compact model are timed again
        with :data:`RECHECK_RUNS` x ``latency.runs`` (one noisy measurement does not refuse a trained model) and
        that decides; the second timing is a ``latency_recheck`` record (metrics and ``result.records``). Refused:
        :class:`TargetMissed` with both measurements, carrying ``result`` (and the run folder, when there is one)."""
        if self.table is None:
            return
        settings = self.config.latency
        first = result.final["deployed"]["batches"][str(settings.batch)]
        limit = self.factor * (1 - settings.tolerance)
        if first["speedup"] >= limit:
            return
        runs = RECHECK_RUNS * settings.runs
        again = distributed.on_main(lambda: self._timed_against_base(compact_model, runs=runs))
        self.pipeline.log(f"latency target: measured {first['speedup']:.3g}x, below {limit:.3g}x; timed again with "
                          f"{runs} runs: {again['speedup']:.3g}x")
        recheck = {"event": "latency_recheck", "batch": settings.batch, "runs": runs, **again}
        self.store.record(recheck)
        result.records.append(recheck)
        if again["speedup"] >= limit:
            return
        raise TargetMissed(f"target {self.target} missed: the compact model runs in {again['compressed_ms']:.3g} ms "
                           f"vs {again['base_ms']:.3g} ms for the base ({again['speedup']:.2f}x; first measured "
                           f"{first['speedup']:.2f}x; {settings.runtime}, batch {settings.batch}, {settings.threads} "
                           f"thread(s); the lookup table estimated "
                           f"{result.final['latency_estimate']['estimate_ms']:.3g} ms)",
                           f"the trained model is in the error's result"
                           f"{'' if self.run_dir is None else f' and in {self.run_dir}'}; to get this speed, ask for "
                           "a little more (a larger speedup or fewer ms) or accept the model's measured speed, or "
                           "measure on a quieter machine (latency.runs)", result=result)

    def _deployed(self, compact_model: nn.Module) -> dict:
        """The final record's deployed-latency fields: interleaved base / compact timings in the deployment
        runtime (:func:`autocompress.latency.measure_models`), a loud warning when the compact model is slower
        (or, for a params / flops target, not much faster at many fewer MACs:
        :func:`~autocompress.latency.speed_warning`), and for a latency target the lookup table's estimate against
        the measurement. The compact model is timed in its deployed form
        (:func:`autocompress.deployment.deployed_form`: each column layer stored or dense, whichever runs faster;
        ``deployed_form`` in the record). A model the runtime cannot take (an op it cannot export, a shape
        written into the forward) gets ``deployed: None`` and a warning saying why."""
        settings = self.config.latency
        batches = list(dict.fromkeys((*settings.batches, settings.batch)))
        fields: dict[str, Any] = {"deployed": None, "channel_multiple": self.multiple, "warnings": []}
        try:
            limit = self.base_macs / self.factor if self.target.objective == "flops" else None
            form = deployed_form(compact_model, self.example, settings, max_macs=limit)
            fields["deployed_form"] = form.summary()
            fields["deployed_macs"] = self.pipeline.macs(form.model)
            models = {"base": self.pipeline.base_model, "compressed": form.model}
            if limit is not None and (uniform := self._uniform_reference(fields["deployed_macs"])) is not None:
                models["uniform"] = uniform
            timings = measure_models(models, self.example, settings, batches=batches)
        except UserError as exc:  # e.g. an op the exporter lacks: the run's result stands, without this column
            if self.table is not None:  # a latency target cannot be checked without it
                raise
            fields["warnings"].append(f"deployed latency not measured: {exc}")
            logging.getLogger("autocompress").warning(fields["warnings"][-1])
            return fields
        deployed = fields["deployed"] = deployed_summary(timings, settings)
        macs_factor = self.base_macs / max(fields["deployed_macs"], 1) if self.table is None else None
        warning = speed_warning(deployed, macs_factor=macs_factor, aligned=self.multiple > 1)
        if warning and settings.runtime == "onnxruntime":
            layout = {name: blocked_convolutions(model, self.example) for name, model in
                      (("base", self.pipeline.base_model), ("compressed", form.model))}
            warning = speed_warning(deployed, macs_factor=macs_factor, aligned=self.multiple > 1, layout=layout)
        uniform = None if "uniform" not in models or noisy_timing_warning(deployed) else uniform_warning(
            deployed, self._uniform_fix(deployed))  # (noisy timings are warned about as such)
        for warning in (warning, uniform):
            if warning:
                logging.getLogger("autocompress").warning(warning)
                fields["warnings"].append(warning)
        if self.table is not None:
            estimate = self.table.estimate_model(compact_model)
            measured = timings[settings.batch]["compressed"].median_ms
            fields["latency_estimate"] = {"estimate_ms": estimate, "measured_ms": measured, "batch": settings.batch,
                                          "error": (estimate - measured) / measured, "target_factor": self.factor,
                                          "target_ms": self.target.ms, "table": self.table.summary()}
            warning = self._ms_drift_warning(timings[settings.batch])
            if warning:
                logging.getLogger("autocompress").warning(warning)
                fields["warnings"].append(warning)
        return fields

    def _uniform_reference(self, macs: int) -> nn.Module | None:
        """A flops target's speed reference: the base pruned at one rate to ``macs`` (the compact model's)
        (:func:`autocompress.deployment.uniform_reference`, over the first round's space); None where filter
        pruning alone cannot reach them."""
        return uniform_reference(self.first_space, densify(self.pipeline.base_model), self.example,
                                 self.base_macs / max(macs, 1), r_max=self.config.max_r, block=self.block)

    def _uniform_fix(self, deployed: dict) -> str:
        """What :func:`~autocompress.latency.uniform_warning` tells the user to change: the per-layer guidance where
        the per-channel one chose the widths (fresh user 90's PointNet at flops=4x: Torch-Pruning's speed at the same
        top-1), and a latency target at the speedup the uniform-rate reference reached at ``latency.batch`` (always
        one of the timed batches)."""
        row = deployed["batches"][str(self.config.latency.batch)]
        latency = (f"a latency target (target latency={row['base_ms'] / row['uniform_ms']:.2g}x: the uniform rates' "
                   f"speedup at batch {self.config.latency.batch}), which times candidates in the runtime")
        if self.guidance != "channel":
            return f"for speed, give {latency}"
        return ("for speed at this target, set search.guidance: layer (the per-channel guidance prunes hardest the "
                f"channels that cost the most MACs, whatever their time), or give {latency}")

    def _ms_drift_warning(self, timing: dict) -> str | None:
        """For a ``latency=Nms`` target, the warning when the final timing of the compact model is above N ms:
        the target was converted to a speedup against the base as timed before the search (``table.base_ms``),
        and it is checked as that speedup over the base timed side by side (robust to the machine's speed
        changing), so the absolute milliseconds can drift with the machine; the warning says by how much."""
        if self.target.ms is None or timing["compressed"].median_ms <= self.target.ms:
            return None
        base_now, compressed = timing["base"].median_ms, timing["compressed"].median_ms
        return (f"target {self.target}: the compressed model measured {compressed:.3g} ms in the final "
                f"timing, above {self.target.ms:g} ms; the base measured {base_now:.3g} ms there against "
                f"{self.table.base_ms:.3g} ms when the target was converted to a {self.factor:.3g}x speedup (the "
                f"machine ran {base_now / self.table.base_ms:.2f}x as slow); the target is checked as that speedup "
                f"over the base timed side by side: {base_now / compressed:.3g}x")

    def _final(self, compact_model: nn.Module, phase_seconds: dict[str, float], searched: float | None) -> dict:
        """The final table: base vs compressed (params, MACs, validation score, latency at batch 1 and 64), and
        ``phase_seconds`` (:func:`autocompress.report.phase_seconds`); ``searched``: the last round's searched
        reduction (:func:`_searched_reduction`), which an overshoot warning compares."""
        if self.run_dir is not None:
            path = self.run_dir / "model.pt"
            (self.save or self._save_default)(path, compact_model)
        deployed = self._deployed(compact_model)
        rows = []
        models = {"base": self.pipeline.base_model, "compressed": compact_model}
        latency, runs = self._eager_latencies(models)
        for name, net in models.items():
            rows.append({"model": name, "params": self.pipeline.params(net), "macs": self.pipeline.macs(net),
                         **self.pipeline.scored(self.base_score if name == "base" else self.task.score(net)),
                         "latency_b1_ms": latency[1][name].median_ms, "latency_b64_ms": latency[64][name].median_ms,
                         **{f"deployed_b{b}_ms": row[f"{name}_ms"]
                            for b, row in (deployed["deployed"] or {"batches": {}})["batches"].items()},
                         **(self.final_columns(name, net) if self.final_columns else {})})
        modules = list(compact_model.modules())
        for warning in (_eager_slower_warning(*rows, self.device, runs,
                                              latency_target=self.table is not None, aligned=self.multiple > 1,
                                              column_layers=any(isinstance(m, COLUMN_LAYERS) for m in modules),
                                              padded_norms=sum(isinstance(m, PADDED_NORMS) for m in modules)),
                        _accuracy_warning(*rows, self.pipeline.chance, self.target),
                        _teacher_warning(*rows, self.config.distillation, own_loop=self.own_loop),
                        _overshoot_warning(_reduction(*rows, self.target), self.target, self.multiple, self.block,
                                           searched=searched),
                        self._latency_overshoot_warning(deployed), noisy_timing_warning(deployed["deployed"]),
                        _eager_noisy_warning(latency),
                        _bottleneck_warning(self.first_space, _compact_widths(self.first_space, compact_model)),
                        self.first_space.unreached_warning(), self._base_batchnorm_warning(),
                        _unread_inputs_warning(self.pipeline.base_model, compact_model, self.example),
                        *self.task.warnings):
            if warning:
                logging.getLogger("autocompress").warning(warning)
                deployed["warnings"].append(warning)
        return {"event": "final", "target": str(self.target), "rows": rows, "threads": torch.get_num_threads(),
                "device": str(self.device), "latency_runs": runs,
                "phase_seconds": phase_seconds, "not_filter_pruned": self.first_space.not_filter_pruned(),
                "kept_whole": self.first_space.kept_whole(),
                "schedule": describe(self.config, self.own_loop) if self.config.budget is not None
                else None, **deployed}

    def _latency_overshoot_warning(self, deployed: dict) -> str | None:
        """For a latency target: the warning when the final measured speedup passes it by more than
        :data:`~autocompress.sampling.FAR`: the search chose the widths by timings before training (logged: "aimed
        at ... measured ..."), which a loaded machine or a model of well under a millisecond moves by tens of
        percent (fresh user 69: latency=2x measured 2.16x in the search and 2.58x in the final table, 0.1 ms at
        batch 1); the model lost more than the target needed."""
        if self.table is None or not deployed.get("deployed"):
            return None
        settings = self.config.latency
        speedup = deployed["deployed"]["batches"][str(settings.batch)]["speedup"]
        if speedup <= self.factor * (1 + FAR):
            return None
        return (f"target {self.target} is passed by far: the compact model measures {speedup:.3g}x at batch "
                f"{settings.batch} here, while the search, which timed its candidates before training, took it for "
                "one within the target's tolerance (logged: 'aimed at ... measured ...'); timings on a loaded "
                "machine, or of a model this fast, move by tens of percent: search on a quiet machine, or with more "
                "latency.runs, for a closer fit")

    def _base_batchnorm_warning(self) -> str | None:
        """A warning when the base's own BatchNorm statistics were replaced before the run
        (:meth:`~autocompress.rounds.Pipeline.reestimate_base_batchnorm`) for a rise of its score above
        :data:`~autocompress.rounds.BASE_BN_WARNING` x the score scale: the base row is the re-estimated base."""
        record = next((r for r in self.base_records if r.get("kept")), None)
        if record is None:
            return None
        scores = [self.pipeline.score_of(record, suffix) for suffix in ("_before", "_after")]
        if scores[1] - scores[0] <= BASE_BN_WARNING * self.pipeline.score_scale:
            return None  # (the log said it was replaced)
        before, after = map(self.pipeline.describe, scores)
        return (f"the base model's BatchNorm statistics did not fit its weights ({before} on them, {after} once "
                f"re-estimated on {record['batches']} training batches): the run started from (and distilled from, "
                "where it distils) the re-estimated base, and the base row is that model; check that the inputs "
                "here are those it was trained on (the same normalisation), else train the base longer or with a "
                "larger BatchNorm momentum, or re-estimate its statistics before deploying it")

    def _eager_latencies(self, models: dict[str, nn.Module]) -> tuple[dict, int]:
        """Eager-PyTorch latencies of ``models`` (``base``, ``compressed``) at batch 1 and 64, interleaved medians
        of ``latency_runs``; when the compressed model looks more than :data:`autocompress.latency.SLOWER` times
        slower at either batch, or the runs spread widely (:func:`_eager_noisy`), both batches are timed again with
        :data:`RECHECK_RUNS` x the runs and that measurement stands (one noisy measurement on a shared machine made a
        fresh user's SLOWER warning, another's 7.6x speedup at 4x fewer MACs, 2.1x timed again). Returns
        ``{batch: {name: Timing}}`` and the runs behind it."""
        for runs in (self.config.latency_runs, RECHECK_RUNS * self.config.latency_runs):
            latency = {b: metrics.measure_latencies(models, at_batch(self.example, b), runs=runs) for b in (1, 64)}
            if not _eager_noisy(latency) and not any(_eager_slower(t["compressed"].median_ms, t["base"].median_ms)
                                                     for t in latency.values()):
                break
        return latency, runs

    def _save_default(self, path: Path, compact_model: nn.Module) -> None:
        """``model.pt`` loadable with ``autocompress.load``: the model's class by import path with the constructor
        arguments that rebuild the base (:func:`~autocompress.serialization.constructor_arguments`), or none
        recorded, and then onto a given instance: ``autocompress.load(path, model=MyNet(...))``."""
        cls = type(compact_model)
        kwargs = constructor_arguments(self.pipeline.base_model, self.example)
        load = f"load it with autocompress.load(path, model={cls.__name__}(...)) built as the model you compressed"
        if kwargs is None:
            self.pipeline.log(f"model.pt: {cls.__name__}'s constructor arguments are not recorded ({cls.__name__}() "
                              f"with the model's weights does not compute its outputs or has other layer settings, "
                              f"such as a Dropout or drop-path rate, and they could not be read back from its "
                              f"attributes): {load}")
        if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
            self.pipeline.log(f"model.pt: {cls.__name__} is defined in the script that ran (or in a function), so "
                              f"another process cannot import it by name: {load}, or define it in a module")
        save_compact(path, copy.deepcopy(compact_model).cpu(), model_class=cls, model_kwargs=kwargs,
                     metrics={"target": str(self.target), "base_params": self.base_params},
                     config=dataclasses.asdict(self.config),
                     dataset={"input_size": list(self.example[0].shape[1:]), **metrics.input_kind(self.example[0])},
                     sparse="irregular" in self.config.kinds)

    def _result(self, compact_model: nn.Module) -> CompressResult:
        records = self.store.records
        if self.run_dir is not None:
            distributed.on_main(lambda: report.write_report(self.run_dir, title=f"autocompress {self.target}"),
                                share=False)
        final = [r for r in records if r.get("event") == "final"][-1]
        base, compressed = final["rows"]
        return CompressResult(model=compact_model.eval(), rounds=[r for r in records if r.get("event") == "round"],
                              final=final, records=records,
                              compression_rate=base["params"] / max(compressed["params"], 1),
                              mac_reduction=base["macs"] / max(compressed["macs"], 1), run_dir=self.run_dir,
                              phase_seconds=report.phase_seconds(records))


#: a continued run's base may score this much (a fraction of the score scale: top-1 0.1 point, 5 images of 5,000)
#: away from its score when the run started (float sums at another thread count can flip a near tie)
VALIDATION_DRIFT = 0.001
#: a timing that would refuse a latency target or warn of a slower model is repeated with this many times the runs
RECHECK_RUNS = 3


def _eager_noisy(latency: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """The timings of :meth:`Compression._eager_latencies` that spread widely
    (:func:`autocompress.latency.noisy_spreads`)."""
    return noisy_spreads({batch: {name: (t.p10_ms, t.p90_ms) for name, t in timings.items()}
                          for batch, timings in latency.items()})


def _eager_noisy_warning(latency: Mapping[int, Mapping[str, Any]]) -> str | None:
    """The warning when the eager-PyTorch timings stayed noisy after their recheck (:func:`_eager_noisy`), so the
    table's torch columns cannot be read as speedups; None otherwise."""
    noisy = _eager_noisy(latency)
    if not noisy:
        return None
    return (f"the eager PyTorch timings were noisy (10th-90th percentile: {'; '.join(noisy)}), so the torch columns' "
            "speedups are uncertain: time the models again on an idle machine (more latency_runs) before relying on "
            "them")


def _eager_slower(compressed_ms: float, base_ms: float) -> bool:
    """Whether a compact model's eager latency counts as slower than its base's
    (:data:`autocompress.latency.SLOWER`)."""
    return compressed_ms > SLOWER * base_ms


def _eager_slower_warning(base: dict, compressed: dict, device: torch.device, runs: int, *,
                          latency_target: bool = False, aligned: bool = False, column_layers: bool = True,
                          padded_norms: int = 0) -> str | None:
    """The warning when the compact model, as stored, runs more than :data:`autocompress.latency.SLOWER` times
    slower than the base in eager PyTorch (the final table's interleaved ``latency_b<B>_ms`` columns, medians of
    ``runs``), at batch 1 or 64. Its fixes: the torch deployed form only when the model has ``column_layers`` (it
    changes nothing else), ``channel_multiple`` only when the widths were not ``aligned`` already, a latency target
    unless it was one; ``padded_norms`` (the model's PaddedLayerNorm / PaddedGroupNorm count) are named as a cost."""
    slower = [f"batch {b}: {compressed[f'latency_b{b}_ms']:.3g} ms vs {base[f'latency_b{b}_ms']:.3g} ms"
              for b in (1, 64) if _eager_slower(compressed[f"latency_b{b}_ms"], base[f"latency_b{b}_ms"])]
    if not slower:
        return None
    fixes = ["autocompress.deployed_form(model, example, {'runtime': 'torch'}).model"] if column_layers else []
    if not latency_target:
        fixes.append("a latency target" if aligned else "channel_multiple (e.g. auto) or a latency target")
    norms = (f"; its {padded_norms} padded norm(s) (PaddedLayerNorm / PaddedGroupNorm: the exact form of a norm that "
             "lost channels) run as several small ops each in eager PyTorch and as one norm op each in onnxruntime "
             "(autocompress.export.export_onnx); layer_norm: kept compacts a LayerNorm to a plain one") \
        if padded_norms else ""
    return (f"the compressed model as stored is SLOWER than the base in eager PyTorch on {device}: "
            f"{'; '.join(slower)} (median of {runs} interleaved runs, setting latency_runs){norms}"
            + (f"; to run it faster in PyTorch, use {' and '.join(fixes)}" if fixes else ""))


#: a validation top-1 this many points below the base's is a warning in the final table
DROP_WARNING_POINTS = 5.0
#: a caller's validation score (``score_fn``) this fraction of the base's ``|score|`` below it is a warning too
DROP_WARNING_FRACTION = 0.05


def _accuracy_warning(base: dict, compressed: dict, chance: float | None, target: Target) -> str | None:
    """The warning when the compact model's validation top-1 is within 1 point of a random guess (``chance``,
    a fraction; None: not a classification score), or more than :data:`DROP_WARNING_POINTS` below the base's:
    the target was too aggressive for the model and budget. When the base itself scores within 1 point of chance,
    the warning says so instead (the validation data or the base looks broken, and no target is to blame). A
    caller's score (``val_score``): more than :data:`DROP_WARNING_FRACTION` of the base's ``|score|`` below it."""
    top1, base_top1 = compressed.get("val_top1"), base.get("val_top1")
    fix = "lower the target, or give more rounds / epochs (budget, admm.epochs, final_retrain_epochs)"
    score, base_score = compressed.get("val_score"), base.get("val_score")
    if score is not None and base_score is not None and base_score - score > DROP_WARNING_FRACTION * abs(base_score):
        below = (f"{100 * (base_score - score) / abs(base_score):.0f} % of the base's |score| below it "
                 f"({base_score:.4g})" if base_score else
                 f"{base_score - score:.4g} below the base's 0 (a score relative to the base's)")
        return f"the compressed model's validation score {score:.4g} is {below} at target {target}; {fix}"
    if top1 is None:
        return None
    if chance is not None and base_top1 is not None and base_top1 <= 100.0 * chance + 1.0:
        return (f"the base's validation top-1 {base_top1:.2f}% is at chance level ({100.0 * chance:.2f}%): "
                f"the validation data or the base looks broken, so the compressed model's {top1:.2f}% says nothing "
                "about the target; check val_loader's inputs and labels against the training data")
    if chance is not None and top1 <= 100.0 * chance + 1.0:
        return (f"the compressed model's validation top-1 {top1:.2f}% is at chance level "
                f"({100.0 * chance:.2f}%): target {target} is too aggressive for this model and budget; {fix}")
    if base_top1 is not None and base_top1 - top1 > DROP_WARNING_POINTS:
        return (f"the compressed model's validation top-1 {top1:.2f}% is {base_top1 - top1:.1f} points "
                f"below the base's {base_top1:.2f}% at target {target}; {fix}")
    return None


#: how many points above its distillation teacher (the base) the compact model must score for
#: :func:`_teacher_warning` (validation sets of a few thousand images move top-1 by about a point)
ABOVE_TEACHER_POINTS = 1.0


#: training batches :meth:`Compression._fit_gap` scores the base on (30 batches of 64 images put a fresh user's
#: audio net 3.2 points above validation, all 94 of its training set 1.5)
FIT_GAP_BATCHES = 100


def _teacher_warning(base: dict, compressed: dict, distillation, *, own_loop: bool) -> str | None:
    """The warning when the compact model, trained with distillation from the base in every epoch (a caller's
    ``train_fn``, or ``distillation.stop_margin`` null), scores more than :data:`ABOVE_TEACHER_POINTS` above it
    on validation: the base is under-trained, and distillation pulls the compact model toward it (from
    under-trained bases it cost 1.6 to 3.5 points at alpha 0.5, BENCHMARKS.md, "Distillation from a weak
    base")."""
    top1, base_top1 = compressed.get("val_top1"), base.get("val_top1")
    every_epoch = own_loop or distillation.stop_margin is None
    if (not distillation.enabled or not every_epoch or top1 is None or base_top1 is None
            or top1 - base_top1 <= ABOVE_TEACHER_POINTS):
        return None
    return (f"the compressed model's validation top-1 {top1:.2f}% is {top1 - base_top1:.1f} points above "
            f"the base's {base_top1:.2f}%: the base looks under-trained, and distillation (alpha "
            f"{distillation.alpha:g}) pulls the compressed model toward it; set distillation.enabled false (with "
            "budget too) and it may end higher")


def fit_share(gap: float, errors: float) -> tuple[float, str]:
    """The share of the base's validation error (``errors``, %) that its training batches' higher top-1 (``gap``,
    points; negative when lower) makes up, and the sentence saying so (a gap below 0 reads "lower", share 0 %)."""
    share = max(gap / errors, 0.0) if errors > 0 else 0.0
    return share, (f"the base scores {abs(gap):.1f} points of top-1 {'higher' if gap >= 0 else 'lower'} on "
                   f"training batches than on validation, {share:.0%} of its {errors:.1f}% validation error")


def _searched_reduction(records: list[dict]) -> float | None:
    """The reduction (x, of the base) the last round's searched widths reached by the space's count, before
    purification (the last ``search`` record of ``records``); None without one."""
    return next((r["compression"] for r in reversed(records) if r.get("event") == "search" and "compression" in r),
                None)


def _overshoot_warning(reached: float, target: Target, multiple: int, block: int, *,
                       what: str = "the compact model is", searched: float | None = None) -> str | None:
    """For a params / flops target: the warning when a model ``reached`` (params or MACs reduction, x) passes it by
    more than :data:`~autocompress.sampling.FAR` (a fraction), having removed more than asked and likely lost
    accuracy for it: where the last round's ``searched`` widths met it within that (x), purification removed
    channels beyond them that the refit could not give back (fresh user 90's PointNet: 2.45x at flops=2x, the
    searched widths at 2.0x); at aligned widths a layer's allowed widths can be too coarse for a closer fit (a conv
    applied twice on a 32-channel tensor goes from 32 to 16 channels, 4x fewer MACs, at multiple 16); where
    ``auto``'s ``multiple`` is below the CPU's ``block``, channels are given back on the block only (for speed).
    ``what`` names the model in the message."""
    if target.objective not in ("params", "flops") or reached <= target.factor * (1 + FAR):
        return None
    closer = "channel_multiple 1 (any width) fits closest, and may run slower"
    if searched is not None and searched <= target.factor * (1 + FAR):
        fix = (f"the searched widths met it at {searched:.3g}x, and purification then removed channels beyond them "
               "that refitting the rates could not give back (the round's refit record); purification.enabled "
               "false keeps them")
    elif on_block(block, multiple):
        fix = (f"channel_multiple auto ({multiple}) gave channels back on the CPU's {block}-channel block only (a "
               f"width between blocks runs as slowly as the next block); {closer}")
    elif multiple > 1:
        fix = f"channel_multiple {multiple} may allow only coarse widths here; {closer}"
    else:
        fix = "the round records (refit, purification) show where the surplus went"
    return f"target {target} is passed by far: {what} {reached:.3g}x; {fix}"


def _unread_inputs_warning(base: nn.Module, compact_model: nn.Module, inputs: tuple) -> str | None:
    """The warning naming the input features (positions along dimension 1 of a floating-point input) that the
    compact model no longer reads and the base did (:func:`autocompress.analysis.unread_inputs`): column pruning
    of a layer reading the model's input removes whole input features where the input is a vector (fresh user 81's
    decoder lost 8 of its 16 latent dimensions without a word)."""
    before, after = unread_inputs(base, inputs), unread_inputs(compact_model, inputs)
    lost = {i: sorted(positions - before.get(i, set())) for i, positions in after.items()}
    lost = {i: positions for i, positions in lost.items() if positions}
    if not lost:
        return None
    parts = "; ".join(f"{len(p)} of the {inputs[i].shape[1]} of input {i} ({', '.join(map(str, p[:8]))}"
                      f"{', ...' if len(p) > 8 else ''})" for i, p in lost.items())
    return (f"the compact model no longer reads some features of its input (dimension 1): {parts}; column pruning "
            "removed every weight reading them (a decoder's latent dimensions, a tabular model's columns): put the "
            "layers that read the input in ignored_layers, or leave column out of dims, to keep them")


def _reduction(base: dict, compressed: dict, target: Target) -> float:
    """The params or MACs reduction (x) of the final table's ``compressed`` row against ``base`` that ``target``
    counts (MACs for flops and latency)."""
    key = "params" if target.objective == "params" else "macs"
    return base[key] / max(compressed[key], 1)


def _bottleneck_warning(space, widths: Mapping[str, int], what: str = "the compact model keeps") -> str | None:
    """The warning naming the filter groups of ``space`` whose ``widths`` (group name -> channels kept) are
    :data:`BOTTLENECK` channels or fewer out of 8 or more: every later layer reads through them (fresh user 58: the
    target fell on the few groups that could shrink, a stem went from 16 channels to 1, -5.5 points)."""
    narrow = [f"{group.name} ({widths[group.name]} of {group.size})" for group in space.filter_groups
              if group.size >= 8 and widths.get(group.name, group.size) <= BOTTLENECK]
    if not narrow:
        return None
    left_out = space.not_filter_pruned()
    return (f"{what} {BOTTLENECK} channels or fewer in {', '.join(narrow)}, a bottleneck every later "
            "layer reads through" + (f"; {len(left_out)} layer(s) left out of filter pruning (the final record's "
                                     "not_filter_pruned) put the target on the few that can shrink" if left_out else "")
            + ": lower the target, or make more layers prunable (ignored_layers, the reasons logged)")


def _compact_widths(space, compact_model: nn.Module) -> dict[str, int]:
    """The channels ``compact_model`` keeps of each filter group of ``space`` whose root layer it still has
    (:func:`autocompress.alignment.kept_channels`)."""
    modules = dict(compact_model.named_modules())
    return {group.name: kept_channels(group, modules[group.name]) for group in space.filter_groups
            if group.name in modules}


__all__ = ["CompressConfig", "CompressResult", "Compression", "SettingError", "compress", "resolve_config"]
