"""Closed-form certificate for a whole family of parameterized models.

The Lipschitz parameterization writes
  A = (1 - beta_A)(M_A + M_A^T) + beta_A (M_A - M_A^T) - gamma_A I = M_A + (1 - 2 beta_A) M_A^T - gamma_A I
and likewise W from (M_W, beta_W, gamma_W). For ||M||_2 <= r and every real beta:

* mu2(A) = lambda_max((2 - 2 beta) sym(M)) - gamma <= 2 |1 - beta| r - gamma
  (|lambda(sym M)| <= ||M||_2 <= r; the sign of 2 - 2 beta does not matter),
* ||A||_2 <= (1 + |1 - 2 beta|) r + |gamma| = 2 max(beta, 1 - beta) r + |gamma|,
* ||I + eps A||_2^2 = lambda_max(I + 2 eps sym(A) + eps^2 A^T A) <= 1 + 2 eps mu2(A) + eps^2 ||A||_2^2.

Every norm test (:func:`norm_test_value`) is non-decreasing in these quantities,
so evaluating it at the bounds certifies **every** model with ||M_A||, ||M_W|| <= r.
The bounds grow with r, so the certified set is an interval [0, r*): r* is found
in closed form for ``ct-norm`` and ``map-norm`` and by bisection otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .norms import norm_test_threshold, norm_test_value

PARAMETERIZATION_TESTS = ("ct-norm", "euler-norm", "rk2-norm", "rk4-norm", "map-norm")


@dataclass(frozen=True)
class ParameterBounds:
    """Upper bounds on mu2(A), ||A||_2, ||I + eps A||_2 and ||W||_2 over the family."""

    mu_A: float
    norm_A: float
    norm_Ahat: float
    norm_W: float

    def to_dict(self) -> dict[str, float]:
        return {"mu_A": self.mu_A, "norm_A": self.norm_A, "norm_Ahat": self.norm_Ahat, "norm_W": self.norm_W}


def parameter_bounds(
    beta_A: float, gamma_A: float, beta_W: float, gamma_W: float, r: float, eps: float | None = None
) -> ParameterBounds:
    """The bounds of the module docstring for ||M_A||_2, ||M_W||_2 <= r."""
    if r < 0:
        raise ValueError(f"radius r must be >= 0, got {r}")
    mu_A = 2.0 * abs(1.0 - beta_A) * r - gamma_A
    norm_A = 2.0 * max(beta_A, 1.0 - beta_A) * r + abs(gamma_A)
    norm_W = 2.0 * max(beta_W, 1.0 - beta_W) * r + abs(gamma_W)
    norm_Ahat = 1.0 if eps is None else float(np.sqrt(max(0.0, 1.0 + 2.0 * eps * mu_A + eps**2 * norm_A**2)))
    return ParameterBounds(mu_A, norm_A, norm_Ahat, norm_W)


@dataclass(frozen=True)
class ParameterizationResult:
    """Verdict of one norm test for every model of the family.

    ``value`` is the norm-test value at the bounds (c for ``ct-norm``, rho per
    substep otherwise), ``margin`` = threshold - value (> 0 iff ``holds``), and
    ``r_star`` the supremum of radii r for which the test holds (certified for all
    r < r_star; 0 if it fails already at r = 0).
    """

    test: str
    holds: bool
    value: float
    margin: float
    r: float
    r_star: float
    beta_A: float
    gamma_A: float
    beta_W: float
    gamma_W: float
    eps: float | None
    slope: float
    bounds: ParameterBounds

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "holds": self.holds,
            "value": self.value,
            "margin": self.margin,
            "r": self.r,
            "r_star": self.r_star,
            "beta_A": self.beta_A,
            "gamma_A": self.gamma_A,
            "beta_W": self.beta_W,
            "gamma_W": self.gamma_W,
            "eps": self.eps,
            "slope": self.slope,
            "bounds": self.bounds.to_dict(),
        }


def _value(test: str, beta_A: float, gamma_A: float, beta_W: float, gamma_W: float, r: float, eps: float | None, slope: float) -> float:
    b = parameter_bounds(beta_A, gamma_A, beta_W, gamma_W, r, eps)
    return float(
        norm_test_value(test, mu_A=b.mu_A, norm_A=b.norm_A, norm_Ahat=b.norm_Ahat, norm_W=b.norm_W, eps=eps, slope=slope)
    )


def _r_star(test: str, beta_A: float, gamma_A: float, beta_W: float, gamma_W: float, eps: float | None, slope: float) -> float:
    threshold = norm_test_threshold(test)
    cW = 2.0 * max(beta_W, 1.0 - beta_W)
    if test == "ct-norm":
        return max(0.0, (gamma_A - slope * abs(gamma_W)) / (2.0 * abs(1.0 - beta_A) + slope * cW))
    if test == "map-norm":
        return max(0.0, (1.0 / slope - abs(gamma_W)) / cW)

    def ok(radius: float) -> bool:
        return _value(test, beta_A, gamma_A, beta_W, gamma_W, radius, eps, slope) < threshold

    if not ok(0.0):
        return 0.0
    hi = 1.0
    while ok(hi):
        hi *= 2.0
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def certify_parameterization(
    beta_A: float,
    gamma_A: float,
    beta_W: float,
    gamma_W: float,
    r: float,
    eps: float | None = None,
    slope: float = 1.0,
    tests: Sequence[str] | None = None,
) -> list[ParameterizationResult]:
    """Decide in closed form whether every model of the family is stable.

    ``tests`` defaults to ``ct-norm`` plus, when ``eps`` is given, ``euler-norm``
    and ``rk2-norm``. Each result says whether the norm test holds at radius ``r``
    and gives the largest certified radius r*.
    """
    if eps is not None and not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be > 0, got {eps}")
    if not (np.isfinite(slope) and slope >= 1.0):
        raise ValueError(f"slope L must be >= 1, the largest slope of tanh, got {slope}")
    if tests is None:
        tests = ("ct-norm",) if eps is None else ("ct-norm", "euler-norm", "rk2-norm")
    results = []
    for test in tests:
        if test not in PARAMETERIZATION_TESTS:
            raise ValueError(f"unknown test {test!r}; expected one of {PARAMETERIZATION_TESTS}")
        test_eps = None if test in ("ct-norm", "map-norm") else eps
        if test_eps is None and test not in ("ct-norm", "map-norm"):
            raise ValueError(f"{test} needs eps")
        value = _value(test, beta_A, gamma_A, beta_W, gamma_W, r, test_eps, slope)
        threshold = norm_test_threshold(test)
        results.append(
            ParameterizationResult(
                test=test,
                holds=bool(value < threshold),
                value=value,
                margin=threshold - value,
                r=float(r),
                r_star=_r_star(test, beta_A, gamma_A, beta_W, gamma_W, test_eps, slope),
                beta_A=float(beta_A),
                gamma_A=float(gamma_A),
                beta_W=float(beta_W),
                gamma_W=float(gamma_W),
                eps=test_eps,
                slope=float(slope),
                bounds=parameter_bounds(beta_A, gamma_A, beta_W, gamma_W, r, test_eps),
            )
        )
    return results


@dataclass(frozen=True)
class PhaseCell:
    """One (beta, gamma) cell of the phase diagram for one test (tidy row)."""

    beta: float
    gamma: float
    test: str
    holds: bool
    value: float
    margin: float
    r_star: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "gamma": self.gamma,
            "test": self.test,
            "holds": self.holds,
            "value": self.value,
            "margin": self.margin,
            "r_star": self.r_star,
        }


def phase_diagram(
    betas: Sequence[float],
    gammas: Sequence[float],
    r: float,
    eps: float | None = None,
    slope: float = 1.0,
    tests: Sequence[str] | None = None,
    beta_W: float | None = None,
    gamma_W: float | None = None,
) -> list[PhaseCell]:
    """Margin of each test over a (beta, gamma) grid, one row per (beta, gamma, test).

    By default A and W share (beta, gamma); pass ``beta_W``/``gamma_W`` to hold W's fixed.
    """
    cells = []
    for beta in betas:
        for gamma in gammas:
            bw = beta if beta_W is None else beta_W
            gw = gamma if gamma_W is None else gamma_W
            for result in certify_parameterization(beta, gamma, bw, gw, r, eps, slope, tests):
                cells.append(
                    PhaseCell(float(beta), float(gamma), result.test, result.holds, result.value, result.margin, result.r_star)
                )
    return cells
