"""CUDA device paths: training, evaluation and compact layers on a GPU agree with the CPU.

Runs only where ``torch.cuda.is_available()``; the project's CI machines have no GPU and skip this file
(``tests/test_compress.py`` checks the CPU-only machine's ``--device cuda`` error instead).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress.checkpoint import load_checkpoint, model_from_checkpoint
from autocompress.cli import main
from autocompress.compaction import ColumnConv2d
from autocompress.models import create_model
from autocompress.training import TrainConfig, evaluate, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("mode", ["dense", "positions"])
def test_column_conv_on_cuda_equals_masked_conv_on_cpu(mode):
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    kept = torch.randperm(16 * 9, generator=generator)[:40]
    layer = ColumnConv2d.from_conv(conv, kept, mode=mode).cuda()
    assert layer.path == mode and layer.column_index.is_cuda
    masked = copy.deepcopy(conv)
    with torch.no_grad():
        flat = masked.weight.reshape(32, -1)
        drop = torch.ones(16 * 9, dtype=torch.bool)
        drop[kept] = False
        flat[:, drop] = 0.0
    x = torch.randn(4, 16, 12, 12, generator=generator)
    with torch.no_grad():
        expected = masked(x)
        got = layer(x.cuda()).cpu()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_padded_group_norm_on_cuda_equals_the_cpu_and_regroups_there():
    """The padded layout (``source``, ``padded_at``) follows the module to the GPU, and a state dict loaded
    there (deterministic algorithms on: regroup computes on the CPU) lays the groups out again."""
    from autocompress.padded_norm import PaddedGroupNorm

    norm = PaddedGroupNorm(7, 3, 4)
    norm.regroup(torch.tensor([0, 0, 1, 1, 1, 2, 2]))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(2, 7, 5, 5)
    gpu = copy.deepcopy(norm).cuda()
    assert gpu.source.is_cuda and gpu.padded_at.is_cuda
    assert torch.allclose(gpu(x.cuda()).cpu(), norm(x), atol=1e-5)
    torch.use_deterministic_algorithms(True)
    try:
        fresh = PaddedGroupNorm(7, 3, 4).cuda()
        fresh.load_state_dict(norm.state_dict())
    finally:
        torch.use_deterministic_algorithms(False)
    assert fresh.group.is_cuda and torch.allclose(fresh(x.cuda()).cpu(), norm(x), atol=1e-5)


def _one_epoch(splits, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("fmnist_cnn", num_classes=10)
    fit(model, splits, TrainConfig(epochs=1, batch_size=128, lr=0.05, device=device).validate(), progress=False)
    return model


def test_fit_on_cuda_learns_like_cpu(fmnist_small):
    loader = fmnist_small.loader("test", 256, shuffle=False, augment=False)
    on_gpu = _one_epoch(fmnist_small, "cuda")
    assert next(on_gpu.parameters()).is_cuda
    gpu_top1 = evaluate(on_gpu, loader)["top1"]
    # the same seeded epoch on the CPU (0.562 there); kernels differ in round-off only
    cpu_top1 = evaluate(_one_epoch(fmnist_small, "cpu"), loader)["top1"]
    assert gpu_top1 > 0.3 and abs(gpu_top1 - cpu_top1) <= 0.02
    # evaluating the GPU-trained model on the CPU gives the same answers up to an image or two
    assert abs(evaluate(copy.deepcopy(on_gpu).cpu(), loader)["top1"] - gpu_top1) <= 2 / len(fmnist_small.test)


def test_cli_train_and_evaluate_with_device_cuda(tmp_path, capsys):
    out = tmp_path / "base.pt"
    assert main(["train", "--model", "fmnist_cnn", "--dataset", "fashion-mnist", "--epochs", "1",
                 "--max-train", "3000", "--device", "cuda", "--out", str(out), "--no-progress"]) == 0
    model = model_from_checkpoint(load_checkpoint(out))
    assert not next(model.parameters()).is_cuda  # checkpoints load on the CPU
    capsys.readouterr()
    assert main(["evaluate", str(out), "--device", "cuda"]) == 0
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_one_compress_round_on_cuda(fmnist_small, amp):
    """A whole compress round on the GPU (plain DataLoaders over CPU tensors, moved by the pipeline): the
    target is met, the compact model lives on the GPU and scores like a real classifier."""
    import autocompress
    from autocompress.metrics import count_params

    torch.manual_seed(0)
    model = create_model("fmnist_cnn", width=0.5)
    fit(model, fmnist_small, TrainConfig(epochs=1, batch_size=128, lr=0.05, device="cuda"), progress=False)
    train = fmnist_small.loader("train", 128)
    val = fmnist_small.loader("val", 256, shuffle=False, augment=False)
    config = {"rounds": 1, "admm": {"epochs": 1}, "retrain": {"epochs": 1}, "search": {"max_evaluations": 3},
              "latency_runs": 2, "amp": amp}
    result = autocompress.compress(model.cpu(), torch.zeros(1, 1, 28, 28), "params=3x", train_loader=train,
                                   val_loader=val, device="cuda", config=config, progress=False)
    assert next(result.model.parameters()).is_cuda
    assert count_params(model) / count_params(result.model) >= 3.0 * 0.99
    assert result.final["rows"][1]["val_top1"] > 40.0 and result.final["device"].startswith("cuda")


def test_export_of_a_cuda_model_leaves_it_on_cuda(tmp_path):
    """ONNX and torch.export run on a CPU copy: the caller's CUDA model stays where it is."""
    from autocompress.export import export_onnx, export_program

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).cuda().eval()
    example = torch.randn(1, 3, 8, 8)
    export_onnx(model, example, tmp_path / "m.onnx")
    export_program(model, example, tmp_path / "m.pt2")
    assert all(p.is_cuda for p in model.parameters())


def test_quick_evaluation_keeps_its_validation_batches_on_the_cpu_and_scores_as_there():
    """The scored validation batches stay on the CPU (30 ImageNet batches of 256 are 4.6 GB) and move to the GPU
    batch by batch: the score on CUDA equals the one on the CPU."""
    from autocompress.quick_eval import QuickEvaluator
    from autocompress.space import PruningSpace
    from autocompress.task import Task

    torch.manual_seed(0)
    model = create_model("fmnist_cnn", width=0.25).eval()
    data = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(6)]
    space = PruningSpace.build(model, torch.randn(1, 1, 28, 28))
    rates = {"filter": {g.name: 0.5 for g in space.filter_groups}}
    scores = {}
    for device in ("cpu", "cuda"):
        task = Task(data, data, device=torch.device(device))
        evaluator = QuickEvaluator(copy.deepcopy(model).to(device), space, task, bn_recalibration=False, val_batches=3)
        assert all(not x.is_cuda for x, _ in evaluator._val_data)
        scores[device] = evaluator.score(rates).top1
    assert scores["cuda"] == pytest.approx(scores["cpu"], abs=1 / 48 + 1e-9)
