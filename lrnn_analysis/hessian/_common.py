"""What every estimator needs: the operator's size, counted products, seeded probes."""
from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import LinearOperator

from ..errors import InputError

__all__ = ["CountedMatvec", "rademacher"]


class CountedMatvec:
    """v ↦ H v in float64 numpy, counting the products."""

    def __init__(self, op: LinearOperator) -> None:
        if len(op.shape) != 2 or op.shape[0] != op.shape[1]:
            raise InputError(f"expected a square operator, got shape {op.shape}")
        self.dim = int(op.shape[0])
        self._op = op
        self.count = 0

    def __call__(self, v: np.ndarray) -> np.ndarray:
        self.count += 1
        return np.asarray(self._op.matvec(v), dtype=np.float64).reshape(-1)


def rademacher(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A vector of independent ±1 entries."""
    return rng.integers(0, 2, size=dim).astype(np.float64) * 2.0 - 1.0
