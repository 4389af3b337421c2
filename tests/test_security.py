"""No file the tool reads can run code (issue 15): crafted CIFAR-10 python batches, checkpoints that record
a data folder, damaged archives and non-finite weights."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from autocompress import data
from autocompress.checkpoint import load_checkpoint, save_checkpoint
from autocompress.cli import main
from autocompress.data import checkpoint_dataset, get_dataset, read_data_pickle
from autocompress.errors import UserError
from autocompress.integrity import check_finite, verify_archive
from autocompress.models import create_model

BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


class _System:
    """Unpickles as ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Open:
    """Unpickles as ``open(path, "w")`` (creates the file; no shell involved)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _evil_batches(folder, payload) -> None:
    """A cifar-10-batches-py folder whose every file holds ``payload`` inside an otherwise valid dict."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in BATCH_FILES:
        entry = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "label_names": ["a", "b"],
                 "batch_label": payload}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))


def _checkpoint(path, dataset: dict) -> None:
    model = create_model("resnet20", num_classes=10)
    save_checkpoint(path, model=model, model_name="resnet20", model_kwargs={"num_classes": 10},
                    dataset=dataset, config={}, metrics={})


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("autocompress: error: "), err
    return err


def test_the_payloads_are_real(tmp_path):
    """Plain pickle.load runs them: the tests below would fail if the reader unpickled naively."""
    marker = tmp_path / "ran-open"
    pickle.loads(pickle.dumps({"x": _Open(marker)}))["x"].close()
    assert marker.exists()
    marker = tmp_path / "ran-system"
    pickle.loads(pickle.dumps(_System(f"touch {marker}")))
    assert marker.exists()


@pytest.mark.parametrize("make", [lambda m: _System(f"touch {m}"), lambda m: _Open(m)])
def test_crafted_batches_never_run_code(tmp_path, make):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil" / "cifar-10-batches-py"
    _evil_batches(evil, make(marker))
    with pytest.raises(UserError, match=r"refusing data file .*refers to (posix\.system|io\.open)") as err:
        get_dataset("cifar10", evil.parent, val_size=0)
    assert "\n" not in str(err.value) and not marker.exists()


def test_crafted_checkpoint_data_folder_is_not_followed(tmp_path, capsys, monkeypatch):
    """evaluate / prune / checkpoint_dataset with a checkpoint recording a folder of crafted batches,
    absolute or relative to the working directory: nothing runs, one-line error (exit 2)."""
    marker = tmp_path / "pwned"
    _evil_batches(tmp_path / "evil" / "cifar-10-batches-py", _System(f"touch {marker}"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOCOMPRESS_DATA", raising=False)
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))  # no CIFAR-10 extracted by other tests
    (tmp_path / "rates.yaml").write_text("default: 0.5\n")
    for recorded in (str(tmp_path / "evil"), "evil"):
        ckpt = tmp_path / "m.pt"
        _checkpoint(ckpt, {"name": "cifar10", "input_size": [3, 32, 32], "num_classes": 10, "data_dir": recorded})
        assert main(["evaluate", str(ckpt)]) == 2
        err = _error_line(capsys)
        assert "CIFAR-10 not found" in err and f"data in {recorded}, which is not read" in err
        assert main(["prune", str(ckpt), "--rates", "rates.yaml", "--out", str(tmp_path / "p.pt")]) == 2
        assert "CIFAR-10 not found" in _error_line(capsys)
        with pytest.raises(UserError, match="CIFAR-10 not found"):
            checkpoint_dataset(load_checkpoint(ckpt)["dataset"])
        assert not marker.exists()
    # naming the folder reads it -- with the restricted unpickler, which refuses the payload
    assert main(["evaluate", str(ckpt), "--data-dir", "evil"]) == 2
    assert "refusing data file" in _error_line(capsys) and not marker.exists()


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    """Anything but numpy's array reconstruction is refused, including numpy functions that read files."""
    for payload in (np.load, getattr, eval, __import__):
        path = tmp_path / "x"
        path.write_bytes(pickle.dumps({"f": payload}))
        with pytest.raises(UserError, match=f"refers to .*{payload.__name__}"):
            read_data_pickle(path)


def test_build_cannot_modify_the_stand_in_classes(tmp_path):
    """A BUILD opcode aimed at a stand-in class (numpy.dtype) with slot state would setattr on it with
    pickle's default path; the stand-ins refuse it."""
    # protocol 2: GLOBAL 'numpy dtype', (None, {'resolve': 1}) tuple, BUILD, STOP
    stream = b"\x80\x02cnumpy\ndtype\nN}X\x07\x00\x00\x00resolveK\x01s\x86b."
    path = tmp_path / "build"
    path.write_bytes(stream)
    with pytest.raises(UserError, match="refusing data file"):
        read_data_pickle(path)
    assert callable(data._DTypeStub.resolve)


class _Py2Array:
    """Pickles like a numpy array written by Python 2 (raw data as a latin-1 str, what encoding="latin1"
    turns Python 2's str into)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __reduce__(self):
        reconstruct = np.ndarray.__reduce__(self.array)[0]
        state = (1, self.array.shape, self.array.dtype, False, self.array.tobytes().decode("latin1"))
        return reconstruct, (np.ndarray, (0,), "b"), state


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python_batches_read_like_pickle_load(tmp_path, protocol):
    """Benign files of every protocol (and a Python-2-style array) give exactly what pickle.load gives."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1], dtype=np.int64)
    for value in ({"data": images, "labels": labels.tolist()}, {"data": _Py2Array(images), "labels": labels},
                  {"data": images, "labels": labels.astype(">i4")}):
        path = tmp_path / "batch"
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        trusted = pickle.loads(path.read_bytes(), encoding="latin1")
        safe = read_data_pickle(path)
        assert np.array_equal(data._plain_array(safe["data"], np.uint8), trusted["data"])
        assert np.array_equal(data._plain_array(safe["labels"], np.int64), np.asarray(trusted["labels"]))


@pytest.mark.parametrize("array, needle", [
    (np.array([1, "x"] * 3072, dtype=object), "holds objects"),
    (np.zeros(3072, dtype="i4,i4"), "not a plain number type"),
    (np.full(2 * 3072, 0.5), "do not fit uint8"),
    (np.full(2 * 3072, 256), "do not fit uint8"),
])
def test_batches_of_other_types_are_refused(tmp_path, array, needle):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in BATCH_FILES[:-1]:
        (folder / name).write_bytes(pickle.dumps({"data": array, "labels": [0, 1]}))
    with pytest.raises(UserError, match=f"data_batch_1 is not a data / labels dict .*{needle}"):
        get_dataset("cifar10", tmp_path, val_size=0)


# ----------------------------------------------------------------------------------------- integrity
def _entry_data_offset(path, name: str) -> int:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    raw = path.read_bytes()[info.header_offset:info.header_offset + 30]
    return info.header_offset + 30 + int.from_bytes(raw[26:28], "little") + int.from_bytes(raw[28:30], "little")


def test_verify_archive_detects_a_flipped_byte_in_tensor_data(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, path)
    verify_archive(path)  # intact
    with zipfile.ZipFile(path) as archive:
        storage = next(n for n in archive.namelist() if "/data/" in n and not n.endswith("serialization_id"))
    damaged = bytearray(path.read_bytes())
    damaged[_entry_data_offset(path, storage) + 401] ^= 0x01  # one bit of w[100]
    path.write_bytes(bytes(damaged))
    assert torch.load(path, weights_only=True)["w"][100] != 100  # torch.load itself does not notice
    with pytest.raises(UserError, match=rf"checkpoint {path} is damaged \(CRC mismatch in {storage}\)"):
        verify_archive(path)


def test_verify_archive_refuses_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(10)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="is damaged or not a torch.save archive"):
        verify_archive(path)
    with pytest.raises(UserError, match="does not exist"):
        verify_archive(tmp_path / "none.pt")


def test_archives_saved_without_crcs_pass(tmp_path):
    path = tmp_path / "m.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.ones(10)}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(path) as archive:
        assert all(info.CRC == 0 for info in archive.infolist())
    verify_archive(path)


def test_check_finite_names_the_first_bad_tensor():
    state = {"a.weight": torch.ones(3), "steps": torch.tensor([7]), "b.weight": torch.tensor([1.0, float("nan"),
             float("inf"), float("-inf")]), "c.weight": torch.tensor([float("nan")])}
    with pytest.raises(UserError, match=r"checkpoint m.pt holds non-finite weights: b.weight \(4,\) has 1 NaN "
                                        r"and 2 Inf entries"):
        check_finite(state, "checkpoint m.pt")
    check_finite({"a.weight": torch.ones(3), "n": torch.tensor([2**62])}, "checkpoint m.pt")
    model = create_model("resnet20", num_classes=10)
    check_finite(model.state_dict(), "resnet20")
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(UserError, match="layer2.0.conv1.weight"):
        check_finite(model.state_dict(), "resnet20")


@pytest.mark.parametrize("change, field", [
    (lambda c: c["model"].update(kwargs="not a mapping"), "model.kwargs"),
    (lambda c: c["model"]["kwargs"].update(num_classes=10 ** 10), "model.kwargs"),
    (lambda c: c["model"]["kwargs"].update(width=1e30), "model.kwargs"),
    (lambda c: c["dataset"].update(input_size="abc"), "dataset.input_size"),
    (lambda c: c["dataset"].update(input_size=[1, 10 ** 9, 28]), "dataset.input_size"),
    (lambda c: c["dataset"].update(val_size="big"), "dataset.val_size"),
    (lambda c: c.update(architecture=["not", "a", "mapping"]), "architecture"),
])
def test_crafted_checkpoint_fields_are_one_line_errors(tmp_path, capsys, change, field):
    """Each crafted field: exit 2 with one line naming the field, quickly, for every command reading it."""
    import time

    ckpt = torch.load(Path(__file__).parents[1] / "assets" / "fmnist_cnn_base.pt", weights_only=True)
    change(ckpt)
    path = tmp_path / "crafted.pt"
    torch.save(ckpt, path)
    for command in (["inspect", str(path), "--no-latency"], ["evaluate", str(path)],
                    ["compress", str(path), "--target", "params=2x", "--out", str(tmp_path / "run")]):
        started = time.perf_counter()
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"malformed {field} entry" in err, (command, err)
        assert time.perf_counter() - started < 30
    assert not (tmp_path / "run").exists()


def test_an_unbuildable_architecture_entry_is_a_one_line_error(tmp_path):
    from autocompress.checkpoint import model_from_checkpoint

    ckpt = torch.load(Path(__file__).parents[1] / "assets" / "fmnist_cnn_base.pt", weights_only=True)
    ckpt["architecture"] = {"format": "autocompress-architecture", "version": 1,
                            "modules": {"features.0.0": {"type": "Conv2d", "args": {"in_channels": 10 ** 9}}}}
    torch.save(ckpt, tmp_path / "crafted.pt")
    with pytest.raises(UserError, match="cannot be built"):
        model_from_checkpoint(load_checkpoint(tmp_path / "crafted.pt"))
