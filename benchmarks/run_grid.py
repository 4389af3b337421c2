"""Benchmark grid (issue 5): autocompress, its ablations and two peers (Torch-Pruning, NNI 2.10.1
AutoCompressPruner) on the same base checkpoints with the same training-epoch budget.

One entry point::

    .venv/bin/python benchmarks/run_grid.py --models fmnist_cnn --targets params=10x \\
        --methods autocompress,torch_pruning,nni --jobs 2

Each (model, target, method) cell runs in its own subprocess (``--job``), one torch thread each, and writes
``benchmarks/results/runs/<model>__<target>__<method>.json``; finished cells are skipped on a re-run. After
the cells, ``benchmarks/results/grid.csv`` and the table in BENCHMARKS.md (section "Peers and ablations
(issue 5)", between its markers) are rebuilt from every JSON present (``--table-only`` does just that).

Every method's result is measured here the same way, on the compact / physically pruned model: test top-1
(the model's test split, or the seeded ``max_test`` subset), parameters and MACs with
:mod:`autocompress.metrics` (FLOPs = 2 x MACs), CPU latency (median ms) of PyTorch and onnxruntime at batch
1 and 64 with one thread, base and compact timed alternately in the same process.

Epoch budget (all methods, counted in passes over the same ``max_train`` subset): autocompress =
rounds x (ADMM + retraining epochs); Torch-Pruning = fine-tuning epochs; NNI = iterations x (ADMM
iterations x ADMM epochs + fine-tuning epochs).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from autocompress.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NNI_PYTHON = Path(os.environ.get("NNI_PYTHON", "/root/peers/nni-venv/bin/python"))
WORK = Path(os.environ.get("AUTOCOMPRESS_BENCH_WORK", Path.home() / ".cache" / "autocompress-bench"))
SECTION = "## Peers and ablations (issue 5)"
TABLE_START, TABLE_END = "<!-- issue5-table:start -->", "<!-- issue5-table:end -->"


@dataclass(frozen=True)
class ModelSpec:
    """One model of the grid and its budget.

    Attributes:
        checkpoint: base checkpoint (trained with ``autocompress train``; see README for the commands).
        targets: the grid's targets for this model.
        rounds, admm_epochs, retrain_epochs: autocompress's schedule; the epoch budget is
            ``rounds * (admm_epochs + retrain_epochs)`` for every method.
        max_train, max_test, val_size: data subsets (seeded, identical for every method).
        max_evaluations: quick evaluations per annealing round.
        data_dir: dataset folder (None: the dataset's default lookup).
        label: how the table names the model.
    """

    checkpoint: str
    targets: tuple[str, ...]
    rounds: int
    admm_epochs: int
    retrain_epochs: int
    max_train: int | None
    max_test: int | None
    val_size: int = 5000
    max_evaluations: int = 20
    data_dir: str | None = None
    label: str = ""

    @property
    def epochs(self) -> int:
        """Training-epoch budget of every method."""
        return self.rounds * (self.admm_epochs + self.retrain_epochs)


CIFAR = str(Path.home() / ".cache" / "autocompress")
#: the shared CIFAR-10 JPEG archive (extracted once into the cache by autocompress.data)
CIFAR_JPEG = str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz")
MODELS = {
    "fmnist_cnn": ModelSpec("assets/fmnist_cnn_base.pt", ("params=10x", "params=30x"), rounds=2, admm_epochs=2,
                            retrain_epochs=2, max_train=20000, max_test=None, label="fmnist_cnn (Fashion-MNIST)"),
    "resnet20": ModelSpec("benchmarks/results/bases/resnet20_cifar10.pt", ("flops=2x", "flops=4x"), rounds=2,
                          admm_epochs=1, retrain_epochs=1, max_train=10000, max_test=5000, data_dir=CIFAR,
                          label="resnet20 (CIFAR-10)"),
    "vgg16": ModelSpec("benchmarks/results/bases/vgg16_w025_cifar10.pt", ("params=10x", "params=30x"), rounds=2,
                       admm_epochs=1, retrain_epochs=1, max_train=10000, max_test=5000, data_dir=CIFAR,
                       label="vgg16 width 0.25 (CIFAR-10)"),
    # issue 13's realistic grid: a base trained 40 epochs on the full training split, 15 epochs per method on
    # it (the legacy schedule fields are used only by the grid's older methods)
    "resnet20_e40": ModelSpec("benchmarks/results/bases/resnet20_cifar10_e40.pt", ("flops=2x", "flops=4x"),
                              rounds=1, admm_epochs=1, retrain_epochs=14, max_train=None, max_test=None,
                              data_dir=CIFAR_JPEG, label="resnet20 40 epochs, full CIFAR-10 (realistic)"),
}

#: the grid's ADMM rho schedule (ADMMConfig's own default: 1e-3, x2 once per epoch), kept as every cell so far
#: ran it; the compress command's default (0.02, x1.6 every 100 steps) is the ac_fast_rho-like variant's job
GRID_RHO = {"rho_init": 1e-3, "rho_growth": 2.0, "update_interval": None}

#: method -> (table label, CompressConfig overrides) for autocompress variants; peers are handled apart
AUTOCOMPRESS_METHODS = {
    "autocompress": ("autocompress (hybrid, target's objective)", {}),
    "ac_uniform": ("ablation: uniform rates (no search)", {"search_mode": "uniform"}),
    "ac_filter": ("ablation: filter-only", {"dims": "filter"}),
    "ac_no_purification": ("ablation: no purification", {"purification": {"enabled": False}}),
    "ac_no_bn_recal": ("ablation: quick eval without BN re-estimation", {"quick_eval": {"bn_recalibration": False}}),
    # not an ablation: tests whether a faster ADMM penalty schedule fits a short epoch budget better
    "ac_fast_rho": ("variant: ADMM rho 1e-2, x1.5 every 30 steps",
                    {"admm": {"rho_init": 0.01, "rho_growth": 1.5, "update_interval": 30}}),
    # not an ablation either: knowledge distillation from the base model in ADMM and retraining
    "ac_distill": ("variant: + distillation from the base model (T 4, alpha 0.9)",
                   {"distillation": {"enabled": True, "temperature": 4.0, "alpha": 0.9}}),
    # the schedule `make demo` uses: one round straight to the target, the compress command's default rho
    # schedule, the same epoch budget (see one_round_settings)
    "ac_one_round": ("variant: one round, compress's default rho (0.02, x1.6 every 100 steps)", {}),
    "ac_one_round_auto": ("variant: one round, rho 0.02 x1.6 reaching 1.0 halfway through ADMM (auto)",
                          {"admm": {"update_interval": "auto"}}),
    # session 4: a short-budget schedule (see final_retrain_settings) with distillation from the base
    "ac_kd": ("variant ac_kd: a round per decade of the target, 1 ADMM epoch each, the rest in the final "
              "retraining, distillation (T 4, alpha 0.9)",
              {"distillation": {"enabled": True}}),
    "ac_kd_uniform": ("variant: ac_kd's schedule with uniform rates (no search)",
                      {"distillation": {"enabled": True}, "search_mode": "uniform"}),
    # session 7: the library's defaults under one `budget` of the model's epochs (see budget_settings)
    # its rows ran when a flops target's default channel multiple was 1 (any width); pinned since session 12
    "ac_budget": ("autocompress, `budget` = the epoch budget, channel_multiple 1", {"channel_multiple": 1}),
    "ac_budget_uniform": ("ablation: `budget` with uniform rates (no search)", {"search_mode": "uniform"}),
    # session 9 (issue 12): the same with aligned widths (8 on this AVX2 CPU), against Torch-Pruning round_to=8
    "ac_budget_aligned": ("autocompress defaults, `budget`, channel_multiple auto", {"channel_multiple": "auto"}),
    # session 12: the smaller block on an AVX-512 CPU (resnet20's 16-channel groups can shrink at 8, not at 16)
    "ac_budget_m8": ("autocompress defaults, `budget`, channel_multiple 8", {"channel_multiple": 8}),
    # session 15: the defaults once a flops target counts executed MACs (no column pruning where the compact
    # layer still multiplies the pruned columns); the rows above counted kept columns only (see --recount-macs)
    # its rows (seeds 0, 1) ran when `auto` meant the refit scorer; since session 17 see ac_budget_exec_refit
    "ac_budget_exec": ("autocompress defaults, `budget`, flops = executed MACs", {"channel_multiple": "auto"}),
    "ac_budget_exec_uniform": ("ablation: uniform rates, `budget`, flops = executed MACs",
                               {"channel_multiple": "auto", "search_mode": "uniform"}),
    "ac_budget_exec_m1": ("autocompress, `budget`, flops = executed MACs, channel_multiple 1", {"channel_multiple": 1}),
    "ac_budget_exec_m8": ("autocompress, `budget`, flops = executed MACs, channel_multiple 8", {"channel_multiple": 8}),
    # session 16: the budget's one ADMM epoch ends at rho 0.08 with residual 0.6 on the realistic grid (hard
    # pruning then drops to chance); does a converged ADMM start the retraining better?
    "ac_budget_exec_rho_auto": ("autocompress defaults, `budget`, rho reaching 1.0 halfway through the ADMM epoch",
                                {"channel_multiple": "auto", "admm": {"update_interval": "auto"}}),
    "ac_budget_exec_admm3": ("autocompress defaults, the budget split 3 ADMM + 12 retraining epochs",
                             {"channel_multiple": "auto", "budget": None, "rounds": 1, "admm": {"epochs": 3},
                              "retrain": {"epochs": 0}, "final_retrain_epochs": 12,
                              "distillation": {"enabled": True}}),
    # session 16: the refit scorer prefers these widths over Torch-Pruning's at flops=4x (33.5 vs 31.3 %), 50
    # distilled fine-tuning steps prefer Torch-Pruning's (59.4 vs 53.8 %), which retrain 1.1 points higher
    "ac_budget_exec_ft": ("autocompress defaults, `budget`, quick evaluation by 50 distilled fine-tuning steps",
                          {"channel_multiple": "auto", "quick_eval": {"scorer": "finetune"}}),
    # session 17: the same scorer on a params target (Fashion-MNIST 30x: Torch-Pruning + KD led ac_kd by 0.5)
    "ac_budget_ft": ("autocompress, `budget`, quick evaluation by 50 distilled fine-tuning steps",
                     {"quick_eval": {"scorer": "finetune"}}),
    # session 17: `auto` became finetune; the refit-scored search (the default before) for paired seeds
    "ac_budget_exec_refit": ("autocompress defaults but the refit scorer (the default until session 17)",
                             {"channel_multiple": "auto", "quick_eval": {"scorer": "refit"}}),
    # session 18: at equal executed MACs top-1 tracked the parameters kept; per-channel guidance prunes the
    # high-resolution layers (many MACs, few weights per channel) hardest
    "ac_budget_exec_ch": ("autocompress defaults, `budget`, guidance per channel (search.guidance channel)",
                          {"channel_multiple": "auto", "search": {"guidance": "channel"}}),
    # session 18: the same guidance on a params target (auto keeps layer there)
    "ac_budget_ch": ("autocompress, `budget`, guidance per channel (search.guidance channel)",
                     {"search": {"guidance": "channel"}}),
    # session 19: the same settings once the search draws widths it has not scored (ac_budget_exec_ch's 2x search
    # scored 3 distinct candidates in 20)
    "ac_budget_exec_new": ("autocompress defaults (guidance auto), `budget`, the search drawing unscored widths",
                           {"channel_multiple": "auto", "search": {"guidance": "auto"}}),
    "ac_budget_new": ("autocompress defaults, `budget`, the search drawing unscored widths (session 19)",
                      {"search": {"guidance": "auto"}}),
    # session 19: distillation anchors the compact model to a weak base (benchmarks/weak_teacher.py); what does a
    # lighter or no distillation cost on a strong one?
    # (distilling every epoch: distillation.stop_margin came in session 20)
    "ac_budget_a05": ("autocompress defaults, `budget`, distillation alpha 0.5",
                      {"distillation": {"alpha": 0.5, "stop_margin": None}}),
    "ac_budget_nokd": ("autocompress defaults, `budget`, no distillation", {"distillation": {"enabled": False}}),
    "ac_budget_exec_a05": ("autocompress defaults (session 19 search), `budget`, distillation alpha 0.5",
                           {"channel_multiple": "auto", "search": {"guidance": "auto"},
                            "distillation": {"alpha": 0.5, "stop_margin": None}}),
    # session 20: distillation stops once the student passes its teacher on validation (a weak base)
    "ac_budget_stop": ("autocompress defaults (session 20), `budget`: distillation alpha 0.5 until the student "
                       "passes the base", {"search": {"guidance": "auto"}}),
    # session 21: a weak base retrained 0.7 points higher at retraining lr 0.05; what does it do on converged ones?
    "ac_budget_lr05": ("autocompress defaults (session 20), `budget`, retraining lr 0.05",
                       {"search": {"guidance": "auto"}, "retrain": {"lr": 0.05}}),
    # session 24: one ADMM epoch of a short budget left the hard-pruned model where one-shot pruning leaves it
    # (benchmarks/weak_teacher.py); the budget's split with that epoch spent on retraining instead
    "ac_budget_noadmm": ("autocompress defaults (session 20), the budget split 0 ADMM + 15 retraining epochs",
                         {"search": {"guidance": "auto", "start": "guided"}, "budget": None, "rounds": 1,
                          "admm": {"epochs": 0}, "retrain": {"epochs": 0}, "final_retrain_epochs": 15,
                          "distillation": {"enabled": True}}),
    # session 27: the search starts from one global threshold on the filters' relative magnitudes
    # session 29: local swaps join the search's moves as the temperature falls (search.moves: mixed)
    "ac_budget_mixed": ("autocompress, the budget split 0 ADMM + 15 retraining epochs, local and Gaussian moves",
                        {"search": {"guidance": "auto", "start": "guided", "moves": "mixed"}, "budget": None,
                         "rounds": 1, "admm": {"epochs": 0}, "retrain": {"epochs": 0}, "final_retrain_epochs": 15,
                         "distillation": {"enabled": True}}),
    "ac_budget_magnitude": ("autocompress, the budget split 0 ADMM + 15 retraining epochs, magnitude start",
                            {"search": {"guidance": "auto", "start": "magnitude"}, "budget": None, "rounds": 1,
                             "admm": {"epochs": 0}, "retrain": {"epochs": 0}, "final_retrain_epochs": 15,
                             "distillation": {"enabled": True}}),
    # session 31: the refit scorer ranked 20 flops=2x candidates at Spearman 0.90 against the default's 0.79
    # (session 30, 30 validation batches); paired with ac_budget_noadmm's seeds (same schedule and search)
    "ac_budget_refit": ("autocompress, the budget split 0 ADMM + 15 retraining epochs, the refit scorer",
                        {"search": {"guidance": "auto", "start": "guided"}, "budget": None, "rounds": 1,
                         "admm": {"epochs": 0}, "retrain": {"epochs": 0}, "final_retrain_epochs": 15,
                         "distillation": {"enabled": True}, "quick_eval": {"scorer": "refit"}}),
    # session 25: retraining on a one-cycle schedule (15 % warm-up to lr 0.05) was +0.21 on converged small bases
    # (4 seeds, benchmarks/weak_teacher.py) and +0.14 on a fresh user's sequence model (3 seeds)
    "ac_budget_onecycle": ("autocompress defaults (session 24), `budget`, retraining one-cycle to lr 0.05",
                           {"search": {"guidance": "auto"},
                            "retrain": {"lr": 0.05, "schedule": "onecycle", "pct_start": 0.15}}),
    # session 41: the library as shipped, given only the target, the data and `budget` (no grid schedule, dims,
    # guidance or search size: see defaults_settings)
    "ac_defaults": ("autocompress as shipped: only the target and `budget`", {}),
    # session 43: the mean of the finetune and refit scores ranked the recorded flops=2x / 4x candidates at Spearman
    # 0.87 / 0.86 against the default finetune's 0.74 / 0.90 (BENCHMARKS.md "Session 43")
    "ac_defaults_both": ("autocompress as shipped but the finetune+refit scorer",
                         {"quick_eval": {"scorer": "finetune+refit"}}),
}
PEERS = {"torch_pruning": "Torch-Pruning global magnitude", "nni": "NNI 2.10.1 AutoCompressPruner",
         # a reference, not a peer as shipped: Torch-Pruning's model fine-tuned with autocompress's distillation
         "tp_kd": "reference: Torch-Pruning + distillation (T 4, alpha 0.9)",
         "tp_kd_r8": "reference: Torch-Pruning round_to=8 + distillation (T 4, alpha 0.9)",
         # session 19: the library's distillation default became alpha 0.5
         "tp_kd_a05": "reference: Torch-Pruning + distillation (T 4, alpha 0.5)",
         # session 16, a diagnostic: are autocompress's searched widths or its ADMM + hard pruning behind the gap?
         "tp_kd_acwidths": "diagnostic: Torch-Pruning + distillation at the widths `ac_budget_exec` searched"}
#: Torch-Pruning methods: the distillation alpha of their fine-tuning (None: plain fine-tuning)
TP_DISTILL_ALPHA = {"torch_pruning": None, "tp_kd": 0.9, "tp_kd_r8": 0.9, "tp_kd_acwidths": 0.9, "tp_kd_a05": 0.5}
METHODS = list(AUTOCOMPRESS_METHODS) + list(PEERS)
#: opt-in methods, not part of the issue's grid
VARIANTS = ("ac_fast_rho", "ac_distill", "ac_one_round", "ac_one_round_auto", "ac_kd", "ac_kd_uniform", "tp_kd",
            "ac_budget", "ac_budget_uniform", "ac_budget_aligned", "ac_budget_m8", "tp_kd_r8", "ac_budget_exec",
            "ac_budget_exec_uniform", "ac_budget_exec_m1", "ac_budget_exec_m8", "ac_budget_exec_rho_auto",
            "ac_budget_exec_admm3", "tp_kd_acwidths", "ac_budget_exec_ft", "ac_budget_ft",
            "ac_budget_exec_refit", "ac_budget_exec_ch", "ac_budget_ch", "ac_budget_exec_new",
            "ac_budget_new", "ac_budget_a05", "ac_budget_nokd",
            "ac_budget_exec_a05", "tp_kd_a05", "ac_budget_stop", "ac_budget_lr05", "ac_budget_noadmm",
            "ac_budget_onecycle", "ac_budget_magnitude", "ac_budget_mixed", "ac_budget_refit", "ac_defaults",
            "ac_defaults_both")
DEFAULT_METHODS = [m for m in METHODS if m not in VARIANTS]
ABLATIONS = [m for m in AUTOCOMPRESS_METHODS if m != "autocompress"]


def method_label(method: str) -> str:
    """Human-readable name of a method key."""
    return AUTOCOMPRESS_METHODS[method][0] if method in AUTOCOMPRESS_METHODS else PEERS[method]


def cell_id(model: str, target: str, method: str, seed: int = 0) -> str:
    """File-name-safe id of one grid cell, e.g. ``fmnist_cnn__params=10x__nni`` (``...__seed1`` for a
    method seed other than 0)."""
    return f"{model}__{target}__{method}" + (f"__seed{seed}" if seed else "")


# ----------------------------------------------------------------------------------------- measurement
def ort_session(path: str | os.PathLike, threads: int):
    """onnxruntime CPU session of the ``.onnx`` file at ``path`` with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_median_ms(session, batch, runs: int, *, warmup: int = 3) -> float:
    """Median latency (ms) of ``session`` on ``batch`` (a tensor ``[N, C, H, W]``) over ``runs`` runs, after
    ``warmup`` untimed ones."""
    feed = {"input": batch.numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return times[len(times) // 2]


def _ort_latency(model, example, runs: int, threads: int) -> float:
    """Median onnxruntime CPU latency (ms) of ``model`` exported with :func:`autocompress.export.export_onnx`."""
    from autocompress.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, example[:1], path)
        return ort_median_ms(ort_session(path, threads), example, runs)


def measure(base, compact_model, splits, *, threads: int = 1, runs: int = 20, repeats: int = 3) -> dict:
    """Top-1 (test, %), parameters, MACs and latencies (ms) of the base and the compact model.

    Latencies: PyTorch (:func:`autocompress.metrics.measure_latency`) and onnxruntime at batch 1 and 64,
    ``threads`` threads, of the compact model as returned and (onnxruntime only, ``deployed_*`` keys; when it
    has column layers) of its deployed form (:func:`autocompress.deployed_form`: each column layer stored or
    dense, the faster; what ``autocompress export`` writes). The models are timed alternately ``repeats``
    times and each keeps its lowest median: on a loaded machine a spike can only slow a measurement down.
    """
    import torch

    from autocompress import deployed_form, metrics
    from autocompress.training import evaluate

    example = torch.zeros(1, *splits.input_size)
    test = splits.loader("test", 256, shuffle=False, augment=False)
    out = {}
    for name, net in (("base", base), ("compact", compact_model)):
        out[f"{name}_top1"] = 100.0 * evaluate(net, test)["top1"]
        out[f"{name}_params"] = metrics.count_params(net)
        out[f"{name}_macs"] = metrics.count_macs(net, example)
    nets = [("base", base), ("compact", compact_model)]
    deployed = deployed_form(compact_model, example, {"threads": threads}).model
    if deployed is not compact_model:
        nets.append(("deployed", deployed))
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 64):
        x = torch.randn(batch, *splits.input_size, generator=generator)
        n = runs if batch == 1 else max(5, runs // 2)
        for _ in range(repeats):  # alternate the models; keep each one's best median (load spikes only slow)
            for name, net in nets:
                engines = ("ort",) if name == "deployed" else ("pt", "ort")
                for engine in engines:
                    ms = (_ort_latency(net, x, n, threads) if engine == "ort"
                          else metrics.measure_latency(net, x, runs=n, threads=threads).median_ms)
                    key = f"{name}_{engine}_b{batch}_ms"
                    out[key] = min(out.get(key, float("inf")), ms)
    out["test_images"] = len(splits.test)
    out["latency_threads"] = threads
    return out


# ------------------------------------------------------------------------------------------------ cells
def _splits(spec: ModelSpec, ckpt: dict):
    from autocompress.data import get_dataset

    return get_dataset(ckpt["dataset"]["name"], spec.data_dir, val_size=spec.val_size, seed=0,
                       max_train=spec.max_train, max_test=spec.max_test)


def one_round_settings(spec: ModelSpec, target: str) -> dict:
    """Settings of ``ac_one_round``: every round's ADMM and retraining epochs spent in one round to the
    final target, under the compress command's default rho schedule (the same total epoch budget)."""
    from autocompress.config import default_admm

    return {"rounds": 1, "admm": {**dataclasses.asdict(default_admm()), "epochs": spec.rounds * spec.admm_epochs},
            "retrain": {"epochs": spec.rounds * spec.retrain_epochs, "lr": 0.01}}


def final_retrain_settings(spec: ModelSpec, target: str) -> dict:
    """Settings of ``ac_kd``: the library's budget rule (:func:`autocompress.budget.budget_schedule`: a round
    per decade of the target, one ADMM epoch each, no retraining between rounds, the rest of the budget as
    final retraining with distillation) for the model's epoch budget, under the compress command's default
    rho schedule (the grid's other cells run ``GRID_RHO``)."""
    from autocompress.budget import budget_schedule
    from autocompress.config import Target, default_admm

    schedule = budget_schedule(Target.parse(target).factor, spec.epochs)
    return {**schedule, "admm": {**dataclasses.asdict(default_admm()), **schedule["admm"]}}


#: variants whose round / epoch schedule differs from the grid's (same total epoch budget)
SCHEDULES = {"ac_one_round": one_round_settings, "ac_one_round_auto": one_round_settings,
             "ac_kd": final_retrain_settings, "ac_kd_uniform": final_retrain_settings}


def budget_settings(settings: dict, spec: ModelSpec) -> dict:
    """Settings of ``ac_budget``: ``settings`` without the grid's schedule (rounds, ADMM and retraining epochs
    and rho) and with ``budget`` = the model's epoch budget, so the library's rule and defaults decide."""
    kept = {key: value for key, value in settings.items() if key not in ("rounds", "admm", "retrain")}
    return {**kept, "budget": spec.epochs}


def defaults_settings(settings: dict, spec: ModelSpec) -> dict:
    """Settings of ``ac_defaults``: the target, seed, data subsets and latency runs of ``settings`` and
    ``budget`` = the model's epoch budget; every other setting is the library's default."""
    kept = ("target", "seed", "data_dir", "val_size", "max_train", "max_test", "latency_runs")
    return {**{key: settings[key] for key in kept}, "budget": spec.epochs}


def grid_settings(spec: ModelSpec, target: str, seed: int = 0) -> dict:
    """The grid's compress settings for ``spec`` at ``target``: its data subsets, rounds, ADMM (``GRID_RHO``)
    and retraining epochs, quick evaluations per round, run ``seed``; the paper's per-layer guidance, with which
    every row before session 18 ran (the library's default since then is per channel for flops targets)."""
    return {"target": target, "dims": "filter,column", "rounds": spec.rounds, "seed": seed,
            "data_dir": spec.data_dir, "val_size": spec.val_size, "max_train": spec.max_train,
            "max_test": spec.max_test, "admm": {"epochs": spec.admm_epochs, **GRID_RHO},
            "retrain": {"epochs": spec.retrain_epochs, "lr": 0.01},
            "search": {"max_evaluations": spec.max_evaluations, "guidance": "layer"}, "latency_runs": 3}


def merge_settings(settings: dict, overrides: dict) -> dict:
    """``settings`` with ``overrides`` merged over them; a section (dict) is merged key by key, so an
    override such as ``{"admm": {"update_interval": "auto"}}`` keeps the section's other keys."""
    merged = dict(settings)
    for key, value in overrides.items():
        merge = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = {**merged[key], **value} if merge else value
    return merged


def run_autocompress(spec: ModelSpec, target: str, method: str, work: Path, seed: int = 0) -> tuple[object, dict]:
    """One autocompress run with the method's overrides and run seed; returns (compact model, facts)."""
    import autocompress
    from autocompress.cli import main as cli

    settings = grid_settings(spec, target, seed)
    if method in SCHEDULES:
        settings.update(SCHEDULES[method](spec, target))
    if method.startswith("ac_budget"):
        settings = budget_settings(settings, spec)
    if method.startswith("ac_defaults"):
        settings = defaults_settings(settings, spec)
    work.mkdir(parents=True, exist_ok=True)
    config = work.parent / f"{work.name}.yaml"
    atomic_write_text(config, yaml.safe_dump(merge_settings(settings, AUTOCOMPRESS_METHODS[method][1])))
    if cli(["compress", str(ROOT / spec.checkpoint), "--config", str(config), "--out", str(work), "--quiet",
            "--device", "cpu", "--resume-if-exists"]) != 0:
        raise RuntimeError(f"autocompress compress failed for {work}")
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    phase_seconds = {}
    for record in records:
        if record.get("event") == "phase":
            phase_seconds[record["phase"]] = phase_seconds.get(record["phase"], 0.0) + record["seconds"]
    facts = {"search_seconds": phase_seconds.get("search", 0.0), "phase_seconds": phase_seconds,
             "epochs": spec.epochs, "physical": "autocompress compaction"}
    return autocompress.load(work / "model.pt"), facts


def run_torch_pruning(spec: ModelSpec, target: str, work: Path, *, distill: float | None = None,
                      seed: int = 0, round_to: int | None = None, widths_from: Path | None = None
                      ) -> tuple[object, dict]:
    """Torch-Pruning baseline (benchmarks/peers/torch_pruning_baseline.py) in this process; ``distill``: the
    alpha of a fine-tuning with distillation from the base (the ``tp_kd`` references), None: plain fine-tuning;
    ``round_to``: Torch-Pruning's aligned widths (``tp_kd_r8``); ``widths_from``: an autocompress run folder whose
    searched widths to prune to (``tp_kd_acwidths``)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
    import torch_pruning_baseline

    import autocompress

    work.mkdir(parents=True, exist_ok=True)
    out = work / "model.pt"
    facts = torch_pruning_baseline.run(str(ROOT / spec.checkpoint), target, epochs=spec.epochs, lr=0.01,
                                       max_train=spec.max_train, val_size=spec.val_size, data_dir=spec.data_dir,
                                       seed=seed, out=str(out), distill=distill, round_to=round_to,
                                       widths_from=str(widths_from) if widths_from else None)
    facts["physical"] = "torch-pruning"
    return autocompress.load(out), facts


def nni_sparsity(target: str) -> float:
    """Conv-weight (mask) sparsity handed to NNI for a reduction target. Removing channels also removes the
    next layer's input slices, so physical parameters fall faster than the mask density; on fmnist_cnn a
    trial run gave remaining ~ density ** 1.5 (density 0.32 -> 5.9x fewer parameters), hence
    ``s = 1 - factor ** (-2/3)``. The reduction reached is measured and reported, not assumed."""
    from autocompress.config import Target

    return 1.0 - Target.parse(target).factor ** (-2.0 / 3.0)


def nni_physical(base, state: dict, nni_masks: dict, example):
    """Make NNI's masks physical with autocompress's compaction.

    A channel of a coupled filter group (residual adds couple several convs) is removed when NNI masked
    its row in every producer of the group; then the group's BatchNorm entries and the consumers' input
    slices go with it (``PruningSpace.param_masks``), as NNI's ModelSpeedup would do. Other zeros NNI
    left stay as dense zeros. Returns the compact model.
    """
    import torch

    from autocompress.compaction import compact
    from autocompress.masks import Masks
    from autocompress.space import PruningSpace

    model = base
    model.load_state_dict(state)
    space = PruningSpace.build(model, example, dims=("filter",))
    filters = {}
    for group in space.filter_groups:
        keep = torch.zeros(group.size, dtype=torch.bool)
        for producer in group.producers:
            mask = nni_masks.get(producer, {}).get("weight")
            keep |= mask.reshape(mask.shape[0], -1).any(1) if mask is not None else torch.ones_like(keep)
        if not keep.any():
            keep[0] = True
        filters[group.name] = keep
    param_masks = space.param_masks(Masks(filters=filters, columns={}, weights={}))
    for module, entry in nni_masks.items():
        for name, mask in entry.items():
            key = f"{module}.{name}"
            param_masks[key] = param_masks[key] & mask if key in param_masks else mask
    return compact(model, param_masks, example).model


def run_nni(spec: ModelSpec, target: str, work: Path) -> tuple[object, dict]:
    """NNI AutoCompressPruner in its own venv, then its masks made physical here (see :func:`nni_physical`)."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "nni_result.pt"
    iterations = spec.rounds
    command = [str(NNI_PYTHON), "-W", "ignore", str(ROOT / "benchmarks" / "peers" / "nni_autocompress.py"),
               str(ROOT / spec.checkpoint), "--sparsity", f"{nni_sparsity(target):.4f}",
               "--total-iteration", str(iterations), "--admm-iterations", str(spec.admm_epochs),
               "--admm-epochs", "1", "--finetune-epochs", str(spec.retrain_epochs), "--lr", "0.01",
               "--val-size", str(spec.val_size), "--log-dir", str(work / "nni_logs"), "--out", str(out)]
    if spec.max_train:
        command += ["--max-train", str(spec.max_train)]
    if spec.data_dir:
        command += ["--data-dir", spec.data_dir]
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    (work / "nni_stdout.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("NNI_RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"NNI run failed (exit {done.returncode}): {' | '.join(tail)}")
    facts = json.loads(lines[-1][len("NNI_RESULT "):])
    compact_model = nni_compact(spec, work)
    facts.update(epochs=facts["epochs_admm"] + facts["epochs_finetune"], search_seconds=None,
                 physical="autocompress compaction of NNI masks" + (
                     "" if facts.get("speedup_ok") else " (NNI ModelSpeedup failed)"))
    return compact_model, facts


def nni_compact(spec: ModelSpec, work: Path):
    """The compact model of a finished NNI cell (its saved weights and masks through :func:`nni_physical`)."""
    import torch

    from autocompress.checkpoint import load_checkpoint, model_from_checkpoint

    saved = torch.load(work / "nni_result.pt", map_location="cpu", weights_only=True)
    ckpt = load_checkpoint(ROOT / spec.checkpoint)
    example = torch.zeros(1, *ckpt["dataset"]["input_size"])
    return nni_physical(model_from_checkpoint(ckpt), saved["state_dict"], saved["masks"], example)


def remeasure_cell(model: str, target: str, method: str, seed: int = 0, *, threads: int) -> dict:
    """Measure a finished cell again (e.g. on an idle machine) from its saved model; updates its JSON."""
    import torch

    import autocompress
    from autocompress.checkpoint import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(threads)
    spec = MODELS[model]
    work = WORK / cell_id(model, target, method, seed)
    compact_model = nni_compact(spec, work) if method == "nni" else autocompress.load(work / "model.pt")
    ckpt = load_checkpoint(ROOT / spec.checkpoint)
    path = RESULTS / "runs" / f"{cell_id(model, target, method, seed)}.json"
    record = json.loads(path.read_text())
    record.update(measure(model_from_checkpoint(ckpt), compact_model, _splits(spec, ckpt), threads=threads))
    atomic_write_text(path, json.dumps(record, indent=1, default=str))
    return record


def recount_cell(model: str, target: str, method: str, seed: int = 0) -> dict | None:
    """Count the MACs of a finished cell's saved compact model again with the current count and update its
    JSON: since session 15 the MACs the model executes (a column layer that runs the dense conv over its kept
    input channels multiplies their pruned columns too); the count it was recorded with is kept as
    ``compact_macs_recorded`` when it differs. None when the cell's saved model is gone (another machine)."""
    import torch

    import autocompress
    from autocompress import metrics
    from autocompress.checkpoint import load_checkpoint

    spec = MODELS[model]
    work = WORK / cell_id(model, target, method, seed)
    if not (work / "model.pt").exists() and method != "nni":
        return None
    compact_model = nni_compact(spec, work) if method == "nni" else autocompress.load(work / "model.pt")
    example = torch.zeros(1, *load_checkpoint(ROOT / spec.checkpoint)["dataset"]["input_size"])
    path = RESULTS / "runs" / f"{cell_id(model, target, method, seed)}.json"
    record = json.loads(path.read_text())
    macs = metrics.count_macs(compact_model, example)
    if macs != record["compact_macs"]:
        record.setdefault("compact_macs_recorded", record["compact_macs"])
        record["compact_macs"] = macs
        atomic_write_text(path, json.dumps(record, indent=1, default=str))
    return record


def run_cell(model: str, target: str, method: str, seed: int = 0, *, threads: int) -> dict:
    """Run one grid cell in this process and return its result record (also written as JSON). ``seed`` is
    the run's seed (search, training order, and the training / validation subsets, the same for every method
    of that seed); the test images are the same for every seed."""
    import torch

    from autocompress.checkpoint import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(threads)
    spec = MODELS[model]
    work = WORK / cell_id(model, target, method, seed)
    if work.exists() and method not in AUTOCOMPRESS_METHODS:  # a killed peer run: start clean
        import shutil

        shutil.rmtree(work)  # (an autocompress run folder resumes from its last finished phase)
    began = time.perf_counter()
    if method in AUTOCOMPRESS_METHODS:
        compact_model, facts = run_autocompress(spec, target, method, work, seed)
    elif method in TP_DISTILL_ALPHA:
        searched = WORK / cell_id(model, target, "ac_budget_exec", seed) if method == "tp_kd_acwidths" else None
        compact_model, facts = run_torch_pruning(spec, target, work, distill=TP_DISTILL_ALPHA[method], seed=seed,
                                                 round_to=8 if method == "tp_kd_r8" else None, widths_from=searched)
    else:
        compact_model, facts = run_nni(spec, target, work)
    wall = time.perf_counter() - began
    ckpt = load_checkpoint(ROOT / spec.checkpoint)
    numbers = measure(model_from_checkpoint(ckpt), compact_model, _splits(spec, ckpt), threads=threads)
    record = {"model": model, "target": target, "method": method, "seed": seed, "wall_seconds": wall,
              "budget_epochs": spec.epochs, "max_train": spec.max_train, **numbers, **facts}
    path = RESULTS / "runs" / f"{cell_id(model, target, method, seed)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1, default=str))
    return record


# ------------------------------------------------------------------------------------------------ table
COLUMNS = ["model", "target", "method", "seed", "base_top1", "compact_top1", "params_x", "macs_x", "pt_b1_x",
           "pt_b64_x", "ort_b1_x", "ort_b64_x", "ort_deployed_b1_x", "ort_deployed_b64_x", "search_s", "wall_s",
           "epochs", "physical", "base_params", "compact_params", "base_macs", "compact_macs", "macs_recorded_x"]


def row_of(record: dict) -> dict:
    """CSV row of one result record (reductions and speedups as base / compact)."""
    def ratio(key: str, of: str = "compact") -> float:
        return record[f"base_{key}"] / record[f"{of}_{key}"]

    def deployed(batch: int) -> float | str:  # "" for records before session 14 or without column layers
        return round(ratio(f"ort_b{batch}_ms", "deployed"), 2) if f"deployed_ort_b{batch}_ms" in record else ""

    search = record.get("search_seconds")
    return {"model": record["model"], "target": record["target"], "method": record["method"],
            "seed": record.get("seed", 0), "base_top1": round(record["base_top1"], 2),
            "compact_top1": round(record["compact_top1"], 2),
            "params_x": round(ratio("params"), 2), "macs_x": round(ratio("macs"), 2),
            "pt_b1_x": round(ratio("pt_b1_ms"), 2), "pt_b64_x": round(ratio("pt_b64_ms"), 2),
            "ort_b1_x": round(ratio("ort_b1_ms"), 2), "ort_b64_x": round(ratio("ort_b64_ms"), 2),
            "ort_deployed_b1_x": deployed(1), "ort_deployed_b64_x": deployed(64),
            "search_s": "" if search is None else round(search, 1), "wall_s": round(record["wall_seconds"], 1),
            "epochs": record["epochs"], "physical": record.get("physical", ""),
            "base_params": record["base_params"], "compact_params": record["compact_params"],
            "base_macs": record["base_macs"], "compact_macs": record["compact_macs"],
            "macs_recorded_x": round(record["base_macs"] / record["compact_macs_recorded"], 2)
            if "compact_macs_recorded" in record else ""}


def load_rows() -> list[dict]:
    """Rows of every result JSON, in grid order (model, target, method)."""
    rows = [row_of(json.loads(p.read_text())) for p in sorted((RESULTS / "runs").glob("*.json"))]
    order = {m: i for i, m in enumerate(METHODS)}
    models = list(MODELS)
    return sorted(rows, key=lambda r: (models.index(r["model"]), r["target"], order[r["method"]], r["seed"]))


def markdown_table(rows: list[dict]) -> str:
    """The BENCHMARKS.md table (one line per cell)."""
    head = ("| model | target | method | top-1 before -> after (test, %) | params reduction | MACs reduction | "
            "speedup PyTorch b1 / b64 | speedup ORT b1 / b64 | search s | total s | epochs | physical model |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        seed = f" (seed {r['seed']})" if r["seed"] else ""
        form = (f" (deployed form {r['ort_deployed_b1_x']:.2f}x / {r['ort_deployed_b64_x']:.2f}x)"
                if r["ort_deployed_b1_x"] != "" else "")
        recorded = f" (recorded {r['macs_recorded_x']:.2f}x)" if r["macs_recorded_x"] != "" else ""
        lines.append(f"| {MODELS[r['model']].label} | {r['target']} | {method_label(r['method'])}{seed} | "
                     f"{r['base_top1']:.2f} -> {r['compact_top1']:.2f} | {r['params_x']:.2f}x | "
                     f"{r['macs_x']:.2f}x{recorded} | "
                     f"{r['pt_b1_x']:.2f}x / {r['pt_b64_x']:.2f}x | "
                     f"{r['ort_b1_x']:.2f}x / {r['ort_b64_x']:.2f}x{form} | "
                     f"{r['search_s']} | {r['wall_s']} | {r['epochs']} | {r['physical']} |")
    return "\n".join(lines)


def write_outputs(bench_md: Path) -> list[dict]:
    """Rebuild results/grid.csv and the table between the markers of this section of ``bench_md``."""
    rows = load_rows()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(RESULTS / "grid.csv", buffer.getvalue())
    text = bench_md.read_text() if bench_md.exists() else "# Benchmarks\n"
    block = f"{TABLE_START}\n{markdown_table(rows)}\n{TABLE_END}"
    if TABLE_START in text and TABLE_END in text:
        text = re.sub(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    atomic_write_text(bench_md, text)
    return rows


# ------------------------------------------------------------------------------------------------- main
@dataclass
class Plan:
    """The cells to run, in order."""

    cells: list[tuple[str, str, str, int]] = field(default_factory=list)


def plan(models: list[str], targets: list[str] | None, methods: list[str], all_ablation_targets: bool,
         seeds: tuple[int, ...] = (0,)) -> Plan:
    """Cells (model, target, method, seed) of the grid; ablations run at each model's first target only
    unless ``all_ablation_targets``."""
    result = Plan()
    for model in models:
        for index, target in enumerate(MODELS[model].targets):
            if targets and target not in targets:
                continue
            for method in methods:
                if method in ABLATIONS and index > 0 and not all_ablation_targets:
                    continue
                result.cells.extend((model, target, method, seed) for seed in seeds)
    return result


def _seeds(text: str) -> tuple[int, ...]:
    """``--seeds`` value: a comma list of distinct integers >= 0 (argparse type)."""
    try:
        seeds = tuple(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of seeds such as 0,1,2") from None
    if any(seed < 0 for seed in seeds):
        raise argparse.ArgumentTypeError(f"{text!r} has a negative seed; seeds are integers >= 0")
    return seeds


def _spawn(cell: tuple[str, str, str, int], threads: int, log_dir: Path) -> tuple[tuple, int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = log_dir / f"{cell_id(*cell)}.log"
    began = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run([sys.executable, __file__, "--job", *cell[:3], "--seed", str(cell[3]),
                               "--threads", str(threads)], env=env,
                              stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return cell, code, time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="autocompress benchmark grid (issue 5)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--targets", help="comma list filter, e.g. params=10x,params=30x (default: all)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma list of {', '.join(METHODS)} "
                             f"(default: all but the variants {', '.join(VARIANTS)})")
    parser.add_argument("--all-ablation-targets", action="store_true",
                        help="run the ablations at every target (default: each model's first target)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads per cell")
    parser.add_argument("--rerun", action="store_true", help="run cells that already have a result")
    parser.add_argument("--table-only", action="store_true", help="only rebuild grid.csv and the table")
    parser.add_argument("--bench-md", default=str(ROOT / "BENCHMARKS.md"),
                        help="markdown file whose issue-5 table is rewritten (default: %(default)s)")
    parser.add_argument("--log-dir", default="/tmp/autocompress-grid-logs",
                        help="one log per cell (default: %(default)s)")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure the selected finished cells again from their saved models (idle machine)")
    parser.add_argument("--recount-macs", action="store_true",
                        help="count the MACs of the selected finished cells' saved models again (executed MACs)")
    parser.add_argument("--seeds", type=_seeds, default=(0,),
                        help="comma list of run seeds (search, training order and the training / validation subsets "
                             "drawn; for one seed every method draws the same subsets); cells of seed N > 0 are "
                             "stored as ...__seedN")
    parser.add_argument("--job", nargs=3, metavar=("MODEL", "TARGET", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        record = run_cell(*args.job, args.seed, threads=args.threads)
        print(json.dumps(row_of(record)))
        return 0
    if args.remeasure:
        cells = plan(args.models.split(","), args.targets.split(",") if args.targets else None,
                     args.methods.split(","), True, args.seeds).cells
        for cell in cells:
            if (RESULTS / "runs" / f"{cell_id(*cell)}.json").exists():
                print(json.dumps(row_of(remeasure_cell(*cell, threads=args.threads))), flush=True)
    if args.recount_macs:
        cells = plan(args.models.split(","), args.targets.split(",") if args.targets else None,
                     args.methods.split(","), True, args.seeds).cells
        for cell in cells:
            if (RESULTS / "runs" / f"{cell_id(*cell)}.json").exists() and recount_cell(*cell) is None:
                print(f"{cell_id(*cell)}: no saved model in {WORK}, not recounted", flush=True)
    if not args.table_only:
        models, methods = args.models.split(","), args.methods.split(",")
        unknown = [m for m in models if m not in MODELS] + [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"unknown model / method {', '.join(unknown)}")
        cells = plan(models, args.targets.split(",") if args.targets else None, methods,
                     args.all_ablation_targets, args.seeds).cells
        todo = [c for c in cells if args.rerun or not (RESULTS / "runs" / f"{cell_id(*c)}.json").exists()]
        missing = sorted({MODELS[m].checkpoint for m, *_ in todo if not (ROOT / MODELS[m].checkpoint).exists()})
        if missing:
            parser.error(f"base checkpoint(s) missing: {', '.join(missing)} (train them first, see README)")
        log_dir = Path(args.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        print(f"{len(todo)} cell(s) to run, {args.jobs} at a time; logs in {log_dir}", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for cell, code, seconds in pool.map(lambda c: _spawn(c, args.threads, log_dir), todo):
                print(f"{cell_id(*cell)}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s",
                      flush=True)
                write_outputs(Path(args.bench_md))
    rows = write_outputs(Path(args.bench_md))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
