"""The errors that mean "what you gave cannot be used", and how a message names a file.

:class:`InputError` is raised for the caller's input: a file, an option, a recipe setting, an
argument of the Python API, or the user's own module failing. The command line reports it in
one line with exit code 2. Any other exception is a bug of the toolkit (or of a library under
it) and is reported as one, never as the user's mistake. ``InputError`` subclasses
``ValueError`` so that code catching ``ValueError`` around an argument check keeps working.

Importable without torch, so that ``lrnn`` can catch these before any heavy module is loaded.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CheckpointError", "InputError", "IntegrityWarning", "UserCodeError", "display_name", "first_line"]


class InputError(ValueError):
    """The caller's input cannot be used; the message names the input and the problem."""


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded or saved; the message names the file and the problem."""


class UserCodeError(InputError):
    """The user's own code (a model factory, a module's ``forward`` or ``lure_form``) raised; the
    message names the code and the exception, ``__cause__`` holds it with its traceback."""


class IntegrityWarning(UserWarning):
    """A native checkpoint that records no integrity hash (written before hashes were recorded)."""


def display_name(path: str | Path) -> str:
    """``path`` as printable text: bytes that are not UTF-8 appear as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
