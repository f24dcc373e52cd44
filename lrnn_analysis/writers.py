"""JSON and CSV output, written atomically through :func:`lrnn_analysis.outputs.atomic_write`."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .outputs import atomic_write

__all__ = ["dumps", "numpy_default", "write_csv", "write_json"]


def numpy_default(value: Any) -> Any:
    """``json.dumps`` fallback for numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def dumps(data: Any, **options: Any) -> str:
    return json.dumps(data, default=numpy_default, **options)


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(dumps(data, indent=2, sort_keys=True) + "\n"))


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Rows (dicts with the same keys) as CSV, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns or (rows[0].keys() if rows else [])), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))
