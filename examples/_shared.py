"""What the three examples share: their command line, a plain PyTorch training loop, the final table and the
deployment check of a compressed model (trace, pickle, reload). Not part of the library: a user's script
holds its own version of these few lines."""
from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from autocompress import CompressResult
from autocompress.report import final_table_rows

@dataclass
class ExampleRun:
    """What an example's ``main`` returns: the trained base model, the example inputs it was compressed with,
    and one :class:`autocompress.CompressResult` per way it was compressed."""

    base: nn.Module
    example: torch.Tensor
    results: dict[str, CompressResult]


#: the settings of ``--tiny`` (the test suite's size): one round, one epoch per phase, three search evaluations
TINY_CONFIG = {"rounds": 1, "admm": {"epochs": 1}, "retrain": {"epochs": 1}, "search": {"max_evaluations": 3},
               "quick_eval": {"bn_batches": 2, "val_batches": 2, "finetune_steps": 5}, "latency_runs": 2}


def parser(description: str) -> argparse.ArgumentParser:
    """The options every example takes: ``--tiny``, ``--out``, ``--no-deploy``, ``--device``, ``--quiet``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true",
                   help="a few hundred samples, one epoch per phase, three search evaluations (the test suite's "
                        "size; a smoke test, not a meaningful result)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the compressed model (model.pt, pickled) and its TorchScript trace "
                        "(model.ts); default: nothing is written")
    p.add_argument("--no-deploy", action="store_true",
                   help="skip tracing / pickling the compressed model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    return p


def device_of(name: str) -> torch.device:
    """``--device`` as a torch.device (``auto``: CUDA when available), refused in one line when unavailable."""
    from autocompress.task import resolve_device

    return resolve_device(name)


def fit(model: nn.Module, loader: Iterable, loss_fn: Callable[[nn.Module, Any], torch.Tensor], *, epochs: int,
        lr: float, device: torch.device) -> nn.Module:
    """Train ``model`` in place with Adam for ``epochs`` passes over ``loader``; ``loss_fn(model, batch)`` gets
    batches already moved to ``device`` (a tuple / list / dict of tensors, or a tensor). Returns the model in eval
    mode."""
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for batch in loader:
            loss = loss_fn(model, to_device(batch, device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensors (inside tuples, lists and dicts too) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return type(batch)(to_device(value, device) for value in batch)


def print_table(title: str, result: CompressResult) -> None:
    """The final table of a compress run (base vs compressed, and the reduction row)."""
    rows = final_table_rows(result.final)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\n{title}: {result.compression_rate:.2f}x fewer parameters, {result.mac_reduction:.2f}x fewer MACs")
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def deploy(model: nn.Module, example: torch.Tensor, out: Path | None) -> dict[str, nn.Module]:
    """Trace (``torch.jit.trace``, after a forward under no_grad) and pickle (``torch.save`` of the module, then
    ``torch.load(weights_only=False)``) the compressed ``model``; both must compute what ``model`` computes on
    ``example``. With ``out`` they are written as ``out/model.ts`` and ``out/model.pt``, else kept in memory.

    Returns ``{"traced": ..., "reloaded": ...}``. Raises AssertionError when an output differs."""
    model.eval()
    with torch.no_grad():
        expected = model(example)
        traced = torch.jit.trace(model, example)
        target: Any = io.BytesIO() if out is None else Path(out) / "model.pt"
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            traced.save(str(Path(out) / "model.ts"))
        torch.save(model, target)
        if isinstance(target, io.BytesIO):
            target.seek(0)
        reloaded = torch.load(target, weights_only=False, map_location=example.device)
        for name, copy in (("traced", traced), ("reloaded", reloaded)):
            torch.testing.assert_close(copy(example), expected, msg=lambda m, name=name: f"{name} model: {m}")
    if out is not None:
        print(f"wrote {Path(out) / 'model.pt'} (torch.load(path, weights_only=False)) and {Path(out) / 'model.ts'} "
              "(torch.jit.load)")
    return {"traced": traced, "reloaded": reloaded}
