"""The deployed form of a compact model (autocompress.deployed_form): column layers stored or dense, whichever
runs faster; the same function either way; the choice logic; the export command's --columns."""
from __future__ import annotations

import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import autocompress
from autocompress import deployment as module
from autocompress.cli import main
from autocompress.columns import ColumnConv2d, ColumnLinear
from autocompress.compaction import compact
from autocompress.errors import SettingError, UserError
from autocompress.latency import LatencyConfig, Timing
from test_compaction import _mixed, column_masks, filter_masks
from test_export import compact_lenet_checkpoint

torch.set_num_threads(1)
FAST = LatencyConfig(runs=3, warmup=1, table_runs=2, large_batch=4)


def _compact_mixed():
    model, x = _mixed()
    masks = column_masks(model, 0.6, masks=filter_masks(model, x, 0.3), skip={"head.3"})
    return compact(model, masks, x).model.eval(), x


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_deployed_form_computes_what_the_compact_model_computes(runtime):
    model, x = _compact_mixed()
    names = module.column_layer_names(model)
    assert names and all(isinstance(model.get_submodule(n), (ColumnConv2d, ColumnLinear)) for n in names)
    form = autocompress.deployed_form(model, x, LatencyConfig(runtime=runtime, runs=3, warmup=1, table_runs=2,
                                                               large_batch=4))
    assert form.column_layers == names and set(form.dense_layers) <= set(names)
    assert form.form in module.FORMS and set(form.ratios) >= {"stored", "dense"}
    assert form.ratios["stored"] == pytest.approx(1.0)
    for name in names:
        dense = name in form.dense_layers
        assert isinstance(form.model.get_submodule(name), (ColumnConv2d, ColumnLinear)) is not dense
    batch = torch.randn(5, *x.shape[1:], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(form.model(batch), model(batch), atol=1e-5)
    assert form.summary()["column_layers"] == len(names)


def test_with_dense_layers_replaces_exactly_the_named_layers():
    model, x = _compact_mixed()
    names = module.column_layer_names(model)
    assert module.with_dense_layers(model, []) is model
    dense = module.with_dense_layers(model, names[:1])
    assert type(dense.get_submodule(names[0])) in (nn.Conv2d, nn.Linear)
    assert module.column_layer_names(dense) == names[1:] and module.column_layer_names(model) == names
    with torch.no_grad():
        assert torch.allclose(dense(x), model(x), atol=1e-5)
    with pytest.raises(UserError, match="'stem.1' is not a column-pruned layer"):
        module.with_dense_layers(model, ["stem.1"])


def test_a_model_without_column_layers_is_returned_untimed(monkeypatch):
    monkeypatch.setattr(module, "measure_models", lambda *a, **k: pytest.fail("timed a model without columns"))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    form = module.deployed_form(model, torch.zeros(1, 3, 8, 8), FAST)
    assert form.model is model and form.form == "stored" and form.dense_layers == []


def test_bad_runtime_is_refused_before_any_timing():
    model, x = _compact_mixed()
    with pytest.raises(SettingError, match="latency.runtime"):
        module.deployed_form(model, x, LatencyConfig(runtime="tvm"))
    with pytest.raises(SettingError, match=r"unknown setting\(s\) latency.runtimes"):
        module.deployed_form(model, x, {"runtimes": "torch"})
    with pytest.raises(SettingError, match="latency must be a mapping of settings, not str"):
        module.deployed_form(model, x, "torch")
    assert module.latency_config({"runtime": "torch", "runs": 3}) == LatencyConfig(runtime="torch", runs=3)


def _timing(ms: float) -> Timing:
    return Timing(ms, ms, ms, 1)


@settings(max_examples=25, deadline=None)
@given(layer_dense=st.lists(st.booleans(), min_size=3, max_size=3),
       whole=st.fixed_dictionaries({"stored": st.floats(0.5, 2), "dense": st.floats(0.5, 2),
                                    "per_layer": st.floats(0.5, 2)}))
def test_the_choice_follows_the_timings(layer_dense, whole):
    """With timings given: each layer is turned dense exactly when its dense form timed faster, and the whole
    model takes the form with the lowest mean ratio to "as stored" (ties: stored, then dense) when that is 5 %
    below "as stored", else stays as stored."""
    model = nn.Sequential(*[ColumnConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1), torch.arange(0, 36, 2))
                            for _ in range(3)]).eval()
    layers = {id(model[i]): dense for i, dense in enumerate(layer_dense)}

    def fake_measure(models, example, config, batches=None, runs=None):
        if models["stored"] is model:
            return {b: {name: _timing(whole[name] * b) for name in models} for b in (1, 4)}
        faster = layers[id(models["stored"])]
        return {1: {"stored": _timing(2.0), "dense": _timing(1.0 if faster else 3.0)}}

    original = module.measure_models
    module.measure_models = fake_measure
    try:
        form = module.deployed_form(model, torch.zeros(1, 4, 6, 6), FAST)
    finally:
        module.measure_models = original
    chosen = [str(i) for i, dense in enumerate(layer_dense) if dense]
    forms = {"stored": [], "dense": ["0", "1", "2"], "per_layer": chosen}
    if not chosen or len(chosen) == 3:
        forms.pop("per_layer")
    ratio = {name: whole[name] / whole["stored"] for name in forms}
    best = min(forms, key=lambda name: (ratio[name], module.FORMS.index(name)))
    best = best if ratio[best] < 0.95 else "stored"  # another form must be 5 % faster (module.MARGIN)
    assert form.form == best and form.dense_layers == forms[best]
    assert form.ratios == pytest.approx(ratio)


def test_cli_export_columns(tmp_path, capsys):
    """--columns dense writes every column layer as a full-width conv (no input Gather); stored keeps the kept
    columns' layout; auto prints its choice; all three agree with the compact model."""
    _, compact_model, ckpt, _ = compact_lenet_checkpoint(tmp_path)
    convs = {name: m for name, m in compact_model.named_modules() if isinstance(m, ColumnConv2d)}
    for columns in ("dense", "stored", "auto"):
        out = tmp_path / f"{columns}.onnx"
        assert main(["export", str(ckpt), "--onnx", str(out), "--columns", columns]) == 0
        printed = capsys.readouterr().out
        assert "onnxruntime max |diff|" in printed
        assert ("column-pruned layers:" in printed) is (columns == "auto")
        graph = onnx.load(str(out)).graph
        widths = sorted(tuple(t.dims)[:2] for t in graph.initializer if len(t.dims) == 4)
        if columns == "dense":
            assert widths == sorted((m.out_channels, m.in_channels) for m in convs.values())
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "z.onnx"), "--runtime-threads", "0"]) == 2
    assert "--runtime-threads 0 is not positive" in capsys.readouterr().err


def test_cli_export_auto_writes_the_form_the_compress_run_recorded(tmp_path, capsys, monkeypatch):
    """The model.pt of a compress run folder is exported with the dense layers that run's final record chose
    (the form whose speed it reported) without timing again, when the runtime and threads match; other threads
    time anew."""
    import json
    import shutil

    _, compact_model, ckpt, _ = compact_lenet_checkpoint(tmp_path)
    names = module.column_layer_names(compact_model)
    chosen = names[:1]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "model.pt")
    final = {"event": "final", "deployed": {"runtime": "onnxruntime", "threads": 1},
             "deployed_form": {"form": "per_layer", "dense_layers": chosen, "column_layers": names}}
    (run / "metrics.jsonl").write_text(json.dumps({"event": "base"}) + "\n" + json.dumps(final) + "\n")
    timed, densified = [], []
    with_dense = module.with_dense_layers
    monkeypatch.setattr(module, "deployed_form", lambda model, *a, **k: timed.append(1) or module.DeployedForm(model))
    monkeypatch.setattr(module, "with_dense_layers", lambda model, layers: densified.append(list(layers)) or
                        with_dense(model, layers))
    assert main(["export", str(run / "model.pt"), "--onnx", str(tmp_path / "recorded.onnx")]) == 0
    assert f"1 of {len(names)} dense, as the compress run chose" in capsys.readouterr().out
    assert densified == [chosen] and not timed
    assert main(["export", str(run / "model.pt"), "--onnx", str(tmp_path / "timed.onnx"),
                 "--runtime-threads", "2"]) == 0
    assert "as the compress run chose" not in capsys.readouterr().out and timed


def test_layers_faster_dense_but_over_a_flops_limit_are_held_stored_and_named():
    """Fresh user 54's depthwise convs ran 10-18x faster dense, but dense they exceeded the flops target, and the
    final table said "as stored ... faster than dense there"; they are now named as held by the MACs."""
    from autocompress.metrics import count_macs

    model = nn.Sequential(ColumnConv2d.from_conv(nn.Conv2d(4, 128, 3, padding=1), torch.arange(0, 36, 2)),
                          ColumnConv2d.from_conv(nn.Conv2d(128, 128, 3, padding=1), torch.arange(0, 1152, 2))).eval()
    assert [layer.path for layer in model] == ["positions", "positions"]  # dense, they multiply more columns
    x = torch.zeros(1, 4, 6, 6)

    def fake_measure(models, example, config, batches=None, runs=None):
        if models["stored"] is model:
            return {1: {name: _timing(1.0) for name in models}}
        return {1: {"stored": _timing(2.0), "dense": _timing(1.0)}}  # every layer faster dense

    original = module.measure_models
    module.measure_models = fake_measure
    try:
        capped = module.deployed_form(model, x, FAST, max_macs=count_macs(model, x))
        free = module.deployed_form(model, x, FAST)
    finally:
        module.measure_models = original
    assert capped.form == "stored" and capped.dense_layers == [] and capped.held == ["0", "1"]
    assert capped.summary()["held_by_macs"] == ["0", "1"] and free.held == []
