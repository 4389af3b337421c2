"""The scripts in ``examples/`` run at their ``--tiny`` size and deliver what they claim: the target met, a
compact model in eval mode with the base model's output shape, nothing written without ``--out``, and a
compact model that traces and pickles (``_shared.deploy``) into files that reload to the same outputs."""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TARGETS = {"own_cnn": ("params", 4.0), "mobilenet_v2_cifar": ("flops", 2.0), "segmentation": ("params", 3.0)}


@functools.cache
def load(name: str):
    """The example script ``examples/<name>.py`` as a module (it finds ``_shared`` next to itself), loaded once:
    pickling the compact model needs its classes importable by name."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(name)`` -> (module, ExampleRun) of ``main(["--tiny", "--no-deploy"])``, run once per module in an
    empty working folder that must stay empty."""
    cwd, done = tmp_path_factory.mktemp("cwd"), {}

    def get(name: str):
        if name not in done:
            module = load(name)
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(cwd)
                done[name] = module, module.main(["--tiny", "--quiet", "--no-deploy"])
            assert list(cwd.iterdir()) == [], "an example wrote files without --out"
        return done[name]

    return get


def check_result(run_, objective: str, factor: float) -> None:
    """Target met (within 1 %), compact model in eval mode with the base model's output shape (batch 1 and 3)."""
    for result in run_.results.values():
        reached = result.compression_rate if objective == "params" else result.mac_reduction
        assert reached >= factor * 0.99
        key = "params" if objective == "params" else "macs"
        base, compact = result.final["rows"]
        assert reached == pytest.approx(base[key] / compact[key])
        assert not any(m.training for m in result.model.modules())
        for batch in (run_.example, run_.example.expand(3, *run_.example.shape[1:])):
            with torch.no_grad():
                assert result.model(batch).shape == run_.base(batch).shape


def test_own_cnn(run):
    module, outcome = run("own_cnn")
    check_result(outcome, *TARGETS["own_cnn"])
    assert set(outcome.results) == {"automatic", "own loop"}
    assert outcome.base.__class__.__name__ == "MyNet"
    # the own loop really trained the model: its weights differ from the automatic path's
    automatic, own = (r.model.state_dict() for r in outcome.results.values())
    assert any(automatic[k].shape != own[k].shape or not torch.equal(automatic[k], own[k]) for k in automatic)


@pytest.mark.slow
def test_mobilenet_v2_cifar(run):
    module, outcome = run("mobilenet_v2_cifar")
    check_result(outcome, *TARGETS["mobilenet_v2_cifar"])
    assert outcome.base(outcome.example).shape == (1, 10)


def test_segmentation(run):
    module, outcome = run("segmentation")
    check_result(outcome, *TARGETS["segmentation"])
    result = outcome.results["params=3x"]
    assert result.model(outcome.example).shape == (1, module.CLASSES, 32, 32)
    score = result.final["rows"][1]["val_score"]
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    # the final table's score is score_fn's: mean IoU recomputed on the same validation images
    val = DataLoader(module.Shapes(module.SIZES["tiny"]["val"], seed=1), batch_size=64)
    assert score == pytest.approx(module.mean_iou(result.model, val))


def test_mean_iou_of_known_predictions():
    """mean IoU of the segmentation example against hand-computed values: perfect predictions 1; all
    background: IoU of background = background pixels / all pixels, the other classes 0."""
    module = load("segmentation")
    data = module.Shapes(8, seed=3)
    loader = DataLoader(data, batch_size=4)

    class Fixed(torch.nn.Module):
        """Predicts the given masks (one-hot logits), batch after batch in the loader's order."""

        def __init__(self, masks):
            super().__init__()
            self.masks, self.seen, self.dummy = masks, 0, torch.nn.Parameter(torch.zeros(()))

        def forward(self, images):
            answer = self.masks[self.seen:self.seen + len(images)]
            self.seen += len(images)
            return torch.nn.functional.one_hot(answer, module.CLASSES).permute(0, 3, 1, 2).float()

    assert module.mean_iou(Fixed(data.masks), loader) == 1.0
    background = (data.masks == 0).sum().item() / data.masks.numel()
    present = len(data.masks.unique())
    assert module.mean_iou(Fixed(torch.zeros_like(data.masks)), loader) == pytest.approx(background / present)


@pytest.mark.parametrize("name", ["own_cnn", "segmentation"])
def test_deploy(run, name, tmp_path):
    """The compact model traces and pickles; the files reload and compute what it computes."""
    module, outcome = run(name)
    result = next(iter(outcome.results.values()))
    module._shared.deploy(result.model, outcome.example, tmp_path)
    example = outcome.example.expand(2, *outcome.example.shape[1:])
    with torch.no_grad():
        expected = result.model(example)
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.ts"))(example), expected)
        torch.testing.assert_close(torch.load(tmp_path / "model.pt", weights_only=False)(example), expected)
