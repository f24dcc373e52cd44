"""tr(H) by Rademacher probes: Hutchinson and Hutch++, with a 95% confidence interval."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator
from tqdm.auto import tqdm

from ..statistics import t_halfwidth
from ._common import CountedMatvec, rademacher
from ._results import dataclass_dict

METHODS = ("hutchinson", "hutch++")
CONFIDENCE = 0.95


@dataclass(frozen=True)
class TraceResult:
    """tr(H) ≈ ``estimate`` ± ``ci_halfwidth`` (95% t-interval over the probe samples).

    ``samples`` are the quadratic forms zᵀ H z of the stochastic part; ``exact_part`` is the
    deterministic low-rank part of Hutch++ (0 for Hutchinson). ``stop_reason`` is
    ``"tolerance"`` (half-width ≤ tol·|estimate|, then ``converged``) or ``"budget"``.
    """

    estimate: float
    ci_halfwidth: float
    confidence: float
    method: str
    samples: np.ndarray
    exact_part: float
    sketch_size: int
    tol: float
    max_matvecs: int
    converged: bool
    stop_reason: str
    matvecs: int
    seed: int
    wall_time: float

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


def trace(
    op: LinearOperator,
    method: str = "hutchinson",
    tol: float = 1e-2,
    max_matvecs: int = 100,
    seed: int = 0,
    *,
    min_probes: int = 10,
    sketch_size: int | None = None,
    progress: bool = False,
) -> TraceResult:
    """Stochastic estimate of tr(H) with a confidence interval.

    ``"hutchinson"``: tr(H) ≈ (1/m) Σ z_iᵀ H z_i with Rademacher z_i (E zzᵀ = I); the interval
    is mean ± t_{0.975, m−1}·s/√m over the m samples.

    ``"hutch++"`` (Meyer, Musco, Musco, Woodruff 2021): sketch Y = H S with s Rademacher
    columns (``sketch_size``, default max_matvecs // 3), Q = orth(Y), then
    tr(H) = tr(Qᵀ H Q) + tr((I − QQᵀ) H (I − QQᵀ)): the first term exactly (s products),
    the second by Hutchinson on the deflated probes z = (I − QQᵀ) g. The interval covers
    the Hutchinson part only, which is all the randomness given Q (unbiased given Q).

    Probes are drawn from ``seed``. Sampling stops once at least ``min_probes`` samples give
    a half-width ≤ tol·|estimate|, or when ``max_matvecs`` products are spent.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    start_time = time.perf_counter()
    matvec = CountedMatvec(op)
    rng = np.random.default_rng(seed)
    exact, basis, sketch = 0.0, None, 0
    if method == "hutch++":
        sketch = min(matvec.dim, max(1, max_matvecs // 3) if sketch_size is None else sketch_size)
        if 2 * sketch > max_matvecs:
            raise ValueError(f"hutch++ needs max_matvecs >= 2 * sketch_size ({2 * sketch}), got {max_matvecs}")
    samples: list[float] = []
    halfwidth, stop_reason = math.inf, "budget"
    with tqdm(total=max_matvecs, desc=f"trace ({method})", disable=not progress, leave=False) as bar:
        if sketch:
            Y = np.stack([matvec(rademacher(rng, matvec.dim)) for _ in range(sketch)], axis=1)
            basis, _ = np.linalg.qr(Y)
            exact = float(sum(q @ matvec(q) for q in basis.T))
            bar.update(2 * sketch)
        while matvec.count < max_matvecs:
            z = rademacher(rng, matvec.dim)
            if basis is not None:
                z = z - basis @ (basis.T @ z)
            samples.append(float(z @ matvec(z)))
            bar.update()
            halfwidth = t_halfwidth(samples, CONFIDENCE)
            if len(samples) >= min_probes and halfwidth <= tol * abs(exact + np.mean(samples)):
                stop_reason = "tolerance"
                break
    estimate = exact + (float(np.mean(samples)) if samples else 0.0)
    if not samples and sketch == matvec.dim:
        halfwidth = 0.0
    return TraceResult(
        estimate=estimate, ci_halfwidth=halfwidth, confidence=CONFIDENCE, method=method, samples=np.array(samples),
        exact_part=exact, sketch_size=sketch, tol=tol, max_matvecs=max_matvecs, converged=stop_reason == "tolerance",
        stop_reason=stop_reason, matvecs=matvec.count, seed=seed, wall_time=time.perf_counter() - start_time,
    )
