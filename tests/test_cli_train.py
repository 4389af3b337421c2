"""``autocompress train`` / ``evaluate`` end to end on real Fashion-MNIST, and their error paths."""
from __future__ import annotations

import json

import pytest
import torch

from autocompress import training
from autocompress.checkpoint import load_checkpoint
from autocompress.cli import main

TINY = ["train", "--model", "fmnist_cnn", "--model-arg", "width=0.25", "--dataset", "fashion-mnist", "--epochs", "2",
        "--max-train", "600", "--val-size", "200", "--batch-size", "100", "--no-progress"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("autocompress: error: "), err
    return err


def test_train_evaluate_skip_and_resume(tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight.pt"
    assert main([*TINY, "--out", str(straight)]) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "test top-1" in out
    ckpt = load_checkpoint(straight)
    assert ckpt["model"] == {"name": "fmnist_cnn", "kwargs": {"num_classes": 10, "width": 0.25}}
    assert ckpt["dataset"]["input_size"] == [1, 28, 28] and ckpt["config"]["epochs"] == 2
    assert ckpt["training_state"] is None

    assert main(["evaluate", str(straight), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["images"] == 10000
    assert result["top1"] == ckpt["metrics"]["test_top1"]  # the checkpoint's own test evaluation
    assert main(["evaluate", str(straight), "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 200

    before = straight.read_bytes()
    assert main([*TINY, "--out", str(straight), "--skip-if-exists"]) == 0
    assert "exists" in capsys.readouterr().out and straight.read_bytes() == before

    # interrupt a second run after its first epoch (Ctrl-C), then resume it: same weights as the straight run
    resumed = tmp_path / "resumed.pt"
    real_epoch = training.train_epoch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", interrupted)
    assert main([*TINY, "--out", str(resumed)]) == 130
    monkeypatch.setattr(training, "train_epoch", real_epoch)
    assert load_checkpoint(resumed)["training_state"]["epoch"] == 1
    assert capsys.readouterr().err.endswith(f"autocompress: interrupted; {resumed} holds the last finished epoch; "
                                            "continue it with the same command and --resume\n")
    assert main([*TINY, "--out", str(resumed), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    a, b = load_checkpoint(straight)["state_dict"], load_checkpoint(resumed)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, needle", [
    (["--model", "no_such_net", "--dataset", "fashion-mnist"], "unknown model"),
    (["--model", "resnet20", "--dataset", "fashion-mnist"], "cannot take fashion-mnist inputs of size 1x28x28"),
    (["--model", "fmnist_cnn", "--dataset", "cifar10", "--data-dir", "{tmp}/missing"], "does not exist"),
    (["--model", "fmnist_cnn", "--dataset", "fashion-mnist", "--data-dir", "{tmp}"], "Fashion-MNIST not found"),
    (["--model", "fmnist_cnn", "--dataset", "fashion-mnist", "--model-arg", "width"], "is not KEY=VALUE"),
    (["--model", "fmnist_cnn", "--dataset", "fashion-mnist", "--model-arg", "colour=3"], "colour"),
    (["--model", "fmnist_cnn", "--dataset", "fashion-mnist", "--epochs", "0"], "--epochs 0"),
    (["--model", "fmnist_cnn", "--dataset", "fashion-mnist", "--resume"], "nothing to resume"),
])
def test_train_errors_exit_2_with_one_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "out.pt"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["train", *argv, "--out", str(out), "--no-progress"]) == 2
    assert needle in _error_line(capsys)
    assert not out.exists()


def test_existing_output_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    assert main(["train", "--model", "fmnist_cnn", "--dataset", "fashion-mnist", "--out", str(out)]) == 2
    assert "damaged" in _error_line(capsys) and out.read_bytes() == b"precious"


def test_evaluate_errors_exit_2_with_one_line(tmp_path, capsys, cifar_folder):
    assert main(["evaluate", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in _error_line(capsys)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    assert main(["evaluate", str(bad)]) == 2
    assert "damaged" in _error_line(capsys)
    from autocompress.checkpoint import save_checkpoint
    from autocompress.models import create_model

    save_checkpoint(bad, model=create_model("lenet5"), model_name="lenet5", model_kwargs={"num_classes": 10},
                    dataset={"name": "fashion-mnist", "input_size": [1, 28, 28], "num_classes": 10},
                    config={}, metrics={})
    assert main(["evaluate", str(bad), "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in _error_line(capsys)
    assert main(["evaluate", str(bad), "--dataset", "cifar10", "--data-dir", str(cifar_folder)]) == 2
    assert "cifar10 images are 3x32x32 but the checkpoint expects 1x28x28" in _error_line(capsys)
    save_checkpoint(bad, model=create_model("lenet5"), model_name="lenet5", model_kwargs={"num_classes": 10},
                    dataset={"name": "fashion-mnist"}, config={}, metrics={})  # no input size recorded
    assert main(["evaluate", str(bad), "--dataset", "cifar10", "--data-dir", str(cifar_folder)]) == 2
    assert "lenet5 cannot take cifar10 inputs of size 3x32x32" in _error_line(capsys)
    save_checkpoint(bad, model=create_model("lenet5"), model_name="lenet5", model_kwargs={"num_classes": 10},
                    dataset={}, config={}, metrics={})  # a model saved by the library: no dataset recorded
    assert main(["evaluate", str(bad)]) == 2
    assert _error_line(capsys).endswith("(on the command line: --dataset)")  # helper 32 had to guess the flag


def test_train_counts_one_epoch_in_the_singular(tmp_path, capsys):
    argv = [("1" if previous == "--epochs" else arg) for previous, arg in zip(["", *TINY], TINY)]
    assert main([*argv, "--out", str(tmp_path / "one.pt")]) == 0
    assert "images, 1 epoch, batch 100, lr 0.1 (" in capsys.readouterr().out


def test_evaluate_quiet_and_no_progress_hide_the_progress_bar(tmp_path, capsys):
    from autocompress.checkpoint import save_checkpoint
    from autocompress.models import create_model

    ckpt = save_checkpoint(tmp_path / "m.pt", model=create_model("fmnist_cnn", width=0.25), model_name="fmnist_cnn",
                           model_kwargs={"num_classes": 10, "width": 0.25},
                           dataset={"name": "fashion-mnist", "input_size": [1, 28, 28], "num_classes": 10,
                                    "val_size": 200, "seed": 0}, config={}, metrics={})
    assert main(["evaluate", str(ckpt), "--split", "val", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(ckpt), "--split", "val"]) == 0
    assert "val" in capsys.readouterr().err  # tqdm's bar
    for flag in ("--quiet", "--no-progress"):
        assert main(["evaluate", str(ckpt), "--split", "val", flag]) == 0
        assert capsys.readouterr() == (f"fmnist_cnn on fashion-mnist val: top-1 {100 * result['top1']:.2f}%, "
                                       f"loss {result['loss']:.4f} (200 images)\n", "")


def _finished_checkpoint(path, epochs=2):
    from autocompress.checkpoint import save_checkpoint
    from autocompress.models import create_model

    return save_checkpoint(path, model=create_model("fmnist_cnn", width=0.25), model_name="fmnist_cnn",
                           model_kwargs={"num_classes": 10, "width": 0.25},
                           dataset={"name": "fashion-mnist", "input_size": [1, 28, 28], "num_classes": 10,
                                    "val_size": 200, "seed": 0}, config={}, metrics={"epochs": epochs})


def test_resume_of_a_finished_checkpoint_says_nothing_to_resume(tmp_path, capsys):
    out = _finished_checkpoint(tmp_path / "tr.pt")
    before = out.read_bytes()
    assert main([*TINY, "--out", str(out), "--resume"]) == 2
    assert _error_line(capsys) == (f"autocompress: error: {out} has finished training (2 epochs); nothing to "
                                   f"resume; choose another --out to train anew, or evaluate it with "
                                   f"`autocompress evaluate {out}`")
    assert out.read_bytes() == before


@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "cuda:99"])
def test_devices_not_usable_here_are_refused_by_train_and_evaluate(tmp_path, capsys, device):
    if device == "cuda:99" and not torch.cuda.is_available():
        device = "vulkan"
    checkpoint = _finished_checkpoint(tmp_path / "m.pt")
    assert main([*TINY, "--device", device, "--out", str(tmp_path / "new.pt")]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"autocompress: error: device '{device}' is not available here") and "--device" in line
    assert main(["evaluate", str(checkpoint), "--device", device]) == 2
    assert _error_line(capsys) == line
    assert not (tmp_path / "new.pt").exists()


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_written(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_epoch", interrupted)
    out = tmp_path / "tr.pt"
    assert main([*TINY, "--out", str(out)]) == 130
    assert capsys.readouterr().err == f"autocompress: interrupted; nothing was written ({out} does not exist)\n"
    assert not out.exists()


def test_evaluate_warns_of_a_checkpoint_that_records_no_input_normalisation(tmp_path, capsys):
    """Fresh user 58: their [0, 1]-input model read 16.8 % in ``evaluate`` (79.6 % in their pipeline) and nothing
    said the CLI normalised its inputs; recorded mean 0 / std 1 gives their inputs, and no warning."""
    from autocompress.checkpoint import save_checkpoint
    from autocompress.models import create_model

    model = create_model("fmnist_cnn", num_classes=10, width=0.25)
    dataset = {"name": "fashion-mnist", "input_size": [1, 28, 28], "num_classes": 10}
    for name, extra in (("plain.pt", {}), ("recorded.pt", {"mean": [0.0], "std": [1.0]})):
        save_checkpoint(tmp_path / name, model=model, model_name="fmnist_cnn",
                        model_kwargs={"num_classes": 10, "width": 0.25}, dataset={**dataset, **extra}, config={},
                        metrics={})
        assert main(["evaluate", str(tmp_path / name), "--quiet"]) == 0
        err = capsys.readouterr().err
        assert ("autocompress: warning: the checkpoint records no input normalisation, so images are scaled to "
                "[0, 1] and normalised with fashion-mnist's mean (0.286) and std (0.353) here" in err) == (not extra)
