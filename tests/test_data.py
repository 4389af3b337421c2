"""Datasets on real data: Fashion-MNIST (Debian idx files) and small CIFAR-10 JPEG folders."""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from autocompress import data
from autocompress.data import (Augment, augment_batch, carve_validation, checkpoint_dataset, get_dataset, read_idx,
                               recorded_data_dir)
from autocompress.errors import UserError


# ------------------------------------------------------------------------------------- fashion-mnist
def test_fashion_mnist_shapes_and_class_counts(fmnist):
    assert (len(fmnist.train), len(fmnist.val), len(fmnist.test)) == (55000, 5000, 10000)
    assert fmnist.input_size == (1, 28, 28) and fmnist.num_classes == 10 and len(fmnist.classes) == 10
    assert fmnist.train.images.dtype == torch.uint8 and fmnist.train.images.shape == (55000, 1, 28, 28)
    assert fmnist.train.labels.dtype == torch.int64
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class
    labels = torch.cat([fmnist.train.labels, fmnist.val.labels])
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(fmnist.test.labels, minlength=10).tolist() == [1000] * 10


def test_idx_reader_matches_torchvision(tmp_path, fmnist):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress((data.DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").read_bytes()))
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(gzip.decompress((data.DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    assert torch.equal(fmnist.test.images[:, 0], read_image_file(str(raw)))
    assert torch.equal(fmnist.test.labels, read_label_file(str(labels)).long())
    # the uncompressed file reads the same as the .gz
    assert np.array_equal(read_idx(raw), fmnist.test.images[:, 0].numpy())


def test_validation_split_is_the_seeded_carve(fmnist):
    full = torch.from_numpy(read_idx(data.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").copy())
    train_idx, val_idx = carve_validation(60000, 5000, seed=0)
    assert torch.equal(fmnist.train.images[:, 0], full[train_idx])
    assert torch.equal(fmnist.val.images[:, 0], full[val_idx])


def test_carve_is_disjoint_deterministic_and_seeded():
    train, val = carve_validation(1000, 100, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    again = carve_validation(1000, 100, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    assert not torch.equal(carve_validation(1000, 100, seed=4)[1], val)
    sub_train, sub_val = carve_validation(1000, 100, seed=3, max_train=50)
    assert torch.equal(sub_val, val) and len(sub_train) == 50 and set(sub_train.tolist()) <= set(train.tolist())


def test_subsets_and_test_split(fmnist_small, fmnist):
    assert (len(fmnist_small.train), len(fmnist_small.val), len(fmnist_small.test)) == (6000, 1000, 1000)
    # the test subset is drawn from the real test set, never from training images
    test_rows = {bytes(img.numpy()) for img in fmnist.test.images}
    assert all(bytes(img.numpy()) in test_rows for img in fmnist_small.test.images[:50])


def test_eval_loader_normalises_exactly(fmnist_small):
    images, labels = next(iter(fmnist_small.loader("test", 100)))
    assert images.shape == (100, 1, 28, 28) and images.dtype == torch.float32
    expected = (fmnist_small.test.images[:100].float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(images, expected, atol=1e-5)
    assert torch.equal(labels, fmnist_small.test.labels[:100])
    loader = fmnist_small.loader("test", 300)
    assert len(loader) == 4 and sum(len(y) for _, y in loader) == 1000


def test_train_loader_shuffles_with_the_generator(fmnist_small):
    def first_labels(seed):
        loader = fmnist_small.loader("train", 64, generator=torch.Generator().manual_seed(seed))
        return next(iter(loader))[1]

    assert torch.equal(first_labels(1), first_labels(1))
    assert not torch.equal(first_labels(1), first_labels(2))
    seen = torch.cat([y for _, y in fmnist_small.loader("train", 1000, augment=False)])
    assert torch.equal(torch.bincount(seen, minlength=10), torch.bincount(fmnist_small.train.labels, minlength=10))


def test_augment_crop_and_flip_are_windows_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    out = augment_batch(images, Augment(pad=2, flip=True), g)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for b in range(2):
        windows = [padded[b, :, y:y + 6, x:x + 6] for y in range(5) for x in range(5)]
        candidates = windows + [w.flip(-1) for w in windows]
        assert any(torch.equal(out[b], w) for w in candidates)
    flips = augment_batch(images.repeat(50, 1, 1, 1), Augment(flip=True), torch.Generator().manual_seed(1))
    flipped = [torch.equal(f, images[i % 2].flip(-1)) for i, f in enumerate(flips)]
    kept = [torch.equal(f, images[i % 2]) for i, f in enumerate(flips)]
    assert all(a != b for a, b in zip(flipped, kept)) and 20 < sum(flipped) < 80


# ------------------------------------------------------------------------------------------- cifar10
def _pil_pixels(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_cifar_image_folder_decodes_like_pil_and_caches(cifar_folder, isolated_cache, monkeypatch):
    before = set((isolated_cache / "decoded").glob("cifar-small-*.pt"))
    splits = get_dataset("cifar10", cifar_folder, val_size=2, seed=0)
    assert splits.classes == ("airplane", "cat", "ship") and splits.num_classes == 3
    assert splits.input_size == (3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert (len(splits.train), len(splits.val), len(splits.test)) == (7, 2, 3)
    assert splits.test.labels.tolist() == [0, 1, 2]
    for label, cls in enumerate(splits.classes):
        assert torch.equal(splits.test.images[label], _pil_pixels(cifar_folder / "test" / cls / "0000.jpg"))
    train_idx, val_idx = carve_validation(9, 2, seed=0)
    all_train = [(cls, i) for cls in splits.classes for i in range(3)]
    for row, idx in enumerate(val_idx.tolist()):
        cls, i = all_train[idx]
        assert torch.equal(splits.val.images[row], _pil_pixels(cifar_folder / "train" / cls / f"{i:04d}.jpg"))
    assert len(set((isolated_cache / "decoded").glob("cifar-small-*.pt")) - before) == 1
    # a second load comes from the cache, without decoding
    monkeypatch.setattr(data, "_decode", lambda samples: pytest.fail("decoded again"))
    again = get_dataset("cifar10", cifar_folder, val_size=2, seed=0)
    assert torch.equal(again.train.images, splits.train.images)
    images, labels = next(iter(splits.loader("train", 4)))
    assert images.shape == (4, 3, 32, 32) and labels.max() < 3


def _archive(path, cifar_folder, train: str = "train"):
    """``path``: a .tar.gz of ``cifar_folder``'s ``train`` (or another split as train) and ``test`` folders."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(cifar_folder / train, arcname="train")
        tar.add(cifar_folder / "test", arcname="test")
    return path


def test_cifar_archive_is_extracted_once(cifar_folder, tmp_path, monkeypatch):
    archive = _archive(tmp_path / "small.tar.gz", cifar_folder)
    from_folder = get_dataset("cifar10", cifar_folder, val_size=2)
    from_archive = get_dataset("cifar10", archive, val_size=2)
    assert torch.equal(from_archive.test.images, from_folder.test.images)
    assert torch.equal(from_archive.train.labels, from_folder.train.labels)
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("extracted again"))
    get_dataset("cifar10", archive, val_size=2)
    copy = tmp_path / "elsewhere" / "small.tar.gz"  # the same content, another path and timestamp
    copy.parent.mkdir()
    copy.write_bytes(archive.read_bytes())
    os.utime(copy, (1, 1))
    assert torch.equal(get_dataset("cifar10", copy, val_size=2).test.images, from_folder.test.images)


def test_cifar_without_a_folder_is_read_where_an_earlier_run_extracted_its_archive(cifar_folder, tmp_path,
                                                                                    monkeypatch):
    """Fresh user 73: ``autocompress evaluate`` without ``--data-dir`` said "CIFAR-10 not found in ~/.cache/
    autocompress/cifar10, ~/.cache/autocompress" while the compress run had extracted the archive into the cache's
    ``extracted/cifar10-jpeg-<hash>``: that folder is searched too."""
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTOCOMPRESS_DATA", raising=False)
    with pytest.raises(UserError, match="CIFAR-10 not found in"):
        get_dataset("cifar10", None, val_size=2)
    given = get_dataset("cifar10", _archive(tmp_path / "cifar10-jpeg.tar.gz", cifar_folder), val_size=2)
    found = get_dataset("cifar10", None, val_size=2)
    assert torch.equal(found.test.images, given.test.images) and torch.equal(found.train.labels, given.train.labels)
    # a second extraction: which one is meant is not guessed
    get_dataset("cifar10", _archive(tmp_path / "cifar10-other.tar.gz", cifar_folder, train="test"), val_size=2)
    with pytest.raises(UserError, match=r"CIFAR-10 not found in .* \(archives extracted before: cifar10-jpeg-\w+, "
                                        r"cifar10-other-\w+, in "):
        get_dataset("cifar10", None, val_size=2)


def test_an_archive_extracted_by_another_process_meanwhile_is_used(cifar_folder, tmp_path, monkeypatch):
    """Two processes extracting one archive at once: the one renaming second finds the folder in place (the
    rename fails, 'Directory not empty') and uses it; the grid's two jobs failed on this before."""
    archive = _archive(tmp_path / "small.tar.gz", cifar_folder)
    replace = os.replace

    def other_process_first(src, dst):
        shutil.copytree(src, dst)  # the other process's extraction lands first
        replace(src, dst)

    monkeypatch.setattr(data.os, "replace", other_process_first)
    folder = data.extract_archive(archive)
    assert sorted(p.name for p in folder.iterdir()) == ["test", "train"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # the loser's copy is removed
    monkeypatch.setattr(data.os, "replace", replace)
    assert torch.equal(get_dataset("cifar10", archive, val_size=2).test.images,
                       get_dataset("cifar10", cifar_folder, val_size=2).test.images)


def test_cifar_folder_holding_the_archive(cifar_folder, tmp_path):
    """--data-dir may name the folder the archive lies in (e.g. ../shared/datasets)."""
    shelf = tmp_path / "datasets"
    shelf.mkdir()
    (shelf / "SHA256SUMS").write_text("")
    _archive(shelf / "cifar10-jpeg.tar.gz", cifar_folder)
    from_shelf = get_dataset("cifar10", shelf, val_size=2)
    assert torch.equal(from_shelf.test.images, get_dataset("cifar10", cifar_folder, val_size=2).test.images)
    with pytest.raises(UserError, match="neither"):
        get_dataset("cifar10", tmp_path, val_size=2)  # no layout and no archive


def test_recorded_data_dir_is_never_followed(tmp_path):
    recorded = {"name": "cifar10", "data_dir": str(tmp_path)}
    assert recorded_data_dir("/given", recorded, "cifar10") == "/given"
    assert recorded_data_dir(tmp_path, recorded, "cifar10") == str(tmp_path)
    assert recorded_data_dir(None, recorded, "cifar10") is None  # the dataset's own lookup, not the recording


def _write_batches(folder, train_images, train_labels, test_images, test_labels, classes=None):
    """torchvision's cifar-10-batches-py layout: the training rows spread over five batch files."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(train_labels), 6).round().astype(int)
    for i in range(5):
        rows = slice(bounds[i], bounds[i + 1])
        with open(folder / f"data_batch_{i + 1}", "wb") as handle:
            pickle.dump({"data": train_images[rows], "labels": list(train_labels[rows])}, handle)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": test_images, "labels": list(test_labels)}, handle)
    if classes is not None:
        with open(folder / "batches.meta", "wb") as handle:
            pickle.dump({"label_names": list(classes)}, handle)


def test_cifar_python_batches_format(tmp_path, cifar_folder):
    reference = get_dataset("cifar10", cifar_folder, val_size=0)
    _write_batches(tmp_path / "cifar-10-batches-py", reference.train.images.reshape(9, -1).numpy(),
                   reference.train.labels.tolist(), reference.test.images.reshape(3, -1).numpy(),
                   reference.test.labels.tolist(), reference.classes)
    splits = get_dataset("cifar10", tmp_path, val_size=0)
    assert torch.equal(splits.train.images, reference.train.images)
    assert torch.equal(splits.test.labels, reference.test.labels)
    assert splits.classes == reference.classes


@pytest.mark.parametrize("train_labels, test_labels, needle", [
    ([0, 1, 10, 2], [0], "the train split of cifar10 in .* has label 10, outside the 10 classes"),
    ([0, 1, 2, 3], [-1], "the test split of cifar10 in .* has label -1, outside the 10 classes"),
    ([0, 1, 2, 3], [], "the test split of cifar10 in .* has no images"),
    ([], [0], "the train split of cifar10 in .* has no images"),
])
def test_cifar_batches_with_bad_labels_or_empty_splits(tmp_path, train_labels, test_labels, needle):
    images = lambda n: np.zeros((n, 3072), np.uint8)  # noqa: E731
    _write_batches(tmp_path / "cifar-10-batches-py", images(len(train_labels)), train_labels,
                   images(len(test_labels)), test_labels)
    with pytest.raises(UserError, match=needle) as err:
        get_dataset("cifar10", tmp_path, val_size=0)
    assert "\n" not in str(err.value)


def test_cifar_batches_with_labels_and_images_of_different_counts(tmp_path):
    _write_batches(tmp_path / "cifar-10-batches-py", np.zeros((5, 3072), np.uint8), [0, 1, 2, 3, 4],
                   np.zeros((2, 3072), np.uint8), [0])
    with pytest.raises(UserError, match="test_batch holds 6144 image bytes for 1 labels"):
        get_dataset("cifar10", tmp_path, val_size=0)


def _idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_label_out_of_range(tmp_path):
    for prefix, labels in (("train", [0, 1, 2, 3]), ("t10k", [0, 12])):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((len(labels), 28, 28)))
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.array(labels))
    with pytest.raises(UserError, match="the test split of fashion-mnist in .* has label 12, outside the 10 classes"):
        get_dataset("fashion-mnist", tmp_path, val_size=1)


def test_loader_of_an_empty_split_is_refused(cifar_folder):
    splits = get_dataset("cifar10", cifar_folder, val_size=0)
    with pytest.raises(UserError, match="the val split of cifar10 has no images; pass val_size > 0"):
        splits.loader("val", 4)


def test_input_size_mismatch(cifar_folder, fmnist_small):
    with pytest.raises(UserError, match="cifar10 images are 3x32x32 but input_size expects 1x28x28"):
        get_dataset("cifar10", cifar_folder, val_size=0, input_size=(1, 28, 28))
    recorded = {"name": "fashion-mnist", "input_size": [1, 28, 28], "val_size": 1000, "seed": 0}
    with pytest.raises(UserError, match="cifar10 images are 3x32x32 but the checkpoint expects 1x28x28"):
        checkpoint_dataset(recorded, "cifar10", cifar_folder, val_size=0)
    fmnist_small.check_input_size([1, 28, 28])
    fmnist_small.check_input_size(None)
    with pytest.raises(UserError, match="fashion-mnist images are 1x28x28 but the model expects 3x28x28"):
        fmnist_small.check_input_size((3, 28, 28))
    # a fresh user's sequence model ([T, F] per sample) was told to use the dataset it was trained on
    with pytest.raises(UserError, match=r"fashion-mnist images are 1x28x28 \(C x H x W\) but the model takes inputs of "
                       r"2 dimension\(s\) \(28x28\); wrap the model in a module whose forward takes the images"):
        fmnist_small.check_input_size((28, 28))


def test_checkpoint_dataset_uses_the_recorded_carve_and_normalisation(cifar_folder):
    described = get_dataset("cifar10", cifar_folder, val_size=2, seed=5, mean=(0.5, 0.4, 0.3),
                            std=(0.2, 0.25, 0.3)).describe()
    assert described["mean"] == [0.5, 0.4, 0.3] and described["std"] == [0.2, 0.25, 0.3]
    splits = checkpoint_dataset(described, data_dir=cifar_folder)
    assert (splits.val_size, splits.seed, splits.mean, splits.std) == (2, 5, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    images, _ = next(iter(splits.loader("test", 3)))
    expected = (splits.test.images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / \
        torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    assert torch.allclose(images, expected, atol=1e-5)
    # an old checkpoint without normalisation gets the dataset's standard statistics
    old = {k: v for k, v in described.items() if k not in ("mean", "std")}
    assert checkpoint_dataset(old, data_dir=cifar_folder).mean == data.MEAN_STD["cifar10"][0]
    with pytest.raises(UserError, match=r"the checkpoint records no dataset \(a model compressed through the "
                                        r"Python API records only its input\); name the dataset to evaluate on"):
        checkpoint_dataset({"input_size": [3, 32, 32]}, data_dir=cifar_folder)
    with pytest.raises(UserError, match=r"unknown dataset 'mnist' \(the checkpoint records 'cifar10'\); use one of"):
        checkpoint_dataset(described, "mnist", cifar_folder)
    assert checkpoint_dataset({}, "cifar10", cifar_folder, val_size=1).val_size == 1  # name / carve overrides


@pytest.mark.parametrize("mean, std", [((0.5,), (0.2, 0.2, 0.2)), ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2)),
                                       ((0.5, float("nan"), 0.5), (0.2, 0.2, 0.2))])
def test_bad_normalisation(cifar_folder, mean, std):
    with pytest.raises(UserError, match="does not fit 3-channel cifar10 images"):
        get_dataset("cifar10", cifar_folder, val_size=0, mean=mean, std=std)


# ---------------------------------------------------------------------------------------- imagefolder
def test_imagefolder_defaults_to_imagenet_transforms(cifar_folder):
    (cifar_folder / "test").rename(cifar_folder / "val")
    splits = get_dataset("imagefolder", cifar_folder, val_size=3)
    splits.num_workers = 0
    assert splits.input_size == (3, 224, 224) and splits.num_classes == 3
    assert splits.mean == data.MEAN_STD["imagefolder"][0]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    images, labels = next(iter(splits.loader("test", 3)))
    assert images.shape == (3, 3, 224, 224) and labels.tolist() == [0, 1, 2]
    images, _ = next(iter(splits.loader("train", 2, generator=torch.Generator().manual_seed(0))))
    assert images.shape == (2, 3, 224, 224)
    resize, crop = data.folder_transform((3, 224, 224), (0,) * 3, (1,) * 3, augment=False).transforms[:2]
    assert resize.size in (256, [256]) and list(crop.size) == [224, 224]  # the standard 256 -> 224 center crop


def _pixels(folder, split_samples, index) -> torch.Tensor:
    return _pil_pixels(split_samples.dataset.samples[split_samples.indices[index]][0]).float()


def test_imagefolder_at_the_recorded_32x32_size(cifar_folder):
    """A checkpoint recorded at 3x32x32 gets the 32x32 images themselves, normalised as recorded."""
    (cifar_folder / "test").rename(cifar_folder / "val")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    recorded = {"name": "imagefolder", "input_size": [3, 32, 32], "mean": list(mean), "std": list(std),
                "val_size": 3, "seed": 0, "data_dir": "/elsewhere"}
    splits = checkpoint_dataset(recorded, data_dir=cifar_folder)
    splits.num_workers = 0
    assert splits.input_size == (3, 32, 32) and (splits.mean, splits.std) == (mean, std)
    images, labels = next(iter(splits.loader("test", 3)))
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for i in range(3):
        assert torch.allclose(images[i], (_pixels(cifar_folder, splits.test, i) / 255 - m) / s, atol=1e-5)
    # training: a 32x32 window of the image zero-padded by 4 (black, before normalising), maybe flipped,
    # as for cifar10
    images, labels = next(iter(splits.loader("train", 2, shuffle=False, generator=torch.Generator().manual_seed(1))))
    assert images.shape == (2, 3, 32, 32)
    for i in range(2):
        padded = (torch.nn.functional.pad(_pixels(cifar_folder, splits.train, i) / 255, (4, 4, 4, 4)) - m) / s
        windows = [padded[:, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
        assert any(torch.allclose(images[i], w, atol=1e-5) or torch.allclose(images[i], w.flip(-1), atol=1e-5)
                   for w in windows)
    # a cifar10 checkpoint evaluated on a folder of CIFAR JPEGs: its input size and statistics
    cifar = {"name": "cifar10", "input_size": [3, 32, 32], "mean": list(data.MEAN_STD["cifar10"][0]),
             "std": list(data.MEAN_STD["cifar10"][1]), "val_size": 5000}
    splits = checkpoint_dataset(cifar, "imagefolder", cifar_folder, val_size=0)
    assert splits.input_size == (3, 32, 32) and (splits.mean, splits.std) == data.MEAN_STD["cifar10"]


def test_imagefolder_grey_and_other_sizes(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(
                    tmp_path / split / cls / f"{i}.png")
    splits = get_dataset("imagefolder", tmp_path, val_size=2, input_size=(1, 28, 28))
    splits.num_workers = 0
    assert splits.mean == (pytest.approx(0.449),) and splits.std == (pytest.approx(0.226),)
    images, _ = next(iter(splits.loader("test", 6)))
    assert images.shape == (6, 1, 28, 28)
    for i in range(6):
        grey = torch.from_numpy(np.array(Image.open(splits.test.dataset.samples[i][0]))).float() / 255
        assert torch.allclose(images[i, 0], (grey - splits.mean[0]) / splits.std[0], atol=1e-5)
    splits = get_dataset("imagefolder", tmp_path, val_size=2, input_size=(3, 96, 80))
    splits.num_workers = 0
    assert next(iter(splits.loader("test", 2)))[0].shape == (2, 3, 96, 80)
    assert next(iter(splits.loader("train", 2)))[0].shape == (2, 3, 96, 80)
    for bad in ((2, 32, 32), (3, 0, 32), (3, 32)):
        with pytest.raises(UserError, match="is not \\(channels 1 or 3, height, width\\)"):
            get_dataset("imagefolder", tmp_path, val_size=2, input_size=bad)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, make, needle", [
    ("cifar10", lambda p: p / "missing", "does not exist"),
    ("cifar10", lambda p: p, "neither cifar-10-batches-py"),
    ("fashion-mnist", lambda p: p, "Fashion-MNIST not found in"),
    ("imagefolder", lambda p: p, "must hold train/"),
])
def test_missing_or_empty_folders_name_the_folder(tmp_path, name, make, needle):
    folder = make(tmp_path)
    with pytest.raises(UserError, match=needle) as err:
        get_dataset(name, folder)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_empty_class_folders(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="is empty"):
        get_dataset("cifar10", tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        get_dataset("mnist-xyz")
    with pytest.raises(UserError, match="validation size"):
        get_dataset("fashion-mnist", val_size=60000)
    with pytest.raises(UserError, match="needs --data-dir"):
        get_dataset("imagefolder")
    truncated = tmp_path / "t.gz"
    truncated.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2])))
    with pytest.raises(UserError, match="truncated"):
        read_idx(truncated)


def test_offline_download_is_a_clear_error(monkeypatch, tmp_path):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nothing")
    monkeypatch.delenv("AUTOCOMPRESS_DATA", raising=False)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(UserError, match="download failed.*apt-get install dataset-fashion-mnist"):
        get_dataset("fashion-mnist")
