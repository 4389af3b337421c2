"""Architecture battery (issue 16): torchvision classifiers and the fuzzer's blocks, one-shot, in four modes.

Stands in for the 27 held-back architectures of issue 16. Each model runs through the fuzzer's one-shot
path (``tests/test_fuzz_architectures.oneshot``: ``PruningSpace.build`` -> ``project`` -> ``purify``
(unused path removal) -> ``compact``) in the modes filter 0.5, column 0.5, hybrid 0.5 and irregular 0.7,
with a batch-1 example and a batch-2 second input of another size. A cell is

* **PASS**: the compact model runs at the example, the second size and in train mode (forward and
  backward); its eval output equals the model masked at the requested rates within
  ``1e-5 * max(1, max|output|)``; parameters, MACs and widths are what the space reports / the rates ask;
  the input model is unchanged (every check of ``oneshot``);
* **REFUSED**: a one-line ``UserError`` naming a module (the reason is printed);
* **FAIL**: anything else (the exception's first line is printed).

With ``--probe`` it also runs the start of a ``compress`` run (``Compression`` at ``flops=2x``, ``budget: 1``,
``channel_multiple: 1``, 16 random images of the example's shape as both loaders): the compaction probe that leaves
out, before any training, the filter groups whose compact model breaks (PASS: none left out; LEFT OUT: the groups
and why; REFUSED: a one-line ``UserError``, e.g. an unreachable target; FAIL: anything else); ``--probe-seed``
draws other weights and images.

With ``--tp`` it also runs Torch-Pruning 1.6 (``MagnitudePruner``, L2 magnitude, ratio 0.5, the classifier
ignored) on each model and checks that its result runs at both sizes and in train mode; a refusal of ours
is acceptable only where that fails too (or where Torch-Pruning's result is inexact, see docs/SUPPORT.md).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/arch_battery.py [--models a,b] [--modes m]
        [--tp] [--probe [--probe-seed S]] [--json benchmarks/results/arch_battery.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from autocompress.atomic import atomic_write_text  # noqa: E402
from autocompress.errors import UserError  # noqa: E402
from autocompress.space import PruningSpace, is_weight_layer  # noqa: E402
from test_fuzz_architectures import BLOCKS, MODES, Net, oneshot  # noqa: E402

tv = torchvision.models


def _vit():
    """A small torchvision VisionTransformer (the ViT-B/16 code, 2 layers, width 32, 32x32 inputs)."""
    return tv.vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                   hidden_dim=32, mlp_dim=64, num_classes=10)


def _swin():
    """A small torchvision SwinTransformer (the swin_t code, embed 24, depths 1-1-2-1, window 4)."""
    return tv.swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[1, 1, 2, 1],
                                               num_heads=[1, 1, 2, 2], window_size=[4, 4], num_classes=10)


#: name -> (constructor, example shape without batch, second shape or None)
TORCHVISION = {
    "resnet18": (lambda: tv.resnet18(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "resnet50": (lambda: tv.resnet50(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "resnext50_32x4d": (lambda: tv.resnext50_32x4d(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "regnet_x_400mf": (lambda: tv.regnet_x_400mf(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "regnet_y_400mf": (lambda: tv.regnet_y_400mf(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "shufflenet_v2_x0_5": (lambda: tv.shufflenet_v2_x0_5(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "convnext_tiny": (lambda: tv.convnext_tiny(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "densenet121": (lambda: tv.densenet121(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "squeezenet1_1": (lambda: tv.squeezenet1_1(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "googlenet": (lambda: tv.googlenet(num_classes=10, aux_logits=True, init_weights=False), (3, 64, 64),
                  (3, 80, 80)),
    "inception_v3": (lambda: tv.inception_v3(num_classes=10, aux_logits=True, init_weights=False),
                     (3, 299, 299), (3, 307, 307)),  # the train-mode auxiliary head needs >= 299
    "mnasnet0_5": (lambda: tv.mnasnet0_5(num_classes=10), (3, 64, 64), (3, 80, 80)),
    "vit_small": (_vit, (3, 32, 32), None),
    # GroupNorm instead of BatchNorm (torchvision's norm_layer): 8 groups in a residual net, 32 groups after
    # 32-group convs, one group (LayerNorm-like) around depthwise convs
    "resnet18_gn": (lambda: tv.resnet18(num_classes=10, norm_layer=lambda c: nn.GroupNorm(8, c)), (3, 64, 64),
                    (3, 80, 80)),
    "resnext50_32x4d_gn": (lambda: tv.resnext50_32x4d(num_classes=10, norm_layer=lambda c: nn.GroupNorm(32, c)),
                           (3, 64, 64), (3, 80, 80)),
    "mobilenet_v2_gn1": (lambda: tv.mobilenet_v2(num_classes=10, norm_layer=lambda c: nn.GroupNorm(1, c)),
                         (3, 64, 64), (3, 80, 80)),
    "swin_small": (_swin, (3, 64, 64), (3, 96, 96)),
}
BLOCK_NETS = {f"block_{b.__name__}": (lambda b=b: Net([b]), (3, 8, 8), (3, 12, 12)) for b in BLOCKS}
MODELS = {**TORCHVISION, **BLOCK_NETS}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {text[0][:200] if text else ''} ({Path(where.filename).name}:{where.lineno})"


def run_cell(name: str, mode: str) -> dict:
    """One (model, mode) cell: ``{"status": PASS|REFUSED|FAIL, "reason": str, "seconds": float}``."""
    build, shape, second_shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    example = torch.randn(1, *shape)
    second = torch.randn(2, *second_shape) if second_shape else None
    start = time.perf_counter()
    refusals: list[str] = []
    try:
        compact = oneshot(model, example, mode, second=second, refusals=refusals)
        status, reason = ("PASS", "") if compact is not None else ("REFUSED", refusals[-1])
    except Exception as exc:  # noqa: BLE001 - a battery records every failure
        status, reason = "FAIL", _first_line(exc)
    cell = {"status": status, "reason": reason, "seconds": round(time.perf_counter() - start, 1)}
    if mode == "filter" and status == "PASS":
        space = PruningSpace.build(model, example, dims=("filter",))
        layers = [n for n, m in model.named_modules() if is_weight_layer(m)]
        cell["excluded"] = {n: r for n, r in space.excluded.items() if n in layers or not n}
        cell["reason"] = (f"{len(space.filter_groups)} filter groups; {len(cell['excluded'])} of {len(layers)} "
                          "layers not filter-pruned")
    return cell


def run_probe(name: str, seed: int = 0) -> dict:
    """The start of a ``compress`` run on ``name`` (see the module doc), its weights and images drawn after
    ``torch.manual_seed(seed)``: ``{"status": PASS|LEFT OUT|REFUSED|FAIL, "reason", "seconds"}``."""
    from torch.utils.data import DataLoader, TensorDataset

    from autocompress.compress import Compression

    build, shape, _ = MODELS[name]
    torch.manual_seed(seed)
    model = build().eval()
    images = DataLoader(TensorDataset(torch.randn(16, *shape), torch.randint(0, 3, (16,))), batch_size=8)
    start = time.perf_counter()
    try:
        run = Compression(model, torch.randn(1, *shape), "flops=2x", task_args=dict(train_loader=images,
                          val_loader=images), device="cpu", config={"budget": 1, "channel_multiple": 1},
                          progress=False, log=lambda _line: None)
        left = run.pipeline.incompactable
        status = "LEFT OUT" if left else "PASS"
        reason = "; ".join(f"{group}: {why}" for group, why in left.items()) or \
            f"{len(run.first_space.filter_groups)} filter groups"
    except UserError as exc:
        status, reason = "REFUSED", _first_line(exc)
    except Exception as exc:  # noqa: BLE001 - a battery records every failure
        status, reason = "FAIL", _first_line(exc)
    return {"status": status, "reason": reason, "seconds": round(time.perf_counter() - start, 1)}


class _TimedOut(Exception):
    pass


def _alarm(_signum, _frame):
    raise _TimedOut()


def run_torch_pruning(name: str, timeout: int = 300) -> dict:
    """Torch-Pruning 1.6 filter pruning at ratio 0.5 (classifier ignored); PASS when its result runs at the
    example, the second size and in train mode (forward and backward); FAIL after ``timeout`` seconds."""
    import torch_pruning as tp

    build, shape, second_shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    example = torch.randn(1, *shape)
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features in (3, 10)]
        heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        before = sum(p.numel() for p in model.parameters())
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=0.5, ignored_layers=ignored, num_heads=heads)
        pruner.step()
        with torch.no_grad():
            model(example)
            if second_shape:
                model(torch.randn(2, *second_shape))
        model.train()
        out = model(torch.randn(2, *shape))
        out = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in out if isinstance(o, torch.Tensor)).backward()
        after = sum(p.numel() for p in model.parameters())
        status, reason = "PASS", f"params {before} -> {after}"
    except _TimedOut:
        status, reason = "FAIL", f"did not finish in {timeout} s"
    except Exception as exc:  # noqa: BLE001
        status, reason = "FAIL", _first_line(exc)
    finally:
        signal.alarm(0)
    return {"status": status, "reason": reason, "seconds": round(time.perf_counter() - start, 1)}


def table(results: dict) -> str:
    """Markdown table: model x mode status (+ Torch-Pruning), then the reasons of non-PASS cells."""
    modes = [mode for mode in MODES if any(mode in cells for cells in results.values())]
    has_tp = any("torch_pruning" in r for r in results.values())
    has_probe = any("probe" in r for r in results.values())
    head = ["model", *modes] + (["start-of-run probe"] if has_probe else []) + (
        ["Torch-Pruning 1.6 (filter)"] if has_tp else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for name, cells in results.items():
        row = [name] + [cells[m]["status"] if m in cells else "-" for m in modes]
        if has_probe:
            row.append(cells.get("probe", {}).get("status", "-"))
        if has_tp:
            row.append(cells.get("torch_pruning", {}).get("status", "-"))
        lines.append("| " + " | ".join(row) + " |")
        for key, cell in cells.items():
            if cell["status"] != "PASS" or key == "filter":
                notes.append(f"* {name} / {key}: {cell['status']}: {cell['reason']}")
    counted = [c for cells in results.values() for k, c in cells.items() if k in modes or k == "probe"]
    counts = {s: sum(c["status"] == s for c in counted) for s in ("PASS", "REFUSED", "FAIL")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return "\n".join(lines + ["", f"Cells: {summary}.", ""] + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names (default: all)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--tp", action="store_true", help="also run Torch-Pruning 1.6 in filter mode")
    parser.add_argument("--probe", action="store_true", help="also run the start of a compress run (its probe)")
    parser.add_argument("--probe-seed", type=int, default=0, help="torch seed of the probe's model and images")
    parser.add_argument("--tp-timeout", type=int, default=300, help="seconds before Torch-Pruning counts as FAIL")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (merged if present)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    results: dict = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    for name in names:
        cells = results.setdefault(name, {})
        for mode in filter(None, args.modes.split(",")):  # --modes "" with --probe: the probe alone
            cells[mode] = run_cell(name, mode)
            print(f"{name:24s} {mode:9s} {cells[mode]['status']:7s} {cells[mode]['seconds']:7.1f}s "
                  f"{cells[mode]['reason']}", flush=True)
        if args.probe:
            cells["probe"] = run_probe(name, args.probe_seed)
            print(f"{name:24s} {'probe':9s} {cells['probe']['status']:7s} {cells['probe']['reason']}", flush=True)
        if args.tp:
            cells["torch_pruning"] = run_torch_pruning(name, args.tp_timeout)
            print(f"{name:24s} {'TP':9s} {cells['torch_pruning']['status']:7s} "
                  f"{cells['torch_pruning']['reason']}", flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps(results, indent=1))
    print(table({n: results[n] for n in names}))


if __name__ == "__main__":
    main()
