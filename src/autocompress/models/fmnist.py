"""``fmnist_cnn``: the demo model, a small VGG-style CNN with BatchNorm for 1x28x28 images
(Fashion-MNIST / MNIST).

Layout (``width=1``): conv 32 @28x28, max-pool, conv 32, conv 64 @14x14, max-pool, conv 64,
conv 128 @7x7, global average pool, linear. Every convolution is 3x3 + BatchNorm + ReLU. The plain
chain of convolutions gives structured pruning (filters and columns) real redundancy to remove.
"""
from __future__ import annotations

from .registry import register_model
from .vgg import VGG

#: channels of the convolutions at width 1; "M" = 2x2 max-pool
FMNIST_CNN_LAYOUT = (32, "M", 32, 64, "M", 64, 128)


@register_model("fmnist_cnn", input_size=(1, 28, 28), default_dataset="fashion-mnist")
def fmnist_cnn(num_classes: int = 10, width: float = 1.0, dropout: float = 0.0) -> VGG:
    """Demo model: VGG-style CNN with BatchNorm for ``[N, 1, 28, 28]`` -> logits ``[N, num_classes]``
    (5 convs, GAP, linear), built by :class:`autocompress.models.vgg.VGG` with ``FMNIST_CNN_LAYOUT``."""
    return VGG(FMNIST_CNN_LAYOUT, num_classes=num_classes, width=width, in_channels=1, dropout=dropout)
