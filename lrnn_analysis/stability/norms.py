"""Closed-form norm tests: the cheapest incremental-stability certificates.

For increments delta = h - h~ and p = sigma(W h + u) - sigma(W h~ + u) = D W delta
with D diagonal, D_ii in [0, L] (mean value theorem, slope of sigma in [0, L]),
the increment dynamics are linear with Jacobian J = A + D W, ||J||_2 <= K := ||A||_2 + L ||W||_2.
With Ah = I + eps A:

* ``ct-norm``    c = mu2(A) + L ||W||_2 < 0, since mu2(A + D W) <= c, hence
                 ||delta(t)|| <= e^{c t} ||delta(0)||.
* ``euler-norm`` rho = ||Ah||_2 + eps L ||W||_2 < 1, since delta+ = (Ah + eps D W) delta.
* ``rk2-norm``   rho = ||Ah||_2 + eps L ||W||_2 + (eps^2/2) K^2 < 1: the midpoint step
                 is delta+ = (I + eps J2 + (eps^2/2) J2 J1) delta with stage Jacobians J1, J2.
* ``rk4-norm``   rho = ||Ah||_2 + eps L ||W||_2 + (eps K)^2/2 + (eps K)^3/6 + (eps K)^4/24 < 1:
                 the RK4 step is I + (eps/6)(J1 + 2 J2 + 2 J3 + J4)
                 + (eps^2/6)(J2 J1 + J3 J2 + J4 J3) + (eps^3/12)(J3 J2 J1 + J4 J3 J2)
                 + (eps^4/24) J4 J3 J2 J1, and the first two terms are the convex
                 combination (1/6)[(I + eps J1) + 2 (I + eps J2) + 2 (I + eps J3) + (I + eps J4)].
* ``rk38-norm``  rho = ||Ah||_2 + eps L ||W||_2 + (eps K)^2 + (eps K)^3/3 + (eps K)^4/24 < 1 for
                 the 3/8 rule (a21 = 1/3, a31 = -1/3, a32 = 1, a41 = 1, a42 = -1, a43 = 1,
                 b = (1, 3, 3, 1)/8). Stage increments are delta_i = delta + eps sum_{j<i} a_ij J_j delta_j,
                 so the step is I + eps sum_i b_i J_i + eps^2 sum_{i>j} b_i a_ij J_i J_j
                 + eps^3 sum_{i>j>k} b_i a_ij a_jk J_i J_j J_k + eps^4 b4 a43 a32 a21 J4 J3 J2 J1.
                 The first two terms are the convex combination sum_i b_i (I + eps J_i) (b_i >= 0,
                 sum b_i = 1); the others are bounded with ||J_i||_2 <= K and the absolute values
                 of the coefficients (some a_ij are negative, so the cancellations of the order
                 conditions cannot be used): sum_{i>j} b_i |a_ij| = 1/8 + 3/8 (4/3) + 1/8 (3) = 1,
                 sum_{i>j>k} b_i |a_ij a_jk| = 3/8 (1/3) + 1/8 (1/3 + 1/3 + 1) = 1/3 and
                 b4 |a43 a32 a21| = 1/24.
* ``map-norm``   rho = L ||W||_2 < 1 for h+ = sigma(W h + u).

Discrete values are per substep; with ``substeps`` = s the contraction factor per
input step is rho^s. :func:`norm_test_value` is pure arithmetic on the four
scalar inputs, so it also accepts torch tensors (differentiable penalties).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..lure import LureSystem
from .spectra import mu2, norm2, roundoff_bound

__all__ = ["NORM_TESTS", "NormTestOutcome", "norm_certificate_value", "norm_test", "norm_test_threshold",
    "norm_test_value"]

NORM_TESTS = ("ct-norm", "euler-norm", "rk2-norm", "rk4-norm", "rk38-norm", "map-norm")


def norm_test_threshold(name: str) -> float:
    """The value a norm test must stay strictly below: 0 for ``ct-norm``, 1 otherwise."""
    _check_name(name)
    return 0.0 if name == "ct-norm" else 1.0


def norm_test_value(
    name: str,
    *,
    mu_A: Any = 0.0,
    norm_A: Any = 0.0,
    norm_Ahat: Any = 1.0,
    norm_W: Any,
    eps: float | None = None,
    slope: float = 1.0,
) -> Any:
    """Value of a norm test from mu2(A), ||A||_2, ||I + eps A||_2 and ||W||_2.

    Monotone non-decreasing in every argument, so upper bounds on the inputs give
    an upper bound on the value (used by the parameterization certificate).
    ``ct-norm`` returns c (certified iff c < 0, decay rate -c); the discrete tests
    return the per-substep contraction factor rho (certified iff rho < 1).
    """
    _check_name(name)
    L = slope
    if name == "ct-norm":
        return mu_A + L * norm_W
    if name == "map-norm":
        return L * norm_W
    if eps is None:
        raise InputError(f"{name} needs a step eps")
    value = norm_Ahat + eps * L * norm_W
    if name == "euler-norm":
        return value
    eK = eps * (norm_A + L * norm_W)
    if name == "rk2-norm":
        return value + eK**2 / 2.0
    if name == "rk38-norm":
        return value + eK**2 + eK**3 / 3.0 + eK**4 / 24.0
    return value + eK**2 / 2.0 + eK**3 / 6.0 + eK**4 / 24.0


@dataclass(frozen=True)
class NormTestOutcome:
    """A norm test evaluated in float64.

    ``holds`` is ``value + tolerance < threshold``: the tolerance bounds the
    floating-point error of the computed norms (:func:`_norm_test_tolerance`), so a
    borderline value is not certified. A value that overflows float64 never holds.
    """

    name: str
    value: float
    threshold: float
    tolerance: float
    holds: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "tolerance": self.tolerance,
            "holds": self.holds,
        }


def _norm_test_tolerance(
    name: str, n: int, *, norm_A: float, norm_Ahat: float, norm_W: float, eps: float | None, slope: float
) -> float:
    """Bound on the float64 error of :func:`norm_test_value` as computed by :func:`norm_test`.

    :func:`~.spectra.roundoff_bound` of the size of everything that is rounded:
    ``ct-norm`` ||A||_2 + L ||W||_2 (mu2(A) errs by u ||A||_2 however small mu2(A) is);
    ``map-norm`` L ||W||_2; the Runge-Kutta tests 1 + eps ||A||_2 (forming I + eps A)
    + ||I + eps A||_2 + eps L ||W||_2 + 4 T(eps K), where T is the polynomial tail of the
    test (x^2/2, x^2/2 + x^3/6 + x^4/24 or x^2 + x^3/3 + x^4/24) and 4 T(x) / x bounds its derivative, so
    4 T(eps K) covers the tail's error from a relative error of K.
    """
    L = slope
    if name == "ct-norm":
        return roundoff_bound(n, norm_A + L * norm_W)
    if name == "map-norm":
        return roundoff_bound(n, L * norm_W)
    assert eps is not None
    tail = norm_test_value(name, norm_A=norm_A, norm_Ahat=0.0, norm_W=norm_W, eps=eps, slope=L) - eps * L * norm_W
    return roundoff_bound(n, 1.0 + eps * norm_A + norm_Ahat + eps * L * norm_W + 4.0 * tail)


def norm_test(system: LureSystem, name: str) -> NormTestOutcome:
    """Evaluate the norm test ``name`` on ``system`` (see the module docstring)."""
    _check_name(name)
    A, W, L = system.A, system.W, system.slope
    eps = system.eps if name not in ("ct-norm", "map-norm") else None
    if eps is None and name not in ("ct-norm", "map-norm"):
        raise InputError(f"{name} needs a system with a step eps")
    with np.errstate(over="ignore", invalid="ignore"):
        norm_A, norm_W = np.float64(norm2(A)), np.float64(norm2(W))
        norm_Ahat = np.float64(norm2(np.eye(system.n) + eps * A)) if eps is not None else np.float64(1.0)
        mu_A = np.float64(mu2(A))
        value = float(
            norm_test_value(name, mu_A=mu_A, norm_A=norm_A, norm_Ahat=norm_Ahat, norm_W=norm_W, eps=eps, slope=L)
        )
        tolerance = float(
            _norm_test_tolerance(name, system.n, norm_A=norm_A, norm_Ahat=norm_Ahat, norm_W=norm_W, eps=eps, slope=L)
        )
    threshold = norm_test_threshold(name)
    holds = bool(np.isfinite(value) and np.isfinite(tolerance) and value + tolerance < threshold)
    return NormTestOutcome(name, value, threshold, tolerance, holds)


def norm_certificate_value(system: LureSystem, name: str | None = None) -> float:
    """The raw quantity of a norm test, for training penalties and reports.

    ``name`` defaults to the test of the system's method (``ode`` -> ``ct-norm``,
    ``euler`` -> ``euler-norm``, ...). Returns c = mu2(A) + L||W||_2 for ``ct-norm``
    (stable iff < 0) and the per-substep contraction factor rho for the discrete
    tests (stable iff < 1); see :func:`norm_test_threshold`.
    """
    if name is None:
        name = "ct-norm" if system.method == "ode" else f"{system.method}-norm"
    return norm_test(system, name).value


def _check_name(name: str) -> None:
    if name not in NORM_TESTS:
        raise InputError(f"unknown norm test {name!r}; expected one of {NORM_TESTS}")
