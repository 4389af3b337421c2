"""Physical compaction: turn a masked model into a smaller one that computes the same (brief §2, §7).

AutoCompress (Liu et al., AAAI 2020, §3 "hybrid structured pruning") prunes rows (filters) and columns
of each layer's GEMM matrix. This module makes that pruning physical:

* **Filters / channels.** An output channel whose producing weight rows are all zero (and whose biases
  and normalisation affine entries are zero, so the channel outputs exactly 0) is removed with
  torch-pruning's ``DependencyGraph``; coupled layers (residual adds, concatenation, depthwise convs,
  BatchNorm, Conv -> Flatten -> Linear) lose the same channels together.
* **Columns.** A Conv2d whose GEMM view ``weight.reshape(F, C/groups*kh*kw)`` has all-zero columns is
  replaced by :class:`ColumnConv2d`, which stores only the ``K'`` kept columns (a Conv1d / Conv3d by
  :class:`ColumnConvNd`); a Linear with all-zero input columns becomes :class:`ColumnLinear`.
* **Irregular** zeros stay in dense tensors (``serialization.to_sparse_state_dict`` exports them sparse).

The result is checked in eval mode against the masked model; see :func:`compact`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .analysis import analysis_mode, hooked_forward
from .errors import UserError
from .space import is_transposed, is_weight_layer, out_dim, trace_graph, train_only_modules

#: ``ColumnConv2d`` dispatch (measured with benchmarks/column_conv.py, CPU): the kept-column GEMM path is
#: used when fewer than this fraction of the kept input channels' columns is kept and the layer has at least
#: :data:`GEMM_MIN_FILTERS` filters; otherwise the dense conv on the kept input channels (oneDNN's direct
#: conv beats a GEMM on narrow layers).
DENSE_DENSITY_THRESHOLD = 0.7
GEMM_MIN_FILTERS = 128


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
      slice with the kept columns scattered into a ``[F, C'/groups, kh, kw]`` weight. Best when the kept
      channels keep most of their columns.
    * ``"positions"``: for every kernel position ``(i, j)`` with kept columns, the shifted input's kept
      channels are gathered, so the kept-column im2col ``[N, K', Ho*Wo]`` is built directly and multiplied
      by ``weight`` in one GEMM (``F*K'*Ho*Wo`` MACs, the GEMM's own count); grouped convs run one grouped
      1x1 conv per position instead, accumulated.

    ``mode="auto"`` picks ``"positions"`` when ``K' < DENSE_DENSITY_THRESHOLD * C'/groups*kh*kw`` and
    ``F >= GEMM_MIN_FILTERS`` (kernel larger than 1x1), else ``"dense"``; the choice depends only on the
    shapes and indices, so it is deterministic. In eval / no-grad use the per-path weights are cached and
    rebuilt when ``weight`` changes. Every op (Pad, Slice, Gather, Concat, MatMul, Conv, Add) exports to ONNX.
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
        self._cache: tuple[Any, Any] | None = None
        self._build_plan()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._build_plan())

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

    def gemm_macs(self, output: torch.Tensor) -> int:
        """MACs of one call that produced ``output`` ``[N, F, Ho, Wo]``: ``N * F * K' * Ho * Wo``
        (kept columns only). :func:`autocompress.metrics.count_macs` reports this, whichever path runs:
        the ``"dense"`` path may also multiply the zero columns of kept input channels when that is
        faster on the CPU; latency is measured, never derived from MACs."""
        n, _, ho, wo = output.shape
        return int(n * self.out_channels * self.num_columns * ho * wo)

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

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._build_plan()  # index tensors follow the module's device
        return result

    def config(self) -> dict:
        """Constructor arguments as plain data (for ``serialization.describe_architecture``)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "num_columns": self.num_columns,
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "bias": self.bias is not None, "padding_mode": self.padding_mode,
                "mode": self.mode}

    def _build_plan(self) -> None:
        """Derive both evaluation paths from ``column_index`` (also after ``load_state_dict``)."""
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
        density = index.numel() / (kept.numel() * kk)
        if self.mode == "auto":
            gemm = kk > 1 and density < DENSE_DENSITY_THRESHOLD and self.out_channels >= GEMM_MIN_FILTERS
            self.path = "positions" if gemm else "dense"
        else:
            self.path = self.mode
        rank = torch.full((per_group,), -1, dtype=torch.long)
        rank[kept] = torch.arange(kept.numel())
        self._dense_columns = rank[channel] * kk + position  # into [C'/groups * kh * kw]
        self._dense_channels = kept.numel()
        self._dense_input = self._global_channels(kept, per_group)
        self._positions = []  # (i, j, start, end, global input channels or None)
        for p in torch.unique(position).tolist():
            sel = torch.nonzero(position == p).flatten()
            self._positions.append((p // kw, p % kw, int(sel[0]), int(sel[-1]) + 1,
                                    self._global_channels(channel[sel], per_group)))
        self._cache = None

    def _global_channels(self, local: torch.Tensor, per_group: int) -> torch.Tensor | None:
        """Input channels ``[g*per_group + c for g for c in local]``, or None when that is all of them."""
        if local.numel() == per_group:
            return None
        offsets = torch.arange(self.groups).unsqueeze(1) * per_group
        return (offsets + local.unsqueeze(0)).flatten().to(self.column_index.device)

    def _weights(self) -> Any:
        """The current path's weights: a dense ``[F, C'/g, kh, kw]`` tensor or per-position ``[F, C_p, 1, 1]``."""
        key = (self.path, self.weight.data_ptr(), self.weight._version, self.weight.dtype)
        cacheable = not (torch.is_grad_enabled() and self.weight.requires_grad)
        if cacheable and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        kh, kw = self.kernel_size
        if self.path == "dense":
            dense = self.weight.new_zeros(self.out_channels, self._dense_channels * kh * kw)
            dense = dense.index_copy(1, self._dense_columns.to(self.weight.device), self.weight)
            weights: Any = dense.reshape(self.out_channels, self._dense_channels, kh, kw)
        elif self.groups == 1:
            weights = None  # the GEMM uses ``weight`` as stored (position-major columns)
        else:
            weights = [self.weight[:, start:end].reshape(self.out_channels, -1, 1, 1).contiguous()
                       for _, _, start, end, _ in self._positions]
        if cacheable:
            self._cache = (key, weights)
        return weights

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        if ph == 0 and pw == 0:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, (pw, pw, ph, ph), mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self._weights()
        if self.path == "dense":
            if self._dense_input is not None:
                x = x.index_select(1, self._dense_input)
            if self.padding_mode == "zeros":
                return F.conv2d(x, weights, self.bias, self.stride, self.padding, self.dilation, self.groups)
            return F.conv2d(self._pad(x), weights, self.bias, self.stride, 0, self.dilation, self.groups)
        x = self._pad(x)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        height, width = x.shape[-2], x.shape[-1]
        shifted = []
        for i, j, _, _, channels in self._positions:
            view = x[:, :, i * dh: height - (kh - 1 - i) * dh: sh, j * dw: width - (kw - 1 - j) * dw: sw]
            shifted.append(view if channels is None else view.index_select(1, channels))
        if self.groups == 1:  # one GEMM: [F, K'] @ [N, K', Ho*Wo], the kept-column im2col built directly
            cols = torch.cat(shifted, dim=1)
            out = torch.matmul(self.weight, cols.flatten(2)).unflatten(2, cols.shape[2:])
        else:  # grouped: one grouped 1x1 conv per kernel position, accumulated
            out = None
            for view, weight in zip(shifted, weights):
                term = F.conv2d(view, weight, None, 1, 0, 1, self.groups)
                out = term if out is None else out + term
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"columns={self.num_columns}/{self.in_channels // self.groups * kh * kw}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, path={self.path}")


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
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        with torch.no_grad():
            linear.weight.zero_()
            linear.weight[:, self.column_index] = self.weight
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.to(self.weight.device, self.weight.dtype)

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
_CONV_CLS = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
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
    are gathered, the kept columns are scattered into a dense weight over them (``scatter``, exported to
    ONNX as ScatterElements) and one dense (transposed) convolution runs — the same output as the layer
    with the dropped columns zero. :meth:`gemm_macs` declares the kept-column MACs.
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
        self.register_load_state_dict_post_hook(lambda module, _keys: module._plan())

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, columns: torch.Tensor) -> "ColumnConvNd":
        """Build from a dense Conv1d / Conv3d / ConvTranspose keeping GEMM columns ``columns`` (LongTensor,
        any order)."""
        columns = torch.sort(columns.to(torch.long).cpu()).values
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, len(columns), conv.stride,
                     conv.padding, conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                     conv._reversed_padding_repeated_twice, conv.transposed, conv.output_padding)
        with torch.no_grad():
            module.weight.copy_(_gemm(conv)[:, columns.to(conv.weight.device)])
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

    def gemm_macs(self, output: torch.Tensor) -> int:
        """MACs of one call that produced ``output`` ``[N, F, *spatial]``: ``N * F * K' * prod(positions)``
        with the output positions (a transposed conv: the input positions, each scattering its taps)."""
        spatial = output.shape[2:]
        if self.transposed:
            spatial = [(o - 1 - op - d * (k - 1) + 2 * p) // s + 1 for o, op, d, k, p, s in
                       zip(spatial, self.output_padding, self.dilation, self.kernel_size, self.padding, self.stride)]
        return int(output.shape[0] * self.out_channels * self.num_columns * math.prod(spatial))

    def _dense_weight(self) -> torch.Tensor:
        channels = self.input_channels.numel() // self.groups
        columns = self.dense_columns.unsqueeze(0).expand(self.out_channels, -1)
        dense = self.weight.new_zeros(self.out_channels, channels * math.prod(self.kernel_size))
        dense = dense.scatter(1, columns, self.weight).reshape(self.out_channels, channels, *self.kernel_size)
        return dense.transpose(0, 1) if self.transposed else dense

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
        cls = _CONV_CLS[len(self.kernel_size), self.transposed]
        extra = {"output_padding": self.output_padding} if self.transposed else {}
        conv = cls(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
                   dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
                   padding_mode=self.padding_mode, **extra)
        with torch.no_grad():
            weight = torch.zeros(self.out_channels, _gemm(conv).shape[1],
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


def _gemm(layer: nn.Module) -> torch.Tensor:
    """A Conv / Linear weight in the GEMM view ``[out, K]`` (a transposed conv's ``[C, F, *k]`` transposed
    first), detached."""
    weight = layer.weight.detach()
    if getattr(layer, "transposed", False):
        weight = weight.transpose(0, 1)
    return weight.reshape(weight.shape[0], -1)


def densify(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every :class:`ColumnConv2d` / :class:`ColumnConvNd` /
    :class:`ColumnLinear` replaced by its dense equivalent (zero columns), computing the same outputs.
    Channels removed by compaction stay removed. The next AutoCompress round prunes this model (its zero columns score lowest)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (ColumnConv2d, ColumnConvNd, ColumnLinear)):
            model.set_submodule(name, module.to_dense())
    return model


@dataclasses.dataclass
class CompactResult:
    """Result of :func:`compact`.

    Attributes:
        model: the compact model (a deep copy; eval mode).
        architecture: ``serialization.describe_architecture(model, reference=original)`` (plain data).
        report: plain data: ``params_before`` / ``params_after`` (parameters), ``removed_channels``
            (root module name -> number of channels removed from its coupled group), ``column_layers``
            (module name -> ``[kept columns, total columns]``), ``dead_channels_kept`` (module name ->
            why its all-zero rows / columns stay dense), ``max_abs_diff`` and ``tolerance`` of the output
            check.
    """

    model: nn.Module
    architecture: dict
    report: dict


def _as_tuple(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _flat_outputs(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    return [t for item in output for t in _flat_outputs(item)]


def _apply_masks(model: nn.Module, param_masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in param_masks.items():
            if name not in params:
                raise UserError(f"mask given for {name!r}, which is not a parameter of the model",
                                "build the masks from this model (PruningSpace.param_masks)")
            if tuple(mask.shape) != tuple(params[name].shape):
                raise UserError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter "
                                f"{tuple(params[name].shape)}", "build the masks from this model")
            params[name].mul_(mask.to(params[name].device, params[name].dtype))


def _zero_slices(tensor: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    """Bool [tensor.shape[dim]]: the slice along ``dim`` is entirely zero (True when tensor is None)."""
    if tensor is None:
        return torch.ones(0, dtype=torch.bool)
    moved = tensor.detach().movedim(dim, 0).reshape(tensor.shape[dim], -1)
    return (moved == 0).all(dim=1).cpu()


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
            and module.groups == module.in_channels == module.out_channels > 1)


_STATISTIC_NORMS = (nn.LayerNorm, nn.GroupNorm)
_PER_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _called_modules(model: nn.Module, inputs: tuple) -> dict[nn.Module, int]:
    """Module -> number of forward calls on ``inputs`` (modules used only through their parameters, such as
    MultiheadAttention's out_proj, are absent)."""
    counts: dict[nn.Module, int] = {}

    def hook(module, _inputs, _output):
        counts[module] = counts.get(module, 0) + 1

    hooked_forward(model, inputs, {m: hook for m in model.modules()})
    return counts


def _group_plan(dg: tp.DependencyGraph, group, names: dict) -> tuple[list[int], str | None]:
    """Channels (root indices) of a full-index group that are dead (output exactly 0) and removable.

    A channel is dead when every producer's weight row and bias entry is zero and every per-channel member
    keeps it at zero (BatchNorm / InstanceNorm affine entries zero, depthwise bias zero, free per-channel
    parameters zero): an all-zero conv row followed by an intact BatchNorm outputs the BatchNorm's shift, so
    it is not dead and stays. Members whose pruned dimension has one entry while the group has more
    broadcast over the channels (a spatial gate) and are ignored.

    Returns:
        ``(root indices to remove, reason the dead channels are kept or None)``: the channels are kept
        (dense) when they reach a model output or pass through a structure that cannot lose channels
        exactly (grouped convs, LayerNorm / GroupNorm, unknown modules with parameters), or are all of them.
    """
    size = len(group[0].root_idxs)
    dead = torch.ones(size, dtype=torch.bool)
    has_producer = False
    members = []
    for item in group.items:
        dep, module, node = item.dep, item.dep.target.module, item.dep.target
        idxs = torch.tensor(item.idxs, dtype=torch.long)
        if _broadcast(item, dg, size):
            continue
        members.append((module, node, torch.tensor(item.root_idxs, dtype=torch.long), idxs,
                        dg.is_out_channel_pruning_fn(dep.handler)))
    for module, node, root, idxs, is_out in members:
        row = torch.ones(size, dtype=torch.bool)
        if is_out and is_weight_layer(module) and not _is_depthwise(module):
            has_producer = True
            zero = _zero_slices(module.weight, out_dim(module))
            if module.bias is not None:
                zero &= _zero_slices(module.bias, 0)
            row[root] = zero[idxs]
        elif is_out and not is_weight_layer(module):
            for tensor, dim in _per_channel_tensors(module, node):
                row[root] &= _zero_slices(tensor, dim)[idxs]
        elif _is_depthwise(module) and module.bias is not None:
            row[root] = _zero_slices(module.bias, 0)[idxs]
        dead &= row
    if not has_producer or not bool(dead.any()):
        return [], None
    root_name = names.get(group[0].dep.target.module)
    for module, node, root, idxs, is_out in members:
        if not bool(dead[root].any()):
            continue
        name = names.get(module, "a parameter")
        if node.type == tp.ops.OPTYPE.OUTPUT or (is_out and not node.outputs):
            return [], f"channels are outputs of the model at {name}"
        if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups and not _is_depthwise(module):
            return [], f"they pass through grouped conv {name} (groups={module.groups})"
        if isinstance(module, _STATISTIC_NORMS):
            return [], f"{type(module).__name__} {name} normalises over the channels"
        if (is_out and not is_weight_layer(module) and not isinstance(module, nn.Parameter)
                and not isinstance(module, (*_PER_CHANNEL_NORMS, nn.PReLU)) and list(module.parameters())):
            return [], f"they pass through {type(module).__name__} {name}"
    if bool(dead.all()):
        return [], f"every channel of the group rooted at {root_name!r} is zero; the layers stay dense"
    return torch.nonzero(dead).flatten().tolist(), None


def _broadcast(item, dg: tp.DependencyGraph, size: int) -> bool:
    """A group member whose pruned dimension has one entry while the group has more (a one-channel
    spatial gate multiplied over all channels): it does not couple, and pruning it would empty it."""
    extent = _pruned_extent(item.dep.target.module, item.dep.target, dg.is_out_channel_pruning_fn(item.dep.handler))
    return extent == 1 < size


def _pruned_extent(module, node, is_out: bool) -> int | None:
    """Length of the dimension torch-pruning prunes in ``module`` (None for parameter-free ops)."""
    if isinstance(module, nn.Parameter):
        return module.shape[getattr(node, "pruning_dim", 0)]
    if is_weight_layer(module):
        if isinstance(module, nn.Linear):
            return module.out_features if is_out else module.in_features
        return module.out_channels if is_out or _is_depthwise(module) else module.in_channels
    weight = getattr(module, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def _per_channel_tensors(module, node) -> list[tuple[torch.Tensor, int]]:
    """(tensor, channel dim) pairs that must be zero for a channel to stay zero through ``module``; a
    tensor of ones marks a channel that can never stay zero (BatchNorm without affine: ``BN(0) != 0``)."""
    if isinstance(module, nn.Parameter):
        dim = getattr(node, "pruning_dim", 0)
        return [(module, dim % module.dim())]
    if isinstance(module, _PER_CHANNEL_NORMS):
        if module.affine:
            return [(module.weight, 0), (module.bias, 0)]
        if module.running_mean is not None:
            return [(torch.ones(module.num_features), 0)]
    return []


def _remove_channels(model: nn.Module, inputs: tuple, report: dict, train_only: set[nn.Module]
                     ) -> dict[str, torch.Tensor]:
    """Remove dead channels with torch-pruning; returns module name -> kept output channel indices."""
    names = {module: name for name, module in model.named_modules()}
    candidates = [m for m in model.modules() if is_weight_layer(m) and bool(_zero_slices(m.weight, out_dim(m)).any())]
    if not candidates:
        return {}
    try:
        dg = trace_graph(model, inputs, train_only)
    except UserError as exc:  # dead channels stay dense: exact, only larger
        for module in candidates:
            report["dead_channels_kept"][names[module]] = str(exc)
        return {}
    plans = []
    for module in candidates:
        if module not in dg.module2node:
            report["dead_channels_kept"][names[module]] = "the layer is not in the traced graph"
            continue
        pruner = dg.get_pruner_of_module(module)
        try:
            group = dg.get_pruning_group(module, pruner.prune_out_channels,
                                         list(range(pruner.get_out_channels(module))))
        except Exception as exc:  # noqa: BLE001 - torch-pruning's index mapping fails on some graphs
            report["dead_channels_kept"][names[module]] = f"torch-pruning cannot map its channels ({type(exc).__name__})"
            continue
        if any(module is plan_module or module in plan_members for plan_module, _, _, plan_members in plans):
            continue
        roots, reason = _group_plan(dg, group, names)
        if reason is not None:
            report["dead_channels_kept"][names[module]] = reason
            continue
        members = {dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)}
        plans.append((module, pruner, roots, members))
    kept: dict[str, torch.Tensor] = {}
    for module, pruner, roots, _ in plans:
        if not roots:
            continue
        group = dg.get_pruning_group(module, pruner.prune_out_channels, roots)
        group._group = [item for item in group._group if not _broadcast(item, dg, pruner.get_out_channels(module))]
        for dep, idxs in group:
            target = dep.target.module
            if dg.is_out_channel_pruning_fn(dep.handler) and target in names:
                total = pruner_out_channels(dg, target)
                if total is not None:
                    keep = torch.ones(total, dtype=torch.bool)
                    keep[torch.tensor([i for i in idxs if i < total], dtype=torch.long)] = False
                    kept[names[target]] = torch.nonzero(keep).flatten()
        group.prune()
        report["removed_channels"][names[module]] = len(roots)
    return kept


def pruner_out_channels(dg: tp.DependencyGraph, module: nn.Module) -> int | None:
    """Output channels of ``module`` as torch-pruning sees them (None for shape-free ops)."""
    pruner = dg.get_pruner_of_module(module)
    return None if pruner is None else pruner.get_out_channels(module)


def _compact_columns(model: nn.Module, called: set[nn.Module], report: dict) -> None:
    """Replace Conv2d / Linear layers that have all-zero GEMM columns by ColumnConv2d / ColumnLinear."""
    for name, module in list(model.named_modules()):
        if type(module) not in (*_CONV_CLS.values(), nn.Linear) or module not in called or (
                is_transposed(module) and module.groups > 1):
            continue
        gemm = _gemm(module)
        nonzero = (gemm != 0).any(dim=0)
        kept = torch.nonzero(nonzero).flatten().cpu()
        if kept.numel() == gemm.shape[1]:
            continue
        if kept.numel() == 0:  # e.g. a zero-initialised head: nothing to gather, the dense layer is exact
            report["dead_channels_kept"][name] = "every weight is zero; the layer stays dense"
            continue
        if isinstance(module, nn.Conv2d):
            replacement: nn.Module = ColumnConv2d.from_conv(module, kept)
        elif isinstance(module, nn.modules.conv._ConvNd):
            replacement = ColumnConvNd.from_conv(module, kept)
        else:
            replacement = ColumnLinear.from_linear(module, kept)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement)
        report["column_layers"][name] = [int(kept.numel()), int(gemm.shape[1])]


def _keep_frozen(compact_model: nn.Module, original: nn.Module) -> None:
    """Give every parameter of the compact model the ``requires_grad`` of the same-named parameter of the
    original (torch-pruning and the column layers create fresh, trainable parameters)."""
    flags = {name: p.requires_grad for name, p in original.named_parameters()}
    for name, p in compact_model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _random_like(inputs: tuple, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
                 if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


def _layer_outputs(model: nn.Module, inputs: tuple) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    hooks = {}
    for name, module in model.named_modules():
        if name and not list(module.children()):
            def hook(_module, _inputs, output, name=name):
                if isinstance(output, torch.Tensor) and name not in outputs:
                    outputs[name] = output
            hooks[module] = hook
    hooked_forward(model, inputs, hooks)
    return outputs


def _first_divergence(reference: nn.Module, compact: nn.Module, inputs: tuple, kept: dict,
                      atol_scale: float) -> str | None:
    """Name of the first layer (in the reference's execution order) whose output differs."""
    ref_out, new_out = _layer_outputs(reference, inputs), _layer_outputs(compact, inputs)
    for name, ref in ref_out.items():
        new = new_out.get(name)
        if new is None:
            continue
        if name in kept and ref.dim() >= 2 and new.shape != ref.shape:
            ref = ref.index_select(1 if not isinstance(compact.get_submodule(name), (nn.Linear, ColumnLinear))
                                   else ref.dim() - 1, kept[name].to(ref.device))
        if new.shape != ref.shape:
            continue
        if float((new - ref).abs().max()) > atol_scale * max(1.0, float(ref.abs().max())):
            return name
    return None


def verify(reference: nn.Module, compact_model: nn.Module, example_inputs: Any, *, atol_scale: float = 1e-5,
           kept: dict | None = None) -> tuple[float, float]:
    """Check ``compact_model`` computes what ``reference`` computes in eval mode, on ``example_inputs`` and
    on a seeded random batch of the same shape.

    Returns ``(max abs difference, tolerance)`` with tolerance ``atol_scale * max(1, max|reference(x)|)``.
    Raises RuntimeError naming the first diverging layer when the difference exceeds the tolerance.
    """
    inputs = _as_tuple(example_inputs)
    worst, worst_tol = 0.0, 0.0
    for batch in (inputs, _random_like(inputs)):
        with analysis_mode(reference), analysis_mode(compact_model):
            ref, new = _flat_outputs(reference(*batch)), _flat_outputs(compact_model(*batch))
        if [tuple(t.shape) for t in ref] != [tuple(t.shape) for t in new]:
            raise RuntimeError(f"compact model output shapes {[tuple(t.shape) for t in new]} differ from the "
                               f"masked model's {[tuple(t.shape) for t in ref]}")
        scale = max([1.0] + [float(t.abs().max()) for t in ref if t.numel()])
        diff = max([0.0] + [float((a - b).abs().max()) for a, b in zip(ref, new) if a.numel()])
        tol = atol_scale * scale
        if diff > tol or diff != diff:
            layer = _first_divergence(reference, compact_model, batch, kept or {}, atol_scale)
            raise RuntimeError(f"compact model differs from the masked model by {diff:.3g} (tolerance {tol:.3g})"
                               + (f"; first diverging layer: {layer!r}" if layer else "")
                               + " (an activation with f(0) != 0 after a removed channel? fold its constant "
                               "output into the consumer's bias first, see purification)")
        if diff >= worst:
            worst, worst_tol = diff, tol
    return worst, worst_tol


def compact(model: nn.Module, param_masks: dict[str, torch.Tensor], example_inputs: Any, *,
            atol_scale: float = 1e-5) -> CompactResult:
    """Physically remove masked filters / channels and columns (AutoCompress, Liu et al. AAAI 2020, §3).

    Args:
        model: the model (not modified; a deep copy is compacted).
        param_masks: parameter name -> BoolTensor of the parameter's shape, True = kept (e.g.
            ``PruningSpace.param_masks(masks)``). Masks are applied to the copy first, so the result
            computes the *masked* model.
        example_inputs: a tensor or tuple of tensors, e.g. ``[N, 3, 32, 32]``, for tracing and checking.
        atol_scale: output tolerance relative to ``max(1, max|masked(x)|)``.

    Steps: (a) channels whose producers' rows, biases and normalisation affine entries are all zero are
    removed with torch-pruning, coupled groups together; (b) Conv2d / Linear layers with all-zero GEMM
    columns become :class:`ColumnConv2d` / :class:`ColumnLinear`; (c) remaining (irregular) zeros stay
    dense. Finally the result is checked in eval mode against the masked model on ``example_inputs`` and a
    seeded random batch.

    Returns:
        :class:`CompactResult` (model in eval mode).

    Raises:
        UserError: masks that do not fit the model, inconsistent masks (a pruned filter whose coupled
            BatchNorm / bias is not zero), a layer pruned to zero units, or a structure that cannot lose
            channels exactly (grouped convs, LayerNorm / GroupNorm, untraceable models): the message names
            the module and the fix (exclude it via ignored layers).
        RuntimeError: the compact model's output differs from the masked model's by more than the
            tolerance (names the first diverging layer).
    """
    from .serialization import describe_architecture

    inputs = _as_tuple(example_inputs)
    reference = copy.deepcopy(model)
    _apply_masks(reference, param_masks)
    reference.eval()
    work = copy.deepcopy(reference)
    report: dict[str, Any] = {"params_before": _count(model), "removed_channels": {}, "column_layers": {},
                              "dead_channels_kept": {}}
    train_only = train_only_modules(work, inputs)
    kept = _remove_channels(work, inputs, report, train_only)
    work.eval()
    called = set(_called_modules(work, inputs)) | train_only
    _compact_columns(work, called, report)
    _keep_frozen(work, model)
    work.eval()
    report["max_abs_diff"], report["tolerance"] = verify(reference, work, inputs, atol_scale=atol_scale, kept=kept)
    report["params_after"] = _count(work)
    return CompactResult(model=work, architecture=describe_architecture(work, reference=model), report=report)


__all__ = ["ColumnConv2d", "ColumnConvNd", "ColumnLinear", "CompactResult", "DENSE_DENSITY_THRESHOLD", "GEMM_MIN_FILTERS", "compact",
           "verify"]
