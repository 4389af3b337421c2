"""PaddedLayerNorm / PaddedGroupNorm: a LayerNorm / GroupNorm that lost channels computes what the masked
norm computes."""
from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autocompress.architecture import apply_architecture, describe_architecture
from autocompress.checkpoint import load_model
from autocompress.export import export_onnx
from autocompress.padded_norm import PaddedGroupNorm, PaddedLayerNorm, compact_group_norm
from autocompress.serialization import save_compact
from autocompress.space import trace_graph

KEPT = torch.tensor([0, 2, 3, 6])  # of 7 channels


def _masked_reference(x_kept: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dim: int) -> torch.Tensor:
    """F.layer_norm over 7 channels with the removed ones as zeros, read at the kept channels."""
    shape = list(x_kept.shape)
    shape[dim] = 7
    full = torch.zeros(shape, dtype=torch.float64).index_copy(dim, KEPT, x_kept.double())
    w = torch.zeros(7, dtype=torch.float64).index_copy(0, KEPT, weight.double())
    b = torch.zeros(7, dtype=torch.float64).index_copy(0, KEPT, bias.double())
    out = F.layer_norm(full.movedim(dim, -1), (7,), w, b, 1e-6).movedim(-1, dim)
    return out.index_select(dim, KEPT)


def test_statistics_count_the_removed_channels_as_zeros():
    torch.manual_seed(0)
    for dim, shape in ((-1, (2, 5, 4)), (2, (2, 5, 4)), (1, (2, 4, 3, 3))):  # (the last dim: one fused layer_norm)
        norm = PaddedLayerNorm(4, 7, dim, eps=1e-6)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        x = torch.randn(shape) * 3 + 1
        expected = _masked_reference(x, norm.weight.detach(), norm.bias.detach(), dim)
        assert torch.allclose(norm(x).double(), expected, atol=1e-5)
        # a plain LayerNorm over the 4 kept channels (what dropping them computes) differs
        plain = F.layer_norm(x.movedim(dim, -1), (4,), norm.weight, norm.bias, 1e-6).movedim(-1, dim)
        assert (plain.double() - expected).abs().max() > 1e-2


def test_full_width_equals_layer_norm_and_rebuilds_from_its_description():
    torch.manual_seed(0)
    reference = nn.LayerNorm(6)
    norm = PaddedLayerNorm(6, 6)
    x = torch.randn(3, 6)
    assert torch.allclose(norm(x), reference(x), atol=1e-6)
    model = nn.Sequential(nn.Linear(5, 4), PaddedLayerNorm(4, 9, eps=1e-3))
    base = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4))
    rebuilt = apply_architecture(base, describe_architecture(model, reference=base))
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt[1].config() == {"num_features": 4, "width": 9, "dim": -1, "eps": 1e-3,
                                   "elementwise_affine": True, "bias": True}
    assert torch.equal(rebuilt(torch.ones(2, 5)), model(torch.ones(2, 5)))


def test_torch_pruning_prunes_it_further_and_keeps_the_width():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), PaddedLayerNorm(4, 7), nn.Linear(4, 2)).eval()
    graph = trace_graph(model, (torch.randn(1, 3),))
    group = graph.get_pruning_group(model[0], graph.get_pruner_of_module(model[0]).prune_out_channels, [1])
    assert model[1] in [dep.target.module for dep, _ in group]
    weight, bias = model[1].weight.detach()[[0, 2, 3]].clone(), model[1].bias.detach()[[0, 2, 3]].clone()
    group.prune()
    assert (model[1].num_features, model[1].width, model[1].weight.shape[0]) == (3, 7, 3)
    assert torch.equal(model[1].weight.detach(), weight) and torch.equal(model[1].bias.detach(), bias)


# ------------------------------------------------------------------------------------------- GroupNorm
GN_KEPT = torch.tensor([0, 2, 3, 5, 6, 7, 11])  # of 12 channels in 3 groups of 4 (2, 3 and 2 kept)


def _padded_group_norm() -> PaddedGroupNorm:
    norm = PaddedGroupNorm(7, 3, 4, eps=1e-6)
    norm.regroup(GN_KEPT // 4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return norm


def test_group_statistics_count_the_removed_channels_as_zeros_in_eval_and_train_mode():
    torch.manual_seed(0)
    norm = _padded_group_norm()
    x = torch.randn(2, 7, 5, 3) * 3 + 1
    full = torch.zeros(2, 12, 5, 3, dtype=torch.float64).index_copy(1, GN_KEPT, x.double())
    w = torch.zeros(12, dtype=torch.float64).index_copy(0, GN_KEPT, norm.weight.detach().double())
    b = torch.zeros(12, dtype=torch.float64).index_copy(0, GN_KEPT, norm.bias.detach().double())
    expected = F.group_norm(full, 3, w, b, 1e-6).index_select(1, GN_KEPT)
    for train in (False, True):
        assert torch.allclose(norm.train(train)(x).double(), expected, atol=1e-5)
    plain = F.group_norm(x, 1, norm.weight, norm.bias, 1e-6)  # one group over what is left differs
    assert (plain.double() - expected).abs().max() > 1e-2


def test_compact_group_norm_is_native_for_whole_groups_and_padded_otherwise():
    native = nn.GroupNorm(4, 4, eps=1e-3)  # as torch-pruning leaves GroupNorm(4, 8) that lost 4 channels
    whole = compact_group_norm(native, torch.tensor([1, 1, 3, 3]), 2)
    assert type(whole) is nn.GroupNorm and (whole.num_groups, whole.num_channels, whole.eps) == (2, 4, 1e-3)
    part = compact_group_norm(nn.GroupNorm(3, 3, affine=False), torch.tensor([1, 1, 3]), 2)
    assert type(part) is PaddedGroupNorm and part.group.tolist() == [0, 0, 1] and part.weight is None
    x = torch.randn(2, 3, 4)
    full = torch.zeros(2, 8, 4).index_copy(1, torch.tensor([2, 3, 6]), x)
    assert torch.allclose(part(x), F.group_norm(full, 4)[:, [2, 3, 6]], atol=1e-5)


def test_padded_group_norm_rebuilds_from_its_description_and_state_dict(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 7, 1), _padded_group_norm())
    base = nn.Sequential(nn.Conv2d(2, 12, 1), nn.GroupNorm(3, 12))
    description = describe_architecture(model, reference=base)
    assert description["modules"]["1"] == {"type": "PaddedGroupNorm", "args": {
        "num_features": 7, "num_groups": 3, "group_size": 4, "eps": 1e-6, "affine": True}}
    rebuilt = apply_architecture(base, description)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt[1].group.tolist() == (GN_KEPT // 4).tolist()
    x = torch.randn(2, 2, 3, 3)
    assert torch.equal(rebuilt(x), model(x))
    for sparse in (False, True):  # a saved file (weights_only load), dense and CSR
        path = save_compact(tmp_path / f"gn{sparse}.pt", model, architecture=description, sparse=sparse)
        loaded = load_model(path, model=nn.Sequential(nn.Conv2d(2, 12, 1), nn.GroupNorm(3, 12)))
        assert type(loaded[1]) is PaddedGroupNorm and torch.equal(loaded(x), model(x))
    exported = export_onnx(model.eval(), x, tmp_path / "gn.onnx")  # onnxruntime's output checked against it
    assert exported.max_abs_diff <= exported.tolerance


def test_torch_pruning_prunes_a_padded_group_norm_with_its_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 7, 1), _padded_group_norm(), nn.Conv2d(7, 2, 1)).eval()
    graph = trace_graph(model, (torch.randn(1, 2, 4, 4),))
    group = graph.get_pruning_group(model[0], graph.get_pruner_of_module(model[0]).prune_out_channels, [1, 4])
    weight = model[1].weight.detach()[[0, 2, 3, 5, 6]].clone()
    group.prune()
    assert (model[1].num_features, model[1].num_groups, model[1].group_size) == (5, 3, 4)
    assert model[1].group.tolist() == [0, 0, 1, 1, 2] and torch.equal(model[1].weight.detach(), weight)


@settings(max_examples=30)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**31 - 1), st.booleans())
def test_any_kept_subset_of_any_groups_computes_the_masked_group_norm(groups, size, seed, affine):
    """compact_group_norm on random kept channels (groups left whole, in part or not at all) against F.group_norm
    over the full width with the removed channels as zeros, in float64, in train and eval mode."""
    gen = torch.Generator().manual_seed(seed)
    width = groups * size
    kept = torch.randperm(width, generator=gen)[:int(torch.randint(1, width + 1, (1,), generator=gen))].sort().values
    norm = compact_group_norm(nn.GroupNorm(1, kept.numel(), eps=1e-6, affine=affine), kept // size, size).double()
    weight = torch.rand(kept.numel(), generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(kept.numel(), generator=gen, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(weight), norm.bias.copy_(bias)
    x = torch.randn(3, kept.numel(), 4, 2, generator=gen, dtype=torch.float64) * 2 + 1
    full = torch.zeros(3, width, 4, 2, dtype=torch.float64).index_copy(1, kept, x)
    w, b = (torch.zeros(width, dtype=torch.float64).index_copy(0, kept, t) for t in (weight, bias))
    expected = F.group_norm(full, groups, w if affine else None, b if affine else None, 1e-6).index_select(1, kept)
    for train in (False, True):
        assert torch.allclose(norm.train(train)(x), expected, atol=1e-9)


class _Fp32LayerNorm(nn.LayerNorm):
    """A LayerNorm subclass with its own forward, computed in float32 (as timm's and many users' are): torch-pruning
    prunes it with its own handler unless told otherwise."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).type_as(x)


class _SequenceNet(nn.Module):
    """``[B, T, F]`` -> logits: a Conv1d to ``width`` channels, a LayerNorm (``norm``: its class) over them on
    channels-last data (a transpose each side), a Linear head on the time mean (a fresh user's sequence
    classifier)."""

    def __init__(self, width: int, norm: type = nn.LayerNorm):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv1d(6, width, 3, padding=1), norm(width), nn.Linear(width, 3)

    def forward(self, x):
        x = self.conv(x.transpose(1, 2))
        return self.head(torch.relu(self.norm(x.transpose(1, 2))).mean(1))


def _sequence_net_masked(width: int, kept: int, seed: int, norm: type = nn.LayerNorm):
    """A seeded :class:`_SequenceNet` (LayerNorm weight in [0.5, 1.5), bias normal), ``kept`` random channels of
    its conv / LayerNorm, the masks removing the others, and the generator for further draws."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _SequenceNet(width, norm).eval()
    with torch.no_grad():
        model.norm.weight.copy_(torch.rand(width, generator=gen) + 0.5)
        model.norm.bias.copy_(torch.randn(width, generator=gen))
    keep = torch.zeros(width, dtype=torch.bool)
    keep[torch.randperm(width, generator=gen)[:kept]] = True
    masks = {"conv.weight": keep[:, None, None].expand(-1, 6, 3).clone(), "conv.bias": keep.clone(),
             "norm.weight": keep.clone(), "norm.bias": keep.clone()}
    return model, keep, masks, gen


NORMS = st.sampled_from([nn.LayerNorm, _Fp32LayerNorm])


@settings(max_examples=12, deadline=None)
@given(st.integers(16, 160), st.integers(1, 12), st.integers(0, 2**31 - 1), NORMS)
def test_a_layer_norm_keeping_few_of_many_channels_compacts_to_the_masked_model(width, kept, seed, norm_class):
    """torch-pruning 1.6.0 gave a LayerNorm (or a subclass) that kept few of many channels its weight and bias in
    a set's order (6 of 128: a fresh user's compact model differed by 0.67): random kept channels of a Conv1d ->
    LayerNorm (channels-last) -> Linear, compacted, against the masked model and the weights kept in order."""
    from autocompress.compaction import compact

    model, keep, masks, _ = _sequence_net_masked(width, min(kept, width), seed, norm_class)
    result = compact(model, masks, torch.randn(2, 7, 6))  # raises where it differs from the masked model
    norm = result.model.norm
    assert isinstance(norm, PaddedLayerNorm) and norm.num_features == int(keep.sum()) and norm.width == width
    assert torch.equal(norm.weight.detach(), model.norm.weight.detach()[keep])
    assert torch.equal(norm.bias.detach(), model.norm.bias.detach()[keep])


@settings(max_examples=12, deadline=None)
@given(st.integers(8, 96), st.integers(1, 12), st.integers(0, 2**31 - 1), NORMS)
def test_layer_norm_kept_compacts_to_a_plain_layer_norm_over_the_kept_channels(width, kept, seed, norm_class):
    """``layer_norm: kept``: the compact LayerNorm is a plain LayerNorm of its class over the kept channels (weights
    in order), and the compact model computes conv -> LayerNorm over the kept channels alone -> head, written out
    here from the base's weights; the padded form of the same masks computes something else."""
    from autocompress.compaction import compact

    model, keep, masks, gen = _sequence_net_masked(width, min(kept, width - 1), seed, norm_class)
    x = torch.randn(2, 7, 6, generator=gen)
    result = compact(model, masks, x, layer_norm="kept")
    norm = result.model.norm
    assert type(norm) is norm_class and norm.normalized_shape == (int(keep.sum()),)
    assert result.report["layer_norms_over_kept"] == ["norm"]
    assert torch.equal(norm.weight.detach(), model.norm.weight.detach()[keep])
    with torch.no_grad():
        h = F.conv1d(x.transpose(1, 2), model.conv.weight[keep], model.conv.bias[keep], padding=1).transpose(1, 2)
        h = F.layer_norm(h, (int(keep.sum()),), model.norm.weight[keep], model.norm.bias[keep], model.norm.eps)
        expected = F.linear(torch.relu(h).mean(1), model.head.weight[:, keep], model.head.bias)
        assert torch.allclose(result.model(x), expected, atol=1e-5)
        if 1 < keep.sum():  # one channel normalises to its bias either way
            padded = compact(model, masks, x).model
            assert not torch.allclose(padded(x), expected, atol=1e-3)


def test_a_group_over_its_size_is_refused_and_onnx_runs_one_norm_op(tmp_path):
    """regroup checks its groups; the exported graph gathers the padded layout (no scatter: onnxruntime's
    ScatterND made an earlier form slower than the base at batch 1, BENCHMARKS.md session 26)."""
    norm = _padded_group_norm()
    with pytest.raises(ValueError, match="at most 4 channels each"):
        norm.regroup(torch.tensor([0, 0, 0, 0, 0, 1, 2]))
    x = torch.randn(2, 7, 5, 3)
    exported = export_onnx(nn.Sequential(norm).eval(), x, tmp_path / "gn.onnx")
    assert exported.max_abs_diff <= exported.tolerance
    ops = {node.op_type for node in onnx.load(tmp_path / "gn.onnx").graph.node}
    assert not {op for op in ops if op.startswith("Scatter")} and "Gather" in ops

