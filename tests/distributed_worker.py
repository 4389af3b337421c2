"""One process of a test run of ``autocompress.compress`` over ``torch.distributed`` (tests/test_distributed.py
starts 1 or 2 of them with torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

``python distributed_worker.py SPEC.json``: SPEC holds ``out`` (a folder for ``rank<r>.json``), ``config``
(compress settings), ``run_dir`` (or null), ``rank_config`` (``{rank: settings merged into config}``, to make
the ranks disagree), ``items`` (training images), ``kill_rank_at`` (``[rank, phase]``: that rank kills
itself with SIGKILL when the phase starts) and ``kill_after_epoch`` (``[label, epoch]``: every rank kills itself
once the epoch checkpoint of that epoch is saved, e.g. ``["round 1 retraining", 1]``). The result file holds
the search trajectory, digests of the parameters and masks at the end of every phase (taken before rank 0's
values are broadcast), digests of Z and U after every ADMM update, the epochs trained and the final model's
digest. A UserError is printed on one line, exit status 2.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import autocompress
from autocompress import admm, distributed, rounds, training
from autocompress.epoch_checkpoint import EpochCheckpoint
from autocompress.errors import UserError


class TinyCNN(nn.Module):
    """``[B, 1, 8, 8]`` -> logits ``[B, 3]``: conv-BN-ReLU x2, global average pooling, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def images(count: int, seed: int) -> TensorDataset:
    """Images whose mean brightness tells their class (0, 1, 2), noise 0.3."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (count,), generator=g)
    return TensorDataset(torch.randn(count, 1, 8, 8, generator=g) * 0.3 + labels.view(-1, 1, 1, 1).float(), labels)


def base_model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for x, y in DataLoader(images(96, 5), batch_size=16):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    distributed.init_from_env("cpu", timeout_s=60)
    rank = distributed.world().rank
    seen: dict[str, list] = {"phases": [], "zu": [], "epochs": []}
    kill = spec.get("kill_rank_at")

    sync, update = rounds.Pipeline._sync, admm.ADMMState.update

    def recorded_sync(self, state):
        masks = [m for _, m in sorted((state.param_masks or {}).items())]
        seen["phases"].append(distributed.digest([p for p in state.model.parameters()] + masks))
        sync(self, state)

    def recorded_update(self):
        update(self)
        seen["zu"].append(distributed.digest(self.z + self.u))

    rounds.Pipeline._sync, admm.ADMMState.update = recorded_sync, recorded_update
    train_epoch, save_epoch, after = training.train_epoch, EpochCheckpoint.save, spec.get("kill_after_epoch")

    def recorded_train_epoch(*args, **kwargs):
        seen["epochs"].append(kwargs.get("desc"))
        return train_epoch(*args, **kwargs)

    def save_then_kill(self, epoch, *args, **kwargs):
        save_epoch(self, epoch, *args, **kwargs)
        if [self.label, epoch] == after:
            os.kill(os.getpid(), signal.SIGKILL)

    training.train_epoch, EpochCheckpoint.save = recorded_train_epoch, save_then_kill
    if kill and kill[0] == rank:
        phase = getattr(rounds.Pipeline, f"_{kill[1]}")
        setattr(rounds.Pipeline, f"_{kill[1]}", lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL) or phase(*a, **k))
    config = {**spec["config"], **spec.get("rank_config", {}).get(str(rank), {})}
    train = DataLoader(images(spec.get("items", 64), 0), batch_size=8, shuffle=True)
    val = DataLoader(images(48, 1), batch_size=16)
    lines: list[str] = []
    try:
        result = autocompress.compress(base_model(), torch.randn(1, 1, 8, 8), train_loader=train, val_loader=val,
                                       device="cpu", config=config, run_dir=spec.get("run_dir"), progress=False,
                                       log=lines.append)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    search = [r for r in result.records if r.get("event") == "search"]
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps({
        "trajectory": [step for r in search for step in r["trajectory"]], "rates": [r["rates"] for r in search],
        "phases": seen["phases"], "zu": seen["zu"], "epochs": seen["epochs"], "compression": result.compression_rate,
        "model": distributed.digest(result.model.state_dict().values()),
        "events": [r.get("event") for r in result.records], "log": lines}))
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
