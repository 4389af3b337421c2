"""Benchmark: deployed speed of a grouped-conv torchvision network compressed to a flops target (default dims).

Why: fresh user 60's ``regnet_x_400mf`` at 32x32 compressed to ``flops=2x`` ran slower than its base in
onnxruntime (0.72x at batch 1): its 24 column-pruned 1x1 convolutions (at one position in the last stage) kept
input widths off onnxruntime's channel grid, so 34 of its 71 convolutions left the blocked layout. Since
session 44 a column layer of kernel area 1 keeps a multiple of ``channel_multiple`` input channels
(:meth:`autocompress.space.PruningSpace.column_keep`); this reruns that case end to end.

The base is a torchvision model (``--model``, 10 classes) trained ``--base-epochs`` epochs on ``--train-images``
CIFAR-10 training images (SGD, one-cycle; cached in ``--cache``), then ``autocompress.compress`` at
``--target`` with ``budget: --budget`` (everything else default) on the same images, 2,000 held out for
validation. Printed: the final table (params, MACs, torch and onnxruntime latency, 1 thread), the test top-1 on
2,000 test images and the convolutions onnxruntime runs in its blocked layout.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/regnet_deployed.py --model regnet_x_400mf --target flops=2x
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import autocompress
import weak_teacher  # benchmarks/ is the script's folder
from autocompress.data import get_dataset
from autocompress.latency import blocked_convolutions
from autocompress.training import seeded

ROOT = Path(__file__).resolve().parents[1]


def tensors(split, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 split as normalised float images [N, 3, 32, 32] and labels [N]."""
    return (split.images.float() / 255 - mean) / std, split.labels


def trained_base(name: str, train: DataLoader, epochs: int, cache: Path) -> torch.nn.Module:
    """``torchvision.models.<name>(num_classes=10)`` trained ``epochs`` epochs (cached state dict)."""
    with seeded(0):
        model = getattr(torchvision.models, name)(num_classes=10)
    path = cache / f"{name}_cifar{len(train.dataset)}_e{epochs}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    weak_teacher.train(model, train, epochs, optimizer,
                       torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=epochs * len(train)))
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="regnet_x_400mf")
    parser.add_argument("--target", default="flops=2x")
    parser.add_argument("--budget", type=int, default=1)
    parser.add_argument("--base-epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/datasets/cifar10-jpeg.tar.gz"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/autocompress-bench/bases")
    args = parser.parse_args()
    splits = get_dataset("cifar10", args.data_dir, max_train=args.train_images, max_test=2000, val_size=2000)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (splits.mean, splits.std))
    (xtr, ytr), (xva, yva), (xte, yte) = (tensors(s, mean, std) for s in (splits.train, splits.val, splits.test))
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=128, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(TensorDataset(xte, yte), batch_size=500)
    base = trained_base(args.model, train, args.base_epochs, args.cache)
    example = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = autocompress.compress(base, example, args.target, train_loader=train,
                                   val_loader=DataLoader(TensorDataset(xva, yva), batch_size=256),
                                   config={"budget": args.budget}, device="cpu", progress=False)
    print(result.summary())
    for name, model in (("base", base), ("compressed", result.deployed_model)):
        blocked, convolutions = blocked_convolutions(model, example)
        print(f"{name}: test top-1 {weak_teacher.top1(model, test):.2f} %, onnxruntime runs {blocked} of "
              f"{convolutions} convolutions in its blocked layout")


if __name__ == "__main__":
    main()
