"""How this process was started: by ``torchrun`` (one rank of a process group) or alone.

Importable without torch, so that ``lrnn`` can refuse a command that does not run distributed
before any heavy module is loaded.
"""
from __future__ import annotations

import os

__all__ = ["launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` started this process (``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
