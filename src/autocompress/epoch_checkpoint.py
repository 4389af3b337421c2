"""Epoch checkpoints: a training phase (ADMM W-steps, masked retraining) resumes from its last finished
epoch instead of from its start.

After every finished epoch the loop (:func:`autocompress.admm.admm_prune`,
:func:`autocompress.admm.masked_retrain`) hands :meth:`EpochCheckpoint.save` what it owns: the model, the
optimiser, the learning-rate schedule and its own state (ADMM: Z, U, rho, step counters, residual history;
the per-epoch statistics). The checkpoint adds the random state that decides what comes next: the global
torch generators (the CPU's, and the task's CUDA device's) and the training loader's own generators
(``loader.generator``, ``loader.sampler.generator``: a loader without one draws its order from the global
generator, saved too). A loop that finds a stored state (:meth:`EpochCheckpoint.resume`) loads all of it and
continues at the next epoch, so a run killed after epoch k ends as an uninterrupted one: the same batches in
the same order, the same dropout masks, the same optimiser steps (bit for bit on the CPU at the same thread
count). A stored state also holds the digest of the weights its phase started from
(:func:`autocompress.analysis.model_digest`): a state whose phase started from other weights (a file an earlier
run of the folder left behind, its phases since done again from other inputs) is set aside, said in the log, and
the phase starts from its first epoch.

Where the state lives is the caller's (``load()`` / ``save(state)``): the pipeline's phase store, one file
per phase in the run folder, written atomically and removed when the phase finishes; under
``torch.distributed`` rank 0 writes it and every rank loads rank 0's state. Not replayed: randomness outside
torch's generators (a loader shuffling with Python's ``random`` or numpy, workers seeded from the clock);
with such a loader the batches after a resume differ from those of an uninterrupted run.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .analysis import model_digest
from .errors import UserError


class EpochCheckpoint:
    """The per-epoch state of one training phase (see the module docstring).

    Args:
        load: ``fn() -> state or None`` (None: no epoch of this phase finished before).
        save: ``fn(state)`` storing a state (a dict of tensors and plain data, loadable with
            ``weights_only=True``).
        generators: the training loader's own ``torch.Generator`` objects
            (:func:`autocompress.task.loader_generators`).
        device: the training device (its CUDA generator is saved with the CPU's).
        log: called with one line when a phase resumes.
        label: the phase in that line, e.g. ``"round 1 retraining"``.
    """

    def __init__(self, load: Callable[[], dict | None], save: Callable[[dict], None], *,
                 generators: Iterable[torch.Generator] = (), device: torch.device | str = "cpu",
                 log: Callable[[str], None] | None = None, label: str = "training"):
        self._load, self._save = load, save
        self.generators = list(generators)
        self.device = torch.device(device)
        self.log, self.label = log, label
        self.start: str | None = None  # digest of the weights the phase started from (set by resume)
        self.resumed: dict | None = None  # the state resume loaded (None: the phase starts from its first epoch)

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None, epochs: int) -> tuple[int, dict]:
        """Load the stored state, if any, into ``model``, ``optimizer``, ``scheduler`` and the random
        generators. Call it after everything the phase sets up, right before its first epoch.

        Returns:
            ``(epochs already done, the loop's own state)``; ``(0, {})`` when nothing is stored, or when the
            stored state's phase started from other weights than ``model``'s now (logged).

        Raises:
            UserError: the stored state is of a phase with another number of epochs, or of a loader with
                another number of generators.
        """
        self.start, state = model_digest(model), self._load()
        if state is not None and state.get("start") not in (None, self.start):
            self._say(f"the epoch checkpoint after epoch {state['epoch']}/{state['epochs']} is of a phase that "
                      "started from other weights (left by an earlier run of this folder); starting from epoch 1")
            state = None
        if state is None:
            return 0, {}
        if state["epochs"] != epochs or not 0 < state["epoch"] <= epochs:
            raise UserError(f"the epoch checkpoint of {self.label} is after epoch {state['epoch']} of "
                            f"{state['epochs']}, but the phase has {epochs} epochs",
                            "resume with the settings the run started with")
        if len(state["random"]["loader"]) != len(self.generators):
            raise UserError(f"the epoch checkpoint of {self.label} holds the state of "
                            f"{len(state['random']['loader'])} loader generator(s), the training loader has "
                            f"{len(self.generators)}", "resume with the train_loader the run started with")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        self._set_random(state["random"])
        self.resumed = state
        self._say(f"resuming after epoch {state['epoch']}/{epochs}")
        return state["epoch"], state["loop"]

    def save(self, epoch: int, epochs: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None, loop: dict[str, Any]) -> None:
        """Store the state after epoch ``epoch`` (1-based) of ``epochs``: ``model``, ``optimizer``,
        ``scheduler``, the random generators, ``loop`` (the loop's own state, returned by :meth:`resume`) and the
        digest of the weights the phase started from (call :meth:`resume` first)."""
        self._save({"epoch": epoch, "epochs": epochs, "start": self.start, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "random": self._random(), "loop": loop})

    def _say(self, line: str) -> None:
        if self.log is not None:
            self.log(f"{self.label}: {line}")

    def _random(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda, "loader": [g.get_state() for g in self.generators]}

    def _set_random(self, random: dict) -> None:
        torch.set_rng_state(random["cpu"])
        if random["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(random["cuda"], self.device)
        for generator, saved in zip(self.generators, random["loader"]):
            generator.set_state(saved)


__all__ = ["EpochCheckpoint"]
