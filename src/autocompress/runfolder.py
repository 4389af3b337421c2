"""The run folder of a compress run: resumable phases on disk, one writer at a time.

Layout (every file written atomically: a temporary file, then ``os.replace``)::

    RUN_DIR/config.yaml        the resolved settings, the base model's digest, what the caller recorded
    RUN_DIR/state.json         which (round, phase) pairs are done
    RUN_DIR/metrics.jsonl      one JSON record per phase / round / final table (see report.py)
    RUN_DIR/round<k>/search.json, admm.pt, purify.pt, retrain.pt, compact.pt
    RUN_DIR/round<k>/admm.epoch.pt, retrain.epoch.pt   the state after the last finished epoch of a training
                               phase still running (removed when it finishes; at most one per phase)
    RUN_DIR/model.pt           the final compact model
    RUN_DIR/report.html        plots and the final table
    RUN_DIR/.lock              held (``fcntl.flock``) while a process works in the folder

Guarantees: a second process on the same folder is refused at once (the lock is the kernel's, so a killed
process never leaves a stale one); a phase's metrics records and its "done" mark are written so that a
kill between them neither loses nor duplicates records (records carry their phase, and a phase's records
replace any earlier copy); temporary files of interrupted writes are removed when the folder is opened; a
damaged phase artifact is reported in one line with the phase to delete; a training phase killed after
epoch k continues with epoch k + 1 (:class:`autocompress.epoch_checkpoint.EpochCheckpoint`).
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from .atomic import atomic_torch_save, atomic_write_text
from .errors import UserError
from .integrity import verify_archive
from .rounds import PhaseStore
from .text import json_text, plain


#: name endings of model files, which a run folder's name is refused with (the model is RUN_DIR/model.pt)
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".onnx", ".pt2", ".bin", ".safetensors")


def run_dir_path(run_dir: Any, name: str = "run_dir") -> Path | None:
    """``run_dir`` as a path (None: no run folder); ``name`` is what the messages call it (the CLI: its flag).

    Raises:
        UserError: ``run_dir`` is not a str or path, an empty string (which would name the current folder), an
            existing file, or a new name ending like a model file (``.pt``, ``.onnx``, ...: the compressed model
            is ``RUN_DIR/model.pt``).
    """
    if run_dir is None:
        return None
    if not isinstance(run_dir, (str, os.PathLike)):
        raise UserError(f"{name} is a {type(run_dir).__name__}", "pass a folder path (str or pathlib.Path) or None")
    if not str(run_dir).strip():
        raise UserError(f"{name} is an empty string, which would be the current folder",
                        "pass a folder path ('.' for the current folder), or None for no run folder")
    path = Path(run_dir)
    if path.is_file() or (not path.exists() and path.suffix.lower() in MODEL_FILE_SUFFIXES):
        raise UserError(f"{name} {path} {'is a file' if path.is_file() else 'names a model file'}, but a run is "
                        "a folder (config.yaml, the phases, model.pt: the compressed model)",
                        f"pass a folder path such as {path.with_suffix('')}; the model is written as its model.pt")
    return path


class RunFolder(PhaseStore):
    """The files of one compress run (see the module docstring); a :class:`autocompress.rounds.PhaseStore`.

    Open it with :meth:`open` (holds the lock until :meth:`close` or the process ends).
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self._lock = None
        self._new_lock = False  # open() created the lock file
        self._new_folder = False  # open() created the folder
        self._claimed = False  # claim() wrote config.yaml

    # --- opening, claiming, locking -------------------------------------------------------------------
    def open(self) -> "RunFolder":
        """Create the folder if needed, take its lock and remove temporary files of interrupted writes.

        Raises:
            UserError: the path is a file or a dangling link, cannot be written, or another process holds
                the lock.
        """
        if self.path.is_symlink() and not self.path.exists():
            raise UserError(f"run folder {self.path} is a dangling symbolic link", "pass another run_dir")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run folder {self.path} exists and is not a folder", "pass another run_dir")
        new_folder, new_lock = not self.path.exists(), not (self.path / ".lock").exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / ".lock", "a+")
        except OSError as exc:
            raise UserError(f"cannot write the run folder {self.path} ({exc.strerror})",
                            "pass a run_dir on a writable disk") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"run folder {self.path} is in use by another running process",
                            "wait for it to finish, or pass another run_dir") from None
        self._lock = handle
        self._new_lock, self._new_folder = new_lock, new_folder
        for leftover in self.path.rglob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        return self

    def close(self) -> None:
        """Release the lock."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def release(self) -> None:
        """Release the lock and, when this process claimed no run here (:meth:`claim`), remove the lock file and
        the folder where :meth:`open` created them: a refused run leaves the caller's disk as it found it."""
        self.close()
        if self._claimed:
            return
        if self._new_lock:
            self.file(".lock").unlink(missing_ok=True)
        if self._new_folder and self.is_empty():
            self.path.rmdir()

    def holds_run(self) -> bool:
        """Whether the folder holds a (started) run: its ``config.yaml`` exists."""
        return self.file("config.yaml").exists()

    def is_empty(self) -> bool:
        """No files besides the lock (an unclaimed folder)."""
        return not any(p.name != ".lock" for p in self.path.iterdir()) if self.path.is_dir() else True

    def read_config(self) -> dict:
        """The stored ``config.yaml``; UserError when it is damaged."""
        try:
            data = yaml.safe_load(self.file("config.yaml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UserError(f"{self.file('config.yaml')} is damaged ({type(exc).__name__})",
                            "start a new run in another folder") from None
        if not isinstance(data, dict) or not isinstance(data.get("run"), dict):
            raise UserError(f"{self.file('config.yaml')} is not the config.yaml of an autocompress run (or it is "
                            "damaged)", "pass an empty or new folder for the run")
        return data

    def claim(self, config: dict) -> None:
        """Write ``config.yaml`` (atomically): from now on the folder holds this run."""
        atomic_write_text(self.file("config.yaml"), yaml.safe_dump(config, sort_keys=False))
        self._claimed = True

    # --- files ----------------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        """Path of ``name`` inside the run folder."""
        return self.path / name

    def phase_file(self, round_index: int, phase: str) -> Path:
        """Artifact of one phase: ``round<k>/search.json`` or ``round<k>/<phase>.pt``."""
        return self.path / f"round{round_index}" / (f"{phase}.json" if phase == "search" else f"{phase}.pt")

    def epoch_file(self, round_index: int, phase: str) -> Path:
        """The epoch checkpoint of an unfinished training phase: ``round<k>/<phase>.epoch.pt``."""
        return self.path / f"round{round_index}" / f"{phase}.epoch.pt"

    def done(self) -> list[list]:
        """The completed ``[round, phase]`` pairs, in order; UserError when ``state.json`` is damaged."""
        state = self.file("state.json")
        if not state.exists():
            return []
        try:
            done = json.loads(state.read_text())["done"]
            return [list(pair) for pair in done]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{state} is damaged", "start a new run in another folder") from None

    def is_done(self, round_index: Any, phase: str) -> bool:
        return [round_index, phase] in self.done()

    def load(self, round_index: int, phase: str) -> Any:
        path = self.phase_file(round_index, phase)
        return _read(path, f"the {phase} artifact of round {round_index}", f"delete {path} and, in "
                     f"{self.file('state.json')}, the entry [{round_index}, {phase!r}] with every entry after it, then "
                     "resume: the run does those phases again")

    def save(self, round_index: int, phase: str, payload: Any) -> None:
        path = self.phase_file(round_index, phase)
        if phase == "search":
            atomic_write_text(path, json.dumps(payload, default=plain))  # exact: a resumed run prunes at these
        else:
            atomic_torch_save(payload, path)

    def load_epoch(self, round_index: int, phase: str) -> dict | None:
        path = self.epoch_file(round_index, phase)
        if not path.exists():
            return None
        return _read(path, f"the epoch checkpoint of the {phase} phase of round {round_index}",
                     f"delete {path} (the phase then restarts from its first epoch) and resume")

    def save_epoch(self, round_index: int, phase: str, payload: dict) -> None:
        atomic_torch_save(payload, self.epoch_file(round_index, phase))

    # --- metrics --------------------------------------------------------------------------------------
    @property
    def records(self) -> list[dict]:
        """Every record of ``metrics.jsonl``, in order."""
        path = self.file("metrics.jsonl")
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def record(self, record: dict) -> None:
        self._write(self.records + [record])

    def finish(self, round_index: Any, phase: str, records: list[dict]) -> None:
        """The phase's records (replacing copies a killed earlier attempt left), then its done mark, then its
        epoch checkpoint removed (a kill before that leaves a file no finished phase reads)."""
        tagged = [{**r, "_phase": [round_index, phase]} for r in records]
        kept = [r for r in self.records if r.get("_phase") != [round_index, phase]]
        self._write(kept + tagged)
        done = [pair for pair in self.done() if pair != [round_index, phase]] + [[round_index, phase]]
        atomic_write_text(self.file("state.json"), json.dumps({"done": done}))
        self.epoch_file(round_index, phase).unlink(missing_ok=True)

    def _write(self, records: list[dict]) -> None:
        atomic_write_text(self.file("metrics.jsonl"), "".join(json_text(r) + "\n" for r in records))


def _read(path: Path, what: str, fix: str) -> Any:
    """The payload at ``path``: JSON for a ``.json`` file, else a torch archive checked entry by entry (a flipped
    byte would load silently otherwise) and loaded with ``weights_only=True``. UserError "``what`` (path) is
    missing" or "... is damaged" with ``fix`` on any failure."""
    if not path.is_file():
        raise UserError(f"{what} ({path}) is missing", fix)
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        verify_archive(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any damage of the file ends here
        raise UserError(f"{what} ({path}) is damaged", fix) from None
