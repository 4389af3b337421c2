"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) as readers of pruned channels.

A recurrent layer multiplies its input sequence by its first layer's input weights ``weight_ih_l0`` (and
``weight_ih_l0_reverse`` when bidirectional), ``[gates x hidden, input]`` (4 gates for an LSTM, 3 for a GRU, 1
for a plain RNN): each input feature is one column of each. So filter pruning of the layer that feeds it removes
those columns, exactly (AutoCompress, Liu et al. AAAI 2020, §3, extended to recurrent consumers). In one direction
its hidden units are filter channels of their own (:func:`hidden_entries`); a bidirectional layer keeps them.
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


def is_recurrent_weight(param: str) -> bool:
    """Whether parameter name ``param`` is a recurrent layer's weight matrix (``rnn.weight_ih_l0``,
    ``weight_hh_l1_reverse``, ...), as PyTorch names them."""
    return re.fullmatch(r"weight_(ih|hh|hr)_l\d+(_reverse)?", param.rpartition(".")[2]) is not None


def input_weights(module: nn.RNNBase) -> list[nn.Parameter]:
    """The parameters of :func:`input_weight_names`."""
    return [getattr(module, name) for name in input_weight_names(module)]


def hidden_prunable(module: nn.Module) -> bool:
    """Whether filter pruning removes hidden units of ``module``: an ``nn.LSTM`` without ``proj_size``, ``nn.GRU``
    or ``nn.RNN`` exactly, in one direction (a bidirectional layer's two directions share one hidden size and write
    two feature blocks, which torch-pruning maps as one). Its layers share the hidden size, so unit ``j`` leaves
    every layer."""
    return follows_input(module) and not module.bidirectional and not getattr(module, "proj_size", 0)


def hidden_entries(module: nn.RNNBase, index: torch.Tensor, channel: torch.Tensor
                   ) -> list[tuple[str, str, int, torch.Tensor, torch.Tensor]]:
    """The entries hidden units ``index`` (int64 [n]; group channel ``channel`` each) of a recurrent layer
    (:func:`hidden_prunable`) own, as ``(parameter attribute, role, dim, positions, channel of each)``: in every
    layer ``l`` their gates' rows of ``weight_ih_l{l}``, ``weight_hh_l{l}`` and both biases (role ``"weight"`` /
    ``"bias"``), their columns of ``weight_hh_l{l}`` (the recurrence) and, above the first layer, of
    ``weight_ih_l{l}`` (the layer below's output): all of them the unit's own, so a unit whose rows are all zero
    outputs exactly 0 at every step from the zero initial state (an LSTM's gates read sigmoid(0) and its cell
    input tanh(0) = 0, so ``c`` and ``h`` stay 0; a GRU's candidate is tanh(0 + r * 0) = 0, so ``h`` = z * h
    stays 0; an RNN's tanh / relu of 0 is 0) and its columns multiply that 0."""
    gates, hidden = GATES[type(module)], module.hidden_size
    rows = torch.cat([index + gate * hidden for gate in range(gates)])
    row_channel = channel.repeat(gates)
    entries = []
    for layer in range(module.num_layers):
        entries += [(f"weight_ih_l{layer}", "weight", 0, rows, row_channel),
                    (f"weight_hh_l{layer}", "weight", 0, rows, row_channel),
                    (f"weight_hh_l{layer}", "weight", 1, index, channel)]
        if layer:
            entries.append((f"weight_ih_l{layer}", "weight", 1, index, channel))
        if module.bias:
            entries += [(f"bias_ih_l{layer}", "bias", 0, rows, row_channel),
                        (f"bias_hh_l{layer}", "bias", 0, rows, row_channel)]
    return entries


def dead_hidden_units(module: nn.RNNBase) -> torch.Tensor:
    """Bool ``[hidden_size]``: the hidden units of a recurrent layer (:func:`hidden_prunable`) whose gate rows are
    zero in every weight and bias of every layer (they output exactly 0, see :func:`hidden_entries`)."""
    gates, hidden = GATES[type(module)], module.hidden_size
    dead = torch.ones(hidden, dtype=torch.bool)
    for name, param in module.named_parameters(recurse=False):
        if name.startswith(("weight_ih", "weight_hh", "bias_ih", "bias_hh")):
            rows = param.detach().reshape(gates, hidden, -1)
            dead &= (rows == 0).all(dim=2).all(dim=0).cpu()
    return dead


class RecurrentPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's pruning function of an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (a customized pruner of
    ``DependencyGraph.build_dependency``). Input features: their columns of the input weights
    (:func:`input_weight_names`) leave and ``input_size`` narrows. Hidden units (one direction,
    :func:`hidden_prunable`), for any number of layers: removing unit ``j`` removes its gate rows from every layer's
    weights and biases and its column from every recurrent weight and from the input weights above the first layer
    (:func:`hidden_entries`). torch-pruning 1.6 traces a GRU or an RNN op by op and cannot map their channels, and
    its own LSTM pruner handles one layer and slices the recurrent weights' rows by the unit, not by its gate rows."""

    TARGET_MODULES = FOLLOWED

    def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        if not hidden_prunable(layer):
            raise NotImplementedError(f"the hidden units of {layer} are not pruned")
        keep = torch.tensor(sorted(set(range(layer.hidden_size)) - set(int(i) for i in idxs)), dtype=torch.long)
        cuts: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for name, _role, dim, index, _channel in hidden_entries(layer, keep, keep):
            cuts.setdefault(name, []).append((dim, index))
        for name, along in cuts.items():
            param = getattr(layer, name)
            for dim, index in along:
                param = self._prune_parameter_and_grad(param, index.tolist(), dim)
            setattr(layer, name, param)  # RNNBase.__setattr__ refreshes its flat weights
        layer.hidden_size = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.input_size)) - set(int(i) for i in idxs))
        for name in input_weight_names(layer):
            setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 1))
        layer.input_size = len(keep)
        return layer

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        return layer.hidden_size

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

__all__ = ["FOLLOWED", "GATES", "PRUNERS", "RECURRENT_FOLLOWED", "RecurrentPruner",
           "dead_hidden_units", "follows_input", "hidden_entries", "hidden_prunable", "input_weight_names",
           "input_weights", "is_recurrent_weight", "one_node"]
