"""Layer normalisation over channels that filter pruning removed: the exact compact form.

A LayerNorm over the channels (ConvNeXt's channels-last and channels-first LayerNorms, a transformer's
hidden-size LayerNorm) computes its mean and variance over *all* ``C`` channels. In the masked model a
removed channel is an exact zero at the LayerNorm's input (its producers' rows, biases and normalisation
entries are zero) and its own weight and bias are zero, so its output is zero too; the other channels are
normalised with statistics that include those zeros. Simply dropping the channel (what Torch-Pruning does)
normalises over ``C' < C`` channels instead and changes every output (docs/SUPPORT.md measures it).

:class:`PaddedLayerNorm` is that masked LayerNorm with the removed channels left out of its tensors: it
holds the ``C'`` kept weights and biases and normalises along one dimension as if ``C - C'`` zeros were
there: ``mean = sum(x) / C``, ``var = (sum((x - mean)^2) + (C - C') * mean^2) / C``, the biased variance of
the ``C`` values. The compact model therefore computes exactly what the masked model computes, in eval and
train mode (LayerNorm has no running statistics). Compaction (:mod:`autocompress.compaction`) builds it;
torch-pruning prunes it further in a later round through :data:`PRUNERS` (the padded width stays ``C``).
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from .analysis import hooked_forward


class PaddedLayerNorm(nn.Module):
    """LayerNorm over ``num_features`` channels of dimension ``dim`` with statistics over ``width`` channels,
    the missing ``width - num_features`` counted as zeros (see the module docstring).

    Args:
        num_features: channels present (``C'``); width: channels the statistics count (``C >= C'``).
        dim: the channel dimension of the input (``-1`` channels-last, ``1`` channels-first).
        eps: added to the variance; elementwise_affine / bias: as ``nn.LayerNorm``.
    Shapes: input and output ``[..., C', ...]`` with ``C'`` at ``dim``.
    """

    def __init__(self, num_features: int, width: int, dim: int = -1, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True):
        super().__init__()
        if not 0 < num_features <= width:
            raise ValueError(f"num_features {num_features} must be in 1..width ({width})")
        self.num_features, self.width, self.dim, self.eps = int(num_features), int(width), int(dim), float(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self.weight = nn.Parameter(torch.ones(num_features)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if elementwise_affine and bias else None

    def config(self) -> dict:
        """Constructor arguments as plain data (``architecture.describe_architecture``)."""
        return {"num_features": self.num_features, "width": self.width, "dim": self.dim, "eps": self.eps,
                "elementwise_affine": self.elementwise_affine, "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.sum(self.dim, keepdim=True) / self.width
        centred = x - mean
        var = (centred.pow(2).sum(self.dim, keepdim=True) + (self.width - self.num_features) * mean.pow(2)) / self.width
        y = centred * torch.rsqrt(var + self.eps)
        shape = [1] * x.dim()
        shape[self.dim] = self.num_features
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, width={self.width}, dim={self.dim}, eps={self.eps}"


def is_layer_norm(module: nn.Module) -> bool:
    """A LayerNorm over one dimension of channels: ``nn.LayerNorm`` (or a subclass) with a 1-D
    ``normalized_shape``, or a :class:`PaddedLayerNorm`."""
    return isinstance(module, PaddedLayerNorm) or (isinstance(module, nn.LayerNorm)
                                                   and len(module.normalized_shape) == 1)


def channel_dims(model: nn.Module, inputs: tuple) -> dict[nn.Module, int | None]:
    """The channel dimension of every LayerNorm over channels (:func:`is_layer_norm`) that ``model``'s
    forward on ``inputs`` calls: ``-1`` for ``nn.LayerNorm`` itself (it normalises the last dimension); for a
    subclass with its own forward (torchvision's channels-first ``LayerNorm2d``) the one non-batch input
    dimension of size ``C``, or None when none or several have it (then its channels are not pruned)."""
    found: dict[nn.Module, int | None] = {}
    norms = [m for m in model.modules() if is_layer_norm(m)]

    def hook(module, args, _output):
        if isinstance(module, PaddedLayerNorm):
            found[module] = module.dim
        elif type(module).forward is nn.LayerNorm.forward:
            found[module] = -1
        else:
            size = module.normalized_shape[0]
            dims = [d for d, n in enumerate(args[0].shape) if d and n == size]
            found[module] = dims[0] if len(dims) == 1 else None
    if norms:
        hooked_forward(model, inputs, {m: hook for m in norms})
    return found


def padded(norm: nn.LayerNorm, width: int, dim: int) -> PaddedLayerNorm:
    """A :class:`PaddedLayerNorm` with ``norm``'s (already pruned) weight, bias and eps, counting ``width``
    channels in its statistics along ``dim``; parameters keep their ``requires_grad``."""
    new = PaddedLayerNorm(norm.normalized_shape[0], width, dim, norm.eps, norm.weight is not None,
                          norm.bias is not None)
    with torch.no_grad():
        for name in ("weight", "bias"):
            old, param = getattr(norm, name), getattr(new, name)
            if param is not None:
                param.copy_(old)
                param.requires_grad_(old.requires_grad)
    return new.to(norm.weight.device) if norm.weight is not None else new


class PaddedLayerNormPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's handler for :class:`PaddedLayerNorm`: input and output channels are the same, its
    weight and bias lose the pruned entries, the padded width stays."""

    def prune_out_channels(self, layer: PaddedLayerNorm, idxs) -> PaddedLayerNorm:
        keep = sorted(set(range(layer.num_features)) - set(idxs))
        for name in ("weight", "bias"):
            param = getattr(layer, name)
            if param is not None:
                setattr(layer, name, self._prune_parameter_and_grad(param, keep, 0))
        layer.num_features = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: PaddedLayerNorm) -> int:
        return layer.num_features

    get_in_channels = get_out_channels


#: torch-pruning customized pruners for the modules of this file (``DependencyGraph.build_dependency``)
PRUNERS = {PaddedLayerNorm: PaddedLayerNormPruner()}
