"""Masks hold through training: SGD with momentum and weight decay, Adam, AdamW never revive pruned
entries; apply_masks zeroes exactly the masked entries."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.masks import MaskEnforcer, apply_masks
from autocompress.projection import project
from autocompress.space import PruningSpace


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _pruned(dims=("filter", "column", "irregular")):
    model = _net()
    x = torch.randn(2, 3, 6, 6)
    space = PruningSpace.build(model, x, dims=dims)
    rates = {"filter": {g.name: 0.5 for g in space.filter_groups},
             "column": {c.name: 0.3 for c in space.column_layers},
             "irregular": {w.name: 0.2 for w in space.irregular_layers}}
    param_masks = space.param_masks(project(space, model, rates))
    return model, param_masks


def _train(model, optimizer, steps=5, after_step=None):
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if after_step is not None:
            after_step()


def _masked_entries(model, param_masks):
    params = dict(model.named_parameters())
    return {name: params[name].detach()[~mask] for name, mask in param_masks.items()}


def test_apply_masks_zeroes_exactly_the_masked_entries():
    model, param_masks = _pruned()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_masks(model, param_masks)
    for name, param in model.named_parameters():
        mask = param_masks.get(name, torch.ones_like(param, dtype=torch.bool))
        assert torch.equal(param.detach()[mask], before[name][mask])
        assert not param.detach()[~mask].any()
    # bias and BatchNorm affine of removed channels are masked too
    assert {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "8.weight"} <= set(param_masks)
    assert not param_masks["1.bias"].all()


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-3, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=5e-3),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1, amsgrad=True),
], ids=["sgd-momentum-wd", "adam", "adamw-amsgrad"])
def test_masks_survive_optimizer_steps(make_optimizer):
    model, param_masks = _pruned()
    optimizer = make_optimizer(model.parameters())
    enforcer = MaskEnforcer(model, param_masks).attach(optimizer)
    _train(model, optimizer, steps=6)
    for name, values in _masked_entries(model, param_masks).items():
        assert not values.any(), name
    params = dict(model.named_parameters())
    for name, mask in param_masks.items():
        for key, state in optimizer.state[params[name]].items():
            if isinstance(state, torch.Tensor) and state.shape == mask.shape:
                assert not state[~mask].any(), (name, key)
                assert state[mask].any(), (name, key)  # kept entries still train
    enforcer.detach()


def test_without_enforcer_momentum_revives_pruned_weights():
    """Control: the same training without the enforcer moves masked entries (so the test above can fail)."""
    model, param_masks = _pruned()
    apply_masks(model, param_masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    _train(model, optimizer, steps=3)
    assert any(values.any() for values in _masked_entries(model, param_masks).values())


def test_after_step_hook_alone_and_cleared_momentum():
    """Used as the training loop's after_step callback (no attach), masks still hold after every step; with
    attach, momentum built up before pruning is cleared for masked entries, so a later step without the
    enforcer cannot move them."""
    model, param_masks = _pruned(dims=("filter",))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    enforcer = MaskEnforcer(model, param_masks)
    _train(model, optimizer, steps=4, after_step=enforcer.after_step)
    for values in _masked_entries(model, param_masks).values():
        assert not values.any()

    model, param_masks = _pruned(dims=("filter",))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    _train(model, optimizer, steps=3)  # dense training: momentum everywhere
    enforcer = MaskEnforcer(model, param_masks).attach(optimizer)
    _train(model, optimizer, steps=1)
    enforcer.detach()
    # one step with zero gradients: only momentum and weight decay act; masked entries must stay 0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for values in _masked_entries(model, param_masks).values():
        assert not values.any()


def test_bad_masks_are_rejected():
    model = _net()
    with pytest.raises(ValueError, match="not a parameter"):
        apply_masks(model, {"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        MaskEnforcer(model, {"0.weight": torch.ones(3, dtype=torch.bool)})
