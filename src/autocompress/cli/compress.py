"""``autocompress compress``: AutoCompress a checkpoint to a target, in progressive rounds."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``autocompress compress``."""
    parser.add_argument("checkpoint", nargs="?", help="trained checkpoint (omit with --resume)")
    parser.add_argument("--target", help="OBJECTIVE=FACTORx, e.g. params=20x or flops=8x")
    parser.add_argument("--dims", help="filter,column (hybrid, default) | filter | column | irregular")
    parser.add_argument("--rounds", help="'doubling' (default), a number of rounds, or targets '2,4,10'")
    parser.add_argument("--config", help="run.yaml with any CompressConfig setting (flags override it)")
    parser.add_argument("--out", help="run folder (default runs/compress-<checkpoint name>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR")
    parser.add_argument("--resume-if-exists", action="store_true",
                        help="with --out: resume when the folder already holds a run, else start one")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--admm-epochs", type=int, help="ADMM W-step epochs per round")
    parser.add_argument("--retrain-epochs", type=int, help="masked retraining epochs per round")
    parser.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bars or phase log")


def _config(args: argparse.Namespace):
    from ..compress import CompressConfig

    config = CompressConfig.from_yaml(args.config) if args.config else CompressConfig()
    for key in ("target", "dims", "seed", "data_dir"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    if args.rounds is not None:
        config.rounds = args.rounds if args.rounds == "doubling" or args.rounds.isdigit() else \
            [float(t) for t in args.rounds.split(",")]
    if args.admm_epochs is not None:
        config.admm = {**config.admm, "epochs": args.admm_epochs}
    if args.retrain_epochs is not None:
        config.retrain = {**config.retrain, "epochs": args.retrain_epochs}
    if args.target is None and "target" not in _yaml_keys(args.config):
        raise UserError("no --target given", "pass e.g. --target params=10x (or a --config with a target)")
    return config


def _yaml_keys(path: str | None) -> set:
    """Top-level keys of a (valid) config file; empty without one."""
    import yaml

    return set(yaml.safe_load(Path(path).read_text()) or {}) if path else set()


def _check_same_run(compressor, args: argparse.Namespace) -> None:
    """--resume-if-exists continues a run only when CHECKPOINT and the settings asked for are the stored ones."""
    import dataclasses

    asked, stored = dataclasses.asdict(_config(args)), dataclasses.asdict(compressor.config)
    changed = sorted(key for key in asked if asked[key] != stored[key])
    if args.checkpoint and Path(args.checkpoint).resolve() != compressor.checkpoint_path.resolve():
        changed.insert(0, "checkpoint")
    if changed:
        raise UserError(f"run folder {args.out} holds a run with other settings ({', '.join(changed)})",
                        "choose another --out, or resume it unchanged with --resume")


def run(args: argparse.Namespace) -> int:
    """Start or resume a run, then print the final table. Returns 0."""
    from ..compress import Compressor
    from ..report import final_table_rows

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    progress = not args.quiet
    if args.resume:
        given = [flag for flag, value in (("CHECKPOINT", args.checkpoint), ("--target", args.target),
                 ("--dims", args.dims), ("--rounds", args.rounds), ("--config", args.config),
                 ("--out", args.out), ("--seed", args.seed), ("--data-dir", args.data_dir),
                 ("--admm-epochs", args.admm_epochs), ("--retrain-epochs", args.retrain_epochs))
                 if value is not None]
        if given:
            raise UserError(f"--resume continues a run with its stored config.yaml; {', '.join(given)} "
                            "cannot change it", f"drop {', '.join(given)}, or start a new run with --out")
    out = args.resume or args.out
    if args.resume or (args.resume_if_exists and out and (Path(out) / "config.yaml").exists()):
        compressor = Compressor.resume(out, progress=progress)
        if not args.resume:  # --resume-if-exists: only the run these flags would start
            _check_same_run(compressor, args)
    else:
        if not args.checkpoint:
            raise UserError("no checkpoint given", "pass CHECKPOINT, or --resume RUN_DIR to continue a run")
        out = out or f"runs/compress-{Path(args.checkpoint).stem}"
        compressor = Compressor.start(args.checkpoint, _config(args), out, progress=progress)
    final = compressor.run()
    rows = final_table_rows(final)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    print(f"run folder: {out} (model.pt, report.html, metrics.jsonl, config.yaml)")
    return 0
