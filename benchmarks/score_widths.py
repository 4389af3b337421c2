"""Quick-evaluation scores of whole width vectors (session 16, issue 13): does the search's scorer rank
Torch-Pruning's global-magnitude widths and autocompress's searched widths the way 15 epochs of retraining do?

For resnet20_e40 (the realistic grid's base) it scores, with ``benchmarks/fidelity.py``'s evaluators (scorers
``refit`` and ``finetune``: 5 BatchNorm batches of 64, 10 validation batches of 256, 50 distilled steps, seed 0,
filter units at channel multiple 1), Torch-Pruning's widths at flops=2x and 4x and the widths of the autocompress run
folders named on the command line (their last round's kept filters)::

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/score_widths.py \\
        ~/.cache/autocompress-bench/resnet20_e40__flops=4x__ac_budget_exec
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "benchmarks" / "peers")]

import fidelity  # noqa: E402
import run_grid  # noqa: E402
import torch_pruning_baseline as tpb  # noqa: E402
from autocompress.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from autocompress.config import Target  # noqa: E402
from autocompress.data import get_dataset  # noqa: E402
from autocompress.space import PruningSpace  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    spec = run_grid.MODELS["resnet20_e40"]
    ckpt = load_checkpoint(ROOT / spec.checkpoint)
    model = model_from_checkpoint(ckpt).eval()
    splits = get_dataset(ckpt["dataset"]["name"], spec.data_dir, val_size=5000, seed=0, max_train=None, max_test=1)
    example = torch.zeros(1, *splits.input_size)
    space = PruningSpace.build(model, example, dims=("filter",), executed_macs_only=True)

    evaluators = fidelity.scorers(model, space, splits, SimpleNamespace(bn_batches=5, val_batches=10, seed=0))
    sizes = {group.name: group.size for group in space.filter_groups}
    candidates = {}
    for target in ("flops=2x", "flops=4x"):
        pruned = tpb.prune_to_target(model, example, Target.parse(target)).model
        candidates[f"Torch-Pruning {target}"] = {n: m.out_channels for n, m in pruned.named_modules() if n in sizes}
    for run in sys.argv[1:]:
        widths = tpb.searched_widths(run)
        candidates[Path(run).name] = {name: widths.get(name, size) for name, size in sizes.items()}
    print("| widths | refit (%) | finetune (%) |\n|---|---|---|")
    for name, widths in candidates.items():
        rates = {"filter": {n: 1 - widths[n] / sizes[n] for n in sizes}, "column": {}, "irregular": {}}
        scores = [100 * evaluators[s].score(rates).top1 for s in ("refit", "finetune")]
        print(f"| {name} | {scores[0]:.2f} | {scores[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
