"""Training step and eval forward on the CPU with contiguous vs channels-last weights (``task.channels_last``).

``train_epoch`` and the scoring forwards run the model with channels-last weights on the CPU (inputs are
channels-last already). This times, interleaved over ``--repeats`` rounds, one SGD step (forward, backward,
step) and one eval forward of a zoo model at ``--batch-size`` on random inputs of its dataset's size, with the
weights contiguous and channels-last. Prints one Markdown row per layout.

Example::

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/channels_last.py --model fmnist_cnn --input 1,28,28
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from autocompress.models import create_model
from autocompress.task import channels_last


def _step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist_cnn")
    parser.add_argument("--input", default="1,28,28", help="C,H,W")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10)
    x = torch.randn(args.batch_size, *map(int, args.input.split(","))).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times: dict[str, dict[str, list[float]]] = {"contiguous": {"train": [], "eval": []},
                                                "channels-last": {"train": [], "eval": []}}

    def run(layout: str) -> None:
        model.train()
        _step(model, optimizer, x, y)  # warm-up
        times[layout]["train"].append(_timed(lambda: _step(model, optimizer, x, y), args.steps))
        model.eval()
        with torch.no_grad():
            times[layout]["eval"].append(_timed(lambda: model(x), args.steps))

    for _ in range(args.repeats):
        run("contiguous")
        with channels_last(model, device=torch.device("cpu")):
            run("channels-last")
    print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print("| weights | train step (ms) | eval forward (ms) |\n|---|---|---|")
    base = {k: statistics.median(v) for k, v in times["contiguous"].items()}
    for layout, row in times.items():
        med = {k: statistics.median(v) for k, v in row.items()}
        print(f"| {layout} | {med['train']:.1f} ({base['train'] / med['train']:.2f}x) | "
              f"{med['eval']:.1f} ({base['eval'] / med['eval']:.2f}x) |")


if __name__ == "__main__":
    main()
