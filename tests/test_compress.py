"""AutoCompress end to end through the CLI adapter on real Fashion-MNIST: targets met, counts equal to the
compact model's own, resume after an interruption equal to an uninterrupted run, and the refusals that
must come before any training."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

import autocompress
from autocompress import metrics
from autocompress.cli import main
from autocompress.data import DEBIAN_FASHION_MNIST, get_dataset
from autocompress.errors import UserError
from autocompress.models import create_model
from autocompress.rounds import Pipeline
from autocompress.space import PruningSpace
from autocompress.training import TrainConfig, fit

SMALL = {"val_size": 500, "max_train": 1500, "max_test": 500, "batch_size": 64, "latency_runs": 2,
         "search": {"max_evaluations": 3}, "quick_eval": {"bn_batches": 2, "val_batches": 2, "finetune_steps": 5},
         "admm": {"epochs": 1, "rho_init": 0.05, "update_interval": 6}, "retrain": {"epochs": 1},
         "purification": {"enabled": True, "thresholds": [0.05]}, "target": "params=3x", "rounds": [1.8, 3.0]}


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A fmnist_cnn (width 0.5) trained for one epoch on 3000 real Fashion-MNIST images."""
    path = tmp_path_factory.mktemp("base") / "base.pt"
    splits = get_dataset("fashion-mnist", val_size=500, max_train=3000, max_test=500)
    torch.manual_seed(0)
    model = create_model("fmnist_cnn", num_classes=10, width=0.5)
    fit(model, splits, TrainConfig(epochs=1, batch_size=64, lr=0.05), checkpoint_path=path,
        model_name="fmnist_cnn", model_kwargs={"num_classes": 10, "width": 0.5}, progress=False)
    return path


def _config_file(folder, **overrides):
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **overrides}))
    return path


def _compress(checkpoint, out, *flags, **overrides) -> int:
    config = _config_file(out.parent, **overrides)
    return main(["compress", str(checkpoint), "--config", str(config), "--out", str(out), "--device", "cpu",
                 "--quiet", *flags])


def _final(out) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "final"][-1]


@pytest.fixture(scope="module")
def finished_run(base_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert _compress(base_checkpoint, out) == 0
    return out, _final(out)


def test_compress_meets_target_on_real_data(finished_run, base_checkpoint):
    out, final = finished_run
    base = autocompress.load(base_checkpoint)
    compact = autocompress.load(out / "model.pt")
    example = torch.zeros(1, 1, 28, 28)
    params = metrics.count_params(compact)
    assert metrics.count_params(base) / params >= 3.0 * 0.99
    base_row, comp_row = final["rows"]
    assert comp_row["params"] == params and base_row["params"] == metrics.count_params(base)
    from autocompress.checkpoint import load_checkpoint
    stored_base = load_checkpoint(out / "model.pt")["metrics"]["base_params"]
    assert stored_base == metrics.count_params(base)  # inspect checks its base by it
    assert comp_row["macs"] == metrics.count_macs(compact, example)
    assert comp_row["test_top1"] > 30.0  # a real classifier after 3x, far above chance (10%)
    assert comp_row["file_bytes"] == (out / "model.pt").stat().st_size
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    for event in ("base", "search", "admm", "purification", "retrain", "round", "final"):
        assert event in events
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for r in records if r["event"] == "retrain" for e in r["history"]]
    # training top-1 in %, like every other record (it was a fraction); a real classifier, far above chance
    assert epochs and all(30.0 < e["train_top1"] <= 100.0 and e["epoch"] >= 1 for e in epochs)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 4 and "test top-1" in html
    assert (out / "config.yaml").exists() and (out / "round2" / "compact.pt").exists()
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["source"]["checkpoint"] == str(base_checkpoint.resolve())
    assert stored["run"]["threads"] == torch.get_num_threads()
    assert stored["search"]["guidance"] == "auto" and stored["run"]["guidance"] == "layer"  # a params target
    multiple = stored["run"]["channel_multiple"]  # auto, also for a params target: 8 (or a fall-back)
    assert stored["run"]["dims"] == "filter,column" and stored["channel_multiple"] is None and multiple in (8, 4, 1)
    base_convs = {name: m for name, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for name, conv in compact.named_modules():  # every filter group kept a multiple of the channels, or all of them
        if name in base_convs:
            assert conv.out_channels % multiple == 0 or conv.out_channels == base_convs[name].out_channels, name


def test_search_estimate_equals_measured_counts(finished_run, base_checkpoint):
    """The count the search works with (space.count of the projected masks) is the compact model's own,
    measured with torch.utils.flop_counter, for the rates the round-1 search chose on the real model."""
    from autocompress.compaction import compact
    from autocompress.masks import apply_masks
    from autocompress.projection import project

    out, _ = finished_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    search = next(r for r in records if r["event"] == "search" and r["round"] == 1)
    model = autocompress.load(base_checkpoint)
    x = torch.zeros(1, 1, 28, 28)
    multiple = yaml.safe_load((out / "config.yaml").read_text())["run"]["channel_multiple"]
    space = PruningSpace.build(model, x, dims=("filter", "column"), channel_multiple=multiple)
    masks = project(space, model, search["rates"])
    param_masks = space.param_masks(masks)
    apply_masks(model, param_masks)
    compact_model = compact(model, param_masks, x, channel_multiple=multiple).model
    counts = space.count(masks)
    assert counts.params == metrics.count_params(compact_model)
    assert counts.macs == metrics.count_macs(compact_model, x)
    assert metrics.count_params(autocompress.load(base_checkpoint)) / counts.params == \
        pytest.approx(search["compression"], rel=1e-9)
    assert search["counted"] == "params"
    # the record's filter widths are the channels each group keeps in the projected masks
    assert search["filters"] == {g.name: int(masks.filters[g.name].sum()) for g in space.filter_groups}


@pytest.mark.parametrize("phase, round_index, written", [("_retrain", 2, "round2/purify.pt"),
                                                           ("_compact", 1, "round1/retrain.pt")])
def test_resume_after_interruption_equals_uninterrupted(finished_run, base_checkpoint, tmp_path, monkeypatch,
                                                        phase, round_index, written):
    """Interrupted before round 2's retraining, or after round 1's retraining (its state belongs to the
    shrunk model, which the resumed run must rebuild): the same model, the same table, no duplicate records."""
    out_full, final_full = finished_run
    out = tmp_path / "interrupted"
    original = getattr(Pipeline, phase)

    def interrupted(self, state, *, last):
        if state.index == round_index:
            raise KeyboardInterrupt
        return original(self, state, last=last)

    monkeypatch.setattr(Pipeline, phase, interrupted)
    assert _compress(base_checkpoint, out) == 130
    assert not (out / "model.pt").exists() and (out / written).exists()
    monkeypatch.setattr(Pipeline, phase, original)
    assert main(["compress", "--resume", str(out), "--quiet"]) == 0
    full_file, resumed_file = (torch.load(path / "model.pt", weights_only=True) for path in (out_full, out))
    assert resumed_file["config"] == full_file["config"] and full_file["config"]["rounds"] == [1.8, 3.0]  # user 61
    full, resumed = full_file["state_dict"], resumed_file["state_dict"]
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    final = _final(out)
    assert [r["test_top1"] for r in final["rows"]] == [r["test_top1"] for r in final_full["rows"]]
    phases = [(r["round"], r["phase"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "phase"]
    assert len(phases) == len(set(phases)) == 10


def test_unreachable_target_refused_before_training(base_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert _compress(base_checkpoint, out, target="params=5000x", rounds="doubling") == 2
    assert "target" in capsys.readouterr().err
    assert not (out / "round1").exists()


def test_cli_errors_exit_2(base_checkpoint, finished_run, tmp_path, capsys):
    out, _ = finished_run
    assert main(["compress", str(base_checkpoint), "--out", str(tmp_path / "a")]) == 2
    assert "no target given; set target, e.g. params=10x or flops=4x (on the command line: --target)" in \
        capsys.readouterr().err
    assert main(["compress", str(base_checkpoint), "--target", "params=2x", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["compress", "--resume", str(tmp_path / "nothing")]) == 2
    assert main(["compress", str(tmp_path / "missing.pt"), "--target", "params=2x", "--out",
                 str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("autocompress: error:") for line in err)
    assert main(["compress", str(base_checkpoint), "--target", "params=2x", "--ignore", "features.0", "--ignore",
                 "head", "--out", str(tmp_path / "c")]) == 2
    assert "--ignore ['head'] names no module of" in capsys.readouterr().err
    assert not (tmp_path / "c" / "round1").exists()


def test_resume_continues_a_run_whose_auto_setting_the_data_resolved(base_checkpoint, tmp_path, monkeypatch):
    """Fresh user 73: ``--resume`` passed the settings ``config.yaml`` holds resolved (``distillation.enabled: true``,
    which the base's fit decided), and the run folder, which compares them with the settings as given
    (``run.given``: ``auto``), refused "holds a run with other settings (distillation.enabled: 'auto' in the folder,
    True now)". ``--resume`` passes the settings as the run was given them."""
    monkeypatch.setattr(sys.modules["autocompress.compress"], "FIT_SHARE", 0.0)  # distillation on for this base
    small = {key: SMALL[key] for key in ("val_size", "max_train", "max_test", "batch_size", "latency_runs")}
    out = tmp_path / "run"
    original = Pipeline._compact

    def interrupted(self, state, *, last):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "_compact", interrupted)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**small, "target": "params=2x", "budget": 1}))
    assert main(["compress", str(base_checkpoint), "--config", str(config), "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 130
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["distillation"]["enabled"] is True and stored["run"]["given"]["distillation"]["enabled"] == "auto"
    monkeypatch.setattr(Pipeline, "_compact", original)
    assert main(["compress", "--resume", str(out), "--quiet"]) == 0
    assert (out / "model.pt").exists()


def test_finished_run_resumes_to_the_same_table(finished_run, capsys):
    out, final = finished_run
    assert main(["compress", "--resume", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"{final['rows'][1]['params']:,}" in printed


def test_flops_objective_meets_macs_target(base_checkpoint, tmp_path):
    out = tmp_path / "flops"
    assert _compress(base_checkpoint, out, target="flops=2x", rounds="doubling", search={"max_evaluations": 2}) == 0
    base_row, comp_row = _final(out)["rows"]
    compact = autocompress.load(out / "model.pt")
    macs = metrics.count_macs(compact, torch.zeros(1, 1, 28, 28))
    assert comp_row["macs"] == macs and base_row["macs"] / macs >= 2.0 * 0.99


def test_non_empty_out_folder_is_never_overwritten(base_checkpoint, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.pt").write_bytes(b"precious")
    assert _compress(base_checkpoint, out) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "model.pt").read_bytes() == b"precious"
    assert [p.name for p in out.iterdir()] == ["model.pt"]  # no lock file left behind either


def test_an_out_naming_a_model_file_is_refused_before_any_work(base_checkpoint, tmp_path, capsys):
    """compress --out names a run folder, prune --out a file: a user gave compress --out model.pt and found a
    folder called model.pt; now refused (an existing file is left as it was)."""
    new, existing = tmp_path / "small.pt", tmp_path / "kept.pt"
    existing.write_bytes(b"precious")
    assert main(["compress", str(base_checkpoint), "--target", "params=2x", "--out", str(new)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"autocompress: error: --out {new} names a model file, but a run is a folder (config.yaml, the phases, "
        f"model.pt: the compressed model); pass a folder path such as {tmp_path / 'small'}; the model is written as "
        "its model.pt")
    assert main(["compress", str(base_checkpoint), "--target", "params=2x", "--out", str(existing)]) == 2
    assert f"--out {existing} is a file, but a run is a folder" in capsys.readouterr().err
    assert not new.exists() and existing.read_bytes() == b"precious"


def test_resume_refuses_changed_flags_and_changed_base(finished_run, base_checkpoint, tmp_path, capsys,
                                                       monkeypatch):
    out, _ = finished_run
    assert main(["compress", "--resume", str(out), "--target", "params=5x"]) == 2
    assert "--target" in capsys.readouterr().err
    copy = tmp_path / "base.pt"
    copy.write_bytes(base_checkpoint.read_bytes())
    run = tmp_path / "run"

    def stop(self, state, *, last):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "_admm", stop)
    assert _compress(copy, run) == 130
    model = autocompress.load(copy)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    from autocompress.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(copy)
    save_checkpoint(copy, model=model, model_name=ckpt["model"]["name"], model_kwargs=ckpt["model"]["kwargs"],
                    dataset=ckpt["dataset"], config=ckpt["config"], metrics=ckpt["metrics"])
    assert main(["compress", "--resume", str(run), "--quiet"]) == 2
    assert "holds a run with other settings (model weights)" in capsys.readouterr().err


def test_retraining_runs_on_the_shrunk_model(finished_run):
    """Masked retraining trains the filter-compacted model: its state has fewer channels than the purified
    (masked, full-width) one, and its pruned columns are still exactly zero after training."""
    out, _ = finished_run
    purified = torch.load(out / "round1" / "purify.pt", weights_only=True)
    retrained = torch.load(out / "round1" / "retrain.pt", weights_only=True)
    kept_filters = {name: int(mask.flatten(1).any(1).sum()) for name, mask in purified["param_masks"].items()
                    if name.endswith(".weight") and mask.dim() == 4}
    shapes = {name: tuple(t.shape) for name, t in retrained["state_dict"].items()}
    assert any(shapes[name][0] < purified["state_dict"][name].shape[0] for name in kept_filters)
    for name, kept in kept_filters.items():
        assert shapes[name][0] == kept, name
    for name, mask in retrained["param_masks"].items():
        assert bool((retrained["state_dict"][name][~mask] == 0).all()), name


def test_irregular_mode_meets_target_in_nonzero_parameters(base_checkpoint, tmp_path):
    """Irregular sparsity through the whole pipeline (retraining on the shrunk model keeps the zeros): the
    target is met in non-zero parameters of the saved model."""
    out = tmp_path / "irr"
    assert _compress(base_checkpoint, out, dims="irregular", target="params=4x", rounds=[4.0]) == 0
    final = _final(out)
    base = autocompress.load(base_checkpoint)
    compact = autocompress.load(out / "model.pt")
    nonzero = metrics.count_nonzero_params(compact)
    assert metrics.count_params(base) / nonzero >= 4.0 * 0.99
    assert final["rows"][1]["params"] == nonzero
    assert final["rows"][1]["test_top1"] > 30.0
    # stored sparsely: the file follows the non-zero count (CSR, int32 indices: ~8 bytes per kept weight, so
    # a quarter of the weights takes about half the dense bytes)
    assert final["rows"][1]["file_bytes"] < 0.6 * final["rows"][0]["file_bytes"]


def test_resume_if_exists_takes_only_the_same_run(base_checkpoint, finished_run, tmp_path, capsys):
    out, _ = finished_run
    no_target = tmp_path / "no_target.yaml"
    no_target.write_text("rounds: 1\n")
    assert main(["compress", str(base_checkpoint), "--config", str(no_target), "--out", str(tmp_path / "a")]) == 2
    assert "no target given" in capsys.readouterr().err and not (tmp_path / "a").exists()
    config = _config_file(tmp_path)
    same = ["compress", str(base_checkpoint), "--config", str(config), "--out", str(out), "--resume-if-exists",
            "--quiet", "--device", "cpu"]
    assert main(same) == 0  # unchanged: the finished run's table again
    capsys.readouterr()
    assert main(same + ["--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "other settings (seed: " in err and ", 7 now)" in err
    assert main(same + ["--max-train", "1000"]) == 2
    assert "other settings (max_train)" in capsys.readouterr().err
    stored = yaml.safe_load((out / "config.yaml").read_text())["target"]
    assert main(same[:-4] + ["--target", "params=7x"]) == 2  # without --resume-if-exists: which run it holds
    assert f"run folder {out} already holds a run (of target {stored}, not params=7x); continue that run with " \
        in capsys.readouterr().err


def test_unavailable_device_is_a_user_error(base_checkpoint, capsys, tmp_path):
    assert main(["evaluate", str(base_checkpoint), "--device", "nonsense"]) == 2
    assert "unknown device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["compress", str(base_checkpoint), "--target", "params=2x", "--device", "cuda",
                     "--out", str(tmp_path / "run")]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, flags, message", [
    ("target: params=2x\nadmm: {epochs: -1}\n", [], "admm.epochs=-1 must be >= 0; use 0 (one-shot projection) or "
     "more (in the config file {path})"),
    ("target: params=2x\ndevice: cpu\n", ["--device", "cpu"], "device is not a config setting (in the config file "
     "{path}); give it as --device"),
    ("target: params=2x\n", ["--admm-epochs", "-2"], "--admm-epochs -2 must be >= 0; use 0 (one-shot projection) "
     "or more (set by --admm-epochs)"),
    ("target: params=2x\nretrain: {lr: -1}\n", [],
     "retrain.lr -1 is not a positive number; pass e.g. retrain.lr 0.1 (in the config file {path})"),
    ("target: params=2x\nbatch_size: 0\n", [], "batch_size=0 is outside [1, 1e9]; give batch_size >= 1 "
     "(in the config file {path})"),
    ("target: params=2x\ndims: weird\n", [], "unknown dims 'weird'; use one of filter,column | filter | column | "
     "irregular | filter,column,irregular (in the config file {path})"),
    ("dims: weird\n", ["--target", "params=2x", "--dims", "filter"], None),
    ("target: params=2x\nadmm: {epochs: two}\n", [], "admm.epochs='two' has the wrong type; give an integer"),
    ("target: params=2x\nadmm: {epochs: 1.5}\n", [], "admm.epochs=1.5 has the wrong type; give an integer"),
    ("target: params=2x\nadmm: {epochs: 1.0e+30}\n", [], "admm.epochs=1e+30 has the wrong type; give an integer"),
    ("target: params=2x\nseed: 100000000000000000000000000000\n", [], "seed=100000000000000000000000000000 is "
     "not valid; use an integer >= 0"),
    ("target: params=2x\nretrain: {lr: fast}\n", [], "retrain.lr='fast' has the wrong type; give a number"),
    ("target: params=2x\nquick_eval: {val_batches: all}\n", [],
     "quick_eval.val_batches='all' has the wrong type; give an integer or null"),
    ("target: params=2x\nsearch: {max_evaluations: 2.5}\n", [],
     "search.max_evaluations=2.5 has the wrong type; give an integer"),
    ("target: params=2x\nsearch: {cooling_rate: 2}\n", [], "search.cooling_rate=2 must be in (0, 1); use e.g. 0.85"),
    ("target: params=2x\ndistillation: {alpha: high}\n", [],
     "distillation.alpha='high' has the wrong type; give a number"),
    ("target: params=2x\n", ["--retrain-epochs", "-3"], "--retrain-epochs -3 is not valid; use 0 to 10000 "
     "(set by --retrain-epochs)"),
    ("target: params=2x\nfinal_retrain_epochs: -2\n", [],
     "final_retrain_epochs=-2 is not valid; use 0 to 10000, or null"),
    ("target: params=2x\npurification: {tolerance: -1}\n", [], "purification.tolerance=-1 is not a fraction >= 0; "
     "give the largest accepted validation top-1 drop, e.g. 0.005"),
    ("target: params=2x\npurification: {thresholds: []}\n", [], "purification.thresholds=[] must be a non-empty "
     "list of numbers > 0; use e.g. [0.01, 0.02, 0.05, 0.1, 0.2]"),
    ("target: params=2x\nadmm: {momentum: 2.0}\n", [],
     "admm.momentum 2.0 is outside [0, 1); pass e.g. admm.momentum 0.9"),
    ("target: params=2x\nlatency_runs: 0\n", [], "latency_runs=0 is not valid; use e.g. 20"),
    ("target: params=2x\nval_size: 0\n", [], "val_size=0 is outside [1, 1e9]; give val_size >= 1"),
    ("target: params=2x\nquick_eval: {bn_batches: 0}\n", [], "quick_eval needs >= 1 batch (bn_batches=0, "
     "val_batches=30); use e.g. bn_batches 5 and val_batches 30"),
    ("target: params=2x\npurification: {enabled: maybe}\n", [],
     "purification.enabled='maybe' has the wrong type; give true or false"),
    ("target: params=2x\npurification: {thresholds: [0.1, x]}\n", [],
     "purification.thresholds=[0.1, 'x'] has the wrong type; give a list of numbers"),
    ("target: params=2x\nadmm: {rho: 3}\n", [], "unknown setting(s) admm.rho; valid admm settings: epochs, "
     "label_smoothing, lr, momentum, rho_growth, rho_init, rho_max, update_interval, weight_decay"),
    ("target: params=2x\nretrain: {batch_size: 3}\n", [], "unknown setting(s) retrain.batch_size; valid retrain "
     "settings: epochs, label_smoothing, lr, momentum, nesterov, optimizer, pct_start, schedule, weight_decay"),
    ("target: huge\n", ["--target", "params=2x", "--rounds", "abc"],
     "--rounds 'abc' is not a round schedule; use 'doubling', a number of rounds (1-100), or increasing targets > 1 "
     "ending at 2 (set by --rounds)"),
    ("- a list\n", [], "config file {path} must hold a mapping of settings; see the README's example"),
    ("target: params=30x\nadmm: {epochs: 3}\n", ["--epochs", "8"], "--epochs 8 and admm.epochs=3 both set the "
     "training schedule (budget derives admm.epochs=1); give --epochs 8 alone, or drop it and write the schedule "
     "(admm.epochs, ...) yourself (set by --epochs; admm.epochs by the config file {path})"),
    ("target: params=30x\n", ["--epochs", "8", "--rounds", "3"], "--epochs 8 and --rounds 3 both set the training "
     "schedule (budget derives --rounds 2); give --epochs 8 alone, or drop it and write the schedule (rounds, ...) "
     "yourself (set by --rounds and --epochs)"),
    ("target: params=30x\n", ["--epochs", "8", "--rounds", "2"], None),  # what the budget derives: no clash
    ("target: params=30x\n", ["--epochs", "8", "--rounds", "x"],  # a bad value is named before any clash
     "--rounds 'x' is not a round schedule; use 'doubling', a number of rounds (1-100), or increasing targets > 1 "
     "ending at 30 (set by --rounds)"),
    ("target: params=30x\n", ["--augment", "none"], None),
    ("target: params=30x\naugment: sideways\n", [], "augment='sideways' is not valid; use default or none (in "
     "the config file {path})"),
    ("target: params=30x\n", ["--epochs", "0"], "--epochs 0 is too small: the schedule needs at least one epoch; "
     "use --epochs 1 or more (set by --epochs)"),
])
def test_config_file_errors_name_the_setting(tmp_path, capsys, text, flags, message):
    """A bad value is named by its setting (and where it came from: the config file or a flag), before
    anything is read or written."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["compress", str(tmp_path / "missing.pt"), "--config", str(path), *flags,
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    if message is None:  # the flags override every bad value of the file: it fails on the missing checkpoint
        assert "missing.pt" in err and "config file" not in err
    else:
        assert err.startswith(f"autocompress: error: {message.format(path=path)}")
        assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_config_file_that_is_not_utf8_or_too_deep(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"target: \xff\xfe\n")
    assert main(["compress", "x.pt", "--config", str(bad)]) == 2
    assert "not valid UTF-8 YAML" in capsys.readouterr().err
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 20000 + "]" * 20000 + "\n")
    assert main(["compress", "x.pt", "--config", str(deep)]) == 2
    assert "not valid UTF-8 YAML" in capsys.readouterr().err


def test_resume_reads_a_moved_dataset_from_data_dir_and_ctrl_c_names_the_command(base_checkpoint, tmp_path,
                                                                                   monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for file in DEBIAN_FASHION_MNIST.iterdir():
        os.symlink(file, data / file.name)
    run = tmp_path / "my run"

    def stop(self, state, *, last):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "_admm", stop)
    assert _compress(base_checkpoint, run, data_dir=str(data)) == 130
    moved = data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["compress", "--resume", str(run), "--quiet"]) == 2
    assert "Fashion-MNIST not found in" in capsys.readouterr().err
    assert main(["compress", "--resume", str(run), "--data-dir", str(moved), "--quiet"]) == 130
    assert capsys.readouterr().err == (f"autocompress: interrupted; run folder {run} keeps every finished phase; "
                                       f"continue it with `autocompress compress --resume '{run}' --data-dir "
                                       f"{moved}`\n")
    assert yaml.safe_load((run / "config.yaml").read_text())["source"]["data"]["data_dir"] == str(data)


def test_relative_data_dir_is_stored_absolute(base_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(DEBIAN_FASHION_MNIST.parent)

    def stop(self, state, *, last):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "_admm", stop)
    assert _compress(base_checkpoint, tmp_path / "run", data_dir=DEBIAN_FASHION_MNIST.name) == 130
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["source"]["data"]["data_dir"] == os.path.abspath(DEBIAN_FASHION_MNIST)


def _final_record(compressed_top1: float) -> dict:
    row = {"test_top1": 88.0, "params": 1000, "macs": 2000, "file_bytes": 5000, "latency_b1_ms": 1.0,
           "latency_b64_ms": 10.0}
    return {"event": "final", "target": "params=3x",
            "rows": [{"model": "base", **row}, {**row, "model": "compressed", "test_top1": compressed_top1}]}


def test_result_at_chance_level_warns_after_the_final_table():
    from autocompress.cli.compress import chance_warning

    assert chance_warning(_final_record(10.9), 10) == (
        "autocompress: warning: the compressed model's test top-1 10.90% is at chance level (10.00% for 10 "
        "classes): target params=3x is too aggressive for this model and budget; try a lower --target, or more "
        "rounds / epochs (--rounds, --admm-epochs, --retrain-epochs, final_retrain_epochs)")
    assert chance_warning(_final_record(11.0), 10) is not None  # chance + 1 point still warns
    assert chance_warning(_final_record(11.1), 10) is None


def test_ctrl_c_before_a_run_folder_exists_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    import autocompress.cli.compress as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_compress", interrupted)
    assert main(["compress", "base.pt", "--target", "params=2x", "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == "autocompress: interrupted; nothing was written\n"


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path):
    from autocompress.runfolder import RunFolder

    held = RunFolder(tmp_path / "run").open()
    try:
        with pytest.raises(UserError, match="in use by another running process"):
            RunFolder(tmp_path / "run").open()
    finally:
        held.close()
    RunFolder(tmp_path / "run").open().close()  # released: free again


def test_a_checkpoint_without_a_recorded_carve_is_warned_about():
    """A fresh user's checkpoint (trained on all of Fashion-MNIST's training images by their own loop) recorded no
    validation carve: the CLI carved 5000 of those images, and the base read 95.60 % there against 87.75 % on
    test. The run now says so; a checkpoint of ``autocompress train`` records its carve and gets no warning."""
    from types import SimpleNamespace

    from autocompress.cli.workload import Workload

    def warning(dataset: dict, val_size: int = 3000):
        return Workload(Path("mine.pt"), {"dataset": dataset}, None, SimpleNamespace(val_size=val_size, seed=2),
                        None).carve_warning()

    text = warning({"name": "fashion-mnist"})
    assert text.startswith("the checkpoint records no validation carve, so validation is 3000 images carved from "
                           "the training split (seed 2)")
    assert warning({"name": "fashion-mnist", "val_size": 3000}) is None and warning({}, val_size=0) is None


def test_a_setting_error_on_a_checkpoint_without_a_carve_is_one_line(tmp_path, capsys, caplog):
    """Fresh user 61: a checkpoint written as the README shows (no carve recorded) printed the carve warning
    before a one-line error (``--ignore nosuchlayer``), which became two lines; the warnings now follow the
    settings' checks."""
    from autocompress.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "mine.pt", model=create_model("fmnist_cnn", num_classes=10, width=0.5),
                           model_name="fmnist_cnn", model_kwargs={"num_classes": 10, "width": 0.5},
                           dataset={"name": "fashion-mnist", "input_size": [1, 28, 28], "num_classes": 10,
                                    "mean": [0.0], "std": [1.0]}, config={}, metrics={})
    assert main(["compress", str(path), "--target", "params=2x", "--ignore", "nosuchlayer", "--max-train", "600",
                 "--val-size", "100", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autocompress: error: --ignore ['nosuchlayer'] names no module of")
    assert not caplog.records  # the carve and normalisation warnings: none before the error


class ImageOut(torch.nn.Module):
    """A denoiser: one image in, one image out."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("command", ["compress", "prune"])
def test_a_model_that_is_no_classifier_is_refused_by_the_command_line_with_the_python_fix(tmp_path, capsys,
                                                                                         command):
    """Fresh user 68's denoiser through the CLI was refused by the library's check with a fix the CLI cannot take
    (``pass loss_fn``); the CLI now says at once that it compresses classifiers and where other tasks go."""
    from autocompress.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "denoiser.pt", model=ImageOut(), model_class="test_compress:ImageOut",
                           model_kwargs={}, dataset={"name": "fashion-mnist", "input_size": [1, 28, 28],
                                                     "num_classes": 10, "mean": [0.0], "std": [1.0]},
                           config={}, metrics={})
    (tmp_path / "rates.yaml").write_text("default: 0.5\n")
    target = ["--target", "params=2x"] if command == "compress" else ["--rates", str(tmp_path / "rates.yaml")]
    assert main([command, str(path), *target, "--max-train", "600", "--val-size", "100",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"autocompress: error: {path}'s model outputs a tensor of shape [1, 1, 28, 28] for one image, not "
                   "scores of the 10 classes of fashion-mnist: the command line compresses classifiers of its "
                   "datasets; for another task call autocompress.compress from Python with your own loaders, "
                   "loss_fn and score_fn (README: 'Your model, your data')"]
    assert not (tmp_path / "run").exists()


def test_training_augmentation_is_said_and_can_be_turned_off(fmnist_small):
    """Fresh user 87's spectrogram classifier (time on the last axis) was trained by the command line on randomly
    flipped Fashion-MNIST images, time reversed, said nowhere but in the source. The log names the augmentation,
    and ``augment: none`` draws the images as they are (the same images, unflipped, as the evaluation loader's)."""
    import torch

    from autocompress.cli.workload import Workload

    def first_batch(augment: bool) -> torch.Tensor:
        workload = Workload(Path("mine.pt"), {}, None, fmnist_small, None, augment=augment)
        torch.manual_seed(0)
        return next(iter(workload.train_loader(64)))[0], workload.augmentation_line()

    flipped, said = first_batch(True)
    plain, said_plain = first_batch(False)
    assert said == ("training batches: fashion-mnist with random horizontal flips (augment: none, or --augment none, "
                    "trains on the images as they are)")
    assert said_plain == "training batches: fashion-mnist images as they are (augment: none)"
    same = (flipped == plain).flatten(1).all(1)
    mirrored = (flipped == plain.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int((mirrored & ~same).sum()) < 54  # about half flipped
    torch.manual_seed(0)
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    order = fmnist_small.loader("train", 64, augment=False, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(plain, next(iter(order))[0])


def test_a_checkpoint_without_recorded_normalisation_is_warned_about():
    """Fresh user 54's checkpoint of their own CIFAR-10 pipeline read 56.2 % in the CLI against 58.5 % in theirs,
    and nothing said which normalisation the CLI applied; a checkpoint recording it gets no warning."""
    from types import SimpleNamespace

    from autocompress.cli.compress import _inputs_warning
    from autocompress.cli.workload import Workload

    splits = SimpleNamespace(name="cifar10", mean=(0.4914, 0.4822, 0.4463), std=(0.247, 0.2434, 0.2616))

    def warning(dataset: dict):
        return Workload(Path("mine.pt"), {"dataset": dataset}, None, splits, None).normalisation_warning()

    assert warning({"name": "cifar10"}) == (
        "the checkpoint records no input normalisation, so images are scaled to [0, 1] and normalised with cifar10's "
        "mean (0.491, 0.482, 0.446) and std (0.247, 0.243, 0.262) here; a model trained on other inputs scores lower "
        "on them (compare the base's score here with yours): record the normalisation it was trained with as the "
        "checkpoint's dataset mean and std (0 and 1 for [0, 1] inputs), or compress it through the Python API with "
        "your own loaders")
    assert warning({"name": "cifar10", "mean": [0.5] * 3, "std": [0.25] * 3}) is None
    assert warning({"name": "cifar10", "val_size": 5000}) is None  # autocompress train's (the demo's base)
    workload = Workload(Path("mine.pt"), {"dataset": {"name": "cifar10"}}, None, splits, None)
    replaced = {"warnings": ["the base model's BatchNorm statistics did not fit its weights (...)"]}
    assert _inputs_warning(replaced, workload) == ("autocompress: warning: the base's BatchNorm statistics did not "
                                                   f"fit the inputs here, and {workload.normalisation_warning()}; the "
                                                   "compressed model expects the inputs here")
    assert _inputs_warning({"warnings": []}, workload) is None  # fresh user 58: repeated only where it bit
    recorded = Workload(Path("mine.pt"), {"dataset": {"name": "cifar10", "mean": [0] * 3, "std": [1] * 3}}, None,
                        splits, None)
    assert _inputs_warning(replaced, recorded) is None


def test_resume_of_a_folder_without_a_run_says_what_is_missing(tmp_path, capsys):
    assert main(["compress", "--resume", str(tmp_path / "nothere")]) == 2
    assert f"run folder {tmp_path / 'nothere'} does not exist; start one with" in capsys.readouterr().err
    assert main(["compress", "--resume", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no compress run (no config.yaml)" in capsys.readouterr().err
    assert not (tmp_path / "nothere").exists()
