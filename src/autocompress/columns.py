"""Column-pruned layers: :class:`ColumnConv2d`, :class:`ColumnConvNd` (Conv1d / Conv3d / ConvTranspose)
and :class:`ColumnLinear` store only the kept columns of their GEMM matrix (column pruning, AutoCompress,
Liu et al. AAAI 2020, §3).

:mod:`autocompress.compaction` builds them from masked Conv2d / Linear layers;
:mod:`autocompress.architecture` describes and rebuilds them for saving. They hold only tensors and plain
Python values, so compact models pickle, trace, script and export (see :class:`ColumnConv2d`).
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

#: ``ColumnConv2d`` dispatch (measured with benchmarks/column_conv.py, CPU): the kept-column GEMM path is
#: used when fewer than this fraction of the kept input channels' columns is kept and the layer has at least
#: :data:`GEMM_MIN_FILTERS` filters; otherwise the dense conv on the kept input channels (oneDNN's direct
#: conv beats a GEMM on narrow layers).
DENSE_DENSITY_THRESHOLD = 0.7
GEMM_MIN_FILTERS = 128


def gemm_possible(filters: int, area: int, groups: int = 1) -> bool:
    """Whether a :class:`ColumnConv2d` of ``filters`` filters, a kernel of ``area`` positions and ``groups`` conv
    groups can ever run the per-position GEMM over its kept columns (:func:`takes_gemm_path`): a kernel larger
    than 1x1, ``filters >= GEMM_MIN_FILTERS`` and one group. A grouped conv's per-position form (a grouped 1x1 conv
    per kernel position) ran 2-20x slower than its dense conv in onnxruntime and 3.5-105x in eager PyTorch (1
    thread, batch 1: grouped 3x3 convs of 8 and 32 groups, depthwise 3x3 and 5x5;
    ``benchmarks/grouped_column_paths.py``, BENCHMARKS.md session 40), so it never runs unasked."""
    return area > 1 and filters >= GEMM_MIN_FILTERS and groups == 1


def takes_gemm_path(filters: int, area: int, kept_columns: int, kept_channels: int, groups: int = 1) -> bool:
    """Whether a :class:`ColumnConv2d` with ``filters`` filters, a kernel of ``area`` positions, ``groups`` conv
    groups and ``kept_columns`` GEMM columns kept over ``kept_channels`` input channels (per group) that keep a
    column runs the per-position GEMM over the kept columns (``"positions"``) rather than the dense conv on those
    channels: :func:`gemm_possible` and ``kept_columns < DENSE_DENSITY_THRESHOLD * kept_channels * area``.
    Removing an input channel that keeps no column (purification does) changes nothing."""
    return gemm_possible(filters, area, groups) and kept_columns < DENSE_DENSITY_THRESHOLD * kept_channels * area


def executed_columns(filters: int, area: int, kept_columns: int, kept_channels: int, gemm_capable: bool) -> int:
    """GEMM columns per filter that a compact column layer multiplies per output position: ``kept_columns``
    on the per-position GEMM path (:func:`takes_gemm_path`, ``gemm_capable``: a :class:`ColumnConv2d`), else
    the dense conv over the ``kept_channels`` input channels (per group) that keep a column:
    ``kept_channels * area``, which equals ``kept_columns`` for 1x1 kernels and Linear layers (``area`` 1) and
    counts the dropped columns of a kept channel as multiplied (they are, as zeros). MACs of the layer =
    this x filters x output positions (Liu et al. AAAI 2020 count kept columns only, as a GEMM over them
    would run; torch and onnxruntime run the dense conv on narrow layers)."""
    if gemm_capable and takes_gemm_path(filters, area, kept_columns, kept_channels):
        return kept_columns
    return kept_channels * area


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class ColumnConv2d(nn.Module):
    """A Conv2d that stores only its kept GEMM columns (column pruning, AutoCompress §3).

    In the GEMM view a conv weight ``[F, C/groups, kh, kw]`` is a matrix ``[F, K]`` with
    ``K = C/groups*kh*kw``; column ``k = c*kh*kw + i*kw + j`` is input channel ``c`` (within its group)
    at kernel position ``(i, j)``, shared by all ``F`` filters. This module keeps ``K'`` of them:

    * ``weight``: Parameter ``[F, K']``; ``bias``: Parameter ``[F]`` or None;
    * ``column_index``: LongTensor buffer ``[K']``, the GEMM column of each stored column, sorted by
      kernel position then channel (``(k % (kh*kw), k // (kh*kw))``).

    The output equals ``nn.Conv2d`` with the dropped columns set to zero (zero padding or
    ``padding_mode``), for input ``[N, C, H, W]`` -> ``[N, F, Ho, Wo]``. Two exact evaluation paths:

    * ``"dense"``: drop the input channels none of whose columns is kept, then one dense conv on that
      slice with the kept columns gathered into a ``[F, C'/groups, kh, kw]`` weight (zeros elsewhere).
      Best when the kept channels keep most of their columns.
    * ``"positions"``: for every kernel position ``(i, j)`` with kept columns, the shifted input's kept
      channels are gathered, so the kept-column im2col ``[N, K', Ho*Wo]`` is built directly and multiplied
      by ``weight`` in one GEMM (``F*K'*Ho*Wo`` MACs, the GEMM's own count); grouped convs run one grouped
      1x1 conv per position instead, accumulated.

    ``mode="auto"`` picks ``"positions"`` when ``K' < DENSE_DENSITY_THRESHOLD * C'/groups*kh*kw``,
    ``F >= GEMM_MIN_FILTERS`` and the conv is not grouped (kernel larger than 1x1; :func:`takes_gemm_path`), else
    ``"dense"``; the choice
    depends only on the shapes and indices, so it is deterministic. MACs (what
    :func:`autocompress.metrics.count_macs` counts) are those of the path that runs
    (:func:`executed_columns`). The index tensors of both paths are non-persistent buffers
    derived from ``column_index`` (rebuilt by ``load_state_dict``; they follow ``.to(device)``).

    Deployment: the module holds only tensors and plain Python values, so it pickles
    (``torch.save(model)``), and its forward is a pure function of ``weight``, ``bias`` and the buffers
    under ``torch.jit.trace`` / ``torch.jit.script`` / ``torch.export`` / ``torch.compile`` and the ONNX
    exporter (Pad, Slice, Gather, Concat, MatMul, Conv, Add; the constant weight layout folds into
    initializers). Only eager inference (no autograd through ``weight``) keeps the gathered per-path
    weights in a cache, rebuilt when ``weight`` changes (a ``[F, C'*kh*kw]`` gather per call costs up to
    several times the conv on large layers); the cache is never pickled, traced or exported.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 num_columns: int, stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", mode: str = "auto"):
        super().__init__()
        if mode not in ("auto", "dense", "positions"):
            raise ValueError(f"mode must be auto, dense or positions, got {mode!r}")
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.padding_mode, self.mode, self.num_columns = padding_mode, mode, int(num_columns)
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.num_columns))
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        kh, kw = self.kernel_size
        per_group = self.in_channels // self.groups
        first = torch.arange(self.num_columns)  # placeholder until load_state_dict: canonical order
        self.register_buffer("column_index", (first % per_group) * kh * kw + first // per_group)
        self._cache: tuple[torch.Tensor, tuple, list[torch.Tensor]] | None = None
        self._build_plan()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, columns: torch.Tensor, mode: str = "auto") -> "ColumnConv2d":
        """Build from a dense ``conv`` keeping GEMM columns ``columns`` (LongTensor, any order)."""
        kh, kw = conv.kernel_size
        kk = kh * kw
        columns = columns.to(torch.long).cpu()
        order = torch.argsort((columns % kk) * (conv.in_channels // conv.groups) + columns // kk)
        columns = columns[order]
        padding = conv.padding
        if isinstance(padding, str):
            if padding == "same" and any((k - 1) * d % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
                raise UserError(f"conv with padding='same' and an even kernel {conv.kernel_size} cannot be "
                                "column-compacted", "exclude it from column pruning (ignored layers)")
            padding = (0, 0) if padding == "valid" else tuple((k - 1) * d // 2 for k, d in
                                                              zip(conv.kernel_size, conv.dilation))
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, len(columns), conv.stride,
                     padding, conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, mode)
        with torch.no_grad():
            weight = conv.weight.detach().reshape(conv.out_channels, -1)
            module.weight.copy_(weight[:, columns.to(weight.device)])
            if conv.bias is not None:
                module.bias.copy_(conv.bias.detach())
            module.column_index.copy_(columns)
        module._build_plan()
        return module.to(conv.weight.device, conv.weight.dtype)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` ``[F, C/groups, kh, kw]`` with the dropped columns as zeros (exact
        inverse of :meth:`from_conv`); used to start the next AutoCompress round from a compact model."""
        kh, kw = self.kernel_size
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode)
        with torch.no_grad():
            weight = torch.zeros(self.out_channels, self.in_channels // self.groups * kh * kw,
                                 dtype=self.weight.dtype, device=self.weight.device)
            weight[:, self.column_index] = self.weight
            conv.weight.copy_(weight.reshape_as(conv.weight))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.to(self.weight.device, self.weight.dtype)

    def config(self) -> dict:
        """Constructor arguments as plain data (for ``architecture.describe_architecture``)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "num_columns": self.num_columns,
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "bias": self.bias is not None, "padding_mode": self.padding_mode,
                "mode": self.mode}

    def _build_plan(self) -> None:
        """Derive both evaluation paths from ``column_index`` (also after ``load_state_dict``).

        Sets ``path`` and the non-persistent LongTensor buffers ``dense_gather`` ``[C'/g*kh*kw]`` (stored
        column of each entry of the dense path's kernel, ``K'`` = a zero), ``dense_input`` ``[C']`` (kept
        input channels, selected when ``_dense_subset``) and ``position_channels`` (the input channels each kernel
        position gathers, concatenated); ``_positions`` holds plain ints per kernel position:
        ``(i, j, first stored column, end, first entry of position_channels, end or -1 for all channels)``.
        """
        kh, kw = self.kernel_size
        kk, per_group = kh * kw, self.in_channels // self.groups
        index = self.column_index.detach().cpu()
        channel, position = index // kk, index % kk
        key = position * per_group + channel
        if index.numel() == 0 or bool((key[1:] <= key[:-1]).any()) or int(index.max()) >= per_group * kk:
            raise UserError(f"ColumnConv2d column_index is empty, unsorted or out of range "
                            f"(K={per_group * kk}, K'={index.numel()})",
                            "rebuild the layer with ColumnConv2d.from_conv")
        kept = torch.unique(channel)
        if self.mode == "auto":
            gemm = takes_gemm_path(self.out_channels, kk, index.numel(), kept.numel(), self.groups)
            self.path = "positions" if gemm else "dense"
        else:
            self.path = self.mode
        rank = torch.full((per_group,), -1, dtype=torch.long)
        rank[kept] = torch.arange(kept.numel())
        gather = torch.full((kept.numel() * kk,), index.numel(), dtype=torch.long)
        gather[rank[channel] * kk + position] = torch.arange(index.numel())
        self._dense_channels = kept.numel()
        self._positions: list[tuple[int, int, int, int, int, int]] = []
        channels: list[torch.Tensor] = []
        offset = 0
        for p in torch.unique(position).tolist():
            sel = torch.nonzero(position == p).flatten()
            chosen = self._global_channels(channel[sel], per_group)
            end = -1 if chosen.numel() == self.in_channels else offset + chosen.numel()
            self._positions.append((p // kw, p % kw, int(sel[0]), int(sel[-1]) + 1, offset, end))
            if end >= 0:
                channels.append(chosen)
                offset = end
        self._dense_subset = kept.numel() < per_group
        device = self.column_index.device
        self.register_buffer("dense_gather", gather.to(device), persistent=False)
        self.register_buffer("dense_input", self._global_channels(kept, per_group).to(device), persistent=False)
        self.register_buffer("position_channels", torch.cat(channels + [index[:0]]).to(device),
                             persistent=False)
        self._cache = None

    def _global_channels(self, local: torch.Tensor, per_group: int) -> torch.Tensor:
        """Input channels ``[g*per_group + c for g for c in local]`` (LongTensor)."""
        offsets = torch.arange(self.groups).unsqueeze(1) * per_group
        return (offsets + local.unsqueeze(0)).flatten()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._build_plan()  # a loaded column_index changes both paths

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._cache = None  # ``.to()`` may swap ``weight.data`` in place
        return result

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # derived tensors: rebuilt on first use, never pickled
        return state

    def _build_weights(self) -> list[torch.Tensor]:
        """The current path's weights: ``[dense [F, C'/g, kh, kw]]``, per-position ``[F, C_p, 1, 1]`` for
        grouped convs, or ``[]`` (the GEMM multiplies ``weight`` as stored, position-major columns)."""
        if self.path == "dense":
            kh, kw = self.kernel_size
            padded = torch.cat([self.weight, torch.zeros_like(self.weight[:, :1])], dim=1)
            dense = padded.index_select(1, self.dense_gather)
            return [dense.reshape(self.out_channels, self._dense_channels, kh, kw)]
        if self.groups == 1:
            return []
        return [self.weight[:, start:end].reshape(self.out_channels, -1, 1, 1)
                for _, _, start, end, _, _ in self._positions]

    @torch.jit.unused
    def _cacheable(self) -> bool:
        """Eager inference only: no autograd through ``weight``, not traced / compiled / exported."""
        return (not (torch.is_grad_enabled() and self.weight.requires_grad) and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling())

    @torch.jit.unused
    def _cached_weights(self) -> list[torch.Tensor]:
        """:meth:`_build_weights`, reused while ``weight`` is the same tensor with the same storage,
        version (in-place updates), dtype and device."""
        key = (self.path, self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device)
        if self._cache is None or self._cache[0] is not self.weight or self._cache[1] != key:
            self._cache = (self.weight, key, self._build_weights())
        return self._cache[2]

    def _weights(self) -> list[torch.Tensor]:
        if torch.jit.is_scripting():
            return self._build_weights()
        return self._cached_weights() if self._cacheable() else self._build_weights()

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        if ph == 0 and pw == 0:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, (pw, pw, ph, ph), mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self._weights()
        if self.path == "dense":
            if self._dense_subset:
                x = x.index_select(1, self.dense_input)
            if self.padding_mode == "zeros":
                return F.conv2d(x, weights[0], self.bias, self.stride, self.padding, self.dilation, self.groups)
            return F.conv2d(self._pad(x), weights[0], self.bias, self.stride, 0, self.dilation, self.groups)
        x = self._pad(x)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        height, width = x.shape[-2], x.shape[-1]
        shifted: list[torch.Tensor] = []
        for i, j, _, _, first, end in self._positions:
            view = x[:, :, i * dh: height - (kh - 1 - i) * dh: sh, j * dw: width - (kw - 1 - j) * dw: sw]
            shifted.append(view if end < 0 else view.index_select(1, self.position_channels[first:end]))
        if self.groups == 1:  # one GEMM as a 1x1 conv [F, K', 1, 1] over the kept-column im2col [N, K', Ho, Wo]
            # (a matmul over flattened positions exported to ONNX with the batch size folded in as a constant)
            out = F.conv2d(torch.cat(shifted, dim=1), self.weight[:, :, None, None])
        else:  # grouped: one grouped 1x1 conv per kernel position, accumulated
            out = F.conv2d(shifted[0], weights[0], None, 1, 0, 1, self.groups)
            for view, weight in zip(shifted[1:], weights[1:]):
                out = out + F.conv2d(view, weight, None, 1, 0, 1, self.groups)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"columns={self.num_columns}/{self.in_channels // self.groups * kh * kw}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"path={_PATH_NAMES[self.path]}")


#: ``repr`` of the evaluation paths ("dense" alone read as if the layer ran as a full nn.Conv2d)
_PATH_NAMES = {"dense": "conv over kept input channels", "positions": "per-position GEMM"}


class ColumnLinear(nn.Module):
    """A Linear that stores only its kept input features (columns of ``[out, in]``).

    ``weight``: Parameter ``[out_features, K']``; ``bias``: ``[out_features]`` or None;
    ``column_index``: sorted LongTensor buffer ``[K']`` of kept input features. Input ``[..., in_features]``
    -> output ``[..., out_features]`` (index_select on the last dim, then a matmul).
    """

    def __init__(self, in_features: int, out_features: int, num_columns: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.num_columns = int(in_features), int(out_features), int(num_columns)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.num_columns))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self.register_buffer("column_index", torch.arange(self.num_columns, dtype=torch.long))

    @classmethod
    def from_linear(cls, linear: nn.Linear, columns: torch.Tensor) -> "ColumnLinear":
        """Build from a dense ``linear`` keeping input features ``columns`` (LongTensor)."""
        columns = torch.sort(columns.to(torch.long).cpu()).values
        module = cls(linear.in_features, linear.out_features, len(columns), linear.bias is not None)
        with torch.no_grad():
            module.weight.copy_(linear.weight.detach()[:, columns.to(linear.weight.device)])
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
            module.column_index.copy_(columns)
        return module.to(linear.weight.device, linear.weight.dtype)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` ``[out, in]`` with the dropped input features as zero columns."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device,
                           dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.zero_()
            linear.weight[:, self.column_index] = self.weight
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def config(self) -> dict:
        """Constructor arguments as plain data."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "num_columns": self.num_columns, "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.column_index), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, columns={self.num_columns}"


_CONV_FN = {(1, False): F.conv1d, (2, False): F.conv2d, (3, False): F.conv3d,
            (1, True): F.conv_transpose1d, (2, True): F.conv_transpose2d, (3, True): F.conv_transpose3d}
#: (spatial dims, transposed) -> dense layer class
CONV_LAYERS = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
             (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}


class ColumnConvNd(nn.Module):
    """A Conv1d / Conv3d or a ConvTranspose1d/2d/3d (groups 1) that stores only its kept GEMM columns
    (column pruning, AutoCompress §3).

    GEMM view of a weight ``[F, C/groups, *k]`` (transposed: ``[C, F, *k]`` transposed to ``[F, C, *k]``):
    ``[F, K]`` with ``K = C/groups * prod(k)``; column ``c * prod(k) + p`` is input channel ``c`` (within its
    group) at flattened kernel position ``p``.

    * ``weight``: Parameter ``[F, K']``; ``bias``: ``[F]`` or None;
    * ``column_index``: sorted LongTensor buffer ``[K']`` of the kept GEMM columns.

    Forward (input ``[N, C, *spatial]`` -> ``[N, F, *spatial_out]``): the input channels with a kept column
    are gathered, the kept columns are scattered into a dense weight over them (``scatter``; exported in the
    :meth:`gathered` form, that weight built once) and one dense (transposed) convolution runs — the same output
    as the layer with the dropped columns zero; its MACs are those of that conv (:func:`executed_columns`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], num_columns: int,
                 stride: Sequence[int], padding: Sequence[int] | str, dilation: Sequence[int], groups: int = 1,
                 bias: bool = True, padding_mode: str = "zeros", reversed_padding: Sequence[int] = (),
                 transposed: bool = False, output_padding: Sequence[int] = ()):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.padding_mode, self.reversed_padding = padding_mode, tuple(reversed_padding)
        self.transposed, self.output_padding = bool(transposed), tuple(output_padding)
        self.num_columns = int(num_columns)
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.num_columns))
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        self.register_buffer("column_index", torch.arange(self.num_columns, dtype=torch.long))
        # derived from column_index by _plan (also after load_state_dict), so not saved
        self.register_buffer("input_channels", torch.arange(self.in_channels, dtype=torch.long), persistent=False)
        self.register_buffer("dense_columns", torch.arange(self.num_columns, dtype=torch.long), persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._plan()  # a loaded column_index changes the derived buffers (no lambda hook: picklable)

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, columns: torch.Tensor) -> "ColumnConvNd":
        """Build from a dense Conv1d / Conv3d / ConvTranspose keeping GEMM columns ``columns`` (LongTensor,
        any order)."""
        columns = torch.sort(columns.to(torch.long).cpu()).values
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, len(columns), conv.stride,
                     conv.padding, conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                     conv._reversed_padding_repeated_twice, conv.transposed, conv.output_padding)
        with torch.no_grad():
            module.weight.copy_(gemm_matrix(conv)[:, columns.to(conv.weight.device)])
            if conv.bias is not None:
                module.bias.copy_(conv.bias.detach())
            module.column_index.copy_(columns)
        module._plan()
        return module.to(conv.weight.device, conv.weight.dtype)

    def _plan(self) -> None:
        """Kept input channels (all groups) and each stored column's place in the narrowed dense weight."""
        area, per_group = math.prod(self.kernel_size), self.in_channels // self.groups
        index = self.column_index.detach().cpu()
        kept = torch.unique(index // area)
        rank = torch.full((per_group,), -1, dtype=torch.long)
        rank[kept] = torch.arange(kept.numel())
        device = self.column_index.device
        self.input_channels = (torch.arange(self.groups).unsqueeze(1) * per_group + kept).flatten().to(device)
        self.dense_columns = (rank[index // area] * area + index % area).to(device)

    def _dense_weight(self) -> torch.Tensor:
        channels = self.input_channels.numel() // self.groups
        columns = self.dense_columns.unsqueeze(0).expand(self.out_channels, -1)
        dense = self.weight.new_zeros(self.out_channels, channels * math.prod(self.kernel_size))
        dense = dense.scatter(1, columns, self.weight).reshape(self.out_channels, channels, *self.kernel_size)
        return dense.transpose(0, 1) if self.transposed else dense

    def gathered(self) -> "GatheredConv":
        """The same function as a :class:`GatheredConv`: the dense weight over the kept input channels built
        once (an exported graph then holds that weight, not the stored columns, their int64 places and a
        zero weight to scatter them into: a fresh user's ONNX file was 1.1x smaller than its base's at 4x fewer
        parameters)."""
        conv = self._conv(self.input_channels.numel())
        with torch.no_grad():
            conv.weight.copy_(self._dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return GatheredConv(self.input_channels.clone(), conv)

    def _conv(self, in_channels: int) -> nn.modules.conv._ConvNd:
        """A fresh dense (transposed) convolution with this layer's settings taking ``in_channels`` channels, on
        its device and dtype: :meth:`to_dense` (every input channel) and :meth:`gathered` (the kept ones) fill
        it."""
        cls = CONV_LAYERS[len(self.kernel_size), self.transposed]
        extra = {"output_padding": self.output_padding} if self.transposed else {}
        return cls(in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
                   dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
                   padding_mode=self.padding_mode, **extra).to(self.weight.device, self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.index_select(1, self.input_channels)
        conv = _CONV_FN[len(self.kernel_size), self.transposed]
        if self.transposed:
            return conv(x, self._dense_weight(), self.bias, self.stride, self.padding, self.output_padding,
                        self.groups, self.dilation)
        if self.padding_mode != "zeros":
            x = F.pad(x, self.reversed_padding, mode=self.padding_mode)
            return conv(x, self._dense_weight(), self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, self._dense_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def to_dense(self) -> nn.modules.conv._ConvNd:
        """The equivalent dense layer (``nn.Conv1d`` / ``nn.Conv3d`` / ``nn.ConvTranspose*``) with the
        dropped columns as zeros."""
        conv = self._conv(self.in_channels)
        with torch.no_grad():
            weight = torch.zeros(self.out_channels, gemm_matrix(conv).shape[1],
                                 dtype=self.weight.dtype, device=self.weight.device)
            weight[:, self.column_index] = self.weight
            weight = weight.reshape(self.out_channels, -1, *self.kernel_size)
            conv.weight.copy_(weight.transpose(0, 1) if self.transposed else weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.to(self.weight.device, self.weight.dtype)

    def config(self) -> dict:
        """Constructor arguments as plain data (for ``serialization.describe_architecture``)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "num_columns": self.num_columns,
                "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "padding_mode": self.padding_mode, "reversed_padding": list(self.reversed_padding),
                "transposed": self.transposed, "output_padding": list(self.output_padding)}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"columns={self.num_columns}/{self.in_channels // self.groups * math.prod(self.kernel_size)}"
                + (", transposed" if self.transposed else ""))


def gemm_matrix(layer: nn.Module) -> torch.Tensor:
    """A Conv / Linear weight in the GEMM view ``[out, K]`` (a transposed conv's ``[C, F, *k]`` transposed
    first), detached."""
    weight = layer.weight.detach()
    if getattr(layer, "transposed", False):
        weight = weight.transpose(0, 1)
    return weight.reshape(weight.shape[0], -1)


class GatheredConv(nn.Module):
    """A dense convolution over some input channels: ``conv(x[:, channels])`` (input ``[N, C, *spatial]``,
    ``channels`` LongTensor buffer ``[C']``, ``conv`` a Conv1d/2d/3d or ConvTranspose taking ``C'`` channels).
    The export form of a :class:`ColumnConvNd` (:meth:`ColumnConvNd.gathered`; ONNX: one Gather and one Conv)."""

    def __init__(self, channels: torch.Tensor, conv: nn.Module):
        super().__init__()
        self.register_buffer("channels", channels.to(torch.long))
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.index_select(1, self.channels))


def export_form(model: nn.Module) -> nn.Module:
    """``model`` with each :class:`ColumnConvNd` as its :meth:`~ColumnConvNd.gathered` form: a copy, or
    ``model`` itself where it has none. The same function; what ONNX and ``torch.export`` files hold."""
    if isinstance(model, ColumnConvNd):
        return model.gathered()
    names = [name for name, module in model.named_modules() if isinstance(module, ColumnConvNd)]
    if not names:
        return model
    model = copy.deepcopy(model)
    for name in names:
        model.set_submodule(name, model.get_submodule(name).gathered())
    return model


__all__ = ["CONV_LAYERS", "ColumnConv2d", "ColumnConvNd", "ColumnLinear", "DENSE_DENSITY_THRESHOLD",
           "GEMM_MIN_FILTERS", "GatheredConv", "export_form", "gemm_matrix"]
