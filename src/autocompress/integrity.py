"""Integrity checks of checkpoint files and weights, before anything is computed from them.

* :func:`verify_archive`: a ``torch.save`` file is a zip archive whose entries (``data.pkl``, one
  ``data/<n>`` entry per tensor storage, ...) each carry a CRC-32 of their bytes. ``torch.load`` does not
  check them: a flipped byte inside tensor data loads silently as a wrong weight. This function reads
  every entry and compares (Python's ``zipfile.ZipFile.testzip``).
* :func:`check_finite`: refuses floating-point tensors holding NaN or Inf in a ``state_dict`` (a diverged
  training run, or a damaged file saved without CRCs), naming the first bad tensor.

* :func:`output_check` / :func:`verify_outputs`: a fingerprint of a saved model's outputs on a seeded input,
  stored in its checkpoint, and the check that the model rebuilt at load time computes them (a class built with
  other constructor arguments, or a given instance built otherwise, has the saved weights and still computes
  something else: pooling, activations, flags live in no weight).

They raise :class:`~autocompress.errors.UserError` with a one-line message.
"""
from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .analysis import analysis_mode, model_device, output_tensors
from .errors import ModelMismatch, UserError

#: batch of the seeded standard-normal input an output check runs (seed 0), and the most input elements it draws
CHECK_BATCH, CHECK_MAX_ELEMENTS = 2, 1 << 22
#: leading output values an output check keeps per output tensor
CHECK_VALUES = 64
#: allowed difference, relative to max(1, the saved values' magnitude): float sums of another device, thread count
#: or kernel (cuDNN's TF32 convolutions) move outputs by ~1e-3 of their scale; a wrong pooling moves them by ~0.1-1
CHECK_TOLERANCE = 1e-2


def verify_archive(path: str | os.PathLike) -> None:
    """Check the CRC-32 of every entry of the ``torch.save`` zip archive at ``path``.

    Archives written with ``torch.serialization.set_crc32_options(False)`` record a CRC of 0 for every
    entry; they cannot be verified and pass unchecked.

    Raises:
        UserError: the file is missing, not a zip archive (truncated, or not a ``torch.save`` file), or an
            entry's bytes do not match its CRC ("checkpoint X is damaged (CRC mismatch in ...)").
    """
    path = Path(path)
    fix = "restore the file from a backup or re-create it (re-run the command that wrote it)"
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [info for info in archive.infolist() if info.file_size > 0]
            if entries and all(info.CRC == 0 for info in entries):
                return
            bad = archive.testzip()
    except FileNotFoundError as exc:
        raise UserError(f"checkpoint {path} does not exist", "check the path") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as exc:
        raise UserError(f"checkpoint {path} is damaged or not a torch.save archive ({exc})", fix) from exc
    if bad is not None:
        raise UserError(f"checkpoint {path} is damaged (CRC mismatch in {bad})", fix)


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse NaN / Inf entries in the floating-point (and complex) tensors of ``state_dict``.

    Args:
        state_dict: parameter / buffer name -> tensor (any shape; integer tensors are skipped).
        source: what the weights come from, for the message (e.g. ``"checkpoint runs/a.pt"``).

    Raises:
        UserError: naming the first tensor (in ``state_dict`` order) with a non-finite entry, and how many
            of its entries are NaN / Inf.
    """
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor).sum())
            inf = int((~finite).sum()) - nan
            raise UserError(f"{source} holds non-finite weights: {name} {tuple(tensor.shape)} has {nan} NaN and "
                            f"{inf} Inf entries",
                            "use an earlier checkpoint of the run, or re-train with a lower learning rate")


def _check_input(input_size, device: torch.device) -> torch.Tensor | None:
    shape = (CHECK_BATCH, *(int(side) for side in input_size))
    if math.prod(shape) > CHECK_MAX_ELEMENTS:
        return None
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)


def _fingerprint(model: nn.Module, inputs: torch.Tensor) -> list[dict]:
    with analysis_mode(model):
        outputs = output_tensors(model(inputs))
    return [{"shape": list(out.shape), "abs_sum": float(out.float().abs().sum()),
             "head": out.detach().float().flatten()[:CHECK_VALUES].cpu().tolist()} for out in outputs]


def output_check(model: nn.Module, input_size) -> dict | None:
    """A fingerprint of ``model``'s outputs (eval mode, no grad) on a seeded standard-normal input ``[2,
    *input_size]``: per output tensor its shape, the sum of its absolute values and its first 64 values, to store in
    a checkpoint (plain data). None when there is no ``input_size``, the input would exceed 4 M elements, the
    forward fails on a float tensor (e.g. token ids) or returns no tensors, or two forwards differ (randomness in
    eval mode)."""
    if not input_size:
        return None
    inputs = _check_input(input_size, model_device(model))
    if inputs is None:
        return None
    try:
        first, second = _fingerprint(model, inputs), _fingerprint(model, inputs)
    except Exception:  # the caller's forward, whatever it raises on this input: no check stored
        return None
    if first != second or not all(math.isfinite(out["abs_sum"]) for out in first):
        return None
    return {"input_size": [int(side) for side in input_size], "outputs": first}


def verify_outputs(model: nn.Module, check: dict, label: str) -> None:
    """UserError unless ``model`` computes the outputs ``check`` (:func:`output_check`) recorded, within
    :data:`CHECK_TOLERANCE` of their scale; ``label`` names the model in the message."""
    inputs = _check_input(check["input_size"], model_device(model))
    if inputs is None:
        return
    got = _fingerprint(model, inputs)
    saved = check["outputs"]
    problem = None
    if [out["shape"] for out in got] != [out["shape"] for out in saved]:
        problem = f"outputs of shapes {[out['shape'] for out in got]}, saved {[out['shape'] for out in saved]}"
    else:
        for have, want in zip(got, saved):
            scale = max(1.0, max((abs(v) for v in want["head"]), default=0.0))
            diff = max((abs(a - b) for a, b in zip(have["head"], want["head"])), default=0.0)
            total = abs(have["abs_sum"] - want["abs_sum"]) / max(1.0, want["abs_sum"])
            if not (diff <= CHECK_TOLERANCE * scale and total <= CHECK_TOLERANCE):
                problem = f"outputs differing by up to {diff:.3g} from the saved model's (scale {scale:.3g})"
                break
    if problem is not None:
        raise ModelMismatch(f"the loaded {label} computes {problem} on the checkpoint's check input: it was "
                             "built with other constructor arguments or code than the model saved",
                             "pass model= an instance built as the model you compressed (or check=False to load "
                             "it anyway)")


__all__ = ["check_finite", "output_check", "verify_archive", "verify_outputs"]
