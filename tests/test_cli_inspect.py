"""``autocompress inspect``: text and JSON reports of checkpoints and zoo models, and its error paths
(one line on stderr, exit status 2)."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import autocompress
from autocompress import UserError
from autocompress.checkpoint import save_checkpoint
from autocompress.cli import main
from autocompress.text import plural
from autocompress.models import create_model


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("fmnist_cnn", num_classes=10, width=0.25)
    with torch.no_grad():
        model.classifier.weight[:, :4].zero_()  # 40 of 320 classifier weights
    return save_checkpoint(tmp_path / "small.pt", model=model, model_name="fmnist_cnn",
                           model_kwargs={"num_classes": 10, "width": 0.25},
                           dataset={"name": "fashion-mnist", "input_size": [1, 28, 28], "num_classes": 10},
                           config={}, metrics={"test_top1": 0.5})


def test_inspect_checkpoint_json(checkpoint, capsys):
    assert main(["inspect", str(checkpoint), "--json", "--latency-runs", "2", "--warmup", "0",
                 "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = create_model("fmnist_cnn", width=0.25)
    assert report["model"] == "fmnist_cnn" and report["input_size"] == [1, 28, 28]
    assert report["params"] == sum(p.numel() for p in model.parameters())
    # zero: the 40 classifier weights, the fresh BatchNorm shifts (8+8+16+16+32) and the classifier bias
    assert report["nonzero_params"] == report["params"] - 40 - 80 - 10
    assert report["file_size_bytes"] == os.path.getsize(checkpoint)
    assert report["flops"] == 2 * report["macs"]
    # hand count at width 0.25: convs 8 @28x28, 8 and 16 @14x14, 16 and 32 @7x7, linear 32 -> 10
    hand = 8 * 1 * 9 * 784 + (8 * 8 * 9 + 16 * 8 * 9) * 196 + (16 * 16 * 9 + 32 * 16 * 9) * 49 + 320
    assert report["macs"] == hand
    classifier = next(row for row in report["layers"] if row["name"] == "classifier")
    assert classifier["zero_fraction"] == 40 / 320 and classifier["weight_shape"] == [10, 32]
    assert set(report["latency"]) == {"1", "64"}
    assert report["latency"]["64"]["batch"] == 64 and report["latency"]["1"]["threads"] == 1
    assert report["latency"]["1"]["median_ms"] > 0
    # fmnist_cnn at width 0.25: five convolutions whose inputs (1 from the image, then 8, 8, 16, 16) are all on
    # onnxruntime's 4-channel grid
    assert report["deployed"]["blocked_convolutions"] == {"compressed": [5, 5]}


def test_inspect_resnet20_text(capsys):
    assert main(["inspect", "--model", "resnet20", "--no-latency"]) == 0
    out = capsys.readouterr().out
    assert "parameters   272,474 (0.27M)" in out
    assert "MACs         40,813,184 (40.81M)" in out
    assert "FLOPs        81,626,368 (81.63M) per image (FLOPs = 2 x MACs)" in out
    assert "layer3.0.downsample.0" in out and "latency" not in out


def test_list_models(capsys):
    assert main(["inspect", "--list-models"]) == 0
    out = capsys.readouterr().out
    assert "fmnist_cnn" in out and "resnet20" in out and "torchvision:" in out


@pytest.mark.parametrize("argv,message", [
    (["--model", "resnet2"], "unknown model 'resnet2'"),
    ([], "exactly one of CHECKPOINT or --model"),
    (["--model", "lenet5", "--input-size", "3,32"], "is not C,H,W"),
    (["--model", "lenet5", "--input-size", "3,32,32"], "cannot take inputs of shape 1x3x32x32"),
    (["--model", "lenet5", "--latency-runs", "0"], "invalid latency settings"),
    (["--model", "vgg11", "--model-arg", "depth=3"], "takes no option 'depth'"),
    (["missing.pt"], "does not exist"),
])
def test_inspect_errors_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autocompress: error:") and message in err and "\n" not in err


def test_missing_user_code_points_to_import_flag(tmp_path, capsys, monkeypatch):
    """A checkpoint of the user's own class (module in the current folder) or a model name their module registers:
    without --import the one-line error names the flag and the module; with it the command runs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet_ac.py").write_text("import torch.nn as nn\n\nclass MyNet(nn.Module):\n"
                                          "    def __init__(self):\n        super().__init__()\n"
                                          "        self.fc = nn.Linear(4, 3)\n\n"
                                          "    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = importlib.import_module("mynet_ac").MyNet()
    path = save_checkpoint(tmp_path / "mine.pt", model=model, model_class="mynet_ac:MyNet", model_kwargs={},
                           dataset={}, config={}, metrics={})
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), os.getcwd())])
    monkeypatch.delitem(sys.modules, "mynet_ac")
    assert main(["inspect", str(path), "--input-size", "1,2,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert ("cannot import module 'mynet_ac' of model class mynet_ac:MyNet (ModuleNotFoundError: No module named "
            "'mynet_ac'); pass --import mynet_ac from") in err and "; or install the package" in err and "\n" not in err
    assert ("--import mynet_ac from the folder that holds it (the module that defines it: a checkpoint names the "
            "class, not where its code is)") in err
    assert err.endswith("or put it on PYTHONPATH") and "autocompress.load(" not in err  # the Python-only fix left out
    with pytest.raises(UserError, match=r"or put it on PYTHONPATH; or pass a fresh instance of the model instead: "
                                        r"autocompress.load\(path, model=MyNet\(...\)\)$"):
        autocompress.load(path)  # the library's message keeps it
    assert main(["inspect", "--model", "no_such_net_xyz"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model 'no_such_net_xyz'" in err and "--import MODULE" in err
    assert main(["inspect", "--import", "mynet_ac", str(path), "--input-size", "1,2,2"]) == 0
    assert "parameters   15" in capsys.readouterr().out


def test_inspect_corrupt_and_mismatched_checkpoints_exit_2(checkpoint, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(checkpoint.read_bytes()[:200])
    assert main(["inspect", str(corrupt)]) == 2
    assert "corrupt" in capsys.readouterr().err
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model"]["kwargs"]["width"] = 0.5
    mismatched = tmp_path / "mismatched.pt"
    torch.save(ckpt, mismatched)
    assert main(["inspect", str(mismatched), "--no-latency"]) == 2
    assert "do not match" in capsys.readouterr().err
    assert corrupt.stat().st_size == 200  # nothing overwritten


def test_plural():
    assert [plural(n, "CPU thread") for n in (0, 1, 2)] == ["0 CPU threads", "1 CPU thread", "2 CPU threads"]


def test_inspect_text_counts_in_the_singular(checkpoint, capsys):
    assert main(["inspect", str(checkpoint), "--latency-runs", "1", "--warmup", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    latency = [line for line in out if line.startswith("latency")]
    assert len(latency) == 2
    assert all(line.endswith(") over 1 run in eager PyTorch on cpu, 1 CPU thread") for line in latency)
    assert "layout       onnxruntime runs 5 of 5 convolutions in its blocked channel layout (NCHWc) (only 2-D " \
           "convolutions take it (1-D and 3-D ones never do); of those, input widths of 16 or more channels that are " \
           "not a multiple of 4, and grouped convolutions whose channels per group are not a multiple of the CPU's " \
           "channel block (16 on AVX-512), run outside it)" in out


def test_closed_stdout_exits_quietly(tmp_path):
    """`autocompress inspect ... | head -1`: the reader is gone before the report is written; no traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "autocompress", "inspect", "--model", "lenet5", "--no-latency"],
                              stdout=write, stderr=subprocess.PIPE, cwd=tmp_path, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (1, b"")


def test_the_slower_hint_suggests_a_channel_multiple_only_for_unaligned_widths():
    """A fresh user's compact model (channel multiple auto: 16 or 8) was told "and/or channel_multiple (e.g. auto)":
    inspect reads the widths pruned against the base; multiples of 8 mean a multiple was in use."""
    from torch import nn

    from autocompress.cli.inspect import _aligned

    def net(a: int, b: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, a, 3), nn.Conv2d(a, b, 3), nn.ConvTranspose2d(b, 8, 2), nn.Linear(8, 4))

    base = net(32, 48)
    assert _aligned(net(16, 24), base) and _aligned(net(32, 40), base)
    assert not _aligned(net(16, 20), base) and not _aligned(net(32, 48), base)  # unaligned / nothing pruned


class _Pooling(torch.nn.Module):
    """A class of the user's whose constructor arguments it keeps no attribute of: a checkpoint of it records
    its class but not how to build it."""

    def __init__(self, width: int, pool: str):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.Linear(width, 4)
        self._mean = pool == "mean"

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.head(x.mean((2, 3)) if self._mean else x.amax((2, 3)))


def test_model_arg_gives_a_checkpoint_of_your_own_class_its_constructor_arguments(tmp_path, capsys):
    """The command line's fix for a checkpoint that records a class but not its arguments (the library's:
    ``model=`` an instance): ``--model-arg`` items, checked against the outputs the checkpoint stored."""
    from autocompress.checkpoint import save_checkpoint
    from autocompress.serialization import save_compact

    torch.manual_seed(0)
    path = save_compact(tmp_path / "own.pt", _Pooling(6, "mean"), dataset={"input_size": [3, 5, 5]})
    fast = ["--latency-runs", "2", "--warmup", "0", "--threads", "1", "--json"]
    assert main(["inspect", str(path), *fast]) == 2
    err = capsys.readouterr().err
    assert "records model class test_cli_inspect:_Pooling but not its constructor arguments (its constructor takes " \
           "width, pool)" in err
    assert "--model-arg KEY=VALUE" in err and "autocompress.load(" not in err  # no Python-only fix on the CLI
    plain = save_checkpoint(tmp_path / "plain.pt", model=_Pooling(6, "mean"), model_class="test_cli_inspect:_Pooling",
                            dataset={"input_size": [3, 5, 5]}, config={}, metrics={})  # no architecture recorded
    for file, given, problem in (
            (path, ["width=6"], "cannot build test_cli_inspect:_Pooling with the arguments {'width': 6}"),
            (plain, ["width=4", "pool=mean"], "the checkpoint's weights do not match model")):
        assert main(["inspect", str(file), *[f for g in given for f in ("--model-arg", g)], *fast]) == 2
        err = capsys.readouterr().err
        assert problem in err and "pass the --model-arg values" in err and "autocompress.load(" not in err, err
    assert main(["inspect", str(path), "--model-arg", "width=6", "--model-arg", "pool=mean", *fast]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 6 * 3 * 9 + 6 + 6 * 4 + 4
    assert main(["inspect", str(path), "--model-arg", "width=6", "--model-arg", "pool=max", *fast]) == 2
    assert "computes outputs differing" in (err := capsys.readouterr().err) and "pass the --model-arg values" in err
    assert main(["inspect", str(path), "--model-arg", "width", *fast]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
    # a compact model's own shapes are recorded, so other arguments still load it; the base it is timed against
    # is built from them, and compress records the base's parameter count to check it
    base_params = sum(p.numel() for p in _Pooling(6, "mean").parameters())
    pruned = save_compact(tmp_path / "pruned.pt", _Pooling(6, "mean"), dataset={"input_size": [3, 5, 5]},
                          metrics={"base_params": base_params})
    assert main(["inspect", str(pruned), "--model-arg", "width=8", "--model-arg", "pool=mean", *fast]) == 2
    err = capsys.readouterr().err
    assert (f"the base model built as test_cli_inspect:_Pooling {{'width': 8, 'pool': 'mean'}} has "
            f"{8 * 3 * 9 + 8 + 8 * 4 + 4:,} parameters, the model this one was pruned from {base_params:,}; pass the "
            "--model-arg values you built it with") in err
    assert main(["inspect", str(pruned), "--model-arg", "width=6", "--model-arg", "pool=mean", *fast]) == 0


def test_model_arg_for_a_zoo_checkpoint_is_refused(checkpoint, capsys):
    assert main(["evaluate", str(checkpoint), "--model-arg", "width=0.5"]) == 2
    assert "--model-arg: the checkpoint holds zoo model 'fmnist_cnn', whose options it records" in \
        capsys.readouterr().err


def test_model_arg_replaces_only_the_recorded_arguments_it_names():
    from autocompress.checkpoint import with_constructor_arguments

    ckpt = {"model": {"name": None, "class": "m:Net", "kwargs": {"width": 6, "pool": "mean"}}, "state_dict": {}}
    assert with_constructor_arguments(ckpt, {"pool": "max"})["model"]["kwargs"] == {"width": 6, "pool": "max"}
    assert ckpt["model"]["kwargs"] == {"width": 6, "pool": "mean"}  # the loaded checkpoint is left as it was
    none = {**ckpt, "model": {**ckpt["model"], "kwargs": None}}
    assert with_constructor_arguments(none, {"width": 3})["model"]["kwargs"] == {"width": 3}
