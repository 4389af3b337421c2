"""The settings of a compress run: nested typed dataclasses and one small :func:`from_dict`.

``CompressConfig`` holds the top-level settings and one dataclass per section (``search``, ``quick_eval``,
``admm``, ``purification``, ``retrain``, ``distillation``). :func:`from_dict` builds any of them from plain
data (a parsed YAML file, a dict in Python): a section given in part keeps the defaults of the keys it does
not name, an unknown key or a value of the wrong type raises :class:`SettingError` naming the setting
(``admm.epochs``). :meth:`CompressConfig.validate` then checks the values, before any work.
``dataclasses.asdict(config)`` is the resolved form a run folder stores in ``config.yaml``.

Library errors name settings; the CLI turns a :class:`SettingError` about a setting it has a flag for into
that flag's name (``autocompress.cli.compress``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .admm import ADMMConfig
from .alignment import AUTO, resolve_multiple
from .annealing import AnnealingConfig
from .distillation import DistillationConfig
from .distributed import DistributedConfig
from .latency import LatencyConfig
from .optimizer_probe import MIN_TRAINING_STEPS
from .errors import SettingError, UserError, show
from .padded_norm import LAYER_NORM_FORMS
from .purification import DEFAULT_THRESHOLDS, check_purification
from .quick_eval import VAL_BATCHES, check_batches, check_scorer
from .sampling import GUIDANCES, MOVES, START_SETTINGS
from .training import FINE_TUNING_LR, OPTIMIZERS, SCHEDULES, OptimizerSettings, TrainConfig, fine_tuning_lr

#: ``dims`` values -> unit kinds pruned
DIMS = {"filter,column": ("filter", "column"), "filter": ("filter",), "column": ("column",),
        "irregular": ("irregular",), "filter,column,irregular": ("filter", "column", "irregular")}
#: mixed-precision choices of the training phases (CUDA only)
AMP = ("none", "bf16", "fp16")
#: numeric settings are bounded so that a typo (``1e30``) is refused instead of running for ever
MAX_EPOCHS = 10_000
MAX_EVALUATIONS = 100_000


@dataclass
class Target:
    """A compression target: ``objective`` ``"params"`` (compression rate = original parameters /
    remaining parameters), ``"flops"`` (original MACs / remaining MACs) or ``"latency"`` (measured speedup
    over the base in the ``latency`` settings' runtime), and the factor (x, > 1); or, for latency only, a
    latency in milliseconds (``ms``; ``factor`` is then None until the base is measured)."""

    objective: str
    factor: float | None
    ms: float | None = None

    @classmethod
    def parse(cls, text: Any) -> "Target":
        """``"params=20x"`` / ``"flops=8x"`` (the ``x`` is optional) or ``"latency=2x"`` / ``"latency=5ms"`` (a
        latency needs its unit: a speedup or milliseconds). Raises SettingError (``target``)."""
        match = re.fullmatch(r"\s*(params|flops|latency)\s*=\s*(-?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(x|ms)?\s*", text,
                             flags=re.IGNORECASE) if isinstance(text, str) and len(text) < 100 else None
        objective, unit = (match.group(1).lower(), (match.group(3) or "").lower() or None) if match else (None, None)
        ms = unit == "ms"
        if not match and isinstance(text, str) and re.match(r"\s*macs\s*=", text, flags=re.IGNORECASE):
            raise SettingError("target", f"cannot read target {show(text)}: a MACs reduction is a flops target",
                               f"write {re.sub(r'(?i)macs', 'flops', text.strip(), count=1)} (the factor is the "
                               "same for FLOPs and MACs: FLOPs = 2 x MACs)")
        if not match or (ms and objective != "latency"):
            raise SettingError("target", f"cannot read target {show(text)}",
                               "write OBJECTIVE=FACTORx with OBJECTIVE params, flops or latency and 1 < FACTOR "
                               "< 1e9 (e.g. params=20x, latency=2x), or latency=MILLISECONDSms (e.g. latency=5ms)")
        if not (0 < float(match.group(2)) < 1e9 if ms else 1.0 < float(match.group(2)) < 1e9):
            raise SettingError("target", f"target {show(text)}: the {'latency' if ms else 'factor'} must be "
                               f"{'> 0' if ms else '> 1'} and < 1e9",
                               "a factor is how many times smaller (params, flops) or faster (latency) than the "
                               "base, e.g. params=20x or latency=2x" if not ms else "e.g. latency=5ms")
        if objective == "latency" and unit is None:
            raise SettingError("target", f"target {show(text)} has no unit",
                               f"write latency={match.group(2)}x for a speedup over the base or "
                               f"latency={match.group(2)}ms for milliseconds")
        value = float(match.group(2))
        return cls(objective, None, value) if ms else cls(objective, value)

    def __str__(self) -> str:
        return f"{self.objective}={self.ms:g}ms" if self.ms is not None else f"{self.objective}={self.factor:g}x"


def round_targets(final: float, rounds: Any) -> list[float]:
    """Per-round targets (progressive rounds, AutoCompress §"the generic flow"). ``"doubling"``: 2, 4, 8, ...
    below ``final``, then ``final``; an int (or int-like string) N: N geometrically spaced targets ending at
    ``final``; a list: used as given (must increase and end at ``final``). Raises SettingError (``rounds``)."""
    if rounds == "doubling":
        return [2.0 ** k for k in range(1, 64) if 2.0 ** k < final * (1 - 1e-9)] + [float(final)]
    if isinstance(rounds, (str, int)) and not isinstance(rounds, bool) and str(rounds).isdigit() \
            and 1 <= int(rounds) <= 100:
        n = int(rounds)
        return [float(final ** ((k + 1) / n)) for k in range(n)]
    try:
        targets = [float(t) for t in rounds][:101]
    except (TypeError, ValueError):
        targets = []
    if not targets or len(targets) > 100 or not all(map(math.isfinite, targets)) \
            or any(b <= a for a, b in zip(targets, targets[1:])) or abs(targets[-1] - final) > 1e-6 or targets[0] <= 1:
        raise SettingError("rounds", f"rounds={show(rounds)} is not a round schedule",
                           f"use 'doubling', a number of rounds (1-100), or increasing targets > 1 ending at "
                           f"{final:g}")
    return targets


@dataclass
class SearchConfig:
    """The guided simulated-annealing search (AutoCompress §"guided heuristic search"): ``guidance`` and the
    fields of :class:`autocompress.annealing.AnnealingConfig` except its seed, which comes from the run's
    ``seed``.

    Attributes:
        guidance: what the experience-based guidance orders units by (:data:`autocompress.sampling.GUIDANCES`):
            ``"layer"`` (the paper's: prune harder the layer that holds more of the target's parameters / MACs),
            ``"channel"`` (per channel: prune harder where one channel costs more), or ``"auto"`` (the default:
            ``"channel"`` for a flops target of a model with outputs per item, ``"layer"`` otherwise; see
            :meth:`CompressConfig.resolved_guidance`).
        start: the search's starting action (:data:`autocompress.sampling.START_SETTINGS`): ``"guided"`` (rates that
            follow the guidance), ``"magnitude"`` (one global threshold on the filters' weight magnitudes relative
            to each layer's mean, as a global magnitude ranking prunes; filter units only, the guided start when
            they cannot meet the target alone) or ``"auto"`` (the default: a search of one evaluation, which ends
            where it starts, starts from whichever of the two the optimiser probe's held-out loss prefers,
            :meth:`autocompress.rounds.Pipeline.settle_start`; a run too short to probe (under 320 optimiser steps, or
            160 at a round target of 4x or more: :func:`autocompress.optimizer_probe.start_probe_steps`) takes the
            magnitude start; a longer search starts guided). Measured at flops=4x with a 3-4 epoch budget (one
            candidate, three seeds each), magnitude against guided: +1.28 points of top-1 on a small residual CNN,
            -0.36 on a fresh user's SE / dilated Conv1d net, -0.50 on the CIFAR-10 ResNet-20 (BENCHMARKS.md,
            "Session 27"); +3.38 on a fresh user's token transformer at flops=2x ("Session 39").
        moves: the search's moves (:data:`autocompress.sampling.MOVES`): ``"gaussian"`` (the default: the paper's
            noise on every rate, re-fit to the target) or ``"mixed"`` (a growing share of local swaps as the
            temperature falls: one unit a width wider, one other pruned just enough; beyond the paper). Measured on
            the realistic ResNet-20 (15 epochs, one seed each, against Gaussian runs of earlier sessions): flops=4x
            83.85 % against 84.10, flops=2x 86.25 against 86.43, the demo 92.40 against 92.32 (BENCHMARKS.md,
            "Session 29"), so it is not the default.
    """

    guidance: str = "auto"
    start: str = AUTO
    moves: str = "gaussian"
    start_temperature: float = 0.05
    cooling_rate: float = 0.85
    stop_temperature: float = 0.002
    perturbation_magnitude: float = 0.1
    max_evaluations: int = 30
    candidates_per_step: int = 1

    def annealing(self, seed: int) -> AnnealingConfig:
        """The :class:`AnnealingConfig` of these settings and ``seed``; SettingError naming a bad field."""
        if not 1 <= self.max_evaluations <= MAX_EVALUATIONS:
            raise SettingError("search.max_evaluations", f"search.max_evaluations={self.max_evaluations} is "
                               f"outside [1, {MAX_EVALUATIONS}]", "use e.g. 30")
        check_choice("search.guidance", self.guidance, (AUTO, *GUIDANCES))
        check_choice("search.start", self.start, START_SETTINGS)
        check_choice("search.moves", self.moves, MOVES)
        fields = dataclasses.asdict(self)
        del fields["guidance"], fields["start"], fields["moves"]
        try:
            return AnnealingConfig(**fields, seed=seed)
        except UserError as exc:
            name = str(exc).partition("=")[0]
            raise SettingError(f"search.{name}", f"search.{exc}") from None


@dataclass
class QuickEvalConfig:
    """Quick evaluation of a candidate (:class:`autocompress.quick_eval.QuickEvaluator`).

    Attributes:
        scorer: ``"auto"`` (the default: ``"finetune"``), ``"bn"`` (one-shot + BatchNorm re-estimation),
            ``"refit"`` (+ least-squares refit of the final linear layer onto the base model's logits),
            ``"finetune"`` (``finetune_steps`` masked optimiser steps with distillation from the base, then BatchNorm
            re-estimation) or ``"finetune+refit"`` (the mean of the two scores); see :mod:`autocompress.quick_eval`
            and BENCHMARKS.md "Quick evaluation scorers", "Session 17" and "Session 43" for their rank correlation
            with accuracy after retraining, their cost and the accuracy their searches reached (CIFAR-10 ResNet-20
            at flops=4x, 15 epochs, three seeds: finetune 83.48-83.75 %, refit 82.90-84.11 %; on short runs the
            finetune search takes up to half the run).
        bn_recalibration: re-estimate BatchNorm statistics before scoring (EagleEye, ECCV 2020).
        bn_batches: training batches for those statistics (and the refit).
        val_batches: validation batches scored (spread evenly over the validation loader); None: all. Unused
            with a ``score_fn``, which decides itself what it scores on. The default 30
            (:data:`autocompress.quick_eval.VAL_BATCHES`; 10 until session 28) halves the share of a score's
            spread that is its sample of images (BENCHMARKS.md, session 28).
        finetune_steps, finetune_lr, finetune_distill: the ``"finetune"`` scorer's optimiser steps (training
            batches) per candidate (with the retraining's optimiser, ``retrain.optimizer``), constant learning
            rate (None: that optimiser's :data:`autocompress.training.FINE_TUNING_LR`), and distillation from the
            base model.
    """

    scorer: str = "auto"
    bn_recalibration: bool = True
    bn_batches: int = 5
    val_batches: int | None = VAL_BATCHES
    finetune_steps: int = 50
    finetune_lr: float | None = None
    finetune_distill: bool = True


@dataclass
class PurificationConfig:
    """Purification (Ma et al. arXiv 1905.00136): ``enabled``, and ``tolerance`` / ``thresholds`` of
    :func:`autocompress.purification.purify`. ``tolerance``: the largest accepted drop of the validation score, as
    a fraction of :attr:`autocompress.rounds.Pipeline.score_scale` (top-1: 0.005 = 0.5 points; a ``score_fn``:
    0.5 % of the base model's ``|score|``, so one setting holds for an MSE of 6e-4 and a PSNR of 30 dB).

    ``refit``: in ``compress``, when purification leaves the round's model below its budget (the search met
    the target before purification, which then removed dead and near-zero units too), hard-prune the ADMM
    weights again at rates re-fitted to the searched direction and purify again (at most 4 tries), so that
    the purified model ends as close to the round's target as the units allow, never beyond it
    (:meth:`autocompress.rounds.Pipeline.run_round`).
    """

    enabled: bool = True
    tolerance: float = 0.005
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    refit: bool = True


@dataclass
class RetrainConfig(OptimizerSettings):
    """Masked retraining with the default training loop: ``epochs``, ``lr`` and the
    :class:`autocompress.training.OptimizerSettings` (the batch size is the training loader's). ``epochs`` is also
    what a caller's ``train_fn`` is asked to run.

    ``optimizer`` is the default loop's optimiser for every phase (retraining, the ADMM W-step, the search's
    fine-tuning scorer): ``"sgd"``, ``"adamw"`` or ``"auto"`` (the default: for a classifier, whose targets
    are class indices, the one that retrains the pruned model better in a short probe before the first round
    (:mod:`autocompress.optimizer_probe`); AdamW for any other task, whose loss's scale SGD's steps would follow;
    see :meth:`CompressConfig.for_task`). ``lr`` None: the optimiser's :data:`autocompress.training.FINE_TUNING_LR`
    (SGD 0.01, AdamW 0.001)."""

    optimizer: str = AUTO
    epochs: int = 3
    lr: float | None = None

    def train_config(self, epochs: int | None = None) -> TrainConfig:
        """These settings as a :class:`TrainConfig` (``epochs`` overriding; ``"auto"`` checked as SGD), validated
        naming ``retrain.<field>``; the optimiser's and the schedule's names are checked even when retraining is off
        (0 epochs)."""
        check_choice("retrain.optimizer", self.optimizer, (AUTO, *OPTIMIZERS))
        check_choice("retrain.schedule", self.schedule, SCHEDULES)
        optimizer = "sgd" if self.optimizer == AUTO else self.optimizer
        values = {**dataclasses.asdict(self), "optimizer": optimizer,
                  "lr": fine_tuning_lr(self.lr, optimizer),
                  **({} if epochs is None else {"epochs": epochs})}
        config = TrainConfig(**values)
        return _naming("retrain", lambda: config.validate(epochs_flag="retrain.epochs", retraining=True,
                                                          names=lambda field: f"retrain.{field}"))


def check_choice(setting: str, value: Any, choices: Sequence[str]) -> None:
    """SettingError naming ``setting`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise SettingError(setting, f"{setting}={show(value)} is unknown", f"use one of {', '.join(choices)}")


def _naming(setting: str, check: Callable[[], Any], *, prefix: bool = False) -> Any:
    """``check()``; a UserError it raises becomes a SettingError naming the setting its message starts with
    (``admm.lr -0.1 is ...`` -> ``admm.lr``) when that lies under ``setting``, else ``setting`` itself.
    ``prefix``: the message names an argument of a section's check (``scorer='x' ...``) and gets the section
    put before it (``quick_eval.scorer='x' ...``)."""
    try:
        return check()
    except UserError as exc:
        message = f"{setting}.{exc}" if prefix else str(exc)
        first = message.split()[0].partition("=")[0]
        raise SettingError(first if first.startswith(f"{setting}.") else setting, message) from None


def default_admm() -> ADMMConfig:
    """Compress's ADMM defaults: rho from 0.02 by 1.6x every 100 optimiser steps, 2 epochs. With the few
    ADMM epochs a CPU budget allows, ADMMConfig's own once-per-epoch schedule leaves rho near 1e-3 and the
    primal residual large (measured, BENCHMARKS.md)."""
    return ADMMConfig(epochs=2, rho_init=0.02, rho_growth=1.6, update_interval=100)


@dataclass
class CompressConfig:
    """Everything a compress run depends on besides the model and the data; written, every setting
    resolved, to a run folder's ``config.yaml``.

    Attributes:
        target: e.g. ``"params=20x"`` or ``"flops=4x"`` (:class:`Target`); required.
        dims: ``"filter,column"`` (hybrid), ``"filter"``, ``"column"``, ``"irregular"`` or
            ``"filter,column,irregular"``; None (default): ``"filter"`` for a latency target (column layers
            cost more accuracy per millisecond saved in the runtimes measured, BENCHMARKS.md), ``"filter,column"``
            for the others (:attr:`resolved_dims`). A flops target counts executed MACs, so it column-prunes only
            the layers whose compact form then executes fewer (``executed_macs_only`` of
            :meth:`autocompress.space.PruningSpace.build`).
        rounds: ``"doubling"``, a number of rounds, or a list of increasing targets (:func:`round_targets`).
        seed: seed of every generator the run owns (per phase: :func:`autocompress.rounds.phase_seed`).
        max_r: largest pruning rate of any unit (the sampler's r_max), in (0, 1).
        search_mode: ``"annealing"`` (the guided search) or ``"uniform"`` (one rate for every unit, then the
            sampler's give-back at aligned widths; ablation).
        final_retrain_epochs: retraining epochs of the last round (None: as ``retrain.epochs``).
        latency_runs: timed runs per PyTorch latency measurement of the final table.
        channel_multiple: every filter group keeps a multiple of this many channels, and every column-pruned
            layer of kernel area 1 (1x1 conv, Linear) a multiple of this many input channels
            (:mod:`autocompress.alignment`): an integer >= 1 (1 = any width) or ``"auto"`` (a latency target:
            the CPU's channel block, 16 on AVX-512 CPUs and 8 otherwise, falling back to 8 where the target needs
            it; a params / flops target: 8, giving channels back on the block, falling back to
            :data:`autocompress.alignment.LAYOUT_MULTIPLE` and 1); None (default): ``"auto"`` for every target. Widths
            off onnxruntime's 4-channel grid ran up to 2.6x slower than the base; on the Fashion-MNIST demo
            (params=10x, three seeds) ``auto`` kept the top-1 of any width within noise (92.17 against 92.28 %)
            at 1.85x the base's onnxruntime speed instead of 1.21x (BENCHMARKS.md, "Session 34").
        layer_norm: how a LayerNorm over channels that filter pruning narrows is compacted
            (:data:`autocompress.padded_norm.LAYER_NORM_FORMS`): ``"kept"`` (default) a plain LayerNorm over the
            channels it keeps, which it normalises over from the retraining on (the model is shrunk to its kept
            channels before retraining: :func:`autocompress.compaction.shrink`), so the compact model computes
            exactly what was retrained at its width's speed; ``"padded"`` statistics over all its original
            channels, the removed ones counted as zeros (:class:`autocompress.padded_norm.PaddedLayerNorm`: the
            hard-pruned model's own function, a Pad and a Slice around each LayerNorm in ONNX).
        latency: where deployed latency is measured (:class:`autocompress.latency.LatencyConfig`): the final
            table's deployed columns and a latency target.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"``: autocast of the training phases on CUDA (ignored on CPU).
        ignored_layers: module names never pruned: each keeps its output channels, columns and weights (its input
            channels follow a pruned producer, as in Torch-Pruning); a container's name covers every module below
            it (e.g. a head ``["head"]``); checked against ``model.named_modules()`` before any work.
        budget: training epochs in all; when set, :func:`autocompress.budget.apply_budget` derives ``rounds``,
            ``admm.epochs``, ``retrain.epochs``, ``final_retrain_epochs`` and ``distillation.enabled`` from it
            (and refuses those settings given with other values); None: the schedule as written.
        search, quick_eval, admm, purification, retrain, distillation, distributed: the sections
            (``distributed``: :class:`autocompress.distributed.DistributedConfig`, used under torchrun).
    """

    target: str | None = None
    dims: str | None = None
    rounds: Any = "doubling"
    seed: int = 0
    max_r: float = 0.95
    search_mode: str = "annealing"
    final_retrain_epochs: int | None = None
    latency_runs: int = 20
    channel_multiple: int | str | None = None
    layer_norm: str = "kept"
    amp: str = "none"
    budget: int | None = None
    ignored_layers: list[str] = field(default_factory=list)
    search: SearchConfig = field(default_factory=SearchConfig)
    quick_eval: QuickEvalConfig = field(default_factory=QuickEvalConfig)
    admm: ADMMConfig = field(default_factory=default_admm)
    purification: PurificationConfig = field(default_factory=PurificationConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @classmethod
    def from_dict(cls, data: dict, *, validate: bool = True) -> "CompressConfig":
        """Build from plain data (see :func:`from_dict`), then :meth:`validate` unless ``validate=False``."""
        config = from_dict(cls, data)
        if validate:
            config.validate()
        return config

    @property
    def kinds(self) -> tuple[str, ...]:
        """The unit kinds :attr:`resolved_dims` prunes (``"filter,column"`` -> ``("filter", "column")``)."""
        return tuple(self.resolved_dims.split(","))

    @property
    def resolved_dims(self) -> str:
        """``dims``, or when None ``"filter"`` for a latency target and ``"filter,column"`` otherwise."""
        if self.dims is not None:
            return self.dims
        latency = self.target is not None and Target.parse(self.target).objective == "latency"
        return "filter" if latency else "filter,column"

    def for_task(self, classifies: bool | None, positions: bool = False) -> "CompressConfig":
        """This config with ``distillation.enabled`` (:meth:`with_distillation_for`) and ``retrain.optimizer``
        resolved where the task decides it (:meth:`with_optimizer`). ``"auto"``: ``"adamw"`` unless
        ``classifies``, the training targets are class indices for the output (:attr:`autocompress.task.Task.
        classifies`), and the output holds one class vector per item (not ``positions``:
        :attr:`autocompress.task.Task.positions`); for such a classifier it stays ``"auto"``, chosen later by a
        probe on the pruned model (:mod:`autocompress.optimizer_probe`), or ``"sgd"`` when a learning rate is set
        (``retrain.lr``, ``admm.lr``, ``quick_eval.finetune_lr``: a rate belongs to one optimiser). SGD's steps
        grow with the loss's scale: an AdamW-trained denoiser (mean squared error ~0.008) retrained with SGD at
        lr 0.01 for 3 epochs ended 1.96 dB below the same epochs of AdamW (BENCHMARKS.md, "Session 29"); a
        per-pixel cross-entropy averages over many easy positions, and a segmentation U-Net kept 3.7 mIoU points
        more with AdamW (session 31). For classifiers neither optimiser wins everywhere (session 36)."""
        optimizer = self.retrain.optimizer
        if optimizer == AUTO and not (classifies and not positions):
            optimizer = "adamw"
        elif optimizer == AUTO and self.pinned_lrs:
            optimizer = "sgd"
        return self.with_distillation_for(classifies, positions).with_optimizer(optimizer)

    @property
    def pinned_lrs(self) -> list[str]:
        """The learning-rate settings given explicitly (None: the optimiser's fine-tuning rate)."""
        rates = {"retrain.lr": self.retrain.lr, "admm.lr": self.admm.lr,
                 "quick_eval.finetune_lr": self.quick_eval.finetune_lr}
        return [name for name, value in rates.items() if value is not None]

    def with_optimizer(self, optimizer: str) -> "CompressConfig":
        """This config with ``retrain.optimizer`` set to ``optimizer`` and the unset learning rates
        (``retrain.lr``, ``admm.lr``, ``quick_eval.finetune_lr``) at its
        :data:`autocompress.training.FINE_TUNING_LR`; ``"auto"`` (still to be chosen) leaves them unset."""
        if optimizer == AUTO:
            return dataclasses.replace(self, retrain=dataclasses.replace(self.retrain, optimizer=AUTO))
        return dataclasses.replace(
            self,
            retrain=dataclasses.replace(self.retrain, optimizer=optimizer,
                                        lr=fine_tuning_lr(self.retrain.lr, optimizer)),
            admm=dataclasses.replace(self.admm, lr=fine_tuning_lr(self.admm.lr, optimizer)),
            quick_eval=dataclasses.replace(self.quick_eval,
                                           finetune_lr=fine_tuning_lr(self.quick_eval.finetune_lr, optimizer)))

    def with_distillation_for(self, classifies: bool | None, positions: bool = False) -> "CompressConfig":
        """This config with ``distillation.enabled: auto`` resolved (:data:`autocompress.distillation.AUTO_RULE`):
        false for class scores per position (``positions``) or targets that are not class indices (``classifies``
        False: a regression), else true."""
        if self.distillation.enabled != AUTO:
            return self
        return dataclasses.replace(self, distillation=dataclasses.replace(
            self.distillation, enabled=classifies is not False and not positions))

    def describe_loop(self, given: "CompressConfig", classifies: bool | None, positions: bool = False) -> str:
        """A log line on the default training loop of this config resolved by :meth:`for_task`: its optimiser,
        learning rates, and why ``auto`` chose the optimiser (``given``: the config before :meth:`for_task`)."""
        if self.retrain.optimizer == AUTO:
            rates = " or ".join(f"{name} (lr {lr:g})" for name, lr in FINE_TUNING_LR.items())
            return (f"default training loop: {rates}, whichever retrains the pruned model better in a short probe "
                    f"before the first round (retrain.optimizer auto, class targets; a run of fewer than "
                    f"{MIN_TRAINING_STEPS} optimiser steps is not probed)")
        why = ""
        if given.retrain.optimizer == AUTO:
            targets = ("class indices per position of a dense output (a per-pixel loss's mean gives SGD small steps)"
                       if classifies and positions else "class indices or probabilities for the output" if classifies
                       else "not class indices for the output" if classifies is False
                       else "not readable as class indices")
            pinned = (f"; no probe, as {', '.join(given.pinned_lrs)} is set (set retrain.optimizer with it)"
                      if classifies and not positions else "")
            why = f" (retrain.optimizer auto: the training targets are {targets}{pinned})"
        return (f"default training loop: {self.retrain.optimizer}, lr {self.retrain.lr:g} (retraining), "
                f"{self.admm.lr:g} (ADMM), {self.quick_eval.finetune_lr:g} (search fine-tuning){why}")

    def resolved_guidance(self, positions: bool = False) -> str:
        """``search.guidance``, or when ``"auto"`` ``"channel"`` for a flops target of a model whose outputs are per
        item and ``"layer"`` otherwise (params and latency targets; ``positions``: outputs with positions, e.g.
        per-pixel class scores ``[B, C, H, W]``). At equal executed MACs a CIFAR-10 ResNet-20 retrained better the
        more parameters it kept, which the channel guidance keeps by pruning the high-resolution stage hardest (15
        epochs, paired seeds: flops=4x +0.73 and +0.31 points of top-1, flops=2x +0.50; BENCHMARKS.md, "Session 18");
        a segmentation U-Net, whose high-resolution channels carry its output's detail, lost 2.5-17 points of mean
        IoU with it at flops=2x ("Session 42")."""
        if self.search.guidance != AUTO:
            return self.search.guidance
        flops = self.target is not None and Target.parse(self.target).objective == "flops"
        return "channel" if flops and not positions else "layer"

    def parsed_target(self) -> Target:
        """``target`` parsed; SettingError when it is missing or malformed."""
        if self.target is None:
            raise SettingError("target", "no target given", "set target, e.g. params=10x or flops=4x")
        return Target.parse(self.target)

    def validate(self) -> None:
        """Check every value now, before any work; raises :class:`SettingError` naming the setting."""
        target = self.parsed_target()
        if self.dims is not None and self.dims not in DIMS:
            raise SettingError("dims", f"unknown dims {show(self.dims)}", f"use one of {' | '.join(DIMS)}")
        if set(self.kinds) == {"irregular"} and target.objective == "flops":
            raise SettingError("dims", "irregular sparsity does not reduce the MACs of the dense layers it "
                               "leaves", "use a params target with dims irregular, or filter,column for flops")
        if target.ms is None:
            round_targets(target.factor, self.rounds)
        elif isinstance(self.rounds, (list, tuple)):
            raise SettingError("rounds", f"a target in milliseconds ({target}) has no factor to end a list of round "
                               "targets at", "use rounds doubling or a number of rounds")
        else:
            round_targets(2.0, self.rounds)  # the format only: the factor is known once the base is measured
        if target.objective == "latency" and "irregular" in self.kinds:
            raise SettingError("dims", "irregular sparsity does not make the dense layers it leaves faster",
                               "use dims filter or filter,column with a latency target")
        self.resolved_multiple()
        self.latency.validate()
        checks = [
            ("search_mode", self.search_mode in ("annealing", "uniform"), "use annealing or uniform"),
            ("max_r", 0 < self.max_r < 1, "use e.g. 0.95"),
            ("latency_runs", 1 <= self.latency_runs <= 100_000, "use e.g. 20"),
            ("amp", self.amp in AMP, f"use one of {', '.join(AMP)}"),
            ("layer_norm", self.layer_norm in LAYER_NORM_FORMS, f"use one of {', '.join(LAYER_NORM_FORMS)}"),
            ("seed", 0 <= self.seed < 2 ** 63, "use an integer >= 0"),
            ("budget", self.budget is None or 1 <= self.budget <= MAX_EPOCHS, f"use 1 to {MAX_EPOCHS}, or null"),
            ("admm.epochs", 0 <= self.admm.epochs <= MAX_EPOCHS, f"use 0 to {MAX_EPOCHS}"),
            ("retrain.epochs", 0 <= self.retrain.epochs <= MAX_EPOCHS, f"use 0 to {MAX_EPOCHS}"),
            ("final_retrain_epochs", self.final_retrain_epochs is None
             or 0 <= self.final_retrain_epochs <= MAX_EPOCHS, f"use 0 to {MAX_EPOCHS}, or null"),
            ("admm.rho_max", math.isfinite(self.admm.rho_max) and self.admm.rho_max <= 1e6, "use e.g. 1.0"),
        ]
        for setting, ok, fix in checks:
            if not ok:
                raise SettingError(setting, f"{setting}={show(getattr_dotted(self, setting))} is not valid",
                                   fix)
        self.search.annealing(0)
        _naming("admm", lambda: self.admm.train_config(lambda field: f"admm.{field}"))
        _naming("quick_eval.bn_batches", lambda: check_batches(self.quick_eval.bn_batches,
                                                               self.quick_eval.val_batches))
        _naming("quick_eval", lambda: check_scorer(self.quick_eval.scorer, self.quick_eval.finetune_steps,
                                                   self.quick_eval.finetune_lr), prefix=True)
        _naming("purification.tolerance", lambda: check_purification(self.purification.tolerance,
                                                                     self.purification.thresholds))
        self.retrain.train_config()
        if self.final_retrain_epochs is not None:
            self.retrain.train_config(self.final_retrain_epochs)

    @property
    def auto_multiple(self) -> bool:
        """Whether ``channel_multiple`` is ``"auto"`` (given, or the default None): the run picks it, and may fall
        back to a smaller one; an explicit multiple never changes."""
        return self.channel_multiple in (None, AUTO)

    def resolved_multiple(self, device: str = "cpu") -> tuple[int, str]:
        """The channel multiple of this run and why (:func:`autocompress.alignment.resolve_multiple`):
        ``channel_multiple``, or ``"auto"`` when None (which depends on whether ``target`` is a latency). SettingError
        (``channel_multiple``) for a bad value."""
        value = AUTO if self.auto_multiple else self.channel_multiple
        latency = self.target is not None and Target.parse(self.target).objective == "latency"
        return _naming("channel_multiple", lambda: resolve_multiple(value, device=device, latency=latency))

    def retrain_epochs(self, *, last: bool) -> int:
        """Retraining epochs of a round (``last``: the final round)."""
        return self.final_retrain_epochs if last and self.final_retrain_epochs is not None else self.retrain.epochs


def getattr_dotted(obj: Any, dotted: str) -> Any:
    """``getattr_dotted(config, "admm.epochs")`` -> ``config.admm.epochs``."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _did_you_mean(key: str, settings: Any, prefix: str) -> list[str]:
    """The settings of the dataclass instance ``settings`` a mistyped ``key`` may have meant: names spelled alike
    (``retrian`` -> ``retrain``), and a section's setting of that name given a level up (``epochs`` ->
    ``retrain.epochs``)."""
    names = [f.name for f in dataclasses.fields(settings)]
    nested = [f"{name}.{key}" for name in names if dataclasses.is_dataclass(section := getattr(settings, name))
              and key in {f.name for f in dataclasses.fields(section)}]
    return [prefix + name for name in difflib.get_close_matches(key, names, n=2, cutoff=0.75) + nested]


def from_dict(cls: type, data: Any, *, prefix: str = "", base: Any = None) -> Any:
    """An instance of dataclass ``cls`` from plain data: ``base`` (default ``cls()``) with the values of
    ``data`` put in. A nested dataclass field takes a mapping, built the same way over the default's own
    value (so a section given in part keeps its other defaults).

    Raises:
        SettingError: ``data`` is not a mapping, names an unknown key, or holds a value whose type does not
            fit the field's annotation (an int is a float too, a bool never a number; lists of items).
    """
    base = cls() if base is None else base
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise SettingError(where, f"{where} must be a mapping of settings, not {type(data).__name__}",
                           "see the README's example config")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in data if key not in fields)
    if unknown:
        guesses = "".join(f" ({prefix}{key}: did you mean {' or '.join(guess)}?)"
                          for key in unknown if (guess := _did_you_mean(key, base, prefix)))
        raise SettingError(f"{prefix}{unknown[0]}", f"unknown setting(s) {', '.join(prefix + k for k in unknown)}"
                           f"{guesses}",
                           f"valid {prefix.rstrip('.') + ' ' if prefix else ''}settings: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        current, hint = getattr(base, key), hints[key]
        if dataclasses.is_dataclass(current):
            values[key] = from_dict(type(current), value, prefix=f"{prefix}{key}.", base=current)
        elif not _fits(value, hint):
            raise SettingError(f"{prefix}{key}", f"{prefix}{key}={show(value)} has the wrong type",
                               f"give {_type_words(hint)}")
        else:
            values[key] = list(value) if isinstance(value, tuple) else value
    try:
        return dataclasses.replace(base, **values)
    except UserError as exc:  # a section's own __post_init__ check (ADMMConfig, DistillationConfig)
        named = str(exc).partition("=")[0]
        setting = f"{prefix}{named}" if named in fields else where
        raise SettingError(setting, f"{prefix}{exc}" if prefix else str(exc)) from None


#: how a message asks for a value of each type (YAML spelling)
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", dict: "a mapping",
               type(None): "null"}
_LIST_WORDS = {int: "integers", float: "numbers", str: "names (text), e.g. ['head']"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value read from YAML fits an annotation (see :func:`from_dict`)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_fits(item, args[0]) for item in value if args)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_words(hint: Any) -> str:
    """``int | None`` -> ``"an integer or null"``; ``list[float]`` -> ``"a list of numbers"``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        words = [_type_words(arg) for arg in typing.get_args(hint)]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if typing.get_origin(hint) is not None:
        items = typing.get_args(hint)
        return f"a list of {_LIST_WORDS.get(items[0], 'items each ' + _type_words(items[0]))}" if items else "a list"
    return _TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


__all__ = ["AMP", "DIMS", "CompressConfig", "PurificationConfig", "QuickEvalConfig", "RetrainConfig",
           "SearchConfig", "SettingError", "Target", "from_dict", "round_targets"]
