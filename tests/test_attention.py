"""Attention heads as filter groups: the head count is found, each head keeps equally many channels, and the
compact model computes what the masked one does (fused qkv by reshape or chunk, separate q / k / v)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autocompress.admm import ADMMConfig
from autocompress.alignment import allowed_widths, misaligned_widths
from autocompress.architecture import apply_architecture, describe_architecture
from autocompress.attention import HEAD_HINT, head_count
from autocompress.compaction import compact
from autocompress.masks import Masks
from autocompress.projection import project
from autocompress.pruning import prune
from autocompress.space import PruningSpace
from autocompress.training import TrainConfig


class Attention(nn.Module):
    """Multi-head self-attention over ``[B, N, C]`` tokens, written three ways: ``fused`` (one qkv Linear,
    ``reshape(B, N, 3, heads, -1)``), ``chunk`` (one qkv Linear, ``chunk(3)`` then ``view(B, N, heads, -1)``),
    ``separate`` (q, k and v Linears). ``scale``: ``"fixed"`` (``head_dim ** -0.5`` stored at init), ``"sdpa"``
    (``F.scaled_dot_product_attention``'s default, which follows the head width) or ``"sdpa_fixed"``.
    ``stored``: the head width is an attribute the reshape reads (it narrows with a public head count, ``named``)."""

    def __init__(self, dim: int, width: int, heads: int, layout: str, bias: bool = True, scale: str = "fixed",
                 named: bool = True, stored: bool = False):
        super().__init__()
        self.head_dim = width // heads if stored else -1
        if named:
            self.num_heads = heads
        self._heads, self.layout, self.scale_kind = heads, layout, scale
        self.scale = (width // heads) ** -0.5
        if layout == "separate":
            self.q, self.k, self.v = (nn.Linear(dim, width, bias=bias) for _ in range(3))
        else:
            self.qkv = nn.Linear(dim, 3 * width, bias=bias)
        self.proj = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        h = self._heads
        if self.layout == "fused":
            q, k, v = self.qkv(x).reshape(B, N, 3, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            parts = self.qkv(x).chunk(3, dim=-1) if self.layout == "chunk" else (self.q(x), self.k(x), self.v(x))
            q, k, v = (t.view(B, N, h, self.head_dim).transpose(1, 2) for t in parts)
        if self.scale_kind == "fixed":
            out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale if self.scale_kind == "sdpa_fixed" else None)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class TokenNet(nn.Module):
    """Embedding -> pre-norm attention block with an MLP -> mean over tokens -> classifier."""

    def __init__(self, attention: Attention, features: int = 5, dim: int = 12, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = attention
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(self.norm(x))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def _root(layout: str) -> str:
    return "attn.q" if layout == "separate" else "attn.qkv"


def _masked(model: nn.Module, param_masks: dict[str, torch.Tensor]) -> nn.Module:
    """The model with every masked entry zeroed, written out here (not the compaction's own masking)."""
    masked = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, param in masked.named_parameters():
            if name in param_masks:
                param.mul_(param_masks[name].to(param.dtype))
    return masked


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(2, 4), layout=st.sampled_from(["fused", "chunk", "separate"]),
       bias=st.booleans(), named=st.booleans(), multiple=st.sampled_from([1, 2, 4]),
       scale=st.sampled_from(["fixed", "sdpa", "sdpa_fixed"]), seed=st.integers(0, 10_000))
def test_each_head_keeps_equally_many_channels_and_the_compact_model_equals_the_masked_one(
        heads, head_dim, layout, bias, named, multiple, scale, seed):
    torch.manual_seed(seed)
    width = heads * head_dim
    model = TokenNet(Attention(12, width, heads, layout, bias=bias, named=named, scale=scale)).eval()
    x = torch.randn(2, 7, 5)
    space = PruningSpace.build(model, x, channel_multiple=multiple)
    root = _root(layout)
    group = space.unit("filter", root)
    assert group.size == width
    found = head_count(model, space, group, x)
    if heads > 1 and len(allowed_widths(head_dim, multiple // math.gcd(multiple, heads))) < 2:
        assert found is None  # a head cannot lose a channel at this multiple
        return
    if heads == 1:  # any equal split is a valid constraint for one head; none may be needed
        assert found is None or width % found == 0
        found = found or 1
    else:
        assert found is not None and found % heads == 0  # the true count, or a stricter multiple of it
    space = PruningSpace.build(model, x, channel_multiple=multiple, heads={root: found} if found > 1 else {})
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(width, generator=gen)
    per = width // found
    keep_per = space.filter_keep(space.unit("filter", root), float(torch.rand(1, generator=gen)) * 0.9) // found
    keep = torch.zeros(found, per, dtype=torch.bool)
    for row, s in zip(keep, scores.view(found, per)):
        row[s.argsort(descending=True)[:keep_per]] = True
    masks = Masks(filters={root: keep.flatten()}, columns={}, weights={})
    param_masks = space.param_masks(masks)
    result = compact(model, param_masks, x, channel_multiple=multiple)
    kept = int(keep.sum())
    attn = result.model.attn
    assert (attn.q.out_features if layout == "separate" else attn.qkv.out_features // 3) == kept
    assert attn.proj.in_features == kept
    assert misaligned_widths(space, result.model) == {}
    probe = torch.randn(3, 9, 5)  # other batch and token counts than the example
    with torch.no_grad():
        expected, got = _masked(model, param_masks)(probe), result.model(probe)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    rebuilt = apply_architecture(TokenNet(Attention(12, width, heads, layout, bias=bias, named=named, scale=scale)),
                                 describe_architecture(result.model, reference=model))
    rebuilt.load_state_dict(result.model.state_dict())
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(probe), got, atol=1e-6)


def test_projection_keeps_the_strongest_channels_of_each_head():
    torch.manual_seed(0)
    model = TokenNet(Attention(12, 8, 2, "fused")).eval()
    with torch.no_grad():  # head 0's channels 0 and 1, head 1's channels 4 and 7 the strongest
        model.attn.qkv.weight.mul_(0.01)
        for c in (0, 1, 4, 7):
            model.attn.qkv.weight[[c, 8 + c, 16 + c]] *= 100
    x = torch.randn(2, 7, 5)
    space = PruningSpace.build(model, x, heads={"attn.qkv": 2})
    masks = project(space, model, {"filter": {"attn.qkv": 0.5}, "column": {}, "irregular": {}})
    assert torch.nonzero(masks.filters["attn.qkv"]).flatten().tolist() == [0, 1, 4, 7]


def test_a_head_width_the_forward_reads_from_an_attribute_narrows_next_to_a_stored_head_count():
    """``reshape(B, N, 3, heads, self.head_dim)`` runs narrower heads once ``head_dim`` follows them, which the
    compaction finds from ``num_heads`` (``head_dim * num_heads`` = the width); without a public head count no
    count compacts; with ``-1`` the count is found."""
    x = torch.randn(2, 7, 5)
    for stored, named, expected in ((True, True, 2), (True, False, None), (False, True, 2), (False, False, 2)):
        torch.manual_seed(0)
        model = TokenNet(Attention(12, 8, 2, "fused", stored=stored, named=named)).eval()
        space = PruningSpace.build(model, x)
        assert head_count(model, space, space.unit("filter", "attn.qkv"), x) == expected


def test_a_scale_that_follows_the_head_width_stays_at_the_full_width_s_value():
    """``F.scaled_dot_product_attention(q, k, v)`` divides by the narrower head width's root: the compaction scales
    the query rows by sqrt(d' / d) (fused: the first third of qkv; separate: q), and only then."""
    x = torch.randn(2, 7, 5)
    for layout in ("fused", "separate"):
        for scale, rescaled in (("sdpa", True), ("fixed", False)):
            torch.manual_seed(0)
            model = TokenNet(Attention(12, 8, 2, layout, scale=scale)).eval()
            root = _root(layout)
            space = PruningSpace.build(model, x, heads={root: 2})
            param_masks = space.param_masks(project(space, model, {"filter": {root: 0.5}}))
            result = compact(model, param_masks, x)
            query = "attn.q" if layout == "separate" else "attn.qkv"
            assert result.report.get("queries_rescaled", []) == ([query] if rescaled else [])
            weight, full = result.model.get_submodule(query).weight, model.get_submodule(query).weight
            kept = torch.nonzero(param_masks[f"{query}.weight"].all(1)).flatten()[:2]  # head 0's query rows
            factor = 0.5 ** 0.5 if rescaled else 1.0  # head width 4 -> 2
            assert torch.allclose(weight[:2], full[kept] * factor)
            probe = torch.randn(3, 9, 5)
            with torch.no_grad():
                assert torch.allclose(result.model(probe), _masked(model, param_masks)(probe), atol=1e-5)


@pytest.mark.parametrize("layout", ["fused", "separate"])
def test_prune_finds_the_heads_and_returns_a_compact_model_with_narrower_heads(layout):
    torch.manual_seed(0)
    model = TokenNet(Attention(12, 16, 4, layout, named=False), dim=12).eval()
    x = torch.randn(2, 7, 5)
    lines = []
    result = prune(model, {"filter": {_root(layout): 0.5}}, example_inputs=x, device="cpu", dims=("filter",),
                   admm=ADMMConfig(epochs=0), retrain=TrainConfig(epochs=0), purify=False, progress=False,
                   log=lines.append)
    attn = result.compact_model.attn
    assert attn.proj.in_features == 8
    assert any(f"filter-pruned by heads: {_root(layout)}" in line and "4 heads" in line for line in lines)
    torch.manual_seed(1)
    probe = torch.randn(2, 7, 5)
    space = PruningSpace.build(model, x, heads={_root(layout): 4})
    param_masks = space.param_masks(project(space, model, {"filter": {_root(layout): 0.5}, "column": {},
                                                            "irregular": {}}))
    with torch.no_grad():
        assert torch.allclose(result.compact_model(probe), _masked(model, param_masks)(probe), atol=1e-5)


@pytest.mark.parametrize("named", [True, False])
def test_prune_narrows_stored_head_widths_or_says_how_to_have_them_pruned(named):
    torch.manual_seed(0)
    model = TokenNet(Attention(12, 8, 2, "fused", stored=True, named=named)).eval()
    lines = []
    result = prune(model, {"default": 0.5}, example_inputs=torch.randn(2, 7, 5), device="cpu", dims=("filter",),
                   admm=ADMMConfig(epochs=0), retrain=TrainConfig(epochs=0), purify=False, progress=False,
                   log=lines.append)
    attention = result.compact_model.attn
    if named:  # head_dim follows the heads: 2 heads of 2
        assert attention.proj.in_features == 4 and attention.head_dim == 2
        assert describe_architecture(result.compact_model)["attributes"] == {"attn": {"head_dim": 2}}
    else:  # the heads keep their channels
        assert attention.proj.in_features == 8
        assert any(line.startswith("not filter-pruned: attn.qkv") and HEAD_HINT in line for line in lines)


class VFirst(Attention):
    """Separate projections defined v, k, q (the first in module order writes the values)."""

    def __init__(self, width: int, heads: int):
        nn.Module.__init__(self)
        self._heads, self.layout, self.scale_kind, self.head_dim = heads, "separate", "sdpa", -1
        self.v, self.k, self.q = (nn.Linear(12, width) for _ in range(3))
        self.proj = nn.Linear(width, 12)


def test_the_queries_are_rescaled_when_the_values_are_defined_first():
    torch.manual_seed(0)
    model = TokenNet(VFirst(8, 2)).eval()
    x = torch.randn(2, 7, 5)
    space = PruningSpace.build(model, x)
    root = space.unit("filter", "attn.v")
    assert head_count(model, space, root, x) == 2
    space = PruningSpace.build(model, x, heads={"attn.v": 2})
    param_masks = space.param_masks(project(space, model, {"filter": {"attn.v": 0.5}}))
    result = compact(model, param_masks, x)
    assert result.report["queries_rescaled"] == ["attn.k"]  # the keys: scaling them scales the scores
    probe = torch.randn(3, 9, 5)
    with torch.no_grad():
        assert torch.allclose(result.model(probe), _masked(model, param_masks)(probe), atol=1e-5)


def test_a_stale_head_count_attribute_does_not_name_the_heads():
    """``num_heads = 4`` on an attention whose forward splits into 2 heads: 4 compacts (a stricter split), the
    count reported is the forward's 2."""
    torch.manual_seed(0)
    attention = Attention(12, 8, 2, "fused")
    attention.num_heads = 4
    model = TokenNet(attention).eval()
    x = torch.randn(2, 7, 5)
    space = PruningSpace.build(model, x)
    assert head_count(model, space, space.unit("filter", "attn.qkv"), x) == 2


class QKNorm(Attention):
    """Separate projections with a LayerNorm over each head's queries and keys."""

    def __init__(self, width: int, heads: int):
        super().__init__(12, width, heads, "separate")
        self.q_norm, self.k_norm = nn.LayerNorm(width // heads), nn.LayerNorm(width // heads)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (t.view(B, N, self._heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


def test_a_norm_over_each_head_leaves_the_heads_whole_with_a_reason():
    """Torch-pruning maps the 8 channels onto the 4 entries of the per-head LayerNorm: the group is left out (it
    raised an IndexError out of the space's probe before)."""
    model = TokenNet(QKNorm(8, 2)).eval()
    space = PruningSpace.build(model, torch.randn(2, 7, 5))
    assert "attn.q" not in [g.name for g in space.filter_groups]
    assert "map past the 4 entries of attn.q_norm.weight" in space.excluded["attn.q"]


@pytest.mark.parametrize("layout, scale", [("fused", "fixed"), ("chunk", "sdpa"), ("separate", "sdpa_fixed")])
def test_the_space_counts_the_macs_of_the_attention_products_the_heads_lose(layout, scale):
    """The score and value products (N^2 D MACs each per item) shrink with the head width: with the group's
    ``free_macs`` the space's count of the masks equals the flop counter's count of the compact model, and the
    estimate from rates equals the count."""
    from autocompress.attention import free_macs
    from autocompress.metrics import count_macs

    torch.manual_seed(0)
    model = TokenNet(Attention(12, 16, 4, layout, scale=scale)).eval()
    x = torch.randn(2, 7, 5)
    root = _root(layout)
    space = PruningSpace.build(model, x, heads={root: 4})
    extra = free_macs(model, space, space.unit("filter", root), 4, x)
    assert extra == 2 * 2 * 7 * 7 * 16  # batch 2: q k^T and attn v, 7 tokens, 16 channels
    space = PruningSpace.build(model, x, heads={root: 4}, free_macs={root: extra})
    for rate in (0.25, 0.5, 0.75):
        rates = {"filter": {root: rate, "embed": 0.25}, "column": {}, "irregular": {}}
        masks = project(space, model, rates)
        compact_model = compact(model, space.param_masks(masks), x).model
        assert space.count(masks).macs == count_macs(compact_model, x) == space.estimate(rates).macs


class TokenIds(nn.Module):
    """A text classifier: token ids -> Embedding, a padding mask, separate q / k / v attention with SDPA's
    ``attn_mask``, mean over the kept tokens."""

    def __init__(self, vocab: int = 20, dim: int = 16, heads: int = 4):
        super().__init__()
        self.emb, self.heads = nn.Embedding(vocab, dim), heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.cls = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != 0
        x = self.emb(ids)
        B, N, _ = x.shape
        q, k, v = (t.view(B, N, self.heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.out(o.transpose(1, 2).reshape(B, N, -1))
        m = mask.unsqueeze(-1).float()
        return self.cls((x * m).sum(1) / m.sum(1).clamp(min=1))


def test_a_token_id_model_s_heads_are_pruned_from_integer_example_inputs():
    """Integer example inputs (token ids) were refused ("filter pruning needs float example inputs"): the space's
    probes draw ids from the example's own range."""
    torch.manual_seed(0)
    model = TokenIds().eval()
    ids = torch.randint(1, 20, (2, 9))
    ids[:, 7:] = 0
    lines = []
    result = prune(model, {"filter": {"q": 0.5}}, example_inputs=ids, device="cpu", dims=("filter",),
                   admm=ADMMConfig(epochs=0), retrain=TrainConfig(epochs=0), purify=False, progress=False,
                   log=lines.append)
    assert result.compact_model.out.in_features == 8
    assert any(line.startswith("filter-pruned by heads: q") for line in lines)
    space = PruningSpace.build(model, ids, heads={"q": 4})
    param_masks = space.param_masks(project(space, model, {"filter": {"q": 0.5}}))
    probe = torch.randint(0, 20, (3, 11))
    with torch.no_grad():
        assert torch.allclose(result.compact_model(probe), _masked(model, param_masks)(probe), atol=1e-5)


def test_heads_are_found_when_the_weakest_channels_happen_to_be_spread_evenly():
    """The one-step-narrower probe removes the weakest channels; when they are one per head (here at channel
    multiple 2: channels 0 and 4 of two heads of 4) the unbalanced head split went unseen, and a run broke after
    training began. The probe also removes the first channels."""
    from torch.utils.data import DataLoader, TensorDataset

    from autocompress.compress import Compression

    torch.manual_seed(0)
    model = TokenNet(Attention(12, 8, 2, "separate", named=False)).eval()
    with torch.no_grad():  # channel 0 of each head (0 and 4) the weakest of its group
        for layer in (model.attn.q, model.attn.k, model.attn.v):
            layer.weight[[0, 4]] *= 1e-3
        model.attn.proj.weight[:, [0, 4]] *= 1e-3
    data = TensorDataset(torch.randn(32, 7, 5), torch.randint(0, 3, (32,)))
    lines = []
    run = Compression(model, torch.randn(2, 7, 5), "params=1.2x", device="cpu", progress=False, log=lines.append,
                      task_args=dict(train_loader=DataLoader(data, batch_size=8), val_loader=DataLoader(data)),
                      config={"channel_multiple": 2, "budget": 1})
    assert run.pipeline.heads == {"attn.q": 2}
    assert any(line.startswith("filter-pruned by heads: attn.q") for line in lines)


def test_heads_the_channel_multiple_cannot_narrow_are_kept_with_the_multiple_that_narrows_them():
    """3 heads of 16 channels at channel multiple 16: a head can keep only multiples of 16, so none narrows, and the
    reason told a fresh user to write the head width as -1, which their reshape already did."""
    from torch.utils.data import DataLoader, TensorDataset

    from autocompress.compress import Compression

    torch.manual_seed(0)
    model = TokenNet(Attention(32, 48, 3, "fused"), dim=32).eval()
    data = TensorDataset(torch.randn(32, 7, 5), torch.randint(0, 3, (32,)))
    lines = []
    run = Compression(model, torch.randn(2, 7, 5), "params=1.05x", device="cpu", progress=False, log=lines.append,
                      task_args=dict(train_loader=DataLoader(data, batch_size=8), val_loader=DataLoader(data)),
                      config={"channel_multiple": 16, "budget": 1})
    assert run.pipeline.heads == {}
    reason = ("its 3 heads of 16 channels cannot narrow at channel multiple 16 (each head keeps a multiple of 16 "
              "channels); channel_multiple: 8 narrows them")
    assert [line for line in lines if line.startswith("not filter-pruned: attn.qkv") and line.endswith(f"{reason})")]
    assert run.pipeline.incompactable["attn.qkv"].endswith(reason)


@pytest.mark.parametrize("layout", ["fused", "chunk"])
@pytest.mark.parametrize("kept_per_head", [20, 16])
def test_a_fused_qkv_s_kept_channels_are_its_rows_over_three_in_the_width_check(layout, kept_per_head):
    """Fresh user 56: 3 heads of 20 channels in a fused qkv at channel multiple 16, left whole, failed the compact
    widths' check after the whole training budget ("compact widths {'qkv': 180} are not multiples of 16"): the
    check read the projection's 180 rows as 180 channels of a 60-channel group."""
    torch.manual_seed(0)
    model = TokenNet(Attention(12, 60, 3, layout), dim=12).eval()
    x = torch.randn(2, 7, 5)
    root = _root(layout)
    space = PruningSpace.build(model, x, channel_multiple=16, heads={root: 3})
    keep = torch.zeros(3, 20, dtype=torch.bool)
    keep[:, :kept_per_head] = True
    result = compact(model, space.param_masks(Masks(filters={root: keep.flatten()}, columns={}, weights={})), x,
                     channel_multiple=16)
    assert result.model.attn.qkv.out_features == 9 * kept_per_head
    assert misaligned_widths(space, result.model) == {}
    misshapen = copy.deepcopy(result.model)
    misshapen.attn.qkv = nn.Linear(12, 3 * 50)  # 50 channels: not 60 and not a multiple of 16
    assert misaligned_widths(space, misshapen) == {root: 50}
