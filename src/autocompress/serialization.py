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
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis import analysis_mode, model_device, output_tensors, structure_digest
from .architecture import apply_architecture, describe_architecture
from .channel_norms import standard_channel_norms
from .checkpoint import class_path, import_model_class, save_checkpoint, storable_option
from .errors import UserError
from .integrity import output_check
from .multihead import SplitMultiheadAttention, split_multihead_attention
from .sparse import from_sparse_state_dict, to_sparse_state_dict  # noqa: F401 (part of this module's API)


def _constructible_without_arguments(cls: type) -> bool:
    """Whether ``cls()`` may build the model: its constructor needs no argument, and it is not a torch container
    (``nn.Sequential()`` builds an empty one: its layers are its arguments)."""
    if cls in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        return False
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # no signature to inspect: treat the arguments as unknown
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


def constructor_arguments(model: nn.Module, example_inputs: tuple) -> dict | None:
    """Keyword arguments with which ``type(model)`` rebuilds ``model``, for a checkpoint's ``model`` entry.

    A candidate rebuilds it when a fresh ``type(model)(**kwargs)`` takes ``model``'s state_dict (strict), has
    ``model``'s structure (:func:`~autocompress.analysis.structure_digest`: the same modules with the same settings,
    a Dropout rate or BatchNorm momentum that only training sees, and the same scalar attributes of the caller's own
    modules, a drop-path rate its forward reads in training) and then computes ``model``'s outputs on
    ``example_inputs`` (a tuple of input tensors; eval mode, no grad; relative difference <= 1e-4). Tried in
    order: no arguments (when the constructor needs none), then the constructor's parameters read back from
    ``model``'s attributes of the same name where a checkpoint can record them
    (:func:`~autocompress.checkpoint.storable_option`; a class that keeps ``self.width = width``).

    Returns None when neither rebuilds it, e.g. ``MyNet(pool="mean")`` whose ``MyNet()`` pools otherwise and
    keeps no ``pool`` attribute, ``MyNet(dropout=0.3)`` or ``MyNet(drop_path=0.1)`` keeping no attribute of that
    name, or a model given an attribute after it was built (no constructor call sets it): a checkpoint
    recording ``{}`` there would load a model computing (or training) otherwise; with None, ``autocompress.load``
    asks for ``model=``. Never raises for the caller's constructor or forward (a failure means "does not
    rebuild").
    """
    cls = type(model)
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    named = {name: p for name, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    read = {name: getattr(model, name) for name in named if storable_option(getattr(model, name, _MISSING))}
    read = {name: value for name, value in read.items() if named[name].default is named[name].empty
            or not _equal(value, named[name].default)}
    candidates = [{}] if _constructible_without_arguments(cls) else []
    if read and all(name in read for name, p in named.items() if p.default is p.empty):
        candidates.append(read)
    return next((kwargs for kwargs in candidates if _rebuilds(cls, kwargs, model, example_inputs)), None)


_MISSING = object()


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a default whose == is not a truth value
        return False


def _rebuilds(cls: type, kwargs: dict, model: nn.Module, example_inputs: tuple) -> bool:
    """Whether ``cls(**kwargs)`` has ``model``'s structure and with ``model``'s state_dict computes its outputs on
    ``example_inputs``."""
    try:
        fresh = cls(**kwargs)
        if any(isinstance(m, SplitMultiheadAttention) for m in model.modules()):
            split_multihead_attention(fresh)  # as the pipeline did to its base model
        standard_channel_norms(fresh)  # likewise
        fresh.load_state_dict(model.state_dict())
        if structure_digest(fresh) != structure_digest(model):  # other module settings (after the weights are
            return False  # loaded, so a module printing a value of its own compares equal)
        fresh.to(model_device(model))
        with analysis_mode(model), analysis_mode(fresh):
            want, got = output_tensors(model(*example_inputs)), output_tensors(fresh(*example_inputs))
    except Exception:  # the caller's constructor or forward, whatever it raises: not rebuilt
        return False
    return len(want) == len(got) and all(_close(a.float(), b.float()) for a, b in zip(want, got))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return a.numel() == 0 or float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))


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
                 architecture: dict | None = None, sparse: bool = False) -> Path:
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
        sparse: store mostly-zero tensors in CSR form (irregular pruning; see ``save_checkpoint``).

    With ``dataset["input_size"]`` the file also holds the model's outputs on a seeded input of that size
    (:func:`autocompress.integrity.output_check`), which ``autocompress.load`` verifies after rebuilding it.

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
                           else describe_architecture(compact_model), sparse=sparse,
                           check=output_check(compact_model, dataset.get("input_size")))




__all__ = ["apply_architecture", "constructor_arguments", "describe_architecture", "from_sparse_state_dict",
           "save_compact", "to_sparse_state_dict"]
