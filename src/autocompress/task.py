"""The caller's world, as the pipeline sees it: data loaders, how to run a batch, the loss, the score, the
device.

A :class:`Task` is built once by :func:`autocompress.compress` / :func:`autocompress.prune` from the
caller's arguments and used by every phase that needs data (quick evaluation and its BatchNorm
re-estimation, ADMM W-steps, purification's accuracy check, masked retraining, distillation). Nothing
here knows about datasets, files or the CLI.

Batches are ``(inputs, targets)`` pairs by default: ``forward`` runs ``model(inputs)``, the loss is the
cross-entropy of the output against ``targets`` and the score is validation top-1 (a fraction). A model of N
inputs (``example_inputs`` a tuple of N tensors, e.g. token ids and a padding mask) takes batches
``(input_1, ..., input_N, targets)`` and runs ``model(input_1, ..., input_N)``. Any other batch
(a dict, a tuple of several tensors, ...) works when the caller says how to run it (``forward_fn``) and how
to compute its loss (``loss_fn``); ``score_fn`` replaces top-1 (a fraction) (e.g. mean IoU of a segmentation net).
Tensors inside a batch (also nested in tuples, lists and dicts) are moved to the task's device.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .analysis import BATCH_FIRST, analysis_mode, at_batch, example_tuple, output_tensors, train_mode, \
    trained_norms
from .distributed import length
from .errors import SettingError, UserError, first_line
from .integrity import check_finite
from .text import kind_of

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
ScoreFn = Callable[[nn.Module], float]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> a usable
    :class:`torch.device`.

    Raises:
        UserError: a malformed name, another device type, or CUDA asked for where it is not available.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingError("device", f"unknown device {str(device)!r}", "use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError("device", f"device {str(device)!r} asked for, but CUDA is not available here",
                               "use device cpu (or auto)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise SettingError("device", f"device {str(device)!r} does not exist here "
                               f"({torch.cuda.device_count()} CUDA devices)", "use device cuda or cpu")
    elif resolved.type != "cpu":
        raise SettingError("device", f"device {str(device)!r} is not available here", "use auto, cpu, cuda or cuda:N")
    return resolved


def as_inputs(example_inputs: Any, device: torch.device, what: str) -> tuple:
    """``example_inputs`` as a tuple of tensors on ``device`` (checked by
    :func:`autocompress.analysis.example_tuple`, ``what`` naming the caller)."""
    return tuple(t.to(device) for t in example_tuple(example_inputs, what))


def move(batch: Batch, device: torch.device, *, layout: bool = True) -> Batch:
    """``batch`` with every tensor in it (nested in tuples, lists and dicts) moved to ``device``; 4-d float
    tensors on the CPU in channels-last layout (oneDNN's convolutions are ~1.3-1.5x faster so; values unchanged),
    or in the default contiguous layout when ``layout`` is False. Anything else is returned as it is."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if batch.dim() == 4 and batch.is_floating_point() and device.type == "cpu":
            batch = batch.contiguous(memory_format=torch.channels_last if layout else torch.contiguous_format)
        return batch
    if isinstance(batch, dict):
        return {key: move(value, device, layout=layout) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(move(value, device, layout=layout) for value in batch)
    return batch


@contextlib.contextmanager
def channels_last(*models: nn.Module | None, device: torch.device, collectives: bool = True,
                  enabled: bool = True):
    """Within the block, the 4-d parameters and buffers of ``models`` (None skipped) in channels-last layout
    on the CPU, where oneDNN's convolutions with channels-last inputs and weights run 1.4-1.9x faster
    (training step / forward of the demo CNN at batch 64, BENCHMARKS.md); contiguous again afterwards.
    Values, parameter objects and optimiser references are unchanged. Nothing changes on other devices, nor
    under ``torch.distributed`` when the block may run collectives on the parameters (``collectives``:
    DistributedDataParallel training takes contiguous tensors); a forward-only block passes False. With
    ``enabled`` False (a model that fails in that layout, :func:`channels_last_works`) nothing changes, nor for
    a model already in it (a block within another, e.g. a validation pass within a training epoch, leaves the
    outer block's layout as it found it)."""
    models = tuple(m for m in models if m is not None and not _in_channels_last(m))
    if not enabled or device.type != "cpu" or (collectives and _distributed_active()) \
            or not any(p.dim() == 4 for m in models for p in m.parameters()):
        yield
        return
    for model in models:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for model in models:
            model.to(memory_format=torch.contiguous_format)


def _in_channels_last(model: nn.Module) -> bool:
    """Whether every 4-d parameter of ``model`` is laid out channels-last (False without any)."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


def channels_last_works(model: nn.Module, inputs: tuple, device: torch.device) -> bool:
    """Whether ``model``'s forward runs on ``inputs`` (a tuple of tensors) with its weights and 4-d inputs in
    channels-last layout (:func:`channels_last`, :func:`move`), under ``analysis_mode``. A forward that calls
    ``.view`` on a convolution's output, e.g. ``x.view(-1, 40 * 7 * 7)``, fails there (its tensor is not
    contiguous) although it runs in the default layout; such a model is trained and scored in that one."""
    try:
        with analysis_mode(model), channels_last(model, device=device, collectives=False):
            model(*move(tuple(inputs), device))
    except Exception:  # noqa: BLE001 - the user's forward may raise anything; the default layout is checked too
        return False
    return True


#: oneDNN's channels-last backward-weights of a 1x1 convolution with a stride above 1 and fewer input channels per
#: group than its channel block (8 with AVX2, 16 with AVX-512) writes past its workspace: a crash, a hang or wrong
#: gradients (oneDNN issue #6035, open; torch 2.14.1 crashed so on an AVX2 AMD EPYC, session 22)
ONEDNN_CHANNEL_BLOCK = 16


def channels_last_trains(model: nn.Module) -> bool:
    """Whether ``model`` may train in channels-last layout on the CPU: False when it holds a 2-d convolution
    (``nn.Conv2d`` or any module with its ``kernel_size``, ``stride``, ``in_channels`` and ``groups``) of
    kernel 1x1, a stride above 1 and fewer than :data:`ONEDNN_CHANNEL_BLOCK` input channels per group, whose
    gradient oneDNN computes wrongly in that layout; such a model trains in the default one."""
    for module in model.modules():
        kernel, stride = getattr(module, "kernel_size", None), getattr(module, "stride", None)
        channels, groups = getattr(module, "in_channels", None), getattr(module, "groups", None)
        if not (isinstance(kernel, tuple) and isinstance(stride, tuple) and len(kernel) == len(stride) == 2
                and isinstance(channels, int) and isinstance(groups, int) and groups >= 1):
            continue
        if kernel == (1, 1) and max(stride) > 1 and channels // groups < ONEDNN_CHANNEL_BLOCK:
            return False
    return True


def _distributed_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


#: the form of each function argument of ``compress`` / ``prune``, for the error when one is not callable
FUNCTION_FORMS = {"forward_fn": "forward_fn(model, batch) -> output", "loss_fn": "loss_fn(model, batch) -> loss",
                  "score_fn": "score_fn(model) -> float", "train_fn": "train_fn(model, phase)",
                  "log": "log(line), e.g. print"}


def check_functions(**functions: Any) -> None:
    """UserError naming the first of ``functions`` (keyword = argument name) that is neither None nor callable."""
    for name, value in functions.items():
        if value is not None and not callable(value):
            raise UserError(f"{name} is not a function (got {type(value).__name__})",
                            f"pass {FUNCTION_FORMS[name]}, or None")


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a loader draws its order from (its own and its sampler's)."""
    found = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    return list({id(g): g for g in found if isinstance(g, torch.Generator)}.values())


@contextlib.contextmanager
def kept_randomness(*loaders: Any) -> Iterator[None]:
    """The global torch generators (CPU, and CUDA where initialised) and the loaders' own ``torch.Generator``
    objects (:func:`loader_generators`) as they were before the body, which reseeds them (:meth:`Task.seeded`) and
    draws from them (a DataLoader without a generator of its own draws each iteration's seed from the global one):
    the caller draws on as if it had not run."""
    generators = [g for loader in loaders for g in loader_generators(loader)]
    states = [g.get_state() for g in generators]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)


def _is_pair(batch: Batch) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor) \
        and isinstance(batch[1], torch.Tensor)


def _batch_kind(batch: Batch, items: int = 2) -> str:
    """What a batch that is not a tuple of ``items`` tensors is, for an error: ``"list batches of 3 items"``,
    ``"list batches whose item 1 is a str"``, ``"dict batches"``."""
    kind = type(batch).__name__
    if not isinstance(batch, (tuple, list)):
        return f"{kind} batches"
    if len(batch) != items:
        return f"{kind} batches of {len(batch)} item{'' if len(batch) == 1 else 's'}"
    odd = next(i for i, item in enumerate(batch) if not isinstance(item, torch.Tensor))
    return f"{kind} batches whose item {odd} is a {type(batch[odd]).__name__}"


@dataclass
class Task:
    """Loaders and callables of one compress / prune run (see the module docstring).

    Attributes:
        train_loader: iterable of training batches (re-iterated once per epoch); ADMM, retraining and the
            BatchNorm re-estimation of quick evaluation draw from it.
        val_loader: iterable of validation batches, or None when ``score_fn`` is given.
        device: where the model, the teacher and every batch live.
        forward_fn: ``fn(model, batch) -> output``; default ``model(*batch[:inputs])`` (``model(batch[0])``).
        loss_fn: ``fn(model, batch) -> scalar loss tensor``; default cross-entropy of ``forward_fn``'s
            output ``[B, classes, ...]`` against the targets ``batch[inputs]`` (class indices; ``batch[1]``).
        score_fn: ``fn(model) -> float``, higher is better; default top-1 (a fraction) on ``val_loader``.
        amp: ``None``, ``"bf16"`` or ``"fp16"``: autocast of the training phases on CUDA.
        layout: whether batches and weights go channels-last on the CPU (:func:`channels_last`); :meth:`check`
            turns it off for a model whose forward fails in that layout.
        classifies: set by :meth:`check` from the first training batch: True when it is an ``(inputs, targets)``
            pair whose targets are class indices (or class probabilities) for the forward's output
            ``[B, classes >= 2, ...]``, False when its targets are another tensor (regression), None when its
            targets cannot be read (batches of another form).
        positions: set by :meth:`check`: the forward's class scores have positions beyond the class dimension
            (``[B, classes, H, W]``: per-pixel or per-token classes).
        ignore_label: set by :meth:`check`: the one value the training targets hold besides the output's class
            indices (:func:`ignore_label_of`), else None.
        unscored: set by :meth:`check`: why the forward's output on the first training batch, shaped like class
            scores for its class-index targets, does not score them (:func:`unscored_classes`: an embedding's
            features), else None; ``classifies`` is then False.
        input_shapes: set by :meth:`check`: the shapes of the model's positional arguments in its first call on the
            first training batch (None for an argument that is no tensor), None when the forward did not call it.
        first_batch: set by :meth:`check`: the first training batch (on the device), on which
            :meth:`loss_runs` checks that a compact model still runs the loss; None before, or when the run does not
            train and has no ``loss_fn`` that runs on it.
        inputs: set by :meth:`check`: how many tensors of ``example_inputs`` the model takes, so how many of a
            default batch's items are the forward's arguments before its targets (1: ``(inputs, targets)``).
        warnings: set by :meth:`check`: what it warned about on the ``autocompress`` logger (an example input of
            another size than the batches', batches too small for BatchNorm), for the run's final warnings.
    """

    train_loader: Iterable
    val_loader: Iterable | None = None
    device: torch.device = torch.device("cpu")
    forward_fn: ForwardFn | None = None
    loss_fn: LossFn | None = None
    score_fn: ScoreFn | None = None
    amp: str | None = None
    layout: bool = True
    classifies: bool | None = None
    positions: bool = False
    ignore_label: int | None = None
    unscored: str | None = None
    input_shapes: tuple | None = None
    first_batch: Batch | None = None
    inputs: int = 1
    warnings: list[str] = field(default_factory=list)

    # --- running batches ----------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """The model's output on a batch already on the device."""
        if self.forward_fn is not None:
            return self.forward_fn(model, batch)
        return model(*batch[:self.inputs])

    @property
    def items(self) -> int | None:
        """How many items the model's first input held on the first training batch (axis 0 of its first positional
        tensor, :attr:`input_shapes`), None when the forward passed it none: with the output's shape it tells a
        time-major output ``[T, N, classes]`` (:func:`~autocompress.distillation.time_major`)."""
        first = self.input_shapes[0] if self.input_shapes else None
        return first[0] if first else None

    def _untrained_loss_batch(self, model: nn.Module, first: Batch | None) -> Batch | None:
        """The first training batch (``first`` when :meth:`check` read it already) when a run that does not train
        (``prune`` without ADMM or retraining) has a caller's ``loss_fn`` that runs on it: the caller trains with it
        afterwards, so the compact model must run it too (fresh user 86: a head only that loss calls was cut from
        under it). None otherwise."""
        if self.loss_fn is None or self.train_loader is None:
            return None
        try:
            batch = first if first is not None else self._first(self.train_loader, "train_loader")
            with analysis_mode(model):
                self.loss_runs(model, batch)
        except Exception:  # noqa: BLE001 - not this check's to refuse: the run does not train with it
            return None
        return batch

    def loss_runs(self, model: nn.Module, batch: Batch | None = None) -> torch.Tensor:
        """The loss of ``model`` on ``batch`` (default :attr:`first_batch`; the caller sets the mode: :meth:`check`
        and the compaction probes run it in analysis mode), with gradients on (a loss may take gradients itself: a
        gradient penalty), raising what it raises: a compact model must run the branches the training forward
        takes, which the example inputs' forward may not (a head called only with a keyword argument, fresh user
        84: its input channels were pruned from under it and the run failed after training)."""
        with torch.enable_grad():
            return self.loss(model, self.first_batch if batch is None else batch)[0]

    def default_form(self, batch: Batch) -> bool:
        """Whether ``batch`` is what the default functions take: a tuple / list of :attr:`inputs` tensors and
        the targets (a tensor)."""
        return isinstance(batch, (tuple, list)) and len(batch) == self.inputs + 1 \
            and all(isinstance(item, torch.Tensor) for item in batch)

    def targets(self, batch: Batch) -> Any:
        """The targets of a batch in the default form (:meth:`default_form`): its item :attr:`inputs`."""
        return batch[self.inputs]

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Any]:
        """``(loss, output)`` of one batch (on the device). With a caller's ``loss_fn`` the output is what
        the model's top-level forward returned during it (captured by a forward hook; None if the loss never
        called the model)."""
        if self.loss_fn is None:
            output = self.forward(model, batch)
            return F.cross_entropy(output, self.targets(batch)), output
        seen: list = []
        handle = model.register_forward_hook(lambda _m, _args, out: seen.append(out))
        try:
            loss = self.loss_fn(model, batch)
        finally:
            handle.remove()
        return loss, (seen[-1] if seen else None)

    def batches(self, loader: Iterable, count: int | None, *, spread: bool = False,
                device: torch.device | None = None) -> list[Batch]:
        """The first ``count`` batches of ``loader`` (all when None), moved to ``device`` (default: the task's
        device); with ``spread``,
        ``count`` batches evenly spaced over the loader instead (batch ``i * len(loader) // count`` for each
        ``i < count``, the loader read up to the last of them): a validation loader in dataset order (an
        ``ImageFolder`` without shuffling is sorted by class) then gives batches of every part of it, where its
        first batches hold only the first classes. A loader without ``len()`` gives its first ``count``."""
        total = length(loader) if spread and count is not None else None
        wanted = {i * total // count for i in range(count)} if total is not None and total > count else None
        taken = []
        for index, batch in enumerate(loader):
            if count is not None and len(taken) >= count:
                break
            if wanted is None or index in wanted:
                taken.append(move(batch, self.device if device is None else device, layout=self.layout))
        return taken

    @contextlib.contextmanager
    def seeded(self, seed: int):
        """All randomness of one phase from ``seed``: the global generators (CPU, and the task's CUDA device)
        are forked and seeded, and a loader's own ``torch.Generator`` (``loader.generator`` or
        ``loader.sampler.generator``, e.g. ``DataLoader(..., generator=g)``) is reseeded, so a phase run again
        after a kill sees the same batches. The caller's global generator state is restored afterwards."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            generators = loader_generators(self.train_loader) + loader_generators(self.val_loader)
            for index, generator in enumerate(generators):
                generator.manual_seed(seed + 7 * (index + 1))
            yield

    def autocast(self):
        """The training phases' autocast context (a no-op unless ``amp`` is set and the device is CUDA)."""
        enabled = self.amp is not None and self.device.type == "cuda"
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    # --- scoring ------------------------------------------------------------------------------------
    @property
    def can_score(self) -> bool:
        """Whether a score exists (a ``score_fn`` or a validation loader)."""
        return self.score_fn is not None or self.val_loader is not None

    def top1(self, model: nn.Module, batches: Iterable) -> float:
        """Top-1 (a fraction in [0, 1]) of ``model`` on ``(inputs, targets)`` batches under ``analysis_mode``
        (eval mode, no grad; mode and BatchNorm buffers restored). Outputs ``[B, classes, ...]``: dimension 1
        is the class."""
        correct = seen = 0
        with analysis_mode(model), channels_last(model, device=self.device, collectives=False, enabled=self.layout):
            for batch in batches:
                batch = move(batch, self.device, layout=self.layout)
                predicted = self.forward(model, batch).argmax(1)
                targets = self.targets(batch)
                correct += int((predicted == targets).sum())
                seen += targets.numel()
        return correct / max(seen, 1)

    def score(self, model: nn.Module, batches: Iterable | None = None) -> float:
        """The score of ``model`` (higher is better): ``score_fn(model)``, or top-1 (fraction) on ``batches``
        (default: the whole ``val_loader``), always under ``analysis_mode``.

        Raises:
            UserError: ``score_fn`` returned NaN, an infinity or something that is not a number.
        """
        if self.score_fn is None:
            return self.top1(model, self.val_loader if batches is None else batches)
        with analysis_mode(model):
            value = self.score_fn(model)
        return check_score(value)

    # --- checks before any work ---------------------------------------------------------------------
    def check_score_direction(self, model: nn.Module, base_score: float) -> None:
        """Refuse a ``score_fn`` that scores a copy of ``model`` with every weight zeroed (each parameter of two
        or more dimensions: a constant output) at or above ``base_score``, the model's own score: the score is
        lower-is-better (a fresh user passed their validation loss, and the run ranked, purified and stopped
        distilling backwards without a word), does not depend on the model (another passed a constant: every
        decision of the run is a tie), or the base predicts no better than a constant. Nothing is checked for the
        default top-1, nor when ``score_fn`` fails or returns no finite number on the copy.

        Raises:
            UserError (naming ``score_fn``): the zeroed copy scores as high or higher.
        """
        if self.score_fn is None:
            return
        blank = copy.deepcopy(model)
        with torch.no_grad():
            for param in blank.parameters():
                if param.dim() >= 2:
                    param.zero_()
        try:
            value = self.score(blank)
        except Exception:  # noqa: BLE001 - a score_fn may fail on a constant output (e.g. a degenerate metric)
            return
        if value >= base_score:
            where = "above" if value > base_score else "as high as"
            raise UserError(f"score_fn scores the model with every weight zeroed (a constant output) {value:.4g}, "
                            f"{where} the model's own {base_score:.4g}: the score must be higher-is-better and "
                            "depend on the model",
                            "return e.g. minus the validation loss, or accuracy / mIoU / PSNR (if the model is "
                            "really no better than a constant output, train it first)")

    def _check_loaders(self, needs_training: bool) -> None:
        """UserError naming the loader: ``train_loader`` None where training is needed, or a map-style Dataset
        given for a loader (it yields single items, not batches)."""
        if needs_training and self.train_loader is None:
            raise UserError("train_loader is None, and the run trains (ADMM, retraining, the search's fine-tuning)",
                            "pass a DataLoader of (inputs, targets) batches")
        data = torch.utils.data
        for name, loader in (("train_loader", self.train_loader), ("val_loader", self.val_loader)):
            if isinstance(loader, data.Dataset) and not isinstance(loader, data.IterableDataset):
                raise UserError(f"{name} is a {type(loader).__name__}, a Dataset: it yields single items, not batches",
                                f"wrap it: DataLoader(dataset, batch_size=64, shuffle={name == 'train_loader'})")

    def check(self, model: nn.Module, example_inputs: tuple, *, needs_training: bool, needs_score: bool,
              needs_length: bool = False) -> Any:
        """Refuse, before any work, what would fail later (UserError naming the argument): a model with NaN /
        infinite weights or buffers, a model whose forward fails on ``example_inputs``, a loader that yields
        nothing, batches that are not ``(inputs, targets)`` pairs without ``forward_fn`` / ``loss_fn``, a loss
        that fails on a first batch or is not a finite scalar, no way to score at all, or (``needs_length``:
        the default training loop, whose learning-rate schedule spans epochs x batches) a training loader
        without ``len()``. What it accepts but the caller may not mean is logged as a warning on the
        ``autocompress`` logger (:func:`input_size_warning`, :func:`small_batch_warning`,
        :func:`shared_data_warning`).

        Returns:
            The forward's output on the first training batch (analysis mode), or None when neither training nor
            the default score needed that batch.
        """
        check_finite(model.state_dict(), "the model")
        self.inputs = len(example_inputs)
        self._check_loaders(needs_training)
        try:
            with analysis_mode(model):
                outputs = [output_tensors(model(*example_inputs)) for _ in range(2)]
        except Exception as exc:  # noqa: BLE001 - the user's forward may raise anything
            self._refuse_unbatched_on_failure(example_inputs)  # the likelier cause, named (fresh user 90)
            keyword = isinstance(exc, TypeError) and "required keyword-only argument" in str(exc)
            raise UserError(f"the model's forward fails on example_inputs ({first_line(exc)})", (
                "example_inputs are the forward's positional arguments: compress a wrapper nn.Module whose "
                "forward(*inputs) calls the model with its keyword arguments" if keyword else
                "pass example_inputs the model accepts, e.g. one item of a batch of your data "
                "(next(iter(train_loader))[0][:1])")) from None
        _refuse_random_forward(*outputs)
        self.layout = self.device.type != "cpu" or channels_last_works(model, example_inputs, self.device)
        if needs_score and self.score_fn is None and self.val_loader is None:
            raise UserError("nothing to score candidates with: val_loader and score_fn are both None",
                            "pass val_loader (top-1 on it is the score) or score_fn(model) -> float")
        if needs_training and not any(p.requires_grad for p in model.parameters()):
            raise UserError("every parameter of the model has requires_grad=False, so ADMM and retraining cannot "
                            "train it", "unfreeze the layers to prune (model.requires_grad_(True)); frozen "
                            "layers may stay frozen")
        if needs_training and needs_length:
            try:
                len(self.train_loader)
            except TypeError:
                raise UserError("train_loader has no len() (the default loop schedules its learning rate over "
                                "epochs x batches)", "pass a loader with a length, or your own train_fn") from None
        if needs_training:
            refuse_single_item_batch(self.train_loader, model, example_inputs)
        train_output = first = None
        if needs_training or (needs_score and self.score_fn is None):
            first = self._first(self.train_loader, "train_loader")
            self.first_batch = first if needs_training else None
            _refuse_unbatched_example(first, example_inputs)
            _refuse_sequence_first(first, example_inputs)
        _refuse_batch_not_first(model, example_inputs)  # after the more specific refusals above
        if first is not None:
            train_output = self._check_batch(model, first, "train_loader")
            for warning in (input_size_warning(self.input_shapes, example_inputs), small_batch_warning(first, model),
                            shared_data_warning(self.train_loader, self.val_loader)):
                if warning:
                    logging.getLogger("autocompress").warning(warning)
                    self.warnings.append(warning)
            default = self.default_form(first)
            targets = self.targets(first) if default else None
            scores = isinstance(train_output, torch.Tensor) and train_output.dim() >= 2
            problem = class_target_problem(train_output, targets, where=self._where) if scores else None
            self.unscored = unscored_classes(train_output, targets) if scores and default and not problem else None
            problem = problem or _unscored_problem(train_output, self.unscored)
            self.classifies = scores and problem is None if default else None
            self.positions = scores and train_output.dim() > 2
            self.ignore_label = ignore_label_of(train_output, targets)
            if needs_training and self.loss_fn is None:
                _check_class_scores(train_output, "train_loader", "the default loss (cross-entropy)")
                _refuse_class_targets(problem, "train_loader", "the default loss (cross-entropy)", (
                    f"if {self.ignore_label} marks items to ignore, pass loss_fn(model, batch) -> "
                    f"F.cross_entropy(output, {self._where}, ignore_index={self.ignore_label}) and a score_fn that "
                    "skips them" if self.ignore_label is not None else
                    f"for an embedding, pass loss_fn(model, batch) -> your loss (e.g. a metric-learning loss of the "
                    f"output and {self._where}) and score_fn(model) -> float (e.g. retrieval recall@1); a classifier "
                    "needs training on these labels first" if self.unscored else
                    f"pass loss_fn(model, batch) -> loss (e.g. F.mse_loss of the output and {self._where} for "
                    "regression, F.binary_cross_entropy_with_logits for several labels an item: multi-hot "
                    "targets)"))
            if needs_training:
                try:
                    with analysis_mode(model):  # eval mode: BatchNorm statistics stay
                        loss = self.loss_runs(model, first)
                except Exception as exc:  # noqa: BLE001 - the user's loss may raise anything
                    fix = ("loss_fn is called as loss_fn(model, batch) with a batch of train_loader and returns a "
                           "scalar tensor: check it on one batch" if self.loss_fn is not None else
                           "check the targets (class indices in [0, classes)) or pass loss_fn")
                    raise UserError(f"the loss fails on a batch of train_loader ({first_line(exc)})", fix) from None
                check_loss(loss)
                if not loss.requires_grad:
                    raise UserError("the loss on a batch of train_loader has no gradient (no path to the model's "
                                    "weights: a detached tensor, a number made a tensor again, or torch.no_grad "
                                    "inside loss_fn), so ADMM and retraining would not train",
                                    "return the loss tensor computed from the model's output")
        if needs_score and self.score_fn is None:
            batch = self._first(self.val_loader, "val_loader")
            output = self._check_batch(model, batch, "val_loader")
            _check_class_scores(output, "val_loader", "the default score (top-1)")
            items = f" (batches of {len(batch)} items: the default score reads {self._where} as the targets)" \
                if isinstance(batch, (tuple, list)) and len(batch) > self.inputs + 1 else ""
            if not isinstance(batch, (tuple, list)) or len(batch) <= self.inputs:
                raise UserError(f"val_loader yields {_batch_kind(batch, self.inputs + 1)}, in which the default score "
                                f"(top-1) finds no targets (it reads {self._where} of a tuple batch)",
                                "pass score_fn(model) -> float, higher is better (e.g. top-1 on your loader)")
            targets = batch[self.inputs]
            _refuse_class_targets(class_target_problem(output, targets, probabilities=False, where=self._where)
                                  or _unscored_problem(output, unscored_classes(output, targets)), "val_loader",
                                  "the default score (top-1)", "pass score_fn(model) -> float, higher is better (e.g. "
                                  f"minus the validation loss, or PSNR){items}")
        if not needs_training:
            self.first_batch = self._untrained_loss_batch(model, first)
        return train_output

    def _refuse_unbatched_on_failure(self, example_inputs: tuple) -> None:
        """After the forward failed on ``example_inputs``: :func:`_refuse_unbatched_example` against the first
        training batch (read as it is, on its own device), whose error names the missing batch dimension where a
        BatchNorm's or a conv's own error would not (``running_mean should contain 128 elements not 64`` for a
        ``[3, 128]`` point cloud); nothing when there is no such batch to compare with."""
        try:
            first = next(iter(self.train_loader)) if self.train_loader is not None else None
        except Exception:  # noqa: BLE001 - the loader's own failure is reported by the checks that read it
            return
        _refuse_unbatched_example(first, example_inputs)

    def _first(self, loader: Iterable, name: str) -> Batch:
        try:
            return move(next(iter(loader)), self.device, layout=self.layout)
        except StopIteration:
            raise UserError(f"{name} yields no batch", f"pass a {name} over a non-empty dataset") from None
        except TypeError:
            raise UserError(f"{name} is not iterable ({type(loader).__name__})",
                            "pass e.g. a torch.utils.data.DataLoader") from None

    @property
    def _where(self) -> str:
        """Where the default functions read a batch's targets, for messages: ``"batch[1]"``."""
        return f"batch[{self.inputs}]"

    def _check_batch(self, model: nn.Module, batch: Batch, name: str) -> Any:
        """The model's output on ``batch`` (analysis mode), and :attr:`input_shapes` read from the model's first
        call; UserError naming ``name`` when the batch is not in the form the default functions can run
        (:meth:`default_form`), or the forward fails."""
        needs_default = (self.forward_fn is None) or (self.loss_fn is None and self.score_fn is None)
        if needs_default and not self.default_form(batch):
            form = "(inputs, targets) tensor pairs" if self.inputs == 1 else \
                f"tuples of {self.inputs} input tensors and the targets"
            several = isinstance(batch, (tuple, list)) and len(batch) > 2 and self.inputs == 1 \
                and all(isinstance(item, torch.Tensor) for item in batch)
            also = (f", or example_inputs as a tuple of the batch's first {len(batch) - 1} tensors when the model "
                    "takes them all and the last is the targets") if several and self.loss_fn is None else ""
            fix = ("pass forward_fn(model, batch) -> the model's output too: besides your loss, the run calls the "
                   "model on training batches itself (BatchNorm re-estimation, distillation)" if self.loss_fn else
                   f"pass forward_fn(model, batch) and loss_fn(model, batch) (and score_fn(model)) saying how to run "
                   f"them{also}")
            raise UserError(f"{name} yields {_batch_kind(batch, self.inputs + 1)}, not {form}", fix)
        calls: list[tuple] = []
        handle = model.register_forward_pre_hook(lambda _module, args: calls.append(
            tuple(tuple(arg.shape) if isinstance(arg, torch.Tensor) else None for arg in args)))
        try:
            with analysis_mode(model):
                output = self.forward(model, batch)
        except Exception as exc:  # noqa: BLE001 - the user's forward may raise anything
            raise UserError(f"the model fails on a batch of {name} ({first_line(exc)})",
                            "check that the loader's batches match the model's input (or pass forward_fn)"
                            ) from None
        finally:
            handle.remove()
        self.input_shapes = calls[0] if calls else None
        nan = sum(int(torch.isnan(t).sum()) for t in output_tensors(output) if t.is_floating_point() or t.is_complex())
        if nan:
            raise UserError(f"the model's output on a first batch of {name} holds {nan} NaN values, before any "
                            "training", "check the batch (missing values, normalisation) and the forward (a log, "
                            "sqrt or division of values that can be negative or zero)")
        return output


#: the largest difference of two eval-mode forwards on the same inputs, relative to the outputs' largest value,
#: that :func:`_refuse_random_forward` takes for arithmetic (a GPU's order of additions), not sampling
RANDOM_FORWARD = 1e-4


def _refuse_random_forward(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    """UserError when two eval-mode forwards on the example inputs (their output tensors ``first``, ``second``)
    differ by more than :data:`RANDOM_FORWARD` of the outputs' scale: the forward samples noise in eval mode (a
    VAE's reparameterisation drawn always, fresh user 81), so no score, compaction check or comparison of the
    compact model with the masked one means anything (it was refused later, blaming a view or a layer's f(0))."""
    diffs = [float((a.double() - b.double()).abs().max()) for a, b in zip(first, second)
             if a.is_floating_point() and a.shape == b.shape and a.numel()]
    scale = max([1.0] + [float(a.double().abs().max()) for a in first if a.is_floating_point() and a.numel()])
    if diffs and max(diffs) > RANDOM_FORWARD * scale:
        raise UserError(f"the model's forward is random in eval mode: two forwards on example_inputs differ by "
                        f"{max(diffs):.3g}", "sample only in train mode (a VAE's z = mu when not self.training, "
                        "dropout through nn.Dropout), or pass a model whose eval forward is deterministic")


def _refuse_batch_not_first(model: nn.Module, example_inputs: tuple) -> None:
    """UserError when the forward runs on ``example_inputs`` of one item and fails on them repeated to two items
    along axis 0, as the analysis repeats them (train-mode BatchNorm needs two): some input's batch is not axis 0
    (an RNN's initial state ``h0`` is ``[layers, B, H]``; fresh user 86 read PyTorch's "Expected hidden[0] size
    (1, 2, 64), got [2, 1, 64]" from deep inside the pruning space)."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim()]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return
    try:
        with analysis_mode(model):
            model(*at_batch(example_inputs, 2))
    except Exception as exc:  # noqa: BLE001 - the user's forward may raise anything
        raise UserError(f"the model's forward runs on example_inputs {[list(t.shape) for t in tensors]} but fails "
                        f"on them repeated to two items along axis 0 ({first_line(exc)})", "the analysis runs "
                        "batches of several items: put the batch axis first in every input (an RNN's initial "
                        "state h0 [layers, B, H] has it on axis 1: take it as [B, layers, H] and transpose it in "
                        "forward, or leave it None)") from None


#: how to give inputs the batch axis first
def _refuse_sequence_first(batch: Batch, example_inputs: tuple) -> None:
    """UserError when an input of a default-form training ``batch`` ``[L, B, ...]`` is the example's ``[L, 1, ...]``
    with more than one item on axis 1: the batch is on axis 1 (PyTorch's transformers default to sequence first),
    where autocompress reads axis 0, and the run would fail later inside the model or count the wrong batch."""
    if not isinstance(batch, (tuple, list)) or len(batch) != len(example_inputs) + 1:
        return
    for data, example in zip(batch, example_inputs):
        if isinstance(data, torch.Tensor) and data.dim() == example.dim() >= 2 and \
                data.shape[0] == example.shape[0] > 1 and example.shape[1] == 1 < data.shape[1]:
            raise UserError(f"example_inputs has shape {list(example.shape)} and train_loader's inputs "
                            f"{list(data.shape)}: their batch looks to be axis 1, and autocompress reads axis 0 as "
                            "the batch", BATCH_FIRST)


def _refuse_unbatched_example(batch: Batch, example_inputs: tuple) -> None:
    """UserError when the one tensor of ``example_inputs`` is shaped like one item of the training ``batch``'s
    inputs, without the batch dimension (``[3, 32, 32]`` against ``[64, 3, 32, 32]``): a forward that broadcasts
    it runs, and the counts and checks later fail or read the channels as the batch."""
    if not _is_pair(batch) or not isinstance(batch[0], torch.Tensor) or len(example_inputs) != 1:
        return
    data, example = batch[0], example_inputs[0]
    if isinstance(example, torch.Tensor) and data.dim() == example.dim() + 1 and data.shape[1:] == example.shape:
        raise UserError(f"example_inputs has shape {list(example.shape)}, one item of train_loader's inputs "
                        f"{list(data.shape)} without the batch dimension",
                        "pass a batch of one: example_inputs.unsqueeze(0) (e.g. next(iter(train_loader))[0][:1])")


def input_size_warning(shapes: tuple | None, example_inputs: tuple) -> str | None:
    """The warning when the model's inputs on a training batch (``shapes``: :attr:`Task.input_shapes`, whatever
    form the batch has, fresh users 83 and 84) differ in shape from ``example_inputs`` past the batch dimension
    (32x32 images against a 64x64 example): parameters do not depend on it, but MACs, latency and the compaction
    checks are measured at the example's size. None when they agree or cannot be compared."""
    for position, (example, shape) in enumerate(zip(example_inputs, shapes or ())):
        if isinstance(example, torch.Tensor) and shape is not None and len(shape) == example.dim() \
                and tuple(example.shape[1:]) != shape[1:]:
            where = "" if len(example_inputs) == 1 else f" (argument {position + 1})"
            return (f"example_inputs has shape {list(example.shape)} and the model's input on a batch of "
                    f"train_loader {list(shape)}{where}: MACs, FLOPs and latency are counted at the example's size; "
                    "pass an example of the size the model will run at (e.g. one item of a training batch)")
    return None


#: training batches of fewer items than this make a BatchNorm's batch statistics noisy
MIN_BATCH_NORM_BATCH = 8


def small_batch_warning(batch: Batch, model: nn.Module) -> str | None:
    """The warning when a training ``batch`` of ``(inputs [B, ...], targets)`` holds fewer than
    :data:`MIN_BATCH_NORM_BATCH` items and ``model`` has BatchNorm layers: retraining normalises by the
    statistics of each batch and BatchNorm re-estimation averages them (a fresh user's batches of 1 ended at
    31.9 % validation top-1, batches of 7 at 82 %). None otherwise."""
    if not _is_pair(batch) or not isinstance(batch[0], torch.Tensor) or batch[0].dim() == 0:
        return None
    size = batch[0].shape[0]
    if size >= MIN_BATCH_NORM_BATCH or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    return (f"train_loader's batches hold {size} item(s) and the model has BatchNorm layers, whose "
            f"statistics from so few items are noisy in retraining and BatchNorm re-estimation; use batches of "
            f"{MIN_BATCH_NORM_BATCH} or more")


def shared_data_warning(train_loader: Any, val_loader: Any) -> str | None:
    """The warning when ``val_loader`` reads the training data (it is ``train_loader``, or a loader over the same
    dataset object): every decision on the validation score (the search's candidates, purification's
    tolerance, the distillation stop test, the fit gap of ``distillation.enabled: auto``) is then taken on data the
    model trains on, and its final validation top-1 leans further optimistic. None otherwise (data held out in
    another object is not compared)."""
    dataset = getattr(val_loader, "dataset", None)
    if val_loader is None or not (val_loader is train_loader or
                                  (dataset is not None and dataset is getattr(train_loader, "dataset", None))):
        return None
    return ("val_loader reads the training data (" + ("it is train_loader" if val_loader is train_loader else
            "its dataset is train_loader's") + "): the search, purification and the distillation decide on data "
            "the model trains on, and validation scores lean optimistic; pass held-out data (e.g. torch.utils.data."
            "random_split of the training set)")


def _one_item_batches(loader: Any) -> str | None:
    """How a DataLoader's training batches come to hold one item, in words (every batch at ``batch_size`` 1, or the
    last one where it keeps it); None for other loaders, or where the count is unknown."""
    batches = getattr(loader, "batch_sampler", None)
    if not isinstance(loader, torch.utils.data.DataLoader) or not isinstance(batches, torch.utils.data.BatchSampler) \
            or batches.drop_last:
        return None
    try:
        items = len(batches.sampler)
    except TypeError:  # an iterable-style dataset: its length is unknown
        return None
    if batches.batch_size == 1:
        return "train_loader's batches hold 1 item (batch_size 1)"
    if items % batches.batch_size == 1:
        return f"train_loader's last batch holds 1 item ({items} items in batches of {batches.batch_size})"
    return None


def refuse_single_item_batch(loader: Any, model: nn.Module, example_inputs: tuple) -> None:
    """UserError, before any work, when ``loader`` (a DataLoader, its batch size given or a ``BatchSampler``) makes
    batches of one item (``batch_size`` 1, or a last batch it keeps) and ``model`` cannot train on one: BatchNorm
    over a single value per channel (BatchNorm1d on ``[1, C]``, a BatchNorm after global pooling) raises in training
    mode (a fresh user's 1,025 items in batches of 64 stopped in BatchNorm re-estimation with PyTorch's own error).
    Tried on a copy of ``model`` in training mode (:func:`autocompress.analysis.train_mode`: a training-only branch
    runs too) on ``example_inputs`` (one item of each ``[1, ...]``), under no_grad, the global RNG restored."""
    how = _one_item_batches(loader)
    if how is None or not trained_norms(model):
        return
    trial = train_mode(copy.deepcopy(model))
    devices = sorted({p.device.index or 0 for p in trial.parameters() if p.is_cuda})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            trial(*at_batch(example_inputs, 1))
    except ValueError as exc:  # what BatchNorm raises; anything else the run itself reports where it happens
        raise UserError(f"{how}, and the model's BatchNorm cannot train on one ({first_line(exc)})",
                        "pass drop_last=True to the DataLoader, or a batch_size that leaves 2 or more") from None
    except Exception:  # noqa: BLE001 - the user's forward may raise anything in training mode
        return


def check_loss(loss: Any, *, finite: bool = True) -> torch.Tensor:
    """``loss`` if it is a scalar tensor (and finite, unless ``finite=False``: the finite check is
    :meth:`Task.check`'s, on a first training batch before any training); UserError naming ``loss_fn`` otherwise."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        fix = ("return the loss tensor itself (not .item() or float(): training needs its graph)"
               if isinstance(loss, (int, float)) else "reduce the loss, e.g. .mean()")
        raise UserError(f"loss_fn returned {shape}, not a scalar tensor", fix)
    if finite and not torch.isfinite(loss.detach()).all():
        raise UserError(f"the loss on a first batch of train_loader is {float(loss.detach())}, before any training",
                        "check the batch's targets and loss_fn")
    return loss


def check_score(value: Any) -> float:
    """``value`` as a float if it is a finite real number; UserError naming ``score_fn`` otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"score_fn returned {type(value).__name__}, not a number", "return a float")
    if not math.isfinite(float(value)):
        raise UserError(f"score_fn returned {value}", "return a finite float (higher is better)")
    return float(value)




def _refuse_class_targets(problem: str | None, name: str, what: str, fix: str) -> None:
    """UserError naming ``name`` for a ``problem`` :func:`class_target_problem` found on one of its batches:
    ``what`` (the default loss or score) needs class scores and class targets; ``fix`` says what to pass instead."""
    if problem:
        raise UserError(f"{problem} on a batch of {name}, but {what} needs class scores and class targets", fix)


def class_target_problem(output: torch.Tensor, targets: Any, *, probabilities: bool = True,
                         where: str = "batch[1]") -> str | None:
    """What keeps ``targets`` from being class targets for class scores ``output`` ``[B, classes, ...]``, or None:
    at least 2 classes (cross-entropy and the arg-max over one class are constant: a loss of 0, a top-1 of 100 %),
    and class indices in ``[0, classes)`` of ``output``'s shape without dimension 1, or (with ``probabilities``:
    cross-entropy's soft targets) class probabilities of ``output``'s shape. Regression targets (an image to
    restore, a value per item) are neither, and would train on a zero or meaningless loss or score above 100 %
    without an error. ``where`` names the targets' place in the batch in the message."""
    classes, shape = output.shape[1], tuple(output.shape)
    if classes < 2:
        return f"the forward's output {list(shape)} has {classes} class on dimension 1"
    if not isinstance(targets, torch.Tensor):
        return f"the targets ({where}) are {kind_of(targets)}"
    if not targets.is_floating_point():
        want = shape[:1] + shape[2:]
        return (f"the targets ({where}) {list(targets.shape)} are not one class index per output {list(want)}"
                if tuple(targets.shape) != want else _outside_classes(targets, classes, where))
    if probabilities and tuple(targets.shape) == shape and bool((targets >= 0).all()) and \
            bool(torch.allclose(targets.sum(1), torch.ones((), device=targets.device, dtype=targets.dtype),
                                atol=1e-3)):
        return None
    return (f"the targets are {str(targets.dtype).removeprefix('torch.')} {list(targets.shape)}, not class "
            f"indices{' or class probabilities' if probabilities else ''} for the output {list(shape)}")


#: the most of a model's top-1 above chance on a batch of its class-index targets at which :func:`unscored_classes`
#: takes the output for features (a trained classifier scores far above chance on its own training data), and the
#: fewest items (of two labels or more) on which it reads that top-1
CHANCE_MARGIN = 0.05
CHANCE_ITEMS = 16


def unscored_classes(output: torch.Tensor, targets: torch.Tensor) -> str | None:
    """Why ``output`` ``[B, features]``, of class scores' shape for the class indices ``targets`` ``[B]`` in ``[0,
    features)``, does not score them ("they use 10 of its 64 features, ..."), or None: the targets use at most a
    quarter of its features (10 classes of a 64-d embedding; not 10 of a 20-output head, fresh user 80) and its
    top-1 on them is within :data:`CHANCE_MARGIN` of a random guess among the features, on a batch of
    :data:`CHANCE_ITEMS` items or more of two labels or more (a loader sorted by label has batches of one). A
    metric-learning embedding trained on the class indices looks like class scores by shape alone: cross-entropy and
    distillation over its features would destroy it, and its top-1 scores it 0 (fresh user 78). An untrained
    classifier of four times more outputs than labels looks the same."""
    if output.dim() != 2 or targets.dim() != 1 or targets.is_floating_point() or targets.numel() < CHANCE_ITEMS \
            or targets.unique().numel() < 2:
        return None
    features, used = output.shape[1], int(targets.max()) + 1
    top1 = float((output.argmax(1) == targets).float().mean())
    if used > features // 4 or top1 > 1.0 / features + CHANCE_MARGIN:
        return None
    return (f"they use {used} of its {features} features, and its top-1 on them is {100 * top1:.1f}% (a random "
            f"guess: {100 / features:.1f}%)")


def _unscored_problem(output: torch.Tensor, detail: str | None) -> str | None:
    """What :func:`unscored_classes` found of ``output`` (``detail``) as a problem of :func:`_refuse_class_targets`,
    or None."""
    return detail and (f"the forward's output {list(output.shape)} does not score its class indices ({detail}): an "
                       "embedding's features, or a classifier not trained on these labels")


def ignore_label_of(output: Any, targets: Any) -> int | None:
    """The one value outside ``[0, classes)`` that integer ``targets`` of class indices' shape for class scores
    ``output`` ``[B, classes, ...]`` hold besides class indices (an ignore label: 255 for a segmentation's
    unlabelled pixels), or None; not ``classes`` itself when no target is 0 (labels counted from 1)."""
    if not (isinstance(output, torch.Tensor) and output.dim() >= 2 and isinstance(targets, torch.Tensor)) \
            or targets.is_floating_point() or tuple(targets.shape) != tuple(output.shape[:1] + output.shape[2:]):
        return None
    outside = targets[(targets < 0) | (targets >= output.shape[1])].unique()
    one_based = outside.numel() == 1 and int(outside[0]) == output.shape[1] and int(targets.min()) >= 1
    return int(outside[0]) if outside.numel() == 1 and not one_based else None


def _outside_classes(targets: torch.Tensor, classes: int, where: str) -> str | None:
    """What is wrong with integer class ``targets`` whose values leave ``[0, classes)`` (a top-1 of 0 % for every
    model, a loss that fails on the device), or None."""
    if targets.numel() == 0:
        return None
    low, high = int(targets.min()), int(targets.max())
    if 0 <= low and high < classes:
        return None
    one_based = f" (counted from 1? the output's classes are 0 to {classes - 1}: subtract 1)" \
        if low == 1 and high == classes else ""
    return (f"the class indices ({where}) run from {low} to {high}, outside the output's {classes} classes "
            f"(dimension 1){one_based}")


def _check_class_scores(output: Any, name: str, what: str) -> None:
    """UserError naming ``forward_fn`` when the forward's ``output`` on a batch of ``name`` is not a tensor of class
    scores ``[B, classes, ...]``, which ``what`` needs (a model of several heads returns a tuple)."""
    if isinstance(output, torch.Tensor) and output.dim() >= 2:
        return
    first = (f"model(batch[0])[{next(iter(output))!r}] for the dict's first entry"
             if isinstance(output, dict) and output else "model(batch[0])[0] for the first of several heads")
    raise UserError(f"the forward returns {kind_of(output)} on a batch of {name}, but {what} needs class scores "
                    f"[B, classes, ...]", f"pass forward_fn returning them (e.g. lambda model, batch: {first}), and "
                    "loss_fn / score_fn for the rest")
