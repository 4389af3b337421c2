"""The pruning space of a model: which filters, columns and weights can be removed, and what they cost.

:meth:`PruningSpace.build` enumerates three kinds of pruning units (brief §2; AutoCompress, Liu et al.
AAAI 2020, §"hybrid structured pruning"):

* **filter groups** (:class:`FilterGroup`) — output channels coupled through residual additions,
  concatenation, depthwise convolutions, normalisation layers, per-channel parameters and Flatten ->
  Linear, found with torch-pruning's ``DependencyGraph`` (Fang et al., "DepGraph", CVPR 2023; see
  :func:`trace_graph`: frozen layers and train-only branches are traced too). One group per coupled set;
  its name is its root module, the first Conv / Linear of the set in ``named_modules`` order, and its
  channels are the root's output channels. A rate applies once per group. Conv1d / Conv2d / Conv3d,
  ConvTranspose1d/2d/3d (output channels on weight dim 1) and Linear layers take part. A one-channel
  gate multiplied over all channels broadcasts and does not couple. A grouped convolution ties the channels
  at the same position of each of its conv groups (:attr:`FilterGroup.ties`); a LayerNorm over the channels
  couples like a BatchNorm (compaction makes it a :class:`autocompress.padded_norm.PaddedLayerNorm`), and
  so does a GroupNorm with affine parameters (a :class:`autocompress.padded_norm.PaddedGroupNorm`); a
  GroupNorm without them ties the channels of each of its groups (whole groups leave); two channels that reach
  one channel of one tensor by two paths are tied (a ghost module's ``cat([a, depthwise(a)])``,
  :func:`_reached_twice`).
* **column layers** (:class:`ColumnLayer`) — every Conv / Linear weight in the GEMM view
  ``[F, C/groups * prod(k)]`` (Linear: ``[out, in]``; transposed convs: ``weight.transpose(0, 1)``); a
  column is one (input channel, kernel position) across all filters.
* **irregular layers** (:class:`IrregularLayer`) — every prunable weight, element by element.

What cannot be pruned safely is excluded by module name with a logged reason (:attr:`PruningSpace.excluded`,
listed in docs/SUPPORT.md): the classifier's output units (any group reaching the model output), grouped
convolutions that also read other groups' channels, LayerNorms whose channel dimension is unknown,
a GroupNorm without affine parameters that has one group, modules the forward never reaches
(eval or train mode), user-ignored modules, and any group whose channel mapping the build cannot verify.
Verification: one analysis forward with a seeded random half of every group's channels removed; every
input slice the group assigns to a consumer must then be constant across samples (it reads nothing but
removed channels), otherwise torch-pruning mapped it wrongly (e.g. through a channel shuffle). A group whose
channels a weight reads functionally (its module never called, :func:`_functionally_read`) and a group
whose index mapping explodes (:class:`ChannelMappingExplodes`) are excluded too. A model
torch-pruning cannot trace has no filter groups (the reason is under the name ``""``);
:meth:`PruningSpace.check_dims` refuses a requested kind without units before any work.

Masks (:class:`autocompress.masks.Masks`) select kept units; :meth:`PruningSpace.param_masks` expands them
to every affected parameter and :meth:`PruningSpace.count` gives the parameters and MACs the physically
compacted model has (MACs from :mod:`autocompress.metrics`, i.e. ``torch.utils.flop_counter``).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Collection, Iterable, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch_pruning import ops
from torch_pruning.dependency.index_mapping import _ConcatIndexMapping, _FlattenIndexMapping
from torch_pruning.dependency.shape_infer import infer_in_channels_recursively, infer_out_channels_recursively
from torch_pruning._helpers import _HybridIndex

from .alignment import align_up, aligned_keep, allowed_widths
from .analysis import hooked_forward, output_tensors, preserved_state, random_like
from .columns import executed_columns, gemm_possible
from .errors import SettingError, UserError, show
from .masks import Masks
from .metrics import layer_table
from .padded_norm import PaddedLayerNorm, channel_dims, channel_groups, is_group_norm, is_layer_norm, pruners
from .recurrent import (PRUNERS as RECURRENT_PRUNERS, RECURRENT_FOLLOWED, directions, follows_input, hidden_entries,
                        hidden_prunable, hidden_ties, input_weights, is_recurrent_param, one_node)

log = logging.getLogger(__name__)

KINDS = ("filter", "column", "irregular")

#: slice roles: conv / linear weight rows of the group's channels ("weight"), their bias ("bias"),
#: per-channel normalisation / PReLU / free parameters ("norm"), consumer input slices ("input")
ROLES = ("weight", "bias", "norm", "input")

_PROBE_SEED = 0  # seed of the verification forward's random inputs


def removed_count(size: int, rate: float) -> int:
    """Units a rate asks to remove: ``round(rate * size)``, halves rounded up (``floor(x + 0.5)``)."""
    return math.floor(rate * size + 0.5)


def keep_count(size: int, rate: float) -> int:
    """Units kept when ``rate`` of ``size`` units are removed: ``max(1, size - removed_count(size, rate))``,
    so no layer is ever pruned to zero units."""
    return max(1, size - removed_count(size, rate))


@dataclass(frozen=True)
class Slice:
    """The entries of one parameter that belong to a filter group's channels.

    Attributes:
        param: parameter name (``"layer1.0.conv1.weight"``).
        module: owning module name.
        role: one of :data:`ROLES`.
        dim: the parameter dimension indexed (0 = output channels, 1 = input channels / features).
        index: int64 [n], positions along ``dim``.
        channel: int64 [n], the group channel (root output channel) each position belongs to; a channel
            maps to several positions for Flatten -> Linear (``H*W`` features per channel).
        feature: int64 [n] or None: the consumer input channel of each position, when it is not ``index``:
            a grouped convolution's input slice, whose weight dim 1 holds the channels within one conv group
            (``index = feature % (C_in / groups)``, so ``groups`` channels share a position; the group's
            ``ties`` remove them together).
        groups: the consumer's conv groups (1 unless ``feature`` is set).
    """

    param: str
    module: str
    role: str
    dim: int
    index: torch.Tensor
    channel: torch.Tensor
    feature: torch.Tensor | None = None
    groups: int = 1

    @property
    def features(self) -> torch.Tensor:
        """int64 [n]: the position of each entry in the module's input (input slices) or output features."""
        return self.index if self.feature is None else self.feature

    @functools.cached_property
    def positions(self) -> int:
        """Distinct positions along ``dim``: fewer than entries for a grouped convolution's input slice, and where
        several group channels reach one position (a Linear's 49 features viewed as one channel of a map, the 4
        channels a pixel shuffle makes one; counted once each, the search's MACs of a generator stem were
        negative: fresh user 81)."""
        return int(self.index.unique().numel())

    def energy(self, tensor: torch.Tensor) -> torch.Tensor:
        """float64 [n]: the sum of squares of the entries of ``tensor`` (shaped like the parameter) that
        entry ``i`` owns: the slice along ``dim`` at ``index[i]``; for a grouped convolution's input slice
        only the rows of the conv group that reads ``feature[i]``."""
        t = tensor.detach().to("cpu", torch.float64).pow(2)
        if self.feature is not None:  # weight [F, C_in/groups, *k] as [groups, F/groups, C_in/groups, k]
            per_group = t.reshape(self.groups, t.shape[0] // self.groups, t.shape[1], -1).sum((1, 3))
            return per_group.flatten()[self.feature]
        other = [d for d in range(t.dim()) if d != self.dim]
        return (t.sum(other) if other else t)[self.index]


@dataclass(frozen=True)
class FilterGroup:
    """Coupled output channels removed together (one rate per group).

    Attributes:
        name: root module name (first Conv2d / Linear of the coupled set in module order).
        size: number of channels (the root's output channels).
        slices: every parameter slice the channels own, producers and consumers.
        params: parameter entries governed (all slices together).
        macs: MACs governed per forward of the build's example inputs (weight and input slices).
        ties: int64 [size] or None: the tie class of each channel, when channels must be removed together
            (grouped convolutions: a compact grouped conv needs the same channels removed from every conv
            group, so channel ``c`` is tied to ``c + j * C/groups``). All classes have the same size; a rate
            applies to the classes (:meth:`keep`). None: every channel is its own class.
        heads: the channels form this many consecutive blocks of ``size / heads`` that must keep equally many
            channels each, any of them (the heads of an attention whose forward splits its projections into
            heads by shape, e.g. ``q.view(B, N, heads, -1)``: a compact head is as wide as the others); 1: no
            such constraint. Found by a probe (:func:`autocompress.attention.head_count`); never with ``ties``.
        free_macs: MACs per forward of operations without weights that shrink in proportion to the channels (an
            attention's score and value products, ``2 N^2 D`` an item for ``N`` tokens), which :meth:`PruningSpace.
            count` and :meth:`~PruningSpace.estimate` remove with them (measured by
            :func:`autocompress.attention.free_macs`); included in :attr:`macs`.
    """

    name: str
    size: int
    slices: tuple[Slice, ...]
    params: int
    macs: int
    ties: torch.Tensor | None = None
    heads: int = 1
    free_macs: int = 0

    @property
    def classes(self) -> int:
        """Number of tie classes (``size`` without ties)."""
        return self.size if self.ties is None else int(self.ties.max()) + 1

    def keep(self, rate: float) -> int:
        """Channels kept at ``rate``: ``keep_count(classes, rate)`` whole tie classes."""
        return self.size // self.classes * keep_count(self.classes, rate)

    def class_sums(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` [size] summed over each tie class: [classes] (``scores`` itself without ties)."""
        if self.ties is None:
            return scores
        return torch.zeros(self.classes, dtype=scores.dtype).index_add_(0, self.ties, scores)

    def expand(self, class_keep: torch.Tensor) -> torch.Tensor:
        """A keep mask over classes [classes] as a keep mask over channels [size]."""
        return class_keep if self.ties is None else class_keep[self.ties]

    def tie(self, keep: torch.Tensor) -> torch.Tensor:
        """``keep`` [size] closed over the ties: a channel is kept when any channel of its class is."""
        return keep if self.ties is None else self.expand(self.class_sums(keep.to(torch.long)) > 0)

    @functools.cached_property
    def parts(self) -> tuple[torch.Tensor, ...]:
        """The tie classes (int64 [n], sorted) of each layer that produces only part of the group's channels: a
        branch of a concatenation the group's stream holds (a stem -> [1x1, 3x3] -> cat -> + stem block). A
        compact branch keeps at least one channel: one with none has no weights to compute its output."""
        found = {}
        for s in self.slices:
            channels = torch.unique(s.channel)
            classes = channels if self.ties is None else torch.unique(self.ties[channels])
            if s.role == "weight" and classes.numel() < self.classes:
                found[tuple(classes.tolist())] = classes
        return tuple(found.values())

    def keep_parts(self, keep: torch.Tensor, scores: torch.Tensor, *,
                   before: torch.Tensor | None = None) -> torch.Tensor:
        """``keep`` (bool [classes]) with a class of every part kept (:attr:`parts`, the branches of a
        concatenation): a part left without one gets its highest-scoring class (``scores`` float [classes]).
        Without ``before`` the count stays: the lowest-scoring kept class of a part that keeps others (or of no
        part) makes room, where there is one. With ``before`` (bool [classes], a superset of ``keep``:
        purification's mask before it removed classes) the class comes back from ``before`` and the count grows."""
        keep = keep.clone()
        for part in self.parts:
            allowed = part if before is None else part[before[part]]
            if allowed.numel() == 0 or bool(keep[part].any()):
                continue
            keep[allowed[scores[allowed].argmax()]] = True
            if before is None:
                spare = keep.clone()
                for other in self.parts:
                    if int(keep[other].sum()) <= 1:
                        spare[other] = False
                if bool(spare.any()):
                    keep[torch.where(spare, scores.double(), float("inf")).argmin()] = False
        return keep

    @property
    def producers(self) -> tuple[str, ...]:
        """Modules whose weight rows are the group's channels (convs, depthwise convs, linears)."""
        return tuple(dict.fromkeys(s.module for s in self.slices if s.role == "weight"))

    @property
    def consumers(self) -> tuple[str, ...]:
        """Modules that read the group's channels through input slices."""
        return tuple(dict.fromkeys(s.module for s in self.slices if s.role == "input"))


@dataclass(frozen=True)
class ColumnLayer:
    """Columns of one Conv / Linear weight in the GEMM view ``[rows, size]``.

    Attributes:
        name: module name; param: its weight's name.
        rows: filters (Linear: output features); size: columns (``C/groups*prod(k)``; Linear: ``in``);
            column ``c * prod(k) + p`` is input channel ``c`` at flattened kernel position ``p``.
        params: weight entries (``rows * size``); macs: MACs of the layer per forward of the example inputs.
        transposed: a ConvTranspose weight ``[C_in, rows, *k]`` (groups 1), whose GEMM view is
            ``weight.transpose(0, 1)`` flattened.
        area: kernel positions ``prod(k)`` (1 for Linear); gemm_capable: its compact form is a
            :class:`autocompress.columns.ColumnConv2d` that can run a GEMM over the kept columns alone (an
            ungrouped Conv2d: :func:`autocompress.columns.gemm_possible`;
            :func:`~autocompress.columns.executed_columns`).
    """

    name: str
    param: str
    rows: int
    size: int
    params: int
    macs: int
    transposed: bool = False
    area: int = 1
    gemm_capable: bool = False

    def executed_entries(self, rows: int, kept_columns: int, kept_channels: int) -> int:
        """Weight entries the compact layer multiplies per output position with ``rows`` filters and
        ``kept_columns`` columns kept over ``kept_channels`` input channels (per group) that keep a column:
        ``rows`` x :func:`autocompress.columns.executed_columns`."""
        return rows * executed_columns(rows, self.area, kept_columns, kept_channels, self.gemm_capable)

    def executed_in(self, mask: torch.Tensor) -> int:
        """:meth:`executed_entries` of the compact layer for a keep mask shaped like the weight (filter and
        column pruning)."""
        kept = self.gemm(mask)
        columns = kept.any(0)
        return self.executed_entries(int(kept.any(1).sum()), int(columns.sum()),
                                     int(columns.view(-1, self.area).any(1).sum()))

    def gemm(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the weight or a mask of its shape) in the GEMM view ``[rows, size]`` (a view unless
        transposed)."""
        if self.transposed:
            return tensor.reshape(tensor.shape[0], self.rows, -1).transpose(0, 1).reshape(self.rows, self.size)
        return tensor.reshape(self.rows, self.size)

    def clear_columns(self, mask: torch.Tensor, columns: torch.Tensor) -> None:
        """Set GEMM columns ``columns`` (int64) of ``mask`` (shaped like the weight) to False, in place."""
        if self.transposed:
            grid = mask.view(mask.shape[0], self.rows, -1)
            area = grid.shape[2]
            grid[columns // area, :, columns % area] = False
        else:
            mask.view(self.rows, self.size)[:, columns] = False


@dataclass(frozen=True)
class IrregularLayer:
    """Single weights of one Conv2d / Linear.

    Attributes:
        name: module name; param: its weight's name; shape: the weight's shape; size: ``numel``.
        params: ``size``; macs: MACs of the layer per forward of the example inputs.
    """

    name: str
    param: str
    shape: tuple[int, ...]
    size: int
    params: int
    macs: int


@dataclass(frozen=True)
class Counts:
    """Parameters and MACs of the compact model (per forward of the space's example inputs)."""

    params: int
    macs: int

    @property
    def flops(self) -> int:
        """FLOPs = 2 x MACs."""
        return 2 * self.macs


Unit = FilterGroup | ColumnLayer | IrregularLayer


def check_rate(rate: object, what: str) -> float:
    """``rate`` as a float when it is a number in ``[0, 1)``; otherwise UserError ``"<what> is <rate>,
    outside [0, 1)"`` (``what`` names the rate, e.g. ``"filter rate of 'conv1'"`` or ``"the default rate"``)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise UserError(f"{what} is {show(rate)}, outside [0, 1)", "give each rate as a fraction removed, e.g. 0.5")
    return float(rate)


class PruningSpace:
    """Prunable units of one model (see the module docstring). Build with :meth:`build`.

    Attributes:
        filter_groups / column_layers / irregular_layers: the units, in module order.
        exclusions: module name -> the reasons it (or one of its unit kinds) is not prunable, one per finding
            (a filter-pruning reason starts with ``"filter pruning: "``, a column-pruning one with
            ``"column pruning"``, one for the whole layer with neither); :attr:`excluded` joins them.
        dims: the unit kinds enumerated.
        max_rate: the largest rate the search proposes for one unit (not enforced by projections).
        param_shapes: parameter name -> shape of every parameter of the model.
        layer_macs: Conv / Linear module name -> (weight name, MACs of the full weight); an ``nn.LSTM``'s input
            weights (which filter pruning of the channels it reads narrows) by the weight's name.
        total: :class:`Counts` of the unpruned model.
        channel_multiple: every filter group keeps an allowed width at this multiple
            (:mod:`autocompress.alignment`; 1 = any width).
        whole: module name -> (type name, :class:`Counts` of its own) of the modules with weight matrices of their
            own that no unit prunes (an ``nn.LSTM``'s recurrent weights, a GRU, an attention's fused projections):
            what an unreachable target's refusal names when they hold much of the model.
    """

    def __init__(self, *, filter_groups: Sequence[FilterGroup], column_layers: Sequence[ColumnLayer],
                 irregular_layers: Sequence[IrregularLayer], excluded: Mapping[str, Sequence[str]],
                 dims: Sequence[str], max_rate: float, param_shapes: Mapping[str, torch.Size],
                 layer_macs: Mapping[str, tuple[str, int]], total: Counts, channel_multiple: int = 1,
                 whole: Mapping[str, tuple[str, Counts]] | None = None):
        self.filter_groups = list(filter_groups)
        self.column_layers = list(column_layers)
        self.irregular_layers = list(irregular_layers)
        self.exclusions = {name: tuple(reasons) for name, reasons in excluded.items()}
        self.dims = tuple(dims)
        self.max_rate = max_rate
        self.param_shapes = dict(param_shapes)
        self.layer_macs = dict(layer_macs)
        self.total = total
        self.channel_multiple = int(channel_multiple)
        self.whole = dict(whole or {})
        self._units = {"filter": {u.name: u for u in self.filter_groups},
                       "column": {u.name: u for u in self.column_layers},
                       "irregular": {u.name: u for u in self.irregular_layers}}

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model: nn.Module, example_inputs, *, dims: Sequence[str] = ("filter", "column"),
              ignored_layers: Iterable[str] = (), max_rate: float = 0.95,
              channel_multiple: int = 1, executed_macs_only: bool = False,
              left_out: Mapping[str, str] | None = None, heads: Mapping[str, int] | None = None,
              free_macs: Mapping[str, int] | None = None,
              columns_left_out: Mapping[str, str] | None = None) -> "PruningSpace":
        """Enumerate the prunable units of ``model``.

        Args:
            model: the network (left unchanged: train/eval flags and buffers are restored).
            example_inputs: a float tensor ``[N, ...]`` or tuple of tensors, one forward's inputs; MACs
                are counted per forward of these inputs (batch included, like
                :func:`autocompress.metrics.count_macs`).
            dims: unit kinds to enumerate, a subset of :data:`KINDS`.
            ignored_layers: module names never pruned: they keep their output channels (no filter group removes
                them, nor a BatchNorm's entries), columns and weights, while their input channels follow a pruned
                producer (as Torch-Pruning's ``ignored_layers``); a container's name covers every module below it
                (:func:`ignored_modules`).
            max_rate: the search's upper bound on one unit's rate, ``0 < max_rate < 1``.
            channel_multiple: filter groups keep widths aligned to it (:meth:`filter_keep`).
            executed_macs_only: enumerate column units only where column pruning can lower the MACs the
                compact model executes, and pays for it (for a flops target): Linear layers and 1x1 kernels
                applied at one position of an input item, and Conv2d layers with at least
                :data:`autocompress.columns.GEMM_MIN_FILTERS` filters (which can run a GEMM over the kept
                columns); other layers larger than 1x1 run the dense conv over their kept input channels, and a
                Linear or 1x1 kernel applied at several positions (tokens, pixels) gathers its kept input
                channels at every position, which costs more time than it saves: they are excluded from column
                pruning, with the reason logged.
            left_out: filter groups to leave out, by name (their root layer, as in :attr:`filter_groups`) -> the
                reason recorded in ``excluded``; unlike ``ignored_layers`` their layers' columns and weights stay
                prunable (e.g. groups whose removal breaks the compact model, found by a probe).
            heads: filter groups, by name, whose channels form this many heads that must keep equally many
                channels each (:attr:`FilterGroup.heads`, found by :func:`autocompress.attention.head_count`).
            free_macs: filter groups, by name -> :attr:`FilterGroup.free_macs` (e.g. an attention's products).
            columns_left_out: layers whose columns stay whole, by name -> the reason recorded in ``excluded`` (e.g.
                a layer whose weight the forward also reads outside the layer, found by a probe).
        Returns:
            the space; exclusions are logged (``logging``, this module's logger) and kept in ``excluded``.
        Raises:
            UserError: unknown kind, unknown ignored module, ``max_rate`` outside (0, 1), or the model
                cannot take ``example_inputs``.
        """
        dims = tuple(dims)
        bad = [d for d in dims if d not in KINDS]
        if bad or not dims:
            raise UserError(f"unknown pruning dimension(s) {bad or list(dims)}",
                            f"choose from {', '.join(KINDS)}")
        if not 0 < max_rate < 1:
            raise UserError(f"max_rate {max_rate} is outside (0, 1)", "pass e.g. max_rate=0.95")
        names = {m: n for n, m in model.named_modules()}
        ignored = ignored_modules(model, ignored_layers)
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        excluded: dict[str, list[str]] = {}

        rows = layer_table(model, inputs)
        own_macs = {r.name: r.macs for r in rows}
        train_only = train_only_modules(model, inputs)
        param_names = _param_names(model)
        layer_macs = {names[m]: (param_names[id(m.weight)], own_macs.get(names[m], 0))
                      for m in model.modules() if is_weight_layer(m)}
        layer_macs.update(_recurrent_macs(model, names, param_names, own_macs))
        total = Counts(params=sum(p.numel() for p in model.parameters()),
                       macs=sum(r.macs for r in rows))

        attention = {module for parent in model.modules() if isinstance(parent, nn.MultiheadAttention)
                     for module in parent.modules() if module is not parent}
        candidates = {}
        shared = shared_parameters(model)
        own_layers = {}
        for module, name in names.items():
            if not is_weight_layer(module):
                if _computed_weight(module):
                    _exclude(excluded, name, COMPUTED_WEIGHT)
                elif _own_weight_layer(module):
                    own_layers[name] = module
                continue
            reason = _layer_problem(module, name, ignored, own_macs, module in train_only, attention, shared)
            if reason:
                _exclude(excluded, name, reason)
            else:
                candidates[name] = module
        recurrent = {name: module for module, name in names.items()  # roots of their hidden units' groups
                     if hidden_prunable(module) and name not in ignored and module not in train_only}

        groups: list[FilterGroup] = []
        if "filter" in dims:
            with warnings.catch_warnings():  # its shape inference's own words, not the user's to act on
                warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
                groups = _build_groups(model, inputs, candidates, names, param_names, excluded, layer_macs,
                                       train_only, ignored, left_out or {}, recurrent)
            groups = [_with_heads(g, (heads or {}).get(g.name, 1), (free_macs or {}).get(g.name, 0)) for g in groups]
        sliced = {s.param for g in groups for s in g.slices}
        for name, module in own_layers.items():  # a ViT's class token and position embedding are sliced: not named
            if any(p.dim() >= 2 and param_names[id(p)] not in sliced for p in module.parameters(recurse=False)):
                _exclude(excluded, name, f"{type(module).__name__} is a layer of its own with weights, not a "
                                         "Conv / Linear: build it from nn.Conv2d / nn.Linear to have it pruned")
        batch = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim()), 1)
        for name, reason in (columns_left_out or {}).items():
            _exclude(excluded, name, reason)
        columns = [_column_layer(n, m, param_names, layer_macs, excluded, executed_macs_only, batch)
                   for n, m in candidates.items() if n not in (columns_left_out or {})] if "column" in dims else []
        irregular = [IrregularLayer(name=n, param=param_names[id(m.weight)], shape=tuple(m.weight.shape),
                                    size=m.weight.numel(), params=m.weight.numel(), macs=layer_macs[n][1])
                     for n, m in candidates.items()] if "irregular" in dims else []
        shapes = {n: p.shape for n, p in model.named_parameters()}
        return cls(filter_groups=groups, column_layers=[c for c in columns if c is not None],
                   irregular_layers=irregular, excluded=excluded, dims=dims, max_rate=max_rate,
                   param_shapes=shapes, layer_macs=layer_macs, total=total, channel_multiple=channel_multiple,
                   whole=_whole_modules(model, rows, {p for g in groups for p in g.producers}))

    @property
    def excluded(self) -> dict[str, str]:
        """Module name -> why it (or one of its unit kinds) is not prunable: its :attr:`exclusions` joined by
        ``"; "`` (what logs, reports and ``metrics.jsonl`` show)."""
        return {name: "; ".join(reasons) for name, reasons in self.exclusions.items()}

    def unreached_layers(self) -> list[str]:
        """The weight layers the example inputs' forward never calls nor reads the weights of (names)."""
        return [name for name, reasons in self.exclusions.items()
                if UNREACHED in reasons and READ_FUNCTIONALLY not in reasons]

    def unreached_warning(self) -> str | None:
        """The warning naming the weight layers the example inputs' forward never calls nor reads the weights of
        (fresh user 61: a branch taken only by some inputs), or None (also without filter groups): torch-pruning's
        graph does not see them, so the channels they read may be pruned, and the compact model is checked on the
        example's path only."""
        unreached = self.unreached_layers()
        if not unreached or not self.filter_groups:
            return None
        more = f" and {len(unreached) - 3} more" if len(unreached) > 3 else ""
        return (f"the forward of the example inputs never calls {', '.join(unreached[:3])}{more}: the compact model "
                "computes the masked one on the example's path only, and an input whose forward reaches them (a "
                "branch taken by some inputs) may fail or compute otherwise; pass example inputs that reach every "
                "layer, or list the layers whose channels they read in ignored_layers")

    def reasons(self, kind: str) -> dict[str, tuple[str, ...]]:
        """Module name -> the reasons of :attr:`exclusions` that keep ``kind`` (``"filter"``, ``"column"`` or
        ``"irregular"``) from it: those of that kind (``"filter pruning: ..."``) and those of every kind (ignored,
        not reached by the forward pass); modules without one are left out."""
        own = [f"{other} pruning" for other in KINDS]
        found = {name: tuple(r for r in reasons if r.startswith(f"{kind} pruning") or not r.startswith(tuple(own)))
                 for name, reasons in self.exclusions.items()}
        return {name: why for name, why in found.items() if why}

    def log_exclusions(self, also: Callable[[str], None] | None = None, said: Collection[str] = ()) -> None:
        """Log the layers left out of pruning with their reasons, one line per reason, to ``also`` (a run's ``log``
        callable; not the layers of ``said``: those the run's log named already) or, without one, at INFO on the
        logger ``autocompress.space``: ``not filter-pruned: <name>: <reasons>`` (``column-``, ``irregular-``; ``not
        pruned`` for a reason of every kind, such as a layer of one's own), or ``not column-pruned (<n> layers):
        <reasons>: <name>, <name>, ...`` when several layers share it (a transformer's Linears applied at every
        token); a run calls it once, for the space of its base model."""
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.excluded.items():
            by_reason.setdefault(reason, []).append(name or "<model>")
        lines = []
        for reason, names in by_reason.items():
            kind = next((kind for kind in KINDS if reason.startswith(f"{kind} pruning")), None)
            what = "not pruned" if kind is None else f"not {kind}-pruned"
            if kind is not None:
                reason = reason.removeprefix(f"{kind} pruning").removeprefix(":").strip()
            lines.append((f"{what}: {names[0]}: {reason}" if len(names) == 1 else
                          f"{what} ({len(names)} layers): {reason}: {', '.join(names)}", names))
        for name, held in self.kept_whole().items():  # fresh user 88: an LSTM with 85 % of the MACs went unnamed
            lines.append((f"kept whole: {name} ({held}): {WHOLE_REASON}", [name]))
        for line, names in lines:
            if also is None:
                log.info("%s", line)
            elif not set(names) <= set(said):
                also(line)

    def heavy_whole(self, attr: str) -> list[tuple[float, str, str]]:
        """The modules of :attr:`whole` holding :data:`WHOLE_SHARE` or more of the model's ``attr`` (``"params"``
        or ``"macs"``), as ``(share, name, type)``, largest first."""
        total = max(1, getattr(self.total, attr))
        return sorted(((getattr(own, attr) / total, name, kind) for name, (kind, own) in self.whole.items()
                       if getattr(own, attr) >= WHOLE_SHARE * total), reverse=True)

    def kept_whole(self) -> dict[str, str]:
        """The modules no unit prunes that hold :data:`WHOLE_SHARE` or more of the parameters or MACs (an LSTM's
        recurrent weights), by name -> their type and shares, e.g. ``"LSTM, 84% of the parameters, 85% of the
        MACs"``."""
        heavy = {name for _, name, _ in self.heavy_whole("params") + self.heavy_whole("macs")}
        return {name: f"{kind}, {own.params / max(1, self.total.params):.0%} of the parameters, "
                      f"{own.macs / max(1, self.total.macs):.0%} of the MACs"
                for name, (kind, own) in self.whole.items() if name in heavy}

    def not_filter_pruned(self) -> dict[str, str]:
        """The layers left out of filter pruning, by name, with the filter-pruning part of their reason: ignored
        layers, layers of a computed weight (weight norm), groups the compact model breaks without, channels
        torch-pruning cannot map, ...; not the layers whose channels are model outputs (the classifier, never pruned
        anywhere)."""
        left = {}
        for name, reasons in self.exclusions.items():
            why = [r.removeprefix(FILTER_PRUNING) for r in reasons
                   if r in (IGNORED, COMPUTED_WEIGHT) or r.startswith(FILTER_PRUNING) and r != MODEL_OUTPUTS]
            if name and why:
                left[name] = why[0]
        return left

    def at_multiple(self, channel_multiple: int) -> "PruningSpace":
        """This space with filter groups aligned to another ``channel_multiple`` (a shallow copy: the units,
        shapes and counts do not depend on it, so nothing is traced again and no exclusion is logged twice)."""
        other = copy.copy(self)
        other.channel_multiple = int(channel_multiple)
        return other

    def check_dims(self, dims: Sequence[str]) -> None:
        """Refuse, before any work, pruning ``dims`` when one of these kinds has no unit in the space.

        Raises:
            UserError: naming the kind, up to three excluded modules and their reasons (e.g. the model
                torch-pruning cannot trace: no filter group), and the fix (other dims, or the modules out of
                ignored layers).
        """
        for kind in dims:
            if not self._units[kind]:
                named, which = self.missing(kind)
                raise UserError(f"no {kind} unit can be pruned in this model ({named})",
                                f"drop {kind} from dims, or change the model / ignored layers so that {which} can "
                                "be pruned")

    def missing(self, kind: str) -> tuple[str, str]:
        """Why the space has no unit of ``kind``: up to three excluded modules with their reasons (``"c: filter
        pruning: couples with LSTM rnn, ...; fc: ..."``), and how to name them in a fix (``"c"`` or ``"one of
        them"``)."""
        why = ([(name, "; ".join(reasons)) for name, reasons in self.reasons(kind).items()]
               or list(self.excluded.items())[:1] or [("", "no Conv / Linear layer")])
        named = "; ".join(f"{name or 'the model'}: {reason}" for name, reason in why[:3])
        more = f"; and {len(why) - 3} more" if len(why) > 3 else ""
        return named + more, ((why[0][0] or "it") if len(why) == 1 else "one of them")

    def filter_keep(self, group: FilterGroup, rate: float) -> int:
        """Channels a filter group keeps at ``rate``: whole tie classes (:meth:`filter_keep_classes`);
        without ties and at multiple 1 :func:`keep_count`; non-increasing in ``rate``."""
        return group.size // group.classes * self.filter_keep_classes(group, rate)

    def filter_keep_classes(self, group: FilterGroup, rate: float) -> int:
        """Tie classes a filter group keeps at ``rate``: :func:`keep_count` of its classes, aligned
        (:func:`autocompress.alignment.aligned_keep`) so that the kept channels are a multiple of
        :attr:`channel_multiple` (a class of a grouped conv holds ``size / classes`` channels), and at least one
        class of each of its :attr:`~FilterGroup.parts`. A group with :attr:`FilterGroup.heads` keeps ``heads``
        times the aligned keep count of one head."""
        if group.heads > 1:
            per = group.size // group.heads
            return group.heads * aligned_keep(per, keep_count(per, rate), self.head_multiple(group))
        return max(aligned_keep(group.classes, keep_count(group.classes, rate), self.class_multiple(group)),
                   self._fewest_classes(group))

    def column_keep(self, layer: ColumnLayer, size: int, rate: float) -> int:
        """Columns ``layer`` keeps of its ``size`` remaining ones (what filter pruning left) at ``rate``:
        :func:`keep_count`, for a layer of kernel area 1 (a 1x1 conv or a Linear, whose columns are its input
        channels or features) aligned (:func:`autocompress.alignment.aligned_keep`) to :attr:`channel_multiple`:
        its compact form gathers the kept channels and runs a conv of that width, which onnxruntime keeps in its
        blocked channel layout only at aligned widths (unaligned: 0.87-1.04x the base's speed on a column-pruned
        regnet_x_400mf, 16-aligned 0.98-1.17x; BENCHMARKS.md, "Session 44"). Non-increasing in ``rate``."""
        return aligned_keep(size, keep_count(size, rate), self.column_multiple(layer))

    def column_multiple(self, layer: ColumnLayer) -> int:
        """The multiple a column layer's kept columns are aligned to: :attr:`channel_multiple` for a layer of
        kernel area 1 (its columns are input channels), else 1."""
        return self.channel_multiple if layer.area == 1 else 1

    def head_multiple(self, group: FilterGroup) -> int:
        """The multiple of one head's channels that keeps :attr:`channel_multiple` channels aligned over the
        group's ``heads`` heads: ``N / gcd(N, heads)``."""
        return self.channel_multiple // math.gcd(self.channel_multiple, group.heads)

    def widths(self, group: FilterGroup) -> list[int]:
        """The group's allowed widths (channels kept), ascending, the values :meth:`filter_keep` takes: whole tie
        classes (:func:`autocompress.alignment.allowed_widths` of its classes at :meth:`class_multiple`, times the
        channels of a class; a grouped conv's 64 channels in 4 conv groups: 4, 8, .., 64), or for a group with
        heads ``heads`` times a head's allowed widths; at least one class of each part."""
        if group.heads > 1:
            return [group.heads * w for w in allowed_widths(group.size // group.heads, self.head_multiple(group))]
        per, fewest = group.size // group.classes, self._fewest_classes(group)
        return [per * w for w in allowed_widths(group.classes, self.class_multiple(group)) if w >= fewest]

    def _fewest_classes(self, group: FilterGroup) -> int:
        """The fewest tie classes a group keeps: an allowed count holding one class of each of its
        :attr:`~FilterGroup.parts` (1 without parts)."""
        return align_up(group.classes, max(1, len(group.parts)), self.class_multiple(group))

    def class_multiple(self, group: FilterGroup) -> int:
        """The multiple of tie classes that keeps :attr:`channel_multiple` channels aligned: a class holds
        ``size / classes`` channels, so ``N / gcd(N, size / classes)`` classes (``N`` without ties)."""
        per = group.size // group.classes
        return self.channel_multiple // math.gcd(self.channel_multiple, per)

    def leading_removal(self, group: FilterGroup, width: int) -> torch.Tensor:
        """bool [size]: a keep mask of ``width`` channels (an allowed width, :meth:`widths`) that removes the
        group's first channels: its first tie classes (every part keeps its last: :meth:`FilterGroup.keep_parts`),
        or the first channels of each head. A probe's removal that no weights chose: it splits any structure of
        consecutive channels (heads) unevenly, where the weakest channels may by chance be spread evenly."""
        if group.heads > 1:
            keep = torch.zeros(group.heads, group.size // group.heads, dtype=torch.bool)
            keep[:, keep.shape[1] - width // group.heads:] = True
            return keep.flatten()
        classes = torch.zeros(group.classes, dtype=torch.bool)
        classes[group.classes - width * group.classes // group.size:] = True
        return group.expand(group.keep_parts(classes, torch.arange(group.classes, dtype=torch.float64)))

    # ------------------------------------------------------------------ lookup
    def units(self, kind: str) -> list[Unit]:
        """The units of one kind (``"filter"``, ``"column"`` or ``"irregular"``), in module order."""
        return list(self._units[kind].values())

    def unit(self, kind: str, name: str) -> Unit:
        """One unit by kind and name. Raises KeyError if absent."""
        return self._units[kind][name]

    def sets_blocked_channels(self, name: str) -> bool:
        """Whether filter group ``name`` sets channels that CPU kernels process in blocks: a 2-D convolution's
        output or input channels (a 4-D weight; onnxruntime's blocked layout, :data:`autocompress.latency.
        LAYOUT_RULE`) or a Linear's output features (a 2-D weight's rows: the columns of its GEMM, packed in
        panels). Measured in onnxruntime, 1 thread (BENCHMARKS.md, session 56): Conv2d and Linear widths of 104 and
        112, 120 and 128 ran alike, while Conv1d ran in proportion to its width (Conv1d and Conv3d never take the
        blocked layout). Not a recurrent layer's hidden units (whose gate GEMMs, 4 x hidden rows for an LSTM, are
        block-aligned at any multiple of 4). Raises KeyError for an unknown group."""
        return any(len(self.param_shapes[s.param]) == 4 or (len(self.param_shapes[s.param]) == 2 and s.dim == 0
                                                            and not is_recurrent_param(s.param))
                   for s in self._units["filter"][name].slices)

    def check_rates(self, rates: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
        """Validate a rates dict ``{"filter": {group: r}, "column": {layer: r}, "irregular": {layer: r}}``.

        Returns:
            the same rates as plain ``float`` dicts (kinds absent from ``rates`` are empty).
        Raises:
            UserError: an unknown kind, a name not in the space (the message lists the valid names), or a
                rate that is not a number in ``[0, 1)``.
        """
        checked: dict[str, dict[str, float]] = {kind: {} for kind in KINDS}
        for kind, per_unit in rates.items():
            if kind not in KINDS:
                raise UserError(f"unknown pruning kind {kind!r} in the rates", f"use {', '.join(KINDS)}")
            valid = self._units[kind]
            for name, rate in per_unit.items():
                if name not in valid and (why := self.reasons(kind).get(name)):
                    raise UserError(f"{kind} unit {name!r} is left out of the pruning space ({'; '.join(why)})",
                                    f"drop its {kind} rate (a default rate skips it)")
                if name not in valid:
                    listing = ", ".join(valid) if valid else "(none: this space has no such units)"
                    raise UserError(f"{kind} unit {name!r} is not in the pruning space",
                                    f"valid {kind} names: {listing}")
                checked[kind][name] = check_rate(rate, f"{kind} rate of {name!r}")
        return checked

    # ------------------------------------------------------------------ masks
    def full_masks(self) -> Masks:
        """Masks keeping every unit of the space (all True)."""
        return Masks(filters={g.name: torch.ones(g.size, dtype=torch.bool) for g in self.filter_groups},
                     columns={c.name: torch.ones(c.size, dtype=torch.bool) for c in self.column_layers},
                     weights={w.name: torch.ones(w.shape, dtype=torch.bool) for w in self.irregular_layers})

    def param_masks(self, masks: Masks) -> dict[str, torch.Tensor]:
        """Expand unit keep masks to per-parameter keep masks (CPU bool tensors, True = kept).

        A removed filter-group channel clears the producers' weight rows and bias entries, the
        normalisation affine (and PReLU / free per-channel parameters) of that channel and the consumers'
        input slices; a removed column clears ``weight.view(rows, -1)[:, col]``; irregular masks clear
        single weights; all combine by AND. Every parameter touched by a unit present in ``masks`` gets an
        entry (even if all True); keys follow the model's parameter order.

        Raises:
            ValueError: a mask names a unit not in the space or has the wrong shape.
        """
        out: dict[str, torch.Tensor] = {}

        def entry(param: str) -> torch.Tensor:
            if param not in out:
                out[param] = torch.ones(self.param_shapes[param], dtype=torch.bool)
            return out[param]

        for name, keep in masks.filters.items():
            group = self._checked_unit("filter", name, keep)
            removed = ~keep.to("cpu", torch.bool)
            for s in group.slices:
                mask = entry(s.param)
                index = s.index[removed[s.channel]]
                if index.numel():
                    mask.index_fill_(s.dim, index, False)
        for name, keep in masks.columns.items():
            layer = self._checked_unit("column", name, keep)
            mask = entry(layer.param)
            layer.clear_columns(mask, torch.nonzero(~keep.to("cpu", torch.bool)).flatten())
        for name, keep in masks.weights.items():
            layer = self._checked_unit("irregular", name, keep)
            entry(layer.param).logical_and_(keep.to("cpu", torch.bool))
        order = {n: i for i, n in enumerate(self.param_shapes)}
        return dict(sorted(out.items(), key=lambda item: order[item[0]]))

    def _checked_unit(self, kind: str, name: str, keep: torch.Tensor) -> Unit:
        if name not in self._units[kind]:
            raise ValueError(f"{kind} mask for {name!r}, which is not in the pruning space")
        unit = self._units[kind][name]
        shape = unit.shape if kind == "irregular" else (unit.size,)
        if tuple(keep.shape) != tuple(shape):
            raise ValueError(f"{kind} mask for {name!r} has shape {tuple(keep.shape)}, expected {tuple(shape)}")
        return unit

    def count(self, masks: Masks) -> Counts:
        """Parameters and MACs of the physically compacted model for ``masks``.

        Parameters: the compact model's non-zero parameters, i.e. every model parameter minus the removed
        entries (an irregularly removed weight counts as removed; it stays a zero in a dense tensor, so the
        dense parameter count, ``metrics.count_params``, is this plus the irregular zeros). MACs: those the
        compact model executes: for each Conv / Linear, the weight entries it multiplies x output positions
        summed over its calls (``macs_full * entries / numel``): the entries left by filter pruning, and of
        a column-pruned layer those of the path its compact form runs
        (:func:`autocompress.columns.executed_columns`: the kept columns on the GEMM path, else every column
        of the input channels that keep one); irregular zeros are still multiplied. Plus the MACs the flop
        counter attributes to other operations, unchanged by pruning except a group's
        :attr:`FilterGroup.free_macs` (in proportion to its removed channels). FLOPs = 2 x MACs.
        """
        structural = self.param_masks(Masks(filters=masks.filters, columns=masks.columns, weights={}))
        executed = {name: int(mask.sum()) for name, mask in structural.items()}
        for layer in self.column_layers:
            if layer.param in structural:
                executed[layer.param] = layer.executed_in(structural[layer.param])
        kept = {g.name: int(masks.filters[g.name].sum()) for g in self.filter_groups if g.name in masks.filters}
        return self._counts({name: int(mask.sum()) for name, mask in self.param_masks(masks).items()}, executed,
                            kept)

    def estimate(self, rates: Mapping[str, Mapping[str, float]]) -> Counts:
        """:meth:`count` of the masks that :func:`autocompress.projection.project` returns for ``rates``,
        computed from the keep counts alone (no weights, no masks: fast enough for the search's cost
        function). The parameters equal ``count(project(space, model, rates))`` for any weights, because the
        projection keeps exactly :func:`keep_count` units of what remains of each unit (:meth:`filter_keep` /
        :meth:`column_keep` aligned); so do the MACs
        when every input channel left by filter pruning keeps a column of each column layer (the estimate
        assumes so). When some lose all of theirs, a layer on the dense conv over its kept channels executes
        fewer MACs than estimated, and a layer of >= 128 filters may switch from the GEMM over its kept
        columns to that dense conv and execute more (at most ``1 / DENSE_DENSITY_THRESHOLD`` x its kept
        columns): the round's refit after purification meets the limit on the compact model's own count.

        Raises:
            UserError: invalid rates (see :meth:`check_rates`).
        """
        rates = self.check_rates(rates)
        shapes = self.kept_shapes(rates)
        kept = {param: math.prod(shape) for param, shape in shapes.items()}
        dense = dict(kept)
        columns = {c.param: c for c in self.column_layers}
        weights = {w.param: w for w in self.irregular_layers}
        for param in dict.fromkeys([*columns, *weights]):
            shape = self.param_shapes[param]
            row_dim = 1 if param in columns and columns[param].transposed else 0
            rows = shapes[param][row_dim] if param in shapes else shape[row_dim]
            cols = kept.get(param, shape.numel()) // rows if rows else 0
            entries = dense[param] = rows * cols
            if param in columns:
                layer = columns[param]
                kept_columns = self.column_keep(layer, cols, rates["column"].get(layer.name, 0.0))
                entries = rows * kept_columns
                dense[param] = layer.executed_entries(rows, kept_columns, min(cols // layer.area, kept_columns))
            if param in weights:
                entries = keep_count(entries, rates["irregular"].get(weights[param].name, 0.0))
            kept[param] = entries
        return self._counts(kept, dense, {g.name: self.filter_keep(g, rates["filter"].get(g.name, 0.0))
                                          for g in self.filter_groups})

    def kept_shapes(self, rates: Mapping[str, Mapping[str, float]]) -> dict[str, list[int]]:
        """Shape of every parameter a filter group touches once the groups are pruned at ``rates["filter"]``
        (:meth:`filter_keep` channels each), from the keep counts alone; column and irregular rates do not
        change shapes. ``rates`` must be checked (:meth:`check_rates`)."""
        removed: dict[tuple[str, int], int] = {}  # (param, dim) -> positions removed along dim
        for g in self.filter_groups:
            gone = g.size - self.filter_keep(g, rates.get("filter", {}).get(g.name, 0.0))
            for s in g.slices:
                key = (s.param, s.dim)
                removed[key] = removed.get(key, 0) + gone * s.positions // g.size
        return {param: [n - removed.get((param, d), 0) for d, n in enumerate(self.param_shapes[param])]
                for param in dict.fromkeys(p for p, _ in removed)}

    def _counts(self, kept: Mapping[str, int], dense: Mapping[str, int], channels: Mapping[str, int]) -> Counts:
        """Counts of the compact model given the non-zero entries of each pruned parameter (``kept``), the
        entries it multiplies (``dense``: filter and column pruning only, see :meth:`count`) and the channels each
        filter group keeps (``channels``, for :attr:`FilterGroup.free_macs`)."""
        params = self.total.params - sum(self.param_shapes[p].numel() - k for p, k in kept.items())
        macs = self.total.macs - sum(g.free_macs * (g.size - channels[g.name]) // g.size
                                     for g in self.filter_groups if g.free_macs and g.name in channels)
        for weight, full in self.layer_macs.values():
            if weight in dense:
                numel = self.param_shapes[weight].numel()
                macs -= full * (numel - dense[weight]) // numel
        return Counts(params=params, macs=macs)


# ---------------------------------------------------------------------- helpers
def _own_weight_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a caller's class (neither PyTorch's nor autocompress's) holding a weight matrix or kernel
    (a parameter of two or more dimensions) itself, e.g. a conv written with ``nn.Parameter`` and ``F.conv2d``: no
    unit prunes it, which the run names."""
    home = type(module).__module__
    return not home.startswith(("torch.", "autocompress.")) and any(
        p.dim() >= 2 for p in module.parameters(recurse=False))


def _exclude(excluded: dict[str, list[str]], name: str, reason: str) -> None:
    excluded.setdefault(name, []).append(reason)


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return names


def is_weight_layer(module: nn.Module) -> bool:
    """A Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear with a weight Parameter."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(
        getattr(module, "weight", None), nn.Parameter)


#: why a Conv / Linear whose weight is computed from other parameters is left out (fresh user 85's TCN: every conv
#: under weight_norm vanished from the space without a word, and the target was "unreachable")
COMPUTED_WEIGHT = ("its weight is computed (weight_norm, spectral_norm or another parametrization), which pruning "
                   "cannot narrow: remove it before compressing, keeping the function (torch.nn.utils.parametrize."
                   "remove_parametrizations(layer, 'weight'), or torch.nn.utils.remove_weight_norm / "
                   "remove_spectral_norm for their older form)")


#: the share of the model's parameters or MACs from which a module no unit prunes (:attr:`PruningSpace.whole`) is
#: named: in the run's log (:meth:`PruningSpace.log_exclusions`) and, by the target's objective, in an unreachable
#: target's refusal
WHOLE_SHARE = 0.1
#: why a module of :attr:`PruningSpace.whole` keeps its weights
WHOLE_REASON = ("no unit prunes its own weights (a recurrent layer's hidden units are a filter group only where its "
                "output sequence or final state reaches readers that can be followed: not a packed sequence, an "
                "LSTM with proj_size, a subclass, nor outputs reshaped across steps or returned; the channels it reads "
                "are pruned)")


def _whole_modules(model: nn.Module, rows, pruned: Collection[str] = ()) -> dict[str, tuple[str, Counts]]:
    """:attr:`PruningSpace.whole` from ``model``'s layer table ``rows`` (:func:`autocompress.metrics.layer_table`):
    the modules other than Conv / Linear that own a weight matrix, with their type and own parameters and MACs,
    except those whose own rows a filter group prunes (``pruned``: an LSTM's hidden units)."""
    modules = dict(model.named_modules())
    return {r.name: (r.type, Counts(params=r.params, macs=r.macs)) for r in rows
            if r.name and not is_weight_layer(modules[r.name]) and r.name not in pruned
            and any(p.dim() >= 2 for p in modules[r.name].parameters(recurse=False))}


def _computed_weight(module: nn.Module) -> bool:
    """A Conv / Linear whose ``weight`` is a tensor but no Parameter: computed by a parametrization
    (``torch.nn.utils.parametrizations.weight_norm``) or a forward pre-hook (the older ``weight_norm``)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(weight, torch.Tensor) \
        and not isinstance(weight, nn.Parameter)


def is_transposed(module: nn.Module) -> bool:
    """A ConvTranspose1d/2d/3d (weight ``[C_in, C_out/groups, *k]``: output channels on dim 1)."""
    return isinstance(module, nn.modules.conv._ConvNd) and bool(module.transposed)


def out_dim(module: nn.Module) -> int:
    """The weight dimension of a Conv / Linear that indexes its output channels (1 for transposed convs)."""
    return 1 if is_transposed(module) else 0


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups > 1
            and module.groups == module.in_channels)


def is_grouped(module: nn.Module) -> bool:
    """A grouped convolution that is not depthwise (``1 < groups``, ``groups != in_channels``; transposed
    ones included)."""
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and (bool(module.transposed) or module.groups != module.in_channels))


def ignored_modules(model: nn.Module, ignored_layers: Iterable[str]) -> set[str]:
    """Names of the modules of ``model`` that ``ignored_layers`` covers: each named module and every module below
    it (``"head"`` covers ``"head.0"`` and ``"head.fc"``); one name may be given as a string.

    Raises:
        SettingError: (``ignored_layers``) a name that is not a module of ``model``, or the root ``""`` (ignoring
            it would prune nothing).
    """
    wanted = list(dict.fromkeys([ignored_layers] if isinstance(ignored_layers, str) else ignored_layers))
    names = [name for name, _ in model.named_modules()]
    unknown = [name for name in wanted if name == "" or name not in names]
    if unknown:
        close = [match for name in unknown for match in difflib.get_close_matches(name, names, n=1)]
        raise SettingError("ignored_layers", f"ignored_layers={unknown} names no module of {type(model).__name__}",
                           f"did you mean {close}? (names from model.named_modules())" if close else
                           "use names from model.named_modules()")
    return {name for name in names for prefix in wanted if name == prefix or name.startswith(prefix + ".")}


def ignored_summary(space: "PruningSpace") -> str:
    """One log line: the layers ``ignored_layers`` keeps whole and the filter groups left unpruned because they
    would remove an ignored module's channels (roots named; see :meth:`PruningSpace.build`)."""
    kept = [name for name, reasons in space.exclusions.items() if IGNORED in reasons]
    coupled = [name for name, reasons in space.exclusions.items()
               if any(r.endswith(IGNORED_COUPLING) for r in reasons)]
    line = (f"ignored_layers: {len(kept)} layer(s) keep their filters and weights ({', '.join(kept)}; their input "
            "channels follow pruned producers)")
    if coupled:
        line += (f"; {len(coupled)} filter group(s) not pruned because they would remove channels of ignored "
                 f"modules ({', '.join(coupled)})")
    return line


def _channels(module: nn.Module, out: bool) -> int:
    """Output (``out``) or input channels / features of a Conv / Linear."""
    if isinstance(module, nn.Linear):
        return module.out_features if out else module.in_features
    return module.out_channels if out else module.in_channels


def _batch_of_two(inputs: tuple) -> tuple:
    """The example inputs with a batch of (at least) two: a batch-1 tensor is repeated (train-mode
    BatchNorm needs more than one value per channel)."""
    return tuple(torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 else t
                 for t in inputs)


def _reached(model: nn.Module, inputs: tuple, train: bool) -> set[nn.Module]:
    """Modules called by one forward in train or eval mode (no grad; modes, buffers and RNG restored)."""
    called: set[nn.Module] = set()
    handles = [m.register_forward_hook(lambda module, *_: called.add(module)) for m in model.modules()]
    try:
        with preserved_state(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.train(train)
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return called


def train_only_modules(model: nn.Module, inputs: tuple) -> set[nn.Module]:
    """Modules the forward reaches in train mode but not in eval mode (e.g. auxiliary heads), from two
    forwards on ``inputs`` (repeated to a batch of two). Empty when the train-mode forward fails."""
    try:
        train = _reached(model, _batch_of_two(inputs), True)
    except Exception:  # noqa: BLE001 - a model that cannot run in train mode has no train-only modules
        return set()
    return train - _reached(model, inputs, False)


@contextlib.contextmanager
def _out_of_place(model: nn.Module):
    """``model``'s modules with ``inplace=True`` (ReLU, ReLU6, LeakyReLU, Hardswish, Dropout, ...) out of place
    within the block. torch-pruning maps a module to the autograd node of its output; an in-place op on that output
    rewrites the node when the output is a view (InstanceNorm with running statistics returns one), and the module
    dropped out of its group: a fresh user's ``InstanceNorm2d`` followed by ``ReLU(inplace=True)`` kept 64 features
    while its conv lost channels, and compaction failed."""
    changed = []
    try:
        for module in model.modules():
            if module.__dict__.get("inplace") is True:  # a plain attribute (torch.nn's activations), not a property
                module.inplace = False
                changed.append(module)
        yield
    finally:
        for module in changed:
            module.inplace = True


@contextlib.contextmanager
def _states_after_outputs(model: nn.Module):
    """Within the block, the final states of ``model``'s recurrent layers (an LSTM's ``(h, c)``, a GRU's ``h``)
    hold their values but reach the autograd graph through the layer's output sequence instead of its kernel.
    torch-pruning maps a recurrent layer to the node of its output sequence; the states leave the kernel by another
    node, which it takes for an element-wise op of the layer's input, so the channels the layer reads were tied to
    whatever reads ``h`` (a classifier on ``h[-1]``, the most common LSTM head, or ``h`` returned) and could not be
    pruned (fresh user 86). Each state becomes ``state.detach() + 0 * s`` for ``s`` the output's last step, each
    direction's features added in, expanded to the state's shape: the same values, the hidden units' own mapping
    (an LSTM's cell state ``c``, wider than a projected output, is detached alone). The output sequence of a layer
    whose input an own pruner follows (a GRU's, an RNN's: their CPU kernels reach autograd op by op, which
    torch-pruning maps as the gates' chunks) is first made one node over the input sequence
    (:func:`autocompress.recurrent.one_node`), as an LSTM's kernel is."""
    def hook(module, args, output):
        out, states = output
        if not isinstance(out, torch.Tensor) or out.dim() != 3:  # a PackedSequence: left as it is
            return None
        if type(module) in RECURRENT_PRUNERS and args and isinstance(args[0], torch.Tensor):
            out = one_node(module, args[0], out)
        last = out[:, -1] if module.batch_first else out[-1]  # [B, directions x (proj_size or hidden_size)]

        width = last.shape[1] // directions(module)  # one direction's features
        parts = [last[:, :width]] if not module.bidirectional else [  # each direction's, as an index gather
            last[:, torch.arange(start, start + width, device=last.device)] for start in (0, width)]

        def rerouted(state):  # [layers x directions, B, width]: each slot maps to the features of every direction
            if state.shape[-1] != width:  # an LSTM's c, wider than its projected output: it keeps no path at all
                return state.detach()
            return state.detach() + 0 * sum(part.unsqueeze(0).expand(state.shape[0], -1, -1) for part in parts)
        if isinstance(states, tuple):
            return out, tuple(rerouted(state) for state in states)
        return out, rerouted(states)

    handles = [m.register_forward_hook(hook, prepend=True)  # before torch-pruning's, which reads the output
               for m in model.modules() if isinstance(m, nn.RNNBase)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trace_graph(model: nn.Module, inputs: tuple, train_only: set[nn.Module] | None = None) -> tp.DependencyGraph:
    """torch-pruning's DependencyGraph of ``model`` on ``inputs`` (Fang et al., CVPR 2023).

    Traced in train mode, on the inputs repeated to a batch of two (train-mode BatchNorm), when some module
    is reached only in train mode (``train_only``, default :func:`train_only_modules`), so a train-only
    auxiliary head's inputs couple with their producers; else in eval mode on ``inputs``. Every parameter
    temporarily requires grad (frozen layers are traced like the others; inputs are not marked, which
    torch-pruning mis-traces), and modules that work in place (``nn.ReLU(inplace=True)``) out of place
    (:func:`_out_of_place`). Modes, buffers, RNG, ``requires_grad`` and ``inplace`` are restored.

    Raises:
        UserError: torch-pruning cannot trace the model (names the model class and the error).
    """
    train = bool(train_only_modules(model, inputs) if train_only is None else train_only)
    doubled = _batch_of_two(inputs) if train else inputs
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        with preserved_state(model), torch.enable_grad(), torch.random.fork_rng(devices=[]), _out_of_place(model):
            for p in frozen:
                p.requires_grad_(True)

            traced = _TracedShapes()

            def forward(module, args):  # torch-pruning switches to eval mode before calling this
                module.train(train)
                with traced, _states_after_outputs(module):
                    outputs = output_tensors(module(*args))  # a dataclass or ModelOutput holds the tensors it traces
                traced.outputs = {t.grad_fn for t in outputs if t.grad_fn is not None}
                return outputs

            graph = tp.DependencyGraph().build_dependency(model, doubled, forward_fn=forward, verbose=False,
                                                          customized_pruners={**pruners(model),
                                                                              **RECURRENT_PRUNERS})
    except Exception as exc:  # noqa: BLE001 - torch-pruning raises many types on graphs it cannot follow
        raise UserError(f"torch-pruning cannot trace {type(model).__name__} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''})",
                        "prune it with column / irregular units only (dims); a channel shuffle written as view + "
                        "transpose (ShuffleNet) is a known cause: written as an index gather, x[:, perm], it traces"
                        ) from exc
    finally:
        for p in frozen:
            p.requires_grad_(False)
    graph.model_outputs = traced.outputs  # the autograd nodes of the model's output tensors
    for module, node in graph.module2node.items():
        node.reads_across = isinstance(module, nn.Linear) and id(module.weight) in traced.across
    pinned = _traced_mappings(graph, traced)
    limit = 4 * max([4096] + [n for p in model.parameters() for n in p.shape])
    for node in graph.module2node.values():
        for dep in node.dependencies:
            dep.index_mapping = _BoundedMappings(dep.index_mapping, limit, pinned.get(id(dep), {}))
    return graph


class _TracedShapes(TorchFunctionMode):
    """Records, from the tensors themselves, the shapes around a forward's reshapes and concatenations that
    torch-pruning infers from the channel counts of nearby layers: ``reshapes`` (the autograd node of a view's or
    reshape's output, which torch-pruning's reshape node holds -> (input shape, output shape, the input's dimension
    holding the channels: :func:`_channel_dim`)) and ``cats`` (that of
    a concatenation along dimension 1 of feature vectors ``[N, F]`` or maps ``[N, C, H, W]`` / ``[N, C, D, H, W]``
    -> each input's size there and whether it requires grad, as torch-pruning's inputs of the node do; not ``[N, L,
    D]``, whose dimension 1 is a sequence's as often as channels)."""

    def __init__(self):
        super().__init__()
        self.reshapes: dict[object, tuple[tuple[int, ...], tuple[int, ...], int]] = {}
        self.outputs: set = set()  # the autograd nodes of the forward's output tensors
        self.across: set[int] = set()  # ids of the weights of Linears applied right after a permute of the last dim
        self.cats: dict[object, list[tuple[int, bool]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) > 1 and isinstance(args[0], torch.Tensor):
            orders = _permutations(args[0])  # its features come from another dimension (a token-mixing MLP)
            if orders and orders[0][-1] != args[0].dim() - 1:
                self.across.add(id(args[1]))
        out = func(*args, **kwargs)
        node = out.grad_fn if isinstance(out, torch.Tensor) else None
        if node is None:
            return out
        name = type(node).__name__.lower()
        if args and isinstance(args[0], torch.Tensor) and ("view" in name or "reshape" in name):
            self.reshapes[node] = (tuple(args[0].shape), tuple(out.shape), _channel_dim(args[0]))
        elif name.startswith("catbackward") and out.dim() in (2, 4, 5):
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if isinstance(dim, int) and dim % out.dim() == 1:  # not a named dimension
                self.cats[node] = [(int(t.shape[1]), t.requires_grad) for t in tensors]
        return out


def _channel_dim(tensor: torch.Tensor) -> int:
    """The dimension of ``tensor`` that holds dimension 1 (the channels) of the tensor it was permuted from by a
    chain of ``permute`` / ``transpose`` / ``movedim`` (``contiguous`` copies between them included), read from
    its autograd nodes: 3 for ``x.permute(0, 2, 3, 1)`` of a map ``x`` (channels last); 1 without a permute."""
    dim = 1
    for order in reversed(_permutations(tensor)):  # output dimension i holds input dimension order[i]
        dim = order.index(dim)
    return dim


def _permutations(tensor: torch.Tensor) -> list[tuple[int, ...]]:
    """The dimension orders of the ``permute`` / ``transpose`` / ``movedim`` chain ``tensor`` comes from (``contiguous``
    copies between them included), last first; empty when it does not come from one."""
    steps, node = [], tensor.grad_fn
    while node is not None:
        name = type(node).__name__
        if name == "PermuteBackward0":
            steps.append(tuple(_signed(d) % tensor.dim() for d in node._saved_dims))
        elif name == "TransposeBackward0":
            order = list(range(tensor.dim()))
            a, b = _signed(node._saved_dim0) % tensor.dim(), _signed(node._saved_dim1) % tensor.dim()
            order[a], order[b] = order[b], order[a]
            steps.append(tuple(order))
        elif name != "CloneBackward0":
            break
        node = node.next_functions[0][0] if node.next_functions else None
    return steps


def _signed(dim: int) -> int:
    """A dimension an autograd node saved (negative ones as unsigned 64-bit integers) as a Python int."""
    return dim - 2 ** 64 if dim >= 2 ** 63 else dim


def _traced_mappings(graph: tp.DependencyGraph, traced: _TracedShapes) -> dict[int, dict[int, object]]:
    """The channel mappings of the flattens (:func:`_pin_flatten`), concatenations and pixel shuffles
    (:func:`_pin_pixel_shuffle`) of ``graph``, from the traced shapes: id of a dependency -> {position in its
    mappings: mapping} (torch-pruning's: 0 for a reshape or an element-wise node, 1 for a concatenation), which
    :class:`_BoundedMappings` pins (torch-pruning infers them again on every group query).

    A flatten ``[N, C, *S] -> [N, C * prod(S)]`` maps channel ``j`` to features ``j * prod(S)`` to ``(j + 1) *
    prod(S) - 1``; input ``i`` of a concatenation along channels holds its channels at the sum of the earlier
    inputs' sizes on (constant inputs, e.g. coordinate maps or a tensor of ones, included). Torch-pruning infers the
    stride and the sizes from the channel counts of the layers around them, which a concatenation after a flatten or
    a flatten after a concatenation misleads (fresh user 75: pooled maps of 64 and 48 channels flattened and
    concatenated into a Linear got strides 1 and 2, so the second map's channels pointed past the Linear's input;
    maps concatenated and then flattened got no offsets at all). Other reshapes and concatenations keep its
    mappings; a model whose forward reshapes in other ways keeps the groups those touch out (a reason each)."""
    pinned: dict[int, dict[int, object]] = {}
    for node in graph.module2node.values():
        if node.type == ops.OPTYPE.RESHAPE and node.grad_fn in traced.reshapes:
            _pin_flatten(pinned, graph, node, *traced.reshapes[node.grad_fn])
        elif node.type == ops.OPTYPE.CONCAT and node.enable_index_mapping and node.grad_fn in traced.cats:
            _pin_concat(pinned, node, traced.cats[node.grad_fn])
        elif _pixel_shuffle(node):
            _pin_pixel_shuffle(pinned, node)
    return pinned


def _pixel_shuffle(node) -> bool:
    """Whether torch-pruning's ``node`` is a pixel shuffle or unshuffle (an element-wise node of its)."""
    return type(node.grad_fn).__name__ in ("PixelShuffleBackward0", "PixelUnshuffleBackward0")


def _pin_pixel_shuffle(pinned: dict[int, dict[int, object]], node) -> None:
    """Pin the channel mapping of a pixel shuffle ``node`` (torch-pruning's element-wise node of
    ``F.pixel_shuffle`` / ``nn.PixelShuffle``, which it maps channel to channel): with upscale factor ``r``, input
    channels ``r * r * k`` to ``r * r * k + r * r - 1`` form output channel ``k`` (ESPCN's sub-pixel convolution, Shi
    et al., CVPR 2016), so they are tied (:func:`_reached_twice`) and leave with input ``k`` of the next layer; a
    pixel unshuffle the other way round."""
    shuffle = type(node.grad_fn).__name__ == "PixelShuffleBackward0"
    block = (node.grad_fn._saved_upscale_factor if shuffle else node.grad_fn._saved_downscale_factor) ** 2
    merge = _Blocks(block, merge=True)
    mappings = (merge, _Blocks(block, merge=False)) if shuffle else (_FlattenIndexMapping(stride=block), merge)
    for source in node.inputs:
        _pin(pinned, node, source, 0, *mappings)


class _Blocks:
    """The channel mapping of ``block`` consecutive input channels that form one output channel (a pixel shuffle's,
    a Linear's features viewed as a map), ``merge``: input channel ``c`` -> output channel ``c // block``, in the
    order given; else output channel ``k`` -> input channels ``block * k`` to ``block * k + block - 1``, of a group
    channel (root) in that block only its own position. Every root of a block reaches ``k``, so together they map
    back to the whole block, in the order they came: the group's query finds the input's channels as it left them and
    does not visit it again (torch-pruning compares them as lists, and merges the visits of a node by position, one
    root each, which loses the block's ties). A root outside the block (a group whose channels are reindexed before
    it) maps to the whole block."""

    def __init__(self, block: int, merge: bool):
        self.block, self.merge = block, merge

    def __call__(self, idxs):
        if self.merge:
            return list(dict.fromkeys(_HybridIndex(idx=i.idx // self.block, root_idx=i.root_idx) for i in idxs))
        return list(dict.fromkeys(_HybridIndex(idx=c, root_idx=i.root_idx) for i in idxs for c in self._inputs(i)))

    def _inputs(self, i) -> Iterable[int]:
        """The input channels output channel ``i.idx`` maps back to for root ``i.root_idx``."""
        if i.root_idx // self.block == i.idx:
            return [i.root_idx]
        return range(i.idx * self.block, (i.idx + 1) * self.block)


def _pin_flatten(pinned: dict[int, dict[int, object]], graph: tp.DependencyGraph, node, before: tuple[int, ...],
                 after: tuple[int, ...], channels: int) -> None:
    """Pin the channel mapping of reshape ``node`` (shapes ``before`` -> ``after``; the channels in dimension
    ``channels`` of ``before`` as far as its permutes tell, :func:`_channel_dim`) when it flattens ``[N, *A, C, *S]``
    to ``[N, prod(A) * C * prod(S)]``: channel ``j`` to features ``j * prod(S)`` to ``(j + 1) * prod(S) - 1`` where
    ``A`` is empty (a map flattened as it is), else those of every position of ``A`` (a map flattened channels last,
    after ``permute(0, 2, 3, 1)``: :class:`_SpreadFlatten`; only where that dimension holds as many channels as
    torch-pruning counts, else the channels are taken to be in dimension 1, e.g. after a channels-last LayerNorm
    permuted back); and when it flattens a map's positions ``[N, C, *S] -> [N, C, prod(S)]`` (``flatten(2)``,
    channel ``j`` to ``j``: torch-pruning reads the counts around it as a flatten's, e.g. into ``[N, prod(S), C]``
    flattened channels last); and when it views features as channels, ``[N, C * prod(S)] -> [N, C, *S]`` where the
    layers after it read ``C`` channels (:func:`_pin_unflatten`)."""
    if len(before) == 2 and len(after) > 2 and before == (after[0], math.prod(after[1:])):
        _pin_unflatten(pinned, graph, node, after[1], math.prod(after[2:]))
        return
    for source in node.inputs:
        if channels != 1 and before[channels] != infer_out_channels_recursively(graph, source, [0]):
            channels = 1
        if channels == 1 and len(before) > 3 and after == (*before[:2], math.prod(before[2:])):
            _pin(pinned, node, source, 0, None, None)
        elif len(before) < 3 or after != (before[0], math.prod(before[1:])):
            continue
        elif channels == 1:
            inner = math.prod(before[2:])
            _pin(pinned, node, source, 0, *[_FlattenIndexMapping(stride=inner, reverse=reverse) if inner > 1 else None
                                            for reverse in (False, True)])
        else:
            _pin(pinned, node, source, 0, *[_SpreadFlatten(graph, source, math.prod(before[1:channels]),
                                                           math.prod(before[channels + 1:]), reverse)
                                            for reverse in (False, True)])


def _pin_unflatten(pinned: dict[int, dict[int, object]], graph: tp.DependencyGraph, node, channels: int,
                   stride: int) -> None:
    """Pin feature ``f`` of reshape ``node``'s input to channel ``f // stride`` of its output (of ``channels``), where
    the layers after it read that many channels (not e.g. ``[N, L * D] -> [N, L, D]``, tokens of ``D`` features):
    torch-pruning sees a flatten and its inverse, ``x.flatten(1).view(N, C, S)`` or a concatenation of flattened maps
    viewed back as one map, as a reshape that keeps the count and maps each feature to a channel of its own."""
    if stride == 1 or any(infer_in_channels_recursively(graph, out, [0]) != channels for out in node.outputs):
        return
    for source in node.inputs:
        _pin(pinned, node, source, 0, _Blocks(stride, merge=True), _Blocks(stride, merge=False))
    for out in node.outputs:  # torch-pruning's own mapping of a reshape that lowers the count is on this side
        _pin(pinned, out, node, 0, None, None)


class _SpreadFlatten:
    """The channel mapping of a flatten with dimensions before the channels, ``[N, *A, C, *S] -> [N, F]``
    (``outer`` = prod(A), ``inner`` = prod(S)): channel ``j`` -> features ``(a * C + j) * inner + s`` for every
    ``a < outer``, ``s < inner``; ``reverse``: feature -> channel. ``C`` is the count torch-pruning infers for
    ``source`` when called (a compaction lowers it as channels go); one it cannot infer raises (torch-pruning's
    group query fails, so the channels stay)."""

    def __init__(self, graph: tp.DependencyGraph, source, outer: int, inner: int, reverse: bool):
        self.graph, self.source, self.outer, self.inner, self.reverse = graph, source, outer, inner, reverse

    def __call__(self, idxs):
        channels = infer_out_channels_recursively(self.graph, self.source, [0])
        if channels is None:
            raise ChannelMappingExplodes("torch-pruning cannot count the channels a reshape after a permute flattens")
        if self.reverse:
            return list({_HybridIndex(idx=i.idx // self.inner % channels, root_idx=i.root_idx) for i in idxs})
        block = channels * self.inner
        return [_HybridIndex(idx=a * block + i.idx * self.inner + s, root_idx=i.root_idx)
                for i in idxs for a in range(self.outer) for s in range(self.inner)]


def _pin_concat(pinned: dict[int, dict[int, object]], node, parts: list[tuple[int, bool]]) -> None:
    """Pin the offsets of concatenation ``node``'s inputs (``parts``: each input's size and whether it requires
    grad) and set its sizes, when the inputs that require grad are torch-pruning's inputs of the node (a constant
    input is no node's)."""
    inputs = [i for i, (_, grad) in enumerate(parts) if grad]
    if len(inputs) != len(node.inputs):
        return
    node.module.concat_sizes = [size for size, _ in parts]  # torch-pruning's pruner lowers them as channels go
    for i, source in zip(inputs, node.inputs):
        _pin(pinned, node, source, 1, *[_ConcatPart(node.module, i, reverse) for reverse in (False, True)])


class _ConcatPart:
    """The channel mapping between input ``index`` of a concatenation (torch-pruning's ``_ConcatOp`` ``cat``) and
    its output, from the input sizes the concatenation has now (``cat.concat_sizes``, which torch-pruning's pruner
    lowers as a compaction removes channels); ``reverse``: output -> input."""

    def __init__(self, cat, index: int, reverse: bool):
        self.cat, self.index, self.reverse = cat, index, reverse

    def __call__(self, idxs):
        start = sum(self.cat.concat_sizes[:self.index])
        return _ConcatIndexMapping([start, start + self.cat.concat_sizes[self.index]], reverse=self.reverse)(idxs)


def _pin(pinned: dict[int, dict[int, object]], node, source, position: int, forward, backward) -> None:
    """Pin ``forward`` on a dependency ``source -> node`` and ``backward`` on one ``node -> source`` not pinned at
    ``position`` yet (an input passed twice, ``cat([x, x])``, has a dependency per use)."""
    for deps, target, mapping in ((source.dependencies, node, forward), (node.dependencies, source, backward)):
        dep = next((d for d in deps if d.target is target and position not in pinned.get(id(d), {})), None)
        if dep is not None:
            pinned.setdefault(id(dep), {})[position] = mapping


def mapping_failure(exc: Exception, model: nn.Module, graph: tp.DependencyGraph) -> str:
    """Why torch-pruning could not enumerate a group, from the exception its group query raised, naming the layers
    with weights of their own that its graph lacks (it traces their ops one by one, e.g. a GRU's, and their channel
    mappings are the usual cause)."""
    detail = f": {exc}" if isinstance(exc, ChannelMappingExplodes) else ""
    unfollowed = [f"{type(module).__name__} {name}" for name, module in model.named_modules()
                  if name and (module not in graph.module2node and any(True for _ in module.parameters(recurse=False))
                               or isinstance(module, nn.RNNBase) and not follows_input(module))]
    if unfollowed:
        detail += f"; layers it does not follow: {', '.join(unfollowed[:3])}{', ...' if len(unfollowed) > 3 else ''}"
    if any(isinstance(module, nn.RNNBase) and not follows_input(module) for module in model.modules()):
        detail += f"; of recurrent layers, {RECURRENT_FOLLOWED}"
    return f"torch-pruning cannot map its channels ({type(exc).__name__}{detail})"


class ChannelMappingExplodes(RuntimeError):
    """torch-pruning mapped a group's channels to more positions than any tensor of the model has (a
    reshape its shape inference misreads, e.g. Swin's window partition): enumerating the group would not
    end (hours, gigabytes), so it is abandoned at once."""


class _BoundedMappings(list):
    """A torch-pruning dependency's index mappings (replaced on every group query), each call checked:
    more than ``limit`` distinct indices raise :class:`ChannelMappingExplodes` (``limit``: four times the largest
    parameter dimension of the model, at least 16384; a real channel mapping never exceeds one dimension; one
    position reached from many group channels counts once: a Linear's features viewed as a map reach each map
    channel from all of its rows, 49 x 49 x 32 positions for 32 channels of 7 x 7).
    ``pinned``: position -> a mapping that the queries do not replace (:func:`_traced_mappings`)."""

    def __init__(self, mappings, limit: int, pinned: Mapping[int, object]):
        super().__init__()
        self.limit, self.pinned = limit, dict(pinned)
        self.extend(self._bounded(self.pinned.get(i, m)) for i, m in enumerate(mappings))

    def __setitem__(self, index, mapping):
        if index not in self.pinned:
            super().__setitem__(index, self._bounded(mapping))

    def _bounded(self, mapping):
        if mapping is None or getattr(mapping, "bounded", False):
            return mapping

        def call(idxs):
            out = mapping(idxs)
            if len(out) > self.limit and len({i.idx for i in out}) > self.limit:
                raise ChannelMappingExplodes(f"{type(mapping).__name__} mapped {len(idxs)} channel indices to "
                                             f"{len(out)}, more than any tensor dimension")
            return out
        call.bounded = True
        return call


#: the exclusion reason of a layer in ``ignored_layers``
IGNORED = "ignored by request"
#: how every reason for leaving a layer out of filter pruning begins
FILTER_PRUNING = "filter pruning: "
#: the reason for the groups whose channels are model outputs (a classifier: never pruned, so never reported)
MODEL_OUTPUTS = f"{FILTER_PRUNING}its channels are model outputs (classes, returned features)"
#: how the exclusion reason of a group that would remove an ignored module's channels ends
IGNORED_COUPLING = "which is in ignored_layers"


def shared_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Modules that hold a parameter another module holds too (tied weights, e.g. ``c2.weight = c1.weight`` or a
    language model's head tied to its embedding): module name -> the names of the other modules holding it, in
    module order. Pruning one of them would give the shared tensor two shapes."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    shared: dict[str, dict[str, None]] = {}  # an ordered set of the others per module
    for names in owners.values():
        for name in names if len(names) > 1 else ():
            shared.setdefault(name, {}).update(dict.fromkeys(other for other in names if other != name))
    return {name: list(others) for name, others in shared.items()}


class _OutsideReads(TorchFunctionMode):
    """Records the weight layers (``owners``: id of a weight -> the names of the layers holding it, several where
    tied) whose weight a torch function receives while none of them runs (``active``: the names of the layers being
    called, kept by hooks)."""

    def __init__(self, owners: Mapping[int, set[str]]):
        super().__init__()
        self.owners, self.active, self.called, self.found = owners, [], set(), set()

    def enter(self, name: str) -> None:
        """The layer ``name`` starts its call (a forward pre-hook)."""
        self.active.append(name)
        self.called.add(name)

    def leave(self) -> None:
        """The innermost layer's call ends (a forward hook; returns None, which keeps the layer's output)."""
        self.active.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in tree_flatten((args, kwargs))[0]:
            names = self.owners.get(id(value), set()) if isinstance(value, torch.Tensor) else set()
            if not names & set(self.active):
                self.found |= names
        return func(*args, **kwargs)


def weights_read_outside(model: nn.Module, inputs: tuple) -> set[str]:
    """The Conv / Linear layers the forward calls whose weight it also reads outside their own call
    (``F.conv2d(x, self.conv.weight)`` beside ``self.conv(x)``), from one analysis forward on ``inputs`` that
    watches every torch function's arguments. torch-pruning follows the layer's own call only, so removing the
    channels the layer reads or writes may break the other read (a dilated conv over the layer's own output did;
    a tied transposed read, ``F.linear(h, self.proj.weight.t())``, did not), which the compaction probe finds
    (:meth:`autocompress.rounds.Pipeline.compactable_space`); this names the read in its messages (fresh user
    62's model was refused whole, blaming views and splits). Empty when the forward fails (it is refused
    elsewhere)."""
    layers = {name: module for name, module in model.named_modules() if is_weight_layer(module)}
    owners: dict[int, set[str]] = {}
    for name, module in layers.items():
        owners.setdefault(id(module.weight), set()).add(name)
    mode = _OutsideReads(owners)
    try:
        with mode:
            hooked_forward(model, inputs, {module: lambda *_: mode.leave() for module in layers.values()},
                           {module: lambda *_, name=name: mode.enter(name) for name, module in layers.items()})
    except Exception:  # noqa: BLE001 - the model's forward is checked (and refused) elsewhere
        return set()
    return mode.found & mode.called  # a layer never called but read is UNREACHED and READ_FUNCTIONALLY


def _layer_problem(module: nn.Module, name: str, ignored: set[str], own_macs: dict[str, int],
                   train_only: bool, attention: set[nn.Module], shared: Mapping[str, list[str]]) -> str:
    if name in ignored:
        return IGNORED
    if name in shared:
        return (f"its weights are shared with {', '.join(shared[name])} (tied): pruning would give them two shapes, "
                "so the tied layers and the channels they read or write keep their size")
    if own_macs.get(name, 0) == 0 and module in attention:
        return FUSED_ATTENTION
    if own_macs.get(name, 0) == 0 and not train_only:
        return UNREACHED
    return ""


#: the reason for a weight layer the forward of the example inputs does not call (in eval or train mode)
UNREACHED = "not reached by the forward pass (eval or train mode)"
#: the reason added for such a layer whose weight the forward reads functionally (``F.linear(x, self.qkv.weight)``)
READ_FUNCTIONALLY = "its weight is read functionally (the module is never called)"


#: the start of the reasons a group's channel mapping cannot be used: torch-pruning maps them outside a consumer's
#: weight, or gives them different numbers of positions in one parameter (both after a fused qkv's split)
UNFOLLOWABLE = "filter pruning: its channels cannot be followed into"
UNEVEN = "filter pruning: channels map unevenly into"


#: the reason for a layer of ``nn.MultiheadAttention`` its fused forward reads without calling it (``out_proj``)
FUSED_ATTENTION = ("nn.MultiheadAttention's fused forward reads its weights without calling it, and the attention "
                   "heads' channels are kept")


#: the reason :meth:`PruningSpace.build` gives for a layer it leaves out of column pruning with ``executed_macs_only``
NO_EXECUTED_SAVING = "column pruning saves no executed MACs here"
#: the reason for a filter group left out because the compact model breaks without its channels (``left_out`` of
#: :meth:`PruningSpace.build`, found by ``compress``'s probe): a channel count written into a reshape, mostly
BREAKS = "the compact model breaks once its channels are removed"
#: the fix for a forward that breaks once channels are removed (:data:`BREAKS`)
BREAKS_FIX = ("compute shapes from the input in forward (e.g. x.flatten(1) instead of x.view(-1, 40 * 7 * 7)); "
              "where it splits concatenated channels (chunk / split) or a module of its own mixes channels (a "
              "normalisation over them), put the layers feeding it in ignored_layers")
#: the reason for a Linear or 1x1 convolution applied at several positions of an item (tokens, pixels): its
#: compact form gathers the kept input channels at every position. An onnxruntime profile of a compact ConvNeXt
#: spent 62 % of its time gathering Linear layers' kept columns, and the model ran 2.5x slower than its base at
#: half the MACs; a fresh user's MobileNet-style net with nine column-pruned 1x1 convs ran 0.64x as fast as its
#: base at batch 1 (BENCHMARKS.md, sessions 25 and 26); filter pruning of the layer that produces those channels
#: removes them without a gather
GATHERED = "column pruning costs more than it saves here"


def _column_layer(name: str, module: nn.Module, param_names: dict[int, str],
                  layer_macs: dict[str, tuple[str, int]], excluded: dict[str, list[str]],
                  executed_only: bool, batch: int) -> ColumnLayer | None:
    transposed = is_transposed(module)
    if transposed and module.groups > 1:
        _exclude(excluded, name, "column pruning: grouped transposed convolution")
        return None
    rows = module.weight.shape[out_dim(module)]
    size = module.weight.numel() // rows
    if size < 2:
        _exclude(excluded, name, "column pruning: a single column")
        return None
    area = math.prod(module.kernel_size) if isinstance(module, nn.modules.conv._ConvNd) else 1
    gemm_capable = isinstance(module, nn.Conv2d) and gemm_possible(rows, area, module.groups)
    if executed_only and area > 1 and not gemm_capable:
        kernel = "x".join(map(str, module.kernel_size))
        groups = f" in {module.groups} groups" if module.groups > 1 else ""
        _exclude(excluded, name, f"{NO_EXECUTED_SAVING} (a {kernel} kernel, {rows} filters{groups}: its compact "
                 "form runs the dense conv over the kept input channels)")
        return None
    if executed_only and area == 1 and \
            (positions := layer_macs[name][1] / max(1, batch * module.weight.numel())) > 1:
        what = "Linear" if isinstance(module, nn.Linear) else "1x1 convolution"
        _exclude(excluded, name, f"{GATHERED} (a {what} applied at {positions:.3g} positions an item: its compact "
                 "form gathers the kept input columns at each, slower than the MACs saved)")
        return None
    return ColumnLayer(name=name, param=param_names[id(module.weight)], rows=rows, size=size,
                       params=module.weight.numel(), macs=layer_macs[name][1], transposed=transposed, area=area,
                       gemm_capable=gemm_capable)


def _build_groups(model, inputs, candidates, names, param_names, excluded, layer_macs,
                  train_only, ignored: set[str], left_out: Mapping[str, str],
                  recurrent: Mapping[str, nn.Module] | None = None) -> list[FilterGroup]:
    """Coupled channel groups from torch-pruning's DependencyGraph, verified by one probe forward; a group
    that would remove an ``ignored`` module's own channels is excluded (its input channels may go), and a group
    named in ``left_out`` is excluded with the reason given there. The roots are the ``candidates`` (Conv /
    Linear) and the ``recurrent`` layers whose hidden units are pruned (:func:`autocompress.recurrent.
    hidden_prunable`).
    A model torch-pruning cannot trace gets no filter groups (the reason is recorded under the name
    ``""``, the model); a module whose group torch-pruning cannot enumerate is excluded by name."""
    try:
        graph = trace_graph(model, inputs, train_only)
    except UserError as exc:
        _exclude(excluded, "", f"filter pruning: {str(exc)}")
        return []
    weight_macs = dict(layer_macs.values())  # weight name -> MACs of the layer multiplying it
    # modules whose output is a model output (torch-pruning adds an output node only after other ops, and none for
    # an output that other ops also read: a model returning its pooled features besides its embedding)
    sinks = {node.module for node in graph.module2node.values()
             if not node.outputs or node.grad_fn in graph.model_outputs}
    norm_dims = channel_dims(model, inputs)
    groups: list[FilterGroup] = []
    modules = dict(model.named_modules())
    order = {name: position for position, name in enumerate(modules)}
    visited: set[nn.Module] = set()
    claimed: dict[tuple[str, int], dict[int, str]] = {}
    roots = {**candidates, **(recurrent or {})}
    for name, module in sorted(roots.items(), key=lambda item: order[item[0]]):  # module order
        if module in visited or module not in graph.module2node:
            continue
        try:
            pruner = graph.get_pruner_of_module(module)
            size = pruner.get_out_channels(module)
            tp_group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(size)))
        except Exception as exc:  # noqa: BLE001 - torch-pruning's index mapping fails on some graphs
            _exclude(excluded, name, f"filter pruning: {mapping_failure(exc, model, graph)}")
            continue
        slices, members, problem, blocks = _slices(tp_group, names, param_names, candidates, sinks, size,
                                                   norm_dims, ignored)
        if size > 1:  # one channel reaches others only by broadcast (an attention pooling's score): not their group
            visited.update(members)
        problem = problem or _past_extent(model, slices)
        if name in left_out:
            problem = left_out[name]
        if not problem and size < 2:
            problem = "filter pruning: a single output channel"
        problem = problem or _uneven(slices, size)
        if problem.startswith((UNFOLLOWABLE, UNEVEN)):
            fused = _fused_qkv(module, tp_group, names, param_names, candidates, ignored)
            if fused:  # q, k and v channels: torch-pruning's ties of the 3 * size outputs do not apply
                slices, size, problem, blocks = fused, size // 3, "", []
        if not problem:
            problem = _claim(claimed, name, slices)
        if problem:
            _exclude(excluded, name, problem)
            continue
        ties, problem = _ties(slices, size, modules, blocks)
        if problem:
            _exclude(excluded, name, problem)
            continue
        params = sum(s.positions * _stride(model, s) for s in slices)
        macs = sum(s.positions * _stride(model, s) * weight_macs[s.param]
                   // model.get_parameter(s.param).numel() for s in slices if s.role in ("weight", "input"))
        groups.append(FilterGroup(name=name, size=size, slices=tuple(slices), params=params, macs=macs,
                                  ties=ties))
    unreached = {name: modules[name] for name, (_, macs) in layer_macs.items()  # (an LSTM's weights are no modules)
                 if macs == 0 and name in modules and modules[name] not in train_only}
    return _functionally_read(model, inputs, _verified(model, inputs, groups, excluded), excluded, unreached)


def _past_extent(model: nn.Module, slices: list[Slice]) -> str:
    """"" or a problem if torch-pruning maps a group's channels past the end of a parameter's dimension (a norm over
    each attention head, ``LayerNorm(head_dim)`` on q and k, reads the channels of every head at the same
    entries)."""
    for s in slices:
        extent = model.get_parameter(s.param).shape[s.dim]
        if s.index.numel() and int(s.index.max()) >= extent:
            return (f"filter pruning: its channels map past the {extent} entries of {s.param} (a module over part "
                    f"of them, e.g. a norm over each attention head)")
    return ""


def fused_qkv_width(module: nn.Module) -> int | None:
    """``D`` when ``module`` may be an attention's fused query-key-value projection: a Linear (exactly) of ``3 D``
    outputs, ``D >= 2`` (``q``, ``k`` and ``v`` as consecutive thirds); else None."""
    if type(module) is not nn.Linear or module.out_features % 3 or module.out_features < 6:
        return None
    return module.out_features // 3


def fused_qkv_output(module: nn.Module, tp_group) -> nn.Linear | None:
    """The output projection of a fused qkv ``module`` (:func:`fused_qkv_width`), from ``module``'s torch-pruning
    group of its output channels: the only other member with parameters, a Linear of ``D`` inputs reading them
    (``v``'s channels, through the heads); None when there is another (a free parameter, a norm, a second
    writer) or it is no such Linear."""
    width = fused_qkv_width(module)
    if width is None:
        return None
    readers = set()
    for dep, _ in tp_group:
        target = dep.target.module
        if isinstance(target, nn.Parameter):
            return None  # a free parameter of the channels
        if target is module or not isinstance(target, nn.Module) or not list(target.parameters(recurse=False)):
            continue  # the projection itself, or a parameter-free op of the graph
        if not is_weight_layer(target) or dep.handler.__name__ == "prune_out_channels":
            return None
        readers.add(target)
    out = next(iter(readers)) if len(readers) == 1 else None
    return out if type(out) is nn.Linear and out.in_features == width else None


def _fused_qkv(module: nn.Module, tp_group, names: dict, param_names: dict[int, str],
               candidates: Mapping[str, nn.Module], ignored: set[str]) -> list[Slice] | None:
    """The slices of an attention's fused query-key-value projection (:func:`fused_qkv_output`; ``q``, ``k`` and
    ``v`` split by ``chunk(3)`` or ``reshape(B, N, 3, heads, -1)``), neither ignored and its output projection
    prunable: channel ``c`` is rows ``c``, ``D + c`` and ``2 D + c`` of the projection (the score term ``q_c k_c``
    and value channel ``c``) and input ``c`` of the output projection. None otherwise. torch-pruning maps these
    channels unevenly or outside the output projection's weight (its graph does not follow the thirds through the
    attention); the compact model's exactness is left to the compaction probe (equal heads,
    :mod:`autocompress.attention`)."""
    out = fused_qkv_output(module, tp_group)
    if out is None or names[module] in ignored or names[out] not in candidates:
        return None
    width, name = out.in_features, names[module]
    channels = torch.arange(width)
    rows, triple = torch.cat([channels, channels + width, channels + 2 * width]), channels.repeat(3)
    fused = [Slice(param_names[id(module.weight)], name, "weight", 0, rows, triple)]
    if module.bias is not None:
        fused.append(Slice(param_names[id(module.bias)], name, "bias", 0, rows, triple))
    return fused + [Slice(param_names[id(out.weight)], names[out], "input", 1, channels, channels)]


def _with_heads(group: FilterGroup, heads: int, free_macs: int = 0) -> FilterGroup:
    """``group`` with :attr:`FilterGroup.heads` and :attr:`FilterGroup.free_macs` set (the latter added to its
    ``macs``). Raises ValueError for a count that does not split it into heads of two channels or more, or a group
    with ties."""
    if heads != 1 and (heads < 1 or group.size % heads or group.size // heads < 2 or group.ties is not None):
        raise ValueError(f"group {group.name} of {group.size} channels cannot form {heads} heads")
    if heads == 1 and not free_macs:
        return group
    return replace(group, heads=heads, free_macs=free_macs, macs=group.macs + free_macs)


def _slices(tp_group, names, param_names, candidates, sinks, size, norm_dims, ignored: set[str] = frozenset()
            ) -> tuple[list[Slice], set, str, list[tuple[torch.Tensor, torch.Tensor, str, str]]]:
    """Parameter slices of one torch-pruning group of ``size`` channels, the modules whose rows it prunes,
    a problem ("" if the group can be pruned) and the ties of GroupNorms without affine parameters and of
    channels torch-pruning records at one channel of one tensor (``(tie key of each position, channels, what ties
    them, how to untie them)``, see :func:`_ties` and :func:`_reached_twice`).

    A member whose pruned dimension has size 1 while the group has more channels is a broadcast (a
    one-channel gate multiplied over all channels): it does not couple and is skipped. An ``ignored`` module
    keeps its own channels (a problem when the group would remove them) but reads fewer input channels."""
    slices: list[Slice] = []
    members: set = set()
    blocks: list[tuple[torch.Tensor, torch.Tensor, str, str]] = []
    problem = ""
    for item in tp_group:
        dep, idxs, root = item.dep, item.idxs, item.root_idxs
        node, target = dep.target, dep.target.module
        index = torch.as_tensor(list(idxs), dtype=torch.long)
        channel = torch.as_tensor(list(root), dtype=torch.long)
        out_side = dep.handler.__name__ == "prune_out_channels"
        if node.type == ops.OPTYPE.OUTPUT or (target in sinks and out_side):
            problem = problem or MODEL_OUTPUTS
            continue
        if isinstance(target, nn.Parameter):
            name = param_names.get(id(target), "")
            dim = node.pruning_dim % target.dim()
            if target.shape[dim] == 1 < size:
                continue
            several = any(s != 1 for d, s in enumerate(target.shape) if d != dim)
            if name.rpartition(".")[0] in ignored:
                problem = problem or _ignored_problem(name)
            elif index.numel() and int(index.max()) >= target.shape[dim] or several and target.shape[dim] != size:
                # (Swin's relative position bias table [positions, heads], mapped onto the stream's channels)
                problem = problem or f"filter pruning: free parameter {name} is not per-channel"
            else:  # per channel, or several entries per channel (a position embedding [1, tokens, C])
                slices.append(Slice(name, name.rpartition(".")[0], "norm", dim, index, channel))
            continue
        if not isinstance(target, nn.Module) or target not in names:
            continue  # torch-pruning's placeholder ops (add, cat, view, ...) own no parameters
        mname = names[target]
        if mname in ignored and not is_weight_layer(target) and _holds_tensors(target):
            problem = problem or _ignored_problem(mname)  # e.g. a BatchNorm's entries of the channels
            continue
        if is_weight_layer(target):
            dim = out_dim(target) if out_side or _is_depthwise(target) else 1 - out_dim(target)
            extent = _channels(target, out_side or _is_depthwise(target))
            if extent == 1 < size:
                continue  # a broadcast, e.g. a one-channel spatial gate
            if out_side:
                members.add(target)
            if mname in ignored and (out_side or _is_depthwise(target)):
                problem = problem or _ignored_problem(mname)
                continue
            if mname not in candidates and mname not in ignored:
                problem = problem or f"filter pruning: couples with {mname}, which is not pruned"
                continue
            if is_grouped(target) and target.transposed:
                problem = problem or f"filter pruning: couples with grouped transposed convolution {mname}"
                continue
            if _is_depthwise(target) and target.out_channels != target.in_channels:
                problem = problem or f"filter pruning: couples with channel-multiplier convolution {mname}"
                continue
            if bool((index >= extent).any()):
                why = (", a Linear applied after a transpose (as an MLP-Mixer's token mixing is): it reads them as "
                       "another dimension than its input features, which torch-pruning maps them onto"
                       if getattr(node, "reads_across", False) else
                       " (torch-pruning maps them outside its weight, as after a torch.split or chunk of a layer's "
                       "output, e.g. an attention's qkv projection chunked into q, k and v, or a reshape that moves "
                       "channels among other dimensions)")
                problem = problem or (f"{UNFOLLOWABLE} {mname}{why}; these channels stay, other layers are pruned "
                                      "as usual")
                continue
            wname = param_names[id(target.weight)]
            if out_side or _is_depthwise(target):
                slices.append(Slice(wname, mname, "weight", dim, index, channel))
                if target.bias is not None:
                    slices.append(Slice(param_names[id(target.bias)], mname, "bias", 0, index, channel))
            elif is_grouped(target):  # weight dim 1 holds the channels within one conv group
                per_group = target.in_channels // target.groups
                slices.append(Slice(wname, mname, "input", dim, index % per_group, channel, index, target.groups))
            else:
                slices.append(Slice(wname, mname, "input", dim, index, channel))
        elif isinstance(target, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            for p in (target.weight, target.bias):
                if p is not None:
                    slices.append(Slice(param_names[id(p)], mname, "norm", 0, index, channel))
        elif isinstance(target, nn.Embedding) and out_side:  # a token table [vocab, C]: column c is channel c
            slices.append(Slice(param_names[id(target.weight)], mname, "norm", 1, index, channel))
        elif isinstance(target, nn.PReLU):
            if target.num_parameters > 1:
                slices.append(Slice(param_names[id(target.weight)], mname, "norm", 0, index, channel))
        elif is_layer_norm(target) and target.weight is not None and norm_dims.get(target) is not None:
            for p in (target.weight, target.bias):  # compaction makes it a PaddedLayerNorm (exact)
                if p is not None:
                    slices.append(Slice(param_names[id(p)], mname, "norm", 0, index, channel))
        elif is_group_norm(target):
            if target.weight is None:  # no affine entries to zero: its groups leave whole (ties)
                blocks.append((channel_groups(target)[index], channel, f"GroupNorm {mname} without affine parameters",
                               "give it affine=True or more groups"))
            for p in (target.weight, target.bias):  # compaction makes it a PaddedGroupNorm (exact)
                if p is not None:
                    slices.append(Slice(param_names[id(p)], mname, "norm", 0, index, channel))
        elif isinstance(target, (nn.LayerNorm, nn.GroupNorm, PaddedLayerNorm)):
            problem = problem or f"filter pruning: {type(target).__name__} {mname} {_norm_problem(target, norm_dims)}"
        elif hidden_prunable(target) and out_side and mname not in ignored:
            members.add(target)
            for attr, role, dim, at, of in hidden_entries(target, index, channel):
                slices.append(Slice(param_names[id(getattr(target, attr))], mname, role, dim, at, of))
            if target.bidirectional:  # both directions share the hidden size: unit j's two features leave together
                blocks.append((hidden_ties(target, index), channel, f"bidirectional {type(target).__name__} {mname}",
                               ""))
        elif follows_input(target) and not out_side and mname not in ignored:
            if index.numel() and int(index.max()) >= target.input_size:
                problem = problem or (f"filter pruning: its channels map past the input features of "
                                      f"{type(target).__name__} {mname}")
            for weight in input_weights(target):  # the first layer's, each direction: [gates x hidden, input]
                slices.append(Slice(param_names[id(weight)], mname, "input", 1, index, channel))
        else:
            problem = problem or f"filter pruning: couples with {type(target).__name__} {mname}, which mixes channels"
    return _merge(slices), members, problem, blocks + _reached_twice(tp_group, size)


def _recurrent_macs(model: nn.Module, names: dict, param_names: dict[int, str],
                    own_macs: Mapping[str, int]) -> dict[str, tuple[str, int]]:
    """Weight name -> (weight name, MACs) of the input weights of each recurrent layer whose input filter pruning
    follows (:func:`autocompress.recurrent.input_weights`), and of all its weight matrices where its hidden units
    are pruned (:func:`autocompress.recurrent.hidden_prunable`): its own MACs (:func:`autocompress.metrics.
    count_macs`) in proportion to the weight's entries among all its weight matrices, as every step multiplies
    each once."""
    out = {}
    for module in model.modules():
        if follows_input(module):
            weights = [w for w in module.parameters(recurse=False) if w.dim() == 2]
            entries = sum(w.numel() for w in weights)
            for weight in weights if hidden_prunable(module) else input_weights(module):
                name = param_names[id(weight)]
                out[name] = (name, own_macs.get(names[module], 0) * weight.numel() // entries)
    return out


def _holds_tensors(module: nn.Module) -> bool:
    """``module`` has parameters or buffers of its own (a norm's per-channel entries; not a ReLU, Dropout, ...)."""
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _ignored_problem(name: str) -> str:
    """Why a group that would remove the channels of ``name``, in ``ignored_layers``, is not pruned."""
    return f"filter pruning: its channels are also {name}'s, {IGNORED_COUPLING}"


def _norm_problem(norm: nn.Module, norm_dims: dict) -> str:
    """Why the channels a LayerNorm / GroupNorm normalises are not pruned (completes "<type> <name> ...")."""
    if isinstance(norm, nn.GroupNorm):
        return "has its own forward, so how it groups the channels is unknown; use nn.GroupNorm itself"
    if not is_layer_norm(norm):
        return "normalises over several dimensions; prune the layers between such norms instead"
    if norm.weight is None:
        return "has no affine weight, so a removed channel's output is not zero; give it elementwise_affine"
    if norm not in norm_dims:
        return "is not called by the eval-mode forward, so its channel dimension is unknown"
    return ("has no dimension of its input that is unambiguously the channels (several or none have its "
            "size); feed it another input size (example_inputs)")


def _merge(slices: list[Slice]) -> list[Slice]:
    """One slice per (parameter, dim): torch-pruning lists a tensor once per dependency path."""
    by_key: dict[tuple[str, int], Slice] = {}
    for s in slices:
        key = (s.param, s.dim)
        if key in by_key:
            old = by_key[key]
            features = torch.cat([old.features, s.features])
            _, first = _unique_first(features)
            index, channel = torch.cat([old.index, s.index])[first], torch.cat([old.channel, s.channel])[first]
            s = Slice(old.param, old.module, old.role, old.dim, index, channel,
                      None if old.feature is None else features[first], old.groups)
        by_key[key] = s
    return list(by_key.values())


_SAME_CHANNELS = (ops.OPTYPE.BN, ops.OPTYPE.ELEMENTWISE, ops.OPTYPE.DEPTHWISE_CONV, ops.OPTYPE.PRELU, ops.OPTYPE.IN)


def _same_channels(node) -> bool:
    """Whether torch-pruning's ``node`` outputs its inputs' channels at the same positions (a norm, an element-wise
    op other than a pixel shuffle, a depthwise conv, a slice of the channels' first ones)."""
    if _pixel_shuffle(node):
        return False
    if node.type == ops.OPTYPE.SLICE:
        op = node.module
        return op.dim == 1 and not op.start and op.step in (None, 1)
    return node.type in _SAME_CHANNELS


def _reached_twice(tp_group, size: int) -> list[tuple[torch.Tensor, torch.Tensor, str, str]]:
    """Ties of the ``size`` group channels that reach one channel of one tensor by two paths: ``(slot of each
    reach, channel, what ties them, "")`` (:func:`tie_classes`), or none.

    torch-pruning visits each node of a group once and records the group channel of the path it came by. A ghost
    module (GhostNet, Han et al., CVPR 2020) concatenates a layer's output ``a`` with a depthwise convolution of it,
    so channel ``j`` of ``a`` and channel ``|a| + j`` of the concatenation are one channel of the depthwise conv: the
    group records ``j`` at some nodes of the block and ``|a| + j`` at others. A slot is a channel position of a
    node's output (or of a layer's input); slots of a node that keeps its input's channel positions
    (:func:`_same_channels`) are the slots of its inputs; group channels recorded at one slot are tied."""
    sets = _DisjointSets()
    reached: dict = {}
    nodes: dict = {}
    for item in tp_group:
        node, out_side = item.dep.target, item.dep.handler.__name__ == "prune_out_channels"
        if any(int(channel) >= size for channel in item.root_idxs):
            continue  # a reshape's mapping onto several channels per position (tokens x channels)
        for i, channel in zip(item.idxs, item.root_idxs):
            reached.setdefault((id(node), out_side, int(i)), set()).add(int(channel))
            if out_side:
                nodes.setdefault(id(node), (node, set()))[1].add(int(i))
    for node, positions in nodes.values():
        if _same_channels(node):
            for source in node.inputs:
                for i in positions:
                    sets.union((id(node), True, i), (id(source), True, i))
    slots = {slot: n for n, slot in enumerate(dict.fromkeys(sets.find(slot) for slot in reached))}
    keys = [slots[sets.find(slot)] for slot, channels in reached.items() for _ in channels]
    channels = [c for cs in reached.values() for c in cs]
    if len(set(zip(keys, channels))) == len(set(keys)):
        return []
    return [(torch.tensor(keys), torch.tensor(channels), "reaching one channel of a later tensor by two paths (as a "
             "ghost module's layer and the depthwise convolution of it concatenated to it do, or torch-pruning's "
             "reading of a view + permute that moves channels into space, a hand-written depth-to-space)", "")]


def _unique_first(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values of ``index`` (sorted) and the position of each one's first occurrence."""
    uniq, inverse = torch.unique(index, return_inverse=True)
    first = torch.full((uniq.numel(),), index.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(index.numel()), reduce="amin")
    return uniq, first


def _ties(slices: list[Slice], size: int, modules: dict[str, nn.Module],
          blocks: Sequence[tuple[torch.Tensor, torch.Tensor, str, str]] = ()) -> tuple[torch.Tensor | None, str]:
    """Tie classes of a group's channels from its grouped convolutions and GroupNorms without affine
    parameters, or a problem.

    A compact grouped conv must lose the same positions from every conv group (its weight is shared by
    position within the group), so the channels at positions ``p`` and ``p + j * C/groups`` of a grouped
    conv's input or output are tied. A GroupNorm without affine parameters outputs zeros for a removed
    channel only when its whole norm group is removed, so the channels of each of its groups are tied
    (``blocks``: ``(norm group of each position, channels, what ties them, how to untie them)``, and the channels
    that reach one tensor channel by two paths, :func:`_reached_twice`). Returns ``(ties int64 [size] or None,
    "")`` or ``(None, problem)`` when a grouped conv also reads / writes channels of other groups, the classes differ in
    size, or there is only one class."""
    keyed: list[tuple[torch.Tensor, torch.Tensor, str, str]] = list(blocks)  # (tie key, channels, what, fix)
    for s in slices:
        module = modules[s.module]
        if not is_grouped(module) or s.role not in ("weight", "input"):
            continue
        extent = _channels(module, s.role == "weight")
        if not torch.equal(torch.unique(s.features), torch.arange(extent)):
            return None, f"filter pruning: grouped convolution {s.module} also reads or writes other channels"
        keyed.append((s.features % (extent // module.groups), s.channel, f"grouped convolution {s.module}", ""))
    if not keyed:
        return None, ""
    ties = tie_classes(size, [(key, channels) for key, channels, _, _ in keyed])
    counts = torch.bincount(ties)
    if not bool((counts == counts[0]).all()) or counts.numel() < 2:
        _, _, what, fix = keyed[0]
        if counts.numel() < 2:
            return None, f"filter pruning: {what} ties all channels together" + (f"; {fix}" if fix else "")
        return None, f"filter pruning: {what} ties channels unevenly"
    return ties, ""


def tie_classes(size: int, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Tie classes of ``size`` channels, int64 [size] numbered 0.. in order of first channel.

    Each pair ``(keys [n], channels [n])`` ties the channels with equal keys (a grouped conv's positions
    modulo its conv-group width, a GroupNorm's group of each position); classes are the connected sets."""
    sets = _DisjointSets()
    for keys, channels in pairs:
        first: dict[int, int] = {}
        for k, c in zip(keys.tolist(), channels.tolist()):
            sets.union(first.setdefault(k, c), c)
    roots = torch.tensor([sets.find(c) for c in range(size)])
    return torch.unique(roots, return_inverse=True)[1]


class _DisjointSets:
    """Union-find over hashable, ordered items (channels; :func:`_reached_twice`'s slots): each set's root is its
    smallest item, so :func:`tie_classes` numbers classes in order of first channel."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, item):
        """The root of ``item``'s set (``item`` itself when never joined)."""
        while self.parent.setdefault(item, item) != item:
            item = self.parent[item] = self.parent[self.parent[item]]
        return item

    def union(self, a, b) -> None:
        """Join the sets of ``a`` and ``b``."""
        a, b = self.find(a), self.find(b)
        self.parent[max(a, b)] = min(a, b)


def _uneven(slices: list[Slice], size: int) -> str:
    """"" or a problem if some slice gives the group's channels different numbers of positions. A layer that
    produces part of the group's channels (an output-side slice reaching some channels once each, the rest not at
    all) is one branch of a concatenation: the branches lose their channels independently, as the compact
    concatenation does (a stem -> [1x1, 3x3] -> cat -> + stem block); a layer that reads part of them (an input
    slice) reads a split whose sizes the forward fixes (``chunk`` for a GLU gate)."""
    for s in slices:
        per_channel = torch.bincount(s.channel, minlength=size)
        if bool((per_channel == per_channel[0]).all()) or s.role != "input" and is_recurrent_param(s.param):
            continue  # (a bidirectional layer's own weights of one direction: half of its units, tied to the rest)
        reaching = int((per_channel > 0).sum())
        if not bool((per_channel[per_channel > 0] == per_channel.max()).all()):
            return f"{UNEVEN} {s.param}"
        if s.role == "input" or per_channel.max() > 1:  # the rest reach it not at all
            return (f"{UNEVEN} {s.param}: {reaching} of the {size} channels reach it (the output is split into "
                    "parts whose sizes the forward fixes, e.g. by chunk for a GLU gate, or reshaped into fewer "
                    "channels, e.g. a Linear's features viewed as a map); compute each part with its own layer to "
                    "prune them")
    return ""


def _claim(claimed: dict[tuple[str, int], dict[int, str]], name: str, slices: list[Slice]) -> str:
    """Record the entries a group owns; "" or a problem if an earlier group owns one of them."""
    for s in slices:
        owners = claimed.get((s.param, s.dim), {})
        clash = [owners[i] for i in s.index.tolist() if i in owners]
        if clash:
            return f"filter pruning: shares {s.param} entries with group {clash[0]}"
    for s in slices:
        claimed.setdefault((s.param, s.dim), {}).update({i: name for i in s.index.tolist()})
    return ""


def _stride(model: nn.Module, s: Slice) -> int:
    """Entries of the parameter per position along ``s.dim``."""
    shape = model.get_parameter(s.param).shape
    return math.prod(shape) // shape[s.dim]


def _probe_inputs(inputs: tuple, gen: torch.Generator) -> tuple:
    """Two random samples shaped like one item of each example input (``[2, ...]``, :func:`~autocompress.analysis.
    random_like`)."""
    return tuple(random_like(t, 2, gen) for t in inputs)


@torch.no_grad()
def _verified(model: nn.Module, inputs: tuple, groups: list[FilterGroup],
              excluded: dict[str, list[str]]) -> list[FilterGroup]:
    """Keep the groups whose consumer input slices read only the group's channels.

    One analysis forward on two random samples with a seeded random half of the channels of every group
    removed (weights zeroed, restored afterwards): every consumer input slice of those channels must be
    identical for both samples. A slice torch-pruning mapped wrongly (e.g. through a channel shuffle)
    reads live features and differs. A random half rather than one fixed channel: a permutation rarely
    maps it onto itself, while it maps the last (or first) channel onto itself in a channel shuffle.

    A group whose removed channels alone make a consumer's input NaN or infinite (the forward divides by the
    norm of the layer's filters, or takes a log of its outputs) cannot be pruned: it is left out, naming the
    consumer, and the rest verified again.

    Raises:
        UserError: the forward is NaN or infinite on the random samples with no channel removed.
    """
    if not groups:
        return groups
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    probe = _probe_inputs(inputs, gen)
    removed = {g.name: _removed_half(g, gen) for g in groups}
    watched: dict[str, list[tuple[str, torch.Tensor]]] = {}  # consumer -> (group, input index)
    for g in groups:
        for s in g.slices:
            if s.role == "input":
                watched.setdefault(s.module, []).append((g.name, s.features[removed[g.name][s.channel]]))
    modules = dict(model.named_modules())
    seen = _consumer_inputs(model, probe, [(s, removed[g.name]) for g in groups for s in g.slices], watched)
    bad: dict[str, str] = {}
    for consumer, checks in watched.items():
        feature_dim = 1 if isinstance(modules[consumer], nn.modules.conv._ConvNd) else -1
        for x in seen.get(consumer, []):
            for gname, index in checks:
                part = x.index_select(feature_dim, index.to(x.device))
                if not bool(torch.isfinite(part).all()):
                    return _verified(model, inputs, _finite(model, inputs, probe, groups, removed, watched,
                                                            excluded), excluded)
                if not torch.allclose(part[0], part[1], rtol=0, atol=1e-6 * (1 + part.abs().max().item())):
                    bad.setdefault(gname, consumer)
    kept = []
    for g in groups:
        if g.name in bad:
            _exclude(excluded, g.name, f"filter pruning: torch-pruning's channel mapping into {bad[g.name]} "
                     "could not be verified (its channels reach it mixed, e.g. by a reshape, a matrix product or "
                     "a shuffle)")
        else:
            kept.append(g)
    return kept


def _removed_half(group: FilterGroup, gen: torch.Generator) -> torch.Tensor:
    """``[group.size]`` bool: a seeded random half of the group's channels (whole tie classes: a GroupNorm without
    affine zeroes only whole groups)."""
    gone = torch.randperm(group.classes, generator=gen)[:max(1, group.classes // 2)]
    return torch.isin(group.ties, gone) if group.ties is not None else torch.isin(torch.arange(group.size), gone)


def _consumer_inputs(model: nn.Module, probe: tuple, zeroed: Sequence[tuple[Slice, torch.Tensor]],
                     consumers: Iterable[str]) -> dict[str, list[torch.Tensor]]:
    """The inputs each of ``consumers`` receives in one analysis forward on ``probe`` with the entries of each slice
    whose channel is flagged in its ``[size]`` bool mask zeroed (restored afterwards); consumer -> one tensor per
    call."""
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    for s, gone in zeroed:
        if s.param not in saved:
            saved[s.param] = params[s.param].detach().clone()
        params[s.param].index_fill_(s.dim, s.index[gone[s.channel]].to(params[s.param].device), 0)
    seen: dict[str, list[torch.Tensor]] = {}
    modules = dict(model.named_modules())

    def hook(name):
        def fn(_module, args, _output):
            seen.setdefault(name, []).append(args[0].detach())
        return fn

    try:
        hooked_forward(model, probe, {modules[name]: hook(name) for name in consumers})
    finally:
        for name, value in saved.items():
            params[name].copy_(value)
    return seen


def _finite(model: nn.Module, inputs: tuple, probe: tuple, groups: list[FilterGroup],
            removed: Mapping[str, torch.Tensor], consumers: Iterable[str],
            excluded: dict[str, list[str]]) -> list[FilterGroup]:
    """``groups`` without those whose removed half alone makes a consumer's input NaN or infinite (left out, naming
    the consumer and any read of the group's weights outside their layers); refused when the forward is not
    finite with nothing removed, or only with several groups removed together."""
    def broken(chosen: Iterable[FilterGroup]) -> str | None:
        seen = _consumer_inputs(model, probe, [(s, removed[g.name]) for g in chosen for s in g.slices], consumers)
        return next((name for name, xs in seen.items() for x in xs if not bool(torch.isfinite(x).all())), None)

    consumer = broken([])
    if consumer is None:
        outside = weights_read_outside(model, inputs)
        kept = []
        for g in groups:
            alone = broken([g])
            if alone is None:
                kept.append(g)
                continue
            reads = sorted({s.module for s in g.slices} & outside)
            read = f"; {', '.join(reads)}'s weight is also read outside the layer" if reads else ""
            _exclude(excluded, g.name, f"filter pruning: removing its channels makes {alone}'s input NaN or "
                     f"infinite (a division by their weights' norm, a log of their outputs){read}")
        if len(kept) < len(groups):
            return kept
        consumer = broken(groups)
    raise UserError(f"the model computes NaN or infinite values at {consumer}'s input on random inputs shaped "
                    "like example_inputs (numbers drawn in their range, masks from their own items)",
                    "make the forward finite for any input: clamp what a log, sqrt or division reads, e.g. "
                    "x.clamp(min=1e-6).log(), mask.sum(1).clamp(min=1)")


def _functionally_read(model: nn.Module, inputs: tuple, groups: list[FilterGroup], excluded: dict[str, list[str]],
                       unreached: Mapping[str, nn.Module]) -> list[FilterGroup]:
    """Exclude the groups whose channels a Conv / Linear weight reads functionally: its module is never
    called, but its weight is used (``F.linear(x, self.qkv.weight)`` in torchvision's Swin). torch-pruning
    does not see such a reader, so its input width would stay while the channels go.

    Test: the gradient of the summed outputs with respect to each such weight, on the probe inputs; a group
    with a random half of its channels removed (as in :func:`_verified`) that makes input columns of the
    gradient exactly zero which were not zero before feeds that weight directly. One forward and backward
    per group, only when the model has such weights."""
    params = {name: module.weight for name, module in unreached.items()}
    if not groups or not params:
        return groups
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    probe = _probe_inputs(inputs, gen)
    model_params = dict(model.named_parameters())

    def zero_columns(zeroed: Sequence[Slice]) -> dict[str, torch.Tensor]:
        saved = {s.param: model_params[s.param].detach().clone() for s in zeroed}
        flags = {name: p.requires_grad for name, p in params.items()}
        try:
            with preserved_state(model), torch.enable_grad(), torch.random.fork_rng(devices=[]):
                with torch.no_grad():
                    for s in zeroed:
                        model_params[s.param].index_fill_(s.dim, s.index.to(model_params[s.param].device), 0)
                for p in params.values():
                    p.requires_grad_(True)
                model.eval()
                out = sum(t.float().sum() for t in output_tensors(model(*probe)))
                grads = torch.autograd.grad(out, list(params.values()), allow_unused=True)
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    model_params[name].copy_(value)
            for name, p in params.items():
                p.requires_grad_(flags[name])
        return {n: _zero_slices(g, 1 - out_dim(unreached[n])) for n, g in zip(params, grads) if g is not None}

    try:
        before = zero_columns([])
    except Exception:  # noqa: BLE001 - a model that cannot run a backward pass keeps its groups
        return groups
    for name in before:
        _exclude(excluded, name, READ_FUNCTIONALLY)
    if not before:
        return groups
    kept = []
    for g in groups:
        hit = _removed_half(g, gen)
        removed = [Slice(s.param, s.module, s.role, s.dim, s.index[hit[s.channel]], s.channel)
                   for s in g.slices if s.role in ("weight", "bias", "norm")]
        after = zero_columns(removed)
        reader = next((n for n, zero in after.items() if bool((zero & ~before[n]).any())), None)
        if reader is None:
            kept.append(g)
        else:
            _exclude(excluded, g.name, f"filter pruning: {reader}'s weight reads its channels functionally "
                     "(the module is never called), which torch-pruning does not follow")
    return kept


def _zero_slices(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Bool [tensor.shape[dim]]: the slice along ``dim`` is entirely zero."""
    return (tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1) == 0).all(1)
