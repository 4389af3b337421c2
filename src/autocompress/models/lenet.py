"""``lenet5``: LeCun et al. 1998 ("Gradient-based learning applied to document recognition") for
1x28x28 inputs, in its common modern form (ReLU, max-pool, padding 2 on the first convolution)."""
from __future__ import annotations

from torch import nn

from .registry import register_model


class LeNet5(nn.Module):
    """LeNet-5: ``[N, 1, 28, 28]`` -> logits ``[N, num_classes]``.

    conv 6@5x5 (pad 2) -> ReLU -> max-pool -> conv 16@5x5 -> ReLU -> max-pool -> flatten (400)
    -> linear 120 -> ReLU -> linear 84 -> ReLU -> linear num_classes.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


@register_model("lenet5", input_size=(1, 28, 28), default_dataset="fashion-mnist")
def lenet5(num_classes: int = 10) -> LeNet5:
    """LeNet-5 (LeCun et al. 1998) for 1x28x28 images, ReLU + max-pool form."""
    return LeNet5(num_classes=num_classes)
