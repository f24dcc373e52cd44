"""Per-block curvature: the trace and λ_max of each parameter tensor's diagonal block, as a tidy table."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator

from ._results import jsonable
from .eigen import eigenvalues
from .operator import CurvatureOperator
from .trace import trace, unit_roundoff

__all__ = ["BLOCK_FIELDS", "BlockTable", "BlockView", "block_curvature"]

BLOCK_FIELDS = ("param", "numel", "lambda_max", "lambda_max_residual", "lambda_max_converged", "trace",
                "trace_ci_halfwidth", "trace_method", "matvecs")


class BlockView(LinearOperator):
    """The diagonal block C_bb of an operator C for the entries in ``block``: v_b ↦ (C [0; v_b; 0])_b.
    Each product is one product with the whole operator."""

    def __init__(self, op: LinearOperator, block: slice) -> None:
        self._op, self._block = op, block
        self._full = op.shape[0]
        size = block.stop - block.start
        super().__init__(dtype=op.dtype, shape=(size, size))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        v = np.zeros(self._full, dtype=self.dtype)
        v[self._block] = np.asarray(x).reshape(-1)
        return np.asarray(self._op.matvec(v))[self._block]

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)


@dataclass(frozen=True)
class BlockTable:
    """One row per selected parameter tensor (``BLOCK_FIELDS``): λ_max of its diagonal block (Lanczos,
    residual ‖C y − θ y‖ computed) and the block's trace — exact (one product per entry,
    ``trace_ci_halfwidth`` the round-off bound) when the block has at most ``trace_matvecs``
    entries, else Hutch++ with ``trace_matvecs`` products and its 95% interval. The round-off
    model is ``trace``'s: P·u·Σ_j ‖(C e_j)_b‖ with P the operator's dimension."""

    rows: tuple[dict[str, Any], ...]
    operator: str
    tol: float
    trace_matvecs: int
    matvecs: int
    seed: int
    wall_time: float

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [jsonable(row) for row in self.rows], "operator": self.operator, "tol": self.tol,
                "trace_matvecs": self.trace_matvecs, "matvecs": self.matvecs, "seed": self.seed, "wall_time": self.wall_time}


def block_curvature(
    op: CurvatureOperator,
    tol: float = 1e-3,
    trace_matvecs: int = 60,
    seed: int = 0,
    *,
    first: Sequence[str] = (),
    max_iter: int | None = None,
) -> BlockTable:
    """Trace and λ_max of every parameter block of ``op`` in one call (rows in the operator's parameter
    order, except that the names in ``first`` come first, in that order). Every random draw comes
    from ``seed``; the same seed is used for each block."""
    start_time = time.perf_counter()
    slices = op.block_slices()
    order = [name for name in first if name in slices] + [name for name in op.names if name not in first]
    rows, total = [], 0
    for name in order:
        view = BlockView(op, slices[name])
        numel = view.shape[0]
        top = eigenvalues(view, k=1, which="LA", tol=tol, seed=seed, max_iter=max_iter)
        if numel <= trace_matvecs:
            eye = np.eye(numel)
            products = [view.matvec(e) for e in eye]
            estimate = float(sum(p[j] for j, p in enumerate(products)))
            halfwidth = op.shape[0] * unit_roundoff(op) * float(sum(np.linalg.norm(p) for p in products))
            method, count = "exact", numel
        else:
            result = trace(view, "hutch++", tol=0.0, max_matvecs=trace_matvecs, seed=seed)
            estimate, halfwidth, method, count = result.estimate, result.ci_halfwidth, "hutch++", result.matvecs
        matvecs = top.matvecs + count
        total += matvecs
        rows.append({"param": name, "numel": numel, "lambda_max": float(top.values[0]),
                     "lambda_max_residual": float(top.residuals[0]), "lambda_max_converged": bool(top.converged[0]),
                     "trace": estimate, "trace_ci_halfwidth": halfwidth, "trace_method": method, "matvecs": matvecs})
    return BlockTable(rows=tuple(rows), operator=getattr(op, "kind", "operator"), tol=tol, trace_matvecs=trace_matvecs,
                      matvecs=total, seed=seed, wall_time=time.perf_counter() - start_time)
