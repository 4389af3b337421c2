"""Knowledge distillation from the uncompressed model during ADMM and masked retraining.

Not part of AutoCompress (Liu et al., AAAI 2020); it is the standard soft-target loss of Hinton, Vinyals
and Dean, "Distilling the Knowledge in a Neural Network" (2015), §2: the student's softened logits are
pulled towards the teacher's with a KL divergence scaled by ``T^2`` so that its gradients keep their size
when the temperature changes, mixed with the ordinary cross-entropy on the labels. Here the teacher is the
base model the compress run started from; it stays frozen in eval mode (its BatchNorm statistics never
move) and runs under ``torch.no_grad``.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .alignment import AUTO
from .errors import UserError
from .text import kind_of

#: what ``distillation.enabled: auto`` does, and why (the log says it when it turns distillation off)
AUTO_RULE = ("distillation.enabled auto: on for class scores per item, off for class scores per position and "
             "regression; from a segmentation U-Net, flops=2x in 3 epochs (BENCHMARKS.md, sessions 31-32), it cost "
             "3.8 mIoU points from an under-trained base and gained nothing from a trained one")

#: ``distillation.enabled: auto`` is off for a classifier whose base's fit share is under this: the share of its
#: validation errors it does not make on its training batches (eval mode), ``(train top-1 - val top-1) /
#: (100 - val top-1)``. A base that has not fitted its training data well past what it generalises (stopped early,
#: or generalising well) is a teacher its student matches within the budget, and its soft targets hold the student
#: back. Measured (BENCHMARKS.md, "Session 46" and "Session 48"; share: distillation's effect on the compact model's
#: top-1): it cost 2.0 / 0.7 / 0.5 / 0.7 points at shares of 0.00 / 0.08 / 0.09 / 0.06 (fresh user 64's DenseNet and
#: 1-D audio net; a 2-epoch Fashion-MNIST CNN; fresh user 65's 40-step base), 0.9 / 0.9 / 0.2 / 0.4 at 0.21 / 0.21 /
#: 0.24 / 0.28 (user 65's augmented base; user 67's 12-epoch CNN, three seeds; user 62's MBConv net; user 65's
#: 2-epoch base), and gained 1.0 / 0.4 / 0.3 / 0.3 at 0.59 / 0.69 / 0.99 / 1.00 (the demo's base at params=30x;
#: resnet20 40 epochs at flops=2x; a 15-epoch Fashion-MNIST CNN; user 65's over-fitted base). The gap in points
#: alone (2.5 until session 48) put the demo's base (gap 4.0) with user 67's (4.1) and user 65's (4.7), where
#: distillation cost points.
FIT_SHARE = 0.4
#: a base scoring more than this many points of top-1 *lower* on its training batches than on validation
#: (augmentation it was not trained with: a fresh user's flips and shifts read -20) keeps distillation: the
#: batches cannot tell whether it has fitted them
UNLIKE_POINTS = 2.5


@dataclass(frozen=True)
class DistillationConfig:
    """Settings of the distillation loss.

    Attributes:
        enabled: use the teacher at all (``compress`` turns it off, with a warning, when the forward returns no
            class scores: :func:`distillable`). ``"auto"`` (what a ``budget`` derives): on when the training targets
            are class indices or probabilities for one class vector per item, off for class scores per position
            (segmentation) and regression, resolved by ``CompressConfig.for_task`` (:data:`AUTO_RULE`).
        temperature: softmax temperature ``T`` (> 0) of both teacher and student logits.
        alpha: weight in [0, 1] of the distillation term; the label cross-entropy gets ``1 - alpha``. The
            default 0.5 (0.9 until session 19 of BENCHMARKS.md, "Distillation from a weak base"): at 0.9 the
            compact model of an under-trained base stays at the base's accuracy (a 2-epoch Fashion-MNIST CNN at
            80.2 / 76.9 %, flops=2x in 3 epochs: 80.1 / 77.5 %, against 83.3 / 81.6 % at 0.5 and 84.9 / 83.0 %
            without distillation), and 0.5 also ended higher from a converged base (Fashion-MNIST CNN,
            params=30x in 8 epochs: 88.92 / 88.05 % against 88.06 / 87.79 % at 0.9).
        stop_margin: masked retraining in the default loop stops distilling, for the rest of the phase, once
            the student's validation score is more than this above the teacher's (top-1 as a fraction: 0.01 is
            one point; a ``score_fn``: a fraction of the base's ``|score|``, 0.01 = 1 % of it; the default 0: once
            it passes the teacher at all), tested at quarters of the first epoch and after each epoch
            (:data:`autocompress.admm.EARLY_TESTS`). A student past its teacher on held-out data has outgrown it:
            from an under-trained base the soft targets hold it back (BENCHMARKS.md, "Distillation from a weak
            base": flops=2x in 3 epochs from a 2-epoch Fashion-MNIST CNN at 80.2 / 76.9 %, 84.0 / 82.9 % with the
            stop at 0.01, 83.3 / 81.6 % without it, 84.9 / 83.0 % without distillation); wherever distillation
            helped, the compact model stayed below its base. 0 rather than 0.01 (session 40): 3-epoch students of
            weakly trained vision transformers gained 0.2-0.6 points (torchvision's ViT 44.48 -> 45.11 %), and
            CNNs whose students stayed below their bases, the demo's included, were unchanged. A negative margin
            stops once the student is within it below the teacher. None: distil every epoch. Costs one validation
            pass per test.
    """

    enabled: bool | str = False
    temperature: float = 4.0
    alpha: float = 0.5
    stop_margin: float | None = 0.0

    def __post_init__(self):
        if not isinstance(self.enabled, bool) and self.enabled != AUTO:
            raise UserError(f"enabled={self.enabled!r} must be true, false or auto",
                            "write enabled: true, enabled: false or enabled: auto")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise UserError(f"temperature={self.temperature!r} must be a number > 0",
                            "use e.g. temperature: 4")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise UserError(f"alpha={self.alpha!r} must be in [0, 1]", "use e.g. alpha: 0.5")
        margin = self.stop_margin
        if margin is not None and not (isinstance(margin, (int, float)) and not isinstance(margin, bool)
                                       and -1.0 < margin < float("inf")):
            raise UserError(f"stop_margin={margin!r} must be a number above -1 or null",
                            "use e.g. stop_margin: 0.01 (one point of top-1), or null to distil every epoch")


class Distiller:
    """Soft-target loss against a frozen copy of ``teacher`` (Hinton et al. 2015, §2).

    Args:
        teacher: the uncompressed model; a private deep copy is kept in eval mode with gradients off, so
            the caller's model is never modified.
        config: :class:`DistillationConfig` (``enabled`` is ignored here).
        setting: the setting that turns this distillation off, named when the outputs cannot be distilled.
    """

    def __init__(self, teacher: nn.Module, config: DistillationConfig, setting: str = "distillation.enabled"):
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.temperature = float(config.temperature)
        self.alpha = float(config.alpha)
        self.setting = setting

    def describe(self) -> str:
        """One line for the run's log: the mixed loss and why it reads larger than a cross-entropy."""
        t, a = self.temperature, self.alpha
        return (f"distillation: training loss = {1 - a:g} x the loss on labels + {a:g} x T^2 x KL(teacher || "
                f"student) at T {t:g} (Hinton et al. 2015); the T^2 = {t * t:g} factor keeps the soft term's "
                f"gradients at the labels' scale, so the logged loss reads larger than a plain cross-entropy")

    def teacher_output(self, task, batch: Any, cache: TeacherCache | None = None) -> Any:
        """The teacher's output on ``batch`` (already on the device) through ``task``'s forward, without
        gradients; served from ``cache`` (a :class:`TeacherCache`) where it can be."""
        if cache is not None:
            return cache.output(self.teacher, task, batch)
        return _no_grad_forward(self.teacher, task, batch)

    @staticmethod
    def comparable(teacher_logits: Any, logits: Any) -> bool:
        """Whether the soft term can compare ``logits`` with ``teacher_logits``: class scores of one shape
        (:func:`distillable`)."""
        return distillable(logits) and isinstance(teacher_logits, torch.Tensor) and \
            logits.shape == teacher_logits.shape

    def __call__(self, teacher_logits: torch.Tensor, logits: torch.Tensor, hard_loss: torch.Tensor) -> torch.Tensor:
        """Mixed loss ``(1 - alpha) * hard_loss + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``.

        Args:
            teacher_logits: :attr:`teacher`'s output on the batch the student saw (same augmentation),
                ``[B, classes, ...]``; the softmax runs over dimension 1 (per pixel for dense outputs).
            logits: student output, same shape.
            hard_loss: the student's own loss on this batch (scalar tensor).

        Returns:
            Scalar tensor; the KL term is summed over classes and averaged over every other position.

        Raises:
            UserError: the outputs are not tensors of the same shape with a class dimension.
        """
        if not self.comparable(teacher_logits, logits):
            raise UserError(f"distillation needs class scores [B, classes >= 2, ...] from the forward, got "
                            f"{kind_of(logits)}", f"pass forward_fn returning the class scores, or set "
                            f"{self.setting}: false for this model")
        t = self.temperature
        per_position = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                                reduction="none", log_target=True).sum(1)
        soft = per_position.mean()
        return (1.0 - self.alpha) * hard_loss + self.alpha * t * t * soft


def distillable(output: Any) -> bool:
    """Whether a forward's ``output`` holds class scores the soft term can compare: a tensor ``[B, classes,
    ...]`` with at least 2 classes (a softmax over one class is constant, so its KL divergence is 0 and the
    distillation would only scale the loss down)."""
    return isinstance(output, torch.Tensor) and output.dim() >= 2 and output.shape[1] >= 2


def time_major(output: Any, items: int | None) -> bool:
    """Whether ``output`` is a tensor whose batch of ``items`` lies on axis 1, not 0 (``[T, N, classes]``, the
    layout ``F.ctc_loss`` takes): a softmax over its axis 1 would mix the batch's items, not compare classes (a
    fresh user's CRNN). False where ``items`` is unknown or axes 0 and 1 both hold that many."""
    return isinstance(output, torch.Tensor) and output.dim() >= 3 and items is not None \
        and output.shape[1] == items != output.shape[0]


#: :class:`TeacherCache` turns off after an epoch (past the first) finding fewer of its rows stored. A
#: horizontal flip alone finds half of them in the second epoch in one process, 1 / (2 N) in N processes that
#: each see a fresh share of the data every epoch (6 % in 8); a 32x32 random crop with 4 pixels of padding
#: and a flip 1 / 162 (0.6 %)
MIN_HIT_RATE = 0.05


def _no_grad_forward(model: nn.Module, task, batch: Any) -> Any:
    with torch.no_grad():
        return task.forward(model, batch)


class TeacherCache:
    """The frozen teacher's outputs by input content, for the epochs of one training phase.

    A frozen teacher's output on an input depends on that input alone (eval mode: no row of a batch affects
    another), so on an input seen before it is known. After the first epoch over a loader without random
    augmentation no teacher forward runs; with a horizontal flip alone, ever fewer (on the CPU a retraining step
    of the Fashion-MNIST demo CNN spent about a third of its time in the teacher). Used for the default
    ``(inputs, targets)`` batches on the CPU with the default forward; each input row is keyed by a 128-bit
    BLAKE2b digest of its dtype, shape and bytes. Rows found are served from the cache, the teacher runs on the
    others only, and they are stored. An epoch after the first in which fewer than ``MIN_HIT_RATE`` of the rows
    were found (a random crop: inputs almost never repeat) turns the cache off and frees it; storing stops at
    ``max_bytes`` of outputs. Served outputs equal a fresh forward up to float rounding (the batch they were
    computed in may differ).

    Args:
        max_bytes: most bytes of teacher outputs kept.
        state: a :meth:`state_dict` to continue from (an epoch checkpoint), so that a resumed phase serves
            the same stored outputs as an uninterrupted one.
        adaptive: turn off after an epoch of few hits (above); False for a caller whose inputs repeat by
            construction (the quick evaluation's fine-tuning replays the same batches for every candidate).
    """

    def __init__(self, max_bytes: int = 256 * 2**20, state: dict | None = None, adaptive: bool = True):
        self.max_bytes, self.adaptive = max_bytes, adaptive
        self.enabled, self.epochs, self.stored_bytes = True, 0, 0
        self._store: dict[bytes, torch.Tensor] = {}
        self._rows = self._hits = 0
        if state is not None:
            self.enabled, self.epochs = bool(state["enabled"]), int(state["epochs"])
            for key, value in zip(state["keys"], state["values"]):
                self._put(key.numpy().tobytes(), value)

    def __len__(self) -> int:
        return len(self._store)

    def output(self, teacher: nn.Module, task, batch: Any) -> Any:
        """``task.forward(teacher, batch)`` under ``torch.no_grad``: rows seen before from the cache, the
        teacher run on the others only."""
        keys = self._keys(task, batch) if self.enabled else None
        if keys is None:
            return _no_grad_forward(teacher, task, batch)
        missing = [i for i, key in enumerate(keys) if key not in self._store]
        self._rows += len(keys)
        self._hits += len(keys) - len(missing)
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            inputs = batch[0] if len(missing) == len(keys) else batch[0][missing]
            output = _no_grad_forward(teacher, task, (inputs,))
            if not (isinstance(output, torch.Tensor) and output.shape[:1] == (len(missing),)):
                self._turn_off()  # not one output row per input row: nothing to key
                return output if len(missing) == len(keys) else _no_grad_forward(teacher, task, batch)
            if len(missing) == len(keys) and not self._fits(output):
                self._turn_off()  # inputs of another size: the state is one stacked tensor of equal rows
                return output
            if len(missing) == len(keys) and self.stored_bytes >= self.max_bytes:
                return output
            fresh = {keys[i]: row for i, row in zip(missing, output.detach())}
            for key, row in fresh.items():
                if self.stored_bytes < self.max_bytes:
                    self._put(key, row.clone())
        return torch.stack([fresh[key] if key in fresh else self._store[key] for key in keys])

    def end_epoch(self) -> None:
        """Count a finished epoch; after the first, turn off when under ``MIN_HIT_RATE`` of its rows were
        found (unless not ``adaptive``)."""
        self.epochs += 1
        if self.adaptive and self.epochs > 1 and self._hits < self._rows * MIN_HIT_RATE:
            self._turn_off()
        self._rows = self._hits = 0

    def _turn_off(self) -> None:
        self.enabled = False
        self._store.clear()
        self.stored_bytes = 0

    def state_dict(self) -> dict:
        """``{"enabled", "epochs", "keys": uint8 [N, 16], "values": [N, ...]}`` (loads with weights_only)."""
        keys, values = torch.empty(0, 16, dtype=torch.uint8), torch.empty(0)
        if self._store:
            keys = torch.frombuffer(bytearray(b"".join(self._store)), dtype=torch.uint8).reshape(-1, 16)
            values = torch.stack(list(self._store.values()))
        return {"enabled": self.enabled, "epochs": self.epochs, "keys": keys, "values": values}

    def _fits(self, output: torch.Tensor) -> bool:
        """Whether ``output``'s rows have the shape and dtype of the stored ones (true when none is stored)."""
        first = next(iter(self._store.values()), None)
        return first is None or (first.shape == output.shape[1:] and first.dtype == output.dtype)

    def _put(self, key: bytes, value: torch.Tensor) -> None:
        self._store[key] = value
        self.stored_bytes += value.numel() * value.element_size()

    @staticmethod
    def _keys(task, batch: Any) -> list[bytes] | None:
        """Digests of the batch's input rows, or None when the batch is not cacheable."""
        if task.forward_fn is not None or task.inputs != 1 or not isinstance(batch, (tuple, list)) or not batch:
            return None
        inputs = batch[0]
        if not isinstance(inputs, torch.Tensor) or inputs.device.type != "cpu" or inputs.dim() < 1:
            return None
        rows = inputs.detach().contiguous().reshape(len(inputs), -1).view(torch.uint8).numpy()
        header = hashlib.blake2b(f"{inputs.dtype}{tuple(inputs.shape[1:])}".encode(), digest_size=16)
        keys = []
        for row in rows:
            digest = header.copy()
            digest.update(row)
            keys.append(digest.digest())
        return keys
