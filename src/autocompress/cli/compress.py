"""``autocompress compress``: AutoCompress a checkpoint to a target, in progressive rounds -- the CLI adapter
over :class:`autocompress.compress.Compression` (a checkpoint file and a named dataset in, a run folder out).

A config file (``--config run.yaml``) holds any :class:`autocompress.config.CompressConfig` setting plus the
data settings of :class:`autocompress.cli.workload.DataSettings`; flags override it. The run folder's
``config.yaml`` records both (the data settings and the checkpoint under ``source``), so ``--resume`` needs
nothing else.
"""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from pathlib import Path

from .. import distributed
from ..config import SettingError
from ..errors import CallArgument, UserError
from .workload import AUGMENTS

#: flag -> the setting it sets (``section.key`` for a key of a section)
FLAG_SETTINGS = {"--target": "target", "--dims": "dims", "--rounds": "rounds", "--seed": "seed",
                 "--admm-epochs": "admm.epochs", "--retrain-epochs": "retrain.epochs", "--dataset": "dataset",
                 "--data-dir": "data_dir", "--val-size": "val_size", "--max-train": "max_train",
                 "--batch-size": "batch_size", "--amp": "amp", "--channel-multiple": "channel_multiple",
                 "--latency-runtime": "latency.runtime", "--latency-threads": "latency.threads",
                 "--latency-batch": "latency.batch", "--epochs": "budget", "--ignore": "ignored_layers",
                 "--augment": "augment"}

#: help of ``--augment`` (compress and prune; its values: :data:`autocompress.cli.workload.AUGMENTS`)
AUGMENT_HELP = ("training augmentation: the dataset's (default: fashion-mnist horizontal flips, cifar10 padded crops "
                "and flips) or none")
#: help of ``--ignore`` (compress and prune)
IGNORE_HELP = ("a module never pruned, by its name in model.named_modules() (a container covers the modules below "
               "it); repeat for several")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``autocompress compress``."""
    parser.add_argument("checkpoint", nargs="?", help="trained checkpoint (omit with --resume)")
    parser.add_argument("--target", help="OBJECTIVE=FACTORx, e.g. params=20x, flops=8x or latency=2x (speedup "
                        "measured in --latency-runtime), or latency=5ms")
    parser.add_argument("--dims", help="filter,column (hybrid; the default for params / flops targets) | filter "
                        "(the default for latency targets) | column | irregular")
    parser.add_argument("--rounds", help="'doubling' (default), a number of rounds, or targets '2,4,10'")
    parser.add_argument("--config", help="run.yaml with any compress setting (flags override it)")
    parser.add_argument("--out", help="run folder (default runs/compress-<checkpoint name>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR")
    parser.add_argument("--resume-if-exists", action="store_true",
                        help="with --out: resume when the folder already holds a run, else start one")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--dataset", help="dataset when the checkpoint records none (fashion-mnist, cifar10, "
                        "imagefolder)")
    parser.add_argument("--data-dir", help="dataset folder; with --resume: where the run's dataset is now "
                        "(the run's settings are unchanged)")
    parser.add_argument("--val-size", type=int, help="validation images carved from the training split "
                        "(default: the checkpoint's, else 5000)")
    parser.add_argument("--max-train", type=int, help="use a seeded subset of this many training images")
    parser.add_argument("--batch-size", type=int, help="training batch size (default 128)")
    parser.add_argument("--augment", choices=AUGMENTS, help=AUGMENT_HELP)
    parser.add_argument("--epochs", type=int, help="training budget in epochs, split into rounds, ADMM and final "
                        "retraining by the measured rule (README: budget); instead of --rounds / --*-epochs")
    parser.add_argument("--admm-epochs", type=int, help="ADMM W-step epochs per round")
    parser.add_argument("--retrain-epochs", type=int, help="masked retraining epochs per round")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), help="autocast of training phases (CUDA)")
    parser.add_argument("--channel-multiple", type=_multiple, help="every filter group keeps a multiple of N "
                        "channels: N (1 = any width), or auto (the default: 8 for a params / flops target, falling "
                        "back to 4, 1 where it needs; a latency target the CPU's block, 16 on AVX-512, else 8)")
    parser.add_argument("--ignore", action="append", metavar="MODULE", help=IGNORE_HELP)
    parser.add_argument("--latency-runtime", help="deployment runtime: onnxruntime (default, CPU) or torch")
    parser.add_argument("--latency-threads", type=int, help="threads of the deployment runtime (default 1)")
    parser.add_argument("--latency-batch", type=int, help="batch size of a latency target (default 1)")
    parser.add_argument("--quiet", "--no-progress", action="store_true",
                        help="no progress bars or phase log (bars are drawn only when stderr is a terminal)")


def _multiple(text: str):
    """``--channel-multiple``: an integer, or text (``auto``; anything else is refused by the config check)."""
    return int(text) if text.isdigit() else text


def _rounds(text: str):
    """``--rounds``: ``"doubling"`` stays text, a number of rounds becomes an int, ``"2,4,10"`` a list of targets
    (text that is none of these stays text, for the config check to refuse)."""
    if text.isdigit():
        return int(text)
    if text == "doubling":
        return text
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        return text


def read_config_file(path: str | None) -> dict:
    """The settings of a ``--config`` YAML file; UserError when missing, unreadable or not a mapping."""
    import yaml

    if path is None:
        return {}
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"config file {path} does not exist or is a folder", "pass an existing --config YAML file"
                        ) from None
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise UserError(f"config file {path} is not valid UTF-8 YAML ({exc.__class__.__name__})",
                        "fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings", "see the README's example")
    return data


def settings_from(args: argparse.Namespace, file_settings: dict) -> dict:
    """The config file's settings with the flags given on top (a flag for a section key sets that key)."""
    settings = {key: (dict(value) if isinstance(value, dict) else value) for key, value in file_settings.items()}
    for flag, setting in FLAG_SETTINGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        section, _, key = setting.partition(".")
        value = _rounds(value) if flag == "--rounds" else value
        if key:
            current = settings.get(section)
            settings[section] = {**(current if isinstance(current, dict) else {}), key: value}
        else:
            settings[section] = value
    return settings


def flag_message(exc: SettingError, args: argparse.Namespace) -> UserError:
    """``exc`` in the command line's terms: each ``setting=value`` of a setting given by a flag written as that
    flag (``budget=1`` -> ``--epochs 1``), the flags that set the settings involved and the settings it clashes
    with named, or the flag that would set it (only the CLI speaks of flags)."""
    involved, config = (exc.setting, *exc.also), getattr(args, "config", None)
    if isinstance(exc, CallArgument):  # e.g. device: in the config file
        flag = {"device": "--device", "run_dir": "--out"}.get(exc.setting)
        where = f" (in the config file {config})" if config else ""
        return UserError(f"{exc.setting} is not a config setting{where}", f"give it as {flag}" if flag else "remove it")
    by_flag = {setting: flag for flag, setting in {**FLAG_SETTINGS, "--device": "device"}.items()
               if setting in involved and getattr(args, flag[2:].replace("-", "_"), None) is not None}
    if by_flag:
        message = str(exc)
        for setting, flag in by_flag.items():
            message = re.sub(rf"(?<![\w.-]){re.escape(setting)}=", f"{flag} ", message)
        rest = [setting for setting in involved if setting not in by_flag]
        in_file = f"; {', '.join(rest)} by the config file {config}" if rest and config else ""
        return UserError(f"{message} (set by {' and '.join(by_flag.values())}{in_file})")
    if config:
        return UserError(f"{exc} (in the config file {config})")
    flags = [flag for flag, setting in FLAG_SETTINGS.items() if setting == exc.setting]
    return UserError(f"{exc} (on the command line: {flags[0]})" if flags else str(exc))


def _resume_command(out: str, args: argparse.Namespace) -> str:
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
            "--retrain-epochs, final_retrain_epochs)")


def _refuse_changes(args: argparse.Namespace) -> None:
    """--resume takes the run's stored settings: UserError naming any flag that would change them (--data-dir
    only says where the dataset is now)."""
    values = [("CHECKPOINT", args.checkpoint), ("--config", args.config), ("--out", args.out),
              *((flag, getattr(args, flag[2:].replace("-", "_"))) for flag in FLAG_SETTINGS if flag != "--data-dir")]
    given = [flag for flag, value in values if value is not None]
    if given:
        raise UserError(f"--resume continues a run with its stored config.yaml; {', '.join(given)} "
                        "cannot change it", f"drop {', '.join(given)}, or start a new run with --out")


def _stored_request(out: str, data_dir: str | None) -> tuple[str, dict, list[str]]:
    """The checkpoint, settings and ``--import`` modules a run folder's ``config.yaml`` records (``--data-dir``
    replacing the stored data folder): the settings as the run was given them (``run.given``; a setting given as
    ``auto`` stays ``auto``, which the library compares with what the folder holds), or in folders of 0.9.0 and
    earlier the resolved ones."""
    from ..runfolder import RunFolder

    folder = RunFolder(out)
    if not folder.holds_run():
        raise UserError(f"{out} holds no compress run (no config.yaml)" if Path(out).exists() else
                        f"run folder {out} does not exist",
                        "start one with `autocompress compress CHECKPOINT --target ... --out DIR`")
    stored = folder.read_config()
    source = stored.pop("source", None) or {}
    run = stored.pop("run", None) or {}
    if "checkpoint" not in source:
        raise UserError(f"{out} was not started by `autocompress compress`", "resume it from Python with the "
                        "same model and settings")
    settings = {**run.get("given", stored), **source.get("data", {})}
    if data_dir is not None:
        settings["data_dir"] = data_dir
    return source["checkpoint"], settings, list(source.get("imports") or [])


def _check_same_source(out: str, checkpoint: str, settings: dict) -> None:
    """--resume-if-exists continues a run only for the same checkpoint file and data settings (the library
    compares the other settings and the model's weights)."""
    from .workload import DataSettings

    stored_checkpoint, stored, _ = _stored_request(out, None)
    asked, _ = DataSettings.split_from(settings)
    kept, _ = DataSettings.split_from(stored)
    changed = [name for name, value in vars(asked.absolute()).items() if getattr(kept, name) != value]
    if Path(checkpoint).resolve() != Path(stored_checkpoint):
        changed.insert(0, "checkpoint")
    if changed:
        raise UserError(f"run folder {out} holds a run with other settings ({', '.join(changed)})",
                        "choose another --out, or resume it unchanged with --resume")


def _request(args: argparse.Namespace, out: str) -> tuple[str, dict, list[str]]:
    """The checkpoint, settings and ``--import`` modules of the run to start or resume in ``out``."""
    if args.resume:
        _refuse_changes(args)
        return _stored_request(out, args.data_dir)
    if not args.checkpoint:
        raise UserError("no checkpoint given", "pass CHECKPOINT, or --resume RUN_DIR to continue a run")
    checkpoint, settings = args.checkpoint, settings_from(args, read_config_file(args.config))
    if (Path(out) / "config.yaml").exists():
        if not args.resume_if_exists:
            then, now = _stored_request(out, None)[1].get("target"), settings.get("target")
            which = f"of target {then}" + (f", not {now}" if now not in (None, then) else "")
            raise UserError(f"run folder {out} already holds a run ({which})",
                            f"continue that run with `{_resume_command(out, args)}` or choose another --out")
        _check_same_source(out, checkpoint, settings)
    return checkpoint, settings, []


def run(args: argparse.Namespace) -> int:
    """Start or resume a run, then print the final table (and :func:`chance_warning` on stderr when the
    result is at chance). Returns 0; a Ctrl-C is reported with :func:`interrupted`.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process joins the process group (gloo on the CPU, NCCL on
    CUDA with device ``cuda:LOCAL_RANK``); rank 0 reads the run folder and speaks for the run (the other ranks
    need the checkpoint and the dataset, not the run folder)."""
    created = distributed.init_from_env(args.device)
    try:
        return _start(args)
    finally:
        if created:
            distributed.finish()


class LevelPrefix(logging.Formatter):
    """The log as the CLI prints it: messages as they are, warnings and errors led by their level
    (``WARNING: the compressed model is SLOWER ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname}: {text}" if record.levelno >= logging.WARNING else text


def configure_logging() -> None:
    """The CLI's log on stderr: autocompress's INFO lines and every library's warnings (:class:`LevelPrefix`);
    other libraries' INFO lines (the ONNX exporter's passes) stay out."""
    handler = logging.StreamHandler()
    handler.setFormatter(LevelPrefix())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("autocompress").setLevel(logging.INFO)


def _start(args: argparse.Namespace) -> int:
    from . import import_modules

    if not args.quiet and distributed.world().is_main:
        configure_logging()
    out = _run_dir(args)
    from ..runfolder import run_dir_path

    run_dir_path(out, "--resume" if args.resume else "--out")  # a file given for the run folder, before any work
    checkpoint, settings, imports = distributed.on_main(lambda: _request(args, out))
    import_modules(imports)
    try:
        final, workload = _compress(checkpoint, settings, out, args)
    except SettingError as exc:
        raise flag_message(exc, args) from None
    if not distributed.world().is_main:
        return 0
    from ..report import final_text

    print(final_text(final))  # warnings included (the log has them on stderr too)
    print(f"run folder: {out} (model.pt, report.html, metrics.jsonl, config.yaml)")
    for warning in (chance_warning(final, workload.splits.num_classes), _inputs_warning(final, workload)):
        if warning:
            print(warning, file=sys.stderr)
    return 0


def _inputs_warning(final: dict, workload) -> str | None:
    """The normalisation warning again, after the final table, when it applied and the base's BatchNorm statistics
    did not fit (the run then adapted the base to inputs it was not trained on: fresh user 58's model.pt scored
    9.7 % on their own [0, 1] inputs)."""
    warning = workload.normalisation_warning()
    if warning is None or not any("BatchNorm statistics did not fit" in line for line in final.get("warnings", [])):
        return None
    return (f"autocompress: warning: the base's BatchNorm statistics did not fit the inputs here, and {warning}; "
            "the compressed model expects the inputs here")


def _compress(checkpoint: str, settings: dict, out: str, args: argparse.Namespace):
    """Load the checkpoint and data, run :class:`Compression` with the run folder ``out``; returns the final
    record (with test top-1 and file sizes) and the workload."""
    import dataclasses

    from ..compress import Compression, resolve_config
    from ..metrics import count_params
    from ..serialization import save_compact
    from ..training import evaluate
    from .workload import DataSettings, load_workload

    data, library_settings = DataSettings.split_from(settings)
    data.validate()
    data = data.absolute()
    config = resolve_config(library_settings, None)  # every setting checked before any data is read
    workload = load_workload(checkpoint, data, seed=config.seed, model_args=args.model_arg)
    checkpoint_path = Path(checkpoint).resolve()
    test = workload.loader("test")

    def save(path: Path, compact_model) -> None:
        save_compact(path, compact_model.cpu(), base_checkpoint=workload.ckpt,
                     metrics={"target": config.target, "base_params": count_params(workload.model)},
                     config=dataclasses.asdict(compression.config),  # resolved: a resumed run stores the same
                     sparse="irregular" in config.kinds)

    def extra(name: str, model) -> dict:
        file = checkpoint_path if name == "base" else Path(out) / "model.pt"
        return {"test_top1": 100.0 * evaluate(model, test)["top1"], "file_bytes": file.stat().st_size}

    speaks = not args.quiet and distributed.world().is_main
    compression = Compression(
        workload.model, workload.example, None,
        task_args=dict(train_loader=workload.train_loader(data.batch_size), val_loader=workload.loader("val")),
        device=args.device, config=library_settings, run_dir=out,
        progress=speaks and sys.stderr.isatty(),  # bars on a terminal; a redirected log gets the lines alone
        log=(lambda line: print(line, flush=True)) if speaks else None,
        source={"checkpoint": str(checkpoint_path), "data": dataclasses.asdict(data),
                "imports": list(getattr(args, "imports", []) or [])},
        save=save, final_columns=extra)
    for warning in (workload.carve_warning(), workload.normalisation_warning()):  # after the settings' checks
        if warning and distributed.world().is_main:
            logging.getLogger("autocompress").warning(warning)
    if speaks:
        print(workload.augmentation_line(), flush=True)
    result = compression.run()
    return result.final, workload
