"""Cost of the ``finetune`` quick-evaluation scorer before and since session 17, on the same random candidates,
side by side in one process (issue 13). Before: each candidate fine-tuned masked at full width, its batches
drawn from the loader and the teacher run on them every time. Since: fine-tuned compacted
(:func:`autocompress.compaction.shrink`, ``compress`` passes ``example_inputs``), the first candidate's batches
and the teacher's outputs on them kept and replayed for the others.

For each ``--targets`` step it draws ``--candidates`` random actions meeting it from the base (the search's own
sampler, ``benchmarks/fidelity.py``'s draw and evaluator settings: train batch 64, 5 BatchNorm batches, 10
validation batches of 256, 50 distilled steps at lr 0.01) and scores each with both evaluators, alternating
which goes first; it prints per candidate both scores (top-1 %) and wall seconds, then the median time ratio::

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/finetune_cost.py \\
        benchmarks/results/bases/resnet20_cifar10_e40.pt --data-dir ../shared/datasets/cifar10-jpeg.tar.gz \\
        --targets flops=2x,flops=4x --candidates 4

The two differ only in float rounding (same function, same batches, same updates of the kept weights), which 50
SGD steps amplify: the scores agree to within about a point.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity  # noqa: E402
from autocompress.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from autocompress.config import DIMS, Target  # noqa: E402
from autocompress.data import get_dataset  # noqa: E402
from autocompress.quick_eval import QuickEvaluator  # noqa: E402
from autocompress.sampling import ActionSampler  # noqa: E402
from autocompress.space import PruningSpace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir")
    parser.add_argument("--targets", default="flops=2x,flops=4x")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--dims", default="filter,column", choices=sorted(DIMS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt).eval()
    splits = get_dataset(ckpt["dataset"]["name"], args.data_dir, val_size=5000, seed=args.seed, max_test=1)
    example = torch.zeros(1, *splits.input_size)
    for target in args.targets.split(","):
        goal = Target.parse(target)
        space = PruningSpace.build(model, example, dims=DIMS[args.dims],
                                   executed_macs_only=goal.objective == "flops")
        settings = SimpleNamespace(bn_batches=5, val_batches=10, seed=args.seed)
        masked = fidelity.scorers(model, space, splits, settings)["finetune"]
        masked._kept_bytes, masked._teacher_cache = None, None  # session 16's scorer: nothing kept or cached
        compacted = fidelity.scorers(model, space, splits, settings, example_inputs=example)["finetune"]
        sampler = ActionSampler.from_space(space, goal.objective, goal.factor)
        ratios = []
        for index, action in enumerate(fidelity.random_actions(sampler, args.candidates, args.seed)):
            rates = sampler.to_rates(action)
            order = [("masked", masked), ("compacted", compacted)]
            results = {}
            for name, evaluator in (order if index % 2 == 0 else order[::-1]):
                began = time.perf_counter()
                score = evaluator.score(rates).top1
                results[name] = (100.0 * score, time.perf_counter() - began)
            ratios.append(results["masked"][1] / results["compacted"][1])
            print(f"{target} candidate {index}: top-1 masked {results['masked'][0]:.2f} / compacted "
                  f"{results['compacted'][0]:.2f}; seconds {results['masked'][1]:.1f} / {results['compacted'][1]:.1f}"
                  f" ({ratios[-1]:.2f}x)", flush=True)
        print(f"{target}: median time ratio masked / compacted {statistics.median(ratios):.2f}x over "
              f"{len(ratios)} candidates", flush=True)


if __name__ == "__main__":
    main()
