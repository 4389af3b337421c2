"""PruningSpace: coupling (residual add, concatenation, depthwise, Flatten -> Linear), exclusions, masks,
counts against hand computation and against physically pruned models, and side-effect freedom."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from autocompress.analysis import analysis_mode
from autocompress.errors import SettingError, UserError
from autocompress.masks import Masks, apply_masks
from autocompress.models import create_model
from autocompress.projection import project
from autocompress.recurrent import RECURRENT_FOLLOWED
from autocompress.space import (FUSED_ATTENTION, PruningSpace, ignored_modules, ignored_summary,
                                keep_count)
from autocompress.compaction import compact
from autocompress.metrics import count_macs


# ----------------------------------------------------------------------------- small models
class Chain(nn.Module):
    """conv(3->8)+bias -> BN -> ReLU -> conv(8->16) -> BN -> ReLU -> Flatten -> Linear(16*4*4 -> 12) -> fc(10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.relu(self.fc1(torch.flatten(x, 1))))


class Residual(nn.Module):
    """stem conv -> BN -> ReLU; a block conv_a -> BN -> ReLU -> conv_b -> BN added to the stem's output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv_a = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(5)
        self.conv_b = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 7, 1)
        self.fc = nn.Linear(7, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x)))))
        x = torch.relu(x + y)
        x = torch.relu(self.head(x))
        return self.fc(x.mean((2, 3)))


class Concat(nn.Module):
    """two branches (4 and 3 channels) concatenated and read by one conv (7 -> 5)."""

    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 4, 3, padding=1)
        self.right = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(7)
        self.mix = nn.Conv2d(7, 5, 3, padding=1)
        self.fc = nn.Linear(5, 10)

    def forward(self, x):
        x = torch.relu(self.bn(torch.cat([self.left(x), self.right(x)], 1)))
        return self.fc(torch.relu(self.mix(x)).mean((2, 3)))


class Separable(nn.Module):
    """conv(3->6) -> BN -> ReLU -> depthwise 3x3 (6) -> BN -> ReLU -> pointwise (6->8) -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.bn_dw = nn.BatchNorm2d(6)
        self.pw = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn_dw(self.dw(x)))
        return self.fc(torch.relu(self.pw(x)).mean((2, 3)))


SMALL = {"chain": Chain, "residual": Residual, "concat": Concat, "separable": Separable}
X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (so removed channels would show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.normal_(0, 0.5, generator=gen)
                module.running_mean.normal_(0, 0.5, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
    return model


def _slices(space, group_name):
    return {(s.param, s.role, s.dim): s for s in space.unit("filter", group_name).slices}


def _physically_pruned(model, x, space, masks):
    """Reference: torch-pruning removes the same channels (group by group) from a copy of the model."""
    phys = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(phys, x, verbose=False)
    modules = dict(phys.named_modules())
    for group in space.filter_groups:
        removed = (~masks.filters[group.name]).nonzero().flatten().tolist()
        if removed:
            root = modules[group.name]
            graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, removed).prune()
    return phys


# ----------------------------------------------------------------------------- coupling
def test_residual_add_is_one_group_with_both_producers_and_consumers():
    model = Residual()
    space = PruningSpace.build(model, X)
    names = [g.name for g in space.filter_groups]
    assert names == ["stem", "conv_a", "head"]  # conv_b joins the stem's group (root = first in module order)
    slices = _slices(space, "stem")
    assert set(slices) == {("stem.weight", "weight", 0), ("bn0.weight", "norm", 0), ("bn0.bias", "norm", 0),
                           ("conv_a.weight", "input", 1), ("conv_b.weight", "weight", 0),
                           ("bn_b.weight", "norm", 0), ("bn_b.bias", "norm", 0), ("head.weight", "input", 1)}
    for s in slices.values():
        assert torch.equal(s.index, s.channel)  # residual add: channel c is position c everywhere
    assert space.unit("filter", "stem").size == 6
    assert "fc" in space.excluded and "model outputs" in space.excluded["fc"]


def test_concat_consumer_gets_offset_input_slices():
    space = PruningSpace.build(Concat(), X)
    left, right = _slices(space, "left"), _slices(space, "right")
    assert torch.equal(left[("mix.weight", "input", 1)].index, torch.arange(4))
    assert torch.equal(right[("mix.weight", "input", 1)].index, torch.arange(4, 7))
    assert torch.equal(right[("mix.weight", "input", 1)].channel, torch.arange(3))
    assert torch.equal(right[("bn.weight", "norm", 0)].index, torch.arange(4, 7))
    masks = space.full_masks()
    masks.filters["right"] = torch.tensor([True, False, True])
    pm = space.param_masks(masks)
    assert pm["right.weight"][:, :, 0, 0].all(1).tolist() == [True, False, True]
    assert pm["mix.weight"].all(0).all(1).all(1).tolist() == [True] * 5 + [False, True]
    assert pm["bn.bias"].tolist() == [True] * 5 + [False, True]


def test_depthwise_conv_couples_with_its_producer_and_has_kernel_position_columns():
    space = PruningSpace.build(Separable(), X, dims=("filter", "column", "irregular"))
    assert [g.name for g in space.filter_groups] == ["conv", "pw"]
    slices = _slices(space, "conv")
    assert ("dw.weight", "weight", 0) in slices and ("bn_dw.weight", "norm", 0) in slices
    assert ("pw.weight", "input", 1) in slices
    # a 3x3 depthwise conv's GEMM view [6, 9]: 9 columns (kernel positions), each shared by all filters
    assert [(c.rows, c.size) for c in space.column_layers if c.name == "dw"] == [(6, 9)]
    assert "dw" not in space.excluded
    assert "dw" in [w.name for w in space.irregular_layers]


def test_flatten_linear_maps_each_channel_to_its_hw_features():
    space = PruningSpace.build(Chain(), X)
    s = _slices(space, "conv2")[("fc1.weight", "input", 1)]
    assert s.index.numel() == 16 * 16
    for channel in range(16):
        assert sorted(s.index[s.channel == channel].tolist()) == list(range(channel * 16, channel * 16 + 16))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_masked_model_equals_physically_pruned_model(name):
    """The masks of a group zero consistent slices everywhere: the masked model computes what torch-pruning's
    physically pruned model computes, and count() gives the pruned model's parameters and MACs."""
    model = _randomize(SMALL[name](), seed=3)
    space = PruningSpace.build(model, X, dims=("filter",))
    rates = {"filter": {g.name: 0.5 for g in space.filter_groups}}
    masks = project(space, model, rates)
    masked = copy.deepcopy(model)
    apply_masks(masked, space.param_masks(masks))
    phys = _physically_pruned(model, X, space, masks)
    with analysis_mode(masked), analysis_mode(phys):
        a, b = masked(X), phys(X)
    assert torch.allclose(a, b, atol=1e-5 * (1 + a.abs().max().item()), rtol=0)
    counts = space.count(masks)
    assert counts.params == sum(p.numel() for p in phys.parameters())
    with analysis_mode(phys), FlopCounterMode(display=False) as counter:
        phys(X)
    assert counts.macs == counter.get_total_flops() // 2 and counts.flops == counter.get_total_flops()


# ----------------------------------------------------------------------------- counts by hand
def test_count_matches_hand_computation_for_hybrid_masks():
    model = Chain()
    x = torch.randn(1, 3, 4, 4)
    space = PruningSpace.build(model, x, dims=("filter", "column"))
    masks = space.full_masks()
    masks.filters["conv1"][[1, 5, 6]] = False          # 5 of 8 channels kept
    masks.filters["conv2"][[0, 3, 4, 9]] = False       # 12 of 16 kept
    masks.columns["conv2"][:10] = False                # conv2: columns of input channels 0 (9) and 1 (1 of 9)
    masks.columns["fc"][[2, 7]] = False                # fc: 10 of 12 inputs
    counts = space.count(masks)
    conv2_cols = 5 * 9 - 9                            # channel 1 is removed by filters; channel 0's 9 columns
    assert masks.columns["conv2"][9] == torch.tensor(False)  # column 9 = channel 1 (already removed)
    hand_params = (5 * 27 + 5) + 2 * 5 + 12 * conv2_cols + 2 * 12 + (12 * 16 * 12 + 12) + (10 * 10 + 10)
    hand_macs = 5 * 27 * 16 + 12 * conv2_cols * 16 + 12 * 12 * 16 + 10 * 10
    assert counts.params == hand_params
    assert counts.macs == hand_macs and counts.flops == 2 * hand_macs
    # the compact model written by hand, measured by torch.utils.flop_counter
    compact = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                            nn.Unfold(3, padding=1))  # [1, 5*9, 16]
    head = nn.ModuleDict({"conv2": nn.Linear(conv2_cols, 12, bias=False), "bn2": nn.BatchNorm1d(12),
                          "fc1": nn.Linear(12 * 16, 12), "fc": nn.Linear(10, 10)})
    measured_params = sum(p.numel() for p in compact.parameters()) + sum(p.numel() for p in head.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cols = compact.eval()(x)[:, :conv2_cols].transpose(1, 2)          # [1, 16, K']
        y = head["conv2"](cols).transpose(1, 2)                            # [1, 12, 16]
        z = head["fc1"](y.flatten(1))
        head["fc"](z[:, :10])
    assert measured_params == hand_params
    assert abs(counter.get_total_flops() // 2 - hand_macs) <= 0.01 * hand_macs


@pytest.mark.parametrize("multiple", [1, 4])
@pytest.mark.parametrize("name", sorted(SMALL) + ["resnet20"])
def test_estimate_bounds_count_of_the_projection(name, multiple):
    """The search's fast estimate from rates alone gives count(project(...))'s parameters exactly and, for
    layers under 128 filters (the dense conv over kept channels), never fewer MACs (a column layer whose input
    channels lose every column executes less than estimated); at any channel multiple."""
    model = _randomize(create_model(name) if name == "resnet20" else SMALL[name](), seed=2)
    x = torch.randn(1, 3, 32, 32) if name == "resnet20" else X
    space = PruningSpace.build(model, x, dims=("filter", "column", "irregular"), channel_multiple=multiple)
    gen = torch.Generator().manual_seed(9)
    for _ in range(5):
        rates = {kind: {u.name: float(torch.rand((), generator=gen)) * 0.99 for u in space.units(kind)}
                 for kind in ("filter", "column", "irregular")}
        estimate, count = space.estimate(rates), space.count(project(space, model, rates))
        assert estimate.params == count.params and estimate.macs >= count.macs
    assert space.estimate({}) == space.total


class PointwiseHead(nn.Module):
    """A 3x3 conv, a 1x1 conv and a Linear: column layers of kernel area 9, 1 and 1."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.point = nn.Conv2d(width, width + 3, 1)
        self.fc = nn.Linear(width + 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.point(torch.relu(self.conv(x))).mean((2, 3)))


@settings(max_examples=12, deadline=None)
@given(width=st.integers(5, 40), multiple=st.sampled_from([1, 4, 8]), seed=st.integers(0, 10**6),
       dims=st.sampled_from([("column",), ("filter", "column")]))
def test_column_layers_of_kernel_area_one_keep_aligned_widths(width, multiple, seed, dims):
    """A 1x1 conv or Linear keeps a multiple of the channel multiple of its remaining input channels (or all of
    them), the nearest to what the rate asks (ties to the larger); a 3x3 layer keeps the rate's count; the
    estimate's parameters equal the projection's and the compact 1x1 conv reads an aligned width."""
    model = _randomize(PointwiseHead(width), seed=seed % 97)
    x = torch.randn(1, 3, 6, 6)
    space = PruningSpace.build(model, x, dims=dims, channel_multiple=multiple)
    gen = torch.Generator().manual_seed(seed)
    rates = {kind: {u.name: float(torch.rand((), generator=gen)) * 0.9 for u in space.units(kind)} for kind in dims}
    masks = project(space, model, rates)
    structure = space.param_masks(Masks(filters=masks.filters, columns={}, weights={}))  # filter pruning's
    remaining = {}
    for layer in space.column_layers:
        remaining[layer.name] = left = (int(layer.gemm(structure[layer.param]).any(0).sum())
                                        if layer.param in structure else layer.size)
        kept, asked = int(masks.columns[layer.name].sum()), keep_count(left, rates["column"][layer.name])
        if layer.area > 1 or multiple == 1:
            assert kept == asked
        else:
            allowed = [w for w in range(1, left + 1) if w % multiple == 0 or w == left]
            assert kept == min(allowed, key=lambda w: (abs(w - asked), -w))
    assert space.estimate(rates).params == space.count(masks).params
    point = compact(model, space.param_masks(masks), x).model.point  # a ColumnConv2d unless it keeps all
    read = point.dense_input.numel() if hasattr(point, "dense_input") else point.in_channels
    assert read == int(masks.columns["point"].sum())
    assert read % multiple == 0 or read == remaining["point"]


def _center_heavy(model: nn.Module, seed: int) -> nn.Module:
    """Random conv weights whose kernel centres dominate, so column projection keeps every input channel's
    centre column before any other column of any channel."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
                module.weight.uniform_(-0.1, 0.1, generator=gen)
                sign = torch.randint(0, 2, module.weight.shape[:2], generator=gen) * 2 - 1
                module.weight[:, :, 1, 1] = sign * (1 + torch.rand(module.weight.shape[:2], generator=gen))
    return model


@pytest.mark.parametrize("name", ["resnet20", "vgg11"])
def test_count_is_the_executed_macs_of_the_compact_model(name):
    """Column-pruned 3x3 layers run the GEMM over their kept columns only with >= 128 filters and under 0.7
    of their columns kept; otherwise the dense conv over their input channels. When every input channel keeps
    a column (centre-heavy weights, column rates below 8/9), the estimate is exact, and both equal the MACs
    torch's flop counter sees the compact model execute."""
    model = _center_heavy(_randomize(create_model(name)), seed=3)
    x = torch.randn(1, 3, 32, 32)
    space = PruningSpace.build(model, x)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        rates = {"filter": {u.name: float(torch.rand((), generator=gen)) * 0.6 for u in space.filter_groups},
                 "column": {u.name: float(torch.rand((), generator=gen)) * 0.85 for u in space.column_layers}}
        masks = project(space, model, rates)
        count = space.count(masks)
        assert space.estimate(rates) == count
        assert count_macs(compact(model, space.param_masks(masks), x).model, x) == count.macs


def test_column_pruning_of_narrow_3x3_layers_saves_no_executed_macs():
    """resnet20's 3x3 convs have at most 64 filters: pruned columns of channels that keep a column are still
    multiplied, so column rates alone leave the MACs of the unpruned model (computed by the flop counter),
    while the parameters fall; a space for executed MACs offers no such column unit."""
    model = _center_heavy(_randomize(create_model("resnet20")), seed=5)
    x = torch.randn(1, 3, 32, 32)
    space = PruningSpace.build(model, x)
    convs = [u for u in space.column_layers if u.area == 9]
    count = space.count(project(space, model, {"column": {u.name: 0.5 for u in convs}}))
    assert count.macs == count_macs(model, x) and count.params < space.total.params
    executed = PruningSpace.build(model, x, executed_macs_only=True)
    assert [u.name for u in executed.column_layers] == ["fc"]  # the 1x1 shortcuts would gather (below)
    assert all(name in executed.excluded for name in (u.name for u in convs))
    assert "a 1x1 convolution applied at 256 positions an item" in executed.excluded["layer2.0.downsample.0"]
    vgg = PruningSpace.build(create_model("vgg11"), x, executed_macs_only=True)
    assert {u.rows for u in vgg.column_layers if u.area == 9} == {128, 256, 512}


class TokenMLP(nn.Module):
    """``[B, 1, 8, 8]`` -> patches as 16 tokens of 4 features -> an MLP over every token -> mean -> a classifier."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], 16, 4)
        return self.head(self.fc2(torch.relu(self.fc1(tokens))).mean(1))


@pytest.mark.parametrize("batch", [1, 3])
def test_a_linear_applied_at_every_token_has_no_column_unit_for_executed_macs(batch):
    """Its compact form would gather the kept columns at each of the 16 tokens (a compact ConvNeXt spent 62 % of
    its onnxruntime time in such gathers); the classifier, applied once an item, keeps its column unit."""
    model, x = TokenMLP(), torch.randn(batch, 1, 8, 8)
    assert {u.name for u in PruningSpace.build(model, x).column_layers} == {"fc1", "fc2", "head"}
    executed = PruningSpace.build(model, x, executed_macs_only=True)
    assert {u.name for u in executed.column_layers} == {"head"}
    assert "a Linear applied at 16 positions an item" in executed.excluded["fc2"]
    assert {g.name for g in executed.filter_groups} == {"fc1", "fc2"}  # their channels stay prunable as filters


class PointwiseGate(nn.Module):
    """A 1x1 conv over an 8x8 map, then a 1x1 conv over the pooled 1x1 map (a squeeze-excitation style gate)."""

    def __init__(self):
        super().__init__()
        self.pw, self.gate, self.head = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1), nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.pw(x))
        return self.head((x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))).mean((2, 3)))


def test_a_1x1_conv_applied_at_every_pixel_has_no_column_unit_for_executed_macs():
    """A 1x1 conv's column pruning is a gather of its kept input channels at every pixel (a fresh user's
    MobileNet-style net with nine such layers ran 0.64x as fast as its base at batch 1); applied once an item (the
    gate over the pooled map) it keeps its column unit, as a Linear does."""
    model, x = PointwiseGate(), torch.randn(2, 3, 8, 8)
    assert {u.name for u in PruningSpace.build(model, x).column_layers} == {"pw", "gate", "head"}
    executed = PruningSpace.build(model, x, executed_macs_only=True)
    assert {u.name for u in executed.column_layers} == {"gate", "head"}
    assert "a 1x1 convolution applied at 64 positions an item" in executed.excluded["pw"]


def test_full_masks_count_is_the_model_total():
    model = Residual()
    space = PruningSpace.build(model, X, dims=("filter", "column", "irregular"))
    counts = space.count(space.full_masks())
    assert counts == space.total
    assert counts.params == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- units, exclusions
def test_units_expose_size_params_and_macs():
    space = PruningSpace.build(Chain(), torch.randn(1, 3, 4, 4), dims=("filter", "column", "irregular"))
    conv2 = space.unit("column", "conv2")
    assert (conv2.rows, conv2.size, conv2.params, conv2.macs) == (16, 72, 16 * 72, 16 * 72 * 16)
    fc1 = space.unit("irregular", "fc1")
    assert (fc1.size, fc1.macs) == (12 * 256, 12 * 256)
    group = space.unit("filter", "conv1")
    # conv1 rows + bias, bn1 affine, conv2 input slices
    assert group.params == 8 * 27 + 8 + 16 + 16 * 72
    assert group.macs == 8 * 27 * 16 + 16 * 72 * 16
    assert group.producers == ("conv1",) and group.consumers == ("conv2",)


def test_ignored_layers_and_bad_arguments():
    """An ignored layer keeps its filters, columns and weights; its input channels follow a pruned producer (as
    Torch-Pruning's ``ignored_layers``); a group that would remove an ignored module's own channels (its
    BatchNorm's entries) is not pruned."""
    space = PruningSpace.build(Chain(), X, ignored_layers=["conv2"])
    assert "conv2" not in [c.name for c in space.column_layers]
    assert [(g.name, g.consumers) for g in space.filter_groups] == [("conv1", ("conv2",)), ("fc1", ("fc",))]
    assert "ignored" in space.excluded["conv2"]
    space = PruningSpace.build(Chain(), X, ignored_layers=["bn1", "fc1"])
    assert [g.name for g in space.filter_groups] == ["conv2"]
    assert space.excluded["conv1"] == "filter pruning: its channels are also bn1's, which is in ignored_layers"
    assert ignored_summary(space) == ("ignored_layers: 1 layer(s) keep their filters and weights (fc1; their input "
                                      "channels follow pruned producers); 1 filter group(s) not pruned because they "
                                      "would remove channels of ignored modules (conv1)")
    with pytest.raises(UserError, match="nonexistent"):
        PruningSpace.build(Chain(), X, ignored_layers=["nonexistent"])
    with pytest.raises(UserError, match="channels"):
        PruningSpace.build(Chain(), X, dims=("channels",))


def test_a_group_left_out_keeps_its_channels_only():
    """``left_out`` removes one filter group, with the reason given, and nothing else: unlike ``ignored_layers``
    its layers keep their column units and the groups coupled to it are unaffected."""
    full = PruningSpace.build(Chain(), X)
    space = PruningSpace.build(Chain(), X, left_out={"conv2": "filter pruning: the compact model breaks"})
    assert [g.name for g in full.filter_groups] == ["conv1", "conv2", "fc1"]
    assert [g.name for g in space.filter_groups] == ["conv1", "fc1"]
    assert [c.name for c in space.column_layers] == [c.name for c in full.column_layers]
    assert space.excluded["conv2"] == "filter pruning: the compact model breaks"
    assert "ignored" not in " ".join(space.excluded.values())
    # what the final table names (not the classifier, whose outputs no peer prunes either)
    assert "fc" in full.excluded and full.not_filter_pruned() == {}
    assert space.not_filter_pruned() == {"conv2": "the compact model breaks"}
    ignored = PruningSpace.build(Chain(), X, ignored_layers=["bn1", "fc1"])
    assert ignored.not_filter_pruned() == {"fc1": "ignored by request",
                                           "conv1": "its channels are also bn1's, which is in ignored_layers"}


def _module_tree(draw, depth: int = 0) -> nn.Module:
    """A tree of containers (and Linear leaves) whose sibling names share prefixes (``a``, ``a1``, ``ab``)."""
    if depth == 3 or not draw(st.booleans()):
        return nn.Linear(2, 2)
    module = nn.Module()
    for name in draw(st.lists(st.sampled_from(["a", "a1", "ab", "b"]), unique=True, min_size=1, max_size=3)):
        module.add_module(name, _module_tree(draw, depth + 1))
    return module


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_ignored_modules_cover_each_named_module_and_every_module_below_it(data):
    """Computed independently by module identity: the modules of each named module's ``.modules()``."""
    model = nn.Sequential(_module_tree(data.draw), _module_tree(data.draw))
    names = [name for name, _ in model.named_modules() if name]
    wanted = data.draw(st.lists(st.sampled_from(names), max_size=3))
    covered = {id(m) for name in wanted for m in model.get_submodule(name).modules()}
    assert ignored_modules(model, wanted) == {name for name, m in model.named_modules() if id(m) in covered}


@pytest.mark.parametrize("wanted", [["nonexistent"], ["conv1", "fc_1"], [""]])
def test_an_ignored_layer_that_names_no_module_is_refused_naming_the_setting(wanted):
    with pytest.raises(SettingError, match="names no module of Chain") as info:
        ignored_modules(Chain(), wanted)
    assert info.value.setting == "ignored_layers"
    assert ("did you mean ['fc1']?" in str(info.value)) == (wanted == ["conv1", "fc_1"])
    assert ignored_modules(Chain(), "conv1") == {"conv1"}  # one name as a string


def test_exclusions_are_logged_once_by_a_run(caplog):
    with caplog.at_level("INFO", logger="autocompress.space"):
        space = PruningSpace.build(Separable(), X)
        assert "-pruned" not in caplog.text  # a run builds several spaces of one model
        space.log_exclusions()
    assert "not filter-pruned: fc: its channels are model outputs (classes, returned features)" in caplog.text


def test_layers_left_out_for_one_reason_are_logged_on_one_line(caplog):
    """A ViT's Linears applied at every token are left out of column pruning for the same reason: one line names
    them all, instead of one line each."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))).mean(1))

    space = PruningSpace.build(Tokens(), torch.randn(1, 5, 4), executed_macs_only=True)
    shared = space.excluded["a"]
    assert space.excluded["b"] == shared
    with caplog.at_level("INFO", logger="autocompress.space"):
        space.log_exclusions()
    lines = [r.getMessage() for r in caplog.records]
    assert shared.startswith("column pruning ")  # fresh user 73 read "not pruned" of layers filter-pruned
    assert f"not column-pruned (2 layers): {shared.removeprefix('column pruning ')}: a, b" in lines
    assert sum(line.startswith("not ") for line in lines) == len(set(space.excluded.values()))


def test_a_multihead_attention_projection_read_by_its_fused_forward_is_said_to_be():
    """``out_proj`` of ``nn.MultiheadAttention`` runs inside ``F.multi_head_attention_forward`` as a weight, never
    called: it was reported "not reached by the forward pass"."""
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attn, self.head = nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True), \
                nn.Linear(8, 3)

        def forward(self, x):
            x = self.embed(x)
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    space = PruningSpace.build(Encoder(), (torch.randn(2, 5, 4),))
    assert space.excluded["attn.out_proj"] == FUSED_ATTENTION


class Odd(nn.Module):
    """conv a (3->8) -> grouped conv g (8->8, 2 conv groups) -> pool -> fc; an unreached Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.unused = nn.Linear(4, 4)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.g(self.a(x)).mean((2, 3)))


def test_unreached_layers_are_excluded_and_grouped_convs_keep_columns():
    space = PruningSpace.build(Odd(), X)
    assert "not reached" in space.excluded["unused"]
    assert [c.name for c in space.column_layers] == ["a", "g", "fc"]
    assert space.unit("column", "g").size == 4 * 9


class Gated(nn.Module):
    """conv a (3->16) -> conv b (16->32) split in two halves by chunk: ``glu`` multiplies them (a GLU gate, read
    by conv c), else each half feeds its own conv (c, d) and the two are concatenated."""

    def __init__(self, glu: bool):
        super().__init__()
        self.glu = glu
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 32, 3, padding=1)
        self.c, self.d = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 if glu else 16, 10)

    def forward(self, x):
        first, second = self.b(torch.relu(self.a(x))).chunk(2, dim=1)
        y = self.c(first * torch.sigmoid(second)) if self.glu else torch.cat([self.c(first), self.d(second)], 1)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("glu", [True, False])
def test_a_layer_whose_output_is_chunked_is_left_out_naming_the_split_and_the_fix(glu):
    """Fresh user 59: a GLU gate (chunk(2, dim=1)) was left out as "channels map unevenly into c3.weight", which
    named neither the chunk nor a way out; removing channels of b would move the chunk's split point."""
    space = PruningSpace.build(Gated(glu), X)
    consumer = "c" if glu else "d"  # torch-pruning follows the gate's second half only; the split's second part
    assert space.excluded["b"] == (
        f"filter pruning: channels map unevenly into {consumer}.weight: 16 of the 32 channels reach it (the output "
        "is split into parts whose sizes the forward fixes, e.g. by chunk for a GLU gate, or reshaped into fewer "
        "channels, e.g. a Linear's features viewed as a map); compute each part with its own layer to prune them")
    assert "a" in {u.name for u in space.units("filter")}


class OwnGRU(nn.GRU):
    """A caller's subclass of nn.GRU: its forward could read its input otherwise, so it is not followed."""


class Recurrent(nn.Module):
    """conv a (3->16) -> conv b (16->16) read as 16 features per step by a GRU subclass (12 hidden) -> fc on the last
    step."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 16, 3, padding=1), nn.Conv1d(16, 16, 3, padding=1)
        self.gru, self.fc = OwnGRU(16, 12, batch_first=True), nn.Linear(12, 10)

    def forward(self, x):
        out, _ = self.gru(self.b(torch.relu(self.a(x))).transpose(1, 2))
        return self.fc(out[:, -1])


class GatedFirst(nn.Module):
    """A one-channel spatial gate defined (and so enumerated) before the conv whose output it multiplies."""

    def __init__(self):
        super().__init__()
        self.gate, self.conv = nn.Conv2d(3, 1, 1), nn.Conv2d(3, 16, 3, padding=1)
        self.out, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(x) * torch.sigmoid(self.gate(x))
        return self.fc(self.out(torch.relu(y)).mean((2, 3)))


class AttentionPooledLSTM(nn.Module):
    """conv -> 2-layer LSTM -> a one-output score Linear (defined first) -> softmax over time -> pooled -> fc."""

    def __init__(self):
        super().__init__()
        self.score, self.conv = nn.Linear(32, 1), nn.Conv1d(5, 16, 3, padding=1)
        self.rnn, self.fc = nn.LSTM(16, 32, 2, batch_first=True), nn.Linear(32, 3)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.conv(x)).transpose(1, 2))
        return self.fc((torch.softmax(self.score(out), 1) * out).sum(1))


@pytest.mark.parametrize("model, x, groups", [(GatedFirst, (2, 3, 8, 8), ["conv", "out"]),
                                              (AttentionPooledLSTM, (2, 5, 9), ["conv", "rnn"])])
def test_a_one_channel_layer_enumerated_first_leaves_the_channels_it_broadcasts_over_prunable(model, x, groups):
    """A one-channel layer (a spatial gate, an attention pooling's score) reaches the channels it multiplies only by
    broadcast, yet its group marked their layers as seen: enumerated first (defined first), it left the gated conv
    or the LSTM unpruned with no reason given. Only groups of two or more channels claim their layers now."""
    space = PruningSpace.build(model().eval(), torch.randn(*x))
    assert [g.name for g in space.filter_groups] == groups
    assert space.excluded[next(iter(dict(model().named_children())))] == "filter pruning: a single output channel"


class PackedReader(nn.Module):
    """Token ids and lengths -> an embedding -> a packed GRU / LSTM -> a classifier on its padded steps' mean plus
    one on its final state (the one Linear read twice)."""

    def __init__(self, kind):
        super().__init__()
        self.embed, self.rnn, self.fc = nn.Embedding(30, 16), kind(16, 32, batch_first=True), nn.Linear(32, 3)

    def forward(self, tokens, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, state = self.rnn(packed)
        out = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0]
        return self.fc(out.mean(1)) + self.fc((state[0] if isinstance(state, tuple) else state)[-1])


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_a_packed_sequence_keeps_the_recurrent_layer_whole(kind):
    """A packed sequence is not followed: the layer keeps its hidden units (and is named as kept whole). Tracing
    its packed output as one node sent torch-pruning's group enumeration into an endless loop here (session 57),
    so it is left to torch-pruning's own trace, which ends."""
    space = PruningSpace.build(PackedReader(kind).eval(), (torch.randint(1, 30, (2, 9)), torch.tensor([9, 5])))
    assert space.filter_groups == [] and set(space.kept_whole()) == {"rnn"}


def test_a_group_torch_pruning_cannot_map_names_the_layers_its_graph_does_not_follow():
    """Fresh user 58: the channels feeding a GRU were left out as "torch-pruning cannot map its channels
    (IndexError)", naming no layer; torch-pruning traces a GRU op by op, not as a layer. (An nn.GRU itself is
    followed now; a subclass is not.)"""
    space = PruningSpace.build(Recurrent(), (torch.randn(2, 3, 10),))
    assert space.excluded["b"] == ("filter pruning: torch-pruning cannot map its channels (IndexError; layers it "
                                   f"does not follow: OwnGRU gru; of recurrent layers, {RECURRENT_FOLLOWED})")


def test_grouped_conv_ties_each_channel_to_the_same_position_of_the_other_conv_group():
    torch.manual_seed(0)
    model = Odd()
    space = PruningSpace.build(model, X)
    a, g = space.unit("filter", "a"), space.unit("filter", "g")
    assert a.ties.tolist() == g.ties.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert (a.classes, a.keep(0.5), a.keep(0.2), a.keep(0.9)) == (4, 4, 6, 2)
    read = next(s for s in a.slices if s.module == "g")  # g's weight dim 1 holds channel c at c % 4
    assert read.index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and read.feature.tolist() == list(range(8))
    keep = torch.tensor([True, False, False, True] * 2)
    pm = space.param_masks(Masks(filters={"a": keep}, columns={}, weights={}))
    assert pm["g.weight"][:, :, 1, 1].tolist() == [[True, False, False, True]] * 8
    assert pm["a.weight"].flatten(1).all(1).tolist() == keep.tolist() and pm["a.bias"].tolist() == keep.tolist()
    # projection keeps the 2 classes {c, c+4} with the largest summed squared norms of a's rows and of the
    # input columns of g that read them (channel f: input position f % 4 of the 4 rows of conv group f // 4)
    g_weight = model.g.weight.detach()
    reads = torch.stack([g_weight[f // 4 * 4:f // 4 * 4 + 4, f % 4].pow(2).sum() for f in range(8)])
    norms = model.a.weight.detach().pow(2).flatten(1).sum(1) + reads
    classes = norms[:4] + norms[4:]
    best = torch.zeros(4, dtype=torch.bool)
    best[classes.topk(2).indices] = True
    rates = {"filter": {"a": 0.5, "g": 0.5}}
    masks = project(space, model, rates)
    assert masks.filters["a"].tolist() == best.repeat(2).tolist()
    assert space.estimate(rates) == space.count(masks)
    # and the compact grouped conv has 2 of 4 inputs and outputs per conv group; g's entries: 4*2*9
    assert space.count(masks).params == sum(p.numel() for p in model.parameters()) - (8 - 4) * (3 + 1) - (
        8 * 4 * 9 - 4 * 2 * 9) - (8 - 4) - (8 - 4) * 10


def test_param_masks_rejects_unknown_units():
    space = PruningSpace.build(Chain(), X)
    with pytest.raises(ValueError, match="nope"):
        space.param_masks(Masks(filters={"nope": torch.ones(3, dtype=torch.bool)}, columns={}, weights={}))
    with pytest.raises(ValueError, match="shape"):
        space.param_masks(Masks(filters={"conv1": torch.ones(3, dtype=torch.bool)}, columns={}, weights={}))


# ----------------------------------------------------------------------------- no side effects, determinism
def test_build_leaves_bn_buffers_and_modes_unchanged():
    model = _randomize(Residual(), seed=5).train()
    model.bn_a.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    space = PruningSpace.build(model, X, dims=("filter", "column", "irregular"))
    space.count(project(space, model, {"filter": {"stem": 0.5}}))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert torch.is_grad_enabled()


def test_identical_results_twice_under_deterministic_algorithms():
    first = create_model("resnet20")
    second = create_model("resnet20")
    second.load_state_dict(first.state_dict())
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        outs = []
        for model in (first, second):
            space = PruningSpace.build(model, x, dims=("filter", "column"))
            rates = {"filter": {g.name: 0.3 for g in space.filter_groups},
                     "column": {c.name: 0.4 for c in space.column_layers}}
            masks = project(space, model, rates)
            outs.append((space, masks, space.count(masks)))
    finally:
        torch.use_deterministic_algorithms(previous)
    (s1, m1, c1), (s2, m2, c2) = outs
    assert c1 == c2
    assert [g.name for g in s1.filter_groups] == [g.name for g in s2.filter_groups]
    for kind in ("filters", "columns"):
        d1, d2 = getattr(m1, kind), getattr(m2, kind)
        assert d1.keys() == d2.keys() and all(torch.equal(d1[k], d2[k]) for k in d1)


# ----------------------------------------------------------------------------- zoo
@pytest.mark.parametrize("name,kwargs,input_size,groups", [
    ("resnet20", {}, (3, 32, 32), 12), ("vgg16", {"width": 0.25}, (3, 32, 32), 13),
    ("lenet5", {}, (1, 28, 28), None), ("fmnist_cnn", {}, (1, 28, 28), None)])
def test_zoo_models(name, kwargs, input_size, groups):
    model = _randomize(create_model(name, **kwargs), seed=7)
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(2))
    space = PruningSpace.build(model, x, dims=("filter", "column"))
    if groups is not None:
        assert len(space.filter_groups) == groups
    assert len(space.excluded) == 1 and "model outputs" in next(iter(space.excluded.values()))
    masks = project(space, model, {"filter": {g.name: 0.6 for g in space.filter_groups}})
    masked = copy.deepcopy(model)
    apply_masks(masked, space.param_masks(masks))
    phys = _physically_pruned(model, x, space, masks)
    with analysis_mode(masked), analysis_mode(phys):
        a, b = masked(x), phys(x)
    assert torch.allclose(a, b, atol=1e-5 * (1 + a.abs().max().item()), rtol=0)
    assert space.count(masks).params == sum(p.numel() for p in phys.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "googlenet", "efficientnet_b0",
                                  "regnet_x_400mf", "resnet50"])
def test_torchvision_models_masked_equals_pruned(name):
    """Coupling on torchvision classifiers (32x32 inputs to stay fast; vgg16_bn is left out for time, its
    plain chain is covered by the zoo's vgg16): masked == torch-pruning-pruned output, and count() equals
    the pruned model's parameters and MACs."""
    from autocompress.metrics import count_macs

    model = _randomize(create_model(f"torchvision:{name}"), seed=11)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    space = PruningSpace.build(model, x, dims=("filter",))
    assert space.filter_groups
    masks = project(space, model, {"filter": {g.name: 0.5 for g in space.filter_groups}})
    masked = copy.deepcopy(model)
    apply_masks(masked, space.param_masks(masks))
    phys = _physically_pruned(model, x, space, masks)
    with analysis_mode(masked), analysis_mode(phys):
        a, b = masked(x), phys(x)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item() + 1e-6
    counts = space.count(masks)
    assert counts.params == sum(p.numel() for p in phys.parameters())
    assert counts.macs == count_macs(phys, x)


def test_keep_count_rounds_half_up_and_never_reaches_zero():
    assert keep_count(10, 0.25) == 7 and keep_count(4, 0.5) == 2 and keep_count(5, 0.5) == 2
    assert keep_count(3, 0.9) == 1 and keep_count(1, 0.5) == 1 and keep_count(8, 0.0) == 8


def test_check_dims_refuses_a_kind_without_units_naming_the_module():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    space = PruningSpace.build(model, torch.randn(1, 3, 8, 8), dims=("filter", "column"))
    space.check_dims(["column"])
    with pytest.raises(UserError, match=r"no filter unit can be pruned in this model \(1: filter pruning: its "
                                        r"channels are model outputs"):
        space.check_dims(["filter", "column"])


def test_check_dims_gives_the_reasons_of_the_refused_kind_only():
    """A column reason mentioning "filters" was listed as a reason for no filter unit (session 28's review):
    each kind's refusal gives that kind's reasons and those of every kind."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    space = PruningSpace.build(model, torch.randn(1, 3, 8, 8), dims=("filter", "column"), executed_macs_only=True)
    assert "4 filters" in space.excluded["0"]
    with pytest.raises(UserError) as error:
        space.check_dims(["filter"])
    assert "(0: filter pruning: its channels are model outputs (classes, returned features))" in str(error.value)
    assert space.reasons("column") == {"0": (space.exclusions["0"][1],)}


def test_check_dims_names_every_ignored_module_that_leaves_no_unit():
    """A fresh user ignored four blocks and was told of the first only (session 24): up to three are named, with
    a count of the rest."""
    layers = [m for _ in range(5) for m in (nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    space = PruningSpace.build(model, torch.randn(1, 4, 8, 8), dims=("filter",),
                               ignored_layers=["0", "2", "4", "6", "8"])
    with pytest.raises(UserError) as error:
        space.check_dims(["filter"])
    message = str(error.value)
    assert "(0: ignored by request; 2: ignored by request; 4: ignored by request; and 3 more)" in message  # +head
    assert "so that one of them can be pruned" in message


class WideGrouped(nn.Module):
    """A 1x1 conv of 16 channels into a grouped conv (2 conv groups) of 16: every channel tied to its twin."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.g(self.a(x)).mean((2, 3)))


@pytest.mark.parametrize("multiple", [1, 4, 8])
@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.8])
def test_aligned_widths_through_grouped_conv_ties(multiple, rate):
    """With a channel multiple, a tied group keeps whole tie classes whose channels add up to a multiple (two
    channels per class here: classes in steps of multiple / 2), the projection keeps twins together, and the
    estimate equals the count of the projected masks."""
    torch.manual_seed(0)
    model = WideGrouped()
    space = PruningSpace.build(model, X, channel_multiple=multiple)
    a = space.unit("filter", "a")
    masks = project(space, model, {"filter": {"a": rate}})
    kept = masks.filters["a"]
    unaligned = 2 * keep_count(8, rate)
    step = max(1, multiple // 2)
    allowed = [w for w in range(2 * step, 17, 2 * step)] + [16]
    expected = min(allowed, key=lambda w: (abs(w - unaligned), -w))
    assert int(kept.sum()) == space.filter_keep(a, rate) == expected
    assert int(kept.sum()) % multiple == 0 or int(kept.sum()) == 16
    assert kept[:8].tolist() == kept[8:].tolist()
    assert space.estimate({"filter": {"a": rate}}) == space.count(masks)


class MaskedPool(nn.Module):
    """Tokens ``[B, N, 4]`` and an additive float mask ``[B, N]`` (0 kept, -inf dropped) -> ``[B, 3]``: the mean of
    the kept tokens' features (0 / 0 where a row keeps none), two Linears."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, mask):
        kept = (mask == 0).to(x.dtype).unsqueeze(-1)
        return self.fc2((torch.relu(self.fc1(x)) * kept).sum(1) / kept.sum(1))


def test_an_additive_float_mask_keeps_its_pattern_in_the_build_s_random_inputs():
    """Fresh user 56: the build's probe drew their float mask as normal noise, every token read as masked, and the
    build failed on "atol must be greater than or equal to zero, but got -nan"."""
    from autocompress.analysis import random_like

    mask = torch.zeros(3, 6)
    mask[0, 4:], mask[1, 1:], mask[2, :2] = float("-inf"), float("-inf"), float("-inf")
    generator = torch.Generator().manual_seed(0)
    for example in (mask, (mask == 0).float(), (mask == 0).float() * -10000.0):
        drawn = random_like(example, 5, generator)
        assert drawn.shape == (5, 6) and all(any(torch.equal(row, item) for item in example) for row in drawn)
    for data in (torch.zeros(2, 6), torch.arange(12.0).view(2, 6)):  # not masks: normal noise as before
        assert torch.unique(random_like(data, 4, generator)).numel() == 24
    x = torch.randn(3, 6, 4)
    space = PruningSpace.build(MaskedPool(), (x, mask))
    assert [g.name for g in space.filter_groups] == ["fc1"]


def test_a_forward_that_is_not_finite_on_random_inputs_is_refused_naming_the_layer():
    class Logs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(self.fc1(x).log())

    model = Logs()
    with torch.no_grad():
        model.fc1.weight.copy_(-model.fc1.weight.abs())  # negative outputs for positive inputs: log is NaN
    with pytest.raises(UserError, match=r"^the model computes NaN or infinite values at fc2's input on random inputs "
                                        r"shaped like example_inputs .*; make the forward finite for any input: "
                                        r"clamp what a log, sqrt or division reads"):
        PruningSpace.build(model, torch.rand(2, 4))


class _NormScaled(nn.Module):
    """c2's outputs divided by the norm of its own filters (fresh user 63), or logged (positive weights and bias)."""

    def __init__(self, use_log: bool):
        super().__init__()
        self.use_log = use_log
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)
        if use_log:
            with torch.no_grad():
                self.c2.weight.abs_()
                self.c2.bias.fill_(1.0)

    def forward(self, x):
        h = F.relu(self.c1(x))
        if self.use_log:
            a = self.c2(h).log()
        else:
            a = self.c2(h) / self.c2.weight.flatten(1).norm(dim=1).view(1, -1, 1, 1)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c3(a)), 1).flatten(1))


@pytest.mark.parametrize("use_log", [False, True])
def test_a_group_whose_removal_alone_makes_the_forward_not_finite_is_left_out_naming_why(use_log, caplog):
    """Fresh user 63: dividing by a layer's filter norms was refused whole as "NaN on random inputs" (the
    probe's own zeroed filters give 0 / 0); that group is left out, the others pruned."""
    import logging

    model = _NormScaled(use_log)
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.INFO, logger="autocompress.space"):
        space = PruningSpace.build(model, torch.rand(1, 3, 6, 6))
        space.log_exclusions()
    assert [g.name for g in space.filter_groups] == ["c1", "c3"]
    read = "; c2's weight is also read outside the layer" if not use_log else ""
    assert (f"not filter-pruned: c2: removing its channels makes c3's input NaN or infinite (a division by "
            f"their weights' norm, a log of their outputs){read}") in caplog.messages
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_layer_of_the_caller_s_own_with_weights_is_named_as_not_pruned(caplog):
    """Fresh user 57: a conv written with nn.Parameter and F.conv2d was left out silently (a 4x target then
    unreachable, no message naming the layer)."""
    import logging

    class OwnConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 1, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.weight, padding=1)

    model = nn.Sequential(OwnConv(), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 3))
    with caplog.at_level(logging.INFO, logger="autocompress.space"):
        space = PruningSpace.build(model, torch.randn(1, 1, 6, 6))
        space.log_exclusions()
    reason = "OwnConv is a layer of its own with weights, not a Conv / Linear: build it from nn.Conv2d / nn.Linear"
    assert reason in space.excluded["0"]
    assert f"not pruned: 0: {reason} to have it pruned" in caplog.text
    assert not any("of its own" in space.excluded.get(name, "") for name in ("2", "4"))  # PyTorch's layers


class TiedLM(nn.Module):
    """A token model whose head shares its weight with the embedding (``head.weight = emb.weight``)."""

    def __init__(self, vocab: int = 30, width: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(h + self.mlp(h))


class SharedConvs(nn.Module):
    """Two convolutions sharing one weight, between a prunable stem and head."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1, self.c2 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3)
        self.c2.weight = self.c1.weight
        self.pre, self.fc = nn.Conv2d(16, 24, 1), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(torch.relu(self.stem(x))))))
        return self.fc(torch.relu(self.pre(x)).mean((2, 3)))


def test_tied_weights_keep_their_shape_and_stay_tied():
    """Fresh user 61: ``c2.weight = c1.weight`` and a head tied to its embedding came back untied, the two copies of
    different shapes. Layers sharing a parameter are left out naming the tie, and every group touching them keeps
    its channels; the compact model holds one shared tensor and computes the masked model."""
    lm, ids = TiedLM().eval(), torch.randint(0, 30, (1, 7), generator=torch.Generator().manual_seed(0))
    convs, x = _randomize(SharedConvs()).eval(), torch.randn(1, 3, 12, 12)
    for model, example, untouched in ((lm, ids, ["emb", "head"]), (convs, x, ["stem", "c1", "c2"])):
        space = PruningSpace.build(model, example, dims=("filter", "column", "irregular"))
        tied = [name for name in untouched if name in space.excluded and "(tied)" in space.excluded[name]]
        assert tied == [n for n in untouched if n in ("head", "c1", "c2")]
        assert not [g.name for g in space.filter_groups if {s.module for s in g.slices} & set(untouched)]
        assert space.filter_groups and not {u.name for kind in ("column", "irregular") for u in space.units(kind)} \
            & set(tied)
        rates = {kind: {u.name: 0.5 for u in space.units(kind)} for kind in ("filter", "column", "irregular")}
        masks = space.param_masks(project(space, model, rates))
        small = compact(model, masks, example).model
        pairs = {"emb": "head"} if model is lm else {"c1": "c2"}
        for a, b in pairs.items():
            assert small.get_submodule(a).weight is small.get_submodule(b).weight
        masked = copy.deepcopy(model)
        apply_masks(masked, masks)
        with torch.no_grad():
            assert torch.allclose(small(example), masked(example), atol=1e-5)


class StandardizedConv(nn.Conv2d):
    """A conv that standardises its own weight in its own forward (weight standardisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std() + 1e-5)
        return F.conv2d(x, weight, self.bias, padding=1)


class ReadTwice(nn.Module):
    """``conv`` called as a module and its weight read again by ``F.conv2d`` on its own output (dilated), between a
    prunable stem and prunable layers after it."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), \
            nn.Conv2d(16, 16, 3, padding=1)
        self.std, self.pre, self.fc = nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(24, 24, 1), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(torch.relu(self.stem(x))))
        x = torch.relu(F.conv2d(torch.relu(self.conv(x)), self.conv.weight, None, padding=2, dilation=2))
        return self.fc(torch.relu(self.pre(torch.relu(self.std(x)))).mean((2, 3)))


def test_weights_read_outside_their_layer_are_found():
    """``F.conv2d(x, self.conv.weight)`` beside ``self.conv(x)`` is such a read; a layer standardising its own
    weight in its own forward, and tied layers each reading the shared weight in their own call, are not."""
    from autocompress.space import weights_read_outside

    x = torch.randn(1, 3, 10, 10)
    assert weights_read_outside(_randomize(ReadTwice()).eval(), (x,)) == {"conv"}
    assert weights_read_outside(_randomize(SharedConvs()).eval(), (x,)) == set()
    assert weights_read_outside(nn.Sequential(StandardizedConv(3, 4, 3), nn.Conv2d(4, 4, 1)).eval(), (x,)) == set()


def test_a_layer_the_example_never_reaches_is_warned_about():
    """Fresh user 61: a branch taken only by some inputs is never traced, so its input channels were pruned and the
    compact model failed on those inputs without a word. The space names it in a warning."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 5)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return self.fc((self.a(x) if x.mean() > -1e9 else self.b(x)).mean((2, 3)))

    space = PruningSpace.build(Branchy().eval(), torch.randn(1, 1, 12, 12))
    assert space.unreached_warning().startswith("the forward of the example inputs never calls b: the compact model")
    assert PruningSpace.build(Chain().eval(), X).unreached_warning() is None


class EmbeddingAndFeatures(nn.Module):
    """Returns an embedding and the pooled features it projects (fresh user 78): ``(proj(pooled), pooled)``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.proj = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        pooled = self.b(torch.relu(self.a(x))).mean((2, 3))
        return self.proj(pooled), pooled


def test_a_model_output_that_other_layers_also_read_is_left_out_as_an_output():
    """torch-pruning adds an output node only for an output that no other op reads, so the layer producing the
    pooled features returned besides the embedding was taken for an inner layer: the compaction probe left it out
    as "the compact model breaks once they are removed (RuntimeError: compact model output shapes ... differ)".
    The outputs' autograd nodes are recorded when the graph is traced: it is a model output, said as such."""
    space = PruningSpace.build(EmbeddingAndFeatures().eval(), torch.randn(2, 3, 8, 8))
    assert [g.name for g in space.filter_groups] == ["a"]
    assert space.excluded["b"] == space.excluded["proj"] == "filter pruning: its channels are model outputs " \
                                                           "(classes, returned features)"


class MixerBlock(nn.Module):
    """An MLP-Mixer block (Tolstikhin et al., 2021) as users write it: token mixing by Linears over the tokens of
    the transposed ``[B, C, T]`` stream, then channel mixing."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.norm1, self.token1, self.token2 = nn.LayerNorm(width), nn.Linear(tokens, 16), nn.Linear(16, tokens)
        self.norm2, self.channel1, self.channel2 = nn.LayerNorm(width), nn.Linear(width, 32), nn.Linear(32, width)

    def forward(self, x):
        x = x + self.token2(F.gelu(self.token1(self.norm1(x).transpose(1, 2)))).transpose(1, 2)
        return x + self.channel2(F.gelu(self.channel1(self.norm2(x))))


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.blocks, self.head = nn.Conv2d(1, 24, 4, 4), nn.Sequential(MixerBlock(4, 24)), nn.Linear(24, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


def test_a_token_mixing_linear_is_named_as_what_keeps_the_embedding_width():
    """Fresh user 82's MLP-Mixer: the token-mixing Linear reads the stream's channels as another dimension than
    its features, which torch-pruning maps the channels onto, so the embedding width stays; the reason said "as
    after a torch.split or chunk" and now names the transpose. The token and channel MLPs' hidden widths are pruned."""
    space = PruningSpace.build(Mixer().eval(), torch.randn(2, 1, 8, 8))
    assert sorted(g.name for g in space.filter_groups) == ["blocks.0.channel1", "blocks.0.token1"]
    assert space.excluded["embed"].startswith("filter pruning: its channels cannot be followed into blocks.0.token1, "
                                              "a Linear applied after a transpose (as an MLP-Mixer's token mixing is)")
