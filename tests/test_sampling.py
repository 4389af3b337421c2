"""Action sampling: targets are met, loops are bounded, the guidance ordering holds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from scipy.optimize import isotonic_regression

import autocompress
from autocompress.errors import UserError
from autocompress.sampling import ActionSampler, ActionUnit, meet_target, order_rates, rates_dict


def keep(size: int, rate: float) -> int:
    """The architecture's keep count: max(1, size - round(rate * size))."""
    return max(1, size - round(rate * size))


class HybridModel:
    """A hand-countable stand-in for a hybrid space: layer j has F_j filters x C_j columns (params F_j*C_j
    after pruning), plus a fixed unprunable part. Units: one filter unit and one column unit per layer."""

    def __init__(self, filters, columns, fixed=10):
        self.filters, self.columns, self.fixed = list(filters), list(columns), fixed
        n = len(self.filters)
        self.units = [ActionUnit("filter", f"l{j}", f, f * c) for j, (f, c) in enumerate(zip(filters, columns))]
        self.units += [ActionUnit("column", f"l{j}", c, f * c) for j, (f, c) in enumerate(zip(filters, columns))]
        self.n = n
        self.calls = 0

    def cost(self, rates: np.ndarray) -> float:
        self.calls += 1
        total = self.fixed
        for j in range(self.n):
            total += keep(self.filters[j], rates[j]) * keep(self.columns[j], rates[self.n + j])
        return float(total)


def ordered(rates, units) -> bool:
    for i, a in enumerate(units):
        for j, b in enumerate(units):
            if a.kind == b.kind and a.weight > b.weight and rates[i] < rates[j] - 1e-12:
                return False
    return True


layer_sizes = st.lists(st.tuples(st.integers(1, 256), st.integers(1, 1200)), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(layer_sizes, st.floats(1.5, 50.0), st.floats(0.5, 0.99), st.lists(st.floats(0, 1), min_size=16,
                                                                         max_size=16))
def test_meet_target_always_meets_or_refuses(sizes, target, r_max, direction):
    model = HybridModel(*zip(*sizes))
    d = np.array(direction[: len(model.units)] + [0.5] * max(0, len(model.units) - 16))
    original = model.cost(np.zeros(len(model.units)))
    reachable = model.cost(np.full(len(model.units), r_max)) <= original / target
    model.calls = 0
    if not reachable:
        with pytest.raises(UserError, match="unreachable"):
            meet_target(d, model.cost, target, r_max=r_max)
        return
    rates = meet_target(d, model.cost, target, r_max=r_max, max_iter=64)
    assert model.calls <= 64 + 3  # bounded: zeros, full, then at most max_iter bisection steps
    assert np.all(rates >= 0) and np.all(rates <= r_max)
    assert model.cost(rates) <= original / target


def test_uniform_direction_is_as_close_as_granularity_allows():
    # one layer of 100 filters x 100 columns: uniform rate r keeps keep(100, r)^2 params (+10 fixed)
    model = HybridModel([100], [100])
    original = model.cost(np.zeros(2))
    rates = meet_target(np.ones(2), model.cost, 4.0, r_max=0.95)
    assert rates[0] == pytest.approx(rates[1])
    # budget (10010 / 4 = 2502.5) allows 49 x 49 + 10 = 2411 but not 50 x 50 + 10 = 2510
    assert model.cost(rates) == 49 * 49 + 10
    assert model.cost(rates - 1e-6) > original / 4.0
    model.calls = 0  # with unit sizes the bisection stops at the units' granularity
    fitted = meet_target(np.ones(2), model.cost, 4.0, r_max=0.95, sizes=np.array([100, 100]))
    assert model.calls <= 20  # r_max check + 1e-3-unit bracket: log2(0.95 / (1e-3 / 100)) = 17 steps
    assert model.cost(fitted) == 49 * 49 + 10
    # a sampler that gives back returns what the budget does not need: one unit keeps 50, as 50 x 49 + 10 = 2460
    # fits and 50 x 50 + 10 does not; each unit's give-back bisects to half an element: <= 1 + 9 calls
    sampler = ActionSampler(model.units, model.cost, 4.0, give_back="heaviest")
    model.calls = 0
    action = sampler.initial_action(spread=0.0)
    assert model.calls <= 20 + 2 * 10
    assert model.cost(action) == 50 * 49 + 10


def test_unreachable_target_names_best_compression():
    # at r_max=0.5 the layer keeps 4 - 2 = 2 filters and 9 - round(4.5) = 5 columns: 36 / 10 = 3.6x
    model = HybridModel([4], [9], fixed=0)
    with pytest.raises(UserError, match=r"target 50x is unreachable.*reaches only 3.6x"):
        meet_target(np.ones(2), model.cost, 50.0, r_max=0.5)
    with pytest.raises(autocompress.Unreachable, match="unreachable") as info:  # public: a caller may catch it
        ActionSampler(model.units, model.cost, 50.0, r_max=0.5)
    assert isinstance(info.value, UserError) and info.value.reached == pytest.approx(3.6)


def test_high_target_terminates_with_tiny_units():
    # layers of a single filter / column can never shrink; the big layer must absorb everything
    model = HybridModel([1, 1, 512], [1, 1, 4608], fixed=0)
    rates = meet_target(np.ones(6), model.cost, 50.0, r_max=0.99)
    assert model.cost(rates) <= model.cost(np.zeros(6)) / 50


def test_order_rates_matches_isotonic_regression_per_kind():
    rng = np.random.default_rng(0)
    weights = rng.permutation(10) + 1.0
    units = [ActionUnit("filter", f"f{i}", 8, w) for i, w in enumerate(weights)]
    units += [ActionUnit("column", f"c{i}", 8, w) for i, w in enumerate(weights)]
    rates = rng.uniform(0, 1, size=20)
    out = order_rates(rates, units)
    for kind_slice in (slice(0, 10), slice(10, 20)):
        order = np.argsort(weights)
        reference = isotonic_regression(rates[kind_slice][order]).x
        np.testing.assert_allclose(out[kind_slice][order], reference)
    assert ordered(out, units)


def test_order_rates_leaves_ties_unconstrained():
    units = [ActionUnit("filter", "a", 4, 10.0), ActionUnit("filter", "b", 4, 10.0), ActionUnit("filter", "c", 4, 5.0)]
    out = order_rates(np.array([0.9, 0.1, 0.05]), units)
    np.testing.assert_allclose(out, [0.9, 0.1, 0.05])  # already ordered: equal weights may differ
    out = order_rates(np.array([0.2, 0.1, 0.3]), units)
    # c (lighter) may not exceed the smaller of its heavier peers: pooled with b -> 0.2
    np.testing.assert_allclose(out, [0.2, 0.2, 0.2])


@settings(max_examples=60, deadline=None)
@given(layer_sizes, st.floats(1.5, 20.0), st.floats(0.0, 0.5), st.integers(0, 2**32 - 1),
       st.sampled_from([None, "heaviest", "lightest"]))
def test_perturb_keeps_target_and_guidance(sizes, target, magnitude, seed, back):
    """A neighbour is the noisy action ordered by the guidance and fitted to the target (the fit keeps the
    order), then only lowered by the give-back (when asked for), still meeting the target."""
    model = HybridModel(*zip(*sizes))
    try:
        sampler = ActionSampler(model.units, model.cost, target, r_max=0.98, give_back=back)
    except UserError:
        return
    unit_sizes = np.array([u.size for u in model.units])
    action = sampler.initial_action()
    rng, replay = np.random.default_rng(seed), np.random.default_rng(seed)
    for _ in range(3):
        noisy = np.clip(action + magnitude * replay.standard_normal(len(action)), 0.0, 0.98)
        fitted = meet_target(order_rates(noisy, model.units), model.cost, target, r_max=0.98, sizes=unit_sizes)
        assert ordered(fitted, model.units)
        action = sampler.perturb(action, magnitude, rng)
        assert np.all((action >= 0) & (action <= fitted + 1e-12))
        assert back is not None or np.array_equal(action, fitted)
        assert sampler.compression(action) >= target


@settings(max_examples=60, deadline=None)
@given(layer_sizes, st.floats(1.5, 20.0), st.floats(1.0, 1.3), st.sampled_from([None, "heaviest", "lightest"]),
       st.lists(st.floats(0.05, 1.0), min_size=16, max_size=16))
def test_rescale_at_a_looser_target_keeps_every_unit_at_least_as_wide(sizes, target, slack, back, direction):
    """Purification's refit re-aims a searched (given-back) action at a looser target: no unit loses a
    channel to another, which re-ordering the action by the guidance would do."""
    model = HybridModel(*zip(*sizes))
    try:
        strict = ActionSampler(model.units, model.cost, target, r_max=0.98, give_back=back)
    except UserError:
        return
    looser = ActionSampler(model.units, model.cost, target / slack, r_max=0.98, give_back=back)
    action = strict.meet(np.array(direction[:len(model.units)]))
    refit = looser.rescale(action)
    assert looser.compression(refit) >= target / slack
    for unit, before, after in zip(model.units, action, refit):
        assert keep(unit.size, after) >= keep(unit.size, before)
    assert np.array_equal(looser.rescale(action), refit)


def test_perturb_is_deterministic_and_accepts_torch_generators():
    model = HybridModel([16, 32, 64], [27, 144, 288])
    sampler = ActionSampler(model.units, model.cost, 6.0)
    a0 = sampler.initial_action()
    a = sampler.perturb(a0, 0.1, np.random.default_rng(3))
    b = sampler.perturb(a0, 0.1, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, a0)
    t1 = sampler.perturb(a0, 0.1, torch.Generator().manual_seed(5))
    t2 = sampler.perturb(a0, 0.1, torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(t1, t2)


def test_magnitude_action_prunes_below_one_threshold_across_units():
    """Equal-cost channels: the two weakest channels overall (both in l0, far below its mean) go first, however
    l1's own weakest channel compares with l0's mean; columns keep everything."""
    model = HybridModel([4, 4], [1, 1])  # cost 10 + 4 + 4: removing two channels is 18 / 16 = 1.125x
    sampler = ActionSampler(model.units, model.cost, 18 / 16)
    importance = {"l0": torch.tensor([0.1, 0.1, 1.9, 1.9], dtype=torch.float64),
                  "l1": torch.tensor([0.8, 1.0, 1.0, 1.2], dtype=torch.float64)}
    action = sampler.magnitude_action(importance)
    assert [keep(4, action[0]), keep(4, action[1])] == [2, 4] and (action[2:] < 1e-3).all()  # (the fit's floor)
    assert sampler.compression(action) >= 18 / 16
    # three channels: the next weakest is l1's 0.8
    action = ActionSampler(model.units, model.cost, 18 / 15).magnitude_action(importance)
    assert [keep(4, action[0]), keep(4, action[1])] == [2, 3]
    # beyond what the filters reach at the maximum rate (one channel each left), where columns would reach it,
    # there is no magnitude start: 10 + 2 x 1 x 2 = 14 channels x columns left against 26 / 2 = 13 asked for
    wider = HybridModel([4, 4], [2, 2])
    assert ActionSampler(wider.units, wider.cost, 2.0).magnitude_action(importance) is None
    assert ActionSampler(model.units, model.cost, 1.2).magnitude_action({}) is None


@settings(max_examples=60, deadline=None)
@given(layer_sizes, st.floats(1.1, 4.0), st.integers(0, 2**31 - 1))
def test_magnitude_action_meets_the_target_or_declines(sizes, target, seed):
    model = HybridModel(*zip(*sizes))
    gen = torch.Generator().manual_seed(seed)
    importance = {u.name: torch.rand(u.size, generator=gen, dtype=torch.float64) * 2
                  for u in model.units if u.kind == "filter"}
    assume(model.cost(np.full(len(model.units), 0.9)) <= model.cost(np.zeros(len(model.units))) / target)
    sampler = ActionSampler(model.units, model.cost, target, r_max=0.9)
    filters_only = np.array([0.9 if u.kind == "filter" else 0.0 for u in model.units])
    action = sampler.magnitude_action(importance)
    if sampler.compression(filters_only) < target:
        assert action is None
    else:
        assert action is not None and sampler.compression(action) >= target * (1 - 1e-9)
        assert ((action >= 0) & (action <= 0.9)).all()


def test_initial_action_spread_prunes_heavy_units_harder():
    model = HybridModel([16, 64], [27, 576])
    sampler = ActionSampler(model.units, model.cost, 4.0)
    uniform = sampler.initial_action(spread=0.0)
    assert np.ptp(uniform) == pytest.approx(0.0)
    guided = sampler.initial_action(spread=0.5)
    assert guided[1] > guided[0] and guided[3] > guided[2]
    assert rates_dict(model.units, guided) == {
        "filter": {"l0": guided[0], "l1": guided[1]}, "column": {"l0": guided[2], "l1": guided[3]},
        "irregular": {}}


@pytest.mark.parametrize("objective,attr", [("params", "params"), ("flops", "macs")])
def test_real_space_targets_are_met_by_the_engine_counts(objective, attr):
    from autocompress.models import create_model
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    model = create_model("fmnist_cnn")
    space = PruningSpace.build(model, torch.randn(1, 1, 28, 28))
    sampler = ActionSampler.from_space(space, objective, 8.0)
    assert [u.kind for u in sampler.units] == ["filter"] * len(space.filter_groups) + ["column"] * len(
        space.column_layers)
    assert [u.weight for u in sampler.units[: len(space.filter_groups)]] == [
        getattr(g, attr) for g in space.filter_groups]
    action = sampler.perturb(sampler.initial_action(), 0.1, np.random.default_rng(0))
    assert ordered(action, sampler.units)  # multiple 1: no give-back, the guidance order holds
    remaining = getattr(space.count(project(space, model, sampler.to_rates(action))), attr)
    total = getattr(space.total, attr)
    assert remaining <= total / 8.0
    assert remaining > total / 8.0 * 0.9  # close to the target, not far beyond it
    with pytest.raises(UserError, match="unreachable"):
        ActionSampler.from_space(space, objective, 5000.0)  # best: 2066x / 3690x
    with pytest.raises(UserError, match="objective"):
        ActionSampler.from_space(space, "latency", 2.0)


def test_an_unreachable_target_says_what_holds_it_back_and_which_dims_would_help():
    """Helper 32's ViT was refused at flops=2x with "add pruning dimensions (dims)" (filter and column were on)
    and only a small conv's columns named; the token stream, left out of filter pruning, was the cause. The
    refusal names the layers left out of filter pruning, the heaviest first with its reason (not the classifier,
    whose outputs are never pruned), and suggests only the kinds missing from dims."""
    from autocompress.models import create_model
    from autocompress.space import BREAKS, PruningSpace

    model = create_model("fmnist_cnn")
    names = [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))]
    space = PruningSpace.build(model, torch.randn(1, 1, 28, 28), left_out={names[0]: "filter pruning: it breaks"},
                               ignored_layers=[names[1]])
    with pytest.raises(UserError) as info:
        ActionSampler.from_space(space, "flops", 5000.0, kinds=("filter",))
    heavy, light = sorted(names[:2], key=lambda name: -space.layer_macs[name][1])
    reason = {names[0]: "it breaks", names[1]: space.excluded[names[1]]}[heavy]
    message = str(info.value)
    assert f"(not filter-pruned: {heavy} ({reason}), {light}; every reason is logged" in message
    assert names[-1] not in message  # the classifier
    assert message.endswith("lower the target, raise max_r (below 1), add column to dims")
    with pytest.raises(UserError) as info:
        ActionSampler.from_space(space, "params", 5000.0, kinds=("filter", "column", "irregular"))
    assert str(info.value).endswith("lower the target, raise max_r (below 1)")
    with pytest.raises(UserError) as info:  # column pruning alone: the filter exclusions hold nothing back
        ActionSampler.from_space(space, "params", 5000.0, kinds=("column",))
    assert "not filter-pruned" not in str(info.value) and "add filter to dims" in str(info.value)
    import torchvision  # fresh user 60: a model torch-pruning cannot trace was told to add the filter pruning
    shuffle = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()  # that the space had just refused
    with pytest.raises(UserError) as info:
        ActionSampler.from_space(PruningSpace.build(shuffle, torch.randn(1, 3, 32, 32)), "flops", 5000.0,
                                 kinds=("column",))
    assert str(info.value).endswith("lower the target, raise max_r (below 1)")
    with pytest.raises(UserError) as info:  # with filter pruning asked for, the model it cannot trace is named
        ActionSampler.from_space(PruningSpace.build(shuffle, torch.randn(1, 3, 32, 32)), "flops", 5000.0)
    assert "(not filter-pruned: the model (torch-pruning cannot trace ShuffleNetV2 (" in str(info.value)
    assert "written as an index gather, x[:, perm], it traces); every reason is logged" in str(info.value)
    # helper 34's ViT: the group its reshape broke came after a heavier one; the fixable one is named first now
    broken = f"filter pruning: {BREAKS} (RuntimeError: shape '[1, 50, 3, 4, 12]' is invalid)"
    space = PruningSpace.build(model, torch.randn(1, 1, 28, 28), left_out={light: broken},
                               ignored_layers=[heavy])
    with pytest.raises(UserError) as info:
        ActionSampler.from_space(space, "params", 5000.0, kinds=("filter", "column", "irregular"))
    assert f"(not filter-pruned: {light} ({broken.removeprefix('filter pruning: ')}), {heavy};" in str(info.value)
    assert str(info.value).endswith("compute shapes from the input in forward (e.g. x.flatten(1) instead of "
                                    "x.view(-1, 40 * 7 * 7)); where it splits concatenated channels (chunk / split) or "
                                    "a module of its own mixes channels (a normalisation over them), put the layers "
                                    "feeding it in ignored_layers")


def conv_chain(widths: list[int], dims: int = 2, hidden: int | None = None) -> torch.nn.Sequential:
    """``[B, 1, H, W]`` (``dims`` 2) or ``[B, 1, L]`` (1) -> ``[B, 10]``: 3x3 (3) convolutions of the given widths
    (ReLU between), global average pooling, a Linear (``hidden``: two, the first of ``hidden`` outputs)."""
    conv, pool = {1: (torch.nn.Conv1d, torch.nn.AdaptiveAvgPool1d), 2: (torch.nn.Conv2d, torch.nn.AdaptiveAvgPool2d)}[
        dims]
    layers, channels = [], 1
    for width in widths:
        layers += [conv(channels, width, 3, padding=1), torch.nn.ReLU()]
        channels = width
    head = [torch.nn.Linear(channels, 10)] if hidden is None else [
        torch.nn.Linear(channels, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)]
    return torch.nn.Sequential(*layers, pool(1), torch.nn.Flatten(), *head)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.sampled_from([16, 24, 32, 48]), min_size=2, max_size=4), st.sampled_from([8, 16]),
       st.sampled_from([2.0, 3.0, 4.0]), st.integers(0, 2**16))
def test_aligned_widths_meet_a_flops_target_from_below_without_overshoot(widths, multiple, target, seed):
    """With widths aligned to 8 or 16 channels one step of a 16-channel layer halves it, so a fit that scales
    every rate together overshoots (a plain 16-16-32-32-64 CNN: median 3.37x for flops=3x at multiple 8, before
    the give-back). The sampler's actions meet the target by the engine's own MAC count of the projected
    model, and no filter group can keep one more aligned block without missing it."""
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    model = conv_chain(widths)
    space = PruningSpace.build(model, torch.randn(1, 1, 12, 12), channel_multiple=multiple, executed_macs_only=True)
    try:
        sampler = ActionSampler.from_space(space, "flops", target)
    except UserError:
        return
    budget = space.total.macs / target
    action = sampler.perturb(sampler.initial_action(), 0.2, np.random.default_rng(seed))
    rates = sampler.to_rates(action)
    assert space.count(project(space, model, rates)).macs <= budget
    for group in space.filter_groups:
        kept = space.filter_keep(group, rates["filter"][group.name])
        if kept == group.size:
            continue
        more = min(kept + multiple, group.size)
        wider = {**rates, "filter": {**rates["filter"], group.name: (group.size - more) / group.size}}
        assert space.filter_keep(group, wider["filter"][group.name]) == more
        assert space.count(project(space, model, wider)).macs > budget


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from([16, 24, 32, 48]), min_size=2, max_size=5), st.sampled_from([1, 8]),
       st.sampled_from([1.5, 2.0, 3.0]), st.integers(0, 2**16))
def test_a_swap_widens_one_filter_group_by_one_step_and_narrows_one_other_within_the_target(widths, multiple,
                                                                                         target, seed):
    """A local move: counted on the engine's projected masks, one filter group keeps one aligned step (1 or 8
    channels) more than the action did, at most one other keeps fewer, and no fewer than the target needs (one
    step more for it misses the target), every other group keeps its width, and the engine's MAC count meets
    the target."""
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    model = conv_chain(widths)
    space = PruningSpace.build(model, torch.randn(1, 1, 12, 12), dims=("filter",), channel_multiple=multiple,
                               executed_macs_only=True)
    try:
        sampler = ActionSampler.from_space(space, "flops", target)
    except UserError:
        return
    sampler.give_back = None  # the swap alone (give-back is tested above)
    rng = np.random.default_rng(seed)
    action = sampler.meet(rng.uniform(0.05, 1.0, len(sampler.units)))
    swapped = sampler.swap(action, rng)
    before = _kept_widths(space, model, sampler.to_rates(action))
    budget = space.total.macs / target
    if swapped is None:  # no group can widen and be paid for by one other
        return
    rates = sampler.to_rates(swapped)
    after = _kept_widths(space, model, rates)
    assert space.count(project(space, model, rates)).macs <= budget
    wider = [i for i, (b, a) in enumerate(zip(before, after)) if a > b]
    narrower = [i for i, (b, a) in enumerate(zip(before, after)) if a < b]
    assert len(wider) == 1 and after[wider[0]] - before[wider[0]] == multiple
    assert len(narrower) <= 1
    for i in narrower:
        group = space.filter_groups[i]
        back = {**rates, "filter": {**rates["filter"], group.name: 1.0 - (after[i] + multiple) / group.size}}
        assert space.count(project(space, model, back)).macs > budget


@settings(max_examples=16, deadline=None)
@given(st.lists(st.sampled_from([16, 24, 32, 48, 64]), min_size=2, max_size=4), st.sampled_from([2.0, 3.0, 4.0]),
       st.integers(0, 2**16), st.sampled_from([1, 2]), st.sampled_from([None, 48]))
@example([16, 16, 32, 16], 2.0, 3, 2, None)  # steps of 8 give the 32-channel layer back to 24 (fit: 16)
@example([16, 16, 32, 16], 2.0, 3, 1, 48)  # Conv1d: to 24; the hidden Linear on the block
def test_a_block_above_the_multiple_gives_back_only_to_block_widths(widths, target, seed, dims, hidden):
    """When ``auto``'s multiple (8) is below the CPU's 16-channel block, a give-back in steps of 8 would
    widen a 2-D conv to 24 channels, which runs as slowly as 32 there (as does a Linear's output). With
    ``block=16`` every such filter group keeps the fit's width or is given back to a width on the 16-block (or its
    whole width), a Conv1d's group (whose time follows its width) in steps of 8, the target is still met by the
    engine's own count, and no group can take its next width without missing the target."""
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    model = conv_chain(widths, dims, hidden)
    example = torch.randn(1, 1, *(12,) * dims)
    space = PruningSpace.build(model, example, channel_multiple=8, executed_macs_only=True)
    blocked = {g.name: dims == 2 or isinstance(model.get_submodule(g.name), torch.nn.Linear)
               for g in space.filter_groups}  # every group's root is its producing layer here
    assert {g.name: space.sets_blocked_channels(g.name) for g in space.filter_groups} == blocked
    try:
        sampler = ActionSampler.from_space(space, "flops", target, block=16)
    except UserError:
        return
    fit_only = ActionSampler(sampler.units, sampler.cost, target, r_max=sampler.r_max)
    direction = np.random.default_rng(seed).uniform(0.05, 1.0, len(sampler.units))
    rates, fitted = sampler.to_rates(sampler.meet(direction)), fit_only.to_rates(fit_only.meet(direction))
    budget = space.total.macs / target
    assert space.count(project(space, model, rates)).macs <= budget
    for group in space.filter_groups:
        kept = space.filter_keep(group, rates["filter"][group.name])
        fit = space.filter_keep(group, fitted["filter"][group.name])
        step = 16 if blocked[group.name] else 8
        assert kept == fit or (kept > fit and (kept % step == 0 or kept == group.size))
        wider = [w for w in [*range(step, group.size, step), group.size] if w > kept]
        if wider:
            more = wider[0]
            bigger = {**rates, "filter": {**rates["filter"], group.name: 1.0 - more / group.size}}
            assert space.filter_keep(group, bigger["filter"][group.name]) == more
            assert space.count(project(space, model, bigger)).macs > budget


@pytest.mark.parametrize("objective,attr", [("params", "params"), ("flops", "macs")])
def test_guidance_counts_a_residual_stream_per_producing_layer(objective, attr):
    """resnet20's first stream (16 channels) is written by conv1 and the three layer1 blocks' conv2: its
    guidance weight is a quarter of what it governs; a block-internal group (one conv) keeps all of it."""
    from autocompress.models import create_model
    from autocompress.space import PruningSpace

    space = PruningSpace.build(create_model("resnet20"), torch.randn(1, 3, 32, 32))
    groups = {g.name: g for g in space.filter_groups}
    units = {u.name: u for u in ActionSampler.from_space(space, objective, 2.0, kinds=["filter"]).units}
    assert set(groups["conv1"].producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    assert units["conv1"].weight == getattr(groups["conv1"], attr) / 4
    assert units["layer1.0.conv1"].weight == getattr(groups["layer1.0.conv1"], attr)
    # per layer, the stream's MACs are now of the same order as a block's internal conv
    assert 0.5 < units["conv1"].weight / units["layer1.0.conv1"].weight < 2


def test_channel_guidance_weighs_what_one_channel_costs():
    """Per channel, a resnet20 block's internal conv at 32x32 costs 4x the MACs of one at 8x8 though it holds a
    quarter of the weights: in channels x 3 x 3 x output pixels for the conv that writes the channel, the same
    for the conv that reads it. Per layer (the paper's guidance) all three stages weigh the same."""
    from autocompress.models import create_model
    from autocompress.space import PruningSpace

    space = PruningSpace.build(create_model("resnet20"), torch.randn(1, 3, 32, 32))
    per_channel = {u.name: u for u in ActionSampler.from_space(space, "flops", 2.0, kinds=["filter"],
                                                               guidance="channel").units}
    per_layer = {u.name: u for u in ActionSampler.from_space(space, "flops", 2.0, kinds=["filter"]).units}
    by_hand = {"layer1.1.conv1": 2 * 16 * 9 * 32 * 32, "layer2.1.conv1": 2 * 32 * 9 * 16 * 16,
               "layer3.1.conv1": 2 * 64 * 9 * 8 * 8}
    for name, macs in by_hand.items():
        assert per_channel[name].weight == macs
        assert per_layer[name].weight == macs * per_channel[name].size
    assert len({per_layer[name].weight for name in by_hand}) == 1
    # the stream counts per producing layer and per channel
    assert per_channel["conv1"].weight == per_layer["conv1"].weight / 16
    # the fit prunes the 32x32 stage hardest and keeps more parameters at the same MACs
    actions = {g: ActionSampler.from_space(space, "flops", 4.0, kinds=["filter"], guidance=g) for g in
               ("layer", "channel")}
    rates = {g: s.to_rates(s.initial_action())["filter"] for g, s in actions.items()}
    assert rates["channel"]["layer1.1.conv1"] > rates["channel"]["layer2.1.conv1"] > rates["channel"]["layer3.1.conv1"]
    counts = {g: space.estimate(actions[g].to_rates(actions[g].initial_action())) for g in actions}
    assert counts["channel"].params > counts["layer"].params
    with pytest.raises(UserError, match="unknown guidance 'widest'"):
        ActionSampler.from_space(space, "flops", 2.0, guidance="widest")


@pytest.mark.parametrize("target,r_max", [(0.5, 0.9), (float("nan"), 0.9), (4.0, 1.0), (4.0, -0.1)])
def test_bad_settings_are_user_errors(target, r_max):
    model = HybridModel([8], [9])
    with pytest.raises(UserError):
        ActionSampler(model.units, model.cost, target, r_max=r_max)
    with pytest.raises(UserError):
        meet_target(np.ones(2), model.cost, target, r_max=r_max)


def test_flops_target_with_irregular_units_only_is_refused_and_counts_are_the_compact_models():
    """Irregular zeros stay in dense tensors: they remove parameters (non-zero count) but no MACs, so a FLOPs
    target cannot be met by them (issue 16, item 8: the sampler claimed 4x for a model that got 1.006x)."""
    from autocompress.compaction import compact
    from autocompress.metrics import count_macs, count_nonzero_params
    from autocompress.models import create_model
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    model, x = create_model("fmnist_cnn").eval(), torch.randn(1, 1, 28, 28)
    space = PruningSpace.build(model, x, dims=("filter", "column", "irregular"))
    with pytest.raises(UserError, match="irregular pruning alone"):
        ActionSampler.from_space(space, "flops", 4.0, kinds=["irregular"])
    sampler = ActionSampler.from_space(space, "params", 4.0, kinds=["irregular"])
    action = sampler.initial_action()
    assert sampler.compression(action) >= 4.0
    masks = project(space, model, sampler.to_rates(action))
    counts = space.count(masks)
    assert counts.macs == space.total.macs  # irregular-only masks: no MAC drop claimed
    result = compact(model, space.param_masks(masks), x)
    assert count_macs(result.model, x) <= counts.macs
    masked = sum(int(m.sum()) for m in space.param_masks(masks).values())
    untouched = space.total.params - sum(m.numel() for m in space.param_masks(masks).values())
    assert counts.params == masked + untouched
    assert count_nonzero_params(result.model) <= counts.params
    # a FLOPs target with filter / column units is met by the compact model's own MACs
    sampler = ActionSampler.from_space(space, "flops", 4.0, kinds=["filter", "column"])
    masks = project(space, model, sampler.to_rates(sampler.initial_action()))
    assert count_macs(compact(model, space.param_masks(masks), x).model, x) <= space.total.macs / 4.0


def _blocked_cost(sizes, blocks, per_channel):
    """Cost of a rate vector where unit i's kept channels cost per_channel[i] per started block of blocks[i]
    channels (a latency table on a CPU that pads channels to its block): non-increasing in every rate."""
    def cost(action):
        kept = np.ceil(np.asarray(sizes) * (1.0 - np.asarray(action)) - 1e-9)
        return 1.0 + float(np.sum(np.ceil(kept / blocks) * blocks * per_channel))
    return cost


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([8, 16, 32, 64]), st.sampled_from([1, 8, 16]), st.floats(0.1, 5.0)),
                min_size=1, max_size=6), st.floats(1.05, 3.0), st.sampled_from(["heaviest", "lightest"]), st.data())
def test_give_back_keeps_the_target_and_leaves_no_free_channel(spec, target, order, data):
    """After give_back the action still meets the budget, no rate rose, and lowering any unit's rate by one
    channel would break the budget (nothing is left that costs nothing)."""
    from autocompress.sampling import give_back

    sizes, blocks, per = (np.array(v, dtype=np.float64) for v in zip(*spec))
    cost = _blocked_cost(sizes, blocks, per)
    budget = cost(np.zeros(len(sizes))) / target
    start = np.array(data.draw(st.lists(st.floats(0.0, 0.95), min_size=len(sizes), max_size=len(sizes))))
    if cost(start) > budget:  # a fit always hands over an action meeting the budget
        start = np.full(len(sizes), 0.95)
        if cost(start) > budget:
            return
    out = give_back(start, cost, budget, sizes, per, order=order)
    assert cost(out) <= budget and np.all(out <= start + 1e-12)
    for i in range(len(sizes)):
        if out[i] > 0:
            one_more = out.copy()
            one_more[i] = max(0.0, out[i] - 1.0 / sizes[i])
            assert cost(one_more) > budget


def test_a_latency_like_sampler_returns_channels_inside_a_block():
    """Two 16-channel units on a 16-channel block (pruning to 8 saves nothing) and one linear 64-channel unit:
    the fit prunes all three proportionally; the sampler gives back the blocked units' channels (they keep all 16)."""
    sizes = np.array([16.0, 16.0, 64.0])
    cost = _blocked_cost(sizes, np.array([16.0, 16.0, 1.0]), np.array([1.0, 1.0, 1.0]))
    units = [ActionUnit("filter", f"g{i}", int(n), 1.0) for i, n in enumerate(sizes)]
    plain = meet_target(np.full(3, 0.5), cost, 1.4, r_max=0.95)
    kept = ActionSampler(units, cost, 1.4, give_back="lightest").meet(np.full(3, 0.5))
    assert plain[0] > 0 and plain[1] > 0  # channels 9-16 of the blocked units pruned for nothing
    assert kept[0] == kept[1] == 0.0 and cost(kept) <= cost(np.zeros(3)) / 1.4


def _kept_widths(space, model, rates) -> tuple[int, ...]:
    """The channels each filter group keeps, counted on the masks the engine projects (independent of the
    sampler's keep counts)."""
    from autocompress.projection import project

    masks = project(space, model, rates)
    return tuple(int(masks.filters[g.name].sum()) for g in space.filter_groups)


@pytest.mark.parametrize("arch,target,moves", [("resnet20", 2.0, "gaussian"), ("resnet20", 4.0, "gaussian"),
                                               ("cnn", 2.0, "gaussian"), ("resnet20", 4.0, "mixed"),
                                               ("cnn", 2.0, "mixed")])
def test_the_search_scores_a_new_width_at_every_evaluation_while_one_is_left(arch, target, moves):
    """At widths aligned to 8 channels the fit maps small noise back onto the action, so a search whose scores
    tie (every candidate accepted) re-proposed the same widths: resnet20 at flops=2x scored 5 distinct width
    vectors in 20 evaluations (a real run: 3), and a 4-conv CNN 2 of the 5 its guidance allows. Drawing again
    until the widths are new, the search scores 20 distinct resnet20 widths and every one of the CNN's; with
    ``moves="mixed"``, whose swaps leave the guidance's widths, 20 distinct widths of the CNN too."""
    from autocompress.annealing import simulated_annealing
    from autocompress.config import SearchConfig
    from autocompress.models.resnet_cifar import resnet20
    from autocompress.space import PruningSpace

    if arch == "resnet20":
        model, example = resnet20(), torch.zeros(1, 3, 32, 32)
    else:
        model, example = conv_chain([16, 32, 64, 64]), torch.zeros(1, 1, 28, 28)
    space = PruningSpace.build(model, example, dims=("filter",), channel_multiple=8)
    sampler = ActionSampler.from_space(space, "flops", target, guidance="channel")
    rng = np.random.default_rng(0)
    allowed = {_kept_widths(space, model, sampler.to_rates(sampler.meet(rng.random(len(sampler.units)))))
               for _ in range(300 if arch == "cnn" and moves == "gaussian" else 0)}
    scored: list[tuple[int, ...]] = []
    config = SearchConfig(max_evaluations=20).annealing(0)
    perturb, record = sampler.explorer(config.perturbation_magnitude, moves)
    simulated_annealing(sampler.initial_action(), lambda a: scored.append(
        _kept_widths(space, model, sampler.to_rates(a))) or 0.0, perturb, config, on_step=record)
    assert len(scored) == 20
    if allowed:  # 300 random directions find every width vector its guidance allows
        assert set(scored) == allowed, (len(allowed), len(set(scored)))
    else:
        assert len(set(scored)) == 20


def test_the_explorer_moves_locally_as_the_magnitude_falls():
    """With ``moves="mixed"``: at the starting magnitude every move of the explorer is Gaussian (it re-fits every
    unit); at a magnitude near 0 every move is a swap, changing the widths of two filter groups at most (without
    give-back)."""
    from autocompress.space import PruningSpace

    model = conv_chain([32, 32, 48, 48, 32])
    space = PruningSpace.build(model, torch.randn(1, 1, 12, 12), dims=("filter",), channel_multiple=8)
    sampler = ActionSampler.from_space(space, "flops", 2.0)
    sampler.give_back = None
    perturb, _ = sampler.explorer(0.1, "mixed")
    start = sampler.initial_action()
    rng = np.random.default_rng(0)

    def changed(action) -> int:
        return sum(a != b for a, b in zip(sampler.keeps(start), sampler.keeps(action)))

    local = [changed(perturb(start, 1e-9, rng)) for _ in range(20)]
    assert all(1 <= count <= 2 for count in local)
    wide = [changed(perturb(start, 0.1, rng)) for _ in range(20)]
    assert max(wide) > 2


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from([8, 16, 24, 32, 48]), min_size=1, max_size=4), st.sampled_from([1, 8, 16]),
       st.data())
def test_keep_counts_equal_the_projected_masks(widths, multiple, data):
    """``space_keeps`` (what the search compares candidates by) gives each filter group the channels the engine's
    projection keeps at those rates, at any channel multiple."""
    from autocompress.projection import project
    from autocompress.sampling import space_keeps, units_from_space
    from autocompress.space import PruningSpace

    model = conv_chain(widths)
    space = PruningSpace.build(model, torch.randn(1, 1, 8, 8), channel_multiple=multiple)
    units = units_from_space(space, "params")
    action = np.array(data.draw(st.lists(st.floats(0.0, 0.9), min_size=len(units), max_size=len(units))))
    keeps = space_keeps(space, units)(action)
    masks = project(space, model, rates_dict(units, action))
    filters = [(unit, kept) for unit, kept in zip(units, keeps) if unit.kind == "filter"]
    assert filters and all(kept == int(masks.filters[unit.name].sum()) for unit, kept in filters)
