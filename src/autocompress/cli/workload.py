"""The CLI's world: a checkpoint file and a named dataset, turned into what the library takes (a model,
example inputs, data loaders). Used by ``compress`` and ``prune``.

The data settings (:class:`DataSettings`) are the top-level keys ``dataset``, ``data_dir``, ``val_size``,
``max_train``, ``max_test``, ``batch_size`` of a compress config file (and the matching flags); a value
not given comes from what the checkpoint recorded (dataset name, validation carve), else the default.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import SettingError, from_dict
from ..errors import UserError

EVAL_BATCH = 256


@dataclass
class DataSettings:
    """Where the CLI's data comes from.

    Attributes:
        dataset: ``fashion-mnist``, ``cifar10`` or ``imagefolder`` (None: the one the checkpoint records).
        data_dir: the dataset folder (None: the dataset's default lookup).
        val_size: images carved from the training split for validation (None: the checkpoint's, else 5000).
        max_train: a seeded training subset of at most this many images (None: all).
        max_test: a seeded test subset for the final table (None: all).
        batch_size: training batch size of ADMM and retraining.
        augment: ``"default"`` (the dataset's training augmentation, :mod:`autocompress.data`) or ``"none"``
            (training batches as they are: flips reverse time in a spectrogram).
    """

    dataset: str | None = None
    data_dir: str | None = None
    val_size: int | None = None
    max_train: int | None = None
    max_test: int | None = None
    batch_size: int = 128
    augment: str = "default"

    @classmethod
    def split_from(cls, settings: dict) -> tuple["DataSettings", dict]:
        """The data settings among a config file's top-level ``settings``, and the rest."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = from_dict(cls, {k: v for k, v in settings.items() if k in names})
        return data, {k: v for k, v in settings.items() if k not in names}

    def validate(self) -> None:
        """SettingError for a size that cannot work (checked before any work)."""
        for name in ("val_size", "max_train", "max_test", "batch_size"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 10 ** 9:
                raise SettingError(name, f"{name}={value} is outside [1, 1e9]", f"give {name} >= 1")
        if self.augment not in AUGMENTS:
            raise SettingError("augment", f"augment={self.augment!r} is not valid", f"use {' or '.join(AUGMENTS)}")

    def absolute(self) -> "DataSettings":
        """With ``data_dir`` absolute (a run resumes from any working directory)."""
        return dataclasses.replace(self, data_dir=os.path.abspath(self.data_dir) if self.data_dir else None)


#: the values of the ``augment`` data setting
AUGMENTS = ("default", "none")


class ReseededLoader:
    """A training loader whose order and augmentation are drawn, at every new epoch, from a generator seeded
    from the global torch RNG (which the pipeline seeds per phase): a resumed phase sees the same batches.

    ``batch_size`` is the global batch. ``shard(rank, size)`` (called by
    :func:`autocompress.distributed.shard_loader` under ``torch.distributed``) gives rank ``rank``'s loader:
    every rank draws the same epoch and keeps slice ``rank`` of ``size`` near-equal slices of every batch, so
    ``size`` processes take the same optimizer steps on the same batches as one process (gradients are
    averaged across ranks). A last batch smaller than ``size`` is left out on every rank.

    Args:
        splits: :class:`autocompress.data.DataSplits`; batch_size: images per optimizer step, all ranks
            together; augment: draw the dataset's training augmentation (False: the images as they are).
    """

    def __init__(self, splits, batch_size: int, rank: int = 0, size: int = 1, *, augment: bool = True):
        self.splits, self.batch_size, self.rank, self.size, self.augment = splits, batch_size, rank, size, augment

    def shard(self, rank: int, size: int) -> "ReseededLoader":
        """This loader's share for rank ``rank`` of ``size``."""
        return ReseededLoader(self.splits, self.batch_size, rank, size, augment=self.augment)

    def __len__(self) -> int:
        batches = len(self.splits.loader("train", self.batch_size))
        last = len(self.splits.split("train")) % self.batch_size
        return batches - (0 < last < self.size)

    def __iter__(self):
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        epoch = self.splits.loader("train", self.batch_size, augment=self.augment,
                                   generator=torch.Generator().manual_seed(seed))
        batches = itertools.islice(epoch, len(self))
        if self.size == 1:
            return batches
        return ((images.tensor_split(self.size)[self.rank], labels.tensor_split(self.size)[self.rank])
                for images, labels in batches)


@dataclass
class Workload:
    """A loaded checkpoint and its data: ``ckpt`` (plain data), ``model``, ``splits``, ``example`` (a zero
    input ``[1, *input_size]``), ``augment`` (training batches drawn with the dataset's augmentation)."""

    path: Path
    ckpt: dict
    model: torch.nn.Module
    splits: Any
    example: torch.Tensor
    augment: bool = True

    def train_loader(self, batch_size: int) -> ReseededLoader:
        """Shuffled training batches, augmented unless the data settings say ``augment: none`` (see
        :class:`ReseededLoader`)."""
        return ReseededLoader(self.splits, batch_size, augment=self.augment)

    def augmentation_line(self) -> str:
        """The log line saying what training batches are drawn with (a flip reverses a spectrogram's time axis:
        fresh user 87 found it only in the source)."""
        if not self.augment:
            return f"training batches: {self.splits.name} images as they are (augment: none)"
        return (f"training batches: {self.splits.name} with {self.splits.augmentation()} (augment: none, or "
                "--augment none, trains on the images as they are)")

    def loader(self, split: str):
        """Validation or test batches in order, without augmentation."""
        return self.splits.loader(split, EVAL_BATCH, shuffle=False, augment=False)

    def carve_warning(self) -> str | None:
        """The warning for a checkpoint that records no validation carve (trained outside ``autocompress train``):
        the validation images, carved from the training split here, may be images the model trained on."""
        if (self.ckpt.get("dataset") or {}).get("val_size") is not None or not self.splits.val_size:
            return None
        return (f"the checkpoint records no validation carve, so validation is {self.splits.val_size} images carved "
                f"from the training split (seed {self.splits.seed}); if the model trained on them, validation scores "
                "read high (the search, the distillation stop test and the final table's val column see them); the "
                "test split stays clean")

    def normalisation_warning(self) -> str | None:
        """:func:`normalisation_warning` for this checkpoint and data."""
        return normalisation_warning(self.ckpt.get("dataset") or {}, self.splits)


def normalisation_warning(dataset: dict, splits) -> str | None:
    """The warning for a checkpoint (its ``dataset`` entry) that records no input normalisation and no validation
    carve (trained outside ``autocompress train``, which records its carve and normalises so): the inputs are
    normalised here with the dataset's mean and std (``splits``: :class:`autocompress.data.DataSplits`), which a
    model trained on other inputs reads as shifted data (a fresh user's base read 56.2 % here against 58.5 % in their
    pipeline; fresh user 58's [0, 1]-input model 16.8 % against 79.6 %)."""
    if (dataset.get("mean") is not None and dataset.get("std") is not None) or dataset.get("val_size") is not None:
        return None  # recorded, or written by autocompress train (its carve), which normalises so
    mean, std = (", ".join(f"{v:.3g}" for v in values) for values in (splits.mean, splits.std))
    return (f"the checkpoint records no input normalisation, so images are scaled to [0, 1] and normalised "
            f"with {splits.name}'s mean ({mean}) and std ({std}) here; a model trained on other inputs "
            "scores lower on them (compare the base's score here with yours): record the normalisation it was "
            "trained with as the checkpoint's dataset mean and std (0 and 1 for [0, 1] inputs), or compress it "
            "through the Python API with your own loaders")


def load_workload(checkpoint: str | os.PathLike, data: DataSettings, *, seed: int = 0,
                  model_args: list[str] = ()) -> Workload:
    """Read ``checkpoint`` (``weights_only``; ``model_args``: ``--model-arg`` items, :func:`read_checkpoint`), rebuild
    its model and load its dataset.

    Raises:
        UserError: an unreadable checkpoint, a compact model (prune the trained one), no dataset or input
            size recorded nor given, a dataset whose images do not fit the recorded input size.
    """
    from . import read_checkpoint
    from ..checkpoint import model_from_checkpoint
    from ..data import checkpoint_dataset

    path = Path(checkpoint)
    ckpt = read_checkpoint(path, model_args)
    if ckpt.get("architecture") is not None:
        raise UserError(f"{path} is already a compact model", "compress or prune the trained checkpoint it came from")
    stored = ckpt.get("dataset") or {}
    splits = checkpoint_dataset(stored, data.dataset, data.data_dir, val_size=data.val_size,
                                seed=stored.get("seed", seed), max_train=data.max_train, max_test=data.max_test)
    model = model_from_checkpoint(ckpt).eval()
    example = torch.zeros(1, *(stored.get("input_size") or splits.input_size))
    _refuse_non_classifier(path, model, example, splits)
    return Workload(path, ckpt, model, splits, example, augment=data.augment != "none")


def _refuse_non_classifier(path: Path, model, example: torch.Tensor, splits) -> None:
    """UserError when ``model``'s output on ``example`` is not one row of at least ``splits.num_classes`` class
    scores: the command line trains and scores with its datasets' labels (cross-entropy, top-1), so a denoiser's
    or a detector's output would be refused later with fixes only the Python API takes (``loss_fn``). A forward
    that fails is left to the library's checks, which name it."""
    from ..analysis import analysis_mode

    try:
        with analysis_mode(model):
            output = model(example)
    except Exception:  # noqa: BLE001 - reported by the library's own check of a batch
        return
    if isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[1] >= splits.num_classes:
        return
    what = f"a tensor of shape {list(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
    raise UserError(f"{path}'s model outputs {what} for one image, not scores of the {splits.num_classes} classes of "
                    f"{splits.name}: the command line compresses classifiers of its datasets",
                    "for another task call autocompress.compress from Python with your own loaders, loss_fn and "
                    "score_fn (README: 'Your model, your data')")
