"""Checkpoints: plain-data dicts written atomically and read back with ``torch.load(weights_only=True)``.

Format (docs/ARCHITECTURE.md, "Checkpoints")::

    {"format": "autocompress-checkpoint", "version": 1,
     "model": {"name": "resnet20", "kwargs": {"num_classes": 10, ...}},      # a registered model, or
              {"name": None, "class": "mypkg.nets:MyNet", "kwargs": {...}},  # the user's own class
     "dataset": {"name": "cifar10", "input_size": [3, 32, 32], "num_classes": 10, ...},
     "state_dict": {...}, "config": {...}, "metrics": {...},
     "architecture": None | {...},     # compact models: architecture.describe_architecture(...)
     "training_state": None | {...},   # optimizer / scheduler / epoch / RNG states, for --resume
     "check": None | {...}}            # outputs on a seeded input: integrity.output_check, verified on load

No code is pickled. A model is rebuilt from the registry (``create_model(name, **kwargs)``), or by
importing the recorded class (``"module:qualname"``, which must name an ``nn.Module`` subclass: importing
the user's own installed code is the only code a checkpoint makes autocompress run) and calling it with
the recorded keyword arguments (plain data; ``None`` when unknown), or it is the caller's own fresh
instance (``model=``). It is then reshaped by ``architecture.apply_architecture`` when it is a compact
model and filled with a strict ``load_state_dict``.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis import eager_module
from .architecture import apply_architecture
from .atomic import atomic_torch_save
from .errors import MissingArguments, MissingCode, ModelMismatch, UserError
from .integrity import check_finite, verify_archive, verify_outputs
from .models import create_model
from .sparse import from_sparse_state_dict, is_sparse, to_sparse_state_dict

FORMAT = "autocompress-checkpoint"
VERSION = 1
_REQUIRED = ("model", "dataset", "state_dict")


def class_path(cls: type) -> str:
    """The import path ``"module:qualname"`` of ``cls``, as checkpoints record it (e.g.
    ``"mypkg.nets:MyNet"``; a class defined inside a function has ``<locals>`` in it and is not importable)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _pass_instance(path: str) -> str:
    """The fix for a checkpoint whose model cannot be built from its class name ``path``: a fresh instance; for a
    container (``nn.Sequential``: its layers are its arguments, fresh user 82), the same code that built it."""
    name = path.rpartition(":")[2].rpartition(".")[2] or "MyNet"
    if path.startswith("torch.nn."):
        return (f"pass a fresh instance built as the compressed one was (the function that builds your {name}): "
                f"autocompress.load(path, model=build_my_model())")
    return f"pass a fresh instance of the model instead: autocompress.load(path, model={name}(...))"


def import_model_class(path: str) -> type[nn.Module]:
    """Import the ``nn.Module`` subclass named by ``path`` (``"package.module:Qualified.Name"``).

    Importing runs the module's top-level code: this is the user's own installed code (or code on
    ``sys.path``), and the only code a checkpoint can make autocompress run; nothing is unpickled and the
    named object must be an ``nn.Module`` subclass before anything calls it.

    Raises:
        UserError: a malformed path, a class defined inside a function or in another process's ``__main__``, a
            module that cannot be imported, a missing attribute, or an object that is not an ``nn.Module``
            subclass (the fix: make the class importable, or pass ``model=`` a fresh instance).
    """
    module_name, _, qualname = path.partition(":") if isinstance(path, str) else ("", "", "")
    if not module_name or not qualname:
        raise UserError(f"model class {path!r} is not an import path 'package.module:ClassName'",
                        _pass_instance(str(path)))
    if "<locals>" in qualname:
        raise UserError(f"model class {path} is defined inside a function and cannot be imported",
                        _pass_instance(path))
    try:
        found: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module means the same here
        raise MissingCode(f"cannot import module {module_name!r} of model class {path} ({type(exc).__name__}: "
                          f"{str(exc)[:160]})", "install the package that defines it or put it on PYTHONPATH",
                          module=module_name, instance=_pass_instance(path)) from exc
    for part in qualname.split("."):
        if not hasattr(found, part) and module_name == "__main__":
            raise UserError(f"model class {path} was defined in the script that saved the checkpoint (its __main__), "
                            "which no other process can import", _pass_instance(path) + ", in Python; or define "
                            "the class in a module of its own and save the model again")
        if not hasattr(found, part):
            raise UserError(f"module {module_name!r} has no {qualname!r} (model class {path})",
                            "install the version of the code the checkpoint was saved with; or "
                            + _pass_instance(path))
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise UserError(f"{path} is not an nn.Module subclass, refusing to build it", _pass_instance(path))
    return found


def _check_plain(value: Any, what: str) -> None:
    """UserError unless ``value`` is plain data (str / int / float / bool / None, lists, tuples, dicts with
    str keys), which ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UserError(f"{what} has a non-string key {key!r}", f"pass {what} as plain data")
            _check_plain(item, f"{what}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{what}[{index}]")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise UserError(f"{what} holds a {type(value).__name__}, which a checkpoint cannot store as plain data",
                        f"pass {what} as str / int / float / bool / None values, lists and dicts")


def _model_entry(name: str | None, class_name: str | None, kwargs: dict | None) -> dict:
    if (name is None) == (class_name is None):
        raise UserError("a checkpoint needs exactly one of model_name (a registered model) and model_class",
                        "pass model_name for a zoo model, or model_class 'package.module:Name' for your own")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise UserError(f"model_kwargs must be a dict, got {type(kwargs).__name__}", "pass a dict (or None)")
    _check_plain(kwargs, "model_kwargs")
    if class_name is None:
        return {"name": name, "kwargs": dict(kwargs or {})}
    return {"name": None, "class": class_name, "kwargs": None if kwargs is None else dict(kwargs)}


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, model_name: str | None = None,
                    model_kwargs: dict | None = None, model_class: str | None = None, dataset: dict, config: Any,
                    metrics: dict, architecture: dict | None = None, training_state: dict | None = None,
                    sparse: bool = False, check: dict | None = None) -> Path:
    """Write a checkpoint to ``path`` atomically (the old file stays intact until the new one is complete).

    Args:
        model: its ``state_dict`` is stored (tensors copied to CPU, each in its own storage: a view saves only
            its own elements).
        model_name, model_kwargs: ``create_model(model_name, **model_kwargs)`` rebuilds it; the kwargs
            include ``num_classes``.
        model_class: instead of ``model_name``, the import path ``"module:qualname"`` of the model's own
            class (:func:`class_path`); then ``model_kwargs`` are its constructor's keyword arguments, or
            None when unknown (loading then needs ``model=``).
        dataset: plain-data description, e.g. ``DataSplits.describe()`` (name, input_size, num_classes).
        config: training configuration, a dataclass or dict (stored as a dict).
        metrics: plain-data results (top-1 as a fraction in [0, 1], losses, timings).
        architecture: compact-model description from ``architecture.describe_architecture`` or None.
        training_state: optimizer / scheduler / epoch / RNG states for resuming, or None when finished.
        sparse: store tensors with at least half zeros in CSR form (:mod:`autocompress.sparse`), so an
            irregularly pruned model's file size follows its non-zero count; decoded by
            :func:`load_checkpoint`.
        check: :func:`autocompress.integrity.output_check` of the model, which loading verifies (None: none).

    Returns the path.

    Raises:
        UserError: both or neither of ``model_name`` / ``model_class``, or ``model_kwargs`` that are not
            plain data.
    """
    entry = _model_entry(model_name, model_class, model_kwargs)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    # cloned: a tensor that views a larger storage (a slice) would save all of it (a resumed run's file was larger)
    state_dict = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    if sparse:
        state_dict = to_sparse_state_dict(state_dict)
    return atomic_torch_save({
        "format": FORMAT, "version": VERSION, "model": entry,
        "dataset": dict(dataset), "state_dict": state_dict, "config": dict(config or {}),
        "metrics": dict(metrics or {}), "architecture": architecture, "training_state": training_state,
        "check": check,
    }, path)


def load_checkpoint(path: str | os.PathLike, *, trust: bool = False, map_location: Any = "cpu") -> dict:
    """Read and validate a checkpoint written by :func:`save_checkpoint`.

    Args:
        trust: load with ``weights_only=False`` (unpickles arbitrary objects; only for files you trust).
        map_location: passed to ``torch.load``.

    Raises:
        UserError: the file is missing, a folder, damaged (CRC mismatch, truncated), holds pickled objects
            (without ``trust``), is not an autocompress checkpoint, comes from a newer format version, or
            holds NaN / infinite weights.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist",
                        "check the path, or write one with `autocompress train --out PATH`")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file", "pass the .pt file, not a folder")
    verify_archive(path)  # torch.load does not check the CRCs: a flipped byte would load silently
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=not trust)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files; all mean the same
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            raise UserError(f"checkpoint {path} holds pickled Python objects ({unsafe.group(1)}), not plain data",
                            "if you trust its source, load it in Python with torch.load(path, weights_only=False) "
                            "and write the model with autocompress.checkpoint.save_checkpoint(path, model=..., "
                            "model_class='module:Class', ...) (a pickled autocompress checkpoint: "
                            "load_checkpoint(path, trust=True), then save_checkpoint)") from exc
        raise UserError(f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__})",
                        "re-create it (e.g. `autocompress train ... --resume` or train again)") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an autocompress checkpoint (no format={FORMAT!r} entry)",
                        "pass a file written by `autocompress train` or `autocompress compress`, or write your "
                        "own model's with autocompress.checkpoint.save_checkpoint(path, model=..., model_class="
                        "'module:Class')")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > VERSION:
        raise UserError(f"checkpoint {path} has format version {ckpt.get('version')!r}, this autocompress "
                        f"reads up to {VERSION}", "upgrade autocompress")
    missing = [key for key in _REQUIRED if not isinstance(ckpt.get(key), dict)]
    if missing or not isinstance(ckpt["model"].get("name") or ckpt["model"].get("class"), str):
        raise UserError(f"checkpoint {path} lacks {', '.join(missing) or 'model.name (or model.class)'}",
                        "re-create it with `autocompress train`")
    if is_sparse(ckpt.get("state_dict")):
        try:
            ckpt["state_dict"] = from_sparse_state_dict(ckpt["state_dict"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError):
            raise UserError(f"checkpoint {path} has a malformed sparse state_dict", "re-create it") from None
    if not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"checkpoint {path} holds no state_dict mapping", "re-create it with `autocompress train`")
    _check_fields(ckpt, path)
    check_finite(ckpt["state_dict"], f"checkpoint {path}")
    ckpt.setdefault("architecture", None)
    ckpt.setdefault("training_state", None)
    ckpt.setdefault("check", None)
    ckpt["model"].setdefault("kwargs", {})
    return ckpt


#: bounds of recorded numbers (a damaged or hostile file must not allocate terabytes or hang)
_MAX_CLASSES, _MAX_SIDE, _MAX_OPTION = 10 ** 6, 10 ** 5, 1 << 20


def _check_fields(ckpt: dict, path: Path) -> None:
    """UserError naming the first recorded field of the wrong type or an absurd size: ``model.kwargs`` (a
    mapping of plain values, numbers within bounds), ``dataset.input_size`` (1-4 positive sides),
    ``dataset.num_classes`` / ``val_size`` / ``seed`` (integers in range), ``architecture`` (a mapping)."""
    model, dataset = ckpt["model"], ckpt["dataset"]
    kwargs = model.get("kwargs", {})
    size = dataset.get("input_size")
    checks = [
        ("model.kwargs", kwargs is None and model.get("class") is not None or isinstance(kwargs, dict)
         and all(isinstance(k, str) for k in kwargs)
         and all(storable_option(v) for v in kwargs.values())),
        ("model.kwargs.num_classes", not isinstance(kwargs, dict) or "num_classes" not in kwargs
         or _int_in(kwargs["num_classes"], 1, _MAX_CLASSES)),
        ("dataset.input_size", size is None or isinstance(size, (list, tuple)) and 1 <= len(size) <= 4
         and all(_int_in(side, 1, _MAX_SIDE) for side in size)),
        ("dataset.num_classes", dataset.get("num_classes") is None or _int_in(dataset["num_classes"], 1, _MAX_CLASSES)),
        ("dataset.val_size", dataset.get("val_size") is None or _int_in(dataset["val_size"], 0, 10 ** 9)),
        ("dataset.seed", dataset.get("seed") is None or _int_in(dataset["seed"], 0, 2 ** 63 - 1)),
        ("dataset.name", dataset.get("name") is None or isinstance(dataset["name"], str)),
        ("architecture", ckpt.get("architecture") is None or isinstance(ckpt["architecture"], dict)),
        ("check", ckpt.get("check") is None or _check_entry(ckpt["check"])),
    ]
    for field, ok in checks:
        if not ok:
            raise UserError(f"checkpoint {path} has a malformed {field} entry",
                            "the file is damaged or was not written by autocompress; re-create it")


def _check_entry(check: Any) -> bool:
    """Whether ``check`` has the form :func:`autocompress.integrity.output_check` writes."""
    size, outputs = (check.get("input_size"), check.get("outputs")) if isinstance(check, dict) else (None, None)
    return isinstance(size, list) and 1 <= len(size) <= 4 and all(_int_in(side, 1, _MAX_SIDE) for side in size) \
        and isinstance(outputs, list) and len(outputs) <= 1000 and all(
            isinstance(out, dict) and isinstance(out.get("shape"), list) and len(out["shape"]) <= 8
            and all(_int_in(side, 0, 2 ** 40) for side in out["shape"])
            and isinstance(out.get("abs_sum"), (int, float)) and isinstance(out.get("head"), list)
            and len(out["head"]) <= 1000 and all(isinstance(v, (int, float)) for v in out["head"]) for out in outputs)


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def storable_option(value: Any) -> bool:
    """Whether ``value`` can be a recorded constructor argument (``model.kwargs``) that :func:`load_checkpoint`
    reads back: plain YAML-like data, numbers within 2**20, nested at most 3 deep."""
    return _plain_within(value, _MAX_OPTION)


def _plain_within(value: Any, bound: int, depth: int = 0) -> bool:
    """A plain YAML-like value (None, bool, str, number, list, dict), numbers within ``bound``, shallow."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, (int, float)):
        return abs(value) <= bound
    if isinstance(value, (list, tuple)) and depth < 3 and len(value) <= 1000:
        return all(_plain_within(v, bound, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 3 and len(value) <= 1000:
        return all(isinstance(k, str) and _plain_within(v, bound, depth + 1) for k, v in value.items())
    return False


def model_label(entry: dict) -> str:
    """How messages name the model of a checkpoint's ``model`` entry: the registered name or the class path."""
    return entry.get("name") or entry.get("class") or "?"


def _parameters(cls: type) -> str:
    """`` (its constructor takes width, blocks=2)``: the named parameters of ``cls.__init__`` (defaults as
    written), or "" when Python cannot read them."""
    import inspect

    try:
        found = [p for p in inspect.signature(cls).parameters.values()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return ""
    named = [p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in found]
    return f" (its constructor takes {', '.join(named)})" if named else ""


def build_model(entry: dict) -> nn.Module:
    """A fresh model from a checkpoint's ``model`` entry: the registry, or the recorded importable class (for a
    compact checkpoint: its base architecture, before compaction, with fresh weights)."""
    if entry.get("name") is not None:
        return create_model(entry["name"], **entry["kwargs"])
    cls = import_model_class(entry["class"])
    if entry["kwargs"] is None:
        raise MissingArguments(f"the checkpoint records model class {entry['class']} but not its constructor "
                               f"arguments{_parameters(cls)}", _pass_instance(entry["class"]))
    try:
        return cls(**entry["kwargs"])
    except (TypeError, ValueError) as exc:
        raise ModelMismatch(f"cannot build {entry['class']} with the arguments {entry['kwargs']} ({exc})",
                            _pass_instance(entry["class"])) from exc


def with_constructor_arguments(ckpt: dict, kwargs: Any) -> dict:
    """A copy of a loaded checkpoint whose model entry holds ``kwargs`` among the constructor arguments of its
    recorded class: for a checkpoint that records none, or to replace some of the recorded ones (a name in
    ``kwargs`` wins; :func:`model_from_checkpoint` then checks the rebuilt model's outputs against the
    checkpoint's output check where it has one).

    Raises:
        UserError: the checkpoint is of a zoo model (its options are recorded), or ``kwargs`` is not a dict of
            plain data.
    """
    entry = ckpt["model"]
    if entry.get("name") is not None:
        raise UserError(f"the checkpoint holds zoo model {entry['name']!r}, whose options it records",
                        "leave out the constructor arguments")
    if not isinstance(kwargs, dict):
        raise UserError(f"constructor arguments must be a dict of name -> value, got {type(kwargs).__name__}",
                        "pass a mapping such as {\"width\": 64}")
    _check_plain(kwargs, "the constructor arguments")
    return {**ckpt, "model": {**entry, "kwargs": {**(entry.get("kwargs") or {}), **kwargs}}}


def model_from_checkpoint(ckpt: dict, model: nn.Module | None = None, *, check: bool = True) -> nn.Module:
    """Rebuild the model of a loaded checkpoint: a fresh model (``create_model(name, **kwargs)``, or the
    recorded class imported and called with the recorded kwargs; see :func:`import_model_class`), or
    ``model`` when given, then ``architecture.apply_architecture`` when ``ckpt["architecture"]`` is set,
    then a strict ``load_state_dict``.

    Args:
        ckpt: from :func:`load_checkpoint`.
        model: a fresh instance of the model the checkpoint was saved from (e.g. a class that cannot be
            imported, or one whose constructor arguments were not recorded). It is changed in place: its
            modules are replaced as the saved architecture describes and its weights overwritten.
        check: verify the rebuilt model's outputs against the checkpoint's output check where it has one
            (:func:`autocompress.integrity.verify_outputs`; ``autocompress compress`` and ``save_compact`` store
            one): the same weights in a model built with other constructor arguments compute something else.

    Returns the model in train mode on the CPU (or where the tensors were mapped; a given ``model`` keeps
    its device).

    Raises:
        UserError: unknown model name / options, a recorded class that cannot be imported or built (the
            message says to pass ``model=``), ``model`` not an ``nn.Module``, or weights that do not match
            the model's shapes or names, or a rebuilt model whose outputs differ from the saved one's.
    """
    entry, model_given = ckpt["model"], model is not None
    if model is None:
        model = build_model(entry)
        label = f"{model_label(entry)} {entry['kwargs']}"
    elif not isinstance(model, nn.Module):
        raise UserError(f"model= must be an nn.Module instance, got {type(model).__name__}",
                        f"pass a fresh instance of {model_label(entry)}")
    else:
        label = f"{type(model).__name__} (the given instance; saved from {model_label(entry)})"
    given, model = model, _receiver(model, ckpt["state_dict"])
    if ckpt.get("architecture") is not None:
        model = apply_architecture(model, ckpt["architecture"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        error = ModelMismatch if model_given or entry.get("name") is None else UserError
        raise error(f"the checkpoint's weights do not match model {label} ({detail[:200]})",
                    "the checkpoint was written for another model or options; pass a matching checkpoint" + (
                        "" if model_given else " or the constructor arguments it was built with")) from exc
    if check and ckpt.get("check"):
        verify_outputs(model, ckpt["check"], f"model {label}")
    return given


def _receiver(model: nn.Module, state_dict: dict) -> nn.Module:
    """The module of a given ``model`` that receives a checkpoint: the eager module a ``torch.compile`` /
    ``DataParallel`` wrapper holds (compressed as such, :func:`autocompress.analysis.eager_module`), unless the
    file's weights carry more of the wrapper's names (saved from the wrapper itself, ``_orig_mod.*``)."""
    eager, wrapped = eager_module(model)
    if wrapped is None:
        return model
    names = set(state_dict)
    return model if len(names & set(model.state_dict())) > len(names & set(eager.state_dict())) else eager


def load_model(path: str | os.PathLike, map_location: Any = "cpu", model: nn.Module | None = None, *,
               check: bool = True) -> nn.Module:
    """Load a checkpoint file and rebuild its model in eval mode (used by ``autocompress.load``); with
    ``model``, that instance receives the saved architecture and weights; ``check``: verify its outputs (see
    :func:`model_from_checkpoint`).

    Raises:
        UserError: as :func:`load_checkpoint` and :func:`model_from_checkpoint`.
    """
    return model_from_checkpoint(load_checkpoint(path, map_location=map_location), model=model, check=check).eval()


__all__ = ["FORMAT", "VERSION", "build_model", "class_path", "import_model_class", "load_checkpoint", "load_model",
           "model_from_checkpoint", "model_label", "save_checkpoint", "storable_option", "with_constructor_arguments"]
