"""``autocompress prune``: RATES.yaml, --list-units, the written compact model, error paths (exit 2)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import autocompress
from autocompress.checkpoint import load_checkpoint, save_checkpoint
from autocompress.cli import main
from autocompress.cli.prune import RATES_FORMAT
from autocompress.metrics import count_params
from autocompress.models import create_model
from autocompress.pruning import expand_rates
from autocompress.space import PruningSpace
from autocompress.training import seeded

README = Path(__file__).resolve().parents[1] / "README.md"


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
    # every top-1 it prints, the log lines of hard pruning and retraining included, is a percentage
    assert re.search(r"^hard pruning: val top-1 \d+\.\d\d%, after purification: val top-1 \d+\.\d\d%"
                     r"(, which cut beyond the rates most in \d+ (channels|columns) of [\w.]+ \(\d+ of \d+ kept\).*)?$",
                     stdout, re.M)
    assert re.search(r"^retrain epoch 1/1: train loss \d+\.\d+, train top-1 \d+\.\d\d%$", stdout, re.M)
    assert all(re.fullmatch(r"\d+\.\d\d%", value) for value in re.findall(r"top-1\s+([^\s,]+)", stdout))
    compact = autocompress.load(out)
    stored = load_checkpoint(out)
    assert stored["architecture"] is not None
    assert count_params(compact) == stored["metrics"]["params"] < count_params(create_model("fmnist_cnn", width=0.25))
    assert f"{stored['metrics']['params']:,}" in stdout
    assert stored["config"]["rates"]["column"]["classifier"] == 0.25
    # never overwrite without --overwrite
    code, _, err = _run(capsys, checkpoint, "--rates", rates, "--out", out)
    assert code == 2 and "already exists" in err
    code, _, err = _run(capsys, checkpoint, "--rates", rates, "--out", out.parent, "--overwrite")  # a folder
    assert code == 2 and err.strip().endswith(f"--out {out.parent} is a folder; prune writes one model file; pass "
                                              f"a file path such as {out.parent / 'pruned.pt'}")


def test_list_units(checkpoint, capsys):
    code, stdout, _ = _run(capsys, checkpoint, "--list-units")
    assert code == 0
    assert "features.0.0  (8 channels)" in stdout
    assert "classifier  (32 columns)" in stdout
    assert "excluded:" in stdout and "classifier" in stdout.split("excluded:")[1]


def test_ignore_keeps_a_layer_out_and_a_wrong_name_exits_2_naming_the_flag(checkpoint, capsys):
    code, stdout, _ = _run(capsys, checkpoint, "--list-units", "--ignore", "features.0")
    assert code == 0 and "features.0.0: ignored by request" in stdout.split("excluded:")[1]
    assert "features.0.0  (" not in stdout
    code, _, err = _run(capsys, checkpoint, "--list-units", "--ignore", "features.9")
    assert code == 2 and "--ignore ['features.9'] names no module of" in err


@pytest.mark.parametrize("text, message", [
    ("filter: {nope: 0.5}\n", "valid filter names: features.0.0"),
    ("default: 1.5\n", "outside [0, 1)"),
    ("default: half\n", "the default rate is 'half', outside [0, 1); give each rate as a fraction removed"),
    ("irregular: {classifier: 0.5}\n", "but dims is filter,column"),
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


def test_help_and_readme_document_the_rates_format(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.endswith("\n\n" + RATES_FORMAT)
    example = [line[2:] for line in RATES_FORMAT.splitlines()
               if re.match(r"  (default|filter|column|irregular):", line)]
    assert [line.split(":")[0] for line in example] == ["default", "filter", "column", "irregular"]
    readme = README.read_text()
    assert all(f"\n{line}\n" in readme for line in example)
    # the example is what the code accepts, for the model whose names it uses
    model = create_model("fmnist_cnn", width=0.25)
    dims = ("filter", "column", "irregular")
    space = PruningSpace.build(model, torch.zeros(1, 1, 28, 28), dims=dims)
    rates = expand_rates(space, yaml.safe_load("\n".join(example)), dims)
    assert rates["filter"] == {"features.0.0": 0.3, "features.2.0": 0.5, "features.3.0": 0.5, "features.5.0": 0.5,
                               "features.6.0": 0.5}
    assert rates["column"]["classifier"] == 0.8 and rates["column"]["features.0.0"] == 0.5
    assert rates["irregular"]["features.3.0"] == 0.9 and rates["irregular"]["classifier"] == 0.5


@pytest.mark.parametrize("flags, message", [
    (["--retrain-epochs", "-2"], "--retrain-epochs -2 is negative; pass --retrain-epochs >= 0 (0: no retraining)"),
    (["--device", "mps"], "device 'mps' is not available here; use auto, cpu, cuda or cuda:N (set by --device)"),
    (["--device", "xpu"], "device 'xpu' is not available here; use auto, cpu, cuda or cuda:N (set by --device)"),
    (["--device", "meta"], "device 'meta' is not available here; use auto, cpu, cuda or cuda:N (set by --device)"),
])
def test_bad_retrain_epochs_and_devices_exit_2(checkpoint, tmp_path, capsys, flags, message):
    rates = tmp_path / "rates.yaml"
    rates.write_text("default: 0.5\n")
    out = tmp_path / "never.pt"
    code, _, err = _run(capsys, checkpoint, "--rates", rates, "--out", out, "--max-train", 200, *flags)
    assert (code, err) == (2, f"autocompress: error: {message}\n")
    assert not out.exists()


@pytest.mark.parametrize("value, message", [
    ("-0.1", "'-0.1' must be a fraction >= 0, e.g. 0.005 (half a top-1 point)"),
    ("nan", "'nan' must be a fraction >= 0, e.g. 0.005 (half a top-1 point)"),
    ("lots", "'lots' is not a number; give a fraction such as 0.005"),
])
def test_bad_purify_tolerance_is_refused_before_any_work(checkpoint, tmp_path, capsys, value, message):
    out = tmp_path / "never.pt"
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(checkpoint), "--rates", str(tmp_path / "missing.yaml"), "--out", str(out),
              "--purify-tolerance", value])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line == f"autocompress prune: error: argument --purify-tolerance: {message}"
    assert not out.exists()
