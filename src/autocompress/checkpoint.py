"""Checkpoints: plain-data dicts written atomically and read back with ``torch.load(weights_only=True)``.

Format (docs/ARCHITECTURE.md, "Checkpoints")::

    {"format": "autocompress-checkpoint", "version": 1,
     "model": {"name": "resnet20", "kwargs": {"num_classes": 10, ...}},
     "dataset": {"name": "cifar10", "input_size": [3, 32, 32], "num_classes": 10, ...},
     "state_dict": {...}, "config": {...}, "metrics": {...},
     "architecture": None | {...},     # compact models: serialization.describe_architecture(...)
     "training_state": None | {...}}   # optimizer / scheduler / epoch / RNG states, for --resume

No code is pickled: a model is rebuilt from the registry (``create_model``), reshaped by
``serialization.apply_architecture`` when it is a compact model, then filled with a strict
``load_state_dict``.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_torch_save
from .errors import UserError

FORMAT = "autocompress-checkpoint"
VERSION = 1
_REQUIRED = ("model", "dataset", "state_dict")


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, model_name: str, model_kwargs: dict,
                    dataset: dict, config: Any, metrics: dict, architecture: dict | None = None,
                    training_state: dict | None = None) -> Path:
    """Write a checkpoint to ``path`` atomically (the old file stays intact until the new one is complete).

    Args:
        model: its ``state_dict`` is stored (tensors moved to CPU).
        model_name, model_kwargs: ``create_model(model_name, **model_kwargs)`` rebuilds it; the kwargs
            include ``num_classes``.
        dataset: plain-data description, e.g. ``DataSplits.describe()`` (name, input_size, num_classes).
        config: training configuration, a dataclass or dict (stored as a dict).
        metrics: plain-data results (top-1 as a fraction in [0, 1], losses, timings).
        architecture: compact-model description from ``serialization`` or None.
        training_state: optimizer / scheduler / epoch / RNG states for resuming, or None when finished.

    Returns the path.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return atomic_torch_save({
        "format": FORMAT, "version": VERSION,
        "model": {"name": model_name, "kwargs": dict(model_kwargs)},
        "dataset": dict(dataset), "state_dict": state_dict, "config": dict(config or {}),
        "metrics": dict(metrics or {}), "architecture": architecture, "training_state": training_state,
    }, path)


def load_checkpoint(path: str | os.PathLike, *, trust: bool = False, map_location: Any = "cpu") -> dict:
    """Read and validate a checkpoint written by :func:`save_checkpoint`.

    Args:
        trust: load with ``weights_only=False`` (unpickles arbitrary objects; only for files you trust).
        map_location: passed to ``torch.load``.

    Raises:
        UserError: the file is missing, a folder, unreadable / corrupt, holds pickled objects (without
            ``trust``), is not an autocompress checkpoint, or comes from a newer format version.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist",
                        "check the path, or write one with `autocompress train --out PATH`")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file", "pass the .pt file, not a folder")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=not trust)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files; all mean the same
        unsafe = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        if unsafe:
            raise UserError(f"checkpoint {path} holds pickled Python objects, not plain data ({unsafe[0][:160]})",
                            "re-save it with autocompress; if you trust its source, load it in Python with "
                            "autocompress.checkpoint.load_checkpoint(path, trust=True) and save it again"
                            ) from exc
        raise UserError(f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__})",
                        "re-create it (e.g. `autocompress train ... --resume` or train again)") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an autocompress checkpoint (no format={FORMAT!r} entry)",
                        "pass a file written by `autocompress train` or `autocompress compress`")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > VERSION:
        raise UserError(f"checkpoint {path} has format version {ckpt.get('version')!r}, this autocompress "
                        f"reads up to {VERSION}", "upgrade autocompress")
    missing = [key for key in _REQUIRED if not isinstance(ckpt.get(key), dict)]
    if missing or "name" not in ckpt["model"]:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing) or 'model.name'}",
                        "re-create it with `autocompress train`")
    ckpt.setdefault("architecture", None)
    ckpt.setdefault("training_state", None)
    ckpt["model"].setdefault("kwargs", {})
    return ckpt


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the model of a loaded checkpoint: ``create_model(name, **kwargs)``, then
    ``serialization.apply_architecture`` when ``ckpt["architecture"]`` is set, then a strict
    ``load_state_dict``. The model is returned in train mode on the CPU (or where the tensors were mapped).

    Raises:
        UserError: unknown model name / options, or weights that do not match the model's shapes or names.
    """
    from .models import create_model

    name, kwargs = ckpt["model"]["name"], ckpt["model"]["kwargs"]
    model = create_model(name, **kwargs)
    if ckpt.get("architecture") is not None:
        from .serialization import apply_architecture

        model = apply_architecture(model, ckpt["architecture"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise UserError(f"the checkpoint's weights do not match model {name} {kwargs} ({detail[:200]})",
                        "the checkpoint was written for another model or options; pass a matching "
                        "checkpoint") from exc
    return model


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load a checkpoint file and rebuild its model in eval mode (used by ``autocompress.load``).

    Raises:
        UserError: as :func:`load_checkpoint` and :func:`model_from_checkpoint`.
    """
    model = model_from_checkpoint(load_checkpoint(path, map_location=map_location))
    return model.eval()


__all__ = ["FORMAT", "VERSION", "load_checkpoint", "load_model", "model_from_checkpoint", "save_checkpoint"]
