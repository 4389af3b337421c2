"""Euclidean projections onto structured-sparse sets: keep the largest filters / columns / weights.

Source: AutoCompress (Liu et al., AAAI 2020), §3 "ADMM-based structured pruning", Z-step
``Z = Proj_S(W + U)``; restated in the brief §3. The same projection prunes the current weights in one
shot for the search's quick evaluation (brief §1, step 2).

For a matrix ``W`` and the set ``S_k`` of matrices with at most ``k`` non-zero rows, the nearest point of
``S_k`` to ``W`` (Frobenius norm) keeps the ``k`` rows of largest L2 norm and zeroes the others: the
squared distance is the sum of the squared norms of the dropped rows, smallest when they are the smallest
rows. The same holds for columns and single weights (``|w|``).

Choices (ours; the paper is silent):

* **Coupled filter groups** are scored by the joint L2 norm of every weight entry a channel owns: the group's
  producer weight rows (every Conv / Linear / depthwise-conv weight row of the channel) and its consumers' input
  slices (the columns that read the channel), all of which pruning the channel removes; that is the exact
  projection onto "at most k channels of the group's weights are non-zero". Channels tied by a grouped
  convolution (:attr:`autocompress.space.FilterGroup.ties`: the same positions leave every conv group) are
  scored and kept as one unit, the sum of their squared norms: the exact projection onto that tied set. Biases
  and BatchNorm affine parameters are not scored (their scale is unrelated to the weights'). Scoring the
  producer rows alone (before session 35) ignores what a channel feeds forward: behind a BatchNorm, which
  normalises the producer's scale away, the consumer columns carry the channel's weight in the output. One-shot
  pruning (a short budget: no ADMM) of four CIFAR-10 models at the same widths, then 3 epochs of AdamW: +0.56
  points of top-1 on average over five model / seed pairs (-0.11 to +1.24) against scoring the producer rows
  alone (BENCHMARKS.md, "Session 35").
* **Heads.** A group whose channels are an attention's heads (:attr:`autocompress.space.FilterGroup.heads`)
  keeps the ``k / heads`` highest-scoring channels of each head, the exact projection onto "each head keeps
  ``k / heads`` channels".
* **Ties** are broken by index: the lower index is kept (stable sort).
* **Keep count** ``k = max(1, size - round(rate * size))`` (:func:`autocompress.space.keep_count`); a
  rate that would keep nothing keeps one unit and is reported in :attr:`Masks.clipped` (and logged at DEBUG
  level: the search probes many such rates). A
  filter group keeps that count aligned to the space's channel multiple
  (:meth:`autocompress.space.PruningSpace.filter_keep`, :mod:`autocompress.alignment`).
* **Hybrid**: filters first; columns are scored on the weights with removed filters / input channels
  zeroed, and the column rate counts the columns that remain after filter pruning; irregular pruning,
  when combined, acts last on the entries that remain.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

import torch
from torch import nn

from .masks import Clip, Masks
from .space import FilterGroup, PruningSpace, keep_count, removed_count

log = logging.getLogger(__name__)


def topk_mask(scores: torch.Tensor, k: int, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask of the ``k`` largest ``scores`` (ties: the lower index wins).

    Args:
        scores: float [n]; alive: optional bool [n], only these entries may be kept.
        k: number kept, ``1 <= k <= n`` (``<= alive.sum()`` with ``alive``).
    Returns:
        CPU bool [n] with exactly ``k`` True.
    Raises:
        ValueError: ``k`` out of range.
    """
    scores = scores.detach().to("cpu", torch.float64).flatten()
    available = scores.numel() if alive is None else int(alive.sum())
    if not 1 <= k <= available:
        raise ValueError(f"cannot keep {k} of {available} units")
    if alive is not None:
        scores = scores.masked_fill(~alive.to("cpu", torch.bool).flatten(), float("-inf"))
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def project_rows(weight2d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest matrix with at most ``k`` non-zero rows: keep the ``k`` rows of largest L2 norm.

    Args:
        weight2d: [rows, cols] (a conv weight in the GEMM view ``w.reshape(F, -1)``).
    Returns:
        ``(projected [rows, cols], row keep mask bool [rows])``.
    """
    keep = topk_mask(weight2d.detach().pow(2).sum(1), k)
    return weight2d * keep.to(weight2d.device).unsqueeze(1), keep


def project_columns(weight2d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest matrix with at most ``k`` non-zero columns: keep the ``k`` columns of largest L2 norm.

    Args:
        weight2d: [rows, cols].
    Returns:
        ``(projected [rows, cols], column keep mask bool [cols])``.
    """
    keep = topk_mask(weight2d.detach().pow(2).sum(0), k)
    return weight2d * keep.to(weight2d.device).unsqueeze(0), keep


def project_irregular(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest tensor with at most ``k`` non-zero entries: keep the ``k`` entries of largest ``|w|``.

    Returns:
        ``(projected, keep mask bool)``, both shaped like ``weight``.
    """
    keep = topk_mask(weight.detach().abs(), k).view(weight.shape)
    return weight * keep.to(weight.device), keep


#: the slice roles a channel's score counts: producer weight rows and consumer input columns (not biases or
#: norm parameters; see the module docstring)
SCORED_ROLES = ("weight", "input")


def group_scores(group: FilterGroup, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Squared joint L2 norm of each channel of a filter group, float64 [group.size]: the sum, over the group's
    slices of :data:`SCORED_ROLES` (``params`` needs only their parameters), of the squared entries that belong
    to each channel."""
    scores = torch.zeros(group.size, dtype=torch.float64)
    for s in group.slices:
        if s.role in SCORED_ROLES:
            scores.index_add_(0, s.channel, s.energy(params[s.param]))
    return scores


def _group_topk(group, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask [classes] of a filter group's ``k`` highest-scoring classes; for a group with heads
    (:attr:`autocompress.space.FilterGroup.heads`) the ``k / heads`` highest of each head; for one with parts
    (:attr:`~autocompress.space.FilterGroup.parts`) the highest of each part, :func:`_part_keeps` of them."""
    if group.heads > 1:
        per = scores.view(group.heads, -1)
        return torch.cat([topk_mask(row, k // group.heads) for row in per])
    parts = _partition(group.parts, scores.numel())
    if parts is None:
        return group.keep_parts(topk_mask(scores, k), scores)
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    for part, count in zip(parts, _part_keeps([p.numel() for p in parts], k, len(group.parts))):
        if count:
            keep[part[topk_mask(scores[part], count)]] = True
    return keep


def _partition(parts: tuple[torch.Tensor, ...], classes: int) -> list[torch.Tensor] | None:
    """The group's parts (class indices), and the classes of no part as one more, when the parts are disjoint;
    None without parts, or where they overlap."""
    if not parts:
        return None
    covered = torch.zeros(classes, dtype=torch.long)
    for part in parts:
        covered[part] += 1
    if int(covered.max()) > 1:
        return None
    rest = torch.where(covered == 0)[0]
    return list(parts) + ([rest] if rest.numel() else [])


def _part_keeps(sizes: list[int], k: int, branches: int) -> list[int]:
    """``k`` kept classes shared over parts of ``sizes`` in proportion (largest remainders first, ties to the
    earlier part), each of the first ``branches`` parts keeping one at the least where ``k`` allows: every branch of
    a concatenation loses its share, as :meth:`~autocompress.space.PruningSpace.estimate` counts it (a 3x3 branch's
    channels outscore a 1x1 branch's by their nine times more weights, and a global ranking that kept them had a
    fresh model miss flops=2x by 12 %)."""
    total = sum(sizes)
    shares = [k * n / total for n in sizes]
    keeps = [math.floor(x) for x in shares]
    for index in sorted(range(len(sizes)), key=lambda i: keeps[i] - shares[i])[:k - sum(keeps)]:
        keeps[index] += 1
    for index in range(min(branches, k)):
        if keeps[index] == 0:
            donor = max(range(len(keeps)), key=lambda i: keeps[i])
            keeps[donor] -= 1
            keeps[index] = 1
    return keeps


@torch.no_grad()
def relative_importance(space: PruningSpace, model: nn.Module) -> dict[str, torch.Tensor]:
    """Each filter group's channel importance relative to the group's own mean, the scale one global threshold
    can rank all groups on (Torch-Pruning's global magnitude ranking normalises by the mean likewise): the L2
    norm of the weights each channel class owns (:func:`group_scores`, summed over tied channels) divided by
    the mean of the group's norms. float64 [classes] by group name; ones for a group whose weights are all zero.
    """
    params = dict(model.named_parameters())
    out = {}
    for group in space.filter_groups:
        norms = group.class_sums(group_scores(group, params)).sqrt()
        mean = float(norms.mean())
        out[group.name] = norms / mean if mean > 0 else torch.ones_like(norms)
    return out


@torch.no_grad()
def project(space: PruningSpace, model: nn.Module, rates: Mapping[str, Mapping[str, float]]) -> Masks:
    """Project ``model``'s current weights onto the structured-sparse sets given by ``rates``.

    Args:
        space: the model's :class:`autocompress.space.PruningSpace`.
        model: the network whose parameters are scored (not modified).
        rates: ``{"filter": {group: r}, "column": {layer: r}, "irregular": {layer: r}}``; a unit absent
            from ``rates`` keeps everything (rate 0).
    Returns:
        :class:`Masks` with an entry for every unit of the space; column and irregular masks are False
        where coarser pruning already removed the entries. Clipped rates are in ``Masks.clipped``.
    Raises:
        UserError: an unknown unit name or a rate outside ``[0, 1)`` (:meth:`PruningSpace.check_rates`).
    """
    rates = space.check_rates(rates)
    params = dict(model.named_parameters())
    clipped: list[Clip] = []

    def kept(kind: str, name: str, size: int) -> int:
        rate = rates[kind].get(name, 0.0)
        unit = space.unit(kind, name)
        k = (space.filter_keep_classes(unit, rate) if kind == "filter" else
             space.column_keep(unit, size, rate) if kind == "column" else keep_count(size, rate))
        if removed_count(size, rate) >= size:
            clipped.append(Clip(kind, name, rate, size, k))
            log.debug("%s rate %.4f of %s would remove all %d units; keeping %d", kind, rate, name, size, k)
        return k

    filters = {g.name: g.expand(_group_topk(g, g.class_sums(group_scores(g, params)),
                                            kept("filter", g.name, g.classes))) for g in space.filter_groups}
    structure = space.param_masks(Masks(filters=filters, columns={}, weights={}))
    columns = {}
    for layer in space.column_layers:
        weight = layer.gemm(params[layer.param].detach())
        mask = structure.get(layer.param)
        alive = None
        if mask is not None:
            mask = layer.gemm(mask)
            weight = weight * mask.to(weight.device)
            alive = mask.any(0)
        size = layer.size if alive is None else int(alive.sum())
        columns[layer.name] = topk_mask(weight.pow(2).sum(0), kept("column", layer.name, size), alive)
    if space.irregular_layers:
        structure = space.param_masks(Masks(filters=filters, columns=columns, weights={}))
    weights = {}
    for layer in space.irregular_layers:
        weight = params[layer.param].detach()
        alive = structure.get(layer.param)
        size = layer.size if alive is None else int(alive.sum())
        weights[layer.name] = topk_mask(weight.abs(), kept("irregular", layer.name, size),
                                        alive).view(layer.shape)
    return Masks(filters=filters, columns=columns, weights=weights, clipped=clipped)
