"""Action sampling for the AutoCompress search: per-unit pruning rates that meet a round's target.

An **action** is a 1-D ``float64`` array of pruning rates, one per pruning unit, in the order of
:attr:`ActionSampler.units` (filter groups, then column layers, then irregular layers, each in the space's
order). ``ActionSampler.to_rates(action)`` turns it into the engine's rates dict
``{"filter": {group: r}, "column": {layer: r}, "irregular": {layer: r}}``.

Source: AutoCompress, Liu et al. AAAI 2020, §"Automatic ... framework" (action sampling, the heuristic
search's perturbations and the experience-based guidance); restated in the project brief §1 and §5.

Choices the paper leaves open (ours, exposed as arguments):

* **Meeting the target**: a rate vector is ``clip(s * direction, 0, r_max)``; the scale ``s`` is found by
  an exponential bracket then bisection (one loop with a fixed maximum number of cost evaluations) as the
  smallest scale whose remaining count (parameters or MACs) is at most ``original / target``. Units that
  hit ``r_max`` stay there while the others keep growing, so the excess of clipped units is redistributed
  onto the rest (water filling).
* **Guidance**: within each unit kind, a unit that governs more weights (objective ``"params"``) or more
  MACs (objective ``"flops"``) per layer it prunes never gets a smaller rate than one governing fewer. Rates
  are projected onto that ordering by isotonic regression (pool-adjacent-violators, least squares) before
  meeting the target; scaling and clipping preserve the ordering. Filter and column rates are not compared
  with each other: they act on different structures of the same layers. The paper's guidance is per
  layer; a filter group that couples ``k`` producing layers (the channels of a residual stream, shared by
  every block's last conv) counts ``1/k`` of what it governs, so a stream is not taken for the largest
  "layer" and pruned hardest (resnet20 at 4x fewer MACs: 72.9 % instead of 70.7 % top-1, BENCHMARKS.md).
  Groups of one producing layer (plain CNNs, VGG) are unchanged. ``guidance="channel"`` (beyond the paper)
  divides that further by the unit's size: what pruning one channel (column, weight) saves, so under a flops
  target a layer at high resolution, whose channels cost many MACs and hold few weights, is pruned hardest.
* **Perturbation**: Gaussian noise of standard deviation ``magnitude`` added to every rate, clipped to
  ``[0, r_max]``, re-ordered and re-scaled to meet the target. Given the keep counts of an action (``keeps``,
  :func:`space_keeps`), a neighbour that keeps the same widths as the action (or as a candidate the search
  scored already) is drawn again with twice the magnitude (up to :data:`PERTURB_TRIES` draws): the fit and the
  aligned widths map small noise back onto the action, and a search scoring the same widths again learns
  nothing (beyond the paper; a resnet20 flops=2x search at channel multiple 8 scored 3 distinct candidates in
  20, BENCHMARKS.md, "Session 19").
* **Local moves** (beyond the paper; ``moves="mixed"``, not the default): as the temperature falls, a growing share
  of the search's moves are swaps (:meth:`ActionSampler.swap`): one unit a width wider, another pruned just enough
  more to meet the target, the rest unchanged; a Gaussian move re-fit to the target changes most units at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
import torch

from .errors import UserError
from .alignment import allowed_widths
from .columns import GEMM_MIN_FILTERS
from .space import BREAKS, BREAKS_FIX, FILTER_PRUNING, GATHERED, KINDS, NO_EXECUTED_SAVING, keep_count
from .text import short_of

OBJECTIVES = ("params", "flops")
#: What the guidance orders units by: ``"layer"`` (the paper's: what a unit governs per producing layer, so
#: the layer holding the most weights / MACs is pruned hardest) or ``"channel"`` (the same per element pruned:
#: what removing one channel saves, so under a flops target the high-resolution layers, whose channels cost
#: many MACs and hold few weights, are pruned hardest).
GUIDANCES = ("layer", "channel")
#: Where the search starts (``search.start``): ``"guided"`` (:meth:`ActionSampler.initial_action`: rates that
#: follow the guidance) or ``"magnitude"`` (:meth:`ActionSampler.magnitude_action`: one global threshold on the
#: weights' relative magnitudes).
STARTS = ("guided", "magnitude")
#: ``search.start`` values: a start, or ``"auto"`` (a round without a search starts from whichever start the
#: optimiser probe's loss prefers, :meth:`autocompress.rounds.Pipeline.settle_start`; a search starts guided)
START_SETTINGS = ("auto", *STARTS)
#: The search's moves (``search.moves``): ``"gaussian"`` (:meth:`ActionSampler.perturb`: noise on every rate, re-fit
#: to the target) or ``"mixed"`` (a growing share of :meth:`ActionSampler.swap` as the temperature falls).
MOVES = ("gaussian", "mixed")
#: threshold halvings of :meth:`ActionSampler.magnitude_action` (the rates step by whole channels long before)
BISECTIONS = 50

#: Draws of one perturbation (:meth:`ActionSampler.perturb`) before it settles for a neighbour that keeps the
#: widths of the action or of a candidate to avoid; each draw doubles the noise.
PERTURB_TRIES = 12
#: a fit that passes its target by more than this fraction passes it by far: the final table warns
#: (:func:`autocompress.compress`), and the magnitude start fills the gap with the other units instead
#: (:meth:`ActionSampler.magnitude_action`)
FAR = 0.1

#: A cost maps a rate vector (float64 [n_units]) to the remaining count (parameters or MACs) of the model
#: pruned at those rates; it must be non-increasing in every rate.
Cost = Callable[[np.ndarray], float]

_MIN_DIRECTION = 1e-6  # floor (relative to the largest entry) so every unit takes part in scaling


@dataclass(frozen=True)
class ActionUnit:
    """One entry of an action.

    Attributes:
        kind: ``"filter"``, ``"column"`` or ``"irregular"``.
        name: the filter group's / layer's name in the pruning space.
        size: number of prunable elements (channels, columns or weights).
        weight: what the unit governs for the objective per producing layer — parameters (``"params"``)
            or MACs (``"flops"``), see :func:`guidance_weight`; the guidance orders rates by it.
    """

    kind: str
    name: str
    size: int
    weight: float


def guidance_weight(unit, governed: float, guidance: str = "layer") -> float:
    """The guidance weight of a pruning-space unit that governs ``governed`` (its parameters, MACs or latency
    saving): per producing layer, i.e. divided by the number of layers whose output channels a filter group
    prunes (1 for column and irregular layers); with ``guidance="channel"`` also per element the unit prunes
    (channel, column or weight: divided by ``unit.size``). See the module docstring and :data:`GUIDANCES`."""
    per_layer = float(governed) / producer_count(unit)
    return per_layer / max(int(unit.size), 1) if guidance == "channel" else per_layer


def producer_count(unit) -> int:
    """Layers whose output channels a pruning-space unit prunes (a filter group's producers; 1 for column and
    irregular layers): the guidance counts what a unit governs per producing layer."""
    return len(getattr(unit, "producers", ())) or 1


def order_rates(rates: np.ndarray, units: Sequence[ActionUnit]) -> np.ndarray:
    """Project ``rates`` onto the guidance ordering (least squares), separately for each unit kind.

    Within a kind, after the projection ``weight_i > weight_j`` implies ``rate_i >= rate_j``. Units of equal
    weight are not constrained against each other (they are sorted by their own rate first, which keeps
    the least-squares optimum for tied weights). Source: the experience-based guidance of AutoCompress,
    Liu et al. AAAI 2020; isotonic regression by pool-adjacent-violators.

    Args:
        rates: float array [n_units].
        units: the units, same order.
    Returns:
        a new float64 array [n_units].
    """
    rates = np.asarray(rates, dtype=np.float64)
    out = rates.copy()
    weights = np.array([u.weight for u in units], dtype=np.float64)
    kinds = np.array([u.kind for u in units])
    for kind in KINDS:
        idx = np.flatnonzero(kinds == kind)
        if idx.size < 2:
            continue
        order = idx[np.lexsort((rates[idx], weights[idx]))]
        out[order] = _isotonic(rates[order])
    return out


def _isotonic(values: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit of ``values`` (pool-adjacent-violators), float64 [n]."""
    means: list[float] = []
    counts: list[int] = []
    for v in values:
        means.append(float(v))
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            n = counts[-2] + counts[-1]
            means[-2] = (means[-2] * counts[-2] + means[-1] * counts[-1]) / n
            counts[-2] = n
            means.pop()
            counts.pop()
    return np.repeat(means, counts)


def meet_target(direction: np.ndarray, cost: Cost, target: float, *, r_max: float,
                original: float | None = None, sizes: np.ndarray | None = None,
                max_iter: int = 64) -> np.ndarray:
    """Scale a relative rate vector so that the pruned model meets a compression target.

    Returns ``rates = clip(s * d, 0, r_max)`` for the smallest scale ``s`` with
    ``cost(rates) <= original / target``, i.e. as close to the target as the units' granularity allows.
    ``d`` is ``direction`` with negative entries set to zero and every entry floored at ``1e-6 * max(d)``
    (an all-zero direction becomes uniform), so with a large enough ``s`` every unit reaches ``r_max``;
    clipping and scaling keep the order of ``d``. ``s`` is bracketed by an exponential search from the
    scale at which the largest entry reaches ``r_max`` (x4 per step), then bisected; both share one bounded
    loop of ``max_iter`` cost evaluations (after ``cost(zeros)`` and ``cost(r_max everywhere)``).

    Args:
        direction: float array [n_units], relative rates (any positive scale).
        cost: remaining parameters or MACs of a rate vector; non-increasing in every rate.
        target: compression target (>= 1), e.g. ``4.0`` for 4x fewer parameters / MACs.
        r_max: largest rate a unit may get, in ``[0, 1)``.
        original: ``cost(zeros)``; computed when not given.
        sizes: optional int array [n_units] of unit sizes; the bisection then stops once the bracket moves
            no unit's ``rate * size`` by more than 1e-3 (finer scales cannot change a keep count).
        max_iter: bound on the loop's cost evaluations.
    Returns:
        float64 array [n_units] in ``[0, r_max]``.
    Raises:
        UserError: bad ``target`` / ``r_max`` / ``direction``, or the target is unreachable (every unit at
            ``r_max`` still leaves more than ``original / target``); the message gives the best reachable
            compression.
    """
    d = np.asarray(direction, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise UserError(f"an action must be a non-empty finite rate vector, got shape {d.shape}",
                        "check the pruning space has prunable units")
    _check_settings(target, r_max)
    if original is None:
        original = cost(np.zeros_like(d))
    budget = original / target
    _check_reachable(original, cost(np.full_like(d, r_max)), target, r_max)
    if original <= budget:
        return np.zeros_like(d)
    d = np.clip(d, 0.0, None)
    d = np.ones_like(d) if d.max() <= 0 else np.maximum(d, _MIN_DIRECTION * d.max())
    step = 0.0 if sizes is None else 1e-3 / float(np.max(d * np.asarray(sizes, dtype=np.float64)))
    lo, hi = 0.0, r_max / d.min()  # invariant: cost(lo * d) > budget >= cost(clip(hi * d))
    probe = r_max / d.max()  # exponential search while probe > 0, then bisection
    for _ in range(max_iter):
        if lo < probe < hi:
            mid = probe
        else:
            mid, probe = 0.5 * (lo + hi), 0.0
        if hi - lo <= step or not lo < mid < hi:
            break
        if cost(np.clip(mid * d, 0.0, r_max)) <= budget:
            hi, probe = mid, 0.0
        else:
            lo = mid
            probe = 4.0 * mid if probe > 0 else 0.0
    return np.clip(hi * d, 0.0, r_max)


def give_back(action: np.ndarray, cost: Cost, budget: float, sizes: np.ndarray, weights: np.ndarray, *,
              order: str = "heaviest", widths: Sequence[Sequence[int] | None] | None = None) -> np.ndarray:
    """Lower each unit's rate to the smallest that keeps ``cost(action) <= budget``, one unit after the other
    in order of guidance weight (beyond the paper). A fit by :func:`meet_target` scales every unit's rate
    together, so where the cost moves in steps it overshoots the target: with widths aligned to 8 channels a
    16-channel layer goes from 16 to 8 in one step (a flops=3x run of a plain 16-16-32-32-64 CNN ended at
    3.67x), and under a latency table on an AVX-512 CPU a 16-channel layer runs as fast at 8 channels as at
    16, yet the fit pruned them all the same. Each unit's smallest rate is found by bisection to half a unit
    element (``0.5 / size``); ``cost`` must be non-increasing in every rate.

    The order matters because the first units take the whole surplus. For flops targets at multiple 8, paired
    runs of two small CNNs on Fashion-MNIST (BENCHMARKS.md, "Session 13: give-back") gave top-1 -0.68 and
    -0.02 points against no give-back with the lightest units first (in two campaigns of 12 and 18 runs; small
    layers were restored whole), -0.03 and +0.12 with the heaviest first, so aligned params / flops targets
    give the surplus to the layers the guidance pruned hardest; a latency table gives it lightest first (small
    layers inside one hardware block cost nothing to restore there).

    Args:
        action: float [n_units] meeting ``budget``; cost: the sampler's cost; sizes, weights: float [n_units].
        order: ``"heaviest"``: units of the largest guidance weight first; ``"lightest"``: the smallest first.
        widths: per unit, None or the keep counts (increasing) that unit may be given back to: it then keeps
            the largest of them that meets ``budget``, or its rate when none above its keep count does. Used
            to land on the CPU's channel block when the channel multiple is smaller than it (see
            :meth:`ActionSampler.from_space`).
    Returns:
        a new float64 array [n_units], each rate <= the action's, still meeting ``budget``.
    """
    out = np.asarray(action, dtype=np.float64).copy()
    weights = np.asarray(weights, dtype=np.float64)
    for i in np.argsort(-weights if order == "heaviest" else weights, kind="stable"):
        if out[i] <= 0.0:
            continue
        if widths is not None and widths[i] is not None:
            out[i] = _widest_within(out, i, cost, budget, int(sizes[i]), widths[i])
            continue
        out[i] = _lowest_within(out, i, cost, budget, 0.0, out[i], sizes[i])
    return out


def _lowest_within(action: np.ndarray, index: int, cost: Cost, budget: float, low: float, high: float,
                   size: float) -> float:
    """The smallest rate of unit ``index`` in ``[low, high]`` whose action meets ``budget`` (rate ``high`` must),
    by bisection to half a unit element (``0.5 / size``); ``cost`` is non-increasing in the rate."""
    if cost(_with(action, index, low)) <= budget:
        return low
    while high - low > 0.5 / max(size, 1.0):  # invariant: rate `high` meets the budget, rate `low` does not
        mid = 0.5 * (low + high)
        low, high = (low, mid) if cost(_with(action, index, mid)) <= budget else (mid, high)
    return high


def _widest_within(action: np.ndarray, index: int, cost: Cost, budget: float, size: int,
                   widths: Sequence[int]) -> float:
    """The rate of the widest of ``widths`` above unit ``index``'s keep count that meets ``budget`` (by
    bisection; ``cost`` is non-increasing in the rate), or the unit's rate when none does."""
    rate = float(action[index])
    above = [w for w in widths if w > keep_count(size, rate)]
    low, high = 0, len(above)  # invariant: above[:low] meet the budget; above[high:] do not
    while low < high:
        mid = (low + high) // 2
        if cost(_with(action, index, 1.0 - above[mid] / size)) <= budget:
            low = mid + 1
        else:
            high = mid
    return 1.0 - above[low - 1] / size if low else rate


def _guided_direction(weights: np.ndarray, spread: float) -> np.ndarray:
    """Relative rates ``(weight / max weight) ** spread`` (float64, like ``weights``); uniform when no weight is
    positive."""
    top = weights.max()
    return np.ones_like(weights) if top <= 0 else (weights / top) ** float(spread)


def _with(action: np.ndarray, index: int, rate: float) -> np.ndarray:
    changed = action.copy()
    changed[index] = rate
    return changed


def _check_settings(target: float, r_max: float) -> None:
    """UserError unless ``target >= 1`` (finite) and ``0 <= r_max < 1``."""
    if not (math.isfinite(target) and target >= 1.0):
        raise UserError(f"compression target {target!r} is invalid", "give a target >= 1, e.g. params=10x")
    if not 0.0 <= r_max < 1.0:
        raise UserError(f"maximum rate r_max={r_max!r} is outside [0, 1)", "use e.g. r_max=0.95")


class Unreachable(UserError):
    """The target is beyond the reach of every unit at the maximum rate: ``reached`` is the factor that maximum
    reaches (x). ``held`` says what holds the rest back and ``fixes`` adds to the usual fixes (lower the target,
    raise max_r); ``problem`` and ``fix`` replace the message's two parts (a latency target's, in the runtime's
    terms)."""

    def __init__(self, target: float, reached: float, r_max: float, held: str = "", fixes: Sequence[str] = (), *,
                 problem: str | None = None, fix: str | None = None):
        super().__init__(problem or f"target {target:g}x is unreachable: pruning every unit at the maximum rate "
                         f"(max_r) {r_max:g} reaches only {short_of(reached, target)}x{held}",
                         fix or ", ".join(["lower the target", "raise max_r (below 1)", *fixes]))
        self.target, self.reached, self.r_max, self.held, self.fixes = target, reached, r_max, held, tuple(fixes)

    def nominal(self, target: float) -> "Unreachable":
        """This error stated for ``target`` (the factor the caller asked for, where the fit aimed within a
        tolerance below it)."""
        return Unreachable(target, self.reached, self.r_max, self.held, self.fixes)


def _check_reachable(original: float, best: float, target: float, r_max: float) -> None:
    """:class:`Unreachable` unless ``best`` (the count with every unit at ``r_max``) meets ``original / target``."""
    if best > original / target:
        raise Unreachable(target, original / best, r_max)


def _held_back(space, objective: str, kinds: Collection[str] | None, target: float,
               r_max: float) -> tuple[str, list[str]]:
    """What holds a target back in ``space`` (the layers whose filters or, for a flops target, columns it leaves
    out, those the compact model breaks without first, then the heaviest; a classifier's outputs are not named;
    modules no unit prunes holding :data:`~autocompress.space.WHOLE_SHARE` or more of the objective, e.g. an LSTM's
    recurrent weights) and the fixes that widen the space: kinds that would lower the objective but are not in
    ``kinds`` (not filter pruning where the model cannot be traced for it), a params target when columns were left
    out for flops and every unit at ``r_max`` reaches ``target`` in parameters (a fresh user's LSTM net reached
    neither), reshapes written with -1 when the compact model broke."""
    left = space.not_filter_pruned()
    broken = {name for name, reasons in space.reasons("filter").items()
              if any(r.startswith(FILTER_PRUNING + BREAKS) for r in reasons)}

    def heaviest(names: list[str], why: bool = False) -> str:  # filter groups the forward breaks first: fixable
        names = sorted(names, key=lambda name: (why and name not in broken,
                                                -space.layer_macs.get(name, ("", 0))[1]))
        first = f"{names[0]} ({left[names[0]]})" if why else names[0]
        return ", ".join([first, *names[1:3]]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    asked = kinds is None or "filter" in kinds  # without filter pruning its exclusions are not the cause
    filters = list(left) if asked else []
    untraced = space.reasons("filter").get("", ())  # the whole model is out of filter pruning (not traceable)
    columns = [name for name, reasons in space.reasons("column").items()
               if any(r.startswith((NO_EXECUTED_SAVING, GATHERED)) for r in reasons)]
    held = ([f"not filter-pruned: the model ({untraced[0].removeprefix(FILTER_PRUNING)})"] if untraced and asked
            else []) + ([f"not filter-pruned: {heaviest(filters, why=True)}"] if filters else []) + (
        [f"not column-pruned for a flops target (kernels over 1x1 with under {GEMM_MIN_FILTERS} filters, whose "
         "pruned columns would still be multiplied, and 1x1 / Linear layers applied at several positions, which "
         f"would gather their kept columns at each): {heaviest(columns)}"] if columns else [])
    attr = _check_objective(objective)
    whole = space.heavy_whole(attr)
    if whole:  # (fresh user 86: an LSTM's recurrent weights, 70 % of the MACs, were never named)
        what = "MACs" if attr == "macs" else "parameters"
        held.append("kept whole: " + ", ".join(f"{name} ({kind}, {share:.0%} of the {what})"
                                               for share, name, kind in whole[:3]))
    useful = ("filter", "column") if objective == "flops" else KINDS
    fixes = [f"add {kind} to dims" for kind in useful if kinds is not None and kind not in kinds
             and not (kind == "filter" and untraced)]
    if columns and _params_may_reach(space, kinds, target, r_max, columns):
        fixes.append("give a params target, which counts their columns")
    if broken:
        fixes.append(BREAKS_FIX)
    return (f" ({'; '.join(held)}; every reason is logged at INFO by autocompress.space)" if held else ""), fixes


def _normal(rng: np.random.Generator | torch.Generator, n: int) -> np.ndarray:
    """``n`` standard normal draws from a numpy or torch generator, float64 [n]."""
    if isinstance(rng, torch.Generator):
        return torch.randn(n, generator=rng, dtype=torch.float64).numpy()
    return rng.standard_normal(n)


class ActionSampler:
    """Proposes actions (rate vectors) that meet one round's target and follow the guidance.

    Args:
        units: the action's units (see :func:`units_from_space`).
        cost: remaining parameters / MACs of a rate vector (see :func:`space_cost`).
        target: the round's compression target (>= 1), relative to ``cost(zeros)``.
        r_max: largest rate of any unit, in ``[0, 1)``.
        max_iter: bound on the cost evaluations of one target fit (:func:`meet_target`).
        give_back: after each fit, give back what the target does not need (:func:`give_back`), units of the
            ``"heaviest"`` or ``"lightest"`` guidance weight first; None: the fit as it is. :meth:`from_space`
            gives back heaviest first at aligned widths (``channel_multiple`` > 1, where the fit overshoots);
            a latency table gives back lightest first (small layers inside one hardware block cost nothing
            to restore there).
        widths: per unit, None or the keep counts its give-back may land on (see :func:`give_back`).
        keeps: the keep counts of an action (:func:`space_keeps`), by which :meth:`perturb` tells a neighbour
            that keeps other widths; None: every draw is a neighbour.
    Raises:
        UserError: empty ``units`` or an unreachable target (checked on construction, before any search).
    """

    def __init__(self, units: Sequence[ActionUnit], cost: Cost, target: float, *, r_max: float = 0.95,
                 max_iter: int = 64, give_back: str | None = None,
                 widths: Sequence[Sequence[int] | None] | None = None,
                 keeps: Callable[[np.ndarray], tuple[int, ...]] | None = None):
        if not units:
            raise UserError("the pruning space has no prunable units", "choose other dims or another model")
        self.units = tuple(units)
        self.cost = cost
        self.target = float(target)
        self.r_max = float(r_max)
        self.max_iter = int(max_iter)
        if give_back not in (None, "heaviest", "lightest"):
            raise ValueError(f"give_back must be None, 'heaviest' or 'lightest', got {give_back!r}")
        self.give_back = give_back
        self.widths = None if widths is None else tuple(widths)
        self.keeps = keeps
        _check_settings(self.target, self.r_max)
        self._sizes = np.array([u.size for u in self.units], dtype=np.float64)
        self._weights = np.array([u.weight for u in self.units], dtype=np.float64)
        self.original = float(cost(np.zeros(len(self.units))))
        _check_reachable(self.original, float(cost(np.full(len(self.units), self.r_max))), self.target,
                         self.r_max)

    def meet(self, direction: np.ndarray) -> np.ndarray:
        """Order ``direction`` by the guidance, scale it to meet the target (:func:`meet_target`), then (with
        ``give_back``) give back what the target does not need (:func:`give_back`)."""
        return self.rescale(order_rates(direction, self.units))

    def rescale(self, action: np.ndarray) -> np.ndarray:
        """``action`` (e.g. another target's search result) scaled to meet this sampler's target, then given
        back, without re-ordering: a given-back action departs from the guidance ordering on purpose (a unit at
        an aligned width keeps the smallest rate of that width), and projecting it again would move channels
        between layers. At a looser target than ``action`` met, every unit keeps at least the channels it kept
        there."""
        return self._given_back(meet_target(action, self.cost, self.target, r_max=self.r_max,
                                            original=self.original, sizes=self._sizes, max_iter=self.max_iter))

    def _given_back(self, action: np.ndarray) -> np.ndarray:
        """``action`` (meeting the target) with what the target does not need given back (:func:`give_back`, with
        this sampler's order and widths); ``action`` itself without ``give_back``."""
        if self.give_back is None:
            return action
        return give_back(action, self.cost, self.original / self.target, self._sizes, self._weights,
                         order=self.give_back, widths=self.widths)

    def initial_action(self, spread: float = 0.5) -> np.ndarray:
        """The search's starting point: rates proportional to ``(weight / max weight) ** spread``.

        ``spread=0`` gives one uniform rate (before any give-back); larger values prune the units that govern
        more weights (MACs) harder, following the guidance. Returns float64 [n_units] meeting the target.
        """
        return self.meet(_guided_direction(self._weights, spread))

    def magnitude_action(self, importance: Mapping[str, torch.Tensor]) -> np.ndarray | None:
        """A start read from the weights: each filter unit's rate is the share of its channels whose importance
        (relative to the unit's mean: :func:`autocompress.projection.relative_importance`) lies below one
        threshold shared by every unit, as a global magnitude ranking prunes; the threshold is bisected to the
        target, then the action is fitted exactly (:meth:`rescale`, with give-back; not re-ordered by the
        guidance). Other units keep rate 0, unless the filters' widths are too coarse for the target: where
        the fit passes it by more than :data:`FAR`, the filters take the threshold just short of the target and
        the other units (columns, weights) the rest (:meth:`_filled`), when that comes closer (a fresh user's
        32-64-channel CNN at ``params=2x`` and multiple 16: 2.60x with 16 and 48 channels, the next widths 16 and
        64 reach 1.96x). Returns float64 [n_units], or None when the filter units at the maximum rate cannot meet
        the target alone (or there are none).
        """
        filters = [(i, importance[u.name].numpy()) for i, u in enumerate(self.units)
                   if u.kind == "filter" and u.name in importance]
        if not filters:
            return None

        def action(threshold: float) -> np.ndarray:
            rates = np.zeros(len(self.units))
            for i, values in filters:
                rates[i] = min(float(np.mean(values < threshold)), self.r_max)
            return rates

        low, high = 0.0, 1.0 + max(float(values.max()) for _, values in filters)
        if self.compression(action(high)) < self.target:
            return None
        for _ in range(BISECTIONS):
            middle = (low + high) / 2
            low, high = (low, middle) if self.compression(action(middle)) >= self.target else (middle, high)
        fitted = self.rescale(action(high))
        if self.compression(fitted) <= self.target * (1 + FAR):
            return fitted
        filled = self._filled(action(low))
        return fitted if filled is None or self.compression(filled) >= self.compression(fitted) else filled

    def _filled(self, action: np.ndarray) -> np.ndarray | None:
        """``action`` (short of the target) with its zero-rate units of other kinds than filter fitted to the
        target along the guidance (rates proportional to the square root of their guidance weight, as
        :meth:`initial_action`), then given back; None when they cannot make up the rest."""
        rest = np.array([u.kind != "filter" and action[i] == 0.0 for i, u in enumerate(self.units)])
        if not rest.any():
            return None

        def filled(rates: np.ndarray) -> np.ndarray:
            out = action.copy()
            out[rest] = rates
            return out

        try:
            rates = meet_target(_guided_direction(self._weights[rest], 0.5), lambda r: self.cost(filled(r)),
                                self.target, r_max=self.r_max, original=self.original, sizes=self._sizes[rest],
                                max_iter=self.max_iter)
        except Unreachable:
            return None
        return self._given_back(filled(rates))

    def perturb(self, action: np.ndarray, magnitude: float, rng: np.random.Generator | torch.Generator, *,
                avoid: Collection[tuple[int, ...]] = ()) -> np.ndarray:
        """A neighbour of ``action``: rates + N(0, magnitude^2) noise, clipped to ``[0, r_max]``, projected
        onto the guidance ordering and re-scaled to meet the target exactly. The caller shrinks
        ``magnitude`` with the temperature (brief §5). With ``keeps``, a draw that keeps the same widths as
        ``action`` or as any keep counts in ``avoid`` (e.g. the candidates scored so far) is drawn again at
        twice the magnitude, up to :data:`PERTURB_TRIES` draws (the last one is returned whatever it keeps).
        Returns float64 [n_units]."""
        action = np.asarray(action, dtype=np.float64)
        seen = None if self.keeps is None else {self.keeps(action), *avoid}
        for attempt in range(1 if seen is None else PERTURB_TRIES):
            noisy = action + float(magnitude) * 2.0 ** attempt * _normal(rng, len(self.units))
            candidate = self.meet(np.clip(noisy, 0.0, self.r_max))
            if seen is None or self.keeps(candidate) not in seen:
                break
        return candidate

    def swap(self, action: np.ndarray, rng: np.random.Generator, *,
             avoid: Collection[tuple[int, ...]] = ()) -> np.ndarray | None:
        """A local neighbour of ``action`` (beyond the paper): one unit one width wider (its next keep count
        up), another unit pruned just enough more to meet the target again, then given back (with
        ``give_back``); every other unit keeps its rate. The unit to widen is drawn from ``rng``; the one to
        prune is the one that leaves the least of the target's budget unused (a coarse unit that overshoots
        wastes capacity), the next one when that gives widths already scored, up to :data:`PERTURB_TRIES`
        candidates built. Where widths are coarse (aligned to 8 or 16 channels) a Gaussian move re-fit to the
        target changes most units at once (a resnet20 search at flops=4x changed the rates of 5-12 of its 12
        filter groups a move, and none of 19 moves scored above its start, BENCHMARKS.md, "Session 29"); a swap
        moves two.
        The guidance ordering is not imposed on it.

        Returns:
            float64 [n_units] meeting the target, other widths than the action's and those in ``avoid``; None
            without ``keeps`` or when no candidate tried gives new widths.
        """
        if self.keeps is None:
            return None
        action = np.asarray(action, dtype=np.float64)
        seen = {self.keeps(action), *avoid}
        budget, built = self.original / self.target, 0
        for grow in rng.permutation(len(self.units)):
            wider = self._one_width_wider(action, int(grow))
            for candidate in () if wider is None else self._refits(wider, int(grow), budget):
                candidate = self._given_back(candidate)
                if self.keeps(candidate) not in seen:
                    return candidate
                built += 1
                if built == PERTURB_TRIES:
                    return None
        return None

    def _refits(self, action: np.ndarray, skip: int, budget: float) -> list[np.ndarray]:
        """``action`` with one unit other than ``skip`` at the smallest rate that meets ``budget``, one candidate
        per unit that can, those that leave the least budget unused first (float64 [n_units] each)."""
        fits = []
        for index in range(len(self.units)):
            if index != skip and self.cost(_with(action, index, self.r_max)) <= budget:
                fits.append(_with(action, index, _lowest_within(action, index, self.cost, budget,
                                                                float(action[index]), self.r_max, self._sizes[index])))
        return sorted(fits, key=lambda fit: -self.cost(fit))

    def _one_width_wider(self, action: np.ndarray, index: int) -> np.ndarray | None:
        """``action`` with unit ``index`` at the largest rate that keeps more of it (its next width up), found
        by bisection on :attr:`keeps`; None when the unit is whole already."""
        kept = self.keeps(action)[index]
        low, high = 0.0, float(action[index])  # invariant: rate `low` keeps more than `kept`, `high` does not
        if self.keeps(_with(action, index, low))[index] <= kept:
            return None
        while high - low > 0.25 / max(self._sizes[index], 1.0):
            mid = 0.5 * (low + high)
            low, high = (mid, high) if self.keeps(_with(action, index, mid))[index] > kept else (low, mid)
        return _with(action, index, low)

    def explorer(self, magnitude: float, moves: str = "gaussian") -> tuple[Callable, Callable]:
        """``(perturb, record)`` for :func:`autocompress.annealing.simulated_annealing`. ``perturb(action,
        step_magnitude, rng)`` is a Gaussian :meth:`perturb`; with ``moves="mixed"`` it is a local :meth:`swap`
        with probability ``1 - step_magnitude / magnitude`` (the search's starting magnitude: the share of local
        moves grows as the temperature falls), else (or when no swap gives new widths) a Gaussian move, then a
        swap after all when that finds no new widths. Both avoid the widths of every candidate scored so far,
        which ``record(step)`` (call it from ``on_step``) adds from the new entries of ``step.trajectory``. The set
        follows the trajectory alone, so every rank of a distributed search holds the same one."""
        scored: set[tuple[int, ...]] = set()
        counted = 0  # trajectory entries already in `scored`

        def record(step) -> None:
            nonlocal counted
            if self.keeps is not None:
                scored.update(self.keeps(np.asarray(entry["action"])) for entry in step.trajectory[counted:])
            counted = len(step.trajectory)

        def gaussian(action: np.ndarray, step_magnitude: float, rng) -> np.ndarray:
            return self.perturb(action, step_magnitude, rng, avoid=scored)

        def mixed(action: np.ndarray, step_magnitude: float, rng: np.random.Generator) -> np.ndarray:
            global_share = step_magnitude / magnitude if magnitude > 0 else 0.0
            local = self.swap(action, rng, avoid=scored) if rng.random() >= global_share else None
            if local is not None:
                return local
            moved = gaussian(action, step_magnitude, rng)
            if self.keeps is None or self.keeps(moved) not in {self.keeps(action), *scored}:
                return moved
            local = self.swap(action, rng, avoid=scored)  # the Gaussian found no new widths: a swap may
            return moved if local is None else local

        return (mixed if moves == "mixed" else gaussian), record

    def compression(self, action: np.ndarray) -> float:
        """``original / cost(action)``: the compression rate (x) the action reaches."""
        return self.original / float(self.cost(np.asarray(action, dtype=np.float64)))

    def to_rates(self, action: np.ndarray) -> dict[str, dict[str, float]]:
        """The engine's rates dict ``{"filter": {..}, "column": {..}, "irregular": {..}}`` of an action."""
        return rates_dict(self.units, action)

    @classmethod
    def from_space(cls, space, objective: str, target: float, *, kinds: Sequence[str] | None = None,
                   r_max: float | None = None, max_iter: int = 64, block: int = 1,
                   guidance: str = "layer") -> ActionSampler:
        """A sampler over the units of ``space`` (a :class:`~autocompress.space.PruningSpace`) of the given
        ``kinds`` (default: all) with the exact cost :func:`space_cost`; ``r_max`` defaults to
        ``space.max_rate``. Units of other kinds stay at rate 0. At aligned widths (``space.channel_multiple``
        > 1) each fit gives back heaviest first (see :func:`give_back`); at single channels a fit lands within
        about 1 % of the target (median 0.6 %) and giving back cost top-1 at params=10x (BENCHMARKS.md,
        "Session 13: give-back"), so the fit stays as it is. With a ``block`` above the space's multiple (the
        CPU's channel block under ``auto``'s 8 for a params / flops target) a filter group of a 2-D convolution's or
        a Linear's output channels (:meth:`~autocompress.space.PruningSpace.sets_blocked_channels`) is given back
        only to widths aligned to ``block`` (or its whole width): a 16-channel block runs 24 channels as slowly as
        32. Other groups (a Conv1d's, whose time follows its width) are given back at the space's multiple.
        ``guidance`` weighs the units per layer or per channel (:data:`GUIDANCES`).

        Raises:
            UserError: unknown objective or guidance, empty space, a FLOPs target with irregular units only (their zeros
                stay in dense tensors: the compact model's MACs do not drop), or an unreachable target.
        """
        units = [u for u in units_from_space(space, objective, guidance) if kinds is None or u.kind in kinds]
        if objective == "flops" and units and all(u.kind == "irregular" for u in units):
            raise UserError("a FLOPs target cannot be met by irregular pruning alone (its zeros stay in dense "
                            "tensors, so the compact model's MACs do not drop)",
                            "add filter or column units (dims), or give a params target")
        widths = None
        if on_block(block, space.channel_multiple):
            widths = [allowed_widths(u.size, block) if u.kind == "filter" and space.sets_blocked_channels(u.name)
                      else None for u in units]
        try:
            return cls(units, space_cost(space, units, objective), target,
                       r_max=space.max_rate if r_max is None else r_max, max_iter=max_iter,
                       give_back="heaviest" if space.channel_multiple > 1 else None, widths=widths,
                       keeps=space_keeps(space, units))
        except Unreachable as exc:
            raise Unreachable(exc.target, exc.reached, exc.r_max,
                              *_held_back(space, objective, kinds, exc.target, exc.r_max)) from None


def _params_may_reach(space, kinds: Collection[str] | None, target: float, r_max: float,
                      columns: Collection[str]) -> bool:
    """Whether a params target of ``target`` may be within reach of a flops ``space`` that leaves the ``columns``
    layers out of column pruning: its units (of ``kinds``) all at ``r_max`` with ``r_max`` of those layers' whole
    weights removed as well (an upper bound: filter pruning has removed part of them already)."""
    units = [u for u in units_from_space(space, "params") if kinds is None or u.kind in kinds]
    cost = space_cost(space, units, "params")
    weights = [space.layer_macs[name][0] for name in columns if name in space.layer_macs]
    spared = r_max * sum(math.prod(space.param_shapes.get(weight, ())) for weight in weights)
    return cost(np.zeros(len(units))) >= target * max(cost(np.full(len(units), r_max)) - spared, 1.0)


def on_block(block: int, multiple: int) -> bool:
    """Whether a fit at channel ``multiple`` gives channels back on ``block``-aligned widths only (see
    :meth:`ActionSampler.from_space`): a block above the multiple, itself above 1 (at single channels no fit
    gives back)."""
    return block > multiple > 1


def rates_dict(units: Sequence[ActionUnit], action: np.ndarray) -> dict[str, dict[str, float]]:
    """``{"filter": {name: rate}, "column": {...}, "irregular": {...}}`` for a rate vector [n_units]."""
    rates: dict[str, dict[str, float]] = {kind: {} for kind in KINDS}
    for unit, rate in zip(units, np.asarray(action, dtype=np.float64)):
        rates[unit.kind][unit.name] = float(rate)
    return rates


def _check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}", f"use one of {', '.join(OBJECTIVES)}")
    return "params" if objective == "params" else "macs"


def units_from_space(space, objective: str, guidance: str = "layer") -> list[ActionUnit]:
    """The action's units for a :class:`~autocompress.space.PruningSpace`: its filter groups, column layers
    and irregular layers (in that order), weighted by the parameters (``"params"``) or MACs (``"flops"``)
    each governs per producing layer, or per producing layer and element (``guidance``, see
    :data:`GUIDANCES` and :func:`guidance_weight`). Raises UserError for an unknown objective or guidance."""
    attr = _check_objective(objective)
    _check_guidance(guidance)
    return [ActionUnit(kind, u.name, int(u.size), guidance_weight(u, getattr(u, attr), guidance)) for kind in KINDS
            for u in space.units(kind)]


def _check_guidance(guidance: str) -> None:
    if guidance not in GUIDANCES:
        raise UserError(f"unknown guidance {guidance!r}", f"use one of {', '.join(GUIDANCES)}")


def space_keeps(space, units: Sequence[ActionUnit]) -> Callable[[np.ndarray], tuple[int, ...]]:
    """The keep counts of an action over ``units`` of ``space``: per filter group the channels it keeps
    (:meth:`~autocompress.space.PruningSpace.filter_keep`, aligned to the space's channel multiple), per column
    unit :meth:`~autocompress.space.PruningSpace.column_keep` of its size, per irregular unit
    :func:`~autocompress.space.keep_count` of its size. Two actions of equal keep counts
    prune the same number of channels from every group (and nearly always the same columns and weights)."""
    def keep(unit: ActionUnit, rate: float) -> int:
        if unit.kind == "filter":
            return space.filter_keep(space.unit("filter", unit.name), rate)
        if unit.kind == "column":
            return space.column_keep(space.unit("column", unit.name), unit.size, rate)
        return keep_count(unit.size, rate)

    def keeps(action: np.ndarray) -> tuple[int, ...]:
        return tuple(keep(u, float(r)) for u, r in zip(units, action))

    return keeps


def space_cost(space, units: Sequence[ActionUnit], objective: str) -> Cost:
    """The exact cost of a rate vector: ``space.estimate(rates)``, the parameters (``"params"``) or MACs
    (``"flops"``) of the compact model, equal to ``space.count(project(space, model, rates))`` for any
    weights (the same counts the engine reports), from keep counts alone (well under 1 ms a call).
    """
    attr = _check_objective(objective)

    def cost(rates: np.ndarray) -> float:
        return float(getattr(space.estimate(rates_dict(units, np.asarray(rates, dtype=np.float64))), attr))

    return cost
