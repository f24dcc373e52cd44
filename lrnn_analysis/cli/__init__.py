"""The ``lrnn`` command: parses options, calls the pipelines, prints results.

One module per command (``train``, ``info``, ``stability``, ``certify``, ``hessian``, ``audit``,
``reproduce``, ``robustness``), each with ``add_parser`` and ``run``; :mod:`.options` holds what
they share. No analysis happens here: a command builds settings and sources from its options,
calls a pipeline (:mod:`lrnn_analysis.pipelines`) or a loader, and prints.

Exit codes: 0 success, 1 a check failed, 2 bad input (one line on stderr), 3 a bug (an internal
error: a short traceback and a request to report it), 130 interrupted (SIGINT), 141 the reader of
the output went away (a closed pipe, as for a tool killed by SIGPIPE). Every option is checked
against its bounds while parsing, before anything is computed.

Building the parser imports no torch, numpy, scipy, cvxpy or matplotlib (``lrnn --help`` is
instant): its name tables come from :mod:`lrnn_analysis.choices`, and each command imports
what it uses when it runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from ..errors import InputError, display_name
from ..launch import launched_by_torchrun
from .options import UsageError
from .parser import build_parser

__all__ = ["DISTRIBUTED_COMMANDS", "UsageError", "build_parser", "main"]

DISTRIBUTED_COMMANDS = ("hessian", "robustness", "reproduce")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input (files, options, sizes) is one line on stderr and exit 2;
    SIGINT is one line and exit 130; a closed output pipe exits 141 without a word.
    Any other exception is a bug and keeps its traceback."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")  # a file name that is not UTF-8 stays printable
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a bad option already reported in one line
        return done.code if isinstance(done.code, int) else 2
    except KeyboardInterrupt:
        print("lrnn: interrupted", file=sys.stderr)
        return 130
    args.argv = argv
    handler: Callable[[argparse.Namespace], int] = args.handler
    prefix = f"lrnn {args.command}"
    if launched_by_torchrun() and args.command not in DISTRIBUTED_COMMANDS:
        print(f"{prefix}: error: only {', '.join(DISTRIBUTED_COMMANDS)} run distributed; "
              "run this command without torchrun", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(prefix, warnings.showwarning)
            code = handler(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python docs (signal module, "Note on SIGPIPE"): point stdout at devnull so the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except InputError as error:
        print(f"{prefix}: error: {_one_line(str(error))}", file=sys.stderr)
        if args.traceback and error.__cause__ is not None:  # the exception of the user's own code, say
            import traceback

            print("".join(traceback.format_exception(error.__cause__)).rstrip(), file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{prefix}: error: {_os_error_text(error)}", file=sys.stderr)
        return 2
    except Exception:
        _report_bug(prefix)
        return 3


def _report_bug(prefix: str) -> None:
    """An exception that is not about the user's input is a bug: its type, message and the last
    frames of its traceback, and where to report it."""
    import traceback

    error = sys.exc_info()[1]
    frames = traceback.format_exception(error, limit=-6)
    print(f"{prefix}: internal error (a bug in lrnn-analysis or a library under it, not in your input):", file=sys.stderr)
    print("".join(frames).rstrip(), file=sys.stderr)
    print(f"{prefix}: please report this with the command line and the lines above", file=sys.stderr)


def _warning_printer(prefix: str, default: Callable[..., None]) -> Callable[..., None]:
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        # The toolkit's own warnings (integrity, reference files, ...) are one line for the user,
        # not Python's two lines naming our source file; others keep Python's format.
        if getattr(category, "__module__", "").startswith("lrnn_analysis."):
            print(f"{prefix}: warning: {_one_line(str(message))}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


def _os_error_text(error: OSError) -> str:
    """'FILE: reason' for an OSError (permission, directory, device, disk...)."""
    reason = error.strerror or type(error).__name__
    if error.filename is None:
        return _one_line(str(error))
    names = [display_name(os.fsdecode(name)) for name in (error.filename, error.filename2) if name is not None]
    return f"{' -> '.join(names)}: {reason}"


if __name__ == "__main__":
    sys.exit(main())
