"""Human-readable text shared by the library's logs, its metrics records and the command line."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

#: significant digits of a float in a metrics record or a JSON output: drops binary noise (``100 * 0.729`` is
#: ``72.89999999999999``) and keeps far more than any measurement here resolves
FLOAT_DIGITS = 12


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, the noun with an ``s`` unless ``count`` is 1: ``"1 epoch"``, ``"2 epochs"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def short_of(reached: float, target: float) -> str:
    """``reached`` (< ``target``) in 3 significant digits, or more until it reads below the target and unlike the
    target as printed (``f"{target:g}"``): a speedup of 1.497x against a 1.5x target reads "1.497", not "1.5"."""
    for digits in range(3, 18):
        text = f"{reached:.{digits}g}"
        if float(text) < target and text != f"{target:g}":
            return text
    return repr(reached)


def plain(value: Any) -> Any:
    """JSON form of numpy / torch scalars and arrays (``json.dumps(default=plain)``; floats kept exact)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def tidy(value: Any) -> Any:
    """``value`` as plain JSON data: floats at :data:`FLOAT_DIGITS` significant digits (NaN and infinities, which
    strict JSON lacks, as None: e.g. the score of a search that scored nothing), numpy / torch scalars and arrays as
    numbers and lists (:func:`plain`), tuples as lists, dicts and lists tidied item by item."""
    if isinstance(value, (np.ndarray, torch.Tensor, np.generic)):
        value = plain(value)
    if isinstance(value, float):
        return float(f"{value:.{FLOAT_DIGITS}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: tidy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [tidy(item) for item in value]
    return value


def kind_of(value: Any) -> str:
    """``value`` in a few words, for an error: ``"a tensor of shape [8, 10]"``, ``"a tuple"``."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def json_text(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`tidy` ``(value)`` (keyword arguments passed on): what a metrics record or a
    command's JSON output writes."""
    return json.dumps(tidy(value), **kwargs)


__all__ = ["json_text", "kind_of", "plain", "plural", "tidy"]
