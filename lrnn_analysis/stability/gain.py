"""Certified incremental l2-gain (a Lipschitz bound) of the whole sequence map x -> y of a Lur'e model.

The model runs h_t = step(h_{t-1}, u_t), u_t = U x_t + b, from h_0 = 0 for t = 1..T and reads
out y = D h_T (+ c). Two input sequences x, x~ give increments delta_t = h_t - h~_t (delta_0 = 0),
dx_t = x_t - x~_t and dy = D delta_T. Within one substep the lifted increment
xi = (delta, p_1, ..., p_m) of :mod:`.forms` obeys delta+ = C xi, and the input, held over the
step, enters every stage's pre-activation: q_s = G_s xi + U dx, with the sector condition
p_s,i (L q_s,i - p_s,i) >= 0.

Certificate. A matrix P > 0, diagonal multipliers Lambda_s >= 0, r = rho^2 > 0 and mu >= 0 with

    M_mu = [[M(P, Lambda, r), B(Lambda)], [B(Lambda)^T, -mu I_d]] <= 0,                 (*)

where M(P, Lambda, r) = C^T P C - r E0^T P E0 + Sigma(Lambda) is the discrete matrix of
:mod:`.forms` and B(Lambda) (N x d) holds L Lambda_s U in the rows of p_s (zero in those of
delta). For chi = (xi, dx), chi^T M_mu chi = V(delta+) - r V(delta) - mu ||dx||^2 +
sum_s 2 p_s^T Lambda_s (L q_s - p_s) with V(delta) = delta^T P delta, so (*) gives

    V(delta+) - rho^2 V(delta) <= mu ||dx_t||^2       for all inputs and all slopes in [0, L].

For Euler, with Ah = I + eps A, (*) is exactly
[[Ah^T P Ah - rho^2 P, eps Ah^T P + L W^T Lambda, 0], [eps P Ah + L Lambda W, eps^2 P - 2 Lambda,
L Lambda U], [0, L U^T Lambda, -mu I]]; RK2 has C = [I + eps A + eps^2 A^2 / 2, (eps^2 / 2) A, eps I],
q_1 = W delta + U dx, q_2 = W (delta + (eps / 2)(A delta + p_1)) + U dx, and so on for RK4 and the 3/8
rule; ``map`` has C = [0, I] and q_1 = W delta + U dx.

Bound. With s substeps per input step the inequality chains to V(delta_t) <= rho^(2s) V(delta_{t-1})
+ mu_step ||dx_t||^2, mu_step = mu (1 + rho^2 + ... + rho^(2(s - 1))), hence from delta_0 = 0

    V(delta_T) <= mu_step max(1, rho^(2s(T - 1))) ||dx||^2,   ||dx||^2 = sum_t ||dx_t||^2

(the factor is 1 for rho <= 1). With c P >= D^T D, i.e. c >= ||D P^(-1/2)||^2, ||dy||^2 <= c V(delta_T):

    ||dy|| <= sqrt(c mu_step max(1, rho^(2s(T - 1)))) ||dx||       (``lipschitz``).

The logit margin y_i - y_j moves by at most the same with c_ij >= ||(e_i - e_j)^T D P^(-1/2)||^2
(``pair_bounds``); a prediction i is certified at radius r_x when its margin over every other
class j exceeds pair_bounds[i, j] * r_x (:func:`certified_radii`). D must be the readout in the
coordinates of the Lur'e form: where a model's form lives in zeta = T^-1 h (the contracting
model's ``lure_rewrite``) it is D T (:func:`sequence_map`).

Tiers, fastest first; each one's candidates (P, Lambda, r) go through the same verification,
the best verified bound is kept and the next tier starts from it. Without a fixed ``rho``, r is
searched on [1, inf): rho < 1 never helps (mu only grows as r shrinks, while the horizon factor is
1 for every rho <= 1); rho > 1 trades a smaller mu for the factor rho^(2s(T - 1)).

* ``closed-form``: for fixed (P, Lambda, r) with M = M(P, Lambda, r) < 0, the Schur complement of
  -mu I shows (*) holds iff mu >= lambda_max(B^T (-M)^-1 B), the smallest mu in closed form
  (O(N^3)). It is convex in Lambda (the set of (Lambda, mu) satisfying (*) is convex), so Lambda is
  optimized by L-BFGS in log Lambda with gradient d mu / d Lambda_s,k = 2 p_s,k (L q_s,k - p_s,k)
  at chi = ((-M)^-1 B v, v), v the top eigenvector (envelope theorem; a soft maximum of the
  eigenvalues when d > 1), at rates whose horizon factors are 1, 1.1, ..., 20 above the smallest
  rate P admits. Starting points: P = I, the P of a contraction certificate if one is given, and,
  when these find no bound at r = 1, the P that the contraction certificates' Riccati tier
  (:mod:`.riccati`) finds for the form with C / sqrt(s) (whose certificates at r' < 1 are this
  form's at s r'), s = rho^2 or, searched, max(1, r_J) times 1, 1.01, 1.1, 2 with r_J the
  largest squared spectral radius of the frozen-Jacobian step matrices.
* ``riccati``: for fixed (Lambda, r, mu), (*) is a bounded-real-lemma Riccati inequality in P.
  With xi = (delta, w), w = (p, dx), write delta+ = F0 delta + G w (G = [C_p, 0]), the supply
  2 delta^T S~ w - w^T R~ w (S~ = [S, 0], R~ = [[R, -B_p], [-B_p^T, mu I]], S and R the blocks of
  Sigma(Lambda), B_p the p-rows of B). Two Schur complements turn (*) (with R~ > 0 and
  r P > Z_S = S~ R~^-1 S~^T) into an inequality in Y = P^-1:

      Fv Y Fv^T - Y + Fv Y Uv (I - Uv^T Y Uv)^-1 Uv^T Y Fv^T + Z_G <= 0,   I - Uv^T Y Uv > 0,

  Fv = (F0 + G R~^-1 S~^T) / rho, Uv Uv^T = Z_S / r, Z_G = G R~^-1 G^T (Woodbury on
  (r P - Z_S)^-1). Its stabilizing solution (slack eta I added to Z_G) is the smallest Y, i.e.
  the largest P, hence the smallest c(P) = lambda_max(D Y D^T) for this (Lambda, r, mu): the best
  readout factor is exact for fixed (Lambda, mu). The logarithm of the squared bound,
  log mu_step + log c(Y) + s (T - 1) log max(1, r), is then minimized over (Lambda, mu and, when
  searched, r) by L-BFGS with gradients by the adjoint method (:class:`_DualRiccati`), each point
  solved by Newton's method from the last solution (scipy's Schur method otherwise). It starts from
  the best candidate so far, or from a phase-one point (Lambda = 1, r and then mu raised until the
  equation is solvable), and also, when r is searched, from the best candidate at r = 1 (the bound
  need not be unimodal in r). A local method: the SDP tier is the reference where it is affordable.
* ``sdp``: cvxpy (Clarabel for small cones, SCS for large ones, each falling back to the other)
  minimizes mu subject to (*) with margin, P >= D^T D + delta I (the LMI is homogeneous in
  (P, Lambda, mu): this fixes the scale) at the r of the best bound so far (r = 1 if none), within
  the time budget. Its answer is repaired, never trusted: mu is replaced by the smallest mu for its
  (P, Lambda), and the Riccati P at its (Lambda, mu) is tried as well; what verifies is offered. A
  solver that reports the problem infeasible at r = 1 is reported as "no bound of this family with
  rho <= 1 exists (solver: status, time)", distinct from a budget running out. At n = 64 it does not
  finish in seconds (SCS: minutes).

Verification (float64, as :mod:`.verification` does for contraction; ``verify_gain``). P is
scaled by a power of two to lambda_max(P) in [1/2, 2) (exact), mu and c alike, then:
P exactly symmetric, lambda_min(P) > 1e-9 lambda_max(P); multipliers finite and >= 0;
lambda_max(M_mu) + tol < 0 with tol bounding the error of forming M_mu and of the eigensolver
(:meth:`IncrementalForm.assemble` and the input blocks); lambda_min(c P - D^T D) - tol_c > 0 and
likewise for every pair factor. Candidates are backed off (mu, c, c_ij times 1 + 1e-9, 1e-7, ...)
until they verify, else rejected. The bound is then rounded up.

The pair factors (k (k - 1) / 2 eigenvalue problems of size n, seconds for a vocabulary of ~100
at n = 128) are formed once, for the best candidate the tiers verified (the next best where
they do not verify): all at their first back-off and verified together, and pair by pair only
where that fails. Their estimated time is kept out of the tiers' share of ``time_budget``. The
pair checks stack their matrices c_ij P - d_ij d_ij^T in chunks, each chunk's eigenvalue problems
in one LAPACK call (15 times faster than one call per pair at n = 4, the same at n = 128:
``python bench/gain.py --pairs 4 400``); a pair whose matrix overflows fails.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import scipy.linalg
import scipy.optimize
from threadpoolctl import threadpool_limits

from ..errors import InputError
from ..lure import LureSystem
from . import lmi
from .forms import IncrementalForm, incremental_form
from .lmi import _CLARABEL_MAX_CONE, SOLVERS, is_numerical_failure, run_solver
from .riccati import lbfgs_minimize, riccati_tier
from .spectra import UNDERFLOW_FLOOR, UNIT_ROUNDOFF
from .verification import P_RELATIVE_EIG_FLOOR

__all__ = [
    "GAIN_TIERS",
    "GainAttempt",
    "GainCertificate",
    "GainForm",
    "GainVerification",
    "certificate_at",
    "certificate_from_evidence",
    "certified_radii",
    "certify_gain",
    "explicit_gain_form",
    "gain_form",
    "sequence_map",
    "verify_gain",
]

GAIN_TIERS = ("closed-form", "riccati", "sdp")
_BACKOFFS = (1e-9, 1e-7, 1e-5, 1e-3, 1e-1)
_Number = TypeVar("_Number", float, np.ndarray)
# The pair checks stack c_ij P - d_ij d_ij^T in chunks of about this many float64 numbers (32 MiB).
_PAIR_CHUNK_ENTRIES = 2**22
_BIG = 1e300
# Slack eta of the dual Riccati equation, relative to ||Z_G||_2: it makes the P found satisfy (*)
# strictly, which verification needs; the cost in c is of its size. Where the P found does not
# verify, eta is raised tenfold (and mu slightly) up to _ETA_RAISES times (_riccati_candidate).
_ETA_RELATIVE = 1e-7
_ETA_RAISES = 4
# The descent (riccati.lbfgs_minimize): steps per soft-max level, memory, backtracking.
_DESCENT_STEPS = 40
_MEMORY = 8
_BACKTRACKS = 16
_MAX_STEP = 2.0
_NEWTON_STEPS = 8
# Newton stops at ||Ric(Y)||_F <= this times eta: Y then satisfies the inequality with slack about eta,
# and the objective is accurate enough for the line search (its changes are far below eta near the optimum).
_NEWTON_RTOL = 1e-3
# (soft-max width tau, barrier weight beta) of the Riccati tier's levels; the last drops the barrier.
_CONTINUATION = ((1e-2, 1e-2), (1e-3, 1e-3), (1e-4, 1e-4), (1e-4, 0.0))
# The SDP's margin and normalization, relative to ||D||_2^2 (the scale P >= D^T D sets).
_SDP_MARGIN = 1e-7
_SDP_FLOOR = 1e-6


@dataclass(frozen=True, eq=False)
class GainForm:
    """The data of (*): the system, the lifted form of its scheme, the input map U (n x d), the
    readout D (k x n, in the coordinates of the form) and the substeps per input step. ``system``
    is None for a form built from explicit matrices (:func:`explicit_gain_form`), which only
    :func:`certificate_at` and :func:`certificate_from_evidence` take (the search tiers need a system)."""

    system: LureSystem | None
    form: IncrementalForm
    U: np.ndarray
    D: np.ndarray
    substeps: int

    @property
    def n(self) -> int:
        return self.form.n

    @property
    def family(self) -> str:
        """The scheme: the system's method, or the explicit form's family."""
        return self.form.family if self.system is None else self.system.method

    @property
    def lure_system(self) -> LureSystem:
        """The system the search tiers work on; ``ValueError`` for an explicit form, which has none."""
        if self.system is None:
            raise ValueError("an explicit gain form has no Lur'e system to search on")
        return self.system

    @property
    def d(self) -> int:
        return self.U.shape[1]

    def coupling(self, lam: np.ndarray) -> np.ndarray:
        """B(Lambda), N x d: L Lambda_s U in the rows of p_s."""
        n, L = self.form.n, self.form.slope
        B = np.zeros((self.form.N, self.d))
        for s in range(self.form.stages):
            B[n * (s + 1):n * (s + 2)] = L * (lam[s][:, None] * self.U)
        return B

    def assemble(self, P: np.ndarray, lam: np.ndarray, r: float, mu: float) -> tuple[np.ndarray, float]:
        """M_mu of (*) and a bound on its floating-point error (forming it and the eigensolver).

        Adds to :meth:`IncrementalForm.assemble`'s bound the rounding of the input blocks
        (two products per entry: 2 u L max|Lambda_s| ||U||_F per stage) and the eigensolver's
        backward error on the larger matrix, in the same 8 (size + n + 8) u style.
        """
        n, N, d, L = self.form.n, self.form.N, self.d, self.form.slope
        lam = np.asarray(lam, dtype=np.float64).reshape(self.form.stages, n)
        M, tolerance = self.form.assemble(P, lam, r)
        B = self.coupling(lam)
        full = np.zeros((N + d, N + d))
        full[:N, :N] = M
        full[:N, N:] = B
        full[N:, :N] = B.T
        full[N:, N:] = -mu * np.eye(d)
        coupling = 2.0 * L * float(np.abs(lam).max(axis=1).sum()) * float(np.linalg.norm(self.U))
        extra = 8.0 * (N + d + n + 8) * (UNIT_ROUNDOFF * (coupling + np.linalg.norm(full)) + (N + d) * UNDERFLOW_FLOOR)
        return full, float(tolerance + extra)

    def input_schur(self, P: np.ndarray, lam: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray] | None:
        """(S, Z) with Z = (-M)^-1 B and S = B^T Z (d x d), M = M(P, Lambda, r); None unless M < 0."""
        with np.errstate(all="ignore"):
            M, _ = self.form.assemble(P, lam, r)
            B = self.coupling(lam)
        if not (np.all(np.isfinite(M)) and np.all(np.isfinite(B))):
            return None
        try:
            chol = np.linalg.cholesky(-M)
        except np.linalg.LinAlgError:
            return None
        Z = scipy.linalg.cho_solve((chol, True), B)
        S = B.T @ Z
        return 0.5 * (S + S.T), Z

    def smallest_mu(self, P: np.ndarray, lam: np.ndarray, r: float) -> float | None:
        """The smallest mu satisfying (*) for fixed (P, Lambda, r): lambda_max(B^T (-M)^-1 B); None unless M < 0."""
        parts = self.input_schur(P, lam, r)
        if parts is None:
            return None
        return max(float(np.linalg.eigvalsh(parts[0])[-1]), 0.0)

    def readout_gram(self, P: np.ndarray) -> np.ndarray | None:
        """D P^-1 D^T (k x k), or None unless P > 0 (Cholesky)."""
        try:
            chol = np.linalg.cholesky(P)
        except np.linalg.LinAlgError:
            return None
        X = scipy.linalg.solve_triangular(chol, self.D.T, lower=True)
        G = X.T @ X
        return 0.5 * (G + G.T)

    def horizon_factors(self, r: float, horizon: int) -> tuple[float, float]:
        """(sum_{i < s} r^i, max(1, r^(s (T - 1)))): mu_step / mu and the horizon factor, in float64."""
        s = self.substeps
        per_step = float(sum(r**i for i in range(s)))
        with np.errstate(over="ignore"):
            growth = max(1.0, float(np.float64(r) ** (s * (horizon - 1))))
        return per_step, growth


def _pair_exact(P: np.ndarray, D: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
    """c_ij = d_ij^T P^-1 d_ij = ||L^-1 d_ij||^2 (P = L L^T) for the pairs (rows[m], cols[m]), or None
    unless P > 0. Formed from d_ij itself, not as G_ii + G_jj - 2 G_ij of G = D P^-1 D^T: that
    difference cancels catastrophically for nearly equal rows of D, leaving c_ij with an error far
    above its back-offs."""
    try:
        chol = np.linalg.cholesky(P)
    except np.linalg.LinAlgError:
        return None
    exact = np.empty(len(rows))
    for part in _pair_chunks(len(rows), D.shape[1]):
        X = scipy.linalg.solve_triangular(chol, (D[rows[part]] - D[cols[part]]).T, lower=True)
        exact[part] = np.einsum("ij,ij->j", X, X)
    return exact


def gain_form(system: LureSystem, U: Any, D: Any) -> GainForm:
    """The form (*) of the scheme ``system`` runs, with input map U (n x d) and readout D (k x n).

    Raises :class:`InputError` for a continuous-time system (it has no sequence map), shapes
    that do not fit the system, or non-finite entries. (A scheme whose lifted form overflows
    float64 is valid input: :func:`certify_gain` reports it as not certified.)
    """
    if not isinstance(system, LureSystem):
        raise InputError(f"system must be a LureSystem, got {type(system).__name__}")
    if system.method == "ode":
        raise InputError("system runs method 'ode': the gain of a sequence map needs a discrete scheme "
                         "(euler, rk2, rk4, rk38 or map)")
    n = system.n
    U = _as_matrix(U, "U")
    D = _as_matrix(D, "D")
    if U.shape[0] != n:
        raise InputError(f"U must have {n} rows (the state size), got shape {U.shape}")
    if D.shape[1] != n:
        raise InputError(f"D must have {n} columns (the state size), got shape {D.shape}")
    form = incremental_form(system, system.method)
    return GainForm(system, form, U, D, system.substeps if system.method != "map" else 1)


def explicit_gain_form(A: Any, B: Any, K: Any, U: Any, D: Any) -> GainForm:
    """The form (*) of h+ = A h + B w, w = sigma(K h + U x_t + b) (sigma in the sector [0, 1]), y = D h_T:
    one ``map`` stage with delta+ = [A, B] xi and q = [K, 0] xi + U dx. All matrices in float64."""
    mats = [_as_matrix(M, name) for M, name in ((A, "A"), (B, "B"), (K, "K"))]
    n = mats[0].shape[0]
    if any(M.shape != (n, n) for M in mats):
        raise InputError(f"A, B, K must all be {n} x {n}, got {[M.shape for M in mats]}")
    U = _as_matrix(U, "U")
    D = _as_matrix(D, "D")
    if U.shape[0] != n or D.shape[1] != n:
        raise InputError(f"U must have {n} rows and D {n} columns, got shapes {U.shape} and {D.shape}")
    form = IncrementalForm("map", n, 1.0, None, np.hstack(mats[:2]), (np.hstack([mats[2], np.zeros((n, n))]),))
    return GainForm(None, form, U, D, 1)


def _as_matrix(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise InputError(f"{name} must be a matrix of numbers: {error}") from None
    if array.ndim != 2 or 0 in array.shape:
        raise InputError(f"{name} must be a non-empty matrix, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} has non-finite entries")
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class GainVerification:
    """Outcome of :func:`verify_gain`, in the units of the evidence as given.

    ``margin`` = -(lambda_max(M_mu) + tolerance) for (*); ``output_margin`` and ``pair_margin``
    (the smallest over the pairs; None without pairs) = lambda_min(c P - d d^T) - tolerance.
    All three are > 0 when ``passed``.
    """

    passed: bool
    reason: str
    r: float
    mu: float
    lmi_max_eig: float
    tolerance: float
    margin: float
    p_min_eig: float
    p_max_eig: float
    multiplier_min: float
    output_factor: float
    output_margin: float
    pair_margin: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "r": self.r,
            "mu": self.mu,
            "lmi_max_eig": self.lmi_max_eig,
            "tolerance": self.tolerance,
            "margin": self.margin,
            "p_min_eig": self.p_min_eig,
            "p_max_eig": self.p_max_eig,
            "multiplier_min": self.multiplier_min,
            "output_factor": self.output_factor,
            "output_margin": self.output_margin,
            "pair_margin": self.pair_margin,
        }


def _lmi_margin(gform: GainForm, P: np.ndarray, lam: np.ndarray, r: float, mu: float) -> tuple[float, float, float]:
    """(lambda_max(M_mu), tolerance, margin = -(lambda_max + tolerance)); nan where M_mu overflows."""
    with np.errstate(over="ignore", invalid="ignore"):
        M, tolerance = gform.assemble(P, lam, r, mu)
    if not (np.all(np.isfinite(M)) and np.isfinite(tolerance)):
        nan = float("nan")
        return nan, nan, nan
    top = float(np.linalg.eigvalsh(M)[-1])
    return top, tolerance, -(top + tolerance)


def _readout_matrix(P: np.ndarray, c: float, V: np.ndarray) -> tuple[np.ndarray | None, float]:
    """(c P - V V^T as computed, a bound on the error of forming it and of the eigensolver; None and
    nan where it overflows): V V^T has k products per entry (gamma_k ||V||_F^2), c P one rounding
    (u c ||P||_F)."""
    with np.errstate(over="ignore", invalid="ignore"):
        K = c * P - V @ V.T
    if not np.all(np.isfinite(K)):
        return None, float("nan")
    n, k = V.shape
    return K, float(_readout_tolerance(n, k, c * np.linalg.norm(P) + np.linalg.norm(V) ** 2 + np.linalg.norm(K)))


def _readout_tolerance(n: int, k: int, magnitude: Any) -> Any:
    """The bound of :func:`_readout_matrix` for c P - V V^T (V with k columns) whose magnitude
    c ||P||_F + ||V||_F^2 + ||K||_F is ``magnitude`` (elementwise for an array of them)."""
    return 8.0 * (n + k + 8) * (UNIT_ROUNDOFF * magnitude + n * UNDERFLOW_FLOOR)


def _readout_margin(P: np.ndarray, c: float, V: np.ndarray) -> float:
    """lambda_min(c P - V V^T) - tolerance of :func:`_readout_matrix` (> 0: c P >= V V^T holds in
    exact arithmetic; nan where c P - V V^T overflows).

    eigvalsh reads the lower triangle of K only: each entry there is within the tolerance's bound of
    the exact (symmetric) matrix's, so the symmetric matrix it stands for is too. Not 0.5 (K + K^T):
    K + K^T overflows where K's entries exceed half of float64's range, and LAPACK then raised."""
    K, tolerance = _readout_matrix(P, c, V)
    if K is None:
        return float("nan")
    return float(np.linalg.eigvalsh(K)[0]) - tolerance


def _pair_chunks(count: int, n: int) -> Iterator[slice]:
    """Slices of ``count`` pairs of outputs whose stacked n x n matrices hold about
    ``_PAIR_CHUNK_ENTRIES`` numbers. A pair (i, j) has the vector d_ij = D^T (e_i - e_j) = D[i] - D[j],
    each entry one rounded subtraction (covered by the tolerance of :func:`_rank_one_margins` through
    ||d||^2 at twice its u)."""
    size = max(1, _PAIR_CHUNK_ENTRIES // (n * n))
    for start in range(0, count, size):
        yield slice(start, start + size)


def _rank_one_tolerances(P: np.ndarray, c: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, tolerance) for every row v of V and factor c: K = c P - v v^T as computed (stacked), and the
    bound of :func:`_readout_matrix` (k = 1) on the error of forming it and of the eigensolver, nan
    where K overflows."""
    n = P.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        K = c[:, None, None] * P - V[:, :, None] * V[:, None, :]
        magnitude = c * np.linalg.norm(P) + np.einsum("mi,mi->m", V, V) + np.sqrt(np.einsum("mij,mij->m", K, K))
        tolerance = _readout_tolerance(n, 1, magnitude)
    return K, np.where(np.isfinite(K).all(axis=(1, 2)), tolerance, np.nan)


def _rank_one_margins(P: np.ndarray, c: np.ndarray, V: np.ndarray) -> np.ndarray:
    """lambda_min(c P - v v^T) - tolerance for every row v of V and factor c, as :func:`_readout_margin`
    computes it for one (> 0: c P >= v v^T holds in exact arithmetic; nan where c P - v v^T overflows).
    The eigenvalue problems go to LAPACK in one call, without Python's cost per pair."""
    K, tolerance = _rank_one_tolerances(P, c, V)
    lowest = np.full(len(c), np.nan)
    finite = ~np.isnan(tolerance)
    if finite.any():
        lowest[finite] = np.linalg.eigvalsh(K[finite])[:, 0]
    return lowest - tolerance


def _pair_margins(P: np.ndarray, D: np.ndarray, rows: np.ndarray, cols: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """:func:`_rank_one_margins` of the pairs (rows[m], cols[m]) with their factors, chunk by chunk."""
    margins = np.empty(len(rows))
    for part in _pair_chunks(len(rows), D.shape[1]):
        margins[part] = _rank_one_margins(P, factors[part], D[rows[part]] - D[cols[part]])
    return margins


def _pair_steps(P: np.ndarray, p_min: float, D: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                exact: np.ndarray) -> np.ndarray:
    """The back-off step of every pair factor, as :func:`_readout_step` forms it for one: 2 tol / lambda_min(P)."""
    steps = np.empty(len(rows))
    for part in _pair_chunks(len(rows), D.shape[1]):
        tolerance = _rank_one_tolerances(P, np.maximum(exact[part], UNDERFLOW_FLOOR), D[rows[part]] - D[cols[part]])[1]
        steps[part] = 2.0 * tolerance / p_min
    return steps


def verify_gain(
    gform: GainForm,
    P: np.ndarray,
    multipliers: np.ndarray,
    r: float,
    mu: float,
    output_factor: float,
    pair_factors: np.ndarray | None = None,
) -> GainVerification:
    """Check in float64 that (P, multipliers, r, mu) satisfies (*) strictly, that
    output_factor * P >= D^T D and pair_factors[i, j] * P >= d_ij d_ij^T (d_ij = D^T (e_i - e_j)).

    ``r`` = rho^2 per substep. P is scaled by a power of two (exact) to lambda_max(P) in [1/2, 2)
    first, the multipliers and mu by the same power and the factors by its inverse.
    """
    P = np.asarray(P, dtype=np.float64)
    lam = np.asarray(multipliers, dtype=np.float64)
    nan = float("nan")
    form = gform.form

    def fail(reason: str, p_min: float = nan, p_max: float = nan, lam_min: float = nan) -> GainVerification:
        return GainVerification(False, reason, float(r), float(mu), nan, nan, nan, p_min, p_max, lam_min,
                                float(output_factor), nan, None)

    if P.shape != (form.n, form.n) or lam.size != form.stages * form.n:
        return fail(f"shape mismatch: P {P.shape}, multipliers {lam.shape}")
    k = gform.D.shape[0]
    pairs = None if pair_factors is None else np.asarray(pair_factors, dtype=np.float64)
    if pairs is not None and pairs.shape != (k, k):
        return fail(f"pair factors must have shape {(k, k)}, got {pairs.shape}")
    numbers = [r, mu, output_factor]
    if not (np.all(np.isfinite(P)) and np.all(np.isfinite(lam)) and all(np.isfinite(x) for x in numbers)
            and (pairs is None or np.all(np.isfinite(pairs)))):
        return fail("non-finite entries")
    if not (r > 0 and mu >= 0 and output_factor > 0):
        return fail(f"need r > 0, mu >= 0 and an output factor > 0, got r = {r}, mu = {mu}, c = {output_factor}")
    if not np.array_equal(P, P.T):
        return fail("P is not symmetric")
    lam = lam.reshape(form.stages, form.n)
    eigs = np.linalg.eigvalsh(P)
    p_min, p_max = float(eigs[0]), float(eigs[-1])
    lam_min = float(lam.min())
    if not (p_max > 0 and p_min > P_RELATIVE_EIG_FLOOR * p_max):
        return fail(f"P not positive definite: lambda_min(P) = {p_min:.3e}, lambda_max(P) = {p_max:.3e}",
                    p_min, p_max, lam_min)
    if lam_min < 0:
        return fail(f"negative multiplier {lam_min:.3e}", p_min, p_max, lam_min)
    exponent = math.frexp(p_max)[1]
    with np.errstate(over="ignore"):
        P, lam, mu_s = np.ldexp(P, -exponent), np.ldexp(lam, -exponent), float(np.ldexp(mu, -exponent))
        c_s = float(np.ldexp(output_factor, exponent))
        pairs_s = None if pairs is None else np.ldexp(pairs, exponent)
    if not (np.all(np.isfinite(P)) and math.isfinite(c_s) and np.all(np.isfinite(lam))
            and (pairs_s is None or np.all(np.isfinite(pairs_s)))):
        return fail("the scaled evidence overflows float64", p_min, p_max, lam_min)
    top, tolerance, margin = _lmi_margin(gform, P, lam, r, mu_s)
    output_margin = _readout_margin(P, c_s, gform.D.T)
    pair_margin = None
    if pairs is not None and pairs_s is not None:
        if not np.array_equal(pairs, pairs.T):
            return fail("pair factors are not symmetric", p_min, p_max, lam_min)
        rows, cols = np.triu_indices(k, 1)
        # np.min, not min(): a nan margin (an overflowing pair) must fail, never be passed over.
        pair_margin = float(np.min(_pair_margins(P, gform.D, rows, cols, pairs_s[rows, cols]), initial=math.inf))
    checks = [(margin, "M_mu", f"dissipation LMI violated: lambda_max = {top:.3e} > -tol = {-tolerance:.3e}"),
              (output_margin, "c P - D^T D", "output factor too small: c P - D^T D is not positive semidefinite"),
              (math.inf if pair_margin is None else pair_margin, "c_ij P - d_ij d_ij^T",
               "a pair factor is too small: c_ij P - d_ij d_ij^T is not positive semidefinite")]
    # A margin that is not finite: the matrix or its round-off bound overflowed, which says nothing of its sign.
    reason = next((why if math.isfinite(value) else f"{matrix} or its round-off bound overflows float64: not verified"
                   for value, matrix, why in checks if not value > 0), "verified")
    with np.errstate(over="ignore"):
        scale = float(np.ldexp(1.0, exponent))
    return GainVerification(reason == "verified", reason, float(r), float(mu), top * scale, tolerance * scale,
                            margin * scale, p_min, p_max, lam_min, float(output_factor), output_margin, pair_margin)


@dataclass(frozen=True)
class _Candidate:
    """Verified evidence, P scaled to lambda_max(P) in [1/2, 1), with the bound it proves (the pair
    factors and bounds None until :func:`_with_pairs` adds them)."""

    P: np.ndarray
    lam: np.ndarray
    r: float
    mu: float
    output_factor: float
    pair_factors: np.ndarray | None
    verification: GainVerification
    lipschitz: float
    pair_bounds: np.ndarray | None


def _bound(gform: GainForm, r: float, mu: float, factor: float, horizon: int) -> float:
    """sqrt(factor * mu_step * max(1, r^(s (T - 1)))), rounded up (module docstring)."""
    return float(_bounds(gform, r, mu, np.float64(factor), horizon))


def _bounds(gform: GainForm, r: float, mu: float, factors: np.ndarray, horizon: int) -> np.ndarray:
    """:func:`_bound` of every factor in ``factors``, elementwise: the value of s + 8 correctly
    rounded operations, rounded up by 4 (s + 9) units in the last place and one step (inf where it
    overflows)."""
    per_step, growth = gform.horizon_factors(r, horizon)
    with np.errstate(over="ignore", invalid="ignore"):
        value = np.sqrt(factors * mu * per_step * growth)
        rounded = np.nextafter(value * (1.0 + 4.0 * (gform.substeps + 9) * UNIT_ROUNDOFF), np.inf)
    return np.where(np.isfinite(value), rounded, np.inf)


def _pair_bounds(gform: GainForm, r: float, mu: float, pairs: np.ndarray, horizon: int) -> np.ndarray:
    """The bound of every pair factor (0 on the diagonal, where the factors are 0)."""
    return np.where(pairs > 0, _bounds(gform, r, mu, pairs, horizon), 0.0)


def _backoff(start: _Number, step: _Number, k: int) -> _Number:
    """The k-th back-off of ``start``: start (1 + _BACKOFFS[k]) + step 10^k (elementwise for arrays)."""
    return start * (1.0 + _BACKOFFS[k]) + step * 10.0**k


def _backed_off(start: float, step: float, check: Any) -> float | None:
    """The first back-off of ``start`` (k = 0, 1, ...) with check(value) > 0."""
    for k in range(len(_BACKOFFS)):
        value = _backoff(start, step, k)
        if check(value) > 0:
            return value
    return None


def _finalize(gform: GainForm, P: np.ndarray, lam: np.ndarray, r: float, horizon: int,
              incumbent: float = math.inf, with_pairs: bool = True) -> tuple[_Candidate | None, str]:
    """Smallest mu and readout factors of (P, Lambda, r) in closed form, backed off until they verify;
    skipped (None) when even the unverified bound is no smaller than ``incumbent``. Without
    ``with_pairs`` the candidate has no pair factors yet (:func:`_with_pairs` adds them): a search
    finalizes many candidates and reports one, and the k (k - 1) / 2 pair checks cost most of a
    finalization when the readout has many outputs."""
    form = gform.form
    P = np.asarray(P, dtype=np.float64)
    P = 0.5 * (P + P.T)
    lam = np.maximum(np.asarray(lam, dtype=np.float64).reshape(form.stages, form.n), 0.0)
    if not (np.all(np.isfinite(P)) and np.all(np.isfinite(lam)) and np.isfinite(r) and r > 0):
        return None, "non-finite candidate"
    eigs = np.linalg.eigvalsh(P)
    if not (eigs[-1] > 0 and eigs[0] > P_RELATIVE_EIG_FLOOR * eigs[-1]):
        return None, "P is not positive definite"
    exponent = math.frexp(float(eigs[-1]))[1]
    P, lam, p_min = np.ldexp(P, -exponent), np.ldexp(lam, -exponent), math.ldexp(float(eigs[0]), -exponent)
    parts = gform.input_schur(P, lam, r)
    gram = gform.readout_gram(P)
    if parts is None or gram is None:
        return None, f"M(P, Lambda, rho^2 = {r:.6g}) is not negative definite"
    S, Z = parts
    mu0 = max(float(np.linalg.eigvalsh(S)[-1]), 0.0)
    if _bound(gform, r, mu0, float(np.linalg.eigvalsh(gram)[-1]), horizon) >= incumbent:
        return None, "no better than the best bound so far"
    _, tolerance, _ = _lmi_margin(gform, P, lam, r, mu0)
    if not np.isfinite(tolerance):
        return None, "the dissipation LMI overflows float64"
    growth = 2.0 * tolerance * (1.0 + float(np.linalg.norm(Z, 2)) ** 2)
    mu = _backed_off(mu0, growth, lambda value: _lmi_margin(gform, P, lam, r, value)[2])
    if mu is None:
        return None, "the dissipation LMI does not verify in float64 at any backed-off mu"

    c = _readout_factor(P, p_min, float(np.linalg.eigvalsh(gram)[-1]), gform.D.T)
    if c is None:
        return None, "the readout factor does not verify in float64"
    verification = verify_gain(gform, P, lam, r, mu, c)
    if not verification.passed:
        return None, verification.reason
    candidate = _Candidate(P, lam, float(r), mu, c, None, verification, _bound(gform, r, mu, c, horizon), None)
    return _with_pairs(gform, candidate, horizon) if with_pairs else (candidate, "verified")


def _readout_step(P: np.ndarray, p_min: float, c0: float, V: np.ndarray) -> float:
    """The back-off step of a readout factor c0: 2 tol / lambda_min(P), tol that of c0 P - V V^T."""
    return 2.0 * _readout_matrix(P, max(c0, UNDERFLOW_FLOOR), V)[1] / p_min


def _readout_factor(P: np.ndarray, p_min: float, c0: float, V: np.ndarray) -> float | None:
    """The readout factor c >= c0 (c0 its exact value) backed off until c P - V V^T >= 0 verifies."""
    return _backed_off(c0, _readout_step(P, p_min, c0, V), lambda value: _readout_margin(P, value, V))


def _pair_seconds(gform: GainForm) -> float:
    """An estimate of the time :func:`_with_pairs` takes: what its first try does for a chunk of
    pairs (c P - d d^T formed twice, the eigenvalue problems, the bounds), the best of up to three
    timed, scaled to every pair of outputs, twice over for safety."""
    k, n = gform.D.shape
    count = k * (k - 1) // 2
    if count == 0:
        return 0.0
    size = min(count, 256, max(1, _PAIR_CHUNK_ENTRIES // (n * n)))
    sample, V, factors = np.eye(n) + np.full((n, n), 1.0 / n), np.ones((size, n)), np.ones(size)
    times: list[float] = []
    # The best of three, or of fewer where one takes long enough to time well (0.05 s).
    while len(times) < 3 and sum(times) < 0.05:
        start = time.monotonic()
        _rank_one_tolerances(sample, factors, V)
        _rank_one_margins(sample, factors, V)
        _bounds(gform, 1.0, 1.0, factors, 2)
        times.append(time.monotonic() - start)
    return 2.0 * count / size * min(times)


def _with_pairs(gform: GainForm, candidate: _Candidate, horizon: int) -> tuple[_Candidate | None, str]:
    """``candidate`` with the readout factors of every pair of outputs, backed off until they verify,
    and verified again with them (None and the reason where a pair factor does not verify)."""
    P, r, mu, D = candidate.P, candidate.r, candidate.mu, gform.D
    k = D.shape[0]
    rows, cols = np.triu_indices(k, 1)
    exact = _pair_exact(P, D, rows, cols)
    if exact is None:
        return None, "P is not positive definite (Cholesky)"
    p_min = float(np.linalg.eigvalsh(P)[0])
    steps = _pair_steps(P, p_min, D, rows, cols, exact)
    # First every pair at its first back-off, checked once by verify_gain; the back-offs pair by pair
    # (all pairs at each level at once) only if that fails.
    pairs = np.zeros((k, k))
    pairs[rows, cols] = pairs[cols, rows] = _backoff(exact, steps, 0)
    verification = verify_gain(gform, P, candidate.lam, r, mu, candidate.output_factor, pairs)
    if not verification.passed:
        values = np.full(len(rows), np.nan)
        for level in range(len(_BACKOFFS)):
            pending = np.flatnonzero(np.isnan(values))
            trial = _backoff(exact[pending], steps[pending], level)
            verified = _pair_margins(P, D, rows[pending], cols[pending], trial) > 0
            values[pending[verified]] = trial[verified]
        failed = np.flatnonzero(np.isnan(values))
        if len(failed):
            return None, f"the readout factor of the pair ({rows[failed[0]]}, {cols[failed[0]]}) does not verify in float64"
        pairs[rows, cols] = pairs[cols, rows] = values
        verification = verify_gain(gform, P, candidate.lam, r, mu, candidate.output_factor, pairs)
    if not verification.passed:
        return None, verification.reason
    return dataclasses.replace(candidate, pair_factors=pairs, verification=verification,
                               pair_bounds=_pair_bounds(gform, r, mu, pairs, horizon)), "verified"


def _log_mu(gform: GainForm, P: np.ndarray, r: float, theta: np.ndarray, tau: float) -> tuple[float, np.ndarray]:
    """log of a soft maximum tau log sum exp(mu_i / tau) of the eigenvalues mu_i of B^T (-M)^-1 B
    (their maximum when d = 1 or tau = 0) for Lambda = exp(theta), and its gradient in theta.

    d mu_i / d Lambda_s,k = 2 p_s,k (L q_s,k - p_s,k) at chi_i = (Z v_i, v_i), q_s = G_s xi + U v
    (envelope theorem; module docstring). Infeasible Lambda (M not < 0): (_BIG, 0); mu = 0 (the input
    does not reach the state): (log of the smallest normal float64, 0).
    """
    form, n, L = gform.form, gform.n, gform.form.slope
    with np.errstate(all="ignore"):
        lam = np.exp(theta).reshape(form.stages, n)
    parts = gform.input_schur(P, lam, r) if np.all(np.isfinite(lam)) else None
    if parts is None:
        return _BIG, np.zeros_like(theta)
    S, Z = parts
    values, V = np.linalg.eigh(S)
    top = float(values[-1])
    if not top > 0:
        return math.log(UNDERFLOW_FLOOR), np.zeros_like(theta)
    if tau > 0 and len(values) > 1:
        weights = np.exp((values - top) / (tau * top))
        total = float(weights.sum())
        weights /= total
        soft = top * (1.0 + tau * math.log(total))
    else:
        weights = np.zeros(len(values))
        weights[-1] = 1.0
        soft = top
    X = Z @ V
    inputs = gform.U @ V
    grad = np.empty((form.stages, n))
    for s, G in enumerate(form.q_maps):
        p = X[n * (s + 1):n * (s + 2)]
        grad[s] = 2.0 * ((p * (L * (G @ X + inputs) - p)) @ weights)
    return math.log(soft), (grad * lam).ravel() / soft


def _optimize_multipliers(gform: GainForm, P: np.ndarray, r: float, lam0: np.ndarray, deadline: float,
                          maxiter: int = 60) -> np.ndarray:
    """Minimize the smallest mu of (*) over Lambda for fixed (P, r), from ``lam0`` (L-BFGS in log Lambda;
    soft maximum with continuation when d > 1). Returns the best multipliers seen."""
    shape = (gform.form.stages, gform.n)
    theta = np.log(np.maximum(np.asarray(lam0, dtype=np.float64), 1e-300)).ravel()
    best_theta, best_value = theta, _log_mu(gform, P, r, theta, 0.0)[0]
    if best_value >= _BIG:
        return np.asarray(lam0, dtype=np.float64).reshape(shape)
    for tau in ((1e-2, 1e-3, 0.0) if gform.d > 1 else (0.0,)):
        if time.monotonic() >= deadline:
            break
        result = scipy.optimize.minimize(
            _log_mu_objective, best_theta, args=(gform, P, r, tau), jac=True, method="L-BFGS-B",
            bounds=[(t - 30.0, t + 30.0) for t in best_theta], options={"maxiter": maxiter},
        )
        value = _log_mu(gform, P, r, result.x, 0.0)[0]
        if value < best_value:
            best_theta, best_value = result.x, value
    return np.exp(best_theta).reshape(shape)


def _log_mu_objective(theta: np.ndarray, gform: GainForm, P: np.ndarray, r: float, tau: float) -> tuple[float, np.ndarray]:
    return _log_mu(gform, P, r, theta, tau)


def _scalar_multipliers(gform: GainForm, P: np.ndarray, r: float) -> np.ndarray | None:
    """The best common multiplier Lambda = c I for fixed (P, r): log-scale grid, then Brent; None if
    no c makes M(P, c I, r) < 0."""
    form = gform.form
    W = form.q_maps[0][:, :gform.n]
    c0 = 1.0 / max(form.slope * float(np.linalg.norm(W, 2)), 1e-12)

    def value(t: float) -> float:
        return _log_mu(gform, P, r, np.full(form.stages * gform.n, t), 0.0)[0]

    grid = math.log(c0) + np.linspace(-20.0, 20.0, 41)
    values = np.array([value(t) for t in grid])
    k = int(np.argmin(values))
    if values[k] >= _BIG:
        return None
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    result = scipy.optimize.minimize_scalar(value, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    t_best = result.x if result.fun < values[k] else grid[k]
    return np.full((form.stages, gform.n), math.exp(t_best))


def sequence_map(model: Any) -> tuple[LureSystem, np.ndarray, np.ndarray]:
    """(Lur'e form, U, D) of a toolkit model whose output is D h_T + d, inputs u_t = U x_t + b.

    ``model`` is a :class:`~lrnn_analysis.model_under_analysis.ModelUnderAnalysis` or the module.
    U and D are its input and readout matrices in float64 (``input_matrix``, ``readout_matrix``); for the
    contracting model, whose form lives in zeta = T^-1 h (``lure_rewrite``), D is returned as D T,
    the readout in the form's coordinates (u enters both coordinates alike: tanh(C h + u) =
    tanh(W zeta + u)). Raises :class:`InputError` for a model without such a form.
    """
    import torch

    from ..models import ContractingRNN, LureRNN

    module = getattr(model, "module", model)
    name = getattr(model, "name", type(module).__name__)
    with torch.no_grad():
        if isinstance(module, ContractingRNN):
            _, system, T = module.lure_rewrite()
            D = module.readout_matrix(torch.float64).cpu().numpy() @ T
        elif isinstance(module, LureRNN):
            system = module.lure_form()
            D = module.readout_matrix(torch.float64).cpu().numpy()
        else:
            raise InputError(f"{name}: a gain certificate needs a toolkit model whose whole recurrence is a "
                             f"Lur'e form read out as D h_T (lipschitz, antisymmetric, cayley, residual, vanilla, "
                             f"node, contracting, lipschitz-ren); got {type(module).__name__}")
        U = module.input_matrix(torch.float64).cpu().numpy()
    return system, U, D


class _DualRiccati:
    """The Riccati equation of (*) in Y = P^-1 (module docstring, tier ``riccati``): its stabilizing
    solution for given (Lambda, mu, r) and the gradient of log c_tau(Y), c_tau a soft maximum of the
    eigenvalues of D Y D^T, in (Lambda, mu, r).

    With Pi = Uv Uv^T = Z_S / r the equation reads Ric(Y) = Fv (P - Pi)^-1 Fv^T - Y + Z_G + eta I = 0
    (push-through identity), P = Y^-1. Its linearization in Y is Acl dY Acl^T - dY with the closed
    loop Acl = Fv (P - Pi)^-1 P, so for a change of the data with Y held, dY solves a Stein equation
    and d tr(Phi Y) = tr(Xi dRic) with Xi = Acl^T Xi Acl + Phi (adjoint method). dRic is written
    through d(R~^-1) = -R~^-1 dR~ R~^-1, dS~, dFv = -Fv dr / 2r and dPi = -Pi dr / r, and read off,
    as for the multipliers of the closed-form tier, from d Sigma / d Lambda_s,i = L (e g^T + g e^T)
    - 2 e e^T with g the i-th row of [G_s, U]. ``mu = inf`` drops the input (the contraction-only
    inequality at rate r). The slack ``eta`` is fixed per instance.
    """

    def __init__(self, gform: GainForm, eta: float) -> None:
        form, n = gform.form, gform.n
        self.gform, self.eta = gform, eta
        self.warm: np.ndarray | None = None
        self.counts = {"riccati_solves": 0, "newton_steps": 0, "schur_method": 0}
        self.F0, self.Gp = form.out[:, :n], form.out[:, n:]
        # One row per multiplier: the extended pre-activation maps [G_s, U].
        self.rows = [np.hstack([G, gform.U]) for G in form.q_maps]

    def data(self, lam: np.ndarray, mu: float, r: float) -> tuple[np.ndarray, ...] | None:
        """(Fv, Pi, Q, R~^-1 S~^T, R~^-1 G^T) at (Lambda, mu, r); None unless R~ > 0."""
        gform, n, d = self.gform, self.gform.n, self.gform.d
        with np.errstate(all="ignore"):
            Sigma, _ = gform.form.assemble(np.zeros((n, n)), lam, 0.0)
        if not (np.all(np.isfinite(Sigma)) and np.all(np.isfinite(gform.coupling(lam))) and mu > 0):
            return None
        if math.isinf(mu):
            Rt, St, G = -Sigma[n:, n:], Sigma[:n, n:], self.Gp
        else:
            Bp = gform.coupling(lam)[n:]
            Rt = np.block([[-Sigma[n:, n:], -Bp], [-Bp.T, mu * np.eye(d)]])
            St = np.hstack([Sigma[:n, n:], np.zeros((n, d))])
            G = np.hstack([self.Gp, np.zeros((n, d))])
        try:
            chol = np.linalg.cholesky(Rt)
        except np.linalg.LinAlgError:
            return None
        solved = scipy.linalg.cho_solve((chol, True), np.hstack([St.T, G.T]))
        R_S, R_G = solved[:, :n], solved[:, n:]
        Fv = (self.F0 + G @ R_S) / math.sqrt(r)
        Pi = St @ R_S / r
        Q = G @ R_G + self.eta * np.eye(n)
        return Fv, 0.5 * (Pi + Pi.T), 0.5 * (Q + Q.T), R_S, R_G

    def solve(self, lam: np.ndarray, mu: float, r: float) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
        """(Y, data): the stabilizing solution, Y > 0 and P - Pi > 0, with ||Ric(Y)||_F <= _NEWTON_RTOL eta; None
        when none is found.

        Newton's method from the last solution found (one Stein equation per step), else from
        scipy's Schur method (X = -Y in ``solve_discrete_are(Fv^T, Uv, -Q, I)``, Uv Uv^T = Pi),
        whose answer is likewise refined and checked by Newton's method.
        """
        n = self.gform.n
        data = self.data(lam, mu, r)
        if data is None:
            return None
        Fv, Pi, Q = data[:3]
        self.counts["riccati_solves"] += 1
        Y = None if self.warm is None else self._newton(self.warm, Fv, Pi, Q)
        if Y is None:
            self.counts["schur_method"] += 1
            try:
                with np.errstate(all="ignore"):
                    w, V = np.linalg.eigh(Pi)
                    Uv = V * np.sqrt(np.maximum(w, 0.0))
                    X = scipy.linalg.solve_discrete_are(Fv.T, Uv, -Q, np.eye(n))
            except (np.linalg.LinAlgError, ValueError):
                return None
            if not np.all(np.isfinite(X)):
                return None
            Y = self._newton(-0.5 * (X + X.T), Fv, Pi, Q)
            if Y is None:
                return None
        self.warm = Y
        return Y, data

    @staticmethod
    def _closed_loop(Y: np.ndarray, Fv: np.ndarray, Pi: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
        """(Acl, (P - Pi)^-1) if Y > 0, P - Pi > 0 (P = Y^-1) and Acl is Schur stable; else why not
        ("domain" or "unstable")."""
        try:
            chol = np.linalg.cholesky(Y)
            P = scipy.linalg.cho_solve((chol, True), np.eye(len(Y)))
            Wh = np.linalg.inv(np.linalg.cholesky(0.5 * (P + P.T) - Pi))
            Wh = Wh.T @ Wh
        except np.linalg.LinAlgError:
            return "domain"
        Acl = Fv @ Wh @ P
        if not (np.all(np.isfinite(Acl)) and np.max(np.abs(np.linalg.eigvals(Acl))) < 1.0):
            return "unstable"
        return Acl, Wh

    def _newton(self, Y: np.ndarray, Fv: np.ndarray, Pi: np.ndarray, Q: np.ndarray) -> np.ndarray | None:
        """Newton's method for Ric(Y) = 0 from Y: dY - Acl dY Acl^T = Ric(Y); Y once ||Ric(Y)||_F <= _NEWTON_RTOL eta
        at a stabilizing Y, else None (a start outside the domain or not stabilizing, an unstable closed
        loop on the way, or no convergence in _NEWTON_STEPS steps): the caller then solves afresh."""
        for _ in range(_NEWTON_STEPS):
            loop = self._closed_loop(Y, Fv, Pi)
            if isinstance(loop, str):
                return None
            Acl, Wh = loop
            residual = Fv @ Wh @ Fv.T - Y + Q
            residual = 0.5 * (residual + residual.T)
            if np.linalg.norm(residual) <= _NEWTON_RTOL * self.eta:
                return Y
            self.counts["newton_steps"] += 1
            with np.errstate(all="ignore"):
                step = scipy.linalg.solve_discrete_lyapunov(Acl, residual)
            if not np.all(np.isfinite(step)):
                return None
            Y = Y + 0.5 * (step + step.T)
        return None

    def input_floor(self, lam: np.ndarray) -> tuple[float, np.ndarray] | None:
        """mu_R = lambda_max(B_p^T R^-1 B_p), below which R~ is not positive definite, and its gradient
        in Lambda (envelope theorem at chi = (0, R^-1 B_p v, v), v the top eigenvector); None unless R > 0."""
        gform, n, L = self.gform, self.gform.n, self.gform.form.slope
        with np.errstate(all="ignore"):
            Sigma, _ = gform.form.assemble(np.zeros((n, n)), lam, 0.0)
            Bp = gform.coupling(lam)[n:]
        if not (np.all(np.isfinite(Sigma)) and np.all(np.isfinite(Bp))):
            return None
        try:
            chol = np.linalg.cholesky(-Sigma[n:, n:])
        except np.linalg.LinAlgError:
            return None
        solved = scipy.linalg.cho_solve((chol, True), Bp)
        values, V = np.linalg.eigh(0.5 * (Bp.T @ solved + (Bp.T @ solved).T))
        v = V[:, -1]
        chi = np.concatenate([np.zeros(n), solved @ v, v])
        grad = np.empty((gform.form.stages, n))
        for s, rows in enumerate(self.rows):
            p = chi[n * (s + 1):n * (s + 2)]
            grad[s] = 2.0 * p * (L * (rows @ chi) - p)
        return max(float(values[-1]), 0.0), grad

    def objective(self, lam: np.ndarray, mu: float, r: float, tau: float,
                  beta: float = 0.0) -> tuple[float, float, np.ndarray, float, float] | None:
        """(g, log lambda_max(D Y D^T), dg/dLambda, dg/dmu, dg/dr) for g = log c_tau(Y) + beta log tr(Y);
        None where (Lambda, mu, r) is infeasible (no stabilizing solution). The barrier term grows
        without bound where the stabilizing solution ceases to exist (Y blows up), also in directions
        D does not see."""
        gform, n, L = self.gform, self.gform.n, self.gform.form.slope
        solved = self.solve(lam, mu, r)
        if solved is None:
            return None
        Y, (Fv, Pi, Q, R_S, R_G) = solved
        loop = self._closed_loop(Y, Fv, Pi)
        if isinstance(loop, str):
            return None
        Acl, Wh = loop
        try:
            values, Zc = np.linalg.eigh(gform.D @ Y @ gform.D.T)
            top = float(values[-1])
            if not top > 0:
                return None
            weights = np.exp((values - top) / (tau * top)) if tau > 0 else (values == top).astype(float)
            total = float(weights.sum())
            weights /= total
            soft = top * (1.0 + tau * math.log(total)) if tau > 0 else top
            DZ = gform.D.T @ Zc
            trace = float(np.trace(Y))
            # One adjoint equation for both terms: the map Phi -> Xi is linear.
            Phi = (DZ * weights) @ DZ.T / soft + (beta / trace) * np.eye(n)
            with np.errstate(all="ignore"):
                Xi = scipy.linalg.solve_discrete_lyapunov(Acl.T, Phi)
        except (np.linalg.LinAlgError, ValueError):
            return None
        if not np.all(np.isfinite(Xi)):
            return None
        Xi = 0.5 * (Xi + Xi.T)
        H1 = Wh @ Fv.T @ Xi
        H2 = H1 @ Fv @ Wh
        root = math.sqrt(r)
        Psi_R = -(2.0 / root) * R_S @ H1 @ R_G.T - (R_S @ H2 @ R_S.T) / r - R_G @ Xi @ R_G.T
        Psi_R = 0.5 * (Psi_R + Psi_R.T)
        Psi_S = (2.0 / root) * H1 @ R_G.T + (2.0 / r) * H2 @ R_S.T
        # Omega pairs with d Sigma_full (rows/columns delta, p, x): -Psi_R on (p, x)^2, Psi_S on (delta, (p, x)).
        k = Psi_R.shape[0]
        Omega = np.zeros((n + k, n + k))
        Omega[n:, n:] = -Psi_R
        Omega[:n, n:] = Psi_S
        grad = np.empty((gform.form.stages, n))
        for s, rows in enumerate(self.rows):
            block = slice(n * (s + 1), n * (s + 2))
            both = Omega[block, :] + Omega[:, block].T
            grad[s] = L * np.einsum("ij,ij->i", both, rows[:, :n + k]) - 2.0 * np.diag(Omega[block, block])
        d_mu = 0.0 if math.isinf(mu) else float(np.trace(Psi_R[-gform.d:, -gform.d:]))
        d_r = -(float(np.sum(Fv * H1.T)) + float(np.sum(Pi * H2))) / r
        return math.log(soft) + beta * math.log(trace), math.log(top), grad, d_mu, d_r


def _slack_at(gform: GainForm, lam: np.ndarray, mu: float, r: float) -> _DualRiccati | None:
    """The dual equation with slack eta = _ETA_RELATIVE ||Z_G||_2 at (Lambda, mu, r); None unless R~ > 0."""
    data = _DualRiccati(gform, 0.0).data(lam, mu, r)
    return None if data is None else _DualRiccati(gform, _ETA_RELATIVE * float(np.linalg.norm(data[2], 2)))


def _log_step_factor(gform: GainForm, r: float, horizon: int) -> tuple[float, float]:
    """log(mu_step / mu) + log max(1, r^(s (T - 1))) and its derivative in r."""
    s = gform.substeps
    powers = [r**i for i in range(s)]
    total = sum(powers)
    growth = s * (horizon - 1) if r > 1.0 else 0.0
    return (math.log(total) + growth * math.log(r),
            (sum(i * x for i, x in enumerate(powers)) / total + growth) / r)


def _riccati_descent(gform: GainForm, start: tuple[np.ndarray, float, float], horizon: int, free_rate: bool,
                     deadline: float) -> tuple[_DualRiccati, np.ndarray, float, float, np.ndarray] | None:
    """Minimize the squared bound mu_step c(Y) max(1, r^(s (T - 1))) over (Lambda, mu) and, if
    ``free_rate``, r >= 1, from ``start`` = (Lambda, mu, r), by L-BFGS on its logarithm; Y is the
    stabilizing solution of the dual Riccati equation (its smallest solution: for fixed (Lambda, mu, r)
    the P = Y^-1 with the smallest readout factor). Continuation over _CONTINUATION: c is smoothed by
    a soft maximum of width tau, and the barrier beta log(mu tr Y) (invariant, like the bound, under
    (Lambda, mu) -> t (Lambda, mu)) keeps the iterates off the edge of feasibility until the last
    level. A local method: the SDP tier is the reference where it is affordable.

    Coordinates z = (log Lambda, log(mu - mu_R(Lambda)) [, v with r = 1 + v^2]) keep R~ > 0 and r >= 1
    everywhere. Returns the equation (its slack eta fixed) with (Lambda, mu, r) and Y at the best
    point seen, or None if the start is infeasible.
    """
    m, n = gform.form.stages, gform.n
    lam0, mu0, r0 = start
    lam0 = np.maximum(np.asarray(lam0, dtype=np.float64).reshape(m, n), 1e-300)
    slack = _slack_at(gform, lam0, mu0, r0)
    if slack is None:
        return None
    dual = slack
    floor = dual.input_floor(lam0)
    if floor is None or not mu0 > floor[0] or (free_rate and r0 < 1.0):
        return None
    best: list[Any] = [_BIG, None]

    def fun(z: np.ndarray, tau: float, beta: float) -> tuple[float, np.ndarray]:
        value, gradient = evaluate(z, tau, beta)
        if not (math.isfinite(value) and np.all(np.isfinite(gradient))):
            return _BIG, np.zeros_like(z)
        return value, gradient

    def evaluate(z: np.ndarray, tau: float, beta: float) -> tuple[float, np.ndarray]:
        with np.errstate(all="ignore"):
            lam = np.exp(z[:m * n]).reshape(m, n)
        if not (np.all(np.isfinite(z)) and np.all(np.isfinite(lam)) and np.all(lam > 0)):
            return _BIG, np.zeros_like(z)
        floor = dual.input_floor(lam)
        if floor is None:
            return _BIG, np.zeros_like(z)
        excess = math.exp(z[m * n])
        mu, r = floor[0] + excess, 1.0 + z[-1] ** 2 if free_rate else r0
        found = dual.objective(lam, mu, r, tau, beta)
        if found is None:
            return _BIG, np.zeros_like(z)
        log_c, log_top, d_lam, d_mu, d_r = found
        extra, d_extra = _log_step_factor(gform, r, horizon)
        value = (1.0 + beta) * math.log(mu) + log_c + extra
        if math.log(mu) + log_top + extra < best[0]:
            best[0], best[1] = math.log(mu) + log_top + extra, (lam, mu, r, dual.warm)
        d_mu_total = (1.0 + beta) / mu + d_mu
        gradient = [((d_lam + d_mu_total * floor[1]) * lam).ravel(), [d_mu_total * excess]]
        if free_rate:
            gradient.append([(d_r + d_extra) * 2.0 * z[-1]])
        return value, np.concatenate(gradient)

    z = np.concatenate([np.log(lam0).ravel(), [math.log(mu0 - floor[0])]]
                       + ([[math.sqrt(r0 - 1.0)]] if free_rate else []))
    for tau, beta in _CONTINUATION:
        z = lbfgs_minimize(functools.partial(fun, tau=tau, beta=beta), z, deadline, iterations=_DESCENT_STEPS,
                           backtracks=_BACKTRACKS, max_step=_MAX_STEP, memory=_MEMORY, stall_tolerance=1e-10)
    if best[1] is None:
        return None
    return (dual,) + best[1]


def _riccati_candidate(gform: GainForm, found: tuple[_DualRiccati, np.ndarray, float, float, np.ndarray],
                       horizon: int) -> tuple[_Candidate | None, str]:
    """P = Y^-1 from the stabilizing solution Y found at (Lambda, mu, r), finalized. The optimum lies
    where (*) is nearly singular, so where it does not verify in float64 the equation is re-solved
    (from Y) a little inside: slack eta times 10^k and mu times 1 + 10^(k - 4), k = 1.._ETA_RAISES."""
    dual, lam, mu, r, Y = found
    reason = "no stabilizing solution"
    for k in range(_ETA_RAISES + 1):
        if k:
            inside = _DualRiccati(gform, dual.eta * 10.0**k)
            inside.warm = Y
            solved = inside.solve(lam, mu * (1.0 + 10.0 ** (k - 4)), r)
            if solved is None:
                reason = f"{reason}; no stabilizing solution with the slack raised {10**k}-fold"
                continue
            P = np.linalg.inv(solved[0])
        else:
            P = np.linalg.inv(Y)
        candidate, why = _finalize(gform, P, lam, r, horizon, with_pairs=False)
        if candidate is not None:
            return candidate, why
        reason = why
    return None, reason


class _SdpProblem:
    """cvxpy model: minimize mu s.t. M_mu <= -t diag(I_N, 0), P >= D^T D + delta I, Lambda >= 0, at a
    fixed r (a parameter). (*) is posed in the Schur form [[-K, Cf^T P], [P Cf, P]] >= 0 with
    M_mu = Cf^T P Cf + K, Cf = [C, 0], so the data stay O(n^2 N); built from n x n blocks."""

    def __init__(self, gform: GainForm) -> None:
        import cvxpy as cp

        form, n, d = gform.form, gform.n, gform.d
        m, L = form.stages, form.slope
        scale = float(np.linalg.norm(gform.D, 2)) ** 2
        self.rate = cp.Parameter(nonneg=True)
        self.P = cp.Variable((n, n), symmetric=True)
        self.mu = cp.Variable(nonneg=True)
        self.lams = [cp.Variable(n, nonneg=True) for _ in range(m)]
        size = [n] * (m + 1) + [d, n]
        blocks: list[list[Any]] = [[None] * (m + 3) for _ in range(m + 3)]

        def add(i: int, j: int, expr: Any) -> None:
            blocks[i][j] = expr if blocks[i][j] is None else blocks[i][j] + expr

        def column(X: np.ndarray, j: int) -> np.ndarray:
            return X[:, n * j:n * (j + 1)]

        margin = _SDP_MARGIN * scale
        add(0, 0, self.rate * self.P)
        for s, (lam, G) in enumerate(zip(self.lams, form.q_maps)):
            for j in range(m + 1):
                if np.any(column(G, j)):
                    term = L * (cp.diag(lam) @ column(G, j))
                    add(s + 1, j, -term)
                    add(j, s + 1, -term.T)
            add(s + 1, s + 1, 2.0 * cp.diag(lam))
            coupling = L * (cp.diag(lam) @ gform.U)
            add(s + 1, m + 1, -coupling)
            add(m + 1, s + 1, -coupling.T)
        for i in range(m + 1):
            add(i, i, -margin * np.eye(n))
        add(m + 1, m + 1, self.mu * np.eye(d))
        for j in range(m + 1):
            if np.any(column(form.out, j)):
                term = self.P @ column(form.out, j)
                add(m + 2, j, term)
                add(j, m + 2, term.T)
        add(m + 2, m + 2, self.P)
        rows = [[b if b is not None else np.zeros((size[i], size[j])) for j, b in enumerate(row)]
                for i, row in enumerate(blocks)]
        lmi = cp.bmat(rows)
        floor = gform.D.T @ gform.D + _SDP_FLOOR * scale * np.eye(n)
        constraints = [0.5 * (lmi + lmi.T) >> 0, self.P - floor >> 0]
        self.problem = cp.Problem(cp.Minimize(self.mu), constraints)
        self.cone = form.N + d + n

    def solve(self, r: float, solver: str, time_limit: float) -> tuple[tuple[np.ndarray, np.ndarray, float] | None, str]:
        """One solve at r: ((P, Lambda, mu), status) or (None, status); status names the solver's verdict."""
        import cvxpy as cp

        self.rate.value = r
        failure = run_solver(self.problem, solver, time_limit, scs_eps=1e-6, scs_iterations=20000)
        if failure is not None:
            return None, failure
        status = self.problem.status
        if status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) and self.P.value is not None and self.mu.value is not None:
            lam = np.vstack([np.asarray(l.value, dtype=np.float64) for l in self.lams])
            return (np.asarray(self.P.value, dtype=np.float64), np.maximum(lam, 0.0), float(self.mu.value)), status
        return None, status


@dataclass(frozen=True)
class GainAttempt:
    """One tier tried: whether it verified a bound, the bound, its cost and why it ended as it did.

    ``work`` counts its inner steps (e.g. Riccati solves), which compare across machines and loads.
    """

    tier: str
    holds: bool
    lipschitz: float | None
    seconds: float
    reason: str
    work: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "holds": self.holds, "lipschitz": self.lipschitz, "seconds": self.seconds,
                "reason": self.reason, "work": dict(self.work)}


@dataclass(frozen=True, eq=False)
class GainCertificate:
    """A certified incremental l2-gain of the sequence map x -> y = D h_T over ``horizon`` steps.

    When ``holds``: ||y(x) - y(x~)|| <= ``lipschitz`` * ||x - x~|| (l2 over time and features) for all
    input sequences of that length, and |(y_i - y_j)(x) - (y_i - y_j)(x~)| <= ``pair_bounds[i, j]`` *
    ||x - x~||. The evidence: ``P`` (lambda_max in [1/2, 1)), ``multipliers`` (one row per stage),
    ``mu`` and ``rho`` (rho^2 = ``r``, per substep) satisfying (*), the readout factor ``output_factor``
    (c P >= D^T D) and ``pair_factors``; ``verification`` holds the float64 margins.
    """

    holds: bool
    family: str
    horizon: int
    lipschitz: float | None
    pair_bounds: np.ndarray | None
    mu: float | None
    r: float | None
    output_factor: float | None
    pair_factors: np.ndarray | None
    P: np.ndarray | None
    multipliers: np.ndarray | None
    tier: str | None
    verification: GainVerification | None
    seconds: float
    reason: str
    attempts: tuple[GainAttempt, ...] = ()
    budget_exhausted: bool = False

    @property
    def rho(self) -> float | None:
        """sqrt(r) rounded up: the rate parameter per substep of (*)."""
        return None if self.r is None else float(np.nextafter(math.sqrt(self.r), np.inf))

    def to_dict(self, include_matrices: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "holds": self.holds,
            "family": self.family,
            "horizon": self.horizon,
            "lipschitz": self.lipschitz,
            "pair_bounds": None if self.pair_bounds is None else self.pair_bounds.tolist(),
            "mu": self.mu,
            "rho": self.rho,
            "r": self.r,
            "output_factor": self.output_factor,
            "tier": self.tier,
            "seconds": self.seconds,
            "reason": self.reason,
            "verification": None if self.verification is None else self.verification.to_dict(),
            "attempts": [a.to_dict() for a in self.attempts],
            "budget_exhausted": self.budget_exhausted,
        }
        if include_matrices:
            data["P"] = None if self.P is None else self.P.tolist()
            data["multipliers"] = None if self.multipliers is None else self.multipliers.tolist()
            data["pair_factors"] = None if self.pair_factors is None else self.pair_factors.tolist()
        return data


def certified_radii(logits: Any, pair_bounds: np.ndarray) -> np.ndarray:
    """The radius within which each prediction provably stays: min over j != i of
    (y_i - y_j) / pair_bounds[i, j], i the predicted class (inf where every pair bound is 0;
    0 for a tie). A prediction is certified at radius delta when its radius exceeds delta.

    ``logits`` has shape (N, k); rounding of the division is toward 0.
    """
    y = np.asarray(logits.detach().cpu().double().numpy() if hasattr(logits, "detach") else logits, dtype=np.float64)
    bounds = np.asarray(pair_bounds, dtype=np.float64)
    if y.ndim != 2 or bounds.shape != (y.shape[1], y.shape[1]):
        raise InputError(f"logits must have shape (N, {bounds.shape[0]}) for these pair bounds, got {y.shape}")
    predicted = np.argmax(y, axis=1)
    margins = y[np.arange(len(y)), predicted][:, None] - y
    rows = bounds[predicted]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(rows > 0, margins / rows, np.where(margins > 0, np.inf, 0.0))
    ratio[np.arange(len(y)), predicted] = np.inf
    radii = np.maximum(np.min(ratio, axis=1), 0.0)
    return np.where(np.isfinite(radii), np.nextafter(radii, 0.0), radii)


@dataclass
class _Search:
    """What the tiers share: the problem, the best verified candidate so far and the deadline; every
    verified candidate with the tier that found it (the candidates have no pair factors yet:
    :func:`_reported` adds them to the best one that takes them)."""

    gform: GainForm
    horizon: int
    r_fixed: float | None
    deadline: float
    starts: list[tuple[np.ndarray, np.ndarray | None]]
    best: _Candidate | None = None
    best_at_one: _Candidate | None = None
    tier: str = ""
    verified: list[tuple[_Candidate, str]] = field(default_factory=list)

    def offer(self, candidate: _Candidate | None) -> bool:
        """Keep ``candidate`` if it proves a smaller bound (overall, and among those at r = 1); whether
        it proved the smallest so far."""
        if candidate is None:
            return False
        self.verified.append((candidate, self.tier))
        if candidate.r == 1.0 and (self.best_at_one is None or candidate.lipschitz < self.best_at_one.lipschitz):
            self.best_at_one = candidate
        if self.best is None or candidate.lipschitz < self.best.lipschitz:
            self.best = candidate
            return True
        return False

    def incumbent(self, r: float) -> float:
        """The bound a new candidate at rate r must beat to matter: the best so far, or at r = 1 the
        best at r = 1 (kept as a start of the Riccati tier)."""
        best = self.best_at_one if r == 1.0 else self.best
        return math.inf if best is None else best.lipschitz

    @property
    def out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline


def _contraction_rate(gform: GainForm, P: np.ndarray, deadline: float) -> float | None:
    """The smallest r with M(P, Lambda, r) < 0 over the multipliers (the contraction tiers' P=I
    machinery, for any P); None if none makes the multiplier block negative definite."""
    form = gform.form
    lam = lmi.optimize_multipliers(form, P, lmi.scalar_multipliers(form, P), deadline)
    return form.best_rate(P, lam)


def _scaled_form(form: IncrementalForm, scale: float) -> IncrementalForm:
    """The form with C / sqrt(scale): M(P, Lambda / scale, r) of it is M(P, Lambda, scale r) / scale of
    ``form``, so its contraction certificates at rate r' < 1 are certificates of ``form`` at scale r'."""
    return IncrementalForm(form.family, form.n, form.slope, form.eps, form.out / math.sqrt(scale), form.q_maps)


def _contraction_start(search: _Search) -> tuple[np.ndarray, np.ndarray] | None:
    """(P, Lambda) with M(P, Lambda, r) < 0 for some usable r, from the contraction certificate's Riccati
    tier (:mod:`.riccati`) run on the form scaled by r_fixed, or (rate searched) by max(1, r_J) times
    1, 1.01, 1.1, 2, r_J the largest squared spectral radius of the frozen-Jacobian step matrices."""
    gform = search.gform
    goodness = [lmi.jacobian_goodness(gform.lure_system, gform.family, d)
                for d in lmi.sampled_slopes(gform.n, gform.form.slope)]
    if not all(np.isfinite(goodness)):
        return None
    r_J = -min(goodness)
    scales = [search.r_fixed] if search.r_fixed is not None else [max(1.0, r_J) * f for f in (1.0, 1.01, 1.1, 2.0)]
    for scale in scales:
        if search.out_of_time or r_J >= scale:
            continue
        outcome = riccati_tier(_scaled_form(gform.form, scale), -r_J / scale, search.deadline)
        if outcome.candidate is not None:
            return outcome.candidate.P, outcome.candidate.lam * scale
    return None


def _rate_grid(gform: GainForm, horizon: int, r_floor: float) -> list[float]:
    """Rates to try above r_floor (>= 1): horizon factors r^(s (T - 1)) = 1 (r_floor = 1 only), 1.1, ..., 20."""
    exponent = gform.substeps * max(horizon - 1, 1)
    growths = ((1.0,) if r_floor == 1.0 else ()) + (1.1, 1.5, 2.5, 5.0, 20.0)
    return [r_floor * g ** (1.0 / exponent) for g in growths]


def _closed_form_tier(search: _Search) -> tuple[str, dict[str, int]]:
    """Tier ``closed-form``: for each starting P (and its multipliers if known): P = I, a given
    contraction certificate's, and the one :func:`_contraction_start` finds, the multipliers optimized
    for the smallest mu at each rate tried (the last only when the others find no bound at r = 1);
    every candidate finalized and verified."""
    reason, tried = "no rate and multipliers make M(P, Lambda, rho^2) negative definite for the starting P", 0
    reason, tried = _closed_form_starts(search, search.starts, reason, tried)
    if search.best is None or (search.r_fixed is None and search.best_at_one is None):
        found = _contraction_start(search)
        if found is not None:
            reason, tried = _closed_form_starts(search, [found], reason, tried)
    return reason, {"candidates": tried}


def _closed_form_starts(search: _Search, starts: list[tuple[np.ndarray, np.ndarray | None]], reason: str,
                        tried: int) -> tuple[str, int]:
    """The closed-form tier on ``starts``; the reason so far and the number of candidates tried, updated."""
    gform, horizon = search.gform, search.horizon
    for P, lam_start in starts:
        if search.r_fixed is not None:
            rates = [search.r_fixed]
        else:
            r_P = _contraction_rate(gform, P, search.deadline)
            if r_P is None or gform.substeps * max(horizon - 1, 1) * math.log(max(r_P, 1.0)) > math.log(_BIG):
                continue
            rates = _rate_grid(gform, horizon, max(1.0, r_P * (1.0 + 1e-6)))
        for r in rates:
            if search.out_of_time:
                return "time budget exhausted", tried
            lam = lam_start if lam_start is not None and gform.input_schur(P, lam_start, r) is not None \
                else _scalar_multipliers(gform, P, r)
            if lam is None:
                continue
            lam = _optimize_multipliers(gform, P, r, lam, search.deadline)
            candidate, why = _finalize(gform, P, lam, r, horizon, search.incumbent(r), with_pairs=False)
            tried += 1
            reason = "verified" if candidate is not None or reason == "verified" else why
            search.offer(candidate)
    return reason, tried


def _phase_one(search: _Search) -> tuple[np.ndarray, float, float] | None:
    """A feasible start (Lambda = 1, mu, r) for the Riccati tier when no candidate exists: r from
    the frozen-Jacobian lower bound upward (1 + 1e-3 2^j) until the contraction-only equation
    (mu = inf) is solvable, then mu from the input floor upward (factors 1 + 4^j)."""
    gform = search.gform
    lam = np.ones((gform.form.stages, gform.n))
    dual = _DualRiccati(gform, 0.0)
    if search.r_fixed is not None:
        rates = [search.r_fixed]
    else:
        family = gform.family
        floor = max(-lmi.jacobian_goodness(gform.lure_system, family, d)
                    for d in lmi.sampled_slopes(gform.n, gform.form.slope))
        rates = [max(1.0, floor) * (1.0 + 1e-3 * 2.0**j) for j in range(20)]
    floor_mu = dual.input_floor(lam)
    if floor_mu is None:
        return None
    for r in rates:
        if search.out_of_time:
            return None
        at_rate = _slack_at(gform, lam, math.inf, r)
        if at_rate is None:
            return None
        if at_rate.solve(lam, math.inf, r) is None:
            continue
        scale = floor_mu[0] + at_rate.eta / _ETA_RELATIVE
        for j in range(16):
            mu = floor_mu[0] + scale * 4.0**j
            if at_rate.solve(lam, mu, r) is not None:
                return lam, mu, r
        return None
    return None


def _riccati_tier(search: _Search) -> tuple[str, dict[str, int]]:
    """Tier ``riccati``: L-BFGS over (Lambda, mu[, r]) with P from the dual Riccati equation, from the
    best candidate so far or from :func:`_phase_one` (whichever starts lower; phase one only when the
    rate is searched or nothing was found), and, when the rate is searched, also from the best
    candidate at r = 1 (the bound need not be unimodal in r); the P reached is finalized and verified."""
    gform = search.gform
    starts: list[tuple[np.ndarray, float, float] | None] = []
    if search.best is not None:
        starts.append(_candidate_start(gform, search.best))
    if search.best is None or (search.r_fixed is None and search.best.r > 1.0):
        starts.append(_phase_one(search))
    scored = [(value, start) for start in starts if start is not None
              and (value := _start_value(gform, start, search.horizon)) < _BIG]
    runs = [min(scored, key=lambda item: item[0])[1]] if scored else []
    if search.r_fixed is None and search.best_at_one is not None and search.best_at_one is not search.best:
        at_one = _candidate_start(gform, search.best_at_one)
        if at_one is not None:
            runs.append(at_one)
    if not runs:
        return "no feasible starting point (rate, multipliers, mu) for the Riccati equation", {}
    reason, verified = "the Riccati equation has no stabilizing solution at the start", False
    work: Counter[str] = Counter()
    for start in runs:
        if search.out_of_time:
            break
        found = _riccati_descent(gform, start, search.horizon, search.r_fixed is None, search.deadline)
        if found is None:
            continue
        work.update(found[0].counts)
        candidate, why = _riccati_candidate(gform, found, search.horizon)
        verified = verified or candidate is not None
        reason = "verified" if verified else why
        search.offer(candidate)
    return reason, dict(work)


def _candidate_start(gform: GainForm, candidate: _Candidate) -> tuple[np.ndarray, float, float] | None:
    """(Lambda, mu, r) of a verified candidate, mu just above its closed-form smallest value."""
    mu = gform.smallest_mu(candidate.P, candidate.lam, candidate.r)
    return None if mu is None else (candidate.lam, mu * (1.0 + 1e-6) + 1e-300, candidate.r)


def _start_value(gform: GainForm, start: tuple[np.ndarray, float, float], horizon: int) -> float:
    """log of the squared bound the Riccati equation gives at ``start`` = (Lambda, mu, r); _BIG if infeasible."""
    lam, mu, r = start
    dual = _slack_at(gform, lam, mu, r)
    found = None if dual is None else dual.objective(lam, mu, r, 0.0)
    return _BIG if found is None else math.log(mu) + found[1] + _log_step_factor(gform, r, horizon)[0]


def _sdp_tier(search: _Search, solver: str) -> tuple[str, dict[str, int]]:
    """Tier ``sdp``: minimize mu at the best candidate's r (rho^2 if fixed, else 1 without one). The
    solver's answer is repaired, not trusted: its (P, Lambda) is finalized (mu in closed form), and the
    Riccati equation's P at its (Lambda, mu) as well; whatever verifies is offered."""
    gform = search.gform
    r = search.r_fixed if search.r_fixed is not None else (search.best.r if search.best is not None else 1.0)
    model = _SdpProblem(gform)
    order = ["CLARABEL", "SCS"] if model.cone <= _CLARABEL_MAX_CONE else ["SCS", "CLARABEL"]
    if solver != "auto":
        order = [solver] + [name for name in ("CLARABEL", "SCS") if name != solver]
    statuses: list[str] = []
    found = None
    for name in order:
        remaining = search.deadline - time.monotonic()
        if remaining <= 0:
            break
        start = time.monotonic()
        found, status = model.solve(r, name, remaining)
        seconds = time.monotonic() - start
        statuses.append(f"{name}: {status}, {seconds:.2f} s")
        if found is not None:
            break
        if status in ("infeasible", "infeasible_inaccurate"):
            where = "rho <= 1" if r <= 1.0 else f"rho^2 = {r:.6g}"
            return f"no bound of this family with {where} exists ({statuses[-1]})", {"solves": len(statuses)}
        if "error" not in status:
            break
    work = {"solves": len(statuses)}
    out_of_time = " after the time budget ran out" if search.out_of_time else ""
    if found is None:
        return f"no solution{out_of_time} ({'; '.join(statuses) or 'time budget exhausted'})", work
    P, lam, mu = found
    candidate, reason = _finalize(gform, 0.5 * (P + P.T), lam, r, search.horizon, with_pairs=False)
    improved = search.offer(candidate)
    dual = _slack_at(gform, lam, mu, r)
    solved = None if dual is None else dual.solve(lam, mu, r)
    if dual is not None and solved is not None:
        polished, why = _riccati_candidate(gform, (dual, lam, mu, r, solved[0]), search.horizon)
        improved = search.offer(polished) or improved
        reason = "verified" if polished is not None or candidate is not None else why
    if candidate is None and reason != "verified":
        return f"the solver's answer{out_of_time} does not verify: {reason} ({statuses[-1]})", work
    return ("verified" if improved else "verified, not better than the previous tiers") + f" ({statuses[-1]})", work


def certify_gain(
    system: LureSystem,
    U: Any,
    D: Any,
    horizon: int,
    *,
    rho: float | None = None,
    evidence: Any = None,
    time_budget: float | None = None,
    tiers: Sequence[str] | None = None,
    solver: str = "auto",
) -> GainCertificate:
    """Certify an incremental l2-gain of x -> y = D h_T over ``horizon`` input steps (module docstring).

    ``U`` (n x d) and ``D`` (k x n) are in the coordinates of ``system`` (see :func:`sequence_map`).
    ``rho``: the rate parameter per substep of (*), or None to search it (rho >= 1; 1 is the best of
    every rho <= 1). ``evidence``: a contraction certificate of ``system`` (anything with ``P`` and
    ``multipliers``, e.g. :class:`~.certificates.Evidence`) whose P the closed-form tier also starts
    from. ``time_budget`` (seconds, None: no limit) is checked between and inside tiers and passed
    to the SDP solvers, less the estimated time of the pair factors (module docstring); ``tiers`` a
    subset of :data:`GAIN_TIERS` in the order to run them (default all); ``solver`` as in
    :func:`~.certificates.certify`. The best verified bound of all tiers is reported; bad arguments
    raise :class:`InputError`.
    """
    started = time.monotonic()
    gform = gain_form(system, U, D)
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise InputError(f"horizon must be a positive integer (input steps), got {horizon!r}")
    if rho is not None and (isinstance(rho, bool) or not isinstance(rho, numbers.Real)
                            or not math.isfinite(rho) or rho <= 0):
        raise InputError(f"rho must be a finite number > 0 or None (searched), got {rho!r}")
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, numbers.Real)
                                    or not time_budget > 0):
        raise InputError(f"time_budget must be a number of seconds > 0 or None, got {time_budget!r}")
    tiers = GAIN_TIERS if tiers is None else tuple(tiers)
    unknown = [t for t in tiers if t not in GAIN_TIERS]
    if unknown or not tiers:
        raise InputError(f"tiers must be a non-empty subset of {GAIN_TIERS}, got {list(tiers)}")
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    starts: list[tuple[np.ndarray, np.ndarray | None]] = [(np.eye(gform.n), None)]
    if evidence is not None:
        starts.append(_evidence_start(gform, evidence))
    with threadpool_limits(limits=1, user_api="blas"):
        # The tiers' deadline leaves time for the pair factors of the bound they find (at most half the budget).
        reserve = 0.0 if time_budget is None else min(_pair_seconds(gform), 0.5 * float(time_budget))
    budget_end = started + (math.inf if time_budget is None else float(time_budget))
    search = _Search(gform, int(horizon), None if rho is None else float(rho) ** 2, budget_end - reserve, starts)
    attempts: list[GainAttempt] = []
    exhausted = False
    if not all(np.all(np.isfinite(X)) for X in (gform.form.out,) + gform.form.q_maps):
        return _certificate(search, None, None, [], False, time.monotonic() - started,
                            f"not certified: the lifted increment form of the {system.method} scheme overflows float64")
    with threadpool_limits(limits=1, user_api="blas"):
        for tier in tiers:
            if search.out_of_time:
                exhausted = True
                attempts.append(GainAttempt(tier, False, None, 0.0, "skipped: time budget exhausted"))
                continue
            tier_start, before, search.tier = time.monotonic(), search.best, tier
            try:
                if tier == "closed-form":
                    reason, work = _closed_form_tier(search)
                elif tier == "riccati":
                    reason, work = _riccati_tier(search)
                else:
                    reason, work = _sdp_tier(search, solver)
            except BaseException as error:
                if not is_numerical_failure(error):
                    raise
                reason, work = f"numerical failure: {type(error).__name__}: {error}", {}
            exhausted = exhausted or search.out_of_time
            best = search.best
            found = best is not None and best is not before
            attempts.append(GainAttempt(tier, found, best.lipschitz if best is not None and found else None,
                                        time.monotonic() - tier_start, reason, work))
        reported, found_by, why = _reported(search, budget_end)
    return _certificate(search, reported, found_by, attempts, exhausted, time.monotonic() - started, why)


def _reported(search: _Search, deadline: float) -> tuple[_Candidate | None, str | None, str | None]:
    """The candidate reported: the verified one with the smallest bound whose pair factors verify too
    (:func:`_with_pairs`, on the best first; the next ones only before ``deadline``, the end of the
    whole budget), with its tier and, where a smaller verified bound had to be passed over, a note
    saying so (the tiers' attempts list that bound); else None and why."""
    passed_over = None
    for candidate, tier in sorted(search.verified, key=lambda found: found[0].lipschitz):
        if passed_over is not None and time.monotonic() >= deadline:
            return None, None, f"not certified: {passed_over[2]} (the next candidates not tried: time budget exhausted)"
        try:
            full, why = _with_pairs(search.gform, candidate, search.horizon)
        except BaseException as error:
            if not is_numerical_failure(error):
                raise
            full, why = None, f"numerical failure: {type(error).__name__}: {error}"
        if full is not None:
            return full, tier, None if passed_over is None else (
                f"; the smaller bound {passed_over[0]:.6g} that {passed_over[1]} verified is not reported: {passed_over[2]}")
        passed_over = passed_over or (candidate.lipschitz, tier, why)
    return None, None, None if passed_over is None else f"not certified: {passed_over[2]}"


def _evidence_start(gform: GainForm, evidence: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(P, multipliers) of a contraction certificate, checked against the form's shapes."""
    try:
        P = np.array(evidence.P, dtype=np.float64)
        lam = np.array(evidence.multipliers, dtype=np.float64)
    except (AttributeError, TypeError, ValueError) as error:
        raise InputError(f"evidence must carry a matrix P and multipliers: {error}") from None
    shape = (gform.form.stages, gform.n)
    if P.shape != (gform.n, gform.n) or lam.size != shape[0] * shape[1]:
        raise InputError(f"evidence must have P of shape {(gform.n, gform.n)} and {shape[0] * shape[1]} "
                         f"multipliers, got P {P.shape} and {lam.size}")
    if not (np.all(np.isfinite(P)) and np.all(np.isfinite(lam))):
        raise InputError("evidence has non-finite entries")
    return 0.5 * (P + P.T), np.maximum(lam.reshape(shape), 0.0)


def _held(gform: GainForm, horizon: int, candidate: _Candidate, tier: str, seconds: float, reason: str) -> GainCertificate:
    return GainCertificate(True, gform.family, horizon,
                           candidate.lipschitz, candidate.pair_bounds, candidate.mu, candidate.r, candidate.output_factor,
                           candidate.pair_factors, candidate.P, candidate.lam, tier, candidate.verification, seconds, reason)


def _failed(gform: GainForm, horizon: int, seconds: float, reason: str) -> GainCertificate:
    return GainCertificate(False, gform.family, horizon, None, None, None, None, None, None, None, None, None, None, seconds, reason)


def certificate_at(gform: GainForm, P: Any, multipliers: Any, r: float, horizon: int, tier: str) -> GainCertificate:
    """The bound that a given (P, multipliers, r) proves (e.g. a construction's), labelled ``tier``:
    the smallest mu and the readout factors in closed form, backed off until they verify in float64
    (as every tier's candidates are); not ``holds`` with the reason when (P, Lambda, r) admit none."""
    started = time.monotonic()
    with threadpool_limits(limits=1, user_api="blas"):
        candidate, reason = _finalize(gform, P, multipliers, r, horizon)
    seconds = time.monotonic() - started
    if candidate is None:
        return _failed(gform, horizon, seconds, f"not certified: {reason}")
    v = candidate.verification
    return _held(gform, horizon, candidate, tier, seconds,
                 f"verified in float64 (LMI margin {v.margin:.3e}, readout margin {v.output_margin:.3e})")


def certificate_from_evidence(gform: GainForm, P: Any, multipliers: Any, r: float, mu: float, output_factor: float,
                              pair_factors: Any, horizon: int, tier: str) -> GainCertificate:
    """The bound that stored evidence proves over ``horizon`` steps, after :func:`verify_gain`
    checks it in float64 exactly as given (nothing is repaired); not ``holds`` with the reason otherwise."""
    started = time.monotonic()
    P = np.asarray(P, dtype=np.float64)
    lam = np.asarray(multipliers, dtype=np.float64)
    pairs = np.asarray(pair_factors, dtype=np.float64)
    with threadpool_limits(limits=1, user_api="blas"):
        v = verify_gain(gform, P, lam, r, mu, output_factor, pairs)
    seconds = time.monotonic() - started
    if not v.passed:
        return _failed(gform, horizon, seconds, f"not certified: float64 verification failed: {v.reason}")
    pair_bounds = _pair_bounds(gform, r, mu, pairs, horizon)
    candidate = _Candidate(P, lam.reshape(gform.form.stages, gform.n), float(r), float(mu), float(output_factor), pairs,
                           v, _bound(gform, r, mu, output_factor, horizon), pair_bounds)
    return _held(gform, horizon, candidate, tier, seconds,
                 f"verified from stored evidence in float64 (LMI margin {v.margin:.3e}, readout margin {v.output_margin:.3e})")


def _certificate(search: _Search, best: _Candidate | None, tier: str | None, attempts: list[GainAttempt], exhausted: bool,
                 seconds: float, reason: str | None = None) -> GainCertificate:
    """The search's certificate for ``best`` found by ``tier``; ``reason``: why none holds, or a note
    appended to the verified one's."""
    family, horizon = search.gform.family, search.horizon
    if best is None:
        if reason is None:
            reason = "no verified bound (" + "; ".join(f"{a.tier}: {a.reason}" for a in attempts) + ")"
            if exhausted:
                reason += " (time budget exhausted)"
        return GainCertificate(False, family, horizon, None, None, None, None, None, None, None, None, None, None,
                               seconds, reason, tuple(attempts), exhausted)
    v = best.verification
    return GainCertificate(True, family, horizon, best.lipschitz, best.pair_bounds, best.mu, best.r,
                           best.output_factor, best.pair_factors, best.P, best.lam, tier, v, seconds,
                           f"verified in float64 (LMI margin {v.margin:.3e}, readout margin {v.output_margin:.3e})"
                           + (reason or ""), tuple(attempts), exhausted)
