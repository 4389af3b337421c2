"""Deployable compact models: pickle, jit.trace / jit.script, torch.export, and autocompress.load of a model
that is not in the zoo (recorded import path in a fresh process; the caller's own instance otherwise).

The model is defined here, written as a module into a temporary folder so that it is importable (as a user's
own package would be), and pruned with :func:`autocompress.pruning.prune` (filters + columns, one-shot) on
real Fashion-MNIST, so the compact model holds ColumnConv2d and ColumnLinear layers.
"""
from __future__ import annotations

import ast
import copy
import importlib
import io
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import autocompress
from autocompress.admm import ADMMConfig
from autocompress.checkpoint import load_checkpoint, save_checkpoint
from autocompress.columns import ColumnConv2d, ColumnLinear
from autocompress.data import get_dataset
from autocompress.errors import UserError
from autocompress.pruning import prune
from autocompress.serialization import save_compact
from autocompress.training import TrainConfig, seeded

torch.set_num_threads(1)

MODULE = "deploy_tinynet"
SOURCE = '''
from torch import nn


class TinyNet(nn.Module):
    """Conv-BN-ReLU-pool x2 then a two-layer head, for 1x28x28 inputs."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 49, 24), nn.ReLU(), nn.Linear(24, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class SizedNet(TinyNet):
    """TinyNet whose width must be given."""

    def __init__(self, width: int):
        super().__init__(width)
'''
RATES = {"default": 0.5, "column": {"head.1": 0.6}}
TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def keep_global_rng():
    """Each test's layer initialisations draw from a forked global RNG: later test files see the same state."""
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.fixture(scope="module")
def splits():
    return get_dataset("fashion-mnist", val_size=300, max_train=600, max_test=200)


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory):
    """The module ``deploy_tinynet`` written into a temporary folder on ``sys.path``: (module, folder)."""
    folder = tmp_path_factory.mktemp("user_code")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(MODULE), folder
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(MODULE, None)


def _prune(model: nn.Module) -> nn.Module:
    """One-shot filter + column pruning of ``model`` and compaction: the compact model (eval mode)."""
    result = prune(model, RATES, example_inputs=torch.zeros(1, 1, 28, 28), dims=("filter", "column"),
                   admm=ADMMConfig(epochs=0), retrain=TrainConfig(epochs=0), purify=False, progress=False,
                   device="cpu")
    return result.compact_model.eval()


@pytest.fixture(scope="module")
def compact(tiny_module):
    module, _ = tiny_module
    with seeded(0):
        return _prune(module.TinyNet(width=8))


@pytest.fixture(scope="module")
def images(splits):
    return next(iter(splits.loader("test", 16)))[0]


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= TOLERANCE


def test_compact_model_has_column_layers(compact):
    kinds = {type(m) for m in compact.modules()}
    assert ColumnConv2d in kinds and ColumnLinear in kinds
    assert type(compact).__module__ == MODULE and compact.features[0].out_channels == 4  # filters removed


def test_pickle_round_trip_after_no_grad_forward(compact, images, tmp_path):
    expected = _eager(compact, images)  # fills ColumnConv2d's eager cache, which must not be pickled
    torch.save(compact, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert _close(_eager(loaded, images), expected)
    again = pickle.loads(pickle.dumps(loaded))
    with torch.no_grad():  # the copy's weights change: its output follows (no stale cache)
        again.features[0].weight.mul_(2)
    assert not _close(_eager(again, images), expected)
    assert _close(_eager(loaded, images), expected)


def test_jit_trace_after_no_grad_forward(compact, images):
    expected = _eager(compact, images)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no Python-state dependence in the trace
        traced = torch.jit.trace(compact, images[:4])  # check_trace=True: the sanity check runs
    assert _close(_eager(traced, images), expected)  # another batch size than traced
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    assert _close(_eager(torch.jit.load(io.BytesIO(buffer.getvalue())), images), expected)


def test_jit_script(compact, images):
    scripted = torch.jit.script(compact)
    assert _close(_eager(scripted, images), _eager(compact, images))


def test_torch_export(compact, images):
    expected = _eager(compact, images)
    program = torch.export.export(compact, (images,))
    assert _close(_eager(program.module(), images), expected)


@pytest.mark.parametrize("mode", ["dense", "positions"])
@pytest.mark.parametrize("groups,padding_mode", [(1, "zeros"), (2, "reflect")])
def test_column_conv_paths_pickle_trace_script_export(mode, groups, padding_mode):
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=(1, 2), padding=1, groups=groups, padding_mode=padding_mode)
    kept = torch.randperm(conv.weight[0].numel(), generator=generator)[:10]
    model = nn.Sequential(ColumnConv2d.from_conv(conv, kept, mode=mode), nn.Flatten(),
                          ColumnLinear.from_linear(nn.Linear(8 * 9 * 5, 3), torch.tensor([0, 7, 100, 359]))).eval()
    assert model[0].path == mode
    x = torch.randn(2, 6, 9, 9, generator=generator)
    expected = _eager(model, x)
    masked = copy.deepcopy(conv)
    with torch.no_grad():
        dropped = torch.ones(masked.weight[0].numel(), dtype=torch.bool)
        dropped[kept] = False
        masked.weight.reshape(8, -1)[:, dropped] = 0  # the dense conv with the dropped columns zeroed
    assert _close(_eager(model[0], x), _eager(masked, x))
    runs = {"pickle": pickle.loads(pickle.dumps(model)), "trace": torch.jit.trace(model, x),
            "script": torch.jit.script(model), "export": torch.export.export(model, (x,)).module()}
    for name, run in runs.items():
        assert _close(_eager(run, x), expected), name


def _run_fresh(code: str, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new Python process with ``folder`` (the user's code) and autocompress importable."""
    source_root = Path(autocompress.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(source_root)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=300)


LOAD_AND_RUN = """
import sys, torch, autocompress
torch.set_num_threads(1)
x = torch.load(sys.argv[1])
for path in sys.argv[2:]:
    model = autocompress.load(path)
    with torch.no_grad():
        torch.save(model(x), path + ".out")
    print(type(model).__module__, type(model).__qualname__, model.training)
"""


def test_load_in_a_fresh_process_needs_no_registry(compact, images, tiny_module, tmp_path):
    module, folder = tiny_module
    given = save_compact(tmp_path / "given.pt", compact, model_kwargs={"width": 8, "num_classes": 10},
                         dataset={"input_size": [1, 28, 28]})
    inferred = save_compact(tmp_path / "inferred.pt", compact)  # TinyNet() needs no arguments: none recorded
    assert load_checkpoint(given)["model"] == {"name": None, "class": f"{MODULE}:TinyNet",
                                               "kwargs": {"width": 8, "num_classes": 10}}
    assert load_checkpoint(given)["dataset"] == {"input_size": [1, 28, 28]}
    assert load_checkpoint(inferred)["model"] == {"name": None, "class": f"{MODULE}:TinyNet", "kwargs": {}}
    torch.save(images, tmp_path / "x.pt")
    done = _run_fresh(LOAD_AND_RUN, folder, str(tmp_path / "x.pt"), str(given), str(inferred))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [MODULE, "TinyNet", "False"] * 2
    expected = _eager(compact, images)
    for path in (given, inferred):  # the architecture gives the compact shapes whatever the recorded width
        assert _close(torch.load(f"{path}.out"), expected), path
        loaded = autocompress.load(path)  # and in this process
        assert type(loaded) is module.TinyNet and _close(_eager(loaded, images), expected)


def test_unknown_constructor_arguments_need_a_fresh_instance(tiny_module, images, tmp_path):
    module, _ = tiny_module
    with seeded(0):
        compact = _prune(module.SizedNet(6))
    path = save_compact(tmp_path / "sized.pt", compact)  # SizedNet() needs `width`: no arguments recorded
    assert load_checkpoint(path)["model"] == {"name": None, "class": f"{MODULE}:SizedNet", "kwargs": None}
    with pytest.raises(UserError, match=f"records model class {MODULE}:SizedNet but not its constructor "
                                        r"arguments \(its constructor takes width\); pass a fresh instance "
                                        r".*autocompress.load\(path, model=SizedNet"):
        autocompress.load(path)
    mine = module.SizedNet(6)
    assert autocompress.load(path, model=mine) is mine and _close(_eager(mine, images), _eager(compact, images))


def test_a_saved_sequential_asks_for_the_code_that_built_it(tmp_path):
    """Fresh user 82's ConvMixer was an nn.Sequential: the fix said model=Sequential(...), which builds an empty
    container; a torch container's arguments are its layers, so the fix asks for the user's code that built it."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    path = save_compact(tmp_path / "seq.pt", model)
    with pytest.raises(UserError, match=r"records model class torch.nn.modules.container:Sequential but not its "
                                        r"constructor arguments.*; pass a fresh instance built as the compressed one "
                                        r"was \(the function that builds your Sequential\)"):
        autocompress.load(path)
    again = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert autocompress.load(path, model=again) is again
    assert torch.equal(again[0].weight, model[0].weight)


def test_load_into_own_instance_of_a_class_defined_in_a_function(splits, images, tmp_path):
    def make():
        class Local(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 8, 3, padding=1)
                self.bn = nn.BatchNorm2d(8)
                self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 784, 10))

            def forward(self, x):
                return self.head(torch.relu(self.bn(self.conv(x))))

        return Local

    local_class = make()
    with seeded(0):
        compact = _prune(local_class())
    assert any(isinstance(m, ColumnConv2d) for m in compact.modules())
    path = save_compact(tmp_path / "local.pt", compact)
    assert "<locals>" in load_checkpoint(path)["model"]["class"]
    with pytest.raises(UserError, match="defined inside a function and cannot be imported; pass a fresh "
                                        r"instance of the model instead: autocompress.load\(path, model=Local"):
        autocompress.load(path)
    mine = local_class()  # a fresh instance with the original (uncompacted) shapes
    loaded = autocompress.load(path, model=mine)
    assert loaded is mine and not loaded.training and loaded.conv.out_channels == compact.conv.out_channels < 8
    assert _close(_eager(loaded, images), _eager(compact, images))
    with pytest.raises(UserError, match="describes module 'conv', which the base model lacks"):
        autocompress.load(path, model=nn.Sequential(nn.Linear(2, 2)))  # another model's instance


def test_recorded_import_paths_must_name_module_classes(tmp_path):
    model = nn.Linear(3, 2)
    cases = {"collections:OrderedDict": "is not an nn.Module subclass, refusing to build it",
             "os:getcwd": "is not an nn.Module subclass", "no_such_package_xyz:Net": "cannot import module",
             "torch.nn:NoSuchLayer": "has no 'NoSuchLayer'", "torch.nn.Linear": "is not an import path",
             # fresh user 74: a class of the saving script; no version of the code to install brings it back
             "__main__:NoSuchNet": r"model class __main__:NoSuchNet was defined in the script that saved the "
                                   r"checkpoint \(its __main__\), which no other process can import; pass a fresh "
                                   r"instance .*model=NoSuchNet\(\.\.\.\)\), in Python; or define the class"}
    for class_path, message in cases.items():
        path = save_checkpoint(tmp_path / "c.pt", model=model, model_class=class_path,
                               model_kwargs={"in_features": 3, "out_features": 2}, dataset={}, config={}, metrics={})
        with pytest.raises(UserError, match=message):
            autocompress.load(path)
    path = save_checkpoint(tmp_path / "c.pt", model=model, model_class="torch.nn:Linear",
                           model_kwargs={"in_features": 3, "out_features": 2}, dataset={}, config={}, metrics={})
    loaded = autocompress.load(path)  # an importable class with recorded kwargs builds without a registry
    assert torch.equal(loaded.weight, model.weight) and torch.equal(loaded.bias, model.bias)
    with pytest.raises(UserError, match="model_kwargs\\['size'\\] holds a Tensor"):
        save_checkpoint(tmp_path / "d.pt", model=model, model_class="torch.nn:Linear",
                        model_kwargs={"size": torch.ones(1)}, dataset={}, config={}, metrics={})
    with pytest.raises(UserError, match="not a Linear"):
        save_compact(tmp_path / "e.pt", nn.Conv2d(1, 1, 1), model_class=nn.Linear)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """Relative imports of a module: (module name, at top level)."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    return [(node.module or "", id(node) in top) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1]


def test_serialization_modules_import_one_way():
    package = Path(autocompress.__file__).parent
    order = ["columns", "architecture", "compaction", "checkpoint", "serialization"]  # lower before higher
    for name in order:
        imported = _imports(package / f"{name}.py")
        assert all(top for _, top in imported), (name, "imports inside functions")
        later = {module for module, _ in imported} & set(order[order.index(name):])
        assert not later, (name, later)
    assert {m for m, _ in _imports(package / "compaction.py")} & {"checkpoint", "serialization"} == set()
