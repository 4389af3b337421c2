"""Network purification and unused path removal (Ma et al., "Non-structured DNN weight pruning considered
harmful" / "Network purification", arXiv 1905.00136; AutoCompress, Liu et al. AAAI 2020, §3; brief §4).

ADMM pruning leaves structure that computes nothing useful. Two phases remove it:

* **Unused path removal** (:func:`remove_unused_paths`): a kept filter-group channel that no remaining
  consumer weight reads (every column reading it, in every consumer of the coupled group, is pruned) is
  removed; a kept channel whose producer weight rows are all pruned is removed; and every column that reads a
  removed channel is removed. The rules feed each other (a removed channel empties columns, which can empty
  a producer's rows when irregular masks are combined), so they are repeated to a fixed point. At least one
  unit per layer is always kept, and a filter group keeps an aligned width (the space's channel multiple,
  :mod:`autocompress.alignment`): removed channels are put back, used ones first, up to the next allowed
  width.
* **Redundant weight removal** (:func:`purify`): filters and columns whose remaining L2 norm is below
  ``threshold`` x the mean norm of the layer's remaining units are removed (a filter group back up to an
  aligned width, largest norms first), followed by unused path removal,
  when the validation top-1 stays within ``tolerance`` of the top-1 before purification. Thresholds are
  tried in increasing order (each removes a superset of the previous one); the largest accepted one is kept.
  Our guard: when the top-1 before purification is below :data:`CHANCE_FACTOR` x chance (1 / number of
  classes) the check could not object to any removal, so redundant weight removal is skipped (a one-round
  30x Fashion-MNIST run hard-pruned to 9.5 % lost a layer down to 1 filter this way, BENCHMARKS.md).

**Constant folding.** A removed channel whose producer rows are zero still outputs a constant (its bias /
BatchNorm shift through the activation); a consumer column that read it adds ``sum(W[:, c]) * constant``
to every output. Before the channel is masked, that contribution is folded into the consumer's bias, or,
when the consumer has no bias and feeds a BatchNorm directly, subtracted from the BatchNorm's running mean
(exact in eval mode; in train mode BatchNorm removes a constant shift by itself). A channel whose
contribution cannot be folded (no bias, no BatchNorm after the consumer, a value that is not constant
because an operation between mixes channels, a transposed-conv consumer) is kept. The fold is exact for
Linear consumers, 1x1 convolutions and unpadded convolutions; for a zero-padded convolution it is exact
only at output positions whose receptive field lies inside the input (at the border, the padded taps
read 0 instead of the constant).

**The function never changes** (:func:`settle`): unused path removal is checked against the model masked
at the requested rates (eval mode, the example inputs and a random batch, compaction's tolerance); where
it differs (a removed channel still read by a normalisation over the channels, a fold inexact at a padded
border), the channels of the offending groups are kept.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .alignment import grow_to_multiple
from .analysis import analysis_mode
from .compaction import verify
from .errors import UserError
from .masks import Masks, apply_masks
from .projection import SCORED_ROLES, group_scores
from .space import PruningSpace, is_transposed, is_weight_layer
from .text import plural

#: default redundant-weight thresholds, relative to the layer's mean remaining unit norm
DEFAULT_THRESHOLDS = (0.01, 0.02, 0.05, 0.1, 0.2)


@dataclass
class PurificationResult:
    """What :func:`purify` returns.

    Attributes:
        masks: the purified keep masks.
        param_masks: their per-parameter expansion (applied to the model).
        removed_filters: filter-group name -> channels removed by purification.
        removed_columns: column-layer name -> columns removed by purification.
        threshold: the largest accepted redundant-weight threshold that removed something, or None.
        top1_before: the validation score (e.g. top-1 as a fraction) of the masked model before
            purification (None without a ``score``); top1_after: after it.
        folded: channels whose constant output was folded into a consumer, as ``"group[channel]"``.
        trials: ``[{"threshold": t, "top1": score, "accepted": bool}]`` in the order tried (thresholds
            that remove nothing more are skipped).
        near_chance: redundant weight removal was skipped because ``top1_before`` was below
            ``CHANCE_FACTOR`` x chance.
    """

    masks: Masks
    param_masks: dict[str, torch.Tensor]
    removed_filters: dict[str, int] = field(default_factory=dict)
    removed_columns: dict[str, int] = field(default_factory=dict)
    threshold: float | None = None
    top1_before: float | None = None
    top1_after: float | None = None
    folded: list[str] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)
    near_chance: bool = False

    def largest_removals(self, count: int = 3) -> str:
        """The ``count`` units purification cut deepest beyond the rates (by the fraction it removed), e.g.
        ``"28 channels of c1 (4 of 32 kept), 6 columns of fc (20 of 36 kept)"``; "" when it removed nothing."""
        kinds = (("channels", self.removed_filters, self.masks.filters),
                 ("columns", self.removed_columns, self.masks.columns))
        cuts = [(removed / masks[name].numel(), f"{removed} {noun} of {name}", masks[name])
                for noun, removals, masks in kinds for name, removed in removals.items() if removed > 0]
        cuts.sort(key=lambda cut: -cut[0])
        return ", ".join(f"{what} ({int(mask.sum())} of {mask.numel()} kept)" for _, what, mask in cuts[:count])


#: redundant weight removal needs a validation top-1 of at least this multiple of chance (1 / classes)
CHANCE_FACTOR = 2.0


def _copy_masks(masks: Masks) -> Masks:
    return Masks(filters={k: v.clone() for k, v in masks.filters.items()},
                 columns={k: v.clone() for k, v in masks.columns.items()},
                 weights={k: v.clone() for k, v in masks.weights.items()}, clipped=list(masks.clipped))


def _alive_positions(mask: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Bool [len(index)]: some entry of ``mask`` at position ``index[i]`` along ``dim`` is kept."""
    moved = mask.index_select(dim, index).movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1).any(1)


def column_channels(space: PruningSpace) -> dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Which filter-group channel each column reads.

    Returns:
        column-layer name -> ``[(group name, columns int64 [n], channels int64 [n])]``: column
        ``columns[i]`` of the layer's GEMM view reads channel ``channels[i]`` of the group. Columns reading
        no prunable group (the network input, excluded layers) are absent.
    """
    by_param = {layer.param: layer for layer in space.column_layers}
    reads: dict[str, list] = {layer.name: [] for layer in space.column_layers}
    for group in space.filter_groups:
        for s in group.slices:
            layer = by_param.get(s.param)
            if s.role != "input" or layer is None:
                continue
            inputs = space.param_shapes[s.param][s.dim]  # input channels (dim 0 of a transposed conv)
            area = layer.size // inputs  # prod(k) (1 for Linear)
            lookup = torch.full((inputs,), -1, dtype=torch.long)
            lookup[s.index] = s.channel
            channel = lookup[torch.arange(layer.size) // area]
            columns = torch.nonzero(channel >= 0).flatten()
            reads[layer.name].append((group.name, columns, channel[columns]))
    return reads


def _keep_one(keep: torch.Tensor, before: torch.Tensor, prefer: torch.Tensor | None = None) -> torch.Tensor:
    """``keep`` with at least one True: if empty, the first of ``before & prefer`` (else of ``before``)."""
    if bool(keep.any()) or not bool(before.any()):
        return keep
    pool = before & prefer if prefer is not None and bool((before & prefer).any()) else before
    keep = keep.clone()
    keep[int(torch.nonzero(pool)[0])] = True
    return keep


def remove_unused_paths(space: PruningSpace, masks: Masks, *,
                        pinned: dict[str, torch.Tensor] | None = None) -> Masks:
    """Unused path removal on masks, to a fixed point (Ma et al. arXiv 1905.00136; brief §4).

    Args:
        space: the model's pruning space.
        masks: keep masks (not modified).
        pinned: group name -> bool [size] of channels that must not be removed.

    Returns:
        New masks: a kept channel is removed when no kept consumer entry reads it (groups with no consumer
        weight in the space are left alone) or when all its producer weight rows are pruned; a kept column
        is removed when it reads a removed channel. Every filter group and column layer keeps at least one
        unit; channels tied by a grouped convolution (``FilterGroup.ties``) stay while one of them does. A
        group of attention heads (``FilterGroup.heads``) keeps its mask: a head cannot lose a channel alone.
    """
    masks = _copy_masks(masks)
    reads = column_channels(space)
    while True:
        changed = False
        pm = space.param_masks(masks)
        for group in space.filter_groups:
            keep = masks.filters.get(group.name)
            if keep is None or group.heads > 1:  # a head cannot lose a channel alone; its dead ones stay zero
                continue
            used = torch.zeros(group.size, dtype=torch.bool)
            produced = torch.zeros(group.size, dtype=torch.bool)
            has_consumer = False
            for s in group.slices:
                if s.role == "input":
                    has_consumer = True
                    used[s.channel[_alive_positions(pm[s.param], s.dim, s.index)]] = True
                elif s.role == "weight":
                    produced[s.channel[_alive_positions(pm[s.param], s.dim, s.index)]] = True
            if not has_consumer:
                used[:] = True
            new = keep & used & produced
            if pinned is not None and group.name in pinned:
                new |= keep & pinned[group.name]
            new = group.tie(_keep_one(new, keep, used))
            new = _grow_classes(space, group, new, keep, (used & produced).double())
            if not torch.equal(new, keep):
                masks.filters[group.name], changed = new, True
        for layer, entries in reads.items():
            keep = masks.columns.get(layer)
            if keep is None:
                continue
            new = keep.clone()
            for gname, columns, channels in entries:
                if gname in masks.filters:
                    new[columns[~masks.filters[gname][channels]]] = False
            new = _keep_one(new, keep)
            if not torch.equal(new, keep):
                masks.columns[layer], changed = new, True
        if not changed:
            return masks


def _grow_classes(space: PruningSpace, group, new: torch.Tensor, before: torch.Tensor,
                  priority: torch.Tensor) -> torch.Tensor:
    """``new`` (bool [size], closed over the group's ties, a subset of ``before``) with a class of ``before`` added
    back in each part left without one (:meth:`~autocompress.space.FilterGroup.keep_parts`), and whole tie classes
    of ``before`` until the kept channels are an aligned width
    (:func:`autocompress.alignment.grow_to_multiple` over classes, priority summed per class; without ties
    per channel)."""
    kept, before = group.class_sums(new.long()) > 0, group.class_sums(before.long()) > 0
    kept = group.keep_parts(kept, group.class_sums(priority.double()), before=before)
    classes = grow_to_multiple(kept, before, space.class_multiple(group), group.class_sums(priority.double()))
    return group.expand(classes)


def redundant_candidates(space: PruningSpace, model: nn.Module, masks: Masks, threshold: float) -> Masks:
    """Masks with the redundant filters / columns removed (brief §4 b).

    A kept filter-group channel whose joint L2 norm (of the weights it owns: producer rows and consumer input
    columns, :func:`autocompress.projection.group_scores`) is below ``threshold`` x the mean norm of the group's
    kept channels is removed; likewise a kept column whose remaining L2 norm (over the
    kept entries) is below ``threshold`` x the mean of the layer's kept columns, the strongest of them put back
    until the kept count is aligned (:meth:`~autocompress.space.PruningSpace.column_multiple`). At least one unit
    per layer stays (the largest); a group of attention heads (``FilterGroup.heads``) keeps its mask. ``model``'s
    weights are read, not modified.
    """
    masks = _copy_masks(masks)
    params = dict(model.named_parameters())
    pm = space.param_masks(masks)
    for group in space.filter_groups:
        keep = masks.filters.get(group.name)
        if keep is None or not bool(keep.any()) or group.heads > 1:
            continue
        masked = {s.param: params[s.param].detach() * pm[s.param].to(params[s.param].device)
                  for s in group.slices if s.role in SCORED_ROLES}
        norms = group_scores(group, masked).sqrt()
        masks.filters[group.name] = _grow_classes(space, group, group.tie(_below(norms, keep, threshold)), keep,
                                                  norms)
    for layer in space.column_layers:
        keep = masks.columns.get(layer.name)
        if keep is None or not bool(keep.any()):
            continue
        weight = params[layer.param].detach()
        weight = (weight * pm.get(layer.param, torch.ones_like(weight, dtype=torch.bool)).to(weight.device))
        norms = layer.gemm(weight).to("cpu", torch.float64).pow(2).sum(0).sqrt()
        masks.columns[layer.name] = grow_to_multiple(_below(norms, keep, threshold), keep,
                                                     space.column_multiple(layer), norms)
    return masks


def _below(norms: torch.Tensor, keep: torch.Tensor, threshold: float) -> torch.Tensor:
    """``keep`` minus the units whose norm is below ``threshold`` x the mean kept norm (largest stays)."""
    mean = norms[keep].mean()
    new = keep & (norms >= threshold * mean)
    if not bool(new.any()):
        new = torch.zeros_like(keep)
        new[int(torch.argmax(norms.masked_fill(~keep, -1.0)))] = True
    return new


@dataclass
class _Fold:
    """Constant contribution ``delta`` (float64 [consumer outputs]) of removed channels to consumer
    ``module``, folded into ``target``: ``"bias"`` (the consumer's) or the name of the BatchNorm reading the
    consumer's output (its running mean)."""

    module: str
    target: str
    delta: torch.Tensor
    channels: list[str]


def _as_tuple(example_inputs) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


@torch.no_grad()
def _fold_plan(model: nn.Module, space: PruningSpace, old: Masks, new: Masks, example_inputs
               ) -> tuple[list[_Fold], dict[str, torch.Tensor]]:
    """Constant contributions of the channels ``new`` removes (kept in ``old``) to their consumers.

    One analysis forward of a copy of the ``old``-masked model with the removed channels' producer weight
    rows zeroed (biases / BatchNorm kept) gives each removed channel's constant value at every consumer
    input position. Returns ``(folds, unfoldable)``: each fold names its target (the consumer's bias or
    the running mean of the BatchNorm that reads the consumer's output); ``unfoldable`` maps a group to the
    bool [size] channels with a non-zero contribution to a consumer that has neither.
    """
    removed = {g.name: old.filters[g.name] & ~new.filters[g.name] for g in space.filter_groups
               if g.name in old.filters and g.name in new.filters}
    removed = {k: v for k, v in removed.items() if bool(v.any())}
    if not removed:
        return [], {}
    work = copy.deepcopy(model)
    apply_masks(work, space.param_masks(old))
    params = dict(work.named_parameters())
    watched: dict[str, list] = {}
    for group in space.filter_groups:
        if group.name not in removed:
            continue
        gone = removed[group.name]
        for s in group.slices:
            hit = gone[s.channel]
            if s.role == "weight":
                params[s.param].index_fill_(s.dim, s.index[hit].to(params[s.param].device), 0)
            elif s.role == "input" and bool(hit.any()):
                watched.setdefault(s.module, []).append((group.name, s, hit))
    modules = dict(work.named_modules())
    seen_in: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    bn_inputs: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def fn(module, args, output):
            if name in watched and name not in seen_in:
                seen_in[name], outputs[name] = args[0].detach(), output
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                bn_inputs.append((name, args[0]))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()
               if n in watched or isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with analysis_mode(work):
            work(*_as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
    folds: list[_Fold] = []
    unfoldable: dict[str, torch.Tensor] = {}
    for name, entries in watched.items():
        module, x = modules[name], seen_in.get(name)
        if x is None:
            continue
        weight = params[entries[0][1].param].detach()
        delta = torch.zeros(weight.shape[0], dtype=torch.float64)
        labels, target = [], None
        for gname, s, hit in entries:
            index, channel, feature = s.index[hit], s.channel[hit], s.features[hit]
            conv = isinstance(module, nn.modules.conv._ConvNd)
            folds_here = is_weight_layer(module) and not is_transposed(module)
            values = _constant_values(x, feature, 1 if conv else -1) if folds_here else None
            if values is None:  # not constant, a transposed conv (its border taps differ) or an LSTM: keep them
                mask = unfoldable.setdefault(gname, torch.zeros(space.unit("filter", gname).size,
                                                                dtype=torch.bool))
                mask[channel] = True
                continue
            w = weight.index_select(1, index.to(weight.device)).to("cpu", torch.float64)
            per = w.reshape(w.shape[0], w.shape[1], -1).sum(2)  # [out, n]: sum over kernel taps
            if s.groups > 1:  # a grouped conv: channel feature[i] reaches only the rows of its conv group
                rows = torch.arange(w.shape[0]) // (w.shape[0] // s.groups)
                per = per * (rows.unsqueeze(1) == (feature // weight.shape[1]).unsqueeze(0))
            contribution = per * values.unsqueeze(0)
            delta += contribution.sum(1)
            nonzero = contribution.abs().amax(0) > 0
            labels += [f"{gname}[{int(c)}]" for c in channel[nonzero].unique().tolist()]
            if bool(nonzero.any()):
                target = _fold_target(module, name, outputs[name], bn_inputs, modules)
                if target is None:
                    mask = unfoldable.setdefault(gname, torch.zeros(space.unit("filter", gname).size,
                                                                    dtype=torch.bool))
                    mask[channel[nonzero]] = True
        if target is not None and bool(delta.ne(0).any()):
            folds.append(_Fold(name, target, delta, sorted(set(labels))))
    return folds, unfoldable


def _constant_values(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Float64 [n]: the (input-independent) value at consumer input positions ``index`` along ``dim`` of
    ``x``, or None when it is not constant.

    Conv inputs ``[N, C, *spatial]`` (``dim`` 1) are read at the centre position and must be constant over
    the batch and the interior (the border may differ: padding); Linear inputs ``[..., F]`` (``dim`` -1)
    must be constant over every leading dimension. A removed channel read after an operation that mixes
    channels (e.g. a normalisation over the channels) is not constant.
    """
    part = x.index_select(dim, index.to(x.device)).movedim(dim, -1).to("cpu", torch.float64)
    if dim == 1 and part.dim() > 2:  # [N, *spatial, n]
        spatial = part.shape[1:-1]
        values = part[(0, *(s // 2 for s in spatial))]
        interior = part[(slice(None), *(slice(1, -1) if s > 2 else slice(None) for s in spatial))]
    else:
        values = part.reshape(-1, part.shape[-1])[0]
        interior = part
    spread = (interior - values).abs().amax() if interior.numel() else torch.tensor(0.0)
    if float(spread) > 1e-5 * (1.0 + float(values.abs().max())):
        return None
    return values


def _fold_target(module: nn.Module, name: str, output: torch.Tensor, bn_inputs: list,
                 modules: dict[str, nn.Module]) -> str | None:
    """``"bias"`` if the consumer has one, else the name of a BatchNorm (with running statistics) that
    reads its output directly, else None."""
    if getattr(module, "bias", None) is not None:
        return "bias"
    for bn_name, bn_input in bn_inputs:
        if bn_input is output and modules[bn_name].running_mean is not None:
            return bn_name
    return None


@torch.no_grad()
def _apply_folds(model: nn.Module, folds: list[_Fold]) -> None:
    """Add each fold's ``delta`` to the consumer bias, or subtract it from the BatchNorm's running mean, in
    ``model`` (same module names as the planning copy)."""
    modules = dict(model.named_modules())
    for fold in folds:
        if fold.target == "bias":
            bias = modules[fold.module].bias
            bias.add_(fold.delta.to(bias.device, bias.dtype))
        else:
            mean = modules[fold.target].running_mean
            mean.sub_(fold.delta.to(mean.device, mean.dtype))


def _fixed_point(model: nn.Module, space: PruningSpace, old: Masks, candidate: Masks, example_inputs,
                 pinned: dict[str, torch.Tensor]) -> tuple[Masks, list[_Fold]]:
    """Unused path removal of ``candidate`` (channels in ``pinned`` kept) and the folds it needs; channels
    whose constant contribution cannot be folded are pinned too and the fixed point recomputed."""
    pinned = {k: v.clone() for k, v in pinned.items()}
    for _ in range(1 + sum(g.size for g in space.filter_groups)):
        new = remove_unused_paths(space, candidate, pinned=pinned)
        folds, unfoldable = _fold_plan(model, space, old, new, example_inputs)
        if not unfoldable:
            return new, folds
        candidate = _copy_masks(candidate)
        for gname, mask in unfoldable.items():
            pinned[gname] = pinned.get(gname, torch.zeros_like(mask)) | mask
            candidate.filters[gname] = candidate.filters[gname] | (mask & old.filters[gname])
    raise RuntimeError("purification did not settle")  # each round pins >= 1 channel, so unreachable


def _committed(model: nn.Module, space: PruningSpace, masks: Masks, folds: list[_Fold]) -> nn.Module:
    """A copy of ``model`` with ``folds`` applied and ``masks`` zeroed."""
    work = copy.deepcopy(model)
    _apply_folds(work, folds)
    apply_masks(work, space.param_masks(masks))
    return work


def _same_function(reference: nn.Module, trial: nn.Module, example_inputs) -> bool:
    """``trial`` computes what ``reference`` computes in eval mode (compaction's tolerance), on the example
    inputs and a seeded random batch of their shape."""
    try:
        verify(reference, trial, example_inputs)
    except RuntimeError:
        return False
    return True


def settle(model: nn.Module, space: PruningSpace, old: Masks, candidate: Masks, example_inputs
           ) -> tuple[Masks, list[str]]:
    """Unused path removal of ``candidate`` with constant folding, committed to ``model`` in place; never
    changes the function.

    ``model`` must hold ``old``'s masks. The reference is ``model`` with ``candidate``'s removals only
    (their constants folded where possible; for the first call, ``candidate`` is ``old`` and the reference is
    the model masked at the requested rates). Channels whose constant contribution cannot be folded are kept;
    if the result still differs from the reference (a removed channel was read by an operation that mixes
    channels, or a fold is inexact at a padded border), the unused channels of each group are tried one
    group at a time and kept where removing them changes the output. Returns ``(final masks, folded channel
    labels)``; on return the folds are applied and ``model`` holds the final masks.
    """
    everything = {k: v.clone() for k, v in candidate.filters.items()}
    ref_masks, ref_folds = _fixed_point(model, space, old, candidate, example_inputs, everything)
    reference = _committed(model, space, ref_masks, ref_folds)
    new, folds = _fixed_point(model, space, old, candidate, example_inputs, {})
    if not _same_function(reference, _committed(model, space, new, folds), example_inputs):
        pinned = everything
        for gname in [k for k in new.filters if not torch.equal(new.filters[k], ref_masks.filters[k])]:
            trial_pins = {k: v for k, v in pinned.items() if k != gname}
            trial, trial_folds = _fixed_point(model, space, old, candidate, example_inputs, trial_pins)
            if _same_function(reference, _committed(model, space, trial, trial_folds), example_inputs):
                pinned = trial_pins
        new, folds = _fixed_point(model, space, old, candidate, example_inputs, pinned)
        if not _same_function(reference, _committed(model, space, new, folds), example_inputs):
            new, folds = ref_masks, ref_folds
    _apply_folds(model, folds)
    apply_masks(model, space.param_masks(new))
    return new, sorted({label for fold in folds for label in fold.channels})


def check_purification(tolerance: float, thresholds: Sequence[float]) -> None:
    """UserError unless ``tolerance`` (of :func:`purify`) is a finite fraction >= 0 and ``thresholds`` a
    non-empty list of finite numbers > 0; the compress config checks its section with it before any work."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"purification.tolerance={tolerance!r} is not a fraction >= 0",
                        "give the largest accepted validation top-1 drop, e.g. 0.005")
    if not (len(thresholds) > 0 and all(math.isfinite(t) and t > 0 for t in thresholds)):
        raise UserError(f"purification.thresholds={thresholds!r} must be a non-empty list of numbers > 0",
                        "use e.g. [0.01, 0.02, 0.05, 0.1, 0.2]")


def purify(model: nn.Module, space: PruningSpace, masks: Masks, *, example_inputs,
           score: Callable[[nn.Module], float] | None = None, chance: float | None = None,
           tolerance: float = 0.005, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
           log: Callable[[str], None] | None = None,
           describe: Callable[[float], str] = lambda value: f"validation score {value:.4g}") -> PurificationResult:
    """Network purification and unused path removal, in place (Ma et al. arXiv 1905.00136; brief §4).

    Args:
        model: the pruned network (its weights are masked with ``masks`` first).
        space: its pruning space.
        masks: keep masks after hard pruning.
        example_inputs: a tensor ``[N, C, H, W]`` (or tuple) the model accepts; any values (the constants
            of removed channels do not depend on the input).
        score: ``fn(model) -> float`` (higher is better, e.g. validation top-1 as a fraction) that redundant
            weight removal must keep; without it only unused path removal runs.
        chance: the score of a random guess (e.g. ``1 / classes`` for top-1), or None when the score has
            none; below ``CHANCE_FACTOR`` x chance redundant weight removal is skipped.
        tolerance: largest accepted drop of ``score`` (in its units: 0.005 = 0.5 points of a top-1
            fraction) relative to the score before purification.
        thresholds: redundant-weight thresholds (relative to the layer's mean remaining unit norm).
        log: called with one line per phase / threshold tried.
        describe: a score as text for ``log`` (e.g. ``"val top-1 91.20%"`` for a top-1 fraction).

    Returns:
        :class:`PurificationResult`; ``model`` holds the purified masks and folded constants.
    """
    apply_masks(model, space.param_masks(masks))
    result = PurificationResult(masks=masks, param_masks={})
    if score is not None:
        result.top1_before = score(model)
        result.near_chance = chance is not None and result.top1_before < CHANCE_FACTOR * chance
    current, folded = settle(model, space, masks, masks, example_inputs)
    if log is not None:
        log(f"unused path removal: {_summary(masks, current)}")
        if result.near_chance:
            log(f"redundant weight removal skipped: the hard-pruned model's {describe(result.top1_before)} is "
                f"below {CHANCE_FACTOR:g}x chance ({describe(CHANCE_FACTOR * chance)}), too low for its check "
                "(no drop in accuracy) to tell a harmless removal from a harmful one; it runs from that level up")
    for threshold in sorted(thresholds) if score is not None and not result.near_chance else ():
        candidate = redundant_candidates(space, model, current, threshold)
        if _same(candidate, current):
            continue
        trial = copy.deepcopy(model)
        trial_masks, trial_folded = settle(trial, space, current, candidate, example_inputs)
        top1 = score(trial)
        accepted = top1 >= result.top1_before - tolerance
        result.trials.append({"threshold": threshold, "top1": top1, "accepted": accepted})
        if log is not None:
            log(f"redundant weight removal at threshold {threshold:g}: {_summary(current, trial_masks)}, "
                f"{describe(top1)} ({'accepted' if accepted else 'rejected'})")
        if not accepted:
            break
        model.load_state_dict(trial.state_dict())
        current, result.threshold, result.top1_after = trial_masks, threshold, top1
        folded += trial_folded
    if score is not None and result.top1_after is None:  # no removal accepted: unused path removal and its folds
        result.top1_after = result.top1_before  # compute what the hard-pruned model did (settle), so its score stands
    result.masks, result.param_masks, result.folded = current, space.param_masks(current), sorted(set(folded))
    result.removed_filters = {k: int(masks.filters[k].sum() - current.filters[k].sum()) for k in current.filters}
    result.removed_columns = {k: int(masks.columns[k].sum() - current.columns[k].sum()) for k in current.columns}
    return result


def _same(a: Masks, b: Masks) -> bool:
    return all(torch.equal(a.filters[k], b.filters[k]) for k in a.filters) and \
        all(torch.equal(a.columns[k], b.columns[k]) for k in a.columns)


def _summary(before: Masks, after: Masks) -> str:
    filters = sum(int(before.filters[k].sum() - after.filters[k].sum()) for k in after.filters)
    columns = sum(int(before.columns[k].sum() - after.columns[k].sum()) for k in after.columns)
    return f"{plural(filters, 'filter')} and {plural(columns, 'column')} removed"
