"""Device selection and the provenance every result records."""
from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch

from . import __version__

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if choice not in DEVICE_CHOICES and not choice.startswith("cuda:"):
        raise ValueError(f"unknown device {choice!r}; expected one of {DEVICE_CHOICES}")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {choice!r} requested but CUDA is not available")
    return torch.device(choice)


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Library versions and the device, for the record."""
    info: dict[str, Any] = {
        "lrnn_analysis": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    if device is not None:
        device = torch.device(device)
        info["device"] = str(device)
        if device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(device)
    return info
