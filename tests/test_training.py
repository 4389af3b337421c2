"""Training and evaluation: optimiser groups, schedules, hooks, real Fashion-MNIST learning, exact resume."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from autocompress.analysis import train_mode, trained_norms
from autocompress.checkpoint import load_checkpoint
from autocompress.data import TensorSplit
from autocompress.errors import UserError
from autocompress.models import create_model
from autocompress.training import (TrainConfig, above_bars, build_optimizer, build_scheduler, check_model_input,
                                   evaluate, fit, seeded, train_epoch)


def _tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_weight_decay_skips_batchnorm_and_biases():
    model = _tiny()
    optimizer = build_optimizer(model, TrainConfig(weight_decay=1e-3))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[5].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                   id(model[5].bias)}


def test_cosine_and_onecycle_schedules_follow_their_formulas():
    model = _tiny()
    config = TrainConfig(epochs=2, lr=0.2, schedule="cosine")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=5)  # 10 steps in all
    lrs = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    expected = [0.2 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(1, 11)]
    assert lrs == pytest.approx(expected, abs=1e-9)
    config = TrainConfig(epochs=1, lr=0.2, schedule="onecycle", pct_start=0.25)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=12)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(11):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(0.2) and lrs.index(max(lrs)) == 2  # torch's peak: step 0.25 * 12 - 1
    assert lrs[0] == pytest.approx(0.2 / 25)  # OneCycleLR starts at max_lr / div_factor
    assert build_scheduler(optimizer, TrainConfig(schedule="constant"), 9) is None


def test_evaluate_matches_hand_computed_top1_top5_and_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 12, generator=g)
    labels = torch.randint(0, 12, (50,), generator=g)
    batches = [(logits[:30], labels[:30]), (logits[30:], labels[30:])]
    result = evaluate(nn.Identity(), batches)
    order = logits.argsort(dim=1, descending=True)
    top1 = sum(int(order[i, 0] == labels[i]) for i in range(50)) / 50
    top5 = sum(int(labels[i] in order[i, :5].tolist()) for i in range(50)) / 50
    loss = sum(float(torch.logsumexp(logits[i], 0) - logits[i, labels[i]]) for i in range(50)) / 50
    assert result["top1"] == top1 and result["top5"] == top5 and result["images"] == 50
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert "top5" not in evaluate(nn.Identity(), [(logits[:, :10], labels.clamp(max=9))])


def test_evaluate_leaves_mode_and_batchnorm_buffers_alone():
    model = _tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, [(torch.randn(8, 1, 6, 6), torch.zeros(8, dtype=torch.long))])
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hooks_regularizer_and_after_step():
    model = _tiny()
    batches = [(torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1, 2, 0]))
               for i in range(5)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = []

    def hold_zero():  # a pruning mask on the first filter, as masked retraining does
        calls.append(1)
        with torch.no_grad():
            model[0].weight[0].zero_()

    reg_values = []

    def regularizer():
        value = 0.01 * model[5].weight.pow(2).sum()
        reg_values.append(float(value.detach()))
        return value

    result = train_epoch(model, batches, optimizer, regularizer=regularizer, after_step=hold_zero, progress=False)
    assert len(calls) == 5 and torch.count_nonzero(model[0].weight[0]) == 0
    assert result["regularizer"] == pytest.approx(sum(reg_values) / 5)
    assert result["images"] == 20 and 0 <= result["top1"] <= 1


def test_short_training_on_real_fashion_mnist_beats_chance(fmnist_small):
    with seeded(0):
        model = create_model("lenet5", num_classes=10)
    config = TrainConfig(epochs=1, batch_size=32, lr=0.1, schedule="onecycle")
    metrics = fit(model, fmnist_small, config, progress=False)
    # 10 classes: chance is 10%; one epoch over 6000 real images reaches about 75%
    assert metrics["test_top1"] >= 0.70
    assert metrics["val_top1"] >= 0.70
    assert metrics["epochs"] == 1 and len(metrics["history"]) == 1


def test_resume_equals_uninterrupted(fmnist_small, tmp_path):
    config = TrainConfig(epochs=2, batch_size=100, lr=0.05, schedule="onecycle", seed=5)
    kwargs = {"num_classes": 10, "width": 0.25, "dropout": 0.3}  # dropout: the global RNG must resume too
    small = dataclasses.replace(fmnist_small, train=TensorSplit(fmnist_small.train.images[:1000],
                                                                fmnist_small.train.labels[:1000]))

    def run(path, interrupt):
        with seeded(1):
            model = create_model("fmnist_cnn", **kwargs)

        def stop(epoch, record):
            if interrupt and epoch == 1:
                raise KeyboardInterrupt

        try:
            metrics = fit(model, small, config, checkpoint_path=path, model_name="fmnist_cnn", model_kwargs=kwargs,
                          on_epoch_end=stop, progress=False)
        except KeyboardInterrupt:
            assert load_checkpoint(path)["training_state"]["epoch"] == 1
            with seeded(99):  # a resumed process starts from other weights; they are replaced
                model = create_model("fmnist_cnn", **kwargs)
            metrics = fit(model, small, config, checkpoint_path=path, model_name="fmnist_cnn",
                          model_kwargs=kwargs, resume=True, progress=False)
        return model, metrics

    straight, straight_metrics = run(tmp_path / "straight.pt", interrupt=False)
    resumed, resumed_metrics = run(tmp_path / "resumed.pt", interrupt=True)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed_metrics["test_top1"] == straight_metrics["test_top1"]
    final = load_checkpoint(tmp_path / "resumed.pt")
    assert final["training_state"] is None and final["metrics"]["epochs"] == 2
    assert final["dataset"]["name"] == "fashion-mnist" and final["dataset"]["val_size"] == 1000
    with pytest.raises(UserError, match="finished"):
        fit(resumed, small, config, checkpoint_path=tmp_path / "resumed.pt", model_name="fmnist_cnn",
            model_kwargs=kwargs, resume=True, progress=False)


def test_config_and_input_errors():
    with pytest.raises(UserError, match="Nesterov"):
        TrainConfig(momentum=0.0, nesterov=True).validate()
    with pytest.raises(UserError, match="unknown schedule"):
        TrainConfig(schedule="step").validate()
    with pytest.raises(UserError, match="--epochs 0"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(UserError, match="cannot take cifar10 inputs of size 3x32x32"):
        check_model_input(create_model("lenet5"), (3, 32, 32), 10, "lenet5", "cifar10")
    with pytest.raises(UserError, match=r"expected \(2, 100\)"):
        check_model_input(create_model("lenet5"), (1, 28, 28), 100, "lenet5", "fashion-mnist")


class _TwoOutputs(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10], x.mean()


def test_a_model_of_several_outputs_is_sent_to_the_library_not_to_num_classes():
    """A fresh user's two-head model was told to rebuild it with num_classes by ``autocompress evaluate``."""
    with pytest.raises(UserError, match=r"outputs a tuple, not one tensor of class scores \(2, 10\).*use the library "
                                        r"\(autocompress.compress with forward_fn") as info:
        check_model_input(_TwoOutputs(), (1, 28, 28), 10, "mine", "fashion-mnist")
    assert "num_classes" not in str(info.value)


def test_nan_loss_is_a_user_error():
    model = _tiny()
    batches = [(torch.full((2, 1, 6, 6), float("nan")), torch.tensor([0, 1]))]
    with pytest.raises(UserError, match="lower the learning rate"):
        train_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), progress=False)


def test_channels_last_scope_keeps_values_and_objects_and_restores_the_layout():
    """Inside ``channels_last`` the conv weights are channels-last (same values, same Parameter objects, so an
    optimiser built before still steps them); afterwards contiguous again, also after an error, and a block
    within it keeps them channels-last; a training epoch under it steps the same weights as one without it (up
    to float rounding)."""
    from autocompress.task import channels_last

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    weight, before = model[0].weight, model[0].weight.detach().clone()
    with channels_last(model, None, device=torch.device("cpu")):
        assert model[0].weight is weight and weight.is_contiguous(memory_format=torch.channels_last)
        assert not weight.is_contiguous() and torch.equal(weight, before)
    assert weight.is_contiguous() and torch.equal(weight, before)
    with channels_last(model, device=torch.device("cpu")):  # a block within a block (a validation pass within
        with channels_last(model, device=torch.device("cpu")):  # a training epoch) leaves the outer layout
            pass
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert weight.is_contiguous()
    with pytest.raises(RuntimeError, match="boom"):
        with channels_last(model, device=torch.device("cpu")):
            raise RuntimeError("boom")
    assert weight.is_contiguous()
    with channels_last(model, device=torch.device("meta")):  # not the CPU: nothing changes
        assert weight.is_contiguous()
    from autocompress.training import train_epoch

    twin = copy.deepcopy(model)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(3)]
    for net in (model, twin):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        if net is model:
            train_epoch(net, data, optimizer, progress=False)
        else:  # the same steps, by hand, contiguous throughout
            net.train()
            for images, labels in data:
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(images), labels).backward()
                optimizer.step()
    assert model[0].weight.is_contiguous()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


class _Strided1x1(nn.Module):
    """A stem of ``width`` channels, then a 1x1 convolution of stride 2 (a ResNet shortcut's form)."""

    def __init__(self, width: int, groups: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.short = nn.Conv2d(width, 16, 1, stride=2, groups=groups)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.short(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("width, groups, channels_last_trained", [
    (4, 1, False), (7, 1, False), (15, 1, False), (16, 1, True), (24, 1, True), (32, 4, False), (32, 2, True)])
def test_a_strided_1x1_convolution_of_few_input_channels_trains_in_the_default_layout(width, groups,
                                                                                      channels_last_trained):
    """oneDNN computes the weight gradient of a channels-last 1x1 convolution with a stride above 1 and fewer input
    channels per group than its channel block wrongly (oneDNN issue 6035: a crash at 1 thread, a hang at 2, on
    this project's AVX2 machine with torch 2.14.1). A training epoch runs such a model in the default layout
    (the convolution's input and the 3x3 weights contiguous) and others channels-last; both step the weights
    as plain contiguous steps do."""
    from autocompress.task import channels_last_trains

    torch.manual_seed(0)
    model = _Strided1x1(width, groups)
    assert channels_last_trains(model) is channels_last_trained
    seen = []
    model.short.register_forward_hook(lambda module, args, out: seen.append(
        (args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous(),
         model.stem.weight.is_contiguous(memory_format=torch.channels_last) and not model.stem.weight.is_contiguous())))
    twin = copy.deepcopy(model)
    data = [(torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last), torch.randint(0, 3, (4,)))
            for _ in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch(model, data, optimizer, progress=False)
    assert seen == [(channels_last_trained, channels_last_trained)] * 2
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin.train()
    for images, labels in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(twin(images.contiguous()), labels).backward()
        optimizer.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


@pytest.mark.parametrize("wrapped", [True, False])
def test_a_line_logged_during_an_epoch_stands_above_the_progress_bar(capsys, wrapped):
    """above_bars clears the bar before the line (the line starts after a carriage return, not after the bar's
    text) and redraws the bar after it; a plain print lands inside the bar."""
    import sys

    from tqdm import tqdm

    log = above_bars(print) if wrapped else print
    with tqdm(total=3, file=sys.stdout, desc="retrain epoch 1/2", mininterval=0) as bar:
        bar.update(1)
        log("distillation stop test at step 1/3 of epoch 1")
        bar.update(1)
    out = capsys.readouterr().out
    before, after = out.split("distillation stop test at step 1/3 of epoch 1\n")
    assert "retrain epoch 1/2" in before and "retrain epoch 1/2" in after
    assert before.endswith("\r") is wrapped  # cleared: the bar's text erased, the cursor back at column 0
    if wrapped:
        assert before.split("\r")[-2].strip() == ""


def test_without_a_log_nothing_clears_the_progress_bars(capsys):
    """A caller who gives no log gets none: the pipeline's silent log is not wrapped by above_bars, so a line
    logged during an epoch does not clear and redraw the bar for nothing."""
    import sys

    from tqdm import tqdm

    from autocompress.config import CompressConfig
    from autocompress.rounds import Pipeline
    from autocompress.task import Task

    pipeline = Pipeline(task=Task(None), config=CompressConfig.from_dict({}, validate=False),
                        example_inputs=(torch.zeros(1, 1),), base_model=nn.Linear(1, 1), progress=True, log=None)
    with tqdm(total=2, file=sys.stdout, desc="retrain epoch 1/2", mininterval=0) as bar:
        bar.update(1)
        before = capsys.readouterr().out
        pipeline.log("a line nobody reads")
        assert capsys.readouterr().out == ""  # nothing written: no clear, no redraw
    assert before


@pytest.mark.parametrize("targets", ["indices", "one-hot", "per-pixel"])
def test_the_training_top1_reads_class_indices_and_probabilities_and_skips_dense_outputs(targets):
    """Class probabilities count against their most probable class (they crashed the epoch); per-pixel class
    maps of a dense output report no top-1 (they counted pixels per image)."""
    torch.manual_seed(0)
    dense = targets == "per-pixel"
    model = nn.Conv2d(1, 3, 1) if dense else nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, labels = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8, 4, 4) if dense else (8,))
    y = F.one_hot(labels, 3).float() if targets == "one-hot" else labels
    with torch.no_grad():
        expected = (model(x).argmax(1) == labels).float().mean().item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: the expected top-1 holds
    result = train_epoch(model, [(x, y)], optimizer, progress=False)
    assert result["top1"] is None if dense else result["top1"] == pytest.approx(expected)


def test_frozen_batchnorm_keeps_its_statistics_through_training():
    """Fresh user 58: a BatchNorm frozen by the caller (requires_grad=False, as for a pretrained backbone) had its
    running statistics changed by retraining. It now normalises with them in eval mode; the others train, and a
    BatchNorm without affine parameters (nothing to freeze) trains too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.BatchNorm2d(4, affine=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model[1].requires_grad_(False)
    assert trained_norms(model) == [model[4], model[5]]
    before = copy.deepcopy(model.state_dict())
    loader = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(3)]
    train_epoch(model, loader, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                progress=False)
    after = model.state_dict()
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "1.weight"):
        assert torch.equal(after[key], before[key]), key
    for key in ("4.running_mean", "5.running_var", "4.weight"):
        assert not torch.equal(after[key], before[key]), key
    assert model.training and not model[1].training and model[4].training and model[5].training
    assert train_mode(model.eval()) is model and model[0].training and not model[1].training
