"""LayerNorms written as modules of the caller's own, recognised and replaced by torch's.

The official ConvNeXt code (and much code after it) normalises over the channels with a module of its own, a plain
``nn.Module`` holding ``weight`` and ``bias`` of ``C`` entries whose forward computes the mean and variance over
dimension 1 (``data_format="channels_first"``) or calls ``F.layer_norm`` on the last dimension
(``"channels_last"``). Nothing outside its forward says that it mixes the channels it normalises, so the channels
feeding it cannot be pruned: removing some changes the others. A module that computes what a LayerNorm over the
channels computes (checked on random inputs and random weights) is replaced by torchvision's ``LayerNorm2d``
(channels first) or ``nn.LayerNorm`` (channels last) with its weights, which the pruning space follows
(:func:`standard_channel_norms`); the compact model's LayerNorm normalises over the kept channels, as the caller's
module does once its weights shrink with them.

Not from the AutoCompress paper (Liu et al., AAAI 2020), which prunes convolutional networks.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import LayerNorm2d

from .analysis import analysis_mode, callers_class

#: the eps values tried for a module that keeps none in an ``eps`` attribute (the official ConvNeXt's, torch's)
EPS_TRIED = (1e-6, 1e-5)
#: a candidate computes a LayerNorm when its output is this close to one (relative to the output's scale)
MATCH = 1e-5


def standard_channel_norms(model: nn.Module) -> dict[str, str]:
    """Replace, in place, each module of ``model`` of the caller's own class
    (:func:`~autocompress.analysis.callers_class`) that computes a LayerNorm over the channels
    (:func:`layer_norm_form`) by the torch module computing it, with its weights: torchvision's ``LayerNorm2d`` for
    one normalising dimension 1 of ``[B, C, ...]`` inputs, ``nn.LayerNorm`` for one normalising the last dimension.

    Returns:
        the replaced modules: name -> ``"LayerNorm2d"`` or ``"LayerNorm"``.
    """
    replaced: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            form = layer_norm_form(child)
            if form is None:
                continue
            kind, eps = form
            norm = (LayerNorm2d if kind == "channels_first" else nn.LayerNorm)(
                child.weight.shape[0], eps=eps, bias=getattr(child, "bias", None) is not None)
            norm = norm.to(device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                norm.weight.copy_(child.weight)
                if norm.bias is not None:
                    norm.bias.copy_(child.bias)
            norm.weight.requires_grad_(child.weight.requires_grad)
            if norm.bias is not None:
                norm.bias.requires_grad_(child.bias.requires_grad)
            norm.train(child.training)
            setattr(module, child_name, norm)
            replaced[f"{name}.{child_name}" if name else child_name] = type(norm).__name__
    return replaced


def layer_norm_form(module: nn.Module) -> tuple[str, float] | None:
    """``("channels_first" | "channels_last", eps)`` when ``module`` is of the caller's own class, holds only a
    ``weight`` of ``C`` entries and optionally a ``bias`` of ``C`` (no buffers, no children) and computes
    ``weight * (x - mean) / sqrt(var + eps) + bias`` over dimension 1 of a ``[2, C, H, W]`` input or over the last
    dimension of a ``[2, H, W, C]`` one, on random inputs with random weights (a copy; ``module`` is unchanged);
    else None. ``eps`` is the module's ``eps`` attribute where it has a float one, else the one of
    :data:`EPS_TRIED` that matches."""
    params = dict(module.named_parameters(recurse=False))
    weight, bias = params.get("weight"), params.get("bias")
    if not callers_class(module) or weight is None or weight.dim() != 1 \
            or set(params) - {"weight", "bias"} or (bias is not None and bias.shape != weight.shape) \
            or next(module.children(), None) is not None or next(module.buffers(recurse=False), None) is not None:
        return None
    channels = weight.shape[0]
    size = 5 if channels != 5 else 6
    probe = copy.deepcopy(module).float().cpu()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters(recurse=False):
            p.copy_(torch.randn(p.shape, generator=generator))
    eps = getattr(module, "eps", None)
    tried = (eps,) if isinstance(eps, float) else EPS_TRIED
    x = torch.randn(2, channels, size, size + 2, generator=generator)
    for kind, inputs in (("channels_first", x), ("channels_last", x.permute(0, 2, 3, 1).contiguous())):
        try:
            with analysis_mode(probe):
                got = probe(inputs)
        except Exception:  # noqa: BLE001 - the caller's forward may raise anything on the other layout
            continue
        last = inputs.movedim(1, -1) if kind == "channels_first" else inputs
        for value in tried:
            with torch.no_grad():
                want = F.layer_norm(last, (channels,), probe.weight, probe.bias if bias is not None else None, value)
            want = want.movedim(-1, 1) if kind == "channels_first" else want
            if isinstance(got, torch.Tensor) and got.shape == want.shape and \
                    float((got - want).abs().max()) <= MATCH * max(1.0, float(want.abs().max())):
                return kind, float(value)
    return None
