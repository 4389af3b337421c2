"""Speed of compact models whose norms lost channels (PaddedGroupNorm / PaddedLayerNorm) in onnxruntime.

Two small models with normalisation layers that filter pruning narrows: a MobileNet-style CNN with GroupNorm
(inverted residuals, squeeze-excitation; 28x28 inputs) and a ViT with pre-norm LayerNorm blocks (4x4 patches,
width 64, heads reshaped with -1). Each is compressed to ``flops=2x`` with ``budget: 1`` on random images (the
speed is what is measured here; the accuracy means nothing), then the base and the compact model are timed side by
side in onnxruntime (1 thread, median over interleaved repeats) at batch 1 and 64. A model with LayerNorms is
compressed twice, ``layer_norm: kept`` (plain LayerNorms over the kept channels) and ``padded``
(``PaddedLayerNorm``), at the same widths. Compare two versions of the library by running this script under each
one's ``PYTHONPATH``.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/padded_norm_speed.py
"""
from __future__ import annotations

import logging
import time
from functools import partial
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

import autocompress
from autocompress.export import onnx_bytes
from autocompress.padded_norm import LAYER_NORM_FORMS


class InvertedResidual(nn.Module):
    def __init__(self, width: int, expand: int, groups: int):
        super().__init__()
        hidden = width * expand
        self.expand = nn.Sequential(nn.Conv2d(width, hidden, 1), nn.GroupNorm(groups, hidden), nn.GELU())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
                                       nn.GroupNorm(groups, hidden), nn.GELU())
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, hidden // 4, 1), nn.ReLU(),
                                  nn.Conv2d(hidden // 4, hidden, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(hidden, width, 1), nn.GroupNorm(groups, width))

    def forward(self, x):
        h = self.depthwise(self.expand(x))
        return x + self.project(h * self.gate(h))


class GroupNormNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.GELU())
        self.blocks = nn.Sequential(InvertedResidual(32, 3, 8), InvertedResidual(32, 3, 8),
                                    nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.GELU(),
                                    InvertedResidual(64, 2, 8))
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, width: int = 64, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(1, width, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 50, width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, 4) for _ in range(3)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def median_ms(calls: dict[str, Callable[[], object]], runs: int, repeats: int = 7) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved blocks of ``runs`` calls."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            for _ in range(max(2, runs // 10)):
                call()
            start = time.perf_counter()
            for _ in range(runs):
                call()
            times[name].append((time.perf_counter() - start) / runs * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def session(model: nn.Module, example: torch.Tensor) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes(model, example), options, providers=["CPUExecutionProvider"])


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    images = torch.randn(64, 1, 28, 28)
    labels = torch.randint(0, 10, (64,))
    loader = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, 64, 16)]
    for name, base in (("groupnorm_net", GroupNormNet()), ("tiny_vit", TinyViT())):
        forms = LAYER_NORM_FORMS if any(isinstance(m, nn.LayerNorm) for m in base.modules()) else ("kept",)
        models = {"base": base.eval()}
        for form in forms:  # the same seed and target: the same widths, only the LayerNorms' form differs
            result = autocompress.compress(base.eval(), images[:1], "flops=2x", train_loader=loader,
                                           val_loader=loader, device="cpu", progress=False,
                                           config={"budget": 1, "layer_norm": form})
            models[f"compact ({form})" if len(forms) > 1 else "compact"] = result.model.eval()
            norms = sorted({type(m).__name__ for m in result.model.modules() if "Norm" in type(m).__name__})
            rows = result.final["rows"]
            print(f"{name}, layer_norm {form}: {', '.join(norms)}; MACs {rows[0]['macs'] / rows[1]['macs']:.2f}x "
                  "fewer", flush=True)
        with torch.no_grad():
            for batch, runs in ((1, 200), (64, 20)):
                x = torch.randn(batch, 1, 28, 28)
                sessions = {k: session(m, x) for k, m in models.items()}
                for runtime, calls in (("onnxruntime", {k: partial(s.run, None, {"input": x.numpy()})
                                                        for k, s in sessions.items()}),
                                       ("torch", {k: partial(m, x) for k, m in models.items()})):
                    ms = median_ms(calls, runs)
                    compacts = ", ".join(f"{k} {ms[k]:.3f} ms ({ms['base'] / ms[k]:.2f}x)" for k in ms if k != "base")
                    print(f"  {runtime} batch {batch}: base {ms['base']:.3f} ms, {compacts}", flush=True)


if __name__ == "__main__":
    main()
