"""Search fidelity (issues 5 and 13): which quick-evaluation scorer ranks candidates like their accuracy
after the round's retraining, and at what cost per candidate?

For each ``--targets`` step (one shot from the base) it draws ``--candidates`` random actions meeting it
(random directions through the search's own :class:`autocompress.sampling.ActionSampler`, so every
candidate obeys the guidance and the target; the same candidates for every scorer) and records for each

* the score of every scorer (:class:`autocompress.quick_eval.QuickEvaluator`, in % top-1 on the first
  ``--val-batches`` x 256 shuffled validation images): ``bn`` (one-shot + BatchNorm re-estimation on
  ``--bn-batches`` x 64 training images; the issue-5 study showed one-shot without it is worse), ``refit``
  (bn + ridge refit of the classifier onto the base's logits) and ``finetune@S`` for each S of
  ``--finetune-steps`` (S masked SGD steps of batch 64, lr 0.01, distillation from the base, then bn; all S from ONE run, :meth:`QuickEvaluator.score_along`), with
  the seconds each took (``finetune@S``: from the start of that run);
* the accuracy after a proxy of the round (``ac_kd`` rule: no ADMM convergence at these budgets, so hard
  pruning then retraining decides): hard pruning at the candidate's rates, compaction (the pipeline's
  ``_shrink``), ``--retrain-epochs`` of masked retraining with distillation from the base (T 4, alpha 0.9;
  batch 128, lr 0.01 cosine) on a seeded ``--max-train`` subset, then top-1 on ``--max-test`` test images
  (never seen by any scorer). No purification.

``--picks`` (issue 13's goal "the search's pick beats uniform rates and the median of random rate vectors"):
for each target, the rates the library would pick -- ``uniform`` (one rate per unit, the ``search_mode:
uniform`` ablation) and ``search:<scorer>`` (guided simulated annealing scored by that scorer, the search
settings of ``configs/demo.yaml``) -- retrained by the same proxy, once per ``--pick-seeds`` seed (the seed
of the search and of the retraining), into ``<out stem>_picks.jsonl``; the summary compares them with the
random candidates' median.

``--retest``: each candidate is retrained a second time with another seed (into ``<out stem>_retest.jsonl``);
the summary then gives the proxy's own test-retest Spearman (the ceiling any scorer can reach against this
noisy proxy) and each scorer's Spearman with the mean of the two retrainings.

Rows go to a JSON-lines file as each candidate finishes (``--out``; a re-run skips the candidates it
holds, so a killed study resumes), then Spearman's rank correlation (``scipy.stats.spearmanr``) of each
scorer with the retrained top-1 per target, and the median seconds per candidate, are printed as a
markdown table and written next to it (``.summary.json``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fidelity.py assets/fmnist_cnn_base.pt \\
        --targets params=10x,params=30x,params=3x --candidates 20
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from autocompress.admm import hard_prune, masked_retrain
from autocompress.atomic import atomic_write_text
from autocompress.checkpoint import load_checkpoint, model_from_checkpoint
from autocompress.annealing import simulated_annealing
from autocompress.compaction import shrink
from autocompress.config import DIMS, SearchConfig, Target
from autocompress.data import get_dataset
from autocompress.distillation import DistillationConfig, Distiller
from autocompress.quick_eval import QuickEvaluator
from autocompress.sampling import ActionSampler
from autocompress.space import PruningSpace
from autocompress.task import Task
from autocompress.training import TrainConfig, evaluate

RESULTS = Path(__file__).resolve().parent / "results"
#: the search settings of a ``search:<scorer>`` pick (configs/demo.yaml's)
PICK_SEARCH = {"max_evaluations": 24, "start_temperature": 0.05, "cooling_rate": 0.85, "perturbation_magnitude": 0.1}
#: added to a candidate's retraining seed for its ``--retest`` retraining
RETEST_SEED = 10_000


def random_actions(sampler: ActionSampler, count: int, seed: int) -> list[np.ndarray]:
    """``count`` actions meeting the sampler's target: uniform random directions in [0.05, 1] per unit,
    ordered by the guidance and scaled to the target (:meth:`ActionSampler.meet`)."""
    rng = np.random.default_rng(seed)
    return [sampler.meet(rng.uniform(0.05, 1.0, len(sampler.units))) for _ in range(count)]


def pending(sampler: ActionSampler, target: str, done: set, args, shard: int, shards: int):
    """``(index, action)`` of this shard's random candidates (:func:`random_actions`) of ``target`` whose
    ``(target, index)`` is not in ``done``."""
    for index, action in enumerate(random_actions(sampler, args.candidates, args.seed)):
        if (target, index) not in done and index % shards == shard:
            yield index, action


def retrained_top1(model, space, rates, splits, epochs: int, seed: int) -> float:
    """Test top-1 (%) after hard pruning a copy of ``model`` at ``rates``, compacting it (pruned filters
    gone, pruned columns kept as zeros) and ``epochs`` of masked retraining with distillation from ``model``."""
    net = copy.deepcopy(model)
    _, param_masks = hard_prune(net, space, rates)
    example = torch.zeros(2, *splits.input_size)
    small, masks = shrink(net, param_masks, example)
    loader = splits.loader("train", 128, shuffle=True, augment=True, generator=torch.Generator().manual_seed(seed))
    masked_retrain(small, masks, loader, TrainConfig(epochs=epochs, lr=0.01), progress=False,
                   distiller=Distiller(model, DistillationConfig(enabled=True)))
    return 100.0 * evaluate(small, splits.loader("test", 256, shuffle=False, augment=False))["top1"]


def retest(target: str, sampler: ActionSampler, model, space, splits, args, shard: int, shards: int,
           out: Path) -> None:
    """Append to ``out`` a second retraining (seed + :data:`RETEST_SEED`) of each of this shard's candidates
    of ``target`` that it does not hold yet."""
    done = {(r["target"], r["candidate"]) for r in read_rows(out)}
    for index, action in pending(sampler, target, done, args, shard, shards):
        top1 = retrained_top1(model, space, sampler.to_rates(action), splits, args.retrain_epochs,
                              args.seed + index + RETEST_SEED)
        with open(out, "a") as handle:
            handle.write(json.dumps({"target": target, "candidate": index, "retrained": top1}) + "\n")
        print(json.dumps({"target": target, "candidate": index, "retest": top1}), flush=True)


def scorers(model, space, splits, args, example_inputs=None) -> dict[str, QuickEvaluator]:
    """The evaluators compared, each on the same data (``train`` batch 64, ``val`` batch 256, seeded); with
    ``example_inputs`` the finetune scorer trains each candidate compacted (as ``compress`` does)."""
    def task() -> Task:
        return Task(train_loader=splits.loader("train", 64, shuffle=True, augment=False,
                                               generator=torch.Generator().manual_seed(args.seed)),
                    val_loader=splits.loader("val", 256, shuffle=True, augment=False,
                                             generator=torch.Generator().manual_seed(args.seed)))

    common = dict(bn_batches=args.bn_batches, val_batches=args.val_batches, seed=args.seed)
    return {"bn": QuickEvaluator(model, space, task(), **common),
            "refit": QuickEvaluator(model, space, task(), scorer="refit", **common),
            "finetune": QuickEvaluator(model, space, task(), scorer="finetune", finetune_lr=0.01,
                                       example_inputs=example_inputs, **common)}


def score_candidate(evaluators: dict[str, QuickEvaluator], rates: dict, steps: list[int]
                    ) -> tuple[dict, dict, dict]:
    """``({scorer: top-1 %}, {scorer: wall seconds}, {scorer: CPU seconds of this process})`` of one
    candidate; ``finetune@S`` for each S of ``steps`` (CPU seconds: of the whole run, under ``finetune``)."""
    scores, seconds, cpu = {}, {}, {}
    for name, evaluator in evaluators.items():
        began = time.process_time()
        results = evaluator.score_along(rates, steps) if name == "finetune" else [evaluator.score(rates)]
        cpu[name] = time.process_time() - began
        keys = [f"finetune@{s}" for s in steps] if name == "finetune" else [name]
        for key, result in zip(keys, results):
            scores[key], seconds[key] = 100.0 * result.top1, result.seconds
    return scores, seconds, cpu


def pick_rates(pick: str, sampler: ActionSampler, evaluators: dict[str, QuickEvaluator], seed: int
               ) -> tuple[dict, float]:
    """``(rates, best score)`` of a ``--picks`` entry: ``uniform`` (score NaN) or ``search:<scorer>``
    (:func:`autocompress.annealing.simulated_annealing` from the sampler's initial action, scored in % top-1
    by that evaluator, :data:`PICK_SEARCH` settings, seeded)."""
    if pick == "uniform":
        return sampler.to_rates(sampler.meet(np.ones(len(sampler.units)))), math.nan
    evaluator = evaluators[pick.split(":", 1)[1]]
    result = simulated_annealing(sampler.initial_action(),
                                 lambda action: 100.0 * evaluator.score(sampler.to_rates(action)).top1,
                                 sampler.perturb, SearchConfig(**PICK_SEARCH).annealing(seed))
    return sampler.to_rates(result.best_action), result.best_score


def run_picks(picks: list[str], seeds: list[int], target: str, sampler, evaluators, model, space, splits, args,
              out: Path) -> None:
    """Append one row per (pick, seed) not yet in ``out``: the pick's rates and best score, its retrained top-1
    (the candidates' proxy, retraining seeded by ``seed``) and the seconds its search took."""
    done = {(r["target"], r["pick"], r["seed"]) for r in read_rows(out)}
    for pick in picks:
        for seed in seeds:
            if (target, pick, seed) in done:
                continue
            began = time.perf_counter()
            rates, best = pick_rates(pick, sampler, evaluators, seed)
            searched = time.perf_counter() - began
            row = {"target": target, "pick": pick, "seed": seed, "best_score": best, "search_seconds": searched,
                   "retrained": retrained_top1(model, space, rates, splits, args.retrain_epochs, seed), "rates": rates}
            with open(out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "rates"}), flush=True)


def picks_markdown(rows: list[dict], picks: list[dict]) -> str:
    """Per target: the random candidates' median (and range) of retrained top-1, and each pick's mean over its
    seeds (with the seeds' values)."""
    lines = ["| target | random candidates: median (min-max) | pick | retrained top-1, mean (per seed) |",
             "|---|---|---|---|"]
    for target in dict.fromkeys(r["target"] for r in picks):
        retrained = [r["retrained"] for r in rows if r["target"] == target]
        head = (f"{statistics.median(retrained):.2f} ({min(retrained):.2f}-{max(retrained):.2f}), n={len(retrained)}"
                if retrained else "-")
        for pick in dict.fromkeys(r["pick"] for r in picks if r["target"] == target):
            values = [r["retrained"] for r in picks if r["target"] == target and r["pick"] == pick]
            lines.append(f"| {target} | {head} | {pick} | {statistics.mean(values):.2f} "
                         f"({', '.join(f'{v:.2f}' for v in values)}) |")
    return "\n".join(lines)


def bootstrap_ci(scores: list[float], retrained: list[float], resamples: int = 1000) -> list[float]:
    """5th and 95th percentile of Spearman over ``resamples`` seeded bootstrap resamples of the candidates
    (resamples where either side is constant are skipped)."""
    rng = np.random.default_rng(0)
    x, y, values = np.asarray(scores), np.asarray(retrained), []
    for _ in range(resamples):
        pick = rng.integers(0, len(x), len(x))
        if np.ptp(x[pick]) > 0 and np.ptp(y[pick]) > 0:
            values.append(spearmanr(x[pick], y[pick]).statistic)
    return [float(np.percentile(values, 5)), float(np.percentile(values, 95))] if values else [math.nan] * 2


def with_combined(rows: list[dict]) -> list[dict]:
    """``rows`` with the library's ``finetune+refit`` score added to each row that has a refit and a finetune
    score: their mean (finetune at its largest step count), timed as both together. It is what the scorer of that
    name computes for the same candidate (``QuickEvaluator.score_along``: the same refit, the same fine-tuning)."""
    out = []
    for row in rows:
        tuned = sorted((k for k in row["scores"] if k.startswith("finetune@")), key=lambda k: int(k.split("@")[1]))
        if "refit" in row["scores"] and tuned and "finetune+refit" not in row["scores"]:
            row = {**row, "scores": {**row["scores"], "finetune+refit": (row["scores"]["refit"]
                                                                        + row["scores"][tuned[-1]]) / 2},
                   "seconds": {**row["seconds"], "finetune+refit": row["seconds"]["refit"]
                               + row["seconds"][tuned[-1]]}}
        out.append(row)
    return out


def summary(rows: list[dict], retests: list[dict] = ()) -> dict:
    """Per target: candidates, Spearman of each scorer with the retrained top-1, median seconds, ranges; with
    ``retests`` covering a target's candidates, the proxy's test-retest Spearman (``retest``) and each scorer's
    Spearman with the mean of both retrainings (``spearman_mean2``)."""
    out, rows = {}, with_combined(rows)
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        retrained = [r["retrained"] for r in mine]
        timed = [r for r in mine if "cpu_seconds" in r]
        cpu = {name: statistics.median(r["cpu_seconds"][name] for r in timed) for name in
               (timed[0]["cpu_seconds"] if timed else {})}
        out[target] = {"candidates": len(mine), "retrained_range": [min(retrained), max(retrained)],
                       "cpu_seconds": cpu, "retrain_cpu_seconds": statistics.median(
                           r["retrain_cpu_seconds"] for r in timed) if timed else None, "scorers": {
            key: {"spearman": float(spearmanr([r["scores"][key] for r in mine], retrained).statistic),
                  "ci90": bootstrap_ci([r["scores"][key] for r in mine], retrained),
                  "seconds": statistics.median(r["seconds"][key] for r in mine),
                  "range": [min(r["scores"][key] for r in mine), max(r["scores"][key] for r in mine)]}
            for key in mine[0]["scores"]}}
        second = {r["candidate"]: r["retrained"] for r in retests if r["target"] == target}
        paired = [r for r in mine if r["candidate"] in second]
        if len(paired) >= 3:
            first, again = [r["retrained"] for r in paired], [second[r["candidate"]] for r in paired]
            mean2 = [(a + b) / 2 for a, b in zip(first, again)]
            out[target]["retest"] = {"candidates": len(paired), "spearman": float(spearmanr(first, again).statistic),
                                     "ci90": bootstrap_ci(first, again)}
            for key, entry in out[target]["scorers"].items():
                entry["spearman_mean2"] = float(spearmanr([r["scores"][key] for r in paired], mean2).statistic)
    return out


def markdown(table: dict) -> str:
    """Rows: scorer; columns: Spearman and median seconds per candidate at each target."""
    targets = list(table)
    keys = list(next(iter(table.values()))["scorers"])
    lines = ["| scorer | " + " | ".join(f"Spearman {t} (n={table[t]['candidates']}; 90% bootstrap)" for t in targets)
             + " | " + " | ".join(f"wall s / candidate {t}" for t in targets) + " |",
             "|---|" + "---|" * (2 * len(targets))]
    for key in keys:
        cells = [f"{table[t]['scorers'][key]['spearman']:.2f} ({table[t]['scorers'][key]['ci90'][0]:.2f} to "
                 f"{table[t]['scorers'][key]['ci90'][1]:.2f})" for t in targets]
        cells += [f"{table[t]['scorers'][key]['seconds']:.1f}" for t in targets]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    retested = [t for t in targets if "retest" in table[t]]
    if retested:
        lines += ["", "| " + " | ".join(["proxy retest / scorer"] + [f"{t} (n={table[t]['retest']['candidates']})"
                                                                       for t in retested]) + " |",
                  "|---|" + "---|" * len(retested),
                  "| proxy vs its own retest (ceiling) | " + " | ".join(
                      f"{table[t]['retest']['spearman']:.2f} ({table[t]['retest']['ci90'][0]:.2f} to "
                      f"{table[t]['retest']['ci90'][1]:.2f})" for t in retested) + " |"]
        lines += [f"| {key} vs the mean of both | " + " | ".join(
            f"{table[t]['scorers'][key]['spearman_mean2']:.2f}" for t in retested) + " |" for key in keys]
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file; a line cut by a kill is dropped (that candidate runs again) and the file
    rewritten without it, so the next row starts on a line of its own."""
    rows, lines = [], path.read_text().splitlines() if path.exists() else []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if len(rows) < len(lines):
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--targets", default="params=10x,params=30x,params=3x")
    parser.add_argument("--dims", default="filter,column")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--finetune-steps", default="25,50")
    parser.add_argument("--bn-batches", type=int, default=10, help="training batches of 64 for BatchNorm")
    parser.add_argument("--val-batches", type=int, default=5, help="validation batches of 256 scored")
    parser.add_argument("--retrain-epochs", type=int, default=1)
    parser.add_argument("--max-train", type=int, default=3000)
    parser.add_argument("--max-test", type=int, default=3000)
    parser.add_argument("--data-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON-lines results (default: results/scorers_<checkpoint>.jsonl)")
    parser.add_argument("--shard", default="0/1", help="K/N: only candidates whose index is K mod N (run N "
                        "processes with the same --out; each appends whole lines)")
    parser.add_argument("--retest", action="store_true", help="retrain each candidate a second time (another "
                        "seed): the proxy's own test-retest Spearman")
    parser.add_argument("--summary-only", action="store_true", help="no new candidates: the table of --out")
    parser.add_argument("--picks", default="", help="comma list of uniform, search:<scorer> (see the docstring)")
    parser.add_argument("--pick-seeds", default="0,1,2", help="seeds of each pick's search and retraining")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.finetune_steps.split(",")]
    shard, shards = (int(part) for part in args.shard.split("/"))
    out = Path(args.out or RESULTS / f"scorers_{Path(args.checkpoint).stem}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out)
    done = {(r["target"], r["candidate"]) for r in rows}
    picks_out = out.with_name(f"{out.stem}_picks.jsonl")
    retest_out = out.with_name(f"{out.stem}_retest.jsonl")
    if args.summary_only:
        print(markdown(summary(rows, read_rows(retest_out))))
        if picks_out.exists():
            print(picks_markdown(rows, read_rows(picks_out)))
        return
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt).eval()
    splits = get_dataset(ckpt["dataset"]["name"], args.data_dir, val_size=5000, seed=args.seed,
                         max_train=args.max_train, max_test=args.max_test)
    space = PruningSpace.build(model, torch.zeros(1, *splits.input_size), dims=DIMS[args.dims])
    evaluators = scorers(model, space, splits, args)
    for target in args.targets.split(","):
        goal = Target.parse(target)
        sampler = ActionSampler.from_space(space, goal.objective, goal.factor)
        if args.picks:
            run_picks(args.picks.split(","), [int(v) for v in args.pick_seeds.split(",")], target, sampler,
                      evaluators, model, space, splits, args, picks_out)
        for index, action in pending(sampler, target, done, args, shard, shards):
            rates = sampler.to_rates(action)
            scores, seconds, cpu = score_candidate(evaluators, rates, steps)
            began, began_cpu = time.perf_counter(), time.process_time()
            retrained = retrained_top1(model, space, rates, splits, args.retrain_epochs, args.seed + index)
            row = {"target": target, "candidate": index, "compression": sampler.compression(action),
                   "scores": scores, "seconds": seconds, "cpu_seconds": cpu, "retrained": retrained,
                   "retrain_seconds": time.perf_counter() - began,
                   "retrain_cpu_seconds": time.process_time() - began_cpu}
            rows.append(row)
            with open(out, "a") as handle:  # append-only log: a kill loses at most the running candidate
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        if args.retest:
            retest(target, sampler, model, space, splits, args, shard, shards, retest_out)
    table = summary(rows, read_rows(retest_out))
    settings = {k: v for k, v in vars(args).items()}
    atomic_write_text(out.with_suffix(".summary.json"), json.dumps({"settings": settings, "table": table}, indent=1))
    print(markdown(table))


if __name__ == "__main__":
    main()
