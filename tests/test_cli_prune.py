"""``autocompress prune``: RATES.yaml, --list-units, the written compact model, error paths (exit 2)."""
from __future__ import annotations

import pytest
import torch

import autocompress
from autocompress.checkpoint import load_checkpoint, save_checkpoint
from autocompress.cli import main
from autocompress.metrics import count_params
from autocompress.models import create_model
from autocompress.training import seeded


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    with seeded(0):
        model = create_model("fmnist_cnn", width=0.25)
    path = tmp_path_factory.mktemp("ckpt") / "base.pt"
    save_checkpoint(path, model=model, model_name="fmnist_cnn", model_kwargs={"width": 0.25, "num_classes": 10},
                    dataset={"name": "fashion-mnist", "input_size": [1, 28, 28], "num_classes": 10,
                             "val_size": 200, "seed": 0},
                    config={}, metrics={})
    return path


def _run(capsys, *argv):
    code = main(["prune", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_writes_a_loadable_compact_model(checkpoint, tmp_path, capsys):
    rates = tmp_path / "rates.yaml"
    rates.write_text("default: 0.5\ncolumn: {classifier: 0.25}\n")
    out = tmp_path / "pruned.pt"
    code, stdout, _ = _run(capsys, checkpoint, "--rates", rates, "--admm-epochs", 1, "--retrain-epochs", 1,
                           "--max-train", 300, "--max-test", 100, "--rho-init", 0.5, "--update-interval", 3,
                           "--no-progress", "--out", out)
    assert code == 0
    assert "parameters" in stdout and "MACs / image" in stdout and str(out) in stdout
    compact = autocompress.load(out)
    stored = load_checkpoint(out)
    assert stored["architecture"] is not None
    assert count_params(compact) == stored["metrics"]["params"] < count_params(create_model("fmnist_cnn", width=0.25))
    assert f"{stored['metrics']['params']:,}" in stdout
    assert stored["config"]["rates"]["column"]["classifier"] == 0.25
    # never overwrite without --overwrite
    code, _, err = _run(capsys, checkpoint, "--rates", rates, "--out", out)
    assert code == 2 and "already exists" in err


def test_list_units(checkpoint, capsys):
    code, stdout, _ = _run(capsys, checkpoint, "--list-units")
    assert code == 0
    assert "features.0.0  (8 channels)" in stdout
    assert "classifier  (32 columns)" in stdout
    assert "excluded:" in stdout and "classifier" in stdout.split("excluded:")[1]


@pytest.mark.parametrize("text, message", [
    ("filter: {nope: 0.5}\n", "valid filter names: features.0.0"),
    ("default: 1.5\n", "outside [0, 1)"),
    ("irregular: {classifier: 0.5}\n", "--dims"),
    ("- 0.5\n", "does not hold a mapping"),
    ("default: [\n", "not valid YAML"),
])
def test_bad_rates_exit_2(checkpoint, tmp_path, capsys, text, message):
    rates = tmp_path / "rates.yaml"
    rates.write_text(text)
    out = tmp_path / "never.pt"
    code, _, err = _run(capsys, checkpoint, "--rates", rates, "--out", out)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_inputs_exit_2(checkpoint, tmp_path, capsys):
    code, _, err = _run(capsys, checkpoint, "--rates", tmp_path / "absent.yaml")
    assert code == 2 and "does not exist" in err
    code, _, err = _run(capsys, checkpoint)
    assert code == 2 and "--rates" in err
    code, _, err = _run(capsys, tmp_path / "absent.pt", "--list-units")
    assert code == 2 and "does not exist" in err
