"""AutoCompress end to end (issue 4): targets, round schedule, a small real compress run on Fashion-MNIST,
resume after an interruption, and the refusals that must come before any training."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import yaml

import autocompress
from autocompress import metrics
from autocompress.cli import main
from autocompress.compress import CompressConfig, Compressor, Target, round_targets
from autocompress.data import DEBIAN_FASHION_MNIST, get_dataset
from autocompress.errors import UserError
from autocompress.models import create_model
from autocompress.space import PruningSpace
from autocompress.training import TrainConfig, fit

SMALL = {"val_size": 500, "max_train": 1500, "max_test": 500, "batch_size": 64, "latency_runs": 2,
         "search": {"max_evaluations": 3}, "quick_eval": {"bn_batches": 2, "val_batches": 2, "batch_size": 128},
         "admm": {"epochs": 1, "rho_init": 0.05, "update_interval": 6}, "retrain": {"epochs": 1},
         "purification": {"enabled": True, "thresholds": [0.05]}}


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


def _config(**overrides) -> CompressConfig:
    return CompressConfig.from_dict({**SMALL, "target": "params=3x", "rounds": [1.8, 3.0], **overrides})


@pytest.fixture(scope="module")
def finished_run(base_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    final = Compressor.start(base_checkpoint, _config(), out, progress=False).run()
    return out, final


def test_target_parsing():
    assert Target.parse("params=20x") == Target("params", 20.0)
    assert Target.parse(" flops = 8.5 ") == Target("flops", 8.5)
    for bad in ("params=1x", "size=2x", "params=abc", "20x"):
        with pytest.raises(UserError):
            Target.parse(bad)


def test_round_schedules():
    assert round_targets(12, "doubling") == [2, 4, 8, 12]
    assert round_targets(8, "doubling") == [2, 4, 8]
    assert round_targets(1.5, "doubling") == [1.5]
    assert round_targets(9, "2") == pytest.approx([3.0, 9.0])
    assert round_targets(10, [3, 10]) == [3.0, 10.0]
    for bad in ([3, 2, 10], [2, 5], [1.0, 10], "sometimes"):
        with pytest.raises(UserError):
            round_targets(10, bad)


def test_unknown_setting_is_refused():
    with pytest.raises(UserError, match="unknown compress setting"):
        CompressConfig.from_dict({"target": "params=2x", "temperature": 3})


def test_compress_meets_target_on_real_data(finished_run, base_checkpoint):
    out, final = finished_run
    base = autocompress.load(base_checkpoint)
    compact = autocompress.load(out / "model.pt")
    example = torch.zeros(1, 1, 28, 28)
    params = metrics.count_params(compact)
    assert metrics.count_params(base) / params >= 3.0 * 0.99
    base_row, comp_row = final["rows"]
    assert comp_row["params"] == params and base_row["params"] == metrics.count_params(base)
    assert comp_row["macs"] == metrics.count_macs(compact, example)
    assert comp_row["test_top1"] > 30.0  # a real classifier after 3x, far above chance (10%)
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    for event in ("base", "search", "admm", "purification", "retrain", "round", "final"):
        assert event in events
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 4 and "test top-1" in html
    assert (out / "config.yaml").exists() and (out / "round2" / "model.pt").exists()


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
    space = PruningSpace.build(model, x, dims=("filter", "column"))
    masks = project(space, model, search["rates"])
    param_masks = space.param_masks(masks)
    apply_masks(model, param_masks)
    compact_model = compact(model, param_masks, x).model
    counts = space.count(masks)
    assert counts.params == metrics.count_params(compact_model)
    assert counts.macs == metrics.count_macs(compact_model, x)
    assert metrics.count_params(autocompress.load(base_checkpoint)) / counts.params == \
        pytest.approx(search["compression"], rel=1e-9)


@pytest.mark.parametrize("phase, round_index, written", [("retrain", 2, "round2/purify.pt"),
                                                           ("compact", 1, "round1/retrain.pt")])
def test_resume_after_interruption_equals_uninterrupted(finished_run, base_checkpoint, tmp_path, monkeypatch,
                                                        phase, round_index, written):
    """Interrupted before round 2's retraining, or after round 1's retraining (its state belongs to the
    shrunk model, which the resumed run must rebuild)."""
    out_full, final_full = finished_run
    out = tmp_path / "interrupted"
    compressor = Compressor.start(base_checkpoint, _config(), out, progress=False)
    original = getattr(Compressor, f"_phase_{phase}")

    def interrupted(self, ctx, artifact):
        if ctx.index == round_index:
            raise KeyboardInterrupt
        return original(self, ctx, artifact)

    monkeypatch.setattr(Compressor, f"_phase_{phase}", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compressor.run()
    assert not (out / "model.pt").exists() and (out / written).exists()
    monkeypatch.setattr(Compressor, f"_phase_{phase}", original)
    final = Compressor.resume(out, progress=False).run()
    full = torch.load(out_full / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert [r["test_top1"] for r in final["rows"]] == [r["test_top1"] for r in final_full["rows"]]


def test_unreachable_target_refused_before_training(base_checkpoint, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="unreachable|cannot|reach"):
        Compressor.start(base_checkpoint, _config(target="params=5000x", rounds="doubling"), out)
    assert not (out / "round1").exists()


def test_cli_errors_exit_2(base_checkpoint, finished_run, tmp_path, capsys):
    out, _ = finished_run
    assert main(["compress", str(base_checkpoint), "--out", str(tmp_path / "a")]) == 2
    assert "--target" in capsys.readouterr().err
    assert main(["compress", str(base_checkpoint), "--target", "params=2x", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["compress", "--resume", str(tmp_path / "nothing")]) == 2
    assert main(["compress", str(tmp_path / "missing.pt"), "--target", "params=2x", "--out",
                 str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("autocompress: error:") for line in err)


def test_finished_run_resumes_to_the_same_table(finished_run, capsys):
    out, final = finished_run
    assert main(["compress", "--resume", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"{final['rows'][1]['params']:,}" in printed


def test_flops_objective_meets_macs_target(base_checkpoint, tmp_path):
    out = tmp_path / "flops"
    final = Compressor.start(base_checkpoint, _config(target="flops=2x", rounds="doubling",
                                                      search={"max_evaluations": 2}), out, progress=False).run()
    base_row, comp_row = final["rows"]
    compact = autocompress.load(out / "model.pt")
    macs = metrics.count_macs(compact, torch.zeros(1, 1, 28, 28))
    assert comp_row["macs"] == macs and base_row["macs"] / macs >= 2.0 * 0.99


def test_irregular_flops_target_is_refused():
    with pytest.raises(UserError, match="irregular"):
        _config(target="flops=2x", dims="irregular", rounds="doubling")


@pytest.mark.parametrize("section,settings", [("admm", {"epochs": 1, "bogus": 3}), ("quick_eval", {"bogus": 3}),
                                              ("purification", {"enabled": True, "bogus": 3}),
                                              ("search", {"bogus": 3})])
def test_unknown_sub_settings_refused_up_front(section, settings):
    with pytest.raises(UserError, match=f"unknown {section}|bad search"):
        _config(**{section: settings})


def test_wrong_types_refused():
    with pytest.raises(UserError, match=r"^max_train='lots' has the wrong type; give an int or null$"):
        _config(max_train="lots")
    with pytest.raises(UserError, match=r"^seed=True has the wrong type; give an int$"):
        _config(seed=True)
    assert _config(retrain={"epochs": 0, "lr": -1}).retrain_config(last=False).epochs == 0  # 0: no retraining


def test_non_empty_out_folder_is_never_overwritten(base_checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.pt").write_bytes(b"precious")
    with pytest.raises(UserError, match="not an empty folder"):
        Compressor.start(base_checkpoint, _config(), out)
    assert (out / "model.pt").read_bytes() == b"precious"


def test_resume_refuses_changed_flags_and_changed_base(finished_run, base_checkpoint, tmp_path, capsys):
    out, _ = finished_run
    assert main(["compress", "--resume", str(out), "--target", "params=5x"]) == 2
    assert "--target" in capsys.readouterr().err
    copy = tmp_path / "base.pt"
    copy.write_bytes(base_checkpoint.read_bytes())
    run = tmp_path / "run"
    Compressor.start(copy, _config(), run, progress=False)
    copy.write_bytes(base_checkpoint.read_bytes() + b"changed")
    with pytest.raises(UserError, match="has changed"):
        Compressor.resume(run)


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


def test_partial_sections_keep_the_other_defaults():
    """Every section is resolved in full (what config.yaml shows is everything the run uses)."""
    config = CompressConfig.from_dict({"target": "params=2x", "admm": {"epochs": 3}, "retrain": {"lr": 0.05}})
    assert config.admm == {"epochs": 3, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "rho_init": 0.02,
                           "rho_growth": 1.6, "rho_max": 1.0, "update_interval": 100, "label_smoothing": 0.0}
    assert config.retrain == {"epochs": 3, "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                              "schedule": "cosine", "pct_start": 0.25, "label_smoothing": 0.0}
    assert config.purification == {"enabled": True, "tolerance": 0.005, "thresholds": [0.01, 0.02, 0.05, 0.1, 0.2]}
    assert config.search == {"start_temperature": 0.05, "cooling_rate": 0.85, "stop_temperature": 0.002,
                             "perturbation_magnitude": 0.1, "max_evaluations": 30}
    assert config.distillation == {"enabled": False, "temperature": 4.0, "alpha": 0.9}
    assert config.quick_eval == {"bn_recalibration": True, "bn_batches": 5, "val_batches": 10, "batch_size": 256}
    retrain = config.retrain_config(last=True)
    assert (retrain.lr, retrain.batch_size, retrain.epochs) == (0.05, 128, 3)
    plain = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config)))
    assert CompressConfig.from_dict(plain) == config  # config.yaml round-trips


@pytest.mark.parametrize("section, key", [("retrain", "batch_size"), ("retrain", "seed"), ("retrain", "device"),
                                          ("search", "seed"), ("quick_eval", "seed")])
def test_settings_the_run_supplies_itself_are_refused_in_sections(section, key):
    """Batch sizes come from ``batch_size`` and seeds from ``seed``: a section key that would be ignored is
    an error, not silently dropped."""
    hint = "" if key == "device" else f"set {key} at the top level of the config (it serves every phase); "
    with pytest.raises(UserError) as error:
        CompressConfig.from_dict({"target": "params=2x", section: {key: 1}})
    assert str(error.value).startswith(f"unknown {section} setting(s) {key}; {hint}valid {section} settings: ")


def test_resolved_config_yaml_shows_the_quick_eval_defaults():
    """What Compressor.start writes to config.yaml: every section with its effective values, none empty."""
    written = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(CompressConfig(quick_eval={"val_batches": 4}))))
    assert written["quick_eval"] == {"bn_recalibration": True, "bn_batches": 5, "val_batches": 4, "batch_size": 256}


def test_irregular_mode_meets_target_in_nonzero_parameters(base_checkpoint, tmp_path):
    """Irregular sparsity through the whole pipeline (retraining on the shrunk model keeps the zeros): the
    target is met in non-zero parameters of the saved model."""
    final = Compressor.start(base_checkpoint, _config(dims="irregular", target="params=4x", rounds=[4.0]),
                             tmp_path / "irr", progress=False).run()
    base = autocompress.load(base_checkpoint)
    compact = autocompress.load(tmp_path / "irr" / "model.pt")
    nonzero = metrics.count_nonzero_params(compact)
    assert metrics.count_params(base) / nonzero >= 4.0 * 0.99
    assert final["rows"][1]["params"] == nonzero
    assert final["rows"][1]["test_top1"] > 30.0


def test_cli_config_without_target_and_changed_resume_if_exists(base_checkpoint, finished_run, tmp_path, capsys):
    out, _ = finished_run
    no_target = tmp_path / "no_target.yaml"
    no_target.write_text("rounds: 1\n")
    assert main(["compress", str(base_checkpoint), "--config", str(no_target), "--out", str(tmp_path / "a")]) == 2
    assert "no target given" in capsys.readouterr().err and not (tmp_path / "a").exists()
    stored = tmp_path / "stored.yaml"  # the finished run's own settings, checkpoint fields dropped
    stored.write_text("\n".join(line for line in (out / "config.yaml").read_text().splitlines()
                                if not line.startswith("checkpoint")))
    same = ["compress", str(base_checkpoint), "--config", str(stored), "--out", str(out), "--resume-if-exists"]
    assert main(same) == 0  # unchanged: the finished run's table again
    capsys.readouterr()
    assert main(same + ["--target", "params=5x"]) == 2
    assert "other settings (target)" in capsys.readouterr().err


def test_unavailable_device_is_a_user_error(base_checkpoint, capsys):
    assert main(["evaluate", str(base_checkpoint), "--device", "nonsense"]) == 2
    assert "unknown device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["evaluate", str(base_checkpoint), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("text, flags, message", [
    ("target: params=2x\nadmm: {epochs: -1}\n", [],
     "ADMM epochs must be >= 0, got -1; pass admm.epochs 0 or more (admm.epochs in the config file {path})"),
    ("target: params=2x\nadmm: {epochs: -1}\n", ["--admm-epochs", "-2"],
     "ADMM epochs must be >= 0, got -2; pass --admm-epochs 0 or more"),
    ("target: params=2x\nretrain: {lr: -1}\n", [],
     "retrain.lr -1 is not a positive number; pass e.g. retrain.lr 0.1 (retrain.lr in the config file {path})"),
    ("target: params=2x\nbatch_size: 0\n", [],
     "batch_size 0 is not positive; pass batch_size >= 1 (batch_size in the config file {path})"),
    ("target: params=2x\ndims: weird\n", [], "unknown dims 'weird'; use one of filter,column, filter, column, "
     "irregular, filter,column,irregular (dims in the config file {path})"),
    ("dims: weird\n", ["--target", "params=2x", "--dims", "filter"], None),
    ("target: params=2x\nadmm: {epochs: two}\n", [], "admm.epochs='two' has the wrong type; give an int"),
    ("target: params=2x\nadmm: {epochs: 1.5}\n", [], "admm.epochs=1.5 has the wrong type; give an int"),
    ("target: params=2x\nretrain: {lr: fast}\n", [], "retrain.lr='fast' has the wrong type; give a number"),
    ("target: params=2x\nquick_eval: {val_batches: all}\n", [],
     "quick_eval.val_batches='all' has the wrong type; give an int or null"),
    ("target: params=2x\nsearch: {max_evaluations: 2.5}\n", [],
     "search.max_evaluations=2.5 has the wrong type; give an int"),
    ("target: params=2x\ndistillation: {alpha: high}\n", [],
     "distillation.alpha='high' has the wrong type; give a number"),
    ("target: params=2x\n", ["--retrain-epochs", "-3"],
     "--retrain-epochs -3 is negative; pass --retrain-epochs >= 0 (0: no retraining)"),
    ("target: params=2x\nretrain: {epochs: -1}\n", [], "retrain.epochs -1 is negative; pass retrain.epochs >= 0 "
     "(0: no retraining) (retrain.epochs in the config file {path})"),
    ("target: params=2x\nfinal_retrain_epochs: -2\n", [],
     "final_retrain_epochs -2 is negative; pass final_retrain_epochs >= 0 (0: no retraining)"),
    ("target: params=2x\npurification: {tolerance: -1}\n", [], "purification.tolerance=-1 is not a fraction >= 0; "
     "give the largest accepted validation top-1 drop, e.g. 0.005"),
    ("target: params=2x\npurification: {tolerance: .nan}\n", [], "purification.tolerance=nan is not a fraction >= 0; "
     "give the largest accepted validation top-1 drop, e.g. 0.005"),
    ("target: params=2x\npurification: {thresholds: []}\n", [], "purification.thresholds=[] must be a non-empty "
     "list of numbers > 0; use e.g. [0.01, 0.02, 0.05, 0.1, 0.2]"),
    ("target: params=2x\nadmm: {lr: -0.1}\n", [],
     "admm.lr -0.1 is not a positive number; pass e.g. admm.lr 0.1"),
    ("target: params=2x\nadmm: {momentum: 2.0}\n", [],
     "admm.momentum 2.0 is outside [0, 1); pass e.g. admm.momentum 0.9"),
    ("target: params=2x\nsearch: {max_evaluations: 0}\n", [],
     "search section: max_evaluations=0 must be >= 1; use e.g. 30"),
    ("target: params=2x\nlatency_runs: 0\n", [], "latency_runs=0 is not positive; use e.g. 20"),
    ("target: params=2x\nval_size: 0\n", [], "val_size=0 leaves no validation split (the search and purification "
     "score on it); use e.g. 5000"),
    ("target: params=2x\nquick_eval: {bn_batches: 0}\n", [], "quick_eval needs >= 1 batch of >= 1 image "
     "(bn_batches=0, val_batches=10, batch_size=256); use e.g. 5, 10 and 256"),
    ("target: params=2x\nbatch_size: 0\nretrain: {epochs: 0}\n", [],
     "batch_size 0 is not positive; pass batch_size >= 1 (batch_size in the config file {path})"),
    ("target: params=2x\npurification: {enabled: maybe}\n", [],
     "purification.enabled='maybe' has the wrong type; give true or false"),
    ("target: params=2x\npurification: {thresholds: [0.1, x]}\n", [],
     "purification.thresholds=[0.1, 'x'] has the wrong type; give a list of items each a number"),
    ("target: huge\n", ["--target", "params=2x", "--rounds", "abc"],
     "invalid round schedule 'abc'; use 'doubling', a number of rounds, or increasing targets > 1 ending at 2"),
])
def test_config_file_errors_name_the_config_key(tmp_path, capsys, text, flags, message):
    """A bad value read from --config is named by its key there; one given by a flag, by the flag."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["compress", str(tmp_path / "missing.pt"), "--config", str(path), *flags,
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    if message is None:  # the flags override every bad value of the file: it fails on the missing checkpoint
        assert "missing.pt" in err and "config file" not in err
    else:
        assert err == f"autocompress: error: {message.format(path=path)}\n"
    assert not (tmp_path / "run").exists()


def test_config_file_is_read_once(tmp_path, capsys, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("rounds: 1\n")
    loaded = []
    real = yaml.safe_load
    monkeypatch.setattr(yaml, "safe_load", lambda text: loaded.append(text) or real(text))
    assert main(["compress", str(tmp_path / "missing.pt"), "--config", str(path)]) == 2
    assert "no target given" in capsys.readouterr().err and loaded == ["rounds: 1\n"]


def test_resume_reads_a_moved_dataset_from_data_dir_and_ctrl_c_names_the_command(base_checkpoint, tmp_path,
                                                                                   monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for file in DEBIAN_FASHION_MNIST.iterdir():
        os.symlink(file, data / file.name)
    run = tmp_path / "my run"
    Compressor.start(base_checkpoint, _config(data_dir=str(data)), run, progress=False)
    moved = data.rename(tmp_path / "moved")
    with pytest.raises(UserError, match="Fashion-MNIST not found in"):
        Compressor.resume(run)
    seen = []

    def interrupted(self):
        seen.append(self.splits.data_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(Compressor, "run", interrupted)
    assert main(["compress", "--resume", str(run), "--data-dir", str(moved), "--quiet"]) == 130
    assert seen == [str(moved)]
    assert capsys.readouterr().err == (f"autocompress: interrupted; run folder {run} keeps every finished phase; "
                                       f"continue it with `autocompress compress --resume '{run}' --data-dir "
                                       f"{moved}`\n")
    assert yaml.safe_load((run / "config.yaml").read_text())["data_dir"] == str(data)  # the run's settings


def test_relative_data_dir_is_stored_absolute(base_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(DEBIAN_FASHION_MNIST.parent)
    Compressor.start(base_checkpoint, _config(data_dir=DEBIAN_FASHION_MNIST.name), tmp_path / "run", progress=False)
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["data_dir"] == os.path.abspath(DEBIAN_FASHION_MNIST)
    monkeypatch.chdir(tmp_path)  # another working directory: the run still finds its dataset
    assert Compressor.resume(tmp_path / "run", progress=False).splits.data_dir == stored["data_dir"]


def _final_record(compressed_top1: float) -> dict:
    row = {"test_top1": 88.0, "params": 1000, "macs": 2000, "file_bytes": 5000, "latency_b1_ms": 1.0,
           "latency_b64_ms": 10.0}
    return {"event": "final", "target": "params=3x",
            "rows": [{"model": "base", **row}, {**row, "model": "compressed", "test_top1": compressed_top1}]}


def test_result_at_chance_level_warns_after_the_final_table(base_checkpoint, tmp_path, monkeypatch, capsys):
    from autocompress.cli.compress import chance_warning

    monkeypatch.setattr(Compressor, "run", lambda self: _final_record(10.9))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "rounds": [1.8, 3.0]}))
    assert main(["compress", str(base_checkpoint), "--config", str(config), "--target", "params=3x",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "compressed" in captured.out and "run folder:" in captured.out
    assert captured.err == ("autocompress: warning: the compressed model's test top-1 10.90% is at chance level "
                            "(10.00% for 10 classes): target params=3x is too aggressive for this model and budget; "
                            "try a lower --target, or more rounds / epochs (--rounds, --admm-epochs, "
                            "--retrain-epochs)\n")
    assert chance_warning(_final_record(11.0), 10) is not None  # chance + 1 point still warns
    assert chance_warning(_final_record(11.1), 10) is None


def test_ctrl_c_before_a_run_folder_exists_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Compressor, "start", interrupted)
    assert main(["compress", "base.pt", "--target", "params=2x", "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == "autocompress: interrupted; nothing was written\n"
