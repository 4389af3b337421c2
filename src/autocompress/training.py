"""Training and evaluation: SGD (momentum / Nesterov) or AdamW, cosine or one-cycle schedule, label smoothing.

* :func:`train_epoch` runs one epoch with hooks for the pruning engine: ``regularizer()`` (ADMM's
  ``rho/2 * ||W - Z + U||^2``, AutoCompress, Liu et al. AAAI 2020, §3) is added to the loss, and
  ``after_step()`` runs after every optimiser step (masked retraining holds the pruning masks).
* :func:`evaluate` measures loss, top-1 and top-5 (with more than 10 classes) under ``analysis_mode``.
* :func:`fit` trains for ``config.epochs`` epochs, evaluates the validation split after each, writes an
  atomic checkpoint after each (with the optimiser / scheduler / RNG states, so ``resume=True`` continues
  exactly as if never interrupted) and evaluates the test split at the end.

Weight decay applies to conv / linear weights only, not to BatchNorm parameters or biases (every
parameter with fewer than 2 dimensions), the usual choice for BN networks. Accuracies are fractions in
[0, 1]; losses are mean cross-entropy per image (without label smoothing in :func:`evaluate`).

All randomness is seeded from ``config.seed``: data order and augmentation use a ``torch.Generator`` that
:func:`fit` owns; dropout and other layers that draw from the global RNG run inside
``torch.random.fork_rng`` seeded from ``config.seed`` (the caller's global RNG state is left untouched).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .analysis import analysis_mode, model_device, train_mode
from .distillation import TeacherCache
from .errors import UserError
from .task import Task, channels_last, channels_last_trains, channels_last_works, check_loss, move
from .text import plural

SCHEDULES = ("cosine", "onecycle", "constant")
#: the optimisers of the default loop: ``"sgd"`` (momentum / Nesterov, L2 weight decay) or ``"adamw"`` (Adam with
#: decoupled weight decay, Loshchilov & Hutter 2019; its steps do not grow with the loss's scale)
OPTIMIZERS = ("sgd", "adamw")
#: the learning rate of fine-tuning a trained network with each optimiser (masked retraining, the ADMM W-step, the
#: search's fine-tuning scorer) unless one is set
FINE_TUNING_LR = {"sgd": 0.01, "adamw": 0.001}


class Diverged(UserError):
    """The training loss became NaN or infinite (a learning rate too high for the network or the loss)."""


def fine_tuning_lr(lr: float | None, optimizer: str) -> float:
    """``lr``, or when None ``optimizer``'s :data:`FINE_TUNING_LR` (0 for an unknown optimiser, which
    :meth:`TrainConfig.validate` then refuses by name)."""
    return FINE_TUNING_LR.get(optimizer, 0.0) if lr is None else lr


def above_bars(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` writing while the progress bars are cleared, then redrawn (``tqdm.external_write_mode``): a line
    logged within an epoch stands on its own line above the bar instead of inside it."""
    def write(line: str) -> None:
        with tqdm.external_write_mode():
            log(line)

    return write


@dataclass
class OptimizerSettings:
    """The optimiser settings shared by training (:class:`TrainConfig`) and masked retraining
    (:class:`autocompress.config.RetrainConfig`).

    Attributes:
        optimizer: one of :data:`OPTIMIZERS`.
        momentum: SGD momentum (AdamW: unused).
        nesterov: Nesterov momentum (SGD).
        weight_decay: SGD's L2 penalty or AdamW's decoupled decay, on conv / linear weights (not BatchNorm, not
            biases).
        schedule: ``"cosine"`` (lr to 0 over all iterations), ``"onecycle"`` (warm-up over the first
            ``pct_start`` of iterations, then cosine down) or ``"constant"``; stepped every iteration.
        pct_start: one-cycle warm-up fraction.
        label_smoothing: cross-entropy label smoothing in [0, 1).
    """

    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    pct_start: float = 0.25
    label_smoothing: float = 0.0


@dataclass
class TrainConfig(OptimizerSettings):
    """Hyperparameters of :func:`fit`: the :class:`OptimizerSettings` and

    Attributes:
        epochs: passes over the training split.
        batch_size: images per optimiser step.
        lr: peak learning rate (cosine: initial; one-cycle: maximum).
        seed: seeds data order, augmentation and the global RNG inside :func:`fit`.
        device: torch device for training (``"cpu"``, ``"cuda"``).
    """

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    seed: int = 0
    device: str = "cpu"

    def validate(self, *, epochs_flag: str = "--epochs", retraining: bool = False,
                 names: Callable[[str], str] | None = None) -> "TrainConfig":
        """Check the values; returns self. Raises UserError naming the bad option (``epochs`` as
        ``epochs_flag``; the others as ``names(field)``, by default the ``autocompress train`` flag, e.g.
        ``--weight-decay``). ``retraining``: masked retraining, where ``epochs`` 0 means no retraining (the
        other values are then unused and not checked); otherwise ``epochs`` must be >= 1."""
        least = 0 if retraining else 1
        if self.epochs < least:
            raise UserError(f"{epochs_flag} {self.epochs} is {'negative' if retraining else 'not positive'}",
                            f"pass {epochs_flag} >= {least}" + (" (0: no retraining)" if retraining else ""))
        if self.epochs == 0:
            return self
        n = names or (lambda field: "--" + field.replace("_", "-"))
        checks = [
            (self.optimizer in OPTIMIZERS, f"{n('optimizer')} {self.optimizer!r} is unknown",
             f"use one of {', '.join(OPTIMIZERS)}"),
            (self.batch_size >= 1, f"{n('batch_size')} {self.batch_size} is not positive",
             f"pass {n('batch_size')} >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), f"{n('lr')} {self.lr} is not a positive number",
             f"pass e.g. {n('lr')} 0.1"),
            (0 <= self.momentum < 1, f"{n('momentum')} {self.momentum} is outside [0, 1)",
             f"pass e.g. {n('momentum')} 0.9"),
            (not self.nesterov or self.momentum > 0 or self.optimizer != "sgd", "Nesterov momentum needs momentum > 0",
             f"pass {n('momentum')} 0.9 or drop {n('nesterov')}"),
            (self.weight_decay >= 0, f"{n('weight_decay')} {self.weight_decay} is negative", "pass e.g. 5e-4"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}"),
            (0 < self.pct_start < 1, f"pct_start {self.pct_start} is outside (0, 1)", "use e.g. 0.25"),
            (0 <= self.label_smoothing < 1, f"{n('label_smoothing')} {self.label_smoothing} is outside [0, 1)",
             "pass e.g. 0.1"),
        ]
        for ok, problem, fix in checks:
            if not ok:
                raise UserError(problem, fix)
        return self

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Rebuild from :func:`dataclasses.asdict` output (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """``config.optimizer`` (SGD or AdamW) with two parameter groups: weights with >= 2 dims get
    ``config.weight_decay``; BatchNorm parameters and biases (< 2 dims) get none. Frozen parameters are left
    out."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-iteration learning-rate schedule over ``config.epochs * steps_per_epoch`` steps, or None for
    ``"constant"``. Cosine: ``CosineAnnealingLR`` from ``lr`` to 0 (Loshchilov & Hutter 2017); one-cycle:
    ``OneCycleLR`` with peak ``lr`` (Smith & Topin 2019)."""
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total,
                                                   pct_start=config.pct_start)
    return None


def resumable_state(ckpt: dict, path: str | os.PathLike) -> dict:
    """The ``training_state`` of checkpoint ``ckpt`` (read from ``path``) that :func:`fit` resumes from.

    Raises:
        UserError: the checkpoint's training finished (its ``training_state`` is None): nothing to resume.
    """
    state = ckpt.get("training_state")
    if state is None:
        epochs = (ckpt.get("metrics") or {}).get("epochs")
        done = f" ({plural(epochs, 'epoch')})" if epochs is not None else ""
        raise UserError(f"{path} has finished training{done}; nothing to resume",
                        f"choose another --out to train anew, or evaluate it with `autocompress evaluate {path}`")
    return state


def batch_stream(loader: Iterable) -> Iterator:
    """The loader's batches, pass after pass, for ever (stops if a pass yields nothing)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *, task: Task | None = None,
                criterion: nn.Module | None = None, regularizer: Callable[[], torch.Tensor] | None = None,
                after_step: Callable[[], None] | None = None, distiller: Callable | None = None,
                teacher_cache: TeacherCache | None = None, stop_distilling: Callable[[int], bool] | None = None,
                progress: bool = True, desc: str = "") -> dict:
    """One training epoch in train mode (:func:`autocompress.analysis.train_mode`: frozen BatchNorm layers in eval).

    Args:
        loader: yields batches; by default ``(inputs [B, ...], labels int64 [B])``, any batch with a
            ``task`` that says how to run it. Batches move to the task's device (default: the model's); on
            the CPU they and the weights go channels-last where the task's model runs so and
            :func:`autocompress.task.channels_last_trains` allows it.
        scheduler: stepped after every optimiser step (per-iteration schedule).
        task: :class:`autocompress.task.Task` (forward / loss of a batch, device, autocast); default: the
            ``(inputs, labels)`` convention on the model's device.
        criterion: loss of the default convention (default ``nn.CrossEntropyLoss()``); a task's own
            ``loss_fn`` replaces it.
        regularizer: returns a scalar tensor added to the loss of each step (ADMM).
        after_step: called after every optimiser step (e.g. ``MaskEnforcer.after_step``).
        distiller: a :class:`autocompress.distillation.Distiller`; its mixed loss (teacher run on the same
            batch through the task's forward) replaces the data loss. With a task's ``loss_fn`` whose model
            output is not what the task's forward returns (a model of several heads and a ``forward_fn``
            picking one), the student's forward runs once more per step for the soft term.
        teacher_cache: a :class:`autocompress.distillation.TeacherCache` serving the teacher's outputs on
            inputs seen in earlier epochs of the phase; told when this epoch ends.
        stop_distilling: called with the step count (from 1) after every step trained with ``distiller``;
            True: the rest of the epoch trains on the data loss alone.
        progress: show a tqdm bar with running loss (and accuracy for ``(inputs, labels)`` batches).

    Returns:
        ``{"loss": mean data loss per batch item (the distiller's mixed loss when given), "top1": training
        accuracy in [0, 1] (None unless the default loss reads class scores ``[B, classes]`` against class
        indices or probabilities: :func:`_hits`), "images": count}``, plus
        ``"regularizer"`` (mean per step) when a regularizer is given and ``"distilled_steps"`` when
        ``stop_distilling`` ended distillation within the epoch.

    Raises:
        Diverged: the loss became NaN / infinite (learning rate too high). UserError: it is not a scalar.
    """
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    task = task if task is not None else Task(loader, device=model_device(model))
    scaler = torch.amp.GradScaler(task.device.type, enabled=task.amp == "fp16" and task.device.type == "cuda")
    train_mode(model)
    bar = tqdm(loader, desc=desc or "train", disable=not progress, leave=False, dynamic_ncols=True)
    total_loss, correct, seen, reg_total, steps, labelled = 0.0, 0, 0, 0.0, 0, True
    distilled_steps = None
    teacher = distiller.teacher if distiller is not None else None
    layout = task.layout and channels_last_trains(model)
    with channels_last(model, teacher, device=task.device, enabled=layout):  # restored even if a step raises
        for batch in bar:
            batch = move(batch, task.device, layout=layout)
            with task.autocast():
                if task.loss_fn is None:
                    output = task.forward(model, batch)
                    loss = criterion(output, task.targets(batch))
                else:
                    loss, output = task.loss(model, batch)
                if distiller is not None:
                    soft = distiller.teacher_output(task, batch, teacher_cache)
                    if task.loss_fn is not None and not distiller.comparable(soft, output):  # e.g. a tuple of heads
                        output = task.forward(model, batch)  # the forward's class scores, as the teacher's are
                    loss = distiller(soft, output, loss)
                objective = loss
                if regularizer is not None:
                    reg = regularizer()
                    objective = loss + reg
                    reg_total += float(reg.detach())
            check_loss(loss, finite=False)
            if not torch.isfinite(objective):
                raise Diverged(f"training loss became {float(objective.detach())} at step {steps + 1}",
                               "lower the learning rate (lr) or check the data")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step()
            steps += 1
            if distiller is not None and stop_distilling is not None and stop_distilling(steps):
                distiller = teacher_cache = None
                distilled_steps = steps
            n = _batch_items(batch)
            total_loss += float(loss.detach()) * n
            hits = _hits(output, task.targets(batch)) if labelled and task.loss_fn is None else None
            labelled = hits is not None
            if labelled:
                correct += hits
            seen += n
            if progress and (steps % 10 == 0 or steps == 1):
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", **({"acc": f"{100 * correct / seen:.2f}%"}
                                                                   if labelled else {}))
    bar.close()
    if teacher_cache is not None:
        teacher_cache.end_epoch()
    result = {"loss": total_loss / max(seen, 1), "top1": correct / max(seen, 1) if labelled else None,
              "images": seen}
    if regularizer is not None:
        result["regularizer"] = reg_total / max(steps, 1)
    if distilled_steps is not None:
        result["distilled_steps"] = distilled_steps
    return result


def _batch_items(batch) -> int:
    """Items in a batch: the leading size of its first tensor (1 when it holds none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        n = _batch_items(value)
        if n:
            return n
    return 1


def evaluate(model: nn.Module, loader: Iterable, *, progress: bool = False, desc: str = "eval") -> dict:
    """Loss and accuracy of ``model`` on ``loader`` under ``analysis_mode`` (eval mode, no grad; mode and
    BatchNorm buffers restored afterwards).

    Returns:
        ``{"loss": mean cross-entropy per image, "top1": fraction in [0, 1], "images": count}`` plus
        ``"top5"`` when the model has more than 10 outputs.
    """
    device = model_device(model)
    total_loss, correct1, correct5, seen, classes = 0.0, 0, 0, 0, 0
    batches = iter(tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True))
    first = next(batches, None)
    batches = itertools.chain([] if first is None else [first], batches)
    layout = first is None or channels_last_works(model, (first[0][:1],), device)
    with analysis_mode(model), channels_last(model, device=device, collectives=False, enabled=layout):
        for images, labels in batches:
            images, labels = move(images, device, layout=layout), labels.to(device)
            logits = model(images)
            classes = logits.shape[1]
            total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            top = logits.topk(min(5, classes), dim=1).indices
            hits = top == labels[:, None]
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(1).sum())
            seen += labels.numel()
    result = {"loss": total_loss / max(seen, 1), "top1": correct1 / max(seen, 1), "images": seen}
    if classes > 10:
        result["top5"] = correct5 / max(seen, 1)
    return result


def check_model_input(model: nn.Module, input_size: tuple[int, ...], num_classes: int, model_name: str,
                      dataset: str) -> None:
    """Dry forward of a batch of 2 zero inputs ``[2, *input_size]`` under ``analysis_mode``.

    Raises:
        UserError: the model cannot take inputs of that size, or does not output ``[2, num_classes]``.
    """
    size = "x".join(map(str, input_size))
    example = torch.zeros(2, *input_size, device=model_device(model))
    try:
        with analysis_mode(model):
            out = model(example)
    except RuntimeError as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"model {model_name} cannot take {dataset} inputs of size {size} ({detail})",
                        "choose a model made for this input size (see `autocompress inspect --list-models`)"
                        ) from exc
    if not isinstance(out, torch.Tensor):
        raise UserError(f"model {model_name} outputs a {type(out).__name__}, not one tensor of class scores "
                        f"(2, {num_classes}), for {dataset} inputs of size {size}",
                        "the command line scores one output of class scores; for a model of several outputs use "
                        "the library (autocompress.compress with forward_fn picking the class scores, or score_fn)")
    if tuple(out.shape) != (2, num_classes):
        raise UserError(f"model {model_name} outputs {tuple(out.shape)} for {dataset} inputs of size {size}, "
                        f"expected (2, {num_classes})", "build it with num_classes of the dataset")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the global torch RNG for the body (e.g. weight init, dropout) and restore the caller's RNG
    state afterwards (``torch.random.fork_rng``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _hits(output, targets) -> int | None:
    """Correct top-1 predictions of class scores ``[B, classes]`` against class indices ``[B]`` or class
    probabilities ``[B, classes]`` (their most probable class); None for anything else (dense outputs, a
    caller's targets)."""
    if not (isinstance(output, torch.Tensor) and output.dim() == 2 and isinstance(targets, torch.Tensor)):
        return None
    if targets.shape == output.shape[:1] and not targets.is_floating_point():
        return int((output.detach().argmax(1) == targets).sum())
    if targets.shape == output.shape and targets.is_floating_point():
        return int((output.detach().argmax(1) == targets.argmax(1)).sum())
    return None


def fit(model: nn.Module, splits, config: TrainConfig, *, checkpoint_path: str | os.PathLike | None = None,
        model_name: str | None = None, model_kwargs: dict | None = None, resume: bool = False,
        on_epoch_end: Callable[[int, dict], None] | None = None,
        regularizer: Callable[[], torch.Tensor] | None = None, after_step: Callable[[], None] | None = None,
        progress: bool = True) -> dict:
    """Train ``model`` on ``splits.train`` for ``config.epochs`` epochs, validating after each.

    Args:
        splits: a :class:`autocompress.data.DataSplits`.
        checkpoint_path: when set, a checkpoint (with ``training_state``) is written atomically after every
            epoch, and the final one (``training_state=None``) after the test evaluation. Needs
            ``model_name`` and ``model_kwargs``.
        resume: continue from the ``training_state`` in ``checkpoint_path`` (model weights, optimiser,
            schedule, epoch, RNG states); ``config`` must equal the stored one (device aside). The
            result equals an uninterrupted run.
        on_epoch_end: ``fn(epoch, record)`` after each epoch (1-based epoch; record as in ``history``).
        regularizer, after_step: passed to :func:`train_epoch`.

    Returns:
        metrics: ``{"epochs", "train_loss", "train_top1", "val_loss", "val_top1", "test_loss", "test_top1",
        ("test_top5"), "train_seconds", "epoch_seconds" (mean), "history": [per-epoch records]}``; val
        entries are None when the validation split is empty.

    Raises:
        UserError: bad config, nothing to resume, a config differing from the stored one, NaN loss.
    """
    from .checkpoint import load_checkpoint, save_checkpoint

    config.validate()
    if checkpoint_path is not None and model_name is None:
        raise ValueError("fit(checkpoint_path=...) needs model_name and model_kwargs")
    device = torch.device(config.device)
    model.to(device)
    data_rng = torch.Generator().manual_seed(config.seed)
    train_loader = splits.loader("train", config.batch_size, generator=data_rng)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history: list[dict] = []
    start_epoch, global_rng = 0, None
    if resume:
        ckpt = load_checkpoint(checkpoint_path)
        state = resumable_state(ckpt, checkpoint_path)
        stored = {k: v for k, v in ckpt["config"].items() if k != "device"}
        wanted = {k: v for k, v in dataclasses.asdict(config).items() if k != "device"}
        if stored != wanted:
            changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise UserError(f"cannot resume {checkpoint_path} with a different config ({', '.join(changed)})",
                            "resume with the stored settings (TrainConfig.from_dict(ckpt['config']))")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        data_rng.set_state(state["data_rng"])
        global_rng, start_epoch, history = state["torch_rng"], state["epoch"], list(state["history"])

    def checkpoint(metrics: dict, training_state: dict | None) -> None:
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, model=model, model_name=model_name, model_kwargs=model_kwargs or {},
                            dataset=splits.describe(), config=config, metrics=metrics,
                            training_state=training_state)

    eval_batch = max(256, config.batch_size)
    with seeded(config.seed):
        if global_rng is not None:
            torch.set_rng_state(global_rng)
        for epoch in range(start_epoch, config.epochs):
            began = time.perf_counter()
            train = train_epoch(model, train_loader, optimizer, scheduler, criterion=criterion,
                                regularizer=regularizer, after_step=after_step, progress=progress,
                                desc=f"epoch {epoch + 1}/{config.epochs}")
            seconds = time.perf_counter() - began
            val = evaluate(model, splits.loader("val", eval_batch)) if len(splits.val) else None
            record = {"epoch": epoch + 1, "train_loss": train["loss"], "train_top1": train["top1"],
                      "val_loss": val["loss"] if val else None, "val_top1": val["top1"] if val else None,
                      "seconds": seconds, "lr": optimizer.param_groups[0]["lr"]}
            history.append(record)
            checkpoint(_summary(history), {
                "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "data_rng": data_rng.get_state(), "torch_rng": torch.get_rng_state(), "history": history})
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
    test = evaluate(model, splits.loader("test", eval_batch), progress=progress, desc="test")
    metrics = _summary(history)
    metrics.update({f"test_{key}": value for key, value in test.items() if key != "images"})
    checkpoint(metrics, None)
    return metrics


def _summary(history: list[dict]) -> dict:
    last = history[-1] if history else {}
    seconds = [h["seconds"] for h in history]
    return {"epochs": len(history), "train_loss": last.get("train_loss"), "train_top1": last.get("train_top1"),
            "val_loss": last.get("val_loss"), "val_top1": last.get("val_top1"),
            "train_seconds": sum(seconds), "epoch_seconds": sum(seconds) / max(len(seconds), 1),
            "history": list(history)}


__all__ = ["FINE_TUNING_LR", "OPTIMIZERS", "OptimizerSettings", "SCHEDULES", "TrainConfig", "build_optimizer",
           "build_scheduler", "check_model_input", "evaluate", "fine_tuning_lr", "fit", "resumable_state", "seeded",
           "train_epoch"]
