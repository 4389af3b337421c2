"""NNI 2.10.1 AutoCompressPruner on an autocompress checkpoint (run inside the NNI venv, see
``shared/docs/peers.md`` and ``benchmarks/README.md``).

Peer method of the benchmark grid (issue 5). NNI's AutoCompressPruner (v2 API) repeats ``total_iteration``
times: simulated annealing over per-layer sparsities (scored by ``evaluator``), ADMM pruning
(``iterations`` x ``training_epochs`` epochs; ``coarse-grained`` = whole output channels), then the
``finetuner``. Training uses autocompress's data splits (same seed, subset and validation carve as the other
methods) and plain SGD (lr, momentum 0.9, weight decay 5e-4), so the epoch budget is comparable.

Writes ``--out`` (``torch.save`` of plain tensors: the best model's ``state_dict`` and its ``masks``
``{module: {param: BoolTensor}}``) and prints one JSON line: score, timings, epochs, and whether NNI's own
``ModelSpeedup`` could make the masks physical (``speedup_ok``, ``speedup_params`` or ``speedup_error``).

Needs ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (NNI 2.10 ``torch.load``s its own intermediate files).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import nni  # noqa: E402
import torch  # noqa: E402
from nni.compression.pytorch.pruning import AutoCompressPruner  # noqa: E402
from nni.compression.pytorch.speedup import ModelSpeedup  # noqa: E402

from autocompress.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from autocompress.data import get_dataset  # noqa: E402


def _classifier_name(model: torch.nn.Module) -> str:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--sparsity", type=float, required=True, help="total sparsity of the Conv2d weights")
    parser.add_argument("--total-iteration", type=int, default=2)
    parser.add_argument("--admm-iterations", type=int, default=2)
    parser.add_argument("--admm-epochs", type=int, default=1, help="training epochs per ADMM iteration")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs per iteration")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--val-batches", type=int, default=10)
    parser.add_argument("--data-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    began = time.perf_counter()
    torch.manual_seed(args.seed)
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt)
    splits = get_dataset(ckpt["dataset"]["name"], args.data_dir, val_size=args.val_size, seed=args.seed,
                         max_train=args.max_train, max_test=1)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = splits.loader("train", 128, shuffle=True, augment=True, generator=generator)
    val_batches = []
    for batch in splits.loader("val", 256, shuffle=True, augment=False, generator=torch.Generator().manual_seed(1)):
        if len(val_batches) >= args.val_batches:
            break
        val_batches.append(batch)
    epochs_used = {"admm": 0, "finetune": 0}
    evaluations = [0]

    def trainer(net, optimizer, criterion):
        # NNI 2.10.1's ADMM penalty is (rho / 2) * sqrt(||W - Z + U||); at every ADMM start W - Z + U = 0 and its
        # gradient is NaN (0 / 0), which would turn every conv weight into NaN. Non-finite gradient entries are
        # zeroed (that step then trains the conv weights by weight decay only); nothing else is changed.
        net.train()
        total, steps = 0.0, 0
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            for param in net.parameters():
                if param.grad is not None:
                    torch.nan_to_num_(param.grad, nan=0.0, posinf=0.0, neginf=0.0)
            optimizer.step()
            total, steps = total + float(loss), steps + 1
        epochs_used["admm"] += 1
        print(f"ADMM epoch {epochs_used['admm']}: mean loss incl. penalty {total / max(steps, 1):.4f}",
              file=sys.stderr, flush=True)

    def finetuner(net):
        optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        criterion = torch.nn.CrossEntropyLoss()
        for _ in range(args.finetune_epochs):
            net.train()
            for images, labels in train_loader:
                optimizer.zero_grad()
                criterion(net(images), labels).backward()
                optimizer.step()
            epochs_used["finetune"] += 1

    def evaluator(net) -> float:
        evaluations[0] += 1
        net.eval()
        correct = seen = 0
        with torch.no_grad():
            for images, labels in val_batches:
                correct += int((net(images).argmax(1) == labels).sum())
                seen += labels.numel()
        return correct / seen

    dummy = torch.zeros(1, *splits.input_size)
    config_list = [{"total_sparsity": args.sparsity, "op_types": ["Conv2d"]},
                   {"exclude": True, "op_names": [_classifier_name(model)]}]
    admm_params = {"trainer": trainer,
                   "traced_optimizer": nni.trace(torch.optim.SGD)(model.parameters(), lr=args.lr, momentum=0.9,
                                                                  weight_decay=5e-4),
                   "criterion": torch.nn.CrossEntropyLoss(), "iterations": args.admm_iterations,
                   "training_epochs": args.admm_epochs, "granularity": "coarse-grained"}
    sa_params = {"evaluator": evaluator, "start_temperature": 100, "stop_temperature": 20, "cool_down_rate": 0.9,
                 "perturbation_magnitude": 0.35, "pruning_algorithm": "l1"}
    pruner = AutoCompressPruner(model, config_list, args.total_iteration, admm_params, sa_params,
                                log_dir=args.log_dir, keep_intermediate_result=False, finetuner=finetuner,
                                speedup=False, dummy_input=dummy, evaluator=evaluator)
    pruner.compress()
    task_id, best_model, masks, score, best_config = pruner.get_best_result()
    wall = time.perf_counter() - began

    plain_masks = {module: {name: mask.detach().to(torch.bool).cpu() for name, mask in entry.items()}
                   for module, entry in masks.items()}
    state = {k: v.detach().cpu() for k, v in best_model.state_dict().items()}
    torch.save({"state_dict": state, "masks": plain_masks}, args.out)

    result = {"task_id": task_id, "score": score, "config_list": best_config, "wall_seconds": wall,
              "epochs_admm": epochs_used["admm"], "epochs_finetune": epochs_used["finetune"],
              "evaluations": evaluations[0]}
    try:  # NNI's own physical pruning (peers.md: fails at BatchNorm on conv-BN nets with torch 2.13)
        fast = copy.deepcopy(best_model)
        ModelSpeedup(fast, dummy, copy.deepcopy(masks)).speedup_model()
        result.update(speedup_ok=True, speedup_params=sum(p.numel() for p in fast.parameters()))
    except Exception as exc:  # report NNI's failure, whatever its type
        result.update(speedup_ok=False, speedup_error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    print("NNI_RESULT " + json.dumps(result, default=str))


if __name__ == "__main__":
    main()
