"""The failures the command line reports in one line, and how a message names a file.

Importable without torch, so that ``lrnn`` can catch these before any heavy module is loaded.
"""
from __future__ import annotations

import os
from pathlib import Path


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded or saved; the message names the file and the problem."""


class IntegrityWarning(UserWarning):
    """A native checkpoint that records no integrity hash (written before hashes were recorded)."""


def display_name(path: str | Path) -> str:
    """``path`` as printable text: bytes that are not UTF-8 appear as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
