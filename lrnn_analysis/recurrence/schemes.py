"""The fixed-step schemes the engine runs, as explicit Runge-Kutta tableaus.

One application of a scheme with s stages to the field f (u held over the step) is

    k_i = f(h + sum_{j<i} a_ij k_j),   i = 1..s,
    h+  = h + sum_i c_i k_i            (``residual``),   or   h+ = k_1   (``map``),

with a_ij and c_i already multiplied by the step eps. The tableaus are those of
:func:`lrnn_analysis.models.lure_step` and :class:`lrnn_analysis.lure.LureSystem`: ``rk2`` is the
explicit midpoint rule, ``rk4`` the classical rule, ``rk38`` Kutta's 3/8 rule. ``substeps``
applications make one input step (:func:`build_scheme` makes ``map`` one application of
h+ = f(h); the engine also runs an Euler step with a linear part as a map, then with the Euler
step's substeps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

__all__ = ["METHODS", "Scheme", "build_scheme"]

# (a, b) per method: a[i] holds a_i1..a_i(i-1) of stage i, b the weights (both before scaling by eps).
_TABLEAUS: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "euler": (((),), (1.0,)),
    "rk2": (((), (0.5,)), (0.0, 1.0)),
    "rk4": (((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
    "rk38": (((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)), (1 / 8, 3 / 8, 3 / 8, 1 / 8)),
}
METHODS = ("map", *_TABLEAUS)


@dataclass(frozen=True)
class Scheme:
    """One input step: ``substeps`` applications of the tableau (a, c) (module docstring)."""

    method: str
    eps: float | None
    substeps: int
    a: tuple[tuple[float, ...], ...]
    c: tuple[float, ...]
    residual: bool

    @property
    def stages(self) -> int:
        return len(self.c)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "eps": self.eps, "substeps": self.substeps, "stages": self.stages}


def build_scheme(method: str, eps: float | None = None, substeps: int = 1) -> Scheme:
    """The scheme ``method`` with step ``eps`` (None for ``map``) applied ``substeps`` times per input step."""
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1:
        raise InputError(f"substeps must be a positive integer, got {substeps!r}")
    if method == "map":
        if eps is not None or substeps != 1:
            raise InputError(f"method 'map' takes no step eps and no substeps, got eps {eps!r}, substeps {substeps!r}")
        return Scheme("map", None, 1, ((),), (1.0,), residual=False)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise InputError(f"method {method!r} needs a finite step eps > 0, got {eps!r}")
    a, b = _TABLEAUS[method]
    eps = float(eps)
    return Scheme(method, eps, substeps, tuple(tuple(eps * x for x in row) for row in a), tuple(eps * x for x in b),
                  residual=True)
