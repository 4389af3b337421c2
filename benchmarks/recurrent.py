"""An LSTM sequence classifier, compressed through its hidden units (session 57), against Torch-Pruning.

The model reads each Fashion-MNIST image as a sequence of 28 rows of 28 features: a 2-layer ``nn.LSTM`` (128 hidden
units, batch first) and a Linear head on the last layer's final state ``h_n[-1]`` (214,282 parameters, 90 % of
them recurrent weights that only hidden-unit pruning can shrink). The data are ``sequence_model.py``'s: 10,000
training images, 2,000 validating, 4,000 test images scoring. The base trains for 8 epochs of the user's loop (Adam,
lr 2e-3, cosine); each method then gets ``--budget`` epochs:

* ``ac``: ``autocompress.compress`` with the target and the budget only (its default loop);
* ``tp``: Torch-Pruning 1.6 global magnitude pruning stepped towards the target's parameters (head kept) and the
  user's loop (``met``: whether it got there; an exception is recorded as the row's ``error``);
* ``tp_one_layer``: the same on a 1-layer LSTM of 128 units (its own base);
* ``tp_steps``, ``tp_steps_one_layer``: the same with the head reading the output sequence's last step (the same
  values as ``h_n[-1]``, the same weights), which Torch-Pruning's graph reaches.

One JSON line per (method, seed) in ``--out``; rows already there are skipped. ``ort_b1_speedup``: the base's
onnxruntime latency over the compressed model's (batch 1, 1 thread, interleaved medians of 200 runs).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/recurrent.py \\
        --methods ac,tp,tp_one_layer,tp_steps,tp_steps_one_layer \\
        --seeds 0,1 --target params=4x --budget 4 --out benchmarks/results/recurrent_s57.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

import autocompress
from autocompress import metrics
from autocompress.config import Target
from sequence_model import base_model, loaders  # sibling scripts: benchmarks/ is on sys.path when run as a script
from short_budget import ort_speedup
from weak_teacher import append_row, top1
from weak_teacher import train as train_steps

EXAMPLE = torch.zeros(1, 28, 28)


class RowLSTM(nn.Module):
    """``[B, 28, 28]`` (rows, columns) -> ``[B, 10]``: the rows as the sequence of an LSTM, a head on ``h_n[-1]``
    (``read="state"``) or on the output sequence's last step (``"steps"``: the same values)."""

    def __init__(self, hidden: int = 128, layers: int = 2, read: str = "state"):
        super().__init__()
        self.rnn, self.head = nn.LSTM(28, hidden, layers, batch_first=True), nn.Linear(hidden, 10)
        self.read = read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, _) = self.rnn(x)
        return self.head(h[-1] if self.read == "state" else out[:, -1])


def user_loop(model: nn.Module, loader, epochs: int) -> None:
    """The user's loop: Adam, lr 2e-3 decayed by a cosine over the steps, cross-entropy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    train_steps(model, loader, epochs, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                                                           epochs * len(loader)))
    model.eval()


def lstm_base(path: Path, layers: int) -> nn.Module:
    """The base of ``layers`` LSTM layers: initialised under seed 0, trained 8 epochs of :func:`user_loop` once and
    kept at ``path``."""
    return base_model(path, lambda: RowLSTM(layers=layers), user_loop)


def run_autocompress(base: nn.Module, data: tuple, seed: int, target: str, budget: int) -> tuple[dict, nn.Module]:
    result = autocompress.compress(base, EXAMPLE, target, train_loader=data[0], val_loader=data[1],
                                   config={"budget": budget, "seed": seed}, device="cpu", progress=False,
                                   log=lambda line: None)
    return {"top1": top1(result.model, data[2]), "params_x": result.compression_rate, "macs_x": result.mac_reduction,
            "hidden": result.model.rnn.hidden_size, "warnings": result.final.get("warnings")}, result.model


def run_torch_pruning(base: nn.Module, data: tuple, seed: int, target: str, budget: int) -> tuple[dict, nn.Module]:
    """Torch-Pruning's global magnitude pruning (head kept) stepped until the parameters meet ``target``, then
    ``budget`` epochs of :func:`user_loop`; its failure (an exception) is returned as the row's ``error``."""
    import torch_pruning as tp

    model, limit = copy.deepcopy(base), metrics.count_params(base) / Target.parse(target).factor
    try:
        pruner = tp.pruner.MagnitudePruner(model, EXAMPLE, importance=tp.importance.MagnitudeImportance(p=2),
                                           global_pruning=True, pruning_ratio=0.95, iterative_steps=200,
                                           ignored_layers=[model.head])
        for _ in range(200):
            if metrics.count_params(model) <= limit:
                break
            pruner.step()
        with torch.no_grad():
            model(EXAMPLE)
    except Exception as exc:  # noqa: BLE001 - the peer's failure is the measurement
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}, None
    torch.manual_seed(seed)
    user_loop(model, data[0], budget)
    params_x = metrics.count_params(base) / metrics.count_params(model)
    return {"top1": top1(model, data[2]), "params_x": params_x, "met": params_x >= Target.parse(target).factor * 0.99,
            "macs_x": metrics.count_macs(base, EXAMPLE) / metrics.count_macs(model, EXAMPLE),
            "hidden": model.rnn.hidden_size}, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="ac,tp,tp_one_layer")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--target", default="params=4x")
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--cache", default=str(Path.home() / ".cache/autocompress-bench"))
    parser.add_argument("--out", default="benchmarks/results/recurrent.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = map(json.loads, out.read_text().splitlines()) if out.exists() else []
    done = {(r["method"], r["seed"], r["target"], r["budget"]) for r in rows}
    for seed in (int(s) for s in args.seeds.split(",")):
        data = loaders(seed)
        for method in (m for m in args.methods.split(",") if (m, seed, args.target, args.budget) not in done):
            layers = 1 if method.endswith("one_layer") else 2
            base = lstm_base(Path(args.cache) / f"row_lstm_{layers}layer.pt", layers)
            base.read = "steps" if method.startswith("tp_steps") else "state"
            started = time.perf_counter()
            run = run_autocompress if method == "ac" else run_torch_pruning
            row, model = run(base, data, seed, args.target, args.budget)
            row = {"method": method, "seed": seed, "target": args.target, "budget": args.budget, "layers": layers,
                   "base_top1": top1(base, data[2]), "base_params": metrics.count_params(base), **row,
                   "seconds": round(time.perf_counter() - started, 1)}
            if model is not None:
                row["ort_b1_speedup"] = ort_speedup(base, model, EXAMPLE)
            append_row(out, row)


if __name__ == "__main__":
    main()
