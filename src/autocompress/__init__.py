"""autocompress: AutoCompress (Liu et al., AAAI 2020) automatic structured pruning for PyTorch.

Public API (see README.md and docs/ARCHITECTURE.md):

* :func:`autocompress.compress` — compress any trained nn.Module to a params / FLOPs target over the
  caller's loaders, loss, score and (optionally) training loop; returns the compact model in memory.
* :func:`autocompress.prune` — one round of ADMM pruning, purification, retraining and compaction at
  given per-layer rates.
* :class:`autocompress.CompressConfig` — every setting, as nested typed dataclasses.
* :class:`autocompress.TrainingPhase` — what a caller's own training loop (``train_fn``) receives.
* :func:`autocompress.deployed_form` — a compact model's column layers each stored or dense, whichever runs
  faster in the deployment runtime (export that form).
* :func:`autocompress.load` — rebuild a saved (compact) model without unpickling code.
"""
from __future__ import annotations

__version__ = "0.17.0"

# Imported eagerly: a lazy attribute named like its submodule (``autocompress.compress``) would be replaced
# by the submodule as soon as anything imported ``autocompress.compress``.
from .compress import CompressResult, compress  # noqa: E402
from .config import CompressConfig  # noqa: E402
from .deployment import deployed_form  # noqa: E402
from .errors import SettingError, TargetMissed, UserError  # noqa: E402
from .pruning import PruneResult, prune  # noqa: E402
from .rounds import TrainingPhase  # noqa: E402
from .sampling import Unreachable  # noqa: E402

__all__ = ["CompressConfig", "CompressResult", "PruneResult", "SettingError", "TargetMissed", "TrainingPhase",
           "Unreachable", "UserError", "__version__", "compress", "deployed_form", "load", "prune"]


def load(path, map_location="cpu", model=None, check=True):
    """Rebuild a model saved by autocompress (a zoo checkpoint or a compact model) without unpickling code.

    Args:
        path: a checkpoint written by autocompress (``train``, ``prune``, ``compress`` or
            :func:`autocompress.serialization.save_compact`).
        map_location: where the file's tensors go (``torch.load``'s argument).
        model: optional fresh instance of the model the checkpoint was saved from; it receives the saved
            architecture and weights (changed in place: its layers get the compact widths, while plain
            attributes of your own, such as a ``self.width`` set in ``__init__``, keep their constructor values)
            and is returned. Needed when the recorded class
            cannot be imported here or its constructor arguments were not recorded. Without it the model is
            built from the registry or by importing the recorded class (``module:qualname``, an
            ``nn.Module`` subclass of the user's own installed code) with the recorded arguments. A
            ``torch.compile`` (or ``DataParallel``) wrapper is returned with the module it holds filled.
        check: verify that the rebuilt model computes the saved model's outputs on the file's seeded check
            input (files written by ``compress`` and ``save_compact`` carry one); False loads without it.

    Returns the model in eval mode. Raises UserError for unreadable files and models that cannot be
    rebuilt (see :func:`autocompress.checkpoint.load_model`).
    """
    from .checkpoint import load_model

    return load_model(path, map_location=map_location, model=model, check=check)
