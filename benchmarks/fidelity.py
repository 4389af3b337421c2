"""Search fidelity (issue 5): does the quick-evaluation score rank candidates like their accuracy after a
short retraining?

For ``--candidates`` random actions that meet one target (random directions through the search's own
:class:`autocompress.sampling.ActionSampler`, so every candidate obeys the guidance and the target), it
records

* the quick-evaluation score (one-shot projection + validation top-1, :class:`autocompress.quick_eval.
  QuickEvaluator`) with and without BatchNorm re-estimation (adaptive BN, EagleEye, Li et al. ECCV 2020);
* the validation top-1 after hard pruning at the candidate's rates and ``--retrain-epochs`` epochs of masked
  retraining (:func:`autocompress.admm.masked_retrain`) on a seeded ``--max-train`` subset,

and reports Spearman's rank correlation (``scipy.stats.spearmanr``) of each score with the retrained top-1.
Writes ``benchmarks/results/fidelity_<model>_<target>.json``.

    .venv/bin/python benchmarks/fidelity.py assets/fmnist_cnn_base.pt --target params=10x --candidates 20
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from autocompress.admm import hard_prune, masked_retrain
from autocompress.checkpoint import load_checkpoint, model_from_checkpoint
from autocompress.config import DIMS, Target
from autocompress.data import get_dataset
from autocompress.quick_eval import QuickEvaluator
from autocompress.sampling import ActionSampler, quiet_clipping
from autocompress.space import PruningSpace
from autocompress.task import Task
from autocompress.training import TrainConfig, evaluate

RESULTS = Path(__file__).resolve().parent / "results"


def random_actions(sampler: ActionSampler, count: int, seed: int) -> list[np.ndarray]:
    """``count`` actions meeting the sampler's target: uniform random directions in [0.05, 1] per unit,
    ordered by the guidance and scaled to the target (:meth:`ActionSampler.meet`)."""
    rng = np.random.default_rng(seed)
    return [sampler.meet(rng.uniform(0.05, 1.0, len(sampler.units))) for _ in range(count)]


def retrained_top1(model, space, rates, splits, epochs: int, seed: int) -> float:
    """Validation top-1 (%) after hard pruning a copy of ``model`` at ``rates`` and masked retraining."""
    net = copy.deepcopy(model)
    with quiet_clipping():
        _, param_masks = hard_prune(net, space, rates)
    loader = splits.loader("train", 128, shuffle=True, augment=True, generator=torch.Generator().manual_seed(seed))
    masked_retrain(net, param_masks, loader, TrainConfig(epochs=epochs, lr=0.01), progress=False)
    return 100.0 * evaluate(net, splits.loader("val", 256, shuffle=False, augment=False))["top1"]


def fidelity(checkpoint: str, target: str, *, dims: str = "filter,column", candidates: int = 20,
             retrain_epochs: int = 1, max_train: int = 10000, val_size: int = 5000, data_dir: str | None = None,
             seed: int = 0) -> dict:
    """Scores and retrained accuracies of random candidates, and the two Spearman correlations."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    splits = get_dataset(ckpt["dataset"]["name"], data_dir, val_size=val_size, seed=seed, max_train=max_train,
                         max_test=1)
    example = torch.zeros(1, *splits.input_size)
    goal = Target.parse(target)
    space = PruningSpace.build(model, example, dims=DIMS[dims])
    sampler = ActionSampler.from_space(space, goal.objective, goal.factor)
    task = Task(train_loader=splits.loader("train", 256, shuffle=True, augment=False,
                                           generator=torch.Generator().manual_seed(seed)),
                val_loader=splits.loader("val", 256, shuffle=True, augment=False,
                                         generator=torch.Generator().manual_seed(seed)))
    with_bn = QuickEvaluator(model, space, task, bn_recalibration=True)
    without_bn = QuickEvaluator(model, space, task, bn_recalibration=False)
    rows = []
    for index, action in enumerate(random_actions(sampler, candidates, seed)):
        began = time.perf_counter()
        rates = sampler.to_rates(action)
        rows.append({"candidate": index, "compression": sampler.compression(action),
                     "quick_bn": 100.0 * with_bn.score(rates).top1, "quick_no_bn": 100.0 * without_bn.score(rates).top1,
                     "retrained": retrained_top1(model, space, rates, splits, retrain_epochs, seed + index)})
        rows[-1]["seconds"] = time.perf_counter() - began
        print(json.dumps(rows[-1]), flush=True)
    retrained = [r["retrained"] for r in rows]
    result = {"checkpoint": checkpoint, "target": target, "dims": dims, "candidates": candidates,
              "retrain_epochs": retrain_epochs, "max_train": max_train, "val_images": with_bn.val_images,
              "spearman_bn": float(spearmanr([r["quick_bn"] for r in rows], retrained).statistic),
              "spearman_no_bn": float(spearmanr([r["quick_no_bn"] for r in rows], retrained).statistic),
              "rows": rows}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--target", default="params=10x")
    parser.add_argument("--dims", default="filter,column")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--retrain-epochs", type=int, default=1)
    parser.add_argument("--max-train", type=int, default=10000)
    parser.add_argument("--data-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = fidelity(args.checkpoint, args.target, dims=args.dims, candidates=args.candidates,
                      retrain_epochs=args.retrain_epochs, max_train=args.max_train, data_dir=args.data_dir,
                      seed=args.seed)
    name = f"fidelity_{Path(args.checkpoint).stem}_{args.target.replace('=', '')}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=1))
    print(f"Spearman (quick eval with BN re-estimation vs retrained top-1): {result['spearman_bn']:.3f}")
    print(f"Spearman (quick eval without BN re-estimation vs retrained top-1): {result['spearman_no_bn']:.3f}")


if __name__ == "__main__":
    main()
