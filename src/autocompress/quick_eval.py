"""Quick evaluation of a candidate action: one-shot pruning + adaptive BatchNorm + validation top-1.

Source: AutoCompress, Liu et al. AAAI 2020 (brief §1 step 2): score a proposal without retraining by
pruning the current weights in one shot at the proposed rates and measuring accuracy on a held-out
validation split. Beyond the paper (switchable, ``bn_recalibration``): BatchNorm running statistics are
re-estimated on a few training batches before scoring ("adaptive BN", EagleEye, Li et al. ECCV 2020),
because one-shot pruning shifts every later layer's activation statistics and stale statistics make the
score mostly noise.

Everything happens on a private deep copy of the model; the caller's model (weights, BatchNorm buffers,
train/eval mode) is never touched. The training batches used for BatchNorm statistics and the validation
subset are drawn once, with a seeded generator, so scores are deterministic. The test split is never used.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import distributed
from .errors import UserError
from .masks import apply_masks
from .projection import project
from .sampling import quiet_clipping
from .task import move


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
    """Re-estimate every BatchNorm layer's running mean / variance on ``batches`` (adaptive BN, EagleEye,
    Li et al. ECCV 2020).

    Statistics are reset and accumulated as an exact average over the batches (``momentum=None``); only
    BatchNorm layers run in train mode (dropout etc. stay in eval). ``forward(model, batch)`` runs a batch
    (default ``model(batch[0])``). Afterwards the model is in eval mode. Modifies ``model`` in place: use on a
    copy.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
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


def check_batches(bn_batches: int, val_batches: int | None, batch_size: int = 1) -> None:
    """UserError unless every count of a quick evaluation is >= 1 (``val_batches`` may be None: the whole
    validation loader). Called by :class:`QuickEvaluator` and, before any work, by the compress config."""
    if bn_batches < 1 or batch_size < 1 or (val_batches is not None and val_batches < 1):
        raise UserError(f"quick_eval needs >= 1 batch (bn_batches={bn_batches}, val_batches={val_batches})",
                        "use e.g. bn_batches 5 and val_batches 10")


def _shared_batches(task, loader, count: int | None) -> list:
    """``task.batches(loader, count)``; under ``torch.distributed`` rank 0's batches on every rank, so a
    candidate's score does not depend on the rank that computes it (a loader sharded per rank yields other
    batches on each)."""
    if not distributed.world().active:
        return task.batches(loader, count)
    cpu = torch.device("cpu")
    batches = distributed.on_main(lambda: [move(batch, cpu) for batch in task.batches(loader, count)])
    return [move(batch, task.device) for batch in batches]


class QuickEvaluator:
    """Scores rate dicts by one-shot projection, optional adaptive BatchNorm and the validation score.

    Args:
        model: the model to prune (not modified; a deep copy is taken now, so later changes to ``model`` are
            not seen).
        space: the :class:`~autocompress.space.PruningSpace` built on ``model``.
        task: :class:`~autocompress.task.Task`: its training loader gives the BatchNorm batches (the first
            ``bn_batches``), its score scores a candidate: ``score_fn`` when the caller gave one, else top-1
            on the first ``val_batches`` batches of the validation loader (drawn once, so scores are
            deterministic). Never a test split.
        bn_recalibration: re-estimate BatchNorm statistics before scoring (EagleEye; beyond the paper).
        bn_batches: training batches for the statistics.
        val_batches: validation batches scored; None = the whole validation loader.

    Raises:
        UserError: a batch count below 1 (:func:`check_batches`).
    """

    def __init__(self, model: nn.Module, space, task, *, bn_recalibration: bool = True, bn_batches: int = 5,
                 val_batches: int | None = 10):
        check_batches(bn_batches, val_batches)
        self.space, self.task = space, task
        self.bn_recalibration = bn_recalibration
        self._model = copy.deepcopy(model)
        self._initial = {k: v.detach().clone() for k, v in self._model.state_dict().items()}
        self._bn_data = _shared_batches(task, task.train_loader, bn_batches) if bn_recalibration else []
        self._val_data = _shared_batches(task, task.val_loader, val_batches) if task.score_fn is None else None

    @property
    def val_images(self) -> int | None:
        """Number of validation images each candidate is scored on (None with a caller's ``score_fn``)."""
        return None if self._val_data is None else sum(int(batch[1].numel()) for batch in self._val_data)

    def pruned_model(self, rates: dict[str, dict[str, float]]) -> tuple[nn.Module, object]:
        """The private copy reset to the original weights, projected at ``rates`` and masked, with
        BatchNorm recalibrated when enabled. Returns ``(model, masks)``; the model is reused by the next
        call."""
        model = self._model
        with torch.no_grad():
            model.load_state_dict(self._initial)
            with quiet_clipping():
                masks = project(self.space, model, rates)
            apply_masks(model, self.space.param_masks(masks))
        if self.bn_recalibration:
            recalibrate_batchnorm(model, self._bn_data, self.task.forward)
        model.eval()
        return model, masks

    def score(self, rates: dict[str, dict[str, float]]) -> QuickEvalResult:
        """Quick evaluation of ``rates`` (``{"filter": {group: r}, "column": {layer: r}, "irregular":
        {layer: r}}``): the validation score and the compact model's parameters / MACs."""
        start = time.perf_counter()
        model, masks = self.pruned_model(rates)
        score = self.task.score(model, self._val_data)
        counts = self.space.count(masks)
        return QuickEvalResult(top1=float(score), params=int(counts.params), macs=int(counts.macs),
                               seconds=time.perf_counter() - start)
