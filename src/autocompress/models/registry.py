"""Model registry in the style of timm / torchvision: register a builder under a name, build it by name.

* ``@register_model("resnet20", input_size=(3, 32, 32), default_dataset="cifar10")`` registers a
  builder ``fn(num_classes=10, **kwargs) -> nn.Module``.
* ``create_model(name, num_classes=10, **kwargs)`` builds one; ``list_models()`` lists the names;
  ``model_info(name)`` gives its :class:`ModelInfo` (expected input size and so on).
* Any torchvision classification model is available as ``"torchvision:<name>"`` (built with
  ``weights=None``: nothing is ever downloaded), input size 3x224x224 (``inception_v3``: 3x299x299).
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..errors import MissingCode, UserError

TORCHVISION_PREFIX = "torchvision:"

#: input size (C, H, W) of torchvision classification models that do not take 3x224x224
_TORCHVISION_INPUT_SIZES = {"inception_v3": (3, 299, 299)}
#: constructor defaults for torchvision models whose own defaults do not suit pruning / no weights
#: (auxiliary classifiers add a second output in train mode; ``init_weights`` silences a warning)
_TORCHVISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
}


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model name.

    Attributes:
        name: the registered name (``"resnet20"``, ``"torchvision:resnet50"``).
        input_size: expected input of one sample as (channels, height, width).
        default_dataset: dataset the model is meant for (``"cifar10"``, ``"fashion-mnist"``,
            ``"imagefolder"``), or ``None``.
        description: first line of the builder's docstring.
        builder: ``fn(num_classes=..., **kwargs) -> nn.Module``.
    """

    name: str
    input_size: tuple[int, int, int]
    default_dataset: str | None
    description: str
    builder: Callable[..., nn.Module]


_REGISTRY: dict[str, ModelInfo] = {}


def _same_definition(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """Whether two builders are the same definition: the same object, or the same module and qualified name
    (a re-run notebook cell or a reloaded module defines a new object for the same builder)."""
    return a is b or (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == \
        (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def register_model(name: str, *, input_size: tuple[int, int, int], default_dataset: str | None = None):
    """Decorator registering ``builder(num_classes=10, **kwargs) -> nn.Module`` under ``name``.

    Registering the same builder again (same module and qualified name, e.g. a re-run notebook cell) replaces
    the entry with the new definition and settings; it is not an error.

    Raises:
        ValueError: ``name`` is registered to a different builder or uses the reserved ``torchvision:``
            prefix (a programming error, not user input).
    """
    if name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"model name {name!r} uses the reserved prefix {TORCHVISION_PREFIX!r}")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and not _same_definition(_REGISTRY[name].builder, builder):
            old = _REGISTRY[name].builder
            raise ValueError(f"model name {name!r} is already registered to "
                             f"{getattr(old, '__module__', '?')}.{getattr(old, '__qualname__', old)}")
        doc = inspect.getdoc(builder) or ""
        _REGISTRY[name] = ModelInfo(name, tuple(input_size), default_dataset,
                                    doc.splitlines()[0] if doc else "", builder)
        return builder

    return decorator


def _torchvision_names() -> list[str]:
    """Names of torchvision's image classification models (``torchvision.models`` top level)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models(include_torchvision: bool = False) -> list[str]:
    """Registered model names, sorted; with ``include_torchvision`` also ``torchvision:<name>`` for
    every torchvision classification model."""
    names = sorted(_REGISTRY)
    if include_torchvision:
        names += [TORCHVISION_PREFIX + n for n in _torchvision_names()]
    return names


def _unknown(name: str) -> UserError:
    if name.startswith(TORCHVISION_PREFIX):  # compare the torchvision part alone: the prefix would match anything
        stem = name[len(TORCHVISION_PREFIX):]
        close = [TORCHVISION_PREFIX + n for n in difflib.get_close_matches(stem, _torchvision_names(), n=3,
                                                                          cutoff=0.6)]
    else:
        close = difflib.get_close_matches(name, list_models(include_torchvision=True), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return MissingCode(f"unknown model {name!r}{hint}",
                       "run `autocompress inspect --list-models` to list the model names "
                       "(any torchvision classifier as torchvision:<name>)")


def _torchvision_builder(tv_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
        import torchvision

        options = {**_TORCHVISION_DEFAULTS.get(tv_name, {}), **kwargs}
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **options)

    build.__doc__ = f"torchvision's {tv_name} (random initialisation, weights=None)."
    return build


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``name``.

    Raises:
        UserError: unknown name (the message lists close matches).
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX):]
        if tv_name in _torchvision_names():
            builder = _torchvision_builder(tv_name)
            return ModelInfo(name, _TORCHVISION_INPUT_SIZES.get(tv_name, (3, 224, 224)), "imagefolder",
                             inspect.getdoc(builder), builder)
    raise _unknown(name)


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` with freshly initialised weights.

    Args:
        name: a name from :func:`list_models`, or ``"torchvision:<name>"``.
        num_classes: outputs of the classifier (logits of shape ``[N, num_classes]``).
        **kwargs: model-specific options (e.g. ``width`` for the VGGs and ``fmnist_cnn``).

    Raises:
        UserError: unknown name, an option the model does not take, or an invalid option value.
    """
    info = model_info(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}",
                        "pass the number of classes of the dataset")
    signature = inspect.signature(info.builder)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if not takes_any:
        unknown = sorted(set(kwargs) - set(signature.parameters))
        if unknown:
            options = sorted(set(signature.parameters) - {"num_classes"})
            raise UserError(f"model {name!r} takes no option {', '.join(map(repr, unknown))}",
                            f"use one of: {', '.join(options) or '(none)'}")
    try:
        return info.builder(num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot build model {name!r} with options {kwargs}: {exc}",
                        "check the option names and values") from exc
