"""The ``lrnn`` command (and ``python -m lrnn_analysis``).

Importing the CLI is quick (torch and the other heavy libraries load when a command runs, where
a Ctrl-C is one line and exit 130); a Ctrl-C during that import is reported the same way.
"""
import sys


def run() -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("lrnn: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
