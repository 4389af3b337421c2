"""nn.MultiheadAttention re-expressed with Linear projections: the same function under every calling convention,
its heads pruned with every head equally wide, and the compact model saved and rebuilt from a fresh instance."""
from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import autocompress
from autocompress.admm import ADMMConfig
from autocompress.architecture import apply_architecture, describe_architecture
from autocompress.multihead import UNSPLIT_REASONS, SplitMultiheadAttention, split_multihead_attention
from autocompress.projection import project
from autocompress.pruning import expand_rates, prune
from autocompress.serialization import save_compact
from autocompress.space import PruningSpace
from autocompress.training import TrainConfig
from test_attention import _masked


@settings(max_examples=60, deadline=None)
@given(batch_first=st.booleans(), bias=st.booleans(), kdim=st.sampled_from([None, 5]), heads=st.sampled_from([1, 2, 3]),
       need_weights=st.booleans(), average=st.booleans(), padding=st.sampled_from([None, "bool", "float"]),
       mask=st.sampled_from([None, "causal", "float", "per_head"]), causal_hint=st.booleans(), batched=st.booleans(),
       seed=st.integers(0, 1000))
def test_the_split_attention_computes_what_nn_multiheadattention_computes(
        batch_first, bias, kdim, heads, need_weights, average, padding, mask, causal_hint, batched, seed):
    torch.manual_seed(seed)
    E, B, L = 6 * heads, 2, 4
    S = L if kdim is None else 3
    mha = nn.MultiheadAttention(E, heads, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    split = SplitMultiheadAttention.from_multihead(mha).eval()

    def tokens(n, d):
        if not batched:
            return torch.randn(n, d)
        return torch.randn(B, n, d) if batch_first else torch.randn(n, B, d)

    query, key, value = tokens(L, E), tokens(S, kdim or E), tokens(S, kdim or E)
    key_padding = {None: None, "bool": torch.arange(S).expand(B, S) >= S - 1, "float": torch.randn(B, S)}[padding]
    if key_padding is not None and not batched:
        key_padding = key_padding[0]
    attn_mask = {None: None, "causal": torch.ones(L, S, dtype=torch.bool).triu(1), "float": torch.randn(L, S),
                 "per_head": torch.randn(B * heads if batched else heads, L, S)}[mask]
    is_causal = causal_hint and mask == "causal" and S == L
    with torch.no_grad():
        want = mha(query, key, value, key_padding_mask=key_padding, need_weights=need_weights, attn_mask=attn_mask,
                   average_attn_weights=average, is_causal=is_causal)
        got = split(query, key, value, key_padding_mask=key_padding, need_weights=need_weights, attn_mask=attn_mask,
                    average_attn_weights=average, is_causal=is_causal)
    assert got[0].shape == want[0].shape and torch.allclose(got[0], want[0], atol=1e-5)
    if need_weights:
        assert got[1].shape == want[1].shape and torch.allclose(got[1], want[1], atol=1e-6)
    else:
        assert got[1] is None and want[1] is None


class TokenEncoder(nn.Module):
    """Token ids ``[B, N]`` (and an optional key padding mask ``[B, N]``, True = padding) -> logits ``[B, classes]``
    through ``nn.TransformerEncoder`` (batch first, post-norm)."""

    def __init__(self, vocab: int = 30, dim: int = 32, heads: int = 4, layers: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.fc = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.encoder(self.embed(ids), src_key_padding_mask=padding).mean(1))


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (3, 7), generator=generator)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    return ids, padding


def test_split_keeps_the_encoder_s_function_and_leaves_attentions_with_appended_keys():
    torch.manual_seed(0)
    model = TokenEncoder().eval()
    biased = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    model.extra = biased
    ids, padding = _inputs(0)
    original = copy.deepcopy(model)
    with torch.no_grad():
        want = model(ids)
        left = split_multihead_attention(model)
        got = model(ids)
    assert left == {"extra": UNSPLIT_REASONS["add_bias_kv"]}
    assert model.extra is biased
    assert all(isinstance(layer.self_attn, SplitMultiheadAttention) for layer in model.encoder.layers)
    assert torch.allclose(got, want, atol=1e-5)
    model.train(), original.train()
    with torch.no_grad():  # training mode with a padding mask: the encoders' ordinary paths
        assert torch.allclose(model(ids, padding), original(ids, padding), atol=1e-5)


def test_prune_narrows_an_encoder_s_heads_and_token_stream_and_the_saved_model_rebuilds_from_a_fresh_instance(
        tmp_path):
    torch.manual_seed(0)
    model = TokenEncoder().eval()
    lines = []
    rates = {"default": 0.5}
    result = prune(model, rates, example_inputs=_inputs(0)[0], device="cpu", dims=("filter",),
                   admm=ADMMConfig(epochs=0), retrain=TrainConfig(epochs=0), purify=False, progress=False,
                   layer_norm="padded", log=lines.append)  # padded: the norms keep the masked model's statistics
    compact = result.compact_model
    assert len([line for line in lines if line.startswith("filter-pruned by heads") and "4 heads" in line]) == 2
    assert compact.embed.embedding_dim == compact.embed.weight.shape[1] == 16  # the token stream, through the table
    for layer in compact.encoder.layers:
        attention = layer.self_attn
        assert attention.q_proj.out_features == attention.v_proj.out_features == 16  # 4 heads of 4 (of 8)
        assert attention.out_proj.in_features == 16 and attention.out_proj.out_features == attention.embed_dim == 16
        assert attention.scale == 8 ** -0.5  # the scores keep the original head width's scale
    ids, padding = _inputs(1)
    split = copy.deepcopy(model)
    split_multihead_attention(split)
    heads = {f"encoder.layers.{i}.self_attn.q_proj": 4 for i in range(2)}
    space = PruningSpace.build(split, (ids,), dims=("filter",), heads=heads)
    masked = _masked(split, space.param_masks(project(space, split, expand_rates(space, rates, ("filter",)))))
    with torch.no_grad():
        assert torch.allclose(compact(ids), masked(ids), atol=1e-5)
    rebuilt = apply_architecture(TokenEncoder(), describe_architecture(compact))
    rebuilt.load_state_dict(compact.state_dict())
    rebuilt.eval()
    with torch.no_grad():  # eval with a padding mask: the encoder's nested-tensor path stays off
        assert torch.equal(rebuilt(ids, padding), compact(ids, padding))
    path = save_compact(tmp_path / "compact.pt", compact, model_class=TokenEncoder, model_kwargs={})
    loaded = autocompress.load(path, model=TokenEncoder())
    with torch.no_grad():
        assert torch.equal(loaded(ids), compact(ids))
