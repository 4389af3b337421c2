"""Choosing the default loop's optimiser for a pruned classifier by a short probe (beyond the paper).

AutoCompress (Liu et al., AAAI 2020) retrains with one fixed optimiser. Which of SGD (momentum, lr 0.01) and
AdamW (lr 0.001) recovers a hard-pruned network better depends on the network and on how its weights were
trained, and no rule read from the task found it: at ``flops=2x`` in 3 epochs AdamW retrained three of four
AdamW-trained CIFAR-10 classifiers 0.25-1.1 points better, SGD an SGD-trained Fashion-MNIST CNN 0.35 points
better and the same CNN AdamW-trained as well as AdamW (BENCHMARKS.md, sessions 35-36; 0.8-1.5 points better in
session 29, before the channel scoring changed). The probe trains two copies of the pruned model for the same
few batches, one per optimiser, each with a cosine schedule from its fine-tuning rate to zero (a retraining in
miniature), then compares their data loss on the training batches that follow (held out from both). The lower
loss wins where the two lie apart; where they lie close (:data:`AMBIGUOUS`), both are probed again over more steps
(:data:`LONG_PROBE_STEPS`), whose lower loss decides.

The same probe chooses where a round without a search starts (``search.start: auto``, :func:`choose_start`): the
guided start (rates that follow the guidance) or the magnitude start (one global threshold on relative channel
magnitudes), by the loss each start's pruned model reaches with one optimiser. On a fresh user's token
transformer the guided start halved the token stream and kept every MLP whole (26 % top-1 once hard-pruned, 75.06 %
after 3 epochs), the magnitude start did the opposite (56 %, 78.44 %), and the probe's losses were 0.997 and 0.627
(BENCHMARKS.md, session 39).
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .distillation import Distiller
from .masks import MaskEnforcer
from .padded_norm import PaddedLayerNorm
from .task import Task, move
from .training import (FINE_TUNING_LR, OPTIMIZERS, Diverged, TrainConfig, batch_stream, build_optimizer,
                       build_scheduler, train_epoch)

#: optimiser steps each copy trains, and training batches after them on which the copies' losses are compared
PROBE_STEPS = 40
HELD_OUT_BATCHES = 20
#: a run training fewer optimiser steps in all does not probe its optimiser (:func:`unprobed_choice`). The probe
#: (two copies x PROBE_STEPS steps with the teacher's forwards, 2 x HELD_OUT_BATCHES evaluations) takes about as
#: long as 140 retraining steps (CIFAR-10 VGG, 1 thread: 11-17 s against 44-52 s for 471 steps): 88 % of a 160-step
#: run's training, 59 % of a 237-step one's. At 237-314 steps it chose the optimiser that retrained better (or one
#: within 0.1 point) in 17 of 20 runs on eight CIFAR-10 and two Fashion-MNIST CNNs, +0.30 points on average over
#: SGD alone (AdamW up to 1.3 better, SGD up to 0.85); probes of 10 and 20 steps chose so in 15 of 20 (+0.26,
#: +0.16; BENCHMARKS.md, session 47)
MIN_TRAINING_STEPS = 4 * PROBE_STEPS
#: a run training fewer optimiser steps in all does not probe its start below a :data:`DEEP_TARGET`
#: (:func:`start_probe_steps`; :func:`unprobed_start`): the start probe trains three copies (one per start, then
#: the other optimiser on the chosen one)
MIN_START_PROBE_STEPS = 8 * PROBE_STEPS
#: the magnitude start is chosen only when its held-out loss is lower than the guided start's by more than this
#: fraction of it (:func:`choose_start`). The probe's own spread: the same probe from two seeds moved the
#: optimisers' loss difference by ~1 % of it (BENCHMARKS.md, session 36; until session 56 SGD too needed a lead of
#: 1 % over AdamW, now settled by :data:`AMBIGUOUS`)
TIE = 0.01
#: a probe of :data:`PROBE_STEPS` whose SGD and AdamW losses lie within this fraction of AdamW's is ambiguous: both
#: are probed again at :data:`LONG_PROBE_STEPS`, whose lower loss decides. In that band the 40-step probe read the
#: better optimiser wrongly on two of three CIFAR-10 nets at flops=2x with 314 optimiser steps (BENCHMARKS.md,
#: session 56): SGD 1.3-1.6 % lower on a VGG- and a ConvNeXt-style net, where AdamW retrained 0.56-0.79 points
#: better, and rightly 1.2-1.4 % lower on a MobileNet-style net, where SGD retrained 0.90-1.38 better; at 160 steps
#: all six runs read the better one (at 80 steps four, at 120 not the ConvNeXt's)
AMBIGUOUS = 0.025
#: the longer probe's steps per optimiser: at most twice a probed run's own steps (:data:`MIN_TRAINING_STEPS`); a
#: 314-step run's time about doubles where it probes again
LONG_PROBE_STEPS = 160


def _layer_normed(model: nn.Module) -> bool:
    """Whether ``model`` has a LayerNorm (a transformer's or a ConvNeXt's normalisation)."""
    return any(isinstance(m, (nn.LayerNorm, PaddedLayerNorm)) for m in model.modules())


def unprobed_choice(model: nn.Module) -> tuple[str, str]:
    """The optimiser of a run too short to probe (:data:`MIN_TRAINING_STEPS`) and why: AdamW for a model with a
    LayerNorm (a transformer's or a ConvNeXt's normalisation, trained with AdamW by their recipes), else SGD (the
    rule before the probe). Measured at ``flops=2x`` with 279-314 optimiser steps (BENCHMARKS.md, session 38):
    AdamW retrained two ViTs 0.5 and 1.1 points better and a ConvNeXt 0.16 better."""
    if _layer_normed(model):
        return "adamw", "the model has LayerNorms, whose networks train with AdamW"
    return "sgd", "SGD for a network without LayerNorms"


#: from this round target on (its reduction factor) a run probes its start from :data:`MIN_TRAINING_STEPS` steps
#: (:func:`start_probe_steps`)
DEEP_TARGET = 4.0


def start_probe_steps(factor: float | None) -> int:
    """The fewest optimiser steps with which a run probes its start (:func:`choose_start`) for a round reducing its
    model ``factor`` times: :data:`MIN_START_PROBE_STEPS`, and at a :data:`DEEP_TARGET` or deeper
    :data:`MIN_TRAINING_STEPS` (as the optimiser), where the better start depends on the network and on its
    trained weights by 1-5 points of top-1 either way: at flops=4x with 314 steps the guided start retrained 1.14,
    1.25 and 1.9 points better on three MobileNet-style CIFAR-10 nets (session 50), the magnitude start 1.73 and
    1.96 better on a residual CNN and 4.58 better on one of those MobileNet-style nets trained again (session 51;
    BENCHMARKS.md), and the probe chose the better one in each run measured, for about a quarter more run time.
    Below a deep target the magnitude start retrained as well or better on every network measured
    (:func:`unprobed_start`), so a short run saves the probe there."""
    return MIN_TRAINING_STEPS if factor is not None and factor >= DEEP_TARGET else MIN_START_PROBE_STEPS


def unprobed_start() -> tuple[str, str]:
    """The start of a run too short to probe it (:func:`start_probe_steps`), and why: the magnitude start (one
    global threshold), which retrained as well as the guided one or better on every network measured unprobed at
    flops=2x: two token transformers +1.9 and +1.1 points (282 steps, three seeds each; BENCHMARKS.md, session 41),
    a torchvision resnet18 +1.33 and regnet_x_400mf +0.63 (three seeds each), two small CIFAR-10 CNNs +0.10 and 0.00
    (two seeds each; session 44); at flops=3x +1.35 on a MobileNetV3-style CIFAR-10 net (two seeds; session 50) and
    +0.44 on a residual CNN (two seeds; session 51). At flops=4x it lost 1.1-1.9 points on three nets and won 1.7-4.6
    on two (sessions 50, 51), where the guided start lost more when it lost."""
    return "magnitude", ("the magnitude start, which retrained as well as the guided one or better at flops=2x and "
                         "3x on every network measured unprobed, and lost less than it where it lost at 4x")


@dataclass(frozen=True)
class ProbeResult:
    """The probe's outcome: ``choice`` (one of :data:`autocompress.training.OPTIMIZERS`), ``losses`` (optimiser
    -> mean data loss per held-out batch; ``inf`` where training diverged), ``steps`` and ``held_out`` (batches
    trained and compared)."""

    choice: str
    losses: dict[str, float]
    steps: int
    held_out: int
    long: dict[str, float] | None = None

    def record(self) -> dict:
        """The probe as a metrics record (``metrics.jsonl``); ``long_held_out_loss`` and ``long_steps`` where the
        probe ran again at :data:`LONG_PROBE_STEPS`."""
        longer = {} if self.long is None else {"long_held_out_loss": self.long, "long_steps": LONG_PROBE_STEPS}
        return {"event": "optimizer", "choice": self.choice, "probe": {
            "held_out_loss": self.losses, "steps": self.steps, "held_out_batches": self.held_out, **longer}}

    def describe(self) -> str:
        """One log line: the choice and the losses it was made on."""
        longer = "" if self.long is None else (
            f"; within {AMBIGUOUS:.1%} of each other, so probed again at {LONG_PROBE_STEPS} steps: "
            f"{_shown(self.long)}")
        return (f"retrain.optimizer auto: {self.choice} (a probe of {self.steps} steps per optimiser from the "
                f"pruned model; data loss on the next {self.held_out} training batches: {_shown(self.losses)}"
                f"{longer})")


def _shown(losses: dict[str, float]) -> str:
    return ", ".join(f"{name} {loss:.4g}" for name, loss in losses.items())


def ambiguous(losses: dict[str, float]) -> bool:
    """Whether the SGD and AdamW losses of a probe are finite and within :data:`AMBIGUOUS` of AdamW's."""
    sgd, adamw = losses["sgd"], losses["adamw"]
    return math.isfinite(sgd) and math.isfinite(adamw) and abs(sgd - adamw) < AMBIGUOUS * adamw


def settle(losses: dict[str, float], long_probe: Callable[[], dict[str, float]], *, steps: int = PROBE_STEPS,
           held_out: int = HELD_OUT_BATCHES) -> ProbeResult:
    """The optimiser whose loss is lower (:func:`choose_optimizer`) in ``losses`` (a probe of ``steps``); where
    they are :func:`ambiguous`, in ``long_probe()`` (the losses of a probe at :data:`LONG_PROBE_STEPS`; no tie band
    there: a MobileNet-style net's SGD, 0.87 % lower at 160 steps, retrained 1.42 points better than AdamW, and the
    lower loss at 160 steps was the better optimiser in all seven runs measured, BENCHMARKS.md, session 56)."""
    long = long_probe() if ambiguous(losses) else None
    return ProbeResult(choice=choose_optimizer(long or losses), losses=losses, steps=steps, held_out=held_out,
                       long=long)


def probe_optimizers(model: nn.Module, param_masks: dict[str, torch.Tensor], task: Task, *,
                     settings: TrainConfig, distiller: Distiller | None = None,
                     same_batches: Callable[[], object], steps: int = PROBE_STEPS,
                     held_out: int = HELD_OUT_BATCHES) -> ProbeResult:
    """Train a copy of ``model`` per optimiser for ``steps`` training batches and compare their data loss on the
    next ``held_out`` batches of ``task.train_loader`` (:func:`probe_losses`); where the two losses are
    :func:`ambiguous`, again for :data:`LONG_PROBE_STEPS` batches.

    Returns:
        :class:`ProbeResult`: SGD where its loss (the longer probe's, where it ran) is below AdamW's, else AdamW
        (:func:`settle`).

    Raises:
        UserError: as :func:`probe_losses`.
    """
    def probed(count: int) -> dict[str, float]:
        return probe_losses(model, param_masks, task, settings=settings, distiller=distiller,
                            same_batches=same_batches, steps=count, held_out=held_out)

    return settle(probed(steps), lambda: probed(LONG_PROBE_STEPS), steps=steps, held_out=held_out)


def choose_optimizer(losses: dict[str, float]) -> str:
    """SGD where its held-out loss is below AdamW's, else AdamW (also where both diverged)."""
    return "sgd" if losses["sgd"] < losses["adamw"] else "adamw"


def choose_start(losses: dict[str, dict[str, float]]) -> str:
    """``"magnitude"`` where the magnitude start's best held-out loss (over the optimisers probed) is more than
    :data:`TIE` below the guided start's, else ``"guided"`` (the start measured better on convolutional networks,
    BENCHMARKS.md, sessions 27 and 37). ``losses``: start -> optimiser -> loss (:func:`probe_losses`)."""
    best = {start: min(by_optimizer.values()) for start, by_optimizer in losses.items()}
    return "magnitude" if "magnitude" in best and best["magnitude"] < (1 - TIE) * best["guided"] else "guided"


def probe_losses(model: nn.Module, param_masks: dict[str, torch.Tensor], task: Task, *,
                 settings: TrainConfig, optimizers: tuple[str, ...] = OPTIMIZERS, distiller: Distiller | None = None,
                 same_batches: Callable[[], object], steps: int = PROBE_STEPS,
                 held_out: int = HELD_OUT_BATCHES) -> dict[str, float]:
    """The data loss per held-out batch of a copy of ``model`` trained ``steps`` batches by each of ``optimizers``.

    Args:
        model: the hard-pruned model (not modified); param_masks: parameter name -> BoolTensor (True = kept),
            kept zero in each copy (:class:`autocompress.masks.MaskEnforcer`).
        task: the run's task (loss, forward, device; batches from ``task.train_loader``).
        settings: momentum, Nesterov, weight decay and label smoothing of the retraining (``optimizer`` and ``lr``
            are the probe's: each optimiser at its :data:`autocompress.training.FINE_TUNING_LR`, cosine to zero
            over ``steps``).
        optimizers: names of :data:`autocompress.training.OPTIMIZERS` to train with.
        distiller: the run's distillation loss, trained with as the retraining will; the comparison is on the
            data loss alone.
        same_batches: a context manager factory (``task.seeded(seed)``) entered around each copy's pass so that
            every copy sees the same batches in the same order.
        steps, held_out: batches trained and compared (both >= 1).

    Returns:
        optimiser -> mean data loss per held-out batch (``inf`` where the loss became NaN or infinite).

    Raises:
        UserError: the loss is not a scalar tensor (as the retraining would raise).
    """
    losses = {}
    for name in optimizers:
        config = TrainConfig(**{**vars(settings), "optimizer": name, "lr": FINE_TUNING_LR[name], "epochs": 1})
        with same_batches():
            losses[name] = _trained_loss(copy.deepcopy(model), param_masks, task, config, distiller, steps, held_out)
    return losses


def _trained_loss(model: nn.Module, param_masks: dict[str, torch.Tensor], task: Task, config: TrainConfig,
                  distiller: Distiller | None, steps: int, held_out: int) -> float:
    """Mean data loss per batch of ``model`` on the ``held_out`` training batches after ``steps`` steps of
    ``config``'s optimiser (``inf`` when the loss became NaN or infinite)."""
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps)
    MaskEnforcer(model, param_masks).attach(optimizer)
    batches = batch_stream(task.train_loader)  # a loader shorter than the probe is read again
    try:
        train_epoch(model, itertools.islice(batches, steps), optimizer, scheduler, task=task, distiller=distiller,
                    criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), progress=False)
    except Diverged:
        return math.inf
    model.eval()
    total = 0.0
    with torch.no_grad():
        for batch in itertools.islice(batches, held_out):
            loss, _ = task.loss(model, move(batch, task.device, layout=False))
            total += float(loss)
    return total / held_out if math.isfinite(total) else math.inf
