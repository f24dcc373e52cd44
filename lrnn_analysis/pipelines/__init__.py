"""The analyses every front end runs: one module per analysis, each with a frozen settings
dataclass that checks its bounds once and a function ``run(subjects, data, settings) -> Result``.

The command line, the recipes of ``lrnn reproduce`` and ``lrnn audit`` only build settings and
call these; nothing here parses options or prints.
"""
from . import audit, curvature, robustness, stability

__all__ = ["audit", "curvature", "robustness", "stability"]
