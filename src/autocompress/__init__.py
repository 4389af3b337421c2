"""autocompress: AutoCompress (Liu et al., AAAI 2020) automatic structured pruning for PyTorch.

Public API (see docs/ARCHITECTURE.md):

* :func:`autocompress.models.create_model`, :func:`autocompress.models.list_models`
* :func:`autocompress.load` — rebuild a saved (compact) model without unpickling code
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, map_location="cpu"):
    """Rebuild a model saved by autocompress (checkpoint or compact model). See serialization.load."""
    from .serialization import load as _load

    return _load(path, map_location=map_location)
