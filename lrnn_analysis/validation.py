"""Checks of one setting's value, shared by the pipelines' settings dataclasses.

Each returns the value (normalised) or raises :class:`~lrnn_analysis.errors.InputError` whose
message starts with the setting's name, so that a recipe can prefix its file and table
(``recipe.toml: settings.batch_size: ...``) and the command line can print it as it is.
Importable without torch, numpy or scipy.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import InputError

__all__ = ["check_bool", "check_choice", "check_int", "check_names", "check_number", "check_optional_int"]


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """An integer (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{name}: expected an integer in [{low}, {high}], got {value!r}")
    return value


def check_optional_int(name: str, value: Any, low: int, high: int) -> int | None:
    return None if value is None else check_int(name, value, low, high)


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *, above: bool = False) -> float:
    """A finite number in [low, high] (in (low, high] when ``above``), as a float."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high or (above and value == low)):
        bounds = f"{'(' if above else '['}{low:g}, {high:g}]"
        raise InputError(f"{name}: expected a finite number in {bounds}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name}: expected true or false, got {value!r}")
    return value


def check_choice(name: str, value: Any, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise InputError(f"{name}: expected one of {list(options)}, got {value!r}")
    return value


def check_names(name: str, value: Any, options: Sequence[str]) -> tuple[str, ...]:
    """A non-empty list of names, each one of ``options`` (a comma-separated string is split)."""
    names = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise InputError(f"{name}: expected a non-empty list of names from {list(options)}, got {value!r}")
    unknown = [n for n in names if n not in options]
    if unknown:
        raise InputError(f"{name}: unknown {unknown}; expected names from {list(options)}")
    return tuple(names)
