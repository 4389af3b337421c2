"""Compact models saved as architecture description + state_dict, rebuilt without unpickling code."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import autocompress
from autocompress.checkpoint import load_checkpoint, save_checkpoint
from autocompress.compaction import ColumnConv2d, compact, shrink
from autocompress.errors import UserError
from autocompress.masks import apply_masks
from autocompress.models import create_model
from autocompress.serialization import (apply_architecture, describe_architecture, from_sparse_state_dict,
                                        save_compact, to_sparse_state_dict)
from test_compaction import Mixed, _mixed, column_masks, filter_masks, irregular_masks

torch.set_num_threads(1)


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_describe_apply_round_trip_own_model():
    model, x = _mixed()
    result = compact(model, column_masks(model, 0.5, masks=filter_masks(model, x, 0.4), skip={"head.3"}), x)
    description = result.architecture
    assert _plain(description) and "head.3" not in description["modules"]  # unchanged modules left out
    assert description["modules"]["res.0"]["type"] == "ColumnConv2d"
    assert description["modules"]["stem.1"] == {"type": "BatchNorm2d", "args": {
        "num_features": 10, "eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True}}
    pickle.loads(pickle.dumps(description))  # plain data
    rebuilt = apply_architecture(Mixed(), description)
    rebuilt.load_state_dict(result.model.state_dict(), strict=True)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model(x))
    assert describe_architecture(rebuilt) == describe_architecture(result.model)


def test_save_load_zoo_compact_shrinks_file(tmp_path):
    model = create_model("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    masks = column_masks(model, 0.5, masks=filter_masks(model, x, 0.5), skip={"fc"})
    result = compact(model, masks, x)
    base = {"model": {"name": "resnet20", "kwargs": {"num_classes": 10}},
            "dataset": {"name": "cifar10", "input_size": [3, 32, 32], "num_classes": 10}}
    base_path = save_checkpoint(tmp_path / "base.pt", model=model, model_name="resnet20",
                                model_kwargs={"num_classes": 10}, dataset=base["dataset"], config={}, metrics={})
    path = save_compact(tmp_path / "compact.pt", result.model, base_checkpoint=base, metrics={"top1": 0.5},
                        config={"rates": 0.5})
    assert load_checkpoint(path)["model"] == base["model"]  # the zoo entry as it was: no class recorded
    loaded = autocompress.load(path)  # weights_only=True inside
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    assert any(isinstance(m, ColumnConv2d) for m in loaded.modules())
    ratio_params = result.report["params_after"] / result.report["params_before"]
    ratio_bytes = path.stat().st_size / base_path.stat().st_size
    assert ratio_bytes < 1.0 and abs(ratio_bytes - ratio_params) < 0.15, (ratio_bytes, ratio_params)


def test_apply_architecture_rejects_bad_descriptions():
    with pytest.raises(UserError, match="not an autocompress architecture"):
        apply_architecture(Mixed(), {"modules": {}})
    with pytest.raises(UserError, match="lacks"):
        apply_architecture(Mixed(), {"format": "autocompress-architecture", "version": 1,
                                     "modules": {"nope.0": {"type": "Conv2d", "args": {}}}})
    with pytest.raises(UserError, match="unknown module type"):
        apply_architecture(Mixed(), {"format": "autocompress-architecture", "version": 1,
                                     "modules": {"stem.0": {"type": "Evil", "args": {}}}})


def test_sparse_state_dict_round_trip_and_size():
    model = create_model("lenet5", num_classes=10)
    masks = irregular_masks(model, 0.8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(masks[name])
    state = model.state_dict()
    sparse = to_sparse_state_dict(state)
    assert set(sparse["sparse"]) == {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                                     for n in [f"{n}.weight"]}
    back = from_sparse_state_dict(sparse)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    nbytes = sum(t.numel() * t.element_size() for e in sparse["sparse"].values()
                 for t in (e["crow_indices"], e["col_indices"], e["values"]))
    dense = sum(state[k].numel() * 4 for k in sparse["sparse"])
    assert nbytes < 0.45 * dense


class _ScaledBlock(nn.Module):
    """A residual branch scaled by a free per-channel parameter of a non-leaf module (ConvNeXt's layer scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x + self.gamma[:, None, None] * self.conv(x)


class _LayerScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 8, 3, padding=1), _ScaledBlock(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_a_compact_model_with_layer_scale_loads_onto_a_fresh_instance(tmp_path):
    """The stream's pruned channels shrink ``body.gamma`` (a parameter of a module no description type
    covers); the saved file records its shape, so loading onto a fresh instance gives the compact model."""
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    torch.manual_seed(0)
    model, x = _LayerScaled().eval(), torch.randn(2, 3, 6, 6)
    space = PruningSpace.build(model, (x,), dims=("filter",))
    masks = project(space, model, {"filter": {group.name: 0.5 for group in space.filter_groups}})
    result = compact(model, space.param_masks(masks), x)
    assert result.model.body.gamma.shape == (4,)
    path = save_compact(tmp_path / "compact.pt", result.model)
    loaded = autocompress.load(path, model=_LayerScaled())
    assert loaded.body.gamma.shape == (4,)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


class _InstanceNormed(nn.Module):
    def __init__(self, **norm):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, **norm)
        self.c2, self.fc = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.n1(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("norm", [{"affine": True}, {}, {"affine": True, "track_running_stats": True}])
def test_a_compact_model_with_a_narrowed_instance_norm_loads_as_it_computes(tmp_path, norm):
    """Fresh user 66: an InstanceNorm2d narrowed with its channels was saved by the shapes of its parameters alone,
    and the loaded model failed ("expected input's size at dim=1 to match num_features (64), but got: 32").
    With running statistics, torch-pruning left them at 8 entries and the narrowed norm refused every forward."""
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    torch.manual_seed(0)
    model, x = _InstanceNormed(**norm), torch.randn(2, 3, 6, 6)
    model(torch.randn(4, 3, 6, 6) * 3 + 1)  # training mode: running statistics away from their 0 / 1 start
    model.eval()
    space = PruningSpace.build(model, (x,), dims=("filter",))
    masks = project(space, model, {"filter": {group.name: 0.5 for group in space.filter_groups}})
    result = compact(model, space.param_masks(masks), x)
    assert result.model.n1.num_features == 4
    if norm.get("track_running_stats"):
        kept = [next(i for i, row in enumerate(model.c1.weight) if torch.equal(row, kept_row))
                for kept_row in result.model.c1.weight]
        assert torch.equal(result.model.n1.running_mean, model.n1.running_mean[kept])
        assert torch.equal(result.model.n1.running_var, model.n1.running_var[kept])
    loaded = autocompress.load(save_compact(tmp_path / "compact.pt", result.model), model=_InstanceNormed(**norm))
    assert loaded.n1.num_features == 4
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_a_compact_model_its_description_does_not_rebuild_is_refused(monkeypatch):
    """A narrowed module of a type the description does not cover (as InstanceNorm2d was) is caught where it is
    compacted, before a file that loads broken is written (the run's compaction probe, before any training,
    leaves such groups out as it leaves out those whose compact forward fails)."""
    from autocompress import architecture
    from autocompress.projection import project
    from autocompress.space import PruningSpace

    torch.manual_seed(0)
    model, x = _InstanceNormed(affine=True).eval(), torch.randn(2, 3, 6, 6)
    space = PruningSpace.build(model, (x,), dims=("filter",))
    masks = project(space, model, {"filter": {group.name: 0.5 for group in space.filter_groups}})
    monkeypatch.delitem(architecture._DESCRIBERS, nn.InstanceNorm2d)
    with pytest.raises(RuntimeError, match=r"^the compact model rebuilt from its saved description fails \(.*"
                                           r"num_features"):
        compact(model, space.param_masks(masks), x)
    # a model compacted to be trained or measured, never saved, skips the rebuild (shrink: the quick evaluation's
    # candidates, the model retrained); it still computes the masked model
    small, _ = shrink(model, space.param_masks(masks), x)
    masked = copy.deepcopy(model)
    apply_masks(masked, space.param_masks(masks))
    with torch.no_grad():
        assert small.n1.num_features == 4 and torch.allclose(small(x), masked(x), atol=1e-5)


class _Pooled(nn.Module):
    """Max or mean pooling by a constructor choice it keeps no attribute of: ``_Pooled()`` given the weights of
    ``_Pooled(pool="mean")`` computes something else."""

    def __init__(self, pool: str = "max", width: int = 8):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, width, 3, padding=1), nn.Linear(width, 4)
        self._max = pool == "max"

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.head(x.amax((2, 3)) if self._max else x.mean((2, 3)))


class _Kept(_Pooled):
    """The same, keeping its arguments as attributes of the same names (as many model classes do)."""

    def __init__(self, pool: str = "max", width: int = 8):
        super().__init__(pool, width)
        self.pool, self.width = pool, width


class _Required(_Kept):
    def __init__(self, width: int, pool: str = "max"):
        super().__init__(pool, width)


@settings(max_examples=12, deadline=None)
@given(pool=st.sampled_from(["max", "mean"]), width=st.integers(2, 9), keeps=st.booleans())
def test_constructor_arguments_rebuild_the_model_or_are_none(pool, width, keeps):
    """Recorded arguments rebuild a model computing its outputs; a model its class's defaults do not rebuild
    and whose arguments cannot be read back gets None (``_Pooled()`` takes a width-8 model's weights, so
    ``_Pooled(pool="mean")`` would load as a max-pooling model with no error)."""
    from autocompress.serialization import constructor_arguments

    torch.manual_seed(0)
    model, x = (_Kept if keeps else _Pooled)(pool, width).eval(), torch.randn(2, 3, 5, 5)
    kwargs = constructor_arguments(model, (x,))
    defaults = (pool, width) == ("max", 8)
    if keeps:
        assert kwargs == {key: value for key, value in {"pool": pool, "width": width}.items()
                          if value != {"pool": "max", "width": 8}[key]}
    else:
        assert kwargs == ({} if defaults else None)
    if kwargs is not None:
        fresh = type(model)(**kwargs).eval()
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))


class _Scaled(_Kept):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return self.scale * super().forward(x)


def test_constructor_arguments_are_only_values_a_checkpoint_reads_back(tmp_path):
    """An attribute above the bound the loader accepts for ``model.kwargs`` (2**20) is not recorded: the file
    would be refused as malformed when loaded."""
    from autocompress.serialization import constructor_arguments

    x = torch.randn(1, 3, 4, 4)
    assert constructor_arguments(_Scaled(2.0), (x,)) == {"scale": 2.0}
    assert constructor_arguments(_Scaled(1e7), (x,)) is None
    path = save_compact(tmp_path / "m.pt", _Scaled(2.0), model_kwargs={"scale": 2.0})
    assert autocompress.load(path).scale == 2.0


def test_constructor_arguments_read_a_required_argument_back():
    from autocompress.serialization import constructor_arguments

    assert constructor_arguments(_Required(5, pool="mean"), (torch.randn(1, 3, 4, 4),)) == {"width": 5,
                                                                                          "pool": "mean"}


class _Dropped(_Pooled):
    """A Dropout rate by a constructor choice: eval outputs are the same at any rate, training is not."""

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(super().forward(x))


class _KeptDropped(_Dropped):
    """:class:`_Dropped` keeping its rate in an attribute of the constructor argument's name."""

    def __init__(self, dropout: float = 0.5):
        super().__init__(dropout)
        self.dropout = dropout


@settings(max_examples=8, deadline=None)
@given(dropout=st.sampled_from([0.0, 0.1, 0.3, 0.5]), keep=st.booleans())
def test_constructor_arguments_keep_a_dropout_rate_that_outputs_do_not_show(dropout, keep):
    """``MyNet(dropout=0.3)`` computes ``MyNet()``'s eval outputs from the same weights, so outputs alone recorded
    ``{}`` and a reloaded model trained at dropout 0.5: recorded arguments now also rebuild each module's
    settings (read back from an attribute of the same name), or none are recorded."""
    from autocompress.serialization import constructor_arguments

    cls = _KeptDropped if keep else _Dropped
    kwargs = constructor_arguments(cls(dropout).eval(), (torch.randn(1, 3, 4, 4),))
    if dropout == 0.5:
        assert kwargs == {}  # the default rate: nothing to record, kept or not
    else:
        assert kwargs == ({"dropout": dropout} if keep else None)
    if kwargs is not None:
        assert cls(**kwargs).drop.p == dropout


class _DropPath(nn.Module):
    """Stochastic depth written by the caller (as in the official ConvNeXt): its printed form does not show the rate,
    and eval outputs do not depend on it."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1) >= self.drop_prob
        return x * keep / (1 - self.drop_prob)


class _WithDropPath(_Pooled):
    def __init__(self, drop_path_rate: float = 0.0):
        super().__init__()
        self.drop_path = _DropPath(drop_path_rate)

    def forward(self, x):
        return self.drop_path(super().forward(x))


class _KeepsDropPath(_WithDropPath):
    def __init__(self, drop_path_rate: float = 0.0):
        super().__init__(drop_path_rate)
        self.drop_path_rate = drop_path_rate


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.2])
def test_constructor_arguments_keep_a_drop_path_rate_a_module_of_the_callers_keeps(rate, keep):
    """Fresh user 71: ``MyNet(drop_path=0.05)`` prints and computes (in eval mode) as ``MyNet()``, so the checkpoint
    recorded ``{}`` and the loaded model trained without stochastic depth. Its modules' scalar attributes
    (``drop_prob``) are compared too: the rate is recorded where the model keeps it, or nothing is (``load`` then
    asks for the model), as for an attribute set after construction, which no constructor call rebuilds."""
    from autocompress.serialization import constructor_arguments

    cls = _KeepsDropPath if keep else _WithDropPath
    model = cls(rate).eval()
    recorded = {} if rate == 0.0 else {"drop_path_rate": rate} if keep else None
    assert constructor_arguments(model, (torch.randn(1, 3, 4, 4),)) == recorded
    if recorded is not None:
        assert cls(**recorded).drop_path.drop_prob == rate
    model.head_rate = rate  # set after construction
    assert constructor_arguments(model, (torch.randn(1, 3, 4, 4),)) is None


class _Printed(_Pooled):
    """A module whose printed form shows a learned value (its ``extra_repr``)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.scale * super().forward(x)

    def extra_repr(self) -> str:
        return f"scale={float(self.scale.detach()):.4f}"


def test_constructor_arguments_compare_printed_settings_with_the_weights_loaded():
    """The printed-settings comparison runs after the weights are loaded: a module printing a learned value
    (here a trained scale) is still rebuilt by its constructor's defaults."""
    from autocompress.serialization import constructor_arguments

    model = _Printed()
    with torch.no_grad():
        model.scale.fill_(2.5)
    assert constructor_arguments(model.eval(), (torch.randn(1, 3, 4, 4),)) == {}


def test_a_saved_model_is_loaded_only_where_it_computes_its_saved_outputs(tmp_path):
    """The file keeps the model's outputs on a seeded input of ``dataset.input_size``; an instance that takes
    the weights but pools otherwise is refused (it used to load silently), a tampered check is refused as
    malformed, and a file without a check (no input size) loads as before."""
    torch.manual_seed(0)
    model, x = _Pooled("mean").eval(), torch.randn(3, 3, 5, 5)
    path = save_compact(tmp_path / "m.pt", model, dataset={"input_size": [3, 5, 5]})
    check = load_checkpoint(path)["check"]
    assert check["input_size"] == [3, 5, 5] and check["outputs"][0]["shape"] == [2, 4]
    with torch.no_grad():
        assert torch.equal(autocompress.load(path, model=_Pooled("mean"))(x), model(x))
    with pytest.raises(UserError, match="computes outputs differing by up to .* other constructor arguments"):
        autocompress.load(path, model=_Pooled("max"))
    autocompress.load(path, model=_Pooled("max"), check=False)
    ckpt = torch.load(path, weights_only=True)
    ckpt["check"]["outputs"][0]["head"] = "x"
    torch.save(ckpt, tmp_path / "tampered.pt")
    with pytest.raises(UserError, match="malformed check entry"):
        autocompress.load(tmp_path / "tampered.pt", model=_Pooled("mean"))
    bare = save_compact(tmp_path / "bare.pt", model)
    assert load_checkpoint(bare)["check"] is None
    autocompress.load(bare, model=_Pooled("max"))  # nothing to check against
