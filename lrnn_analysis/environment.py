"""Device selection and the provenance every result records."""
from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch

from . import __version__
from .choices import DEVICE_CHOICES
from .errors import InputError

__all__ = ["distributed_info", "environment", "resolve_device"]



def resolve_device(choice: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if choice not in DEVICE_CHOICES and not choice.startswith("cuda:"):
        raise InputError(f"unknown device {choice!r}; expected one of {DEVICE_CHOICES}")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {choice!r} requested but CUDA is not available")
    return torch.device(choice)


def distributed_info() -> dict[str, Any]:
    """The torch.distributed process group of this process: ``world_size``, ``backend`` and ``rank``,
    or ``{"world_size": 1, "backend": None}`` when none is initialised (a single-process run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return {"world_size": torch.distributed.get_world_size(), "backend": str(torch.distributed.get_backend()),
                "rank": torch.distributed.get_rank()}
    return {"world_size": 1, "backend": None}


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Library versions, the process group (``distributed``) and the device, for the record."""
    info: dict[str, Any] = {
        "lrnn_analysis": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "distributed": distributed_info(),
    }
    if device is not None:
        device = torch.device(device)
        info["device"] = str(device)
        if device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(device)
    return info
