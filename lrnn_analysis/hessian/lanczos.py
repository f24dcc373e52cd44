"""Lanczos tridiagonalisation with full reorthogonalisation, in float64 numpy.

After m steps from a unit vector q_1, Q_m = [q_1 … q_m] is an orthonormal basis of the Krylov
space span{q_1, H q_1, …, H^{m-1} q_1} and H Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ with T_m
tridiagonal (diagonal α, off-diagonal β). For an eigenpair T_m s = θ s the Ritz pair
(θ, y = Q_m s) has residual ‖H y − θ y‖ = β_m |s_m|. Every new vector is orthogonalised twice
against the whole basis (classical Gram–Schmidt, twice), so Q stays orthonormal to working
precision even when the products H v are float32. The products H q_j are kept as well (memory
2·m·P float64), so Ritz residuals can be computed from them exactly, without further products.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InputError

__all__ = ["Lanczos"]

Matvec = Callable[[np.ndarray], np.ndarray]


class Lanczos:
    """The Lanczos process on a symmetric operator, one step at a time (``step``)."""

    def __init__(self, matvec: Matvec, start: np.ndarray) -> None:
        start = np.asarray(start, dtype=np.float64)
        norm = np.linalg.norm(start)
        if not np.isfinite(norm) or norm == 0:
            raise InputError("Lanczos start vector must be finite and non-zero")
        self._matvec = matvec
        self.dim = start.size
        self._basis = [start / norm]
        self._products: list[np.ndarray] = []
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.exhausted = False

    @property
    def steps(self) -> int:
        return len(self.alpha)

    @property
    def basis(self) -> np.ndarray:
        """Q_m, shape (P, m)."""
        return np.stack(self._basis[: self.steps], axis=1)

    def step(self) -> None:
        """Extend the basis by one vector (one product with H)."""
        if self.exhausted:
            raise RuntimeError("the Krylov space is exhausted")
        q = self._basis[-1]
        w = np.asarray(self._matvec(q), dtype=np.float64).reshape(-1)
        self._products.append(w)
        alpha = float(q @ w)
        Q = np.stack(self._basis, axis=1)
        for _ in range(2):
            w = w - Q @ (Q.T @ w)
        beta = float(np.linalg.norm(w))
        self.alpha.append(alpha)
        self.beta.append(beta)
        scale = max(abs(a) for a in self.alpha) + max(self.beta)
        if self.steps >= self.dim or beta <= 1e-12 * scale:
            self.exhausted = True
        else:
            self._basis.append(w / beta)

    @property
    def products(self) -> np.ndarray:
        """H Q_m, shape (P, m)."""
        return np.stack(self._products, axis=1)

    def tridiagonal(self) -> np.ndarray:
        """T_m, shape (m, m)."""
        m = self.steps
        T = np.diag(self.alpha)
        if m > 1:
            off = np.asarray(self.beta[: m - 1])
            T += np.diag(off, 1) + np.diag(off, -1)
        return T

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values θ (ascending), eigenvectors S of T_m, and residual estimates β_m |s_m|."""
        theta, S = np.linalg.eigh(self.tridiagonal())
        last_beta = 0.0 if self.exhausted else self.beta[-1]
        return theta, S, np.abs(last_beta * S[-1, :])
