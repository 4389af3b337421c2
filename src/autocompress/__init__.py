"""autocompress: AutoCompress (Liu et al., AAAI 2020) automatic structured pruning for PyTorch.

Public API (see docs/ARCHITECTURE.md):

* :func:`autocompress.models.create_model`, :func:`autocompress.models.list_models`
* :func:`autocompress.load` — rebuild a saved (compact) model without unpickling code
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, map_location="cpu", model=None):
    """Rebuild a model saved by autocompress (a zoo checkpoint or a compact model) without unpickling code.

    Args:
        path: a checkpoint written by autocompress (``train``, ``prune``, ``compress`` or
            :func:`autocompress.serialization.save_compact`).
        map_location: where the file's tensors go (``torch.load``'s argument).
        model: optional fresh instance of the model the checkpoint was saved from; it receives the saved
            architecture and weights (changed in place) and is returned. Needed when the recorded class
            cannot be imported here or its constructor arguments were not recorded. Without it the model is
            built from the registry or by importing the recorded class (``module:qualname``, an
            ``nn.Module`` subclass of the user's own installed code) with the recorded arguments.

    Returns the model in eval mode. Raises UserError for unreadable files and models that cannot be
    rebuilt (see :func:`autocompress.checkpoint.load_model`).
    """
    from .checkpoint import load_model

    return load_model(path, map_location=map_location, model=model)
