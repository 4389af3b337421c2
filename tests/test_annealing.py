"""Simulated annealing: bounded, deterministic, scale-invariant acceptance, resumable."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from autocompress.annealing import AnnealingConfig, AnnealingState, simulated_annealing
from autocompress.errors import UserError

OPTIMUM = np.array([0.2, 0.5, 0.7])


def score(action: np.ndarray) -> float:
    """A smooth positive score peaking at OPTIMUM (stands in for validation top-1)."""
    return 1.0 - float(np.sum((np.asarray(action) - OPTIMUM) ** 2))


def perturb(action: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(action + magnitude * rng.standard_normal(action.shape), 0.0, 0.95)


CONFIG = AnnealingConfig(start_temperature=0.05, cooling_rate=0.9, stop_temperature=0.001,
                         perturbation_magnitude=0.1, max_evaluations=200, seed=7)
START = np.array([0.5, 0.5, 0.5])


def expected_evaluations(config: AnnealingConfig) -> int:
    """1 (initial) + the number of k >= 1 with T0 * c^k >= T_stop, capped by max_evaluations."""
    steps = 0
    while config.start_temperature * config.cooling_rate ** (steps + 1) >= config.stop_temperature:
        steps += 1
    return min(config.max_evaluations, 1 + steps)


def test_terminates_on_temperature_and_on_budget():
    result = simulated_annealing(START, score, perturb, CONFIG)
    # 0.05 * 0.9^k >= 0.001 for k <= 37 (0.9^37 = 0.0203, 0.9^38 = 0.0182)
    assert len(result.trajectory) == expected_evaluations(CONFIG) == 38 == CONFIG.planned_evaluations()
    for changes in ({"max_evaluations": 5}, {"candidates_per_step": 3},
                    {"candidates_per_step": 4, "cooling_rate": 0.5}):
        config = AnnealingConfig(**{**CONFIG.__dict__, **changes})
        assert len(simulated_annealing(START, score, perturb, config).trajectory) == config.planned_evaluations()
    calls = []
    bounded = AnnealingConfig(**{**CONFIG.__dict__, "max_evaluations": 5})
    result = simulated_annealing(START, lambda a: calls.append(1) or score(a), perturb, bounded)
    assert len(calls) == len(result.trajectory) == 5
    temps = [t["temperature"] for t in result.trajectory]
    np.testing.assert_allclose(temps, [0.05 * 0.9 ** k for k in range(5)])


def test_improves_and_tracks_best():
    result = simulated_annealing(START, score, perturb, CONFIG)
    assert result.best_score > score(START)
    best = max(result.trajectory, key=lambda t: t["candidate_score"])
    assert result.best_score == best["candidate_score"] == pytest.approx(score(result.best_action))
    np.testing.assert_array_equal(result.best_action, best["action"])
    assert [t["best_score"] for t in result.trajectory] == list(
        np.maximum.accumulate([t["candidate_score"] for t in result.trajectory]))


def test_same_seed_same_trajectory_and_plain_data():
    a = simulated_annealing(START, score, perturb, CONFIG)
    b = simulated_annealing(START, score, perturb, CONFIG)
    assert a.trajectory == b.trajectory
    other = simulated_annealing(START, score, perturb, AnnealingConfig(**{**CONFIG.__dict__, "seed": 8}))
    assert other.trajectory != a.trajectory
    assert json.loads(json.dumps(a.trajectory)) == a.trajectory


@pytest.mark.parametrize("factor", [100.0, 0.01])
def test_acceptance_is_scale_invariant(factor):
    base = simulated_annealing(START, score, perturb, CONFIG)
    scaled = simulated_annealing(START, lambda a: factor * score(a), perturb, CONFIG)
    assert [t["accepted"] for t in scaled.trajectory] == [t["accepted"] for t in base.trajectory]
    assert [t["action"] for t in scaled.trajectory] == [t["action"] for t in base.trajectory]
    assert not all(t["accepted"] for t in base.trajectory)  # the test exercises rejections too
    assert any(t["accepted"] and t["candidate_score"] < t0["current_score"]
               for t0, t in zip(base.trajectory, base.trajectory[1:]))  # and accepted worse moves


def test_worse_candidates_accepted_with_probability_exp_minus_delta_over_t():
    # initial score 1.0, every candidate 0.9: relative delta 0.1, judged at T = 0.2 * 0.5 = 0.1
    config = AnnealingConfig(start_temperature=0.2, cooling_rate=0.5, stop_temperature=1e-3,
                             perturbation_magnitude=0.1, max_evaluations=2)
    accepted = 0
    runs = 2000
    for seed in range(runs):
        cfg = AnnealingConfig(**{**config.__dict__, "seed": seed})
        result = simulated_annealing(START, lambda a: 1.0 if a is START else 0.9,
                                     lambda a, m, rng: a + m * rng.standard_normal(3), cfg)
        accepted += result.trajectory[1]["accepted"]
    assert accepted / runs == pytest.approx(math.exp(-1.0), abs=0.04)


def test_better_candidates_always_accepted_and_magnitude_shrinks():
    magnitudes = []

    def climbing(action, magnitude, rng):
        magnitudes.append(magnitude)
        return action + 0.001  # every step improves

    result = simulated_annealing(np.zeros(3), lambda a: float(np.sum(a)) + 1.0, climbing, CONFIG)
    assert all(t["accepted"] for t in result.trajectory)
    np.testing.assert_allclose(magnitudes, [0.1 * 0.9 ** k for k in range(1, len(magnitudes) + 1)])


def test_resume_from_any_step_equals_uninterrupted():
    full = simulated_annealing(START, score, perturb, CONFIG)
    saved = []
    simulated_annealing(START, score, perturb, AnnealingConfig(**{**CONFIG.__dict__, "max_evaluations": 12}),
                        on_step=lambda s: saved.append(json.loads(json.dumps(s.to_dict()))))
    assert len(saved) == 12
    for k in (0, 5, 11):
        resumed = simulated_annealing(None, score, perturb, CONFIG, state=AnnealingState.from_dict(saved[k]))
        assert resumed.trajectory == full.trajectory
        np.testing.assert_array_equal(resumed.best_action, full.best_action)


def test_zero_initial_score_does_not_break_normalisation():
    scores = iter([0.0, 0.0, 0.5, 0.25] + [0.1] * 50)
    result = simulated_annealing(START, lambda a: next(scores), perturb,
                                 AnnealingConfig(**{**CONFIG.__dict__, "max_evaluations": 6}))
    assert [t["accepted"] for t in result.trajectory[:3]] == [True, True, True]
    assert result.best_score == 0.5


@pytest.mark.parametrize("field,value", [("start_temperature", 0.0), ("cooling_rate", 1.0),
                                         ("stop_temperature", -1.0), ("perturbation_magnitude", -0.1),
                                         ("max_evaluations", 0)])
def test_bad_config_is_a_user_error(field, value):
    with pytest.raises(UserError, match=field):
        AnnealingConfig(**{field: value})
