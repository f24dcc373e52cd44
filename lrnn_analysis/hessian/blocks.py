"""Per-block curvature: the trace and λ_max of each parameter tensor's diagonal block, as a tidy table.

The traces share one set of probes. With a Rademacher vector v over all parameters, split into
blocks v_b, the entries of v are independent, so for every block b at once

    E[v_bᵀ (C v)_b] = E[v_bᵀ C_bb v_b] + Σ_{c≠b} E[v_bᵀ C_bc v_c] = tr(C_bb) + 0:

one product C v gives one sample of every block's trace. Its variance holds the cross terms
(2 Σ_{c≠b} ‖C_bc‖_F² besides the block's own), and the 95% t-interval over the samples is computed
from the samples themselves, so it stays honest. ``trace_matvecs`` products serve all blocks,
instead of that many per block; blocks of at most ``EXACT_BLOCK`` entries are formed exactly (trace
and λ_max from the same products).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from ..errors import InputError
from ..statistics import t_halfwidth
from ._common import CountedMatvec
from ._results import jsonable
from .eigen import eigenvalues, warm_start
from .operator import CurvatureOperator
from .trace import unit_roundoff

__all__ = ["BLOCK_FIELDS", "BlockTable", "BlockView", "block_curvature"]

BLOCK_FIELDS = ("param", "numel", "lambda_max", "lambda_max_residual", "lambda_max_converged", "trace",
                "trace_ci_halfwidth", "trace_method", "matvecs")
# Blocks this small are formed exactly (one product per entry), for their trace and λ_max, rather than sampled.
EXACT_BLOCK = 16
SHARED_PROBES = "hutchinson, shared probes"


class BlockView(LinearOperator):
    """The diagonal block C_bb of an operator C for the entries in ``block``: v_b ↦ (C [0; v_b; 0])_b.
    Each product is one product with the whole operator. ``apply`` multiplies torch vectors on the
    device of ``op`` (``op.device``; the CPU for an operator of numpy products)."""

    def __init__(self, op: LinearOperator, block: slice) -> None:
        self._op, self._block = op, block
        self._full = op.shape[0]
        self._products = CountedMatvec(op)
        self.device = self._products.device
        size = block.stop - block.start
        super().__init__(dtype=op.dtype, shape=(size, size))

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """(C [0; v; 0])_b for a flat torch vector ``v`` (float64, on ``device``)."""
        padded = torch.zeros(self._full, dtype=torch.float64, device=self.device)
        padded[self._block] = v.reshape(-1).to(device=self.device, dtype=torch.float64)
        return self._products(padded)[self._block]

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        v = np.zeros(self._full, dtype=self.dtype)
        v[self._block] = np.asarray(x).reshape(-1)
        return np.asarray(self._op.matvec(v))[self._block]

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)


@dataclass(frozen=True)
class BlockTable:
    """One row per selected parameter tensor (``BLOCK_FIELDS``): λ_max of its diagonal block (Lanczos,
    or the dense block's eigenpair when it is formed exactly; residual ‖C y − θ y‖ computed) and the block's trace — exact (one product per entry,
    ``trace_ci_halfwidth`` the round-off bound) when the block has at most ``EXACT_BLOCK``
    entries, else from the ``shared_matvecs`` products with shared probes (module docstring) and its
    95% t-interval. A row's ``matvecs`` are its own (Lanczos, exact trace); ``matvecs`` of the table
    adds the shared ones. The round-off model is ``trace``'s: P·u·Σ_j ‖(C e_j)_b‖ with P the
    operator's dimension."""

    rows: tuple[dict[str, Any], ...]
    operator: str
    tol: float
    trace_matvecs: int
    matvecs: int
    seed: int
    wall_time: float
    shared_matvecs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [jsonable(row) for row in self.rows], "operator": self.operator, "tol": self.tol,
                "trace_matvecs": self.trace_matvecs, "matvecs": self.matvecs, "shared_matvecs": self.shared_matvecs,
                "seed": self.seed, "wall_time": self.wall_time}


def block_curvature(
    op: CurvatureOperator,
    tol: float = 1e-3,
    trace_matvecs: int = 60,
    seed: int = 0,
    *,
    first: Sequence[str] = (),
    max_iter: int | None = None,
    start: np.ndarray | None = None,
) -> BlockTable:
    """Trace and λ_max of every parameter block of ``op`` in one call (rows in the operator's parameter
    order, except that the names in ``first`` come first, in that order): λ_max by Lanczos on each
    block, the traces from ``trace_matvecs`` (at least 2) products with probes shared by all blocks
    (module docstring). A block of at most ``EXACT_BLOCK`` entries is formed column by column
    instead (one product per entry): its exact trace and, from the same products, its largest
    eigenpair (of the symmetrised block; the residual is of the block as computed), without Lanczos.
    ``start``: a vector over all of ``op``'s parameters, e.g. its top eigenvector; each block's Lanczos
    then starts from ``warm_start`` of its part (cold where that part is zero). Every random draw
    comes from ``seed``."""
    start_time = time.perf_counter()
    if start is not None:
        start = np.asarray(start, dtype=np.float64).reshape(-1)
        if start.size != op.shape[0]:
            raise InputError(f"start must have one entry per parameter ({op.shape[0]}), got {start.size}")
    slices = op.block_slices()
    order = [name for name in first if name in slices] + [name for name in op.names if name not in first]
    sampled = [name for name in order if slices[name].stop - slices[name].start > EXACT_BLOCK]
    shared = _shared_probe_samples(op, [slices[name] for name in sampled], max(2, trace_matvecs), seed) if sampled else []
    samples = dict(zip(sampled, shared, strict=True))
    rows, total = [], len(shared[0]) if shared else 0
    for name in order:
        view = BlockView(op, slices[name])
        numel = view.shape[0]
        if name in samples:
            part = None if start is None else start[slices[name]]
            v0 = warm_start(part, seed) if part is not None and np.any(part != 0) else None
            top = eigenvalues(view, k=1, which="LA", tol=tol, seed=seed, max_iter=max_iter, v0=v0)
            lambda_max, residual, matvecs = float(top.values[0]), float(top.residuals[0]), top.matvecs
            estimate, halfwidth, method = float(np.mean(samples[name])), t_halfwidth(samples[name]), SHARED_PROBES
        else:
            # C_bb column by column: its trace and, from the same products, its largest eigenpair.
            columns = torch.stack([view.apply(e) for e in torch.eye(numel, dtype=torch.float64, device=view.device)], dim=1)
            estimate = float(torch.trace(columns))
            halfwidth = op.shape[0] * unit_roundoff(op) * float(torch.linalg.vector_norm(columns, dim=0).sum())
            block = columns.cpu().numpy()
            theta, vectors = np.linalg.eigh((block + block.T) / 2)
            lambda_max, top_vector = float(theta[-1]), vectors[:, -1]
            residual = float(np.linalg.norm(block @ top_vector - lambda_max * top_vector))
            method, matvecs = "exact", numel
        total += matvecs
        rows.append({"param": name, "numel": numel, "lambda_max": lambda_max, "lambda_max_residual": residual,
                     "lambda_max_converged": residual <= tol * abs(lambda_max), "trace": estimate,
                     "trace_ci_halfwidth": halfwidth, "trace_method": method, "matvecs": matvecs})
    return BlockTable(rows=tuple(rows), operator=getattr(op, "kind", "operator"), tol=tol, trace_matvecs=trace_matvecs,
                      matvecs=total, seed=seed, wall_time=time.perf_counter() - start_time,
                      shared_matvecs=len(shared[0]) if shared else 0)


def _shared_probe_samples(op: LinearOperator, blocks: Sequence[slice], probes: int, seed: int) -> list[np.ndarray]:
    """For each block b, ``probes`` samples v_bᵀ (C v)_b of its trace, one product C v per probe."""
    rng = np.random.default_rng(seed)
    matvec = CountedMatvec(op)
    samples = torch.empty((len(blocks), probes), dtype=torch.float64, device=matvec.device)
    for k in range(probes):
        v = matvec.rademacher(rng)
        w = matvec(v)
        for i, block in enumerate(blocks):
            samples[i, k] = v[block] @ w[block]
    return list(samples.cpu().numpy())
