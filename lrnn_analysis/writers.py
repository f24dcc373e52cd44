"""JSON and CSV output, written atomically through :func:`lrnn_analysis.outputs.atomic_write`.

The JSON is always valid JSON (RFC 8259 has no NaN or Infinity): a non-finite float (NaN, inf,
-inf; Python's or numpy's) is written as ``null``.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .outputs import atomic_write

__all__ = ["dumps", "finite_or_null", "numpy_default", "write_csv", "write_json"]


def numpy_default(value: Any) -> Any:
    """``json.dumps`` fallback for numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def finite_or_null(data: Any) -> Any:
    """``data`` with every non-finite float in its dicts, lists and tuples replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_null(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_null(value) for value in data]
    return data


def dumps(data: Any, **options: Any) -> str:
    """``json.dumps`` with numpy values, writing non-finite floats as ``null`` so that the text is
    valid JSON. With ``allow_nan=False`` a non-finite float is refused instead (ValueError)."""
    if options.pop("allow_nan", True):
        return json.dumps(finite_or_null(data), default=lambda value: finite_or_null(numpy_default(value)),
                          allow_nan=False, **options)
    return json.dumps(data, default=numpy_default, allow_nan=False, **options)


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON with sorted keys (:func:`dumps`: non-finite floats are null), written atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(dumps(data, indent=2, sort_keys=True) + "\n"))


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Rows (dicts with the same keys) as CSV, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns or (rows[0].keys() if rows else [])), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))
