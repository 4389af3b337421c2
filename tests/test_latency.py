"""Issue 12, fast where it ships: hardware-aligned widths end to end (alignment, projection, purification,
compaction, the search's target fitting), deployed latency in the final record, the per-layer latency lookup
table (structure, cache), latency targets, and the refusals of bad input before any work."""
from __future__ import annotations

import logging
import re

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import autocompress
from autocompress import UserError
from autocompress.alignment import aligned_keep, allowed_widths, channel_block, grow_to_multiple, resolve_multiple
from autocompress.compaction import compact
from autocompress.compress import TARGET_TOLERANCE, Compression
from autocompress.config import CompressConfig, SettingError, Target
from autocompress.latency import (LatencyConfig, Timing, build_table, deployed_summary, layer_specs, measure_models,
                                  noisy_timing_warning, runner, SLOWER, speed_warning, table_key, time_runners)
from autocompress.masks import apply_masks
from autocompress.projection import project
from autocompress.purification import remove_unused_paths, settle
from autocompress.cli.compress import LevelPrefix
from autocompress.report import final_table_rows, final_text, write_report
from autocompress.sampling import ActionSampler
from autocompress.space import PruningSpace

sys.path.insert(0, str(Path(__file__).parent))
from test_api import CONFIG, SmallCNN, loaders, trained  # noqa: E402

FAST = {"runs": 3, "warmup": 1, "table_runs": 2, "large_batch": 4}


class Net(nn.Module):
    """``[B, 2, 6, 6]`` -> ``[B, 3]``: conv-BN-ReLU x2 with a residual add around the second, GAP, Linear."""

    def __init__(self, w1: int, w2: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1)
        self.conv2, self.bn2 = nn.Conv2d(w1, w2, 3, padding=1, bias=False), nn.BatchNorm2d(w2)
        self.conv3, self.bn3 = nn.Conv2d(w2, w2, 1, bias=False), nn.BatchNorm2d(w2)
        self.fc = nn.Linear(w2, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(x + self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 0.2)
    return model.eval()


# ------------------------------------------------------------------------------------------ alignment
@given(size=st.integers(1, 200), keep=st.integers(1, 200), multiple=st.sampled_from([1, 2, 4, 8, 16]))
def test_aligned_keep_is_the_nearest_allowed_width(size, keep, multiple):
    keep = min(keep, size)
    allowed = [size] if size <= multiple else sorted({*range(multiple, size + 1, multiple), size})
    if multiple == 1:
        allowed = list(range(1, size + 1))
    assert allowed_widths(size, multiple) == allowed
    got = aligned_keep(size, keep, multiple)
    best = min(abs(w - keep) for w in allowed)
    assert got in allowed and abs(got - keep) == best and (got >= keep or keep + best not in allowed)
    if keep < size:  # non-increasing in the rate = non-decreasing in the keep count
        assert aligned_keep(size, keep + 1, multiple) >= got


def test_auto_multiple_follows_the_cpu_and_the_target(monkeypatch):
    """``auto`` aligns a latency target to the CPU's channel block (16 on AVX-512, 8 on AVX2, 8 on CUDA) and a
    params / flops target to at most 8, whose fit gives channels back on the block (:func:`channel_block`)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert channel_block() == 16 and channel_block("cuda:0") == 8
    assert resolve_multiple("auto", latency=True) == (16, "auto: 16 (CPU capability AVX512: oneDNN blocks channels "
                                                          "by 16)")
    assert resolve_multiple("auto") == (8, "auto: 8 for a params / flops target: widths in steps of 8 (CPU "
                                           "capability AVX512: oneDNN blocks channels by 16)")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert channel_block() == 8
    for latency in (False, True):
        assert resolve_multiple("auto", latency=latency) == (8, "auto: 8 (CPU capability AVX2: oneDNN blocks "
                                                                "channels by 8)")
    assert resolve_multiple("auto", device="cuda", latency=True)[0] == 8 and resolve_multiple(4) == (4, "4 (as set)")
    multiple, why = resolve_multiple(7)  # allowed (a model's own constraint may ask for it), but said to be slow
    assert multiple == 7 and "not a power of two" in why and "8 or auto" in why


def test_grow_to_multiple_puts_back_the_preferred_channels():
    before = torch.tensor([True] * 8 + [False] * 4)
    new = torch.zeros(12, dtype=torch.bool)
    new[[0, 1, 2]] = True
    grown = grow_to_multiple(new, before, 4, torch.arange(12, dtype=torch.float64))
    assert torch.nonzero(grown).flatten().tolist() == [0, 1, 2, 7]  # 3 -> 4, the highest priority from before


@settings(max_examples=4, deadline=None)
@given(w1=st.integers(6, 20), w2=st.integers(6, 20), multiple=st.sampled_from([2, 4, 8]),
       rates=st.lists(st.floats(0, 0.9), min_size=4, max_size=4), seed=st.integers(0, 3))
def test_aligned_widths_through_projection_purification_and_compaction(w1, w2, multiple, rates, seed):
    """Random widths, multiples and rates (high column rates empty channels, which unused path removal would
    drop): the compact model's filter widths are allowed widths and its MACs are the space's estimate."""
    torch.manual_seed(seed)
    model = _randomised(Net(w1, w2), seed)
    x = torch.randn(2, 2, 6, 6)
    space = PruningSpace.build(model, x, channel_multiple=multiple)
    r = {"filter": {g.name: rates[i] for i, g in enumerate(space.filter_groups)},
         "column": {"conv2": rates[2], "conv3": rates[3]}}
    masks = project(space, model, r)
    for g in space.filter_groups:
        assert int(masks.filters[g.name].sum()) in allowed_widths(g.size, multiple)
    apply_masks(model, space.param_masks(masks))
    final, _ = settle(model, space, masks, masks, x)
    assert all(int(final.filters[g.name].sum()) in allowed_widths(g.size, multiple) for g in space.filter_groups)
    result = compact(model, space.param_masks(final), x, channel_multiple=multiple)
    widths = {"conv1": result.model.conv1, "conv2": result.model.conv2}
    for g in space.filter_groups:
        module = widths[g.name]
        assert module.out_channels in allowed_widths(g.size, multiple)
    assert space.estimate(r).macs >= space.count(final).macs  # purification only removes


@settings(max_examples=5, deadline=None)
@given(w1=st.integers(8, 32), w2=st.integers(8, 32), multiple=st.sampled_from([2, 4, 8]),
       target=st.floats(1.2, 3.0))
def test_sampler_meets_targets_from_below_with_aligned_widths(w1, w2, multiple, target):
    model = Net(w1, w2).eval()
    space = PruningSpace.build(model, torch.randn(1, 2, 6, 6), dims=("filter",), channel_multiple=multiple)
    try:
        sampler = ActionSampler.from_space(space, "flops", target)
    except UserError as exc:  # aligned widths can make a target unreachable: then refused up front
        assert "unreachable" in str(exc)
        return
    action = sampler.initial_action()
    masks = project(space, model, sampler.to_rates(action))
    assert space.total.macs / space.count(masks).macs >= target * (1 - 1e-9)
    assert all(int(masks.filters[g.name].sum()) in allowed_widths(g.size, multiple) for g in space.filter_groups)


def test_unused_path_removal_keeps_the_multiple():
    model = _randomised(Net(8, 8), 0)
    x = torch.randn(2, 2, 6, 6)
    space = PruningSpace.build(model, x, channel_multiple=4)
    masks = space.full_masks()
    masks.columns["conv2"][: 9 * 3] = False  # nothing reads channels 0..2 of conv1 any more
    new = remove_unused_paths(space, masks)
    assert new.filters["conv1"].all()  # 5 used -> the next allowed width is 8: none can go
    masks.columns["conv2"][: 9 * 5] = False  # 3 used -> 4: channel 4 (lowest unused index of the 5) comes back
    new = remove_unused_paths(PruningSpace.build(model, x, channel_multiple=4), masks)
    assert torch.nonzero(new.filters["conv1"]).flatten().tolist() == [0, 5, 6, 7]


# ------------------------------------------------------------------------------------------ pipeline
def _compress(model, target, run_dir=None, **config):
    train, val = loaders()
    settings_ = {**CONFIG, "latency": {**FAST, **config.pop("latency", {})}, **config}
    return autocompress.compress(model, torch.randn(1, 1, 8, 8), target, train_loader=train, val_loader=val,
                                 config=settings_, progress=False, run_dir=run_dir)


def test_compress_with_aligned_widths_reports_deployed_speed(tmp_path):
    train, _ = loaders()
    result = _compress(trained(SmallCNN(16, 24), train), "flops=2x", tmp_path / "run", channel_multiple=8)
    assert result.model.conv1.out_channels % 8 == 0 and result.model.conv2.out_channels in (8, 16, 24)
    assert result.mac_reduction >= 2.0 * (1 - TARGET_TOLERANCE)
    final = result.final
    assert final["channel_multiple"] == 8 and final["deployed"]["runtime"] == "onnxruntime"
    assert set(final["deployed"]["batches"]) == {"1", "4"}
    for batch, row in final["deployed"]["batches"].items():
        assert row["speedup"] == pytest.approx(row["base_ms"] / row["compressed_ms"])
        assert final["rows"][0][f"deployed_b{batch}_ms"] == row["base_ms"]
    assert final["deployed"]["slower"] == [int(b) for b, row in final["deployed"]["batches"].items()
                                           if row["compressed_ms"] > SLOWER * row["base_ms"]]
    assert all(row["uniform_ms"] > 0 for row in final["deployed"]["batches"].values())  # a flops target's reference
    header = final_table_rows(final)[0]
    assert "onnxruntime b=1 (ms)" in header and "onnxruntime b=4 (ms)" in header
    assert "deployed latency: onnxruntime on cpu, 1 thread(s)" in (tmp_path / "run" / "report.html").read_text()


def test_slower_compact_model_is_a_loud_warning(tmp_path):
    timings = {1: {"base": _t(1.0), "compressed": _t(2.0)}, 64: {"base": _t(10.0), "compressed": _t(5.0)}}
    summary = deployed_summary(timings, LatencyConfig())
    assert summary["slower"] == [1] and summary["batches"]["64"]["speedup"] == 2.0
    warning = speed_warning(summary)
    assert warning.startswith("the compressed model is SLOWER than the base in onnxruntime")
    assert "batch 1: 2 ms vs 1 ms" in warning and "batch 64" not in warning
    assert "latency target" in warning and "channel_multiple" in warning
    assert "channel_multiple" not in speed_warning(summary, aligned=True)  # auto or N already in use
    off_grid = speed_warning(summary, layout={"base": (5, 5), "compressed": (2, 5)})
    assert "batch 1: 2 ms vs 1 ms (it runs 2 of its 5 convolutions in onnxruntime's blocked channel layout, the " \
           "base 5 of 5: only 2-D convolutions take it (1-D and 3-D ones never do); of those, input widths of 16 " \
           "or more channels that are not a multiple of 4, and grouped " in off_grid
    assert speed_warning(summary, layout={"base": (3, 5), "compressed": (3, 5)}) == warning  # not the cause
    row = {"params": 10, "macs": 10}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "final", "rows": [row, row], "deployed": summary,
                                                        "warnings": [warning]}) + "\n")
    page = write_report(tmp_path).read_text()
    assert "color:#b00" in page and "WARNING: the compressed model is SLOWER than the base" in page


def test_uniform_reference_meets_the_macs_at_one_rate():
    """The flops target's speed reference prunes every filter group at one rate to the MACs asked for (counted
    independently by the flop counter), at the space's channel multiple, and computes the masked base."""
    from autocompress.deployment import uniform_reference
    from autocompress.metrics import count_macs

    model, x = _randomised(SmallCNN(16, 32), 1).eval(), torch.randn(1, 1, 8, 8)
    base_macs = count_macs(model, x)
    for multiple, target in ((1, 2.0), (8, 2.0), (1, 3.0)):
        space = PruningSpace.build(model, x, channel_multiple=multiple)
        reference = uniform_reference(space, model, x, target, r_max=0.95)
        assert count_macs(reference, x) <= base_macs / target
        widths = {"conv1": reference.conv1.out_channels / 16, "conv2": reference.conv2.out_channels / 32}
        assert all(w * n % multiple == 0 for w, n in zip(widths.values(), (16, 32)))
        assert abs(widths["conv1"] - widths["conv2"]) <= multiple / 16  # one rate, up to one step of the multiple
    assert uniform_reference(PruningSpace.build(model, x), model, x, 1e4, r_max=0.5) is None  # out of reach


def test_a_model_slower_than_uniform_rates_at_its_macs_is_warned_about():
    """Fresh user 90: a flops=4x PointNet ran 1.26x slower than Torch-Pruning's uniform model at the same MACs
    (a 24-channel layer feeding a 440-channel one) and nothing said so: the final record times a uniform-rate
    reference beside it and warns over UNIFORM_SLOWER at any batch, with the caller's fix."""
    from autocompress.latency import UNIFORM_SLOWER, uniform_warning

    timings = {1: {"base": _t(2.0), "compressed": _t(1.0), "uniform": _t(0.9)},
               64: {"base": _t(20.0), "compressed": _t(6.0), "uniform": _t(4.8)}}
    summary = deployed_summary(timings, LatencyConfig())
    assert summary["batches"]["64"]["uniform_ms"] == 4.8 and 1.0 / 0.9 < UNIFORM_SLOWER < 6.0 / 4.8
    warning = uniform_warning(summary, "FIX")
    assert warning.startswith("the compressed model runs slower than one pruned at a uniform rate to the same MACs")
    assert "batch 64: 6 ms vs 4.8 ms (1.25x)" in warning and "batch 1:" not in warning and warning.endswith(": FIX")
    from autocompress.report import deployed_lines

    assert "the base pruned at one uniform rate to the same MACs (untrained; timed with them): batch 1: 0.9 ms; " \
           "batch 64: 4.8 ms" in deployed_lines({"deployed": summary})
    del timings[64]["uniform"]
    assert uniform_warning(deployed_summary(timings, LatencyConfig()), "FIX") is None  # no reference timed there


def test_the_uniform_warning_names_a_latency_target_and_the_guidance(tmp_path, monkeypatch):
    """Wiring: a flops run of a classifier (per-channel guidance) whose compressed model times 1.5x the uniform
    reference warns with the uniform rates' speedup as a latency target and the per-layer guidance."""
    compress_module = sys.modules["autocompress.compress"]

    def timed(models, example, settings, batches=None, runs=None):
        assert set(models) == {"base", "compressed", "uniform"}
        return {b: {"base": _t(3.0), "compressed": _t(1.5), "uniform": _t(1.0)} for b in batches}

    monkeypatch.setattr(compress_module, "measure_models", timed)
    train, _ = loaders()
    result = _compress(trained(SmallCNN(16, 24), train), "flops=2x", tmp_path / "run")
    warning = [w for w in result.final["warnings"] if "uniform rate" in w]
    assert len(warning) == 1 and "batch 1: 1.5 ms vs 1 ms (1.50x)" in warning[0]
    assert warning[0].endswith("for speed at this target, set search.guidance: layer (the per-channel guidance "
                               "prunes hardest the channels that cost the most MACs, whatever their time), or give a "
                               "latency target (target latency=3x: the uniform rates' speedup at batch 1), which "
                               "times candidates in the runtime")


def test_a_model_not_much_faster_at_many_fewer_macs_is_warned_about():
    """A fresh user's params target gave 1.01x in onnxruntime at 1.9x fewer MACs with no word about it: under
    LITTLE_SPEEDUP at FEWER_MACS times fewer MACs or more, the warning names the batches and the MACs factor."""
    from autocompress.latency import FEWER_MACS, LITTLE_SPEEDUP

    timings = {1: {"base": _t(1.0), "compressed": _t(0.95)}, 64: {"base": _t(10.0), "compressed": _t(5.0)}}
    summary = deployed_summary(timings, LatencyConfig())
    assert summary["slower"] == [] and 1.0 < 1 / 0.95 < LITTLE_SPEEDUP
    assert speed_warning(summary) is None  # no MACs factor given: only a slower model is warned about
    assert speed_warning(summary, macs_factor=FEWER_MACS - 0.01) is None  # few MACs removed: little speed expected
    warning = speed_warning(summary, macs_factor=2.0)
    assert warning.startswith("the compressed model is not much faster than the base (under 1.1x) at 2x fewer "
                              "MACs (MACs count operations, not time) in onnxruntime (1 thread(s)): batch 1: 0.95 ms "
                              "vs 1 ms (1.05x); use a latency target"), warning
    assert "batch 64" not in warning and "channel_multiple" in warning
    assert "blocked channel layout" in speed_warning(summary, macs_factor=2.0,
                                                     layout={"base": (5, 5), "compressed": (2, 5)})
    fast = deployed_summary({1: {"base": _t(1.0), "compressed": _t(1 / LITTLE_SPEEDUP)}}, LatencyConfig())
    assert speed_warning(fast, macs_factor=10.0) is None  # LITTLE_SPEEDUP itself is fast enough
    tie = deployed_summary({64: {"base": _t(113.0), "compressed": _t(113.4)}}, LatencyConfig())
    assert tie["slower"] == [] and speed_warning(tie) is None  # a fresh user was warned of "113 ms vs 113 ms"
    assert speed_warning(tie, macs_factor=2.0).startswith("the compressed model is not much faster")
    slower = deployed_summary({64: {"base": _t(100.0), "compressed": _t(100.0 * SLOWER + 0.1)}}, LatencyConfig())
    assert slower["slower"] == [64] and "SLOWER" in speed_warning(slower)


def test_a_params_target_s_run_warns_when_its_model_is_not_much_faster(monkeypatch):
    """Wiring: the final record of a params target whose deployed model has FEWER_MACS times fewer MACs than the
    base or more carries the not-much-faster warning, with that factor (timings patched to 1.02x at every batch)."""
    import importlib

    from autocompress.latency import FEWER_MACS
    from autocompress.metrics import count_macs

    compress_module = importlib.import_module("autocompress.compress")

    def barely(models, example, config, batches=None, runs=None):
        return {b: {"base": _t(1.02), "compressed": _t(1.0)} for b in batches or config.batches}

    monkeypatch.setattr(compress_module, "measure_models", barely)
    train, _ = loaders()
    base = trained(SmallCNN(32, 32), train)
    result = _compress(base, "params=4x")
    example = torch.randn(1, 1, 8, 8)
    factor = count_macs(base, example) / count_macs(result.deployed_model, example)
    warned = [w for w in result.final["warnings"] if "not much faster" in w]
    assert factor >= FEWER_MACS  # params=4x of this CNN removes well over 1.5x of its MACs
    assert len(warned) == 1, result.final["warnings"]
    assert f"at {factor:.3g}x fewer MACs" in warned[0]


def test_a_slower_compressed_model_s_warning_counts_its_convolutions_in_the_blocked_layout(monkeypatch):
    """When the compressed model times slower in onnxruntime, the run's warning says how many of its convolutions
    onnxruntime runs in its blocked layout against the base, where that is fewer (widths off the 4-channel grid at
    channel_multiple 1); the counts are the optimised graphs' (recounted here)."""
    import importlib

    from autocompress.latency import blocked_convolutions

    compress_module = importlib.import_module("autocompress.compress")  # the module, not the function

    def slower(models, example, config, batches=None, runs=None):  # every batch: the compact model at twice
        return {b: {"base": _t(1.0), "compressed": _t(2.0)} for b in batches or config.batches}

    monkeypatch.setattr(compress_module, "measure_models", slower)
    train, _ = loaders()
    base = trained(SmallCNN(32, 32), train)
    result = _compress(base, "params=2x", channel_multiple=1)
    example = torch.randn(1, 1, 8, 8)
    base_layout, layout = blocked_convolutions(base, example), blocked_convolutions(result.deployed_model, example)
    warning = next(w for w in result.final["warnings"] if "SLOWER" in w)
    named = (f"(it runs {layout[0]} of its {layout[1]} convolutions in onnxruntime's blocked channel layout, the base "
             f"{base_layout[0]} of {base_layout[1]}")
    widths = [result.model.conv1.out_channels, result.model.conv2.out_channels]
    assert (named in warning) == (layout[1] - layout[0] > base_layout[1] - base_layout[0]), (widths, warning)
    if any(w >= 16 and w % 4 for w in widths[:1]):  # conv2 reads an off-grid width (here: 25 channels)
        assert named in warning


def test_warnings_carry_their_level_once(caplog):
    """A fresh user's own logging format (``%(levelname)s %(name)s: %(message)s``) printed "WARNING autocompress:
    WARNING: ...": a warning's text holds no level; the CLI's log format and the printed table add it once."""
    timings = {1: {"base": _t(1.0), "compressed": _t(2.0)}, 64: {"base": _t(10.0), "compressed": _t(5.0)}}
    summary = deployed_summary(timings, LatencyConfig())
    warning = speed_warning(summary)
    record = logging.LogRecord("autocompress", logging.WARNING, __file__, 1, warning, None, None)
    assert LevelPrefix().format(record) == f"WARNING: {warning}"
    record.levelno, record.levelname = logging.INFO, "INFO"
    assert LevelPrefix().format(record) == warning
    script = ("import logging; from autocompress.cli.compress import configure_logging; configure_logging(); "
              "logging.getLogger('onnx_ir.passes').info('pass'); logging.getLogger('autocompress').info('round 1'); "
              "logging.getLogger('autocompress').warning('slower')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stderr == "round 1\nWARNING: slower\n"  # the exporter's INFO lines flooded the CLI's log
    lines = final_text({"event": "final", "rows": [{"params": 10, "macs": 10}] * 2, "deployed": summary,
                        "warnings": [warning], "not_filter_pruned": {"conv2": "the compact model breaks (x)"}})
    assert "\nnot filter-pruned: conv2 (the compact model breaks (x))\n" in lines  # also without INFO logging
    assert lines.splitlines()[-1] == f"WARNING: {warning}"


def test_the_report_gives_the_spread_of_the_runs():
    from autocompress.latency import Timing
    from autocompress.report import deployed_lines

    timings = {1: {"base": Timing(1.3, 1.21, 1.35, 30), "compressed": Timing(0.62, 0.6, 0.66, 30)}}
    summary = deployed_summary(timings, LatencyConfig())
    assert summary["batches"]["1"]["base_p10_p90_ms"] == [1.21, 1.35]
    lines = deployed_lines({"deployed": summary})
    assert "spread of the runs (10th-90th percentile, ms): batch 1: base 1.21-1.35, compressed 0.6-0.66" in lines
    damaged = {"deployed": {**summary, "batches": {"1": {**summary["batches"]["1"], "base_p10_p90_ms": "x"}}}}
    assert "batch 1: base ?, compressed 0.6-0.66" in deployed_lines(damaged)[1]
    stored = deployed_lines({"deployed": summary, "deployed_form": {"column_layers": 3, "dense_layers": []}})
    assert stored[-1] == "deployed form: the 3 column-pruned layers run as stored (over their kept columns, or the " \
                         "input channels that keep one: faster than dense there)"
    one = deployed_lines({"deployed": summary, "deployed_form": {"column_layers": 1, "dense_layers": []}})
    assert one[-1].startswith("deployed form: the column-pruned layer run as stored")
    dense = deployed_lines({"deployed": summary, "deployed_form": {"column_layers": 3, "dense_layers": ["a", "b"]}})
    assert dense[-1].startswith("deployed form: 2 of 3 column-pruned layers run dense") and dense[-1].endswith(": a, b")
    held = deployed_lines({"deployed": summary, "deployed_form": {"column_layers": 3, "dense_layers": [],
                                                                  "held_by_macs": ["dw1", "dw2"]}})
    assert held[-1] == ("deployed form: the 3 column-pruned layers run as stored (over their kept columns, or the "
                        "input channels that keep one); 2 ran faster dense alone but stay as stored: dense, they would "
                        "execute more MACs than the flops target allows (dw1, dw2)")


def test_chance_level_or_a_large_drop_in_validation_top1_is_a_warning():
    from autocompress.compress import _accuracy_warning
    from autocompress.config import Target

    target, base = Target.parse("params=50x"), {"val_top1": 14.0}
    assert _accuracy_warning(base, {"val_top1": 11.1}, 0.1, target) is None
    assert _accuracy_warning(base, {"val_top1": 10.5}, None, target) is None
    assert _accuracy_warning(base, {}, 0.1, target) is None
    warning = _accuracy_warning(base, {"val_top1": 10.5}, 0.1, target)
    assert warning.startswith("the compressed model's validation top-1 10.50% is at chance level (10.00%): "
                              "target params=50x is too aggressive")
    # more than 5 points below the base (a fresh user lost 12.8 points at latency=2x and nothing warned)
    drop = _accuracy_warning({"val_top1": 86.1}, {"val_top1": 73.3}, 0.1, target)
    assert drop.startswith("the compressed model's validation top-1 73.30% is 12.8 points below the "
                           "base's 86.10% at target params=50x; lower the target, or give more")
    assert _accuracy_warning({"val_top1": 86.1}, {"val_top1": 81.2}, 0.1, target) is None  # 4.9 points
    assert _accuracy_warning({"val_top1": None}, {"val_top1": 50.0}, None, target) is None
    # a base at chance (a fresh user's validation loader at the wrong resolution): the target is not blamed
    broken = _accuracy_warning({"val_top1": 4.69}, {"val_top1": 10.94}, 0.1, target)
    assert broken == ("the base's validation top-1 4.69% is at chance level (10.00%): the validation data or "
                      "the base looks broken, so the compressed model's 10.94% says nothing about the target; check "
                      "val_loader's inputs and labels against the training data")


@pytest.mark.parametrize("base_score, score, warned", [
    (0.596, 0.0525, "the compressed model's validation score 0.0525 is 91 % of the base's |score| below it (0.596) "
                    "at target flops=200x; lower the target"),
    (0.596, 0.57, None), (-6.0e-4, -6.4e-4, "-0.00064 is 7 %"), (-6.0e-4, -6.2e-4, None), (21.0, 19.8, "19.8 is 6 %"),
    (0.0, -0.0125, "-0.0125 is 0.0125 below the base's 0 (a score relative to the base's) at target flops=200x"),
    (0.0, 0.0, None)])
def test_a_large_relative_drop_of_a_callers_score_is_a_warning(base_score, score, warned):
    """A fresh user's segmentation net at flops=200x ended at 0.052 mIoU (base 0.596) and the final table did not
    warn: a caller's score more than 5 % of |base score| below it does (mIoU, minus an MSE, PSNR). A score relative
    to the base's outputs is 0 for the base, which raised ZeroDivisionError after all the training (fresh user 79)."""
    from autocompress.compress import _accuracy_warning
    from autocompress.config import Target

    warning = _accuracy_warning({"val_score": base_score}, {"val_score": score}, None, Target.parse("flops=200x"))
    if warned is None:
        assert warning is None
    else:
        assert warned in warning


def test_eager_slower_warning_names_the_slower_batches():
    from autocompress.compress import _eager_slower_warning

    base, fast = {"latency_b1_ms": 1.0, "latency_b64_ms": 10.0}, {"latency_b1_ms": 0.5, "latency_b64_ms": 9.0}
    assert _eager_slower_warning(base, fast, torch.device("cpu"), 7) is None
    assert _eager_slower_warning(base, {"latency_b1_ms": 1.04, "latency_b64_ms": 10.4}, torch.device("cpu"), 7) is None
    warning = _eager_slower_warning(base, {"latency_b1_ms": 1.5, "latency_b64_ms": 9.0}, torch.device("cpu"), 7)
    assert warning.startswith("the compressed model as stored is SLOWER than the base in eager PyTorch "
                              "on cpu: batch 1: 1.5 ms vs 1 ms (median of 7 interleaved runs")
    assert "batch 64" not in warning
    assert warning.endswith("latency target") and "channel_multiple (e.g. auto)" in warning
    aligned = _eager_slower_warning(base, {"latency_b1_ms": 1.5, "latency_b64_ms": 9.0}, torch.device("cpu"), 7,
                                    aligned=True)
    assert aligned.endswith("and a latency target") and "channel_multiple" not in aligned
    assert not _eager_slower_warning(base, {"latency_b1_ms": 1.5, "latency_b64_ms": 9.0}, torch.device("cpu"), 7,
                                     latency_target=True).endswith("latency target")
    # a fresh user's ConvNeXt-style model: no column layer (the torch deployed form changes nothing), padded norms
    plain = _eager_slower_warning(base, {"latency_b1_ms": 1.5, "latency_b64_ms": 9.0}, torch.device("cpu"), 7,
                                  aligned=True, column_layers=False, padded_norms=6)
    assert "deployed_form" not in plain and plain.endswith("; to run it faster in PyTorch, use a latency target")
    assert ("(median of 7 interleaved runs, setting latency_runs); its 6 padded norm(s) (PaddedLayerNorm / "
            "PaddedGroupNorm: the exact form of a norm that lost channels) run as several small ops each") in plain
    assert "layer_norm: kept compacts a LayerNorm to a plain one" in plain
    bare = _eager_slower_warning(base, {"latency_b1_ms": 1.5, "latency_b64_ms": 9.0}, torch.device("cpu"), 7,
                                 latency_target=True, column_layers=False)
    assert bare.endswith("(median of 7 interleaved runs, setting latency_runs)")


def _t(ms):
    from autocompress.latency import Timing

    return Timing(ms, ms, ms, 1)


# ------------------------------------------------------------------------------------------ lookup table
def test_lookup_table_structure_cache_and_key(tmp_path, monkeypatch):
    model = Net(16, 16).eval()
    x = torch.randn(1, 2, 6, 6)
    space = PruningSpace.build(model, x, channel_multiple=8)
    config = LatencyConfig(**FAST, cache_dir=str(tmp_path))
    table = build_table(model, x, space, config, multiple=8, columns=True)
    assert not table.cached and set(table.specs) == {"conv1", "conv2", "conv3", "fc"}
    assert table.grids["conv2"] == [[8, 16], [8, 16]] and table.grids["conv1"][0] == [2]
    assert table.estimate_model(model) == pytest.approx(table.base_ms)  # exact at full width by construction
    for name, (grid_in, grid_out) in table.grids.items():  # monotone in both widths
        values = np.array([[table.layer_ms(name, i, o) for o in grid_out] for i in grid_in])
        assert (np.diff(values, axis=0) >= 0).all() and (np.diff(values, axis=1) >= 0).all()
    estimates = [table.estimate_space(space, {"filter": {g.name: r for g in space.filter_groups}})
                 for r in (0.0, 0.3, 0.6)]
    assert estimates[0] == pytest.approx(table.base_ms) and estimates[0] >= estimates[1] >= estimates[2]
    for points in table.column_ratio.values():  # fewer columns never cost more; never more than dense
        ratios = [r for _, r in points]
        assert ratios == sorted(ratios) and ratios[-1] == 1.0
    monkeypatch.setattr("autocompress.latency._measure_table", lambda *a, **k: pytest.fail("measured again"))
    again = build_table(model, x, space, config, multiple=8, columns=True)
    assert again.cached and again.cells == table.cells and again.meta["built_base_ms"] == table.base_ms
    ratio = again.base_ms / table.base_ms  # rescaled to the base as it runs now: every estimate by one factor
    assert again.estimate_model(model) == pytest.approx(again.base_ms)
    assert estimates[1] * ratio == pytest.approx(
        again.estimate_space(space, {"filter": {g.name: 0.3 for g in space.filter_groups}}))
    prunable = {"conv1": (False, True)}
    keys = {table_key(model, x, LatencyConfig(threads=t, batch=b), m, prunable, [], form)
            for t, b, m, form in ((1, 1, 8, "padded"), (2, 1, 8, "padded"), (1, 4, 8, "padded"), (1, 1, 16, "padded"),
                                  (1, 1, 8, "kept"))}
    assert len(keys) == 5


def test_lookup_table_is_exact_at_base_and_narrowest_with_a_negative_fixed_cost(tmp_path, monkeypatch):
    """Synthetic timings (a per-layer constant that the whole graph does not pay): the fit goes through both
    measured models with a negative fixed cost; below the narrowest model the estimate stays positive and
    continuous."""
    def layer_time(module, x, config):  # 0.2 ms per layer plus 1e-3 ms per weight; overhead model: 0.01 ms
        weights = sum(p.numel() for p in module.parameters())
        return 0.01 + (0.2 + 1e-3 * weights if weights else 0.0)

    def whole(models, example, config, batches=None, runs=None):
        ms = {name: 0.5 * sum(p.numel() for p in m.parameters()) * 1e-3 + 0.1 for name, m in models.items()}
        return {batches[0]: {name: _t(v) for name, v in ms.items()}}

    monkeypatch.setattr("autocompress.latency._time_one", layer_time)
    monkeypatch.setattr("autocompress.latency.measure_models", whole)
    model = Net(32, 32).eval()
    x = torch.randn(1, 2, 6, 6)
    space = PruningSpace.build(model, x, channel_multiple=8)
    table = build_table(model, x, space, LatencyConfig(**FAST, cache_dir=str(tmp_path)), multiple=8, columns=False)
    from autocompress.latency import _smallest
    smallest = _smallest(model, x, space, 8, "kept")
    base_ms, small_ms = (0.5e-3 * sum(p.numel() for p in m.parameters()) + 0.1 for m in (model, smallest))
    assert table.fixed_ms < 0 and table.floor_ms == pytest.approx(small_ms)
    assert table.estimate_model(model) == pytest.approx(base_ms) and table.estimate_model(smallest) == pytest.approx(
        small_ms)
    layers_small = small_ms - table.fixed_ms  # the narrowest model's scaled layer sum
    for fraction in (1.0, 0.999, 0.5, 0.1):  # below the floor: proportional, positive, continuous at it
        assert table._total(fraction * layers_small) == pytest.approx(small_ms * fraction)


@settings(max_examples=60, deadline=None)
@given(target=st.floats(1.2, 6.0), error=st.floats(0.5, 2.0), power=st.floats(0.7, 1.3),
       grain=st.sampled_from([0.0, 0.05, 0.2]))
@example(target=1.5, error=2.0, power=1.0, grain=0.0)
@example(target=2.0, error=1.0625, power=1.0, grain=0.0)
def test_calibration_keeps_the_least_pruned_candidate_that_meets_the_target(target, error, power, grain):
    """A table off by a factor (and a power, and width steps): the kept candidate is the measured one with the
    smallest speedup >= the target; the loop stops once one lands in the band, after at most 4 measurements."""
    from autocompress.compress import CALIBRATION_BAND, calibrate

    def fit(aim):  # the candidate is the speedup the table reaches (rounded up to its width steps)
        reached = aim if not grain else math.ceil(aim / grain) * grain
        return reached, reached

    def measure(reached):
        return error * reached ** power

    kept, records = calibrate(target, fit, measure)
    measured = [r["measured"] for r in records]
    assert 1 <= len(records) <= 4 and records[0]["aimed"] == target
    meeting = [m for m in measured if m >= target]
    assert measure(kept) == (min(meeting) if meeting else measured[-1])
    in_band = [i for i, m in enumerate(measured) if target <= m <= CALIBRATION_BAND * target]
    assert not in_band or in_band[0] == len(records) - 1  # stops at the first measurement in the band
    if power == 1.0 and not grain:  # an error by a constant factor is corrected in one re-fit
        assert len(records) <= 2  # (an aim below 1 is clamped at 1 and not measured twice)
        assert (measured[-1] == pytest.approx(target) or (target / error < 1 and measured[-1] == error)
                or in_band == [0])  # (an error within the band: the first candidate is kept as it is)


def test_latency_guidance_weights_units_by_the_time_they_govern():
    """Each unit's guidance weight is the table's saving when it alone is pruned at 0.5, per producing layer."""
    from autocompress.compress import latency_guidance
    from autocompress.sampling import units_from_space

    model = Net(16, 16).eval()
    space = PruningSpace.build(model, torch.randn(1, 2, 6, 6))
    units = units_from_space(space, "flops")
    coef = {(u.kind, u.name): 1.0 + i for i, u in enumerate(units)}  # ms saved per unit of rate

    class Table:  # a linear stand-in for LatencyTable.estimate_space
        def estimate_space(self, _space, rates):
            return 100.0 - sum(coef[kind, name] * r for kind, named in rates.items() for name, r in named.items())

    producers = {(k, u.name): len(getattr(u, "producers", ())) or 1 for k in ("filter", "column")
                 for u in space.units(k)}
    assert any(p > 1 for p in producers.values())  # the residual group is produced by two layers
    weighted = latency_guidance(units, space, Table())
    assert [(u.kind, u.name, u.size) for u in weighted] == [(u.kind, u.name, u.size) for u in units]
    for unit in weighted:
        assert unit.weight == pytest.approx(0.5 * coef[unit.kind, unit.name] / producers[unit.kind, unit.name])


def test_calibration_stops_when_the_table_cannot_aim_higher():
    """The second aim is out of the table's reach: the loop ends and keeps the fastest measured candidate."""
    from autocompress.compress import calibrate

    def fit(aim):
        if aim > 2.1:
            raise UserError("target unreachable", "lower it")
        return aim, aim

    kept, records = calibrate(2.0, fit, lambda reached: 0.8 * reached)  # measured 1.6x: re-aims at 2.5x
    assert kept == 2.0 and [r["measured"] for r in records] == [pytest.approx(1.6)]
    with pytest.raises(UserError, match="unreachable"):  # the first fit failing is the caller's error
        calibrate(2.0, lambda aim: fit(aim + 1), lambda reached: reached)


def test_a_refused_calibration_says_why_it_measured_once():
    """A fresh user's latency=1.3x was refused "in 1 measurement(s)" while the README says up to 4: the re-aim
    (1.3 x 1.3 / 1.08 = 1.56x) was beyond the table's narrowest widths. The refusal says so."""
    from types import SimpleNamespace

    def sampler(space, aim, base_ratio):
        if aim > 1.4:
            raise UserError("target unreachable", "lower it")
        return SimpleNamespace(rescale=lambda action: action, compression=lambda action: aim,
                               to_rates=lambda action: {})

    lines: list[str] = []
    fake = SimpleNamespace(_sampler=sampler, _measured_speedup=lambda state, rates: 1.08,
                           pipeline=SimpleNamespace(log=lines.append), target=Target.parse("latency=1.3x"),
                           config=CompressConfig.from_dict({"target": "latency=1.3x"}))
    with pytest.raises(UserError) as info:
        Compression._calibrate(fake, SimpleNamespace(index=1, target=1.3, space=None), None, 1.0)
    assert lines == ["round 1 search: aimed at 1.3x by the lookup table, measured 1.08x"]
    assert ("measured at most 1.08x in 1 measurement(s) before any training (round target 1.3x, latency.tolerance "
            "0.1); the faster aim the measurements called for is beyond the lookup table's narrowest widths; lower "
            "the target") in str(info.value)


@given(st.floats(1.01, 100.0), st.floats(1e-7, 0.2))
def test_a_reach_short_of_the_target_never_prints_as_the_target(target, shortfall):
    """A helper read "target 1.5x is unreachable: ... reaches only 1.5x" (1.497x rounded to 3 digits)."""
    from autocompress.text import short_of

    reached = target * (1 - shortfall)
    text = short_of(reached, target)
    assert text != f"{target:g}" and float(text) < target
    assert float(text) == pytest.approx(reached, rel=5e-3)


def test_a_reach_short_of_the_target_found_by_ci():
    """CI's example: the target prints as "25.6094", so "25.6" reads short of it (the old rule compared digit by
    digit and failed its own test, as ``g`` drops trailing zeros)."""
    from autocompress.text import short_of

    assert short_of(25.609375 * (1 - 0.00017739986531995156), 25.609375) == "25.6"
    assert short_of(1.497, 1.5) == "1.497" and short_of(1.4999, 1.5) == "1.4999" and short_of(1.2, 1.5) == "1.2"


def test_calibration_floor_accepts_a_candidate_just_below_the_target():
    """With floor 0.95 a candidate measured at 0.97 x the target ends the loop (VGG-16 at 1.5x measured 1.87x,
    1.39x, 1.48x, 1.44x: without the floor none lay in [1.5, 1.65] and the over-pruned 1.87x was kept)."""
    from autocompress.compress import calibrate

    measured = iter([1.87, 1.39, 1.48, 1.44])
    kept, records = calibrate(1.5, lambda aim: (aim, aim), lambda _reached: next(measured), floor=0.95)
    assert [r["measured"] for r in records] == [1.87, 1.39, 1.48] and kept == records[2]["aimed"]
    measured = iter([1.87, 1.39, 1.48, 1.44])
    kept, records = calibrate(1.5, lambda aim: (aim, aim), lambda _reached: next(measured))
    assert len(records) == 4 and kept == 1.5  # floor 1: only the first (1.87x) met it


def test_calibration_interpolates_once_the_target_is_bracketed():
    """Measured speedup = aim^3 / 2.66 (a steep table error): the multiplicative re-aim goes 1.27x, 2.09x,
    0.77x, 2.48x around a 1.5x target; once one measurement lies on each side the next aim interpolates log aim
    against log speedup, which is exact for a power law, so the third measurement lands on the target."""
    from autocompress.compress import calibrate

    kept, records = calibrate(1.5, lambda aim: (aim, aim), lambda aim: aim ** 3 / 2.66)
    measured = [r["measured"] for r in records]
    assert measured[0] < 1.5 < 1.65 < measured[1] and len(records) == 3
    assert measured[2] == pytest.approx(1.5) and kept == records[2]["aimed"]


@settings(max_examples=60, deadline=None)
@given(points=st.lists(st.tuples(st.floats(1.0, 8.0), st.floats(0.5, 10.0)), min_size=1, max_size=4),
       target=st.floats(1.2, 6.0))
def test_next_aim_stays_inside_a_bracket(points, target):
    """With measurements on both sides of the band, the next aim lies between the closest slow and fast aims
    (or is their geometric mean when noise turned them around); with one side only it is the multiplicative
    re-aim of the last point, never below 1."""
    from autocompress.compress import next_aim

    aim = next_aim(target, points, floor=0.95, band=1.1)
    slow = [p for p in points if p[1] < 0.95 * target]
    fast = [p for p in points if p[1] > 1.1 * target]
    if slow and fast:
        low, high = max(slow, key=lambda p: p[1])[0], min(fast, key=lambda p: p[1])[0]
        assert min(low, high) * (1 - 1e-9) <= aim <= max(low, high) * (1 + 1e-9)
    else:
        assert aim == pytest.approx(max(1.0, points[-1][0] * target / points[-1][1]))


def test_calibration_lowers_an_overshooting_aim():
    """A table that under-estimates the speedup (the measured one is 1.5x above) is re-aimed below the target
    and ends inside the band instead of keeping the over-pruned first candidate."""
    from autocompress.compress import calibrate

    kept, records = calibrate(2.0, lambda aim: (aim, aim), lambda reached: 1.5 * reached)
    assert [round(r["aimed"], 6) for r in records] == [2.0, round(2.0 / 1.5, 6)]
    assert 1.5 * kept == pytest.approx(2.0)


def test_a_cached_table_is_rescaled_to_the_base_as_it_runs_now(tmp_path, monkeypatch):
    """A table built on a busier machine (every time 10x) is loaded and rescaled to a fresh base measurement, so
    estimates (and a latency=Nms target's factor) follow the machine as it is now."""
    model = Net(16, 16).eval()
    x = torch.randn(1, 2, 6, 6)
    space = PruningSpace.build(model, x, channel_multiple=8)
    config = LatencyConfig(**FAST, cache_dir=str(tmp_path))
    table = build_table(model, x, space, config, multiple=8, columns=False)
    half = {"filter": {g.name: 0.5 for g in space.filter_groups}}
    relative = table.estimate_space(space, half) / table.base_ms
    (path,) = list(Path(tmp_path).rglob("table-*.json"))
    data = json.loads(path.read_text())
    data.update(base_ms=10 * data["base_ms"], fixed_ms=10 * data["fixed_ms"], scale=10 * data["scale"],
                floor_ms=10 * data["floor_ms"])
    path.write_text(json.dumps(data))
    monkeypatch.setattr("autocompress.latency.measure_models",
                        lambda models, example, cfg, batches=None, runs=None: {batches[0]: {"base": _t(1.25)}})
    loaded = build_table(model, x, space, config, multiple=8, columns=False)
    assert loaded.cached and loaded.base_ms == 1.25 and loaded.meta["built_base_ms"] == data["base_ms"]
    assert loaded.estimate_model(model) == pytest.approx(1.25)
    assert loaded.estimate_space(space, half) == pytest.approx(1.25 * relative)


def test_layer_specs_count_calls_and_shapes():
    specs = layer_specs(Net(8, 8), torch.randn(1, 2, 6, 6))
    assert specs["conv2"].spatial == (6, 6) and specs["conv3"].kernel == (1, 1) and specs["fc"].kind == "linear"
    assert specs["conv2"].signature() != specs["conv3"].signature() and all(s.calls == 1 for s in specs.values())


def test_measure_models_interleaves_and_reports_medians():
    small, large = nn.Conv2d(2, 2, 1), nn.Sequential(*[nn.Conv2d(2, 64, 3, padding=1), nn.Conv2d(64, 2, 3)])
    timings = measure_models({"small": small, "large": large}, torch.randn(1, 2, 16, 16),
                             LatencyConfig(runs=5, warmup=1, runtime="torch"), batches=[1, 2])
    assert set(timings) == {1, 2} and all(t.runs == 5 for row in timings.values() for t in row.values())
    assert timings[2]["large"].median_ms > timings[2]["small"].median_ms


def test_latency_target_end_to_end_records_the_estimate(tmp_path):
    """A latency target runs through (met, or refused with the measurement); the estimate is recorded."""
    train, _ = loaders()
    model = trained(SmallCNN(32, 48), train)
    try:
        result = _compress(model, "latency=1.2x", tmp_path / "run", latency={"tolerance": 0.9}, channel_multiple=8)
    except UserError as exc:  # a loaded machine can still miss it (before or after training), with the measurement
        assert any(words in str(exc) for words in ("missed: the compact model runs in", "measured at most",
                                                   "the narrowest widths allowed (max_r 0.95, channel multiple 8)"))
        return
    estimate = result.final["latency_estimate"]
    multiple = 8
    assert estimate["table"]["multiple"] == multiple and result.final["channel_multiple"] == multiple
    assert estimate["error"] == pytest.approx((estimate["estimate_ms"] - estimate["measured_ms"])
                                              / estimate["measured_ms"])
    assert result.model.conv1.out_channels % multiple == 0 and result.model.conv2.out_channels % multiple == 0


def test_a_missed_latency_target_is_timed_again_and_refused_with_the_result():
    """Below (1 - tolerance) x target the models are timed again with 3x the runs; that decides, and a refusal
    is a TargetMissed carrying the run's result."""
    from types import SimpleNamespace

    from autocompress import TargetMissed

    def check(first, again):
        lines, calls = [], []

        def timed(model, runs):
            calls.append(runs)
            return {"base_ms": 1.0, "compressed_ms": 1.0 / again, "speedup": again}

        stored: list[dict] = []
        fake = SimpleNamespace(table=object(), config=CompressConfig.from_dict({"target": "latency=2x"}), factor=2.0,
                               target=Target.parse("latency=2x"), pipeline=SimpleNamespace(log=lines.append),
                               _timed_against_base=timed, store=SimpleNamespace(record=stored.append), run_dir=None)
        result = SimpleNamespace(final={"deployed": {"batches": {"1": {"speedup": first}}},
                                        "latency_estimate": {"estimate_ms": 0.4}}, records=[])
        try:
            Compression._check_latency(fake, result, nn.Identity())
        finally:
            assert stored == result.records == ([] if not calls else [
                {"event": "latency_recheck", "batch": 1, "runs": calls[0], "base_ms": 1.0, "compressed_ms": 1.0 / again,
                 "speedup": again}])
        return lines, calls

    assert check(1.85, again=0.1) == ([], [])  # within the default tolerance 0.1: not timed again
    lines, calls = check(1.5, again=1.9)
    runs = 3 * LatencyConfig().runs
    assert calls == [runs] and f"measured 1.5x, below 1.8x; timed again with {runs} runs: 1.9x" in lines[0]
    with pytest.raises(TargetMissed, match=r"missed: .*\(1\.60x; first measured 1\.50x") as error:
        check(1.5, again=1.6)
    assert "in the error's result; to get this speed, ask for a little more" in str(error.value)
    assert error.value.result.final["latency_estimate"]["estimate_ms"] == 0.4 and isinstance(error.value, UserError)


def test_an_ms_target_missed_in_absolute_ms_on_a_slower_machine_warns_with_the_drift():
    """latency=1ms converted against a 2 ms base (a 2x speedup): the final timing finds the base at 2.4 ms and the
    compact model at 1.2 ms, still 2x; the warning gives the absolute miss and the machine's drift (1.2x); at
    0.9 ms, or with a factor target, there is no warning."""
    from types import SimpleNamespace

    def warning(target, base_ms, compressed_ms):
        fake = SimpleNamespace(target=Target.parse(target), table=SimpleNamespace(base_ms=2.0), factor=2.0)
        return Compression._ms_drift_warning(fake, {"base": _t(base_ms), "compressed": _t(compressed_ms)})

    text = warning("latency=1ms", 2.4, 1.2)
    assert "measured 1.2 ms in the final timing, above 1 ms" in text and "2.4 ms there against 2 ms" in text
    assert "1.20x as slow" in text and "side by side: 2x" in text
    assert warning("latency=1ms", 2.4, 0.9) is None and warning("latency=2x", 2.4, 1.2) is None


def test_a_latency_target_passed_by_far_in_the_final_timing_is_warned_about():
    """Fresh user 69: latency=2x, measured 2.16x by the search before training and 2.58x in the final table, with no
    warning (params and flops targets passed by more than FAR are warned about); at 2.2x (FAR: 10 % above) or
    without a latency target, nothing."""
    from types import SimpleNamespace

    def warning(speedup, table=object()):
        fake = SimpleNamespace(table=table, config=CompressConfig.from_dict({"target": "latency=2x"}), factor=2.0,
                               target=Target.parse("latency=2x"))
        return Compression._latency_overshoot_warning(fake, {"deployed": {"batches": {"1": {"speedup": speedup}}}})

    assert warning(2.58).startswith("target latency=2x is passed by far: the compact model measures 2.58x at batch 1 "
                                    "here, while the search, which timed its candidates before training, took it for "
                                    "one within the target's tolerance")
    assert warning(2.2) is None and warning(2.58, table=None) is None


@pytest.mark.parametrize("setting, reachable_at, outcome", [
    (None, (8,), 8), ("auto", (8,), 8), (None, (16, 8), 16), (16, (8,), "refused"), (None, (), "refused")])
def test_auto_multiple_falls_back_to_8_when_16_cannot_reach_a_latency_target(monkeypatch, setting, reachable_at,
                                                                            outcome):
    """On an AVX-512 CPU ``auto`` is 16; a latency target the table cannot reach at 16 (resnet20's 16-channel
    groups cannot shrink) falls back to 8 with a new table and a log line; an explicit 16, or a target out of
    reach at 8 too, is refused before any work."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    tables = []

    def table(self, base):
        tables.append(self.multiple)
        return SimpleNamespace(base_ms=1.0, column_useless=[])

    def sampler(self, space, target, base_ratio):
        if self.multiple not in reachable_at:
            raise UserError(f"unreachable at {self.multiple}")
        return "sampler"

    monkeypatch.setattr(Compression, "_latency_table", table)
    monkeypatch.setattr(Compression, "_sampler", sampler)
    train, val = loaders()
    lines: list[str] = []
    config = {**CONFIG, "latency": FAST, **({} if setting is None else {"channel_multiple": setting})}
    build = lambda: Compression(SmallCNN(32, 32), torch.randn(1, 1, 8, 8), "latency=1.3x",  # noqa: E731
                                task_args=dict(train_loader=train, val_loader=val), config=config, progress=False,
                                log=lines.append)
    if outcome == "refused":
        with pytest.raises(UserError, match="unreachable at 8" if setting is None else "unreachable at 16"):
            build()
        return
    compression = build()
    assert compression.multiple == compression.pipeline.channel_multiple == outcome
    assert tables == ([16] if outcome == 16 else [16, 8])
    assert any("16 (auto) cannot reach latency=1.3x; falling back to 8" in line for line in lines) == (outcome == 8)


@pytest.mark.parametrize("target, setting, reachable_at, outcome", [
    ("flops=2x", None, (8,), 8), ("flops=2x", None, (8, 1), 8), ("flops=2x", None, (1,), 1),
    ("flops=2x", None, (4, 1), 4), ("flops=2x", None, (16, 4), 4),
    ("flops=2x", "auto", (1,), 1), ("flops=2x", 16, (1,), "refused"), ("flops=2x", None, (), "refused"),
    ("params=2x", None, (1,), 1), ("params=2x", None, (4, 1), 4), ("params=2x", None, (8, 4, 1), 8)])
def test_flops_target_defaults_to_auto_and_falls_back_to_4_then_1(monkeypatch, target, setting, reachable_at,
                                                                   outcome):
    """A flops or params target's default multiple is ``auto``: 8 on an AVX-512 CPU (its fit gives channels back
    on the 16-channel block); one unreachable at 8 falls back to 4 (onnxruntime's layout), then 1 (any width),
    each logged once one reaches the target and without a lookup table; an explicit multiple never falls back; a
    target out of reach at 1 is refused with the last refusal alone (fresh user 51 read three fall-backs first)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    tried = []

    def sampler(self, space, factor, base_ratio):
        tried.append(self.multiple)
        assert space is self.first_space and space.channel_multiple == self.multiple
        if self.multiple not in reachable_at:
            raise UserError(f"unreachable at {self.multiple}")
        return "sampler"

    monkeypatch.setattr(Compression, "_sampler", sampler)
    train, val = loaders()
    lines: list[str] = []
    config = {**CONFIG, **({} if setting is None else {"channel_multiple": setting})}
    build = lambda: Compression(SmallCNN(32, 32), torch.randn(1, 1, 8, 8), target,  # noqa: E731
                                task_args=dict(train_loader=train, val_loader=val), config=config, progress=False,
                                log=lines.append)
    if outcome == "refused":
        with pytest.raises(UserError, match="unreachable at 1" if setting is None else "unreachable at 16"):
            build()
        assert tried == ([8, 4, 1] if setting is None else [16])
        assert not [line for line in lines if "falling back" in line]  # a refusal is not preceded by fall-backs
        return
    compression = build()
    assert compression.table is None and compression.multiple == compression.pipeline.channel_multiple == outcome
    assert compression.block == 16
    assert tried == [m for m in (8, 4, 1) if m >= outcome]
    falls = [line for line in lines if "falling back" in line]
    assert len(falls) == len(tried) - 1
    assert not falls or (falls[0].startswith(f"channel multiple: 8 (auto) cannot reach {target}; falling back to 4")
                         and "given back on the 16-channel block only" in falls[0])


class NarrowFirst(nn.Module):
    """``[B, 1, 8, 8]`` -> ``[B, 3]``: convolutions of 16, 16 and 64 channels (3x3, padding 1), GAP, Linear: at
    a channel multiple of 16 only the last can shrink (like resnet20's first stage)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x).mean((2, 3)))


@pytest.mark.parametrize("target, setting, capability, widths", [
    ("flops=2x", None, "AVX512", [[16], [16], [16, 32, 48, 64]]),
    ("params=2x", "auto", "AVX512", [[16], [16], [16, 32, 48, 64]]),
    ("flops=2x", 8, "AVX512", None), ("flops=2x", None, "AVX2", None), ("params=3x", None, "AVX2", None)])
def test_auto_multiple_gives_channels_back_on_the_cpu_block(monkeypatch, caplog, target, setting, capability,
                                                            widths):
    """A params / flops target under ``auto`` narrows every group at steps of 8 and gives back the channels a fit
    does not need on the CPU's block only (16 -> 32 channels, never 24, on AVX-512: :func:`on_block`); an explicit
    8, or a CPU whose block is 8, gives back at steps of 8. NarrowFirst's 16-channel groups can shrink to 8 (at 16
    only its last conv could); the groups excluded are logged once in the run's log."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    train, val = loaders()
    lines: list[str] = []
    config = {**CONFIG, **({} if setting is None else {"channel_multiple": setting})}
    with caplog.at_level(logging.INFO, logger="autocompress.space"):
        compression = Compression(NarrowFirst(), torch.randn(1, 1, 8, 8), target,
                                  task_args=dict(train_loader=train, val_loader=val), config=config, progress=False,
                                  log=lines.append)
    excluded = [line for line in lines if re.match(r"not (\w+-)?pruned", line)]  # in the run's log, not at INFO
    assert not [r for r in caplog.records if re.match(r"not (\w+-)?pruned", r.getMessage())]
    # two of the four layers left out share a reason, logged on one line
    assert len(excluded) == len(set(excluded)) == (3 if target.startswith("flops") else 1)
    assert compression.multiple == compression.pipeline.channel_multiple == 8
    assert compression.first_space.channel_multiple == 8
    assert not [line for line in lines if "falling back" in line]
    sampler = compression._sampler(compression.first_space, compression.factor, 1.0)
    filters = [w for unit, w in zip(sampler.units, sampler.widths or [None] * len(sampler.units))
               if unit.kind == "filter"]
    assert filters == (widths or [None, None, None])
    said = next(line for line in lines if line.startswith("channel multiple: "))
    assert ("given back only in whole 16-channel blocks (of 2-D convolutions and Linear outputs" in said) == bool(
        widths) and compression.block == (16 if widths else 8)


class Conv1dNet(nn.Module):
    """``[B, 1, 16]`` -> ``[B, 3]``: 1-D convolutions of 16, 32 and 64 channels, global average pooling, Linear."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv1d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 32, 3, padding=1),
                                   nn.ReLU(), nn.Conv1d(32, 64, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x).mean(2))


def test_a_model_of_one_dimensional_convolutions_gives_channels_back_at_the_multiple(monkeypatch):
    """Fresh user 90 read that their PointNet's Conv1d channels were given back on 16-channel blocks, a layout
    onnxruntime gives 2-D convolutions only: a Conv1d runs in time proportional to its width (BENCHMARKS.md, session
    56), so where no group sets a 2-D conv's channels or a Linear's outputs, ``auto``'s 8 gives back at steps of 8
    and the log names no block."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 1, 16, generator=g), torch.randint(0, 3, (64,), generator=g)),
                      batch_size=16)
    lines: list[str] = []
    compression = Compression(Conv1dNet(), torch.randn(1, 1, 16), "flops=2x", task_args=dict(
        train_loader=data, val_loader=data), config=CONFIG, progress=False, log=lines.append)
    assert compression.multiple == 8 and compression.block == 8
    said = next(line for line in lines if line.startswith("channel multiple: "))
    assert said == "channel multiple: auto: 8 for a params / flops target: widths in steps of 8 (CPU capability " \
                   "AVX512: oneDNN blocks channels by 16)"
    sampler = compression._sampler(compression.first_space, compression.factor, 1.0)
    assert sampler.widths is None


@pytest.mark.parametrize("reached, multiple, block, words, searched", [
    (2.19, 8, 16, None, None),
    (2.45, 8, 16, "channel_multiple auto (8) gave channels back on the CPU's 16-channel block only (a width between "
                  "blocks runs as slowly as the next block); channel_multiple 1 (any width) fits closest, and may "
                  "run slower", None),
    (2.45, 16, 16, "channel_multiple 16 may allow only coarse widths here; channel_multiple 1 (any width) fits "
                   "closest, and may run slower", None),
    (2.45, 1, 1, "the round records", None),
    (2.45, 1, 16, "the round records", None),  # fell back to 1: no give-back, no block
    (2.45, 8, 16, "the searched widths met it at 2.05x, and purification then removed channels beyond them that "
                  "refitting the rates could not give back (the round's refit record); purification.enabled false "
                  "keeps them", 2.05),  # fresh user 90's PointNet
    (2.45, 8, 16, "gave channels back on the CPU's 16-channel block", 2.3)])  # the search's widths passed it too
def test_a_target_passed_by_more_than_a_tenth_is_warned_about_naming_the_cause(reached, multiple, block, words,
                                                                             searched):
    """A fresh user's flops=2x ended at 2.45x at ``auto``'s 8 (the give-back on the 16-channel block could not land
    closer) without a word: above 1.1x the target the final record says why; where the searched widths met it,
    purification removed the rest."""
    from autocompress.compress import Target, _overshoot_warning, _reduction

    base, compressed = {"params": 1000, "macs": 24500}, {"params": 600, "macs": 10000}
    target = Target.parse("flops=2x")
    warning = _overshoot_warning(_reduction(base, {**compressed, "macs": round(24500 / reached)}, target), target,
                                 multiple, block, searched=searched)
    assert (warning is None) if words is None else (f"is {reached:.3g}x; " in warning and words in warning)


def test_an_explicit_multiple_that_cannot_reach_a_flops_target_is_refused_naming_the_unpruned_columns():
    """An explicit multiple does not fall back: NarrowFirst at 16 reaches 2.45x of its MACs (filters alone; its
    3x3 convs' columns would save no executed MACs), so flops=3x is refused before any work, saying why."""
    train, val = loaders()
    with pytest.raises(UserError, match=r"reaches only 2.4\dx \(not column-pruned for a flops target.*: convs.6, "
                                        r"convs.3, convs.0; .*, give a params target, which counts their columns$"):
        Compression(NarrowFirst(), torch.randn(1, 1, 8, 8), "flops=3x", task_args=dict(train_loader=train,
                    val_loader=val), config={**CONFIG, "channel_multiple": 16}, progress=False)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("target, config, setting, words", [
    ("latency=2x", {"latency": {"runtime": "tvm"}}, "latency.runtime", "unknown latency.runtime 'tvm'"),
    ("latency=2x", {"channel_multiple": 0}, "channel_multiple", "channel_multiple=0 is not valid"),
    ("params=5ms", {}, "target", "cannot read target"),
    ("latency=2x", {"dims": "irregular"}, "dims", "irregular sparsity"),
    ("latency=5ms", {"rounds": [2, 4]}, "rounds", "has no factor"),
    ("flops=2x", {"latency": {"device": "cuda"}}, "latency.device", "not available"),
    ("latency=2x", {"latency": {"tolerance": 1.5}}, "latency.tolerance", "use a fraction from 0 (inclusive) to 1"),
    ("latency=2x", {"latency": {"threads": 0}}, "latency.threads", "use an integer from 1 to 1024"),
])
def test_bad_settings_are_refused_by_name(target, config, setting, words):
    with pytest.raises(SettingError) as info:
        CompressConfig.from_dict({"target": target, **config})
    assert info.value.setting == setting and words in str(info.value)


def test_missing_runtime_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SettingError, match="latency.runtime onnxruntime is not installed"):
        CompressConfig.from_dict({"target": "flops=2x"})


@pytest.mark.parametrize("target, config, words", [
    ("flops=2x", {"channel_multiple": 16}, "channel_multiple=16 is larger than filter group 'conv1' (8 channels, "
                                           "the smallest of 2 such groups); use a multiple of at most 8"),
    ("latency=50x", {}, "latency=50x cannot be reached in onnxruntime: by the lookup table the narrowest widths"),
    ("latency=0.0001ms", {}, "latency=0.0001ms cannot be reached in onnxruntime"),
    ("latency=1000ms", {}, "the base model already runs in"),
])
def test_bad_input_refused_before_any_work(tmp_path, monkeypatch, target, config, words):
    monkeypatch.setattr("autocompress.rounds.Pipeline.run_round", lambda *a, **k: pytest.fail("work started"))
    train, val = loaders()
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
        Compression(SmallCNN(8, 12), torch.randn(1, 1, 8, 8), target, task_args=dict(train_loader=train,
                    val_loader=val), config={**CONFIG, "latency": FAST, **config}, run_dir=tmp_path / "run",
                    progress=False).run()
    if config:  # the CLI turns a SettingError into its flag's name (--channel-multiple)
        assert isinstance(info.value, SettingError) and info.value.setting == "channel_multiple"
    # fresh user 59: the README's ``except autocompress.Unreachable`` missed an unreachable latency target
    assert isinstance(info.value, autocompress.Unreachable) == ("cannot be reached" in words)
    assert not (tmp_path / "run").exists()


def test_latency_target_text():
    assert str(Target.parse("latency=5ms")) == "latency=5ms" and Target.parse("latency = 2.5x").factor == 2.5
    assert Target.parse("latency=5ms").factor is None


def test_cli_flags_set_the_latency_settings():
    import argparse

    from autocompress.cli.compress import add_arguments, settings_from

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["base.pt", "--target", "latency=2x", "--channel-multiple", "8", "--latency-runtime",
                              "torch", "--latency-threads", "2", "--latency-batch", "4"])
    assert settings_from(args, {"latency": {"runs": 5}}) == {
        "target": "latency=2x", "channel_multiple": 8, "latency": {"runs": 5, "runtime": "torch", "threads": 2,
                                                                   "batch": 4}}
    assert parser.parse_args(["base.pt", "--channel-multiple", "auto"]).channel_multiple == "auto"


def test_a_model_the_runtime_cannot_take_keeps_its_result(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise UserError("the model cannot be exported to ONNX for latency (RuntimeError)")

    monkeypatch.setattr(sys.modules["autocompress.compress"], "measure_models", refuse)
    train, _ = loaders()
    final = _compress(trained(SmallCNN(8, 8), train), "params=1.5x").final
    assert final["deployed"] is None and "deployed_b1_ms" not in final["rows"][1]
    assert final["warnings"][0] == ("deployed latency not measured: the model cannot be exported to ONNX for latency "
                                    "(RuntimeError)")
    # timing (and the tiny model's accuracy, coarse units and briefly trained BatchNorm) may or may not warn
    assert all("in eager PyTorch" in warning or "validation top-1" in warning or "is passed by far" in warning
               or "BatchNorm statistics did not fit" in warning for warning in final["warnings"][1:])


@pytest.mark.parametrize("widths, blocked", [((3, 27, 16, 8), 2), ((3, 28, 16, 8), 3), ((3, 12, 20, 8), 3),
                                             ((3, 16, 5, 6), 3), ((3, 16, 18, 5), 2), ((3, 30, 22, 5), 1)])
def test_blocked_convolutions_counts_the_ones_on_the_4_channel_grid(widths, blocked):
    """onnxruntime takes a convolution into its blocked layout where its input channels are a multiple of 4 or
    fewer than a block (16 on AVX-512, 8 on AVX2: 3 and 5 here); 27, 18, 30
    and 22 input channels are not, so the layer after such a width runs outside it (read from onnxruntime's
    optimised graph)."""
    from autocompress.latency import blocked_convolutions

    layers = [m for cin, cout in zip(widths, widths[1:]) for m in (nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())]
    assert blocked_convolutions(nn.Sequential(*layers).eval(), torch.randn(1, 3, 12, 12)) == (blocked, 3)


@pytest.mark.parametrize("conv, shape", [(nn.Conv1d, (28,)), (nn.Conv3d, (6, 6, 6))])
def test_one_and_three_dimensional_convolutions_never_run_in_the_blocked_layout(conv, shape):
    """Fresh user 88's Conv1d net (input widths 28 and 64, multiples of 4) ran 0 of 2 convolutions in onnxruntime's
    blocked layout and the explanation named only the 4-channel grid: only 2-D convolutions take it."""
    from autocompress.latency import LAYOUT_RULE, blocked_convolutions

    model = nn.Sequential(conv(28, 64, 3), nn.ReLU(), conv(64, 64, 3)).eval()
    assert blocked_convolutions(model, torch.randn(1, 28, *shape)) == (0, 2)
    assert LAYOUT_RULE.startswith("only 2-D convolutions take it")


def test_the_narrowest_model_the_table_times_has_the_run_s_layer_norm_form():
    """A latency target times what the run will ship: with ``layer_norm: kept`` the narrowest model (the table's
    fixed cost) has plain LayerNorms, with ``padded`` PaddedLayerNorms (a Pad and a Slice around each)."""
    from autocompress.latency import _smallest
    from autocompress.padded_norm import PaddedLayerNorm
    from autocompress.space import PruningSpace

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.fc = nn.Conv2d(3, 32, 3, padding=1), nn.LayerNorm(32), nn.Linear(32, 4)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))

    model, x = Net().eval(), torch.randn(1, 3, 8, 8)
    space = PruningSpace.build(model, x, dims=("filter",), channel_multiple=8)
    kept, padded = (_smallest(model, x, space, 8, form).norm for form in ("kept", "padded"))
    assert type(kept) is nn.LayerNorm and kept.normalized_shape[0] < 32
    assert isinstance(padded, PaddedLayerNorm) and (padded.num_features, padded.width) == (kept.normalized_shape[0], 32)


@settings(max_examples=30, deadline=None)
@given(names=st.integers(1, 3), runs=st.integers(1, 40), block=st.integers(1, 12), warmup=st.integers(0, 3))
def test_runners_are_timed_in_blocks_of_calls_in_a_row_each_after_an_untimed_call(names, runs, block, warmup):
    """Fresh user 61: alternating the models call by call evicted each other's weights and understated a resnet18's
    speedup (1.6x against 2.9x timed alone); each model now runs ``block`` timed calls in a row, each block after
    an untimed call, the order reversed every other round."""
    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abc"[:names]}
    timings = time_runners(runners, runs=runs, warmup=warmup, threads=1, block=block)
    order = list(runners)
    expected = [name for name in order for _ in range(warmup)]
    for index in range(-(-runs // block)):
        timed = min(block, runs - index * block)
        expected += [name for name in (order if index % 2 == 0 else order[::-1]) for _ in range(1 + timed)]
    assert calls == expected
    assert {name: t.runs for name, t in timings.items()} == {name: runs for name in order}


def test_a_model_the_torchscript_exporter_cannot_export_at_any_batch_is_timed_through_torch_export():
    """Fresh user 68: an ``InstanceNorm2d(track_running_stats=True)`` has no TorchScript ONNX export with a dynamic
    batch ("ONNX export of instance_norm training for unknown batch size"); ``export_onnx`` fell back to the
    torch.export-based exporter, but the latency path, which wraps the model in a forward of ``*inputs``, passed
    torch.export dynamic shapes of the wrong structure and refused a latency target. Timed now at batch 1 and 3,
    computing what the model computes."""
    from autocompress.latency import _onnx_session

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    model(torch.randn(4, 1, 8, 8) + 1)
    model.eval()
    session = _onnx_session(model, (torch.randn(1, 1, 8, 8),), 1)
    for batch in (1, 3):
        x = torch.randn(batch, 1, 8, 8)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(out), model(x), atol=1e-5)
    bind = runner(model, torch.randn(1, 1, 8, 8), "onnxruntime")
    bind(torch.randn(64, 1, 8, 8))()


def test_a_model_onnxruntime_cannot_run_at_another_batch_is_a_user_error_naming_the_batch(capfd):
    """A forward that writes the batch size into a reshape exports at batch 1 and fails in onnxruntime at 64: a
    fresh user's finished run died in the final table's timing with onnxruntime's raw error; it is now a
    UserError (the final table warns and keeps the run's result), and onnxruntime's own error line (fresh user 61)
    is not written to stderr before it."""
    from autocompress.latency import runner

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(x).reshape(1, 4)

    bind = runner(Fixed().eval(), torch.randn(1, 6), "onnxruntime")
    bind(torch.randn(1, 6))()
    with pytest.raises(UserError, match=r"cannot run the exported model at batch 64 \(.*\(len\(x\) is one\)$"):
        bind(torch.randn(64, 6))
    assert "onnxruntime" not in capfd.readouterr().err


def test_a_float64_model_onnxruntime_cannot_load_is_a_user_error_naming_the_fix():
    """Fresh user 54's float64 model ran its whole compression, then onnxruntime's "NOT_IMPLEMENTED ... Conv(11)"
    came out raw at the final timing and the result was lost; now it is the UserError the final table turns into a
    warning."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).double().eval()
    with pytest.raises(UserError, match=r"^onnxruntime cannot load the exported model \(.*NOT_IMPLEMENTED.*\); "
                                        r"use latency.runtime torch"):
        measure_models({"model": model}, torch.randn(1, 1, 8, 8, dtype=torch.float64), LatencyConfig(runs=2),
                       batches=[1])


class TokenClassifier(nn.Module):
    """Token ids ``[B, T]`` and a padding mask ``[B, T]``, two forward arguments -> ``[B, 3]``: the masked mean of
    the tokens' embeddings through two Linear layers."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Embedding(20, 16), nn.Linear(16, hidden), nn.Linear(hidden, 3)

    def forward(self, ids, mask):
        weights = mask.to(self.fc1.weight.dtype).unsqueeze(-1)
        pooled = (self.embed(ids) * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.fc2(torch.relu(self.fc1(pooled)))


def _tokens(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (batch, 6), generator=generator), torch.rand(batch, 6, generator=generator) < 0.7


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_a_model_of_two_inputs_is_timed_with_both(runtime):
    torch.manual_seed(0)
    model, example = TokenClassifier().eval(), _tokens(2)
    timings = measure_models({"base": model, "narrow": TokenClassifier(8).eval()}, example,
                             LatencyConfig(runtime=runtime, **FAST))
    assert set(timings) == {1, 4} and all(set(t) == {"base", "narrow"} for t in timings.values())
    assert all(t.runs == 3 and t.median_ms > 0 for per_batch in timings.values() for t in per_batch.values())
    if runtime == "onnxruntime":  # the session computes the model's output on inputs bound at another batch
        other = _tokens(5, seed=1)
        with torch.no_grad():
            expected = model(*other).numpy()
        assert np.abs(runner(model, example, runtime)(other)()[0] - expected).max() <= 1e-5


def test_deployed_form_of_a_two_input_model_computes_what_it_computes():
    from autocompress.columns import ColumnLinear
    from autocompress.deployment import deployed_form

    torch.manual_seed(0)
    model = TokenClassifier().eval()
    model.fc1 = ColumnLinear.from_linear(model.fc1, torch.tensor([0, 2, 5, 7, 11, 15]))
    example = _tokens(3)
    form = deployed_form(model, example, {"runtime": "onnxruntime", **FAST})
    assert form.column_layers == ["fc1"]
    with torch.no_grad():
        assert torch.allclose(form.model(*example), model(*example), atol=1e-6)


def test_bad_inputs_to_time_are_refused_naming_the_problem():
    model = TokenClassifier().eval()
    ids, mask = _tokens(2)
    with pytest.raises(UserError, match="different batch sizes"):
        measure_models({"base": model}, (ids, mask[:1]), LatencyConfig(**FAST))
    with pytest.raises(UserError, match=r"must be a tensor \[B, ...\] or a tuple of them"):
        measure_models({"base": model}, (ids, None), LatencyConfig(**FAST))


def test_timings_that_spread_widely_are_warned_about():
    """Two fresh users read 1.79x and 3.57x from a loaded machine (base timings spreading 0.42-4.3 ms and
    0.27-0.80 ms between the 10th and 90th percentile) where their own interleaved timing gave 1.37x: a spread of
    more than NOISY x is warned about, naming the batch, the model and the spread."""
    def timing(low: float, high: float) -> Timing:
        return Timing(median_ms=(low + high) / 2, p10_ms=low, p90_ms=high, runs=30)

    config = LatencyConfig()
    quiet = deployed_summary({1: {"base": timing(0.0609, 0.0622), "compressed": timing(0.0392, 0.0409)}}, config)
    assert noisy_timing_warning(quiet) is None and noisy_timing_warning(None) is None
    loaded = deployed_summary({1: {"base": timing(0.421, 4.3), "compressed": timing(0.2, 0.25)},
                               64: {"base": timing(8.0, 8.5), "compressed": timing(2.0, 4.1)}}, config)
    assert noisy_timing_warning(loaded) == (
        "the deployed timings were noisy (10th-90th percentile: batch 1: base 0.421-4.3 ms; batch 64: compressed "
        "2-4.1 ms), so the speedups in the table are uncertain: time the models again on an idle machine "
        "(autocompress inspect, or more latency.runs) before relying on them")
