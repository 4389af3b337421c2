"""The default loop's optimiser (``retrain.optimizer``) on a caller's own task and loss (issue 13's acceptance: a
user's model, data and loss, only a target and a budget).

A small denoising U-Net on Fashion-MNIST (pixels in [0, 1] plus Gaussian noise of sigma 0.3 -> the clean image;
a stem, a residual block at 28x28, a strided conv, two GroupNorm convs at 14x14, a transposed conv up, the skip
concatenated, a 1x1 head and a global residual), trained with AdamW one-cycle, then compressed by
``autocompress.compress`` with only a target, a budget, its ``loss_fn`` (mean squared error: ~0.005 at the base,
200 times below a cross-entropy's ~1) and ``score_fn`` (PSNR in dB), under ``--variants``:

* ``default``: the library's defaults;
* ``sgd`` / ``adamw``: ``retrain.optimizer`` (and the ADMM and quick-evaluation fine-tuning optimiser) set to it;
* ``own_loop``: the caller's own AdamW loop as ``train_fn`` (the loop that trained the base, cosine from 1e-3);
* ``nokd``: distillation off; ``adamw_nokd``: AdamW and distillation off;
* ``channel`` / ``layer``: ``search.guidance`` set to it;
* ``tp_own``: not autocompress: Torch-Pruning's global group magnitude to the target, then ``own_loop``'s loop for
  the budget's epochs (the peer a user compares with).

``--task classify`` asks the other side: Fashion-MNIST classification by ``fmnist_cnn`` (width 0.5) trained with
SGD (lr 0.05 cosine, 4 epochs), top-1 as ``score_fn``; variants ``default`` (no ``loss_fn``), ``sgd`` / ``adamw``
(the cross-entropy as ``loss_fn``, the optimiser set) and ``auto`` (the cross-entropy as ``loss_fn``, the default
optimiser). ``--task classify_adamw``: the same classifier trained with AdamW (one-cycle to 3e-3, 4 epochs).
``--task segment``: per-pixel classes (background or the item's class, 11 in all) of the noisy image by the same
U-Net with an 11-channel head, trained 2 epochs with AdamW (an under-trained base, as a fresh user's segmentation
net was in session 30), the per-pixel cross-entropy as ``loss_fn``, mean IoU as ``score_fn``. ``--task
segment_unet``: the same task with fresh user 58's BatchNorm U-Net (:class:`UNet`, session 42).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/custom_loss.py --variants default,own_loop \\
        --seeds 0 --out benchmarks/results/custom_loss.jsonl   # --task classify: the same file

The bases are cached beside ``--out`` (``<out>.base.pt``, ``<out>.classifier_{sgd,adamw}.pt``,
``<out>.segmenter.pt``, ``<out>.unet.pt``); rows are appended to ``--out`` as each run ends (a rerun skips the
(task, variant, seed) rows already there). ``test``: PSNR (dB), top-1 (%) or mean IoU on 2,000 test images.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

import autocompress
from autocompress.data import get_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

NOISE = 0.3
BATCH = 64
SEGMENT_CLASSES = 11  # background + the 10 Fashion-MNIST classes


class Denoiser(nn.Module):
    """``[B, 1, 28, 28]`` noisy image -> ``[B, 1, 28, 28]`` clean image estimate (``classes``: ``[B, classes, 28,
    28]`` per-pixel class scores instead, without the global residual)."""

    def __init__(self, width: int = 32, classes: int | None = None):
        super().__init__()
        self.residual = classes is None
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(4, 2 * width), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(4, 2 * width), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.head = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, classes or 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.stem(x) + self.block(self.stem(x)))
        out = self.head(torch.cat([self.up(self.down(skip)), skip], 1))
        return x + out if self.residual else out


def conv_bn_relu(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs),
                         nn.ReLU(inplace=True))


class UNet(nn.Module):
    """``[B, 1, 28, 28]`` -> per-pixel class scores ``[B, classes, 28, 28]``: fresh user 58's segmentation net (session
    42). Two conv-BN-ReLU at 28x28 (``width``), max pooling, two at 14x14 (``2 width``), pooling, two at 7x7
    (``4 width``), a transposed conv up concatenated with the 14x14 features, one conv-BN-ReLU, nearest upsampling
    concatenated with the 28x28 features, two conv-BN-ReLU, a 1x1 head."""

    def __init__(self, width: int = 16, classes: int = SEGMENT_CLASSES):
        super().__init__()
        self.e1 = nn.Sequential(conv_bn_relu(1, width), conv_bn_relu(width, width))
        self.e2 = nn.Sequential(conv_bn_relu(width, 2 * width), conv_bn_relu(2 * width, 2 * width))
        self.mid = nn.Sequential(conv_bn_relu(2 * width, 4 * width), conv_bn_relu(4 * width, 4 * width))
        self.up2, self.d2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2), conv_bn_relu(4 * width, 2 * width)
        self.d1 = nn.Sequential(conv_bn_relu(3 * width, width), conv_bn_relu(width, width))
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        d2 = self.d2(torch.cat([e2, self.up2(self.mid(F.max_pool2d(e2, 2)))], 1))
        return self.head(self.d1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1)))


def noisy_pairs(images: torch.Tensor, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (noisy, clean) float ``[B, 1, 28, 28]`` pairs, noise drawn once from ``seed``."""
    clean = images.float() / 255.0
    noisy = clean + NOISE * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    return [(noisy[i:i + BATCH], clean[i:i + BATCH]) for i in range(0, len(clean), BATCH)]


def mse(model: nn.Module, batch) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def summed(model: nn.Module, batches, per_batch) -> float:
    """The sum of ``per_batch(output, target)`` over ``batches``, in eval mode under no_grad (mode restored)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        total = sum(float(per_batch(model(x), y)) for x, y in batches)
    model.train(was)
    return total


def psnr(model: nn.Module, batches) -> float:
    """Peak signal-to-noise ratio (dB, peak 1) of the model's outputs over ``batches``."""
    error = summed(model, batches, lambda out, y: F.mse_loss(out.clamp(0, 1), y, reduction="sum"))
    return 10 * math.log10(sum(y.numel() for _, y in batches) / error)


def adamw_epochs(model: nn.Module, batches, epochs: int, lr: float, *, onecycle: bool, attach=None,
                 loss=None) -> None:
    """The caller's loop: AdamW (weight decay 1e-4), one-cycle or cosine from ``lr``, over ``batches``, on
    ``loss`` (default: :func:`mse`)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    if attach is not None:
        attach(optimizer)
    steps = epochs * len(batches)
    schedule = (torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps) if onecycle else
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps))
    fit_epochs(model, batches, epochs, optimizer, schedule, loss or mse)


def fit_epochs(model: nn.Module, batches, epochs: int, optimizer, schedule, loss) -> None:
    """``epochs`` passes over ``batches`` in a seeded order, one ``optimizer`` and ``schedule`` step a batch."""
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(batches), generator=order).tolist():
            optimizer.zero_grad()
            loss(model, batches[index]).backward()
            optimizer.step()
            schedule.step()


def denoiser_base(path: Path, batches) -> nn.Module:
    """The denoiser trained as its user did (AdamW one-cycle to 3e-3, 6 epochs), cached at ``path``."""
    torch.manual_seed(0)
    model = Denoiser()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    adamw_epochs(model, batches, 6, 3e-3, onecycle=True)
    torch.save(model.state_dict(), path)
    return model


def segment_pairs(images: torch.Tensor, labels: torch.Tensor, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (noisy image ``[B, 1, 28, 28]``, per-pixel class map ``[B, 28, 28]``): 0 where the clean pixel is
    below 0.1 (background), else the image's class + 1 (``SEGMENT_CLASSES`` classes)."""
    clean = images.float() / 255.0
    noisy = clean + NOISE * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    maps = torch.where(clean[:, 0] >= 0.1, labels.view(-1, 1, 1) + 1, 0).long()
    return [(noisy[i:i + BATCH], maps[i:i + BATCH]) for i in range(0, len(clean), BATCH)]


def miou(model: nn.Module, batches) -> float:
    """Mean intersection over union of the per-pixel argmax over the classes present in prediction or target."""
    was = model.training
    model.eval()
    inter, union = torch.zeros(SEGMENT_CLASSES), torch.zeros(SEGMENT_CLASSES)
    with torch.no_grad():
        for x, y in batches:
            pred = model(x).argmax(1)
            for c in range(SEGMENT_CLASSES):
                inter[c] += ((pred == c) & (y == c)).sum()
                union[c] += ((pred == c) | (y == c)).sum()
    model.train(was)
    return float((inter[union > 0] / union[union > 0]).mean())


def segmenter_base(path: Path, batches, epochs: int, unet: bool = False) -> nn.Module:
    """The U-Net with per-pixel class scores (``unet``: :class:`UNet`, else the :class:`Denoiser` with a class head),
    trained with AdamW one-cycle to 3e-3 for ``epochs``, cached."""
    torch.manual_seed(0)
    model = UNet() if unet else Denoiser(classes=SEGMENT_CLASSES)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    adamw_epochs(model, batches, epochs, 3e-3, onecycle=True, loss=cross_entropy)
    torch.save(model.state_dict(), path)
    return model


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def top1(model: nn.Module, batches) -> float:
    """Top-1 (%) over ``batches``."""
    right = summed(model, batches, lambda out, y: (out.argmax(1) == y).sum())
    return 100.0 * right / sum(len(y) for _, y in batches)


def classifier_base(path: Path, batches, optimizer: str) -> nn.Module:
    """``fmnist_cnn`` (width 0.5) trained for 4 epochs with SGD (lr 0.05 cosine, Nesterov, wd 5e-4) or AdamW
    (one-cycle to 3e-3, wd 1e-4), cached at ``path``."""
    from autocompress.models import create_model
    from autocompress.training import TrainConfig, build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = create_model("fmnist_cnn", num_classes=10, width=0.5)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    if optimizer == "adamw":
        adamw_epochs(model, batches, 4, 3e-3, onecycle=True, loss=cross_entropy)
    else:
        config = TrainConfig(epochs=4, lr=0.05)
        steps = build_optimizer(model, config)
        fit_epochs(model, batches, config.epochs, steps, build_scheduler(steps, config, len(batches)), cross_entropy)
    torch.save(model.state_dict(), path)
    return model


def setup(task: str, out: Path, segment_epochs: int = 2) -> dict:
    """The task's base model, batches (train / val / test), loss and score (``segment_epochs``: the segmenter's
    training epochs; 2 leave it under-trained, as a fresh user's segmentation net was in session 30)."""
    splits = get_dataset("fashion-mnist", val_size=2000, max_train=10000, max_test=2000)
    if task == "denoise":
        train, val = noisy_pairs(splits.train.images, 1), noisy_pairs(splits.val.images, 2)[:8]
        return {"train": train, "val": val, "test": noisy_pairs(splits.test.images, 3), "loss": mse,
                "score": psnr, "base": denoiser_base(out.with_suffix(".base.pt"), train)}

    if task in ("segment", "segment_unet"):
        def maps(split, seed):
            return segment_pairs(split.images, split.labels, seed)
        train, unet = maps(splits.train, 1), task == "segment_unet"
        base = segmenter_base(out.with_suffix(".unet.pt" if unet else ".segmenter.pt"), train, segment_epochs, unet)
        return {"train": train, "val": maps(splits.val, 2)[:8], "test": maps(splits.test, 3), "loss": cross_entropy,
                "score": miou, "base": base}

    def labelled(split) -> list:
        images = (split.images.float() / 255.0 - splits.mean[0]) / splits.std[0]
        return [(images[i:i + BATCH], split.labels[i:i + BATCH]) for i in range(0, len(split), BATCH)]

    train, trained_by = labelled(splits.train), "adamw" if task == "classify_adamw" else "sgd"
    base = classifier_base(out.with_suffix(f".classifier_{trained_by}.pt"), train, trained_by)
    return {"train": train, "val": labelled(splits.val)[:8], "test": labelled(splits.test), "loss": cross_entropy,
            "score": top1, "base": base}


#: variants' settings over the defaults (the default loop, the task's loss)
#: each variant's settings over ``budget`` and ``seed``; "sgd" / "adamw" distil from the base (what a budget derived
#: before session 32, when ``distillation.enabled`` became ``auto``: off for per-pixel classes), "default" is the
#: library's defaults as they are
SETTINGS = {"sgd": {"retrain": {"optimizer": "sgd"}, "distillation": {"enabled": True}},
            "adamw": {"retrain": {"optimizer": "adamw"}, "distillation": {"enabled": True}},
            "nokd": {"distillation": {"enabled": False}},
            "adamw_nokd": {"retrain": {"optimizer": "adamw"}, "distillation": {"enabled": False}},
            "channel": {"search": {"guidance": "channel"}}, "layer": {"search": {"guidance": "layer"}}}
#: the output layer Torch-Pruning must keep whole (``tp_own``; a classifier's last Linear is kept anyway)
OUTPUTS = {"denoise": ("head.2",), "segment": ("head.2",), "segment_unet": ("head",)}


def seeded_order(batches: list, seed: int) -> list:
    """``batches`` in the order seed ``seed`` draws (seed 0: as they are); the default loop iterates a list in
    order, so the seed orders the training batches of every method alike."""
    if not seed:
        return batches
    return [batches[i] for i in torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()]


def torch_pruning_run(seed: int, task: str, data: dict, target: str, budget: int) -> dict:
    """``tp_own``: Torch-Pruning's global L2 group magnitude bisected to ``target``
    (``benchmarks/peers/torch_pruning_baseline.py``), then ``budget`` epochs of the caller's loop (AdamW, cosine
    from 1e-3, the task's loss: ``own_loop``'s), the batches in the seed's order."""
    from torch_pruning_baseline import prune_to_target  # benchmarks/peers

    from autocompress.config import Target
    from autocompress.metrics import count_macs, count_params

    base = data["base"]
    train = seeded_order(data["train"], seed)
    started, example = time.perf_counter(), torch.zeros(1, 1, 28, 28)
    torch.manual_seed(seed)
    pruned = prune_to_target(base.eval(), example, Target.parse(target), ignored=OUTPUTS.get(task, ())).model
    adamw_epochs(pruned, train, budget, 1e-3, onecycle=False, loss=data["loss"])
    return {"task": task, "variant": "tp_own", "seed": seed, "target": target, "budget": budget, "optimizer": "adamw",
            "probe_loss": None, "distilled": False, "test": data["score"](pruned, data["test"]),
            "base_test": data["score"](base, data["test"]),
            "macs_reduction": count_macs(base, example) / count_macs(pruned, example),
            "compression_rate": count_params(base) / count_params(pruned),
            "minutes": (time.perf_counter() - started) / 60}


def run(variant: str, seed: int, task: str, data: dict, target: str, budget: int) -> dict:
    """One compress run (``tp_own``: :func:`torch_pruning_run`); ``seed`` also orders the training batches (the
    default loop iterates a list in order)."""
    if variant == "tp_own":
        return torch_pruning_run(seed, task, data, target, budget)
    base, val, score = data["base"], data["val"], data["score"]
    train = seeded_order(data["train"], seed)
    model = copy.deepcopy(base)
    config: dict = {"budget": budget, "seed": seed}
    loss_fn, train_fn = data["loss"], None
    if variant == "default" and task.startswith("classify"):
        loss_fn = None
    elif variant == "own_loop":
        def train_fn(net, phase):
            adamw_epochs(net, train, phase.epochs, 1e-3, onecycle=False, attach=phase.attach, loss=loss_fn)
    config.update(SETTINGS.get(variant, {}))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        result = autocompress.compress(model, torch.zeros(1, 1, 28, 28), target, train_loader=train,
                                       val_loader=val, loss_fn=loss_fn, score_fn=lambda net: score(net, val),
                                       train_fn=train_fn, config=config, run_dir=folder, progress=False)
        stored = yaml.safe_load((Path(folder) / "config.yaml").read_text())
    probe = next((r for r in result.records if r.get("event") == "optimizer"), {})
    return {"task": task, "variant": variant, "seed": seed, "target": target, "budget": budget,
            "optimizer": None if train_fn else probe.get("choice") or stored["retrain"]["optimizer"],
            "probe_loss": (probe.get("probe") or {}).get("held_out_loss"),
            "distilled": stored["distillation"]["enabled"], "test": score(result.model, data["test"]),
            "base_test": score(base, data["test"]), "macs_reduction": result.mac_reduction,
            "compression_rate": result.compression_rate, "minutes": (time.perf_counter() - started) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("denoise", "classify", "classify_adamw", "segment", "segment_unet"),
                        default="denoise")
    parser.add_argument("--variants", default="default,own_loop")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--target", default="flops=2x")
    parser.add_argument("--budget", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--segment-epochs", type=int, default=2,
                        help="the segmenter's training epochs (its base is cached beside --out: one --out per value)")
    args = parser.parse_args()
    data = setup(args.task, args.out, args.segment_epochs)
    done = set()
    if args.out.exists():
        rows = map(json.loads, args.out.read_text().splitlines())
        done = {(row["task"], row["variant"], row["seed"]) for row in rows}
    for seed in map(int, args.seeds.split(",")):
        for variant in args.variants.split(","):
            if (args.task, variant, seed) in done:
                continue
            row = run(variant, seed, args.task, data, args.target, args.budget)
            print(json.dumps(row), flush=True)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
