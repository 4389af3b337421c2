"""Simulated annealing over actions (the "decision" step of the AutoCompress search).

Source: AutoCompress, Liu et al. AAAI 2020, the heuristic search of the automatic framework (brief §5):
start from an action that meets the target, perturb it with a step that shrinks with the temperature,
accept a better candidate always and a worse one with probability ``exp(-delta / T)``, multiply ``T`` by
the cooling rate after every step and stop below the stop temperature.

Choices the paper leaves open (ours):

* **Scores are maximised** (e.g. validation top-1). ``delta = (current - candidate) / reference`` where
  ``reference`` is ``|score of the initial action|`` (or, when that is 0, the first non-zero ``|score|``
  seen), so acceptance does not depend on the metric's scale: multiplying every score by a constant gives
  the same decisions. A relative drop of ``T`` is accepted with probability ``1/e``.
* **Perturbation magnitude** at step ``k`` is ``perturbation_magnitude * T_k / start_temperature``.
* **Bounded**: at most ``max_evaluations`` calls of ``evaluate`` (the initial action included).
* **Several candidates per step** (``candidates_per_step`` K, default 1): a step draws K neighbours of the
  current action, scores them together (``map_fn``: e.g. one share per process,
  :func:`autocompress.distributed.parallel_map`), and judges the best of them (the first on ties) as the
  step's candidate. The decisions depend on the seed and the scores only, not on how or where the scores
  were computed. With K > 1 a budget of evaluations buys fewer temperature steps.
* **Deterministic**: one ``numpy.random.Generator(PCG64(seed))`` drives perturbations and acceptance; one
  uniform draw per step whatever the outcome, so the random stream does not depend on the scores' scale.
* **Resumable**: the whole state (:class:`AnnealingState`, plain data incl. the generator state) is handed
  to ``on_step`` after every evaluation; passing it back as ``state=`` continues exactly where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import UserError

Action = np.ndarray  # float64 [n_units]: per-unit pruning rates (see sampling.py)


@dataclass(frozen=True)
class AnnealingConfig:
    """Settings of :func:`simulated_annealing`.

    Attributes:
        start_temperature: T0 (> 0), in units of relative score (0.05 = a 5% relative drop).
        cooling_rate: factor applied to T after every step, in (0, 1).
        stop_temperature: the search stops once T < stop_temperature (> 0).
        perturbation_magnitude: standard deviation of the rate noise at T0 (rates are fractions).
        max_evaluations: upper bound on ``evaluate`` calls, initial action included (>= 1).
        seed: seed of the search's own random generator.
        candidates_per_step: neighbours drawn and scored per step (>= 1); the best is judged.
    """

    start_temperature: float = 0.05
    cooling_rate: float = 0.85
    stop_temperature: float = 0.002
    perturbation_magnitude: float = 0.1
    max_evaluations: int = 30
    seed: int = 0
    candidates_per_step: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_temperature) and self.start_temperature > 0):
            raise UserError(f"start_temperature={self.start_temperature!r} must be > 0", "use e.g. 0.05")
        if not 0 < self.cooling_rate < 1:
            raise UserError(f"cooling_rate={self.cooling_rate!r} must be in (0, 1)", "use e.g. 0.85")
        if not 0 < self.stop_temperature:
            raise UserError(f"stop_temperature={self.stop_temperature!r} must be > 0", "use e.g. 0.002")
        if not (math.isfinite(self.perturbation_magnitude) and self.perturbation_magnitude >= 0):
            raise UserError(f"perturbation_magnitude={self.perturbation_magnitude!r} must be >= 0",
                            "use e.g. 0.1")
        if int(self.max_evaluations) < 1:
            raise UserError(f"max_evaluations={self.max_evaluations!r} must be >= 1", "use e.g. 30")
        if not (isinstance(self.candidates_per_step, int) and 1 <= self.candidates_per_step <= 1000):
            raise UserError(f"candidates_per_step={self.candidates_per_step!r} must be in [1, 1000]",
                            "use 1, or e.g. the number of processes")

    def planned_evaluations(self) -> int:
        """How many ``evaluate`` calls a search from scratch makes: the initial action, then
        ``candidates_per_step`` per step while the cooled temperature stays at or above ``stop_temperature``, at
        most ``max_evaluations``."""
        evaluations, temperature = 1, self.start_temperature * self.cooling_rate
        while temperature >= self.stop_temperature and evaluations < self.max_evaluations:
            evaluations += min(self.candidates_per_step, self.max_evaluations - evaluations)
            temperature *= self.cooling_rate
        return evaluations


@dataclass
class AnnealingState:
    """Everything needed to continue a search; all fields are plain data (lists, floats, dicts).

    Attributes:
        evaluations: ``evaluate`` calls so far (initial action included).
        temperature: the temperature the next candidate will be judged at.
        current_action, current_score: the chain's present point.
        best_action, best_score: the best evaluated action so far.
        reference: the score scale ``delta`` is divided by (0 until a non-zero score is seen).
        rng_state: ``numpy.random.PCG64`` state dict.
        trajectory: one dict per evaluation, see :func:`simulated_annealing`.
    """

    evaluations: int
    temperature: float
    current_action: list[float]
    current_score: float
    best_action: list[float]
    best_score: float
    reference: float
    rng_state: dict[str, Any]
    trajectory: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A deep plain-data copy (for checkpoints / JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnnealingState:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class AnnealingResult:
    """Outcome of a search: the best action (float64 [n_units]), its score and the whole trajectory."""

    best_action: Action
    best_score: float
    trajectory: list[dict[str, Any]]


def _record(state: AnnealingState, candidate: list[float], score: float, accepted: bool) -> None:
    state.trajectory.append({
        "step": state.evaluations - 1, "temperature": state.temperature, "candidate_score": score,
        "current_score": state.current_score, "best_score": state.best_score, "accepted": accepted,
        "action": candidate})


def simulated_annealing(initial_action: Action, evaluate: Callable[[Action], float],
                        perturb_fn: Callable[[Action, float, np.random.Generator], Action],
                        config: AnnealingConfig, *, state: AnnealingState | None = None,
                        on_step: Callable[[AnnealingState], None] | None = None,
                        map_fn: Callable[[Callable[[Action], float], list[Action]], list[float]] | None = None
                        ) -> AnnealingResult:
    """Maximise ``evaluate`` over actions by simulated annealing (AutoCompress, Liu et al. AAAI 2020, §5 of
    the brief).

    Args:
        initial_action: float array [n_units] meeting the target (e.g. ``ActionSampler.initial_action()``).
        evaluate: action -> score to maximise (e.g. quick-evaluation top-1).
        perturb_fn: ``(action, magnitude, rng) -> neighbour`` (e.g. ``ActionSampler.perturb``); it must draw
            its randomness from ``rng`` only.
        config: the schedule and bounds.
        state: a state handed to ``on_step`` earlier, to resume (``initial_action`` is then ignored).
        on_step: called with the state after the initial evaluation and after every step (e.g. to
            checkpoint it).
        map_fn: ``(evaluate, candidates) -> scores`` in the candidates' order; default a plain loop (see the
            module docstring: several candidates per step).
    Returns:
        :class:`AnnealingResult`. ``trajectory[k]`` is ``{"step": k, "temperature": T used to judge the
        candidate, "candidate_score", "current_score" and "best_score" after the decision, "accepted": bool,
        "action": list of rates}``; step 0 is the initial action (accepted, judged at T0).
    """
    rng = np.random.Generator(np.random.PCG64(config.seed))
    map_fn = map_fn or (lambda fn, items: [fn(item) for item in items])
    if state is None:
        action = np.asarray(initial_action, dtype=np.float64)
        score = float(map_fn(evaluate, [action])[0])
        plain = action.tolist()
        state = AnnealingState(evaluations=1, temperature=config.start_temperature, current_action=plain,
                               current_score=score, best_action=plain, best_score=score,
                               reference=abs(score), rng_state=rng.bit_generator.state)
        _record(state, plain, score, True)
        state.temperature *= config.cooling_rate
        if on_step is not None:
            on_step(state)
    else:
        state = AnnealingState.from_dict(state.to_dict())
        rng.bit_generator.state = state.rng_state
    while state.temperature >= config.stop_temperature and state.evaluations < config.max_evaluations:
        magnitude = config.perturbation_magnitude * state.temperature / config.start_temperature
        current = np.asarray(state.current_action, dtype=np.float64)
        count = min(config.candidates_per_step, config.max_evaluations - state.evaluations)
        candidates = [np.asarray(perturb_fn(current, magnitude, rng), dtype=np.float64) for _ in range(count)]
        scores = [float(value) for value in map_fn(evaluate, candidates)]
        chosen = int(np.argmax(scores))
        if state.reference == 0.0:
            state.reference = abs(scores[chosen])
        delta = 0.0 if state.reference == 0.0 else (state.current_score - scores[chosen]) / state.reference
        draw = rng.random()
        accepted = delta <= 0.0 or draw < math.exp(-delta / state.temperature)
        if accepted:
            state.current_action, state.current_score = candidates[chosen].tolist(), scores[chosen]
        for index, (candidate, score) in enumerate(zip(candidates, scores)):
            state.evaluations += 1
            plain = candidate.tolist()
            if score > state.best_score:
                state.best_action, state.best_score = plain, score
            _record(state, plain, score, accepted and index == chosen)
        state.temperature *= config.cooling_rate
        state.rng_state = rng.bit_generator.state
        if on_step is not None:
            on_step(state)
    return AnnealingResult(np.asarray(state.best_action, dtype=np.float64), state.best_score,
                           [dict(step) for step in state.trajectory])
