"""One pruning round, the only place its phases are sequenced: ADMM -> hard pruning -> purification ->
masked retraining -> compaction (AutoCompress, Liu et al. AAAI 2020, §3 "actual pruning" of the generic
flow). :func:`autocompress.compress` runs it once per progressive round after the rate search;
:func:`autocompress.prune` runs it once at the caller's rates.

* **ADMM** (:func:`autocompress.admm.admm_prune`): W-steps with the ADMM penalty, Z/U updates.
* **Hard pruning + purification** (:func:`autocompress.admm.hard_prune`,
  :func:`autocompress.purification.purify`; Ma et al. arXiv 1905.00136): unused path removal and
  redundant weight removal checked against the validation score.
* **Masked retraining** on the filter-compacted model (pruned channels physically removed, pruned columns
  held at zero), which computes what the masked model computes at fewer MACs per step.
* **Compaction** (:func:`autocompress.compaction.compact`): the physically smaller model, checked against
  the masked one.

The data-dependent parts go through a :class:`autocompress.task.Task`. A caller's own training loop
(``train_fn(model, phase)``) receives a :class:`TrainingPhase` and is called for the ADMM and retraining
epochs instead of the default loop. Phases are stored through a :class:`PhaseStore` (in memory, or a
run folder that makes every phase resumable); each phase draws its global randomness from a generator
seeded by ``(seed, round, phase)`` (:func:`phase_seed`), so a resumed run ends as an uninterrupted one.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import admm, distributed, metrics
from .alignment import AUTO, misaligned_widths
from .analysis import callers_class, trained_norms, train_mode
from .attention import HEAD_HINT, attention_shaped, free_macs, head_count, unaligned_heads
from .channel_norms import standard_channel_norms
from .compaction import TRAINING_BREAKS, check_compactable, compact, compaction_failure, densify, shrink
from .config import CompressConfig
from .distillation import Distiller, distillable
from .epoch_checkpoint import EpochCheckpoint
from .errors import UserError
from .masks import MaskEnforcer, Masks
from .multihead import split_multihead_attention
from .optimizer_probe import (HELD_OUT_BATCHES, LONG_PROBE_STEPS, MIN_TRAINING_STEPS, PROBE_STEPS, ProbeResult,
                              choose_start, probe_losses, probe_optimizers, settle,
                              start_probe_steps, unprobed_choice, unprobed_start)
from .projection import project
from .purification import purify
from .quick_eval import recalibrate_batchnorm
from .architecture import apply_architecture, describe_architecture
from .space import BREAKS, PruningSpace, is_weight_layer, weights_read_outside
from .task import Task, loader_generators
from .text import kind_of, plural, tidy
from .training import OPTIMIZERS, above_bars

PHASES = ("search", "admm", "purify", "retrain", "compact")

TrainFn = Callable[[nn.Module, "TrainingPhase"], Any]


#: training batches the BatchNorm statistics are re-estimated on after each masked retraining
BN_REESTIMATE_BATCHES = 50
#: the base model's re-estimated BatchNorm statistics replace its own only when its validation score rises by more
#: than this fraction of the score scale (top-1: one point), not on the noise of a well-trained base's score
BASE_BN_GAIN = 0.01
#: the rise (a fraction of the score scale) past which the final warnings say the base's statistics did not fit its
#: weights: a rise of a point or two on a small validation set is noise, not a sign of an undertrained base (fresh
#: user 83: 46.2 -> 47.0 on 500 items drew "train the base longer")
BASE_BN_WARNING = 0.05


def _training_batches(count: int) -> str:
    return f"{count} training batch{'' if count == 1 else 'es'}"


def phase_seed(seed: int, round_index: int, phase: str) -> int:
    """Deterministic seed of one phase of one round (independent of what ran before it)."""
    return (int(seed) * 1_000_003 + round_index * 101 + PHASES.index(phase) * 7919) % (2 ** 31)


#: training-mode forwards with gradients a ``train_fn`` may run before it attaches its optimizer
#: (:meth:`TrainingPhase.watch`)
UNATTACHED_FORWARDS = 1
#: training-mode forwards with gradients an ADMM phase's ``train_fn`` may run before its first ``phase.penalty()``
#: (a loop accumulating gradients over up to this many batches may add it once per optimiser step)
UNPENALISED_FORWARDS = 8


class TrainingPhase:
    """What a caller's own training loop gets for one ADMM or masked-retraining phase.

    ``train_fn(model, phase)`` trains ``model`` (already on the device, in train mode) for ``phase.epochs``
    epochs with its own optimizer, schedule, loss and data, and must

    * add ``phase.penalty()`` to its loss (ADMM: ``rho/2 * sum ||W - Z + U||^2``, AutoCompress §3; zero in
      retraining), and
    * ``phase.attach(optimizer)`` once per optimizer it steps: after every ``optimizer.step()`` the pruning
      masks are re-applied (retraining: pruned weights and their optimizer state stay zero) and the ADMM
      Z/U updates run on their schedule (every ``admm.update_interval`` steps; with ``None`` once per
      ``len(train_loader)`` steps).

    Optionally ``phase.distill(batch, output, loss)`` mixes in the distillation loss from the base model
    (when ``distillation.enabled``). Attributes: ``name`` (``"admm"`` or ``"retrain"``), ``epochs``,
    ``lr`` (the phase's configured learning rate, a suggestion), ``device``, ``round`` (1-based).

    With a run folder such a phase is stored when ``train_fn`` returns; a kill during it restarts it from its
    first epoch (its epochs, optimizer and schedule are the caller's: the default loop's phases instead resume
    after their last finished epoch, :mod:`autocompress.epoch_checkpoint`).

    A ``train_fn`` that trains without attaching an optimizer is stopped at its second training-mode forward with
    gradients (:meth:`watch`; one is allowed first, a dry run that builds lazy modules), one that attaches an
    optimizer over none of the model's parameters (built over the base model) at the attach, and an ADMM phase's
    that never calls ``phase.penalty()`` after :data:`UNPENALISED_FORWARDS` forwards: a UserError, not a whole phase
    trained without masks, without training, or without ADMM.
    """

    def __init__(self, name: str, *, epochs: int, lr: float, task: Task, round_index: int,
                 schedule: admm.ADMMSchedule | None = None, enforcer: MaskEnforcer | None = None,
                 distiller: Distiller | None = None):
        self.name, self.epochs, self.lr, self.round = name, epochs, lr, round_index
        self.device = task.device
        self._task, self._schedule, self._enforcer, self._distiller = task, schedule, enforcer, distiller
        self._handles: list = []
        self.attached = 0
        self._forwards = self._penalties = 0  # training-mode forwards with gradients; phase.penalty() calls
        self._model: nn.Module | None = None

    def penalty(self) -> torch.Tensor:
        """The ADMM penalty (a scalar tensor with gradient), or 0 outside ADMM."""
        self._penalties += 1
        if self._schedule is None:
            return torch.zeros((), device=self.device)
        return self._schedule.penalty()

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Hook ``optimizer`` (masks held / ADMM updates after every step); returns it.

        Raises:
            UserError: ``optimizer`` holds none of the trainable parameters of the model being trained (the model
                :meth:`watch` hooked).
        """
        if self._model is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            trainable = [p for p in self._model.parameters() if p.requires_grad]
            if trainable and not any(id(p) in held for p in trainable):
                raise UserError(f"the optimizer given to phase.attach in the {self.name} phase holds none of the "
                                "parameters of the model train_fn is training (built over another model, such as the "
                                "base?), so the model would not train", "create the optimizer inside train_fn over "
                                "model.parameters() of the model it is given")
        if self._schedule is not None:
            self._handles.append(self._schedule.attach(optimizer))
        if self._enforcer is not None:
            self._enforcer.attach(optimizer)
        self.attached += 1
        return optimizer

    def distill(self, batch: Any, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` mixed with the distillation loss against the base model's output on ``batch`` (run
        through ``forward_fn``), or ``loss`` unchanged when distillation is off.

        Raises:
            UserError: ``output`` is not what ``forward_fn`` gives for the model (e.g. a two-head model's whole
                tuple where ``forward_fn`` returns its class scores).
        """
        if self._distiller is None:
            return loss
        teacher = self._distiller.teacher_output(self._task, batch)
        if not self._distiller.comparable(teacher, output) and distillable(teacher):
            raise UserError(f"phase.distill(batch, output, loss) got {kind_of(output)} as output, but forward_fn "
                            f"gives {kind_of(teacher)} for the base model on this batch",
                            "pass as output the part of the model's output that forward_fn returns (e.g. output[0] "
                            "of a model returning a tuple)")
        return self._distiller(teacher, output, loss)

    def watch(self, model: nn.Module) -> None:
        """Hook ``model`` so that a training-mode forward with gradients beyond :data:`UNATTACHED_FORWARDS`
        while no optimizer is attached raises :meth:`unattached`'s UserError, and in ADMM one beyond
        :data:`UNPENALISED_FORWARDS` before any ``phase.penalty()`` call a UserError saying so (removed by
        :meth:`close`); :meth:`attach` checks optimizers against ``model``'s parameters."""
        self._model = model

        def check(module: nn.Module, args: Any, output: Any) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            self._forwards += 1
            if not self.attached and self._forwards > UNATTACHED_FORWARDS:  # every forward so far was unattached
                raise self.unattached()
            if self._schedule is not None and not self._penalties and self._forwards > UNPENALISED_FORWARDS:
                raise UserError("train_fn trains without adding phase.penalty() to its loss in the admm phase, so "
                                "ADMM does not pull the weights towards their pruned values and hard pruning will "
                                "lose more", "add phase.penalty() to the loss of every training step")

        self._handles.append(model.register_forward_hook(check))

    def unattached(self) -> UserError:
        """The error of a phase trained without :meth:`attach`."""
        what = "ADMM updates" if self.name == "admm" else "pruning masks"
        if not self._forwards:  # returned without a training-mode forward with gradients
            return UserError(f"train_fn returned from the {self.name} phase without training (no training-mode "
                             "forward with gradients) or attaching an optimizer",
                             f"train for phase.epochs ({self.epochs}) epochs in model.train() mode, calling "
                             "phase.attach(optimizer) once after creating the optimizer")
        return UserError(f"train_fn trains without calling phase.attach(optimizer) in the {self.name} phase, so "
                         f"the {what} do not run", "call phase.attach(optimizer) once after creating the optimizer")

    def close(self) -> None:
        """Remove the hooks (the pipeline calls this after ``train_fn`` returns)."""
        for handle in self._handles:
            handle.remove()
        if self._enforcer is not None:
            self._enforcer.detach()


@dataclass
class Budget:
    """What a round may end with, for purification's refit (``purification.refit``).

    Attributes:
        limit: the largest count (parameters, or MACs per input item) the round's compact model may have.
        count: ``fn(compact model) -> int``, that count.
        refit: ``fn(slack) -> rates``: rates along the searched direction meeting the round's target divided
            by ``slack`` (>= 1: a looser target, larger keep counts).
        unit: what ``count`` counts, for log lines (``"parameters"``, ``"MACs"``).
    """

    limit: float
    count: Callable[[nn.Module], int]
    refit: Callable[[float], dict]
    unit: str = "parameters"


REFIT_TRIES = 4  # hard-prune + purify passes at refitted rates, at most
REFIT_CLOSE = 0.002  # a purified count within this fraction below the limit is close enough


@dataclass
class RoundState:
    """What the phases of one round share: the model being pruned, its space, the rates, the masks, and
    (``compress``) the round's :class:`Budget`."""

    index: int
    target: float | None
    model: nn.Module
    space: PruningSpace
    rates: dict | None = None
    param_masks: dict | None = None
    masks: Any = None
    compact_model: nn.Module | None = None
    budget: Budget | None = None


class PhaseStore:
    """Where phase results go: this base class keeps the metrics records in memory and nothing else (no
    phase is ever done before); :class:`autocompress.runfolder.RunFolder` stores them on disk."""

    def __init__(self):
        self._records: list[dict] = []

    @property
    def records(self) -> list[dict]:
        """Every metrics record so far, in order."""
        return list(self._records)

    def is_done(self, round_index: Any, phase: str) -> bool:
        """Whether the phase finished in an earlier (interrupted) run."""
        return False

    def load(self, round_index: int, phase: str) -> Any:
        """The payload :meth:`save` stored for a finished phase."""
        raise KeyError((round_index, phase))

    def save(self, round_index: int, phase: str, payload: Any) -> None:
        """Store a phase's payload (a plain dict of tensors / data; search: JSON data)."""

    def load_epoch(self, round_index: int, phase: str) -> dict | None:
        """The epoch checkpoint :meth:`save_epoch` stored for an unfinished training phase, or None."""
        return None

    def save_epoch(self, round_index: int, phase: str, payload: dict) -> None:
        """Store a training phase's state after an epoch (replacing the previous epoch's; removed by
        :meth:`finish`): :class:`autocompress.epoch_checkpoint.EpochCheckpoint`."""

    def record(self, record: dict) -> None:
        """Append one metrics record (as :func:`autocompress.text.tidy` writes it: the same numbers as a run
        folder's ``metrics.jsonl`` holds)."""
        self._records.append(tidy(record))

    def finish(self, round_index: Any, phase: str, records: list[dict]) -> None:
        """A phase finished: its records, then the mark that it is done (a kill between the two leaves the
        phase not done, and its records are written again once: see RunFolder)."""
        for record in records:
            self.record(record)


#: why a layer's columns are left out when its compact model breaks without them
COLUMNS_BREAK = "the compact model breaks once its columns are removed"


def _too_short(steps: int, minimum: int) -> str:
    """Why a run of ``steps`` optimiser steps is not probed, ``minimum`` being the fewest a probe needs."""
    return f"the run trains {steps} optimiser steps, under the {minimum} the probe needs to be worth its time"


def _silent(_line: str) -> None:
    """The log of a caller who gave none."""


@dataclass
class Pipeline:
    """The shared state of a compress or prune run and :meth:`run_round`, the round function.

    Attributes:
        task: data and callables (:class:`autocompress.task.Task`).
        config: the run's :class:`autocompress.config.CompressConfig` (admm, purification, retrain,
            distillation sections, seed, dims); kept with ``retrain.optimizer`` and the unset learning rates
            resolved for the task (:meth:`~autocompress.config.CompressConfig.for_task`, by ``task.classifies``,
            which :meth:`autocompress.task.Task.check` sets), or for a classifier by :meth:`settle_optimizer`
            before the first round.
        example_inputs: a tuple of tensors on the device (one forward's inputs).
        base_model: the model before pruning (on the device; never modified).
        store: the :class:`PhaseStore`.
        train_fn: the caller's own training loop, or None for the default loop (``retrain.optimizer``).
        chance: the score of a random guess (default top-1: 1 / classes), or None.
        channel_multiple: filter groups keep widths aligned to it (:mod:`autocompress.alignment`).
        progress: progress bars on; lines logged then are written above them (:func:`autocompress.training.above_bars`).
        log: called with each log line; None: nothing is logged.
        base_score: ``task.score`` of ``base_model`` when the caller has it (else measured when first needed).
        incompactable: filter groups (root layer -> why) whose channels cannot be removed without breaking the
            compact model (``compress``'s probe before any work); every space leaves them out (their layers'
            columns stay prunable).
        incompactable_columns: layers (name -> why) whose columns cannot be removed without breaking the compact
            model (the same probe); every space keeps their columns.
        heads: filter groups (root layer -> head count) that compact only when each of their heads keeps equally
            many channels (the same probe, :func:`autocompress.attention.head_count`); every space keeps them so.
        free_macs: those groups (root layer -> MACs per forward of the example inputs) of their attentions' score
            and value products (:func:`autocompress.attention.free_macs`), which every space counts with them.
    """

    task: Task
    config: CompressConfig
    example_inputs: tuple
    base_model: nn.Module
    store: PhaseStore = field(default_factory=PhaseStore)
    train_fn: TrainFn | None = None
    chance: float | None = None
    channel_multiple: int = 1
    progress: bool = True
    log: Callable[[str], None] | None = print
    base_score: float | None = None
    incompactable: dict[str, str] = field(default_factory=dict)
    incompactable_columns: dict[str, str] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)
    free_macs: dict[str, int] = field(default_factory=dict)
    _phase_started: float = field(default=0.0, init=False, repr=False)
    _epoch_checkpoint: EpochCheckpoint | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        for name, why in split_multihead_attention(self.base_model).items():  # heads and stream become prunable
            (self.log or _silent)(f"not split into Linear layers: {name}: {why}; its heads and the channels it reads "
                                  "are not pruned")
        replaced = standard_channel_norms(self.base_model)  # the channels they normalise become prunable
        if replaced:
            shown = ", ".join(f"{name} ({kind})" for name, kind in replaced.items())
            (self.log or _silent)(f"computed as torch's LayerNorm: {shown}: modules of your own that normalise over "
                                  "the channels, replaced with their weights so that those channels are pruned")
        self.config = self.config.for_task(self.task.classifies, self.task.positions)  # the loop's optimiser, rates
        if self.train_fn is not None and self.config.retrain.optimizer == AUTO:  # the caller's loop owns it: no
            self.config = self.config.with_optimizer("sgd")  # probe; the phases suggest SGD's lr, as before
        if self.log is None:
            self.log = _silent
        elif self.progress:
            self.log = above_bars(self.log)
        self.distiller = self._distiller()
        if self.distiller is not None:
            self.log(self.distiller.describe())

    def _distiller(self) -> Distiller | None:
        """The distillation loss from ``base_model`` (a private copy of it), or None when distillation is off."""
        distillation = self.config.distillation
        return Distiller(self.base_model, distillation) if distillation.enabled else None

    # --- counting and scoring -------------------------------------------------------------------------
    @property
    def example1(self) -> tuple:
        """The example inputs cut to batch 1 (MACs are counted per input item)."""
        return tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() else t for t in self.example_inputs)

    def params(self, model: nn.Module) -> int:
        """Parameters of a compact model; with irregular pruning those a sparse format stores
        (:func:`autocompress.metrics.count_sparse_params`)."""
        if "irregular" in self.config.kinds:
            return metrics.count_sparse_params(model)
        return metrics.count_params(model)

    def macs(self, model: nn.Module) -> int:
        """MACs per input item (FLOPs = 2 x MACs)."""
        return metrics.count_macs(model, self.example1)

    def scored(self, value: float | None, suffix: str = "") -> dict:
        """A score as a metrics field: ``val_top1{suffix}`` in % for the default top-1, else
        ``val_score{suffix}`` (the caller's ``score_fn`` value)."""
        if self.task.score_fn is None:
            return {f"val_top1{suffix}": None if value is None else 100.0 * value}
        return {f"val_score{suffix}": value}

    @staticmethod
    def score_of(record: dict, suffix: str = "") -> float | None:
        """The score a metrics record holds (:meth:`scored`'s field ``val_top1{suffix}`` in %, or
        ``val_score{suffix}``) as the task's own value (top-1 as a fraction); None when it holds none."""
        if f"val_top1{suffix}" in record:
            value = record[f"val_top1{suffix}"]
            return None if value is None else value / 100.0
        return record.get(f"val_score{suffix}")

    @property
    def score_scale(self) -> float:
        """What ``purification.tolerance`` and ``distillation.stop_margin`` are fractions of: 1 for the default
        top-1 (a fraction: 0.005 = half a point), the base model's ``|score_fn|`` for a caller's score (0.005 =
        0.5 % of it: the same settings hold for an MSE of 6e-4 and a PSNR of 30 dB; 0 for a base scoring 0, then
        no drop is tolerated). Measures the base's score when the caller did not give it."""
        return 1.0 if self.task.score_fn is None else abs(self._base_score())

    def _base_score(self) -> float:
        """``base_score``, measured (``task.score`` of the base model) the first time it is needed."""
        if self.base_score is None:
            self.base_score = self.task.score(self.base_model)
        return self.base_score

    def describe(self, value: float | None) -> str:
        """A score for a log line: ``val top-1 92.31%`` for the default top-1, else ``validation score x``."""
        if value is None:
            return "val top-1 n/a"
        return f"val top-1 {100 * value:.2f}%" if self.task.score_fn is None else f"validation score {value:.4g}"

    def space(self, model: nn.Module) -> PruningSpace:
        """A round's pruning space; purification needs the filter groups even when only columns (or single
        weights) are pruned, at rate 0. For a flops target, columns only where pruning them lowers the MACs
        the compact model executes (``executed_macs_only``, :meth:`PruningSpace.build`)."""
        dims = self.config.kinds
        if self.config.purification.enabled:
            dims = tuple(dict.fromkeys(("filter",) + dims))
        flops = self.config.target is not None and self.config.parsed_target().objective == "flops"
        left_out = {name: f"filter pruning: {BREAKS} ({why})" for name, why in self.incompactable.items()}
        space = PruningSpace.build(model, self.example_inputs, dims=dims, ignored_layers=self.config.ignored_layers,
                                   channel_multiple=self.channel_multiple, executed_macs_only=flops, left_out=left_out,
                                   heads=self.heads, free_macs=self.free_macs,
                                   columns_left_out={name: f"column pruning: {COLUMNS_BREAK} ({why})"
                                                     for name, why in self.incompactable_columns.items()})
        if self.config.dims is not None:
            space.check_dims(self.config.kinds)  # explicit dims need every kind they name
        elif not any(map(space.units, self.config.kinds)):  # the default needs a unit of any of its kinds
            space.check_dims(self.config.kinds[:1])  # refused naming filter's exclusions, which say the most
        return space

    def compactable_space(self, model: nn.Module, space: PruningSpace | None = None) -> PruningSpace:
        """``space`` (default: :meth:`space` of ``model``) without the filter groups whose channels cannot be
        removed, found before any work: every filter group loses one step of its allowed widths
        (:meth:`~autocompress.space.PruningSpace.widths`), its weakest channels and then its first ones
        (:meth:`_breaking`), the model is compacted and run on the example inputs, and its loss on the first
        training batch (:meth:`~autocompress.task.Task.loss_runs`: a branch the example's forward does not take). A
        forward that writes a channel count into a shape (``x.view(-1, 40 * 7 * 7)``), or a module of the
        caller's that mixes channels (a normalisation over them), runs masked but breaks once channels are
        removed, which would otherwise surface after training. When it breaks, each group is probed alone; those
        that break it are left out (:attr:`incompactable`, logged) and the rest probed again, except those whose
        channels compact once each of a number of heads keeps equally many (an attention's projections split into
        heads by shape: :func:`autocompress.attention.head_count`; :attr:`heads`, logged).

        Raises:
            UserError: the model breaks although no group alone does, or (filter pruning asked for) every group
                does.
        """
        space = space if space is not None else self.space(model)
        while True:
            narrower = {g.name: widths[-2] for g in space.filter_groups if len(widths := space.widths(g)) > 1}
            failing, error = self._breaking(model, space, narrower) if narrower else ({}, None)
            if not failing:
                return self._compactable_columns(model, space)
            # heads cannot mend a group a head only the loss calls reads (fresh user 86: "2 heads" claimed)
            headed = self._find_heads(model, space, {name: why for name, why in failing.items()
                                                     if not why.startswith(TRAINING_BREAKS)})
            reads = self._read_outside(model, space, failing)
            if error is not None and not headed and len(failing) == len(narrower) and "filter" in self.config.kinds:
                if not reads:
                    raise error
                raise UserError(f"{error.problem}; {'; '.join(dict.fromkeys(reads.values()))}",
                                "call the layer rather than read its weight (a layer of its own for the other "
                                "use), or leave filter out of dims")
            for name, why in failing.items():
                if name not in headed:
                    group = space.unit("filter", name)
                    if attention_shaped(model, group):
                        why = f"{why}; {unaligned_heads(model, space, group) or HEAD_HINT}"
                    if name in reads:
                        why = f"{why}; {reads[name]}"
                    if (own := _own_channel_modules(model, group)):
                        why = f"{why}; {own}"
                    if why.startswith(TRAINING_BREAKS) and (unreached := space.unreached_layers()):
                        why = f"{why}; layers the example inputs' forward never calls: {', '.join(unreached[:3])}"
                    self.log(f"not filter-pruned: {name} and the layers coupled to it keep their channels: the "
                             f"compact model breaks once they are removed ({why})")
                    self.incompactable[name] = why
            space = self.space(model)

    def callers_log(self) -> Callable[[str], None] | None:
        """The ``log`` callable the caller passed (wrapped to print above progress bars), None without one."""
        return None if self.log is _silent else self.log

    def log_exclusions(self, space: PruningSpace) -> None:
        """Log the layers ``space`` leaves out of pruning (:meth:`PruningSpace.log_exclusions`): to the caller's
        ``log``, but for those :meth:`compactable_space` named there already, else at INFO."""
        space.log_exclusions(self.callers_log(), said={*self.incompactable, *self.incompactable_columns})

    def _read_outside(self, model: nn.Module, space: PruningSpace, failing: Mapping[str, str]) -> dict[str, str]:
        """The groups of ``failing`` that touch a layer whose weight the forward also reads outside the layer
        (:func:`autocompress.space.weights_read_outside`), name -> words naming that read."""
        outside = weights_read_outside(model, self.example_inputs)
        reads = {}
        for name in failing:
            layer = next((s.module for s in space.unit("filter", name).slices if s.module in outside), None)
            if layer is not None:
                reads[name] = f"{_read_words(layer)}, which torch-pruning does not follow"
        return reads

    def _compactable_columns(self, model: nn.Module, space: PruningSpace) -> PruningSpace:
        """``space`` without the column layers whose compact model breaks once half their columns are removed (all
        at once, then each alone if that breaks; left out: :attr:`incompactable_columns`, logged): a forward that
        reads a layer's weight itself (weight tying, ``F.linear(h, self.proj.weight.t())``) gets the compact
        layer's narrower weight."""
        names = [c.name for c in space.column_layers]

        def failure(chosen) -> str | None:
            rates = {"filter": {}, "column": {name: 0.5 for name in chosen}, "irregular": {}}
            return compaction_failure(model, space.param_masks(project(space, model, rates)), self.example_inputs,
                                      channel_multiple=self.channel_multiple)

        if not names or failure(names) is None:
            return space
        outside = weights_read_outside(model, self.example_inputs)
        for name in names:
            why = failure([name])
            if why is not None:
                why = f"{why}; {_read_words(name)}" if name in outside else why
                self.log(f"not column-pruned: {name} keeps its columns: {COLUMNS_BREAK} ({why})")
                self.incompactable_columns[name] = why
        return self.space(model)

    def _breaking(self, model: nn.Module, space: PruningSpace, narrower: Mapping[str, int]
                  ) -> tuple[dict[str, str], UserError | None]:
        """The filter groups of ``narrower`` (name -> width) whose compact model breaks at that width, or keeps their
        removed channels as zeros (:func:`autocompress.compaction.compaction_failure`; name -> why; empty: nothing
        breaks), and the error of all of them losing their weakest channels together (None when
        that compacts). The weakest channels (the projection's) are removed from all groups at once, then from each
        alone if that breaks; an attention-shaped group (:func:`autocompress.attention.attention_shaped`) that
        passes loses its first channels too, alone (:meth:`~autocompress.space.PruningSpace.leading_removal`: its
        weakest channels may by chance be spread evenly over its heads, and other groups' removals can hide the
        uneven split).

        Raises:
            UserError: the model breaks although no group alone does.
        """
        def weakest(names) -> dict[str, torch.Tensor]:
            rates = {name: 1.0 - narrower[name] / space.unit("filter", name).size for name in names}
            return space.param_masks(project(space, model, {"filter": rates, "column": {}, "irregular": {}}))

        def leading(name: str) -> dict[str, torch.Tensor]:
            keep = space.leading_removal(space.unit("filter", name), narrower[name])
            return space.param_masks(Masks(filters={name: keep}, columns={}, weights={}))

        def producers(names) -> set[str]:
            return {layer for name in names for layer in space.unit("filter", name).producers}

        training = self.task.loss_runs if self.task.first_batch is not None else None

        def failure(masks: dict[str, torch.Tensor], names) -> str | None:
            return compaction_failure(model, masks, self.example_inputs, channel_multiple=self.channel_multiple,
                                      narrowed=producers(names), training_forward=training)

        failing, error = {}, None
        try:
            check_compactable(model, weakest(narrower), self.example_inputs, channel_multiple=self.channel_multiple,
                              narrowed=producers(narrower), training_forward=training)
        except UserError as exc:
            failing = {name: why for name in narrower if (why := failure(weakest([name]), [name]))}
            if not failing:
                raise
            error = exc
        for name in narrower:
            if name not in failing and attention_shaped(model, space.unit("filter", name)) \
                    and (why := failure(leading(name), [name])):
                failing[name] = why
        return failing, error

    def _find_heads(self, model: nn.Module, space: PruningSpace, failing: Mapping[str, str]) -> dict[str, int]:
        """The groups of ``failing`` (names) that compact once each of their heads keeps equally many channels
        (:func:`autocompress.attention.head_count`; not those already in :attr:`heads`), added to :attr:`heads`
        (their products' MACs to :attr:`free_macs`) and logged: name -> head count."""
        found = {name: heads for name in failing if name not in self.heads and
                 (heads := head_count(model, space, space.unit("filter", name), self.example_inputs)) is not None}
        for name, heads in found.items():
            self.log(f"filter-pruned by heads: {name} and the layers coupled to it keep equally many channels in each "
                     f"of {heads} heads (the forward splits them into heads by shape)")
            self.free_macs[name] = free_macs(model, space, space.unit("filter", name), heads, self.example_inputs)
        self.heads.update(found)
        return found

    # --- the default loop's optimiser --------------------------------------------------------------------
    def settle_optimizer(self, state: RoundState, rounds: int = 1,
                         rates: Callable[[], dict] | None = None) -> None:
        """Resolve ``retrain.optimizer: auto`` left open by :meth:`~autocompress.config.CompressConfig.for_task`
        (a classifier, no learning rate set): by the probe of :func:`autocompress.optimizer_probe.probe_optimizers`
        on ``state.model`` hard-pruned at ``rates()`` (default ``state.rates``; a copy), by
        :func:`~autocompress.optimizer_probe.unprobed_choice` when the run's ``rounds`` train fewer than
        :data:`~autocompress.optimizer_probe.MIN_TRAINING_STEPS` optimiser steps, or as a run folder recorded it
        (its ``optimizer`` record). A no-op once resolved."""
        if self.config.retrain.optimizer != AUTO:
            return
        if self.store.is_done("base", "optimizer"):
            choice = next(r["choice"] for r in self.store.records if r.get("event") == "optimizer")
            self.log(f"retrain.optimizer auto: {choice} (as this run recorded)")
        else:
            steps = self.training_steps(rounds)
            if steps < MIN_TRAINING_STEPS:
                choice, why = unprobed_choice(state.model)
                records = [{"event": "optimizer", "choice": choice, "probe": None}]
                self.log(f"retrain.optimizer auto: {choice} (not probed: {_too_short(steps, MIN_TRAINING_STEPS)}; "
                         f"{why})")
            else:
                records = self._probe_records(state, rates() if rates is not None else state.rates)
            self.store.finish("base", "optimizer", records)
            choice = records[0]["choice"]
        self.config = self.config.with_optimizer(choice)

    def settle_start(self, state: RoundState, starts: Callable[[], tuple[dict[str, dict], str]],
                     rounds: int = 1) -> str:
        """``search.start: auto`` for rounds without a search: the start whose hard-pruned copy of ``state.model``
        reaches the lower data loss in the optimiser probe (:meth:`_probe_starts`), which also settles
        ``retrain.optimizer: auto`` on it (the other optimiser probed on the chosen start); the guided
        start without a probe when ``starts()`` (start name -> rates, and why the magnitude start is not among
        them) offers one start, and
        :func:`~autocompress.optimizer_probe.unprobed_start` when the run is too short to probe it at the round's
        target (:func:`~autocompress.optimizer_probe.start_probe_steps`). As a run folder recorded it (its ``start``
        record) once settled. Returns ``"guided"`` or ``"magnitude"``."""
        if self.store.is_done("base", "start"):
            choice = next(r["choice"] for r in self.store.records if r.get("event") == "start")
            self.log(f"search.start auto: {choice} (as this run recorded)")
            return choice
        steps = self.training_steps(rounds)
        candidates, alone = starts()
        fewest = start_probe_steps(state.target)
        if len(candidates) < 2 or steps < fewest:
            if len(candidates) < 2:
                choice, why = "guided", alone
            else:
                choice, why = unprobed_start()
                why = f"{_too_short(steps, fewest)}; {why}"
            self.log(f"search.start auto: {choice} (not probed: {why})")
            self.store.finish("base", "start", [{"event": "start", "choice": choice, "probe": None}])
            return choice
        started = time.perf_counter()
        choice, losses = distributed.on_main(lambda: self._probe_starts(state, candidates))
        shown = "; ".join(f"{name} " + ", ".join(f"{o} {loss:.4g}" for o, loss in by.items())
                          for name, by in losses.items())
        loop = "; the library's loop, not train_fn, trains the probe" if self.train_fn is not None else ""
        self.log(f"search.start auto: {choice} (a probe of {PROBE_STEPS} steps from each start's pruned model; data "
                 f"loss on the next {HELD_OUT_BATCHES} training batches: {shown}{loop})")
        probe = {"held_out_loss": losses, "steps": PROBE_STEPS, "held_out_batches": HELD_OUT_BATCHES}
        if self.config.retrain.optimizer == AUTO:
            rates = candidates[choice]
            result = settle(losses[choice], lambda: distributed.on_main(lambda: self._probe_losses(
                state, rates, OPTIMIZERS, LONG_PROBE_STEPS)))
            self.log(result.describe())
            self.store.finish("base", "optimizer", [result.record()])
            self.config = self.config.with_optimizer(result.choice)
        phase = {"event": "phase", "round": 0, "phase": "optimizer", "seconds": time.perf_counter() - started}
        self.store.finish("base", "start", [{"event": "start", "choice": choice, "probe": probe}, phase])
        return choice

    def _probe_starts(self, state: RoundState, candidates: dict[str, dict]) -> tuple[str, dict[str, dict]]:
        """The start :func:`~autocompress.optimizer_probe.choose_start` takes among ``candidates`` (start name ->
        rates) by the loss each reaches with one optimiser (``retrain.optimizer``, or while it is ``auto`` the one a
        run too short to probe would take, :func:`~autocompress.optimizer_probe.unprobed_choice`), with the other
        optimiser probed too on the chosen start while ``auto``; and the losses (start -> optimiser -> loss)."""
        auto = self.config.retrain.optimizer == AUTO
        first = unprobed_choice(state.model)[0] if auto else self.config.retrain.optimizer
        losses = {name: self._probe_losses(state, rates, (first,)) for name, rates in candidates.items()}
        choice = choose_start(losses)
        if auto:
            losses[choice].update(self._probe_losses(state, candidates[choice], tuple(o for o in OPTIMIZERS
                                                                                      if o != first)))
            losses[choice] = {name: losses[choice][name] for name in OPTIMIZERS}
        return choice, losses

    def _probe_records(self, state: RoundState, rates: dict) -> list[dict]:
        """The probe on ``state.model`` hard-pruned at ``rates`` (rank 0's; logged): its record and its time as
        a ``phase`` record (``optimizer``, round 0)."""
        started = time.perf_counter()
        result = distributed.on_main(lambda: self._probe_optimizers(state, rates))
        self.log(result.describe())
        return [result.record(), {"event": "phase", "round": 0, "phase": "optimizer",
                                  "seconds": time.perf_counter() - started}]

    def training_steps(self, rounds: int) -> int:
        """Optimiser steps of the default loop over ``rounds`` rounds (ADMM and retraining epochs)."""
        epochs = rounds * self.config.admm.epochs + (rounds - 1) * self.config.retrain_epochs(last=False) + \
            self.config.retrain_epochs(last=True)
        return epochs * _length(self.task.train_loader)

    def _probe_optimizers(self, state: RoundState, rates: dict) -> ProbeResult:
        """:func:`~autocompress.optimizer_probe.probe_optimizers` on ``state.model`` hard-pruned at ``rates``
        (:meth:`_probe_arguments`)."""
        model, param_masks, settings = self._probe_arguments(state, rates)
        return probe_optimizers(model, param_masks, self.task, **settings)

    def _probe_losses(self, state: RoundState, rates: dict, optimizers: tuple[str, ...],
                      steps: int = PROBE_STEPS) -> dict[str, float]:
        """:func:`~autocompress.optimizer_probe.probe_losses` of ``optimizers`` for ``steps`` on ``state.model``
        hard-pruned at ``rates`` (:meth:`_probe_arguments`)."""
        model, param_masks, settings = self._probe_arguments(state, rates)
        return probe_losses(model, param_masks, self.task, optimizers=optimizers, steps=steps, **settings)

    def _probe_arguments(self, state: RoundState, rates: dict) -> tuple[nn.Module, dict, dict]:
        """A copy of ``state.model`` hard-pruned at ``rates`` and shrunk as the retraining's model is
        (:meth:`_shrink`), its parameter masks, and the probe's keyword arguments: the retraining's settings and
        distillation, every copy on the same batches."""
        model = copy.deepcopy(state.model)
        _, param_masks = admm.hard_prune(model, state.space, rates)
        model, param_masks = shrink(model, param_masks, self.example_inputs, channel_multiple=self.channel_multiple,
                                    layer_norm=self.config.layer_norm)
        seed = phase_seed(self.config.seed, 0, "retrain")  # round 0: before the rounds
        return model, param_masks, {"settings": self.config.retrain.train_config(1), "distiller": self.distiller,
                                    "same_batches": lambda: self.task.seeded(seed)}

    # --- the round function ---------------------------------------------------------------------------
    def run_round(self, state: RoundState, *, last: bool) -> None:
        """ADMM -> hard pruning + purification -> masked retraining -> compaction of ``state.model`` at
        ``state.rates``; phases finished before (the store says so) are restored instead of run. Afterwards
        ``state.model`` is the round's compact model, densified (ColumnConv2d / ColumnLinear as dense layers
        with zero columns) for the next round, and ``state.masks`` the final unit masks (None when the round
        was finished before: its compact model is restored and nothing else)."""
        if self.store.is_done(state.index, "compact"):
            self._restore(state, "compact")
            return
        self.settle_optimizer(state)
        for phase in PHASES[1:]:
            if self.store.is_done(state.index, phase):
                self._restore(state, phase)
                continue
            self._phase_started, self._epoch_checkpoint = time.perf_counter(), None
            with self.task.seeded(phase_seed(self.config.seed, state.index, phase)):
                records = getattr(self, f"_{phase}")(state, last=last)
            self._sync(state)
            records.append({"event": "phase", "round": state.index, "phase": phase, "seconds": self._phase_seconds()})
            self.store.finish(state.index, phase, records)

    def _phase_seconds(self) -> float:
        """Seconds the running phase has taken: in this process, plus, when it resumed from an epoch checkpoint,
        those of the epochs kept from earlier processes (a killed epoch's time is lost with its work)."""
        resumed = self._epoch_checkpoint.resumed if self._epoch_checkpoint is not None else None
        return time.perf_counter() - self._phase_started + (resumed or {}).get("seconds", 0.0)

    def _sync(self, state: RoundState) -> None:
        """Under ``torch.distributed``: rank 0's model state and masks on every rank after a phase (a caller's
        ``train_fn`` may step each rank differently; float sums may drift)."""
        distributed.sync_module(state.model)
        distributed.sync_tensors((state.param_masks or {}).values())

    def _training(self):
        """``(train loader of this rank, context yielding the module the steps run)`` of a default-loop
        training phase: under ``torch.distributed`` the caller's loader sharded per rank and the model in
        DistributedDataParallel (:mod:`autocompress.distributed`), else the loader and the model as they are."""
        settings = self.config.distributed
        loader = distributed.shard_loader(self.task.train_loader, shard_data=settings.shard_data)
        return loader, lambda model: distributed.data_parallel(model, sync_batchnorm=settings.sync_batchnorm)

    def _restore(self, state: RoundState, phase: str) -> None:
        payload = self.store.load(state.index, phase)
        if phase == "compact":
            state.compact_model = self.rebuild(payload)
            state.model = densify(state.compact_model)
            return
        if phase == "retrain":  # its state belongs to the shrunk model
            self._shrink(state)
        state.model.load_state_dict(payload["state_dict"])
        state.param_masks = payload.get("param_masks")
        state.rates = payload.get("rates", state.rates)

    def _state_payload(self, state: RoundState) -> dict:
        return {"state_dict": state.model.state_dict(), "param_masks": state.param_masks, "rates": state.rates}

    def _call_train_fn(self, name: str, state: RoundState, *, epochs: int, lr: float,
                       schedule: admm.ADMMSchedule | None = None, enforcer: MaskEnforcer | None = None) -> None:
        """Run the caller's ``train_fn`` for one training phase with a :class:`TrainingPhase`.

        Raises:
            UserError: ``train_fn`` never attached an optimizer (the masks / ADMM updates would not run).
        """
        phase = TrainingPhase(name, epochs=epochs, lr=lr, task=self.task, round_index=state.index,
                              schedule=schedule, enforcer=enforcer, distiller=self.distiller)
        if epochs > 0:
            self.log(f"round {state.index} {'ADMM' if name == 'admm' else 'retraining'}: train_fn, "
                     f"{plural(epochs, 'epoch')} (a run killed within it repeats the phase from its start)")
        train_mode(state.model)
        phase.watch(state.model)
        try:
            if epochs > 0:
                self.train_fn(state.model, phase)
        finally:
            phase.close()
        if epochs > 0 and phase.attached == 0:
            raise phase.unattached()

    def _epochs(self, state: RoundState, phase: str, loader) -> EpochCheckpoint:
        """The epoch checkpoint of a default-loop training phase (``"admm"`` or ``"retrain"``) in the store
        (a caller's ``train_fn`` owns its epochs and optimiser: its phases resume from their start)."""
        name = "ADMM" if phase == "admm" else "retraining"

        def save(payload: dict) -> None:
            self.store.save_epoch(state.index, phase, {**payload, "seconds": self._phase_seconds()})

        self._epoch_checkpoint = EpochCheckpoint(lambda: self.store.load_epoch(state.index, phase), save,
                                                 generators=loader_generators(loader), device=self.task.device,
                                                 log=self.log, label=f"round {state.index} {name}")
        return self._epoch_checkpoint

    def _admm(self, state: RoundState, *, last: bool) -> list[dict]:
        config = self.config.admm
        if config.epochs > 0:
            self.log(f"round {state.index}: ADMM, {plural(config.epochs, 'epoch')}")
        loader = self.task.train_loader
        if self.train_fn is None:
            loader, parallel = self._training()
            with parallel(state.model) as runner:
                result = admm.admm_prune(state.model, state.space, state.rates, loader, config, task=self.task,
                                         distiller=self.distiller, progress=self.progress, log=self.log,
                                         runner=runner, checkpoint=self._epochs(state, "admm", loader),
                                         optimizer_name=self.config.retrain.optimizer)
        else:
            schedule = admm.ADMMSchedule(state.model, state.space, state.rates, config,
                                         steps_per_epoch=_length(loader), per_epoch=False, log=self.log)
            self._call_train_fn("admm", state, epochs=config.epochs, lr=config.lr, schedule=schedule)
            result = schedule.result(state.model)
        self.store.save(state.index, "admm", self._state_payload(state))
        history = [{k: v for k, v in entry.items() if k != "residuals"} for entry in result.history]
        # no epochs: one-shot projection; the schedule's first entry (the residual before any step) says nothing
        return [{"event": "admm", "round": state.index, "epochs": config.epochs,
                 "history": history if config.epochs > 0 else []}]

    def _purify(self, state: RoundState, *, last: bool) -> list[dict]:
        settings = self.config.purification
        refit = settings.enabled and settings.refit and state.budget is not None
        admm_model = copy.deepcopy(state.model) if refit else None
        masks, state.param_masks = admm.hard_prune(state.model, state.space, state.rates)
        records = []
        if settings.enabled:
            self.log(f"round {state.index}: hard pruning at the round's rates, then purification (unused path and "
                     "redundant weight removal)")
            result = self._purification(state.model, state, masks, log=self.log)
            if refit:
                result, records = self._refit(state, result, admm_model)
            masks, state.param_masks = result.masks, result.param_masks
            refitted = any(r["refitted"] != r["searched"] for r in records)
            cuts = result.largest_removals()
            self.log(f"hard pruning{' at the refitted rates' if refitted else ''}: "
                     f"{self.describe(result.top1_before)}, after purification: {self.describe(result.top1_after)}"
                     + (f", which cut beyond the rates most in {cuts}" if cuts else ""))
            records.append({
                "event": "purification", "round": state.index, "threshold": result.threshold,
                "removed_filters": sum(result.removed_filters.values()),
                "removed_columns": sum(result.removed_columns.values()), "folded": len(result.folded),
                **self.scored(result.top1_before, "_before"), **self.scored(result.top1_after, "_after")})
        state.masks = masks
        self.store.save(state.index, "purify", self._state_payload(state))
        return records

    def _purification(self, model: nn.Module, state: RoundState, masks, *, log=None):
        """Purification (unused path removal, then redundant weight removal checked against the score) of
        ``model`` hard-pruned to ``masks``, in place: :func:`autocompress.purification.purify`."""
        settings = self.config.purification
        scored = self.task.can_score
        return purify(model, state.space, masks, example_inputs=self.example_inputs,
                      score=self.task.score if scored else None, chance=self.chance,
                      tolerance=settings.tolerance * self.score_scale if scored else settings.tolerance,
                      thresholds=settings.thresholds, log=log, describe=self.describe)

    def _refit(self, state: RoundState, result, admm_model: nn.Module) -> tuple[Any, list[dict]]:
        """Meet the round's budget tightly after purification: the searched rates met it before purification,
        which then removes units beyond them (unused paths: a filter whose every consumer column is pruned;
        redundant weights: units whose norm ADMM drove near zero) and leaves the model smaller than asked.
        Re-fit the rates to a looser nominal target, hard-prune the ADMM weights (``admm_model``) at them,
        purify, and keep the largest purified count within the limit (never beyond it). The slack follows
        fixed-point steps on ``limit / purified count`` inside a bracket (the largest slack within the limit,
        the smallest beyond it), halving the bracket after a trial beyond the limit. When the searched rates
        themselves end beyond the limit once compacted (the search's estimate assumes every input channel of a
        column layer keeps a column: a wide layer whose kept columns crowd into fewer channels runs the dense
        conv over them, not the GEMM over its kept columns), the slack steps below 1 (a tighter nominal target)
        until a count meets the limit.

        Returns ``(purification result, records)``; ``state.model`` / ``rates`` hold the chosen hard pruning,
        purified (the searched one when no refit fits better, or none meets the limit: the final target check
        then refuses). The record gives the chosen slack (1: the searched rates)."""
        budget = state.budget
        first = count = self._count(state, state.model, result)
        counts = {_masks_key(state.param_masks): count}  # hard pruning -> purified count (a trial whose rates
        # round to widths tried already purifies to the same count: a fresh user's refit repeated 2 of 4 trials)
        searched = (count, state.rates, state.model, result, 1.0)
        best = searched if count <= budget.limit else None
        slack = 1.0
        # slacks whose purified count met / missed the limit
        within, beyond = (1.0, float("inf")) if best else (0.0, 1.0)
        for _ in range(REFIT_TRIES):
            if best and budget.limit * (1 - REFIT_CLOSE) <= best[0]:
                break
            step = slack * budget.limit / max(count, 1)
            tighten = best is None and within < step < beyond  # nothing met the limit yet: step down to it
            slack = step if tighten or count <= budget.limit and step < beyond else 0.5 * (within + beyond)
            if not within < slack < beyond or best and slack - within < 1e-9:
                break
            rates = budget.refit(slack)
            trial = copy.deepcopy(admm_model)
            masks, param_masks = admm.hard_prune(trial, state.space, rates)
            key = _masks_key(param_masks)
            seen = key in counts  # then its count is within best's or beyond the limit: nothing new to keep
            if not seen:
                trial_result = self._purification(trial, state, masks)
                counts[key] = self._count(state, trial, trial_result)
            count = counts[key]
            if count > budget.limit:
                beyond = slack
                continue
            within = slack
            if not seen and (best is None or count > best[0]):
                best = (count, rates, trial, trial_result, slack)
        count, state.rates, state.model, result, slack = best or searched
        if count != first:
            self.log(f"round {state.index}: after purification {first:,} {budget.unit} "
                     f"{'above' if first > budget.limit else 'below'} the round's limit of {int(budget.limit):,}; "
                     f"rates refitted to {count:,}")
        return result, [{"event": "refit", "round": state.index, "limit": budget.limit, "searched": first,
                         "refitted": count, "slack": slack}]

    def _count(self, state: RoundState, model: nn.Module, result) -> int:
        """The budget's count of ``model`` purified to ``result``, compacted (a copy)."""
        return state.budget.count(compact(model, result.param_masks, self.example_inputs,
                                          channel_multiple=self.channel_multiple, check_rebuild=False).model)

    def _shrink(self, state: RoundState) -> None:
        """Make masked retraining cheaper: replace ``state.model`` by its compacted, densified equivalent
        (pruned filters / channels physically gone, pruned columns and weights still present as zeros) and
        ``state.param_masks`` by the masks of those zeros (conv / linear weights). Same function (but for the
        LayerNorms that lost channels under ``layer_norm: kept``), fewer MACs per training step; deterministic,
        so a resumed run rebuilds the same architecture."""
        state.model, state.param_masks = shrink(state.model, state.param_masks, self.example_inputs,
                                                channel_multiple=self.channel_multiple,
                                                layer_norm=self.config.layer_norm)

    def _retrain(self, state: RoundState, *, last: bool) -> list[dict]:
        self._shrink(state)
        epochs = self.config.retrain_epochs(last=last)
        config = self.config.retrain.train_config(epochs)
        if epochs > 0:
            self.log(f"round {state.index}: masked retraining, {plural(epochs, 'epoch')}")
        history: list[dict] = []
        if self.train_fn is None:
            loader, parallel = self._training()
            with parallel(state.model) as runner:
                history = admm.masked_retrain(state.model, state.param_masks, loader, config, task=self.task,
                                              distiller=self.distiller, progress=self.progress, log=self.log,
                                              runner=runner, checkpoint=self._epochs(state, "retrain", loader),
                                              release=self._release(state))
        else:
            enforcer = MaskEnforcer(state.model, state.param_masks)
            self._call_train_fn("retrain", state, epochs=epochs, lr=config.lr, enforcer=enforcer)
        reestimated = self._reestimate_batchnorm(state) if epochs > 0 else []
        self.store.save(state.index, "retrain", self._state_payload(state))
        return [{"event": "retrain", "round": state.index, "history": [epoch_record(k, epoch) for k, epoch in
                                                                        enumerate(history)]}, *reestimated]

    def _reestimate_batchnorm(self, state: RoundState) -> list[dict]:
        """BatchNorm running statistics of the retrained ``state.model`` re-estimated as an exact average over
        :data:`BN_REESTIMATE_BATCHES` training batches (adaptive BatchNorm: Li et al., "EagleEye", ECCV 2020, §3.2),
        kept when the validation score rises. A short retraining leaves statistics that lag the weights where a
        model's BatchNorm momentum is small (torchvision's MobileNetV3: 0.01, about 100 steps of memory; a fresh
        user's 3-epoch run read 53.5 % test top-1, 77.2 % once re-estimated). Returns the record ([] without
        BatchNorm layers or a score)."""
        found = self._reestimated(state.model)
        if found is None:
            return []
        trial, batches = found
        before, after = self.task.score(state.model), self.task.score(trial)
        kept = after > before
        if kept:
            state.model.load_state_dict(trial.state_dict())
        self.log(f"round {state.index}: BatchNorm statistics re-estimated on {_training_batches(batches)}: "
                 f"{self.describe(before)} -> {self.describe(after)}, "
                 f"{'re-estimated statistics kept' if kept else 'the retraining statistics kept'}")
        return [self._batchnorm_record(state.index, batches, before, after, kept)]

    def reestimate_base_batchnorm(self) -> list[dict]:
        """The base model's BatchNorm statistics re-estimated before any work, as after each retraining
        (:meth:`_reestimate_batchnorm`), and kept when its validation score rises by more than
        :data:`BASE_BN_GAIN` x :attr:`score_scale`: then ``base_model``, ``base_score`` and the distillation teacher
        are the re-estimated base, and every comparison (the search's teacher, the final table) is against it.
        A base trained briefly with a small BatchNorm momentum scores near chance on its own statistics, and a
        compressed model re-estimated after retraining would otherwise read as a gain of tens of points, its
        distillation a teacher that guesses. Seeded by ``(seed, round 0)``, so a resumed run re-estimates the same
        statistics; under ``torch.distributed`` rank 0's decision and statistics hold on every rank. Returns the
        ``batchnorm`` record of round 0 ([] without BatchNorm layers, a score or training data)."""
        with self.task.seeded(phase_seed(self.config.seed, 0, "retrain")):
            found = self._reestimated(self.base_model)
        if found is None:
            return []
        trial, batches = found
        before, after = self._base_score(), self.task.score(trial)
        kept = distributed.broadcast_object(after - before > BASE_BN_GAIN * self.score_scale)
        if kept:
            self.base_model.load_state_dict(trial.state_dict())
            distributed.sync_module(self.base_model)
            self.base_score = after = distributed.broadcast_object(after)
            self.distiller = self._distiller()
        self.log(f"base model: BatchNorm statistics re-estimated on {_training_batches(batches)}: "
                 f"{self.describe(before)} -> {self.describe(after)}, " + (
                     f"the re-estimated base is what the run prunes"
                     f"{', distils from' if self.distiller else ''} and compares against" if kept else
                     f"its own statistics kept (a rise above {BASE_BN_GAIN:g} x the score scale would replace them)"))
        return [self._batchnorm_record(0, batches, before, after, kept)]

    def _reestimated(self, model: nn.Module) -> tuple[nn.Module, int] | None:
        """A copy of ``model`` with BatchNorm statistics re-estimated on :data:`BN_REESTIMATE_BATCHES` training
        batches, and the batches read; None without BatchNorm layers to re-estimate (frozen ones keep theirs:
        :func:`autocompress.analysis.trained_norms`), a score or a training loader."""
        if not self.task.can_score or self.task.train_loader is None or not trained_norms(model):
            return None
        trial = copy.deepcopy(model)
        batches = self.task.batches(self.task.train_loader, BN_REESTIMATE_BATCHES)
        recalibrate_batchnorm(trial, batches, self.task.forward)
        return trial, len(batches)

    def _batchnorm_record(self, round_index: int, batches: int, before: float, after: float, kept: bool) -> dict:
        return {"event": "batchnorm", "round": round_index, "batches": batches, **self.scored(before, "_before"),
                **self.scored(after, "_after"), "kept": kept}

    def _release(self, state: RoundState) -> Callable[[nn.Module, dict, str], bool] | None:
        """The retraining's test for ending distillation (``distillation.stop_margin``): the student's validation
        score more than the margin above the base's (added to the epoch's stats). None without a teacher, a margin
        or a validation score."""
        margin = self.config.distillation.stop_margin
        if self.distiller is None or margin is None or not self.task.can_score:
            return None
        scale, base = self.score_scale, self._base_score()
        of_base = "" if self.task.score_fn is None else f" x |base score| = {margin * scale:.3g}"

        def release(model: nn.Module, stats: dict, when: str) -> bool:
            score = self.task.score(model)
            stats.update(self.scored(score))
            above = score - base > margin * scale
            passed = (f": more than distillation.stop_margin {margin:g}{of_base} above its teacher, it trains on "
                      "the labels alone from now on") if above else ""
            self.log(f"round {state.index} retraining, distillation stop test {when}: {self.describe(score)} against "
                     f"the base's {self.describe(base)}{passed}")
            return above

        return release

    def _compact(self, state: RoundState, *, last: bool) -> list[dict]:
        compacted = compact(state.model, state.param_masks, self.example_inputs,
                            channel_multiple=self.channel_multiple)
        compact_model = compacted.model
        misaligned = misaligned_widths(state.space, compact_model)
        if misaligned:  # an invariant of projection, purification and compaction together
            raise RuntimeError(f"round {state.index}: compact widths {misaligned} are not multiples of "
                               f"{self.channel_multiple}")
        kept_dense = compacted.report.get("dead_channels_kept") or {}
        if kept_dense:
            self.log(f"round {state.index}: compaction kept dead channels dense: "
                     + "; ".join(f"{name}: {reason}" for name, reason in kept_dense.items()))
        attributes = compacted.report.get("width_attributes") or {}
        if attributes:
            self.log(f"round {state.index}: widths the forward reads from attributes follow the pruned channels: "
                     + ", ".join(f"{name} = {value}" for name, value in attributes.items()))
        self.store.save(state.index, "compact", self.payload(compact_model))
        record = {"event": "round", "round": state.index, "target": state.target,
                  "params": self.params(compact_model), "macs": self.macs(compact_model),
                  **self.scored(self.task.score(compact_model) if self.task.can_score else None),
                  "rates": state.rates,
                  "layers": layer_widths(self.base_model, compact_model), "dead_channels_kept": kept_dense,
                  "width_attributes": attributes}
        state.model = densify(compact_model)
        state.compact_model = compact_model
        return [record]

    # --- compact models as plain data -----------------------------------------------------------------
    def payload(self, compact_model: nn.Module) -> dict:
        """A compact model as plain data: its architecture relative to the base model and its weights."""
        return {"architecture": describe_architecture(compact_model, reference=self.base_model),
                "state_dict": compact_model.state_dict()}

    def rebuild(self, payload: dict) -> nn.Module:
        """The compact model :meth:`payload` describes, on the device, in eval mode."""
        model = apply_architecture(copy.deepcopy(self.base_model), payload["architecture"])
        model.load_state_dict(payload["state_dict"])
        return model.to(self.task.device).eval()


def _masks_key(param_masks: dict[str, torch.Tensor]) -> tuple:
    """A hashable form of a hard pruning's per-parameter masks (equal keys: the same pruned weights)."""
    return tuple((name, tuple(mask.shape), mask.cpu().numpy().tobytes()) for name, mask in sorted(param_masks.items()))


def epoch_record(index: int, epoch: dict) -> dict:
    """The metrics record of training epoch ``index`` (from 0) of ``epoch`` (:func:`autocompress.training.train_epoch`'s
    result): ``{"epoch": from 1, "train_loss", "train_top1": in % like every other top-1 record (None without
    labels), "images", "distilled": began with distillation (None: a caller's train_fn)}``, and ``val_top1``
    (or ``val_score``) where distillation's stop test measured it (after the epoch, or within it when it stopped
    distillation there after ``distilled_steps`` steps)."""
    top1 = epoch.get("top1")
    return {"epoch": index + 1, "train_loss": epoch["loss"], "train_top1": None if top1 is None else 100.0 * top1,
            "images": epoch.get("images"), "distilled": epoch.get("distilled"),
            **{key: epoch[key] for key in ("val_top1", "val_score", "distilled_steps") if key in epoch}}


def _length(loader) -> int:
    """Batches per pass of ``loader`` for a user train_fn's ADMM schedule (100 when it has no length)."""
    batches = distributed.length(loader)
    return 100 if batches is None else batches


def layer_widths(base: nn.Module, compact_model: nn.Module) -> list[dict]:
    """Per conv / linear layer of ``base``: kept filters (output channels) and kept columns (GEMM inner
    dimension, ``C_in/groups*prod(kernel)``; Linear: input features) in ``compact_model``, with the totals."""
    compact_modules = dict(compact_model.named_modules())
    rows = []
    for name, module in base.named_modules():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        now = compact_modules.get(name)
        rows.append({"name": name, "filters_total": _rows(module), "columns_total": _columns(module),
                     "filters": _rows(now) if now is not None else 0,
                     "columns": _columns(now) if now is not None else 0})
    return rows


def _rows(module: nn.Module) -> int:
    return int(module.weight.shape[0])


def _columns(module: nn.Module) -> int:
    weight = module.weight
    return int(weight[0].numel())


def _own_channel_modules(model: nn.Module, group) -> str:
    """Words naming the modules of the caller's own classes (:func:`~autocompress.analysis.callers_class`) that hold
    parameters of ``group``'s channels, besides weight layers: a norm over the channels written as a plain
    ``nn.Module`` (an RMS norm; a LayerNorm is replaced by torch's) mixes the channels, so removing some changes
    the others ("" where none)."""
    names = [name for name in dict.fromkeys(s.module for s in group.slices if s.role != "input")
             if callers_class(module := model.get_submodule(name)) and not is_weight_layer(module)]
    if not names:
        return ""
    shown = ", ".join(f"{name} ({type(model.get_submodule(name)).__name__})" for name in names[:3])
    return (f"{shown} {'is a module' if len(names) == 1 else 'are modules'} of your own with per-channel parameters, "
            "which may compute over the channels (a normalisation): one that subclasses nn.LayerNorm (as "
            "torchvision's LayerNorm2d does) or nn.GroupNorm is pruned")


def _read_words(layer: str) -> str:
    """The words naming a read of ``layer``'s weight outside its own call
    (:func:`autocompress.space.weights_read_outside`)."""
    return f"{layer}'s weight is also read outside the layer (as F.conv2d(x, self.conv.weight) beside self.conv(x))"
