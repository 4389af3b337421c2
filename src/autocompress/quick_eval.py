"""Quick evaluation of a candidate action: one-shot pruning, a cheap repair, validation top-1.

Source: AutoCompress, Liu et al. AAAI 2020 (brief §1 step 2): score a proposal without retraining by
pruning the current weights in one shot at the proposed rates and measuring accuracy on a held-out
validation split. Beyond the paper (switchable, ``bn_recalibration``): BatchNorm running statistics are
re-estimated on a few training batches before scoring ("adaptive BN", EagleEye, Li et al. ECCV 2020),
because one-shot pruning shifts every later layer's activation statistics and stale statistics make the
score mostly noise.

The repair before scoring is the ``scorer`` (beyond the paper; issue 13, measured in BENCHMARKS.md "Quick
evaluation scorers"): ``"bn"`` only re-estimates BatchNorm statistics (the paper's one-shot score plus
adaptive BN); ``"refit"`` then refits the final linear layer by ridge least squares onto the teacher's
logits on the BatchNorm batches (the kept inputs of each output only); ``"finetune"`` first runs
``finetune_steps`` optimiser steps (SGD or AdamW) on the pruned model with its masks held
(:class:`autocompress.masks.MaskEnforcer`), optionally with distillation from the teacher (Hinton et al. 2015),
then re-estimates BatchNorm (given example inputs, on the candidate compacted: the same function at fewer MACs
per step; every candidate trains on the same batches, kept with the teacher's outputs on them after the first);
``"finetune+refit"`` scores the mean of the two (the refit on the one-shot candidate, the fine-tuning on its own
copy): on the recorded candidates of BENCHMARKS.md "Quick evaluation scorers" its rank correlation with accuracy
after retraining is the steadiest across step sizes (CIFAR-10 ResNet-20 flops=2x / 4x: 0.87 / 0.86, against
finetune's 0.74 / 0.90 and refit's 0.90 / 0.54), for the refit's cost on top of the fine-tuning's (about a third
more per candidate); its one search measured end to end (flops=2x, 15 epochs) ended 0.5 points below finetune's.
``"auto"`` (the default) is ``"finetune"``: on a CIFAR-10 ResNet-20 at 4x fewer MACs its search kept an even
network on three seeds and 83.48-83.75 % top-1 after 15 epochs, against 82.90-84.11 % for ``"refit"``'s, which
ranks widths that preserve the one-shot function first; it needs no final Linear. One-shot pruning at a large step
leaves every candidate near chance, where top-1 cannot rank them; a short repair
moves them back into the range where it can.

Everything happens on a private deep copy of the model; the caller's model (weights, BatchNorm buffers,
train/eval mode) is never touched. The training batches used for BatchNorm statistics and the validation
subset are drawn once, with a seeded generator, so scores are deterministic; fine-tuning draws its batches
under ``task.seeded(seed)``, the same ones for every candidate. The test split is never used.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import distributed
from .analysis import analysis_mode, trained_norms
from .compaction import shrink
from .distillation import DistillationConfig, Distiller, TeacherCache
from .errors import UserError
from .masks import MaskEnforcer, apply_masks
from .projection import project
from .task import move
from .training import TrainConfig, batch_stream, build_optimizer, fine_tuning_lr, train_epoch

#: the scorer whose score is the mean of the ``"finetune"`` and ``"refit"`` scores of a candidate
BOTH = "finetune+refit"
#: the quick-evaluation scorers (see the module docstring; ``"auto"``: ``"finetune"``)
SCORERS = ("auto", "bn", "refit", "finetune", BOTH)


def resolved_scorer(scorer: str) -> str:
    """The scorer ``scorer`` names: ``"auto"`` is ``"finetune"``."""
    return "finetune" if scorer == "auto" else scorer


def fine_tunes(scorer: str) -> bool:
    """Whether ``scorer`` (a name of :data:`SCORERS`) fine-tunes each candidate."""
    return resolved_scorer(scorer) in ("finetune", BOTH)


#: bytes of fine-tuning batches a ``"finetune"`` evaluator keeps to replay for every candidate (beyond them the
#: loader, reseeded, gives the same batches again at the cost of loading them)
KEPT_BATCH_BYTES = 256 * 2**20
#: the ``"finetune"`` scorer's distillation (T 4, alpha 0.9): its rank correlations with accuracy after retraining
#: were measured with it (BENCHMARKS.md, "Quick evaluation scorers"), and it does not follow the run's setting
SCORER_DISTILLATION = DistillationConfig(enabled=True, temperature=4.0, alpha=0.9)
#: what each resolved scorer does to a one-shot pruned candidate before scoring it (for the search's log)
SCORER_STEPS = {"bn": "BatchNorm statistics re-estimated", "refit": "BatchNorm statistics re-estimated and the "
                "last layer refit to the base model's outputs", "finetune": "a short masked fine-tuning",
                BOTH: "the mean of the scores after a short masked fine-tuning and after a refit of the last layer"}


@dataclass(frozen=True)
class QuickEvalResult:
    """Score of one candidate.

    Attributes:
        top1: validation score of the one-shot pruned model (top-1 as a fraction in [0, 1] by default, or
            the caller's ``score_fn``).
        params: parameters of the compact model the rates give (``space.count``).
        macs: multiply-accumulates per image of that model (FLOPs = 2 x MACs).
        seconds: wall-clock time of this evaluation.
    """

    top1: float
    params: int
    macs: int
    seconds: float


def recalibrate_batchnorm(model: nn.Module, batches: list, forward: Callable[[nn.Module, Any], Any] | None = None
                          ) -> None:
    """Re-estimate the BatchNorm layers' running mean / variance on ``batches`` (adaptive BN, EagleEye, Li et al.
    ECCV 2020); frozen ones keep theirs (:func:`autocompress.analysis.trained_norms`).

    Statistics are reset and accumulated as an exact average over the batches (``momentum=None``); only
    BatchNorm layers run in train mode (dropout etc. stay in eval). ``forward(model, batch)`` runs a batch
    (default ``model(batch[0])``). Afterwards the model is in eval mode. Modifies ``model`` in place: use on a
    copy.
    """
    norms = trained_norms(model)
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for batch in batches:
            forward(model, batch) if forward is not None else model(batch[0])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


#: validation batches a candidate's score reads by default. Rank correlation of the default score with itself
#: across disjoint validation chunks of 10 batches of 128 (20 random candidates of the realistic CIFAR-10
#: ResNet-20, ``benchmarks/score_noise.py``): 0.55 at flops=2x and 0.75 at flops=4x, so half the score's spread
#: at 2x was which images it read; at 30 batches (Spearman-Brown) 0.79 and 0.90, for 6 % more CPU per candidate
#: (BENCHMARKS.md, session 28)
VAL_BATCHES = 30


def check_batches(bn_batches: int, val_batches: int | None, batch_size: int = 1) -> None:
    """UserError unless every count of a quick evaluation is >= 1 (``val_batches`` may be None: the whole
    validation loader). Called by :class:`QuickEvaluator` and, before any work, by the compress config."""
    if bn_batches < 1 or batch_size < 1 or (val_batches is not None and val_batches < 1):
        raise UserError(f"quick_eval needs >= 1 batch (bn_batches={bn_batches}, val_batches={val_batches})",
                        "use e.g. bn_batches 5 and val_batches 30")


def check_scorer(scorer: str, finetune_steps: int, finetune_lr: float | None) -> None:
    """UserError naming the argument unless ``scorer`` is one of :data:`SCORERS`, ``finetune_steps`` in
    [1, 100000] and ``finetune_lr`` None or a finite number > 0. Called by :class:`QuickEvaluator` and by the
    compress config (which names them ``quick_eval.<argument>``)."""
    if scorer not in SCORERS:
        raise UserError(f"scorer={scorer!r} is not a quick-evaluation scorer", f"use one of {', '.join(SCORERS)}")
    if not 1 <= finetune_steps <= 100_000:
        raise UserError(f"finetune_steps={finetune_steps} is outside [1, 100000]", "use e.g. 50")
    if finetune_lr is not None and not (math.isfinite(finetune_lr) and finetune_lr > 0):
        raise UserError(f"finetune_lr={finetune_lr} must be a finite number > 0", "use e.g. 0.01")


def _shared_batches(task, loader, count: int | None, *, spread: bool = False,
                    device: torch.device | None = None) -> list:
    """``task.batches(loader, count, spread=spread, device=device)``; under ``torch.distributed`` rank 0's
    batches on every rank, so a candidate's score does not depend on the rank that computes it (a loader sharded
    per rank yields other batches on each)."""
    if not distributed.world().active:
        return task.batches(loader, count, spread=spread, device=device)
    cpu = torch.device("cpu")
    batches = distributed.on_main(lambda: task.batches(loader, count, spread=spread, device=cpu))
    return [move(batch, task.device if device is None else device, layout=task.layout) for batch in batches]


class QuickEvaluator:
    """Scores rate dicts by one-shot projection, the ``scorer``'s repair and the validation score.

    Args:
        model: the model to prune (not modified; a deep copy is taken now, so later changes to ``model`` are
            not seen).
        space: the :class:`~autocompress.space.PruningSpace` built on ``model``.
        task: :class:`~autocompress.task.Task`: its training loader gives the BatchNorm batches (the first
            ``bn_batches``) and the fine-tuning batches; its score scores a candidate: ``score_fn`` when the
            caller gave one, else top-1 on ``val_batches`` batches spread evenly over the validation loader
            (:meth:`~autocompress.task.Task.batches` with ``spread``: a loader in class order gives every class;
            drawn once, so scores are deterministic). Never a test split.
        scorer: ``"bn"``, ``"refit"``, ``"finetune"`` or ``"finetune+refit"`` (module docstring), or ``"auto"``:
            ``"finetune"``
            (:attr:`scorer` says which).
        bn_recalibration: re-estimate BatchNorm statistics before scoring (EagleEye; beyond the paper).
        bn_batches: training batches for the statistics (and the refit's least squares).
        val_batches: validation batches scored (:data:`VAL_BATCHES`); None = the whole validation loader.
        finetune_steps: optimiser steps of ``"finetune"`` (one per training batch; the loader is re-iterated as
            needed); finetune_lr: their constant learning rate (None: ``optimizer``'s
            :data:`autocompress.training.FINE_TUNING_LR`); optimizer: ``"sgd"`` (momentum 0.9) or ``"adamw"``,
            without weight decay.
        finetune_distill: ``"finetune"`` minimises the distillation loss against the teacher
            (:data:`SCORER_DISTILLATION`: T 4, alpha 0.9, the setting its rank correlations were measured at)
            instead of the task's loss alone.
        teacher: the model whose outputs ``"refit"`` and distillation aim at (default: ``model``; compress
            passes its base model); not modified.
        seed: seeds the fine-tuning batches' order (the same for every candidate).
        example_inputs: one input batch (a tensor or tuple, e.g. ``[1, 3, 32, 32]``) for tracing; when given,
            ``"finetune"`` trains each candidate compacted (:func:`autocompress.compaction.shrink`: pruned
            channels removed, the same function at fewer MACs per step) instead of masked at full width; a
            model that cannot be compacted is fine-tuned masked.
        layer_norm: how that compaction treats a LayerNorm that lost channels (``"kept"`` or ``"padded"``:
            :data:`autocompress.padded_norm.LAYER_NORM_FORMS`), as the retraining will.

    Raises:
        UserError: a batch count below 1 (:func:`check_batches`), a bad scorer setting (:func:`check_scorer`),
            an unknown ``optimizer``, or ``"refit"`` / ``"finetune+refit"`` on a model whose output is not
            ``[B, classes]`` from a final ``nn.Linear``.
    """

    def __init__(self, model: nn.Module, space, task, *, scorer: str = "bn", bn_recalibration: bool = True,
                 bn_batches: int = 5, val_batches: int | None = VAL_BATCHES, finetune_steps: int = 50,
                 finetune_lr: float | None = None, finetune_distill: bool = True, optimizer: str = "sgd",
                 teacher: nn.Module | None = None, seed: int = 0, example_inputs: Any = None,
                 layer_norm: str = "padded"):
        check_batches(bn_batches, val_batches)
        check_scorer(scorer, finetune_steps, finetune_lr)
        self._tuning = TrainConfig(epochs=1, lr=fine_tuning_lr(finetune_lr, optimizer), optimizer=optimizer,
                                   momentum=0.9, nesterov=False, weight_decay=0.0).validate(names=lambda field: field)
        self.space, self.task, self.seed, self._example = space, task, seed, example_inputs
        self.layer_norm = layer_norm
        self.bn_recalibration = bn_recalibration
        self.finetune_steps = finetune_steps
        self._model = copy.deepcopy(model)
        self._initial = {k: v.detach().clone() for k, v in self._model.state_dict().items()}
        teacher = model if teacher is None else teacher
        refit = scorer in ("refit", BOTH)
        scorer = resolved_scorer(scorer)
        self._bn_data = _shared_batches(task, task.train_loader, bn_batches) if bn_recalibration or refit else []
        # kept on the CPU, each batch moved to the device as it is scored (30 ImageNet batches of 256: 4.6 GB)
        self._val_data = (_shared_batches(task, task.val_loader, val_batches, spread=True, device=torch.device("cpu"))
                          if task.score_fn is None else None)
        distils = fine_tunes(scorer) and finetune_distill
        self._distiller = Distiller(teacher, SCORER_DISTILLATION, "quick_eval.finetune_distill") if distils else None
        # every candidate fine-tunes on the same batches: the first draws them, the others replay them, and the
        # teacher's outputs on them come from a cache
        self._teacher_cache = TeacherCache(adaptive=False) if self._distiller is not None else None
        self._kept: list = []
        self._kept_bytes: int | None = 0  # None: a batch did not fit (or is not all tensors), keep no more
        self._head = final_linear(self._model, teacher, task, self._bn_data) if refit else None
        if refit and self._head is None:
            raise UserError(f"quick_eval scorer {scorer!r} needs a model whose output [B, classes] comes straight "
                            "from a final nn.Linear", "use scorer auto, bn or finetune for this model")
        #: the scorer in use (``"auto"`` resolved)
        self.scorer = scorer
        self._scored: dict[tuple, list[QuickEvalResult]] = {}  # (steps, mask digest) -> results
        self._steps = "no re-estimation" if self.scorer == "bn" and not bn_recalibration else SCORER_STEPS[self.scorer]

    def describe(self) -> str:
        """One line for the log: the scorer, what it does to each candidate, and that its score only ranks
        candidates (the val top-1 right after hard pruning has none of those steps and reads much lower)."""
        measure = "val top-1" if self.task.score_fn is None else "validation score"
        tuning = (f"; the fine-tuning is {self.finetune_steps} {self._tuning.optimizer.upper()} steps at lr "
                  f"{self._tuning.lr:g} in the library's own loop (a train_fn trains ADMM and retraining only)"
                  if fine_tunes(self.scorer) else "")
        return (f"scorer {self.scorer} ({self._steps} on each one-shot pruned candidate): a score that ranks "
                f"candidates, not the {measure} the model has after ADMM and hard pruning{tuning}")

    @property
    def distinct(self) -> int:
        """Number of distinct candidates (masks) scored so far; rates projecting to scored masks reuse a score."""
        return len(self._scored)

    @property
    def val_images(self) -> int | None:
        """Number of validation images each candidate is scored on (None with a caller's ``score_fn``)."""
        if self._val_data is None:
            return None
        return sum(int(self.task.targets(batch).numel()) for batch in self._val_data)

    def pruned_model(self, rates: dict[str, dict[str, float]]) -> tuple[nn.Module, object]:
        """The private copy reset to the original weights, projected at ``rates`` and masked, with
        BatchNorm recalibrated when enabled (no fine-tuning or refit). Returns ``(model, masks)``; the model
        is reused by the next call."""
        masks = self._project(rates)
        return self._masked(masks), masks

    def _project(self, rates: dict[str, dict[str, float]]):
        """The masks of ``rates`` on the original weights (the private copy is reset to them)."""
        with torch.no_grad():
            self._model.load_state_dict(self._initial)
            return project(self.space, self._model, rates)

    def _masked(self, masks) -> nn.Module:
        """The private copy (reset by :meth:`_project`) masked by ``masks``, BatchNorm recalibrated when enabled."""
        with torch.no_grad():
            apply_masks(self._model, self.space.param_masks(masks))
        self._recalibrate(self._model)
        return self._model

    def _recalibrate(self, model: nn.Module) -> None:
        if self.bn_recalibration:
            recalibrate_batchnorm(model, self._bn_data, self.task.forward)
        model.eval()

    def score(self, rates: dict[str, dict[str, float]]) -> QuickEvalResult:
        """Quick evaluation of ``rates`` (``{"filter": {group: r}, "column": {layer: r}, "irregular":
        {layer: r}}``): the validation score after the scorer's repair and the compact model's parameters /
        MACs. Rates that project onto masks already scored (aligned widths round many neighbours of an action
        to the same architecture) return that score again without computing it."""
        return self.score_along(rates, [self.finetune_steps] if fine_tunes(self.scorer) else [0])[0]

    def score_along(self, rates: dict[str, dict[str, float]], steps: list[int]) -> list[QuickEvalResult]:
        """Scores of ``rates`` after each of ``steps`` (increasing) fine-tuning steps of ONE run: entry k is
        what :meth:`score` gives with ``finetune_steps = steps[k]`` (constant learning rate, same batches),
        ``seconds`` counted from the start. With the ``"bn"`` / ``"refit"`` scorers ``steps`` must be
        ``[0]``; with ``"finetune+refit"`` each entry is the mean of the fine-tuned score and the refit one (computed
        once, on the one-shot pruned candidate). Used by ``benchmarks/fidelity.py`` to measure several step counts
        at the cost of the largest."""
        tunes = fine_tunes(self.scorer)
        if not tunes and list(steps) != [0]:
            raise UserError(f"scorer {self.scorer!r} does not fine-tune", "pass steps [0]")
        start = time.perf_counter()
        masks = self._project(rates)
        key = (tuple(steps), _mask_key(masks))
        if key in self._scored:
            return list(self._scored[key])
        model = self._masked(masks)
        param_masks = self.space.param_masks(masks)
        refitted = self._refit_score(model, param_masks) if self.scorer == BOTH else None
        if tunes and self._example is not None:
            model, param_masks = self._shrunk(model, param_masks)
        counts = self.space.count(masks)
        results = []
        with self.task.seeded(self.seed) if tunes else contextlib.nullcontext():
            tuner = _FineTuning(model, param_masks, self) if tunes else None
            for target in steps:
                if tuner is not None:
                    tuner.run_to(target)
                    self._recalibrate(model)
                elif self.scorer == "refit":
                    self._head.refit(model, param_masks, self._bn_data, self.task)
                score = self.task.score(model, self._val_data)
                score = score if refitted is None else (score + refitted) / 2
                results.append(QuickEvalResult(top1=float(score), params=int(counts.params),
                                               macs=int(counts.macs), seconds=time.perf_counter() - start))
            if tuner is not None:
                tuner.close()
        self._scored[key] = results
        return list(results)

    def _refit_score(self, model: nn.Module, param_masks: dict[str, torch.Tensor]) -> float:
        """The ``"refit"`` score of the one-shot pruned ``model`` (BatchNorm re-estimated), on a copy."""
        refitted = copy.deepcopy(model)
        self._head.refit(refitted, param_masks, self._bn_data, self.task)
        return float(self.task.score(refitted, self._val_data))

    def _shrunk(self, model: nn.Module, param_masks: dict[str, torch.Tensor]
                ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The masked candidate compacted for fine-tuning (:func:`autocompress.compaction.shrink`), or itself
        when it cannot be compacted (an untraceable structure: fine-tuning then runs at full width)."""
        try:
            return shrink(model, param_masks, self._example, channel_multiple=self.space.channel_multiple,
                          layer_norm=self.layer_norm)
        except Exception:  # noqa: BLE001 - any failure leaves the masked model, the reference this equals
            self._example = None  # the same structure fails for every candidate: stop trying
            return model, param_masks

    def _tuning_batches(self) -> Iterator:
        """One candidate's fine-tuning batches: those kept (:data:`KEPT_BATCH_BYTES`) by earlier candidates,
        then the loader's stream after them (the loader reseeded by :meth:`score_along` yields the same batches
        for every candidate), keeping each new one while it fits."""
        yield from list(self._kept)
        for batch in itertools.islice(batch_stream(self.task.train_loader), len(self._kept), None):
            size = _nbytes(batch)
            if self._kept_bytes is not None and size is not None and self._kept_bytes + size <= KEPT_BATCH_BYTES:
                self._kept.append(batch)
                self._kept_bytes += size
            else:
                self._kept_bytes = None
            yield batch


def _nbytes(batch: Any) -> int | None:
    """Bytes of a batch's tensors (a tensor, or a tuple / list of them); None when it holds anything else."""
    parts = batch if isinstance(batch, (tuple, list)) else (batch,)
    if not all(isinstance(part, torch.Tensor) for part in parts):
        return None
    return sum(part.numel() * part.element_size() for part in parts)


def _mask_key(masks) -> bytes:
    """A digest of every keep mask of ``masks`` (:class:`autocompress.masks.Masks`), in a fixed order: equal
    masks, equal key (the scorers are deterministic in the masks)."""
    digest = hashlib.sha256()
    for kind in (masks.filters, masks.columns, masks.weights):
        for name in sorted(kind):
            digest.update(name.encode())
            digest.update(np.packbits(kind[name].flatten().numpy()).tobytes())
    return digest.digest()


class _FineTuning:
    """One candidate's masked fine-tuning run of the ``"finetune"`` scorer, advanced in pieces
    (:meth:`run_to`): SGD (momentum 0.9) or AdamW at a constant lr, no weight decay, hooked by a
    :class:`MaskEnforcer`, one step per batch of the training loader's stream, the distillation loss when the
    evaluator has a teacher."""

    def __init__(self, model: nn.Module, param_masks: dict[str, torch.Tensor], evaluator: QuickEvaluator):
        self.model, self.evaluator, self.done = model, evaluator, 0
        self.optimizer = build_optimizer(model, evaluator._tuning)
        self.enforcer = MaskEnforcer(model, param_masks).attach(self.optimizer)
        self.stream = evaluator._tuning_batches()

    def run_to(self, steps: int) -> None:
        """Train until ``steps`` steps have run in total."""
        if steps > self.done:
            with torch.enable_grad():
                train_epoch(self.model, itertools.islice(self.stream, steps - self.done), self.optimizer,
                            task=self.evaluator.task, distiller=self.evaluator._distiller,
                            teacher_cache=self.evaluator._teacher_cache, progress=False)
            self.done = steps

    def close(self) -> None:
        self.enforcer.detach()


class _Head:
    """The final ``nn.Linear`` of a model and the teacher's logits on the BatchNorm batches: what the
    ``"refit"`` scorer fits it to."""

    def __init__(self, name: str, targets: torch.Tensor):
        self.name, self.targets = name, targets

    @torch.no_grad()
    def refit(self, model: nn.Module, param_masks: dict[str, torch.Tensor], batches: list, task) -> None:
        """Ridge least squares (float64, ridge 1e-6 x the mean diagonal of the Gram matrix) of the head's
        weight and bias onto the teacher's logits ``[N, classes]`` from the head's inputs ``[N, features]`` on
        ``batches`` (model in eval mode); each output row uses only its kept inputs (rows sharing a mask are
        solved together), pruned entries stay zero."""
        head = dict(model.named_modules())[self.name]
        inputs: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, args, _out: inputs.append(args[0].detach()))
        try:
            model.eval()
            for batch in batches:
                task.forward(model, batch)
        finally:
            handle.remove()
        features = torch.cat(inputs).double()
        targets = self.targets.to(features.device)
        mask = param_masks.get(f"{self.name}.weight", torch.ones_like(head.weight, dtype=torch.bool)).to(
            features.device)
        patterns, group = torch.unique(mask, dim=0, return_inverse=True)
        for index, pattern in enumerate(patterns):
            rows = group == index
            design = features[:, pattern]
            if head.bias is not None:
                design = torch.cat([design, torch.ones_like(design[:, :1])], 1)
            if design.shape[1] == 0:
                continue
            gram = design.T @ design
            ridge = 1e-6 * float(gram.diagonal().mean()) + 1e-12
            solution = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device),
                                          design.T @ targets[:, rows])
            weight = head.weight.new_zeros(int(rows.sum()), head.weight.shape[1])
            weight[:, pattern] = solution[:int(pattern.sum())].T.to(weight.dtype)
            head.weight[rows] = weight
            if head.bias is not None:
                head.bias[rows] = solution[-1].to(head.bias.dtype)
        apply_masks(model, param_masks)


def final_linear(model: nn.Module, teacher: nn.Module, task, batches: list) -> _Head | None:
    """The ``"refit"`` scorer's head: the last ``nn.Linear`` of ``model`` whose output IS the model's output
    ``[B, classes]`` (checked on the first batch), with the teacher's logits on ``batches`` as its targets;
    None when there is no such layer (the output is not a 2-D tensor, or something follows the last Linear)."""
    seen: dict[str, Any] = {}
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out))
               for name, m in linears]
    try:
        with analysis_mode(model):
            output = task.forward(model, batches[0])
    finally:
        for handle in handles:
            handle.remove()
    name = next((name for name, _ in reversed(linears) if isinstance(seen.get(name), torch.Tensor)
                 and isinstance(output, torch.Tensor) and output.dim() == 2 and seen[name].shape == output.shape
                 and torch.equal(seen[name], output)), None)
    if name is None:
        return None
    with analysis_mode(teacher):
        targets = torch.cat([task.forward(teacher, batch).detach().double() for batch in batches])
    return _Head(name, targets)
