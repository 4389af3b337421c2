"""Projections onto structured-sparse sets: hypothesis property tests against brute force, tie-breaking,
coupled-group scoring, hybrid filter -> column order, clipping and rate validation."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autocompress.errors import UserError
from autocompress.projection import (group_scores, project, project_columns, project_irregular, project_rows,
                                     relative_importance, topk_mask)
from autocompress.space import PruningSpace, keep_count

# small matrices with repeated values (ties) and zeros
_values = st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0, 0.25])


@st.composite
def matrix_and_k(draw, axis):
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 4))
    data = draw(st.lists(_values, min_size=rows * cols, max_size=rows * cols))
    w = torch.tensor(data, dtype=torch.float32).view(rows, cols)
    n = {"rows": rows, "cols": cols, "all": rows * cols}[axis]
    return w, draw(st.integers(1, n))


def _brute_force_best(w: torch.Tensor, k: int, axis: str) -> float:
    """Smallest squared distance from ``w`` to any point with at most k non-zero rows / columns / entries."""
    w64 = w.double()
    n = {"rows": w.shape[0], "cols": w.shape[1], "all": w.numel()}[axis]
    best = float("inf")
    for kept in itertools.combinations(range(n), k):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(kept)] = True
        if axis == "rows":
            z = w64 * mask.unsqueeze(1)
        elif axis == "cols":
            z = w64 * mask.unsqueeze(0)
        else:
            z = w64 * mask.view(w.shape)
        best = min(best, float((w64 - z).pow(2).sum()))
    return best


_PROJECTIONS = {"rows": project_rows, "cols": project_columns, "all": project_irregular}


@pytest.mark.parametrize("axis", ["rows", "cols", "all"])
def test_projection_properties(axis):
    fn = _PROJECTIONS[axis]

    @settings(max_examples=60, deadline=None)
    @given(matrix_and_k(axis))
    def check(case):
        w, k = case
        z, keep = fn(w, k)
        # exactly k units kept, and the projection is w restricted to them
        assert int(keep.sum()) == k
        expanded = {"rows": keep.view(-1, 1), "cols": keep.view(1, -1), "all": keep}[axis]
        assert torch.equal(z, w * expanded)
        # idempotent
        z2, _ = fn(z, k)
        assert torch.equal(z2, z)
        # no other feasible point is closer (brute force over every k-subset)
        dist = float((w.double() - z.double()).pow(2).sum())
        assert dist <= _brute_force_best(w, k, axis) + 1e-9

    check()


def test_ties_keep_the_lower_index():
    w = torch.ones(5, 3)
    _, keep = project_rows(w, 2)
    assert keep.tolist() == [True, True, False, False, False]
    _, keep = project_columns(torch.tensor([[1.0, 2.0, 2.0, 1.0]]), 2)
    assert keep.tolist() == [False, True, True, False]
    assert topk_mask(torch.tensor([3.0, 1.0, 3.0, 1.0]), 3).tolist() == [True, True, True, False]
    alive = torch.tensor([False, True, True, True])
    assert topk_mask(torch.tensor([9.0, 1.0, 1.0, 0.5]), 1, alive).tolist() == [False, True, False, False]
    with pytest.raises(ValueError):
        topk_mask(torch.ones(3), 0)
    with pytest.raises(ValueError):
        topk_mask(torch.ones(3), 3, alive=torch.tensor([True, False, True]))


# ----------------------------------------------------------------------------- on models
class Residual(nn.Module):
    """two producers (a, b) added: one coupled group of 4 channels, read by c."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 1, bias=False)
        self.b = nn.Conv2d(2, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x) + self.b(x)))
        return self.fc(torch.relu(self.c(y)).mean((2, 3)))


X = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))


def _set(model, **weights):
    with torch.no_grad():
        for name, value in weights.items():
            model.get_parameter(name).copy_(value)
    return model


def test_coupled_group_uses_the_joint_norm_of_all_producers_and_consumers():
    model = Residual()
    # a alone prefers channels 0,1; b alone prefers 2,3; jointly 0 and 3 are largest (c reads nothing yet)
    a = torch.tensor([3.0, 2.9, 0.0, 1.0]).view(4, 1, 1, 1).repeat(1, 2, 1, 1)
    b = torch.tensor([1.0, 0.0, 2.9, 3.0]).view(4, 1, 1, 1).repeat(1, 2, 1, 1)
    _set(model, **{"a.weight": a, "b.weight": b, "c.weight": torch.zeros(3, 4, 3, 3)})
    space = PruningSpace.build(model, X)
    assert [g.name for g in space.filter_groups] == ["a", "c"]
    group = space.unit("filter", "a")
    params = dict(model.named_parameters())
    producers = (a.pow(2).sum((1, 2, 3)) + b.pow(2).sum((1, 2, 3))).double()
    assert torch.allclose(group_scores(group, params), producers)
    assert project(space, model, {"filter": {"a": 0.5}}).filters["a"].tolist() == [True, False, False, True]
    # the consumer's input columns count too: c reading channels 1 and 2 strongly outweighs the producers
    reads = torch.tensor([0.0, 4.0, 4.0, 0.0]).view(1, 4, 1, 1).repeat(3, 1, 3, 3)
    _set(model, **{"c.weight": reads})
    params = dict(model.named_parameters())
    expected = producers + reads.pow(2).sum((0, 2, 3)).double()
    assert torch.allclose(group_scores(group, params), expected)
    assert project(space, model, {"filter": {"a": 0.5}}).filters["a"].tolist() == [False, True, True, False]


def test_relative_importance_is_each_channels_joint_norm_over_its_groups_mean():
    """The magnitude start's scale: the joint L2 norm of the weights a channel owns (producer rows and consumer
    input columns), over the group's mean norm."""
    model = Residual()
    a = torch.tensor([3.0, 2.9, 0.0, 1.0]).view(4, 1, 1, 1).repeat(1, 2, 1, 1)
    b = torch.tensor([1.0, 0.0, 2.9, 3.0]).view(4, 1, 1, 1).repeat(1, 2, 1, 1)
    _set(model, **{"a.weight": a, "b.weight": b})
    c = model.c.weight.detach()
    norms = (a.pow(2).sum((1, 2, 3)) + b.pow(2).sum((1, 2, 3)) + c.pow(2).sum((0, 2, 3))).double().sqrt()
    importance = relative_importance(PruningSpace.build(model, X), model)
    assert set(importance) == {"a", "c"}
    assert torch.allclose(importance["a"], norms / norms.mean()) and importance["a"].mean().item() == pytest.approx(1)
    _set(model, **{"c.weight": torch.zeros_like(model.c.weight), "fc.weight": torch.zeros_like(model.fc.weight)})
    zero = relative_importance(PruningSpace.build(model, X), model)["c"]
    assert torch.equal(zero, torch.ones(3, dtype=torch.float64))


def test_hybrid_scores_columns_after_filter_pruning_and_counts_remaining_columns():
    model = Residual()
    gen = torch.Generator().manual_seed(4)
    _set(model, **{"c.weight": torch.randn(3, 4, 3, 3, generator=gen)})
    space = PruningSpace.build(model, X, dims=("filter", "column"))
    masks = project(space, model, {"filter": {"a": 0.5}, "column": {"c": 0.5}})
    kept_channels = masks.filters["a"].nonzero().flatten().tolist()
    assert len(kept_channels) == 2
    cols = masks.columns["c"].view(4, 9)
    # 2 channels x 9 positions remain after filter pruning; the column rate keeps round half of them
    assert int(cols.sum()) == keep_count(18, 0.5) == 9
    assert not cols[[i for i in range(4) if i not in kept_channels]].any()
    # the kept columns are the 9 of largest norm among the remaining ones
    norms = model.c.weight.detach().pow(2).sum(0).view(4, 9)
    threshold = norms[kept_channels].flatten().sort(descending=True).values[8]
    assert (norms[cols] >= threshold).all()
    pm = space.param_masks(masks)
    assert int(pm["c.weight"].sum()) == 3 * 9


def test_irregular_after_structured_counts_remaining_weights():
    model = Residual()
    space = PruningSpace.build(model, X, dims=("filter", "column", "irregular"))
    masks = project(space, model, {"filter": {"a": 0.5}, "column": {"c": 0.5}, "irregular": {"c": 0.5}})
    weights = masks.weights["c"]
    assert int(weights.sum()) == keep_count(3 * 9, 0.5)
    assert not (weights & ~space.param_masks(
        type(masks)(filters=masks.filters, columns=masks.columns, weights={}))["c.weight"]).any()


def test_rates_that_would_remove_everything_keep_one_unit_and_are_reported(caplog):
    model = Residual()
    space = PruningSpace.build(model, X, dims=("filter", "column", "irregular"))
    rates = {"filter": {g.name: 0.9 for g in space.filter_groups},
             "column": {c.name: 0.99 for c in space.column_layers},
             "irregular": {w.name: 0.999 for w in space.irregular_layers}}
    with caplog.at_level("DEBUG", logger="autocompress.projection"):  # DEBUG: the search probes many such rates
        masks = project(space, model, rates)
    for kind in ("filters", "columns", "weights"):
        assert all(int(m.sum()) == 1 for m in getattr(masks, kind).values())
    clipped = {(c.kind, c.name) for c in masks.clipped}
    assert ("filter", "a") in clipped and ("column", "c") in clipped and ("irregular", "fc") in clipped
    assert "keeping 1" in caplog.text
    # every prunable weight keeps at least one entry
    pm = space.param_masks(masks)
    assert all(int(pm[f"{n}.weight"].sum()) >= 1 for n in ("a", "b", "c", "fc"))


def test_rate_validation_names_the_problem():
    model = Residual()
    space = PruningSpace.build(model, X, dims=("filter",))
    with pytest.raises(UserError, match=r"'nope'.*valid filter names: a, c"):
        project(space, model, {"filter": {"nope": 0.5}})
    with pytest.raises(UserError, match=r"filter unit 'fc' is left out of the pruning space \(filter pruning: its "
                                        r"channels are model outputs \(classes, returned features\)\); drop its "
                                        "filter rate"):
        project(space, model, {"filter": {"fc": 0.5}})  # the classifier is excluded, and the reason said
    for bad in (1.0, -0.1, float("nan"), "0.5"):
        with pytest.raises(UserError, match="outside"):
            project(space, model, {"filter": {"a": bad}})
    with pytest.raises(UserError, match="kind"):
        project(space, model, {"channel": {"a": 0.5}})
    with pytest.raises(UserError, match=r"column unit 'c' is not in the pruning space.*none"):
        project(space, model, {"column": {"c": 0.5}})  # the space has no column dimension
    assert project(space, model, {}).filters["a"].all()
