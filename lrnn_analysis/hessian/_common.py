"""What every estimator needs: the operator's size, counted products on the operator's device, seeded probes.

Where the vectors live: an operator that computes on torch tensors (a ``CurvatureOperator``, or any
operator with an ``apply`` of flat tensors and a ``device``) gets float64 tensors on its own device
and returns its products there, so no vector crosses to the host between products; any other scipy
``LinearOperator`` gets them on the CPU through its numpy ``matvec``. Estimators keep float64
throughout (the products themselves are in the operator's dtype). On the host stay only what is
small or must be drawn there: the seeded probes (numpy's generator, so a seed gives the same draws
on every device; one copy of P numbers per probe), the m×m tridiagonal eigenproblem of Lanczos and
the s×s factors of the XTrace/XDiag sketches, and the results handed back (numpy arrays).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from ..errors import InputError

__all__ = ["CountedMatvec", "rademacher"]


def _device_of(op: Any) -> torch.device | None:
    """The device of an operator that multiplies torch tensors (``apply`` and ``device``), else None."""
    device = getattr(op, "device", None)
    return device if callable(getattr(op, "apply", None)) and isinstance(device, torch.device) else None


class CountedMatvec:
    """v ↦ H v for float64 torch vectors on ``device`` (module docstring), counting the products."""

    def __init__(self, op: LinearOperator) -> None:
        if len(op.shape) != 2 or op.shape[0] != op.shape[1]:
            raise InputError(f"expected a square operator, got shape {op.shape}")
        self.dim = int(op.shape[0])
        self._op = op
        native = _device_of(op)
        self._native = native is not None
        self.device = native if native is not None else torch.device("cpu")
        self.count = 0

    def __call__(self, v: Tensor) -> Tensor:
        self.count += 1
        if self._native:
            return self._op.apply(v).to(torch.float64).reshape(-1)
        return torch.as_tensor(np.asarray(self._op.matvec(v.cpu().numpy()), dtype=np.float64).reshape(-1))

    def vector(self, values: np.ndarray | Tensor) -> Tensor:
        """``values`` as a float64 vector on ``device``."""
        return torch.as_tensor(values, dtype=torch.float64, device=self.device).reshape(-1)

    def rademacher(self, rng: np.random.Generator) -> Tensor:
        """A Rademacher probe drawn on the host from ``rng`` (the same draws on every device), on ``device``."""
        return self.vector(rademacher(rng, self.dim))


def rademacher(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A vector of independent ±1 entries."""
    return rng.integers(0, 2, size=dim).astype(np.float64) * 2.0 - 1.0
