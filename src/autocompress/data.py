"""Datasets as train / validation / test splits with fast loaders.

Three datasets (``get_dataset(name, ...)``):

* ``fashion-mnist``: 60k train / 10k test grey 28x28 images (Xiao et al. 2017), read straight from the
  standard idx files. Lookup order: ``data_dir``, env ``AUTOCOMPRESS_DATA``, Debian's
  ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``), then torchvision's download
  into the cache folder.
* ``cifar10``: 50k train / 10k test RGB 32x32 images, from torchvision's ``cifar-10-batches-py`` folder
  (read with a restricted unpickler that cannot run code: :func:`read_data_pickle`), from an ImageFolder
  layout ``train/<class>/*``, ``test/<class>/*`` (e.g. JPEGs), or from a ``.tar.gz`` /
  ``.tar`` archive of either (extracted once into the cache folder). Decoded JPEGs are cached as one
  ``.pt`` file so later runs start in a second.
* ``imagefolder``: any ImageFolder dataset (``train/<class>/*`` and ``val/<class>/*`` or ``test/<class>/*``,
  ImageNet included), resized to the model's ``input_size`` (default ImageNet's 3x224x224) and normalised
  with the given mean / std (default ImageNet's), served by a ``DataLoader`` with workers.

The two small datasets live in memory as ``uint8`` tensors ``[N, C, H, W]``; a batch is converted to float,
augmented on the whole batch with a ``torch.Generator`` the caller owns, and normalised with the
dataset's standard per-channel mean / std. No per-image PIL work happens per epoch, so on 2 CPU cores data
loading is not the bottleneck.

Augmentation (training split only, ``augment=True``):

* ``cifar10``: random 32x32 crop of the image zero-padded by 4 pixels + horizontal flip (He et al. 2016).
* ``fashion-mnist``: horizontal flip only (light; our choice — clothes are left/right symmetric).
* ``imagefolder``: see :func:`folder_transform` (at 224: ``RandomResizedCrop(224)`` + flip; evaluation
  ``Resize(256)`` + ``CenterCrop(224)``; at 32x32: pad-4 random crop + flip, evaluation unchanged images).

Checks (UserError): a train or test split without images, labels outside ``[0, classes)``, and
:meth:`DataSplits.check_input_size` for data of another size than a model expects. A data folder recorded
in a checkpoint is never followed (:func:`checkpoint_dataset`): the user names the data.

The validation split is carved from the training set with a seeded permutation (default 5000 images,
disjoint from the training split, never taken from the test set); the same ``(val_size, seed)`` always
gives the same split. ``max_train`` / ``max_test`` take seeded random subsets for quick runs.

The cache folder is env ``AUTOCOMPRESS_CACHE`` or ``~/.cache/autocompress``.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .atomic import atomic_torch_save
from .errors import SettingError, UserError

DATASETS = ("fashion-mnist", "cifar10", "imagefolder")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: Standard per-channel statistics of each dataset's training images (pixel values in [0, 1]).
MEAN_STD = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def cache_dir() -> Path:
    """The cache folder: env ``AUTOCOMPRESS_CACHE`` or ``~/.cache/autocompress``."""
    return Path(os.environ.get("AUTOCOMPRESS_CACHE") or Path.home() / ".cache" / "autocompress")


# --------------------------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Augment:
    """Batch augmentation: random crop of the image zero-padded by ``pad`` pixels (0 = none) and a
    horizontal flip with probability 0.5 when ``flip``."""

    pad: int = 0
    flip: bool = False


@dataclass
class TensorSplit:
    """An in-memory split: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class FolderSplit:
    """A split of an ImageFolder dataset: ``indices`` into ``dataset.samples``; images decoded per batch."""

    dataset: object  # torchvision.datasets.ImageFolder (transform=None)
    indices: list[int]

    def __len__(self) -> int:
        return len(self.indices)


class TensorLoader:
    """Iterates ``(images float32 [B, C, H, W] normalised, labels int64 [B])`` over a :class:`TensorSplit`.

    Each ``iter()`` is one epoch: a fresh permutation when ``shuffle`` and fresh augmentation, both drawn
    from ``generator`` (so a saved generator state reproduces the next epoch exactly).
    """

    def __init__(self, split: TensorSplit, batch_size: int, *, mean: Sequence[float], std: Sequence[float],
                 shuffle: bool, augment: Augment | None, generator: torch.Generator | None,
                 drop_last: bool = False):
        if batch_size < 1:
            raise UserError(f"batch size {batch_size} is not positive", "pass --batch-size >= 1")
        self.split = split
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.split.images[index].float()
            if self.augment is not None:
                images = augment_batch(images, self.augment, self.generator)
            yield (images - self.mean) / self.std, self.split.labels[index]


def augment_batch(images: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``augment.pad``) and horizontal flip of a batch ``[B, C, H, W]``, each
    image with its own offsets / coin drawn from ``generator``. Returns a new tensor of the same shape."""
    b, c, h, w = images.shape
    if augment.pad > 0:
        p = augment.pad
        padded = F.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        images = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if augment.flip:
        flip = torch.rand(b, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


@dataclass
class DataSplits:
    """Train / validation / test splits of one dataset.

    Attributes:
        name: dataset name (``"fashion-mnist"``, ``"cifar10"``, ``"imagefolder"``).
        train, val, test: :class:`TensorSplit` (small datasets) or :class:`FolderSplit` (imagefolder).
        num_classes: number of classes.
        input_size: ``(C, H, W)`` of one model input.
        classes: class names, index = label.
        mean, std: per-channel normalisation (pixel values in [0, 1]).
        augment: training augmentation of tensor splits (imagefolder: its transforms instead).
        val_size, seed: how the validation split was carved (recorded in checkpoints).
        data_dir: where the data was read from.
    """

    name: str
    train: TensorSplit | FolderSplit
    val: TensorSplit | FolderSplit
    test: TensorSplit | FolderSplit
    num_classes: int
    input_size: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment | None = None
    val_size: int = 0
    seed: int = 0
    data_dir: str | None = None
    num_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))

    def augmentation(self) -> str:
        """What training batches are drawn with, in words (e.g. ``"random horizontal flips"``)."""
        if self.name == "imagefolder":
            return "random crops and horizontal flips (see folder_transform)"
        if self.augment is None:
            return "no augmentation"
        crops = f"random crops of the image zero-padded by {self.augment.pad} pixels" if self.augment.pad else ""
        flips = "random horizontal flips" if self.augment.flip else ""
        return " and ".join(part for part in (crops, flips) if part) or "no augmentation"

    def split(self, name: str) -> TensorSplit | FolderSplit:
        """The split called ``name`` (``"train"``, ``"val"`` or ``"test"``); UserError otherwise."""
        if name not in ("train", "val", "test"):
            raise UserError(f"unknown split {name!r}", "use train, val or test")
        return getattr(self, name)

    def loader(self, split: str, batch_size: int, *, shuffle: bool | None = None, augment: bool | None = None,
               generator: torch.Generator | None = None, drop_last: bool = False):
        """An iterable of ``(images float32 [B, C, H, W], labels int64 [B])`` batches, normalised.

        ``shuffle`` and ``augment`` default to True for ``"train"`` and False otherwise; all randomness
        (order, crops, flips, worker seeds) is drawn from ``generator`` (seed 0 when omitted).
        Has ``len()`` (number of batches). Raises UserError for a split without images.
        """
        data = self.split(split)
        if len(data) == 0:
            raise UserError(f"the {split} split of {self.name} has no images",
                            "pass val_size > 0 for a validation split" if split == "val" else "check the data folder")
        shuffle = split == "train" if shuffle is None else shuffle
        augment = split == "train" if augment is None else augment
        if isinstance(data, TensorSplit):
            return TensorLoader(data, batch_size, mean=self.mean, std=self.std, shuffle=shuffle,
                                augment=self.augment if augment else None, generator=generator,
                                drop_last=drop_last)
        return _folder_loader(data, batch_size, self.input_size, self.mean, self.std, shuffle=shuffle, augment=augment,
                              generator=generator, drop_last=drop_last, num_workers=self.num_workers)

    def describe(self) -> dict:
        """Plain-data description stored in checkpoints: name, input_size, num_classes, classes, mean, std,
        val_size, seed, data_dir (``data_dir`` is informative only: :func:`checkpoint_dataset` never
        follows it)."""
        return {"name": self.name, "input_size": list(self.input_size), "num_classes": self.num_classes,
                "classes": list(self.classes), "mean": list(self.mean), "std": list(self.std),
                "val_size": self.val_size, "seed": self.seed, "data_dir": self.data_dir}

    def check_input_size(self, expected: Sequence[int] | None, what: str = "the model") -> None:
        """Raise UserError unless this dataset's ``input_size`` is ``expected`` ``(C, H, W)`` (None: no check)."""
        if expected is not None and tuple(int(v) for v in expected) != tuple(self.input_size):
            if len(expected) != len(self.input_size):  # another layout, not another dataset (a sequence model)
                raise UserError(f"{self.name} images are {_size_text(self.input_size)} (C x H x W) but {what} "
                                f"takes inputs of {len(expected)} dimension(s) ({_size_text(expected)})",
                                "wrap the model in a module whose forward takes the images and reshapes them, "
                                "or call autocompress.compress with your own loaders")
            raise UserError(f"{self.name} images are {_size_text(self.input_size)} but {what} expects "
                            f"{_size_text(expected)}",
                            "use the dataset the model was trained on (imagefolder resizes to input_size)")


def _size_text(size: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in size)


def get_dataset(name: str, data_dir: str | os.PathLike | None = None, *, val_size: int = 5000, seed: int = 0,
                max_train: int | None = None, max_test: int | None = None,
                input_size: Sequence[int] | None = None, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> DataSplits:
    """Load dataset ``name`` and split it into train / validation / test.

    Args:
        name: ``"fashion-mnist"``, ``"cifar10"`` or ``"imagefolder"``.
        data_dir: where the data is (see the module docstring for each dataset's lookup order); required
            for ``imagefolder``.
        val_size: images carved from the training set for validation (0 <= val_size < training images).
        seed: seed of the validation carve and of the ``max_train`` / ``max_test`` subsets.
        max_train: keep a seeded random subset of at most this many training images (after the carve).
        max_test: keep a seeded random subset of at most this many test images.
        input_size: ``(C, H, W)`` the model expects. ``imagefolder`` resizes / crops its images to it (C = 1
            or 3; default ``(3, 224, 224)``); the in-memory datasets must already have it.
        mean, std: per-channel normalisation (pixel values in [0, 1], one value per channel); default the
            dataset's standard statistics (``MEAN_STD``).

    Raises:
        UserError: unknown name, missing / empty / unreadable data folder, offline download, bad sizes,
            a split without images, labels outside ``[0, classes)``, data of another ``input_size``.
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}", f"choose one of {', '.join(DATASETS)}")
    for label, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 1:
            raise UserError(f"{label}={value} is not positive", f"pass {label} >= 1 or leave it unset")
    if name == "imagefolder":
        size = _check_size(input_size or (3, 224, 224))
        return _imagefolder(data_dir, val_size, seed, max_train, max_test, size,
                            _normalisation(name, size[0], mean, std))
    if name == "fashion-mnist":
        folder, (train, test) = _fashion_mnist(data_dir)
        classes, augment = FASHION_MNIST_CLASSES, Augment(flip=True)
    else:
        folder, (train, test, classes) = _cifar10(data_dir)
        augment = Augment(pad=4, flip=True)
    for split, data in (("train", train), ("test", test)):
        _check_split(data, len(classes), f"the {split} split of {name} in {folder}")
    train_idx, val_idx = carve_validation(len(train), val_size, seed, max_train)
    test_idx = torch.arange(len(test)) if max_test is None else _subset(len(test), max_test, seed)
    splits = DataSplits(
        name=name, train=_take(train, train_idx), val=_take(train, val_idx), test=_take(test, test_idx),
        num_classes=len(classes), input_size=tuple(train.images.shape[1:]), classes=tuple(classes),
        mean=(), std=(), augment=augment, val_size=val_size, seed=seed, data_dir=str(folder))
    splits.check_input_size(input_size, "input_size")
    splits.mean, splits.std = _normalisation(name, splits.input_size[0], mean, std)
    return splits


def _check_size(size: Sequence[int]) -> tuple[int, int, int]:
    """``size`` as ``(C, H, W)`` with C in {1, 3} and positive H, W; UserError otherwise."""
    if (len(size) != 3 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size)
            or size[0] not in (1, 3)):
        raise UserError(f"input_size {list(size)} is not (channels 1 or 3, height, width)",
                        "pass input_size as [C, H, W], e.g. [3, 32, 32]")
    return int(size[0]), int(size[1]), int(size[2])


def _normalisation(name: str, channels: int, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` with one value per channel; the dataset's standard statistics where None (for
    1-channel imagefolder inputs, the average of ImageNet's three channels)."""
    default_mean, default_std = MEAN_STD[name]
    if len(default_mean) != channels:
        default_mean, default_std = (sum(default_mean) / 3,), (sum(default_std) / 3,)
    mean = tuple(float(v) for v in (default_mean if mean is None else mean))
    std = tuple(float(v) for v in (default_std if std is None else std))
    if len(mean) != channels or len(std) != channels or not all(np.isfinite(mean + std)) or min(std) <= 0:
        raise UserError(f"normalisation mean {list(mean)} / std {list(std)} does not fit {channels}-channel "
                        f"{name} images", f"pass {channels} finite mean values and {channels} positive std values")
    return mean, std


def _check_split(split: TensorSplit, num_classes: int, where: str) -> None:
    """UserError when ``split`` has no images or a label outside ``[0, num_classes)``."""
    if len(split) == 0:
        raise UserError(f"{where} has no images", "check the data files (re-download them)")
    low, high = int(split.labels.min()), int(split.labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise UserError(f"{where} has label {bad}, outside the {num_classes} classes [0, {num_classes})",
                        "fix the labels (class indices 0..{}) or re-download the data".format(num_classes - 1))


def recorded_data_dir(data_dir: str | os.PathLike | None, recorded: dict | None, name: str) -> str | None:
    """The data folder to use for dataset ``name``: ``data_dir`` (the user's choice) as a string, or None
    for the dataset's own lookup order.

    The folder a checkpoint recorded (``recorded["data_dir"]``) is never returned: a checkpoint is input
    from anyone, and following its paths would let it choose which files the tool reads.
    ``recorded`` and ``name`` are kept for call compatibility; :func:`checkpoint_dataset` is the full
    checkpoint-aware loader.
    """
    del recorded, name  # deliberately unused, see above
    return None if data_dir is None else str(data_dir)


def checkpoint_dataset(recorded: dict | None, name: str | None = None, data_dir: str | os.PathLike | None = None,
                       *, val_size: int | None = None, seed: int | None = None, max_train: int | None = None,
                       max_test: int | None = None) -> DataSplits:
    """The dataset for a model described by a checkpoint's ``dataset`` entry (``DataSplits.describe()``).

    Args:
        recorded: the checkpoint's ``dataset`` dict (name, input_size, mean, std, val_size, seed, ...).
        name: dataset to use; default the recorded one (an override for checkpoints that record none).
        data_dir: the user's data folder, or None for the dataset's lookup order. The folder the checkpoint
            recorded is never followed; when loading fails it is only named in the error's fix.
        val_size, seed: validation carve; default the recorded one for the same dataset, else 5000 / 0.
        max_train, max_test: as :func:`get_dataset`.

    imagefolder images are resized to the recorded ``input_size`` and normalised with the recorded ``mean`` /
    ``std`` (e.g. a cifar10 model evaluated on a folder of CIFAR JPEGs gets 32x32 inputs with CIFAR-10's
    statistics). The in-memory datasets must already have the recorded ``input_size``; they use the recorded
    normalisation when they are the recorded dataset, else their own.

    Raises:
        SettingError: no dataset name (setting ``dataset``).
        UserError: as :func:`get_dataset` (including an ``input_size`` mismatch).
    """
    recorded = recorded or {}
    given, name = name, name or recorded.get("name")
    if given is not None and given not in DATASETS:
        raise UserError(f"unknown dataset {given!r} (the checkpoint records {recorded.get('name')!r})",
                        f"use one of {', '.join(DATASETS)}")
    if name not in DATASETS:
        records = f"no known dataset (it records {recorded['name']!r})" if recorded.get("name") else \
            "no dataset (a model compressed through the Python API records only its input)"
        raise SettingError("dataset", f"the checkpoint records {records}",
                           f"name the dataset to evaluate on: dataset, one of {', '.join(DATASETS)} (imagefolder: a "
                           "folder of one subfolder per class)")
    same = name == recorded.get("name")
    resized = name == "imagefolder"  # made to the model's input: its size and normalisation
    kwargs = {"val_size": (recorded.get("val_size", 5000) if same else 5000) if val_size is None else val_size,
              "seed": (recorded.get("seed", 0) if same else 0) if seed is None else seed,
              "max_train": max_train, "max_test": max_test,
              "input_size": recorded.get("input_size") if resized else None,
              "mean": recorded.get("mean") if same or resized else None,
              "std": recorded.get("std") if same or resized else None}
    try:
        splits = get_dataset(name, data_dir, **kwargs)
    except UserError as exc:
        if data_dir is not None or not same or not recorded.get("data_dir"):
            raise
        raise UserError(f"{exc} (the checkpoint was made with data in {recorded['data_dir']}, which is not "
                        "read unless you pass it as the data folder)") from exc
    splits.check_input_size(recorded.get("input_size"), "the checkpoint")
    return splits


def carve_validation(n: int, val_size: int, seed: int, max_train: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, disjoint (train indices, validation indices) of ``n`` training images, each sorted.

    The first ``val_size`` entries of a permutation drawn from ``torch.Generator().manual_seed(seed)``
    are the validation split; the rest (at most ``max_train`` of them, in permutation order) are training.
    """
    if not 0 <= val_size < n:
        raise UserError(f"validation size {val_size} does not fit {n} training images",
                        f"pass --val-size between 0 and {n - 1}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    rest = perm[val_size:] if max_train is None else perm[val_size:val_size + max_train]
    return rest.sort().values, perm[:val_size].sort().values


def _subset(n: int, k: int, seed: int) -> torch.Tensor:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return perm[:k].sort().values


def _take(split: TensorSplit, index: torch.Tensor) -> TensorSplit:
    return TensorSplit(split.images[index], split.labels[index])


# -------------------------------------------------------------------------------------- fashion-mnist
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format; ``.gz`` or raw) into a numpy array of its stored shape.

    Format: 2 zero bytes, a type byte (0x08 = uint8), a byte with the number of dimensions d, d
    big-endian int32 sizes, then the data. Raises UserError when the file is truncated or not idx.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}", "re-download the dataset files") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 idx file", "re-download the dataset files")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise UserError(f"{path} holds {len(raw) - offset} bytes of data, its header says {shape}",
                        "the file is truncated; re-download the dataset files")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for sub in (folder, folder / "FashionMNIST" / "raw", folder / "fashion-mnist"):
        for candidate in (sub / f"{stem}.gz", sub / stem):
            if candidate.is_file():
                return candidate
    return None


def _fashion_mnist_in(folder: Path) -> tuple[TensorSplit, TensorSplit] | None:
    paths = {split: [_find_idx(folder, stem) for stem in stems] for split, stems in _FMNIST_FILES.items()}
    if any(p is None for pair in paths.values() for p in pair):
        return None
    files = tuple((split, images, labels, images.stat().st_mtime_ns, labels.stat().st_mtime_ns)
                  for split, (images, labels) in paths.items())
    return _read_fashion_mnist(folder, files)


@functools.lru_cache(maxsize=2)
def _read_fashion_mnist(folder: Path, files: tuple) -> tuple[TensorSplit, TensorSplit]:
    """Decode the idx files ``files = ((split, images path, labels path, mtime, mtime), ...)``, memoised per
    process (callers only index the returned tensors, never write them)."""
    splits = []
    for split, images_path, labels_path, _, _ in files:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"Fashion-MNIST {split} files in {folder} disagree: images {images.shape}, "
                            f"labels {labels.shape}", "re-download the dataset files")
        splits.append(TensorSplit(torch.from_numpy(images.copy()).unsqueeze(1),
                                  torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


def _fashion_mnist(data_dir) -> tuple[Path, tuple[TensorSplit, TensorSplit]]:
    names = " / ".join(f"{stem}.gz" for pair in _FMNIST_FILES.values() for stem in pair)
    if data_dir is not None:
        folder = Path(data_dir)
        found = _fashion_mnist_in(folder) if folder.is_dir() else None
        if found is None:
            raise UserError(f"Fashion-MNIST not found in {folder} (need {names})",
                            "pass a --data-dir holding the idx files, or omit it to use the default lookup")
        return folder, found
    candidates = [Path(os.environ["AUTOCOMPRESS_DATA"])] if os.environ.get("AUTOCOMPRESS_DATA") else []
    candidates += [DEBIAN_FASHION_MNIST, cache_dir() / "fashion-mnist"]
    for folder in candidates:
        if folder.is_dir() and (found := _fashion_mnist_in(folder)) is not None:
            return folder, found
    folder = cache_dir() / "fashion-mnist"
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(folder), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - any download failure means the same thing to the user
        raise UserError(
            f"Fashion-MNIST not found in {', '.join(map(str, candidates))} and the download failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'offline?'})",
            "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass "
            "--data-dir with the idx files") from exc
    found = _fashion_mnist_in(folder)
    if found is None:
        raise UserError(f"torchvision's download left no idx files in {folder}",
                        "delete that folder and retry, or pass --data-dir")
    return folder, found


# -------------------------------------------------------------------------------------------- cifar10
_CIFAR_FIX = ("pass --data-dir pointing at cifar-10-batches-py, a folder with train/<class>/* and "
              "test/<class>/*, or the cifar10-jpeg.tar.gz archive")


def _cifar10(data_dir) -> tuple[Path, tuple[TensorSplit, TensorSplit, list[str]]]:
    if data_dir is None:
        candidates = [Path(os.environ["AUTOCOMPRESS_DATA"])] if os.environ.get("AUTOCOMPRESS_DATA") else []
        candidates += [cache_dir() / "cifar10", cache_dir()]
        extracted = [folder for folder in sorted((cache_dir() / "extracted").glob("cifar*"))
                     if _cifar_layout(folder) is not None]  # archives given before (extract_archive)
        candidates += extracted if len(extracted) == 1 else []  # several: which one is not ours to guess
        for folder in candidates:
            if _cifar_layout(folder) is not None:
                return folder, _read_cifar(folder)
        several = f" (archives extracted before: {', '.join(f.name for f in extracted)}, in {extracted[0].parent})" \
            if len(extracted) > 1 else ""
        raise UserError(f"CIFAR-10 not found in {', '.join(map(str, candidates))}{several}", _CIFAR_FIX)
    path = Path(data_dir)
    if not path.exists():
        raise UserError(f"CIFAR-10 data {path} does not exist", _CIFAR_FIX)
    if path.is_file():
        path = extract_archive(path)
    elif _cifar_layout(path) is None:  # a folder holding the archive, e.g. ../shared/datasets
        archives = sorted(p for p in path.glob("cifar*") if p.name.endswith((".tar.gz", ".tgz", ".tar")))
        if len(archives) == 1:
            path = extract_archive(archives[0])
    return path, _read_cifar(path)


def _cifar_layout(folder: Path) -> tuple[str, Path] | None:
    """("batches", folder) for torchvision's pickled format, ("images", folder) for train/ + test/."""
    for root in (folder, folder / "cifar10"):
        for batches in (root, root / "cifar-10-batches-py"):
            if (batches / "data_batch_1").is_file() and (batches / "test_batch").is_file():
                return "batches", batches
        if (root / "train").is_dir() and (root / "test").is_dir():
            return "images", root
    return None


def _read_cifar(folder: Path) -> tuple[TensorSplit, TensorSplit, list[str]]:
    layout = _cifar_layout(folder)
    if layout is None:
        raise UserError(f"{folder} holds neither cifar-10-batches-py nor train/ and test/ class folders",
                        _CIFAR_FIX)
    kind, root = layout
    return _read_cifar_batches(root) if kind == "batches" else _read_image_folders(root)


def _read_cifar_batches(folder: Path) -> tuple[TensorSplit, TensorSplit, list[str]]:
    """torchvision's ``cifar-10-batches-py``: pickled dicts with ``data`` uint8 [N, 3072] and ``labels``
    (class names from ``batches.meta`` when present), read with :func:`read_data_pickle` (never executes
    code from the files)."""
    def load(names: list[str]) -> TensorSplit:
        images, labels = [], []
        for file in names:
            entry = read_data_pickle(folder / file)
            try:
                data = _plain_array(entry["data"], np.uint8)
                label = _plain_array(entry.get("labels", entry.get("fine_labels")), np.int64)
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
                raise UserError(f"CIFAR-10 batch {folder / file} is not a data / labels dict ({exc})",
                                "re-download cifar-10-python.tar.gz") from exc
            if data.size % 3072 or label.ndim != 1 or len(label) != data.size // 3072:
                raise UserError(f"CIFAR-10 batch {folder / file} holds {data.size} image bytes for "
                                f"{label.size} labels (need 3072 bytes per label)",
                                "re-download cifar-10-python.tar.gz")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(label)
        return TensorSplit(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))

    classes = [f"class{i}" for i in range(10)]
    if (folder / "batches.meta").is_file():
        names = read_data_pickle(folder / "batches.meta")
        names = names.get("label_names") if isinstance(names, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
            raise UserError(f"{folder / 'batches.meta'} holds no label_names list",
                            "re-download cifar-10-python.tar.gz")
        classes = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    return load([f"data_batch_{i}" for i in range(1, 6)]), load(["test_batch"]), classes


# Reading pickled data files without running code. A pickle is a program: every callable it invokes is
# looked up through ``Unpickler.find_class``, so an unpickler whose ``find_class`` answers only with inert
# stand-ins of our own cannot be made to call anything else (os.system, eval, builtins.open, ...).
# CIFAR-10's batches need exactly numpy's array reconstruction (``_reconstruct`` + ``ndarray`` + ``dtype``,
# or ``_frombuffer`` under protocol 5, and ``_codecs.encode(text, "latin1")`` for bytes that Python 3 wrote
# under protocol 2); those names map to the stand-ins below, which only record their
# arguments and state. The arrays are then rebuilt by us from raw bytes with ``np.frombuffer`` after the
# dtype is checked to be a plain number type, so no numpy code ever runs on the file's own state
# (a dtype's or array's ``__setstate__`` is never called). Anything else is refused.
class _DTypeStub:
    """Stand-in for ``numpy.dtype(spec, align, copy)``; ``__setstate__`` records the byte order."""

    def __init__(self, spec, align=False, copy=False):
        self.spec, self.state = spec, None

    def __setstate__(self, state):
        self.state = state

    def resolve(self) -> np.dtype:
        """The numpy dtype: a plain bool / integer / float type with the recorded byte order."""
        spec = self.spec.decode("latin1") if isinstance(self.spec, bytes) else self.spec
        state = self.state if isinstance(self.state, tuple) else (3, "|", None, None, None)
        if not isinstance(spec, str) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise ValueError(f"dtype {spec!r} is not a plain number type")
        dtype = np.dtype(spec)
        if dtype.kind not in "biuf" or state[1] not in ("<", ">", "|", "="):
            raise ValueError(f"dtype {spec!r} is not a plain number type")
        return dtype.newbyteorder(state[1]) if state[1] in "<>" else dtype


class _ArrayStub:
    """Stand-in for a numpy array: ``(shape, dtype stub, fortran order, raw bytes)`` as pickled."""

    shape: tuple = ()
    dtype: _DTypeStub | None = None
    fortran: bool = False
    raw: object = None

    def __setstate__(self, state):  # ndarray.__reduce__ state: (version, shape, dtype, is_fortran, rawdata)
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("unexpected numpy array state")
        _, self.shape, self.dtype, self.fortran, self.raw = state

    def resolve(self) -> np.ndarray:
        """The array, rebuilt from its raw bytes (a latin-1 ``str`` for Python 2 pickles)."""
        raw = self.raw.encode("latin1") if isinstance(self.raw, str) else self.raw
        if not isinstance(raw, (bytes, bytearray)) or not isinstance(self.dtype, _DTypeStub):
            raise ValueError("the array holds objects, not raw numbers")
        shape = tuple(int(n) for n in self.shape)
        dtype = self.dtype.resolve()
        if len(raw) != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"{len(raw)} bytes do not fill an array of shape {shape}")
        return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if self.fortran else "C")


class _Reconstruct:
    """Stand-in for ``numpy.core.multiarray._reconstruct(ndarray, shape, dtype)``: an empty :class:`_ArrayStub`
    (its state follows in the pickle)."""

    def __new__(cls, subtype, shape, dtype):
        if subtype is not _ArrayStub:
            raise pickle.UnpicklingError("numpy _reconstruct of something other than an ndarray")
        return _ArrayStub()

    def __setstate__(self, state):  # reached only by a pickle that BUILDs on this class itself
        raise pickle.UnpicklingError("unexpected state for numpy _reconstruct")


class _FromBuffer:
    """Stand-in for ``numpy.core.numeric._frombuffer(buffer, dtype, shape, order)`` (pickle protocol 5)."""

    def __new__(cls, buffer, dtype, shape, order):
        array = _ArrayStub()
        array.__setstate__((1, shape, dtype, order == "F", bytes(buffer) if isinstance(buffer, bytearray) else buffer))
        return array

    def __setstate__(self, state):  # reached only by a pickle that BUILDs on this class itself
        raise pickle.UnpicklingError("unexpected state for numpy _frombuffer")


class _Latin1:
    """Stand-in for ``_codecs.encode(text, "latin1")``, how Python 3 pickles ``bytes`` under protocol 2."""

    def __new__(cls, text, encoding="utf-8"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("_codecs.encode is allowed only for latin1 text")
        return text.encode("latin1")

    def __setstate__(self, state):  # reached only by a pickle that BUILDs on this class itself
        raise pickle.UnpicklingError("unexpected state for _codecs.encode")


# Every stand-in is a class defining __setstate__, so a BUILD opcode aimed at the class itself fails instead
# of setting attributes on it (pickle's "slot state" path calls setattr on objects without __setstate__).
_SAFE_GLOBALS = {
    **{(module, "_reconstruct"): _Reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _FromBuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _ArrayStub,
    ("numpy", "dtype"): _DTypeStub,
    ("_codecs", "encode"): _Latin1,
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a data file never needs "
                                         "(a crafted file may run code)") from None


def read_data_pickle(path: str | os.PathLike):
    """Read a pickled data file (CIFAR-10's python batches) without running any code from it.

    Only plain containers (dict, list, tuple, str, bytes, numbers) and numpy arrays of plain number
    types are accepted; arrays come back as :class:`_ArrayStub` (call :func:`_plain_array` on them).
    The reasoning is in the comment above ``_DTypeStub``: this is a restricted unpickler, chosen over a
    hand-written opcode parser because ``find_class`` is the one door through which a pickle reaches
    callables, and it is documented (Python's ``pickle`` docs, "Restricting Globals").

    Raises:
        UserError: unreadable file, or a pickle that refers to anything outside that list (e.g.
            ``os.system``) or is malformed.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _DataUnpickler(handle, encoding="latin1").load()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}", "check the file's permissions") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, MemoryError, RecursionError) as exc:
        raise UserError(f"refusing data file {path}: {exc}",
                        "use the official cifar-10-python.tar.gz or the JPEG folder layout") from exc


def _plain_array(value, dtype) -> np.ndarray:
    """``value`` (an :class:`_ArrayStub` or a list of ints) as a new numpy array of ``dtype``; ValueError
    when a value does not fit ``dtype`` exactly, TypeError for anything else."""
    if isinstance(value, _ArrayStub):
        array = value.resolve()
    elif isinstance(value, list) and all(isinstance(v, int) for v in value):
        array = np.asarray(value, dtype=np.int64)
    else:
        raise TypeError(f"expected an array or a list of integers, got {type(value).__name__}")
    converted = array.astype(dtype)
    if not np.array_equal(converted, array):
        raise ValueError(f"its values do not fit {np.dtype(dtype).name}")
    return converted


def _list_images(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist", "it must hold one sub-folder per class")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [(path, label) for label, cls in enumerate(classes)
               for path in sorted((folder / cls).iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise UserError(f"image folder {folder} is empty (no class sub-folders with images)",
                        "put images in <folder>/<class>/*.jpg")
    return classes, samples


def _read_image_folders(root: Path) -> tuple[TensorSplit, TensorSplit, list[str]]:
    """Decode ``root/train/<class>/*`` and ``root/test/<class>/*`` into uint8 tensors, cached as one
    ``.pt`` file in ``cache_dir()/decoded`` keyed by the files' paths, sizes and modification times."""
    listing = {split: _list_images(root / split) for split in ("train", "test")}
    if listing["train"][0] != listing["test"][0]:
        raise UserError(f"class folders of {root / 'train'} and {root / 'test'} differ",
                        "both must hold the same class sub-folders")
    key = hashlib.sha256(str(root.resolve()).encode())
    for split in ("train", "test"):
        for path, label in listing[split][1]:
            stat = path.stat()
            key.update(f"{path.relative_to(root)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    cache = cache_dir() / "decoded" / f"{root.name}-{key.hexdigest()[:16]}.pt"
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            return (TensorSplit(blob["train_images"], blob["train_labels"]),
                    TensorSplit(blob["test_images"], blob["test_labels"]), list(blob["classes"]))
        except Exception:  # noqa: BLE001 - a broken cache is rebuilt, never trusted
            pass
    train, test = (_decode(listing[split][1]) for split in ("train", "test"))
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(f"train images are {tuple(train.images.shape[1:])}, test images "
                        f"{tuple(test.images.shape[1:])}", "use images of one size")
    atomic_torch_save({"train_images": train.images, "train_labels": train.labels, "test_images": test.images,
                       "test_labels": test.labels, "classes": listing["train"][0]}, cache)
    return train, test, listing["train"][0]


def _decode(samples: list[tuple[Path, int]]) -> TensorSplit:
    """Decode image files (PIL, converted to RGB) into uint8 ``[N, 3, H, W]``; all must share one size."""
    from PIL import Image, UnidentifiedImageError

    images = None
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as handle:
                image = torch.from_numpy(np.array(handle.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UserError(f"cannot decode image {path}: {exc}", "remove or replace the file") from exc
        if images is None:
            images = torch.empty((len(samples), *image.shape), dtype=torch.uint8)
        if image.shape != images.shape[1:]:
            raise UserError(f"image {path} is {tuple(image.shape)}, others {tuple(images.shape[1:])}",
                            "use images of one size (CIFAR-10: 32x32)")
        images[i] = image
    return TensorSplit(images, torch.tensor([label for _, label in samples], dtype=torch.int64))


def extract_archive(archive: Path) -> Path:
    """Extract a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive once into ``cache_dir()/extracted/<name>-<hash>``
    (atomically: a temporary folder renamed into place) and return that folder. The hash is of the archive's
    content, so a copy elsewhere or a fresh timestamp (a re-mounted shared folder) reuses the extraction.
    Several processes extracting the same archive at once (torchrun ranks, parallel jobs) all return the folder
    the first to finish renamed into place."""
    digest = hashlib.sha256()
    with open(archive, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    key = digest.hexdigest()[:16]
    stem = archive.name.split(".")[0] or "archive"
    target = cache_dir() / "extracted" / f"{stem}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # else another process extracted the same archive first: use its folder
                raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"cannot extract archive {archive}: {exc}",
                        "check the file (sha256sum) or pass the extracted folder") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------- imagefolder
def _imagefolder(data_dir, val_size: int, seed: int, max_train: int | None, max_test: int | None,
                 input_size: tuple[int, int, int], normalisation: tuple[tuple[float, ...], tuple[float, ...]]
                 ) -> DataSplits:
    if data_dir is None:
        raise UserError("the imagefolder dataset needs --data-dir",
                        "pass a folder with train/<class>/* and val/<class>/* (or test/<class>/*)")
    root = Path(data_dir)
    test_name = next((name for name in ("val", "test") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or test_name is None:
        raise UserError(f"{root} must hold train/ and val/ (or test/) class folders",
                        "arrange the images as <dir>/train/<class>/*.jpg and <dir>/val/<class>/*.jpg")
    from torchvision.datasets import ImageFolder

    datasets = {}
    for split in ("train", test_name):
        try:
            datasets[split] = ImageFolder(str(root / split))
        except FileNotFoundError as exc:  # torchvision's "Couldn't find any class folder" / "no valid file"
            raise UserError(f"image folder {root / split} is empty ({exc})",
                            "put images in <folder>/<class>/*.jpg") from exc
    train, test = datasets["train"], datasets[test_name]
    if train.classes != test.classes:
        raise UserError(f"class folders of {root / 'train'} and {root / test_name} differ",
                        "both must hold the same class sub-folders")
    train_idx, val_idx = carve_validation(len(train), val_size, seed, max_train)
    test_idx = torch.arange(len(test)) if max_test is None else _subset(len(test), max_test, seed)
    mean, std = normalisation
    return DataSplits(
        name="imagefolder", train=FolderSplit(train, train_idx.tolist()), val=FolderSplit(train, val_idx.tolist()),
        test=FolderSplit(test, test_idx.tolist()), num_classes=len(train.classes), input_size=input_size,
        classes=tuple(train.classes), mean=mean, std=std, val_size=val_size, seed=seed, data_dir=str(root))


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, split: FolderSplit, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image, label = self.split.dataset[self.split.indices[i]]
        return self.transform(image), label


#: Inputs at most this many pixels a side are "small" (CIFAR-like): see :func:`folder_transform`.
SMALL_SIDE = 64


def folder_transform(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float], *, augment: bool):
    """The torchvision transform of ``imagefolder`` images for inputs of ``input_size`` ``(C, H, W)``.

    Large inputs (a side over ``SMALL_SIDE``; ImageNet's 224 by default): evaluation resizes the shorter
    side to 8/7 of the target (224 -> 256) and center-crops ``(H, W)``; training uses
    ``RandomResizedCrop((H, W))`` + flip (the standard ImageNet recipe). Small inputs (e.g. 32x32): the
    crop would discard too much of a tiny image, so evaluation resizes the shorter side to the target and
    center-crops (images already ``H x W`` are untouched) and training adds a random crop of the image
    zero-padded by ``min(H, W) // 8`` pixels (4 at 32) + flip, as for CIFAR-10 (He et al. 2016).
    C = 1 converts images to grey. Output: float32 ``[C, H, W]`` normalised with ``mean`` / ``std``.
    """
    from torchvision import transforms as T

    channels, height, width = (int(v) for v in input_size)
    small = max(height, width) <= SMALL_SIDE
    side = max(height, width) if small else round(max(height, width) * 256 / 224)
    fit = [T.Resize(side), T.CenterCrop((height, width))]
    if not augment:
        head = fit
    elif small:
        head = [*fit, T.RandomCrop((height, width), padding=max(1, min(height, width) // 8)), T.RandomHorizontalFlip()]
    else:
        head = [T.RandomResizedCrop((height, width)), T.RandomHorizontalFlip()]
    grey = [T.Grayscale(1)] if channels == 1 else []
    return T.Compose([*grey, *head, T.ToTensor(), T.Normalize(mean, std)])


def _folder_loader(split: FolderSplit, batch_size: int, input_size, mean, std, *, shuffle: bool, augment: bool,
                   generator: torch.Generator | None, drop_last: bool, num_workers: int):
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} is not positive", "pass --batch-size >= 1")
    return torch.utils.data.DataLoader(
        _Transformed(split, folder_transform(input_size, mean, std, augment=augment)), batch_size=batch_size,
        shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
        generator=generator if generator is not None else torch.Generator().manual_seed(0), persistent_workers=False)


__all__ = ["Augment", "DataSplits", "FolderSplit", "TensorLoader", "TensorSplit", "augment_batch", "cache_dir",
           "carve_validation", "checkpoint_dataset", "extract_archive", "folder_transform", "get_dataset",
           "read_data_pickle", "read_idx", "recorded_data_dir"]
