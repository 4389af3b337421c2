"""Knowledge distillation: the loss against a hand computation, the frozen teacher, config checks, and a real
Fashion-MNIST student that learns from the teacher's soft targets alone."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autocompress.compress import CompressConfig
from autocompress.distillation import DistillationConfig, Distiller
from autocompress.errors import UserError
from autocompress.training import TrainConfig, build_optimizer, evaluate, train_epoch


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_loss_matches_hand_computed_kl():
    teacher = _net(0)
    images = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    hard = torch.tensor(0.7)
    distiller = Distiller(teacher, DistillationConfig(temperature=3.0, alpha=0.25))
    with torch.no_grad():
        t_logits = teacher.eval()(images)
    expected_kl = 0.0
    for s_row, t_row in zip(logits.tolist(), t_logits.tolist()):
        p = [math.exp(v / 3.0) for v in t_row]
        q = [math.exp(v / 3.0) for v in s_row]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        expected_kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 5
    expected = 0.75 * 0.7 + 0.25 * 9.0 * expected_kl
    assert float(distiller(t_logits, logits, hard)) == pytest.approx(expected, rel=1e-5)


def test_student_equal_to_teacher_has_only_the_label_term():
    teacher = _net(0).eval()
    images = torch.randn(4, 1, 6, 6)
    distiller = Distiller(teacher, DistillationConfig(alpha=0.9))
    with torch.no_grad():
        loss = distiller(teacher(images), teacher(images), torch.tensor(2.0))
    assert float(loss) == pytest.approx(0.1 * 2.0, abs=1e-6)


def test_teacher_is_a_frozen_private_copy():
    teacher = _net(0).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = Distiller(teacher, DistillationConfig())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # caller's model untouched
    student = _net(1)
    optimizer = build_optimizer(student, TrainConfig(lr=0.1))
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    train_epoch(student, batches, optimizer, distiller=distiller, progress=False)
    for key, value in distiller.teacher.state_dict().items():  # BN running stats and weights never move
        assert torch.equal(value, before[key]), key
    assert not distiller.teacher.training


@pytest.mark.parametrize("settings, fragment", [({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha"),
                                                ({"enabled": "yes"}, "enabled")])
def test_bad_settings_are_user_errors(settings, fragment):
    with pytest.raises(UserError, match=fragment):
        DistillationConfig(**settings)


def test_compress_config_checks_the_distillation_section():
    with pytest.raises(UserError, match=r"unknown setting\(s\) distillation.temp"):
        CompressConfig.from_dict({"target": "params=2x", "distillation": {"temp": 2}})
    with pytest.raises(UserError, match="^distillation.alpha=-0.1 must be in"):
        CompressConfig.from_dict({"target": "params=2x", "distillation": {"enabled": True, "alpha": -0.1}})
    config = CompressConfig.from_dict({"target": "params=2x",
                                       "distillation": {"enabled": True, "temperature": 2.0, "alpha": 0.5}})
    assert config.distillation == DistillationConfig(enabled=True, temperature=2.0, alpha=0.5)


def test_student_learns_fashion_mnist_from_soft_targets_alone(fmnist_small):
    """alpha = 1: no label enters the loss, yet the student approaches the teacher's accuracy."""
    train = fmnist_small.loader("train", 128, generator=torch.Generator().manual_seed(0))
    val = fmnist_small.loader("val", 256, shuffle=False, augment=False)

    def make():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))

    torch.manual_seed(0)
    teacher = make()
    optimizer = build_optimizer(teacher, TrainConfig(lr=0.05))
    for _ in range(3):
        train_epoch(teacher, train, optimizer, progress=False)
    teacher_top1 = evaluate(teacher, val)["top1"]
    torch.manual_seed(1)
    student = make()
    optimizer = build_optimizer(student, TrainConfig(lr=0.05))
    distiller = Distiller(teacher, DistillationConfig(enabled=True, temperature=2.0, alpha=1.0))
    for _ in range(3):
        train_epoch(student, train, optimizer, distiller=distiller, progress=False)
    student_top1 = evaluate(student, val)["top1"]
    assert teacher_top1 > 0.7
    assert student_top1 > teacher_top1 - 0.05
