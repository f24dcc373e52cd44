"""Lanczos tridiagonalisation with full reorthogonalisation, in float64.

After m steps from a unit vector q_1, Q_m = [q_1 … q_m] is an orthonormal basis of the Krylov
space span{q_1, H q_1, …, H^{m-1} q_1} and H Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ with T_m
tridiagonal (diagonal α, off-diagonal β). For an eigenpair T_m s = θ s the Ritz pair
(θ, y = Q_m s) has residual ‖H y − θ y‖ = β_m |s_m|. Every new vector is orthogonalised twice
against the whole basis (classical Gram–Schmidt, twice), so Q stays orthonormal to working
precision even when the products H v are float32. The products H q_j are kept as well (memory
2·m·P float64), so Ritz residuals can be computed from them exactly, without further products.

The basis and the products are float64 torch tensors on the start vector's device (an operator's
device: the vectors never leave it); only T_m (m×m) goes to the host for its eigenproblem. Started
from a numpy vector, the process runs on the CPU, calls ``matvec`` with numpy vectors and returns
numpy arrays.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["Lanczos"]

Matvec = Callable[[np.ndarray], np.ndarray] | Callable[[Tensor], Tensor]


class Lanczos:
    """The Lanczos process on a symmetric operator, one step at a time (``step``).

    ``start``: a numpy vector (then ``matvec`` maps numpy vectors, and ``basis``/``products`` are
    numpy) or a torch tensor (then ``matvec`` maps float64 tensors on its device, and they are tensors)."""

    def __init__(self, matvec: Matvec, start: np.ndarray | Tensor) -> None:
        self._numpy = not isinstance(start, Tensor)
        q = torch.as_tensor(np.asarray(start) if self._numpy else start, dtype=torch.float64).reshape(-1)
        norm = float(torch.linalg.vector_norm(q))
        if not np.isfinite(norm) or norm == 0:
            raise InputError("Lanczos start vector must be finite and non-zero")
        self._product: Callable[[Tensor], Tensor]
        if self._numpy:
            numpy_matvec = cast(Callable[[np.ndarray], np.ndarray], matvec)
            self._product = lambda q: torch.as_tensor(np.asarray(numpy_matvec(q.numpy().copy()), dtype=np.float64).reshape(-1))
        else:
            tensor_matvec = cast(Callable[[Tensor], Tensor], matvec)
            self._product = lambda q: tensor_matvec(q).to(torch.float64).reshape(-1)
        self.dim = q.numel()
        # Rows 0..steps of _basis hold q_1..q_{m+1}, rows of _products H q_j; both buffers grow by doubling.
        self._basis = q.new_empty((8, self.dim))
        self._basis[0] = q / norm
        self._products = q.new_empty((8, self.dim))
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.exhausted = False

    @property
    def steps(self) -> int:
        return len(self.alpha)

    def _output(self, matrix: Tensor) -> np.ndarray | Tensor:
        return matrix.numpy().copy() if self._numpy else matrix.clone(memory_format=torch.contiguous_format)

    @property
    def basis(self) -> np.ndarray | Tensor:
        """Q_m, shape (P, m), numpy or torch as the start vector."""
        return self._output(self.basis_tensor)

    @property
    def products(self) -> np.ndarray | Tensor:
        """H Q_m, shape (P, m), numpy or torch as the start vector."""
        return self._output(self.products_tensor)

    @property
    def basis_tensor(self) -> Tensor:
        """Q_m as a float64 tensor on the process's device (a view: read only)."""
        return self._basis[: self.steps].T

    @property
    def products_tensor(self) -> Tensor:
        """H Q_m as a float64 tensor on the process's device (a view: read only)."""
        return self._products[: self.steps].T

    def _grow(self, buffer: Tensor, needed: int) -> Tensor:
        if needed <= len(buffer):
            return buffer
        bigger = buffer.new_empty((2 * needed, self.dim))
        bigger[: len(buffer)] = buffer
        return bigger

    def step(self) -> None:
        """Extend the basis by one vector (one product with H)."""
        if self.exhausted:
            raise RuntimeError("the Krylov space is exhausted")
        m = self.steps
        q = self._basis[m]
        w = self._product(q)
        self._products = self._grow(self._products, m + 1)
        self._products[m] = w
        alpha = float(q @ w)
        Q = self._basis[: m + 1]
        for _ in range(2):
            w = w - Q.T @ (Q @ w)
        beta = float(torch.linalg.vector_norm(w))
        self.alpha.append(alpha)
        self.beta.append(beta)
        scale = max(abs(a) for a in self.alpha) + max(self.beta)
        if self.steps >= self.dim or beta <= 1e-12 * scale:
            self.exhausted = True
        else:
            self._basis = self._grow(self._basis, m + 2)
            self._basis[m + 1] = w / beta

    def tridiagonal(self) -> np.ndarray:
        """T_m, shape (m, m) (on the host)."""
        m = self.steps
        T = np.diag(self.alpha)
        if m > 1:
            off = np.asarray(self.beta[: m - 1])
            T += np.diag(off, 1) + np.diag(off, -1)
        return T

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values θ (ascending), eigenvectors S of T_m, and residual estimates β_m |s_m| (on the host)."""
        theta, S = np.linalg.eigh(self.tridiagonal())
        last_beta = 0.0 if self.exhausted else self.beta[-1]
        return theta, S, np.abs(last_beta * S[-1, :])
