"""Tier ``riccati``: full-P certificates from algebraic Riccati equations, O(n^3) per solve.

Partition the lifted LMI of :mod:`.forms` as xi = (delta, p), p = (p_1, ..., p_m), with
the dynamics out = [F0, B] (delta' or delta+ = F0 delta + B p) and the multiplier term
Sigma(Lambda) = [[0, S], [S^T, -R]] (for ct and euler S = L W^T Lambda, R = 2 Lambda; for
rk2/rk4 R also holds the stage coupling, R = 2 Lambda - L sym(Lambda G_pp)). For fixed
Lambda and rate the LMI M(P, Lambda, r) < 0 is, by a Schur complement, a Riccati
inequality in P:

* ct (rate a), Ac = A + a I:
  R > 0 and Ac^T P + P Ac + (P B + S) R^{-1} (B^T P + S^T) < 0; with B = I this is
  (A + a I + L W / 2)^T P + P (A + a I + L W / 2) + P (2 Lambda)^{-1} P + (L^2 / 2) W^T Lambda W < 0.
* discrete (r = rho^2), F = F0 / rho, G = B / rho, S_r = S / r, R_r = R / r:
  R_r - G^T P G > 0 and F^T P F - P + (F^T P G + S_r)(R_r - G^T P G)^{-1}(G^T P F + S_r^T) < 0
  (euler: F = Ah / rho, G = (eps / rho) I, S_r = L W^T Lambda / r, R_r = 2 Lambda / r).

Replacing "< 0" by "= -eta I" gives algebraic Riccati equations. Their stabilizing
solution (closed loop Ac + B K Hurwitz, or F + G K Schur, K the maximizing p = K delta)
is the smallest P satisfying the inequality, and it exists iff the rate is feasible for
that Lambda. It is computed by Newton-Kleinman steps (one Lyapunov or Stein equation
each) warm-started from the previous solution; steps reuse the last real Schur form of a
closed loop while that still contracts the residual (chord steps), and the Schur-form
equations are solved by recursive blocking (matrix products instead of LAPACK's unblocked
trsyl). Without a previous solution Newton starts from P = 0 and falls back to scipy's
Schur method with X = -P: ``solve_continuous_are(Ac, B, -eta I, R, s=-S)`` and
``solve_discrete_are(F, G, -eta I, R_r, s=-S_r)`` (substitute X = -P into scipy's
A^T X + X A - (X B + s) R^{-1} (B^T X + s^T) + q = 0 and its discrete twin). A solution
counts only if the LMI's Schur complement at that rate is negative definite, its closed
loop is stable and cond(P) <= KAPPA_MAX (the bound of the SDP tiers: gain sqrt(cond P) <= 100).

Outer loop, alternating until the rate stops improving:

1. for the current Lambda, bisection on the rate up to the necessary bound from frozen
   Jacobians (if no contracting rate is feasible at the start, the bisection starts from
   a non-contracting one and the loop below must cross into contraction);
2. a multiplier step at the rate reached: L-BFGS descent on the barrier log tr Y(Lambda),
   Y the Gramian of the closed loop, which blows up where the rate stops being feasible
   for Lambda (gradient by the adjoint method, see :func:`_gramian_objective`).

Every (P, Lambda) met at the end of a bisection goes to :func:`.lmi.finalize`: best rate
for that pair in closed form, backed off, verified in float64. Lambda starts at I (for a
common multiplier c I the scale is immaterial: the LMI is homogeneous in (P, Lambda)).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.linalg

from .forms import IncrementalForm
from .lmi import KAPPA_MAX, Candidate, TierOutcome, finalize

__all__ = ["RICCATI_TIER", "RiccatiSolver", "lbfgs_minimize", "riccati_tier"]

RICCATI_TIER = "riccati"
# Slack eta of the Riccati equation, eta = c mean(Lambda) (the LMI is homogeneous in
# (P, Lambda, eta)). Its terms are of size mean(Lambda) scale^2 (scale = ||A|| + L ||W|| for
# ct, 1 for discrete), so c starts at _ETA_RELATIVE scale^2. The stabilizing solution is the
# smallest P, so too small an eta leaves P nearly singular where the system has slack
# (cond P > KAPPA_MAX on the norm-certified digits model at 1e-6; 1e-4 certifies it).
# Too large an eta costs rate: if P* satisfies the LMI at goodness g*, it satisfies it with
# slack eta at g* - eta / (2 lambda_min(P*)) (ct) or g* - r eta / lambda_min(P*) (discrete).
# So after every rate search c is lowered until that cost is at most _ETA_RATE_COST of the
# rate range at the P reached (c never grows, so the rates searched stay comparable).
_ETA_RELATIVE = 1e-4
_ETA_RATE_COST = 1e-3
_BISECTION_RTOL = 1e-3
_MAX_ROUNDS = 25
_ROUND_RTOL = 1e-4
_DESCENT_STEPS = 12
_LBFGS_MEMORY = 8
_BACKTRACKS = 6
_MAX_LOG_STEP = 2.0
# Newton-Kleinman: at most _NEWTON_STEPS Schur factorizations per solve, and _NEWTON_ITERATIONS
# steps in all. A step may reuse the last factorization (a chord step, about a fifth of the cost
# at n = 256) while it cuts the residual by _CHORD_CONTRACTION; see RiccatiSolver._newton.
_NEWTON_STEPS = 8
_NEWTON_ITERATIONS = 16
_CHORD_CONTRACTION = 0.25
# A cold start (no previous solution) runs Newton from P = 0 with this many times the steps,
# then scipy's Schur method (a QZ of order 2n, seconds at n = 256) if that fails inconclusively.
_COLD_FACTOR = 4
# Order below which the Schur-form equations go to LAPACK's trsyl unsplit.
_SYLVESTER_LEAF = 48
_PHASE_ONE_DOUBLINGS = 12
_BIG = 1e300


class _Solution(NamedTuple):
    """Stabilizing Riccati solution P with K (p = K delta), the closed loop, B (or G) and H.

    H = R (ct) or R_r - G^T P G (discrete); closed = Ac + B K (ct) or F + G K (discrete);
    ``lyapunov`` holds the Schur form of ``closed``.
    """

    P: np.ndarray
    K: np.ndarray
    closed: np.ndarray
    B: np.ndarray
    H: np.ndarray
    lyapunov: _Lyapunov


def _split(T: np.ndarray, k: int) -> int:
    """k, or k + 1 where k would cut a 2 x 2 block of the quasi-triangular T."""
    return k + 1 if T[k, k - 1] != 0.0 else k


def _trsyl(A: np.ndarray, B: np.ndarray, C: np.ndarray) -> np.ndarray:
    """X with A X + X B^T = C (LAPACK trsyl; A, B upper quasi-triangular in Schur canonical form)."""
    trsyl = scipy.linalg.get_lapack_funcs("trsyl", (A, B, C))
    X, scale, info = trsyl(A, B, C, trana="N", tranb="T")
    if info < 0:
        raise np.linalg.LinAlgError(f"trsyl failed with info {info}")
    return X / scale


def _sylvester(A: np.ndarray, B: np.ndarray, C: np.ndarray) -> np.ndarray:
    """X with A X + X B^T = C, A and B upper quasi-triangular, by recursive blocking.

    LAPACK's trsyl is unblocked (BLAS level 2): at n = 256 it takes as long as the Schur
    form. Splitting A = [[A11, A12], [0, A22]] gives A22 X2 + X2 B^T = C2, then
    A11 X1 + X1 B^T = C1 - A12 X2; splitting B likewise by columns; all the work but the
    small diagonal blocks is matrix products.
    """
    m, n = C.shape
    if max(m, n) <= _SYLVESTER_LEAF:
        return _trsyl(A, B, C)
    if m >= n:
        k = _split(A, m // 2)
        X2 = _sylvester(A[k:, k:], B, C[k:])
        X1 = _sylvester(A[:k, :k], B, C[:k] - A[:k, k:] @ X2)
        return np.vstack([X1, X2])
    k = _split(B, n // 2)
    X2 = _sylvester(A, B[k:, k:], C[:, k:])
    X1 = _sylvester(A, B[:k, :k], C[:, :k] - X2 @ B[:k, k:].T)
    return np.hstack([X1, X2])


def _lyapunov_triangular(T: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Symmetric X with T X + X T^T = C for symmetric C, T upper quasi-triangular, by recursive blocking.

    With T = [[T11, T12], [0, T22]]: T22 X22 + X22 T22^T = C22, then the Sylvester equation
    T11 X12 + X12 T22^T = C12 - T12 X22, then T11 X11 + X11 T11^T = C11 - T12 X12^T - X12 T12^T.
    """
    n = C.shape[0]
    if n <= _SYLVESTER_LEAF:
        return _trsyl(T, T, C)
    k = _split(T, n // 2)
    X22 = _lyapunov_triangular(T[k:, k:], C[k:, k:])
    X12 = _sylvester(T[:k, :k], T[k:, k:], C[:k, k:] - T[:k, k:] @ X22)
    coupling = T[:k, k:] @ X12.T
    X11 = _lyapunov_triangular(T[:k, :k], C[:k, :k] - coupling - coupling.T)
    return np.block([[X11, X12], [X12.T, X22]])


class _Lyapunov:
    """Solves A^T X + X A + Q = 0 and A X + X A^T + Q = 0 (ct) or the Stein equations
    A^T X A - X + Q = 0 and A X A^T - X + Q = 0 (discrete) with one real Schur form.

    The Stein equations go through the Cayley transform C = (A - I)(A + I)^{-1} = I - 2 S,
    S = (A + I)^{-1} (as scipy's ``solve_discrete_lyapunov`` does): A X A^T - X + Q = 0 iff
    C X + X C^T = -2 S Q S^T, and A^T X A - X + Q = 0 iff C^T X + X C = -2 S^T Q S. With
    C (or A) = Z T Z^T, X = Z Y Z^T and Y solves the triangular equation with right side
    -c V Q V^T, V = Z^T (ct), Z^T S or Z^T S^T (discrete), formed once per factorization.
    The transposed equations use the flipped form J T^T J (J the exchange matrix), again
    upper quasi-triangular. ``stable``: A is Hurwitz (ct) or Schur stable (discrete), read off
    the Schur form (real parts of the eigenvalues of A, or of C: negative iff |eig A| < 1).
    """

    def __init__(self, A: np.ndarray, discrete: bool) -> None:
        identity = np.eye(A.shape[0])
        shifted = np.linalg.inv(A + identity) if discrete else None
        self.T, self.Z = scipy.linalg.schur(A if shifted is None else identity - 2.0 * shifted, output="real")
        self.flipped = np.ascontiguousarray(self.T[::-1, ::-1].T)
        self.stable = bool(np.all(np.isfinite(self.T)) and np.diag(self.T).max() < 0)
        Zt = self.Z.T
        self.coefficient = 2.0 if discrete else 1.0
        self.left = (Zt, Zt) if shifted is None else (Zt @ shifted, Zt @ shifted.T)

    def solve(self, Q: np.ndarray, transposed: bool) -> np.ndarray:
        """X with A X + X A^T + Q = 0 / A X A^T - X + Q = 0, or their transposes (A -> A^T)."""
        V = self.left[transposed]
        C = -self.coefficient * (V @ Q @ V.T)
        if transposed:
            Y = _lyapunov_triangular(self.flipped, C[::-1, ::-1])[::-1, ::-1]
        else:
            Y = _lyapunov_triangular(self.T, C)
        X = self.Z @ Y @ self.Z.T
        return 0.5 * (X + X.T)


class RiccatiSolver:
    """Solves the Riccati equation of ``form`` for given (Lambda, r, eta), warm-started from the last solution.

    Newton stops once ||Res(P)||_F <= ``tolerance`` * eta. Counts its work: ``solves``
    (Riccati solves), ``factorizations`` (real Schur forms) and ``lyapunov_solves`` (Lyapunov
    or Stein equations solved in a Schur form).
    """

    def __init__(self, form: IncrementalForm, tolerance: float = 0.25) -> None:
        self.form = form
        self.tolerance = tolerance
        self._multiplier_terms: tuple[bytes, np.ndarray, np.ndarray] | None = None
        self.warm: _Solution | None = None
        self.solves = 0
        self.factorizations = 0
        self.lyapunov_solves = 0

    def counts(self) -> dict[str, int]:
        return {"riccati_solves": self.solves, "schur_forms": self.factorizations, "lyapunov_solves": self.lyapunov_solves}

    def factor(self, closed: np.ndarray) -> _Lyapunov:
        self.factorizations += 1
        with np.errstate(all="ignore"):
            return _Lyapunov(closed, not self.form.continuous)

    def lyapunov(self, factored: _Lyapunov, Q: np.ndarray, transposed: bool) -> np.ndarray:
        self.lyapunov_solves += 1
        with np.errstate(all="ignore"):
            return factored.solve(Q, transposed)

    def _data(self, lam: np.ndarray, r: float) -> tuple[np.ndarray, ...] | None:
        """(F, B, S, R) of the equation at rate ``r``: ct shifted by r I, discrete scaled by 1/rho."""
        form, n = self.form, self.form.n
        key = lam.tobytes()
        if self._multiplier_terms is None or self._multiplier_terms[0] != key:
            Sigma, _ = form.assemble(np.zeros((n, n)), lam, 0.0)
            self._multiplier_terms = (key, Sigma[:n, n:], -Sigma[n:, n:])
        _, S, R = self._multiplier_terms
        F, B = form.out[:, :n], form.out[:, n:]
        if form.continuous:
            return F + r * np.eye(n), B, S, R
        if r <= 0:
            return None
        rho = np.sqrt(r)
        return F / rho, B / rho, S / r, R / r

    def _gain(self, P: np.ndarray, F: np.ndarray, B: np.ndarray, S: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K = H^{-1} (B^T P + S^T) (ct) or H^{-1} (G^T P F + S^T) (discrete); Cholesky where H > 0."""
        H = R if self.form.continuous else R - B.T @ P @ B
        rhs = (B.T @ P if self.form.continuous else B.T @ P @ F) + S.T
        try:
            return scipy.linalg.cho_solve(scipy.linalg.cho_factor(H), rhs), H
        except np.linalg.LinAlgError:
            return np.linalg.solve(H, rhs), H

    def _residual(self, P: np.ndarray, K: np.ndarray, H: np.ndarray, F: np.ndarray, eta: float) -> np.ndarray:
        """Riccati residual; with K the maximizer the quadratic term is K^T H K."""
        if self.form.continuous:
            core = F.T @ P + P @ F
        else:
            core = F.T @ P @ F - P
        residual = core + K.T @ H @ K + eta * np.eye(self.form.n)
        return 0.5 * (residual + residual.T)

    def _newton(
        self, P: np.ndarray, factored: _Lyapunov | None, data: tuple[np.ndarray, ...], eta: float, budget: int = 1
    ) -> tuple[np.ndarray | None, bool]:
        """Newton-Kleinman from P: (F + B K)^T dP + dP (F + B K) = -Res(P) (ct) or the Stein twin.

        ``factored`` (the Schur form of the closed loop at the last solution, for other data)
        serves chord steps dP = -L0^{-1} Res(P) while each cuts ||Res|| by _CHORD_CONTRACTION;
        otherwise the closed loop at the current P is factored (a true Newton step), from the
        previous iterate if the chord step made the residual grow. Only the residual decides
        convergence, so chord steps change the work, not the accuracy of the solution.
        After a first Newton step the residual is positive semidefinite (the Riccati operator
        is convex in P), and from a stabilizing start exact Newton steps increase toward the
        stabilizing solution with stable closed loops all the way if that solution exists
        (Kleinman's theorem, for X = -P); so a later Newton step from an unstable closed loop
        ends the iteration (the rate counts as infeasible). With chord steps in between this is
        a heuristic, which can only cost rate. From P = 0 the residual eta I + S R^{-1} S^T
        (ct; discrete alike) is already positive semidefinite. ``budget`` multiplies the step
        limits. Returns (P or None, whether it stopped that way after a start from a stable
        closed loop).
        """
        F, B, S, R = data
        previous: tuple[np.ndarray, np.ndarray, np.ndarray, float] | None = None
        fresh = False
        newton_steps = 0
        stable_start = False
        for _ in range(budget * _NEWTON_ITERATIONS):
            K, H = self._gain(P, F, B, S, R)
            closed = F + B @ K
            residual = self._residual(P, K, H, F, eta)
            norm = float(np.linalg.norm(residual))
            if not np.isfinite(norm):
                return None, False
            if norm <= self.tolerance * eta:
                return P, False
            if previous is not None and not fresh and norm > _CHORD_CONTRACTION * previous[3]:
                if norm > previous[3]:
                    P, closed, residual, norm = previous
                factored = None
            if factored is None:
                if newton_steps == budget * _NEWTON_STEPS:
                    return None, False
                factored = self.factor(closed)
                if newton_steps and not factored.stable:
                    return None, stable_start
                if not newton_steps:
                    stable_start = factored.stable
                newton_steps += 1
                fresh = True
            else:
                fresh = False
            step = self.lyapunov(factored, residual, transposed=True)
            if not np.all(np.isfinite(step)):
                return None, False
            previous = (P, closed, residual, norm)
            P = P + step
        return None, False

    def solve(self, lam: np.ndarray, r: float, eta: float) -> _Solution | None:
        """The stabilizing solution at (Lambda, r) if it satisfies the LMI strictly with cond(P) <= KAPPA_MAX.

        Newton-Kleinman from the last solution; when there is none yet, from P = 0, then by
        scipy's Schur method unless that iteration started from a stable closed loop and met an
        unstable one (see :meth:`_newton`). (Newton from a
        nearby solution converges where the rate is feasible; where it fails the rate is taken as
        infeasible, which can only cost rate, never soundness.)
        """
        form, n = self.form, self.form.n
        lam = np.asarray(lam, dtype=np.float64).reshape(form.stages, n)
        data = self._data(lam, r)
        if data is None:
            return None
        F, B, S, R = data
        self.solves += 1
        try:
            np.linalg.cholesky(R)
            if self.warm is not None:
                P, _ = self._newton(self.warm.P, self.warm.lyapunov, data, eta)
                if P is None:
                    return None
            else:
                P, infeasible = self._newton(np.zeros((n, n)), None, data, eta, budget=_COLD_FACTOR)
                if infeasible:
                    return None
            if P is None:
                with np.errstate(all="ignore"):
                    if form.continuous:
                        X = scipy.linalg.solve_continuous_are(F, B, -eta * np.eye(n), R, s=-S)
                    else:
                        X = scipy.linalg.solve_discrete_are(F, B, -eta * np.eye(n), R, s=-S)
                P = -0.5 * (X + X.T)
            if not np.all(np.isfinite(P)):
                return None
            eigs = np.linalg.eigvalsh(P)
            if not (eigs[0] > 0 and eigs[-1] <= KAPPA_MAX * eigs[0]):
                return None
            # The LMI itself decides: the Schur complement of the p-block at this rate must be
            # negative definite (Cholesky of its negative).
            parts = form.schur(P, lam)
            if parts is None:
                return None
            np.linalg.cholesky(-(parts[0] + (2.0 * r if form.continuous else -r) * P))
            K, H = self._gain(P, F, B, S, R)
            closed = F + B @ K
            lyapunov = self.factor(closed)
        except (np.linalg.LinAlgError, ValueError):
            return None
        if not lyapunov.stable:
            return None
        self.warm = _Solution(P, K, closed, B, H, lyapunov)
        return self.warm


def _gramian_objective(
    solver: RiccatiSolver, theta: np.ndarray, r: float, eta_coef: float = _ETA_RELATIVE
) -> tuple[float, np.ndarray]:
    """f(theta) = log tr Y for Lambda = exp(theta), Y the Gramian of the Riccati closed loop, and its gradient.

    The slack is eta = eta_coef mean(Lambda).

    Where the rate stops being feasible for Lambda the closed loop loses stability and Y
    blows up: f is a barrier, and decreasing it at the rate reached moves Lambda to where
    a better rate is feasible. f is invariant under Lambda -> c Lambda. Gradient by the
    adjoint method. ct, Acl = Ac + B K, K = R^{-1}(B^T P + S^T), Acl Y + Y Acl^T + I = 0:
    with Acl^T Z + Z Acl + I = 0, d tr Y = 2 tr(Y Z B dK); D = Y Z B H^{-1},
    V = B D^T + D B^T. Discrete, Fcl = F + G K, K = H^{-1}(G^T P F + S^T), H = R - G^T P G,
    Y = Fcl Y Fcl^T + I: Z = Fcl^T Z Fcl + I, D = Y Fcl^T Z G H^{-1}, V = Fcl D G^T + G D^T Fcl^T.
    The dP terms go through U (Acl U + U Acl^T + V = 0, or U = Fcl U Fcl^T + V), and
    d tr Y = c tr(Xi dSigma) + tr(U) d eta with Xi = Psi U Psi^T + [[0, D], [D^T, K D + D^T K^T]],
    Psi = [I; K], c = 1 (ct) or 1/r; dSigma / dLambda_{s,i} is read off the form's G_s.
    """
    form = solver.form
    n, m, L = form.n, form.stages, form.slope
    lam = np.exp(theta).reshape(m, n)
    solution = solver.solve(lam, r, eta_coef * float(lam.mean()))
    if solution is None:
        return _BIG, np.zeros_like(theta)
    _, K, closed, B, H, lyapunov = solution
    identity = np.eye(n)
    try:
        Y = solver.lyapunov(lyapunov, identity, transposed=False)
        Z = solver.lyapunov(lyapunov, identity, transposed=True)
        with np.errstate(all="ignore"):
            if form.continuous:
                D = np.linalg.solve(H.T, (Y @ Z @ B).T).T
                V = B @ D.T
            else:
                D = np.linalg.solve(H.T, (Y @ closed.T @ Z @ B).T).T
                V = closed @ D @ B.T
        U = solver.lyapunov(lyapunov, V + V.T, transposed=False)
    except (np.linalg.LinAlgError, ValueError):
        return _BIG, np.zeros_like(theta)
    trace = float(np.trace(Y))
    if not (np.isfinite(trace) and trace > 0 and np.all(np.isfinite(U))):
        return _BIG, np.zeros_like(theta)
    Psi = np.vstack([identity, K])
    Xi = Psi @ U @ Psi.T
    Xi[:n, n:] += D
    Xi[n:, :n] += D.T
    KD = K @ D
    Xi[n:, n:] += KD + KD.T
    Xi = 0.5 * (Xi + Xi.T)
    c = 1.0 if form.continuous else 1.0 / r
    grad = np.empty((m, n))
    for s, G in enumerate(form.q_maps):
        rows = slice(n * (s + 1), n * (s + 2))
        grad[s] = 2.0 * c * (L * np.einsum("ij,ij->i", G, Xi[rows, :]) - np.diag(Xi[rows, rows]))
    grad += np.trace(U) * eta_coef / (n * m)
    return float(np.log(trace)), (grad * lam / trace).ravel()


def _lbfgs_direction(g: np.ndarray, memory: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """-H g by the L-BFGS two-loop recursion over ``memory`` ((s, y, 1 / s^T y), oldest first);
    with an empty memory -g scaled to a largest entry of 0.5."""
    if not memory:
        return -g * (0.5 / max(float(np.abs(g).max()), 1e-300))
    direction = -g
    alphas = []
    for s_k, y_k, rho_k in reversed(memory):
        alpha = rho_k * float(s_k @ direction)
        alphas.append(alpha)
        direction = direction - alpha * y_k
    s_k, y_k, rho_k = memory[-1]
    direction = direction / (rho_k * float(y_k @ y_k))
    for (s_k, y_k, rho_k), alpha in zip(memory, reversed(alphas)):
        direction = direction + (alpha - rho_k * float(y_k @ direction)) * s_k
    return direction


def lbfgs_minimize(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], z: np.ndarray, deadline: float, *,
                   iterations: int, backtracks: int, max_step: float, memory: int = _LBFGS_MEMORY,
                   stall_tolerance: float | None = None) -> np.ndarray:
    """Minimize ``fun`` (value, gradient) from ``z``: L-BFGS directions, Armijo backtracking.

    The memory keeps the last ``memory`` steps with positive curvature (and is dropped if its
    direction does not descend). A trial that fails the Armijo test, or lands where the value is
    _BIG (infeasible), is shortened 4-fold, at most ``backtracks`` times and not past the
    deadline; no step changes a coordinate by more than ``max_step``. Stops after ``iterations``
    steps, at the deadline, when no trial is accepted, or (with ``stall_tolerance``) when a step
    lowers the value by at most ``stall_tolerance`` * max(1, |value|). Returns the last accepted point.
    """
    f, g = fun(z)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(iterations):
        if f >= _BIG or not np.any(g) or time.monotonic() >= deadline:
            break
        direction = _lbfgs_direction(g, pairs)
        if float(g @ direction) >= 0:
            pairs.clear()
            direction = _lbfgs_direction(g, pairs)
        slope = float(g @ direction)
        t = min(1.0, max_step / float(np.abs(direction).max()))
        accepted = False
        for _ in range(backtracks):
            trial = z + t * direction
            f_trial, g_trial = fun(trial)
            accepted = f_trial <= f + 1e-4 * t * slope
            if accepted or time.monotonic() >= deadline:
                break
            t *= 0.25
        if not accepted:
            break
        s_k, y_k = trial - z, g_trial - g
        curvature = float(s_k @ y_k)
        if curvature > 0:
            pairs.append((s_k, y_k, 1.0 / curvature))
            del pairs[:-memory]
        stalled = stall_tolerance is not None and f - f_trial <= stall_tolerance * max(1.0, abs(f))
        z, f, g = trial, f_trial, g_trial
        if stalled:
            break
    return z


def _descend(solver: RiccatiSolver, theta: np.ndarray, r: float, eta_coef: float, deadline: float) -> np.ndarray:
    """Minimize :func:`_gramian_objective` over theta = log Lambda by :func:`lbfgs_minimize` (no step
    changes a multiplier by more than a factor e^_MAX_LOG_STEP); the result centred, as Lambda's
    scale is free."""
    theta = lbfgs_minimize(lambda th: _gramian_objective(solver, th, r, eta_coef), theta, deadline,
                           iterations=_DESCENT_STEPS, backtracks=_BACKTRACKS, max_step=_MAX_LOG_STEP)
    return theta - theta.mean()


def _raise_rate(
    solver: RiccatiSolver,
    lam: np.ndarray,
    g_lo: float,
    g_hi: float,
    first_step: float,
    tolerance: float,
    eta_coef: float,
    deadline: float,
) -> tuple[np.ndarray | None, float]:
    """Largest feasible goodness in (g_lo, g_hi) for fixed ``lam``: (P, goodness), P None if none.

    Steps up from g_lo (a rate already reached) by ``first_step``, doubling while feasible,
    then bisects down to ``tolerance``; a Lambda with no better rate costs one solve.
    """
    form = solver.form
    eta = eta_coef * float(lam.mean())
    best_P: np.ndarray | None = None
    step = max(first_step, tolerance)
    trial = min(g_lo + step, 0.5 * (g_lo + g_hi))
    expanding = True
    while time.monotonic() < deadline and g_hi - g_lo > tolerance:
        solution = solver.solve(lam, form.from_goodness(trial), eta)
        if solution is not None:
            best_P, g_lo = solution.P, trial
            if expanding:
                step *= 2.0
                trial = min(g_lo + step, 0.5 * (g_lo + g_hi))
                continue
        else:
            expanding = False
            g_hi = trial
        trial = 0.5 * (g_lo + g_hi)
    return best_P, g_lo


def _phase_one_floor(solver: RiccatiSolver, lam: np.ndarray, span: float, eta_coef: float) -> float | None:
    """A goodness at which the Riccati equation is solvable for ``lam``: the weakest rate, or
    weaker (non-contracting) ones, doubling the distance; None if none is found."""
    form = solver.form
    eta = eta_coef * float(lam.mean())
    for k in range(_PHASE_ONE_DOUBLINGS):
        g = form.weakest - (2.0**k - 1.0) * span
        if form.continuous or form.from_goodness(g) > 0:
            if solver.solve(lam, form.from_goodness(g), eta) is not None:
                return g - 0.5 * _BISECTION_RTOL * span
    return None


def _lower_eta(solver: RiccatiSolver, P: np.ndarray, lam: np.ndarray, r: float, span: float, eta_coef: float) -> float:
    """The eta coefficient for the next round: toward the one whose slack costs at most
    _ETA_RATE_COST * span of goodness at P (see _ETA_RATE_COST), never above ``eta_coef``.

    A smaller eta makes P more nearly singular; a target whose solution at (Lambda, r)
    breaks the cond(P) cap is replaced by the geometric mean with the current one (twice),
    else the current coefficient is kept.
    """
    form = solver.form
    p_min = float(np.linalg.eigvalsh(P)[0])
    per_goodness = 2.0 * p_min if form.continuous else p_min / max(r, 1e-300)
    target = _ETA_RATE_COST * span * per_goodness / float(lam.mean())
    for _ in range(3):
        if target >= eta_coef:
            return eta_coef
        if solver.solve(lam, r, target * float(lam.mean())) is not None:
            return target
        target = float(np.sqrt(target * eta_coef))
    return eta_coef


def riccati_tier(form: IncrementalForm, g_upper: float, deadline: float) -> TierOutcome:
    """Tier ``riccati``: rate search with Riccati solves, alternating with a multiplier step."""
    start = time.monotonic()
    n, m = form.n, form.stages
    solver = RiccatiSolver(form)
    span = max(g_upper - form.weakest, 1e-12 * form.scale)
    tolerance = _BISECTION_RTOL * span
    best: Candidate | None = None
    reason = "no rate is feasible for the multipliers reached"
    lam = np.ones((m, n))
    eta_coef = _ETA_RELATIVE * form.scale**2
    floor = _phase_one_floor(solver, lam, span, eta_coef)
    if floor is None:
        P, g_feasible = None, form.weakest
    else:
        P, g_feasible = _raise_rate(solver, lam, floor, g_upper, 0.25 * (g_upper - floor), tolerance, eta_coef, deadline)
    gain = 0.25 * span
    for _ in range(_MAX_ROUNDS):
        if P is None:
            break
        eta_coef = _lower_eta(solver, P, lam, form.from_goodness(g_feasible), span, eta_coef)
        if g_feasible > form.weakest:
            candidate, why = finalize(form, P, lam)
            if candidate is not None and (best is None or form.goodness(candidate.r) > form.goodness(best.r)):
                best = candidate
            elif best is None:
                reason = why
        if time.monotonic() >= deadline or gain <= _ROUND_RTOL * span:
            break
        theta = _descend(solver, np.log(lam).ravel(), form.from_goodness(g_feasible), eta_coef, deadline)
        lam = np.exp(theta).reshape(m, n)
        P, g_next = _raise_rate(solver, lam, g_feasible, g_upper, gain, tolerance, eta_coef, deadline)
        gain, g_feasible = g_next - g_feasible, g_next
    if best is not None:
        reason = "verified"
    exhausted = time.monotonic() >= deadline
    return TierOutcome(RICCATI_TIER, best, time.monotonic() - start, solver.solves, None, reason, exhausted,
                       solver.counts())
