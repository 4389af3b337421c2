"""autocompress: AutoCompress (Liu et al., AAAI 2020) automatic structured pruning for PyTorch.

Public API (see docs/ARCHITECTURE.md):

* :func:`autocompress.models.create_model`, :func:`autocompress.models.list_models`
* :func:`autocompress.load` — rebuild a saved (compact) model without unpickling code
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, map_location="cpu"):
    """Rebuild a model saved by autocompress (a zoo checkpoint or a compact model) without unpickling
    code. See :func:`autocompress.checkpoint.load_model`."""
    from .checkpoint import load_model

    return load_model(path, map_location=map_location)
