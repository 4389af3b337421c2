"""AutoCompress end to end: progressive rounds of search -> ADMM -> purification -> masked retraining
(of the filter-compacted model) -> compaction, in a resumable run folder.

Source: AutoCompress, Liu et al. AAAI 2020 (arXiv 1907.03141), "the generic flow" and the progressive
(multi-round) scheme; restated in the project brief §1. Each round raises the target (default doubling:
2x, 4x, 8x, ... then the final target) and starts from the previous round's compact model.

Run folder layout (every file written atomically)::

    RUN_DIR/config.yaml        the resolved configuration (a resumed run reads it back)
    RUN_DIR/state.json         which (round, phase) pairs are done
    RUN_DIR/metrics.jsonl      one JSON record per phase / round / final table (see report.py)
    RUN_DIR/round<k>/search.json, admm.pt, purify.pt, retrain.pt, model.pt (compact, autocompress.load-able)
    RUN_DIR/model.pt           the final compact model
    RUN_DIR/report.html        plots and the final table

A run killed at any point (Ctrl-C, kill -9) continues with ``resume=True`` from the last completed phase;
every phase draws its randomness from a generator seeded by ``(seed, round, phase)``, so a resumed run ends
with the same result as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import re
import time
import types
import typing
from collections import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from . import admm, metrics, report
from .annealing import AnnealingConfig, AnnealingResult, simulated_annealing
from .atomic import atomic_torch_save, atomic_write_text
from .checkpoint import load_checkpoint, load_model, model_from_checkpoint
from .compaction import compact, densify
from .data import get_dataset, recorded_data_dir
from .distillation import DistillationConfig, Distiller
from .errors import UserError
from .pruning import DIMS
from .purification import check_purification, purify
from .quick_eval import QuickEvaluator, check_batches
from .sampling import ActionSampler
from .serialization import save_compact
from .space import PruningSpace
from .training import TrainConfig, evaluate

log = logging.getLogger(__name__)

PHASES = ("search", "admm", "purify", "retrain", "compact")


@dataclass(frozen=True)
class Target:
    """A compression target: ``objective`` ``"params"`` (compression rate = original parameters /
    remaining parameters) or ``"flops"`` (original MACs / remaining MACs), and the factor (x, > 1)."""

    objective: str
    factor: float

    @classmethod
    def parse(cls, text: str) -> "Target":
        """``"params=20x"`` / ``"flops=8x"`` (the ``x`` is optional). Raises UserError otherwise."""
        match = re.fullmatch(r"\s*(params|flops)\s*=\s*([0-9]*\.?[0-9]+)\s*x?\s*", str(text))
        if not match or float(match.group(2)) <= 1.0:
            raise UserError(f"cannot read target {text!r}",
                            "write OBJECTIVE=FACTORx with OBJECTIVE params or flops and FACTOR > 1, "
                            "e.g. --target params=20x")
        return cls(match.group(1), float(match.group(2)))

    def __str__(self) -> str:
        return f"{self.objective}={self.factor:g}x"


def round_targets(final: float, rounds: str | list[float]) -> list[float]:
    """Per-round targets. ``"doubling"``: 2, 4, 8, ... below ``final``, then ``final``; an int-like string
    ``"N"``: N geometrically spaced targets ending at ``final``; a list: used as given (must increase and
    end at ``final``). Raises UserError on a malformed schedule."""
    if isinstance(rounds, str) and rounds == "doubling":
        targets = [2.0 ** k for k in range(1, 64) if 2.0 ** k < final * (1 - 1e-9)]
        return targets + [float(final)]
    if isinstance(rounds, (str, int)) and str(rounds).isdigit() and int(rounds) >= 1:
        n = int(rounds)
        return [float(final ** ((k + 1) / n)) for k in range(n)]
    try:
        targets = [float(t) for t in rounds]
    except (TypeError, ValueError):
        targets = []
    if not targets or any(b <= a for a, b in zip(targets, targets[1:])) or abs(targets[-1] - final) > 1e-6 \
            or targets[0] <= 1:
        raise UserError(f"invalid round schedule {rounds!r}",
                        f"use 'doubling', a number of rounds, or increasing targets > 1 ending at {final:g}")
    return targets


@dataclass(frozen=True)
class Section:
    """What one config section configures.

    Attributes:
        target: the dataclass or function whose fields / keyword arguments the section's keys are.
        skip: its parameters the run supplies itself (not settable in the section).
        extra: further keys of the section and their types (not parameters of ``target``).
        defaults: compress's own defaults, over ``target``'s.
    """

    target: Any
    skip: frozenset = frozenset()
    extra: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)

    def keys(self) -> set[str]:
        """The keys the section accepts."""
        return (set(inspect.signature(self.target).parameters) - self.skip) | set(self.extra)

    def resolved(self, given: dict) -> dict:
        """Every key of the section: ``given`` over compress's defaults over ``target``'s own (tuples as
        lists, as YAML reads them back)."""
        own = {name: list(p.default) if isinstance(p.default, tuple) else p.default
               for name, p in inspect.signature(self.target).parameters.items()
               if name not in self.skip and p.default is not inspect.Parameter.empty}
        return {**own, **self.defaults, **given}


#: the config sections. Compress's own defaults: ADMM raises rho from 0.02 by 1.6x every 100 steps (see
#: CompressConfig.admm), retraining runs 3 epochs at lr 0.01, purification is on. Seeds come from the run's
#: ``seed`` (per phase, :func:`phase_seed`) and batch sizes from ``batch_size``, so no section sets them.
SECTIONS = {
    "search": Section(AnnealingConfig, skip=frozenset({"seed"})),
    "quick_eval": Section(QuickEvaluator, skip=frozenset({"model", "space", "splits", "seed"})),
    "admm": Section(admm.ADMMConfig, defaults={"epochs": 2, "rho_init": 0.02, "rho_growth": 1.6,
                                               "update_interval": 100}),
    "purification": Section(purify, skip=frozenset({"model", "space", "masks", "example_inputs", "val_loader",
                                                    "log"}), extra={"enabled": bool}, defaults={"enabled": True}),
    "retrain": Section(TrainConfig, skip=frozenset({"batch_size", "seed", "device"}),
                       defaults={"epochs": 3, "lr": 0.01}),
    "distillation": Section(DistillationConfig),
}
#: every section's settings when the config gives none
SECTION_DEFAULTS = {name: section.resolved({}) for name, section in SECTIONS.items()}


@dataclass
class CompressConfig:
    """Everything a compress run depends on; written, every setting resolved, to ``config.yaml``. A section
    (``admm``, ``retrain``, ``purification``, ...) given in part keeps the defaults of the keys it does not
    name (:data:`SECTIONS`), so ``admm: {epochs: 3}`` keeps the default rho schedule.

    Attributes:
        target: e.g. ``"params=20x"`` (see :class:`Target`); required (no default: :meth:`validate` refuses
            a config without one).
        dims: ``"filter,column"`` (hybrid, default), ``"filter"``, ``"column"`` or ``"irregular"``.
        rounds: ``"doubling"``, a number of rounds, or a list of increasing targets.
        seed: seed of every generator the run owns.
        data_dir: dataset folder (``None``: the dataset's default lookup).
        val_size: images carved from the training split for validation (search, purification).
        max_train: use a seeded subset of at most this many training images (None: all).
        max_test: evaluate the final table on a seeded subset of the test split (None: all).
        batch_size: training batch size of ADMM and retraining.
        max_r: largest pruning rate of any unit (the sampler's r_max), in [0, 1).
        search_mode: ``"annealing"`` (the guided simulated-annealing search, default) or ``"uniform"``
            (one rate for every unit, meeting the target: an ablation without search).
        search: :class:`autocompress.annealing.AnnealingConfig` fields.
        quick_eval: :class:`autocompress.quick_eval.QuickEvaluator` keyword arguments.
        admm: :class:`autocompress.admm.ADMMConfig` fields. The default raises rho from 0.02 by 1.6x every
            100 optimiser steps: with the few ADMM epochs a CPU budget allows, ADMMConfig's own once-per-epoch
            schedule leaves rho near 1e-3 and the primal residual large (measured, BENCHMARKS.md). On a
            short ADMM phase (a few hundred steps) rho then stays low, which measured better than
            ``update_interval: auto`` (rho at its cap halfway through) on CIFAR-10 subsets; ``auto`` is for
            long phases, where 100 steps would reach the cap almost at once.
        purification: ``enabled`` plus :func:`autocompress.purification.purify` keyword arguments.
        retrain: :class:`autocompress.training.TrainConfig` fields of masked retraining.
        distillation: :class:`autocompress.distillation.DistillationConfig` fields: knowledge distillation
            from the base model in the ADMM W-steps and masked retraining (beyond the paper).
        final_retrain_epochs: retraining epochs of the last round (``None``: as the other rounds).
        latency_runs: timed runs per latency measurement in the final table.
    """

    target: str | None = None
    dims: str = "filter,column"
    rounds: Any = "doubling"
    seed: int = 0
    data_dir: str | None = None
    val_size: int = 5000
    max_train: int | None = None
    max_test: int | None = None
    batch_size: int = 128
    max_r: float = 0.95
    search_mode: str = "annealing"
    search: dict = field(default_factory=dict)
    quick_eval: dict = field(default_factory=dict)
    admm: dict = field(default_factory=dict)
    purification: dict = field(default_factory=dict)
    retrain: dict = field(default_factory=dict)
    distillation: dict = field(default_factory=dict)
    final_retrain_epochs: int | None = None
    latency_runs: int = 20

    def __post_init__(self):
        # a section given in part keeps the defaults of the keys it does not name
        for name, section in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, section.resolved(value))

    @classmethod
    def from_dict(cls, data: dict, *, validate: bool = True) -> "CompressConfig":
        """Build from a plain dict (e.g. parsed YAML); unknown keys raise UserError naming them. With
        ``validate=False`` the values are checked later (:meth:`validate`), e.g. after command-line flags
        have overridden them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown compress setting(s) {', '.join(unknown)}",
                            f"valid settings: {', '.join(sorted(known))}")
        config = cls(**data)
        if validate:
            config.validate()
        return config

    @staticmethod
    def read_yaml(path: str | Path) -> dict:
        """The settings of a run.yaml, for :meth:`from_dict`; a missing or malformed file raises UserError."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (FileNotFoundError, IsADirectoryError):
            raise UserError(f"config file {path} does not exist or is a folder",
                            "pass an existing --config YAML file") from None
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML ({exc.__class__.__name__})",
                            "fix the YAML syntax") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping of settings", "see README's example")
        return data

    def validate(self) -> None:
        """Check every setting and sub-config now, before any work (raises UserError): the type of every
        setting and of every key of a section (from the annotations of the dataclass or function the section
        configures, :func:`_check_section`), then the values. Retraining epochs (``retrain.epochs``,
        ``final_retrain_epochs``) may be 0 (no retraining), never negative."""
        _check_types(dataclasses.asdict(self), typing.get_type_hints(CompressConfig))
        if self.target is None:
            raise UserError("no target given", "pass e.g. --target params=10x, or target: params=10x in the config")
        Target.parse(self.target)
        for name, section in SECTIONS.items():
            _check_section(name, getattr(self, name), section)
        if self.dims not in DIMS:
            raise UserError(f"unknown --dims {self.dims!r}", f"use one of {', '.join(DIMS)}")
        round_targets(Target.parse(self.target).factor, self.rounds)
        if self.dims == "irregular" and Target.parse(self.target).objective == "flops":
            raise UserError("irregular sparsity does not reduce the MACs of the dense layers it leaves",
                            "use a params target with --dims irregular, or --dims filter,column for flops")
        if self.search_mode not in ("annealing", "uniform"):
            raise UserError(f"unknown search_mode {self.search_mode!r}", "use annealing or uniform")
        if not 0 < self.max_r < 1:
            raise UserError(f"max_r={self.max_r} must be in (0, 1)", "use e.g. 0.95")
        self._check_counts()
        try:
            self.annealing_config(0)
        except UserError as exc:  # its messages name the field, not the section
            raise UserError(f"search section: {exc}") from None
        admm.ADMMConfig(**self.admm).train_config(lambda field: f"admm.{field}")
        DistillationConfig(**self.distillation)
        self.retrain_config(last=False).validate(epochs_flag="--retrain-epochs", retraining=True)
        if self.final_retrain_epochs is not None:
            self.retrain_config(last=True).validate(epochs_flag="final_retrain_epochs", retraining=True)

    def _check_counts(self) -> None:
        """UserError for a count, size or tolerance that would only fail once the run has started."""
        checks = [
            (self.batch_size >= 1, f"--batch-size {self.batch_size} is not positive", "pass --batch-size >= 1"),
            (self.latency_runs >= 1, f"latency_runs={self.latency_runs} is not positive", "use e.g. 20"),
            (self.val_size >= 1, f"val_size={self.val_size} leaves no validation split (the search and "
             "purification score on it)", "use e.g. 5000"),
        ]
        for ok, problem, fix in checks:
            if not ok:
                raise UserError(problem, fix)
        check_batches(self.quick_eval["bn_batches"], self.quick_eval["val_batches"], self.quick_eval["batch_size"])
        check_purification(self.purification["tolerance"], self.purification["thresholds"])

    def with_absolute_paths(self) -> "CompressConfig":
        """This config with ``data_dir`` made absolute (against the present working directory), as a run
        stores it: a resumed run may start from another working directory."""
        if not isinstance(self.data_dir, str):  # None (or a wrong type, for validate() to refuse)
            return self
        return dataclasses.replace(self, data_dir=os.path.abspath(self.data_dir))

    def retrain_config(self, *, last: bool) -> TrainConfig:
        """Masked retraining settings (:class:`autocompress.training.TrainConfig`); ``last``: final round.
        The section's keys are checked by :meth:`validate`."""
        settings = {**self.retrain, "batch_size": self.batch_size}
        if last and self.final_retrain_epochs is not None:
            settings["epochs"] = self.final_retrain_epochs
        return TrainConfig(**settings)

    def annealing_config(self, round_index: int) -> AnnealingConfig:
        """The round's :class:`AnnealingConfig` (seeded per round); the section's keys are checked by
        :meth:`validate`."""
        return AnnealingConfig(**{**self.search, "seed": phase_seed(self.seed, round_index, "search")})


def _check_section(name: str, settings: dict, section: Section) -> None:
    """UserError naming a key of config section ``name`` that ``section`` does not accept, or a value whose
    type does not fit the annotation of that field / parameter (:func:`_check_types`)."""
    valid = section.keys()
    unknown = sorted(set(settings) - valid)
    if unknown:
        top_level = [key for key in unknown if key in ("batch_size", "seed")]
        hint = f"set {' and '.join(top_level)} at the top level of the config (it serves every phase); " \
            if top_level else ""
        raise UserError(f"unknown {name} setting(s) {', '.join(unknown)}",
                        f"{hint}valid {name} settings: {', '.join(sorted(valid))}")
    target = section.target
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    _check_types(settings, {**hints, **section.extra}, prefix=f"{name}.")


#: how a message asks for a value of each type (YAML spelling)
_TYPE_WORDS = {bool: "true or false", int: "an int", float: "a number", str: "text", dict: "a mapping",
               type(None): "null"}


def _check_types(values: dict, hints: dict, *, prefix: str = "") -> None:
    """UserError ``"admm.epochs='two' has the wrong type; give an int"`` for the first value of ``values``
    that does not fit its annotation in ``hints`` (:func:`_fits`); names without an annotation pass."""
    for name, value in values.items():
        if name in hints and not _fits(value, hints[name]):
            raise UserError(f"{prefix}{name}={value!r} has the wrong type", f"give {_type_words(hints[name])}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value read from YAML fits an annotation: an int is a float too, a bool is never a number,
    a list is a ``Sequence[...]`` of fitting items; annotations this cannot read (Any, Callable) accept all."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    if origin is not None and isinstance(origin, type) and issubclass(origin, abc.Sequence):
        return isinstance(value, (list, tuple)) and all(_fits(item, args[0]) for item in value if args)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_words(hint: Any) -> str:
    """``int | None`` -> ``"an int or null"``; ``list[float]`` -> ``"a list of items each a number"``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        words = [_type_words(arg) for arg in typing.get_args(hint)]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if typing.get_origin(hint) is not None:
        items = typing.get_args(hint)
        return f"a list of items each {_type_words(items[0])}" if items else "a list"
    return _TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def phase_seed(seed: int, round_index: int, phase: str) -> int:
    """Deterministic seed of one phase of one round (independent of what ran before it)."""
    return (int(seed) * 1_000_003 + round_index * 101 + PHASES.index(phase) * 7919) % (2 ** 31)


class RunFolder:
    """The files of one compress run (see the module docstring). All writes are atomic."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        """Path of ``name`` inside the run folder."""
        return self.path / name

    def phase_file(self, round_index: int, phase: str) -> Path:
        """Artifact of one phase: ``round<k>/search.json`` or ``round<k>/<phase>.pt``."""
        suffix = "json" if phase == "search" else "pt"
        name = "model" if phase == "compact" else phase
        return self.path / f"round{round_index}" / f"{name}.{suffix}"

    def done(self) -> list[list]:
        """The completed ``[round, phase]`` pairs, in order."""
        state = self.file("state.json")
        return json.loads(state.read_text())["done"] if state.exists() else []

    def mark_done(self, round_index: int, phase: str) -> None:
        """Record that a phase finished (after its artifact was written)."""
        done = self.done() + [[round_index, phase]]
        atomic_write_text(self.file("state.json"), json.dumps({"done": done}))

    def append_metrics(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (rewritten atomically, so a kill never tears it)."""
        path = self.file("metrics.jsonl")
        old = path.read_text() if path.exists() else ""
        atomic_write_text(path, old + json.dumps(record, default=_plain) + "\n")


def _percent(fraction: float | None) -> float | None:
    """Top-1 as a percentage (every top-1 in metrics.jsonl is in %)."""
    return None if fraction is None else 100.0 * fraction


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class RoundContext:
    """What every phase of one round shares."""

    index: int
    target: float
    model: nn.Module
    space: PruningSpace
    rates: dict | None = None
    param_masks: dict | None = None


class Compressor:
    """One compress run. Build with :meth:`start` (new run) or :meth:`resume` (existing run folder), then
    call :meth:`run`.

    Raises:
        UserError: unreadable checkpoint or data, an invalid config, an existing run folder without
            ``resume``, or a target the model cannot reach without pruning a layer away (checked before
            any training).
    """

    def __init__(self, run: RunFolder, checkpoint_path: Path, config: CompressConfig, *, progress: bool = True):
        self.run_folder = run
        self.checkpoint_path = Path(checkpoint_path)
        self.config = config
        self.progress = progress
        self.target = Target.parse(config.target)
        self.targets = round_targets(self.target.factor, config.rounds)
        self.base_ckpt = load_checkpoint(self.checkpoint_path)
        dataset = self.base_ckpt.get("dataset") or {}
        if not dataset.get("name"):
            raise UserError(f"checkpoint {checkpoint_path} names no dataset",
                            "re-train it with `autocompress train`, which records the dataset")
        data_dir = recorded_data_dir(config.data_dir, dataset, dataset["name"])
        self.splits = get_dataset(dataset["name"], data_dir, val_size=config.val_size, seed=config.seed,
                                  max_train=config.max_train, max_test=config.max_test)
        self.example = torch.zeros(1, *self.splits.input_size)
        self.base_model = model_from_checkpoint(self.base_ckpt)
        self.base_params = self._params(self.base_model)
        self.base_macs = metrics.count_macs(self.base_model, self.example)
        distillation = DistillationConfig(**config.distillation)
        self.distiller = Distiller(self.base_model, distillation) if distillation.enabled else None

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def start(cls, checkpoint_path: str | Path, config: CompressConfig, out_dir: str | Path, *,
              progress: bool = True) -> "Compressor":
        """A new run in ``out_dir`` (refused when it already holds a run: resume it or pick another); a
        relative ``config.data_dir`` is stored absolute, so the run resumes from any working directory."""
        config.validate()
        config = config.with_absolute_paths()
        run = RunFolder(out_dir)
        if run.file("state.json").exists() or run.file("config.yaml").exists():
            raise UserError(f"run folder {out_dir} already holds a run",
                            f"continue it with --resume {out_dir} or choose another --out")
        if run.path.exists() and (not run.path.is_dir() or any(run.path.iterdir())):
            raise UserError(f"--out {out_dir} exists and is not an empty folder",
                            "choose a new or empty run folder; nothing there is overwritten")
        compressor = cls(run, Path(checkpoint_path), config, progress=progress)
        compressor.check_reachable()
        plain = dataclasses.asdict(config)
        plain["checkpoint"] = str(Path(checkpoint_path).resolve())
        plain["checkpoint_sha256"] = _sha256(Path(checkpoint_path))
        atomic_write_text(run.file("config.yaml"), yaml.safe_dump(plain, sort_keys=False))
        return compressor

    @classmethod
    def resume(cls, out_dir: str | Path, *, progress: bool = True, data_dir: str | None = None) -> "Compressor":
        """Continue the run in ``out_dir`` with its own config.yaml; ``data_dir``: read the dataset from there
        instead (it moved), the run's settings unchanged."""
        run = RunFolder(out_dir)
        if not run.file("config.yaml").exists():
            raise UserError(f"{out_dir} holds no compress run (no config.yaml)",
                            "start one with `autocompress compress CHECKPOINT --target ... --out DIR`")
        data = yaml.safe_load(run.file("config.yaml").read_text())
        checkpoint, digest = Path(data.pop("checkpoint")), data.pop("checkpoint_sha256", None)
        if not checkpoint.is_file() or (digest is not None and _sha256(checkpoint) != digest):
            raise UserError(f"the base checkpoint {checkpoint} of run {out_dir} is missing or has changed "
                            "since the run started", "restore that file, or start a new run with --out")
        if data_dir is not None:
            data["data_dir"] = str(data_dir)
        return cls(run, checkpoint, CompressConfig.from_dict(data), progress=progress)

    # --- checks ---------------------------------------------------------------------------------------
    def _space(self, model: nn.Module) -> PruningSpace:
        """The round's pruning space; purification needs the filter groups even when only columns (or
        single weights) are searched, at rate 0."""
        dims = DIMS[self.config.dims]
        if self.config.purification.get("enabled", True):
            dims = tuple(dict.fromkeys(("filter",) + dims))
        return PruningSpace.build(model, self.example, dims=dims)

    def _sampler(self, space: PruningSpace, target: float, base_ratio: float) -> ActionSampler:
        """Sampler for a round's ``target`` (relative to the *base* model) on a model that is already
        ``base_ratio`` times smaller than the base (see :meth:`_base_ratio`)."""
        return ActionSampler.from_space(space, self.target.objective, max(1.0, target / base_ratio),
                                        kinds=DIMS[self.config.dims], r_max=self.config.max_r)

    def _params(self, model: nn.Module) -> int:
        """Parameters of a compact model; in irregular mode the non-zero ones (stored sparsely)."""
        if self.config.dims == "irregular":
            return metrics.count_nonzero_params(model)
        return metrics.count_params(model)

    def _count(self, model: nn.Module) -> int:
        if self.target.objective == "params":
            return self._params(model)
        return metrics.count_macs(model, self.example)

    @functools.cached_property
    def _first_round(self) -> tuple[nn.Module, PruningSpace]:
        """Round 1's starting model (a dense copy of the base) and its space, built once per run."""
        model = densify(self.base_model)
        return model, self._space(model)

    def check_reachable(self) -> None:
        """Refuse, before any training, a final target that needs a layer pruned away (UserError)."""
        self._sampler(self._first_round[1], self.target.factor, base_ratio=1.0)

    # --- the run ------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run (or finish) every round, then the final evaluation and report. Returns the final record."""
        done = {tuple(pair) for pair in self.run_folder.done()}
        if ("final", "final") in done:
            return self._final_record()
        if not any(r.get("event") == "base" for r in self._records()):
            self._record_base()
        for index, target in enumerate(self.targets, start=1):
            if (index, "compact") in done:
                continue
            if index == 1:
                model, space = self._first_round
            else:
                model = densify(load_model(self.run_folder.phase_file(index - 1, "compact")))
                space = self._space(model)
            self._run_round(RoundContext(index, target, model, space), done)
        return self._finish()

    def _record_base(self) -> None:
        top1 = evaluate(self.base_model, self.splits.loader("val", 256, shuffle=False, augment=False))["top1"]
        self.run_folder.append_metrics({"event": "base", "params": self.base_params, "macs": self.base_macs,
                                        "val_top1": 100.0 * top1})

    def _run_round(self, ctx: RoundContext, done: set) -> None:
        for phase in PHASES:
            artifact = self.run_folder.phase_file(ctx.index, phase)
            if (ctx.index, phase) in done:
                self._restore(ctx, phase, artifact)
                continue
            started = time.perf_counter()
            with torch.random.fork_rng():  # e.g. dropout draws from the global generator: seed it per phase
                torch.manual_seed(phase_seed(self.config.seed, ctx.index, phase))
                getattr(self, f"_phase_{phase}")(ctx, artifact)
            self.run_folder.append_metrics({"event": "phase", "round": ctx.index, "phase": phase,
                                            "seconds": time.perf_counter() - started})
            self.run_folder.mark_done(ctx.index, phase)

    def _restore(self, ctx: RoundContext, phase: str, artifact: Path) -> None:
        if phase == "search":
            ctx.rates = json.loads(artifact.read_text())["rates"]
        else:
            if phase == "retrain":  # its state belongs to the shrunk model
                self._shrink(ctx)
            saved = torch.load(artifact, map_location="cpu", weights_only=True)
            ctx.model.load_state_dict(saved["state_dict"])
            ctx.param_masks = saved.get("param_masks")

    def _train_loader(self, ctx: RoundContext, phase: str):
        generator = torch.Generator().manual_seed(phase_seed(self.config.seed, ctx.index, phase))
        return self.splits.loader("train", self.config.batch_size, shuffle=True, augment=True,
                                  generator=generator)

    def _val_top1(self, model: nn.Module) -> float:
        return _percent(evaluate(model, self.splits.loader("val", 256, shuffle=False, augment=False))["top1"])

    def _save_state(self, ctx: RoundContext, artifact: Path) -> None:
        atomic_torch_save({"state_dict": ctx.model.state_dict(),
                           "param_masks": ctx.param_masks},
                          artifact)

    # --- phases -------------------------------------------------------------------------------------
    def _phase_search(self, ctx: RoundContext, artifact: Path) -> None:
        base_ratio = self._base_ratio(ctx.model)
        sampler = self._sampler(ctx.space, ctx.target, base_ratio)
        if self.config.search_mode == "uniform":  # ablation: one rate for every unit, no search
            result = AnnealingResult(best_action=sampler.meet(np.ones(len(sampler.units))),
                                     best_score=float("nan"), trajectory=[])
        else:
            evaluator = QuickEvaluator(ctx.model, ctx.space, self.splits,
                                       seed=phase_seed(self.config.seed, ctx.index, "search"),
                                       **self.config.quick_eval)
            config = self.config.annealing_config(ctx.index)
            with tqdm(total=config.max_evaluations, desc=f"round {ctx.index} search", disable=not self.progress,
                      leave=False) as bar:
                def on_step(state) -> None:
                    bar.update(1)
                    bar.set_postfix(best=f"{state.best_score:.2f}%", T=f"{state.temperature:.4f}")

                result = simulated_annealing(
                    sampler.initial_action(),
                    lambda action: 100.0 * evaluator.score(sampler.to_rates(action)).top1,
                    sampler.perturb, config, on_step=on_step)
        ctx.rates = sampler.to_rates(result.best_action)
        trajectory = [{k: v for k, v in step.items() if k != "action"} for step in result.trajectory]
        record = {"round": ctx.index, "target": ctx.target, "rates": ctx.rates, "best_score": result.best_score,
                  "compression": sampler.compression(result.best_action) * base_ratio}
        atomic_write_text(artifact, json.dumps({**record, "trajectory": result.trajectory}, default=_plain))
        self.run_folder.append_metrics({"event": "search", **record, "trajectory": trajectory})

    def _base_ratio(self, model: nn.Module) -> float:
        base = self.base_params if self.target.objective == "params" else self.base_macs
        return base / self._count(model)

    def _phase_admm(self, ctx: RoundContext, artifact: Path) -> None:
        result = admm.admm_prune(ctx.model, ctx.space, ctx.rates, self._train_loader(ctx, "admm"),
                                 admm.ADMMConfig(**self.config.admm), distiller=self.distiller,
                                 progress=self.progress, log=log.info)
        self.run_folder.append_metrics({"event": "admm", "round": ctx.index,
                                        "history": [{k: v for k, v in h.items() if k != "residuals"}
                                                    for h in result.history]})
        self._save_state(ctx, artifact)

    def _phase_purify(self, ctx: RoundContext, artifact: Path) -> None:
        masks, ctx.param_masks = admm.hard_prune(ctx.model, ctx.space, ctx.rates)
        settings = dict(self.config.purification)
        if settings.pop("enabled", True):
            val_loader = self.splits.loader("val", 256, shuffle=False, augment=False)
            result = purify(ctx.model, ctx.space, masks, example_inputs=self.example, val_loader=val_loader,
                            log=log.info, **settings)
            ctx.param_masks = result.param_masks
            self.run_folder.append_metrics({
                "event": "purification", "round": ctx.index, "threshold": result.threshold,
                "removed_filters": sum(result.removed_filters.values()),
                "removed_columns": sum(result.removed_columns.values()), "folded": len(result.folded),
                "val_top1_before": _percent(result.top1_before), "val_top1_after": _percent(result.top1_after)})
        self._save_state(ctx, artifact)

    def _shrink(self, ctx: RoundContext) -> None:
        """Make masked retraining cheaper: replace ``ctx.model`` by its compacted, densified equivalent
        (pruned filters / channels physically gone, pruned columns and weights still present as zeros) and
        ``ctx.param_masks`` by the masks of those zeros (conv / linear weights). Same function, fewer
        MACs per training step; deterministic, so a resumed run rebuilds the same architecture."""
        small = densify(compact(ctx.model, ctx.param_masks, self.example).model)
        ctx.model = small
        ctx.param_masks = {name: p.detach() != 0 for name, p in small.named_parameters() if p.dim() >= 2}

    def _phase_retrain(self, ctx: RoundContext, artifact: Path) -> None:
        self._shrink(ctx)
        config = self.config.retrain_config(last=ctx.index == len(self.targets))
        history = admm.masked_retrain(ctx.model, ctx.param_masks, self._train_loader(ctx, "retrain"), config,
                                      distiller=self.distiller, progress=self.progress, log=log.info)
        self.run_folder.append_metrics({"event": "retrain", "round": ctx.index, "history": history})
        self._save_state(ctx, artifact)

    def _phase_compact(self, ctx: RoundContext, artifact: Path) -> None:
        result = compact(ctx.model, ctx.param_masks, self.example)
        save_compact(artifact, result.model, base_checkpoint=self.base_ckpt,
                     metrics={"round": ctx.index, "target": ctx.target}, config=dataclasses.asdict(self.config))
        compact_model = load_model(artifact)
        self.run_folder.append_metrics({
            "event": "round", "round": ctx.index, "target": ctx.target,
            "params": self._params(compact_model), "macs": metrics.count_macs(compact_model, self.example),
            "val_top1": self._val_top1(compact_model), "layers": layer_widths(self.base_model, compact_model)})
        ctx.model = densify(compact_model)

    # --- the end ------------------------------------------------------------------------------------
    def _finish(self) -> dict:
        last = self.run_folder.phase_file(len(self.targets), "compact")
        final_path = self.run_folder.file("model.pt")
        final_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(torch.load(last, map_location="cpu", weights_only=True), final_path)
        compact_model = load_model(final_path)
        test_loader = self.splits.loader("test", 256, shuffle=False, augment=False)
        rows = []
        for name, net, path in (("base", self.base_model, self.checkpoint_path),
                                ("compressed", compact_model, final_path)):
            latency = {b: metrics.measure_latency(net, torch.zeros(b, *self.splits.input_size),
                                                  runs=self.config.latency_runs) for b in (1, 64)}
            rows.append({"model": name, "test_top1": 100.0 * evaluate(net, test_loader)["top1"],
                         "params": self._params(net), "macs": metrics.count_macs(net, self.example),
                         "file_bytes": metrics.file_size(path),
                         "latency_b1_ms": latency[1].median_ms, "latency_b64_ms": latency[64].median_ms})
        record = {"event": "final", "target": str(self.target), "rows": rows,
                  "threads": torch.get_num_threads(), "latency_runs": self.config.latency_runs}
        self.run_folder.append_metrics(record)
        report.write_report(self.run_folder.path, title=f"autocompress {self.target}")
        self.run_folder.mark_done("final", "final")
        return record

    def _records(self) -> list[dict]:
        path = self.run_folder.file("metrics.jsonl")
        return report.read_metrics(path) if path.exists() else []

    def _final_record(self) -> dict:
        return [r for r in self._records() if r.get("event") == "final"][-1]


def layer_widths(base: nn.Module, compact_model: nn.Module) -> list[dict]:
    """Per conv / linear layer of ``base``: kept filters (output channels) and kept columns (GEMM inner
    dimension, ``C_in/groups*kh*kw``; Linear: input features) in ``compact_model``, with the totals."""
    compact_modules = dict(compact_model.named_modules())
    rows = []
    for name, module in base.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        now = compact_modules.get(name)
        rows.append({"name": name, "filters_total": _rows(module), "columns_total": _columns(module),
                     "filters": _rows(now) if now is not None else 0,
                     "columns": _columns(now) if now is not None else 0})
    return rows


def _rows(module: nn.Module) -> int:
    return int(module.weight.shape[0])


def _columns(module: nn.Module) -> int:
    weight = module.weight
    return int(weight.shape[1] if weight.dim() == 2 else math.prod(weight.shape[1:]))
