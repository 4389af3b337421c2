"""torchvision's MobileNetV2 on real CIFAR-10 JPEGs at 32x32, compressed to 2x fewer FLOPs.

The images come from the ImageFolder archive ``cifar10-jpeg.tar.gz`` (``train/<class>/*.jpg``,
``test/<class>/*.jpg``): the first ``--per-class`` training and ``--per-class // 5`` test images of each class are
extracted into a temporary folder (or ``--data-dir``) and read with ``torchvision.datasets.ImageFolder``. The
network (``mobilenet_v2(num_classes=10)``, unchanged: inverted residual blocks with depthwise convolutions) is
trained briefly, then ``autocompress.compress`` reaches ``flops=2x`` with its default loss (cross-entropy) and
score (validation top-1).

    python examples/mobilenet_v2_cifar.py                 # 1000 images per class (10000 in all)
    python examples/mobilenet_v2_cifar.py --per-class 5000   # the whole training set
    python examples/mobilenet_v2_cifar.py --tiny          # a smoke test (the test suite's size)
"""
from __future__ import annotations

import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.models import mobilenet_v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared  # noqa: E402

import autocompress  # noqa: E402

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10 training-set channel statistics

SIZES = {  # images per class (training; validation: a fifth of it), base-model epochs, compress settings
    "tiny": dict(per_class=20, epochs=1, config=_shared.TINY_CONFIG),
    "full": dict(per_class=1000, epochs=5, config=None),
}


def extract_subset(archive: Path, folder: Path, per_class: int) -> Path:
    """Extract the first ``per_class`` images of each class of the archive's ``train/`` and ``per_class // 5``
    (at least 1) of its ``test/`` into ``folder/train/<class>/`` and ``folder/val/<class>/`` (one pass over the
    archive); returns ``folder``."""
    wanted = {"train": per_class, "test": max(1, per_class // 5)}
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[0] not in wanted:
                continue
            split, label, name = parts
            if taken.get((split, label), 0) >= wanted[split]:
                continue
            target = folder / ("train" if split == "train" else "val") / label / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            taken[(split, label)] = taken.get((split, label), 0) + 1
    return folder


def loaders(folder: Path, batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """Training (random crop with 4-pixel padding + horizontal flip, shuffled) and validation loaders."""
    normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  *normalize])
    train = ImageFolder(str(folder / "train"), transform=augment)
    val = ImageFolder(str(folder / "val"), transform=transforms.Compose(normalize))
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(val, batch_size=256))


def cross_entropy(model: torch.nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def main(argv: list[str] | None = None) -> _shared.ExampleRun:
    p = _shared.parser(__doc__.splitlines()[0])
    p.add_argument("--archive", type=Path, default=ARCHIVE, help="the CIFAR-10 ImageFolder .tar.gz")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="an ImageFolder with train/ and val/ class folders, used as it is; a folder without them: "
                        "where to extract the subset (kept); default: a temporary folder, removed at the end")
    p.add_argument("--per-class", type=int, default=None, help="training images per class (default 1000)")
    args = p.parse_args(argv)
    size = SIZES["tiny" if args.tiny else "full"]
    per_class = args.per_class or size["per_class"]
    device = _shared.device_of(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="cifar10-subset-") as scratch:
        folder = args.data_dir or Path(scratch)
        if not (folder / "train").is_dir():
            extract_subset(args.archive, folder, per_class)
        train_loader, val_loader = loaders(folder)
        model = _shared.fit(mobilenet_v2(num_classes=10), train_loader, cross_entropy, epochs=size["epochs"],
                            lr=2e-3, device=device)
        example = torch.randn(1, 3, 32, 32, device=device)
        result = autocompress.compress(model, example, "flops=2x", train_loader=train_loader,
                                       val_loader=val_loader, device=device, config=size["config"],
                                       progress=not args.quiet, log=None if args.quiet else print)
    _shared.print_table("mobilenet_v2", result)
    if not args.no_deploy:
        _shared.deploy(result.model, example, args.out)
    return _shared.ExampleRun(base=model, example=example, results={"flops=2x": result})


if __name__ == "__main__":
    main()
