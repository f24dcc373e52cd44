"""Global incremental-stability certificates for Lur'e systems: ``certify``.

A certificate proves, for every input sequence u, that any two trajectories
contract: with increments delta = h - h~,

* continuous time (``ct-*``):  ||delta(t)|| <= gain * exp(-rate * t) * ||delta(0)||,
  ``rate`` = a > 0 per unit time (hence a unique globally exponentially stable
  equilibrium for every constant input);
* discrete time (``euler-*``, ``rk2-*``, ``rk4-*``, ``map-*``): the map that is
  actually run satisfies ||delta_k|| <= gain * rate^k * ||delta_0||, ``rate`` = rho^s < 1
  the contraction factor per input step (rho per substep, s substeps), in the
  P-norm exactly: ||delta_{k+1}||_P <= rate ||delta_k||_P.

``gain`` = sqrt(cond P) (1 for the norm tests). ``margin`` = rate for ct and
1 - rate for discrete certificates, so a certificate holds iff margin > 0; for a
failed certificate ``margin`` is the (non-positive) margin of its norm test, or
None where nothing could be computed.

A ``*-lmi`` request runs tiers cheapest first, stopping at the first verified
success: ``norm`` (the closed-form test) -> ``P=I`` -> ``diag-P`` -> ``riccati`` -> ``full-P``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from ..lure import LureSystem
from .forms import incremental_form
from .lmi import SOLVERS, Candidate, TierOutcome, fixed_identity_tier, jacobian_goodness, sampled_slopes, sdp_tier
from .norms import norm_test
from .riccati import RICCATI_TIER, riccati_tier
from .verification import Verification, verify

CERTIFICATES = (
    "ct-norm",
    "ct-lmi",
    "euler-norm",
    "euler-lmi",
    "rk2-norm",
    "rk2-lmi",
    "rk4-norm",
    "rk4-lmi",
    "map-norm",
    "map-lmi",
)
TIERS = ("norm", "P=I", "diag-P", RICCATI_TIER, "full-P")
DEFAULT_CERTIFICATES = {
    "ode": ("ct-norm", "ct-lmi"),
    "euler": ("euler-norm", "euler-lmi"),
    "rk2": ("rk2-norm", "rk2-lmi"),
    "rk4": ("rk4-norm", "rk4-lmi"),
    "map": ("map-norm", "map-lmi"),
}


@dataclass(frozen=True)
class TierAttempt:
    """One tier tried for a certificate: whether it verified, its rate and cost."""

    tier: str
    holds: bool
    rate: float | None
    seconds: float
    solves: int
    solver: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "holds": self.holds,
            "rate": self.rate,
            "seconds": self.seconds,
            "solves": self.solves,
            "solver": self.solver,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Evidence:
    """The Lyapunov matrix P and diagonal multipliers (one row per stage) of an LMI certificate.

    ``r`` is the rate parameter the LMI was verified at: a (ct) or rho^2 per substep (discrete).
    """

    P: np.ndarray
    multipliers: np.ndarray
    r: float

    def to_dict(self, include_matrices: bool = True) -> dict[str, Any]:
        eigs = np.linalg.eigvalsh(self.P)
        summary: dict[str, Any] = {
            "r": self.r,
            "P_min_eig": float(eigs[0]),
            "P_max_eig": float(eigs[-1]),
            "multiplier_min": float(self.multipliers.min()),
            "multiplier_max": float(self.multipliers.max()),
        }
        if include_matrices:
            summary["P"] = self.P.tolist()
            summary["multipliers"] = self.multipliers.tolist()
        return summary


@dataclass(frozen=True)
class CertificateResult:
    """Outcome of one certificate (see the module docstring for ``rate``, ``gain`` and ``margin``)."""

    name: str
    holds: bool
    margin: float | None
    rate: float | None
    gain: float | None
    tier: str | None
    seconds: float
    reason: str
    assumptions: tuple[str, ...]
    rate_meaning: str
    substep_rate: float | None = None
    evidence: Evidence | None = None
    verification: Verification | None = None
    attempts: tuple[TierAttempt, ...] = field(default=())
    budget_exhausted: bool = False

    def to_dict(self, include_matrices: bool = True) -> dict[str, Any]:
        return {
            "name": self.name,
            "holds": self.holds,
            "margin": self.margin,
            "rate": self.rate,
            "gain": self.gain,
            "tier": self.tier,
            "seconds": self.seconds,
            "reason": self.reason,
            "assumptions": list(self.assumptions),
            "rate_meaning": self.rate_meaning,
            "substep_rate": self.substep_rate,
            "evidence": None if self.evidence is None else self.evidence.to_dict(include_matrices),
            "verification": None if self.verification is None else self.verification.to_dict(),
            "attempts": [a.to_dict() for a in self.attempts],
            "budget_exhausted": self.budget_exhausted,
        }


def default_certificates(system: LureSystem) -> tuple[str, ...]:
    """The certificates that apply to the scheme the system runs."""
    return DEFAULT_CERTIFICATES[system.method]


def certify(
    system: LureSystem,
    names: Sequence[str] | str | None = None,
    time_budget: float | None = None,
    *,
    tiers: Sequence[str] | None = None,
    solver: str = "auto",
) -> list[CertificateResult]:
    """Run the requested certificates on ``system``, one result per name, in order.

    ``names`` defaults to :func:`default_certificates`. ``time_budget`` (seconds)
    bounds the total time approximately: it is checked between tiers and bisection
    steps and passed to the SDP solvers; tiers skipped for lack of time are
    reported (``budget_exhausted``). ``tiers`` restricts the tiers an LMI request
    may use (default all of ``norm``, ``P=I``, ``diag-P``, ``riccati``, ``full-P``, in that
    order). ``solver`` is ``auto`` (Clarabel for small PSD cones, SCS for large
    ones, each falling back to the other on a solver error), ``CLARABEL`` or ``SCS``.
    """
    if names is None:
        names = default_certificates(system)
    elif isinstance(names, str):
        names = (names,)
    tiers = TIERS if tiers is None else tuple(tiers)
    for name in names:
        _family(system, name)
    unknown = [t for t in tiers if t not in TIERS]
    if unknown:
        raise ValueError(f"unknown tiers {unknown}; expected a subset of {TIERS}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    deadline = time.monotonic() + (float("inf") if time_budget is None else float(time_budget))
    results = []
    # The work is many small dense factorizations; multithreaded BLAS on a shared
    # 2-core machine spends 100x longer spinning than computing.
    with threadpool_limits(limits=1, user_api="blas"):
        for name in names:
            if name.endswith("-norm"):
                results.append(_norm_certificate(system, name))
            else:
                results.append(_lmi_certificate(system, name, tiers, deadline, solver))
    return results


def verify_certificate(
    system: LureSystem, name: str, P: np.ndarray, multipliers: np.ndarray, rate: float
) -> Verification:
    """Independently check an LMI certificate (P, multipliers) for ``system`` in float64.

    ``rate`` is in the units of :class:`CertificateResult`: a for ct, the
    contraction factor per input step for discrete certificates.
    """
    family = _family(system, name)
    if not name.endswith("-lmi"):
        raise ValueError(f"{name} is not an LMI certificate")
    form = incremental_form(system, family)
    meaningful = np.isfinite(rate) and rate >= 0
    r = rate if form.continuous or not meaningful else (rate ** (1.0 / _substeps(system, family))) ** 2
    return verify(form, P, multipliers, r)


def _family(system: LureSystem, name: str) -> str:
    if name not in CERTIFICATES:
        raise ValueError(f"unknown certificate {name!r}; expected one of {CERTIFICATES}")
    family = name.split("-")[0]
    if family == "ct":
        if system.method == "map":
            raise ValueError("ct certificates need a continuous-time model; method 'map' has none")
        return family
    if family != system.method:
        raise ValueError(f"{name} certifies method {family!r} but the system runs {system.method!r}")
    return family


def _substeps(system: LureSystem, family: str) -> int:
    return system.substeps if family in ("euler", "rk2", "rk4") else 1


def _assumptions(system: LureSystem, family: str) -> tuple[str, ...]:
    common = (
        f"sigma acts elementwise with slopes in [0, L], L = {system.slope}",
        "holds for every input sequence u (input-uniform, incremental)",
    )
    if family == "ct":
        extra = ("continuous-time model h' = A h + sigma(W h + u); says nothing about a discretization",)
        if system.method != "ode":
            extra += (f"the system runs {system.method!r}; this certifies the underlying ODE only",)
        return common + extra
    if family == "map":
        return common + ("discrete map h+ = sigma(W h + u)",)
    return common + (
        f"the {family} scheme with step eps = {system.eps}, {system.substeps} substep(s) per input step,"
        " input held constant over the step",
    )


def _rate_meaning(family: str) -> str:
    if family == "ct":
        return "decay rate a per unit time: ||delta(t)|| <= gain * exp(-a t) * ||delta(0)||"
    return "contraction factor per input step: ||delta_k|| <= gain * rate^k * ||delta_0||"


def _necessary_failure(system: LureSystem, family: str) -> str | None:
    """Reason string when the frozen Jacobian at D = 0 or D = L I is already unstable."""
    n, L = system.n, system.slope
    for label, d in (("A", np.zeros(n)), ("A + L W", np.full(n, L))):
        g = jacobian_goodness(system, family, d)
        if family == "ct" and g <= 0.0:
            return (f"no input-uniform certificate can exist (sector [0, {L:g}]): {label} is not Hurwitz "
                    f"(spectral abscissa {-g:.6g})")
        if family != "ct" and -g >= 1.0:
            what = "step matrix" if family != "map" else "linear map"
            return (
                f"no input-uniform certificate can exist (sector [0, {L:g}]): the {what} at J = {label} has spectral radius"
                f" {np.sqrt(-g):.6g} >= 1"
            )
    return None


def _from_norm(system: LureSystem, family: str) -> tuple[bool, float, float | None, float | None]:
    """(holds, margin, rate, substep_rate) of the norm test for ``family``."""
    outcome = norm_test(system, f"{family}-norm")
    bound = outcome.value + outcome.tolerance  # the rate is backed off by the round-off bound of the norms
    if family == "ct":
        margin = -bound
        return outcome.holds, margin, (margin if outcome.holds else None), None
    rate = bound ** _substeps(system, family)
    holds = outcome.holds
    return holds, 1.0 - rate, (rate if holds else None), (bound if holds else None)


def _norm_certificate(system: LureSystem, name: str) -> CertificateResult:
    start = time.monotonic()
    family = _family(system, name)
    holds, margin, rate, substep_rate = _from_norm(system, family)
    necessary = _necessary_failure(system, family)
    if holds:
        reason = "norm test holds"
    else:
        reason = necessary or f"norm test fails (margin {margin:.6g})"
    seconds = time.monotonic() - start
    return CertificateResult(
        name=name,
        holds=holds,
        margin=margin,
        rate=rate,
        gain=1.0 if holds else None,
        tier="norm" if holds else None,
        seconds=seconds,
        reason=reason,
        assumptions=_assumptions(system, family),
        rate_meaning=_rate_meaning(family),
        substep_rate=substep_rate,
        attempts=(TierAttempt("norm", holds, rate, seconds, 0, None, reason),),
    )


def _lmi_certificate(
    system: LureSystem, name: str, tiers: tuple[str, ...], deadline: float, solver: str
) -> CertificateResult:
    start = time.monotonic()
    family = _family(system, name)
    common = {"name": name, "assumptions": _assumptions(system, family), "rate_meaning": _rate_meaning(family)}
    _, norm_margin, _, _ = _from_norm(system, family)
    necessary = _necessary_failure(system, family)
    if necessary is not None:
        return CertificateResult(
            holds=False, margin=norm_margin, rate=None, gain=None, tier=None,
            seconds=time.monotonic() - start, reason=necessary, **common,
        )
    form = incremental_form(system, family)
    g_upper = min(jacobian_goodness(system, family, d) for d in sampled_slopes(system.n, system.slope))
    attempts: list[TierAttempt] = []
    exhausted = False
    for tier in tiers:
        if time.monotonic() >= deadline:
            exhausted = True
            attempts.append(TierAttempt(tier, False, None, 0.0, 0, None, "skipped: time budget exhausted"))
            continue
        if tier == "norm":
            tier_start = time.monotonic()
            holds, margin, rate, substep_rate = _from_norm(system, family)
            attempts.append(TierAttempt("norm", holds, rate, time.monotonic() - tier_start, 0, None,
                                        "norm test holds" if holds else "norm test fails"))
            if holds:
                return CertificateResult(
                    holds=True, margin=margin, rate=rate, gain=1.0, tier="norm", substep_rate=substep_rate,
                    seconds=time.monotonic() - start, reason="verified by the norm test",
                    attempts=tuple(attempts), **common,
                )
            continue
        if tier == "P=I":
            outcome = fixed_identity_tier(form, deadline)
        elif tier == RICCATI_TIER:
            outcome = riccati_tier(form, g_upper, deadline)
        else:
            outcome = sdp_tier(form, tier, g_upper, deadline, solver)
        exhausted = exhausted or outcome.budget_exhausted
        result = _tier_result(system, family, outcome)
        attempts.append(result)
        if outcome.candidate is not None:
            return _lmi_success(system, family, outcome.candidate, tier, start, attempts, exhausted, common)
    reason = "no tier verified a certificate"
    if exhausted:
        reason += " (time budget exhausted)"
    return CertificateResult(
        holds=False, margin=norm_margin, rate=None, gain=None, tier=None,
        seconds=time.monotonic() - start, reason=reason, attempts=tuple(attempts),
        budget_exhausted=exhausted, **common,
    )


def _user_rate(system: LureSystem, family: str, r: float) -> tuple[float, float | None]:
    """(rate, substep_rate) in the units of CertificateResult from the LMI parameter r."""
    if family == "ct":
        return r, None
    rho = float(np.sqrt(r))
    return rho ** _substeps(system, family), rho


def _tier_result(system: LureSystem, family: str, outcome: TierOutcome) -> TierAttempt:
    rate = None if outcome.candidate is None else _user_rate(system, family, outcome.candidate.r)[0]
    return TierAttempt(
        outcome.tier, outcome.candidate is not None, rate, outcome.seconds, outcome.solves, outcome.solver, outcome.reason
    )


def _lmi_success(
    system: LureSystem,
    family: str,
    candidate: Candidate,
    tier: str,
    start: float,
    attempts: list[TierAttempt],
    exhausted: bool,
    common: dict[str, Any],
) -> CertificateResult:
    rate, substep_rate = _user_rate(system, family, candidate.r)
    verification = candidate.verification
    return CertificateResult(
        holds=True,
        margin=rate if family == "ct" else 1.0 - rate,
        rate=rate,
        gain=float(np.sqrt(verification.p_condition)),
        tier=tier,
        seconds=time.monotonic() - start,
        reason=f"verified in float64 (LMI margin {verification.margin:.3e})",
        substep_rate=substep_rate,
        evidence=Evidence(candidate.P, candidate.lam, candidate.r),
        verification=verification,
        attempts=tuple(attempts),
        budget_exhausted=exhausted,
        **common,
    )
