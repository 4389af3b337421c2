"""PaddedLayerNorm: a LayerNorm that lost channels computes what the masked LayerNorm computes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.architecture import apply_architecture, describe_architecture
from autocompress.padded_norm import PaddedLayerNorm
from autocompress.space import trace_graph

KEPT = torch.tensor([0, 2, 3, 6])  # of 7 channels


def _masked_reference(x_kept: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dim: int) -> torch.Tensor:
    """F.layer_norm over 7 channels with the removed ones as zeros, read at the kept channels."""
    shape = list(x_kept.shape)
    shape[dim] = 7
    full = torch.zeros(shape, dtype=torch.float64).index_copy(dim, KEPT, x_kept.double())
    w = torch.zeros(7, dtype=torch.float64).index_copy(0, KEPT, weight.double())
    b = torch.zeros(7, dtype=torch.float64).index_copy(0, KEPT, bias.double())
    out = F.layer_norm(full.movedim(dim, -1), (7,), w, b, 1e-6).movedim(-1, dim)
    return out.index_select(dim, KEPT)


def test_statistics_count_the_removed_channels_as_zeros():
    torch.manual_seed(0)
    for dim, shape in ((-1, (2, 5, 4)), (1, (2, 4, 3, 3))):
        norm = PaddedLayerNorm(4, 7, dim, eps=1e-6)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        x = torch.randn(shape) * 3 + 1
        expected = _masked_reference(x, norm.weight.detach(), norm.bias.detach(), dim)
        assert torch.allclose(norm(x).double(), expected, atol=1e-5)
        # a plain LayerNorm over the 4 kept channels (what dropping them computes) differs
        plain = F.layer_norm(x.movedim(dim, -1), (4,), norm.weight, norm.bias, 1e-6).movedim(-1, dim)
        assert (plain.double() - expected).abs().max() > 1e-2


def test_full_width_equals_layer_norm_and_rebuilds_from_its_description():
    torch.manual_seed(0)
    reference = nn.LayerNorm(6)
    norm = PaddedLayerNorm(6, 6)
    x = torch.randn(3, 6)
    assert torch.allclose(norm(x), reference(x), atol=1e-6)
    model = nn.Sequential(nn.Linear(5, 4), PaddedLayerNorm(4, 9, eps=1e-3))
    base = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4))
    rebuilt = apply_architecture(base, describe_architecture(model, reference=base))
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt[1].config() == {"num_features": 4, "width": 9, "dim": -1, "eps": 1e-3,
                                   "elementwise_affine": True, "bias": True}
    assert torch.equal(rebuilt(torch.ones(2, 5)), model(torch.ones(2, 5)))


def test_torch_pruning_prunes_it_further_and_keeps_the_width():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), PaddedLayerNorm(4, 7), nn.Linear(4, 2)).eval()
    graph = trace_graph(model, (torch.randn(1, 3),))
    group = graph.get_pruning_group(model[0], graph.get_pruner_of_module(model[0]).prune_out_channels, [1])
    assert model[1] in [dep.target.module for dep, _ in group]
    weight, bias = model[1].weight.detach()[[0, 2, 3]].clone(), model[1].bias.detach()[[0, 2, 3]].clone()
    group.prune()
    assert (model[1].num_features, model[1].width, model[1].weight.shape[0]) == (3, 7, 3)
    assert torch.equal(model[1].weight.detach(), weight) and torch.equal(model[1].bias.detach(), bias)
