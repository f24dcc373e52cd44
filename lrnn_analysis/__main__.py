"""The ``lrnn`` command (and ``python -m lrnn_analysis``).

Importing the CLI imports torch, which takes seconds; a Ctrl-C in that time is reported like
one during the work (one line, exit 130) instead of as a traceback from inside torch.
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
