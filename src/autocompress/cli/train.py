"""``autocompress train``: train a zoo model on a dataset and write a checkpoint.

Example: ``autocompress train --model fmnist_cnn --dataset fashion-mnist --epochs 15 --out runs/base.pt``.
A checkpoint is written atomically after every epoch; ``--resume`` continues an interrupted run exactly.
An existing ``--out`` is never overwritten: ``--resume`` continues it, ``--skip-if-exists`` accepts it.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ..data import DATASETS
from ..errors import UserError
from ..text import plural
from ..training import SCHEDULES, TrainConfig

_DEFAULTS = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``autocompress train``."""
    parser.add_argument("--model", required=True, help="zoo model name (e.g. fmnist_cnn, resnet20, "
                        "torchvision:resnet18)")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data-dir", help="where the dataset is (default: the dataset's lookup order)")
    parser.add_argument("--epochs", type=int, default=_DEFAULTS.epochs)
    parser.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size)
    parser.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak learning rate")
    parser.add_argument("--momentum", type=float, default=_DEFAULTS.momentum)
    parser.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=_DEFAULTS.nesterov)
    parser.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay,
                        help="on conv / linear weights only (not BatchNorm, not biases)")
    parser.add_argument("--schedule", choices=SCHEDULES, default=_DEFAULTS.schedule)
    parser.add_argument("--label-smoothing", type=float, default=_DEFAULTS.label_smoothing)
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="weight init, data order, augmentation")
    parser.add_argument("--device", default=_DEFAULTS.device, help="torch device (cpu, cuda)")
    parser.add_argument("--val-size", type=int, default=5000, help="images carved from the training set")
    parser.add_argument("--max-train", type=int, help="train on a seeded subset of this many images")
    parser.add_argument("--out", help="checkpoint path (default: runs/<model>_<dataset>.pt)")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    state.add_argument("--skip-if-exists", action="store_true",
                       help="if --out is a finished checkpoint, do nothing; if interrupted, resume it")
    parser.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Train; returns 0. Raises UserError on bad input (the CLI prints one line and exits 2)."""
    from . import parse_model_args
    from ..checkpoint import load_checkpoint
    from ..data import get_dataset
    from ..models import create_model, model_info
    from ..task import resolve_device
    from ..training import check_model_input, fit, resumable_state, seeded

    resolve_device(args.device)
    out = _out(args)
    resume = args.resume
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                         nesterov=args.nesterov, weight_decay=args.weight_decay, schedule=args.schedule,
                         label_smoothing=args.label_smoothing, seed=args.seed, device=args.device).validate()
    model_kwargs = parse_model_args(args.model_arg)
    if out.exists():
        stored = load_checkpoint(out)
        if args.skip_if_exists and stored["training_state"] is None:
            top1 = stored["metrics"].get("test_top1")
            print(f"checkpoint {out} exists (test top-1 {_pct(top1)}); skipping training")
            return 0
        if not (resume or args.skip_if_exists):
            raise UserError(f"{out} already exists",
                            "pass --resume to continue it, --skip-if-exists to keep it, or another --out")
        resume = True
    elif resume:
        raise UserError(f"nothing to resume: {out} does not exist", "drop --resume or pass the right --out")
    if resume:
        stored_model = stored["model"]
        if stored_model["name"] != args.model or stored["dataset"].get("name") != args.dataset:
            raise UserError(f"{out} holds {stored_model['name']} on {stored['dataset'].get('name')}, not "
                            f"{args.model} on {args.dataset}", "pass the same --model and --dataset, or another --out")
        config = dataclasses.replace(TrainConfig.from_dict(stored["config"]), device=args.device)
        model_kwargs = {k: v for k, v in stored_model["kwargs"].items() if k != "num_classes"}
        val_size, seed = stored["dataset"].get("val_size", args.val_size), stored["dataset"].get("seed", config.seed)
        epoch = resumable_state(stored, out)["epoch"]
        print(f"resuming {out} at epoch {epoch}/{config.epochs} with its stored settings")
    else:
        val_size, seed = args.val_size, config.seed

    # an ImageFolder is resized to the model's own input size (a 32x32 model trains on 32x32 images)
    input_size = model_info(args.model).input_size if args.dataset == "imagefolder" else None
    splits = get_dataset(args.dataset, args.data_dir, val_size=val_size, seed=seed, max_train=args.max_train,
                         input_size=input_size)
    kwargs = {"num_classes": splits.num_classes, **model_kwargs}
    with seeded(config.seed):
        model = create_model(args.model, **kwargs)
    check_model_input(model, splits.input_size, splits.num_classes, args.model, args.dataset)
    params = sum(p.numel() for p in model.parameters())
    print(f"training {args.model} ({params / 1e6:.3f}M parameters) on {args.dataset} from {splits.data_dir}: "
          f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images, "
          f"{plural(config.epochs, 'epoch')}, batch {config.batch_size}, lr {config.lr} ({config.schedule})")

    def report(epoch: int, record: dict) -> None:
        print(f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f} top-1 "
              f"{_pct(record['train_top1'])}, val top-1 {_pct(record['val_top1'])}, {record['seconds']:.1f} s",
              flush=True)

    began = time.perf_counter()
    metrics = fit(model, splits, config, checkpoint_path=out, model_name=args.model, model_kwargs=kwargs,
                  resume=resume, on_epoch_end=report, progress=not args.no_progress)
    print(f"test top-1 {_pct(metrics['test_top1'])}"
          + (f", top-5 {_pct(metrics['test_top5'])}" if "test_top5" in metrics else "")
          + f"; {metrics['epoch_seconds']:.1f} s per epoch, {time.perf_counter() - began:.0f} s in all; "
          f"checkpoint {out}")
    return 0


def _out(args: argparse.Namespace) -> Path:
    """The checkpoint path: ``--out``, or ``runs/<model>_<dataset>.pt``."""
    return Path(args.out or f"runs/{args.model.replace(':', '_')}_{args.dataset}.pt")


def interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C leaves behind (the CLI prints it): the checkpoint of the last finished epoch, which
    ``--resume`` continues, or nothing."""
    out = _out(args)
    if out.exists():
        return f"{out} holds the last finished epoch; continue it with the same command and --resume"
    return f"nothing was written ({out} does not exist)"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
