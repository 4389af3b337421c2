"""The compress settings (autocompress.config): targets, round schedules, nested typed sections with one
from_dict, errors that name the setting."""
from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import pytest
import yaml
from hypothesis import given, settings

from autocompress.admm import ADMMConfig
from autocompress.config import (CompressConfig, PurificationConfig, QuickEvalConfig, RetrainConfig, SearchConfig,
                                 SettingError, Target, round_targets)
from autocompress.distillation import DistillationConfig
from autocompress.errors import UserError


def test_target_parsing():
    assert Target.parse("params=20x") == Target("params", 20.0)
    assert Target.parse(" flops = 8.5 ") == Target("flops", 8.5)
    for bad in ("params=1x", "size=2x", "params=abc", "20x", "params=1e30x"):
        with pytest.raises(SettingError) as error:
            Target.parse(bad)
        assert error.value.setting == "target"
    assert Target.parse("latency=2x") == Target("latency", 2.0) and Target.parse("latency=5ms").ms == 5.0
    with pytest.raises(SettingError, match="has no unit") as error:  # 5x or 5 ms: the user must say
        Target.parse("latency=5")
    assert "latency=5x" in str(error.value) and "latency=5ms" in str(error.value)
    assert Target.parse("Latency=2X") == Target("latency", 2.0) and Target.parse("latency=3MS").ms == 3.0
    assert Target.parse("params=1e1x") == Target("params", 10.0)  # scientific notation is a number too
    for bad, words in (("latency=0.5x", "factor must be > 1"), ("params=1x", "factor must be > 1"),
                       ("flops=-2x", "factor must be > 1"), ("latency=-5ms", "latency must be > 0"),
                       ("latency=0ms", "latency must be > 0"), ("params=1e9x", "factor must be > 1 and < 1e9"),
                       ("flops=2.5e-1x", "factor must be > 1")):  # a negative number is read, then refused
        with pytest.raises(SettingError, match=words):
            Target.parse(bad)
    with pytest.raises(SettingError, match="a MACs reduction is a flops target; write flops=3x "):
        Target.parse("MACs=3x")  # a fresh user's guess (session 24)


def test_round_schedules():
    assert round_targets(12, "doubling") == [2, 4, 8, 12]
    assert round_targets(8, "doubling") == [2, 4, 8]
    assert round_targets(1.5, "doubling") == [1.5]
    assert round_targets(9, "2") == pytest.approx([3.0, 9.0])
    assert round_targets(9, 2) == pytest.approx([3.0, 9.0])
    assert round_targets(10, [3, 10]) == [3.0, 10.0]
    for bad in ([3, 2, 10], [2, 5], [1.0, 10], "sometimes", 1000, True,
                [float("nan")], [1.5, float("nan"), 10], [float("inf")]):  # NaN passed every comparison (user 65)
        with pytest.raises(SettingError):
            round_targets(10, bad)


def test_partial_sections_keep_the_other_defaults():
    """A section given in part keeps its other defaults (compress's ADMM defaults included); the resolved
    form is what config.yaml stores, and it reads back to the same config."""
    config = CompressConfig.from_dict({"target": "params=2x", "admm": {"epochs": 3}, "retrain": {"lr": 0.05}})
    assert config.admm == ADMMConfig(epochs=3, rho_init=0.02, rho_growth=1.6, update_interval=100)
    assert config.retrain == RetrainConfig(lr=0.05)
    assert config.purification == PurificationConfig()
    assert config.search == SearchConfig()
    assert config.distillation == DistillationConfig()
    assert config.quick_eval == QuickEvalConfig()
    assert config.retrain.train_config(7).epochs == 7 and config.retrain.train_config().lr == 0.05
    plain = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config)))
    assert plain["admm"]["rho_init"] == 0.02 and plain["quick_eval"] == {
        "scorer": "auto", "bn_recalibration": True, "bn_batches": 5, "val_batches": 30, "finetune_steps": 50,
        "finetune_lr": None, "finetune_distill": True}
    assert CompressConfig.from_dict(plain) == config  # config.yaml round-trips


def test_the_optimizer_follows_the_task_and_sets_the_unset_learning_rates():
    """``retrain.optimizer: auto`` is AdamW for a task whose targets are not class indices (SGD's steps scale with
    the loss) and stays open for a classifier (the probe chooses), unless a learning rate is set: a rate belongs to
    one optimiser, so SGD, the rule before the probe. Learning rates left unset take the chosen optimiser's
    fine-tuning rate, set ones stay."""
    config = CompressConfig.from_dict({"target": "params=2x", "admm": {"lr": 0.2}})
    default, own = config.for_task(classifies=True), config.for_task(classifies=False)
    assert (default.retrain.optimizer, default.retrain.lr, default.quick_eval.finetune_lr) == ("sgd", 0.01, 0.01)
    assert "no probe, as admm.lr is set" in default.describe_loop(config, True)
    assert (own.retrain.optimizer, own.retrain.lr, own.quick_eval.finetune_lr) == ("adamw", 0.001, 0.001)
    assert default.admm.lr == own.admm.lr == 0.2
    assert own.retrain.train_config(2).optimizer == "adamw" and own.admm.train_config(optimizer="adamw").lr == 0.2
    chosen = CompressConfig.from_dict({"target": "params=2x", "retrain": {"optimizer": "sgd"}}).for_task(False)
    assert (chosen.retrain.optimizer, chosen.retrain.lr) == ("sgd", 0.01)
    assert own.for_task(classifies=True) == own  # resolving twice changes nothing (a resumed run compares them)
    dense = config.for_task(classifies=True, positions=True)  # per-pixel classes: a segmenter
    assert (dense.retrain.optimizer, dense.retrain.lr) == ("adamw", 0.001)
    assert "class indices per position of a dense output" in dense.describe_loop(config, True, True)
    unset = CompressConfig.from_dict({"target": "params=2x"})
    pending = unset.for_task(classifies=True)
    assert (pending.retrain.optimizer, pending.retrain.lr, pending.admm.lr) == ("auto", None, None)
    assert ("short probe before the first round (retrain.optimizer auto, class targets; a run of fewer than 160 "
            "optimiser steps is not probed)") in pending.describe_loop(unset, True)
    assert pending.for_task(True) == pending
    settled = pending.with_optimizer("adamw")
    assert (settled.retrain.optimizer, settled.retrain.lr, settled.admm.lr, settled.quick_eval.finetune_lr) == (
        "adamw", 0.001, 0.001, 0.001)
    with pytest.raises(SettingError, match=r"retrain.optimizer='adam' is unknown; use one of auto, sgd, adamw") as \
            error:
        CompressConfig.from_dict({"target": "params=2x", "retrain": {"optimizer": "adam"}})
    assert error.value.setting == "retrain.optimizer"


@pytest.mark.parametrize("enabled", ["auto", True, False])
@pytest.mark.parametrize("classifies, positions", [(True, False), (True, True), (False, False), (None, False)])
def test_distillation_auto_is_on_for_class_scores_per_item_only(enabled, classifies, positions):
    """``distillation.enabled: auto`` (what a budget derives) distils class scores per item, and neither class
    scores per position (a segmentation U-Net lost 3.8 mIoU to it from an under-trained base, gained nothing from a
    trained one) nor a regression; targets it cannot read keep it on, as before. true / false stay as given."""
    config = CompressConfig.from_dict({"target": "params=2x", "distillation": {"enabled": enabled}})
    resolved = config.for_task(classifies, positions).distillation.enabled
    assert resolved is ((classifies is not False and not positions) if enabled == "auto" else enabled)
    assert config.for_task(classifies, positions).for_task(classifies, positions) == config.for_task(classifies,
                                                                                                     positions)


def test_distillation_enabled_takes_auto_and_refuses_other_text():
    from autocompress.compress import resolve_config

    assert resolve_config({"budget": 3}, "params=2x").distillation.enabled == "auto"
    with pytest.raises(SettingError, match=r"distillation.enabled='yes' must be true, false or auto") as error:
        CompressConfig.from_dict({"target": "params=2x", "distillation": {"enabled": "yes"}})
    assert error.value.setting == "distillation.enabled"


@pytest.mark.parametrize("data, setting", [
    ({"temperature": 3}, "temperature"), ({"admm": {"bogus": 3}}, "admm.bogus"),
    ({"admm": {"epochs": "two"}}, "admm.epochs"), ({"quick_eval": {"batch_size": 3}}, "quick_eval.batch_size"),
    ({"search": {"seed": 1}}, "search.seed"), ({"retrain": {"device": "cpu"}}, "retrain.device"),
    ({"admm": 3}, "admm"), ({"seed": True}, "seed"), ({"search": {"cooling_rate": 2.0}}, "search.cooling_rate"),
    ({"dims": "weird"}, "dims"), ({"retrain": {"lr": -1.0}}, "retrain.lr"), ({"amp": "fp8"}, "amp"),
    ({"layer_norm": "plain"}, "layer_norm"), ({"admm": {"lr": -0.1}}, "admm.lr"), ({"target": None}, "target"),
    ({"quick_eval": {"scorer": "magic"}}, "quick_eval.scorer"),
    ({"quick_eval": {"finetune_steps": 0}}, "quick_eval.finetune_steps"), ({"budget": -3}, "budget"),
    ({"search": {"guidance": "widest"}}, "search.guidance"),
])
def test_errors_name_the_setting(data, setting):
    with pytest.raises(SettingError) as error:
        CompressConfig.from_dict({"target": "params=2x", **data})
    assert error.value.setting == setting
    assert isinstance(error.value, UserError) and "\n" not in str(error.value)


@pytest.mark.parametrize("target, dims, kinds", [
    ("latency=2x", None, ("filter",)), ("latency=3ms", None, ("filter",)), ("flops=2x", None, ("filter", "column")),
    ("params=8x", None, ("filter", "column")), ("latency=2x", "filter,column", ("filter", "column")),
    ("params=8x", "filter", ("filter",))])
def test_dims_default_depends_on_the_target(target, dims, kinds):
    config = CompressConfig.from_dict({"target": target, "dims": dims})
    assert config.kinds == kinds and config.resolved_dims == ",".join(kinds)


def test_irregular_flops_target_is_refused():
    with pytest.raises(SettingError, match="irregular"):
        CompressConfig.from_dict({"target": "flops=2x", "dims": "irregular"})


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["seed", "max_r", "latency_runs", "rounds", "final_retrain_epochs", "amp"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                                 st.lists(st.integers(-3, 30), max_size=3))))
def test_any_top_level_value_is_accepted_or_refused_in_one_line(data):
    """Whatever plain data a config file holds: a valid config, or a SettingError (never another exception)."""
    try:
        CompressConfig.from_dict({"target": "params=4x", **data})
    except SettingError as exc:
        assert str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("target, guidance, positions, resolved", [
    ("flops=4x", None, False, "channel"), ("flops=4x", None, True, "layer"), ("params=10x", None, False, "layer"),
    ("latency=2x", None, False, "layer"), ("flops=4x", "layer", False, "layer"),
    ("params=10x", "channel", False, "channel"), ("flops=4x", "channel", True, "channel")])
def test_guidance_auto_is_per_channel_for_flops_targets_of_per_item_outputs_only(target, guidance, positions,
                                                                                  resolved):
    search = {} if guidance is None else {"search": {"guidance": guidance}}
    config = CompressConfig.from_dict({"target": target, **search})
    assert config.search.guidance == (guidance or "auto") and config.resolved_guidance(positions) == resolved


def test_search_moves_are_gaussian_by_default_and_an_unknown_one_is_refused():
    assert CompressConfig.from_dict({"target": "params=2x"}).search.moves == "gaussian"
    assert CompressConfig.from_dict({"target": "params=2x", "search": {"moves": "mixed"}}).search.moves == "mixed"
    with pytest.raises(SettingError, match=r"search.moves='local' is unknown; use one of gaussian, mixed") as error:
        CompressConfig.from_dict({"target": "params=2x", "search": {"moves": "local"}})
    assert error.value.setting == "search.moves"
