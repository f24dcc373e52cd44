"""The ``lrnn`` argument parser: one sub-command per module of this package."""
from __future__ import annotations

import argparse
import copy
from typing import Any

from . import audit, certify, hessian, info, reproduce, robustness, stability, train

__all__ = ["build_parser"]

COMMANDS = (train, info, stability, certify, hessian, audit, reproduce, robustness)


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, when it has one to show."""

    def _format_action(self, action: argparse.Action) -> str:
        default = action.default
        shown = (action.option_strings and action.help is not argparse.SUPPRESS and default is not None
                 and default is not False and default != [] and default is not argparse.SUPPRESS
                 and "%(default)" not in (action.help or ""))
        if shown:
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (no usage block), exit 2; defaults shown in --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lrnn", description="Stability, curvature and robustness of continuous-time RNNs.")
    parser.add_argument("--traceback", action="store_true",
                        help="when your own code fails (a --model factory, its forward or lure_form), also print its traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser
