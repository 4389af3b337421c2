"""How much of a quick-evaluation score is the validation sample (issue 13: the search's scores at a 2x step)?

Random candidates meeting a target (the search's own sampler, as ``benchmarks/fidelity.py`` draws them) are scored
by the library's default scorer (``quick_eval``'s defaults: 50 distilled fine-tuning steps of batch 128, then
BatchNorm re-estimation, the candidate trained compacted, as ``compress`` does); each fine-tuned candidate's top-1
is then read on ``--chunks`` disjoint chunks of ``--val-batches`` validation batches of 128, drawn in a seeded
random order (the default score read 10 batches until session 28, 30 since). Across candidates, the Spearman
correlation between two chunks' scores is the score's test-retest reliability at that validation size: no scorer
can rank candidates like their retrained accuracy better than the square root of it (Spearman's attenuation).
Spearman-Brown (``k r / (1 + (k - 1) r)``) gives the reliability of a score read on ``k`` chunks; the correlation
between the mean of the other chunks and one chunk checks it.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/score_noise.py \\
        benchmarks/results/bases/resnet20_cifar10_e40.pt --data-dir ../shared/datasets/cifar10-jpeg.tar.gz \\
        --target flops=2x --candidates 20 --out OUT.jsonl

Rows go to ``--out`` as each candidate finishes (a re-run resumes; a candidate whose widths were scored already gets
no chunks and another is drawn, up to ``--candidates`` distinct ones); the summary is printed at the end.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from autocompress.checkpoint import load_checkpoint, model_from_checkpoint
from autocompress.config import DIMS, Target
from autocompress.data import get_dataset
from autocompress.quick_eval import QuickEvaluator
from autocompress.sampling import ActionSampler
from autocompress.space import PruningSpace
from autocompress.task import Task
from fidelity import random_actions, read_rows


def chunk_scores(evaluator: QuickEvaluator, rates: dict, chunks: int, size: int) -> list[float]:
    """Top-1 (%) of one candidate, fine-tuned once, on each of ``chunks`` disjoint chunks of ``size`` batches
    (the evaluator scores all ``chunks * size`` batches; its task's score is read per chunk)."""
    task, seen = evaluator.task, []
    score = task.score

    def per_chunk(model, batches):
        batches = list(batches)
        seen.extend(100.0 * score(model, batches[k * size:(k + 1) * size]) for k in range(chunks))
        return score(model, batches)
    task.score = per_chunk
    try:
        evaluator.score(rates)
    finally:
        task.score = score
    return seen


def summary(rows: list[dict]) -> dict:
    """Reliability of a one-chunk score (mean Spearman over chunk pairs), its Spearman-Brown projection to every
    chunk count, the leave-one-chunk-out check and the spread of scores across and within candidates."""
    scores = np.array([row["chunks"] for row in rows if row["chunks"]])  # [candidates, chunks]
    k = scores.shape[1]
    pairs = [spearmanr(scores[:, a], scores[:, b])[0] for a, b in itertools.combinations(range(k), 2)]
    one = float(np.mean(pairs))
    rest = [spearmanr(scores[:, a], np.delete(scores, a, 1).mean(1))[0] for a in range(k)]
    return {"candidates": len(scores), "chunks": k, "reliability_one_chunk": one, "pairs": [float(p) for p in pairs],
            "spearman_brown": {n: n * one / (1 + (n - 1) * one) for n in range(1, k + 1)},
            "one_chunk_vs_mean_of_others": float(np.mean(rest)),
            "sd_across_candidates": float(scores.mean(1).std(ddof=1)),
            "sd_within_candidate": float(np.sqrt(scores.var(1, ddof=1).mean())),
            "score_range": [float(scores[:, 0].min()), float(scores[:, 0].max())],
            "median_seconds": statistics.median(row["seconds"] for row in rows if row["chunks"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir")
    parser.add_argument("--target", default="flops=2x")
    parser.add_argument("--dims", default="filter,column")
    parser.add_argument("--channel-multiple", type=int, default=8, help="as the realistic runs resolved it")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--val-batches", type=int, default=10, help="batches of 128 per chunk (the default score)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = read_rows(out)
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt).eval()
    splits = get_dataset(ckpt["dataset"]["name"], args.data_dir, val_size=5000, seed=args.seed)
    if args.chunks * args.val_batches * 128 > len(splits.val):
        parser.error(f"--chunks x --val-batches x 128 exceeds the {len(splits.val)} validation images")
    example = torch.zeros(1, *splits.input_size)
    space = PruningSpace.build(model, example, dims=DIMS[args.dims], executed_macs_only=True,
                               channel_multiple=args.channel_multiple)
    goal = Target.parse(args.target)
    sampler = ActionSampler.from_space(space, goal.objective, goal.factor)
    task = Task(train_loader=splits.loader("train", 128, shuffle=True, augment=True,
                                           generator=torch.Generator().manual_seed(args.seed)),
                val_loader=splits.loader("val", 128, shuffle=True, augment=False,  # (the split is in class order)
                                         generator=torch.Generator().manual_seed(args.seed)))
    evaluator = QuickEvaluator(model, space, task, scorer="auto", val_batches=args.chunks * args.val_batches,
                               seed=args.seed, example_inputs=example)
    done = {row["candidate"] for row in rows}
    for index, action in enumerate(random_actions(sampler, 5 * args.candidates, args.seed)):
        if sum(bool(row["chunks"]) for row in rows) >= args.candidates:
            break
        if index in done:
            continue
        began = time.perf_counter()
        row = {"target": args.target, "candidate": index, "compression": sampler.compression(action),
               "chunks": chunk_scores(evaluator, sampler.to_rates(action), args.chunks, args.val_batches),
               "seconds": time.perf_counter() - began}  # chunks []: the widths of a candidate scored already
        rows.append(row)
        with open(out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(json.dumps(summary(rows), indent=1))


if __name__ == "__main__":
    main()
