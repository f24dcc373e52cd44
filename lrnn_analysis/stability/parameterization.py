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

Floating point: each bound is rounded up by its own error bound (a few units of
u = 2^-53 of the size of its terms; the square root of I + eps A's bound gets the
error of its argument before the root), and a test holds only if
value + tolerance < threshold with tolerance = 16 u times the size of the terms of
the value. A bound that overflows (nan or inf) certifies nothing. The bounds grow
with r, so the certified set is an interval: ``r_star`` is the largest float radius
at which the test holds, found by bisection (from the closed form for ``ct-norm``
and ``map-norm``), so every r <= r_star is certified.

Remedies. For fixed (beta_A, beta_W, gamma_W, r, eps) the value is non-increasing in
gamma_A on (-inf, 0] and convex on [0, inf) (``ct-norm``: decreasing; ``map-norm``:
independent of A), so the gamma_A that certify form an interval, found by
:func:`certifying_gamma_A`. At r = 0 the tests read ct: -gamma_A + L |gamma_W| < 0 and
euler: |1 - eps gamma_A| + eps L |gamma_W| < 1: W's shift gamma_W enters through
||W||_2 with the opposite sign of A's, so gamma_W = gamma_A (one shared gamma) can
never be certified for L >= 1.

Initialisation radius. The toolkit initialises M_A and M_W of hidden size N with
i.i.d. entries N(0, s^2), s = init_std / N (:class:`~lrnn_analysis.models.ModelConfig`).
For an N x N standard Gaussian G, E||G||_2 <= 2 sqrt(N) (Gordon's inequality) and
||G||_2 is 1-Lipschitz in the entries, so P(||G||_2 >= 2 sqrt(N) + t) <= exp(-t^2/2)
(Gaussian concentration; Vershynin, High-Dimensional Probability, 7.3.3). With the union
bound over M_A and M_W, both satisfy ||M||_2 <= s (2 sqrt(N) + t) with probability at
least 1 - 2 exp(-t^2/2); :func:`gaussian_init_radius` picks t for a stated probability.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..choices import PARAMETERIZATION_TESTS
from ..errors import InputError
from .norms import norm_test_threshold, norm_test_value
from .spectra import UNIT_ROUNDOFF

__all__ = ["InitRadius", "ParameterBounds", "ParameterizationResult", "PhaseCell", "certify_parameterization",
    "certifying_gamma_A", "gaussian_init_radius", "parameter_bounds", "phase_diagram"]

_DEFAULT_INIT_FAILURE_PROBABILITY = 1e-6
_u = UNIT_ROUNDOFF


@dataclass(frozen=True)
class ParameterBounds:
    """Upper bounds on mu2(A), ||A||_2, ||I + eps A||_2 and ||W||_2 over the family, rounded up."""

    mu_A: float
    norm_A: float
    norm_Ahat: float
    norm_W: float

    def to_dict(self) -> dict[str, float]:
        return {"mu_A": self.mu_A, "norm_A": self.norm_A, "norm_Ahat": self.norm_Ahat, "norm_W": self.norm_W}


def _check_finite(**values: float | None) -> None:
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise InputError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InputError(f"{name} must be finite, got {value}")


def _check_inputs(beta_A: float, gamma_A: float, beta_W: float, gamma_W: float, r: float,
                  eps: float | None, slope: float) -> None:
    _check_finite(beta_A=beta_A, gamma_A=gamma_A, beta_W=beta_W, gamma_W=gamma_W, r=r, eps=eps, slope=slope)
    if r < 0:
        raise InputError(f"radius r must be >= 0, got {r}")
    if eps is not None and not eps > 0:
        raise InputError(f"eps must be > 0, got {eps}")
    if not slope >= 1.0:
        raise InputError(f"slope L must be >= 1, the largest slope of tanh, got {slope}")


def parameter_bounds(
    beta_A: float, gamma_A: float, beta_W: float, gamma_W: float, r: float, eps: float | None = None
) -> ParameterBounds:
    """The bounds of the module docstring for ||M_A||_2, ||M_W||_2 <= r, rounded up.

    A bound that overflows float64 is inf or nan; :func:`certify_parameterization`
    treats that as "not certified".
    """
    _check_inputs(beta_A, gamma_A, beta_W, gamma_W, r, eps, 1.0)
    return ParameterBounds(*(float(b) for b in _bounds(beta_A, gamma_A, beta_W, gamma_W, r, eps)))


def _bounds(beta_A: Any, gamma_A: Any, beta_W: Any, gamma_W: Any, r: Any, eps: float | None) -> tuple[np.ndarray, ...]:
    """(mu_A, norm_A, norm_Ahat, norm_W) upper bounds, elementwise over broadcast arrays."""
    beta_A, gamma_A, beta_W, gamma_W, r = (np.asarray(x, dtype=np.float64) for x in (beta_A, gamma_A, beta_W, gamma_W, r))
    with np.errstate(over="ignore", invalid="ignore"):
        cA, cW = 2.0 * np.maximum(beta_A, 1.0 - beta_A), 2.0 * np.maximum(beta_W, 1.0 - beta_W)
        mu_r = 2.0 * np.abs(1.0 - beta_A) * r
        mu_A = mu_r - gamma_A + 4.0 * _u * (mu_r + np.abs(gamma_A))
        norm_A = (cA * r + np.abs(gamma_A)) * (1.0 + 4.0 * _u)
        norm_W = (cW * r + np.abs(gamma_W)) * (1.0 + 4.0 * _u)
        if eps is None:
            norm_Ahat = np.ones_like(mu_A)
        else:
            square = 1.0 + 2.0 * eps * mu_A + (eps * norm_A) ** 2
            size = 1.0 + 2.0 * eps * np.abs(mu_A) + (eps * norm_A) ** 2
            norm_Ahat = np.sqrt(np.maximum(square + 8.0 * _u * size, 0.0)) * (1.0 + 2.0 * _u)
    return mu_A, norm_A, norm_Ahat, norm_W


def _value_and_tolerance(test: str, beta_A: Any, gamma_A: Any, beta_W: Any, gamma_W: Any, r: Any,
                         eps: float | None, slope: float) -> tuple[np.ndarray, np.ndarray]:
    """Norm-test value at the bounds and its round-off bound 16 u (size of its terms), elementwise."""
    mu_A, norm_A, norm_Ahat, norm_W = _bounds(beta_A, gamma_A, beta_W, gamma_W, r, eps)
    with np.errstate(over="ignore", invalid="ignore"):
        value = norm_test_value(test, mu_A=mu_A, norm_A=norm_A, norm_Ahat=norm_Ahat, norm_W=norm_W, eps=eps, slope=slope)
        size = norm_test_value(test, mu_A=np.abs(mu_A), norm_A=norm_A, norm_Ahat=norm_Ahat, norm_W=norm_W, eps=eps,
                               slope=slope) + (0.0 if test in ("ct-norm", "map-norm") else 1.0)
    return np.asarray(value, dtype=np.float64), 16.0 * _u * np.asarray(size, dtype=np.float64)


def _holds(test: str, beta_A: Any, gamma_A: Any, beta_W: Any, gamma_W: Any, r: Any,
           eps: float | None, slope: float) -> np.ndarray:
    value, tolerance = _value_and_tolerance(test, beta_A, gamma_A, beta_W, gamma_W, r, eps, slope)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.isfinite(value) & np.isfinite(tolerance) & (value + tolerance < norm_test_threshold(test))


def _r_star(test: str, beta_A: Any, gamma_A: Any, beta_W: Any, gamma_W: Any, eps: float | None,
            slope: float) -> np.ndarray:
    """Largest float radius at which the test holds (0 where it fails at r = 0), elementwise by bisection.

    The test holds on an interval [0, r_star] (the exact bounds grow with r), so the
    bisection's lower end, always a radius where the test holds, is a certified radius.
    """
    def ok(radius: np.ndarray) -> np.ndarray:
        return _holds(test, beta_A, gamma_A, beta_W, gamma_W, radius, eps, slope)

    shape = np.broadcast(*(np.asarray(x) for x in (beta_A, gamma_A, beta_W, gamma_W))).shape
    at_zero = ok(np.zeros(shape))
    lo, hi = np.zeros(shape), np.ones(shape)
    growing = at_zero & ok(hi)
    while growing.any():
        hi = np.where(growing, 2.0 * hi, hi)
        growing = growing & np.isfinite(hi) & ok(hi)
    unbounded = at_zero & ~np.isfinite(hi)
    hi = np.where(unbounded, np.finfo(np.float64).max, hi)
    lo = np.where(unbounded, hi, lo)
    for _ in range(2200):
        mid = 0.5 * lo + 0.5 * hi
        active = at_zero & (mid != lo) & (mid != hi)
        if not active.any():
            break
        good = ok(mid)
        lo = np.where(active & good, mid, lo)
        hi = np.where(active & ~good, mid, hi)
    return np.where(at_zero, lo, 0.0)


@dataclass(frozen=True)
class ParameterizationResult:
    """Verdict of one norm test for every model of the family.

    ``value`` is the norm-test value at the bounds (c for ``ct-norm``, rho per
    substep otherwise), ``tolerance`` its round-off bound and ``margin`` =
    threshold - value - tolerance (> 0 iff ``holds``; nan if a bound overflowed).
    ``r_star`` is the largest radius at which the test holds (every r <= r_star is
    certified; 0 with ``holds_at_zero`` False if it fails already at r = 0).
    ``gamma_A_interval`` is the closed interval of gamma_A that certifies at the other
    settings (None if none does; an infinite end is None in :meth:`to_dict`). ``reason`` says why the verdict is what it is and
    ``remedy`` what to change (empty when the test holds).
    """

    test: str
    holds: bool
    value: float
    tolerance: float
    margin: float
    r: float
    r_star: float
    holds_at_zero: bool
    beta_A: float
    gamma_A: float
    beta_W: float
    gamma_W: float
    eps: float | None
    slope: float
    bounds: ParameterBounds
    gamma_A_interval: tuple[float, float] | None
    reason: str
    remedy: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "holds": self.holds,
            "value": self.value,
            "tolerance": self.tolerance,
            "margin": self.margin,
            "r": self.r,
            "r_star": self.r_star,
            "holds_at_zero": self.holds_at_zero,
            "beta_A": self.beta_A,
            "gamma_A": self.gamma_A,
            "beta_W": self.beta_W,
            "gamma_W": self.gamma_W,
            "eps": self.eps,
            "slope": self.slope,
            "bounds": self.bounds.to_dict(),
            "gamma_A_interval": None if self.gamma_A_interval is None
            else [v if math.isfinite(v) else None for v in self.gamma_A_interval],
            "reason": self.reason,
            "remedy": self.remedy,
        }


@dataclass(frozen=True)
class _Setting:
    test: str
    beta_A: float
    gamma_A: float
    beta_W: float
    gamma_W: float
    eps: float | None
    slope: float

    def evaluate(self, r: float, gamma_A: float | None = None) -> tuple[float, float]:
        """(value, tolerance) of the test at radius r (and gamma_A, default the setting's)."""
        g = self.gamma_A if gamma_A is None else gamma_A
        value, tolerance = _value_and_tolerance(self.test, self.beta_A, g, self.beta_W, self.gamma_W, r, self.eps, self.slope)
        return float(value), float(tolerance)

    def holds(self, r: float, gamma_A: float | None = None) -> bool:
        g = self.gamma_A if gamma_A is None else gamma_A
        return bool(_holds(self.test, self.beta_A, g, self.beta_W, self.gamma_W, r, self.eps, self.slope))

    def r_star(self) -> float:
        return float(_r_star(self.test, self.beta_A, self.gamma_A, self.beta_W, self.gamma_W, self.eps, self.slope))


def _bisect(ok: Callable[[float], bool], good: float, bad: float) -> float:
    """The last float between ``good`` (ok) and ``bad`` (not ok) that is ok, by bisection."""
    for _ in range(2200):
        mid = 0.5 * good + 0.5 * bad
        if mid in (good, bad):
            break
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return good


def certifying_gamma_A(
    test: str, beta_A: float, beta_W: float, gamma_W: float, r: float, eps: float | None = None, slope: float = 1.0
) -> tuple[float, float] | None:
    """The closed interval [lo, hi] of gamma_A for which ``test`` holds (None if no gamma_A does).

    ``hi`` is inf for ``ct-norm`` (the value decreases in gamma_A); for ``map-norm``
    the interval is (-inf, inf) or None (A plays no part). For the Runge-Kutta tests
    the value is non-increasing on gamma_A <= 0 and convex on gamma_A >= 0 with its
    minimum below 1/eps (module docstring), so the certified set is an interval:
    its ends are found by bisection around the minimum, and every gamma_A in
    [lo, hi] is certified because the exact value there is at most the larger of
    the values at the ends.
    """
    _check_inputs(beta_A, 0.0, beta_W, gamma_W, r, eps, slope)
    setting = _Setting(test, beta_A, 0.0, beta_W, gamma_W, eps if test not in ("ct-norm", "map-norm") else None, slope)
    if test == "map-norm":
        return (-math.inf, math.inf) if setting.holds(r) else None

    def ok(gamma: float) -> bool:
        return setting.holds(r, gamma)

    if test == "ct-norm":
        centre = _closed_form_gamma_ct(setting, r)
        lo = _extend(ok, centre, -1.0, inside_ok=False) if math.isfinite(centre) else math.nan
        return None if math.isnan(lo) else (lo, math.inf)
    best = _minimize_gamma(setting, r)
    if best is None:
        return None
    return (_extend(ok, best, -1.0), _extend(ok, best, 1.0))


def _closed_form_gamma_ct(setting: _Setting, r: float) -> float:
    """gamma_A at which the ct-norm value is 0 in exact arithmetic (before round-off)."""
    s = setting
    cW = 2.0 * max(s.beta_W, 1.0 - s.beta_W)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.float64(2.0 * abs(1.0 - s.beta_A) * r) + s.slope * (np.float64(cW * r) + abs(s.gamma_W)))


def _minimize_gamma(setting: _Setting, r: float) -> float | None:
    """A gamma_A in [0, 1/eps] at which the Runge-Kutta test holds, or None (golden-section search)."""
    assert setting.eps is not None

    def score(gamma: float) -> float:
        value, tolerance = setting.evaluate(r, gamma)
        total = value + tolerance
        return total if math.isfinite(total) else math.inf

    lo, hi = 0.0, 1.0 / setting.eps
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = score(a), score(b)
    for _ in range(200):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = score(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = score(b)
        if hi - lo <= 1e-15 * max(1.0, hi):
            break
    for gamma in (a, b, lo, hi, 0.0):
        if setting.holds(r, gamma):
            return gamma
    return None


def _extend(ok: Callable[[float], bool], start: float, direction: float, inside_ok: bool = True) -> float:
    """Boundary of the interval where ``ok`` holds, searched from ``start`` along ``direction`` (+-1).

    ``inside_ok``: ``start`` lies inside the interval and the last ok float towards
    ``direction`` is returned; otherwise ``start`` lies just past its lower end (ok is
    monotone) and the first ok float above is returned (-direction points inside).
    Returns +-inf when ok holds up to overflow, nan when no ok point is found.
    """
    inward = direction if inside_ok else -direction
    step = max(abs(start), 1.0)
    if inside_ok:
        good, bad = start, start + direction * step
        while ok(bad):
            step *= 2.0
            bad = start + direction * step
            if not math.isfinite(bad):
                return direction * math.inf
        return _bisect(ok, good, bad)
    bad, good = start, start + inward * step
    while ok(bad):
        bad -= inward * step
    while not ok(good):
        step *= 2.0
        good = start + inward * step
        if not math.isfinite(good):
            return math.nan
    return _bisect(ok, good, bad)


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
    and ``rk2-norm``. Each result says whether the norm test holds at radius ``r``,
    gives the largest certified radius r*, and for a failure why and what to change
    (see :class:`ParameterizationResult`). Non-finite inputs, r < 0, eps <= 0 and
    slope < 1 raise ``InputError``.
    """
    _check_inputs(beta_A, gamma_A, beta_W, gamma_W, r, eps, slope)
    if tests is None:
        tests = ("ct-norm",) if eps is None else ("ct-norm", "euler-norm", "rk2-norm")
    results = []
    for test in tests:
        if test not in PARAMETERIZATION_TESTS:
            raise InputError(f"unknown test {test!r}; expected one of {PARAMETERIZATION_TESTS}")
        test_eps = None if test in ("ct-norm", "map-norm") else eps
        if test_eps is None and test not in ("ct-norm", "map-norm"):
            raise InputError(f"{test} needs eps")
        setting = _Setting(test, float(beta_A), float(gamma_A), float(beta_W), float(gamma_W), test_eps, float(slope))
        results.append(_result(setting, float(r)))
    return results


def _result(setting: _Setting, r: float) -> ParameterizationResult:
    value, tolerance = setting.evaluate(r)
    bounds = parameter_bounds(setting.beta_A, setting.gamma_A, setting.beta_W, setting.gamma_W, r, setting.eps)
    threshold = norm_test_threshold(setting.test)
    holds = setting.holds(r)
    margin = threshold - value - tolerance if math.isfinite(value) and math.isfinite(tolerance) else math.nan
    r_star = setting.r_star()
    interval = certifying_gamma_A(setting.test, setting.beta_A, setting.beta_W, setting.gamma_W, r,
                                  setting.eps, setting.slope)
    reason, remedy = _explain(setting, r, holds, value, r_star, interval)
    return ParameterizationResult(
        test=setting.test, holds=holds, value=value, tolerance=tolerance, margin=margin, r=r, r_star=r_star,
        holds_at_zero=setting.holds(0.0), beta_A=setting.beta_A, gamma_A=setting.gamma_A, beta_W=setting.beta_W,
        gamma_W=setting.gamma_W, eps=setting.eps, slope=setting.slope, bounds=bounds, gamma_A_interval=interval,
        reason=reason, remedy=remedy,
    )


def _interval_text(interval: tuple[float, float]) -> str:
    lo, hi = interval
    if hi == math.inf:
        return f"gamma_A >= {lo:.6g}"
    return f"{lo:.6g} <= gamma_A <= {hi:.6g}"


def _explain(setting: _Setting, r: float, holds: bool, value: float, r_star: float,
             interval: tuple[float, float] | None) -> tuple[str, str]:
    s = setting
    L = s.slope
    if not math.isfinite(value):
        return "not certified: a bound overflows float64 (a parameter is too large)", "use parameters of moderate size"
    if holds:
        return f"holds for every ||M_A||_2, ||M_W||_2 <= r = {r:g} (certified up to r* = {r_star:.6g})", ""
    shift = L * abs(s.gamma_W)
    if s.test == "map-norm":
        why = (f"map-norm needs L ||W||_2 < 1, and ||W||_2 <= 2 max(beta_W, 1 - beta_W) r + |gamma_W| "
               f"= {value / L:.6g} at r = {r:g}")
        fix = (f"shrink r to r* = {r_star:.6g}" if r_star > 0
               else f"|gamma_W| = {abs(s.gamma_W):g} alone gives L |gamma_W| >= 1: reduce |gamma_W|")
        return f"not certified: {why}", fix
    if s.test == "ct-norm":
        mu_part = 2.0 * abs(1.0 - s.beta_A) * r - s.gamma_A
        why = (f"ct-norm needs mu2(A) + L ||W||_2 < 0; the bounds give mu2(A) <= {mu_part:.6g} and "
               f"L ||W||_2 <= {value - mu_part:.6g}, of which W's shift contributes L |gamma_W| = {shift:.6g}")
        if s.gamma_A <= shift:
            why += (f"; gamma_A = {s.gamma_A:g} <= L |gamma_W| = {shift:g}: W's shift cancels A's, so the test "
                    "cannot hold at any radius")
    else:
        why = (f"{s.test} needs rho < 1 and the bounds give rho <= {value:.6g} at r = {r:g}")
        if s.gamma_A <= shift:
            why += (f"; gamma_A = {s.gamma_A:g} <= L |gamma_W| = {shift:g}: W's shift cancels A's, so the test "
                    "cannot hold at any radius")
    fixes = []
    if interval is not None:
        fixes.append(f"{_interval_text(interval)} certifies at gamma_W = {s.gamma_W:g}, r = {r:g}")
    else:
        fixes.append(f"no gamma_A certifies at gamma_W = {s.gamma_W:g}, r = {r:g}")
    if s.gamma_W != 0:
        at_zero = certifying_gamma_A(s.test, s.beta_A, s.beta_W, 0.0, r, s.eps, L)
        if at_zero is not None:
            fixes.append(f"with gamma_W = 0, {_interval_text(at_zero)} certifies")
    if r_star > 0:
        fixes.append(f"or keep the gammas and bound ||M||_2 by r* = {r_star:.6g}")
    return f"not certified: {why}", "; ".join(fixes)


def gaussian_init_radius(
    hidden: int, init_std: float, failure_probability: float = _DEFAULT_INIT_FAILURE_PROBABILITY
) -> InitRadius:
    """Radius r that both initial M_A, M_W (entries N(0, (init_std / hidden)^2)) stay within.

    r = s (2 sqrt(N) + t), s = init_std / N, t = sqrt(2 ln(2 / p)): with probability at
    least 1 - p both ||M_A||_2 <= r and ||M_W||_2 <= r (module docstring).
    """
    if isinstance(hidden, bool) or not isinstance(hidden, (int, np.integer)) or hidden < 1:
        raise InputError(f"hidden must be a positive integer, got {hidden!r}")
    _check_finite(init_std=init_std, failure_probability=failure_probability)
    if not init_std > 0:
        raise InputError(f"init_std must be > 0, got {init_std}")
    if not 0 < failure_probability < 1:
        raise InputError(f"failure probability must be in (0, 1), got {failure_probability}")
    entry_std = init_std / hidden
    t = math.sqrt(2.0 * math.log(2.0 / failure_probability))
    return InitRadius(int(hidden), float(init_std), entry_std, 2.0 * entry_std * math.sqrt(hidden),
                      t, entry_std * (2.0 * math.sqrt(hidden) + t), float(failure_probability))


@dataclass(frozen=True)
class InitRadius:
    """The radius of :func:`gaussian_init_radius` and the numbers behind it."""

    hidden: int
    init_std: float
    entry_std: float
    expected_bound: float
    deviation: float
    radius: float
    failure_probability: float

    def describe(self) -> str:
        return (f"M_A, M_W of size {self.hidden} x {self.hidden} with entries N(0, s^2), "
                f"s = init_std / hidden = {self.entry_std:.4g}; E||M||_2 <= 2 s sqrt(N) = {self.expected_bound:.4g} "
                f"(Gordon) plus t s with t = {self.deviation:.3g} (Gaussian concentration, "
                f"P(||M||_2 >= 2 s sqrt(N) + t s) <= exp(-t^2/2)); both within r with probability "
                f">= 1 - {self.failure_probability:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "init_std": self.init_std, "entry_std": self.entry_std,
                "expected_bound": self.expected_bound, "deviation": self.deviation, "radius": self.radius,
                "failure_probability": self.failure_probability}


@dataclass(frozen=True)
class PhaseCell:
    """One (beta_A, gamma_A) cell of the phase diagram for one test (tidy row).

    ``point`` is "grid" for the grid and "user" for the user's own (beta_A, gamma_A).
    """

    beta_A: float
    gamma_A: float
    beta_W: float
    gamma_W: float
    test: str
    holds: bool
    value: float
    margin: float
    r_star: float
    point: str = "grid"

    def to_dict(self) -> dict[str, Any]:
        return {
            "beta_A": self.beta_A,
            "gamma_A": self.gamma_A,
            "beta_W": self.beta_W,
            "gamma_W": self.gamma_W,
            "test": self.test,
            "holds": self.holds,
            "value": self.value,
            "margin": self.margin,
            "r_star": self.r_star,
            "point": self.point,
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
    user_point: tuple[float, float] | None = None,
) -> list[PhaseCell]:
    """Margin of each test over a (beta_A, gamma_A) grid, one row per (beta_A, gamma_A, test).

    By default W shares each cell's (beta, gamma); pass ``beta_W``/``gamma_W`` to hold
    W's fixed. ``user_point`` = (beta_A, gamma_A) adds that point's rows, marked
    ``point = "user"`` (W as for the grid).
    """
    points = [(float(b), float(g), "grid") for b in betas for g in gammas]
    if user_point is not None:
        points.append((float(user_point[0]), float(user_point[1]), "user"))
    beta_A = np.array([p[0] for p in points], dtype=np.float64)
    gamma_A = np.array([p[1] for p in points], dtype=np.float64)
    beta_W_all = beta_A if beta_W is None else np.full_like(beta_A, beta_W)
    gamma_W_all = gamma_A if gamma_W is None else np.full_like(gamma_A, gamma_W)
    _check_inputs(0.0, 0.0, 0.0, 0.0, r, eps, slope)
    _check_finite(beta_W=beta_W, gamma_W=gamma_W)
    if not (np.all(np.isfinite(beta_A)) and np.all(np.isfinite(gamma_A))):
        raise InputError("the phase-diagram grid must be finite")
    names = tests if tests is not None else (("ct-norm",) if eps is None else ("ct-norm", "euler-norm", "rk2-norm"))
    columns = {}
    for test in names:
        if test not in PARAMETERIZATION_TESTS:
            raise InputError(f"unknown test {test!r}; expected one of {PARAMETERIZATION_TESTS}")
        test_eps = None if test in ("ct-norm", "map-norm") else eps
        if test_eps is None and test not in ("ct-norm", "map-norm"):
            raise InputError(f"{test} needs eps")
        args = (test, beta_A, gamma_A, beta_W_all, gamma_W_all)
        value, tolerance = _value_and_tolerance(*args, r, test_eps, slope)
        with np.errstate(over="ignore", invalid="ignore"):
            margin = norm_test_threshold(test) - value - tolerance
        columns[test] = (_holds(*args, r, test_eps, slope), value, margin, _r_star(*args, test_eps, slope))
    cells = []
    for i, (beta, gamma, kind) in enumerate(points):
        for test, (holds, value, margin, r_star) in columns.items():
            cells.append(PhaseCell(beta, gamma, float(beta_W_all[i]), float(gamma_W_all[i]), test, bool(holds[i]),
                                   float(value[i]), float(margin[i]) if np.isfinite(margin[i]) else math.nan,
                                   float(r_star[i]), kind))
    return cells
