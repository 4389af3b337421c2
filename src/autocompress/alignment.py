"""Hardware-aligned widths: every filter group keeps a multiple of ``N`` channels.

Why: CPU runtimes (oneDNN under PyTorch and onnxruntime) block convolution channels by 8 (SSE / AVX2) or 16
(AVX-512) and pad a partial block with zeros, so a width between two multiples costs as much as the next
multiple, and some kernels lose their fast path altogether (measured in BENCHMARKS.md: a compact
mobilenet_v2 with widths such as 21 and 59 ran slower than its base in onnxruntime).

The rule (ours), for a filter group of ``size`` channels and a multiple ``N``:

* the widths a group may keep are ``N, 2N, ..., floor(size / N) * N`` and ``size`` itself (all of them:
  the original width is always allowed, so a group of 24 channels at ``N = 16`` keeps 16 or 24);
* a group of at most ``N`` channels keeps all of them (it is exempt: it cannot be pruned to an aligned
  width). With an explicit ``N`` a group *smaller* than ``N`` is refused before any work (see
  :func:`check_multiple`); with ``"auto"`` it is exempt and logged;
* a rate's keep count ``k`` (:func:`autocompress.space.keep_count`) becomes the allowed width nearest to
  ``k`` (ties: the larger), :func:`aligned_keep`. It is non-increasing in the rate, so the search's target
  fitting still meets a target from below.

Column pruning is not aligned (it changes the GEMM's inner dimension, which runtimes do not block the same
way); a latency target measures what it really costs instead (:mod:`autocompress.latency`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from .errors import SettingError, UserError, show
from .recurrent import directions

log = logging.getLogger(__name__)

#: the ``channel_multiple`` setting's word for "pick from the CPU"
AUTO = "auto"
#: the channel blocks of the kernels ``auto`` aligns to: 8 (CUDA tensor-core tiles, SSE / AVX2 CPUs) and 16
#: (AVX-512 CPUs)
AUTO_MULTIPLES = (8, 16)
#: the finest multiple that keeps onnxruntime's CPU convolutions in its blocked channel layout (NCHWc), which
#: they take only when their input channels (the width of the layer before) are multiples of 4 (or fewer than a
#: block, 16 on AVX-512): a width off that grid sends the layer (and a layout conversion on each side) to the plain
#: kernels (:func:`autocompress.latency.blocked_convolutions` counts them). Measured (BENCHMARKS.md, "Session
#: 33"): three CNNs filter-pruned at any width ran 0.39-0.98x their base's speed at batch 1 wherever widths fell
#: off the grid, the same rates at multiples of 4 0.79-1.50x (16: 1.07-2.31x). ``auto``'s last fall-back before 1
#: under a params or flops target.
LAYOUT_MULTIPLE = 4
#: ``auto``'s largest multiple for a params or flops target: the 16-channel widths of an AVX-512 CPU force coarse
#: steps on narrow layers and cost points at the same MACs (seven CIFAR-10 nets at flops=2x, 2 epochs, two seeds:
#: mean top-1 59.04 % at 8 against 58.71 % at 16, from +2.2 on a MobileNet-style net to -1.0 on a VGG-style one),
#: for 1.2-1.8x the base's onnxruntime speed instead of 1.4-2.0x (BENCHMARKS.md, "Session 55"); a latency target,
#: which times each width, keeps the block
COUNTED_MULTIPLE = 8


def channel_block(device: str = "cpu") -> int:
    """The channel block the kernels of ``device`` run fast on: 8 on CUDA (tensor-core tiles), 16 on a CPU with
    AVX-512 (oneDNN blocks channels by 16) and 8 on other CPUs (SSE / AVX2), read from
    ``torch.backends.cpu.get_cpu_capability()``."""
    small, large = AUTO_MULTIPLES
    if str(device).startswith("cuda"):
        return small
    return large if "AVX512" in torch.backends.cpu.get_cpu_capability().upper() else small


def resolve_multiple(value: Any, *, device: str = "cpu", latency: bool = False) -> tuple[int, str]:
    """The channel multiple ``value`` stands for, and a sentence saying why.

    ``"auto"``: the channel block of ``device`` (:func:`channel_block`) for a ``latency`` target, whose lookup
    table times what each width costs; for a params or flops target at most 8 (:data:`COUNTED_MULTIPLE`: a target
    counted in parameters or MACs fits closer and loses fewer points at steps of 8; the fit still gives the channels
    of the layers that run in blocks back on the block, see :func:`autocompress.sampling.on_block`). An int
    ``N >= 1`` is itself (1 = no alignment).

    Raises:
        UserError: anything else (names the setting ``channel_multiple``).
    """
    if value == AUTO:
        block = channel_block(device)
        reason = (f"CUDA: tensor-core tiles of {block} channels" if str(device).startswith("cuda") else
                  f"CPU capability {torch.backends.cpu.get_cpu_capability()}: oneDNN blocks channels by {block}")
        if latency or block <= COUNTED_MULTIPLE:
            return block, f"auto: {block} ({reason})"
        return COUNTED_MULTIPLE, (f"auto: {COUNTED_MULTIPLE} for a params / flops target: widths in steps of "
                                  f"{COUNTED_MULTIPLE} ({reason})")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise UserError(f"channel_multiple={show(value)} is not valid",
                        "give an integer from 1 (no alignment) to 4096, e.g. 8, or auto")
    if not blocked(value):
        return value, f"{value} (as set; {NOT_BLOCKED})"
    return value, f"{value} (as set)"


def blocked(multiple: int) -> bool:
    """Whether widths at ``multiple`` land on the channel blocks CPU and GPU kernels run fast (a power of two; 1,
    any width, counts: it asks for no alignment)."""
    return not multiple & (multiple - 1)


#: why a channel multiple that is not a power of two gains no speed (said before any work)
NOT_BLOCKED = ("not a power of two: CPU and GPU kernels block channels by 4, 8 or 16, so these widths run no faster "
               "than any other and the compressed model may run slower than its base; 8 or auto for speed")


def allowed_widths(size: int, multiple: int) -> list[int]:
    """The widths a group of ``size`` channels may keep at ``multiple`` (increasing; see the module doc)."""
    if multiple <= 1:
        return list(range(1, size + 1))
    if size <= multiple:
        return [size]
    widths = list(range(multiple, size + 1, multiple))
    return widths if widths[-1] == size else widths + [size]


def aligned_keep(size: int, keep: int, multiple: int) -> int:
    """The allowed width (:func:`allowed_widths`) nearest to ``keep`` channels of ``size``, ties to the larger."""
    if multiple <= 1:
        return keep
    if size <= multiple:
        return size
    low = max(multiple, min(size, keep // multiple * multiple))
    high = min(size, low + multiple) if low < keep else low
    return high if high - keep <= keep - low else low


def align_up(size: int, keep: int, multiple: int) -> int:
    """The smallest allowed width of a ``size``-channel group that is at least ``keep``."""
    if multiple <= 1:
        return keep
    return next(w for w in allowed_widths(size, multiple) if w >= keep)


def is_aligned(width: int, size: int, multiple: int) -> bool:
    """Whether ``width`` channels are an allowed width of a group of ``size`` channels."""
    return multiple <= 1 or width == size or (width % multiple == 0 and width > 0)


def check_multiple(space, multiple: int, *, explicit: bool) -> None:
    """Check ``multiple`` against the filter groups of ``space`` (a PruningSpace) before any work.

    Raises:
        SettingError (``channel_multiple``): with an explicit (not ``"auto"``) multiple, a filter group has fewer
            channels than it.
    """
    smaller = [g for g in space.filter_groups if g.size < multiple] if multiple > 1 else []
    if explicit and smaller:
        g = min(smaller, key=lambda group: group.size)
        raise SettingError("channel_multiple", f"channel_multiple={multiple} is larger than filter group {g.name!r} "
                           f"({g.size} channels, the smallest of {len(smaller)} such groups)",
                           f"use a multiple of at most {g.size}, or auto (groups of at most the multiple then keep "
                           "every channel)")


def log_whole_groups(space, multiple: int, also: Callable[[str], None] | None = None) -> None:
    """Log (to ``also``, a run's ``log`` callable, or without one at INFO) the filter groups of ``space`` of at most
    ``multiple`` channels, the run's final multiple (after ``auto``'s fall-backs): they keep every channel, since
    their smallest aligned width is the whole group."""
    small = [g for g in space.filter_groups if g.size <= multiple] if multiple > 1 else []
    if small:
        line = (f"channel multiple {multiple} (aligned widths): {len(small)} filter group(s) of at most {multiple} "
                "channels keep every channel whatever their pruning rate, since the smallest aligned width is the "
                f"whole group ({', '.join(f'{g.name}: {g.size}' for g in small[:5])})")
        (also or log.info)(line)


def grow_to_multiple(new: torch.Tensor, before: torch.Tensor, multiple: int,
                     priority: torch.Tensor | None = None) -> torch.Tensor:
    """``new`` (a subset of ``before``, bool [size]) with channels of ``before`` added back until its count is
    an allowed width (:func:`align_up`) of the group: the highest ``priority`` (float [size]) first, ties
    (or no priority) to the lowest index.

    Purification uses it so that removing unused paths or redundant weights never breaks alignment (the
    channels put back were kept in ``before``, so the function is the masked model's)."""
    count = int(new.sum())
    want = align_up(new.numel(), count, multiple)
    if want == count:
        return new
    pool = torch.nonzero(before & ~new).flatten().tolist()
    if priority is not None:
        pool.sort(key=lambda i: -float(priority[i]))
    grown = new.clone()
    grown[pool[:want - count]] = True
    return grown


def misaligned_widths(space, model) -> dict[str, int]:
    """Filter groups of ``space`` whose kept channels in ``model`` (the compact model) are not an allowed width at
    ``space.channel_multiple``: group name -> kept channels (:func:`kept_channels`; empty when all are aligned)."""
    bad = {}
    for group in space.filter_groups:
        kept = kept_channels(group, model.get_submodule(group.name))
        if not is_aligned(kept, group.size, space.channel_multiple):
            bad[group.name] = kept
    return bad


def kept_channels(group, module) -> int:
    """The channels of filter ``group`` that ``module`` (its root layer, in the compact model) keeps: the layer's
    output width divided by the root rows each channel owns (3 for an attention's fused query-key-value projection,
    whose ``q``, ``k`` and ``v`` rows of a channel are one group channel); a recurrent layer's output features (hidden
    size x directions)."""
    if isinstance(module, nn.RNNBase):  # its output features (autocompress.recurrent.hidden_prunable)
        return int(module.hidden_size) * directions(module)
    width = int(getattr(module, "out_channels", None) or getattr(module, "out_features"))
    rows = next((len(s.index) for s in group.slices if s.module == group.name and s.role == "weight"), group.size)
    return width * group.size // max(rows, 1)


__all__ = ["AUTO", "AUTO_MULTIPLES", "COUNTED_MULTIPLE", "LAYOUT_MULTIPLE", "align_up", "aligned_keep",
           "allowed_widths", "channel_block", "check_multiple", "grow_to_multiple", "is_aligned", "kept_channels",
           "misaligned_widths", "resolve_multiple"]
