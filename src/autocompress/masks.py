"""Keep masks of pruning units, and holding them on a model through training.

* :class:`Masks` — unit keep masks (True = kept): filter groups, columns, irregular weights
  (see :class:`autocompress.space.PruningSpace`, which expands them to per-parameter masks).
* :func:`apply_masks` — zero the masked entries of a model in place.
* :class:`MaskEnforcer` — keeps masked entries at zero through optimiser steps (masked retraining,
  AutoCompress, Liu et al. AAAI 2020, §3 / brief §3): gradients of masked entries are zeroed before each
  step, and after it the entries are re-zeroed and the optimiser's per-entry state (SGD momentum,
  Adam ``exp_avg`` / ``exp_avg_sq``, ...) is cleared for them, so neither momentum nor weight decay can
  revive a pruned weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import torch
from torch import nn


class Clip(NamedTuple):
    """A requested rate that would have removed every unit; one unit was kept instead.

    Attributes:
        kind: ``"filter"``, ``"column"`` or ``"irregular"``; name: the unit; rate: the requested rate;
        size: units available (after coarser pruning of the same layer); kept: units kept (1).
    """

    kind: str
    name: str
    rate: float
    size: int
    kept: int


@dataclass
class Masks:
    """Unit keep masks (True = kept), CPU bool tensors.

    Attributes:
        filters: filter-group name -> BoolTensor[group size].
        columns: layer name -> BoolTensor[columns] (GEMM view ``[F, C/groups*kh*kw]``; Linear: inputs).
        weights: layer name -> BoolTensor[weight.shape] (irregular pruning).
        clipped: rates that were clipped to keep one unit (see :class:`Clip`).
    """

    filters: dict[str, torch.Tensor]
    columns: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    clipped: list[Clip] = field(default_factory=list)


def _resolve(model: nn.Module, param_masks: Mapping[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, removed-entries mask on its device) for each masked parameter with a removed entry.

    Raises:
        ValueError: a name is not a parameter of ``model`` or a mask has the wrong shape.
    """
    params = dict(model.named_parameters())
    pairs = []
    for name, mask in param_masks.items():
        if name not in params:
            raise ValueError(f"mask for {name!r}, which is not a parameter of the model")
        param = params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}")
        removed = ~mask.to(device=param.device, dtype=torch.bool)
        if bool(removed.any()):
            pairs.append((param, removed))
    return pairs


@torch.no_grad()
def apply_masks(model: nn.Module, param_masks: Mapping[str, torch.Tensor]) -> None:
    """Set the masked entries of ``model``'s parameters to zero, in place.

    Args:
        param_masks: parameter name -> BoolTensor[param.shape] (True = kept), e.g. from
            :meth:`autocompress.space.PruningSpace.param_masks`.
    Raises:
        ValueError: unknown parameter name or mask shape mismatch.
    """
    for param, removed in _resolve(model, param_masks):
        param.masked_fill_(removed, 0)


class MaskEnforcer:
    """Hold parameter masks through training (masked retraining).

    Create it after moving the model to its device. Use :meth:`attach` to hook an optimiser (its
    ``step`` then zeroes masked gradients before and calls :meth:`after_step` after), and/or call
    :meth:`after_step` yourself after every step (e.g. ``training.train_epoch(after_step=...)``);
    repeating it is harmless.

    Args:
        model: the network; param_masks: parameter name -> BoolTensor[param.shape] (True = kept).
    Raises:
        ValueError: unknown parameter name or mask shape mismatch.
    """

    def __init__(self, model: nn.Module, param_masks: Mapping[str, torch.Tensor]):
        self._pairs = _resolve(model, param_masks)
        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles: list = []
        apply_masks(model, param_masks)

    def attach(self, optimizer: torch.optim.Optimizer) -> "MaskEnforcer":
        """Hook ``optimizer``: masked gradients are zeroed before every step, masks and optimiser state
        re-applied after it. Returns ``self``."""
        self._optimizers.append(optimizer)
        self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.zero_grads()))
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.after_step()))
        return self

    def detach(self) -> None:
        """Remove the optimiser hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._optimizers.clear()

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the gradient of every masked entry."""
        for param, removed in self._pairs:
            if param.grad is not None:
                param.grad.masked_fill_(removed, 0)

    @torch.no_grad()
    def after_step(self) -> None:
        """Re-zero masked entries, their gradients, and their per-entry state in every attached optimiser
        (any state tensor shaped like the parameter: momentum buffers, Adam moments, ...)."""
        self.zero_grads()
        for param, removed in self._pairs:
            param.masked_fill_(removed, 0)
            for optimizer in self._optimizers:
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.masked_fill_(removed, 0)
