"""The run folder: one writer at a time, a claim that a kill cannot leave half done, idempotent records,
damaged files reported in one line."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from autocompress.errors import UserError
from autocompress.runfolder import RunFolder


def test_another_process_holding_the_folder_is_refused_and_a_dead_one_leaves_no_stale_lock(tmp_path):
    code = ("import sys, time; from autocompress.runfolder import RunFolder; "
            f"held = RunFolder({str(tmp_path / 'run')!r}).open(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="in use by another running process"):
            RunFolder(tmp_path / "run").open()
    finally:
        holder.kill()  # like kill -9: the kernel drops the lock with the process
        holder.wait()
    RunFolder(tmp_path / "run").open().close()


def test_leftover_temporary_files_are_removed_and_do_not_count_as_content(tmp_path):
    folder = tmp_path / "run"
    (folder / "round1").mkdir(parents=True)
    (folder / ".config.yaml.abc123.tmp").write_text("half")
    (folder / "round1" / ".admm.pt.x.tmp").write_bytes(b"half")
    run = RunFolder(folder).open()
    try:
        assert not list(folder.rglob("*.tmp"))
        assert not run.holds_run()
        (folder / "round1").rmdir()
        assert run.is_empty()
    finally:
        run.close()


def test_a_phase_finished_twice_leaves_its_records_once(tmp_path):
    run = RunFolder(tmp_path / "run").open()
    try:
        run.finish(1, "admm", [{"event": "admm", "round": 1}])
        # a kill between the records and the done mark: the phase runs again and writes its records again
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        (tmp_path / "run" / "state.json").write_text(json.dumps({"done": [p for p in state["done"]
                                                                           if p != [1, "admm"]]}))
        run.finish(1, "admm", [{"event": "admm", "round": 1}, {"event": "phase", "round": 1}])
        events = [r["event"] for r in run.records]
        assert events == ["admm", "phase"] and run.done() == [[1, "admm"]]
    finally:
        run.close()


@pytest.mark.parametrize("name, content, message", [
    ("state.json", "{not json", "state.json is damaged"),
    ("config.yaml", "a: [", "config.yaml is damaged"),
    ("config.yaml", b"\xff\xfe", "config.yaml is damaged"),
])
def test_damaged_state_files_are_one_line_errors(tmp_path, name, content, message):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)
    run = RunFolder(folder).open()
    try:
        with pytest.raises(UserError, match=message) as error:
            run.done() if name == "state.json" else run.read_config()
        assert "\n" not in str(error.value)
    finally:
        run.close()


def test_a_truncated_phase_artifact_names_the_file_to_delete(tmp_path):
    run = RunFolder(tmp_path / "run").open()
    try:
        run.save(1, "admm", {"state_dict": {"w": torch.ones(100)}})
        path = tmp_path / "run" / "round1" / "admm.pt"
        path.write_bytes(path.read_bytes()[:200])
        with pytest.raises(UserError, match=r"admm artifact of round 1 .* is damaged .*delete"):
            run.load(1, "admm")
    finally:
        run.close()


def test_a_dangling_symlink_or_a_file_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="dangling symbolic link"):
        RunFolder(tmp_path / "link").open()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        RunFolder(tmp_path / "file").open()


def test_a_read_only_parent_is_a_one_line_error(tmp_path):
    import os

    if os.geteuid() == 0:  # root writes anywhere; use a path below a file instead
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "run"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "run"
    started = time.perf_counter()
    with pytest.raises(UserError, match="cannot write the run folder"):
        RunFolder(target).open()
    assert time.perf_counter() - started < 2
