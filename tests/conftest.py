"""Fixtures shared by all tests.

* Torch uses 2 threads (env ``AUTOCOMPRESS_TEST_THREADS`` overrides), so timings match a 2-core machine.
* Every test starts from torch's generator seeded 0 (reproducible across runs).
* ``AUTOCOMPRESS_CACHE`` points at a per-session temporary folder: tests never write the user's cache.
* ``fmnist``: the real Fashion-MNIST (Debian's idx files), full, validation split 5000 (seed 0).
* ``fmnist_small``: real Fashion-MNIST subset: 6000 train / 1000 val / 1000 test images.
* ``cifar_jpegs``: a few real CIFAR-10 JPEGs (``{class: [bytes, ...]}``), read from the extracted
  archive in ``~/.cache/autocompress`` or straight from ``../shared/datasets/cifar10-jpeg.tar.gz``.
* ``cifar_folder``: a temporary ImageFolder ``train/<class>/*.jpg``, ``test/<class>/*.jpg`` made of them.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import hypothesis
import pytest
import torch

torch.set_num_threads(int(os.environ.get("AUTOCOMPRESS_TEST_THREADS", "2")))

# CI (CI=true) replays the same hypothesis examples every run, so a red CI is reproducible.
hypothesis.settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
CIFAR_EXTRACTED = Path.home() / ".cache" / "autocompress"
CIFAR_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ("airplane", "cat", "ship")
JPEGS_PER_CLASS = 4


@pytest.fixture(autouse=True)
def seeded_generator():
    """Every test starts from torch's global generator seeded 0: a fresh process seeds it at random, so a test
    that built a model before seeding anything passed or failed by chance (one did, 1 run in 4)."""
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Point ``AUTOCOMPRESS_CACHE`` at a session temporary folder for the whole test run."""
    folder = tmp_path_factory.mktemp("autocompress-cache")
    old = os.environ.get("AUTOCOMPRESS_CACHE")
    os.environ["AUTOCOMPRESS_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("AUTOCOMPRESS_CACHE", None)
    else:
        os.environ["AUTOCOMPRESS_CACHE"] = old


@pytest.fixture(scope="session")
def fmnist():
    """The full real Fashion-MNIST: 55000 train / 5000 val / 10000 test (seed 0)."""
    from autocompress.data import get_dataset

    return get_dataset("fashion-mnist")


@pytest.fixture(scope="session")
def fmnist_small():
    """A real Fashion-MNIST subset: 6000 train / 1000 val / 1000 test images (seed 0)."""
    from autocompress.data import get_dataset

    return get_dataset("fashion-mnist", val_size=1000, max_train=6000, max_test=1000)


@pytest.fixture(scope="session")
def cifar_jpegs() -> dict[str, list[bytes]]:
    """``JPEGS_PER_CLASS`` real CIFAR-10 training JPEGs of each class in ``CIFAR_CLASSES``."""
    found: dict[str, list[bytes]] = {cls: [] for cls in CIFAR_CLASSES}
    if all((CIFAR_EXTRACTED / "train" / cls).is_dir() for cls in CIFAR_CLASSES):
        for cls in CIFAR_CLASSES:
            files = sorted((CIFAR_EXTRACTED / "train" / cls).glob("*.jpg"))[:JPEGS_PER_CLASS]
            found[cls] = [f.read_bytes() for f in files]
    elif CIFAR_ARCHIVE.is_file():
        with tarfile.open(CIFAR_ARCHIVE) as tar:
            for member in tar:
                parts = Path(member.name).parts
                if (member.isfile() and len(parts) == 3 and parts[0] == "train" and parts[1] in found
                        and len(found[parts[1]]) < JPEGS_PER_CLASS):
                    found[parts[1]].append(tar.extractfile(member).read())
                if all(len(v) == JPEGS_PER_CLASS for v in found.values()):
                    break
    if not all(len(v) == JPEGS_PER_CLASS for v in found.values()):
        pytest.fail(f"real CIFAR-10 JPEGs not found in {CIFAR_EXTRACTED} or {CIFAR_ARCHIVE}; "
                    "extract ../shared/datasets/cifar10-jpeg.tar.gz into ~/.cache/autocompress")
    return found


@pytest.fixture
def cifar_folder(tmp_path, cifar_jpegs) -> Path:
    """ImageFolder layout: 3 training and 1 test JPEG per class (the test one is the class's last)."""
    root = tmp_path / "cifar-small"
    for cls, blobs in cifar_jpegs.items():
        for split, chosen in (("train", blobs[:-1]), ("test", blobs[-1:])):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i, blob in enumerate(chosen):
                (root / split / cls / f"{i:04d}.jpg").write_bytes(blob)
    return root
