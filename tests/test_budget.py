"""The one budget setting: the split the ac_kd rule gives, its refusals, and its record in config.yaml."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autocompress.budget import (RULE, apply_budget, budget_schedule, describe, given_settings, search_evaluations,
                                 search_share_warning)
from autocompress.compress import Compression, resolve_config
from autocompress.config import CompressConfig, SettingError, Target


def expected_split(factor: float, budget: int) -> tuple[int, int, int]:
    """(rounds, ADMM epochs per round, final retraining epochs) by the rule's words: a round for each power of 10
    the target reaches or passes (at least one), one ADMM epoch per round unless that leaves no epoch to retrain,
    the rest retraining."""
    rounds = 1
    while 10 ** rounds < factor * (1 - 1e-12):
        rounds += 1
    admm = 1 if budget > rounds else 0
    return rounds, admm, budget - rounds * admm


@pytest.mark.parametrize("target, budget", [("params=3x", 8), ("params=10x", 8), ("params=30x", 8),
                                            ("flops=2x", 4), ("params=100.5x", 5), ("params=1000x", 3),
                                            ("params=1000x", 4)])
def test_the_budget_is_split_as_the_rule_says(target, budget):
    config = apply_budget(CompressConfig.from_dict({"target": target, "budget": budget}, validate=False))
    rounds, admm, final = expected_split(float(target.split("=")[1][:-1]), budget)
    assert (config.rounds, config.admm.epochs, config.retrain.epochs, config.final_retrain_epochs) \
        == (rounds, admm, 0, final)
    assert config.distillation.enabled and config.budget == budget
    assert rounds * config.admm.epochs + config.final_retrain_epochs == budget  # every epoch spent, none more
    config.validate()
    assert apply_budget(config) == config  # a resolved (stored) config applies again unchanged


def test_a_latency_target_in_milliseconds_takes_one_round():
    """latency=Nms has no factor until the base is measured: the rule gives it one round (it crashed before)."""
    config = apply_budget(CompressConfig.from_dict({"target": "latency=5ms", "budget": 6}))
    assert (config.rounds, config.admm.epochs, config.final_retrain_epochs) == (1, 1, 5)
    config.validate()


def test_explicit_schedule_settings_with_a_budget_are_refused_naming_both():
    with pytest.raises(SettingError, match=r"budget=8 and admm\.epochs=3 both set the training schedule") as info:
        apply_budget(CompressConfig.from_dict({"target": "params=10x", "budget": 8, "admm": {"epochs": 3}},
                                              validate=False))
    assert info.value.setting == "budget"
    with pytest.raises(SettingError, match="budget=8 and rounds=4 both"):
        apply_budget(CompressConfig.from_dict({"target": "params=10x", "budget": 8, "rounds": 4}, validate=False))
    same = apply_budget(CompressConfig.from_dict({"target": "params=10x", "budget": 8, "final_retrain_epochs": 7},
                                                 validate=False))
    assert same.final_retrain_epochs == 7  # equal to what the budget derives: accepted
    for target, steps in (("params=3x", 500), ("latency=5ms", 500), ("params=30x", 10)):  # no factor; no ADMM
        with pytest.raises(SettingError, match=r"budget=0 is too small: the schedule needs at least one "
                                               r"epoch.*use budget=1 or more"):
            budget_schedule(Target.parse(target).factor, 0, steps)
    with pytest.raises(SettingError, match="budget=0"):
        CompressConfig.from_dict({"target": "params=10x", "budget": 0})


@pytest.mark.parametrize("setting, name", [({"admm": {"epochs": 2}}, r"admm\.epochs=2"),
                                           ({"retrain": {"epochs": 3}}, r"retrain\.epochs=3")])
def test_an_explicit_setting_equal_to_its_default_still_contradicts_the_budget(setting, name):
    """admm.epochs=2 and retrain.epochs=3 are CompressConfig's defaults: given with a budget that derives 1 / 0
    they are refused, not silently replaced."""
    with pytest.raises(SettingError, match=rf"budget=4 and {name} both set the training schedule"):
        resolve_config({"target": "params=4x", "budget": 4, **setting}, None)
    resolved = resolve_config({"target": "params=4x", "budget": 4}, None)  # not given: derived
    assert (resolved.admm.epochs, resolved.retrain.epochs, resolved.distillation.enabled) == (1, 0, "auto")


def test_a_budget_keeps_distillation_off_when_the_caller_turns_it_off():
    """Distillation from a weak base can cost points (a fresh user's 79.6 % base: -4.6): ``distillation.enabled:
    false`` given with a budget stays, the rest of the schedule is the budget's, and the log line says so."""
    off = resolve_config({"target": "params=4x", "budget": 4, "distillation": {"enabled": False}}, None)
    on = resolve_config({"target": "params=4x", "budget": 4}, None)
    assert not off.distillation.enabled and on.distillation.enabled
    schedule = [(c.rounds, c.admm.epochs, c.final_retrain_epochs) for c in (off, on)]
    assert schedule[0] == schedule[1]
    assert "no distillation," in describe(off) and "distillation from the base" in describe(on)
    assert not apply_budget(off, given_settings(dataclasses.asdict(off))).distillation.enabled  # a stored config


def test_the_schedule_line_of_a_callers_loop_says_distillation_is_offered_to_it():
    """A caller's train_fn distils only where it calls phase.distill; the schedule line said "distillation from the
    base" for a loop that never did (fresh user 78)."""
    on = resolve_config({"target": "params=4x", "budget": 4}, None)
    off = resolve_config({"target": "params=4x", "budget": 4, "distillation": {"enabled": False}}, None)
    assert "distillation from the base offered to train_fn (phase.distill)," in describe(on, own_loop=True)
    assert "no distillation," in describe(off, own_loop=True)
    assert "offered" not in describe(on)


def test_a_config_that_is_not_a_mapping_is_refused():
    with pytest.raises(SettingError, match="the config must be a mapping of settings, not str"):
        resolve_config("rounds: 1", "params=2x")


@pytest.mark.parametrize("steps, admm", [(16, 0), (188, 0), (390, 0), (799, 0), (800, 1), (None, 1)])
def test_an_epoch_of_few_steps_gets_no_admm(steps, admm):
    """Below 800 optimiser steps per epoch the rule spends every epoch on retraining (measured: an ADMM epoch
    of 16 steps cost 22.8 points, of 188 steps 0.78 on a weak base); unknown steps keep one ADMM epoch per
    round."""
    schedule = budget_schedule(30.0, 6, steps)
    assert (schedule["rounds"], schedule["admm"]["epochs"], schedule["final_retrain_epochs"]) == (2, admm, 6 - 2 * admm)
    config = resolve_config({"target": "params=30x", "budget": 6}, None, steps)
    assert config.admm.epochs == admm and ("too few for ADMM" in describe(config)) == (admm == 0)
    if admm == 0:  # the budget may then be below the number of rounds
        assert budget_schedule(1000.0, 2, steps)["final_retrain_epochs"] == 2
        stored = dataclasses.asdict(config)  # a resumed run's config.yaml, checked before the loader is known
        assert resolve_config(stored, None).admm.epochs == 0 and resolve_config(stored, None, steps) == config
        with pytest.raises(SettingError, match="budget derives admm.epochs=1"):  # the loader has grown since
            resolve_config(stored, None, 800)


@pytest.mark.parametrize("batches, admm", [(2, 0), (800, 1)])
def test_config_yaml_records_the_derived_schedule(tmp_path, batches, admm):
    """The run folder's config.yaml is written when the run is set up (before any training), with the schedule
    the rule derives for the training loader's length."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    data = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])) for _ in range(batches)]
    lines: list[str] = []
    run = Compression(model, torch.randn(1, 1, 8, 8), "params=30x", task_args=dict(train_loader=data, val_loader=data),
                      device="cpu", config={"budget": 6}, run_dir=tmp_path / "run", progress=False, log=lines.append)
    run.store.close()
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    rounds, _, final = expected_split(30.0, 6)
    final = final if admm else 6
    assert (stored["budget"], stored["rounds"], stored["admm"]["epochs"], stored["retrain"]["epochs"],
            stored["final_retrain_epochs"], stored["distillation"]["enabled"]) == (6, rounds, admm, 0, final, False)
    # distillation.enabled auto resolved: off, as this untrained base scores its training batches (the validation
    # data here) no higher than validation (session 46's fit gap)
    assert stored["run"]["schedule"].startswith("budget 6 epochs (rule ac_kd) -> 2 round(s)")
    assert lines[0].startswith("distillation from the base: off (distillation.enabled auto: the base scores 0.0 ")
    assert lines[1] == stored["run"]["schedule"] and stored["run"]["rule"] == RULE and RULE not in lines[1]


def test_a_loader_without_a_length_is_refused_before_a_schedule_is_logged():
    """A fresh user's loader without len() first read a budget split assuming some length (1 ADMM epoch, a
    30-evaluation search), then was refused: the schedule is logged once the loader is checked."""
    from autocompress.errors import UserError

    def batches():
        for _ in range(3):
            yield torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])

    class NoLength:
        def __iter__(self):
            return batches()

    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 3))
    lines: list[str] = []
    with pytest.raises(UserError, match=r"train_loader has no len\(\)"):
        Compression(model, torch.randn(1, 1, 8, 8), "params=2x", task_args=dict(train_loader=NoLength(),
                    val_loader=list(batches())), device="cpu", config={"budget": 3}, progress=False,
                    log=lines.append)
    assert not any("rule ac_kd" in line for line in lines)


@pytest.mark.parametrize("target, budget, schedule", [("params=10x", 1, (1, 0, 1)), ("params=30x", 1, (2, 0, 1)),
                                                      ("params=30x", 2, (2, 0, 2)), ("params=30x", 3, (2, 1, 1)),
                                                      ("params=10x", 2, (1, 1, 1)), ("latency=5ms", 1, (1, 0, 1))])
def test_a_budget_with_no_epoch_left_to_retrain_after_admm_gets_no_admm(target, budget, schedule):
    """A fresh user's ``--epochs 1`` became one ADMM epoch and no retraining (a model hard-pruned after one ADMM
    epoch is near chance); a budget of no more epochs than rounds now retrains on every epoch, and the log says
    why."""
    derived = budget_schedule(Target.parse(target).factor, budget, 1000)
    assert (derived["rounds"], derived["admm"]["epochs"], derived["final_retrain_epochs"]) == schedule
    config = resolve_config({"target": target, "budget": budget}, None, 1000)
    assert ("ADMM epoch per round (none: " in describe(config)) == (schedule[1] == 0)
    assert resolve_config(dataclasses.asdict(config), None, 1000) == config  # a stored config.yaml resumes


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(1, 400), steps=st.integers(1, 5000), rounds=st.integers(1, 4),
       finetune=st.integers(1, 500))
def test_the_search_fine_tunes_within_the_budgets_steps(budget, steps, rounds, finetune):
    """Evaluations per round: the most whose fine-tuning steps over every round stay within the budget's optimiser
    steps, at most the default 30; one (the start) when fewer than 10 fit."""
    n = search_evaluations(budget * steps, rounds, finetune)
    assert n == 1 or 10 <= n <= 30
    assert n == 1 or n * rounds * finetune <= budget * steps
    assert n == 30 or (n + 1 if n > 1 else 10) * rounds * finetune > budget * steps


@pytest.mark.parametrize("target, budget, steps, scorer, given, evaluations", [
    ("flops=2x", 3, 94, "auto", None, 1),        # a fresh user's 3 epochs of 94 steps: 282 steps, 50 per candidate
    ("flops=2x", 6, 94, "auto", None, 11),       # 564 steps: 11 candidates
    ("params=30x", 8, 313, "auto", None, 25),    # two rounds: 2504 steps / (2 x 50)
    ("flops=2x", 15, 391, "finetune", None, 30),  # the realistic grid: the default
    ("flops=2x", 3, 94, "bn", None, 30),         # a scorer that does not fine-tune: the default
    ("flops=2x", 3, 94, "auto", 12, 12),         # the caller's own setting stays
    ("flops=2x", 3, None, "auto", None, 30),     # the loader's length not known yet
])
def test_a_short_budget_gets_a_short_search(target, budget, steps, scorer, given, evaluations):
    data = {"target": target, "budget": budget, "quick_eval": {"scorer": scorer}}
    if given is not None:
        data["search"] = {"max_evaluations": given}
    config = resolve_config(data, None, steps)
    assert config.search.max_evaluations == evaluations
    cooled = 1 + math.floor(math.log(0.002 / 0.05) / math.log(0.85))  # the default temperatures end it at 20
    assert cooled == 20
    assert (f"a search of at most {min(evaluations, cooled)} evaluations per round" if evaluations > 1 else
            "no search: the start (search.start), not scored") in describe(config)
    assert resolve_config(dataclasses.asdict(config), None, steps) == config  # a stored config.yaml resumes


def test_a_hand_written_schedule_whose_search_outweighs_its_training_is_warned_about(caplog):
    """Fresh user 71's 2-epoch schedule (no budget) spent 267 s of 321 s in a 20-evaluation search: a schedule
    without budget whose search fine-tunes more steps than it trains is warned about before any work; the budget
    setting keeps the search within the training's steps."""
    config = CompressConfig(target="flops=2x", rounds=1)
    planned = config.search.annealing(0).planned_evaluations()
    searched = planned * config.quick_eval.finetune_steps
    warning = search_share_warning(config, 1, searched - 1)
    assert warning == (f"the search fine-tunes its candidates for {searched} optimiser steps ({planned} evaluations x "
                       f"{config.quick_eval.finetune_steps} steps x 1 round(s)), more than the {searched - 1} the "
                       "schedule trains: set budget (which keeps the search within the training's steps), or lower "
                       "search.max_evaluations or quick_eval.finetune_steps")
    assert search_share_warning(config, 1, searched) is None
    assert search_share_warning(dataclasses.replace(config, budget=2), 1, 1) is None
    no_finetune = dataclasses.replace(config, quick_eval=dataclasses.replace(config.quick_eval, scorer="bn"))
    assert search_share_warning(no_finetune, 1, 1) is None
    assert "x 2 round(s)" in search_share_warning(config, 2, searched)
