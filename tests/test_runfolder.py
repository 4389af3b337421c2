"""The run folder: one writer at a time, a claim that a kill cannot leave half done, idempotent records,
damaged files reported in one line."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from autocompress.errors import UserError
from autocompress.runfolder import RunFolder, run_dir_path
from autocompress.text import json_text


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
        state = tmp_path / "run" / "state.json"
        # fresh user 74 followed "the entries after [1, 'admm']" and the same error came back: the entry goes too
        fix = f"delete {path} and, in {state}, the entry [1, 'admm'] with every entry after it, then resume"
        with pytest.raises(UserError, match=r"admm artifact of round 1 .* is damaged; " + re.escape(fix)):
            run.load(1, "admm")
        path.unlink()
        with pytest.raises(UserError, match=r"admm artifact of round 1 .* is missing; " + re.escape(fix)):
            run.load(1, "admm")
    finally:
        run.close()


def test_a_flipped_byte_in_a_phase_artifact_is_detected(tmp_path):
    run = RunFolder(tmp_path / "run").open()
    try:
        run.save(1, "purify", {"state_dict": {"w": torch.arange(1000.0)}})
        path = tmp_path / "run" / "round1" / "purify.pt"
        data = bytearray(path.read_bytes())
        start = data.find(torch.arange(1000.0).numpy().tobytes()[:64])
        data[start + 100] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(UserError, match="purify artifact of round 1 .* is damaged"):
            run.load(1, "purify")
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


def test_prune_refuses_an_unwritable_out_before_any_work(tmp_path, capsys):
    from autocompress.cli import main

    (tmp_path / "file").write_text("x")
    (tmp_path / "rates.yaml").write_text("default: 0.5\n")
    started = time.perf_counter()
    code = main(["prune", "assets/fmnist_cnn_base.pt", "--rates", str(tmp_path / "rates.yaml"),
                 "--out", str(tmp_path / "file" / "pruned.pt"), "--device", "cpu"])
    assert code == 2 and "cannot write" in capsys.readouterr().err
    assert time.perf_counter() - started < 20  # before any data is read or model trained


def test_a_disk_error_during_a_command_is_one_line_with_what_is_kept(tmp_path, capsys, monkeypatch):
    import errno

    import autocompress.cli.compress as cli
    from autocompress.cli import main

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(cli, "_compress", full_disk)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("target: params=2x\nsource: {checkpoint: base.pt}\nrun: {}\n")
    assert main(["compress", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "--resume" in err


KILL_SCRIPT = '''
import sys, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import autocompress

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.randn(700, 1, 12, 12, generator=g)
y = (x[:, :, :6].mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :, :6].mean((1, 2, 3)) > 0).long()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
train = DataLoader(TensorDataset(x[:600], y[:600]), batch_size=50, shuffle=True,
                   generator=torch.Generator().manual_seed(0))  # its own generator: reseeded per phase
val = DataLoader(TensorDataset(x[600:], y[600:]), batch_size=100)
config = {"rounds": [1.5, 2.0], "admm": {"epochs": 2, "update_interval": 5}, "retrain": {"epochs": 2},
          "search": {"max_evaluations": 3}, "quick_eval": {"bn_batches": 2, "val_batches": 1}, "latency_runs": 1}
result = autocompress.compress(model, x[:1], "params=2x", train_loader=train, val_loader=val, config=config,
                               device="cpu", progress=False, run_dir=sys.argv[1])
torch.save(result.model.state_dict(), sys.argv[2])
'''


_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The kill script, and the compact weights of its uninterrupted run."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    script = folder / "run.py"
    script.write_text(KILL_SCRIPT)
    subprocess.run([sys.executable, str(script), str(folder / "full"), str(folder / "full.pt")], check=True,
                   env=_ENV)
    return script, torch.load(folder / "full.pt")



@pytest.mark.parametrize("after", ["round1/admm.pt", "round2/purify.pt"])
def test_kill_9_then_the_same_call_again_gives_the_uninterrupted_result(tmp_path, uninterrupted, after):
    """A real SIGKILL of a process running autocompress.compress with a run_dir, right after a phase file
    appears; calling it again continues and ends with the same compact weights as an uninterrupted run."""
    import signal

    script, full = uninterrupted
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cut"), str(tmp_path / "cut.pt")],
                               env=_ENV)
    while process.poll() is None and not (tmp_path / "cut" / after).exists():
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "cut.pt").exists(), "the run finished before the kill"
    subprocess.run([sys.executable, str(script), str(tmp_path / "cut"), str(tmp_path / "cut.pt")], check=True,
                   env=_ENV)
    cut = torch.load(tmp_path / "cut.pt")
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    phases = [(r["round"], r["phase"]) for r in records if r["event"] == "phase"]
    assert len(phases) == len(set(phases)) == 10  # no duplicate records after the kill


def test_json_text_drops_float_noise_and_writes_numpy_and_torch_values():
    assert 100 * 0.729 != 72.9 and json_text({"top1": 100 * 0.729}) == '{"top1": 72.9}'
    assert json.loads(json_text([np.float32(0.5), np.int64(3), torch.tensor([1.5, 2.0]), (np.bool_(True),)])) == \
        [0.5, 3, [1.5, 2.0], [True]]


def test_json_text_is_strict_json_non_finite_floats_are_null():
    """A fresh user's strict JSON reader rejected ``"best_score": NaN`` (a search that scored nothing)."""
    text = json_text({"best_score": float("nan"), "steps": [float("inf"), -float("inf"), 1.0], "x": np.float64("nan")})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} written")) == \
        {"best_score": None, "steps": [None, None, 1.0], "x": None}


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_json_text_keeps_twelve_significant_digits(value):
    written = json.loads(json_text(value))
    assert written == float(f"{value:.12g}") and abs(written - value) <= 5e-12 * abs(value)


@pytest.mark.parametrize("given_dir, problem", [("", "an empty string"), ("  ", "an empty string"), (3, "is a int"),
                                                ("run.pt", "names a model file"), ("x/m.ONNX", "names a model file")])
def test_a_run_dir_that_names_no_folder_is_refused(given_dir, problem):
    with pytest.raises(UserError, match=problem):
        run_dir_path(given_dir)


def test_a_run_dir_that_is_a_file_is_refused_and_a_folder_named_like_one_is_taken(tmp_path):
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(UserError, match=rf"^run_dir {tmp_path / 'notes'} is a file, but a run is a folder"):
        run_dir_path(tmp_path / "notes")
    (tmp_path / "old.pt").mkdir()  # an existing folder is a folder, whatever its name
    assert run_dir_path(tmp_path / "old.pt") == tmp_path / "old.pt"
    assert run_dir_path("runs/c12") == Path("runs/c12")


def test_a_released_folder_loses_only_the_lock_it_was_given(tmp_path):
    """A refused run removes the lock file it created in a caller's folder, and a folder it created; a lock file
    that was there before, or one of a folder holding a run, stays."""
    (tmp_path / "mine.txt").write_text("precious")
    RunFolder(tmp_path).open().release()
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    (tmp_path / ".lock").write_text("")
    RunFolder(tmp_path).open().release()
    assert (tmp_path / ".lock").exists()
    RunFolder(tmp_path / "new" / "run").open().release()
    assert not (tmp_path / "new" / "run").exists()
    claimed = tmp_path / "run"
    folder = RunFolder(claimed).open()
    folder.claim({"seed": 0})
    folder.release()
    assert (claimed / ".lock").exists() and (claimed / "config.yaml").exists()


@pytest.mark.parametrize("text", ["lr: 0.1\nepochs: 3\n", "- a\n- b\n"])
def test_a_config_yaml_of_the_caller_s_own_is_not_taken_for_a_run(tmp_path, text):
    """A folder holding the caller's own ``config.yaml`` is refused as no run's (it read as "damaged" or as a run
    of other settings), and the lock file the attempt created is gone."""
    (tmp_path / "config.yaml").write_text(text)
    folder = RunFolder(tmp_path).open()
    with pytest.raises(UserError, match=r"config.yaml is not the config.yaml of an autocompress run \(or it is "
                                        r"damaged\); pass an empty or new folder"):
        folder.read_config()
    folder.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
