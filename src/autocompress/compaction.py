"""Physical compaction: turn a masked model into a smaller one that computes the same (brief §2, §7).

AutoCompress (Liu et al., AAAI 2020, §3 "hybrid structured pruning") prunes rows (filters) and columns
of each layer's GEMM matrix. This module makes that pruning physical:

* **Filters / channels.** An output channel whose producing weight rows are all zero (and whose biases
  and normalisation affine entries are zero, so the channel outputs exactly 0) is removed with
  torch-pruning's ``DependencyGraph``; coupled layers (residual adds, concatenation, depthwise convs,
  BatchNorm, Conv -> Flatten -> Linear) lose the same channels together; a LayerNorm / GroupNorm that
  lost channels keeps its statistics over the original channels (:mod:`autocompress.padded_norm`).
* **Columns.** A Conv2d whose GEMM view ``weight.reshape(F, C/groups*kh*kw)`` has all-zero columns is
  replaced by :class:`ColumnConv2d`, which stores only the ``K'`` kept columns (a Conv1d / Conv3d by
  :class:`ColumnConvNd`); a Linear with all-zero input columns becomes :class:`ColumnLinear`.
* **Attention heads.** A fused query-key-value Linear loses rows ``c``, ``D + c`` and ``2 D + c`` with input ``c``
  of its output projection; a scale that follows the head width keeps its old value through the query rows.
* **Widths in attributes.** Where the compact forward fails because it writes a width stored in an int attribute
  into a shape (torchvision's ``VisionTransformer.hidden_dim``, a stored head width), that attribute follows the
  narrowed width (:func:`width_attributes`); saved architectures restore it.
* **Irregular** zeros stay in dense tensors (``serialization.to_sparse_state_dict`` exports them sparse).

The result is checked in eval mode against the masked model; see :func:`compact`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .analysis import analysis_mode, hooked_forward, output_tensors, random_like
from .alignment import is_aligned
from .architecture import (apply_architecture, describable, describe_architecture, mark_width_attribute,
                           width_attribute_values)
from .columns import (CONV_LAYERS, DENSE_DENSITY_THRESHOLD, GEMM_MIN_FILTERS, ColumnConv2d, ColumnConvNd,
                      ColumnLinear, gemm_matrix)
from .errors import UserError, first_line
from .padded_norm import (PaddedGroupNorm, PaddedLayerNorm, channel_dims, channel_groups, compact_group_norm,
                          group_size, is_group_norm, is_layer_norm, kept_statistics, padded)
from .recurrent import dead_hidden_units, hidden_prunable
from .space import (BREAKS_FIX, fused_qkv_output, fused_qkv_width, is_grouped, is_transposed, is_weight_layer,
                    mapping_failure, out_dim, tie_classes, trace_graph, train_only_modules)


def densify(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every :class:`ColumnConv2d` / :class:`ColumnConvNd` /
    :class:`ColumnLinear` replaced by its dense equivalent (zero columns), computing the same outputs.
    Channels removed by compaction stay removed. The next AutoCompress round prunes this model (its zero
    columns score lowest). Frozen parameters stay frozen (``requires_grad`` as in ``model``)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (ColumnConv2d, ColumnConvNd, ColumnLinear)):
            dense = module.to_dense()
            frozen = dict(module.named_parameters())
            for param_name, param in dense.named_parameters():
                if param_name in frozen:
                    param.requires_grad_(frozen[param_name].requires_grad)
            model.set_submodule(name, dense)
    return model


@dataclasses.dataclass
class CompactResult:
    """Result of :func:`compact`.

    Attributes:
        model: the compact model (a deep copy; eval mode).
        architecture: ``serialization.describe_architecture(model, reference=original)`` (plain data).
        report: plain data: ``params_before`` / ``params_after`` (parameters), ``removed_channels``
            (root module name -> number of channels removed from its coupled group), ``column_layers``
            (module name -> ``[kept columns, total columns]``), ``dead_channels_kept`` (module name ->
            why its all-zero rows / columns stay dense), ``max_abs_diff`` and ``tolerance`` of the output
            check.
    """

    model: nn.Module
    architecture: dict
    report: dict


def _as_tuple(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _apply_masks(model: nn.Module, param_masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in param_masks.items():
            if name not in params:
                raise UserError(f"mask given for {name!r}, which is not a parameter of the model",
                                "build the masks from this model (PruningSpace.param_masks)")
            if tuple(mask.shape) != tuple(params[name].shape):
                raise UserError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter "
                                f"{tuple(params[name].shape)}", "build the masks from this model")
            params[name].mul_(mask.to(params[name].device, params[name].dtype))


def _zero_slices(tensor: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    """Bool [tensor.shape[dim]]: the slice along ``dim`` is entirely zero (True when tensor is None)."""
    if tensor is None:
        return torch.ones(0, dtype=torch.bool)
    moved = tensor.detach().movedim(dim, 0).reshape(tensor.shape[dim], -1)
    return (moved == 0).all(dim=1).cpu()


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
            and module.groups == module.in_channels == module.out_channels > 1)


_STATISTIC_NORMS = (nn.LayerNorm, PaddedLayerNorm)
_GROUP_NORMS = (nn.GroupNorm, PaddedGroupNorm)
_PER_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _called_modules(model: nn.Module, inputs: tuple) -> dict[nn.Module, int]:
    """Module -> number of forward calls on ``inputs`` (modules used only through their parameters, such as
    MultiheadAttention's out_proj, are absent)."""
    counts: dict[nn.Module, int] = {}

    def hook(module, _inputs, _output):
        counts[module] = counts.get(module, 0) + 1

    hooked_forward(model, inputs, {m: hook for m in model.modules()})
    return counts


def _group_plan(dg: tp.DependencyGraph, group, names: dict, norm_dims: dict) -> tuple[list[list[int]], str | None]:
    """Channels (root indices) of a full-index group that are dead (output exactly 0) and removable.

    A channel is dead when every producer's weight row and bias entry is zero and every per-channel member
    keeps it at zero (BatchNorm / InstanceNorm affine entries zero, depthwise bias zero, free per-channel
    parameters zero): an all-zero conv row followed by an intact BatchNorm outputs the BatchNorm's shift, so
    it is not dead and stays. Members whose pruned dimension has one entry while the group has more
    broadcast over the channels (a spatial gate) and are ignored.

    Returns:
        ``(root indices to remove, one list per tie class (:func:`_tied`; one channel each without ties),
        reason the dead channels are kept or None)``: the channels are kept
        (dense) when they reach a model output or pass through a structure that cannot lose channels
        exactly (grouped transposed convs, a LayerNorm whose channel dimension is unknown, a GroupNorm
        subclass with its own forward, unknown modules with parameters), or are all of them; a grouped conv
        or a GroupNorm without affine parameters removes only whole tie classes.
    """
    size = len(group[0].root_idxs)
    dead = torch.ones(size, dtype=torch.bool)
    has_producer = False
    members = []
    for item in group.items:
        dep, module, node = item.dep, item.dep.target.module, item.dep.target
        idxs = torch.tensor(item.idxs, dtype=torch.long)
        if _broadcast(item, dg, size):
            continue
        members.append((module, node, torch.tensor(item.root_idxs, dtype=torch.long), idxs,
                        dg.is_out_channel_pruning_fn(dep.handler)))
    for module, node, root, idxs, is_out in members:
        row = torch.ones(size, dtype=torch.bool)
        slices = []  # (per-channel "all zero" mask of a tensor of this member)
        if is_out and is_weight_layer(module) and not _is_depthwise(module):
            has_producer = True
            zero = _zero_slices(module.weight, out_dim(module))
            if module.bias is not None:
                zero &= _zero_slices(module.bias, 0)
            slices = [zero]
        elif is_out and hidden_prunable(module):  # a recurrent layer's hidden units
            has_producer = True
            slices = [dead_hidden_units(module)]
        elif is_out and not is_weight_layer(module):
            slices = [_zero_slices(tensor, dim) for tensor, dim in _per_channel_tensors(module, node)]
        elif _is_depthwise(module) and module.bias is not None:
            slices = [_zero_slices(module.bias, 0)]
        for zero in slices:
            if idxs.numel() and int(idxs.max()) >= zero.numel():  # an uneven split feeding a concat
                return [], (f"the dependency graph maps channels past the {zero.numel()} of "
                            f"{names.get(module, 'a layer')} (a split / concat it cannot map)")
            row[root] &= zero[idxs]
        dead &= row
    if not has_producer or not bool(dead.any()):
        return [], None
    root_name = names.get(group[0].dep.target.module)
    dead, reason, ties = _tied(dead, members, names)
    if reason is not None:
        return [], reason
    for module, node, root, idxs, is_out in members:
        if not bool(dead[root].any()):
            continue
        name = names.get(module, "a parameter")
        if node.type == tp.ops.OPTYPE.OUTPUT or (is_out and not node.outputs):
            return [], f"channels are outputs of the model at {name}"
        if is_grouped(module) and module.transposed:
            return [], f"they pass through grouped transposed conv {name} (groups={module.groups})"
        if isinstance(module, _STATISTIC_NORMS) and norm_dims.get(module) is None:
            return [], f"{type(module).__name__} {name} normalises over the channels"
        if isinstance(module, _GROUP_NORMS) and not is_group_norm(module):
            return [], f"{type(module).__name__} {name} has its own forward"
        if (is_out and not is_weight_layer(module) and not isinstance(module, nn.Parameter)
                and not hidden_prunable(module)
                and not isinstance(module, (*_PER_CHANNEL_NORMS, *_STATISTIC_NORMS, *_GROUP_NORMS, nn.PReLU,
                                            nn.Embedding))
                and list(module.parameters())):
            return [], f"they pass through {type(module).__name__} {name}"
    if bool(dead.all()):
        return [], f"every channel of the group rooted at {root_name!r} is zero; the layers stay dense"
    classes: dict[int, list[int]] = {}
    for c in torch.nonzero(dead).flatten().tolist():
        classes.setdefault(c if ties is None else int(ties[c]), []).append(c)
    return list(classes.values()), None


def _tied(dead: torch.Tensor, members: list, names: dict) -> tuple[torch.Tensor, str | None, torch.Tensor | None]:
    """``dead`` [size] reduced to whole tie classes of the group's grouped convolutions (a compact grouped
    conv loses the same positions from every conv group, see ``space.FilterGroup.ties``) and GroupNorms
    without affine parameters (whole norm groups), or a reason the dead channels stay when a grouped conv
    also reads / writes channels outside the group; also the tie classes (int64 [size], None without ties)."""
    pairs = []
    for module, _node, root, idxs, is_out in members:
        if is_group_norm(module) and module.weight is None:  # an all-zero norm group outputs zeros
            pairs.append((channel_groups(module)[idxs], root))
        if not is_grouped(module) or module.transposed:
            continue
        extent = module.out_channels if is_out else module.in_channels
        if not torch.equal(torch.unique(idxs), torch.arange(extent)):
            return dead, f"grouped conv {names.get(module)} also reads or writes other channels", None
        pairs.append((idxs % (extent // module.groups), root))
    if not pairs:
        return dead, None, None
    ties = tie_classes(dead.numel(), pairs)
    dead_count = torch.zeros(int(ties.max()) + 1, dtype=torch.long).index_add_(0, ties, dead.long())
    return (dead_count == torch.bincount(ties))[ties], None, ties


def _distinct(item):
    """A group member with each index once: several removed channels reach one channel of a later layer (the
    channels of a pixel shuffle's block, a Linear's rows viewed as one channel of a map), and torch-pruning
    narrows a layer by the number of indices it is given."""
    if len(set(item.idxs)) == len(item.idxs):
        return item
    distinct = type(item)(item.dep, list(dict.fromkeys(item.idxs)))
    distinct.root_idxs = item.root_idxs
    return distinct


def _broadcast(item, dg: tp.DependencyGraph, size: int) -> bool:
    """A group member whose pruned dimension has one entry while the group has more (a one-channel
    spatial gate multiplied over all channels): it does not couple, and pruning it would empty it."""
    extent = _pruned_extent(item.dep.target.module, item.dep.target, dg.is_out_channel_pruning_fn(item.dep.handler))
    return extent == 1 < size


def _pruned_extent(module, node, is_out: bool) -> int | None:
    """Length of the dimension torch-pruning prunes in ``module`` (None for parameter-free ops)."""
    if isinstance(module, nn.Parameter):
        return module.shape[getattr(node, "pruning_dim", 0)]
    if is_weight_layer(module):
        if isinstance(module, nn.Linear):
            return module.out_features if is_out else module.in_features
        return module.out_channels if is_out or _is_depthwise(module) else module.in_channels
    weight = getattr(module, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def _per_channel_tensors(module, node) -> list[tuple[torch.Tensor, int]]:
    """(tensor, channel dim) pairs that must be zero for a channel to stay zero through ``module``; a
    tensor of ones marks a channel that can never stay zero (BatchNorm without affine: ``BN(0) != 0``)."""
    if isinstance(module, nn.Parameter):
        dim = getattr(node, "pruning_dim", 0)
        return [(module, dim % module.dim())]
    if is_layer_norm(module):  # at a zero input channel a LayerNorm outputs 0 only if its weight and bias are 0
        if module.weight is None:
            size = module.num_features if isinstance(module, PaddedLayerNorm) else module.normalized_shape[0]
            return [(torch.ones(size), 0)]
        return [(t, 0) for t in (module.weight, module.bias) if t is not None]
    if isinstance(module, nn.Embedding):  # a token table [vocab, C]: column c outputs channel c
        return [(module.weight, 1)]
    if is_group_norm(module):  # without affine, whole dead norm groups output zeros (_tied)
        return [(t, 0) for t in (module.weight, module.bias) if t is not None]
    if isinstance(module, _PER_CHANNEL_NORMS):
        if module.affine:
            return [(module.weight, 0), (module.bias, 0)]
        if module.running_mean is not None:
            return [(torch.ones(module.num_features), 0)]
    return []


def _composed(before: torch.Tensor | None, now: torch.Tensor, width: int) -> torch.Tensor:
    """A module's kept output channels, as indices of its original width, after one more removal kept ``now`` of
    its current ``width`` channels: a module in several groups' removals (a LayerNorm after a concatenation of
    two convolutions' outputs loses channels of each) keeps ``before[now]``."""
    return now if before is None or before.numel() != width else before[now]


def _remove_channels(model: nn.Module, inputs: tuple, report: dict, train_only: set[nn.Module],
                     multiple: int, layer_norm: str, narrowed: list[Narrowed]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, int]], list[Query]]:
    """Remove dead channels with torch-pruning, leaving each group an aligned width at ``multiple`` (dead
    channels beyond it stay, as zeros). A LayerNorm that lost channels becomes a :class:`PaddedLayerNorm`
    (``layer_norm: padded``, or where its kept channels are not known) or stays a plain LayerNorm over the kept
    ones (``kept``). Returns module name -> kept output channel indices, for those plain LayerNorms name ->
    (kept indices, channel dimension), and the query rows of the attentions whose heads narrowed (:data:`Query`);
    appends each group that narrowed to ``narrowed`` (:data:`Narrowed`)."""
    kept, queries = _remove_fused_qkv(model, inputs, report, train_only, multiple, narrowed)
    if narrowed:  # the trace below runs the forward: a head width stored in an attribute follows first
        with contextlib.suppress(Exception):
            _runs(model, inputs, narrowed)
    names = {module: name for name, module in model.named_modules()}
    candidates = [m for m in model.modules() if is_weight_layer(m) and bool(_zero_slices(m.weight, out_dim(m)).any())
                  or hidden_prunable(m) and bool(dead_hidden_units(m).any())]
    if not candidates:
        return kept, {}, queries
    norm_dims = channel_dims(model, inputs)
    widths = {m: m.normalized_shape[0] for m in norm_dims if isinstance(m, nn.LayerNorm)}
    try:
        dg = trace_graph(model, inputs, train_only)
    except UserError as exc:  # dead channels stay dense: exact, only larger
        for module in candidates:
            report["dead_channels_kept"][names[module]] = str(exc)
        return kept, {}, queries
    plans = []
    for module in candidates:
        if module not in dg.module2node:
            report["dead_channels_kept"][names[module]] = "the layer is not in the traced graph"
            continue
        pruner = dg.get_pruner_of_module(module)
        try:
            group = dg.get_pruning_group(module, pruner.prune_out_channels,
                                         list(range(pruner.get_out_channels(module))))
        except Exception as exc:  # noqa: BLE001 - torch-pruning's index mapping fails on some graphs
            report["dead_channels_kept"][names[module]] = mapping_failure(exc, model, dg)
            continue
        if any(module is plan_module or module in plan_members for plan_module, _, _, plan_members in plans):
            continue
        classes, reason = _group_plan(dg, group, names, norm_dims)
        if reason is not None:
            report["dead_channels_kept"][names[module]] = reason
            continue
        roots = _aligned_removal(classes, pruner.get_out_channels(module), multiple)
        dead = sum(len(c) for c in classes)
        if len(roots) < dead:
            report["dead_channels_kept"][names[module]] = (f"{dead - len(roots)} dead channel(s) kept for "
                                                           f"a width that is a multiple of {multiple}")
        members = {dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)}
        plans.append((module, pruner, roots, members))
    norm_groups: dict[nn.Module, tuple[torch.Tensor, int]] = {}  # group norm -> (group of each remaining
    # channel, channels per group), both of the norm as it was before pruning
    for module, pruner, roots, _ in plans:
        if not roots:
            continue
        group = dg.get_pruning_group(module, pruner.prune_out_channels, roots)
        block = max(len(item.idxs) // max(len(set(item.idxs)), 1) for item in group)  # group channels a position
        group._group = [_distinct(item) for item in group._group
                        if not _broadcast(item, dg, pruner.get_out_channels(module))]
        for dep, idxs in group:
            target = dep.target.module
            if is_group_norm(target):
                current, size = norm_groups.get(target, (channel_groups(target), group_size(target)))
                keep = torch.ones(current.numel(), dtype=torch.bool)
                keep[torch.tensor(sorted(set(idxs)), dtype=torch.long)] = False
                norm_groups[target] = current[keep], size
            if dg.is_out_channel_pruning_fn(dep.handler) and target in names:
                total = pruner_out_channels(dg, target)
                if total is not None:
                    keep = torch.ones(total, dtype=torch.bool)
                    keep[torch.tensor([i for i in idxs if i < total], dtype=torch.long)] = False
                    kept[names[target]] = _composed(kept.get(names[target]), torch.nonzero(keep).flatten(), total)
        query = _separate_query(dg, group, names)
        width = pruner.get_out_channels(module)
        narrowed.append((width, width - len(roots), {names[dep.target.module] for dep, _ in group
                                                     if dep.target.module in names}, query is not None, block))
        group.prune()
        if query is not None:
            writers, before = query
            queries.append((writers, writers[0].out_features, math.sqrt(writers[0].out_features / before)))
        report["removed_channels"][names[module]] = len(roots)
    for norm, (groups, size) in norm_groups.items():  # a GroupNorm that lost channels keeps its statistics
        parent, _, attr = names[norm].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, compact_group_norm(norm, groups, size))
    plain = {}
    for norm, width in widths.items():  # a LayerNorm that lost channels: statistics over all of them, or the kept
        if norm.normalized_shape[0] == width:
            continue
        name = names[norm]
        if layer_norm == "kept" and name in kept:
            plain[name] = (kept[name], norm_dims[norm])
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, padded(norm, width, norm_dims[norm]))
    return kept, plain, queries


#: a channel group that narrowed: (its width before, after, the names of the layers it couples, whether they look
#: like an attention's query / key / value projections, the channels of each of its tie classes)
Narrowed = tuple[int, int, set[str], bool, int]


def _scope(names: set[str]) -> str:
    """The name of the smallest module holding every module of ``names`` and not one of them ("" for the
    model)."""
    parts = [name.split(".") for name in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    scope = ".".join(common)
    return scope.rpartition(".")[0] if scope in names else scope


#: attribute names under which attention modules commonly store their head count (timm, Hugging Face, torch)
HEAD_ATTRIBUTES = ("num_heads", "heads", "n_heads", "n_head", "nhead", "num_attention_heads")


#: a candidate of :func:`width_attributes`: ((module name, attribute), (value before, after), the index of its
#: group in the narrowed groups)
WidthAttribute = tuple[tuple[str, str], tuple[int, int], int]


def width_attributes(model: nn.Module, narrowed: list[Narrowed]) -> list[WidthAttribute]:
    """The int attributes of ``model``'s modules that may hold a narrowed group's width, a channel count its
    forward writes into a shape (torchvision's ``VisionTransformer.hidden_dim`` in ``x.reshape(n,
    self.hidden_dim, -1)``; an attention's head width, ``view(B, N, self.num_heads, self.head_size)``), as
    :data:`WidthAttribute`; those of the groups whose layers sit under the smallest module first (a block's own
    width before the stream's that feeds it), widths before head widths. Candidates are the public int attributes
    that hold a group's width or, for an attention's projections, its head width (:func:`_widths_held`), of the
    modules under the smallest one holding the group's layers, and of types :mod:`autocompress.architecture` does
    not describe (a Linear's ``in_features`` is torch-pruning's to update)."""
    modules = dict(model.named_modules())
    found = []
    for group, (before, after, members, attention, block) in enumerate(narrowed):
        scope = _scope(members)
        depth = -(scope.count(".") + 1 if scope else 0)
        for name, module in modules.items():
            if (scope and name != scope and not name.startswith(scope + ".")) or describable(module):
                continue
            found += [(depth, head, (name, attr), widths, group)
                      for attr, widths, head in _widths_held(module, before, after, attention, block)]
    return [(key, widths, group) for _, _, key, widths, group in sorted(set(found))]


def _widths_held(module: nn.Module, before: int, after: int, heads: bool,
                 block: int = 1) -> list[tuple[str, tuple[int, int], bool]]:
    """``module``'s public int attributes that hold a group's width (equal to ``before``: -> ``after``), its count of
    tie classes of ``block`` channels each (a Linear's rows viewed as ``before / block`` channels of a map,
    ``view(N, self.channels, 7, 7)``: -> ``after / block``) or, with ``heads`` (an attention's projections), its
    head width (times another of them, a head count ``h``, equal to ``before``: -> ``after / h``, where whole; never
    a head count named as one, :data:`HEAD_ATTRIBUTES`: narrower heads keep their count), with whether it is the
    last."""
    ints = {k: v for k, v in vars(module).items() if not k.startswith("_") and type(v) is int}
    held = [(attr, (before, after), False) for attr, value in ints.items() if value == before]
    if block > 1:
        held += [(attr, (value, after // block), False) for attr, value in ints.items() if value * block == before]
    return held + [(attr, (value, after // count), True) for attr, value in ints.items() for count in set(ints.values())
                   if heads and attr not in HEAD_ATTRIBUTES and 1 < count < before and value * count == before
                   and after % count == 0]


def _set_attributes(model: nn.Module, attributes: dict[tuple[str, str], tuple[int, int]], index: int) -> None:
    """Set each attribute of :func:`width_attributes` to its value before (``index`` 0) or after (1)."""
    for (name, attr), widths in attributes.items():
        setattr(model.get_submodule(name) if name else model, attr, widths[index])


def _patches(candidates: list[WidthAttribute]) -> list[dict[tuple[str, str], tuple[int, int]]]:
    """The sets of :func:`width_attributes` candidates :func:`_runs` tries, in order: each alone; those of every
    group together (the first candidate of each attribute: several attentions' whole and head widths at once,
    Hugging Face's ``all_head_size`` and ``attention_head_size`` in every layer); those of every group but one, for
    each group (a stream as wide as an attention whose heads kept their width offers that attention's whole width
    its own new width)."""
    def together(groups: set[int]) -> dict[tuple[str, str], tuple[int, int]]:
        return dict(reversed([(key, value) for key, value, group in candidates if group in groups]))

    groups = {group for _, _, group in candidates}
    tries = [{key: value} for key, value, _ in candidates]
    for patch in [together(groups)] + [together(groups - {left}) for left in sorted(groups)]:
        if len(patch) > 1 and patch not in tries:
            tries.append(patch)
    return tries


def _runs(model: nn.Module, inputs: tuple, narrowed: list[Narrowed]) -> dict[nn.Module, int]:
    """:func:`_called_modules` of the compact ``model``, as it is and, where its forward raises, with candidate
    width attributes of the ``narrowed`` groups (:func:`width_attributes`) set to the narrowed widths
    (:func:`_patches`; the check against the masked model follows); those that made it run stay set and are marked
    (:func:`autocompress.architecture.mark_width_attribute`). Raises what the first forward raised when no try
    runs."""
    try:
        return _called_modules(model, inputs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the caller's forward may raise anything on the old width
        first = exc
    for patch in _patches(width_attributes(model, narrowed)):
        _set_attributes(model, patch, 1)
        called = _called(model, inputs)
        if called is None:
            _set_attributes(model, patch, 0)
            continue
        for key in list(patch) if len(patch) > 1 else []:  # only those needed stay set
            _set_attributes(model, {key: patch[key]}, 0)
            without = _called(model, inputs)
            if without is None:
                _set_attributes(model, {key: patch[key]}, 1)  # back to the set ``called`` ran with
            else:
                called = without
                del patch[key]
        for name, attr in patch:
            mark_width_attribute(model.get_submodule(name) if name else model, attr)
        return called
    raise first


def _called(model: nn.Module, inputs: tuple) -> dict[nn.Module, int] | None:
    """:func:`_called_modules`, or None when the forward raises (a UserError propagates)."""
    try:
        return _called_modules(model, inputs)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - the caller's forward may raise anything on the old width
        return None


#: the query rows of an attention whose heads narrowed: (the Linears that may write them, the rows from the first,
#: the factor ``sqrt(new head width / old)`` that keeps a scale following the head width
#: (``F.scaled_dot_product_attention`` without ``scale=``) at the old width's value: ``q . k / sqrt(d')`` times
#: it is ``q . k / sqrt(d)``). A fused qkv has one candidate (its first third); separate projections two, the first
#: two of q, k and v in module order: one of them writes the queries or the keys (scaling either scales the scores)
Query = tuple[tuple[nn.Linear, ...], int, float]


def _separate_query(dg: tp.DependencyGraph, group, names: dict) -> tuple[tuple[nn.Linear, ...], int] | None:
    """For a torch-pruning group that looks like an attention's separate projections (two or three Linears of equal
    width writing its channels -- q, k and v -- and one Linear reading them), the first two of them in the model's
    order (``names``: module -> name, in that order) and their width before pruning; else None."""
    writers, readers = set(), set()
    for dep, _ in group:
        target = dep.target.module
        if is_weight_layer(target):
            (writers if dg.is_out_channel_pruning_fn(dep.handler) else readers).add(target)
    if not (2 <= len(writers) <= 3 and len(readers) == 1) or any(type(m) is not nn.Linear for m in writers | readers):
        return None
    order = {module: i for i, module in enumerate(names)}
    ordered = sorted(writers, key=order.__getitem__)
    return (tuple(ordered[:2]), ordered[0].out_features) if len({m.out_features for m in writers}) == 1 else None


def _rescaled(reference: nn.Module, work: nn.Module, inputs: tuple, queries: list[Query], atol_scale: float,
              kept: dict) -> tuple[float, float, list[nn.Linear]]:
    """Verify ``work`` with the query rows of the attentions whose scale follows the head width multiplied by
    their factor (:data:`Query`). Which attentions those are is not known: one whose scale is stored at the old
    width (``self.scale``, :class:`~autocompress.multihead.SplitMultiheadAttention`) must keep its rows, and a ``v``
    defined before ``q`` and ``k`` makes the second candidate the one. So each attention in turn (twice over) takes
    the option -- its own rows or one candidate rescaled -- under which the model's output differs least from the
    reference's, the others as chosen so far. ``work`` keeps the chosen rows. Returns :func:`verify`'s result and
    the Linears rescaled; raises what :func:`verify` raises."""
    original = {id(m): _rows(m) for candidates, _, _ in queries for m in candidates}
    choice: list[nn.Linear | None] = [None] * len(queries)
    for _ in range(2):
        for index, (candidates, rows, factor) in enumerate(queries):
            tried = []
            for option in (None, *candidates):
                for module in candidates:
                    _set_rows(module, original[id(module)], rows, factor if module is option else 1.0)
                tried.append((_difference(reference, work, inputs), option))
            choice[index] = min(tried, key=lambda item: item[0])[1]
            for module in candidates:
                _set_rows(module, original[id(module)], rows, factor if module is choice[index] else 1.0)
    return (*verify(reference, work, inputs, atol_scale=atol_scale, kept=kept), [m for m in choice if m is not None])


def _rows(module: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight.detach().clone(), None if module.bias is None else module.bias.detach().clone()


def _set_rows(module: nn.Linear, saved: tuple[torch.Tensor, torch.Tensor | None], rows: int, factor: float) -> None:
    """``module``'s weight and bias as ``saved``, their first ``rows`` rows times ``factor``."""
    with torch.no_grad():
        for param, value in zip((module.weight, module.bias), saved):
            if param is not None:
                param.copy_(value)
                param[:rows].mul_(factor)


def _dead_triples(module: nn.Module) -> torch.Tensor | None:
    """bool [D]: the channels ``c`` whose rows ``c``, ``D + c`` and ``2 D + c`` (and bias entries) are all zero in a
    Linear of ``3 D`` outputs (a fused query-key-value projection, :func:`autocompress.space.fused_qkv_width`); None
    for other layers or when none is."""
    if fused_qkv_width(module) is None:
        return None
    zero = _zero_slices(module.weight, 0)
    if module.bias is not None:
        zero &= _zero_slices(module.bias, 0)
    dead = zero.view(3, -1).all(0)
    return dead if bool(dead.any()) else None


def _remove_fused_qkv(model: nn.Module, inputs: tuple, report: dict, train_only: set[nn.Module],
                      multiple: int, narrowed: list[Narrowed]) -> tuple[dict[str, torch.Tensor], list[Query]]:
    """Remove the dead channels of fused query-key-value projections (a Linear of ``3 D`` outputs read by one
    Linear of ``D`` inputs, :func:`autocompress.space.fused_qkv_output`): rows ``c``, ``D + c``,
    ``2 D + c`` of the projection and input ``c`` of its consumer, where the rows are all zero and the remaining
    width is an allowed width at ``multiple``. torch-pruning's graph maps these channels unevenly, so they are
    sliced here. Returns the projection's name -> its kept rows, and the query rows of each (the first third);
    appends each to ``narrowed`` (:data:`Narrowed`: the width of q, k and v each)."""
    dead = {m: d for m in model.modules() if (d := _dead_triples(m)) is not None}
    if not dead:
        return {}, []
    names = {module: name for name, module in model.named_modules()}
    try:
        dg = trace_graph(model, inputs, train_only)
    except UserError:  # torch-pruning's pass reports it
        return {}, []
    kept, queries = {}, []
    for module, gone in dead.items():
        width = module.out_features // 3
        out = _qkv_output(dg, module)
        remaining = width - int(gone.sum())
        if out is None or not remaining or not is_aligned(remaining, width, multiple):
            why = ("no single Linear of its width reads it" if out is None else "every channel is zero" if not remaining
                   else f"{int(gone.sum())} dead channel(s) kept for a width that is a multiple of {multiple}")
            report["dead_channels_kept"][names[module]] = why
            continue
        rows = (~gone).repeat(3)
        module.weight = nn.Parameter(module.weight.detach()[rows], requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.detach()[rows], requires_grad=module.bias.requires_grad)
        module.out_features = 3 * remaining
        out.weight = nn.Parameter(out.weight.detach()[:, ~gone], requires_grad=out.weight.requires_grad)
        out.in_features = remaining
        kept[names[module]] = torch.nonzero(rows).flatten()
        narrowed.append((width, remaining, {names[module], names[out]}, True, 1))
        queries.append(((module,), remaining, math.sqrt(remaining / width)))
        report["removed_channels"][names[module]] = width - remaining
    return kept, queries


def _qkv_output(dg: tp.DependencyGraph, module: nn.Linear) -> nn.Linear | None:
    """:func:`autocompress.space.fused_qkv_output` of ``module`` on ``dg``: its output projection, or None."""
    try:
        group = dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels,
                                     list(range(module.out_features)))
    except Exception:  # noqa: BLE001 - torch-pruning's index mapping fails on some graphs
        return None
    return fused_qkv_output(module, group)


def _aligned_removal(classes: list[list[int]], size: int, multiple: int) -> list[int]:
    """The dead channels (tie classes of root indices) to remove from a group of ``size`` so that its width
    stays an allowed width at ``multiple`` (:func:`autocompress.alignment.is_aligned`): as many whole classes
    as allow it, the last ones kept first; sorted root indices."""
    classes = list(classes)
    while classes and not is_aligned(size - sum(len(c) for c in classes), size, multiple):
        classes.pop()
    return sorted(c for cls in classes for c in cls)


def pruner_out_channels(dg: tp.DependencyGraph, module: nn.Module) -> int | None:
    """Output channels of ``module`` as torch-pruning sees them (None for shape-free ops)."""
    pruner = dg.get_pruner_of_module(module)
    return None if pruner is None else pruner.get_out_channels(module)


def _compact_columns(model: nn.Module, called: set[nn.Module], report: dict,
                     param_masks: dict[str, torch.Tensor]) -> None:
    """Replace Conv2d / Linear layers that have all-zero GEMM columns by ColumnConv2d / ColumnLinear. A layer
    whose every weight is zero (e.g. a zero-initialised head) keeps the columns its mask keeps, if any."""
    for name, module in list(model.named_modules()):
        if type(module) not in (*CONV_LAYERS.values(), nn.Linear) or module not in called or (
                is_transposed(module) and module.groups > 1):
            continue
        gemm = gemm_matrix(module)
        nonzero = (gemm != 0).any(dim=0)
        kept = torch.nonzero(nonzero).flatten().cpu()
        if kept.numel() == gemm.shape[1]:
            continue
        mask = param_masks.get(f"{name}.weight")
        if kept.numel() == 0 and mask is not None and tuple(mask.shape) == tuple(module.weight.shape):
            grid = mask.transpose(0, 1) if is_transposed(module) else mask
            kept = torch.nonzero(grid.reshape(grid.shape[0], -1).any(dim=0)).flatten().cpu()
        if kept.numel() in (0, gemm.shape[1]):  # a zero-initialised head without a mask: the dense layer is exact
            report["dead_channels_kept"][name] = "every weight is zero; the layer stays dense"
            continue
        if isinstance(module, nn.Conv2d):
            replacement: nn.Module = ColumnConv2d.from_conv(module, kept)
        elif isinstance(module, nn.modules.conv._ConvNd):
            replacement = ColumnConvNd.from_conv(module, kept)
        else:
            replacement = ColumnLinear.from_linear(module, kept)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement)
        report["column_layers"][name] = [int(kept.numel()), int(gemm.shape[1])]


def _keep_frozen(compact_model: nn.Module, original: nn.Module) -> None:
    """Give every parameter of the compact model the ``requires_grad`` of the same-named parameter of the
    original (torch-pruning and the column layers create fresh, trainable parameters)."""
    flags = {name: p.requires_grad for name, p in original.named_parameters()}
    for name, p in compact_model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _random_like(inputs: tuple, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return tuple(random_like(t, t.shape[0], generator) if isinstance(t, torch.Tensor) and t.dim() else t
                 for t in inputs)


def _layer_outputs(model: nn.Module, inputs: tuple) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    hooks = {}
    for name, module in model.named_modules():
        if name and not list(module.children()):
            def hook(_module, _inputs, output, name=name):
                if isinstance(output, torch.Tensor) and name not in outputs:
                    outputs[name] = output
            hooks[module] = hook
    hooked_forward(model, inputs, hooks)
    return outputs


def _kept_channels(output: torch.Tensor, shape: torch.Size, kept: torch.Tensor) -> torch.Tensor | None:
    """``output`` (a layer's output in the masked model) at the ``kept`` channels of the one dimension in which
    it differs from ``shape`` (the compact layer's output) by exactly that many channels: dimension 1 of a conv,
    the last of a Linear or of a LayerNorm on channels-last data; None when no single dimension fits."""
    if output.dim() != len(shape):
        return None
    differ = [d for d in range(output.dim()) if output.shape[d] != shape[d]]
    if len(differ) != 1 or shape[differ[0]] != kept.numel():
        return None
    return output.index_select(differ[0], kept.to(output.device))


def _first_divergence(reference: nn.Module, compact: nn.Module, inputs: tuple, kept: dict,
                      atol_scale: float) -> str | None:
    """Name of the first layer (in the reference's execution order) whose output differs."""
    ref_out, new_out = _layer_outputs(reference, inputs), _layer_outputs(compact, inputs)
    for name, ref in ref_out.items():
        new = new_out.get(name)
        if new is None:
            continue
        if name in kept and new.shape != ref.shape:
            ref = _kept_channels(ref, new.shape, kept[name])
        if ref is None or new.shape != ref.shape:
            continue
        if float((new - ref).abs().max()) > atol_scale * max(1.0, float(ref.abs().max())):
            return name
    return None


def _output_difference(reference: nn.Module, compact_model: nn.Module, batch: tuple) -> tuple[float, float]:
    """The largest absolute difference of the two models' outputs on ``batch`` (eval mode, no grad; NaN stays NaN)
    and the largest ``|reference output|`` (at least 1). Raises RuntimeError when the output shapes differ."""
    with analysis_mode(reference), analysis_mode(compact_model):
        ref, new = output_tensors(reference(*batch)), output_tensors(compact_model(*batch))
    if [tuple(t.shape) for t in ref] != [tuple(t.shape) for t in new]:
        raise RuntimeError(f"compact model output shapes {[tuple(t.shape) for t in new]} differ from the "
                           f"masked model's {[tuple(t.shape) for t in ref]}")
    scale = max([1.0] + [float(t.abs().max()) for t in ref if t.numel()])
    return max([0.0] + [float((a - b).abs().max()) for a, b in zip(ref, new) if a.numel()]), scale


def _exact_difference(reference: nn.Module, compact_model: nn.Module, batch: tuple,
                      atol_scale: float) -> tuple[float, float]:
    """:func:`_output_difference` on ``batch``, in float64 where the float32 one exceeds ``atol_scale`` of the scale.
    A compact layer sums fewer terms, in another order, with other kernels: its float32 rounding differs from the
    masked layer's and grows with depth (up to 4e-5 of the output's scale after torchvision's regnet_x_400mf and
    resnext50_32x4d at random initialisation); in float64 that is ~1e-12, while a structural error stays at the
    scale of the output. The float32 result where the models do not run in float64 (an op without it, a forward
    that casts its inputs)."""
    diff, scale = _output_difference(reference, compact_model, batch)
    if diff <= atol_scale * scale:
        return diff, scale
    try:
        wide = [copy.deepcopy(model).double() for model in (reference, compact_model)]
        return _output_difference(*wide, tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                               else t for t in batch))
    except Exception:  # noqa: BLE001 - no float64 forward: the float32 difference decides
        return diff, scale


def _difference(reference: nn.Module, compact_model: nn.Module, inputs: tuple) -> float:
    """The largest output difference relative to the output's scale, on ``inputs`` and :func:`verify`'s random
    batch (NaN counts as infinite)."""
    worst = 0.0
    for batch in (inputs, _random_like(inputs)):
        diff, scale = _output_difference(reference, compact_model, batch)
        worst = max(worst, diff / scale if diff == diff else math.inf)
    return worst


def verify(reference: nn.Module, compact_model: nn.Module, example_inputs: Any, *, atol_scale: float = 1e-5,
           kept: dict | None = None) -> tuple[float, float]:
    """Check ``compact_model`` computes what ``reference`` computes in eval mode, on ``example_inputs`` and
    on a seeded random batch of the same shape (in float64 where float32 rounding exceeds the tolerance:
    :func:`_exact_difference`).

    Returns ``(max abs difference, tolerance)`` with tolerance ``atol_scale * max(1, max|reference(x)|)``.
    Raises RuntimeError naming the first diverging layer when the difference exceeds the tolerance.
    """
    inputs = _as_tuple(example_inputs)
    worst, worst_tol = 0.0, 0.0
    for batch in (inputs, _random_like(inputs)):
        diff, scale = _exact_difference(reference, compact_model, batch, atol_scale)
        tol = atol_scale * scale
        if diff > tol or diff != diff:
            layer = _first_divergence(reference, compact_model, batch, kept or {}, atol_scale)
            raise RuntimeError(f"compact model differs from the masked one by {diff:.3g} (tolerance {tol:.3g})"
                               + (f" from layer {layer!r} on" if layer else "")
                               + ": a module before it mixes channels, has f(0) != 0 or branches on a channel count")
        if diff >= worst:
            worst, worst_tol = diff, tol
    return worst, worst_tol


#: how :func:`compaction_failure` begins when the compact model runs on the example inputs but not in the loss
TRAINING_BREAKS = "the loss fails on a training batch, whose forward reaches what the example inputs' does not"

#: how :func:`compaction_failure` begins when compaction runs but keeps the channels the masks removed
DEAD_KEPT = "compaction keeps them as zeros"


def compaction_failure(model: nn.Module, param_masks: dict[str, torch.Tensor], example_inputs: Any, *,
                       channel_multiple: int = 1, narrowed: Collection[str] = (),
                       training_forward: Callable[[nn.Module], Any] | None = None) -> str | None:
    """Why ``model`` masked to ``param_masks`` cannot be compacted and run on ``example_inputs`` (the error's type
    and first line), or on a training batch by ``training_forward(compact_model)`` (the run's loss: a branch the
    example's forward does not take, e.g. a head called only with a keyword argument), or why a layer of
    ``narrowed`` (names of layers whose output channels the masks may remove) whose weight's mask removes a row
    keeps them all (:data:`DEAD_KEPT`, with the report's ``dead_channels_kept`` reason: the compact model would be
    no smaller there), or None; a copy is compacted, ``model`` is unchanged. A UserError (a problem of the inputs,
    not of the model) propagates."""
    try:
        result = compact(model, param_masks, example_inputs, channel_multiple=channel_multiple)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's forward may raise anything
        return first_line(exc)
    if training_forward is not None:
        try:
            with analysis_mode(result.model):
                training_forward(result.model)
        except Exception as exc:  # noqa: BLE001 - the user's loss may raise anything
            return f"{TRAINING_BREAKS}: {first_line(exc)}"
    before, after = dict(model.named_modules()), dict(result.model.named_modules())
    why = [f"{name}: {result.report['dead_channels_kept'].get(name, 'no reason reported')}" for name in narrowed
           if name in after and _out_width(after[name]) == _out_width(before[name])
           and _rows_removed(before[name], param_masks.get(f"{name}.{_rows_weight(before[name])}"))]
    return f"{DEAD_KEPT} ({'; '.join(why)})" if why else None


def _out_width(layer: nn.Module) -> int:
    """Output channels of a Conv / Linear, hidden units of a recurrent layer."""
    return int(layer.hidden_size if isinstance(layer, nn.RNNBase) else layer.weight.shape[out_dim(layer)])


def _rows_weight(layer: nn.Module) -> str:
    """The weight of ``layer`` whose rows are its output channels (a recurrent layer's: its first recurrent
    weight, gate rows of each unit)."""
    return "weight_hh_l0" if isinstance(layer, nn.RNNBase) else "weight"


def _rows_removed(layer: nn.Module, mask: torch.Tensor | None) -> bool:
    """Whether ``mask`` (of ``layer``'s weight; None: nothing masked) removes a whole output channel: a branch of
    a concatenation may keep all of its own while the group loses others."""
    return mask is not None and not bool(mask.movedim(out_dim(layer), 0).flatten(1).any(1).all())


def check_compactable(model: nn.Module, param_masks: dict[str, torch.Tensor], example_inputs: Any, *,
                      channel_multiple: int = 1, narrowed: Collection[str] = (),
                      training_forward: Callable[[nn.Module], Any] | None = None) -> None:
    """UserError, meant for before any training, when ``model`` masked to ``param_masks`` cannot be compacted
    and run on ``example_inputs``, or keeps channels ``narrowed`` layers lose (:func:`compaction_failure`;
    a copy is compacted; ``model`` is unchanged). A forward that writes a channel count into a shape
    (``x.view(-1, 40 * 7 * 7)``), or splits channels by position (``chunk`` / ``split``) after a concatenation
    whose parts lose channels unevenly, runs masked but fails once channels are removed, which would otherwise
    surface after training."""
    failure = compaction_failure(model, param_masks, example_inputs, channel_multiple=channel_multiple,
                                 narrowed=narrowed, training_forward=training_forward)
    if failure is None:
        return
    problem = "filter pruning cannot remove channels from this model: "
    if failure.startswith(DEAD_KEPT):
        raise UserError(problem + failure, "put those layers in ignored_layers, or leave filter out of dims")
    raise UserError(f"{problem}its forward fails once they are removed ({failure})",
                    f"{BREAKS_FIX}, or leave filter out of dims") from None


def compact(model: nn.Module, param_masks: dict[str, torch.Tensor], example_inputs: Any, *,
            atol_scale: float = 1e-5, channel_multiple: int = 1, layer_norm: str = "padded",
            check_rebuild: bool = True) -> CompactResult:
    """Physically remove masked filters / channels and columns (AutoCompress, Liu et al. AAAI 2020, §3).

    Args:
        model: the model (not modified; a deep copy is compacted).
        param_masks: parameter name -> BoolTensor of the parameter's shape, True = kept (e.g.
            ``PruningSpace.param_masks(masks)``). Masks are applied to the copy first, so the result
            computes the *masked* model.
        example_inputs: a tensor or tuple of tensors, e.g. ``[N, 3, 32, 32]``, for tracing and checking.
        atol_scale: output tolerance relative to ``max(1, max|masked(x)|)``.
        channel_multiple: a group's remaining width stays an allowed width at this multiple
            (:mod:`autocompress.alignment`): dead channels beyond it stay as zero channels (reported under
            ``dead_channels_kept``).
        layer_norm: ``"padded"``: a LayerNorm that lost channels keeps its statistics over all of them
            (:class:`autocompress.padded_norm.PaddedLayerNorm`, exactly the masked model); ``"kept"``: it stays a
            plain LayerNorm over the kept channels, and the check compares with the masked model whose such
            LayerNorms normalise over their kept channels alone (:func:`autocompress.padded_norm.kept_statistics`;
            their names in the report's ``layer_norms_over_kept``). For a model about to be retrained
            (:func:`shrink`), never for a trained one.
        check_rebuild: also check that the model rebuilt from the result's ``architecture`` (as
            ``autocompress.load`` rebuilds a saved file) computes the same (a deep copy and one more forward:
            15-37 % of a call on torchvision's resnet18 / mobilenet_v2 / resnet50); off for a model that is
            trained or measured, never saved (:func:`shrink`).

    Steps: (a) channels whose producers' rows, biases and normalisation affine entries are all zero are
    removed with torch-pruning, coupled groups together (a fused qkv projection's channels are sliced here:
    :func:`autocompress.space.PruningSpace` groups them itself), and where the compact forward then fails, int
    attributes holding a narrowed width follow it (:func:`width_attributes`; named in the report's
    ``width_attributes``); (b) Conv2d / Linear layers with all-zero GEMM
    columns become :class:`ColumnConv2d` / :class:`ColumnLinear`; (c) remaining (irregular) zeros stay
    dense. Finally the result is checked in eval mode against the masked model on ``example_inputs`` and a
    seeded random batch; where it differs and attention heads narrowed, the queries are scaled by
    ``sqrt(new head width / old)`` (a scale that follows the head width, ``F.scaled_dot_product_attention`` without
    ``scale=``) and checked again (``queries_rescaled`` in the report).

    Returns:
        :class:`CompactResult` (model in eval mode).

    Raises:
        UserError: masks that do not fit the model, inconsistent masks (a pruned filter whose coupled
            BatchNorm / bias is not zero), a layer pruned to zero units, or a structure that cannot lose
            channels exactly (see ``dead_channels_kept``; untraceable models): the message names
            the module and the fix (exclude it via ignored layers).
        RuntimeError: the compact model's output differs from the masked model's by more than the
            tolerance (names the first diverging layer), or the rebuilt one's from it (``check_rebuild``).
    """
    inputs = _as_tuple(example_inputs)
    reference = copy.deepcopy(model)
    _apply_masks(reference, param_masks)
    reference.eval()
    work = copy.deepcopy(reference)
    report: dict[str, Any] = {"params_before": _count(model), "removed_channels": {}, "column_layers": {},
                              "dead_channels_kept": {}}
    train_only = train_only_modules(work, inputs)
    narrowed: list[Narrowed] = []
    kept, plain, queries = _remove_channels(work, inputs, report, train_only, channel_multiple, layer_norm, narrowed)
    report["layer_norms_over_kept"] = sorted(plain)
    work.eval()
    called = _runs(work, inputs, narrowed)
    held = width_attribute_values(work)
    if held:
        report["width_attributes"] = {f"{name}.{attr}" if name else attr: value
                                      for name, values in held.items() for attr, value in values.items()}
    names = {module: name for name, module in work.named_modules()}
    _compact_columns(work, set(called) | train_only, report, param_masks)
    queries = [(tuple(work.get_submodule(names[m]) for m in writers), rows, factor)  # column layers replaced some
               for writers, rows, factor in queries]
    _keep_frozen(work, model)
    work.eval()
    with kept_statistics(reference, plain):
        try:
            report["max_abs_diff"], report["tolerance"] = verify(reference, work, inputs, atol_scale=atol_scale,
                                                                 kept=kept)
        except RuntimeError:
            if not queries:
                raise
            # the scale follows the head width (F.scaled_dot_product_attention without scale=)
            *check, rescaled = _rescaled(reference, work, inputs, queries, atol_scale, kept)
            report["max_abs_diff"], report["tolerance"] = check
            report["queries_rescaled"] = sorted(name for name, module in work.named_modules()
                                                if any(module is query for query in rescaled))
    report["params_after"] = _count(work)
    architecture = describe_architecture(work, reference=model)
    if check_rebuild:
        _check_rebuilds(model, work, architecture, inputs, atol_scale)
    return CompactResult(model=work, architecture=architecture, report=report)


def _check_rebuilds(model: nn.Module, compact_model: nn.Module, architecture: dict, inputs: tuple,
                    atol_scale: float) -> None:
    """RuntimeError unless a copy of ``model`` rebuilt from ``architecture`` (:func:`~autocompress.architecture.
    apply_architecture`, as ``autocompress.load`` rebuilds a saved file) and given ``compact_model``'s weights
    computes its outputs on ``inputs`` (within :func:`verify`'s tolerance, ``atol_scale`` of their scale): a
    narrowed module of a type the description does not cover, whose constructor argument (a feature count its
    forward checks) only its parameters' shapes would record, would otherwise be saved into a file that loads
    broken."""
    try:
        rebuilt = apply_architecture(copy.deepcopy(model), architecture)
        rebuilt.load_state_dict(compact_model.state_dict())
        diff, scale = _output_difference(compact_model, rebuilt, inputs)
    except Exception as exc:  # noqa: BLE001 - the rebuilt model's forward may raise anything
        raise RuntimeError(f"the compact model rebuilt from its saved description fails ({first_line(exc)})"
                           ) from None
    if not diff <= atol_scale * scale:
        raise RuntimeError(f"the compact model rebuilt from its saved description differs by {diff:.3g}")


def shrink(model: nn.Module, param_masks: dict[str, torch.Tensor], example_inputs: Any, *,
           channel_multiple: int = 1, layer_norm: str = "padded") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The masked ``model`` as a smaller one to train: compacted (:func:`compact`: pruned filters / channels
    physically gone) and densified (:func:`densify`: pruned columns and weights still there as zeros), in
    ``model``'s train / eval mode, with the masks of those zeros (every parameter of 2+ dimensions: True where
    non-zero). Same function (with ``layer_norm: kept``, LayerNorms that lost channels normalise over the kept
    ones from now on), fewer MACs per training step; deterministic. Raises what :func:`compact` raises."""
    small = densify(compact(model, param_masks, example_inputs, channel_multiple=channel_multiple,
                            layer_norm=layer_norm, check_rebuild=False).model)
    small.train(model.training)
    return small, {name: p.detach() != 0 for name, p in small.named_parameters() if p.dim() >= 2}


__all__ = ["ColumnConv2d", "ColumnConvNd", "ColumnLinear", "CompactResult", "DENSE_DENSITY_THRESHOLD",
           "GEMM_MIN_FILTERS", "compact", "shrink", "verify"]
