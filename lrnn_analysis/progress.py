"""Progress bars: every bar of the toolkit goes through :func:`progress_bar`.

A bar is drawn only when asked for and standard error is a terminal: redirected to a file
(``make run > log``), a bar's carriage-return updates would fill the log.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["bars_shown", "progress_bar"]


def bars_shown(enabled: bool = True) -> bool:
    """Whether a bar asked for with ``enabled`` is drawn: only on a terminal."""
    stream = sys.stderr
    return enabled and stream is not None and hasattr(stream, "isatty") and stream.isatty()


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **options: Any):
    """A ``tqdm`` bar over ``iterable`` (``options`` as for ``tqdm``), disabled unless
    ``enabled`` and standard error is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not bars_shown(enabled), **options)
