"""Integrity checks of checkpoint files and weights, before anything is computed from them.

* :func:`verify_archive`: a ``torch.save`` file is a zip archive whose entries (``data.pkl``, one
  ``data/<n>`` entry per tensor storage, ...) each carry a CRC-32 of their bytes. ``torch.load`` does not
  check them: a flipped byte inside tensor data loads silently as a wrong weight. This function reads
  every entry and compares (Python's ``zipfile.ZipFile.testzip``).
* :func:`check_finite`: refuses floating-point tensors holding NaN or Inf in a ``state_dict`` (a diverged
  training run, or a damaged file saved without CRCs), naming the first bad tensor.

Both raise :class:`~autocompress.errors.UserError` with a one-line message.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Mapping

import torch

from .errors import UserError


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


__all__ = ["check_finite", "verify_archive"]
