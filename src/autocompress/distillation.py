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
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .errors import UserError


@dataclass(frozen=True)
class DistillationConfig:
    """Settings of the distillation loss.

    Attributes:
        enabled: use the teacher at all.
        temperature: softmax temperature ``T`` (> 0) of both teacher and student logits.
        alpha: weight in [0, 1] of the distillation term; the label cross-entropy gets ``1 - alpha``.
    """

    enabled: bool = False
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise UserError(f"enabled={self.enabled!r} must be true or false",
                            "write enabled: true or enabled: false")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise UserError(f"temperature={self.temperature!r} must be a number > 0",
                            "use e.g. temperature: 4")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise UserError(f"alpha={self.alpha!r} must be in [0, 1]", "use e.g. alpha: 0.9")


class Distiller:
    """Soft-target loss against a frozen copy of ``teacher`` (Hinton et al. 2015, §2).

    Args:
        teacher: the uncompressed model; a private deep copy is kept in eval mode with gradients off, so
            the caller's model is never modified.
        config: :class:`DistillationConfig` (``enabled`` is ignored here).
    """

    def __init__(self, teacher: nn.Module, config: DistillationConfig):
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.temperature = float(config.temperature)
        self.alpha = float(config.alpha)

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
        if not (isinstance(logits, torch.Tensor) and isinstance(teacher_logits, torch.Tensor)
                and logits.dim() >= 2 and logits.shape == teacher_logits.shape):
            raise UserError("distillation needs the model to output class scores [B, classes, ...]",
                            "set distillation.enabled: false for this model")
        t = self.temperature
        per_position = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                                reduction="none", log_target=True).sum(1)
        soft = per_position.mean()
        return (1.0 - self.alpha) * hard_loss + self.alpha * t * t * soft
