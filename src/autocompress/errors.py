"""User-facing errors.

Every problem caused by the user's input (missing data, corrupt checkpoint, unknown model, impossible
target, unsupported layer) is raised as :class:`UserError`. The CLI prints its message on one line as
``autocompress: error: <message>`` and exits with status 2; library callers can catch it.
"""
from __future__ import annotations

import reprlib
from typing import Any


class UserError(Exception):
    """Bad input with a one-line message that names the problem and the fix.

    Args:
        problem: what is wrong, e.g. ``"checkpoint runs/a.pt is not a zip archive"``.
        fix: what to do about it, e.g. ``"re-save it with `autocompress train`"``. Optional.
    Both are kept as attributes (the CLI states its own fix for some subclasses).
    """

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(" ".join(message.split()))
        self.problem, self.fix = problem, fix


class SettingError(UserError):
    """A :class:`UserError` about one setting; ``setting`` is its dotted name (``"admm.epochs"``, ``"device"``),
    ``also`` the names of other settings that clash with it (``budget`` and ``rounds`` both set). The library
    names settings; the CLI turns a setting it has a flag for into the flag's name."""

    def __init__(self, setting: str, problem: str, fix: str | None = None, *, also: tuple[str, ...] = ()):
        super().__init__(problem, fix)
        self.setting = setting
        self.also = tuple(also)


class CallArgument(SettingError):
    """A :class:`SettingError`: a config names an argument of ``autocompress.compress`` (``device``, ``run_dir``)
    as if it were a setting. The CLI names its flag for it instead."""


class MissingCode(UserError):
    """A :class:`UserError` about code the input names but Python cannot find: a checkpoint's model class whose
    module does not import, or a model name nobody registered. ``module`` is the module to import first, when
    known. ``instance``: a fix only Python can take (passing the model itself), in the message but not in ``fix``.
    The CLI adds how to import it (``--import``) and leaves ``instance`` out."""

    def __init__(self, problem: str, fix: str | None = None, *, module: str | None = None,
                 instance: str | None = None):
        super().__init__(problem, "; or ".join(part for part in (fix, instance) if part) or None)
        self.fix, self.module = fix, module


class MissingArguments(UserError):
    """A :class:`UserError`: a checkpoint names its model's class but not the constructor arguments that rebuild
    it. The library's fix is a fresh instance (``model=``); the CLI adds its own (``--model-arg``)."""


class ModelMismatch(UserError):
    """A :class:`UserError`: a model rebuilt from a checkpoint of the caller's own class is not the one it stores:
    its constructor arguments do not build it, its weights' shapes differ, or it does not compute the outputs the
    checkpoint stored (built with other constructor arguments or code). ``problem`` is what differs; the CLI
    states its own fix (``--model-arg``)."""


class TargetMissed(UserError):
    """A target the trained compact model misses when measured at the end (a latency target on a machine
    slower than during the search, a params / flops count that compaction could not reach). ``result`` holds what
    the run produced (a :class:`autocompress.CompressResult`: the model, its records), so nothing trained is
    lost."""

    def __init__(self, problem: str, fix: str | None = None, *, result: Any = None):
        super().__init__(problem, fix)
        self.result = result


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 6, 6, 4, 60, 60


def show(value: Any) -> str:
    """A short ``repr`` for messages: nested or long values are cut (``[[1, 2, ...], ...]``), so an error
    about a YAML alias bomb or a huge value stays one short line and costs nothing."""
    return _SHORT.repr(value)


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` for a one-line error: at most :data:`FIRST_LINE` characters of
    it, cut at a space with ``...`` where longer."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if len(text) > FIRST_LINE:
        text = text[:FIRST_LINE].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: the most characters of an error's first line :func:`first_line` keeps
FIRST_LINE = 240
