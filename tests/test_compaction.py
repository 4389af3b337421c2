"""Physical compaction: masked model == compact model (eval mode), counts == hand counts from the masks.

Masks are built here independently of the pruning space: filter masks zero whole coupled channel sets
(found with torch-pruning's DependencyGraph groups), column masks zero random GEMM columns, irregular masks
random entries.
"""
from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
import torchvision
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from autocompress.analysis import output_tensors
from autocompress.compaction import ColumnConv2d, ColumnLinear, compact, densify
from autocompress.errors import FIRST_LINE, UserError, first_line
from autocompress.models import create_model

torch.set_num_threads(1)  # 2 threads on the shared 2-core machine spin-wait (~100x slower)


# ----------------------------------------------------------------------------------------- mask builders
def _ones(model):
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}


def _unsupported(group) -> bool:
    for item in group.items:
        module, node = item.dep.target.module, item.dep.target
        if node.type == tp.ops.OPTYPE.OUTPUT or not node.outputs:
            return True
        if isinstance(module, nn.Conv2d) and 1 < module.groups and not (
                module.groups == module.in_channels == module.out_channels):
            return True
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)):
            return True
    return False


def filter_masks(model, x, rate, seed=0, masks=None):
    """Zero ``rate`` of the channels of every coupled group: producer rows + biases, depthwise rows,
    BatchNorm affine, consumer input slices (what PruningSpace.param_masks produces)."""
    masks = masks if masks is not None else _ones(model)
    names = {m: n for n, m in model.named_modules()}
    gen = torch.Generator().manual_seed(seed)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    for group in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        if _unsupported(group):
            continue
        size = len(group[0].idxs)
        n_prune = min(size - 1, round(rate * size))
        if n_prune <= 0:
            continue
        pruned = set(torch.randperm(size, generator=gen)[:n_prune].tolist())
        for item in group.items:
            module = item.dep.target.module
            if module not in names or not isinstance(module, nn.Module):
                continue
            idx = torch.tensor([i for i, r in zip(item.idxs, item.root_idxs) if r in pruned], dtype=torch.long)
            if idx.numel() == 0:
                continue
            name = names[module]
            out = dg.is_out_channel_pruning_fn(item.dep.handler)
            depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
            if isinstance(module, (nn.Conv2d, nn.Linear)) and (out or depthwise):
                masks[f"{name}.weight"][idx] = False
                if module.bias is not None:
                    masks[f"{name}.bias"][idx] = False
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                masks[f"{name}.weight"][:, idx] = False
            elif isinstance(module, nn.BatchNorm2d):
                masks[f"{name}.weight"][idx] = False
                masks[f"{name}.bias"][idx] = False
    return masks


def column_masks(model, rate, seed=0, masks=None, skip=()):
    """Zero ``rate`` of the GEMM columns of every Conv2d / Linear except the names in ``skip``."""
    masks = masks if masks is not None else _ones(model)
    gen = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if type(module) not in (nn.Conv2d, nn.Linear) or name in skip:
            continue
        gemm = masks[f"{name}.weight"].reshape(module.weight.shape[0], -1)
        alive = torch.nonzero(gemm.any(0)).flatten()
        n_prune = min(alive.numel() - 1, round(rate * alive.numel()))
        gemm[:, alive[torch.randperm(alive.numel(), generator=gen)[:n_prune]]] = False
    return masks


def irregular_masks(model, rate, seed=0, masks=None):
    masks = masks if masks is not None else _ones(model)
    gen = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if type(module) in (nn.Conv2d, nn.Linear):
            masks[f"{name}.weight"] &= torch.rand(module.weight.shape, generator=gen) >= rate
    return masks


def hand_count(model, masks):
    """Parameters the compact model must have: per Conv2d / Linear, alive rows x alive GEMM columns (+ bias
    per alive row); per BatchNorm, 2 x alive channels; everything else in full."""
    total, counted = 0, set()
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if type(module) in (nn.Conv2d, nn.Linear):
            gemm = masks.get(f"{name}.weight", torch.ones_like(module.weight, dtype=torch.bool))
            gemm = gemm.reshape(module.weight.shape[0], -1)
            rows, cols = int(gemm.any(1).sum()), int(gemm.any(0).sum())
            total += rows * cols + (rows if module.bias is not None else 0)
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            total += 2 * int(masks.get(f"{name}.weight", torch.ones_like(module.weight, dtype=torch.bool)).sum())
        else:
            total += sum(p.numel() for p in params.values())
        counted.update(f"{name}.{p}" if name else p for p in params)
    return total


def run(model, masks, x, exact_count=True):
    model.eval()
    result = compact(model, masks, x)
    reference = _masked(model, masks)
    with torch.no_grad():
        refs, outs = output_tensors(reference(x)), output_tensors(result.model(x))  # every tensor of a tuple output
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape
        assert float((out - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    if exact_count:
        assert result.report["params_after"] == hand_count(model, masks)
    return result


def _masked(model, masks):
    import copy

    masked = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in masked.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return masked


def _randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics / affine so that a wrong channel mapping shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


# ------------------------------------------------------------------------------------------- own models
class Mixed(nn.Module):
    """Residual add, concatenation, depthwise conv and Conv -> Flatten -> Linear in one model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.left = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.right = nn.Sequential(nn.Conv2d(16, 8, 1, stride=2), nn.BatchNorm2d(8))
        self.dw = nn.Sequential(nn.Conv2d(20, 20, 3, padding=2, dilation=2, groups=20), nn.BatchNorm2d(20),
                                nn.ReLU6())
        self.last = nn.Sequential(nn.Conv2d(20, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(10 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(self.last(self.dw(x)))


def _mixed():
    torch.manual_seed(0)
    return _randomize_bn(Mixed()).eval(), torch.randn(2, 3, 8, 8)


def test_filter_only_own_model_removes_coupled_channels():
    model, x = _mixed()
    masks = filter_masks(model, x, 0.5)
    result = run(model, masks, x)
    m = result.model
    assert m.stem[0].out_channels == 8 and m.res[0].in_channels == 8 and m.res[3].out_channels == 8
    assert m.left.out_channels + m.right[0].out_channels == 10 == m.dw[0].groups == m.dw[1].num_features
    assert m.last[0].out_channels == 5 and m.head[1].in_features == 5 * 16
    assert not any(isinstance(mod, (ColumnConv2d, ColumnLinear)) for mod in m.modules())


def test_column_only_own_model_uses_column_layers():
    model, x = _mixed()
    masks = column_masks(model, 0.6, skip={"head.3"})
    result = run(model, masks, x)
    assert isinstance(result.model.res[0], ColumnConv2d) and isinstance(result.model.head[1], ColumnLinear)
    assert result.model.res[0].num_columns == 144 - round(0.6 * 144)
    assert result.report["column_layers"]["res.0"] == [144 - round(0.6 * 144), 144]


def test_hybrid_and_irregular_own_model():
    model, x = _mixed()
    masks = column_masks(model, 0.5, seed=1, masks=filter_masks(model, x, 0.25, seed=1), skip={"head.3"})
    run(model, masks, x)
    run(model, irregular_masks(model, 0.5, masks=masks), x, exact_count=False)
    dense = run(model, irregular_masks(model, 0.3), x, exact_count=False)
    assert dense.report["params_after"] == sum(p.numel() for p in model.parameters())


def test_zero_rows_before_an_intact_batchnorm_are_kept():
    """BN(0) is the BatchNorm's shift, not 0: such a channel is live and stays (issue 16, item 7)."""
    model, x = _mixed()
    masks = filter_masks(model, x, 0.5)
    masks["stem.1.bias"][:] = True
    result = run(model, masks, x, exact_count=False)
    assert result.model.stem[0].out_channels == 16 and result.model.res[3].out_channels == 16
    assert result.model.last[0].out_channels == 5  # other groups still lose their channels


def test_irregular_zero_row_before_batchnorm_compacts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    masks = irregular_masks(model, 0.5)
    masks["0.weight"][2] = False
    masks["0.bias"][2] = False
    result = run(model, masks, torch.randn(2, 3, 8, 8), exact_count=False)
    assert result.model[0].out_channels == 8 and result.report["removed_channels"] == {}


def test_every_channel_removed_stays_dense():
    model, x = _mixed()
    masks = _ones(model)
    for name in ("last.0.weight", "last.0.bias", "last.1.weight", "last.1.bias"):
        masks[name][:] = False
    result = run(model, masks, x, exact_count=False)
    assert result.model.last[0].out_channels == 10 and result.model.head[1].in_features == 160
    assert "last.0" in result.report["dead_channels_kept"]


def test_sigmoid_after_removed_channel_is_detected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sigmoid(), nn.Conv2d(8, 4, 3)).eval()
    masks = _ones(model)
    masks["0.weight"][:2] = False
    masks["0.bias"][:2] = False
    with pytest.raises(RuntimeError, match="from layer '2' on"):
        compact(model, masks, torch.randn(1, 3, 8, 8))


def test_a_divergence_after_a_channels_last_layer_is_named_not_a_crash():
    """The check's diagnostic indexed dimension 1 of every non-Linear output: a LayerNorm on ``[B, T, C]`` (time
    there) made it crash with "INDICES element is out of DATA bounds" and hid the real message. The kept channels
    are read in the one dimension whose size differs by their count."""
    from autocompress.compaction import _kept_channels

    output, kept = torch.randn(2, 7, 128), torch.tensor([1, 16, 28, 42, 67, 116])
    assert torch.equal(_kept_channels(output, torch.Size([2, 7, 6]), kept), output[..., kept])  # channels last
    conv = torch.randn(2, 128, 7)
    assert torch.equal(_kept_channels(conv, torch.Size([2, 6, 7]), kept), conv[:, kept])  # channels first
    assert _kept_channels(output, torch.Size([2, 5, 6]), kept) is None  # two dimensions differ: not compared
    assert _kept_channels(output, torch.Size([2, 7, 5]), kept) is None  # not the kept count


def test_groupnorm_coupled_dead_channels_are_removed_exactly():
    """With affine entries zeroed, dead channels leave (PaddedGroupNorm); without affine entries only a
    whole dead norm group leaves (its output is exactly zero), two dead channels of a group stay dense."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    masks = _ones(model)
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        masks[name][:2] = False
    masks["3.weight"][:, :2] = False
    result = run(model, masks, torch.randn(1, 3, 8, 8), exact_count=False)
    assert result.report["params_after"] == (6 * 27 + 6) + 2 * 6 + (4 * 6 * 9 + 4)
    assert result.model[0].out_channels == 6 and type(result.model[1]).__name__ == "PaddedGroupNorm"
    assert result.model[1].group.tolist() == [0, 0, 1, 1, 1, 1]
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8, affine=False), nn.ReLU(), nn.Conv2d(8, 4, 3))
    for dead, width in ((2, 8), (4, 4)):
        masks = _ones(plain)
        masks["0.weight"][:dead] = masks["0.bias"][:dead] = False
        result = run(plain, masks, torch.randn(1, 3, 8, 8), exact_count=False)
        assert result.model[0].out_channels == width
    assert isinstance(result.model[1], nn.GroupNorm) and result.model[1].num_groups == 1


def test_input_model_unchanged_and_result_in_eval():
    model, x = _mixed()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compact(model, column_masks(model, 0.5, skip={"head.3"}), x)
    assert model.training and not result.model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_densify_restores_dense_layers_with_equal_outputs():
    model, x = _mixed()
    masks = column_masks(model, 0.6, skip={"head.3"})
    compact_model = run(model, masks, x).model
    dense = densify(compact_model)
    assert not any(isinstance(mod, (ColumnConv2d, ColumnLinear)) for mod in dense.modules())
    assert isinstance(dense.res[0], nn.Conv2d) and dense.res[0].weight.shape == model.res[0].weight.shape
    kept = int((dense.res[0].weight.reshape(dense.res[0].out_channels, -1).abs().sum(0) > 0).sum())
    assert kept == compact_model.res[0].num_columns
    with torch.no_grad():
        assert torch.allclose(dense.eval()(x), compact_model.eval()(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------- zoo
ZOO = [("lenet5", 1, 28), ("fmnist_cnn", 1, 28), ("vgg11", 3, 32), ("resnet20", 3, 32), ("resnet18", 3, 32),
       ("resnet50", 3, 32)]


@pytest.mark.parametrize("name,channels,size", ZOO)
def test_zoo_hybrid(name, channels, size):
    model = _randomize_bn(create_model(name, num_classes=10)).eval()
    x = torch.randn(2, channels, size, size)
    masks = filter_masks(model, x, 0.4)
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    run(model, column_masks(model, 0.5, seed=2, masks=masks, skip={last}), x)


@pytest.mark.parametrize("name,channels,size", ZOO[:4])
def test_zoo_irregular_stays_dense(name, channels, size):
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(2, channels, size, size)
    result = run(model, irregular_masks(model, 0.5, seed=3), x, exact_count=False)
    assert not result.report["removed_channels"]


def test_grouped_conv_loses_only_channels_dead_in_every_conv_group():
    """A compact grouped conv loses the same positions from each conv group: dead channels 1 and 5 (position
    1 of both groups of g) go; channel 2 alone (dead only in group 0) stays dense, exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, groups=2),
                          nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    _randomize_bn(model)
    masks = _ones(model)
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        masks[name][[1, 2, 5]] = False
    x = torch.randn(1, 3, 8, 8)
    result = run(model, masks, x, exact_count=False)
    g = result.model[3]
    assert (result.model[0].out_channels, g.in_channels, g.groups, g.weight.shape[1]) == (6, 6, 2, 3)
    kept = [0, 2, 3, 4, 6, 7]  # original channels left; g's weight keeps positions 0, 2, 3 of each group
    assert torch.equal(g.weight, model[3].weight[:, [0, 2, 3]])
    expected = model[0].weight.detach()[kept]
    expected[1] = 0  # channel 2: masked, kept dense
    assert torch.equal(result.model[0].weight, expected)
    assert result.report["removed_channels"] == {"0": 2}


# ----------------------------------------------------------------------------------------- torchvision
TORCHVISION = [("resnet18", 64), ("resnet50", 64), ("vgg16_bn", 32), ("mobilenet_v2", 64),
               ("densenet121", 32), ("googlenet", 64), ("efficientnet_b0", 64), ("regnet_x_400mf", 64)]


@pytest.mark.parametrize("name,size", TORCHVISION)
def test_torchvision_hybrid(name, size):
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    torch.manual_seed(0)
    model = _randomize_bn(getattr(torchvision.models, name)(num_classes=10, **kwargs)).eval()
    if name == "vgg16_bn":  # a narrow classifier keeps the test fast; Flatten -> Linear coupling stays
        model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(1, 3, size, size)
    masks = filter_masks(model, x, 0.3)
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    run(model, column_masks(model, 0.5, seed=4, masks=masks, skip={last}), x)


# ------------------------------------------------------------------- through the pruning space (H3's API)
@pytest.mark.parametrize("name,channels,size", [("resnet20", 3, 32), ("vgg11", 3, 32), ("lenet5", 1, 28)])
def test_space_masks_compact_and_counts_agree(name, channels, size):
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    model = _randomize_bn(create_model(name, num_classes=10)).eval()
    x = torch.randn(2, channels, size, size)
    space = PruningSpace.build(model, x, dims=("filter", "column"))
    rates = {"filter": {g.name: 0.5 for g in space.filter_groups},
             "column": {c.name: 0.4 for c in space.column_layers}}
    masks = space.param_masks(project(space, model, rates))
    result = run(model, masks, x)
    assert result.report["params_after"] == space.count(project(space, model, rates)).params


@pytest.mark.parametrize("dims", [1, 3])
def test_column_conv_nd_equals_conv_densifies_and_exports(dims, tmp_path):
    """Conv1d / Conv3d column compaction (issue 16): exact, inverse of to_dense, ONNX matches PyTorch."""
    from autocompress.compaction import ColumnConvNd
    from autocompress.export import export_onnx

    torch.manual_seed(0)
    conv_cls = nn.Conv1d if dims == 1 else nn.Conv3d
    conv = conv_cls(6, 4, 3, stride=2, padding=1, groups=2, padding_mode="reflect" if dims == 1 else "zeros")
    area = 3 ** dims
    keep = torch.tensor([0, 1, 2 * area, 3 * area - 1])  # input channel 1 of each group has no kept column
    with torch.no_grad():
        dropped = torch.ones(3 * area, dtype=torch.bool)
        dropped[keep] = False
        conv.weight.view(4, -1)[:, dropped] = 0
    column = ColumnConvNd.from_conv(conv, keep).eval()
    x = torch.randn(2, 6, *([9] * dims))
    with torch.no_grad():
        assert torch.allclose(column(x), conv(x), atol=1e-6)
        assert torch.equal(column.to_dense().weight, conv.weight)
    assert column.weight.shape == (4, 4) and column.input_channels.tolist() == [0, 2, 3, 5]
    result = export_onnx(column, x[:1], tmp_path / "column.onnx")
    assert result.max_abs_diff <= result.tolerance


@pytest.mark.parametrize("dims", [1, 2])
def test_column_conv_nd_transposed_equals_conv_transpose(dims, tmp_path):
    """A transposed conv's GEMM view is ``weight.transpose(0, 1)`` flattened: column ``c*prod(k)+p`` is input
    channel ``c`` at kernel position ``p`` for every output channel (issue 16)."""
    from autocompress.compaction import ColumnConvNd
    from autocompress.metrics import count_macs
    from autocompress.export import export_onnx

    torch.manual_seed(0)
    conv = (nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d)(4, 3, 3, stride=2, padding=1, output_padding=1)
    area = 3 ** dims
    keep = torch.tensor([0, 2, 2 * area + 1, 4 * area - 1])  # input channel 1 has no kept column
    with torch.no_grad():
        grid = conv.weight.view(4, 3, area)
        for column in range(4 * area):
            if column not in keep.tolist():
                grid[column // area, :, column % area] = 0
    column = ColumnConvNd.from_conv(conv, keep).eval()
    x = torch.randn(2, 4, *([5] * dims))
    with torch.no_grad():
        assert torch.allclose(column(x), conv(x), atol=1e-6)
        assert torch.equal(column.to_dense().weight, conv.weight)
    assert column.input_channels.tolist() == [0, 2, 3]
    full = 2 * conv.weight.numel() * 5 ** dims  # MACs: batch x weight entries x input positions
    # the dense transposed conv over the 3 input channels that keep a column runs (their zero columns too)
    assert count_macs(column, x) == full * 3 // 4
    result = export_onnx(column, x[:1], tmp_path / "column.onnx")
    assert result.max_abs_diff <= result.tolerance


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([(1, False), (3, False), (1, True), (2, True)]), st.sampled_from([1, 2]),
       st.sampled_from(["zeros", "reflect"]), st.integers(0, 2**31 - 1))
def test_a_column_conv_nd_s_gathered_form_computes_it_and_exports_without_a_scatter(kind, groups, padding_mode,
                                                                                    seed):
    """The export form of a ColumnConvNd (a Gather of its kept input channels and a dense conv over them) is the
    same function, and its ONNX graph holds no ScatterElements: a fresh user's Conv1d model exported the stored
    columns, their int64 places and a zero weight to scatter them into (326 KB against the base's 358 KB at 4x
    fewer parameters; 142 KB gathered)."""
    import onnx

    from autocompress.columns import ColumnConvNd, GatheredConv, export_form
    from autocompress.export import onnx_bytes

    dims, transposed = kind
    groups = 1 if transposed else groups  # a ColumnConvNd takes ungrouped transposed convolutions only
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if transposed:
        conv = (nn.ConvTranspose1d, nn.ConvTranspose2d)[dims - 1](4, 6, 3, stride=2, padding=1, output_padding=1,
                                                                  groups=groups)
    else:
        conv = (nn.Conv1d, None, nn.Conv3d)[dims - 1](6, 4, 3, padding=1, groups=groups, padding_mode=padding_mode)
    columns = conv.weight.shape[0 if transposed else 1] * 3 ** dims
    keep = torch.randperm(columns, generator=gen)[:int(torch.randint(1, columns + 1, (1,), generator=gen))]
    model = nn.Sequential(ColumnConvNd.from_conv(conv, keep), nn.ReLU()).eval()
    gathered = export_form(model)
    assert isinstance(gathered[0], GatheredConv) and isinstance(model[0], ColumnConvNd)  # a copy changed
    x = torch.randn(2, conv.in_channels, *([5] * dims), generator=gen)
    with torch.no_grad():
        assert torch.allclose(gathered(x), model(x), atol=1e-5)
    graph = onnx.load_from_string(onnx_bytes(model, x[:1]))
    assert not any(node.op_type == "ScatterElements" for node in graph.graph.node)


def test_column_conv_nd_pickles_and_traces(tmp_path):
    """Like ColumnConv2d: ``torch.save(model)`` round-trips and ``torch.jit.trace`` computes the same."""
    from autocompress.compaction import ColumnConvNd

    torch.manual_seed(0)
    conv = nn.Conv1d(4, 3, 3, padding=1)
    column = ColumnConvNd.from_conv(conv, torch.tensor([0, 4, 8, 11])).eval()
    x = torch.randn(2, 4, 7)
    torch.save(column, tmp_path / "column.pt")
    loaded = torch.load(tmp_path / "column.pt", weights_only=False)
    with torch.no_grad():
        expected = column(x)
        assert torch.equal(loaded(x), expected)
        assert torch.allclose(torch.jit.trace(column, x)(x), expected)


@pytest.mark.parametrize("layer", [nn.Linear(6, 4), nn.Conv2d(3, 4, 3), nn.Conv1d(3, 4, 3)])
def test_a_float64_column_layer_turns_dense_in_float64(layer):
    """Fresh user 57: a float64 model crashed when its column layers turned dense before retraining ("Index put
    requires the source and destination dtypes match"); a Conv1d came back float32."""
    from autocompress.columns import ColumnConv2d, ColumnConvNd, ColumnLinear

    layer = layer.double()
    keep = torch.tensor([0, 2, 5])
    with torch.no_grad():
        flat = layer.weight.view(layer.weight.shape[0], -1)
        dropped = torch.ones(flat.shape[1], dtype=torch.bool)
        dropped[keep] = False
        flat[:, dropped] = 0
    kind = ColumnLinear.from_linear if isinstance(layer, nn.Linear) else \
        ColumnConv2d.from_conv if isinstance(layer, nn.Conv2d) else ColumnConvNd.from_conv
    dense = kind(layer, keep).to_dense()
    assert dense.weight.dtype == torch.float64 and torch.equal(dense.weight, layer.weight)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_norm_returning_a_view_followed_by_an_in_place_activation_loses_its_channels_with_its_conv(inplace):
    """Fresh user 68: ``InstanceNorm2d(track_running_stats=True)`` (its eval output is a view) followed by
    ``nn.ReLU(inplace=True)``; torch-pruning's graph lost the norm (the in-place op rewrote the node of its output),
    so compaction cut the conv to 44 channels, kept the norm at 64 and the forward failed. Traced out of place,
    the norm loses the same channels, its running statistics with them, and the compact model computes the masked
    one; the caller's modules stay in place."""
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=True, track_running_stats=True),
                          nn.ReLU(inplace=inplace), nn.Conv2d(16, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    model(torch.randn(4, 3, 8, 8) * 2 + 1)  # training mode: running statistics away from their 0 / 1 start
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    space = PruningSpace.build(model, (x,), dims=("filter",))
    rates = {"filter": {group.name: 0.5 for group in space.filter_groups}, "column": {}, "irregular": {}}
    masks = space.param_masks(project(space, model, rates))
    result = compact(model, masks, x)
    assert result.model[0].out_channels == result.model[1].num_features == 8
    assert result.model[1].running_mean.shape == (8,) and model[2].inplace is inplace
    with torch.no_grad():
        assert torch.allclose(result.model(x), _masked(model, masks)(x), atol=1e-5)


class _Cancelling(nn.Module):
    """Two large, nearly equal Linear heads subtracted: an output of order 1 from terms of order 1e4, so float32
    rounding, which differs once a layer sums fewer terms, is ~1e-4 of the output."""

    def __init__(self):
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(3, 64, 3, padding=1), nn.Linear(64, 4), nn.Linear(64, 4)
        with torch.no_grad():
            self.a.weight.mul_(1e4)
            self.b.weight.copy_(self.a.weight * (1 + 1e-4))
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.a(h) - self.b(h)


def test_float32_rounding_is_not_taken_for_a_compaction_error():
    """Compaction's check against the masked model falls back to float64 where float32 rounding alone exceeds
    the tolerance (deep networks at random initialisation left groups out at the start-of-run probe: torchvision's
    regnet_x_400mf lost two groups to 8e-5 against a tolerance of 2e-5); a structural error is still refused."""
    from autocompress.compaction import _output_difference

    torch.manual_seed(0)
    model, x = _Cancelling().eval(), torch.randn(2, 3, 8, 8)
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    masks["conv.weight"][1::2] = False
    masks["conv.bias"][1::2] = False
    result = compact(model, masks, x)
    assert result.model.conv.out_channels == 32 and result.report["max_abs_diff"] < 1e-9
    with torch.no_grad():
        diff, scale = _output_difference(_masked(model, masks), result.model, (x,))
    assert diff > 1e-5 * scale  # in float32 the compact model is off by more than the tolerance
    model.conv.register_forward_hook(lambda _m, _i, out: out + 1)  # f(0) != 0: removing channels changes the output
    with pytest.raises(RuntimeError, match=r"^compact model differs from the masked one by .* \(tolerance 1e-05\)"):
        compact(model, masks, x)


def test_a_long_error_line_is_cut_at_a_word():
    """``first_line`` keeps an error's first line whole up to FIRST_LINE characters and cuts a longer one at a
    space, marked with "...": fresh user 71 read a hint cut mid-word ("a channel coun)")."""
    words = " ".join(f"word{i:03d}" for i in range(60))  # 479 characters
    cut = first_line(RuntimeError(f"{words}\nsecond line"))
    assert cut.startswith("RuntimeError: word000 word001") and cut.endswith(" ...")
    kept = cut.removeprefix("RuntimeError: ").removesuffix(" ...")
    assert words.startswith(kept + " ") and len(kept) <= FIRST_LINE and len(kept) > FIRST_LINE - 8
    assert first_line(ValueError("short")) == "ValueError: short" and first_line(KeyError()) == "KeyError"


class ConvLSTM(nn.Module):
    """A CRNN: conv -> BN -> ReLU -> height pooled away -> the width as time -> a recurrent layer (``kind``: nn.LSTM,
    nn.GRU or nn.RNN) -> Linear: ``head`` ``"steps"`` on every step, ``"state"`` on the final hidden state
    (``h[-1]``, both directions' for a bidirectional layer), ``"returned"`` on every step and the final state
    (an LSTM's ``(h, c)``) returned beside it."""

    def __init__(self, channels=6, hidden=5, layers=1, bidirectional=False, batch_first=False, proj_size=0,
                 head="steps", kind=nn.LSTM):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.batch_first, self.head = batch_first, head
        extra = {"proj_size": proj_size} if kind is nn.LSTM else {}
        self.rnn = kind(channels, hidden, layers, bidirectional=bidirectional, batch_first=batch_first, **extra)
        self.fc = nn.Linear((proj_size or hidden) * (1 + bidirectional), 3)

    def forward(self, x):
        f = torch.relu(self.bn(self.conv(x))).mean(2)  # [N, C, W]
        out, state = self.rnn(f.permute(0, 2, 1) if self.batch_first else f.permute(2, 0, 1))
        h = state[0] if isinstance(state, tuple) else state
        if self.head == "state":
            return self.fc(torch.cat(list(h[-1 - self.rnn.bidirectional:]), 1))
        return (self.fc(out), state) if self.head == "returned" else self.fc(out)


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from([nn.LSTM, nn.GRU, nn.RNN]), layers=st.integers(1, 2), bidirectional=st.booleans(),
       batch_first=st.booleans(), head=st.sampled_from(["steps", "state", "returned"]), rate=st.floats(0.1, 0.8),
       seed=st.integers(0, 3))
@example(kind=nn.LSTM, layers=2, bidirectional=True, batch_first=True, head="state", rate=0.5, seed=0)
@example(kind=nn.LSTM, layers=1, bidirectional=False, batch_first=True, head="returned", rate=0.5, seed=0)
@example(kind=nn.GRU, layers=2, bidirectional=True, batch_first=False, head="state", rate=0.5, seed=1)
@example(kind=nn.RNN, layers=1, bidirectional=False, batch_first=True, head="returned", rate=0.3, seed=2)
def test_the_channels_a_recurrent_layer_reads_are_removed_from_its_input_weights(kind, layers, bidirectional,
                                                                                 batch_first, head, rate, seed):
    """Fresh user 83's CRNN: the conv feeding an nn.LSTM was never filter-pruned ("couples with LSTM rnn, which
    mixes channels"), though an LSTM's input weights ``weight_ih_l0`` (and ``_reverse``) read each channel in one
    column. Now the group holds those columns; the compact model computes the masked one, its LSTM reads the kept
    channels, and the space's parameter and MAC counts equal the compact model's own (MACs counted by the flop
    counter, the LSTM's included). A head on the final state ``h[-1]``, or ``(h, c)`` returned, left the conv out
    (fresh user 86: "cannot be followed into fc", "its channels are model outputs"). A GRU's or a plain RNN's
    input (3 and 1 gates a hidden unit) is followed the same way (fresh user 58's GRU left its producer out; an
    own torch-pruning pruner of their input side). (An LSTM with ``proj_size`` stays out: torch-pruning cannot map
    it.)"""
    from autocompress.metrics import count_macs, count_params
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    torch.manual_seed(seed)
    model = _randomize_bn(ConvLSTM(layers=layers, bidirectional=bidirectional, batch_first=batch_first, head=head,
                                   kind=kind), seed).eval()
    x = torch.randn(2, 1, 4, 7)
    space = PruningSpace.build(model, x)
    group = space.unit("filter", "conv")
    assert {s.param for s in group.slices if s.role == "input"} == \
        {"rnn.weight_ih_l0", *(["rnn.weight_ih_l0_reverse"] if bidirectional else [])}
    masks = project(space, model, {"filter": {"conv": rate}})
    kept = int(masks.filters["conv"].sum())
    result = run(model, space.param_masks(masks), x, exact_count=False)
    assert result.model.rnn.input_size == kept == result.model.conv.out_channels < 6
    counts = space.count(masks)
    assert counts.params == count_params(result.model)
    assert counts.macs == count_macs(result.model, x)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from([nn.LSTM, nn.GRU, nn.RNN]), layers=st.integers(1, 3), bidirectional=st.booleans(),
       batch_first=st.booleans(), head=st.sampled_from(["steps", "state"]), bias=st.booleans(),
       rate=st.floats(0.1, 0.9), conv_rate=st.floats(0.0, 0.6), seed=st.integers(0, 3))
@example(kind=nn.LSTM, layers=2, bidirectional=False, batch_first=True, head="state", bias=True, rate=0.5,
         conv_rate=0.3, seed=0)
@example(kind=nn.GRU, layers=2, bidirectional=True, batch_first=False, head="steps", bias=True, rate=0.5,
         conv_rate=0.3, seed=1)
@example(kind=nn.RNN, layers=3, bidirectional=False, batch_first=True, head="state", bias=False, rate=0.7,
         conv_rate=0.0, seed=2)
@example(kind=nn.LSTM, layers=2, bidirectional=True, batch_first=True, head="state", bias=True, rate=0.4,
         conv_rate=0.2, seed=3)
def test_a_recurrent_layer_loses_hidden_units_from_every_layer_exactly(kind, layers, bidirectional, batch_first, head,
                                                                        bias, rate, conv_rate, seed):
    """Beyond torch-pruning 1.6 (whose LSTM pruner handles one layer and one direction and slices the recurrent
    weights' rows by unit, not by gate; it cannot map a GRU or an RNN at all): the hidden units of an LSTM, GRU or RNN
    are a filter group of their own. A unit leaves every layer and both directions (a bidirectional layer's features
    j and hidden + j are tied): its gate rows (4, 3, 1) of each weight and bias, its column of each recurrent weight
    and of the input weights above the first layer, and the classifier's columns, whether it reads the output
    sequence or the final states of both directions. The compact model computes the masked one (a unit with zero
    rows outputs 0 from the zero initial state), keeps exactly the projected units, and the space's counts equal
    the compact model's (MACs by the flop counter)."""
    from autocompress.metrics import count_macs, count_params
    from autocompress.projection import project
    from autocompress.recurrent import GATES
    from autocompress.space import PruningSpace

    torch.manual_seed(seed)
    model = _randomize_bn(ConvLSTM(hidden=8, layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                                   head=head, kind=kind), seed).eval()
    if not bias:
        model.rnn = kind(6, 8, layers, bias=False, batch_first=batch_first, bidirectional=bidirectional)
    x = torch.randn(2, 1, 4, 7)
    space = PruningSpace.build(model, x)
    group = space.unit("filter", "rnn")
    directions = 1 + bidirectional
    assert group.size == 8 * directions and group.producers == ("rnn",) and group.consumers == ("fc",)
    assert group.classes == 8 and (not bidirectional or torch.equal(group.ties, torch.arange(16) % 8))
    assert {s.param for s in group.slices if s.role == "weight"} == \
        {f"rnn.weight_{part}_l{layer}{suffix}" for part in ("ih", "hh") for layer in range(layers)
         for suffix in ("", "_reverse")[:directions]}
    masks = project(space, model, {"filter": {"rnn": rate, "conv": conv_rate}})
    kept = int(masks.filters["rnn"].sum())
    result = run(model, space.param_masks(masks), x, exact_count=False)
    rnn = result.model.rnn
    assert rnn.hidden_size * directions == kept == result.model.fc.in_features
    assert rnn.input_size == result.model.conv.out_channels
    units = kept // directions
    assert all(getattr(rnn, f"weight_hh_l{layer}").shape == (GATES[kind] * units, units) for layer in range(layers))
    assert all(getattr(rnn, f"weight_ih_l{layer}").shape[1] == kept for layer in range(1, layers))
    counts = space.count(masks)
    assert counts.params == count_params(result.model) and counts.macs == count_macs(result.model, x)
    assert space.estimate({"filter": {"rnn": rate, "conv": conv_rate}}) == counts


class InputRNN(nn.Module):
    """A recurrent layer reading the model's input itself (``[B, T, 5]``), a head on its final state ``h[-1]``."""

    def __init__(self, kind, layers):
        super().__init__()
        self.rnn, self.head = kind(5, 8, layers, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        state = self.rnn(x)[1]
        return self.head((state[0] if isinstance(state, tuple) else state)[-1])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("layers", [1, 2])
def test_a_recurrent_layer_on_the_model_input_loses_hidden_units(kind, layers):
    """The benchmark's row classifier: an LSTM reading the model's input (which has no gradient) left its output
    without a node torch-pruning could map, and the layer (99 % of the parameters) stayed whole with no reason
    given. Its hidden units are a group whichever recurrent type, and the compact model computes the masked one.
    The group's widths are not given back in the CPU's 16-channel blocks (a 2-D weight's rows, as a Linear's)."""
    from autocompress.metrics import count_params
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    torch.manual_seed(0)
    model, x = InputRNN(kind, layers).eval(), torch.randn(2, 6, 5)
    space = PruningSpace.build(model, x)
    assert [(g.name, g.size) for g in space.filter_groups] == [("rnn", 8)]
    assert not space.sets_blocked_channels("rnn")  # its gate GEMMs are not given back in CPU blocks
    masks = project(space, model, {"filter": {"rnn": 0.5}})
    result = run(model, space.param_masks(masks), x, exact_count=False)
    assert result.model.rnn.hidden_size == 4 and space.count(masks).params == count_params(result.model)


@pytest.mark.parametrize("head", ["steps", "state", "returned"])
def test_an_lstm_with_projections_is_followed_and_keeps_its_hidden_units(head):
    """An ``nn.LSTM`` with ``proj_size`` (which torch-pruning 1.6 cannot map) reads the pruned conv's channels into
    its input weights like any LSTM, whichever output the model reads (the final ``c`` is wider than the projected
    output); its hidden units stay (its projection would have to follow them)."""
    from autocompress.metrics import count_macs, count_params
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    model, x = _randomize_bn(ConvLSTM(proj_size=3, head=head), 0).eval(), torch.randn(2, 1, 4, 7)
    space = PruningSpace.build(model, x)
    assert [g.name for g in space.filter_groups] == ["conv"] and set(space.kept_whole()) == {"rnn"}
    masks = project(space, model, {"filter": {"conv": 0.5}})
    result = run(model, space.param_masks(masks), x, exact_count=False)
    assert result.model.rnn.input_size == result.model.conv.out_channels == 3
    assert (space.count(masks).params, space.count(masks).macs) == (count_params(result.model),
                                                                      count_macs(result.model, x))
