"""``nn.MultiheadAttention`` re-expressed with its four projections as ``nn.Linear`` layers, so that heads are prunable.

``nn.MultiheadAttention`` reads its packed ``in_proj_weight`` (``[3 E, E]``) and ``out_proj.weight`` inside one
functional call, and its forward requires the attention's inner width to equal the token stream's ``E``: neither its
head width nor the stream it reads can narrow. :class:`SplitMultiheadAttention` computes the same function (same
call signature, masks, dropout, ``batch_first``, attention weights) with separate ``q_proj``, ``k_proj``,
``v_proj`` and ``out_proj`` Linears, a ``view(B, L, heads, -1)`` head split and a scale stored at the original head
width. The pipeline converts a model's multi-head attentions before it builds a pruning space
(:func:`split_multihead_attention`), after which the head widths (:mod:`autocompress.attention`) and the token
stream are pruned like those of any attention written with Linears.

Not from the AutoCompress paper (Liu et al., AAAI 2020), which prunes convolutional networks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: why a multi-head attention is left as it is (its heads and the stream it reads are then not pruned)
UNSPLIT_REASONS = {"add_bias_kv": "it has add_bias_kv (learned key / value biases appended to the sequence)",
                   "add_zero_attn": "it has add_zero_attn (a zero key / value appended to the sequence)"}


class SplitMultiheadAttention(nn.Module):
    """Multi-head attention computing what ``nn.MultiheadAttention`` computes, with separate projection layers.

    Args:
        embed_dim: ``E``, the query's channels (and the output's).
        num_heads: ``h``.
        dropout: dropout probability on the attention weights, in training mode.
        bias: the projections have biases.
        kdim / vdim: the key's / value's channels (default ``E``).
        batch_first: inputs and output are ``[B, L, E]`` (else ``[L, B, E]``); unbatched ``[L, E]`` also works.
        head_dim: each head's width (default ``E / h``); the scores are scaled by ``scale`` (default
            ``head_dim ** -0.5``), which stays fixed when pruning narrows the heads.

    Layers: ``q_proj`` (E -> h d), ``k_proj`` (kdim -> h d), ``v_proj`` (vdim -> h d), ``out_proj`` (h d -> E).
    Attributes ``_qkv_same_embed_dim = False`` and ``in_proj_bias = None`` send ``nn.TransformerEncoderLayer``
    down its ordinary path, which calls this module (its fused inference path reads packed weights).
    """

    _qkv_same_embed_dim = False
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 head_dim: int | None = None, scale: float | None = None):
        super().__init__()
        head_dim = head_dim if head_dim is not None else embed_dim // num_heads
        inner = num_heads * head_dim
        self.num_heads, self.dropout, self.batch_first = num_heads, dropout, batch_first
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @property
    def embed_dim(self) -> int:
        """``E``, the output's channels: ``out_proj``'s, so it follows pruning of the stream."""
        return self.out_proj.out_features

    def config(self) -> dict:
        """Constructor arguments as plain data (:mod:`autocompress.architecture`)."""
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads, "dropout": self.dropout,
                "bias": self.q_proj.bias is not None, "kdim": self.k_proj.in_features,
                "vdim": self.v_proj.in_features, "batch_first": self.batch_first,
                "head_dim": self.q_proj.out_features // self.num_heads, "scale": self.scale}

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        """The same attention with the same weights (``mha`` without add_bias_kv / add_zero_attn)."""
        bias = mha.in_proj_bias is not None
        split = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias, mha.kdim, mha.vdim, mha.batch_first)
        weights = (mha.in_proj_weight.chunk(3) if mha._qkv_same_embed_dim else
                   (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
        biases = mha.in_proj_bias.chunk(3) if bias else (None, None, None)
        with torch.no_grad():
            for layer, weight, b in zip((split.q_proj, split.k_proj, split.v_proj), weights, biases):
                layer.weight.copy_(weight)
                if b is not None:
                    layer.bias.copy_(b)
            split.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                split.out_proj.bias.copy_(mha.out_proj.bias)
        ref = mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight
        return split.to(device=ref.device, dtype=ref.dtype).train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Arguments and returns as ``nn.MultiheadAttention.forward``: ``query`` ``[B, L, E]`` (``[L, B, E]``
        unless ``batch_first``, or ``[L, E]``), ``key`` / ``value`` ``[B, S, kdim / vdim]``, ``key_padding_mask``
        ``[B, S]`` and ``attn_mask`` ``[L, S]`` or ``[B h, L, S]`` (bool: True = not attended; float: added).
        Returns the output (the query's layout) and the attention weights ``[B, L, S]`` (``[B, h, L, S]`` unless
        ``average_attn_weights``) or None when not ``need_weights``.

        Raises:
            RuntimeError: ``is_causal`` without ``attn_mask`` (as ``nn.MultiheadAttention``).
        """
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else self._mask(query, key, key_padding_mask, attn_mask)
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(B, L, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(key).view(B, S, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(value).view(B, S, self.num_heads, -1).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * self.scale) @ k.transpose(-2, -1)
            weights = (scores if mask is None else scores + mask).softmax(-1)
            out = (F.dropout(weights, dropout) if dropout > 0 else weights) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.scale)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, -1))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _mask(self, query: torch.Tensor, key: torch.Tensor, key_padding_mask: torch.Tensor | None,
              attn_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The additive float mask ``[B or 1, h or 1, L, S]`` of both masks (None when neither is given)."""
        mask = None
        if attn_mask is not None:
            attn_mask = _additive(attn_mask, query.dtype)
            mask = (attn_mask.view(query.shape[0], self.num_heads, *attn_mask.shape[1:]) if attn_mask.dim() == 3
                    else attn_mask)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, query.dtype).view(key.shape[0], 1, 1, key.shape[1])
            mask = padding if mask is None else mask + padding
        return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = not attended) as 0 / -inf in ``dtype``; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


def unsplit_reason(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot be re-expressed by :class:`SplitMultiheadAttention`, or None."""
    if mha.bias_k is not None:
        return UNSPLIT_REASONS["add_bias_kv"]
    if mha.add_zero_attn:
        return UNSPLIT_REASONS["add_zero_attn"]
    return None


def split_multihead_attention(model: nn.Module) -> dict[str, str]:
    """Replace, in place, each ``nn.MultiheadAttention`` of ``model`` by a :class:`SplitMultiheadAttention` with
    its weights (the same function), and stop the ``nn.TransformerEncoder`` holding one from packing its inputs
    into nested tensors (its fused inference path; padded positions then hold values instead of zeros).

    Returns:
        the attentions left as they are: module name -> why.
    """
    left: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.MultiheadAttention:
                continue
            full = f"{name}.{child_name}" if name else child_name
            reason = unsplit_reason(child)
            if reason is not None:
                left[full] = reason
                continue
            setattr(module, child_name, SplitMultiheadAttention.from_multihead(child))
    unnest(model)
    return left


def unnest(model: nn.Module) -> None:
    """Stop each ``nn.TransformerEncoder`` of ``model`` whose layers hold a :class:`SplitMultiheadAttention` from
    packing padded inputs into nested tensors (its fused inference path reads the packed weights of
    ``nn.MultiheadAttention``)."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and isinstance(getattr(module.layers[0], "self_attn", None),
                                                                     SplitMultiheadAttention):
            module.use_nested_tensor = False


__all__ = ["SplitMultiheadAttention", "split_multihead_attention", "unnest", "unsplit_reason"]
