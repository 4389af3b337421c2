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
train mode (LayerNorm has no running statistics). Over the last dimension it pads the input with the
``C - C'`` zeros and calls one fused ``layer_norm`` (one LayerNormalization op in ONNX); over another
dimension it computes the two sums above. Compaction (:mod:`autocompress.compaction`) builds it;
torch-pruning prunes it further in a later round through :data:`PRUNERS` (the padded width stays ``C``).

The other form (``layer_norm: kept``, :data:`LAYER_NORM_FORMS`) is a plain LayerNorm over the ``C'`` kept
channels, whose statistics differ from the masked model's: compaction makes it only where the function may
change, when the hard-pruned model is shrunk before its retraining (:func:`autocompress.compaction.shrink`),
and checks it against the masked model with each such LayerNorm normalising over its kept channels alone
(:func:`kept_statistics`). The retrained model then already is what the compact model computes, and runs as
fast as its width (onnxruntime: no Pad / Slice around each LayerNormalization).

A GroupNorm (``G`` groups of ``C / G`` channels) is the same per group: :class:`PaddedGroupNorm` keeps
``G`` (or fewer: groups that lost all channels are dropped), gives every kept channel its original group and
normalises each group over its original ``C / G`` channels x positions, the removed ones counted as zeros:
its forward gathers each group's kept channels followed by zeros into ``G x C / G`` channels, calls one fused
``group_norm`` and gathers the kept channels back (in onnxruntime at batch 1 an earlier form of a dozen
scatter / gather ops ran a compact net 0.64x as fast as its base, this one 1.05-1.09x: BENCHMARKS.md, session
27).
A GroupNorm without affine parameters cannot do this (a removed channel's output ``-mean / std`` is not
zero): its groups leave whole (:func:`autocompress.space.FilterGroup.ties`), an all-zero group outputs
exact zeros, and the rest is an ordinary ``nn.GroupNorm(G', C')`` (:func:`compact_group_norm`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
import torch_pruning as tp
import torch.nn.functional as F
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
        missing = self.width - self.num_features
        if self.dim in (-1, x.dim() - 1):  # the missing channels as zeros, one fused layer_norm, the kept ones read
            y = F.layer_norm(F.pad(x, (0, missing)), (self.width,), _padded(self.weight, missing),
                             _padded(self.bias, missing), self.eps)
            return y[..., :self.num_features]
        mean = x.sum(self.dim, keepdim=True) / self.width
        centred = x - mean
        var = (centred.pow(2).sum(self.dim, keepdim=True) + missing * mean.pow(2)) / self.width
        return _affine(centred * torch.rsqrt(var + self.eps), self.weight, self.bias, self.dim)

    def extra_repr(self) -> str:
        return f"{self.num_features}, width={self.width}, dim={self.dim}, eps={self.eps}"


#: ``layer_norm`` settings: how a LayerNorm that loses channels is compacted before retraining (see the module
#: docstring): ``"kept"`` a plain LayerNorm over the kept channels, ``"padded"`` a :class:`PaddedLayerNorm`
LAYER_NORM_FORMS = ("kept", "padded")


@contextlib.contextmanager
def kept_statistics(model: nn.Module, norms: Mapping[str, tuple[torch.Tensor, int]]) -> Iterator[None]:
    """Within the block, each LayerNorm of ``model`` named in ``norms`` (module name -> (int64 indices of the
    channels it keeps, the channel dimension of its input)) computes what a plain LayerNorm over those channels
    computes: mean and biased variance over the kept channels alone, then its own weight and bias (a removed
    channel's weight and bias are zero, so its output stays zero). A forward hook replaces the output; it is
    removed on exit."""
    handles = [model.get_submodule(name).register_forward_hook(_kept_norm_hook(indices, dim))
               for name, (indices, dim) in norms.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _kept_norm_hook(indices: torch.Tensor, dim: int):
    def hook(module: nn.Module, args: tuple, _output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        axis = dim % x.dim()
        kept = x.index_select(axis, indices.to(x.device))
        mean, var = kept.mean(axis, keepdim=True), kept.var(axis, unbiased=False, keepdim=True)
        return _affine((x - mean) * torch.rsqrt(var + module.eps), module.weight, module.bias, axis)
    return hook


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``y`` normalised along ``dim``, times ``weight`` and plus ``bias`` (each [C] along ``dim``; None: none)."""
    shape = [1] * y.dim()
    shape[dim] = -1
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def _padded(param: torch.Tensor | None, missing: int) -> torch.Tensor | None:
    """``param`` [C'] followed by ``missing`` zeros (None stays None)."""
    return None if param is None else F.pad(param, (0, missing))


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
    """torch-pruning's handler for a per-channel norm: input and output channels are the same; its weight and
    bias (when affine) lose the pruned entries, and :meth:`prune_more` whatever else the module keeps per
    channel."""

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
    Buffers: ``group`` int64 [C']: the group of each channel (saved in the state dict); the padded layout
        derived from it (``padded_at``, ``source``: :meth:`regroup`, not saved). Set groups with
        :meth:`regroup` only (loading a state dict calls it).
    Shapes: input and output ``[N, C', *]``.
    """

    def __init__(self, num_features: int, num_groups: int, group_size: int, eps: float = 1e-5,
                 affine: bool = True):
        super().__init__()
        if not 0 < num_features <= num_groups * group_size:
            raise ValueError(f"num_features {num_features} must be in 1..num_groups * group_size")
        self.num_features, self.num_groups, self.group_size = int(num_features), int(num_groups), int(group_size)
        self.eps, self.affine = float(eps), bool(affine)
        self.register_buffer("group", None)
        self.register_buffer("source", None, persistent=False)
        self.register_buffer("padded_at", None, persistent=False)
        self.regroup(torch.arange(num_features) * num_groups // num_features)
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def regroup(self, group: torch.Tensor) -> None:
        """Set ``group`` (int64 [C']: each kept channel's group, each of 0..G-1 at most ``group_size`` times;
        ``num_features`` becomes ``C'``) and the padded layout the forward reads from it: ``padded_at`` [C'] (each
        channel's position among ``G * group_size``, its group's channels first) and ``source`` [G * group_size]
        (the channel at each position, ``C'`` where a missing channel counts as zero), on ``group``'s device.

        Raises:
            ValueError: a group outside 0..G-1 or over ``group_size`` channels.
        """
        device, group = group.device, group.detach().cpu().to(torch.long)  # (CPU: deterministic, tiny)
        in_range = group.dim() == 1 and group.numel() > 0 and 0 <= int(group.min()) and \
            int(group.max()) < self.num_groups
        one_hot = F.one_hot(group, self.num_groups) if in_range else None  # [C', G]
        if one_hot is None or int(one_hot.sum(0).max()) > self.group_size:
            raise ValueError(f"group {group.tolist()} must give every channel one of {self.num_groups} groups, "
                             f"at most {self.group_size} channels each")
        rank = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # of each channel within its group
        padded_at = group * self.group_size + rank
        source = torch.full((self.num_groups * self.group_size,), group.numel()).scatter(
            0, padded_at, torch.arange(group.numel()))
        self.num_features = group.numel()
        self.group, self.padded_at, self.source = (t.to(device) for t in (group, padded_at, source))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.regroup(self.group.clone())

    def config(self) -> dict:
        """Constructor arguments as plain data (``architecture.describe_architecture``)."""
        return {"num_features": self.num_features, "num_groups": self.num_groups, "group_size": self.group_size,
                "eps": self.eps, "affine": self.affine}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each group's kept channels followed by zeros up to group_size, one fused group_norm, the kept ones read
        zero = F.pad(x, (0, 0) * (x.dim() - 2) + (0, 1))  # channel C' is zeros
        weight, bias = (None if p is None else F.pad(p, (0, 1)).index_select(0, self.source)
                        for p in (self.weight, self.bias))
        y = F.group_norm(zero.index_select(1, self.source), self.num_groups, weight, bias, self.eps)
        return y.index_select(1, self.padded_at)

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
        new.regroup(inverse)
    return _with_affine(new, norm)


class PaddedGroupNormPruner(_PerChannelPruner):
    """torch-pruning's handler for :class:`PaddedGroupNorm`: ``group`` loses the pruned entries too
    (compaction then calls :func:`compact_group_norm`)."""

    def prune_more(self, layer: PaddedGroupNorm, keep: list[int]) -> None:
        layer.regroup(layer.group[torch.tensor(keep, dtype=torch.long, device=layer.group.device)])


class InstanceNormPruner(_PerChannelPruner):
    """torch-pruning's handler for ``nn.InstanceNorm1d/2d/3d``: with ``track_running_stats=True`` the running
    mean and variance lose the pruned entries too. torch-pruning 1.6.0's own handler narrows only the weight and
    bias, so the narrowed module refused every eval-mode forward ("running_mean should contain 15 elements not
    16") and the channels of a fresh user's InstanceNorm with running statistics were left unpruned."""

    def prune_more(self, layer: nn.Module, keep: list[int]) -> None:
        for name in ("running_mean", "running_var"):
            stat = getattr(layer, name)
            if stat is not None:
                setattr(layer, name, stat[torch.tensor(keep, dtype=torch.long, device=stat.device)].clone())


class LayerNormPruner(tp.pruner.function.LayernormPruner):
    """torch-pruning's handler for ``nn.LayerNorm`` with the kept entries in channel order. torch-pruning 1.6.0
    builds them from a set and calls ``sort()`` on a tensor without keeping the result, so a LayerNorm that kept
    few of many channels (6 of 128) had its weight and bias in the set's order: the compact model computed
    something else and a fresh user's latency target failed its compaction check."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        dim = self.pruning_dim
        if len(layer.normalized_shape) < -dim:
            return layer
        keep = sorted(set(range(layer.normalized_shape[dim])) - set(idxs))
        for name in ("weight", "bias"):
            param = getattr(layer, name)
            if layer.elementwise_affine and param is not None:
                setattr(layer, name, self._prune_parameter_and_grad(param, keep, dim))
        shape = list(layer.normalized_shape)
        shape[dim] = len(keep)
        layer.normalized_shape = tuple(shape)
        return layer

    prune_in_channels = prune_out_channels


def pruners(model: nn.Module) -> dict[type, tp.pruner.function.BasePruningFunc]:
    """torch-pruning's customized pruners for ``model``: :data:`PRUNERS`, :class:`LayerNormPruner` for every
    subclass of ``nn.LayerNorm`` in it (torchvision's ``LayerNorm2d``, a caller's own), which torch-pruning
    would otherwise prune with its own handler, keeping the weight and bias in a set's order, and
    :class:`InstanceNormPruner` for every InstanceNorm type in it (torch-pruning looks pruners up by exact type)."""
    found = {type(m): pruner for m in model.modules() for base, pruner in _NORM_PRUNERS if isinstance(m, base)}
    return {**PRUNERS, **found}


#: the padded norm modules (what compaction makes of a LayerNorm / GroupNorm that lost channels)
PADDED_NORMS = (PaddedLayerNorm, PaddedGroupNorm)
#: torch-pruning customized pruners for the modules of this file (``DependencyGraph.build_dependency``), and for
#: ``nn.LayerNorm`` (:class:`LayerNormPruner`); :func:`pruners` adds the InstanceNorm types of a model
PRUNERS = {PaddedLayerNorm: PaddedLayerNormPruner(), PaddedGroupNorm: PaddedGroupNormPruner(),
           nn.LayerNorm: LayerNormPruner()}
#: the norm types :func:`pruners` gives our pruner for every subclass of (torch-pruning looks them up by exact type)
_NORM_PRUNERS = ((nn.LayerNorm, PRUNERS[nn.LayerNorm]), (nn.modules.instancenorm._InstanceNorm, InstanceNormPruner()))
