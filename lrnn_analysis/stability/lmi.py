"""Searching for LMI certificates, cheapest structure first, every candidate verified.

Tiers (each returns a float64-verified candidate or nothing):

* ``P=I``    P fixed to the identity. For fixed P and multipliers the best rate
             is a generalized eigenvalue of the Schur complement S(Lambda) (see
             :meth:`IncrementalForm.best_rate`); lambda_max(S(Lambda), P) is convex in
             Lambda, so it is minimized directly over the n m multipliers (log-scale
             grid, then L-BFGS on a soft-max of the eigenvalues with continuation,
             gradients by the envelope theorem). No SDP solver is involved.
* ``diag-P`` and ``full-P``: bisection on the rate. Each step solves, with cvxpy,
             maximize t <= t_cap s.t. I <= P <= KAPPA_MAX I, Lambda >= 0 and M(P, Lambda, r) <= -t I
             (discrete families use the Schur form [[-K - t I, C^T P], [P C, P]] >= 0
             with K = M - C^T P C, which keeps the problem data O(n^2 N) instead of O(N^2 n^2)).
             A returned (P, Lambda) is re-optimized over Lambda for fixed P, its best
             rate computed in closed form, and verified; the bisection's lower end
             only ever moves to verified rates.

Every candidate is verified at a rate backed off slightly from the closed-form
optimum (relative 1e-9, then 1e-7, 1e-5, 1e-3) so that roundoff cannot flip the verdict.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import scipy.optimize

from ..errors import InputError
from ..lure import LureSystem
from .forms import IncrementalForm
from .spectra import STABILITY_POLYNOMIALS, norm2, roundoff_bound, spectral_abscissa, spectral_radius, step_matrix
from .verification import Verification, verify

__all__ = ["Candidate", "KAPPA_MAX", "SOLVERS", "TierOutcome", "finalize", "fixed_identity_tier", "run_solver",
    "is_numerical_failure", "jacobian_error_bound", "jacobian_goodness", "sampled_slopes", "sdp_tier"]

SOLVERS = ("auto", "CLARABEL", "SCS")
# Interior-point solvers form dense Newton systems of size ~ (N(N+1)/2)^2 for an
# N x N PSD cone: fine for small cones, minutes at N = 128 on 2 cores.
_CLARABEL_MAX_CONE = 40
_MAX_SDP_SOLVES = 8
_BISECTION_RTOL = 1e-2
_BACKOFFS = (1e-9, 1e-7, 1e-5, 1e-3)
_BIG = 1e300
# Largest condition number allowed for P in the SDP tiers (gain sqrt(cond P) <= 100).
KAPPA_MAX = 1e4
# The SDP only needs some margin t > 0; capping t turns it into a feasibility problem,
# which first-order solvers finish far faster than the true maximization.
_SLACK_CAP = 1e-4


_SOLVER_ERRORS = (np.linalg.LinAlgError, scipy.linalg.LinAlgError, ArithmeticError)


def is_numerical_failure(error: BaseException) -> bool:
    """Whether ``error`` is a solver or linear-algebra failure (reported as "not certified").

    Includes the ``PanicException`` a Rust solver (Clarabel, via pyo3) raises on a panic:
    it derives from BaseException and is not importable under a stable name, so it is
    matched by class name. KeyboardInterrupt, SystemExit and every other error propagate.
    """
    cvxpy = sys.modules.get("cvxpy")  # imported only by the SDP tiers (_SdpProblem)
    solver_error = () if cvxpy is None else (cvxpy.error.SolverError,)
    return isinstance(error, _SOLVER_ERRORS + solver_error) or type(error).__name__ == "PanicException"


@dataclass(frozen=True)
class Candidate:
    """A verified (P, Lambda) with the rate parameter r it was verified at."""

    P: np.ndarray
    lam: np.ndarray
    r: float
    verification: Verification


@dataclass(frozen=True)
class TierOutcome:
    """What one tier found and what it cost; ``work`` counts its inner steps (tier-specific names)."""

    tier: str
    candidate: Candidate | None
    seconds: float
    solves: int
    solver: str | None
    reason: str
    budget_exhausted: bool
    work: dict[str, int] = field(default_factory=dict)


def sampled_slopes(n: int, slope: float, samples: int = 6, seed: int = 0) -> list[np.ndarray]:
    """Diagonals D = 0, D = L I and ``samples`` random D with entries uniform in [0, L]."""
    rng = np.random.default_rng(seed)
    return [np.zeros(n), np.full(n, slope)] + [rng.uniform(0.0, slope, n) for _ in range(samples)]


def jacobian_goodness(system: LureSystem, family: str, d: np.ndarray) -> float:
    """Goodness bound from the frozen Jacobian J = A + D W (stages share D).

    Any certificate with rate r also certifies the linear increment dynamics with
    J, hence ct: a <= -alpha(J); discrete: rho^2 >= spectral_radius(R(eps J))^2.
    nan when the step matrix overflows float64.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        J = system.A + d[:, None] * system.W
        if family == "ct":
            return -spectral_abscissa(J)
        if family == "map":
            return float(-np.float64(spectral_radius(d[:, None] * system.W)) ** 2)
        if system.eps is None:
            raise InputError(f"the {family} family needs a step eps; the system runs {system.method!r} without one")
        return float(-np.float64(spectral_radius(step_matrix(family, system.eps, J))) ** 2)


def jacobian_error_bound(system: LureSystem, family: str) -> float:
    """Round-off bound on the spectral quantity behind :func:`jacobian_goodness`, for every D in [0, L].

    ct: alpha(A + D W), with ||A + D W||_2 <= K = ||A||_2 + L ||W||_2; map: the spectral
    radius of D W, of norm <= L ||W||_2; Runge-Kutta: the spectral radius of
    R(eps J) = sum_k c_k (eps J)^k, formed from terms of norm <= |c_k| (eps K)^k.
    :func:`~.spectra.roundoff_bound` of that size (a backward-error bound: the
    eigenvalues of a non-normal J may err more, so conclusions from it are diagnostics).
    """
    n, L = system.n, system.slope
    with np.errstate(over="ignore", invalid="ignore"):
        if family == "map":
            return roundoff_bound(n, L * norm2(system.W))
        K = norm2(system.A) + L * norm2(system.W)
        if family == "ct":
            return roundoff_bound(n, K)
        x = np.float64(system.eps) * np.float64(K)
        return roundoff_bound(n, sum(abs(c) * x**k for k, c in enumerate(STABILITY_POLYNOMIALS[family])))


def optimize_multipliers(
    form: IncrementalForm,
    P: np.ndarray,
    lam0: np.ndarray,
    deadline: float,
    taus: tuple[float, ...] = (1e-2, 1e-3, 1e-4),
    maxiter: int = 60,
) -> np.ndarray:
    """Minimize lambda_max(S(Lambda), P) over Lambda > 0 for fixed P, from ``lam0``.

    The soft-max tau log sum exp(mu_i / tau) of the generalized eigenvalues mu_i is
    minimized in theta = log Lambda; d mu_i / d Lambda_{s,k} = 2 p_{s,k} (L q_{s,k} - p_{s,k})
    evaluated at xi_i = (v_i, K v_i) (envelope theorem). Returns the multipliers
    with the smallest true lambda_max seen.
    """
    n, m, L = form.n, form.stages, form.slope
    identity_P = np.array_equal(P, np.eye(n))

    def eig(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.linalg.eigh(S) if identity_P else scipy.linalg.eigh(S, P)

    def objective(theta: np.ndarray, tau: float) -> tuple[float, np.ndarray]:
        lam = np.exp(theta).reshape(m, n)
        parts = form.schur(P, lam)
        if parts is None:
            return _BIG, np.zeros_like(theta)
        S, K = parts
        mu, V = eig(S)
        top = mu[-1]
        weights = np.exp((mu - top) / tau)
        total = weights.sum()
        weights /= total
        xi = np.vstack([V, K @ V])
        grad = np.empty((m, n))
        for s, G in enumerate(form.q_maps):
            p = xi[n * (s + 1) : n * (s + 2)]
            grad[s] = 2.0 * ((p * (L * (G @ xi) - p)) @ weights)
        return float(top + tau * np.log(total)), (grad * lam).ravel()

    def true_top(theta: np.ndarray) -> float:
        parts = form.schur(P, np.exp(theta).reshape(m, n))
        return _BIG if parts is None else float(eig(parts[0])[0][-1])

    theta = np.log(np.asarray(lam0, dtype=np.float64).reshape(-1))
    best_theta, best_value = theta, true_top(theta)
    if best_value >= _BIG:
        return np.asarray(lam0, dtype=np.float64).reshape(m, n)
    for tau_rel in taus:
        if time.monotonic() >= deadline:
            break
        tau = tau_rel * max(abs(best_value), form.scale)
        result = scipy.optimize.minimize(
            objective,
            best_theta,
            args=(tau,),
            jac=True,
            method="L-BFGS-B",
            bounds=[(t - 40.0, t + 40.0) for t in best_theta],
            options={"maxiter": maxiter},
        )
        value = true_top(result.x)
        if value < best_value:
            best_theta, best_value = result.x, value
    return np.exp(best_theta).reshape(m, n)


def scalar_multipliers(form: IncrementalForm, P: np.ndarray) -> np.ndarray:
    """Best common multiplier Lambda = c I (all stages) by a log-scale grid and Brent refinement."""
    n, m = form.n, form.stages
    W = form.q_maps[0][:, :n]
    c0 = 1.0 / max(form.slope * float(np.linalg.norm(W, 2)), 1e-12 * form.scale, 1e-300)

    def value(t: float) -> float:
        best = form.best_rate(P, np.full((m, n), np.exp(t)))
        return _BIG if best is None else -form.goodness(best)

    grid = np.log(c0) + np.linspace(-20.0, 20.0, 41)
    values = np.array([value(t) for t in grid])
    k = int(np.argmin(values))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    result = scipy.optimize.minimize_scalar(value, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    t_best = result.x if result.fun < values[k] else grid[k]
    return np.full((m, n), np.exp(t_best))


def finalize(form: IncrementalForm, P: np.ndarray, lam: np.ndarray) -> tuple[Candidate | None, str]:
    """Closed-form best rate for fixed (P, Lambda), backed off and verified in float64."""
    P = 0.5 * (np.asarray(P, dtype=np.float64) + np.asarray(P, dtype=np.float64).T)
    lam = np.maximum(np.asarray(lam, dtype=np.float64).reshape(form.stages, form.n), 0.0)
    if not (np.all(np.isfinite(P)) and np.all(np.isfinite(lam))):
        return None, "non-finite candidate"
    best = form.best_rate(P, lam)
    if best is None:
        return None, "multiplier block of the LMI is not negative definite"
    g_best = form.goodness(best)
    reason = "no rate better than the stability threshold"
    for backoff in _BACKOFFS:
        g = g_best - backoff * max(form.scale, abs(g_best))
        if g <= form.weakest:
            break
        verification = verify(form, P, lam, form.from_goodness(g))
        if verification.passed:
            return Candidate(P, lam, form.from_goodness(g), verification), "verified"
        reason = verification.reason
    return None, reason


def fixed_identity_tier(form: IncrementalForm, deadline: float) -> TierOutcome:
    """Tier ``P=I``: optimize the multipliers only (no SDP)."""
    start = time.monotonic()
    P = np.eye(form.n)
    lam = scalar_multipliers(form, P)
    lam = optimize_multipliers(form, P, lam, deadline)
    candidate, reason = finalize(form, P, lam)
    return TierOutcome("P=I", candidate, time.monotonic() - start, 0, None, reason, time.monotonic() >= deadline)


class _SdpProblem:
    """cvxpy model of one tier; the rate is a parameter so bisection steps reuse the compilation.

    Always feasible: maximize t <= _SLACK_CAP * scale s.t. M(P, Lambda, r) <= -t I,
    I <= P <= KAPPA_MAX I, Lambda >= 0; the trial rate is achievable iff t > 0. Built from n x n blocks
    so the problem data stays sparse.
    """

    def __init__(self, form: IncrementalForm, structure: str) -> None:
        import cvxpy as cp

        n, m, L = form.n, form.stages, form.slope
        self.form = form
        self.rate = cp.Parameter()
        self.t = cp.Variable()
        P: cp.Expression
        if structure == "full-P":
            self.P = cp.Variable((n, n), symmetric=True)
            P = self.P
            constraints = [P >> np.eye(n), KAPPA_MAX * np.eye(n) - P >> 0]
        else:
            self.P = cp.Variable(n)
            P = cp.diag(self.P)
            constraints = [self.P >= 1.0, self.P <= KAPPA_MAX]
        self.lams = [cp.Variable(n, nonneg=True) for _ in range(m)]
        blocks: list[list[Any]] = [[None] * (m + 1) for _ in range(m + 1)]

        def add(i: int, j: int, expr: Any) -> None:
            blocks[i][j] = expr if blocks[i][j] is None else blocks[i][j] + expr

        def column(X: np.ndarray, j: int) -> np.ndarray:
            return X[:, n * j : n * (j + 1)]

        for s, (lam, G) in enumerate(zip(self.lams, form.q_maps)):
            for j in range(m + 1):
                if np.any(column(G, j)):
                    term = L * (cp.diag(lam) @ column(G, j))
                    add(s + 1, j, term)
                    add(j, s + 1, term.T)
            add(s + 1, s + 1, -2.0 * cp.diag(lam))
        identity = np.eye(n)
        if form.continuous:
            for j in range(m + 1):
                if np.any(column(form.out, j)):
                    term = P @ column(form.out, j)
                    add(0, j, term)
                    add(j, 0, term.T)
            add(0, 0, 2.0 * self.rate * P)
            for i in range(m + 1):
                add(i, i, self.t * identity)
            lmi = -cp.bmat([[b if b is not None else np.zeros((n, n)) for b in row] for row in blocks])
        else:
            add(0, 0, -self.rate * P)
            for i in range(m + 1):
                add(i, i, self.t * identity)
            PC = [P @ column(form.out, j) for j in range(m + 1)]
            rows = [[-b if b is not None else np.zeros((n, n)) for b in row] + [PC[i].T] for i, row in enumerate(blocks)]
            lmi = cp.bmat(rows + [PC + [P]])
        constraints.append(lmi >> 0)
        constraints.append(self.t <= _SLACK_CAP * form.scale)
        self.problem = cp.Problem(cp.Maximize(self.t), constraints)
        self.cone = form.N + (0 if form.continuous else n)

    def solve(self, r: float, solver: str, time_limit: float) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
        """One feasibility solve at rate parameter r; ``time_limit`` may be inf (no limit passed)."""
        import cvxpy as cp

        self.rate.value = r
        failure = run_solver(self.problem, solver, time_limit, scs_eps=1e-5, scs_iterations=2500)
        if failure is not None:
            return None, f"{solver} {failure}"
        status = self.problem.status
        if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or self.P.value is None:
            return None, f"{solver}: {status}"
        if self.t.value is None or self.t.value <= 0:
            return None, f"{solver}: infeasible at this rate (t = {self.t.value:.3e})"
        P_value = np.asarray(self.P.value, dtype=np.float64)
        P_value = P_value if P_value.ndim == 2 else np.diag(P_value)
        lam = np.vstack([np.asarray(l.value, dtype=np.float64) for l in self.lams])
        return (P_value, lam), status


def run_solver(problem: Any, solver: str, time_limit: float, *, scs_eps: float, scs_iterations: int) -> str | None:
    """Solve the cvxpy ``problem`` with ``solver`` (CLARABEL or SCS) within ``time_limit`` seconds
    (inf: none); None when the solver ran, else ``error: TYPE: message`` for a numerical failure
    (any other exception is raised)."""
    options: dict[str, Any]
    if solver == "CLARABEL":
        options = {} if not np.isfinite(time_limit) else {"time_limit": max(time_limit, 1.0)}
    else:
        options = {"eps_abs": scs_eps, "eps_rel": scs_eps, "max_iters": scs_iterations}
        if np.isfinite(time_limit):
            options["time_limit_secs"] = max(time_limit, 1.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            problem.solve(solver=solver, **options)
    except BaseException as error:
        if not (is_numerical_failure(error) or isinstance(error, ValueError)):
            raise
        return f"error: {type(error).__name__}: {error}"
    return None


def sdp_tier(form: IncrementalForm, tier: str, g_upper: float, deadline: float, solver: str = "auto") -> TierOutcome:
    """Tier ``diag-P`` or ``full-P``: bisection on the rate, SDP feasibility per step, verified candidates."""
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    start = time.monotonic()
    model = _SdpProblem(form, tier)
    order = ["CLARABEL", "SCS"] if model.cone <= _CLARABEL_MAX_CONE else ["SCS", "CLARABEL"]
    if solver != "auto":
        order = [solver] + [s for s in ("CLARABEL", "SCS") if s != solver]
    best: Candidate | None = None
    g_lo, g_hi = form.weakest, g_upper
    trial = form.weakest
    solves, used, reason = 0, None, "no solve attempted"
    exhausted = False
    fallbacks: list[str] = []
    while solves < _MAX_SDP_SOLVES:
        if time.monotonic() >= deadline:
            exhausted = True
            break
        found = None
        errors = []
        for name in order:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                exhausted = True
                break
            found, status = model.solve(form.from_goodness(trial), name, remaining)
            solves += 1
            used = name
            if found is not None or "error" not in status:
                break
            errors.append(status)
        if errors and len(errors) < len(order) and not exhausted:
            fallbacks.append(f"{errors[0]}; fell back to {used}")
        if exhausted:
            break
        improved = False
        if found is not None:
            P, lam = found
            results = [finalize(form, P, lam)]
            refined = optimize_multipliers(form, 0.5 * (P + P.T), np.maximum(lam, 1e-12 * max(lam.max(), 1e-300)), deadline, taus=(1e-3,), maxiter=40)
            results.append(finalize(form, P, refined))
            for candidate, why in results:
                reason = why
                if candidate is not None and (best is None or form.goodness(candidate.r) > form.goodness(best.r)):
                    best = candidate
            improved = best is not None and form.goodness(best.r) >= trial - _BISECTION_RTOL * (g_hi - form.weakest)
        else:
            reason = status
        if best is not None:
            g_lo = form.goodness(best.r)
            reason = "verified"
        if not improved:
            g_hi = min(g_hi, trial)
        if best is None or g_hi - g_lo <= _BISECTION_RTOL * max(g_hi - form.weakest, 1e-12 * form.scale):
            break
        trial = 0.5 * (g_lo + g_hi)
    if fallbacks:
        reason += f" ({len(fallbacks)} solver failure(s), first: {fallbacks[0]})"
    return TierOutcome(tier, best, time.monotonic() - start, solves, used, reason, exhausted)
