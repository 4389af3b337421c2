"""``fmnist_cnn``: the demo model, a small VGG-style CNN with BatchNorm for 1x28x28 images
(Fashion-MNIST / MNIST).

Layout (``width=1``): conv 32 @28x28, max-pool, conv 32, conv 64 @14x14, max-pool, conv 64,
conv 128 @7x7, global average pool, linear. Every convolution is 3x3 + BatchNorm + ReLU. The plain
chain of convolutions gives structured pruning (filters and columns) real redundancy to remove.
"""
from __future__ import annotations

from torch import nn

from .layers import conv_bn_relu, init_weights, scaled
from .registry import register_model

#: channels of the convolutions at width 1; "M" = 2x2 max-pool
FMNIST_CNN_LAYOUT = (32, "M", 32, 64, "M", 64, 128)


class FashionCNN(nn.Module):
    """VGG-style CNN for ``[N, in_channels, 28, 28]`` -> logits ``[N, num_classes]``.

    Args:
        num_classes: outputs of the linear classifier.
        width: multiplier on every convolution's channel count (rounded, at least 1).
        in_channels: channels of the input images.
        dropout: dropout probability before the classifier (0 disables it).
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in FMNIST_CNN_LAYOUT:
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


@register_model("fmnist_cnn", input_size=(1, 28, 28), default_dataset="fashion-mnist")
def fmnist_cnn(num_classes: int = 10, width: float = 1.0, dropout: float = 0.0) -> FashionCNN:
    """Demo model: VGG-style CNN with BatchNorm for 1x28x28 images (5 convs, GAP, linear)."""
    return FashionCNN(num_classes=num_classes, width=width, dropout=dropout)
