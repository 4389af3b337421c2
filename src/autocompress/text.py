"""Human-readable text shared by the library's logs and the command line."""
from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, the noun with an ``s`` unless ``count`` is 1: ``"1 epoch"``, ``"2 epochs"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


__all__ = ["plural"]
