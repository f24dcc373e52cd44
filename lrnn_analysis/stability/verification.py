"""Float64 verification of a candidate LMI certificate (P, Lambda, r).

A solver's "optimal" is not a proof. A candidate passes only if, computed in
float64 with numpy/LAPACK:

* P is exactly symmetric, finite, and lambda_min(P) > 1e-9 * lambda_max(P) > 0;
* every multiplier is finite and >= 0;
* (P, Lambda) is rescaled to lambda_max(P) = 1 before the LMI is assembled (the LMI is
  homogeneous, so this loses nothing and keeps the round-off bound meaningful);
* lambda_max(M(P, Lambda, r)) + tol < 0, where tol bounds the floating-point
  error of assembling M and of the symmetric eigensolver (see
  :meth:`IncrementalForm.assemble`).

The reported ``margin`` is -(lambda_max(M) + tol) > 0. The transient gain sqrt(cond P) that a
certificate reports is bounded from above with the eigensolver's error on P,
``p_tolerance`` = 8 (n + 8) u ||P||_F (u the unit round-off), taken off lambda_min(P) and
added to lambda_max(P). Because M <= -margin I,
the certified rate could even be improved by margin / (2 lambda_max(P)) (ct) or
margin / lambda_max(P) in rho^2 (discrete); the reported rate is the one checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .forms import IncrementalForm
from .spectra import UNIT_ROUNDOFF

__all__ = ["Verification", "verify"]

P_RELATIVE_EIG_FLOOR = 1e-9


@dataclass(frozen=True)
class Verification:
    """Outcome of :func:`verify` for the rate parameter ``r`` (a for ct, rho^2 per substep for discrete)."""

    passed: bool
    reason: str
    r: float
    lmi_max_eig: float
    tolerance: float
    margin: float
    p_min_eig: float
    p_max_eig: float
    multiplier_min: float
    p_tolerance: float = float("nan")

    @property
    def p_condition(self) -> float:
        return self.p_max_eig / self.p_min_eig if self.p_min_eig > 0 else float("inf")

    @property
    def transient_gain(self) -> float:
        """An upper bound on sqrt(lambda_max(P) / lambda_min(P)) despite round-off in the
        computed eigenvalues of P: the factor ``gain`` in ||delta_k|| <= gain * rate^k * ||delta_0||."""
        low = self.p_min_eig - self.p_tolerance
        if not (np.isfinite(low) and low > 0):
            return float("inf")
        return float(np.sqrt((self.p_max_eig + self.p_tolerance) / low))

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "r": self.r,
            "lmi_max_eig": self.lmi_max_eig,
            "tolerance": self.tolerance,
            "margin": self.margin,
            "p_min_eig": self.p_min_eig,
            "p_max_eig": self.p_max_eig,
            "p_condition": self.p_condition,
            "p_tolerance": self.p_tolerance,
            "transient_gain": self.transient_gain,
            "multiplier_min": self.multiplier_min,
        }


def verify(form: IncrementalForm, P: np.ndarray, lam: np.ndarray, r: float) -> Verification:
    """Check M(P, Lambda, r) <= 0 strictly, P > 0 and Lambda >= 0 in float64."""
    P = np.asarray(P, dtype=np.float64)
    lam = np.asarray(lam, dtype=np.float64)
    nan = float("nan")

    def fail(reason: str, p_min: float = nan, p_max: float = nan, lam_min: float = nan) -> Verification:
        return Verification(False, reason, float(r), nan, nan, nan, p_min, p_max, lam_min)

    if P.shape != (form.n, form.n) or lam.size != form.stages * form.n:
        return fail(f"shape mismatch: P {P.shape}, multipliers {lam.shape}")
    if not (np.all(np.isfinite(P)) and np.all(np.isfinite(lam)) and np.isfinite(r)):
        return fail("non-finite entries")
    if not all(np.all(np.isfinite(X)) for X in (form.out,) + form.q_maps):
        return fail("the lifted increment form overflows float64")
    if r < 0 or (not form.continuous and r >= 1):
        return fail(f"rate parameter {r} certifies no contraction (need a >= 0, or rho^2 in [0, 1))")
    if not np.array_equal(P, P.T):
        return fail("P is not symmetric")
    p_eigs = np.linalg.eigvalsh(P)
    p_min, p_max = float(p_eigs[0]), float(p_eigs[-1])
    lam_min = float(lam.min()) if lam.size else 0.0
    if not (p_max > 0 and p_min > P_RELATIVE_EIG_FLOOR * p_max):
        return fail(f"P not positive definite: lambda_min(P) = {p_min:.3e}, lambda_max(P) = {p_max:.3e}", p_min, p_max, lam_min)
    if lam_min < 0:
        return fail(f"negative multiplier {lam_min:.3e}", p_min, p_max, lam_min)
    # M is homogeneous in (P, Lambda): checking the pair scaled to lambda_max(P) = 1 is equally
    # conclusive and keeps subnormal or huge evidence from defeating the round-off bound.
    P, lam = P / p_max, lam / p_max
    p_min, p_max, lam_min = p_min / p_max, 1.0, lam_min / p_max
    p_tolerance = 8.0 * (form.n + 8) * UNIT_ROUNDOFF * float(np.linalg.norm(P))
    if not np.array_equal(P, P.T):
        return fail("P is not symmetric after scaling", p_min, p_max, lam_min)
    with np.errstate(over="ignore", invalid="ignore"):
        M, tolerance = form.assemble(P, lam, r)
    if not (np.all(np.isfinite(M)) and np.isfinite(tolerance)):
        return fail("the LMI matrix overflows float64", p_min, p_max, lam_min)
    top = float(np.linalg.eigvalsh(M)[-1])
    margin = -(top + tolerance)
    passed = margin > 0
    reason = "verified" if passed else f"LMI violated: lambda_max(M) = {top:.3e} > -tol = {-tolerance:.3e}"
    return Verification(passed, reason, float(r), top, tolerance, margin, p_min, p_max, lam_min, p_tolerance)
