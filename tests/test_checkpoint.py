"""Checkpoint round trip and error paths."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import autocompress
from autocompress.checkpoint import FORMAT, load_checkpoint, load_model, model_from_checkpoint, save_checkpoint
from autocompress.errors import UserError
from autocompress.models import create_model
from autocompress.training import TrainConfig, seeded

DATASET = {"name": "fashion-mnist", "input_size": [1, 28, 28], "num_classes": 10}


def _save(path, model=None, name="fmnist_cnn", kwargs=None, **extra):
    kwargs = {"num_classes": 10, "width": 0.25} if kwargs is None else kwargs
    model = model if model is not None else create_model(name, **kwargs)
    return save_checkpoint(path, model=model, model_name=name, model_kwargs=kwargs, dataset=DATASET,
                           config=TrainConfig(epochs=3), metrics={"test_top1": 0.5}, **extra), model


def test_round_trip_rebuilds_the_same_model(tmp_path):
    path, model = _save(tmp_path / "a.pt")
    with torch.no_grad():  # make BatchNorm buffers non-default so that they must be restored
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    path, model = _save(tmp_path / "a.pt", model=model)
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["version"] == 1
    assert ckpt["model"] == {"name": "fmnist_cnn", "kwargs": {"num_classes": 10, "width": 0.25}}
    assert ckpt["config"]["epochs"] == 3 and ckpt["metrics"] == {"test_top1": 0.5}
    assert ckpt["architecture"] is None and ckpt["training_state"] is None
    rebuilt = model_from_checkpoint(ckpt)
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model.eval()
    loaded = autocompress.load(path)
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(load_model(path)(x), model(x))


def test_a_weight_that_views_a_larger_tensor_saves_only_its_own_elements(tmp_path):
    """torch.save writes a view's whole storage: a fresh user's resumed run wrote a model.pt 1,920 bytes larger
    than the same weights uninterrupted. The same model with its weight a slice of a 100x larger tensor saves
    the same number of bytes as with a weight of its own."""
    own = nn.Linear(16, 4)
    viewed = nn.Linear(16, 4)
    big = torch.randn(400, 16)
    viewed.weight = nn.Parameter(big[:4])  # a view: its storage holds 400 x 16 floats
    viewed.weight.data.copy_(own.weight.data)
    viewed.bias.data.copy_(own.bias.data)
    sizes = []
    for name, model in (("own", own), ("viewed", viewed)):
        path = save_checkpoint(tmp_path / f"{name}.pt", model=model, model_class="torch.nn:Linear",
                               model_kwargs={"in_features": 16, "out_features": 4}, dataset={}, config={},
                               metrics={})
        sizes.append(path.stat().st_size)
    assert sizes[0] == sizes[1] < big.numel() * 4


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="not a file"):
        load_checkpoint(tmp_path)


def test_corrupt_and_truncated_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(bad)
    path, _ = _save(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(truncated)


def test_wrong_format_and_version(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UserError, match="not an autocompress checkpoint"):
        load_checkpoint(other)
    torch.save(nn.Linear(2, 2).state_dict(), other)  # a user's own state_dict: told how to write theirs
    with pytest.raises(UserError, match=r"not an autocompress checkpoint .* or write your own model's with "
                                        r"autocompress.checkpoint.save_checkpoint\(path, model=\.\.\., "):
        load_checkpoint(other)
    path, _ = _save(tmp_path / "a.pt")
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "version": 2}, other)
    with pytest.raises(UserError, match="version 2"):
        load_checkpoint(other)


def test_pickled_objects_are_refused_unless_trusted(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT, "version": 1, "model": nn.Linear(2, 2)}, path)
    with pytest.raises(UserError, match=r"holds pickled Python objects \(torch.nn.modules.linear.Linear\), not plain "
                                        r"data; if you trust its source, load it in Python with torch.load\(path, "
                                        r"weights_only=False\) and write the model with .*save_checkpoint"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="lacks"):  # trusted, unpickled, but still not a valid checkpoint
        load_checkpoint(path, trust=True)


def test_mismatched_model(tmp_path):
    path, _ = _save(tmp_path / "a.pt")
    ckpt = load_checkpoint(path)
    ckpt["model"]["kwargs"]["width"] = 0.5  # same names, other shapes
    with pytest.raises(UserError, match="do not match model fmnist_cnn"):
        model_from_checkpoint(ckpt)
    ckpt["model"] = {"name": "lenet5", "kwargs": {"num_classes": 10}}  # other names
    with pytest.raises(UserError, match="do not match model lenet5"):
        model_from_checkpoint(ckpt)
    ckpt["model"] = {"name": "no_such_model", "kwargs": {}}
    with pytest.raises(UserError, match="unknown model"):
        model_from_checkpoint(ckpt)


def test_failed_save_leaves_the_old_file_intact(tmp_path):
    path, _ = _save(tmp_path / "a.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):
        _save(path, training_state={"not plain data": lambda: 0})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_load_into_a_given_instance_and_model_entry_checks(tmp_path):
    with seeded(0):
        path, model = _save(tmp_path / "a.pt")
        mine = create_model("fmnist_cnn", num_classes=10, width=0.25)
        other = nn.Sequential(nn.Linear(2, 2))
    loaded = autocompress.load(path, model=mine)
    assert loaded is mine and not mine.training
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), model.state_dict().values()))
    with pytest.raises(UserError, match="model= must be an nn.Module instance, got dict"):
        autocompress.load(path, model={})
    with pytest.raises(UserError, match="do not match model Sequential \\(the given instance; saved from fmnist_cnn"):
        autocompress.load(path, model=other)
    for names in ({}, {"model_name": "lenet5", "model_class": "torch.nn:Linear"}):
        with pytest.raises(UserError, match="exactly one of model_name"):
            save_checkpoint(tmp_path / "b.pt", model=model, **names, dataset=DATASET, config={}, metrics={})
    with pytest.raises(UserError, match="model_kwargs has a non-string key 1"):
        _save(tmp_path / "b.pt", model=model, kwargs={1: 2})
    assert not (tmp_path / "b.pt").exists()
