"""Shared helpers of the result dataclasses: JSON conversion and timing."""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import numpy as np

__all__ = ["dataclass_dict", "jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays/scalars turned into lists/floats and non-finite floats into None."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def dataclass_dict(obj: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of dataclass ``obj`` (except ``exclude``) as JSON-serialisable values."""
    return {f.name: jsonable(getattr(obj, f.name)) for f in fields(obj) if f.name not in exclude}
