"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) as readers of pruned channels.

A recurrent layer multiplies its input sequence by its first layer's input weights ``weight_ih_l0`` (and
``weight_ih_l0_reverse`` when bidirectional), ``[gates x hidden, input]`` (4 gates for an LSTM, 3 for a GRU, 1
for a plain RNN): each input feature is one column of each. So filter pruning of the layer that feeds it removes
those columns, exactly (AutoCompress, Liu et al. AAAI 2020, §3, extended to recurrent consumers). Its hidden units
are filter channels of their own (:func:`hidden_entries`), leaving every layer and both directions at once.
torch-pruning 1.6 follows an LSTM's input but traces a GRU or an RNN op by op and cannot map its channels, and its
LSTM pruner handles one layer (and cannot map an LSTM with ``proj_size``): :class:`RecurrentPruner` is the graph's
pruner of all three. An LSTM with ``proj_size`` keeps its hidden units (its projection would have to follow them).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch_pruning as tp
from torch import nn

#: gates a hidden unit owns rows of, by recurrent layer type (an LSTM's i, f, g, o)
GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}
#: recurrent layer types whose input channels filter pruning follows (:func:`follows_input`)
FOLLOWED = (nn.LSTM, nn.GRU, nn.RNN)
#: what the exclusion of a group that reaches another recurrent layer says
RECURRENT_FOLLOWED = ("an nn.LSTM, nn.GRU or nn.RNN is followed (the channels it reads), not a subclass of them (its "
                      "forward may read its input otherwise)")


def follows_input(module: nn.Module) -> bool:
    """Whether filter pruning follows the channels ``module`` reads into its input weights: an ``nn.LSTM`` (with or
    without ``proj_size``), ``nn.GRU`` or ``nn.RNN`` exactly (a subclass may read its input otherwise)."""
    return type(module) in FOLLOWED


def input_weight_names(module: nn.RNNBase) -> list[str]:
    """Names of the weights a recurrent ``module`` multiplies its input by: ``weight_ih_l0`` and, when
    bidirectional, ``weight_ih_l0_reverse``, each ``[gates x hidden_size, input_size]``."""
    return [f"weight_ih_l0{suffix}" for suffix in ("", "_reverse")[:1 + module.bidirectional]]


def is_recurrent_param(param: str) -> bool:
    """Whether parameter name ``param`` is a recurrent layer's weight or bias (``rnn.weight_ih_l0``,
    ``weight_hh_l1_reverse``, ``bias_ih_l0``, ...), as PyTorch names them."""
    return re.fullmatch(r"(weight|bias)_(ih|hh|hr)_l\d+(_reverse)?", param.rpartition(".")[2]) is not None


def input_weights(module: nn.RNNBase) -> list[nn.Parameter]:
    """The parameters of :func:`input_weight_names`."""
    return [getattr(module, name) for name in input_weight_names(module)]


def hidden_prunable(module: nn.Module) -> bool:
    """Whether filter pruning removes hidden units of ``module``: an ``nn.LSTM`` without ``proj_size``, ``nn.GRU``
    or ``nn.RNN`` exactly. Its layers and directions share the hidden size, so unit ``j`` leaves every layer and
    both directions (a bidirectional layer's channels ``j`` and ``hidden_size + j`` are tied)."""
    return follows_input(module) and not getattr(module, "proj_size", 0)


def directions(module: nn.RNNBase) -> int:
    """1, or 2 for a bidirectional layer (its output features: the forward direction's units, then the reverse's)."""
    return 1 + bool(module.bidirectional)


def hidden_entries(module: nn.RNNBase, index: torch.Tensor, channel: torch.Tensor
                   ) -> list[tuple[str, str, int, torch.Tensor, torch.Tensor]]:
    """The entries that output features ``index`` (int64 [n] in ``[0, directions x hidden_size)``: unit
    ``index % hidden_size`` of direction ``index // hidden_size``; group channel ``channel`` each) of a recurrent
    layer (:func:`hidden_prunable`) own, as ``(parameter attribute, role, dim, positions, channel of each)``: in
    every layer ``l`` and direction their gates' rows of ``weight_ih_l{l}``, ``weight_hh_l{l}`` and both biases
    (role ``"weight"`` / ``"bias"``), their columns of ``weight_hh_l{l}`` (the recurrence) and, above the first
    layer, the features' columns of ``weight_ih_l{l}`` (the layer below's output): all of them the unit's own, so a
    unit whose rows are all zero outputs exactly 0 at every step from the zero initial state (an LSTM's gates read
    sigmoid(0) and its cell input tanh(0) = 0, so ``c`` and ``h`` stay 0; a GRU's candidate is tanh(0 + r * 0) = 0,
    so ``h`` = z * h stays 0; an RNN's tanh / relu of 0 is 0) and its columns multiply that 0."""
    gates, hidden = GATES[type(module)], module.hidden_size
    entries = []
    for layer in range(module.num_layers):
        for direction, suffix in enumerate(("", "_reverse")[:directions(module)]):
            mine = index // hidden == direction
            unit, of = index[mine] % hidden, channel[mine]
            rows, row_of = torch.cat([unit + gate * hidden for gate in range(gates)]), of.repeat(gates)
            entries += [(f"weight_ih_l{layer}{suffix}", "weight", 0, rows, row_of),
                        (f"weight_hh_l{layer}{suffix}", "weight", 0, rows, row_of),
                        (f"weight_hh_l{layer}{suffix}", "weight", 1, unit, of)]
            if layer:
                entries.append((f"weight_ih_l{layer}{suffix}", "weight", 1, index, channel))
            if module.bias:
                entries += [(f"bias_ih_l{layer}{suffix}", "bias", 0, rows, row_of),
                            (f"bias_hh_l{layer}{suffix}", "bias", 0, rows, row_of)]
    return entries


def hidden_ties(module: nn.RNNBase, index: torch.Tensor) -> torch.Tensor:
    """The tie key of each output feature ``index`` of a recurrent layer: its unit (``index % hidden_size``), which
    both directions of a bidirectional layer lose together."""
    return index % module.hidden_size


def dead_hidden_units(module: nn.RNNBase) -> torch.Tensor:
    """Bool ``[directions x hidden_size]`` (its output features): the hidden units of a recurrent layer
    (:func:`hidden_prunable`) whose gate rows are zero in every weight and bias of every layer and direction (they
    output exactly 0, see :func:`hidden_entries`), repeated for each direction."""
    gates, hidden = GATES[type(module)], module.hidden_size
    dead = torch.ones(hidden, dtype=torch.bool)
    for name, param in module.named_parameters(recurse=False):
        if name.startswith(("weight_ih", "weight_hh", "bias_ih", "bias_hh")):
            rows = param.detach().reshape(gates, hidden, -1)
            dead &= (rows == 0).all(dim=2).all(dim=0).cpu()
    return dead.repeat(directions(module))


class RecurrentPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's pruning function of an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (a customized pruner of
    ``DependencyGraph.build_dependency``). Input features: their columns of the input weights
    (:func:`input_weight_names`) leave and ``input_size`` narrows. Hidden units (:func:`hidden_prunable`), for any
    number of layers: removing unit ``j`` removes its gate rows from every layer's
    weights and biases and its column from every recurrent weight and from the input weights above the first layer
    (:func:`hidden_entries`; in both directions of a bidirectional layer, whose output features ``j`` and
    ``hidden_size + j`` are one unit). torch-pruning 1.6 traces a GRU or an RNN op by op and cannot map their
    channels, and its own LSTM pruner handles one layer and direction and slices the recurrent weights' rows by the
    unit, not by its gate rows."""

    TARGET_MODULES = FOLLOWED

    def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        if not hidden_prunable(layer):
            raise NotImplementedError(f"the hidden units of {layer} are not pruned")
        hidden = layer.hidden_size
        units = torch.tensor(sorted(set(range(hidden)) - set(int(i) % hidden for i in idxs)), dtype=torch.long)
        keep = torch.cat([units + direction * hidden for direction in range(directions(layer))])
        cuts: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for name, _role, dim, index, _channel in hidden_entries(layer, keep, keep):
            cuts.setdefault(name, []).append((dim, index))
        for name, along in cuts.items():
            param = getattr(layer, name)
            for dim, index in along:
                param = self._prune_parameter_and_grad(param, index.tolist(), dim)
            setattr(layer, name, param)  # RNNBase.__setattr__ refreshes its flat weights
        layer.hidden_size = len(units)
        layer.flatten_parameters()  # one contiguous chunk again for cuDNN (a no-op on the CPU)
        return layer

    def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.input_size)) - set(int(i) for i in idxs))
        for name in input_weight_names(layer):
            setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 1))
        layer.input_size = len(keep)
        layer.flatten_parameters()
        return layer

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        return layer.hidden_size * directions(layer)

    def get_in_channels(self, layer: nn.RNNBase) -> int:
        return layer.input_size


class _OneNode(torch.autograd.Function):
    """A recurrent layer's output sequence as one autograd node over the layer's input sequence and one weight."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.shapes = inputs.shape, weight.shape
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        return grad.new_zeros(ctx.shapes[0]), None, grad.new_zeros(ctx.shapes[1])


def one_node(module: nn.RNNBase, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``output`` (``module``'s output sequence, ``[T, B, D x H]`` or batch first) with the same values, reaching
    autograd as one node over ``inputs`` (its input sequence) and its first input weight, instead of the ops of its
    kernel, for torch-pruning's trace: it maps a module by the node of its output (a GRU's or an RNN's CPU kernel is a
    graph of gate ops it would follow as channel mappings), and the weight gives that node a gradient where the input
    sequence has none (the model's own input)."""
    return _OneNode.apply(inputs, output.detach(), module.weight_ih_l0)


#: the customized pruners of this module, by exact type (torch-pruning looks them up so)
PRUNERS = {kind: RecurrentPruner() for kind in FOLLOWED}

__all__ = ["FOLLOWED", "GATES", "PRUNERS", "RECURRENT_FOLLOWED", "RecurrentPruner", "dead_hidden_units", "directions",
           "follows_input", "hidden_entries", "hidden_prunable", "hidden_ties", "input_weight_names", "input_weights",
           "is_recurrent_param", "one_node"]
