"""``python -m lrnn_analysis.cli``: the ``lrnn`` command."""
import sys

from . import main

sys.exit(main())
