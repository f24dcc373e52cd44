"""Global incremental-stability certificates for Lur'e systems: ``certify``.

A certificate proves, for every input sequence u, that any two trajectories
contract: with increments delta = h - h~,

* continuous time (``ct-*``):  ||delta(t)|| <= gain * exp(-rate * t) * ||delta(0)||,
  ``rate`` = a > 0 per unit time (hence a unique globally exponentially stable
  equilibrium for every constant input);
* discrete time (``euler-*``, ``rk2-*``, ``rk4-*``, ``rk38-*``, ``map-*``): the map that is
  actually run satisfies ||delta_k|| <= gain * rate^k * ||delta_0||, ``rate`` = rho^s < 1
  the contraction factor per input step (rho per substep, s substeps), in the
  P-norm exactly: ||delta_{k+1}||_P <= rate ||delta_k||_P.

``gain`` = sqrt(cond P) (1 for the norm tests). ``margin`` = rate for ct and
1 - rate for discrete certificates, so a certificate holds iff margin > 0; for a
failed certificate ``margin`` is the (non-positive) margin of its norm test, or
None where nothing could be computed.

A ``*-lmi`` request runs tiers cheapest first, stopping at the first verified
success: ``norm`` (the closed-form test) -> ``P=I`` -> ``riccati`` -> ``diag-P`` -> ``full-P``.
``riccati`` (full P from O(n^3) Riccati solves) runs before the ``diag-P`` SDP: it searches a
larger set of P, and on the random n = 64 systems of ``bench/stability.py`` it certifies in
under 1 s where diag-P finds nothing after 11-28 s; diag-P stays as a fallback.

Numerics. ``ct`` certificates are computed on the time-rescaled system
(A, W) / s with s = 2^k the power of two nearest to ||A||_2 + L ||W||_2: scaling the
increment dynamics delta' = (A + D W) delta by s only rescales time, the division by a
power of two is exact, and every verdict is then independent of the scale of (A, W);
the rate is multiplied back by s and the multipliers of the evidence divided by s
(the LMI of the rescaled system is a congruence of the original's). Discrete rates are
reported as upper bounds rounded up, with ``log_rate`` = ln(rate) for factors too small
for float64 (the rate saturates at the smallest normal float64 instead of reading 0).
A system whose certificate data overflow float64, or a solver that fails or panics,
gives "not certified" with the reason, never an exception.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
from threadpoolctl import threadpool_limits

from ..choices import CERTIFICATES
from ..errors import InputError
from ..lure import LureSystem
from .forms import incremental_form
from .lmi import (
    SOLVERS,
    Candidate,
    TierOutcome,
    fixed_identity_tier,
    is_numerical_failure,
    jacobian_error_bound,
    jacobian_goodness,
    sampled_slopes,
    sdp_tier,
)
from .norms import NormTestOutcome, norm_test
from .riccati import RICCATI_TIER, riccati_tier
from .spectra import UNDERFLOW_FLOOR, UNIT_ROUNDOFF, norm2
from .verification import Verification, verify

__all__ = ["CertificateResult", "Evidence", "TIERS", "TierAttempt", "certify", "default_certificates", "rounded_r",
    "verify_certificate"]

TIERS = ("norm", "P=I", RICCATI_TIER, "diag-P", "full-P")
_DEFAULT_CERTIFICATES = {
    "ode": ("ct-norm", "ct-lmi"),
    "euler": ("euler-norm", "euler-lmi"),
    "rk2": ("rk2-norm", "rk2-lmi"),
    "rk4": ("rk4-norm", "rk4-lmi"),
    "rk38": ("rk38-norm", "rk38-lmi"),
    "map": ("map-norm", "map-lmi"),
}


@dataclass(frozen=True)
class TierAttempt:
    """One tier tried for a certificate: whether it verified, its rate and cost.

    ``work`` counts the tier's inner steps where it reports them (the Riccati tier: Riccati
    solves, Schur forms, Lyapunov solves), so costs compare across machines and loads.
    """

    tier: str
    holds: bool
    rate: float | None
    seconds: float
    solves: int
    solver: str | None
    reason: str
    work: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "holds": self.holds,
            "rate": self.rate,
            "seconds": self.seconds,
            "solves": self.solves,
            "solver": self.solver,
            "reason": self.reason,
            "work": dict(self.work),
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
    """Outcome of one certificate (see the module docstring for ``rate``, ``gain`` and ``margin``).

    ``log_rate`` (discrete certificates) is ln of the contraction factor per input step,
    an upper bound like ``rate`` and meaningful where ``rate`` saturates at 2.2e-308.
    """

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
    log_rate: float | None = None

    def to_dict(self, include_matrices: bool = True) -> dict[str, Any]:
        return {
            "name": self.name,
            "holds": self.holds,
            "margin": self.margin,
            "rate": self.rate,
            "log_rate": self.log_rate,
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
    return _DEFAULT_CERTIFICATES[system.method]


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
    may use (default all of ``norm``, ``P=I``, ``riccati``, ``diag-P``, ``full-P``, in that
    order). ``solver`` is ``auto`` (Clarabel for small PSD cones, SCS for large
    ones, each falling back to the other on a solver error, which the tier's reason
    reports), ``CLARABEL`` or ``SCS``. ``time_budget=None`` passes no time limit to the solvers.
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
        raise InputError(f"unknown tiers {unknown}; expected a subset of {TIERS}")
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
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


def rounded_r(rate: float, substeps: int = 1) -> float:
    """rho^2 per (sub)step from a contraction factor ``rate`` per input step, rounded down by
    8 units of roundoff, so that a verification passing at it proves ``rate``."""
    return (rate ** (1.0 / substeps)) ** 2 * (1.0 - 8.0 * UNIT_ROUNDOFF)


def verify_certificate(
    system: LureSystem, name: str, P: np.ndarray, multipliers: np.ndarray, rate: float
) -> Verification:
    """Independently check an LMI certificate (P, multipliers) for ``system`` in float64.

    ``rate`` is in the units of :class:`CertificateResult`: a for ct, the
    contraction factor per input step for discrete certificates (converted to rho^2
    per substep and rounded down, so a pass proves the stated rate). ct evidence is
    checked on the time-rescaled system (module docstring): the returned record's
    ``r``, ``margin`` and ``tolerance`` are in its units (a / s).
    """
    family = _family(system, name)
    if not name.endswith("-lmi"):
        raise InputError(f"{name} is not an LMI certificate")
    working, scale = _working_system(system, family)
    form = incremental_form(working, family)
    multipliers = np.asarray(multipliers, dtype=np.float64)
    meaningful = np.isfinite(rate) and 0 <= rate < (np.inf if form.continuous else 1.0)
    if form.continuous:
        return verify(form, P, multipliers * scale, rate / scale)
    r = rounded_r(rate, _substeps(system, family)) if meaningful else rate
    return verify(form, P, multipliers, r)


def _working_system(system: LureSystem, family: str) -> tuple[LureSystem, float]:
    """The system the computations run on and its time scale s (module docstring); s = 1 unless ct."""
    if family != "ct":
        return system, 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        size = norm2(system.A) + system.slope * norm2(system.W)
    scale = math.ldexp(1.0, round(math.log2(size))) if np.isfinite(size) and size > 0 else 1.0
    rescaled = LureSystem(system.A / scale, system.W / scale, slope=system.slope, method="ode", activation=system.activation)
    return rescaled, scale


def _family(system: LureSystem, name: str) -> str:
    if name not in CERTIFICATES:
        raise InputError(f"unknown certificate {name!r}; expected one of {CERTIFICATES}")
    family = name.split("-")[0]
    if family == "ct":
        if system.method == "map":
            raise InputError("ct certificates need a continuous-time model; method 'map' has none")
        return family
    if family != system.method:
        raise InputError(f"{name} certifies method {family!r} but the system runs {system.method!r}")
    return family


def _substeps(system: LureSystem, family: str) -> int:
    return system.substeps if family in ("euler", "rk2", "rk4", "rk38") else 1


def _assumptions(system: LureSystem, family: str) -> tuple[str, ...]:
    common = (
        f"sigma acts elementwise with slopes in [0, L], L = {system.slope}",
        "holds for every input sequence u (input-uniform, incremental)",
    )
    if family == "ct":
        extra: tuple[str, ...] = ("continuous-time model h' = A h + sigma(W h + u); says nothing about a discretization",)
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


def _necessary_failure(working: LureSystem, family: str, scale: float, norm_holds: bool) -> str | None:
    """Reason no certificate is attempted: a frozen Jacobian at D = 0 or D = L I is not stable.

    Decided from computed eigenvalues against :func:`~.lmi.jacobian_error_bound`: beyond the
    bound the system is reported unstable; within it float64 cannot decide and nothing is
    certified. A norm test that holds is a proof (with its own round-off bound) that every
    frozen Jacobian is stable, so it overrides the eigenvalue estimate and ``ct-norm`` and
    ``ct-lmi`` never disagree about it.
    """
    if norm_holds:
        return None
    n, L = working.n, working.slope
    bound = jacobian_error_bound(working, family)
    sector = f"(sector [0, {L:g}])"
    for label, d in (("A", np.zeros(n)), ("A + L W", np.full(n, L))):
        g = jacobian_goodness(working, family, d)
        if np.isnan(g) or not np.isfinite(bound) or (family == "ct" and not np.isfinite(g)):
            return f"not certified: the frozen Jacobian {label} of the {family} scheme overflows float64"
        if family == "ct":
            alpha = -g
            if alpha > bound:
                return (f"no input-uniform certificate can exist {sector}: {label} is not Hurwitz "
                        f"(spectral abscissa {alpha * scale:.6g}, round-off bound {bound * scale:.3g})")
            if alpha >= -bound:
                return (f"not certified: the spectral abscissa of {label}, {alpha * scale:.6g}, is within the round-off "
                        f"bound {bound * scale:.3g} of 0, so float64 cannot decide whether it is Hurwitz")
            continue
        what = "step matrix" if family != "map" else "linear map"
        radius = float(np.sqrt(-g))
        if radius > 1.0 + bound:
            return (f"no input-uniform certificate can exist {sector}: the {what} at J = {label} has spectral radius"
                    f" {radius:.6g} > 1 (round-off bound {bound:.3g})")
        if radius >= 1.0 - bound:
            return (f"not certified: the {what} at J = {label} has spectral radius {radius:.6g}, within the round-off"
                    f" bound {bound:.3g} of 1, so float64 cannot decide whether it contracts")
    return None


@dataclass(frozen=True)
class _NormNumbers:
    outcome: NormTestOutcome
    margin: float | None
    rate: float | None
    substep_rate: float | None
    log_rate: float | None


def _from_norm(working: LureSystem, family: str, scale: float, substeps: int) -> _NormNumbers:
    """The norm test of ``family`` on the working system, in the units of :class:`CertificateResult`.

    The rate is backed off by the round-off bound of the norms (value + tolerance).
    """
    outcome = norm_test(working, f"{family}-norm")
    bound = outcome.value + outcome.tolerance
    if family == "ct":
        margin = -bound * scale if np.isfinite(bound) else None
        return _NormNumbers(outcome, margin, margin if outcome.holds else None, None, None)
    if not outcome.holds:
        return _NormNumbers(outcome, 1.0 - bound if np.isfinite(bound) else None, None, None, None)
    rho = float(np.nextafter(bound, np.inf))
    rate, log_rate = _contraction(math.log(rho) if rho > 0 else -math.inf, substeps)
    return _NormNumbers(outcome, 1.0 - rate, rate, rho, log_rate)


def _contraction(log_substep: float, substeps: int) -> tuple[float, float]:
    """(rate, log_rate) per input step from ln(rho) per substep, both rounded up.

    ln and exp err by at most one ulp and the product by one rounding, so
    log_rate * (1 - 8u) and exp(.) * (1 + 4u) are upper bounds; a rate below the
    smallest normal float64 is reported as that number (2.2e-308), never as 0.
    """
    if log_substep == -math.inf:
        return 0.0, -math.inf
    log_rate = substeps * log_substep
    log_rate = log_rate + 8.0 * UNIT_ROUNDOFF * abs(log_rate)
    return max(math.exp(log_rate) * (1.0 + 4.0 * UNIT_ROUNDOFF), UNDERFLOW_FLOOR), log_rate


def _norm_certificate(system: LureSystem, name: str) -> CertificateResult:
    start = time.monotonic()
    family = _family(system, name)
    working, scale = _working_system(system, family)
    numbers = _from_norm(working, family, scale, _substeps(system, family))
    holds = numbers.outcome.holds
    if holds:
        reason = "norm test holds"
    else:
        reason = _necessary_failure(working, family, scale, False) or _norm_failure(numbers, scale)
    seconds = time.monotonic() - start
    return CertificateResult(
        name=name,
        holds=holds,
        margin=numbers.margin,
        rate=numbers.rate,
        gain=1.0 if holds else None,
        tier="norm" if holds else None,
        seconds=seconds,
        reason=reason,
        assumptions=_assumptions(system, family),
        rate_meaning=_rate_meaning(family),
        substep_rate=numbers.substep_rate,
        log_rate=numbers.log_rate,
        attempts=(TierAttempt("norm", holds, numbers.rate, seconds, 0, None, reason),),
    )


def _norm_failure(numbers: _NormNumbers, scale: float) -> str:
    if numbers.margin is None:
        return "not certified: the norms of the test overflow float64"
    return (f"norm test fails (margin {numbers.margin:.6g}, round-off bound "
            f"{numbers.outcome.tolerance * scale:.3g} included)")


class _Common(TypedDict):
    """The fields every result of one LMI certificate shares."""

    name: str
    assumptions: tuple[str, ...]
    rate_meaning: str


def _lmi_certificate(
    system: LureSystem, name: str, tiers: tuple[str, ...], deadline: float, solver: str
) -> CertificateResult:
    start = time.monotonic()
    family = _family(system, name)
    common = _Common(name=name, assumptions=_assumptions(system, family), rate_meaning=_rate_meaning(family))
    working, scale = _working_system(system, family)
    substeps = _substeps(system, family)
    numbers = _from_norm(working, family, scale, substeps)
    necessary = _necessary_failure(working, family, scale, numbers.outcome.holds)
    form = incremental_form(working, family)
    if necessary is None and not all(np.all(np.isfinite(X)) for X in (form.out,) + form.q_maps):
        necessary = f"not certified: the lifted increment form of the {family} scheme overflows float64"
    if necessary is not None:
        return CertificateResult(
            holds=False, margin=numbers.margin, rate=None, gain=None, tier=None,
            seconds=time.monotonic() - start, reason=necessary, **common,
        )
    goodness = [jacobian_goodness(working, family, d) for d in sampled_slopes(working.n, working.slope)]
    g_upper = min(g for g in goodness if np.isfinite(g))
    attempts: list[TierAttempt] = []
    exhausted = False
    for tier in tiers:
        if time.monotonic() >= deadline:
            exhausted = True
            attempts.append(TierAttempt(tier, False, None, 0.0, 0, None, "skipped: time budget exhausted"))
            continue
        if tier == "norm":
            holds = numbers.outcome.holds
            attempts.append(TierAttempt("norm", holds, numbers.rate, 0.0, 0, None,
                                        "norm test holds" if holds else "norm test fails"))
            if holds:
                return CertificateResult(
                    holds=True, margin=numbers.margin, rate=numbers.rate, gain=1.0, tier="norm",
                    substep_rate=numbers.substep_rate, log_rate=numbers.log_rate,
                    seconds=time.monotonic() - start, reason="verified by the norm test",
                    attempts=tuple(attempts), **common,
                )
            continue
        tier_start = time.monotonic()
        try:
            if tier == "P=I":
                outcome = fixed_identity_tier(form, deadline)
            elif tier == RICCATI_TIER:
                outcome = riccati_tier(form, g_upper, deadline)
            else:
                outcome = sdp_tier(form, tier, g_upper, deadline, solver)
        except BaseException as error:
            if not is_numerical_failure(error):
                raise
            attempts.append(TierAttempt(tier, False, None, time.monotonic() - tier_start, 0, None,
                                        f"not certified: {type(error).__name__}: {error}"))
            continue
        exhausted = exhausted or outcome.budget_exhausted
        attempts.append(_tier_result(system, family, scale, outcome))
        if outcome.candidate is not None:
            return _lmi_success(system, family, scale, outcome.candidate, tier, start, attempts, exhausted, common)
    reason = _infeasibility(attempts) or "no tier verified a certificate"
    if exhausted:
        reason += " (time budget exhausted)"
    return CertificateResult(
        holds=False, margin=numbers.margin, rate=None, gain=None, tier=None,
        seconds=time.monotonic() - start, reason=reason, attempts=tuple(attempts),
        budget_exhausted=exhausted, **common,
    )


def _infeasibility(attempts: Sequence[TierAttempt]) -> str | None:
    """Why no certificate of the family exists, when an SDP tier's first solve, at the weakest
    rate, came back infeasible (the solver's word, in its own arithmetic): with full P for the
    whole family with diagonal multipliers, with diagonal P for that sub-family only."""
    for tier, family in (("full-P", "this family (any P, diagonal multipliers)"), ("diag-P", "diagonal P")):
        for attempt in attempts:
            found = _INFEASIBLE.search(attempt.reason) if attempt.tier == tier else None
            if found is not None:
                return (f"no certificate of {family} exists: the {tier} SDP is infeasible at the weakest rate "
                        f"({found.group(1)}, t = {found.group(2)})")
    return None


_INFEASIBLE = re.compile(r"^(\w+): infeasible at this rate \(t = ([^)]+)\)")


def _user_rate(system: LureSystem, family: str, scale: float, r: float) -> tuple[float, float | None, float | None]:
    """(rate, substep_rate, log_rate) in the units of CertificateResult from the LMI parameter r.

    ct: a = s r (exact, s a power of two). Discrete: rho = sqrt(r) and rho^substeps, rounded up.
    """
    if family == "ct":
        return r * scale, None, None
    rho = float(np.nextafter(math.sqrt(r), np.inf))
    rate, log_rate = _contraction(0.5 * math.log(r) if r > 0 else -math.inf, _substeps(system, family))
    return rate, rho, log_rate


def _tier_result(system: LureSystem, family: str, scale: float, outcome: TierOutcome) -> TierAttempt:
    rate = None if outcome.candidate is None else _user_rate(system, family, scale, outcome.candidate.r)[0]
    return TierAttempt(
        outcome.tier, outcome.candidate is not None, rate, outcome.seconds, outcome.solves, outcome.solver, outcome.reason,
        dict(outcome.work),
    )


def _lmi_success(
    system: LureSystem,
    family: str,
    scale: float,
    candidate: Candidate,
    tier: str,
    start: float,
    attempts: list[TierAttempt],
    exhausted: bool,
    common: _Common,
) -> CertificateResult:
    rate, substep_rate, log_rate = _user_rate(system, family, scale, candidate.r)
    verification = candidate.verification
    evidence_r = candidate.r * scale if family == "ct" else candidate.r
    return CertificateResult(
        holds=True,
        margin=rate if family == "ct" else 1.0 - rate,
        rate=rate,
        gain=verification.transient_gain,
        tier=tier,
        seconds=time.monotonic() - start,
        reason=f"verified in float64 (LMI margin {verification.margin:.3e})",
        substep_rate=substep_rate,
        log_rate=log_rate,
        evidence=Evidence(candidate.P, candidate.lam / scale, evidence_r),
        verification=verification,
        attempts=tuple(attempts),
        budget_exhausted=exhausted,
        **common,
    )
