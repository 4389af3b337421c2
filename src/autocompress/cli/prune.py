"""``autocompress prune CHECKPOINT --rates RATES.yaml``: ADMM pruning at given rates, purification, masked
retraining and physical compaction (AutoCompress, Liu et al. AAAI 2020, §3); writes the compact model.

The ``RATES.yaml`` format is :data:`RATES_FORMAT`, printed at the end of ``autocompress prune --help``;
``--list-units`` prints the valid names (and what is excluded, and why). The compact model is written with
``serialization.save_compact`` (atomic; an existing ``--out`` is only replaced with ``--overwrite``) and
``autocompress.load(OUT)`` rebuilds it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import yaml

from ..errors import UserError
from ..text import plural
from .compress import AUGMENT_HELP, IGNORE_HELP
from .workload import AUGMENTS

_DIMS = ("filter,column", "filter", "column", "irregular", "filter,column,irregular")
_UNIT_NOUNS = {"filter": "channel", "column": "column", "irregular": "weight"}

#: the RATES.yaml format (what :func:`read_rates` and ``pruning.expand_rates`` accept), the epilog of --help
RATES_FORMAT = """\
RATES.yaml: the fraction of each unit to remove, a number in [0, 1); every key is optional:

  default: 0.5                     # every unit of the --dims kinds that is not named below
  filter: {features.0.0: 0.3}      # filter groups (output channels), by root module name
  column: {classifier: 0.8}        # columns of a Conv2d / Linear layer, by module name
  irregular: {features.3.0: 0.9}   # single weights, by module name

A named unit's rate overrides default; a unit neither named nor covered by default is not pruned. Each
kind must be among --dims (filter and column are by default; irregular needs --dims with irregular).
`autocompress prune CHECKPOINT --dims DIMS --list-units` prints the valid names. Example:

  echo "default: 0.5" > rates.yaml
  autocompress prune base.pt --rates rates.yaml --out base-pruned.pt
"""


def _interval(text: str) -> int | str:
    """``--update-interval`` value: ``auto`` or a positive number of optimiser steps."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a number of steps") from None


def _tolerance(text: str) -> float:
    """``--purify-tolerance`` value: a finite fraction >= 0 (0.005 = half a top-1 point)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction such as 0.005") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction >= 0, e.g. 0.005 (half a top-1 point)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``autocompress prune``."""
    from ..config import default_admm

    admm = default_admm()
    parser.epilog, parser.formatter_class = RATES_FORMAT, argparse.RawDescriptionHelpFormatter
    parser.add_argument("checkpoint", help="trained checkpoint (.pt) from `autocompress train`")
    parser.add_argument("--rates", help="RATES.yaml (format below); required unless --list-units")
    parser.add_argument("--dims", choices=_DIMS, default="filter,column", metavar="DIMS",
                        help=f"unit kinds to prune: {' | '.join(_DIMS)} (default filter,column)")
    parser.add_argument("--list-units", action="store_true", help="print the prunable units and exit")
    parser.add_argument("--ignore", action="append", default=[], metavar="MODULE", help=IGNORE_HELP)
    parser.add_argument("--admm-epochs", type=int, default=10, help="ADMM W-step epochs (0: one-shot)")
    parser.add_argument("--admm-lr", type=float, default=admm.lr,
                        help="W-step learning rate (default: the optimiser's fine-tuning rate, 0.01 for SGD)")
    parser.add_argument("--rho-init", type=float, default=admm.rho_init,
                        help=f"ADMM penalty at the start (default {admm.rho_init}, as compress)")
    parser.add_argument("--rho-growth", type=float, default=admm.rho_growth,
                        help=f"rho multiplier per Z/U update (default {admm.rho_growth})")
    parser.add_argument("--rho-max", type=float, default=admm.rho_max, help=f"cap on rho (default {admm.rho_max})")
    parser.add_argument("--update-interval", type=_interval, default=admm.update_interval,
                        help="optimiser steps between ADMM Z/U updates, or auto: rho reaches --rho-max halfway "
                             f"through the ADMM epochs (default {admm.update_interval})")
    parser.add_argument("--retrain-epochs", type=int, default=10, help="masked retraining epochs (0: none)")
    parser.add_argument("--retrain-lr", type=float, default=0.01)
    parser.add_argument("--no-purify", action="store_true", help="skip purification")
    parser.add_argument("--purify-tolerance", type=_tolerance, default=0.005,
                        help="largest validation top-1 drop accepted by redundant weight removal (fraction)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--augment", choices=AUGMENTS, default=AUGMENTS[0], help=AUGMENT_HELP)
    parser.add_argument("--data-dir", help="default: the dataset's lookup order (a folder the checkpoint "
                        "records is never read unless you pass it here)")
    parser.add_argument("--max-train", type=int, help="use a seeded subset of this many training images")
    parser.add_argument("--max-test", type=int, help="report test top-1 on a seeded subset of this many images")
    parser.add_argument("--seed", type=int, default=0, help="data order, augmentation, dropout")
    parser.add_argument("--dataset", help="dataset when the checkpoint records none (fashion-mnist, cifar10, "
                        "imagefolder)")
    parser.add_argument("--val-size", type=int, help="validation images (default: the checkpoint's, else 5000)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--out", help="compact model path (default: <checkpoint>-pruned.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bars")


def read_rates(path: str | None) -> dict:
    """Parse ``RATES.yaml``. Raises UserError if it is missing, unreadable or not a YAML mapping."""
    if path is None:
        raise UserError("no rates given", "pass --rates RATES.yaml (see `autocompress prune --help`)")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"rates file {path} does not exist", "pass the path of a RATES.yaml file")
    try:
        spec = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"rates file {path} is not valid YAML ({str(exc).splitlines()[0]})",
                        "write e.g. `default: 0.5`") from exc
    if not isinstance(spec, dict):
        raise UserError(f"rates file {path} does not hold a mapping", "write e.g. `default: 0.5`")
    return spec


def check_writable(out: Path) -> None:
    """UserError now, before any work, when ``out`` is a folder or its folder cannot take a file (missing,
    read-only, full)."""
    import tempfile

    if out.is_dir():
        raise UserError(f"--out {out} is a folder; prune writes one model file",
                        f"pass a file path such as {out / 'pruned.pt'}")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write {out} ({exc.strerror or type(exc).__name__})",
                        "pass an --out on a writable disk") from None


def _units_listing(space) -> str:
    lines = []
    for kind in ("filter", "column", "irregular"):
        units = space.units(kind)
        if kind in space.dims:
            lines.append(f"{kind} ({len(units)}):")
            lines += [f"  {u.name}  ({plural(u.size, _UNIT_NOUNS[kind])})" for u in units]
    if space.excluded:
        lines.append("excluded:")
        lines += [f"  {name or '<model>'}: {reason}" for name, reason in space.excluded.items()]
    return "\n".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def run(args: argparse.Namespace) -> int:
    """Prune; returns 0. Raises UserError on bad input (the CLI prints one line and exits 2)."""
    from ..admm import ADMMConfig
    from ..config import DIMS, SettingError
    from ..pruning import expand_rates, prune
    from ..serialization import save_compact
    from ..space import PruningSpace
    from ..task import resolve_device
    from ..training import TrainConfig, evaluate
    from .compress import flag_message
    from .workload import DataSettings, load_workload

    dims = DIMS[args.dims]
    device = resolve_device(args.device)
    data = DataSettings(dataset=args.dataset, data_dir=args.data_dir, val_size=args.val_size,
                        max_train=args.max_train, max_test=args.max_test, batch_size=args.batch_size,
                        augment=args.augment)
    try:
        data.validate()
        admm = ADMMConfig(epochs=args.admm_epochs, lr=args.admm_lr, rho_init=args.rho_init,
                          rho_growth=args.rho_growth, rho_max=args.rho_max, update_interval=args.update_interval)
    except SettingError as exc:
        raise flag_message(exc, args) from None
    retrain = TrainConfig(epochs=args.retrain_epochs, lr=args.retrain_lr, batch_size=args.batch_size,
                          seed=args.seed).validate(epochs_flag="--retrain-epochs", retraining=True)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(Path(args.checkpoint).stem + "-pruned.pt")

    def space_of(model, example) -> PruningSpace:
        try:
            return PruningSpace.build(model, example, dims=dims, ignored_layers=args.ignore)
        except SettingError as exc:  # a wrong --ignore name
            raise flag_message(exc, args) from None

    if args.list_units:
        from . import read_checkpoint
        from ..checkpoint import model_from_checkpoint

        ckpt = read_checkpoint(args.checkpoint, args.model_arg)
        size = (ckpt.get("dataset") or {}).get("input_size")
        if not size:
            raise UserError(f"checkpoint {args.checkpoint} records no input size",
                            "re-save it with `autocompress train`")
        import torch

        print(_units_listing(space_of(model_from_checkpoint(ckpt).eval(), torch.zeros(1, *size))))
        return 0
    spec = read_rates(args.rates)
    check_writable(out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists", "pass --overwrite to replace it, or another --out")
    workload = load_workload(args.checkpoint, data, seed=args.seed, model_args=args.model_arg)
    expand_rates(space_of(workload.model, workload.example), spec, dims)  # before training
    print(workload.augmentation_line(), flush=True)
    began = time.perf_counter()
    result = prune(workload.model, spec, example_inputs=workload.example,
                   train_loader=workload.train_loader(args.batch_size), val_loader=workload.loader("val"),
                   device=device, dims=dims, admm=admm, retrain=retrain, purify=not args.no_purify,
                   purify_tolerance=args.purify_tolerance, seed=args.seed, ignored_layers=args.ignore,
                   progress=not args.no_progress and sys.stderr.isatty(),  # bars on a terminal only
                   log=lambda line: print(line, flush=True))
    report = result.report
    test = workload.loader("test")
    test_before = evaluate(workload.model.to(device), test)["top1"]
    test_after = evaluate(result.compact_model, test)["top1"]
    metrics = {"params": report["params_after"], "macs": report["macs_after"],
               "compression_rate": report["compression_rate"], "mac_reduction": report["mac_reduction"],
               "val_top1": report["score"]["after"], "test_top1": test_after, "base_test_top1": test_before}
    config = {"rates": report["rates"], "dims": list(dims), "admm": vars(admm), "retrain": vars(retrain),
              "purify": not args.no_purify, "ignored_layers": args.ignore, "source": str(args.checkpoint)}
    save_compact(out, result.compact_model.cpu(), base_checkpoint=workload.ckpt, metrics=metrics, config=config,
                 sparse="irregular" in dims)
    rows = [("parameters", f"{report['params_before']:,}", f"{report['params_after']:,}",
             f"{report['compression_rate']:.2f}x"),
            ("MACs / image", f"{report['macs_before']:,}", f"{report['macs_after']:,}",
             f"{report['mac_reduction']:.2f}x"),
            ("val top-1", _pct(report["score"]["before"]), _pct(report["score"]["after"]), ""),
            ("test top-1", _pct(test_before), _pct(test_after), "")]
    print(f"\n{'':14} {'before':>14} {'after':>14} {'ratio':>8}")
    for label, before, after, ratio in rows:
        print(f"{label:14} {before:>14} {after:>14} {ratio:>8}")
    for clip in report.get("clipped", []):
        print(f"clipped: {clip['kind']} rate {clip['rate']} of {clip['name']} would remove all "
              f"{plural(clip['size'], 'unit')}; kept {clip['kept']}")
    print(f"compact model written to {out} ({time.perf_counter() - began:.0f} s)")
    return 0
