"""Your own CNN, your own data loaders, your own training loop: AutoCompress as a library.

A residual network of depthwise-separable blocks, defined here and registered nowhere, is trained briefly on
the real Fashion-MNIST (Debian's idx files) by a plain PyTorch loop over plain DataLoaders, then compressed to
4x fewer parameters twice:

1. the automatic path: ``autocompress.compress`` with its own SGD loop for ADMM and retraining;
2. the own-loop path: the same training loop that trained the base model (Adam, label-smoothed cross-entropy)
   runs the ADMM and retraining epochs through ``train_fn``: it takes an optional ``phase`` and two of its
   statements use it (``phase.attach(optimizer)``; ``phase.distill(...) + phase.penalty()`` in the loss).

    python examples/own_cnn.py             # 20000 training / 2000 validation images
    python examples/own_cnn.py --tiny      # a smoke test (the test suite's size)
    python examples/own_cnn.py --out runs/own_cnn   # also writes model.pt (pickled) and model.ts (traced)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared  # noqa: E402

import autocompress  # noqa: E402
from autocompress.data import read_idx  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics (of values in [0, 1])

SIZES = {  # training / validation / test images, network widths, base-model epochs, compress settings (None:
    # the library's defaults)
    "tiny": dict(train=384, val=256, test=512, widths=(8, 16, 32), epochs=1, config=_shared.TINY_CONFIG),
    "full": dict(train=20000, val=2000, test=10000, widths=(16, 32, 64), epochs=2, config=None),
}


class SeparableBlock(nn.Module):
    """``x + BN(pointwise(ReLU(BN(depthwise(x)))))``, then ReLU: a residual depthwise-separable block."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.depthwise(x)))
        return F.relu(x + self.bn2(self.pointwise(y)))


class MyNet(nn.Module):
    """Images ``[B, 1, 28, 28]`` -> logits ``[B, 10]``: a stem, then per stage a strided 3x3 convolution and a
    residual separable block (``widths``, e.g. 16, 32, 64), global average pooling and a linear classifier."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                   nn.ReLU(), SeparableBlock(widths[0])]
        for before, after in zip(widths, widths[1:]):
            layers += [nn.Conv2d(before, after, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(after),
                       nn.ReLU(), SeparableBlock(after)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def fashion_mnist(split: str, folder: Path = FASHION_MNIST) -> TensorDataset:
    """The ``"train"`` or ``"t10k"`` split of Fashion-MNIST as normalised images ``[N, 1, 28, 28]`` and labels."""
    images = torch.from_numpy(read_idx(folder / f"{split}-images-idx3-ubyte.gz").copy())
    labels = torch.from_numpy(read_idx(folder / f"{split}-labels-idx1-ubyte.gz").copy()).long()
    return TensorDataset((images.float().unsqueeze(1) / 255 - MEAN) / STD, labels)


def loaders(train_size: int, val_size: int, test_size: int, folder: Path = FASHION_MNIST, seed: int = 0
            ) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Shuffled training, validation (both carved from the training files, seeded, disjoint) and test (the first
    ``test_size`` test images) loaders."""
    full = fashion_mnist("train", folder)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    train = torch.utils.data.Subset(full, order[:train_size].tolist())
    val = torch.utils.data.Subset(full, order[train_size:train_size + val_size].tolist())
    return (DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(val, batch_size=256),
            DataLoader(torch.utils.data.Subset(fashion_mnist("t10k", folder), range(test_size)), batch_size=256))


def train(model: nn.Module, loader: DataLoader, epochs: int, phase: autocompress.TrainingPhase | None = None,
          lr: float = 2e-3) -> nn.Module:
    """The user's own training loop: Adam, label-smoothed cross-entropy. With a ``phase`` (when AutoCompress
    calls it as ``train_fn``) the ADMM penalty joins the loss, the masks / ADMM updates hook the optimizer and
    the loss is distilled from the base model when distillation is on; nothing else changes."""
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if phase is not None:
        phase.attach(optimizer)
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            output = model(images)
            loss = F.cross_entropy(output, labels, label_smoothing=0.1)
            if phase is not None:
                loss = phase.distill((images, labels), output, loss) + phase.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def top1(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy (%) of ``model`` on ``loader``."""
    device = next(model.parameters()).device
    correct = seen = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
            seen += len(labels)
    return 100.0 * correct / seen


def main(argv: list[str] | None = None) -> _shared.ExampleRun:
    p = _shared.parser(__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=FASHION_MNIST,
                   help="folder of the Fashion-MNIST idx files (*-ubyte.gz)")
    args = p.parse_args(argv)
    size = SIZES["tiny" if args.tiny else "full"]
    device = _shared.device_of(args.device)
    torch.manual_seed(0)
    train_loader, val_loader, test_loader = loaders(size["train"], size["val"], size["test"], args.data_dir)
    model = train(MyNet(size["widths"]).to(device), train_loader, size["epochs"])
    print(f"base model: test top-1 {top1(model, test_loader):.2f} %")
    example = torch.randn(1, 1, 28, 28, device=device)
    common = dict(train_loader=train_loader, val_loader=val_loader, device=device, config=size["config"],
                  progress=not args.quiet, log=None if args.quiet else print)

    results = {
        "automatic": autocompress.compress(model, example, "params=4x", **common),
        "own loop": autocompress.compress(
            model, example, "params=4x",
            train_fn=lambda net, phase: train(net, train_loader, phase.epochs, phase), **common),
    }
    for name, result in results.items():
        _shared.print_table(name, result)
        print(f"test top-1 {top1(result.model, test_loader):.2f} %")
    if not args.no_deploy:
        _shared.deploy(results["own loop"].model, example, args.out)
    return _shared.ExampleRun(base=model, example=example, results=results)


if __name__ == "__main__":
    main()
