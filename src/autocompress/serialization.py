"""Saving compact models without pickled code: an architecture description plus a state_dict.

:func:`save_compact` writes a checkpoint (docs/ARCHITECTURE.md "Checkpoints") holding how to build the
model the compact one came from (a registered name, or the import path and constructor arguments of the
user's own class), the architecture description of :mod:`autocompress.architecture` (re-exported here:
:func:`describe_architecture`, :func:`apply_architecture`) and the compact state_dict; files hold only the
remaining parameters, so their size is proportional to them. ``autocompress.load`` reads it back.

Irregular (non-structured) zeros stay in dense tensors; :func:`to_sparse_state_dict` /
:func:`from_sparse_state_dict` give a CSR export with int32 indices for storage.
"""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architecture import apply_architecture, describe_architecture
from .checkpoint import class_path, import_model_class, save_checkpoint
from .errors import UserError


def _constructible_without_arguments(cls: type) -> bool:
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # no signature to inspect: treat the arguments as unknown
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


def _model_source(compact_model: nn.Module, base_checkpoint: dict | None, model_class: type | str | None,
                  model_kwargs: dict | None) -> dict:
    """``save_checkpoint`` keyword arguments saying how to build the model (see :func:`save_compact`)."""
    if model_class is None and model_kwargs is None and base_checkpoint is not None:
        entry = base_checkpoint["model"]
        return {"model_name": entry.get("name"), "model_class": entry.get("class"),
                "model_kwargs": entry.get("kwargs")}
    if model_class is None:
        cls = type(compact_model)
        if model_kwargs is None and _constructible_without_arguments(cls):
            model_kwargs = {}
    else:
        cls = import_model_class(model_class) if isinstance(model_class, str) else model_class
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise UserError(f"model_class must be an nn.Module subclass or its import path, got {model_class!r}",
                            "pass the model's class, e.g. model_class=MyNet or model_class='mypkg.nets:MyNet'")
        if not isinstance(compact_model, cls):
            raise UserError(f"the compact model is a {type(compact_model).__name__}, not a {cls.__name__} "
                            "(model_class)", "pass the class the compact model was built from")
    path = model_class if isinstance(model_class, str) else class_path(cls)
    return {"model_name": None, "model_class": path, "model_kwargs": model_kwargs}


def save_compact(path: str | os.PathLike, compact_model: nn.Module, *, base_checkpoint: dict | None = None,
                 model_class: type | str | None = None, model_kwargs: dict | None = None,
                 dataset: dict | None = None, metrics: dict | None = None, config: Any = None,
                 architecture: dict | None = None) -> Path:
    """Save a compact model as an autocompress checkpoint (atomic; docs/ARCHITECTURE.md "Checkpoints").

    ``autocompress.load(path)`` first builds a fresh base model, as recorded in the file's ``model`` entry:

    * ``model_class`` and / or ``model_kwargs`` given: the class (``model_class``: the class or its import
      path ``"package.module:Name"``; default ``type(compact_model)``) is recorded by import path with
      ``model_kwargs``, its constructor's keyword arguments (plain data). Loading imports the class
      (the user's own installed code; it must be an ``nn.Module`` subclass) and calls ``cls(**model_kwargs)``:
      no registry is needed.
    * otherwise ``base_checkpoint``'s entry (a registered model's name and kwargs: the zoo pipeline).
    * otherwise ``type(compact_model)``'s import path, with no arguments when its constructor needs none;
      when it needs some, none are recorded.

    When the class cannot be imported where the file is loaded (defined inside a function, or in another
    script's ``__main__``) or its arguments are unknown, ``autocompress.load(path, model=fresh_instance)``
    applies the saved architecture and weights to the caller's own instance.

    Args:
        compact_model: e.g. ``compaction.compact(...).model`` or ``pruning.prune(...).compact_model``.
        base_checkpoint: the loaded checkpoint of the model it was compacted from; its ``model`` and
            ``dataset`` entries are kept.
        model_class, model_kwargs: see above; ``model_class`` must be the class of ``compact_model``
            (compaction keeps the top-level module's class).
        dataset: plain-data description of the data (default: ``base_checkpoint``'s, else ``{}``), e.g.
            ``{"input_size": [3, 32, 32]}`` for ``autocompress export``.
        metrics, config: plain data stored alongside (top-1 as a fraction, pruning settings, ...).
        architecture: the description (default: ``describe_architecture(compact_model)``, every module).

    Returns the path. The file holds the compact state_dict only, so its size is proportional to the
    remaining parameters (plus a few bytes per described module).

    Raises:
        UserError: ``model_class`` is not an importable ``nn.Module`` subclass or not the compact model's
            class, or ``model_kwargs`` are not plain data.
    """
    source = _model_source(compact_model, base_checkpoint, model_class, model_kwargs)
    if dataset is None:
        dataset = base_checkpoint["dataset"] if base_checkpoint is not None else {}
    return save_checkpoint(path, model=compact_model, **source, dataset=dataset, config=config or {},
                           metrics=metrics or {}, architecture=architecture if architecture is not None
                           else describe_architecture(compact_model))


def to_sparse_state_dict(state_dict: dict[str, torch.Tensor], *, min_sparsity: float = 0.5) -> dict:
    """Sparse export of irregularly pruned weights: CSR with int32 indices.

    A floating tensor with at least ``min_sparsity`` zeros is stored as its 2-D view ``[shape[0], -1]`` in
    CSR form (``crow_indices`` int32 ``[rows+1]``, ``col_indices`` int32 ``[nnz]``, ``values`` ``[nnz]``);
    at 4-byte values this is smaller than dense above 50 % zeros. Other tensors are kept as they are.

    Returns ``{"format": "autocompress-sparse", "dense": {name: tensor}, "sparse": {name: {"shape": list,
    "crow_indices", "col_indices", "values"}}}`` (plain data, loadable with ``weights_only=True``).
    """
    dense, sparse = {}, {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dim() >= 1 and tensor.numel() > 0 \
                and float((tensor == 0).float().mean()) >= min_sparsity:
            matrix = tensor.reshape(tensor.shape[0], -1)
            nonzero = matrix != 0
            crow = torch.zeros(matrix.shape[0] + 1, dtype=torch.int32)
            crow[1:] = nonzero.sum(dim=1).cumsum(0)
            sparse[name] = {"shape": list(tensor.shape), "crow_indices": crow,
                            "col_indices": torch.nonzero(nonzero)[:, 1].to(torch.int32),
                            "values": matrix[nonzero].clone()}
        else:
            dense[name] = tensor
    return {"format": "autocompress-sparse", "dense": dense, "sparse": sparse}


def from_sparse_state_dict(sparse_state: dict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_sparse_state_dict`: a dense state_dict (same names and values)."""
    if not isinstance(sparse_state, dict) or sparse_state.get("format") != "autocompress-sparse":
        raise UserError("not an autocompress sparse state_dict", "write it with to_sparse_state_dict")
    state = dict(sparse_state["dense"])
    for name, entry in sparse_state["sparse"].items():
        shape, values = entry["shape"], entry["values"]
        dense = values.new_zeros(shape[0], math.prod(shape[1:]))
        rows = torch.repeat_interleave(torch.arange(shape[0]), entry["crow_indices"].long().diff())
        dense[rows, entry["col_indices"].long()] = values
        state[name] = dense.reshape(shape)
    return state


__all__ = ["apply_architecture", "describe_architecture", "from_sparse_state_dict", "save_compact",
           "to_sparse_state_dict"]
