"""Sparse storage of irregularly pruned weights: a state_dict in CSR form (int32 indices), plain data that
loads with ``weights_only=True``. A checkpoint whose ``state_dict`` is in this form is decoded on load
(:func:`autocompress.checkpoint.load_checkpoint`), so an irregularly pruned model's file size follows its
non-zero count."""
from __future__ import annotations

import math

import torch

from .errors import UserError

FORMAT = "autocompress-sparse"


def is_sparse(state: object) -> bool:
    """Whether ``state`` is the output of :func:`to_sparse_state_dict`."""
    return isinstance(state, dict) and state.get("format") == FORMAT


def to_sparse_state_dict(state_dict: dict[str, torch.Tensor], *, min_sparsity: float = 0.5) -> dict:
    """Sparse export of irregularly pruned weights: CSR with int32 indices.

    A floating tensor with at least ``min_sparsity`` zeros is stored as its 2-D view ``[shape[0], -1]`` in
    CSR form (``crow_indices`` int32 ``[rows+1]``, ``col_indices`` int32 ``[nnz]``, ``values`` ``[nnz]``);
    at 4-byte values this is smaller than dense above 50 % zeros. Other tensors are kept as they are.

    Returns ``{"format": "autocompress-sparse", "dense": {name: tensor}, "sparse": {name: {"shape": list,
    "crow_indices", "col_indices", "values"}}}`` (plain data, loadable with ``weights_only=True``).
    """
    dense, sparse = {}, {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dim() >= 1 and tensor.numel() > 0 \
                and float((tensor == 0).float().mean()) >= min_sparsity:
            matrix = tensor.reshape(tensor.shape[0], -1)
            nonzero = matrix != 0
            crow = torch.zeros(matrix.shape[0] + 1, dtype=torch.int32)
            crow[1:] = nonzero.sum(dim=1).cumsum(0)
            sparse[name] = {"shape": list(tensor.shape), "crow_indices": crow,
                            "col_indices": torch.nonzero(nonzero)[:, 1].to(torch.int32),
                            "values": matrix[nonzero].clone()}
        else:
            dense[name] = tensor
    return {"format": FORMAT, "dense": dense, "sparse": sparse}


def from_sparse_state_dict(sparse_state: dict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_sparse_state_dict`: a dense state_dict (same names and values)."""
    if not isinstance(sparse_state, dict) or sparse_state.get("format") != FORMAT:
        raise UserError("not an autocompress sparse state_dict", "write it with to_sparse_state_dict")
    state = dict(sparse_state["dense"])
    for name, entry in sparse_state["sparse"].items():
        shape, values = entry["shape"], entry["values"]
        dense = values.new_zeros(shape[0], math.prod(shape[1:]))
        rows = torch.repeat_interleave(torch.arange(shape[0]), entry["crow_indices"].long().diff())
        dense[rows, entry["col_indices"].long()] = values
        state[name] = dense.reshape(shape)
    return state
