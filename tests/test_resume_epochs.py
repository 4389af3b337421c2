"""Resume inside a training phase: a run killed after epoch k of ADMM or of masked retraining continues with
epoch k + 1 (not the phase's first epoch) and ends with the weights and records of an uninterrupted run."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autocompress import training
from autocompress.compaction import densify
from autocompress.config import CompressConfig
from autocompress.epoch_checkpoint import EpochCheckpoint
from autocompress.errors import UserError
from autocompress.pruning import expand_rates
from autocompress.rounds import Pipeline, RoundState
from autocompress.runfolder import RunFolder
from autocompress.task import Task

CONFIG = {"admm": {"epochs": 3, "update_interval": 4}, "retrain": {"epochs": 3},
          "purification": {"enabled": False}, "distillation": {"enabled": True}}  # teacher cache in the checkpoint


class Killed(Exception):
    """Stands for a kill of the process."""


def _run(run_dir, *, kill_at: str | None = None, seeded_loader: bool = True, flipped: bool = False):
    """One pruning round (ADMM, hard pruning, masked retraining, compaction: the round function of
    ``autocompress.compress``) of a tiny CNN with dropout (global-generator draws every step) at rate 0.5,
    with its phases in the run folder ``run_dir``; with ``kill_at`` (an epoch's progress label, e.g.
    ``"ADMM epoch 3/3"``) it raises :class:`Killed` when that epoch starts; ``flipped``: the classes in reverse
    order (other training data, so other weights after ADMM). Returns ``(the compact model's
    state_dict or None, the epochs trained, the log lines, the records)``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 8, 8, generator=g)
    y = (x[:, :, :4].mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :, :4].mean((1, 2, 3)) > 0).long()
    y = 3 - y if flipped else y
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    generator = torch.Generator().manual_seed(0) if seeded_loader else None
    train = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=generator)
    epochs, lines = [], []
    original = training.train_epoch

    def train_epoch(*args, desc="", **kwargs):
        if desc == kill_at:
            raise Killed(desc)
        epochs.append(desc)
        return original(*args, desc=desc, **kwargs)

    store = RunFolder(run_dir).open()
    pipeline = Pipeline(task=Task(train), config=CompressConfig.from_dict(CONFIG, validate=False),
                        example_inputs=(x[:1],), base_model=model, store=store, progress=False, log=lines.append)
    work = densify(model)
    space = pipeline.space(work)
    state = RoundState(1, None, work, space, rates=expand_rates(space, {"default": 0.5}, ("filter", "column")))
    training.train_epoch = train_epoch
    try:
        pipeline.run_round(state, last=True)
        return state.compact_model.state_dict(), epochs, lines, store.records
    except Killed:
        return None, epochs, lines, None
    finally:
        training.train_epoch = original
        store.close()


def _untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``fn(seeded_loader) -> (weights, epochs, untimed records)`` of an uninterrupted run (computed once)."""
    runs = {}

    def run(seeded_loader: bool):
        if seeded_loader not in runs:
            weights, epochs, _, records = _run(tmp_path_factory.mktemp("full") / "run", seeded_loader=seeded_loader)
            runs[seeded_loader] = weights, epochs, _untimed(records)
        return runs[seeded_loader]
    return run


@pytest.mark.parametrize("kill_at, seeded_loader, after", [
    ("ADMM epoch 3/3", True, "round 1 ADMM: resuming after epoch 2/3"),
    # DataLoader(shuffle=True) without a generator draws its order from the global generator, saved too
    ("retrain epoch 2/3", False, "round 1 retraining: resuming after epoch 1/3")])
def test_a_kill_after_epoch_k_resumes_at_epoch_k_plus_1_with_the_uninterrupted_result(
        tmp_path, uninterrupted, kill_at, seeded_loader, after):
    full_weights, full_epochs, full_records = uninterrupted(seeded_loader)
    run_dir = tmp_path / "run"
    weights, before, _, _ = _run(run_dir, kill_at=kill_at, seeded_loader=seeded_loader)
    assert weights is None
    phase = "admm" if kill_at.startswith("ADMM") else "retrain"
    assert sorted(p.name for p in (run_dir / "round1").glob("*.epoch.pt")) == [f"{phase}.epoch.pt"]
    checkpoint = torch.load(run_dir / "round1" / f"{phase}.epoch.pt", weights_only=True)
    stored = checkpoint["loop"]["teacher_cache"]
    assert stored["keys"].shape == (300, 16) and stored["enabled"]  # every training image's teacher output
    # the phase's time counts the earlier process's epochs (helper 31's resumed run said only the last process's)
    assert 0 < checkpoint["seconds"] < 60
    torch.save({**checkpoint, "seconds": 1000.0}, run_dir / "round1" / f"{phase}.epoch.pt")

    weights, resumed, lines, records = _run(run_dir, seeded_loader=seeded_loader)
    cut = full_epochs.index(kill_at)
    assert before == full_epochs[:cut] and resumed == full_epochs[cut:]  # no epoch trained twice
    assert after in lines
    assert weights.keys() == full_weights.keys()
    assert all(torch.equal(weights[k], full_weights[k]) for k in weights)
    assert _untimed(records) == full_records  # ADMM residual history, epoch losses, round record
    seconds = {r["phase"]: r["seconds"] for r in records if r.get("event") == "phase"}
    assert 1000 < seconds[phase] < 1060 and all(s < 60 for name, s in seconds.items() if name != phase)
    assert not list(run_dir.rglob("*.epoch.pt"))  # removed when its phase finished


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


def test_an_epoch_checkpoint_of_another_phase_length_or_loader_is_refused():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stored = {}
    EpochCheckpoint(lambda: None, stored.update).save(2, 5, model, optimizer, None, {"history": [1, 2]})
    with pytest.raises(UserError, match="after epoch 2 of 5, but the phase has 3 epochs"):
        EpochCheckpoint(lambda: stored, stored.update).resume(model, optimizer, None, 3)
    with pytest.raises(UserError, match="state of 0 loader generator.*the training loader has 1"):
        EpochCheckpoint(lambda: stored, stored.update, generators=[torch.Generator()]).resume(model, optimizer,
                                                                                               None, 5)
    assert EpochCheckpoint(lambda: stored, stored.update).resume(model, optimizer, None, 5) == (2, {"history": [1, 2]})


def test_an_epoch_checkpoint_of_a_phase_that_started_from_other_weights_is_set_aside(tmp_path):
    """Fresh user 74: with state.json deleted, a retraining epoch checkpoint an earlier run left was resumed from
    although ADMM, done again, had given other weights (here: on other labels). It is set aside, said so, and the
    run ends as an uninterrupted one on the new data."""
    full_weights, full_epochs, _, _ = _run(tmp_path / "full", flipped=True)
    run_dir = tmp_path / "run"
    assert _run(run_dir, kill_at="retrain epoch 2/3")[0] is None
    (run_dir / "state.json").unlink()
    weights, epochs, lines, _ = _run(run_dir, flipped=True)
    assert "round 1 retraining: the epoch checkpoint after epoch 1/3 is of a phase that started from other " \
           "weights (left by an earlier run of this folder); starting from epoch 1" in lines
    assert not any("resuming" in line for line in lines) and epochs == full_epochs
    assert all(torch.equal(weights[k], full_weights[k]) for k in full_weights)


def test_an_epoch_checkpoint_resumes_only_onto_the_weights_its_phase_started_from():
    model, other = nn.Linear(2, 2), nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stored, lines = {}, []
    first = EpochCheckpoint(lambda: None, lambda state: stored.update(copy.deepcopy(state)))  # as on disk
    assert first.resume(model, optimizer, None, 5) == (0, {})
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)  # an epoch trained
    first.save(1, 5, model, optimizer, None, {"history": [1]})
    model.load_state_dict(start)
    again = EpochCheckpoint(lambda: stored, stored.update, log=lines.append)
    assert again.resume(other, optimizer, None, 5) == (0, {}) and again.resumed is None
    assert lines == ["training: the epoch checkpoint after epoch 1/5 is of a phase that started from other weights "
                     "(left by an earlier run of this folder); starting from epoch 1"]
    assert again.resume(model, optimizer, None, 5) == (1, {"history": [1]}) and again.resumed is stored
    assert torch.equal(model.weight, start["weight"] + 1.0)
