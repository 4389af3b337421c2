"""CIFAR ResNets for 3x32x32 images.

* ``resnet20/32/56/110``: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2:
  a 3x3 convolution with 16 filters, three stages of n basic blocks (16, 32, 64 channels at 32x32,
  16x16, 8x8; depth = 6n + 2), global average pooling, a linear classifier. The paper uses
  zero-padding identity shortcuts ("option A"); we use **option B**: where the shape changes, the
  shortcut is a 1x1 convolution (stride 2) + BatchNorm. This keeps channel coupling between a block's
  output and its shortcut explicit in standard modules, which torch-pruning's DependencyGraph traces.
  It costs 2,752 parameters and 262,144 MACs more than option A for every depth (resnet20: 272,474
  parameters instead of 269,722; 40.81M MACs instead of 40.55M at 32x32).
* ``resnet18`` / ``resnet50``: torchvision's ImageNet ResNets (He et al. 2016, Table 1) with the CIFAR
  stem used in the AutoCompress CIFAR experiments: a 3x3 stride-1 first convolution and no max-pool.

Blocks are torchvision's :class:`~torchvision.models.resnet.BasicBlock` / ``Bottleneck``.
"""
from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from .layers import init_weights
from .registry import register_model


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """Option-B projection shortcut (1x1 conv + BN) where the shape changes, else ``None`` (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class CifarResNet(nn.Module):
    """He et al. 2016 CIFAR ResNet of depth 6n + 2: ``[N, 3, H, W]`` -> logits ``[N, num_classes]``.

    Args:
        blocks_per_stage: n, the basic blocks in each of the three stages.
        num_classes: outputs of the linear classifier.
        in_channels: channels of the input images.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        channels = 16
        stages = []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for index in range(blocks_per_stage):
                s = stride if index == 0 else 1
                blocks.append(BasicBlock(channels, width, s, downsample=_shortcut(channels, width, s)))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)
        nn.init.kaiming_uniform_(self.fc.weight, a=5 ** 0.5)  # nn.Linear's default initialisation

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


@register_model("resnet20", input_size=(3, 32, 32), default_dataset="cifar10")
def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016 §4.2), option-B projection shortcuts."""
    return CifarResNet(3, num_classes=num_classes)


@register_model("resnet32", input_size=(3, 32, 32), default_dataset="cifar10")
def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016 §4.2), option-B projection shortcuts."""
    return CifarResNet(5, num_classes=num_classes)


@register_model("resnet56", input_size=(3, 32, 32), default_dataset="cifar10")
def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016 §4.2), option-B projection shortcuts."""
    return CifarResNet(9, num_classes=num_classes)


@register_model("resnet110", input_size=(3, 32, 32), default_dataset="cifar10")
def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 for CIFAR (He et al. 2016 §4.2), option-B projection shortcuts."""
    return CifarResNet(18, num_classes=num_classes)


def _cifar_stem(model: torchvision.models.ResNet) -> torchvision.models.ResNet:
    """Replace the 7x7 stride-2 stem + max-pool of a torchvision ResNet by a 3x3 stride-1 convolution."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


@register_model("resnet18", input_size=(3, 32, 32), default_dataset="cifar10")
def resnet18(num_classes: int = 10) -> torchvision.models.ResNet:
    """ResNet-18 (He et al. 2016), CIFAR variant: 3x3 stride-1 stem, no max-pool."""
    return _cifar_stem(torchvision.models.resnet18(weights=None, num_classes=num_classes))


@register_model("resnet50", input_size=(3, 32, 32), default_dataset="cifar10")
def resnet50(num_classes: int = 10) -> torchvision.models.ResNet:
    """ResNet-50 (He et al. 2016), CIFAR variant: 3x3 stride-1 stem, no max-pool."""
    return _cifar_stem(torchvision.models.resnet50(weights=None, num_classes=num_classes))
