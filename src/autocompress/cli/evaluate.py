"""``autocompress evaluate CHECKPOINT``: loss, top-1 (and top-5 with more than 10 classes) on a split.

The dataset defaults to the one the checkpoint was trained on (same validation carve: ``val_size`` and
``seed`` stored in the checkpoint; same input size and normalisation). The data folder is ``--data-dir`` or
the dataset's lookup order, never a folder recorded in the checkpoint. ``--json`` prints one JSON object
instead of the summary line: checkpoint, model, dataset, split, ``loss`` (mean cross-entropy per image), ``top1``
(and ``top5``) as fractions in [0, 1] (the summary line and a run's ``val_top1`` fields are in %), ``images``.
"""
from __future__ import annotations

import argparse
import sys

from ..data import DATASETS
from ..text import plural


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``autocompress evaluate``."""
    parser.add_argument("checkpoint", help="checkpoint file (.pt)")
    parser.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's dataset")
    parser.add_argument("--data-dir", help="default: the dataset's lookup order (the folder a checkpoint "
                        "records is never read unless you pass it here)")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (no progress bar; "
                        "top1 / top5 as fractions in [0, 1], not %%)")
    parser.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Evaluate; returns 0. Raises UserError on bad input (the CLI prints one line and exits 2)."""
    from . import read_checkpoint
    from ..checkpoint import model_from_checkpoint, model_label
    from ..data import checkpoint_dataset
    from ..text import json_text
    from ..task import resolve_device
    from ..training import check_model_input, evaluate
    from .workload import normalisation_warning

    ckpt = read_checkpoint(args.checkpoint, args.model_arg)
    stored = ckpt["dataset"]
    name = args.dataset or stored.get("name")
    # the recorded carve for the recorded dataset; another dataset needs none for the test split
    val_size = 0 if name != stored.get("name") and args.split == "test" else None
    splits = checkpoint_dataset(stored, name, args.data_dir, val_size=val_size)
    warning = normalisation_warning(stored, splits) if name == stored.get("name") else None
    if warning:
        print(f"autocompress: warning: {warning}", file=sys.stderr)
    model = model_from_checkpoint(ckpt).to(resolve_device(args.device))
    model_name = model_label(ckpt["model"])
    check_model_input(model, splits.input_size, splits.num_classes, model_name, name)
    result = evaluate(model, splits.loader(args.split, args.batch_size), progress=not (args.json or args.quiet),
                      desc=args.split)
    result = {"checkpoint": str(args.checkpoint), "model": model_name, "dataset": name, "split": args.split,
              **result}
    if args.json:
        print(json_text(result))
    else:
        top5 = f", top-5 {100 * result['top5']:.2f}%" if "top5" in result else ""
        print(f"{model_name} on {name} {args.split}: top-1 {100 * result['top1']:.2f}%{top5}, "
              f"loss {result['loss']:.4f} ({plural(result['images'], 'image')})")
    return 0
