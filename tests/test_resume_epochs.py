"""Resume inside a training phase: a run killed after epoch k of ADMM or of masked retraining continues with
epoch k + 1 (not the phase's first epoch) and ends with the weights and records of an uninterrupted run."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autocompress
from autocompress import training
from autocompress.errors import UserError
from autocompress.runfolder import RunFolder

CONFIG = {"rounds": [2.0], "admm": {"epochs": 3, "update_interval": 4}, "retrain": {"epochs": 3},
          "search": {"max_evaluations": 2}, "quick_eval": {"bn_batches": 1, "val_batches": 1},
          "purification": {"enabled": False}, "latency_runs": 1}


class Killed(Exception):
    """Stands for a kill of the process."""


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(340, 1, 8, 8, generator=g)
    y = (x[:, :, :4].mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :, :4].mean((1, 2, 3)) > 0).long()
    return x, y


def _run(run_dir, *, kill_at: str | None = None, seeded_loader: bool = True):
    """One ``compress`` call on a tiny CNN with dropout (global-generator draws every step); with
    ``kill_at`` (an epoch's progress label, e.g. ``"ADMM epoch 3/3"``) it raises :class:`Killed` when that
    epoch starts. Returns ``(final state_dict or None, the epochs trained, the log lines)``."""
    x, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    generator = torch.Generator().manual_seed(0) if seeded_loader else None
    train = DataLoader(TensorDataset(x[:300], y[:300]), batch_size=50, shuffle=True, generator=generator)
    val = DataLoader(TensorDataset(x[300:], y[300:]), batch_size=40)
    epochs, lines = [], []
    original = training.train_epoch

    def train_epoch(*args, desc="", **kwargs):
        if desc == kill_at:
            raise Killed(desc)
        epochs.append(desc)
        return original(*args, desc=desc, **kwargs)

    training.train_epoch = train_epoch
    try:
        result = autocompress.compress(model, x[:1], "params=2x", train_loader=train, val_loader=val,
                                       config=CONFIG, device="cpu", progress=False, run_dir=run_dir,
                                       log=lines.append)
        return result.model.state_dict(), epochs, lines
    except Killed:
        return None, epochs, lines
    finally:
        training.train_epoch = original


def _records(run_dir) -> list[dict]:
    """The run's metrics records without timings and measured latencies."""
    volatile = {"seconds", "latency_ms", "_phase"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in volatile and "latency" not in k} for r in records
            if r["event"] not in ("final",)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    weights, epochs, _ = _run(run_dir)
    return weights, epochs, _records(run_dir)


@pytest.mark.parametrize("kill_at, after", [("ADMM epoch 3/3", "round 1 ADMM: resuming after epoch 2/3"),
                                            ("retrain epoch 2/3", "round 1 retraining: resuming after epoch 1/3")])
def test_a_kill_after_epoch_k_resumes_at_epoch_k_plus_1_with_the_uninterrupted_result(
        tmp_path, uninterrupted, kill_at, after):
    full_weights, full_epochs, full_records = uninterrupted
    run_dir = tmp_path / "run"
    weights, before, _ = _run(run_dir, kill_at=kill_at)
    assert weights is None
    phase = "admm" if kill_at.startswith("ADMM") else "retrain"
    assert sorted(p.name for p in (run_dir / "round1").glob("*.epoch.pt")) == [f"{phase}.epoch.pt"]

    weights, resumed, lines = _run(run_dir)
    cut = full_epochs.index(kill_at)
    assert before == full_epochs[:cut] and resumed == full_epochs[cut:]  # no epoch trained twice
    assert after in lines
    assert weights.keys() == full_weights.keys()
    assert all(torch.equal(weights[k], full_weights[k]) for k in weights)
    assert _records(run_dir) == full_records
    assert not list(run_dir.rglob("*.epoch.pt"))  # removed when its phase finished


def test_a_loader_without_its_own_generator_is_replayed_from_the_global_one(tmp_path):
    """``DataLoader(shuffle=True)`` without a generator draws its order from the global generator, which the
    epoch checkpoint saves: the resumed run ends as the uninterrupted one."""
    full, _, _ = _run(tmp_path / "full", seeded_loader=False)
    _run(tmp_path / "cut", kill_at="retrain epoch 3/3", seeded_loader=False)
    resumed, epochs, _ = _run(tmp_path / "cut", seeded_loader=False)
    assert epochs == ["retrain epoch 3/3"]
    assert all(torch.equal(resumed[k], full[k]) for k in full)


def test_a_damaged_epoch_checkpoint_names_the_file_to_delete(tmp_path):
    folder = RunFolder(tmp_path / "run").open()
    try:
        folder.save_epoch(1, "retrain", {"epoch": 1})
        path = folder.epoch_file(1, "retrain")
        path.write_bytes(path.read_bytes()[:-20])
        with pytest.raises(UserError, match=r"epoch checkpoint of the retrain phase of round 1 .* is damaged"
                                            r".*delete .*retrain\.epoch\.pt"):
            folder.load_epoch(1, "retrain")
        folder.finish(1, "retrain", [])
        assert not path.exists() and folder.load_epoch(1, "retrain") is None
    finally:
        folder.close()
