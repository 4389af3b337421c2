"""ONNX export of a base and a compact model: file size, operator histogram and onnxruntime CPU latency.

    .venv/bin/python benchmarks/onnx_export.py BASE.pt COMPACT.pt [--threads 1] [--runs 50]

Each model is exported with :func:`autocompress.export.export_onnx` (checked against PyTorch) and timed in
onnxruntime (CPUExecutionProvider, ``--threads`` intra-op threads) at batch 1 and 64: median ms over
``--runs`` runs after 5 warm-up runs, base and compact alternated 3 times, the lowest median kept.
"""
from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import onnx
import torch

import autocompress
from autocompress.checkpoint import load_checkpoint
from autocompress.export import export_onnx
from autocompress.text import plural
from run_grid import ort_median_ms, ort_session  # benchmarks/, this script's folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("compact")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    input_size = load_checkpoint(args.base)["dataset"]["input_size"]
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (("base", args.base), ("compact", args.compact)):
            result = export_onnx(autocompress.load(path), torch.zeros(1, *input_size), Path(tmp) / f"{name}.onnx")
            ops = collections.Counter(node.op_type for node in onnx.load(str(result.path)).graph.node)
            print(f"{name}: {result.num_bytes:,} bytes, max |ORT - PyTorch| {result.max_abs_diff:.2g}, "
                  f"ops {dict(sorted(ops.items()))}")
            sessions[name] = ort_session(result.path, args.threads)
        generator = torch.Generator().manual_seed(0)
        for batch in (1, 64):
            x = torch.randn(batch, *input_size, generator=generator)
            best = {name: float("inf") for name in sessions}
            for _ in range(3):  # alternate; a load spike can only slow a median down, so keep the lowest
                for name, session in sessions.items():
                    best[name] = min(best[name], ort_median_ms(session, x, args.runs, warmup=5))
            print(f"batch {batch}: base {best['base']:.3f} ms, compact {best['compact']:.3f} ms, "
                  f"speedup {best['base'] / best['compact']:.2f}x ({plural(args.threads, 'thread')})")


if __name__ == "__main__":
    main()
