"""``autocompress compress``: AutoCompress a checkpoint to a target, in progressive rounds."""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from pathlib import Path

from ..errors import UserError

#: flag -> the config setting it overrides (``section.key``: a key of a section, e.g. ``admm: {epochs: 3}``)
FLAG_SETTINGS = {"--target": "target", "--dims": "dims", "--rounds": "rounds", "--seed": "seed",
                 "--data-dir": "data_dir", "--admm-epochs": "admm.epochs", "--retrain-epochs": "retrain.epochs"}
#: flag named in a validation message -> the settings it can stand for, first match wins: the compress flags,
#: and those of ``autocompress train`` that ``TrainConfig.validate`` names for the retrain section
_MESSAGE_FLAGS = {**{flag: (setting,) for flag, setting in FLAG_SETTINGS.items()},
                  "--batch-size": ("retrain.batch_size", "batch_size"), "--lr": ("retrain.lr",),
                  "--momentum": ("retrain.momentum",), "--nesterov": ("retrain.nesterov",),
                  "--weight-decay": ("retrain.weight_decay",), "--label-smoothing": ("retrain.label_smoothing",)}


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
    parser.add_argument("--data-dir", help="dataset folder; with --resume: where the run's dataset is now "
                        "(the run's settings are unchanged)")
    parser.add_argument("--admm-epochs", type=int, help="ADMM W-step epochs per round")
    parser.add_argument("--retrain-epochs", type=int, help="masked retraining epochs per round")
    parser.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bars or phase log")


def _dest(flag: str) -> str:
    """``"--admm-epochs"`` -> ``"admm_epochs"``, the flag's attribute of the parsed arguments."""
    return flag[2:].replace("-", "_")


def _rounds(text: str):
    """``--rounds``: ``"doubling"`` and a number of rounds stay text, ``"2,4,10"`` becomes a list of targets
    (text that is neither stays text, for :func:`autocompress.compress.round_targets` to refuse)."""
    if text == "doubling" or text.isdigit():
        return text
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        return text


def _config(args: argparse.Namespace, settings: dict, *, validate: bool = True):
    """The config the arguments ask for: the config file's ``settings`` with the flags given on top; checked
    unless ``validate=False``. An error about a value from the file names its key there, not a flag."""
    from ..compress import CompressConfig

    config, overridden = CompressConfig.from_dict(settings, validate=False), set()
    for flag, setting in FLAG_SETTINGS.items():
        value = getattr(args, _dest(flag))
        if value is not None:
            section, _, key = setting.partition(".")
            value = _rounds(value) if flag == "--rounds" else value
            setattr(config, section, {**getattr(config, section), key: value} if key else value)
            overridden.add(setting)
    if validate:
        try:
            config.validate()
        except UserError as exc:
            given = _file_settings(settings) - overridden
            raise UserError(_name_file_settings(str(exc), given, args.config)) from exc
    return config


def _file_settings(settings: dict) -> set[str]:
    """Names of the settings a config file gives: its keys, and ``section.key`` for a section's keys."""
    names = set(settings)
    for section, value in settings.items():
        if isinstance(value, dict):
            names |= {f"{section}.{key}" for key in value}
    return names


def _name_file_settings(message: str, given: set[str], path: str | None) -> str:
    """``message`` with each flag that stands for a setting the config file ``path`` gives (``given``) replaced
    by the setting's name, and the file named: that value is fixed in the file, not with a flag."""
    named = []
    for flag, settings in _MESSAGE_FLAGS.items():
        setting = next((name for name in settings if name in given), None)
        pattern = rf"{re.escape(flag)}(?![\w-])"
        if setting and re.search(pattern, message):
            message = re.sub(pattern, setting, message)
            named.append(setting)
    return f"{message} ({', '.join(named)} in the config file {path})" if named else message


def _check_same_run(compressor, args: argparse.Namespace, settings: dict) -> None:
    """--resume-if-exists continues a run only when CHECKPOINT and the settings asked for are the stored ones."""
    import dataclasses

    # only its differences matter; data_dir as Compressor.start stores it (absolute)
    asked = dataclasses.asdict(_config(args, settings, validate=False).with_absolute_paths())
    stored = dataclasses.asdict(compressor.config)
    changed = sorted(key for key in asked if asked[key] != stored[key])
    if args.checkpoint and Path(args.checkpoint).resolve() != compressor.checkpoint_path.resolve():
        changed.insert(0, "checkpoint")
    if changed:
        raise UserError(f"run folder {args.out} holds a run with other settings ({', '.join(changed)})",
                        "choose another --out, or resume it unchanged with --resume")


def _refuse_changes(args: argparse.Namespace) -> None:
    """--resume takes the run's stored settings: UserError naming any flag that would change them (--data-dir
    only says where the dataset is now)."""
    values = [("CHECKPOINT", args.checkpoint), ("--config", args.config), ("--out", args.out),
              *((flag, getattr(args, _dest(flag))) for flag in FLAG_SETTINGS if flag != "--data-dir")]
    given = [flag for flag, value in values if value is not None]
    if given:
        raise UserError(f"--resume continues a run with its stored config.yaml; {', '.join(given)} "
                        "cannot change it", f"drop {', '.join(given)}, or start a new run with --out")


def _resume_command(out: str, args: argparse.Namespace) -> str:
    """The command line that continues the run in ``out``."""
    data_dir = f" --data-dir {shlex.quote(args.data_dir)}" if args.data_dir else ""
    return f"autocompress compress --resume {shlex.quote(str(out))}{data_dir}"


def _run_dir(args: argparse.Namespace) -> str | None:
    """The run folder: ``--resume``, ``--out``, or ``runs/compress-<checkpoint name>`` (None: no checkpoint)."""
    if args.resume or args.out:
        return args.resume or args.out
    return f"runs/compress-{Path(args.checkpoint).stem}" if args.checkpoint else None


def interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C leaves behind (the CLI prints it): the run folder with every finished phase and the
    command that continues it, or nothing when no run was started there yet."""
    out = _run_dir(args)
    if out is None or not (Path(out) / "config.yaml").exists():
        return "nothing was written"
    return f"run folder {out} keeps every finished phase; continue it with `{_resume_command(out, args)}`"


def chance_warning(final: dict, num_classes: int) -> str | None:
    """A warning when the compressed model's test top-1 (``final`` record) is at or below chance (``100 /
    num_classes`` %) plus 1 point: the target was too aggressive for the model and the training budget."""
    chance = 100.0 / num_classes
    top1 = final["rows"][-1]["test_top1"]
    if top1 > chance + 1.0:
        return None
    return (f"autocompress: warning: the compressed model's test top-1 {top1:.2f}% is at chance level "
            f"({chance:.2f}% for {num_classes} classes): target {final['target']} is too aggressive for this "
            "model and budget; try a lower --target, or more rounds / epochs (--rounds, --admm-epochs, "
            "--retrain-epochs)")


def run(args: argparse.Namespace) -> int:
    """Start or resume a run, then print the final table (and :func:`chance_warning` on stderr when the
    result is at chance). Returns 0; a Ctrl-C is reported with :func:`interrupted`."""
    from ..compress import CompressConfig, Compressor
    from ..report import final_table_rows

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    progress = not args.quiet
    if args.resume:
        _refuse_changes(args)
    settings = CompressConfig.read_yaml(args.config) if args.config else {}
    out = _run_dir(args)
    if args.resume or (args.resume_if_exists and out and (Path(out) / "config.yaml").exists()):
        compressor = Compressor.resume(out, progress=progress, data_dir=args.data_dir)
        if not args.resume:  # --resume-if-exists: only the run these flags would start
            _check_same_run(compressor, args, settings)
    else:
        if not args.checkpoint:
            raise UserError("no checkpoint given", "pass CHECKPOINT, or --resume RUN_DIR to continue a run")
        compressor = Compressor.start(args.checkpoint, _config(args, settings), out, progress=progress)
    final = compressor.run()
    rows = final_table_rows(final)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    print(f"run folder: {out} (model.pt, report.html, metrics.jsonl, config.yaml)")
    warning = chance_warning(final, compressor.splits.num_classes)
    if warning:
        print(warning, file=sys.stderr)
    return 0
