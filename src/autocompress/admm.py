"""ADMM structured pruning, hard pruning and masked retraining.

Source: AutoCompress (Liu et al., AAAI 2020, §3) and the ADMM weight-pruning framework of Zhang et al.
(ECCV 2018); brief §3. The problem ``min f(W) s.t. W in S`` (``S``: at most the kept filters / columns /
weights of every unit, as given by the per-unit rates) is split with ``Z = W`` and a scaled dual ``U``:

* **W-step**: SGD on ``f(W) + rho/2 * sum_i ||W_i - Z_i + U_i||_F^2``;
* **Z-step**: ``Z = Proj_S(W + U)`` (:func:`autocompress.projection.project` applied to ``W + U``: keep the
  largest-norm filters / columns / weights, zero the rest);
* **U-step**: ``U = U + W - Z``.

Choices the paper leaves open (all settings of :class:`ADMMConfig`):

* The ADMM variables ``W_i`` are every parameter the masks touch (conv / linear weights and biases,
  BatchNorm affine of removed channels), so the whole removed structure is driven to zero, not just the
  convolution rows.
* One ``rho`` for all layers. It starts at ``rho_init`` and is multiplied by ``rho_growth`` after every
  Z/U update, capped at ``rho_max``; the scaled dual is rescaled by ``rho_old / rho_new`` when ``rho``
  changes (Boyd et al. 2011, §3.4.1), so the unscaled multiplier ``rho * U`` is unchanged.
* Z/U updates happen every ``update_interval`` optimiser steps, or at the end of every epoch when
  ``update_interval`` is ``None`` (the default). ``"auto"`` spaces them so that ``rho`` reaches ``rho_max``
  after :data:`RHO_RAMP_FRACTION` of the phase's steps, whatever the dataset size (our choice, for long
  phases where a fixed step count would reach the cap almost at once; on short phases of a few hundred
  steps it measured 4-7 points worse than a fixed 100 steps, BENCHMARKS.md "Peers and ablations").
* The penalty is one fused autograd node (:class:`_ProximalPenalty`): its forward computes
  ``W - (Z - U)`` with ``torch._foreach`` ops outside autograd and its backward returns
  ``rho * (W - Z + U)``, so a W-step costs one extra element-wise pass over the masked parameters, not a
  graph of hundreds of nodes (``benchmarks/admm_overhead.py`` measures the overhead).

After the last update, :func:`hard_prune` sets ``W = Proj_S(W)`` and :func:`masked_retrain` fine-tunes
with the masks held after every optimiser step (:class:`autocompress.masks.MaskEnforcer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from . import distributed, training
from .distillation import TeacherCache
from .epoch_checkpoint import EpochCheckpoint
from .errors import UserError
from .masks import MaskEnforcer, Masks, apply_masks
from .projection import project


#: ``update_interval="auto"``: fraction of the ADMM phase's optimiser steps after which rho reaches rho_max
RHO_RAMP_FRACTION = 0.5


@dataclass
class ADMMConfig:
    """Settings of ADMM structured pruning (AutoCompress §3; brief §3).

    Attributes:
        epochs: W-step epochs in total (passes over the training loader).
        lr: learning rate of the W-step (cosine-annealed over ``epochs``); None: the optimiser's fine-tuning rate
            (:data:`autocompress.training.FINE_TUNING_LR`).
        momentum: SGD momentum.
        weight_decay: L2 weight decay of the W-step.
        rho_init: penalty ``rho`` at the first W-step (brief: 1e-3 to 1e-4).
        rho_growth: ``rho`` is multiplied by this after every Z/U update (brief: ~1.5-2).
        rho_max: cap on ``rho``.
        update_interval: optimiser steps between Z/U updates; ``None`` = once at the end of every epoch;
            ``"auto"`` = :meth:`interval` for the loader's length.
        label_smoothing: label smoothing of the cross-entropy loss.
    """

    epochs: int = 10
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho_init: float = 1e-3
    rho_growth: float = 2.0
    rho_max: float = 1.0
    update_interval: int | str | None = None
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.epochs < 0:
            raise UserError(f"epochs={self.epochs} must be >= 0", "use 0 (one-shot projection) or more")
        if not (self.rho_init > 0 and self.rho_max >= self.rho_init and self.rho_growth >= 1.0):
            raise UserError(
                f"rho_init={self.rho_init}, rho_growth={self.rho_growth}, rho_max={self.rho_max} is not a valid "
                "rho schedule", "use 0 < rho_init <= rho_max and rho_growth >= 1")
        if not (self.update_interval in (None, "auto")
                or (isinstance(self.update_interval, int) and self.update_interval >= 1)):
            raise UserError(f"update_interval={self.update_interval!r} is not a number of steps >= 1",
                            "pass a positive number of optimiser steps, auto, or None for once per epoch")

    def interval(self, steps_per_epoch: int) -> int | None:
        """Optimiser steps between Z/U updates for a loader of ``steps_per_epoch`` batches: the set value
        (``None``: once per epoch), or for ``"auto"`` the spacing at which the ``n = ceil(log(rho_max /
        rho_init) / log(rho_growth))`` updates that bring rho to its cap end after ``RHO_RAMP_FRACTION`` of
        the ``epochs * steps_per_epoch`` steps (at least 1 step apart)."""
        if self.update_interval != "auto":
            return self.update_interval
        ramp = RHO_RAMP_FRACTION * self.epochs * steps_per_epoch
        if self.rho_growth <= 1.0 or self.rho_max <= self.rho_init:
            return max(1, int(ramp))
        updates = math.ceil(math.log(self.rho_max / self.rho_init) / math.log(self.rho_growth) - 1e-9)
        return max(1, int(ramp // updates))

    def train_config(self, names: Callable[[str], str] | None = None,
                     optimizer: str = "sgd") -> training.TrainConfig:
        """The W-step's settings with ``optimizer`` (:data:`autocompress.training.OPTIMIZERS`) as a
        :class:`autocompress.training.TrainConfig` (cosine schedule), validated; ``names`` names a bad value in the
        UserError (see ``TrainConfig.validate``)."""
        return training.TrainConfig(epochs=max(1, self.epochs), lr=training.fine_tuning_lr(self.lr, optimizer),
                                    optimizer=optimizer, momentum=self.momentum,
                                    nesterov=self.momentum > 0, weight_decay=self.weight_decay,
                                    label_smoothing=self.label_smoothing, schedule="cosine").validate(names=names)


@dataclass
class ADMMResult:
    """What :func:`admm_prune` returns.

    Attributes:
        masks: keep masks of ``Proj_S(W)`` for the trained ``W`` (what :func:`hard_prune` will apply).
        history: one entry per Z/U update: ``{"update": k, "epoch": e, "step": s, "rho": rho of the
            next W-step, "residuals": {layer: ||W - Z||_F / ||W||_F}, "residual": the same over all
            layers together, "max_residual": the largest layer's}``;
            entry 0 is the state before any W-step (``Z = Proj_S(W)``).
        epoch_stats: the dict :func:`autocompress.training.train_epoch` returned for every epoch.
    """

    masks: Masks
    history: list[dict] = field(default_factory=list)
    epoch_stats: list[dict] = field(default_factory=list)

    @property
    def residuals(self) -> list[dict[str, float]]:
        """Per-layer primal residuals ``||W - Z|| / ||W||`` after each update (``history[k]["residuals"]``)."""
        return [entry["residuals"] for entry in self.history]


class _ProximalPenalty(torch.autograd.Function):
    """``rho/2 * sum_i ||W_i - T_i||_F^2`` with ``T = Z - U``, as one autograd node.

    ``forward(rho, targets, *weights)`` -> scalar; ``backward`` -> ``rho * (W_i - T_i)`` for each weight.
    """

    @staticmethod
    def forward(ctx, rho: float, targets: list[torch.Tensor], *weights: torch.Tensor):
        diffs = torch._foreach_sub(list(weights), targets)
        norms = torch._foreach_norm(diffs)
        ctx.rho = rho
        ctx.diffs = diffs
        return 0.5 * rho * torch.stack(norms).square().sum()

    @staticmethod
    def backward(ctx, grad_output):
        grads = torch._foreach_mul(ctx.diffs, grad_output * ctx.rho)
        ctx.diffs = None
        return (None, None, *grads)


class ADMMState:
    """Z, U and rho of ADMM over the parameters named in ``param_masks`` (AutoCompress §3).

    Args:
        model: the network being pruned (its parameters are the ``W_i``).
        space: the :class:`autocompress.space.PruningSpace` of ``model``.
        rates: per-unit pruning rates, ``{"filter": {group: r}, "column": {layer: r}, "irregular": {...}}``.
        config: the rho schedule.

    Attributes:
        names: ADMM parameter names (those the projection masks), in model order.
        rho: the current penalty.
    """

    def __init__(self, model: nn.Module, space, rates: dict, config: ADMMConfig):
        self.model, self.space, self.rates, self.config = model, space, rates, config
        params = dict(model.named_parameters())
        masks = project(space, model, rates)
        param_masks = space.param_masks(masks)
        self.names = [name for name in params if name in param_masks]
        self.weights = [params[name] for name in self.names]
        self.rho = config.rho_init
        with torch.no_grad():
            self.z = [w.detach() * param_masks[n].to(w.device, w.dtype) for n, w in zip(self.names, self.weights)]
            self.u = [torch.zeros_like(w) for w in self.weights]
        self._refresh_targets()

    def _refresh_targets(self) -> None:
        self.targets = torch._foreach_sub(self.z, self.u)

    def load(self, z: list[torch.Tensor], u: list[torch.Tensor], rho: float) -> None:
        """Continue from stored ``z``, ``u`` (aligned with :attr:`names`) and ``rho``."""
        self.z = [t.to(w.device, w.dtype) for t, w in zip(z, self.weights)]
        self.u = [t.to(w.device, w.dtype) for t, w in zip(u, self.weights)]
        self.rho = rho
        self._refresh_targets()

    def penalty(self) -> torch.Tensor:
        """``rho/2 * sum_i ||W_i - Z_i + U_i||_F^2`` (a scalar tensor with gradient to every ``W_i``)."""
        return _ProximalPenalty.apply(self.rho, self.targets, *self.weights)

    @torch.no_grad()
    def project(self, tensors: list[torch.Tensor]) -> tuple[Masks, list[torch.Tensor]]:
        """``Proj_S`` of ``tensors`` (aligned with :attr:`names`): the keep masks and the projected tensors.

        The projection is :func:`autocompress.projection.project` run on the model with its ADMM
        parameters temporarily replaced by ``tensors`` (restored afterwards, even on error).
        """
        saved = [w.detach().clone() for w in self.weights]
        try:
            torch._foreach_copy_([w.data for w in self.weights], tensors)
            masks = project(self.space, self.model, self.rates)
        finally:
            torch._foreach_copy_([w.data for w in self.weights], saved)
        param_masks = self.space.param_masks(masks)
        projected = [t * param_masks[n].to(t.device, t.dtype) for n, t in zip(self.names, tensors)]
        return masks, projected

    @torch.no_grad()
    def update(self) -> None:
        """One Z-step and U-step, then the rho schedule (rescaling the scaled dual ``U``); under
        ``torch.distributed`` Z and U are rank 0's on every rank afterwards."""
        w = [p.detach() for p in self.weights]
        _, self.z = self.project(torch._foreach_add(w, self.u))
        torch._foreach_add_(self.u, torch._foreach_sub(w, self.z))
        new_rho = min(self.rho * self.config.rho_growth, self.config.rho_max)
        torch._foreach_mul_(self.u, self.rho / new_rho)
        self.rho = new_rho
        distributed.sync_tensors(self.z + self.u)  # several processes: rank 0's Z and U on every rank
        self._refresh_targets()

    @torch.no_grad()
    def residuals(self) -> tuple[dict[str, float], float]:
        """Primal residuals ``||W - Z||_F / ||W||_F``: per layer (owning module of the parameters) and over
        all ADMM parameters together (0 where ``W = 0``)."""
        diff = torch._foreach_norm(torch._foreach_sub([p.detach() for p in self.weights], self.z))
        norm = torch._foreach_norm([p.detach() for p in self.weights])
        sums: dict[str, list[float]] = {}
        for name, d, n in zip(self.names, diff, norm):
            acc = sums.setdefault(name.rpartition(".")[0], [0.0, 0.0])
            acc[0] += float(d) ** 2
            acc[1] += float(n) ** 2
        total_d, total_n = sum(d for d, _ in sums.values()), sum(n for _, n in sums.values())
        per_layer = {layer: _ratio(d, n) for layer, (d, n) in sums.items()}
        return per_layer, _ratio(total_d, total_n)


def _ratio(squared_diff: float, squared_norm: float) -> float:
    return math.sqrt(squared_diff / squared_norm) if squared_norm > 0 else 0.0


class ADMMSchedule:
    """The Z/U updates and rho schedule of one ADMM phase, driven by optimiser steps (AutoCompress §3).

    Call :meth:`after_step` after every optimiser step (or :meth:`attach` an optimiser) and
    :meth:`end_epoch` after every epoch; the W-step's loss adds :meth:`penalty`.

    Args:
        model, space, rates, config: as :func:`admm_prune`.
        steps_per_epoch: optimiser steps per epoch (the training loader's length), for
            ``update_interval`` ``"auto"``; with ``per_epoch=False`` also the interval that replaces
            ``None`` (a caller's own loop does not report its epochs).
        log: called with one line per Z/U update.
    """

    def __init__(self, model: nn.Module, space, rates: dict, config: ADMMConfig, *, steps_per_epoch: int,
                 per_epoch: bool = True, log: Callable[[str], None] | None = None):
        self.state = ADMMState(model, space, rates, config)
        self.space, self.rates, self.log = space, rates, log
        self.interval = config.interval(steps_per_epoch)
        self.per_epoch = per_epoch and self.interval is None
        if self.interval is None and not per_epoch:
            self.interval = max(1, steps_per_epoch)
        self.history: list[dict] = []
        self.steps = self.epoch = 0
        self._record()

    def penalty(self) -> torch.Tensor:
        """``rho/2 * sum_i ||W_i - Z_i + U_i||_F^2`` (add it to the W-step's loss)."""
        return self.state.penalty()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`after_step` after every ``optimizer.step()``; returns the hook handle."""
        return optimizer.register_step_post_hook(lambda *_: self.after_step())

    def after_step(self) -> None:
        """Count one optimiser step; Z-step, U-step and rho update every ``interval`` steps."""
        self.steps += 1
        if self.interval is not None and not self.per_epoch and self.steps % self.interval == 0:
            self._update()

    def end_epoch(self) -> None:
        """Count one epoch; with ``update_interval`` None the updates happen here."""
        if self.per_epoch:
            self._update()
        self.epoch += 1

    def state_dict(self) -> dict:
        """Z, U, rho, the step and epoch counters and the residual history (for an epoch checkpoint)."""
        return {"z": self.state.z, "u": self.state.u, "rho": self.state.rho, "steps": self.steps,
                "epoch": self.epoch, "history": self.history}

    def load_state_dict(self, saved: dict) -> None:
        """Continue from :meth:`state_dict`'s ``saved`` (the weights ``W`` are the model's business)."""
        self.state.load(saved["z"], saved["u"], saved["rho"])
        self.steps, self.epoch, self.history = saved["steps"], saved["epoch"], list(saved["history"])

    def result(self, model: nn.Module) -> ADMMResult:
        """The masks of ``Proj_S(W)`` now and the residual history."""
        return ADMMResult(masks=project(self.space, model, self.rates), history=self.history)

    def _update(self) -> None:
        self.state.update()
        self._record()

    def _record(self) -> None:
        residuals, total = self.state.residuals()
        entry = {"update": len(self.history), "epoch": self.epoch, "step": self.steps, "rho": self.state.rho,
                 "residuals": residuals, "residual": total, "max_residual": max(residuals.values(), default=0.0)}
        self.history.append(entry)
        if self.log is not None and entry["update"] > 0:
            self.log(f"ADMM update {entry['update']} (epoch {self.epoch + 1}, step {self.steps}): primal "
                     f"residual {total:.4f} (largest layer {entry['max_residual']:.4f}); rho now {self.state.rho:.3g}")


def admm_prune(model: nn.Module, space, rates: dict, train_loader: Iterable, config: ADMMConfig, *,
               task=None, distiller: Callable | None = None, progress: bool = True,
               log: Callable[[str], None] | None = None, runner: nn.Module | None = None,
               checkpoint: EpochCheckpoint | None = None, optimizer_name: str = "sgd") -> ADMMResult:
    """ADMM structured pruning of ``model`` in place towards ``rates`` (AutoCompress, Liu et al. AAAI 2020,
    §3; Zhang et al. ECCV 2018).

    Runs ``config.epochs`` W-step epochs of ``optimizer_name`` (SGD or AdamW) on
    ``loss + rho/2 * sum ||W - Z + U||^2`` through :func:`autocompress.training.train_epoch`, with a Z-step
    (``Z = Proj_S(W + U)``), U-step (``U += W - Z``) and rho update every ``config.update_interval`` steps (or
    every epoch) (:class:`ADMMSchedule`). The weights are not hard-pruned here: call :func:`hard_prune` afterwards.

    Args:
        model: network in training mode or not (restored to training mode for the W-steps).
        space: :class:`autocompress.space.PruningSpace` of ``model``.
        rates: ``{"filter": {group: r}, "column": {layer: r}, "irregular": {layer: r}}``, each ``r`` in ``[0, 1)``.
        train_loader: iterable of batches (``(inputs, labels)`` unless ``task`` says otherwise).
        config: :class:`ADMMConfig`.
        task: :class:`autocompress.task.Task` running a batch (forward, loss, device, autocast); default the
            ``(inputs, labels)`` convention with cross-entropy.
        distiller: optional :class:`autocompress.distillation.Distiller`; its loss replaces the data loss of
            the W-step (the ADMM penalty is added to it).
        progress: show tqdm progress bars in :func:`train_epoch`.
        log: called with one line per Z/U update (rho and the largest / mean primal residual).
        runner: the module the W-steps run (``model`` wrapped in ``DistributedDataParallel``, sharing its
            parameters: :func:`autocompress.distributed.data_parallel`); default ``model``.
        checkpoint: an :class:`autocompress.epoch_checkpoint.EpochCheckpoint`: the state after every epoch
            is saved to it (weights, optimiser, schedule, Z / U / rho / counters / history, random state),
            and a stored state is continued from its next epoch.
        optimizer_name: the W-step's optimiser, one of :data:`autocompress.training.OPTIMIZERS`.

    Returns:
        :class:`ADMMResult` with the masks of ``Proj_S(W)`` and the residual history.
    """
    schedule = ADMMSchedule(model, space, rates, config, log=log,
                            steps_per_epoch=len(train_loader) if config.epochs > 0 else 1)
    epoch_stats: list[dict] = []
    if config.epochs > 0:
        train_config = config.train_config(optimizer=optimizer_name)
        optimizer = training.build_optimizer(model, train_config)
        scheduler = training.build_scheduler(optimizer, train_config, len(train_loader))
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        start, loop = checkpoint.resume(model, optimizer, scheduler, config.epochs) if checkpoint else (0, {})
        if loop:
            schedule.load_state_dict(loop["admm"])
            epoch_stats = list(loop["epoch_stats"])
        cache = _teacher_cache(distiller, loop)
        for epoch in range(start, config.epochs):
            epoch_stats.append(training.train_epoch(
                model if runner is None else runner, train_loader, optimizer, scheduler, task=task,
                criterion=criterion, regularizer=schedule.penalty, after_step=schedule.after_step,
                distiller=distiller, teacher_cache=cache, progress=progress,
                desc=f"ADMM epoch {epoch + 1}/{config.epochs}"))
            schedule.end_epoch()
            if checkpoint is not None:
                checkpoint.save(epoch + 1, config.epochs, model, optimizer, scheduler,
                                {"admm": schedule.state_dict(), "epoch_stats": epoch_stats,
                                 **_cache_state(cache)})
    result = schedule.result(model)
    result.epoch_stats = epoch_stats
    return result


def hard_prune(model: nn.Module, space, rates: dict) -> tuple[Masks, dict[str, torch.Tensor]]:
    """Hard pruning ``W = Proj_S(W)`` in place (brief §3, after the last ADMM update).

    Returns:
        ``(masks, param_masks)``: the unit keep masks and their per-parameter expansion (bool, shaped like
        each parameter), both True = kept.
    """
    masks = project(space, model, rates)
    param_masks = space.param_masks(masks)
    apply_masks(model, param_masks)
    return masks, param_masks


def masked_retrain(model: nn.Module, param_masks: dict[str, torch.Tensor], train_loader: Iterable,
                   config: training.TrainConfig, *, task=None, distiller: Callable | None = None,
                   progress: bool = True, log: Callable[[str], None] | None = None,
                   runner: nn.Module | None = None, checkpoint: EpochCheckpoint | None = None,
                   release: Callable[[nn.Module, dict, str], bool] | None = None) -> list[dict]:
    """Masked retraining (AutoCompress §3): fine-tune ``model`` in place with the pruned entries held at zero
    through every optimiser step (weights, biases, BatchNorm affine; momentum / Adam state of pruned entries
    cleared) by :class:`autocompress.masks.MaskEnforcer` hooked on the optimiser.

    Args:
        model: the model to fine-tune (masked entries are zeroed first).
        param_masks: ``{parameter name: bool tensor shaped like it}``, True = kept.
        train_loader: training batches (``(inputs, labels)`` unless ``task`` says otherwise).
        config: a :class:`autocompress.training.TrainConfig` (epochs, lr, momentum, weight decay, schedule,
            label smoothing; batch size and seed are the loader's business). ``epochs == 0`` only applies
            the masks.
        task: :class:`autocompress.task.Task` running a batch (see :func:`admm_prune`).
        distiller: optional :class:`autocompress.distillation.Distiller` (its loss replaces the data loss).
        progress: tqdm progress bars.
        log: called with one line per epoch.
        runner: the module the steps run (see :func:`admm_prune`); default ``model``.
        checkpoint: an :class:`autocompress.epoch_checkpoint.EpochCheckpoint` saved after every epoch and
            continued from (see :func:`admm_prune`).
        release: called with ``model``, the epoch's stats and when it runs (``"after epoch 1/3"``, ``"at step
            25/100 of epoch 1"``) after every epoch trained with ``distiller`` but the last, and after each of
            :data:`EARLY_TESTS` of the first epoch (it may add fields to the stats, e.g. the validation score it
            measured); True: the rest trains on the data loss alone (the decision
            is kept in the epoch checkpoint; the epoch's stats then give ``distilled_steps``).

    Returns:
        The per-epoch stats of :func:`autocompress.training.train_epoch`, each with ``"distilled"`` (bool: the
        epoch began with distillation).
    """
    apply_masks(model, param_masks)
    if config.epochs <= 0:
        return []
    optimizer = training.build_optimizer(model, config)
    scheduler = training.build_scheduler(optimizer, config, len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    enforcer = MaskEnforcer(model, param_masks).attach(optimizer)
    start, loop = checkpoint.resume(model, optimizer, scheduler, config.epochs) if checkpoint else (0, {})
    history = list(loop.get("history", []))
    if not loop.get("distilling", True):
        distiller = None
    cache = _teacher_cache(distiller, loop)
    try:
        for epoch in range(start, config.epochs):
            probe: dict = {}  # what a test within the first epoch measured
            early = _early_release(release, model, probe, len(train_loader)) if epoch == 0 else None
            stats = dict(training.train_epoch(model if runner is None else runner, train_loader, optimizer,
                                              scheduler, task=task, criterion=criterion, distiller=distiller,
                                              teacher_cache=cache, stop_distilling=early, progress=progress,
                                              desc=f"retrain epoch {epoch + 1}/{config.epochs}"),
                         distilled=distiller is not None)
            name = "distilled train loss" if distiller is not None else "train loss"
            if "distilled_steps" in stats:
                stats.update(probe)
                distiller = cache = None
                name = f"train loss (distilled in its first {stats['distilled_steps']} steps)"
            history.append(stats)
            if log is not None:
                top1 = "" if stats["top1"] is None else f", train top-1 {100 * stats['top1']:.2f}%"
                log(f"retrain epoch {epoch + 1}/{config.epochs}: {name} {stats['loss']:.4f}{top1}")
            if distiller is not None and release is not None and epoch + 1 < config.epochs \
                    and release(model, stats, f"after epoch {epoch + 1}/{config.epochs}"):
                distiller = cache = None
            if checkpoint is not None:
                checkpoint.save(epoch + 1, config.epochs, model, optimizer, scheduler,
                                {"history": history, "distilling": distiller is not None, **_cache_state(cache)})
    finally:
        enforcer.detach()
    return history


#: fractions of the first retraining epoch after which distillation's release test also runs (an under-trained
#: base is often passed within the first epoch; a test costs one validation pass)
EARLY_TESTS = (0.25, 0.5, 0.75)


def _early_release(release: Callable[[nn.Module, dict, str], bool] | None, model: nn.Module, probe: dict,
                   steps: int) -> Callable[[int], bool] | None:
    """``stop_distilling(step)`` for the first retraining epoch of ``steps`` steps: ``release`` at each of
    :data:`EARLY_TESTS` (what it measures goes to ``probe``); None without a release test."""
    if release is None:
        return None
    at = {round(fraction * steps) for fraction in EARLY_TESTS} - {0, steps}

    def stop(step: int) -> bool:
        if step not in at:
            return False
        probe.clear()
        return release(model, probe, f"at step {step}/{steps} of epoch 1")

    return stop


def _teacher_cache(distiller, loop: dict) -> TeacherCache | None:
    """The phase's cache of teacher outputs (continued from an epoch checkpoint's ``loop`` state), or None
    without a distiller."""
    return TeacherCache(state=loop.get("teacher_cache")) if distiller is not None else None


def _cache_state(cache: TeacherCache | None) -> dict:
    """The cache's part of an epoch checkpoint's loop state."""
    return {} if cache is None else {"teacher_cache": cache.state_dict()}
