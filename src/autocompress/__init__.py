"""autocompress: AutoCompress (Liu et al., AAAI 2020) automatic structured pruning for PyTorch.

Public API (see README.md and docs/ARCHITECTURE.md):

* :func:`autocompress.compress` — compress any trained nn.Module to a params / FLOPs target over the
  caller's loaders, loss, score and (optionally) training loop; returns the compact model in memory.
* :func:`autocompress.prune` — one round of ADMM pruning, purification, retraining and compaction at
  given per-layer rates.
* :class:`autocompress.CompressConfig` — every setting, as nested typed dataclasses.
* :class:`autocompress.TrainingPhase` — what a caller's own training loop (``train_fn``) receives.
* :func:`autocompress.load` — rebuild a saved (compact) model without unpickling code.
"""
from __future__ import annotations

__version__ = "0.2.0"

from .compress import CompressResult, compress  # noqa: E402
from .config import CompressConfig, SettingError  # noqa: E402
from .errors import UserError  # noqa: E402
from .pruning import PruneResult, prune  # noqa: E402
from .rounds import TrainingPhase  # noqa: E402

__all__ = ["CompressConfig", "CompressResult", "PruneResult", "SettingError", "TrainingPhase", "UserError",
           "__version__", "compress", "load", "prune"]


def load(path, map_location="cpu"):
    """Rebuild a model saved by autocompress (a zoo checkpoint or a compact model) without unpickling
    code. See :func:`autocompress.checkpoint.load_model`."""
    from .checkpoint import load_model

    return load_model(path, map_location=map_location)
