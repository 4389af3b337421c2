"""Command-line front end: ``autocompress <command> ...``.

Each sub-command lives in its own module of this package and exposes two functions:

* ``add_arguments(parser: argparse.ArgumentParser) -> None``
* ``run(args: argparse.Namespace) -> int`` (the exit status)

and, when it writes files that an interruption may leave behind, ``interrupted(args) -> str``: what is on
disk after a Ctrl-C and how to continue, checked at that moment.

A :class:`~autocompress.errors.UserError` anywhere becomes one line on stderr and exit status 2;
Ctrl-C becomes exit status 130 and the line ``autocompress: interrupted`` followed by the command's
``interrupted(args)`` (every file is written atomically, so what exists is complete); a reader that closes
stdout early (``autocompress inspect x.pt | head -1``) ends the command quietly with exit status 1.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

#: command name -> (module inside this package, one-line help)
COMMANDS = {
    "train": ("train", "train a model from the zoo on a dataset"),
    "evaluate": ("evaluate", "top-1 (and top-5) of a checkpoint on a dataset split"),
    "inspect": ("inspect", "parameters, MACs, per-layer table, file size and CPU latency of a checkpoint"),
    "prune": ("prune", "prune a checkpoint at given per-layer rates (ADMM, retraining, compaction)"),
    "compress": ("compress", "AutoCompress: search rates and prune to a target, in progressive rounds"),
    "export": ("export", "export a checkpoint or compact model to ONNX (checked in onnxruntime) and / or a "
                         "torch.export program"),
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (imports each command module that is installed)."""
    parser = argparse.ArgumentParser(prog="autocompress", description=__doc__.splitlines()[0])
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"autocompress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (repeatable): makes a user's model classes and registered "
                             "models available (the current folder is on the import path)")
    common.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="model constructor option, value parsed as YAML (repeatable), e.g. width=0.5: a zoo "
                             "model's, or your own class's for a checkpoint that records its class but not them")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(f".{module_name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module_name}":
                raise
            continue  # command not built yet
        command = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        module.add_arguments(command)
        command.set_defaults(_run=module.run, _interrupted=getattr(module, "interrupted", None))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``autocompress`` console script. Returns the exit status."""
    from ..errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import_modules(args.imports)
        status = int(args._run(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, inside the try
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except UserError as exc:
        print(f"autocompress: error: {_with_import_fix(exc)}{_flag_of(exc, args)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only disk, a vanished folder: one line, and what is kept
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        left = args._interrupted(args) if args._interrupted is not None else None
        print(f"autocompress: error: {exc.strerror or type(exc).__name__}{where}; free space or fix permissions "
              f"and run it again{f'; {left}' if left else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        left = args._interrupted(args) if args._interrupted is not None else None
        print(f"autocompress: interrupted{f'; {left}' if left else ''}", file=sys.stderr)
        return 130


def _flag_of(exc: Exception, args: argparse.Namespace) -> str:
    """`` (set by --device)`` when ``exc`` is a SettingError about a setting the command line gave as a flag
    of the same name, `` (on the command line: --target)`` when the command has such a flag but it was not given
    (commands with their own mapping of flags to settings name the flag themselves)."""
    from ..errors import SettingError

    setting = getattr(exc, "setting", None)
    if not isinstance(exc, SettingError) or "set by --" in str(exc) or not hasattr(args, str(setting)):
        return ""
    flag = f"--{setting.replace('_', '-')}"
    return f" (set by {flag})" if getattr(args, setting) is not None else f" (on the command line: {flag})"


def _with_import_fix(exc: Exception) -> str:
    """The message of ``exc``; for a MissingCode error (the user's own code is not imported) the command line's
    fix first: ``--import MODULE``, then the library's (without its Python-only ``instance`` fix); for
    MissingArguments and ModelMismatch the command line's alone (``--model-arg``)."""
    from ..errors import MissingArguments, MissingCode, ModelMismatch

    if isinstance(exc, ModelMismatch):
        return f"{exc.problem}; pass the --model-arg values you built it with (or your own model class's code)"
    if isinstance(exc, MissingArguments):
        return f"{exc.problem}; pass them: --model-arg KEY=VALUE for each argument you built it with"
    if not isinstance(exc, MissingCode):
        return str(exc)
    module = exc.module or "MODULE"
    what = "defines it" if exc.module else "defines or registers it"
    rest = f"; or {exc.fix}" if exc.fix else ""
    return " ".join(f"{exc.problem}; pass --import {module} from the folder that holds it (the module that {what}: "
                    f"a checkpoint names the class, not where its code is){rest}".split())


def parse_model_args(items: list[str]) -> dict:
    """``--model-arg`` items ``["width=0.5", "depth=20"]`` -> ``{"width": 0.5, "depth": 20}`` (values parsed as
    YAML).

    Raises:
        UserError: an item without ``=`` or with an unparsable value.
    """
    import yaml

    from ..errors import UserError

    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--model-arg {item!r} is not KEY=VALUE", "write e.g. --model-arg width=0.5")
        try:
            kwargs[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"--model-arg {item!r} has an unparsable value", "quote it as YAML") from exc
    return kwargs


def read_checkpoint(path: str | os.PathLike, model_args: list[str]) -> dict:
    """``load_checkpoint(path)``; with ``--model-arg`` items, those as the constructor arguments of the model
    class it records (:func:`autocompress.checkpoint.with_constructor_arguments`: for a checkpoint of the
    caller's own class that records none).

    Raises:
        UserError: as ``load_checkpoint``; a bad item, or items for a zoo model's checkpoint (named ``--model-arg``).
    """
    from ..checkpoint import load_checkpoint, with_constructor_arguments
    from ..errors import UserError

    ckpt = load_checkpoint(path)
    if not model_args:
        return ckpt
    try:
        return with_constructor_arguments(ckpt, parse_model_args(model_args))
    except UserError as exc:
        raise UserError(f"--model-arg: {exc}") from None


def import_modules(names: list[str]) -> None:
    """Import each ``--import`` module (the current folder first on ``sys.path``); UserError naming the one
    that fails."""
    from ..errors import UserError

    if names and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the user's module may raise anything on import
            raise UserError(f"--import {name} failed ({type(exc).__name__}: {str(exc)[:160]})",
                            "pass an importable module name (e.g. mypkg.models) from the current folder or "
                            "an installed package") from None


def _stdout_closed() -> int:
    """Exit status 1, quietly, after the reader of stdout went away (the Python docs' note on SIGPIPE, in the
    ``signal`` module): stdout now points at devnull, so the interpreter's final flush raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    sys.exit(main())
