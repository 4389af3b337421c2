"""How far Torch-Pruning 1.6's GroupNorm pruning is from the masked model (docs/SUPPORT.md, "GroupNorm").

``conv(3, 8) -> GroupNorm(G, 8) -> ReLU -> conv(8, 4)`` with random affine entries; channels 0 and 4 are
removed. The masked model zeroes them (producer rows and biases, GroupNorm weight and bias, consumer input
columns); Torch-Pruning removes the same channels with its dependency graph. Prints the largest output
difference and the output scale for G = 2, 1 and 8, and the same for autocompress's compaction.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/groupnorm_vs_tp.py
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from autocompress.compaction import compact

REMOVED = [0, 4]


class Net(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.conv, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(groups, 8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.gn.weight.uniform_(0.5, 1.5)
            self.gn.bias.normal_()

    def forward(self, x):
        return self.conv2(F.relu(self.gn(self.conv(x))))


def masks_for(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep masks removing channels ``REMOVED`` of ``model.conv`` everywhere they appear."""
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for name in ("conv.weight", "conv.bias", "gn.weight", "gn.bias"):
        masks[name][REMOVED] = False
    masks["conv2.weight"][:, REMOVED] = False
    return masks


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(2, 3, 8, 8)
    for groups in (2, 1, 8):
        torch.manual_seed(0)
        model = Net(groups).eval()
        masks = masks_for(model)
        masked = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in masked.named_parameters():
                p.mul_(masks[name])
            ref = masked(x)
        pruned = copy.deepcopy(model)
        graph = tp.DependencyGraph().build_dependency(pruned, x)
        graph.get_pruning_group(pruned.conv, tp.prune_conv_out_channels, REMOVED).prune()
        try:
            with torch.no_grad():
                theirs = f"differs by {float((pruned(x) - ref).abs().max()):.3g}"
        except RuntimeError as exc:
            theirs = f"does not run ({str(exc).splitlines()[0][:80]})"
        ours = compact(model, masks, x).model
        with torch.no_grad():
            diff = float((ours(x) - ref).abs().max())
        print(f"GroupNorm({groups}, 8), channels {REMOVED} removed, output scale {float(ref.abs().max()):.3g}: "
              f"Torch-Pruning ({pruned.gn}) {theirs}; autocompress ({ours.gn}) differs by {diff:.3g}")


if __name__ == "__main__":
    main()
