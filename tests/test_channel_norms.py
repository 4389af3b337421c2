"""LayerNorms written as modules of the caller's own are recognised by what they compute and replaced by torch's
(:mod:`autocompress.channel_norms`); modules that compute something else are left alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.convnext import LayerNorm2d

from autocompress.channel_norms import layer_norm_form, standard_channel_norms


class OfficialLayerNorm(nn.Module):
    """The official ConvNeXt's LayerNorm: ``data_format`` channels_last (F.layer_norm) or channels_first (mean and
    variance over dimension 1), an ``eps`` attribute."""

    def __init__(self, channels: int, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.eps, self.data_format, self.shape = eps, data_format, (channels,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class NoBiasNorm(nn.Module):
    """A channels-first LayerNorm without bias and without an eps attribute (1e-5 written into the forward)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return self.weight[:, None, None] * (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True,
                                                                                unbiased=False) + 1e-5).sqrt()


class Affine(nn.Module):
    """A per-channel scale and shift (a layer scale): mixes no channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class RMSNorm(Affine):
    """A root-mean-square norm over the channels: mixes them, but is no LayerNorm (no mean removed)."""

    def forward(self, x):
        return super().forward(x / x.pow(2).mean(1, keepdim=True).add(1e-6).sqrt())


class OddEps(OfficialLayerNorm):
    """A LayerNorm whose eps (1e-3, in the forward only) is not an attribute and not among those tried."""

    def forward(self, x):
        return F.layer_norm(x, self.shape, self.weight, self.bias, 1e-3)


@settings(max_examples=15, deadline=None)
@given(channels=st.integers(2, 24), eps=st.sampled_from([1e-6, 1e-5, 1e-4]),
       data_format=st.sampled_from(["channels_first", "channels_last"]), seed=st.integers(0, 2 ** 16))
def test_a_layer_norm_of_ones_own_is_replaced_by_torch_s_computing_the_same(channels, eps, data_format, seed):
    torch.manual_seed(seed)
    norm = OfficialLayerNorm(channels, eps, data_format)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    assert layer_norm_form(norm) == (data_format, eps)
    model = nn.Sequential(nn.Identity(), norm)
    x = torch.randn(3, channels, 4, 6) if data_format == "channels_first" else torch.randn(3, 4, 6, channels)
    want = model(x)
    replaced = standard_channel_norms(model)
    kind = LayerNorm2d if data_format == "channels_first" else nn.LayerNorm
    assert replaced == {"1": kind.__name__} and type(model[1]) is kind and model[1].eps == eps
    assert torch.allclose(model(x), want, atol=1e-5)


def test_a_layer_norm_without_bias_or_eps_attribute_is_recognised_and_other_modules_are_not():
    assert layer_norm_form(NoBiasNorm(8)) == ("channels_first", 1e-5)
    model = nn.Sequential(NoBiasNorm(8))
    standard_channel_norms(model)
    assert type(model[0]) is LayerNorm2d and model[0].bias is None
    for other in (Affine(8), RMSNorm(8), OddEps(8), nn.LayerNorm(8), nn.BatchNorm2d(8)):
        assert layer_norm_form(other) is None, type(other).__name__
    frozen = OfficialLayerNorm(8, data_format="channels_first").requires_grad_(False).train()
    model = nn.Sequential(frozen)
    standard_channel_norms(model)
    assert not model[0].weight.requires_grad and model[0].training
