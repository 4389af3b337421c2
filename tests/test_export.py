"""ONNX export of compact models, checked in onnxruntime; the `autocompress export` command."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autocompress.checkpoint import save_checkpoint
from autocompress.cli import main
from autocompress.compaction import ColumnConv2d, compact
from autocompress.errors import UserError
from autocompress.export import export_onnx, export_program, flat_outputs
from autocompress.models import create_model
from autocompress.serialization import save_compact
from test_compaction import _mixed, column_masks, filter_masks

torch.set_num_threads(1)


def test_compact_model_exports_and_agrees(tmp_path):
    model, x = _mixed()
    result = compact(model, column_masks(model, 0.6, masks=filter_masks(model, x, 0.3), skip={"head.3"}), x)
    out = export_onnx(result.model, x, tmp_path / "m.onnx")
    assert out.max_abs_diff <= out.tolerance and out.checked_batch_sizes == [2, 3]
    # independent check: run the file ourselves at another batch size
    session = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    batch = torch.randn(5, *x.shape[1:])
    with torch.no_grad():
        expected = result.model(batch).numpy()
    got = session.run(None, {"input": batch.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("mode", ["dense", "positions"])
def test_both_column_conv_paths_export(tmp_path, mode):
    torch.manual_seed(0)
    convs = [nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=4)]
    layers = []
    for conv in convs:
        kept = torch.randperm(conv.weight[0].numel())[:5]
        layers.append(ColumnConv2d.from_conv(conv, kept, mode=mode))
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1]).eval()
    assert {m.path for m in layers} == {mode}
    out = export_onnx(model, torch.randn(2, 6, 9, 9), tmp_path / "c.onnx", opset=13)
    assert out.max_abs_diff <= out.tolerance
    graph = onnx.load(str(out.path)).graph
    # the column layout is folded into constants at export, not rebuilt by a scatter on every run
    assert not {"ScatterElements", "ScatterND"} & {node.op_type for node in graph.node}
    if mode == "dense":  # each layer runs as one Conv whose weight holds its kept input channels only
        channels = [int(torch.unique(m.column_index // 9).numel()) for m in layers]
        tensors = list(graph.initializer) + [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute]
        conv_weights = sorted(tuple(t.dims) for t in tensors if len(t.dims) == 4)
        assert conv_weights == sorted((8, c, 3, 3) for c in channels)


class _Tokens(nn.Module):
    """A ViT-style stem: a column conv on the per-position GEMM path, tokens ``[B, N, C]``, then a reshape that
    reads the batch size from the shape (``B, N, C = x.shape``), as a fresh user's attention did."""

    def __init__(self, stem: nn.Module):
        super().__init__()
        self.stem = stem

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        return x.reshape(b, n, 4, c // 4).sum(-1)


def test_a_per_position_column_conv_keeps_the_batch_dynamic_for_shapes_read_downstream(tmp_path):
    """Its GEMM was a matmul over flattened positions, which the TorchScript exporter traced with the batch size
    folded in as a constant: a fresh user's compact ViT exported at batch 1 failed at batch 2 (onnxruntime:
    "Input shape:{2,64,128}, requested shape:{1,64,4,32}"), and the final table's timing at batch 64 crashed
    a finished run; a shape-agnostic reshape silently mixed the batch items."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 128, 2, stride=2)
    layer = ColumnConv2d.from_conv(conv, torch.randperm(32)[:20], mode="positions")
    assert layer.path == "positions"
    model = _Tokens(layer).eval()
    out = export_onnx(model, torch.randn(1, 8, 16, 16), tmp_path / "t.onnx")  # checked at other batch sizes
    session = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    batch = torch.randn(3, 8, 16, 16)
    with torch.no_grad():
        expected = model(batch).numpy()
    got = session.run(None, {"input": batch.numpy()})[0]
    assert got.shape == expected.shape == (3, 64, 4)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_a_model_the_torchscript_exporter_refuses_goes_through_torch_export(tmp_path, capfd):
    """Adaptive average pooling from 7x7 to 3x3 (not a divisor) is refused by the TorchScript exporter, which
    prints its whole graph ("Torch IR graph at exception", on stdout in torch 2.14); the torch.export-based
    exporter writes it (opset >= 18), stdout and stderr stay quiet (a fresh user saw ~60 lines per export), and
    onnxruntime agrees with PyTorch at other batch sizes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 2))
    out = export_onnx(model.eval(), torch.randn(1, 1, 7, 7), tmp_path / "a.onnx")
    assert out.max_abs_diff <= out.tolerance and out.opset >= 18
    printed = capfd.readouterr()
    assert "graph" not in printed.err and "graph" not in printed.out
    session = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    batch = torch.randn(4, 1, 7, 7)
    with torch.no_grad():
        assert np.abs(session.run(None, {"input": batch.numpy()})[0] - model(batch).numpy()).max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_a_token_id_model_exports_and_runs_on_other_ids(tmp_path, dtype):
    """The export check drew its second batch with torch.randn in the input's dtype, which fails for integers (a
    fresh user's token transformers): the ids are drawn from the example's range."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(40, 3)).eval()
    ids = torch.tensor([[0, 3, 9, 2, 5]], dtype=dtype)
    for out in (export_onnx(model, ids, tmp_path / "m.onnx"), export_program(model, ids, tmp_path / "m.pt2")):
        assert out.max_abs_diff <= out.tolerance and out.checked_batch_sizes == [1, 2]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        expected = model(other).numpy()
    assert np.abs(session.run(None, {"input": other.numpy()})[0] - expected).max() <= 1e-5


class MaskedMean(nn.Module):
    """Token ids and a padding mask, two inputs: the mean of the unmasked tokens' embeddings, classified."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc = nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, ids, mask):
        weights = mask.to(self.fc.weight.dtype).unsqueeze(-1)
        return self.fc((self.embed(ids) * weights).sum(1) / weights.sum(1).clamp(min=1))


@pytest.mark.parametrize("batch", [1, 3])
def test_a_model_of_two_inputs_exports_with_both_batch_axes_dynamic(tmp_path, batch):
    torch.manual_seed(0)
    model = MaskedMean().eval()
    ids, mask = torch.randint(0, 10, (batch, 5)), torch.rand(batch, 5) < 0.7
    for out in (export_onnx(model, (ids, mask), tmp_path / "m.onnx"),
                export_program(model, [ids, mask], tmp_path / "m.pt2")):
        assert out.max_abs_diff <= out.tolerance and out.checked_batch_sizes == [batch, batch + 1]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input", "input_1"]
    other_ids, other_mask = torch.randint(0, 10, (4, 5)), torch.rand(4, 5) < 0.5
    with torch.no_grad():
        expected = model(other_ids, other_mask).numpy()
    got = session.run(None, {"input": other_ids.numpy(), "input_1": other_mask.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-5
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(program(other_ids, other_mask), model(other_ids, other_mask), atol=1e-6)


NOT_INPUTS = r"must be a tensor \[B, ...\] or a tuple of them"


@pytest.mark.parametrize("inputs, problem", [
    (lambda x: (x, x[:1]), "different batch sizes"), (lambda x: (x, None), NOT_INPUTS),
    (lambda x: {"x": x}, NOT_INPUTS), (lambda x: (), NOT_INPUTS), (lambda x: x[:0], NOT_INPUTS)])
def test_export_refuses_inputs_it_cannot_take_and_writes_nothing(tmp_path, inputs, problem):
    model, x = _mixed()
    with pytest.raises(UserError, match=problem):
        export_onnx(model, inputs(x), tmp_path / "m.onnx")
    with pytest.raises(UserError, match=problem):
        export_program(model, inputs(x), tmp_path / "m.pt2")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("batch", [1, 2])
def test_compact_model_torch_export_program_agrees(tmp_path, batch):
    model, x = _mixed()
    result = compact(model, column_masks(model, 0.6, masks=filter_masks(model, x, 0.3), skip={"head.3"}), x)
    out = export_program(result.model, x[:batch], tmp_path / "m.pt2")
    assert out.opset is None and out.max_abs_diff <= out.tolerance and out.checked_batch_sizes == [batch, batch + 1]
    assert out.num_bytes == out.path.stat().st_size
    # independent check: load the file ourselves and run it at another batch size (the batch axis is dynamic)
    program = torch.export.load(out.path).module()
    images = torch.randn(5, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (program(images) - result.model(images)).abs().max() <= 1e-5


def test_torch_export_failure_is_a_user_error_and_writes_nothing(tmp_path):
    class Branchy(nn.Module):  # data-dependent Python control flow cannot be exported
        def forward(self, x):
            return x * 2 if float(x.sum()) > 0 else x

    with pytest.raises(UserError, match="torch.export failed"):
        export_program(Branchy(), torch.ones(2, 3), tmp_path / "b.pt2")
    assert not (tmp_path / "b.pt2").exists()


def compact_lenet_checkpoint(tmp_path):
    """A LeNet-5 with half its filters and columns pruned, compacted and saved: ``(base model, compact
    model, checkpoint path, base checkpoint fields)``."""
    model = create_model("lenet5", num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    result = compact(model, column_masks(model, 0.5, masks=filter_masks(model, x, 0.5), skip=()), x)
    base = {"model": {"name": "lenet5", "kwargs": {"num_classes": 10}},
            "dataset": {"name": "fashion-mnist", "input_size": [1, 28, 28], "num_classes": 10}}
    return model, result.model, save_compact(tmp_path / "c.pt", result.model, base_checkpoint=base), base


def test_cli_export_compact_checkpoint(tmp_path, capsys):
    model, compact_model, ckpt, base = compact_lenet_checkpoint(tmp_path)
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "c.onnx"), "--opset", "13"]) == 0
    assert "onnxruntime max |diff|" in capsys.readouterr().out and (tmp_path / "c.onnx").stat().st_size > 0
    assert main(["export", str(ckpt), "--torch-export", str(tmp_path / "c.pt2")]) == 0
    printed = capsys.readouterr().out
    assert f"\nwrote {tmp_path / 'c.pt2'} (" in printed and "loaded program max |diff|" in printed
    assert "faster in torch, 1 thread(s)" in printed
    images = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (torch.export.load(tmp_path / "c.pt2").module()(images) - compact_model(images)).abs().max() <= 1e-5
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "q.onnx"), "--quiet"]) == 0
    assert capsys.readouterr().out == "" and (tmp_path / "q.onnx").stat().st_size > 0
    assert main(["export", str(ckpt)]) == 2
    assert "nothing to write; pass --onnx OUT.onnx and / or --torch-export OUT.pt2" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--torch-export", str(tmp_path / "c.pt2")]) == 2
    assert "c.pt2 already exists; choose another --torch-export file name" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pt"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    plain = save_checkpoint(tmp_path / "b.pt", model=model, model_name="lenet5", model_kwargs={"num_classes": 10},
                            dataset=base["dataset"], config={}, metrics={})
    assert main(["export", str(plain), "--onnx", str(tmp_path / "b.onnx"), "--opset", "9"]) == 2
    assert not (tmp_path / "b.onnx").exists()


class TokenClassifier(nn.Module):
    """Token ids ``[B, 5]`` -> logits ``[B, 3]`` (an Embedding of 10 ids, flattened, a Linear)."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc = nn.Embedding(10, 8), nn.Linear(40, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(ids).flatten(1))


def test_cli_inspect_and_export_a_token_model_with_the_recorded_input_dtype(tmp_path, capsys):
    """A fresh user's token transformer's model.pt could not be inspected or exported: the CLI fed float inputs
    and blamed the input size. The checkpoint records the example's dtype and range (written by compress), and
    the CLI draws ids in that range."""
    from autocompress.metrics import input_kind

    torch.manual_seed(0)
    model = TokenClassifier().eval()
    ids = torch.tensor([[0, 3, 9, 2, 5]])
    assert input_kind(ids) == {"input_dtype": "int64", "input_range": [0, 9]} and input_kind(ids.float()) == {}
    path = save_compact(tmp_path / "tok.pt", model, model_class=TokenClassifier, model_kwargs={},
                        dataset={"input_size": [5], **input_kind(ids)})
    assert main(["inspect", str(path), "--no-latency"]) == 0
    assert "MACs" in capsys.readouterr().out
    assert main(["export", str(path), "--onnx", str(tmp_path / "tok.onnx")]) == 0
    assert "onnxruntime max |diff|" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "tok.onnx"), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert np.abs(session.run(None, {"input": other.numpy()})[0] - model(other).numpy()).max() <= 1e-5


def test_nan_model_is_refused_and_nothing_written(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    path = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="NaN"):
        export_onnx(model, torch.zeros(1, 1, 2, 2), path)
    assert not path.exists()


def _lenet_checkpoint(tmp_path):
    model = create_model("lenet5", num_classes=10)
    return save_checkpoint(tmp_path / "lenet.pt", model=model, model_name="lenet5", model_kwargs={"num_classes": 10},
                           dataset={"name": "fashion-mnist", "input_size": [1, 28, 28], "num_classes": 10},
                           config={}, metrics={})


def test_cli_export_wrong_input_size_suggests_the_recorded_one(tmp_path, capsys):
    ckpt = _lenet_checkpoint(tmp_path)
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "m.onnx"), "--input-size", "3,32,32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autocompress: error: input size 3,32,32 does not fit model lenet5 (")
    assert err.endswith("); pass the checkpoint's recorded input size, --input-size 1,28,28\n")
    assert "opset" not in err and not (tmp_path / "m.onnx").exists()


def test_cli_export_to_a_folder_asks_for_a_file(tmp_path, capsys):
    ckpt = _lenet_checkpoint(tmp_path)
    folder = tmp_path / "exports"
    folder.mkdir()
    assert main(["export", str(ckpt), "--onnx", str(folder)]) == 2
    assert capsys.readouterr().err == (f"autocompress: error: --onnx {folder} is a folder; pass a file path ending "
                                       f"in .onnx, e.g. --onnx {folder / 'lenet.onnx'}\n")
    assert main(["export", str(ckpt), "--onnx", str(folder), "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err and list(folder.iterdir()) == []
    missing = tmp_path / "no" / "such" / "m.onnx"
    assert main(["export", str(ckpt), "--onnx", str(missing)]) == 2
    assert capsys.readouterr().err == (f"autocompress: error: --onnx {missing}: folder {missing.parent} does not "
                                       "exist; create it first, or choose another path\n")
    assert not (tmp_path / "no").exists()


class TwoHeads(nn.Module):
    """``[B, 1, 8, 8]`` -> ``(logits [B, 3], (pooled image [B, 1, 4, 4],))``: class scores and an auxiliary head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
        self.classes = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
        self.aux = nn.Sequential(nn.Conv2d(6, 1, 1), nn.AvgPool2d(2))

    def forward(self, x):
        features = self.body(x)
        return self.classes(features), (self.aux(features),)


def test_a_model_of_several_outputs_exports_every_output_with_a_dynamic_batch(tmp_path):
    """A fresh user's two-head model (logits and an auxiliary map) crashed the export's check ("isfinite():
    argument 'input' must be Tensor, not tuple"); every output is now exported, named, batch-dynamic and checked."""
    torch.manual_seed(0)
    model, x = TwoHeads().eval(), torch.randn(2, 1, 8, 8)
    result = export_onnx(model, x, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["output", "output_1"]
    batch = torch.randn(5, 1, 8, 8)
    logits, aux = session.run(None, {"input": batch.numpy()})
    with torch.no_grad():
        want_logits, (want_aux,) = model(batch)
    assert np.allclose(logits, want_logits.numpy(), atol=1e-5) and np.allclose(aux, want_aux.numpy(), atol=1e-5)
    assert aux.shape == (5, 1, 4, 4) and result.max_abs_diff <= result.tolerance
    program = export_program(model, x, tmp_path / "m.pt2")
    assert program.max_abs_diff <= program.tolerance


def test_a_model_returning_a_dict_is_refused_by_export_and_writes_nothing(tmp_path):
    class Named(TwoHeads):
        def forward(self, x):
            logits, (aux,) = super().forward(x)
            return {"logits": logits, "aux": aux}

    class WithNone(TwoHeads):
        def forward(self, x):
            logits, _ = super().forward(x)
            return logits, (None,)

    for model, what, fix in ((Named(), r"a dict, which", r"\['logits'\] for a dict"),
                             (WithNone(), r"a tuple holding NoneType values, which", r"model\(x\)\[0\], the tuple's")):
        for export in (export_onnx, export_program):  # the outputs' reason, not "torch.onnx.export failed"
            with pytest.raises(UserError, match=rf"^the model returns {what}.*wrapper module.*{fix}"):
                export(model, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class Tagger(nn.Module):
    """Token ids ``[B, T]`` and a padding mask ``[B, T]`` -> per-token class scores ``[B, T, 3]`` and the masked
    mean's scores ``[B, 3]``: a learned position table of 8 rows, so a sequence may be shorter than 8."""

    def __init__(self):
        super().__init__()
        self.embed, self.position, self.fc = nn.Embedding(10, 8), nn.Parameter(torch.randn(8, 8)), nn.Linear(8, 3)

    def forward(self, ids, mask):
        tokens = self.fc(self.embed(ids) + self.position[:ids.shape[1]])
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        return tokens, (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


SEQUENCE = {"input": {1: "sequence"}, "input_1": {1: "sequence"}, "output": {1: "sequence"}}


def test_a_sequence_axis_exports_dynamic_when_named(tmp_path):
    """Fresh user 55: the ONNX sequence axis was fixed at the example's length; only the batch axis was dynamic."""
    torch.manual_seed(0)
    model = Tagger().eval()
    ids, mask = torch.randint(0, 10, (2, 6)), torch.rand(2, 6) < 0.7
    onnx_result = export_onnx(model, (ids, mask), tmp_path / "m.onnx", dynamic_axes=SEQUENCE)
    program_result = export_program(model, (ids, mask), tmp_path / "m.pt2", dynamic_axes=SEQUENCE)
    assert onnx_result.max_abs_diff <= onnx_result.tolerance and program_result.checked_batch_sizes == [2, 3]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    for length in (3, 8):
        other_ids, other_mask = torch.randint(0, 10, (4, length)), torch.rand(4, length) < 0.5
        other_mask[:, 0] = True
        with torch.no_grad():
            expected = model(other_ids, other_mask)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(program(other_ids, other_mask), expected))
        got = session.run(None, {"input": other_ids.numpy(), "input_1": other_mask.numpy()})
        assert got[0].shape == (4, length, 3)
        assert max(np.abs(a - b.numpy()).max() for a, b in zip(got, expected)) <= 1e-5
    fixed = export_onnx(model, (ids, mask), tmp_path / "fixed.onnx")  # without it the length stays 6
    with pytest.raises(Exception):
        ort.InferenceSession(str(fixed.path), providers=["CPUExecutionProvider"]).run(
            None, {"input": ids[:, :3].numpy(), "input_1": mask[:, :3].numpy()})


@pytest.mark.parametrize("axes, problem", [
    ({"tokens": {1: "sequence"}}, r"names 'tokens', not an input or output of the graph; use the graph's names: "
                                  r"inputs input, input_1; outputs output, output_1"),
    ({"input": {2: "sequence"}}, r"has axis 2, not an axis past the batch of input \(it has 2\)"),
    ({"input": {0: "sequence"}}, r"has axis 0, not an axis past the batch"),
    ({"input": {1: ""}}, r"dynamic_axes\['input'\]\[1\] is '', not an axis name"),
    ({"input": [1]}, r"dynamic_axes\['input'\] is a list, not a dict of axis -> name"),
    ({"input": {1: "sequence"}, "input_1": {1: "sequence"}}, r"axis 'sequence' has sizes 6 and 5")])
def test_bad_dynamic_axes_are_refused_and_nothing_is_written(tmp_path, axes, problem):
    class TwoSequences(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc = nn.Embedding(10, 8), nn.Linear(8, 3)

        def forward(self, ids, mask):
            scores = self.fc(self.embed(ids).mean(1) + mask.float().mean(1, keepdim=True))
            return scores, scores.softmax(1)

    ids, mask = torch.randint(0, 10, (2, 6)), torch.rand(2, 5) < 0.7
    model = TwoSequences().eval()
    for export, name in ((export_onnx, "m.onnx"), (export_program, "m.pt2")):
        with pytest.raises(UserError, match=problem):
            export(model, (ids, mask), tmp_path / name, dynamic_axes=axes)
        assert not (tmp_path / name).exists()
    with pytest.raises(UserError, match=r"dynamic axis 'sequence' \(input axis 1\) has size 1"):
        export_onnx(model, (ids[:, :1], mask[:, :1]), tmp_path / "m.onnx", dynamic_axes={"input": {1: "sequence"}})


class TinyUNet(nn.Module):
    """``[B, 3, H, W]`` -> ``[B, 2, H, W]`` for even ``H`` and ``W``: a conv, 2x2 max pooling, a conv, nearest
    upsampling, concatenation with the first conv's output (the sizes must match: odd sizes fail), a 1x1 conv.
    With ``fixed``, a learned ``[1, 4, 6, 6]`` bias is added after the first conv too (runs at 6x6 only)."""

    def __init__(self, fixed: bool = False):
        super().__init__()
        self.down, self.mid, self.out = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 2, 1)
        self.bias = nn.Parameter(torch.randn(1, 4, 6, 6)) if fixed else None

    def forward(self, x):
        skip = torch.relu(self.down(x)) + (0 if self.bias is None else self.bias)
        low = nn.functional.interpolate(torch.relu(self.mid(nn.functional.max_pool2d(skip, 2))), scale_factor=2.0)
        return self.out(torch.cat([skip, low], 1))


IMAGE = {"input": {2: "height", 3: "width"}, "output": {2: "height", 3: "width"}}


def test_image_height_and_width_export_dynamic_for_a_net_that_runs_at_even_sizes_only(tmp_path):
    """Fresh user 58: the check ran a U-Net one pixel smaller (odd), where its own forward fails; it now runs it
    twice as large there. A model that runs at neither is refused naming the sizes, and nothing is written."""
    torch.manual_seed(0)
    model, x = TinyUNet().eval(), torch.randn(1, 3, 6, 6)
    onnx_result = export_onnx(model, x, tmp_path / "m.onnx", dynamic_axes=IMAGE)
    program_result = export_program(model, x, tmp_path / "m.pt2", dynamic_axes={"input": IMAGE["input"]})
    assert onnx_result.checked_batch_sizes == program_result.checked_batch_sizes == [1, 2]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    other = torch.randn(3, 3, 10, 16)
    with torch.no_grad():
        expected = model(other).numpy()
    assert np.abs(session.run(None, {"input": other.numpy()})[0] - expected).max() <= 1e-5
    fixed = TinyUNet(fixed=True).eval()
    for export, name in ((export_onnx, "f.onnx"), (export_program, "f.pt2")):
        with pytest.raises(UserError, match=r"runs the model at other sizes, and it fails at \[\[3, 5, 5\]\] or "
                                            r"\[\[3, 12, 12\]\] \(RuntimeError: "):
            export(fixed, x, tmp_path / name, dynamic_axes={"input": IMAGE["input"]})
        assert not (tmp_path / name).exists()


class Pooled(nn.Module):
    """Images ``[B, 3, H, W]`` of any size -> ``[B, 4]``: a conv, global average pooling, a Linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_cli_export_keeps_the_axes_it_is_told_dynamic(tmp_path, capsys):
    torch.manual_seed(0)
    model = Pooled().eval()
    path = save_compact(tmp_path / "p.pt", model, model_class=Pooled, model_kwargs={},
                        dataset={"input_size": [3, 16, 16]})
    assert main(["export", str(path), "--onnx", str(tmp_path / "p.onnx"), "--dynamic-axes", "2,3"]) == 0
    session = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 24, 20)
    with torch.no_grad():
        assert np.abs(session.run(None, {"input": images.numpy()})[0] - model(images).numpy()).max() <= 1e-5
    capsys.readouterr()
    assert main(["export", str(path), "--onnx", str(tmp_path / "q.onnx"), "--dynamic-axes", "h,w"]) == 2
    assert "--dynamic-axes h,w is not a comma list of axes; pass e.g. --dynamic-axes 2,3" in capsys.readouterr().err
    assert main(["export", str(path), "--onnx", str(tmp_path / "q.onnx"), "--dynamic-axes", "4"]) == 2
    assert "has axis 4, not an axis past the batch of input (it has 4)" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_output_tensors_reads_every_output_form_that_flat_outputs_refuses():
    """What tracing, the compaction check and the saved-model checks compare: every tensor of an output, in order,
    whatever holds them (an exported graph returns tensors only: :func:`flat_outputs` refuses the rest)."""
    import dataclasses
    from collections import OrderedDict

    from autocompress.analysis import output_tensors

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        loss: torch.Tensor | None = None
        extra: tuple = ()

    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    normal = torch.distributions.Normal(b, c[:2])  # a VAE encoder's posterior (fresh user 81): its parameters
    for output, want in ((a, [a]), ((a, [b, None]), [a, b]), (OrderedDict(logits=a, hidden=(b, c)), [a, b, c]),
                         (Out(a), [a]), (Out(a, b, (c, "name", 3)), [a, b, c]), ({"x": None}, []), (None, []),
                         ((a, normal), [a, normal.loc, normal.scale]),
                         (torch.distributions.Independent(normal, 1), [normal.loc, normal.scale])):
        got = output_tensors(output)
        assert len(got) == len(want) and all(x is y for x, y in zip(got, want))
    with pytest.raises(UserError, match=r"returns a dict.*\(e\.g\. model\(x\)\['logits'\] for a dict\)$"):
        flat_outputs({"logits": a})
    with pytest.raises(UserError, match=r"returns a Out.*\(e\.g\. model\(x\)\.logits for a dataclass"):
        flat_outputs(Out(a))  # fresh user 84: the fix named dict indexing, which a dataclass does not take


def test_a_dict_example_is_refused_naming_the_wrapper_that_takes_tensors(tmp_path):
    """Fresh user 61: a model whose forward takes a dict was refused with the fix "pass torch.randn(1, 3, 32, 32)",
    which it cannot take; the fix now names a wrapper."""
    model, x = _mixed()
    for example in ({"image": x}, ({"image": x},)):
        with pytest.raises(UserError, match=NOT_INPUTS) as info:
            export_onnx(model, example, tmp_path / "m.onnx")
        assert "needs a wrapper taking tensors, e.g. forward(self, image): return self.model({'image': image})" \
            in str(info.value)
