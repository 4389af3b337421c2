"""CIFAR VGG with BatchNorm: ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19`` (Simonyan & Zisserman 2015,
configurations A, B, D, E) for 3x32x32 images.

CIFAR variant (as in the AutoCompress experiments, Liu et al. AAAI 2020 §5): the 13 (VGG-16) 3x3
convolutions with BatchNorm + ReLU and five 2x2 max-pools, then global average pooling (1x1 at 32x32
input, so other input sizes also work) and a single linear classifier in place of ImageNet VGG's three
4096-wide fully connected layers. ``width`` multiplies every convolution's channel count.
"""
from __future__ import annotations

from torch import nn

from .layers import conv_bn_relu, init_weights, scaled
from .registry import register_model

#: convolution channels per configuration; "M" = 2x2 max-pool
VGG_LAYOUTS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG-BN for ``[N, in_channels, H, W]`` (H, W >= 32 and divisible by 32 for full use) ->
    logits ``[N, num_classes]``.

    Args:
        layout: channels per 3x3 convolution, ``"M"`` for a 2x2 max-pool.
        num_classes: outputs of the linear classifier.
        width: multiplier on every convolution's channel count (rounded, at least 1).
        in_channels: channels of the input images.
        dropout: dropout probability before the classifier (0 disables it).
    """

    def __init__(self, layout, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = scaled(item, width)
                layers.append(conv_bn_relu(channels, out))
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x):
        return self.classifier(self.dropout(self.flatten(self.pool(self.features(x)))))


def _vgg(name: str, num_classes: int, width: float) -> VGG:
    return VGG(VGG_LAYOUTS[name], num_classes=num_classes, width=width)


@register_model("vgg11", input_size=(3, 32, 32), default_dataset="cifar10")
def vgg11(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-11 with BatchNorm, CIFAR variant (3x32x32, GAP + linear), width multiplier."""
    return _vgg("vgg11", num_classes, width)


@register_model("vgg13", input_size=(3, 32, 32), default_dataset="cifar10")
def vgg13(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-13 with BatchNorm, CIFAR variant (3x32x32, GAP + linear), width multiplier."""
    return _vgg("vgg13", num_classes, width)


@register_model("vgg16", input_size=(3, 32, 32), default_dataset="cifar10")
def vgg16(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-16 with BatchNorm, CIFAR variant (3x32x32, GAP + linear), width multiplier."""
    return _vgg("vgg16", num_classes, width)


@register_model("vgg19", input_size=(3, 32, 32), default_dataset="cifar10")
def vgg19(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-19 with BatchNorm, CIFAR variant (3x32x32, GAP + linear), width multiplier."""
    return _vgg("vgg19", num_classes, width)
