"""Short budgets on users' own models: autocompress against Torch-Pruning fine-tuned with the user's loop.

Fresh users compress their own model with a target and ``budget: 3-4`` and compare it with Torch-Pruning
fine-tuned for as many epochs of *their* loop (session 34: 0.6-1.7 points behind on two such models, one seed each).
This script plays such users on CIFAR-10: five architectures written the way users write them (a residual CNN, the
same of concatenated branches added to the stream they read, a VGG-style net with a hidden fully connected layer and
Dropout, a MobileNet-style net of depthwise inverted residuals, the same with squeeze-and-excitation, Hardswish and
pooled features concatenated, a ResNeXt / Inception-style net of grouped convolutions and concatenated branches, a
ConvNeXt-style net of LayerNorms and depthwise 7x7 convolutions, a hybrid vision transformer with a conv stem and
chunked qkv projections, the same transformer written with ``nn.TransformerEncoder``, torchvision's
``VisionTransformer``), each trained as a base with the user's loop (AdamW, lr 2e-3, cosine, random flips;
``--base-epochs`` epochs over ``--max-train`` seeded training images, batch 64: fewer than 800 steps an epoch, so
the budget runs no ADMM and no search), then compressed to ``--target`` with ``--budget`` epochs by each method:

* ``ac``: ``autocompress.compress`` with the target and the budget only (its default loop);
* ``ac_own``: the same with ``train_fn`` = the user's loop (AdamW lr 1e-3, cosine over the phase), so against
  ``tp_own`` only the pruned structure differs;
* ``ac_filter``: ``dims: filter`` (no column pruning); ``ac_nokd``: no distillation; ``ac_magnitude`` /
  ``ac_guided``: ``search.start: magnitude`` / ``guided``; ``ac_probe``: ``search.start: auto`` probed at any number
  of steps (the probe of the two starts, which shorter runs skip); ``ac_any`` / ``ac_m4`` / ``ac_m8``:
  ``channel_multiple`` 1 / 4 / 8; ``ac_adamw`` / ``ac_sgd``: ``retrain.optimizer: adamw`` / ``sgd`` (``ac``'s
  default ``auto`` probes both on these classifiers, session 36); ``ac_stop0`` / ``ac_stopm1``:
  ``distillation.stop_margin: 0`` (the default since session 40) / ``-0.01``; ``ac_padded``: ``layer_norm: padded``
  (the ``convnext`` model's LayerNorms keep their statistics over all channels); ``ac_noheads``: the attention
  heads' channels kept (:func:`autocompress.attention.head_count` finds no count, as before session 38; the ``vit``
  model); ``ac_unsplit``: ``nn.MultiheadAttention`` left as it is (before session 39: its heads and the stream it
  reads are not pruned; the ``mhavit`` model); ``ac_uniform``: one rate for every unit (``search_mode: uniform``);
  ``ac_keepwidth``: no width attribute follows a narrowed group (before session 40: the ``tvvit`` model's token
  stream, whose width its forward reads from ``self.hidden_dim``, is kept);
* ``tp_own``: Torch-Pruning 1.6 global L2 group magnitude bisected to the target (the last Linear kept), then
  ``--budget`` epochs of the user's loop (what a user compares with); ``tp_own16``: the same at ``round_to=16``
  (widths on onnxruntime's AVX-512 channel block, as ``channel_multiple: auto`` keeps ours).

Each row also gives ``ort_b1_speedup``: the base's onnxruntime latency over the compressed model's (batch 1, 1
thread, interleaved medians of 200 runs; under load a ratio, not an absolute speed).

Top-1 on the full 10,000-image test split (standard error ~0.45 points at 60-70 %). Bases are cached in
``--cache``; one JSON line per (model, method, seed, target, budget) in ``--out``, rows already there skipped.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/short_budget.py --models resnet,vgg,mobile,resnext \\
        --methods ac,ac_own,tp_own --seeds 0,1 --out benchmarks/results/short_budget.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple
from unittest import mock

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.vision_transformer import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks" / "peers")]

import autocompress  # noqa: E402
from autocompress import compaction, metrics, rounds  # noqa: E402
from autocompress.config import Target  # noqa: E402
from autocompress.data import get_dataset  # noqa: E402
from autocompress.latency import LatencyConfig, measure_models  # noqa: E402
from torch_pruning_baseline import prune_to_target  # noqa: E402
from weak_teacher import top1  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ARCHIVE = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
EXAMPLE = torch.zeros(1, 3, 32, 32)


def conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class ResNet(nn.Module):
    """A 32-channel stem, residual blocks 32 / 64 (stride 2) / 128 (stride 2), global pooling, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.layers = nn.Sequential(Residual(32, 32, 1), Residual(32, 64, 2), Residual(64, 128, 2))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class VGG(nn.Module):
    """conv 32-32, pool, 64-64, pool, 128, pool; a hidden Linear of 256 with Dropout 0.3; Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 32), conv_bn(32, 32), nn.MaxPool2d(2), conv_bn(32, 64),
                                      conv_bn(64, 64), nn.MaxPool2d(2), conv_bn(64, 128), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(inplace=True),
                                        nn.Dropout(0.3), nn.Linear(256, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class CatBranches(nn.Module):
    """Fresh user 70's block: a 1x1 and a 3x3 branch (three quarters and a quarter of the width) concatenated,
    normalised and added to the stream they read."""

    def __init__(self, width: int):
        super().__init__()
        self.wide, self.narrow = conv_bn(width, width * 3 // 4, kernel=1), conv_bn(width, width // 4)
        self.norm = nn.BatchNorm2d(width)

    def forward(self, x):
        return F.relu(x + self.norm(torch.cat([self.wide(x), self.narrow(x)], 1)))


class CatResNet(nn.Module):
    """A 32-channel stem, two CatBranches blocks at 32, a stride-2 conv to 64, two blocks, a stride-2 conv to 128,
    one block, global pooling, Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 32), CatBranches(32), CatBranches(32), conv_bn(32, 64, 2),
                                      CatBranches(64), CatBranches(64), conv_bn(64, 128, 2), CatBranches(128))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(conv_bn(cin, hidden, kernel=1), conv_bn(hidden, hidden, stride, groups=hidden),
                                  nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class Mobile(nn.Module):
    """A MobileNetV2-style net: stem 16, inverted residuals 16-24(s2)-24-48(s2)-48, 1x1 to 192, pooling."""

    def __init__(self):
        super().__init__()
        widths = [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 48, 2), (48, 48, 1)]
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(*(InvertedResidual(*w) for w in widths))
        self.head = conv_bn(48, 192, kernel=1)
        self.fc = nn.Linear(192, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))), 1).flatten(1))


class SEInvertedResidual(nn.Module):
    """An inverted residual as MobileNetV3 writes it: 1x1 expansion, depthwise 3x3, Hardswish, a
    squeeze-and-excitation gate (mean over positions, 1x1 down to a quarter, ReLU, 1x1 up, Hardsigmoid), 1x1
    projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.Hardswish())
        self.gate = nn.Sequential(nn.Conv2d(hidden, hidden // 4, 1), nn.ReLU(), nn.Conv2d(hidden // 4, hidden, 1),
                                  nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = self.depthwise(self.expand(x))
        h = self.project(h * self.gate(h.mean((2, 3), keepdim=True)))
        return x + h if self.residual else h


class MobileSE(nn.Module):
    """A MobileNetV3-style net as fresh user 70 wrote one: stem 16 (Hardswish), squeeze-and-excitation inverted
    residuals 16-24(s2)-24-40(s2)-40-80(s2)-80, 1x1 to 256, average- and max-pooled features concatenated,
    Dropout, Linear."""

    def __init__(self):
        super().__init__()
        widths = [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 40, 2), (40, 40, 1), (40, 80, 2), (80, 80, 1)]
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(*(SEInvertedResidual(*w) for w in widths))
        self.head = nn.Sequential(nn.Conv2d(80, 256, 1, bias=False), nn.BatchNorm2d(256), nn.Hardswish())
        self.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 10))

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1))


class SqueezeExcite(nn.Module):
    """Mean over positions, 1x1 down to a quarter (8 at the least), ReLU, 1x1 up, Hardsigmoid, times the input."""

    def __init__(self, width: int):
        super().__init__()
        squeezed = max(8, width // 4)
        self.gate = nn.Sequential(nn.Conv2d(width, squeezed, 1), nn.ReLU(), nn.Conv2d(squeezed, width, 1),
                                  nn.Hardsigmoid())

    def forward(self, x):
        return x * self.gate(x.mean((2, 3), keepdim=True))


class GhostModule(nn.Module):
    """A ghost module (GhostNet, Han et al. CVPR 2020): a 1x1 conv to half the width, a depthwise 3x3 of it, both
    concatenated and cut to ``out`` channels."""

    def __init__(self, cin: int, out: int, relu: bool = True):
        super().__init__()
        self.out, half = out, (out + 1) // 2
        act = nn.ReLU() if relu else nn.Identity()
        self.primary = nn.Sequential(nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), act)
        self.cheap = nn.Sequential(nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False), nn.BatchNorm2d(half),
                                   act)

    def forward(self, x):
        a = self.primary(x)
        return torch.cat([a, self.cheap(a)], 1)[:, :self.out]


class GhostBottleneck(nn.Module):
    """Ghost module (expand), a depthwise 3x3 where it strides, squeeze-and-excitation (optional), ghost module
    (project, no ReLU), plus the input (a depthwise + 1x1 shortcut where the shape changes)."""

    def __init__(self, cin: int, mid: int, out: int, stride: int = 1, se: bool = False):
        super().__init__()
        self.expand = GhostModule(cin, mid)
        self.dw = (nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid))
                   if stride > 1 else nn.Identity())
        self.se = SqueezeExcite(mid) if se else nn.Identity()
        self.project = GhostModule(mid, out, relu=False)
        self.shortcut = nn.Identity() if stride == 1 and cin == out else nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
            nn.Conv2d(cin, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        return self.project(self.se(self.dw(self.expand(x)))) + self.shortcut(x)


class Ghost(nn.Module):
    """A GhostNet-style net as fresh user 72 wrote one: stem 16, ghost bottlenecks 16-24(s2)-24-40(s2, SE)-40(SE)
    -80(s2)-80, 1x1 to 256, average pool, Linear."""

    def __init__(self):
        super().__init__()
        cfg = [(16, 16, 16, 1, False), (16, 48, 24, 2, False), (24, 72, 24, 1, False), (24, 72, 40, 2, True),
               (40, 120, 40, 1, True), (40, 240, 80, 2, False), (80, 200, 80, 1, False)]
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(*(GhostBottleneck(*c) for c in cfg))
        self.head = nn.Sequential(nn.Conv2d(80, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU())
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class Inception(nn.Module):
    """Two branches concatenated: a 1x1 conv and a 1x1 -> grouped 3x3 conv."""

    def __init__(self, cin: int, each: int, stride: int):
        super().__init__()
        self.one = conv_bn(cin, each, stride, kernel=1)
        self.three = nn.Sequential(conv_bn(cin, each, kernel=1), conv_bn(each, each, stride, groups=8))

    def forward(self, x):
        return torch.cat([self.one(x), self.three(x)], 1)


class ResNeXt(nn.Module):
    """Stem 32, a grouped bottleneck with a residual, two Inception-style blocks (stride 2), Dropout, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.bottleneck = nn.Sequential(conv_bn(32, 64, kernel=1), conv_bn(64, 64, groups=8),
                                        nn.Conv2d(64, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.mix = nn.Sequential(Inception(32, 48, 2), Inception(96, 64, 2))
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(128, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bottleneck(x))
        return self.fc(self.drop(F.adaptive_avg_pool2d(self.mix(x), 1).flatten(1)))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, a LayerNorm over the channels on channels-last data, Linear 4x, GELU, Linear, residual."""

    def __init__(self, width: int):
        super().__init__()
        self.dw, self.norm = nn.Conv2d(width, width, 7, padding=3, groups=width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        return x + self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """A ConvNeXt-style net: a 2x2 patchify stem to 32 channels and torchvision's channels-first LayerNorm2d,
    two blocks at each of 32 / 64 / 128 channels, a LayerNorm2d + 2x2 stride-2 conv between stages, pooling,
    LayerNorm, Linear (no BatchNorm: every channel of the residual stream passes LayerNorms)."""

    def __init__(self):
        super().__init__()
        widths, layers = (32, 64, 128), []
        for i, width in enumerate(widths):
            layers += [nn.Sequential(nn.Conv2d(3, width, 2, 2), LayerNorm2d(width)) if i == 0 else
                       nn.Sequential(LayerNorm2d(widths[i - 1]), nn.Conv2d(widths[i - 1], width, 2, 2))]
            layers += [ConvNeXtBlock(width), ConvNeXtBlock(width)]
        self.features = nn.Sequential(*layers)
        self.norm, self.fc = nn.LayerNorm(widths[-1]), nn.Linear(widths[-1], 10)

    def forward(self, x):
        return self.fc(self.norm(self.features(x).mean((2, 3))))


class Attention(nn.Module):
    """Multi-head self-attention as users write it: one qkv Linear chunked into q, k and v, each viewed into
    ``heads`` heads with ``-1``, the scale stored at init, an output Linear."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (t.view(B, N, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm, attention, residual; LayerNorm, MLP 2x with GELU, residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(width), Attention(width, heads), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A hybrid vision transformer: a conv stem (3x3 stride 2 to 48 channels, BatchNorm, ReLU, 2x2 stride 2 to 128)
    to 8x8 tokens, a learned position embedding, four blocks of width 128 with 4 heads, LayerNorm, mean over
    tokens, Linear."""

    def __init__(self, width: int = 128, heads: int = 4, depth: int = 4):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 48, 2), nn.Conv2d(48, width, 2, 2))
        self.pos = nn.Parameter(torch.zeros(1, 64, width))
        self.blocks = nn.Sequential(*(ViTBlock(width, heads) for _ in range(depth)))
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.blocks(x)).mean(1))


class EncoderViT(nn.Module):
    """The same hybrid vision transformer written with ``nn.TransformerEncoder`` (pre-norm
    ``nn.TransformerEncoderLayer``: ``nn.MultiheadAttention``, MLP 2x with GELU, no dropout) instead of blocks of
    one's own."""

    def __init__(self, width: int = 128, heads: int = 4, depth: int = 4):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 48, 2), nn.Conv2d(48, width, 2, 2))
        self.pos = nn.Parameter(torch.zeros(1, 64, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.encoder(x)).mean(1))


def TorchvisionViT() -> nn.Module:  # noqa: N802 - a model class to the caller
    """torchvision's ``VisionTransformer`` as a user builds it for 32x32 images (patches of 4, 4 layers of 4 heads,
    width 128, MLP 256, no dropout): its forward writes the width into a reshape (``self.hidden_dim``)."""
    return VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=256,
                             num_classes=10)


MODELS = {"resnet": ResNet, "catres": CatResNet, "vgg": VGG, "mobile": Mobile, "mobile_se": MobileSE, "ghost": Ghost,
          "resnext": ResNeXt, "convnext": ConvNeXt, "vit": ViT, "mhavit": EncoderViT, "tvvit": TorchvisionViT}

AC_CONFIGS = {"ac": {}, "ac_own": {}, "ac_filter": {"dims": "filter"}, "ac_nokd": {"distillation": {"enabled": False}},
              "ac_magnitude": {"search": {"start": "magnitude"}}, "ac_guided": {"search": {"start": "guided"}},
              "ac_probe": {},
              "ac_any": {"channel_multiple": 1},
              "ac_any_magnitude": {"channel_multiple": 1, "search": {"start": "magnitude"}},
              "ac_m4": {"channel_multiple": 4}, "ac_m8": {"channel_multiple": 8},
              "ac_adamw": {"retrain": {"optimizer": "adamw"}}, "ac_sgd": {"retrain": {"optimizer": "sgd"}},
              "ac_stop0": {"distillation": {"stop_margin": 0.0}}, "ac_padded": {"layer_norm": "padded"},
              "ac_noheads": {}, "ac_unsplit": {}, "ac_uniform": {"search_mode": "uniform"}, "ac_keepwidth": {},
              "ac_stopm1": {"distillation": {"stop_margin": -0.01}}}
#: TP_IGNORED_NOTE: Torch-Pruning 1.6's importance fails on the ``vit`` model's chunked qkv projections (IndexError:
#: index 128 is out of bounds), with or without ``num_heads`` and ``prune_head_dims``; they are in its
#: ``ignored_layers`` (what a user is left with), which also keeps the token stream whole.
#: Torch-Pruning methods: each one's ``round_to`` (channel counts kept a multiple of it; None: any)
TP_ROUND_TO = {"tp_own": None, "tp_own16": 16}


def loaders(seed: int, max_train: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Seeded train subset (batches of 64, shuffled by a seeded generator), 2,000 validation images carved from
    the training split, the full test split."""
    data = get_dataset("cifar10", ARCHIVE, val_size=2000, seed=seed, max_train=max_train)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (data.mean, data.std))

    def tensors(split) -> TensorDataset:
        return TensorDataset((split.images.float() / 255.0 - mean) / std, split.labels)

    return (DataLoader(tensors(data.train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(seed)),
            DataLoader(tensors(data.val), batch_size=256), DataLoader(tensors(data.test), batch_size=256))


class UserOptimizer(NamedTuple):
    """One of the user's optimisers: how to build it, its lr for training a base and for fine-tuning."""

    build: Callable
    base_lr: float
    fine_tune_lr: float


#: the user's optimisers (``--base-optimizer``)
USER_OPTIMIZERS = {
    "adamw": UserOptimizer(lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=5e-4), 2e-3, 1e-3),
    "sgd": UserOptimizer(lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                                                             weight_decay=5e-4), 0.05, 0.01)}


def user_loop(model: nn.Module, loader: DataLoader, epochs: int, lr: float, *, optimizer: str = "adamw",
              flips: bool = False, attach=lambda optimizer: optimizer, penalty=lambda: 0.0) -> None:
    """The user's loop: ``optimizer`` (:data:`USER_OPTIMIZERS`, weight decay 5e-4) at ``lr`` on a cosine schedule
    over ``epochs``, cross-entropy; ``flips``: random horizontal flips of half of each batch (seeded by the
    caller)."""
    optimizer = attach(USER_OPTIMIZERS[optimizer].build(model.parameters(), lr))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * len(loader)))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            if flips:
                flip = torch.rand(len(x)) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            optimizer.zero_grad()
            (F.cross_entropy(model(x), y) + penalty()).backward()
            optimizer.step()
            schedule.step()


def base_model(name: str, train: DataLoader, epochs: int, cache: Path, optimizer: str = "adamw") -> nn.Module:
    """The model trained by the user's loop (``optimizer`` at its base lr, flips; ``train`` reseeded), cached as
    ``cache/NAME_eEPOCHS.pt`` (AdamW) or ``cache/NAME_OPTIMIZER_eEPOCHS.pt``."""
    path = cache / (f"{name}_e{epochs}.pt" if optimizer == "adamw" else f"{name}_{optimizer}_e{epochs}.pt")
    torch.manual_seed(0)
    train.generator.manual_seed(0)
    model = MODELS[name]()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    user_loop(model, train, epochs, USER_OPTIMIZERS[optimizer].base_lr, optimizer=optimizer, flips=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def run_autocompress(base: nn.Module, data: tuple, method: str, seed: int, target: str, budget: int,
                     optimizer: str = "adamw") -> dict:
    train, val, test = data
    train_fn = None
    if method == "ac_own":
        def train_fn(model, phase):
            user_loop(model, train, phase.epochs, USER_OPTIMIZERS[optimizer].fine_tune_lr, optimizer=optimizer,
                      attach=phase.attach, penalty=phase.penalty)
    heads = (lambda *args: None) if method == "ac_noheads" else rounds.head_count
    split = (lambda model: {}) if method == "ac_unsplit" else rounds.split_multihead_attention
    widths = (lambda model, narrowed: []) if method == "ac_keepwidth" else compaction.width_attributes
    probe_from = (lambda factor: 0) if method == "ac_probe" else rounds.start_probe_steps
    with mock.patch.object(rounds, "head_count", heads), \
            mock.patch.object(rounds, "split_multihead_attention", split), \
            mock.patch.object(compaction, "width_attributes", widths), \
            mock.patch.object(rounds, "start_probe_steps", probe_from):
        result = autocompress.compress(base, EXAMPLE, target, train_loader=train, val_loader=val,
                                       train_fn=train_fn, device="cpu", progress=False, log=lambda line: None,
                                       config={"budget": budget, "seed": seed, **AC_CONFIGS[method]})
    chosen = next((r for r in result.records if r.get("event") == "optimizer"), None)
    start = next((r["choice"] for r in result.records if r.get("event") == "start"), None)
    return {"top1": top1(result.model, test), "macs_x": result.mac_reduction,
            "params_x": result.compression_rate, "schedule": result.final.get("schedule"), "optimizer": chosen,
            "start": start, "warnings": result.final.get("warnings"),
            "deployed": (result.final.get("deployed") or {}).get("batches"),
            "phase_seconds": result.phase_seconds}, result.model


def run_torch_pruning(base: nn.Module, data: tuple, seed: int, target: str, budget: int,
                      round_to: int | None = None, optimizer: str = "adamw") -> tuple[dict, nn.Module]:
    train, _, test = data
    ignored = tuple(name for name, _ in base.named_modules() if name.endswith(".qkv"))  # see TP_IGNORED_NOTE
    pruned = prune_to_target(copy.deepcopy(base), EXAMPLE, Target.parse(target), round_to=round_to,
                             ignored=ignored).model
    torch.manual_seed(seed)
    user_loop(pruned, train, budget, USER_OPTIMIZERS[optimizer].fine_tune_lr, optimizer=optimizer)
    return {"top1": top1(pruned, test),
            "macs_x": metrics.count_macs(base, EXAMPLE) / metrics.count_macs(pruned, EXAMPLE),
            "params_x": metrics.count_params(base) / metrics.count_params(pruned)}, pruned


def ort_speedup(base: nn.Module, model: nn.Module, example: torch.Tensor = EXAMPLE) -> float:
    """Base / compressed onnxruntime latency at batch 1, 1 thread (interleaved medians of 200 runs) on ``example``."""
    timing = measure_models({"base": base, "compressed": model}, example, LatencyConfig(threads=1), batches=[1],
                            runs=200)[1]
    return timing["base"].median_ms / timing["compressed"].median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default="ac,ac_own,tp_own")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--target", default="flops=2x")
    parser.add_argument("--budget", type=int, default=3)
    parser.add_argument("--base-epochs", type=int, default=10)
    parser.add_argument("--max-train", type=int, default=10000)
    parser.add_argument("--base-optimizer", default="adamw", choices=sorted(USER_OPTIMIZERS),
                        help="the user's optimiser: trains the base and fine-tunes ac_own / tp_own")
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / "results" / "short_budget_bases"))
    parser.add_argument("--out", default="benchmarks/results/short_budget.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["model"], r["method"], r["seed"], r["target"], r["budget"], r.get("base_optimizer", "adamw"))
            for r in rows}
    train, val, test = loaders(0, args.max_train)
    for name in args.models.split(","):
        base = base_model(name, train, args.base_epochs, Path(args.cache), args.base_optimizer)
        base_top1 = top1(base, test)
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in args.methods.split(","):
                if (name, method, seed, args.target, args.budget, args.base_optimizer) in done:
                    continue
                torch.manual_seed(seed)
                data = (DataLoader(train.dataset, batch_size=64, shuffle=True,
                                   generator=torch.Generator().manual_seed(seed)), val, test)
                began = time.perf_counter()
                row = {"model": name, "method": method, "seed": seed, "target": args.target, "budget": args.budget,
                       "base_optimizer": args.base_optimizer,
                       "base_top1": base_top1, "base_macs": metrics.count_macs(base, EXAMPLE),
                       "base_params": metrics.count_params(base)}
                try:
                    result, model = (run_torch_pruning(base, data, seed, args.target, args.budget,
                                                       TP_ROUND_TO[method], args.base_optimizer)
                                     if method in TP_ROUND_TO else
                                     run_autocompress(base, data, method, seed, args.target, args.budget,
                                                      args.base_optimizer))
                except ValueError as exc:  # e.g. Torch-Pruning cannot reach the target: recorded, the campaign goes on
                    row.update(top1=None, error=str(exc))
                else:
                    row.update(result, seconds=round(time.perf_counter() - began, 1),
                               ort_b1_speedup=ort_speedup(base, model.eval()))
                print(json.dumps(row), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
