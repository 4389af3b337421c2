"""Architecture fuzzer and regression nets for the pruning engine (issue 16).

Every net here but the attention fuzzer's (at the end: through ``prune()``, :func:`one_round`, whose space splits
``nn.MultiheadAttention`` and finds heads) goes through the engine's one-shot path, driven directly:
``PruningSpace.build`` -> ``check_dims`` -> ``projection.project`` -> ``purification.purify`` (unused path
removal only, no validation data) -> ``compaction.compact``, in four modes (filter 0.5, column 0.5, hybrid
0.5, irregular 0.7) with a batch-1 and a batch-2 example. The outcome must be either a clean refusal (a one-line
``UserError`` naming a module or the model) or a compact model for which every invariant holds:

* eval output equals the model masked at the *requested* rates (before purification), on the example, a
  random batch and a second input size (tolerance ``1e-5 * max(1, max|output|)``);
* it runs (forward and backward) in train mode with a batch of two;
* its dense parameter count and MACs are what ``PruningSpace.count`` reports for the final masks, and each
  filter group's root layer has exactly the kept number of output channels;
* every parameter keeps the input model's ``requires_grad``; the model rebuilt from its architecture
  description and state dict (what loading a saved compact model does) computes the same;
* the input model is unchanged (parameters, buffers, train flags, ``requires_grad``).

The fuzzer (hypothesis) composes random small nets from the blocks below. Its budget is
``AUTOCOMPRESS_FUZZ_EXAMPLES`` generated nets (default 6, about a minute on two cores); set it higher for
own runs, e.g. ``AUTOCOMPRESS_FUZZ_EXAMPLES=200``.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.convnext import LayerNorm2d

from autocompress import compaction, projection, prune, purification
from autocompress.admm import ADMMConfig
from autocompress.errors import UserError
from autocompress.masks import Masks, apply_masks
from autocompress.architecture import apply_architecture, describe_architecture
from autocompress.metrics import count_macs, count_nonzero_params, count_params
from autocompress.training import TrainConfig
from autocompress.space import (ChannelMappingExplodes, PruningSpace, ignored_modules, is_weight_layer, keep_count,
                               out_dim, trace_graph)

torch.set_num_threads(1)

MODES = {"filter": (("filter",), 0.5), "column": (("column",), 0.5), "hybrid": (("filter", "column"), 0.5),
         "irregular": (("irregular",), 0.7)}
FUZZ_EXAMPLES = int(os.environ.get("AUTOCOMPRESS_FUZZ_EXAMPLES", "6"))


# ------------------------------------------------------------------------------------------------ harness
def _snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "training": [m.training for m in model.modules()],
            "grad": [p.requires_grad for p in model.parameters()]}


def _unchanged(model: nn.Module, snap: dict) -> bool:
    state = model.state_dict()
    return (state.keys() == snap["state"].keys()
            and all(torch.equal(state[k], v) for k, v in snap["state"].items())
            and [m.training for m in model.modules()] == snap["training"]
            and [p.requires_grad for p in model.parameters()] == snap["grad"])


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, tuple) else out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


def _out_channels(module: nn.Module) -> int:
    return module.out_features if hasattr(module, "out_features") else module.out_channels


def _names_a_module(message: str, model: nn.Module) -> bool:
    return type(model).__name__ in message or any(name and name in message for name, _ in model.named_modules())


def oneshot(model: nn.Module, example: torch.Tensor, mode: str, *, second: torch.Tensor | None = None,
            refusals: list[str] | None = None, ignored: tuple[str, ...] = ()):
    """Run the one-shot path in ``mode`` and check every invariant (module docstring); the ``ignored`` modules
    (``ignored_layers``) keep their output channels and every weight.

    Returns ``None`` when the engine refused cleanly (the refusal is checked and appended to ``refusals``),
    else the compact model.
    """
    dims, rate = MODES[mode]
    model.eval()
    snap = _snapshot(model)
    try:
        space = PruningSpace.build(model, example, dims=tuple(dict.fromkeys(("filter",) + dims)),
                                   ignored_layers=ignored)
        space.check_dims(dims)
        rates = {kind: {u.name: rate for u in space.units(kind)} for kind in dims}
        masks = projection.project(space, model, rates)
        masked = copy.deepcopy(model)
        apply_masks(masked, space.param_masks(masks))
        work = copy.deepcopy(model)
        final = purification.purify(work, space, masks, example_inputs=example).masks
        result = compaction.compact(work, space.param_masks(final), example)
    except UserError as exc:
        message = str(exc)
        assert "\n" not in message and _names_a_module(message, model), message
        assert _unchanged(model, snap)
        if refusals is not None:
            refusals.append(message)
        return None
    assert _unchanged(model, snap), "the input model changed"
    compact = result.model
    batches = [example, torch.randn(example.shape, generator=torch.Generator().manual_seed(1))]
    if second is not None:
        batches.append(second)
    for x in batches:
        assert _close(_outputs(compact, x), _outputs(masked, x)), f"{mode}: compact != masked at {tuple(x.shape)}"
    compact.train()
    out = compact(torch.randn(2, *example.shape[1:]))
    sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    compact.eval()
    counts = space.count(final)
    if "irregular" in dims:  # whole rows / columns that irregular pruning empties are removed as well
        dense = space.count(type(final)(filters=final.filters, columns=final.columns, weights={}))
        assert count_params(compact) <= dense.params and count_macs(compact, example) <= counts.macs
        assert count_nonzero_params(compact) == count_nonzero_params(work), f"{mode}: non-zero weights differ"
    else:
        assert count_params(compact) == counts.params, f"{mode}: parameters differ from the space's count"
        assert count_macs(compact, example) == counts.macs, f"{mode}: MACs differ from the space's count"
    modules = dict(compact.named_modules())
    for name in ignored_modules(model, ignored):
        module = model.get_submodule(name)
        if is_weight_layer(module):
            assert _out_channels(modules[name]) == _out_channels(module), f"ignored {name} lost channels"
            weight = work.get_submodule(name).weight.movedim(out_dim(module), 0)
            assert bool(weight.ne(0).flatten(1).any(1).all()), f"ignored {name} lost filters"
            assert name not in [u.name for kind in dims for u in space.units(kind)]
    for group in space.filter_groups:
        assert _out_channels(modules[group.name]) == int(final.filters[group.name].sum()), group.name
        if "filter" in dims:
            assert int(masks.filters[group.name].sum()) == group.keep(rate)
    rebuilt = apply_architecture(copy.deepcopy(model), result.architecture)  # what loading a saved model does
    rebuilt.load_state_dict(compact.state_dict())
    assert _close(_outputs(rebuilt, example), _outputs(compact, example)), f"{mode}: rebuilt != compact"
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.requires_grad == flags[n] for n, p in compact.named_parameters() if n in flags)
    return compact


def check_all_modes(model_fn, shape, second_shape=None, expect_pass=(), ignored: tuple[str, ...] = ()):
    """:func:`oneshot` in every mode with a batch-1 and a batch-2 example (``ignored``: its ``ignored_layers``);
    modes in ``expect_pass`` must not be refused."""
    for mode in MODES:
        for batch in (1, 2):
            torch.manual_seed(0)
            model = model_fn()
            x = torch.randn(batch, *shape)
            second = torch.randn(batch, *second_shape) if second_shape else None
            compact = oneshot(model, x, mode, second=second, ignored=ignored)
            assert compact is not None or mode not in expect_pass, f"{mode} refused at batch {batch}"


# ------------------------------------------------------------------------------------------------- blocks
class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.b(F.relu(self.bn(self.a(x))))


class Concat(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, 4, 3, padding=1), nn.Conv2d(c, 6, 1)
        self.out = 10

    def forward(self, x):
        return F.relu(torch.cat([self.a(x), self.b(x)], 1))


class ConcatResidual(nn.Module):
    """Two branches of unequal widths concatenated, normalised and added to the stream they read (fresh user 70's
    block): each branch produces a part of the stream's channels."""

    def __init__(self, c):
        super().__init__()
        first = max(1, c // 3)
        self.a, self.b, self.bn = nn.Conv2d(c, first, 1), nn.Conv2d(c, c - first, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn(torch.cat([self.a(x), self.b(x)], 1))


class Ghost(nn.Module):
    """A ghost module (GhostNet) added to the stream it reads: a 1x1 layer's output concatenated with a depthwise
    convolution of it, cut to the stream's width (an odd width drops the last depthwise channel)."""

    def __init__(self, c):
        super().__init__()
        half = (c + 1) // 2
        self.primary, self.bn = nn.Conv2d(c, half, 1), nn.BatchNorm2d(half)
        self.cheap = nn.Conv2d(half, half, 3, padding=1, groups=half)
        self.width = c

    def forward(self, x):
        a = F.relu(self.bn(self.primary(x)))
        return x + torch.cat([a, self.cheap(a)], 1)[:, :self.width]


class Gated(nn.Module):
    """A GLU gate: one convolution's output chunked into halves, one gating the other (their sizes fixed by
    ``chunk``)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, 1)
        return a * torch.sigmoid(b)


class UnevenSplit(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.first = max(1, c // 3)
        self.a, self.b = nn.Conv2d(self.first, 4, 3, padding=1), nn.Conv2d(c - self.first, 4, 1)
        self.out = 8

    def forward(self, x):
        left, right = torch.split(x, [self.first, x.shape[1] - self.first], 1)
        return F.relu(torch.cat([self.a(left), self.b(right)], 1))


class Separable(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw, self.bn, self.pw = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.Conv2d(c, 8, 1)
        self.out = 8

    def forward(self, x):
        return F.relu(self.pw(F.relu(self.bn(self.dw(x)))))


class Grouped(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pre, self.g = nn.Conv2d(c, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.out = 8

    def forward(self, x):
        return F.relu(self.g(F.relu(self.pre(x))))


class GroupedBottleneck(nn.Module):
    """ResNeXt style: 1x1 -> BN -> grouped 3x3 (4 conv groups, 8 -> 12) -> BN -> 1x1 back, residual add."""

    def __init__(self, c):
        super().__init__()
        self.a, self.bn1 = nn.Conv2d(c, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.g, self.bn2 = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, c, 1)

    def forward(self, x):
        return x + self.b(F.relu(self.bn2(self.g(F.relu(self.bn1(self.a(x)))))))


class GroupedChain(nn.Module):
    """Grouped conv (2 conv groups) straight into another (4 conv groups): the ties of both combine."""

    def __init__(self, c):
        super().__init__()
        self.pre, self.g2, self.g4 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(
            8, 8, 1, groups=4)
        self.out = 8

    def forward(self, x):
        return F.relu(self.g4(F.relu(self.g2(F.relu(self.pre(x))))))


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(c, 8, 3, padding=1), nn.Linear(8, 4), nn.Linear(4, 8)
        self.out = 8

    def forward(self, x):
        x = F.relu(self.conv(x))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * gate[:, :, None, None]


class SpatialGate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn, self.gate = nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 1, 1)
        self.out = 8

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return x * torch.sigmoid(self.gate(x))


class PerChannelParam(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 8, 3, padding=1)
        self.scale, self.shift = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8) * 0.1)
        self.out = 8

    def forward(self, x):
        return F.relu(self.conv(x) * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1))


class ChannelNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 8, 3, padding=1)
        self.out = 8

    def forward(self, x):
        return F.normalize(self.conv(x), dim=1)


class ChannelsLastLN(nn.Module):
    """ConvNeXt-style: depthwise conv, permute, LayerNorm, Linear, GELU, Linear, layer scale, residual."""

    def __init__(self, c):
        super().__init__()
        self.dw, self.ln = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.LayerNorm(c)
        self.pw1, self.pw2, self.gamma = nn.Linear(c, 2 * c), nn.Linear(2 * c, c), nn.Parameter(torch.full((c,), .5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.ln(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ChannelsFirstLN(nn.Module):
    """torchvision's LayerNorm2d (ConvNeXt's channels-first LayerNorm before downsampling), then a conv."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.conv = LayerNorm2d(c), nn.Conv2d(c, 8, 3, padding=1)
        self.out = 8

    def forward(self, x):
        return self.conv(self.norm(x))


class GroupNormResidual(nn.Module):
    """A ResNet-GN style block: grouped conv -> GroupNorm without affine (4 groups) -> conv -> GroupNorm
    (2 groups, affine) -> residual add."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(c, 8, 3, padding=1, groups=2), nn.GroupNorm(4, 8, affine=False)
        self.conv2, self.gn2 = nn.Conv2d(8, c, 3, padding=1), nn.GroupNorm(2, c)
        with torch.no_grad():
            self.gn2.weight.uniform_(0.5, 1.5)
            self.gn2.bias.normal_(0, 0.5)

    def forward(self, x):
        return F.relu(x + self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x))))))


class UpDown(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.up, self.bn, self.down = nn.ConvTranspose2d(c, 6, 2, 2), nn.BatchNorm2d(6), nn.Conv2d(6, 8, 3, 2, 1)
        self.out = 8

    def forward(self, x):
        return F.relu(self.down(F.relu(self.bn(self.up(x)))))


class LinearToMap(nn.Module):
    """Pool -> Linear -> viewed as a 4x4 feature map -> transposed conv (a generator's first layers: the Linear loses
    whole channels of the map; a count written into the view is refused by check_compactable, as for any layer)."""

    def __init__(self, c):
        super().__init__()
        self.fc, self.up = nn.Linear(c, 6 * 16), nn.ConvTranspose2d(6, 8, 2, 2)
        self.out = 8

    def forward(self, x):
        x = F.relu(self.fc(x.mean((2, 3)))).view(x.shape[0], -1, 4, 4)
        return F.relu(self.up(x))


class Interpolate(nn.Module):
    """A strided branch brought back to the input's size (``size=`` another tensor's) and added."""

    def __init__(self, c):
        super().__init__()
        self.down, self.up = nn.Conv2d(c, c, 3, 2, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = F.interpolate(F.relu(self.down(x)), size=x.shape[-2:], mode="nearest")
        return x + self.up(y)


class CalledTwice(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(F.relu(self.conv(x))))


class TokenMixer(nn.Module):
    """Pixels as tokens through a LayerNorm and a Linear, residual; the forward writes the width, stored as an int
    attribute, into its reshapes (torchvision's ``VisionTransformer.hidden_dim``)."""

    def __init__(self, c):
        super().__init__()
        self.width = c
        self.proj, self.norm, self.fc = nn.Conv2d(c, c, 1), nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x):
        n, _, h, w = x.shape
        tokens = self.proj(x).reshape(n, self.width, h * w).transpose(1, 2)
        tokens = tokens + self.fc(self.norm(tokens))
        return tokens.transpose(1, 2).reshape(n, self.width, h, w)


class AuxHead(nn.Module):
    """A train-only auxiliary classifier (inception style): its logits are stored, the input passes on."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(c, 4, 1), nn.Linear(4, 3)
        self.logits = None

    def forward(self, x):
        self.logits = self.fc(F.relu(self.conv(x)).mean((2, 3))) if self.training else None
        return x


BLOCKS = [Residual, Concat, ConcatResidual, Ghost, Gated, UnevenSplit, Separable, Grouped, GroupedBottleneck,
          GroupedChain, SqueezeExcite, SpatialGate, PerChannelParam, ChannelNorm, ChannelsLastLN, ChannelsFirstLN,
          GroupNormResidual, UpDown, LinearToMap, Interpolate, CalledTwice, AuxHead, TokenMixer]


class Net(nn.Module):
    """stem conv -> blocks -> global average pool -> Linear(., 3); in train mode also every auxiliary
    head's logits (a tuple)."""

    def __init__(self, blocks, frozen=(), width=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        layers, c = [], width
        for block in blocks:
            layer = block(c)
            layers.append(layer)
            c = getattr(layer, "out", c)
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(c, 3)
        for index in frozen:
            target = self.stem if index < 0 else self.blocks[index % len(layers)]
            for p in target.parameters():
                p.requires_grad_(False)
        for m in self.modules():  # non-trivial statistics, so a wrong channel mapping shows in the outputs
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        out = self.head(self.blocks(self.stem(x)).mean((2, 3)))
        aux = [b.logits for b in self.blocks if isinstance(b, AuxHead) and b.logits is not None]
        return (out, *aux) if self.training and aux else out


# -------------------------------------------------------------------------------------------------- fuzzer
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=3),
       frozen=st.lists(st.integers(-1, 2), max_size=1), seed=st.integers(0, 2 ** 16))
def test_fuzzed_architectures_are_pruned_exactly_or_refused(blocks, frozen, seed):
    torch.manual_seed(seed)
    check_all_modes(lambda: Net(blocks, frozen), (3, 8, 8), (3, 12, 12))


@settings(max_examples=max(FUZZ_EXAMPLES, 10), deadline=None, suppress_health_check=list(HealthCheck))
@given(blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=3), seed=st.integers(0, 2 ** 16),
       data=st.data())
def test_ignored_layers_keep_their_channels_and_weights_and_the_rest_is_pruned_exactly(blocks, seed, data):
    torch.manual_seed(seed)
    model = Net(blocks)
    layers = [name for name, module in model.named_modules() if is_weight_layer(module)]
    ignored = tuple(data.draw(st.lists(st.sampled_from(layers), min_size=1, max_size=3, unique=True)))
    for mode in ("filter", "hybrid"):
        oneshot(copy.deepcopy(model), torch.randn(2, 3, 8, 8), mode, ignored=ignored)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
def test_every_block_alone(block):
    """Each block once (the fuzzer draws them at random); filter and column modes are never refused."""
    check_all_modes(lambda: Net([block]), (3, 8, 8), (3, 12, 12), expect_pass=("column", "irregular"))


# ------------------------------------------------------------------------ regression nets (issue 16, 1-7)
class Sequence(nn.Module):
    """``Net`` without the stem: blocks on the raw input."""

    def __init__(self, *layers, head_in):
        super().__init__()
        self.layers, self.head = nn.Sequential(*layers), nn.Linear(head_in, 3)

    def forward(self, x):
        return self.head(self.layers(x).flatten(2).mean(2))


class LinearFirst(nn.Module):
    """Linear -> reshape to a feature map -> transposed conv -> conv (batch-1 crash, item 1)."""

    def __init__(self):
        super().__init__()
        self.fc, self.up, self.conv, self.head = nn.Linear(8, 16 * 16), nn.ConvTranspose2d(16, 8, 2, 2), \
            nn.Conv2d(8, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.fc(x)).view(x.shape[0], -1, 4, 4)
        return self.head(F.relu(self.conv(F.relu(self.up(x)))).mean((2, 3)))


class NormThenScale(nn.Module):
    """Channel normalisation, then a per-channel parameter applied functionally (item 1)."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 3)
        self.w = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        x = F.normalize(self.conv(x), dim=1) * self.w.view(1, -1, 1, 1)
        return self.head(F.relu(self.conv2(x)).mean((2, 3)))


class Shuffle(nn.Module):
    """Channel shuffle between two convs (item 4): torch-pruning maps it wrongly; the probe must see it."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.conv(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(F.relu(self.conv2(x)).mean((2, 3)))


ALL = tuple(MODES)


def test_linear_reshaped_for_a_transposed_conv_at_batch_one():
    check_all_modes(LinearFirst, (8,), expect_pass=ALL)
    space = PruningSpace.build(LinearFirst().eval(), torch.randn(1, 8), dims=("filter",))
    assert [(g.name, g.size, g.classes) for g in space.filter_groups] == [("fc", 256, 16), ("up", 8, 8),
                                                                          ("conv", 4, 4)]
    # 16 of its outputs form one channel of up: they leave together (until session 53: left out, "unevenly")


def test_per_channel_parameter_after_channel_normalisation_at_batch_one():
    check_all_modes(NormThenScale, (3, 8, 8), (3, 12, 12), expect_pass=ALL)
    space = PruningSpace.build(NormThenScale().eval(), torch.randn(1, 3, 8, 8), dims=("filter",))
    assert ("w", "norm") in [(s.param, s.role) for s in space.unit("filter", "conv").slices]


def test_spatial_gate_does_not_couple_its_channel_with_the_features():
    check_all_modes(lambda: Net([SpatialGate]), (3, 8, 8), (3, 12, 12), expect_pass=ALL)
    space = PruningSpace.build(Net([SpatialGate]).eval(), torch.randn(1, 3, 8, 8), dims=("filter",))
    group = space.unit("filter", "blocks.0.conv")
    assert "blocks.0.gate" in group.consumers and "blocks.0.gate" not in group.producers


@pytest.mark.parametrize("frozen", [(-1,), (0,)])
def test_frozen_layers_are_pruned_and_stay_frozen(frozen):
    check_all_modes(lambda: Net([Residual, Concat], frozen), (3, 8, 8), (3, 12, 12), expect_pass=ALL)
    model = Net([Residual, Concat], frozen).eval()
    x = torch.randn(1, 3, 8, 8)
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    for mode in ("filter", "column"):
        compact = oneshot(model, x, mode)
        assert frozen_names and frozen_names == {n for n, p in compact.named_parameters() if not p.requires_grad}
        if mode == "filter":  # the frozen layers lose their channels (stem 6 -> 3; residual stream coupled)
            assert compact.stem[0].out_channels == 3 and compact.blocks[0].b.out_channels == 3


def test_grouped_convolutions_are_filter_pruned_per_conv_group():
    """Grouped (non-depthwise) convs take part in filter groups; the ties of chained grouped convs combine
    (g2: position c % 4; g4: c % 2 of g2's outputs), and the compact convs keep their conv groups."""
    model, x = Net([GroupedChain]).eval(), torch.randn(1, 3, 8, 8)
    space = PruningSpace.build(model, x, dims=("filter",))
    assert list(space.excluded) == ["head"]
    assert space.unit("filter", "blocks.0.pre").ties.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert space.unit("filter", "blocks.0.g2").ties.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    compact = oneshot(model, x, "filter")
    g2, g4 = compact.blocks[0].g2, compact.blocks[0].g4
    assert (g2.in_channels, g2.out_channels, g2.groups, g4.in_channels, g4.out_channels, g4.groups) == (
        4, 4, 2, 4, 4, 4)
    check_all_modes(lambda: Net([GroupedBottleneck, Grouped]), (3, 8, 8), (3, 12, 12), expect_pass=ALL)


def test_channel_shuffle_is_excluded_not_miscompacted():
    check_all_modes(Shuffle, (3, 8, 8), (3, 12, 12), expect_pass=ALL)
    space = PruningSpace.build(Shuffle().eval(), torch.randn(1, 3, 8, 8), dims=("filter",))
    assert "could not be verified" in space.excluded["conv"]


def test_layernorm_coupled_channels_are_pruned_exactly():
    """Channels a LayerNorm normalises (channels-last and torchvision's channels-first LayerNorm2d) are
    pruned; the compact LayerNorm keeps the masked model's statistics over all channels (PaddedLayerNorm)."""
    check_all_modes(lambda: Net([ChannelsLastLN, ChannelsFirstLN]), (3, 8, 8), (3, 12, 12), expect_pass=ALL)
    model, x = Net([ChannelsLastLN, ChannelsFirstLN]).eval(), torch.randn(1, 3, 8, 8)
    space = PruningSpace.build(model, x, dims=("filter",))
    stream = space.unit("filter", "stem.0")
    assert {"blocks.0.ln", "blocks.1.norm"} <= {s.module for s in stream.slices if s.role == "norm"}
    compact = oneshot(model, x, "filter")
    ln, norm = compact.blocks[0].ln, compact.blocks[1].norm
    assert type(ln).__name__ == type(norm).__name__ == "PaddedLayerNorm"
    assert (ln.num_features, ln.width, ln.dim, norm.num_features, norm.width, norm.dim) == (3, 6, -1, 3, 6, 1)
    # layer_norm: kept -- each stays its own class over the 3 kept channels; compact() checks the function
    # against the masked model whose two LayerNorms normalise over their kept channels (else it raises)
    masks = space.param_masks(projection.project(space, model, {"filter": {"stem.0": 0.5}}))
    result = compaction.compact(model, masks, x, layer_norm="kept")
    ln, norm = result.model.blocks[0].ln, result.model.blocks[1].norm
    assert type(ln) is nn.LayerNorm and type(norm) is LayerNorm2d
    assert ln.normalized_shape == norm.normalized_shape == (3,)
    assert result.report["layer_norms_over_kept"] == ["blocks.0.ln", "blocks.1.norm"]
    rebuilt = apply_architecture(copy.deepcopy(model), describe_architecture(result.model, reference=model))
    rebuilt.load_state_dict(result.model.state_dict())
    assert rebuilt.blocks[1].norm.normalized_shape == (3,)
    assert torch.equal(rebuilt.eval()(x), result.model(x))


def test_groupnorm_coupled_channels_are_pruned_exactly():
    """Channels a GroupNorm normalises are pruned: with affine parameters channel by channel (the compact
    norm is a PaddedGroupNorm keeping each group's statistics over its original channels), without them
    whole norm groups (tied, also with a grouped conv's ties); the compact model prunes again in a later
    round (torch-pruning's handler for PaddedGroupNorm)."""
    model, x = Net([GroupNormResidual]).eval(), torch.randn(1, 3, 8, 8)
    space = PruningSpace.build(model, x, dims=("filter",))
    assert list(space.excluded) == ["head"]
    assert space.unit("filter", "blocks.0.conv1").ties.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    stream = space.unit("filter", "stem.0")
    assert "blocks.0.gn2" in {s.module for s in stream.slices if s.role == "norm"}
    compact = oneshot(model, x, "filter")
    gn1, gn2 = compact.blocks[0].gn1, compact.blocks[0].gn2
    assert type(gn1) is nn.GroupNorm and (gn1.num_groups, gn1.num_channels) == (2, 4)
    # the stream's 6 channels: 3 classes (conv1's conv groups), 1 kept, in both norm groups of 3
    assert type(gn2).__name__ == "PaddedGroupNorm" and (gn2.num_features, gn2.group_size) == (2, 3)
    assert gn2.group.tolist() == [0, 1]
    one = lambda: Sequence(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(1, 8), nn.ReLU(),  # noqa: E731
                           nn.Conv2d(8, 6, 3, padding=1), nn.GroupNorm(6, 6, affine=False), nn.ReLU(), head_in=6)
    check_all_modes(one, (3, 8, 8), (3, 12, 12), expect_pass=ALL)
    compact = oneshot(one().eval(), x, "filter")
    assert compact.layers[4].num_channels == 3 and compact.layers[1].num_features == 4
    again = oneshot(compact, x, "filter")  # round 2 prunes the PaddedGroupNorm: 4 -> 2 of 8
    assert (again.layers[1].num_features, again.layers[1].group_size, again.layers[4].num_channels) == (2, 8, 1)


def test_groupnorm_without_affine_in_one_group_is_excluded_by_name():
    model = Sequence(nn.Conv2d(3, 8, 1), nn.GroupNorm(1, 8, affine=False), nn.Conv2d(8, 4, 1), head_in=4).eval()
    space = PruningSpace.build(model, torch.randn(1, 3, 8, 8), dims=("filter",))
    assert "GroupNorm layers.1 without affine parameters ties all channels together" in space.excluded["layers.0"]


def test_layernorm_without_affine_or_channel_dimension_is_excluded_by_name():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.ln = nn.Conv2d(3, 8, 1), nn.LayerNorm(8, elementwise_affine=False)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.ln(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))

    space = PruningSpace.build(Plain().eval(), torch.randn(1, 3, 8, 8), dims=("filter",))
    assert "LayerNorm ln has no affine weight" in space.excluded["conv"]
    square = Net([ChannelsFirstLN], width=8).eval()  # [N, 8, 8, 8]: which dimension holds the channels?
    space = PruningSpace.build(square, torch.randn(1, 3, 8, 8), dims=("filter",))
    assert "LayerNorm2d blocks.0.norm has no dimension" in space.excluded["stem.0"]
    assert oneshot(square, torch.randn(1, 3, 8, 8), "filter") is not None


def test_train_only_auxiliary_head_loses_its_input_channels_too():
    check_all_modes(lambda: Net([Residual, AuxHead, Concat]), (3, 8, 8), (3, 12, 12), expect_pass=ALL)
    model = Net([Residual, AuxHead, Concat]).eval()
    compact = oneshot(model, torch.randn(1, 3, 8, 8), "filter")
    assert compact.blocks[1].conv.in_channels == compact.stem[0].out_channels == 3
    compact.train()
    assert len(compact(torch.randn(2, 3, 8, 8))) == 2


def test_conv1d_conv3d_and_transposed_convs_are_pruned_like_conv2d():
    conv1d = lambda: Sequence(nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),  # noqa: E731
                              nn.Conv1d(8, 6, 3, padding=1, padding_mode="reflect"), nn.ReLU(), head_in=6)
    conv3d = lambda: Sequence(nn.Conv3d(1, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(),  # noqa: E731
                              nn.Conv3d(6, 8, 3, padding="same"), nn.ReLU(), nn.ConvTranspose3d(8, 4, 2, 2),
                              nn.ReLU(), nn.Conv3d(4, 4, 1), head_in=4)
    check_all_modes(conv1d, (2, 16), (2, 20), expect_pass=ALL)
    check_all_modes(conv3d, (1, 4, 4, 4), (1, 6, 6, 6), expect_pass=ALL)
    x = torch.randn(1, 1, 4, 4, 4)
    space = PruningSpace.build(conv3d().eval(), x, dims=("filter", "column"))
    assert [g.name for g in space.filter_groups] == ["layers.0", "layers.3", "layers.5", "layers.7"]
    assert [c.name for c in space.column_layers] == ["layers.0", "layers.3", "layers.5", "layers.7", "head"]
    assert space.unit("column", "layers.5").transposed and space.unit("column", "layers.5").size == 8 * 8
    compact = oneshot(conv3d(), x, "hybrid")
    assert type(compact.layers[3]).__name__ == "ColumnConvNd" and compact.layers[5].in_channels == 4
    assert compact.layers[5].transposed and compact.layers[5].num_columns == 4 * 8 - round(0.5 * 4 * 8)
    compact = oneshot(conv1d(), torch.randn(1, 2, 16), "column")
    assert type(compact.layers[3]).__name__ == "ColumnConvNd"


def test_untraceable_model_refuses_filters_and_prunes_columns():
    """torchvision's ShuffleNetV2: torch-pruning cannot trace it (ZeroDivisionError), so filter pruning is
    refused before any work, naming the model; column and irregular pruning work (issue 16, item 4)."""
    import torchvision

    torch.manual_seed(0)
    model, x = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    assert oneshot(model, x, "filter") is None
    space = PruningSpace.build(model, x, dims=("filter", "column"))
    with pytest.raises(UserError, match=r"cannot trace ShuffleNetV2.*an index gather, x\[:, perm\], it traces.*"
                                        r"drop filter from dims"):
        space.check_dims(["filter"])
    assert oneshot(model, x, "column") is not None and oneshot(model, x, "irregular") is not None


class TiedWide(nn.Module):
    """16 channels into a grouped conv of 2 conv groups (8 tie classes of 2), then a GroupNorm."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
        self.g, self.gn = nn.Conv2d(16, 8, 3, padding=1, groups=2), nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.relu(self.gn(self.g(F.relu(self.bn(self.a(x)))))).mean((2, 3)))


@pytest.mark.parametrize("dead", [[0, 1, 2], [0, 1, 2, 3, 4, 5, 6]])
def test_channel_multiple_with_grouped_conv_ties_keeps_whole_classes(dead):
    """channel_multiple 4 with ties of 2 channels: the projection, purification (redundant weight removal
    at a high threshold) and compaction of tie classes that emptied (3 or 7 of 8: 10 or 2 channels left,
    aligned up to 12 or 4 by keeping whole dead classes) all leave whole classes and widths that are a
    multiple of 4; the compact model equals the masked model."""
    torch.manual_seed(0)
    model, x = TiedWide().eval(), torch.randn(1, 3, 8, 8)
    space = PruningSpace.build(model, x, dims=("filter",), channel_multiple=4)
    group = space.unit("filter", "a")
    assert group.ties.tolist() == list(range(8)) * 2
    masks = projection.project(space, model, {"filter": {"a": 0.7, "g": 0.5}})
    work = copy.deepcopy(model)
    apply_masks(work, space.param_masks(masks))
    purified = purification.redundant_candidates(space, work, masks, threshold=0.9)
    final = purification.remove_unused_paths(space, purified)
    for name, keep in final.filters.items():
        assert int(keep.sum()) % 4 == 0 and torch.equal(space.unit("filter", name).tie(keep), keep), name
    hybrid = PruningSpace.build(model, x, dims=("filter", "column"), channel_multiple=4)
    keep = hybrid.full_masks()
    keep.filters["a"][[6, 7, 14, 15]] = False  # 6 classes kept; g's columns stop reading 3 of them
    columns = keep.columns["g"].view(8, 9)
    columns[[1, 2, 3]] = False
    unused = purification.remove_unused_paths(hybrid, keep).filters["a"]
    assert int(unused.sum()) == 8 and torch.equal(hybrid.unit("filter", "a").tie(unused), unused)
    masked = copy.deepcopy(model)
    apply_masks(masked, space.param_masks(final))
    compact = compaction.compact(model, space.param_masks(final), x, channel_multiple=4).model
    assert compact.a.out_channels == int(final.filters["a"].sum())
    assert _close(_outputs(compact, x), _outputs(masked, x))
    rows = torch.ones(16, dtype=torch.bool)  # irregular pruning emptied the rows of whole tie classes
    rows[dead + [d + 8 for d in dead]] = False
    weights = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for name in ("a.weight", "a.bias", "bn.weight", "bn.bias"):
        weights[name] = rows.view(-1, *[1] * (weights[name].dim() - 1)).expand_as(weights[name]).clone()
    result = compaction.compact(model, weights, x, channel_multiple=4)
    width = result.model.a.out_channels
    assert width == {3: 12, 7: 4}[len(dead)] and result.model.g.in_channels == width
    masked = copy.deepcopy(model)
    apply_masks(masked, weights)
    assert _close(_outputs(result.model, x), _outputs(masked, x))


class TiedBy(nn.Module):
    """``width`` channels into a grouped 1x1 conv of ``groups`` conv groups (tie classes of ``groups`` channels)."""

    def __init__(self, width: int, groups: int):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.g, self.fc = nn.Conv2d(width, 2 * groups, 1, groups=groups), nn.Linear(2 * groups, 3)

    def forward(self, x):
        return self.fc(F.relu(self.g(F.relu(self.bn(self.a(x))))).mean((2, 3)))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups=st.sampled_from([2, 3, 4]), per_group=st.integers(2, 6), multiple=st.sampled_from([1, 2, 4, 8]))
def test_allowed_widths_of_a_tied_group_are_the_widths_compaction_realises(groups, per_group, multiple):
    """A group tied by a grouped conv: its allowed widths (what the start-of-run probe narrows to) are exactly the
    widths the projection keeps at some rate, each a whole number of tie classes, and compaction removes the
    channels down to each of them (at a width that is not, it removed none and the probe saw nothing)."""
    torch.manual_seed(groups * 10 + per_group)
    model, x = TiedBy(groups * per_group, groups).eval(), torch.randn(1, 3, 6, 6)
    space = PruningSpace.build(model, x, dims=("filter",), channel_multiple=multiple)
    group = space.unit("filter", "a")
    widths = space.widths(group)
    rates = [i / 200 for i in range(201)]
    assert widths == sorted({space.filter_keep(group, r) for r in rates})
    assert all(w % groups == 0 for w in widths) and widths[-1] == group.size  # a class: one channel per conv group
    for width in widths[:-1]:
        masks = space.param_masks(projection.project(space, model, {"filter": {"a": 1 - width / group.size}}))
        assert compaction.compact(model, masks, x, channel_multiple=multiple).model.a.out_channels == width


class FunctionalLinear(nn.Module):
    """A residual branch through a Linear whose weight is used functionally (``F.linear``, the module never
    called: torchvision's Swin attention), then a BatchNorm: torch-pruning does not see the Linear read the
    conv's channels, and the BatchNorm hides the branch from the probe of :func:`_verified`."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8)
        self.bn, self.head = nn.BatchNorm2d(8), nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv(x)
        branch = F.linear(x.permute(0, 2, 3, 1), self.fc.weight, self.fc.bias).permute(0, 3, 1, 2)
        return self.head(F.relu(self.bn(x + branch)).mean((2, 3)))


def test_a_weight_read_functionally_keeps_the_channels_it_reads():
    check_all_modes(FunctionalLinear, (3, 8, 8), (3, 12, 12), expect_pass=("column", "irregular"))
    space = PruningSpace.build(FunctionalLinear().eval(), torch.randn(1, 3, 8, 8), dims=("filter",))
    assert "fc's weight reads its channels functionally" in space.excluded["conv"]
    assert "its weight is read functionally (the module is never called)" in space.exclusions["fc"]  # not warned
    assert space.unreached_warning() is None  # about as an unseen branch


def test_an_exploding_index_mapping_is_stopped():
    """torch-pruning's index mappings are bounded: one that maps a channel set to more indices than 4x the
    largest parameter dimension (at least 16384) raises at once (Swin's window reshapes ran for hours). Positions
    reached from many channels count once (a Linear viewed as a map reaches each channel from all of its rows)."""
    from torch_pruning._helpers import _HybridIndex

    graph = trace_graph(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)).eval(), (torch.randn(1, 3, 4, 4),))
    dep = next(d for node in graph.module2node.values() for d in node.dependencies)
    dep.index_mapping[0] = lambda idxs: [_HybridIndex(i.idx * 10000 + k, i.root_idx)
                                         for i in idxs for k in range(10000)]
    assert len(dep.index_mapping[0]([_HybridIndex(1, 1)])) == 10000
    with pytest.raises(ChannelMappingExplodes, match="mapped 2 channel indices to 20000"):
        dep.index_mapping[0]([_HybridIndex(1, 1), _HybridIndex(2, 2)])
    dep.index_mapping[0] = lambda idxs: [_HybridIndex(i.idx // 7, i.root_idx + k) for i in idxs for k in range(10000)]
    assert len(dep.index_mapping[0]([_HybridIndex(1, 1), _HybridIndex(2, 2)])) == 20000  # one position, many roots


def test_concat_then_uneven_split_is_pruned_exactly_or_refused():
    """Found by the fuzzer in session 11's CI: the dependency graph mapped a concat's channels past the width of
    an uneven split's producer (IndexError in compaction's dead-channel scan); those dead channels now stay
    dense with a reason, and every invariant holds."""
    torch.manual_seed(0)
    check_all_modes(lambda: Net([Concat, UnevenSplit], []), (3, 8, 8), (3, 12, 12))


class TinyViT(nn.Module):
    """A vision transformer written as timm writes one: patch conv, class token, a learned position embedding
    ``[1, tokens, C]`` added to the tokens, pre-norm attention whose qkv Linear is reshaped into heads, an MLP.
    The heads' output is reshaped to ``(n, t, -1)``: timm writes ``(B, N, C)`` with ``C`` the stream's width, which
    breaks once the stream is narrower than the heads (``compress`` then leaves the stream's group out)."""

    def __init__(self, dim: int = 16, heads: int = 2, patch: int = 4, size: int = 16):
        super().__init__()
        tokens = (size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token, self.pos_embed = nn.Parameter(torch.randn(1, 1, dim)), nn.Parameter(torch.randn(1, tokens, dim))
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.norm, self.head, self.heads = nn.LayerNorm(dim), nn.Linear(dim, 3), heads

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        n, t = x.shape[:2]
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, -1))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x)[:, 0])


def test_a_vision_transformers_token_stream_is_filter_pruned_with_its_position_embedding():
    """Helper 32's ViT: the position embedding ``[1, tokens, C]`` was refused as "not per-channel", so the token
    stream (patch_embed's channels) could never be pruned. It is sliced along C like any per-channel entry; the
    MLP's hidden channels are pruned. The fused qkv is a group of its own (rows c, 16 + c, 32 + c and proj's input
    c), whose two heads only the compress probe finds (tests/test_attention.py): the one-shot path here ignores it."""
    space = PruningSpace.build(TinyViT().eval(), torch.randn(1, 3, 16, 16))
    assert {g.name: g.size for g in space.filter_groups} == {"patch_embed": 16, "qkv": 16, "fc1": 32}
    stream = next(g for g in space.filter_groups if g.name == "patch_embed")
    assert {s.param for s in stream.slices} >= {"cls_token", "pos_embed", "norm1.weight", "proj.weight", "fc2.bias"}
    # fresh user 76: the model was named "a layer of its own with weights" although those two are sliced
    assert "" not in space.excluded
    # every entry of the parameters that read or write the stream (qkv, fc1 and head by their input columns)
    coupled = {"patch_embed.weight", "patch_embed.bias", "cls_token", "pos_embed", "qkv.weight", "fc1.weight",
               "head.weight"}
    assert stream.params == sum(p.numel() for n, p in TinyViT().named_parameters()
                                if n in coupled or n.startswith(("norm", "proj.", "fc2.")))
    check_all_modes(TinyViT, (3, 16, 16), expect_pass=ALL, ignored=("qkv",))  # one-shot: no head probe here


def test_a_free_parameter_that_is_not_per_channel_still_leaves_its_group_out():
    """Swin's relative position bias table ``[positions, heads]`` is a free parameter torch-pruning maps onto the
    stream's channels: several entries per position, and fewer positions than the group's channels. Allowing
    position embeddings ``[1, tokens, C]`` (above) must not let it be sliced (an IndexError out of the space)."""
    import torchvision

    model = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], window_size=[4, 4],
        num_classes=10).eval()
    space = PruningSpace.build(model, torch.randn(1, 3, 64, 64))
    table = "features.5.1.attn.relative_position_bias_table"
    assert space.excluded["features.4.reduction"] == f"filter pruning: free parameter {table} is not per-channel"
    assert "features.4.reduction" not in [g.name for g in space.filter_groups]


# ------------------------------------------------------------------------------- fuzzer with attention blocks
def one_round(model: nn.Module, rates: dict, x: torch.Tensor, dims: tuple[str, ...]):
    """:func:`autocompress.prune` at ``rates`` with no training and no purification: the pipeline's own space
    (``nn.MultiheadAttention`` split, heads found by its probe), hard pruning, compaction and its verification."""
    return prune(model, rates, example_inputs=x, device="cpu", dims=dims, admm=ADMMConfig(epochs=0),
                 retrain=TrainConfig(epochs=0), purify=False, progress=False)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _pixels(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(like.shape[0], -1, *like.shape[2:])


class PixelAttention(nn.Module):
    """Pixels as tokens through a pre-norm ``nn.MultiheadAttention`` (batch first, two heads), residual."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(c), nn.MultiheadAttention(c, 2, batch_first=True)

    def forward(self, x):
        t = _tokens(x)
        q = self.norm(t)
        return _pixels(t + self.attn(q, q, q, need_weights=False)[0], x)


class QKVAttention(nn.Module):
    """A fused qkv Linear split into two heads by a view, scaled dot-product attention, an output projection."""

    def __init__(self, c):
        super().__init__()
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        t = _tokens(x)
        n, length = t.shape[:2]
        q, k, v = self.qkv(t).view(n, length, 3, 2, -1).permute(2, 0, 3, 1, 4)
        heads = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, -1)
        return _pixels(t + self.proj(heads), x)


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (two heads, batch first, pre- or post-norm) over the pixels as tokens."""

    def __init__(self, c, norm_first=True):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(c, 2, 2 * c, dropout=0.0, batch_first=True, norm_first=norm_first)

    def forward(self, x):
        return _pixels(self.layer(_tokens(x)), x)


class PostNormEncoderLayer(EncoderLayer):
    def __init__(self, c):
        super().__init__(c, norm_first=False)


ATTENTION = [PixelAttention, QKVAttention, EncoderLayer, PostNormEncoderLayer]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(attention=st.sampled_from(ATTENTION), blocks=st.lists(st.sampled_from(BLOCKS + ATTENTION), max_size=2),
       place=st.integers(0, 2), mode=st.sampled_from(["filter", "column", "hybrid"]), seed=st.integers(0, 2 ** 16))
def test_fuzzed_nets_with_attention_are_pruned_exactly_by_prune_or_refused(attention, blocks, place, mode, seed):
    """Random nets holding attention (the pipeline splits ``nn.MultiheadAttention`` and finds the heads) through
    :func:`autocompress.prune` at rate 0.5: a clean refusal naming a module, or a compact model (``prune`` itself
    refuses one that differs from the masked model) with fewer parameters, as many as reported, that trains and
    whose saved form rebuilds to the same outputs; the input model is unchanged."""
    torch.manual_seed(seed)
    blocks = list(blocks)
    blocks.insert(min(place, len(blocks)), attention)
    model, x = Net(blocks, width=8).eval(), torch.randn(2, 3, 4, 4)
    snap, (dims, rate) = _snapshot(model), MODES[mode]
    try:
        result = one_round(model, {"default": rate}, x, dims)
    except UserError as exc:
        assert "\n" not in str(exc) and _names_a_module(str(exc), model), str(exc)
        return
    finally:
        assert _unchanged(model, snap), "the input model changed"
    compact, report = result.compact_model, result.report
    assert count_params(compact) == report["params_after"] < report["params_before"] == count_params(model)
    assert count_macs(compact, x[:1]) == report["macs_after"]  # per input item
    compact.train()
    out = compact(torch.randn(2, 3, 4, 4))
    sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    rebuilt = apply_architecture(Net(blocks, width=8), describe_architecture(compact))
    rebuilt.load_state_dict(compact.state_dict())
    probe = torch.randn(3, 3, 4, 4)
    assert _close(_outputs(rebuilt, probe), _outputs(compact, probe)), "rebuilt != compact"


@pytest.mark.parametrize("block", [ChannelsLastLN, PixelAttention])
def test_a_layernorm_after_a_concatenation_keeps_the_channels_both_removals_left(block):
    """Found by the attention fuzzer: a LayerNorm reading a concatenation of two convolutions loses channels in
    each one's removal; its kept channels (what ``layer_norm: kept`` normalises over) were those of the second
    removal alone, as indices of the already narrowed norm, and ``prune`` refused its own compact model."""
    torch.manual_seed(0)
    model, x = Net([Concat, block], width=8).eval(), torch.randn(2, 3, 4, 4)
    result = one_round(model, {"default": 0.5}, x, ("filter",))
    assert result.report["kept"]["filters"]["blocks.0.a"] == [2, 4]  # both halves of the concatenation narrowed
    assert result.report["kept"]["filters"]["blocks.0.b"] == [3, 6]
    norm = next(m for m in result.compact_model.blocks[1].modules() if isinstance(m, nn.LayerNorm))
    assert norm.normalized_shape[0] == result.compact_model.head.in_features == 5


def test_a_fused_qkv_whose_heads_narrow_and_columns_go_keeps_the_attention_scale():
    """Found by the attention fuzzer: the queries are rescaled for a scale that follows the head width
    (``F.scaled_dot_product_attention`` without ``scale=``), but when the qkv Linear was also column-pruned the
    rescaling reached the dense layer its column layer had replaced, and every hybrid prune was refused."""
    from autocompress.columns import ColumnLinear

    torch.manual_seed(0)
    model, x = Net([QKVAttention], width=8).eval(), torch.randn(2, 3, 4, 4)
    rates = {"filter": {"blocks.0.qkv": 0.5}, "column": {"blocks.0.qkv": 0.5}}
    result = one_round(model, rates, x, ("filter", "column"))
    qkv = result.compact_model.blocks[0].qkv
    assert isinstance(qkv, ColumnLinear) and qkv.out_features == 12  # two heads of 2 channels for q, k and v
    assert result.compact_model.blocks[0].proj.in_features == 4


def test_an_attention_whose_scale_follows_the_head_width_beside_one_whose_scale_is_stored():
    """Found by the attention fuzzer: a fused-qkv attention whose scale follows the head width (its queries must be
    rescaled) before an ``nn.TransformerEncoderLayer`` (split with its scale stored: its rows must stay) was refused,
    since the rescaling was tried for every attention at once; each attention now takes its own option."""
    torch.manual_seed(0)
    model, x = Net([QKVAttention, EncoderLayer], width=8).eval(), torch.randn(2, 3, 4, 4)
    result = one_round(model, {"default": 0.5}, x, ("filter",))
    kept = result.report["kept"]["filters"]
    assert kept["blocks.0.qkv"] == kept["blocks.1.layer.self_attn.q_proj"] == [4, 8]


def test_a_concatenation_added_to_the_stream_it_reads_is_pruned_and_a_chunked_gate_is_not():
    """The stream of a stem -> [1x1, 3x3] -> cat -> BatchNorm -> + stem block is one filter group whose channels the
    branches produce a part each: pruning it removes channels from both branches and the compact model equals the
    masked one (Torch-Pruning prunes this block; it was left out as "channels map unevenly"). A GLU gate's halves,
    whose sizes ``chunk`` fixes, stay out of filter pruning."""
    torch.manual_seed(0)
    model = Net([ConcatResidual], width=12)
    space = PruningSpace.build(model, torch.randn(2, 3, 8, 8))
    stream = next(g for g in space.filter_groups if g.name == "stem.0")
    produced = {s.param: sorted(set(s.channel.tolist())) for s in stream.slices if s.role == "weight" and s.dim == 0}
    assert produced == {"stem.0.weight": list(range(12)), "blocks.0.a.weight": list(range(4)),
                        "blocks.0.b.weight": list(range(4, 12))}
    compact = oneshot(model, torch.randn(2, 3, 8, 8), "filter")
    kept = int(stream.keep(MODES["filter"][1]))
    assert compact.stem[0].out_channels == kept < 12
    assert compact.blocks[0].a.out_channels + compact.blocks[0].b.out_channels == kept
    only_a = torch.ones(12, dtype=torch.bool)
    only_a[:2] = False  # channels of branch a alone: branch b keeps its own, which is no failure
    masks = space.param_masks(Masks(filters={"stem.0": only_a}, columns={}, weights={}))
    assert compaction.compaction_failure(model, masks, torch.randn(2, 3, 8, 8), narrowed=stream.producers) is None
    gated = PruningSpace.build(Net([Gated], width=12), torch.randn(2, 3, 8, 8))
    assert "blocks.0.conv" not in [g.name for g in gated.filter_groups]
    assert "by chunk for a GLU gate" in " ".join(gated.exclusions["blocks.0.conv"])


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_a_ghost_modules_stream_is_pruned_in_pairs_of_a_channel_and_its_depthwise_copy(blocks):
    """A ghost module (GhostNet) adds cat([a, depthwise(a)]) to the stream it reads: stream channel ``j`` and
    ``j + 6`` are one channel of the depthwise conv, so they leave together. torch-pruning records ``j`` at some
    layers of such a block and ``j + 6`` at others (it visits each once); the stream was left out as "could not be
    verified" and is now one group of 6 tie classes, whose compact model equals the masked one."""
    torch.manual_seed(0)
    model = Net([Ghost] * blocks, width=12)
    space = PruningSpace.build(model, torch.randn(2, 3, 8, 8))
    stream = space.unit("filter", "stem.0")
    assert stream.ties.tolist() == list(range(6)) * 2 and stream.parts == ()
    assert set(stream.producers) == {"stem.0"} | {f"blocks.{i}.{layer}" for i in range(blocks)
                                                  for layer in ("primary", "cheap")}
    compact = oneshot(model, torch.randn(2, 3, 8, 8), "filter")
    kept = stream.keep(MODES["filter"][1])
    assert compact.stem[0].out_channels == kept == 6
    assert all(b.primary.out_channels == b.cheap.out_channels == 3 for b in compact.blocks)


@pytest.mark.parametrize("rate, shares", [(0.5, (2, 4)), (0.75, (1, 2)), (0.9, (1, 1))])
def test_each_branch_keeps_its_share_and_purification_gives_one_back(rate, shares):
    """The branches of a concatenation (4 and 8 of a 12-channel stream) keep their share of the stream's kept
    channels (largest remainders; one each at the least), their strongest ones, even where one branch's channels all
    score below the other's: a global ranking kept a 3x3 branch's channels (nine times the weights of a 1x1 row)
    and a fresh model missed flops=2x by 12 % of what the space estimated. Where purification empties a branch its
    strongest channel comes back: a compact branch with no channel has no weights to compute its output."""
    torch.manual_seed(0)
    model = Net([ConcatResidual], width=12).eval()
    with torch.no_grad():
        model.blocks[0].a.weight.mul_(1e-3)
        model.blocks[0].a.bias.mul_(1e-3)
    example = torch.randn(2, 3, 8, 8)
    space = PruningSpace.build(model, example)
    stream = space.unit("filter", "stem.0")
    rates = {"filter": {"stem.0": rate}, "column": {}, "irregular": {}}
    masks = projection.project(space, model, rates)
    keep = masks.filters["stem.0"]
    scores = projection.group_scores(stream, dict(model.named_parameters()))
    assert int(keep.sum()) == sum(shares) == space.filter_keep(stream, rate) and space.widths(stream)[0] == 2
    for branch, share in zip((torch.arange(4), torch.arange(4, 12)), shares):
        strongest = branch[scores[branch].argsort(descending=True)[:share]]
        assert torch.equal(keep[branch].nonzero().flatten() + int(branch[0]), strongest.sort().values)
    counted, estimated = space.count(masks).macs, space.estimate(rates).macs  # what the search relies on: never
    assert counted <= estimated and (counted == estimated) == (rate != 0.9)  # under (a floor per branch there)
    emptied = keep.clone()
    emptied[:4] = False  # purification removed branch a's channels: the strongest of those it had comes back
    back = stream.keep_parts(emptied, scores, before=keep)
    assert int(back[:4].sum()) == 1 and bool(back[scores[:4].masked_fill(~keep[:4], -1).argmax()])
    assert torch.equal(back[4:], keep[4:])
    back = Masks(filters={"stem.0": back}, columns={}, weights={})
    masked = copy.deepcopy(model)
    apply_masks(masked, space.param_masks(back))
    compact = compaction.compact(copy.deepcopy(model), space.param_masks(back), example).model
    assert compact.blocks[0].a.out_channels == 1 and _close(_outputs(compact, example), _outputs(masked, example))


class ConcatPooled(nn.Module):
    """Fresh user 75's detector head: two branches (12 and 8 channels) pooled to ``size`` x ``size`` (average and
    max), flattened, concatenated in ``order`` and classified by one Linear; with ``box``, a second head reads
    branch ``a`` through a conv of its own."""

    def __init__(self, order: str, size: int, box: bool):
        super().__init__()
        self.order, self.size, self.box = order, size, box
        self.stem, self.a = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
        self.down, self.b = nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(20 * size * size, 3)
        self.box_conv, self.box_fc = nn.Conv2d(12, 6, 3, padding=1), nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        a, b = F.relu(self.a(h)), F.relu(self.b(F.relu(self.down(h))))
        pooled = {"a": F.adaptive_avg_pool2d(a, self.size).flatten(1), "b": F.adaptive_max_pool2d(b, self.size)
                  .view(len(b), -1)}
        logits = self.fc(torch.cat([pooled[key] for key in self.order], 1))
        return (logits, self.box_fc(F.relu(self.box_conv(a)).mean((2, 3)))) if self.box else logits


@pytest.mark.parametrize("order, size, box", [("ab", 1, False), ("ba", 1, True), ("ab", 2, True), ("ba", 2, False)])
def test_pooled_maps_flattened_and_concatenated_into_a_linear_are_pruned(order, size, box):
    """torch-pruning infers a flatten's stride from the channel counts around it, and a concatenation after it
    misleads it (the whole Linear's input over one branch's channels): the second branch's channels pointed past the
    Linear's input and the branch was left out ("cannot be followed into fc", or "map unevenly into a.weight"), and
    Torch-Pruning itself raises IndexError on it. The stride now comes from the traced shapes: both branches are
    pruned and the compact model equals the masked one."""
    model, example = ConcatPooled(order, size, box), torch.randn(2, 3, 8, 8)
    space = PruningSpace.build(model, example)
    assert {"a", "b"} <= {g.name for g in space.filter_groups} and not {"a", "b"} & set(space.excluded)
    compact = oneshot(model, example, "filter")
    assert compact.a.out_channels < 12 and compact.b.out_channels < 8
    assert compact.fc.in_features == (compact.a.out_channels + compact.b.out_channels) * size * size


class CatThenFlatten(nn.Module):
    """Fresh user 76's head: branches of ``widths`` channels concatenated on channels (after ``coords`` constant
    coordinate maps, CoordConv-style, when given: then with keyword arguments only), then pooled to ``size`` x
    ``size`` (0: not pooled, the 4 x 4 map itself) and flattened into one Linear."""

    def __init__(self, widths: tuple[int, ...], size: int, coords: int = 0):
        super().__init__()
        self.size, self.coords = size, coords
        self.branches = nn.ModuleList(nn.Conv2d(3, w, 3, stride=2, padding=1) for w in widths)
        self.fc = nn.Linear((sum(widths) + coords) * (size * size if size else 16), 3)

    def forward(self, x):
        maps = [F.relu(b(x)) for b in self.branches]
        grid = torch.linspace(-1, 1, maps[0].shape[-1]).expand(len(x), self.coords, *maps[0].shape[-2:])
        y = torch.cat(tensors=[grid, *maps], dim=1) if self.coords else torch.cat([grid, *maps], 1)
        return self.fc((F.adaptive_avg_pool2d(y, self.size) if self.size else y).flatten(1))


@pytest.mark.parametrize("widths, size, coords", [((8, 4), 0, 0), ((4, 6, 8), 2, 0), ((8, 8), 1, 0), ((8, 4), 0, 2)])
def test_maps_concatenated_then_flattened_into_a_linear_are_pruned(widths, size, coords):
    """torch-pruning saw the flatten's features (the Linear's input) where the concatenation's channels are and gave
    it no offsets at all: the branches were left out ("cannot be followed into" a sibling branch) or the model was
    refused ("mat1 and mat2 shapes cannot be multiplied"); a constant input (coordinate maps) shifted every offset.
    The offsets come from the traced sizes, constant inputs included, updated as a compaction removes channels:
    every branch is pruned and the compact model equals the masked one."""
    model, example = CatThenFlatten(widths, size, coords), torch.randn(2, 3, 8, 8)
    space = PruningSpace.build(model, example)
    assert [g.name for g in space.filter_groups] == [f"branches.{i}" for i in range(len(widths))]
    compact = oneshot(model, example, "filter")
    kept = [b.out_channels for b in compact.branches]
    assert all(k < w for k, w in zip(kept, widths))
    assert compact.fc.in_features == (sum(kept) + coords) * (size * size or 16)


class ChannelsLastHead(nn.Module):
    """A head ported from channels-last code: the maps of ``widths`` channels (concatenated when several) are
    flattened after a ``layout`` reordering that moves the channels off dimension 1 (``permute``: ``[N, H, W, C]``;
    ``transpose``: ``[N, W, H, C]``; ``middle``: ``[N, H, C, W]``, with ``contiguous`` and ``view``), into a Linear."""

    def __init__(self, widths: tuple[int, ...], layout: str):
        super().__init__()
        self.layout = layout
        self.branches = nn.ModuleList(nn.Conv2d(3, w, 3, stride=2, padding=1) for w in widths)
        self.fc = nn.Linear(sum(widths) * 16, 3)

    def forward(self, x):
        y = torch.cat([F.relu(b(x)) for b in self.branches], 1) if len(self.branches) > 1 else self.branches[0](x)
        if self.layout == "permute":
            y = y.permute(0, 2, 3, 1).reshape(len(x), -1)
        elif self.layout == "transpose":
            y = y.transpose(1, -1).flatten(1)
        else:
            y = y.permute(0, 2, 1, 3).contiguous().view(len(x), -1)
        return self.fc(y)


@pytest.mark.parametrize("widths, layout", [((8,), "permute"), ((8, 4), "permute"), ((6,), "transpose"),
                                            ((4, 8), "transpose"), ((8,), "middle"), ((4, 6), "middle")])
def test_maps_flattened_channels_last_into_a_linear_are_pruned(widths, layout):
    """A flatten after a permute spreads channel j over features j, C + j, 2C + j, ... (channels last), which
    torch-pruning maps as a plain flatten's block of features (Torch-Pruning itself prunes the wrong columns of the
    Linear) and which was left out ("cannot be followed into fc"). The mapping follows the permute, with the
    channel count torch-pruning infers as a compaction removes channels (a concatenation's included): every branch
    is pruned and the compact model equals the masked one."""
    model, example = ChannelsLastHead(widths, layout), torch.randn(2, 3, 8, 8)
    space = PruningSpace.build(model, example)
    assert [g.name for g in space.filter_groups] == [f"branches.{i}" for i in range(len(widths))]
    compact = oneshot(model, example, "filter")
    kept = [b.out_channels for b in compact.branches]
    assert all(k < w for k, w in zip(kept, widths))
    assert compact.fc.in_features == sum(kept) * 16


class FlattenedAndViewedBack(nn.Module):
    """Maps flattened and viewed back as channels: ``tokens``, a pooled map's ``flatten(1)`` reshaped to ``[N, C,
    4]`` and transposed into per-position tokens of a Linear (fresh user 76's ReshapeTokens); ``map``, two
    branches flattened, concatenated and viewed back as one map of their channels for a convolution."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.mix = nn.Linear(8, 12) if kind == "tokens" else nn.Conv2d(12, 12, 3, padding=1)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        a = F.relu(self.a(x))
        if self.kind == "tokens":
            y = F.adaptive_avg_pool2d(a, 2).flatten(1)
            return self.head(F.relu(self.mix(y.reshape(len(x), -1, 4).transpose(1, 2))).mean(1))
        y = torch.cat([a.flatten(1), F.relu(self.b(x)).flatten(1)], 1).view(len(x), -1, *a.shape[2:])
        return self.head(F.relu(self.mix(y)).mean((2, 3)))


@pytest.mark.parametrize("kind", ["tokens", "map"])
def test_maps_flattened_and_viewed_back_as_channels_are_pruned(kind):
    """torch-pruning sees ``[N, C * S] -> [N, C, S]`` after a flatten as a reshape keeping the count, one channel per
    feature, so the flattened producer's channels pointed past the consumer's and it was left out ("cannot be
    followed into mix"). Feature ``f`` is now channel ``f // S`` where the layers after it read ``C`` channels: the
    producers are pruned and the compact model equals the masked one."""
    model, example = FlattenedAndViewedBack(kind), torch.randn(2, 3, 8, 8)
    space = PruningSpace.build(model, example)
    producers = ["a"] if kind == "tokens" else ["a", "b"]
    assert set(producers) <= {g.name for g in space.filter_groups} and not set(producers) & set(space.excluded)
    compact = oneshot(model, example, "filter")
    assert compact.a.out_channels < 8
    width = compact.mix.in_features if kind == "tokens" else compact.mix.in_channels
    assert width == compact.a.out_channels + (0 if kind == "tokens" else compact.b.out_channels)


class Generator(nn.Module):
    """A generator's (or decoder's) stem: a Linear from the latent code viewed as a 32-channel 7 x 7 map, then a
    BatchNorm (when ``norm``) and transposed convolutions; ``stored``: the view reads the channel count from an
    attribute (``view(N, self.channels, 7, 7)``, fresh user 81's VAE decoder), else ``-1``."""

    def __init__(self, norm: bool, stored: bool = False):
        super().__init__()
        self.channels = 32 if stored else -1
        self.fc = nn.Linear(16, 32 * 7 * 7)
        self.norm = nn.BatchNorm2d(32) if norm else nn.Identity()
        self.up, self.out = nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, z):
        x = F.relu(self.norm(self.fc(z).view(len(z), self.channels, 7, 7)))
        return torch.tanh(self.out(F.relu(self.up(x))))


@pytest.mark.parametrize("norm, stored", [(True, False), (False, False), (True, True)])
def test_a_linear_viewed_as_a_map_loses_whole_channels(norm, stored):
    """A Linear's 1568 features viewed as 32 channels of 7 x 7: each channel of the map is a block of 49 rows. The
    group's query reached those blocks from every row of them (49 x 49 x 32 mapped positions, no more than 1568
    distinct), which the guard against exploding mappings took for one and left the Linear out. Now its 32 blocks
    are its tie classes: it loses whole channels of the map, and the compact model equals the masked one. A count
    the view reads from an attribute follows the map's channels (it was compared with the Linear's rows)."""
    model, example = Generator(norm, stored), torch.randn(2, 16)
    space = PruningSpace.build(model, example)
    group = next(g for g in space.filter_groups if g.name == "fc")
    assert (group.size, group.classes) == (1568, 32)
    compact = oneshot(model, example, "filter")
    assert compact.fc.out_features % 49 == 0 and compact.fc.out_features < 1568
    assert compact.up.in_channels == compact.fc.out_features // 49
    assert compact.channels == (compact.up.in_channels if stored else -1)
    assert_estimate_counts_compact(model, example, space, {"fc": 0.5, "up": 0.25})


def assert_estimate_counts_compact(model: nn.Module, example: torch.Tensor, space: PruningSpace,
                                   filter_rates: dict[str, float]) -> None:
    """The search's cost (:meth:`PruningSpace.estimate`) equals the params and MACs of the compact model at
    ``filter_rates``: a position several group channels reach (49 rows of a Linear viewed as one channel of a map,
    the 4 channels a pixel shuffle makes one) counted once per channel made the MACs of fresh user 81's decoder
    negative in the search, and its flops target was missed after all the training."""
    rates = {"filter": filter_rates, "column": {}, "irregular": {}}
    work = copy.deepcopy(model).eval()
    compact = compaction.compact(work, space.param_masks(projection.project(space, work, rates)), example).model
    estimate = space.estimate(rates)
    assert (estimate.params, estimate.macs) == (count_params(compact),
                                                count_macs(compact, example))


class SubPixel(nn.Module):
    """A super-resolution tail (ESPCN / EDSR): a residual body, then ``up`` producing 4 channels per output channel
    for a pixel shuffle by 2 (``kind``: ``module``, ``functional``, or ``unshuffle``: a pixel unshuffle, 4 output
    channels per input channel, as a space-to-depth stem does), then ``tail``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.head, self.body = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.Conv2d(16, 8 if kind == "unshuffle" else 64, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.tail = nn.Conv2d(32 if kind == "unshuffle" else 16, 1, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.head(x))
        u = self.up(h + self.body(h))
        if self.kind == "unshuffle":
            u = F.pixel_unshuffle(u, 2)
        else:
            u = self.shuffle(u) if self.kind == "module" else F.pixel_shuffle(u, 2)
        return self.tail(F.relu(u))


@pytest.mark.parametrize("kind", ["module", "functional", "unshuffle"])
def test_a_pixel_shuffle_producer_loses_whole_blocks_of_channels(kind):
    """torch-pruning maps a pixel shuffle channel to channel (Torch-Pruning 1.6 crashes on it), so ``up`` was left
    out ("map unevenly into tail.weight"), and a pixel unshuffle's producer too. Channels ``4k`` to ``4k + 3`` of
    ``up`` are channel ``k`` after the shuffle: they are its tie classes and leave with input ``k`` of ``tail``
    (the other way round after an unshuffle); the compact model equals the masked one (fresh user 79)."""
    model, example = SubPixel(kind), torch.randn(2, 1, 8, 8)
    space = PruningSpace.build(model, example)
    group = next(g for g in space.filter_groups if g.name == "up")
    assert (group.size, group.classes) == ((8, 8) if kind == "unshuffle" else (64, 16))
    compact = oneshot(model, example, "filter")
    assert compact.up.out_channels < group.size
    assert compact.tail.in_channels == compact.up.out_channels * 4 if kind == "unshuffle" else \
        compact.up.out_channels == 4 * compact.tail.in_channels
    assert_estimate_counts_compact(model, example, space, {"up": 0.5, "head": 0.25})
