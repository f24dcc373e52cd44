"""diag(H) and ‖H‖_F² by Rademacher probes, with per-entry standard errors and a 95% interval."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from ..choices import DIAGONAL_METHODS
from ..errors import InputError
from ..statistics import t_halfwidth
from ._common import CountedMatvec
from ._results import dataclass_dict
from .trace import CONFIDENCE, exchangeable_sketch, unit_roundoff

__all__ = ["DiagonalResult", "FrobeniusResult", "diagonal", "frobenius_norm_squared"]



@dataclass(frozen=True)
class DiagonalResult:
    """diag(H) ≈ ``estimate`` (length P) with per-entry ``standard_error`` (sample std / √m of the
    m per-probe estimates; for XDiag the paper's heuristic, its estimates being exchangeable,
    not independent). ``estimate`` is left out of ``to_dict`` only when P > 100 000."""

    estimate: np.ndarray
    standard_error: np.ndarray
    method: str
    probes: int
    matvecs: int
    seed: int
    wall_time: float

    def to_dict(self) -> dict[str, Any]:
        out = dataclass_dict(self, exclude=("estimate", "standard_error") if self.estimate.size > 100_000 else ())
        out["sum"] = float(self.estimate.sum())
        return out


def diagonal(op: LinearOperator, method: str = "hutchinson", max_matvecs: int = 100, seed: int = 0) -> DiagonalResult:
    """Estimate of diag(H) from ``max_matvecs`` products.

    ``"hutchinson"`` (Bekas, Kokiopoulou, Saad 2007): d ≈ (1/m) Σ z_k ⊙ H z_k with Rademacher z_k
    (z ⊙ z = 1, so each term is unbiased; entry j has variance Σ_{l≠j} H_jl²).

    ``"xdiag"`` (Epperly, Tropp, Webber 2024): s = max_matvecs // 2 probes ω_i, Y = HΩ = QR,
    Z = HQ, and for each i the Diag++-type estimate with the basis Q_(i) of every sketch column but
    the i-th: diag(Q_(i)Q_(i)ᵀ H) + ω_i ⊙ (I − Q_(i)Q_(i)ᵀ) H ω_i, with
    Q_(i)Q_(i)ᵀ = Q (I − s_i s_iᵀ) Qᵀ (``leave_one_out_factors``); the estimate is their mean.
    Exact once H has rank < s. Needs s < P and a sketch of full column rank.
    """
    if method not in DIAGONAL_METHODS:
        raise InputError(f"method must be one of {DIAGONAL_METHODS}, got {method!r}")
    start_time = time.perf_counter()
    matvec = CountedMatvec(op)
    rng = np.random.default_rng(seed)
    if method == "hutchinson":
        if max_matvecs < 2:
            raise InputError(f"hutchinson diagonal needs max_matvecs >= 2, got {max_matvecs}")
        per_probe = torch.stack([z * matvec(z) for z in (matvec.rademacher(rng) for _ in range(max_matvecs))])
    else:
        W, Y, Q, S, Z = exchangeable_sketch(matvec, max_matvecs, rng, unit_roundoff(op), "xdiag")
        s = W.shape[1]
        full = torch.sum(Q * Z, dim=1)
        rows = []
        for i in range(s):
            w, si = W[:, i], S[:, i]
            projected = full - (Q @ si) * (Z @ si)
            c = Z.T @ w
            complement = Y[:, i] - Q @ (c - (si @ c) * si)
            rows.append(projected + w * complement)
        per_probe = torch.stack(rows)
    m = len(per_probe)
    return DiagonalResult(
        estimate=per_probe.mean(dim=0).cpu().numpy(), standard_error=per_probe.std(dim=0).cpu().numpy() / math.sqrt(m), method=method,
        probes=m, matvecs=matvec.count, seed=seed, wall_time=time.perf_counter() - start_time,
    )


@dataclass(frozen=True)
class FrobeniusResult:
    """‖H‖_F² ≈ ``estimate`` ± ``ci_halfwidth`` (95% t-interval over the samples ‖H z‖²)."""

    estimate: float
    ci_halfwidth: float
    confidence: float
    samples: np.ndarray
    tol: float
    converged: bool
    stop_reason: str
    matvecs: int
    seed: int
    wall_time: float

    @property
    def norm(self) -> float:
        """‖H‖_F, the square root of the estimate."""
        return math.sqrt(max(self.estimate, 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclass_dict(self), "norm": self.norm}


def frobenius_norm_squared(
    op: LinearOperator, tol: float = 1e-2, max_matvecs: int = 100, seed: int = 0, *, min_probes: int = 10
) -> FrobeniusResult:
    """‖H‖_F² = tr(HᵀH) = E‖H z‖² for Rademacher z (E zzᵀ = I): the mean of ‖H z_k‖² over probes, one
    product each, stopping once ≥ ``min_probes`` samples give a half-width ≤ tol·estimate or at
    ``max_matvecs``."""
    start_time = time.perf_counter()
    matvec = CountedMatvec(op)
    rng = np.random.default_rng(seed)
    samples: list[float] = []
    halfwidth, stop_reason = math.inf, "budget"
    while matvec.count < max_matvecs:
        samples.append(float(torch.sum(matvec(matvec.rademacher(rng)) ** 2)))
        halfwidth = t_halfwidth(samples, CONFIDENCE)
        if len(samples) >= min_probes and halfwidth <= tol * abs(np.mean(samples)):
            stop_reason = "tolerance"
            break
    return FrobeniusResult(
        estimate=float(np.mean(samples)) if samples else math.nan, ci_halfwidth=halfwidth, confidence=CONFIDENCE,
        samples=np.array(samples), tol=tol, converged=stop_reason == "tolerance", stop_reason=stop_reason,
        matvecs=matvec.count, seed=seed, wall_time=time.perf_counter() - start_time,
    )
