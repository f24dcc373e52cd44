"""Lifted incremental quadratic forms behind every LMI certificate.

Increments: delta = h - h~ and, for each stage s of the scheme, q_s = W delta_s and
p_s = sigma(W h_s + u) - sigma(W h~_s + u), which satisfies the incremental sector
condition p_s,i (L q_s,i - p_s,i) >= 0 for every i. Lift xi = (delta, p_1, ..., p_m)
in R^N, N = (m + 1) n. Every scheme is linear in xi:

* ``ct``    delta' = F xi with F = [A, I], q_1 = W delta;
* ``euler``, ``rk2``, ``rk4``, ``rk38`` (explicit Runge-Kutta with tableau (a, b), step eps;
  ``rk38`` is the 3/8 rule, a = [[], [1/3], [-1/3, 1], [1, -1, 1]], b = [1, 3, 3, 1]/8):
  delta_1 = delta, k_j = A delta_j + p_j, delta_i = delta + eps sum_{j<i} a_ij k_j,
  q_i = W delta_i and delta+ = delta + eps sum_i b_i k_i = C xi;
  e.g. RK2 gives C = [I + eps A + eps^2 A^2/2, (eps^2/2) A, eps I];
* ``map``   delta+ = p_1 with q_1 = W delta.

With V(delta) = delta^T P delta and diagonal multipliers Lambda_s >= 0 the
S-procedure gives the matrix (linear in P, Lambda for a fixed rate parameter r)

  ct:       M = E0^T P F + F^T P E0 + 2 r E0^T P E0 + Sigma(Lambda)
  discrete: M = C^T P C - r E0^T P E0 + Sigma(Lambda),
  Sigma(Lambda) = sum_s L (E_s^T Lambda_s G_s + G_s^T Lambda_s E_s) - 2 E_s^T Lambda_s E_s,

where E0 xi = delta, E_s xi = p_s and G_s xi = q_s, so that
xi^T Sigma xi = sum_s 2 p_s^T Lambda_s (L q_s - p_s) >= 0. If M <= -m I with m >= 0 then
d/dt V <= -2 r V (ct, r = a is the decay rate) or V(delta+) <= r V(delta)
(discrete, r = rho^2). For Euler, with Ah = I + eps A, this is exactly
[[Ah^T P Ah - rho^2 P, eps Ah^T P + L W^T Lambda], [eps P Ah + L Lambda W, eps^2 P - 2 Lambda]].
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.linalg

from ..errors import InputError
from ..lure import LureSystem
from .spectra import UNDERFLOW_FLOOR, UNIT_ROUNDOFF

__all__ = ["IncrementalForm", "incremental_form"]

_FAMILIES = ("ct", "euler", "rk2", "rk4", "rk38", "map")
_TABLEAUS: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "euler": (((0.0,),), (1.0,)),
    "rk2": (((0.0, 0.0), (0.5, 0.0)), (0.0, 1.0)),
    "rk4": (
        ((0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0), (0.0, 0.5, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0)),
        (1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0),
    ),
    "rk38": (
        ((0.0, 0.0, 0.0, 0.0), (1.0 / 3.0, 0.0, 0.0, 0.0), (-1.0 / 3.0, 1.0, 0.0, 0.0), (1.0, -1.0, 1.0, 0.0)),
        (1.0 / 8.0, 3.0 / 8.0, 3.0 / 8.0, 1.0 / 8.0),
    ),
}


@dataclass(frozen=True, eq=False)
class IncrementalForm:
    """Data of the lifted LMI of one certificate family (see the module docstring).

    ``out`` is F (ct: delta' = F xi) or C (discrete: delta+ = C xi), shape (n, N);
    ``q_maps[s]`` is G_s with q_s = G_s xi. p_s occupies rows/columns
    n (s + 1) : n (s + 2) of xi and delta the first n.
    """

    family: str
    n: int
    slope: float
    eps: float | None
    out: np.ndarray
    q_maps: tuple[np.ndarray, ...]

    @property
    def continuous(self) -> bool:
        return self.family == "ct"

    @property
    def stages(self) -> int:
        return len(self.q_maps)

    @property
    def N(self) -> int:
        return self.n * (self.stages + 1)

    def goodness(self, r: float) -> float:
        """Larger is better: the rate a (ct) or -rho^2 (discrete)."""
        return r if self.continuous else -r

    def from_goodness(self, g: float) -> float:
        return g if self.continuous else -g

    @cached_property
    def scale(self) -> float:
        """Natural scale of the rate: ||A||_2 + L ||W||_2 for ct, 1 for the discrete families."""
        if not self.continuous:
            return 1.0
        n = self.n
        return float(np.linalg.norm(self.out[:, :n], 2) + self.slope * np.linalg.norm(self.q_maps[0][:, :n], 2)) or 1.0

    @property
    def weakest(self) -> float:
        """Goodness of the weakest acceptable rate: a = 0 (ct) or rho^2 = 1 (discrete)."""
        return 0.0 if self.continuous else -1.0

    def assemble(self, P: np.ndarray, lam: np.ndarray, r: float) -> tuple[np.ndarray, float]:
        """The symmetric N x N matrix M(P, Lambda, r) and a bound on its floating-point error.

        ``lam`` has shape (stages, n). The error bound covers the products and sums
        forming M and the backward error of a symmetric eigensolver on M, using
        |fl(XY) - XY| <= gamma_k |X||Y| and || |X||Y| ||_F <= ||X||_F ||Y||_F, plus
        an absolute N * 2^-1022 per entry for gradual underflow.
        """
        n, N, L = self.n, self.N, self.slope
        lam = np.asarray(lam, dtype=np.float64).reshape(self.stages, n)
        PF = P @ self.out
        norm_P, norm_out = np.linalg.norm(P), np.linalg.norm(self.out)
        if self.continuous:
            M = np.zeros((N, N))
            M[:n, :] = PF
            M = M + M.T
            M[:n, :n] += 2.0 * r * P
            magnitude = 2.0 * norm_P * norm_out + 2.0 * abs(r) * norm_P
        else:
            M = self.out.T @ PF
            M[:n, :n] -= r * P
            magnitude = norm_P * norm_out**2 + abs(r) * norm_P
        for s, G in enumerate(self.q_maps):
            rows = slice(n * (s + 1), n * (s + 2))
            LG = L * (lam[s][:, None] * G)
            M[rows, :] += LG
            M[:, rows] += LG.T
            M[rows, rows] -= 2.0 * np.diag(lam[s])
            lam_max = float(np.max(np.abs(lam[s]))) if n else 0.0
            magnitude += 2.0 * L * lam_max * np.linalg.norm(G) + 2.0 * lam_max * np.sqrt(n)
        M = 0.5 * (M + M.T)
        tolerance = 8.0 * (N + n + 8) * (UNIT_ROUNDOFF * (magnitude + np.linalg.norm(M)) + N * UNDERFLOW_FLOOR)
        return M, float(tolerance)

    def schur(self, P: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Eliminate the p-block: S = X + Y^T (-Z)^{-1} Y and K = (-Z)^{-1} Y.

        With M(P, Lambda, 0) = [[X, Y^T], [Y, Z]] and Z < 0, S = max_p xi^T M xi
        (attained at p = K delta). Returns None when Z is not negative definite.
        """
        n = self.n
        M, _ = self.assemble(P, lam, 0.0)
        Y, Z = M[n:, :n], M[n:, n:]
        try:
            chol = np.linalg.cholesky(-Z)
        except np.linalg.LinAlgError:
            return None
        K = scipy.linalg.cho_solve((chol, True), Y)
        S = M[:n, :n] + Y.T @ K
        return 0.5 * (S + S.T), K

    def best_rate(self, P: np.ndarray, lam: np.ndarray) -> float | None:
        """Best rate parameter r for fixed (P, Lambda), from the generalized eigenproblem (S, P).

        ct: largest a with S + 2 a P <= 0, i.e. a = -lambda_max(S, P)/2;
        discrete: smallest rho^2 with S - rho^2 P <= 0, i.e. rho^2 = max(lambda_max(S, P), 0).
        None when the p-block is not negative definite.
        """
        parts = self.schur(P, lam)
        if parts is None:
            return None
        top = float(scipy.linalg.eigh(parts[0], P, eigvals_only=True)[-1])
        return -0.5 * top if self.continuous else max(top, 0.0)


def incremental_form(system: LureSystem, family: str) -> IncrementalForm:
    """Build the lifted form of ``family`` for ``system`` (which supplies A, W, L and eps)."""
    if family not in _FAMILIES:
        raise InputError(f"unknown family {family!r}; expected one of {_FAMILIES}")
    A, W, n = system.A, system.W, system.n
    I = np.eye(n)
    if family in ("ct", "map"):
        E0 = np.hstack([I, np.zeros((n, n))])
        out = np.hstack([A, I]) if family == "ct" else np.hstack([np.zeros((n, n)), I])
        return IncrementalForm(family, n, system.slope, system.eps, out, (W @ E0,))
    if system.eps is None:
        raise InputError(f"family {family!r} needs a system with a step eps")
    eps = float(system.eps)
    # An overflowing scheme (huge eps ||A||) yields non-finite entries, which callers report.
    with np.errstate(over="ignore", invalid="ignore"):
        a, b = _TABLEAUS[family]
        m = len(b)
        N = n * (m + 1)
        E0 = np.zeros((n, N))
        E0[:, :n] = I
        stage_increments: list[np.ndarray] = []
        q_maps = []
        for i in range(m):
            delta_i = E0.copy()
            for j in range(i):
                if a[i][j]:
                    delta_i = delta_i + eps * a[i][j] * stage_increments[j]
            p_i = np.zeros((n, N))
            p_i[:, n * (i + 1) : n * (i + 2)] = I
            stage_increments.append(A @ delta_i + p_i)
            q_maps.append(W @ delta_i)
        C = E0.copy()
        for i in range(m):
            if b[i]:
                C = C + eps * b[i] * stage_increments[i]
        return IncrementalForm(family, n, system.slope, eps, C, tuple(q_maps))
