"""ADMM structured pruning (AutoCompress §3): penalty, Z/U steps, residual decrease, hard pruning, masked
retraining on real Fashion-MNIST data."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress.admm import ADMMConfig, ADMMState, admm_prune, hard_prune, masked_retrain
from autocompress.data import get_dataset
from autocompress.errors import UserError
from autocompress.models import create_model
from autocompress.space import PruningSpace
from autocompress.training import TrainConfig, evaluate, fit, seeded


@pytest.fixture(scope="module")
def trained():
    """fmnist_cnn (width 0.25) trained briefly on 2000 real Fashion-MNIST images."""
    torch.set_num_threads(1)
    splits = get_dataset("fashion-mnist", val_size=500, max_train=2000, max_test=200)
    with seeded(0):
        model = create_model("fmnist_cnn", width=0.25)
    fit(model, splits, TrainConfig(epochs=2, lr=0.05, batch_size=64), progress=False)
    space = PruningSpace.build(model, torch.zeros(1, 1, 28, 28))
    rates = {"filter": {g.name: 0.5 for g in space.filter_groups},
             "column": {c.name: 0.5 for c in space.column_layers}}
    return model, splits, space, rates


def _tiny():
    with seeded(1):
        return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))


def test_penalty_value_and_gradient_match_autograd_reference():
    model = _tiny()
    space = PruningSpace.build(model, torch.randn(2, 6), dims=("column",))
    state = ADMMState(model, space, {"column": {"0": 0.5, "2": 0.5}}, ADMMConfig(rho_init=0.3))
    gen = torch.Generator().manual_seed(0)
    state.u = [torch.randn(w.shape, generator=gen) for w in state.weights]
    state._refresh_targets()
    value = state.penalty()
    value.backward()
    fused = [w.grad.clone() for w in state.weights]
    for w in state.weights:
        w.grad = None
    reference = sum(0.5 * 0.3 * (w - z + u).pow(2).sum() for w, z, u in zip(state.weights, state.z, state.u))
    reference.backward()
    assert torch.allclose(value, reference)
    for got, w in zip(fused, state.weights):
        assert torch.allclose(got, w.grad, atol=1e-6)


def test_z_and_u_steps_by_hand():
    model = _tiny()
    space = PruningSpace.build(model, torch.randn(2, 6), dims=("column",))
    config = ADMMConfig(rho_init=0.1, rho_growth=2.0, rho_max=0.15)
    state = ADMMState(model, space, {"column": {"0": 0.5}}, config)
    w = model[0].weight.detach().clone()
    keep = torch.zeros(6, dtype=torch.bool)
    keep[w.pow(2).sum(0).topk(3).indices] = True          # 3 largest columns of W
    assert state.names == ["0.weight", "2.weight"]
    assert torch.equal(state.z[0], w * keep)                # Z0 = Proj(W)
    state.update()                                           # W unchanged, U = 0: Z = Proj(W), U = W - Z
    assert torch.equal(state.z[0], w * keep)
    assert state.rho == pytest.approx(0.15)                  # 0.1 * 2 capped at 0.15
    assert torch.allclose(state.u[0], (w * ~keep) * (0.1 / 0.15))  # rescaled scaled dual
    assert torch.allclose(state.u[1], torch.zeros_like(state.u[1]))
    residuals, total = state.residuals()
    assert residuals["0"] == pytest.approx(float((w * ~keep).norm() / w.norm()), rel=1e-6)


def test_admm_drives_pruned_units_to_zero_and_beats_one_shot(trained):
    model, splits, space, rates = trained
    val = splits.loader("val", 500)
    one_shot = copy.deepcopy(model)
    hard_prune(one_shot, space, rates)
    admm_model = copy.deepcopy(model)
    loader = splits.loader("train", 64, generator=torch.Generator().manual_seed(0))
    with seeded(0):
        result = admm_prune(admm_model, space, rates, loader,
                            ADMMConfig(epochs=2, lr=0.01, rho_init=0.5, rho_growth=1.5, rho_max=10,
                                       update_interval=8), progress=False)
    totals = [h["residual"] for h in result.history]
    assert len(totals) == 1 + 2 * len(loader) // 8
    assert totals[-1] < 0.25 * totals[0]
    # hard pruning removes little of the ADMM-trained weights: ||W - Proj(W)|| / ||W|| is small
    pm = space.param_masks(result.masks)
    params = dict(admm_model.named_parameters())
    removed = sum(float((params[n].detach() * ~m).pow(2).sum()) for n, m in pm.items())
    total = sum(float(params[n].detach().pow(2).sum()) for n in pm)
    assert (removed / total) ** 0.5 < 0.25
    hard_prune(admm_model, space, rates)
    assert evaluate(admm_model, val)["top1"] > evaluate(one_shot, val)["top1"] + 0.05


def test_masked_retrain_holds_masks_through_momentum_and_weight_decay(trained):
    model, splits, space, rates = trained
    model = copy.deepcopy(model)
    masks, pm = hard_prune(model, space, rates)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = splits.loader("train", 64, generator=torch.Generator().manual_seed(0))
    history = masked_retrain(model, pm, loader, TrainConfig(epochs=1, lr=0.05, momentum=0.9, weight_decay=5e-3),
                             progress=False)
    assert len(history) == 1
    params = dict(model.named_parameters())
    for name, mask in pm.items():
        assert bool((params[name].detach()[~mask] == 0).all()), name
    changed = [n for n, m in pm.items() if not torch.equal(params[n][m], before[n][m])]
    assert changed, "retraining did not update the kept weights"


def test_config_rejects_bad_schedules():
    with pytest.raises(UserError):
        ADMMConfig(rho_init=0.0)
    with pytest.raises(UserError):
        ADMMConfig(rho_init=1.0, rho_max=0.5)
    with pytest.raises(UserError):
        ADMMConfig(update_interval=0)
    with pytest.raises(UserError, match="auto"):
        ADMMConfig(update_interval="often")


@pytest.mark.parametrize("epochs, steps_per_epoch, expected", [
    # rho 0.02 -> 1.0 by x1.6 takes ceil(log 50 / log 1.6) = ceil(8.32) = 9 updates, in half the steps
    (4, 430, 1720 // 2 // 9),  # the demo's 4 epochs on Fashion-MNIST (430 batches): 95 steps
    (2, 79, 158 // 2 // 9),    # 2 epochs on a 10k-image CIFAR subset: 8 steps
    (1, 10, 1),                # fewer steps than updates: every step
])
def test_auto_update_interval_brings_rho_to_its_cap_halfway(epochs, steps_per_epoch, expected):
    config = ADMMConfig(epochs=epochs, rho_init=0.02, rho_growth=1.6, rho_max=1.0, update_interval="auto")
    assert config.interval(steps_per_epoch) == expected
    assert ADMMConfig(update_interval=7).interval(430) == 7 and ADMMConfig().interval(430) is None


def test_auto_update_interval_in_admm_prune(trained):
    model, splits, space, rates = trained
    loader = splits.loader("train", 64, generator=torch.Generator().manual_seed(0))
    config = ADMMConfig(epochs=1, rho_init=0.02, rho_growth=1.6, rho_max=1.0, update_interval="auto")
    with seeded(0):
        result = admm_prune(copy.deepcopy(model), space, rates, loader, config, progress=False)
    interval = len(loader) // 2 // 9
    assert [h["step"] for h in result.history[1:]] == list(range(interval, len(loader) + 1, interval))
    # the cap is reached at the 9th update, by the middle of the epoch
    assert result.history[9]["rho"] == pytest.approx(1.0) and result.history[9]["step"] <= len(loader) // 2
