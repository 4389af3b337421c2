"""Attention heads in filter groups: how many heads a group's channels form, found by compacting a copy.

A multi-head attention whose query, key and value projections are separate layers
(``q = self.q(x).view(B, N, heads, -1)``, likewise ``k`` and ``v``, then ``self.out(o.reshape(B, N, -1))``)
couples the channels of all four: torch-pruning's dependency graph puts channel ``c`` of ``q``, ``k`` and ``v``
and input ``c`` of ``out`` in one filter group, and removing them together is exact for the scores
(``q . k`` loses the term of ``c``) and for the output (``out`` loses the input that read ``v``'s channel ``c``).
It is exact for the compact model only when every head keeps equally many channels: the forward splits the
projections into heads by shape, so a compact head must be as wide as the others, and a channel must stay in its
own head. The group then keeps ``k / heads`` channels of each head
(:attr:`autocompress.space.FilterGroup.heads`).

The forward's head count is read from nothing but the model's behaviour: :func:`head_count` compacts copies
of the model with seeded random channels removed in equal numbers from each of ``h`` consecutive blocks and
keeps the first ``h`` whose compact model computes what the masked one does (:func:`autocompress.compaction.
compaction_failure`). A count written into an attribute of the layer's parent (``num_heads``, ``heads``, ...) is
tried first; then every divisor of the group's size, smallest first (a multiple of the true count passes too,
a stricter constraint, so a passing count is refined to its smallest passing divisor; a divisor of the true count
fails, as its blocks mix heads). A scale that follows the head width
(``F.scaled_dot_product_attention`` without ``scale=`` divides the scores by the square root of the narrower
width) is kept at the original width's value by the compaction, which scales the query rows by
``sqrt(d' / d)`` when the compact model differs without it (:func:`autocompress.compaction.compact`).

Not from the AutoCompress paper (Liu et al., AAAI 2020), which prunes convolutional networks; head-width pruning
of transformers in this form follows the structured pruning of attention projections in Torch-Pruning (Fang et
al., "DepGraph", CVPR 2023), which takes the head count from its caller.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .alignment import allowed_widths
from .compaction import HEAD_ATTRIBUTES, compact, compaction_failure
from .masks import Masks
from .metrics import count_macs
from .space import FilterGroup, PruningSpace


def head_count(model: nn.Module, space: PruningSpace, group: FilterGroup, example_inputs: Any, *,
               seed: int = 0) -> int | None:
    """The number of equal heads ``group``'s channels form, or None when no count compacts exactly.

    Args:
        model: the model the space describes (not modified; copies are compacted).
        space: its :class:`~autocompress.space.PruningSpace` (its ``channel_multiple`` applies).
        group: one of ``space``'s filter groups (without ties), e.g. one whose narrower width breaks the compact
            model.
        example_inputs: a tensor or tuple of tensors, one forward's inputs.
        seed: seed of the random channels removed.
    Returns:
        ``h`` (2 <= h <= size / 2), or None. A count that compacts is a multiple of the forward's (blocks within
        heads); the smallest of its divisors that compacts is returned, so a stale head-count attribute (a multiple
        of the forward's count) does not name the heads.
    Raises:
        UserError: the example inputs do not fit the model (from the compaction).
    """
    if group.ties is not None:
        return None
    gen = torch.Generator().manual_seed(seed)
    tried: dict[int, bool] = {}

    def compacts(heads: int) -> bool:
        if heads not in tried:
            widths = head_widths(space, group, heads)
            tried[heads] = len(widths) > 1 and all(_compacts(model, space, group, heads, width, gen, example_inputs)
                                                   for width in {widths[0], widths[-2]})
        return tried[heads]

    for heads in candidate_counts(model, space, group):
        if compacts(heads):  # a multiple of the forward's count: its smallest passing divisor is that count
            return next((d for d in range(2, heads) if heads % d == 0 and group.size // d >= 2 and compacts(d)), heads)
    return None


def head_widths(space: PruningSpace, group: FilterGroup, heads: int) -> list[int]:
    """The widths one of ``heads`` heads of ``group`` may keep (ascending), as
    :meth:`~autocompress.space.PruningSpace.widths` gives them once the group has that many heads."""
    return [width // heads for width in space.widths(replace(group, heads=heads))]


def free_macs(model: nn.Module, space: PruningSpace, group: FilterGroup, heads: int, example_inputs: Any) -> int:
    """MACs per forward of ``example_inputs`` outside weight layers that shrink with ``group``'s channels (the
    attention's score and value products: ``N^2 D`` MACs each per item for ``N`` tokens and ``D`` channels), for
    :attr:`autocompress.space.FilterGroup.free_macs`: a copy keeping the narrowest allowed width of each of the
    ``heads`` heads is compacted, and the MACs it loses beyond what :meth:`~autocompress.space.PruningSpace.count`
    attributes to the weight layers are scaled to the whole group (linear in the channels). 0 when no head can lose
    a channel.

    Raises:
        UserError / RuntimeError: as :func:`autocompress.compaction.compact` (the group compacts: ``head_count``
            found ``heads``).
    """
    per = group.size // heads
    width = head_widths(space, group, heads)[0]
    if width == per:
        return 0
    keep = torch.zeros(heads, per, dtype=torch.bool)
    keep[:, :width] = True
    masks = Masks(filters={group.name: keep.flatten()}, columns={}, weights={})
    small = compact(model, space.param_masks(masks), example_inputs, channel_multiple=space.channel_multiple).model
    beyond = space.count(masks).macs - count_macs(small, example_inputs)
    return max(0, round(beyond * group.size / (group.size - heads * width)))


#: added to the reason an attention-shaped group (:func:`attention_shaped`) keeps its channels
HEAD_HINT = ("if these are attention heads, no split into equal heads compacts exactly either: write the head width "
             "as -1 in the forward's reshapes, or store the head count next to a stored head width (self.num_heads); "
             "a module over the head width (a LayerNorm of q and k) cannot narrow")


def attention_shaped(model: nn.Module, group: FilterGroup) -> bool:
    """Whether ``group`` looks like an attention's projections: only Linear layers, one to three of them writing
    the channels (a fused qkv, or q, k and v) and one reading them (the output projection)."""
    layers = [model.get_submodule(name) for name in (*group.producers, *group.consumers)]
    return (all(isinstance(layer, nn.Linear) for layer in layers) and 1 <= len(group.producers) <= 3
            and len(group.consumers) == 1)


def candidate_counts(model: nn.Module, space: PruningSpace, group: FilterGroup) -> list[int]:
    """Head counts to try for ``group``: those written into a head-count attribute (:data:`HEAD_ATTRIBUTES`) of
    a parent of its producers, then every divisor ``h`` of its size with at least two channels per head,
    ascending; each once."""
    return list(dict.fromkeys(named_counts(model, group) + _divisors(group.size)))


def _divisors(size: int) -> list[int]:
    """Head counts of at least two channels each that divide ``size``, ascending."""
    return [h for h in range(2, size // 2 + 1) if size % h == 0]


def named_counts(model: nn.Module, group: FilterGroup) -> list[int]:
    """The head counts written into a head-count attribute (:data:`HEAD_ATTRIBUTES`) of a parent of ``group``'s
    producers that divide its size into heads of at least two channels."""
    named = []
    for producer in group.producers:
        parent = producer.rpartition(".")[0]
        module = model.get_submodule(parent) if parent else model
        named += [value for attr in HEAD_ATTRIBUTES if isinstance(value := getattr(module, attr, None), int)
                  and not isinstance(value, bool)]
    divisors = _divisors(group.size)
    return [h for h in dict.fromkeys(named) if h in divisors]


def unaligned_heads(model: nn.Module, space: PruningSpace, group: FilterGroup) -> str | None:
    """Why ``group``'s heads cannot narrow at the space's channel multiple, when a head-count attribute names ``h``
    heads and the multiple leaves each head no narrower width (3 heads of 16 channels at multiple 16: a head
    could keep only multiples of 16); None otherwise. The reason names the largest power-of-two multiple that
    narrows them."""
    for heads in named_counts(model, group):
        if len(head_widths(space, group, heads)) > 1:
            continue
        per, multiple = group.size // heads, space.channel_multiple
        halvings = (multiple >> k for k in range(1, multiple.bit_length()))
        finer = next((m for m in halvings if len(allowed_widths(per, m // math.gcd(m, heads))) > 1), 1)
        return (f"its {heads} heads of {per} channels cannot narrow at channel multiple {multiple} (each head keeps a "
                f"multiple of {space.head_multiple(replace(group, heads=heads))} channels); channel_multiple: "
                f"{finer} narrows them")
    return None


def _compacts(model: nn.Module, space: PruningSpace, group: FilterGroup, heads: int, width: int,
              gen: torch.Generator, example_inputs: Any) -> bool:
    """Whether ``model`` with ``width`` random channels kept in each of ``heads`` blocks of ``group`` compacts
    and computes the masked model's outputs."""
    per = group.size // heads
    keep = torch.zeros(heads, per, dtype=torch.bool)
    for row in keep:
        row[torch.randperm(per, generator=gen)[:width]] = True
    masks = Masks(filters={group.name: keep.flatten()}, columns={}, weights={})
    return compaction_failure(model, space.param_masks(masks), example_inputs,
                              channel_multiple=space.channel_multiple) is None
