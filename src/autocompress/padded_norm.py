"""Layer and group normalisation over channels that filter pruning removed: the exact compact forms.

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

A GroupNorm (``G`` groups of ``C / G`` channels) is the same per group: :class:`PaddedGroupNorm` keeps
``G`` (or fewer: groups that lost all channels are dropped), gives every kept channel its original group and
normalises each group over its original ``C / G`` channels x positions, the removed ones counted as zeros.
A GroupNorm without affine parameters cannot do this (a removed channel's output ``-mean / std`` is not
zero): its groups leave whole (:func:`autocompress.space.FilterGroup.ties`), an all-zero group outputs
exact zeros, and the rest is an ordinary ``nn.GroupNorm(G', C')`` (:func:`compact_group_norm`).
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
    return _with_affine(PaddedLayerNorm(norm.normalized_shape[0], width, dim, norm.eps, norm.weight is not None,
                                        norm.bias is not None), norm)


def _with_affine(new: nn.Module, norm: nn.Module) -> nn.Module:
    """``new`` (a norm built to replace ``norm``) with ``norm``'s weight and bias values and ``requires_grad``,
    where ``new`` has them, moved to ``norm``'s device when ``norm`` has a weight."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            old, param = getattr(norm, name), getattr(new, name)
            if param is not None:
                param.copy_(old)
                param.requires_grad_(old.requires_grad)
    return new.to(norm.weight.device) if norm.weight is not None else new


class _PerChannelPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's handler for a padded norm: input and output channels are the same; its weight and bias
    (when affine) lose the pruned entries, and :meth:`prune_more` whatever else the module keeps per channel."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = sorted(set(range(layer.num_features)) - set(idxs))
        for name in ("weight", "bias"):
            param = getattr(layer, name)
            if param is not None:
                setattr(layer, name, self._prune_parameter_and_grad(param, keep, 0))
        self.prune_more(layer, keep)
        layer.num_features = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def prune_more(self, layer: nn.Module, keep: list[int]) -> None:
        """Drop the other per-channel state of ``layer`` to the ``keep`` channels (none here)."""

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.num_features

    get_in_channels = get_out_channels


class PaddedLayerNormPruner(_PerChannelPruner):
    """torch-pruning's handler for :class:`PaddedLayerNorm` (the padded width stays)."""


class PaddedGroupNorm(nn.Module):
    """GroupNorm over ``num_features`` channels (dim 1) in ``num_groups`` groups of ``group_size`` channels,
    some of them missing and counted as zeros (see the module docstring).

    Args:
        num_features: channels present (``C'``); num_groups: groups (``G``); group_size: channels each group
            counts in its statistics (the original ``C / G``).
        eps: added to the variance; affine: per-channel weight and bias, as ``nn.GroupNorm``.
    Buffers: ``group`` int64 [C']: the group of each channel (saved in the state dict).
    Shapes: input and output ``[N, C', *]``.
    """

    def __init__(self, num_features: int, num_groups: int, group_size: int, eps: float = 1e-5,
                 affine: bool = True):
        super().__init__()
        if not 0 < num_features <= num_groups * group_size:
            raise ValueError(f"num_features {num_features} must be in 1..num_groups * group_size")
        self.num_features, self.num_groups, self.group_size = int(num_features), int(num_groups), int(group_size)
        self.eps, self.affine = float(eps), bool(affine)
        self.register_buffer("group", torch.arange(num_features) * num_groups // num_features)
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def config(self) -> dict:
        """Constructor arguments as plain data (``architecture.describe_architecture``)."""
        return {"num_features": self.num_features, "num_groups": self.num_groups, "group_size": self.group_size,
                "eps": self.eps, "affine": self.affine}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        flat = x.reshape(n, self.num_features, -1)  # [N, C', S]
        positions = flat.shape[2]
        index = self.group.unsqueeze(0).expand(n, -1)
        total = self.group_size * positions  # values per group, the missing channels included

        def per_group(values: torch.Tensor) -> torch.Tensor:  # [N, C'] summed into [N, G]
            return values.new_zeros(n, self.num_groups).scatter_add(1, index, values)

        mean = per_group(flat.sum(2)) / total
        centred = flat - mean.gather(1, index).unsqueeze(2)
        missing = (self.group_size - per_group(torch.ones_like(flat[:, :, 0]))) * positions  # [N, G]
        var = (per_group(centred.pow(2).sum(2)) + missing * mean.pow(2)) / total
        y = (centred * torch.rsqrt(var + self.eps).gather(1, index).unsqueeze(2)).reshape(x.shape)
        if self.affine:
            shape = [1, self.num_features] + [1] * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.num_groups}, group_size={self.group_size}, eps={self.eps}"


def is_group_norm(module: nn.Module) -> bool:
    """An ``nn.GroupNorm`` (or a subclass keeping its forward) or a :class:`PaddedGroupNorm`: channels
    on dim 1 normalised in groups, which filter pruning handles (a subclass with its own forward is not)."""
    return isinstance(module, PaddedGroupNorm) or (isinstance(module, nn.GroupNorm)
                                                   and type(module).forward is nn.GroupNorm.forward)


def channel_groups(norm: nn.Module) -> torch.Tensor:
    """int64 [C]: the group of each channel of a :func:`is_group_norm` module."""
    if isinstance(norm, PaddedGroupNorm):
        return norm.group.detach().cpu().clone()
    return torch.arange(norm.num_channels) // (norm.num_channels // norm.num_groups)


def group_size(norm: nn.Module) -> int:
    """Channels each group of a :func:`is_group_norm` module counts in its statistics."""
    return norm.group_size if isinstance(norm, PaddedGroupNorm) else norm.num_channels // norm.num_groups


def compact_group_norm(norm: nn.Module, groups: torch.Tensor, size: int) -> nn.Module:
    """The exact compact form of a group normalisation that lost channels.

    Args:
        norm: the norm with its pruned weight and bias (``nn.GroupNorm`` or :class:`PaddedGroupNorm`, as
            torch-pruning left it).
        groups: int64 [C']: the group (in the unpruned norm) of each kept channel, non-decreasing.
        size: channels each group counts (``C / G`` of the unpruned norm).
    Returns:
        ``nn.GroupNorm(G', C')`` when every kept group is complete (whole groups left), else a
        :class:`PaddedGroupNorm` over the ``G'`` groups that kept a channel; weight, bias, eps, device and
        ``requires_grad`` as ``norm``'s.
    """
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    affine = norm.weight is not None
    if bool((counts == size).all()):
        new: nn.Module = nn.GroupNorm(counts.numel(), groups.numel(), norm.eps, affine)
    else:
        new = PaddedGroupNorm(groups.numel(), counts.numel(), size, norm.eps, affine)
        new.group.copy_(inverse)
    return _with_affine(new, norm)


class PaddedGroupNormPruner(_PerChannelPruner):
    """torch-pruning's handler for :class:`PaddedGroupNorm`: ``group`` loses the pruned entries too
    (compaction then calls :func:`compact_group_norm`)."""

    def prune_more(self, layer: PaddedGroupNorm, keep: list[int]) -> None:
        layer.group = layer.group[torch.tensor(keep, dtype=torch.long, device=layer.group.device)]


#: torch-pruning customized pruners for the modules of this file (``DependencyGraph.build_dependency``)
PRUNERS = {PaddedLayerNorm: PaddedLayerNormPruner(), PaddedGroupNorm: PaddedGroupNormPruner()}
