"""tr(H) by Rademacher probes: Hutchinson, Hutch++ and XTrace, with a 95% confidence interval."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from ..choices import TRACE_METHODS
from ..errors import InputError
from ..progress import progress_bar
from ..statistics import t_halfwidth
from ._common import CountedMatvec
from ._results import dataclass_dict
from .lanczos import Lanczos

__all__ = ["CONFIDENCE", "METHODS", "ORTHONORMAL_TOLERANCE", "TraceResult", "exchangeable_sketch", "krylov_start", "leave_one_out_factors", "trace",
    "unit_roundoff"]

METHODS = TRACE_METHODS
CONFIDENCE = 0.95


@dataclass(frozen=True)
class TraceResult:
    """tr(H) ≈ ``estimate`` ± ``ci_halfwidth`` (95% t-interval over the probe samples).

    ``samples`` are the quadratic forms zᵀ H z of the stochastic part (for XTrace: its m/2
    exchangeable leave-one-out estimates; for ``"deflated"`` the deflated samples); ``exact_part`` is
    the deterministic low-rank part of Hutch++ and of ``"deflated"`` (0 for Hutchinson and XTrace).
    ``roundoff_bound`` bounds the round-off of ``exact_part`` (for ``"deflated"``, of the samples
    too) and is included in ``ci_halfwidth`` (see ``trace``). ``stop_reason`` is
    ``"tolerance"`` (half-width ≤ tol·|estimate|, then ``converged``) or ``"budget"``.

    Coverage: the t-interval assumes the mean of the samples is normal; the quadratic forms
    zᵀHz are skewed, so coverage can fall below the nominal 0.95 on Hessians with heavy-tailed
    forms (0.92–0.93 at 30–100 probes was reported on one trained model). ``bench/hessian.py``
    measures it against an exact trace; see the README for the numbers.
    """

    estimate: float
    ci_halfwidth: float
    confidence: float
    method: str
    samples: np.ndarray
    exact_part: float
    roundoff_bound: float
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


def unit_roundoff(op: LinearOperator) -> float:
    """Unit round-off of the operator's products (float32 for float32 operators, else float64)."""
    return float(np.finfo(np.float32 if np.dtype(op.dtype) == np.float32 else np.float64).eps) / 2


def trace(
    op: LinearOperator,
    method: str = "hutchinson",
    tol: float = 1e-2,
    max_matvecs: int = 100,
    seed: int = 0,
    *,
    min_probes: int = 10,
    sketch_size: int | None = None,
    krylov: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = False,
) -> TraceResult:
    """Stochastic estimate of tr(H) with a confidence interval.

    ``"hutchinson"``: tr(H) ≈ (1/m) Σ z_iᵀ H z_i with Rademacher z_i (E zzᵀ = I); the interval
    is mean ± t_{0.975, m−1}·s/√m over the m samples.

    ``"hutch++"`` (Meyer, Musco, Musco, Woodruff 2021): sketch Y = H S with s Rademacher
    columns (``sketch_size``, default max_matvecs // 3), Q = orth(Y), then
    tr(H) = tr(Qᵀ H Q) + tr((I − QQᵀ) H (I − QQᵀ)): the first term exactly (s products),
    the second by Hutchinson on the deflated probes z = (I − QQᵀ) g. The t-interval covers
    the Hutchinson part, which is all the randomness given Q (unbiased given Q). The exact
    part carries round-off: each product is modelled as H q_j + δ_j with ‖δ_j‖ ≤ P·u·‖H q_j‖
    (u the unit round-off of the operator's dtype, P the dimension) and Q, from a float64 QR,
    as orthonormal to P·u₆₄, so |tr(QᵀHQ) − tr(H Q Qᵀ)| ≤ (P·u + 2P·u₆₄)·Σ_j ‖H q_j‖ =
    ``roundoff_bound``, added to the half-width. With s = P (no stochastic part) the interval
    is this bound alone.

    ``"xtrace"`` (Epperly, Tropp, Webber 2024, SIMAX): s = max_matvecs // 2 Rademacher probes
    ω_i, Y = HΩ = QR, and for each i the Hutch++ estimate whose low-rank basis Q_(i) spans every
    sketch column except the i-th and whose Hutchinson probe is ω_i:
    tr(Q_(i)ᵀ H Q_(i)) + ω_iᵀ (I − Q_(i)Q_(i)ᵀ) H (I − Q_(i)Q_(i)ᵀ) ω_i, using
    Q_(i)Q_(i)ᵀ = Q (I − s_i s_iᵀ) Qᵀ with s_i the normalised i-th column of R⁻ᵀ. The estimate
    is the mean of the s estimates (2s products, no tolerance stop); the interval is the
    paper's error estimate std/√s scaled by t_{0.975, s−1} — the estimates are exchangeable,
    not independent, so it is a heuristic (coverage measured in the tests). Needs s < P and a
    sketch of full column rank.

    ``"deflated"``: Hutchinson deflated by a Krylov basis Q (m orthonormal columns) and its
    products M = HQ, with the products of the raw probes z (the same probes, and products, as
    ``"hutchinson"``'s and the block table's): tr(H) ≈ e + mean over z of

        zᵀHz − 2 (Qᵀz)ᵀ(Mᵀz) + (Qᵀz)ᵀ (QᵀM) (Qᵀz),    e = tr(QᵀM),

    the Hutchinson sample of (I − QQᵀ)H(I − QQᵀ) for symmetric H. Each term's expectation is
    exact for M as computed (E[zᵀQMᵀz] = tr(QMᵀ) = e, E[zᵀQ(QᵀM)Qᵀz] = e when QᵀQ = I), so the
    estimate is unbiased given Q and the t-interval covers the sampled part, which is all the
    randomness given Q: Q must not depend on the probes. The half-width adds a first-order bound on
    the float64 round-off of e and of the samples (``roundoff_bound``, γ = (P + m)·u per inner
    product), which is what remains where Q spans all of H's range and the samples vanish: without
    it a t-interval of round-off-sized samples misses the trace by a few ulps. Where the top of the spectrum dominates
    tr(H), the deflated samples vary far less. The basis: ``krylov`` = (Q, M) from a Lanczos run on
    the same operator (``eigenvalues(..., keep_krylov=True)``: no products here; orthonormal columns
    to ``ORTHONORMAL_TOLERANCE``, else ``InputError``, and no ``sketch_size``), else
    ``sketch_size`` (default max_matvecs // 3) Lanczos steps here. Its start must be independent
    of the probes: here it is a Gaussian vector from the stream ``[seed, 1]`` (``analyze`` starts
    its eigenvalue run the same way when it deflates the trace by it).

    Probes are drawn from ``seed``. Hutchinson and Hutch++ stop once at least ``min_probes``
    samples give a half-width ≤ tol·|estimate|, or when ``max_matvecs`` products are spent.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    start_time = time.perf_counter()
    matvec = CountedMatvec(op)
    if method == "xtrace":
        estimates = _xtrace_estimates(matvec, max_matvecs, np.random.default_rng(seed), unit_roundoff(op))
        halfwidth = t_halfwidth(estimates, CONFIDENCE)
        return TraceResult(
            estimate=float(np.mean(estimates)), ci_halfwidth=halfwidth, confidence=CONFIDENCE, method=method,
            samples=estimates, exact_part=0.0, roundoff_bound=0.0, sketch_size=len(estimates), tol=tol,
            max_matvecs=max_matvecs, converged=False, stop_reason="budget", matvecs=matvec.count, seed=seed,
            wall_time=time.perf_counter() - start_time,
        )
    if method == "deflated":
        return _deflated(matvec, tol, max_matvecs, seed, min_probes, sketch_size, krylov, progress, start_time)
    if krylov is not None:
        raise InputError(f"krylov is a basis for the 'deflated' method, not {method!r}")
    rng = np.random.default_rng(seed)
    exact, roundoff, basis, sketch = 0.0, 0.0, None, 0
    if method == "hutch++":
        sketch = min(matvec.dim, max(1, max_matvecs // 3) if sketch_size is None else sketch_size)
        if 2 * sketch > max_matvecs:
            raise InputError(f"hutch++ needs max_matvecs >= 2 * sketch_size ({2 * sketch}), got {max_matvecs}")
    samples: list[float] = []
    halfwidth, stop_reason = math.inf, "budget"
    with progress_bar(total=max_matvecs, desc=f"trace ({method})", enabled=progress, leave=False) as bar:
        if sketch:
            Y = torch.stack([matvec(matvec.rademacher(rng)) for _ in range(sketch)], dim=1)
            basis, _ = torch.linalg.qr(Y)
            products = [matvec(q) for q in basis.T]
            exact = float(sum(float(q @ hq) for q, hq in zip(basis.T, products)))
            dim = matvec.dim
            roundoff = (dim * unit_roundoff(op) + 2 * dim * np.finfo(np.float64).eps / 2) * float(
                sum(float(torch.linalg.vector_norm(hq)) for hq in products))
            bar.update(2 * sketch)
        while matvec.count < max_matvecs and sketch < matvec.dim:
            z = matvec.rademacher(rng)
            if basis is not None:
                z = z - basis @ (basis.T @ z)
            samples.append(float(z @ matvec(z)))
            bar.update()
            halfwidth = t_halfwidth(samples, CONFIDENCE) + roundoff
            if len(samples) >= min_probes and halfwidth <= tol * abs(exact + np.mean(samples)):
                stop_reason = "tolerance"
                break
    estimate = exact + (float(np.mean(samples)) if samples else 0.0)
    if sketch == matvec.dim:
        halfwidth, stop_reason = roundoff, "exact"
    return TraceResult(
        estimate=estimate, ci_halfwidth=halfwidth, confidence=CONFIDENCE, method=method, samples=np.array(samples),
        exact_part=exact, roundoff_bound=roundoff, sketch_size=sketch, tol=tol, max_matvecs=max_matvecs,
        converged=stop_reason in ("tolerance", "exact"), stop_reason=stop_reason, matvecs=matvec.count, seed=seed,
        wall_time=time.perf_counter() - start_time,
    )


# How far from orthonormal a given deflation basis may be: the bias tr(QᵀM (QᵀQ − I)) stays below 1e-8 of Σ‖M_j‖.
ORTHONORMAL_TOLERANCE = 1e-8


def krylov_start(seed: int, dim: int) -> np.ndarray:
    """The Lanczos start of the ``"deflated"`` trace's basis: a Gaussian vector from the stream
    [seed, 1], independent of the probes drawn from ``seed``."""
    return np.random.default_rng([seed, 1]).standard_normal(dim)


def _deflated(matvec: CountedMatvec, tol: float, max_matvecs: int, seed: int, min_probes: int, sketch_size: int | None,
              krylov: tuple[torch.Tensor, torch.Tensor] | None, progress: bool, start_time: float) -> TraceResult:
    """:func:`trace`'s ``"deflated"`` method (its docstring)."""
    if krylov is None:
        steps = min(matvec.dim, max(1, max_matvecs // 3) if sketch_size is None else sketch_size)
        if steps >= max_matvecs:
            raise InputError(f"deflated needs max_matvecs > sketch_size ({steps}) to leave products for probes, got {max_matvecs}")
        process = Lanczos(matvec, matvec.vector(krylov_start(seed, matvec.dim)))
        while process.steps < steps and not process.exhausted:
            process.step()
        Q, M = process.basis_tensor, process.products_tensor
    else:
        if sketch_size is not None:
            raise InputError("sketch_size sets the size of a basis built here; a given krylov basis has its own")
        Q, M = (torch.as_tensor(t, dtype=torch.float64, device=matvec.device) for t in krylov)
        if Q.ndim != 2 or Q.shape != M.shape or Q.shape[0] != matvec.dim:
            raise InputError(f"krylov must be a basis and its products, both of shape ({matvec.dim}, m), "
                             f"got {tuple(Q.shape)} and {tuple(M.shape)}")
        # The exact part is unbiased only for QᵀQ = I; a Lanczos basis is orthonormal to ~1e-15.
        departure = float(torch.linalg.matrix_norm(Q.T @ Q - torch.eye(Q.shape[1], dtype=torch.float64, device=Q.device), ord=2))
        if not departure <= ORTHONORMAL_TOLERANCE:
            raise InputError(f"krylov's basis must have orthonormal columns: ‖QᵀQ − I‖₂ = {departure:.1e} > {ORTHONORMAL_TOLERANCE:g}")
    C = Q.T @ M
    exact = float(torch.trace(C))
    # float64 round-off (first order, gamma = (P + m) u per inner product): of tr(QᵀM), and of each sample's three terms.
    gamma = (matvec.dim + Q.shape[1]) * float(np.finfo(np.float64).eps) / 2
    exact_error = gamma * float(torch.linalg.vector_norm(M, dim=0).sum())
    norm_C = float(torch.linalg.matrix_norm(C))
    rng = np.random.default_rng(seed)
    samples: list[float] = []
    sample_errors: list[float] = []
    halfwidth, stop_reason, used, roundoff = math.inf, "budget", matvec.count, exact_error
    with progress_bar(total=max_matvecs, desc="trace (deflated)", enabled=progress, leave=False) as bar:
        bar.update(used)
        while matvec.count < max_matvecs:
            z = matvec.rademacher(rng)
            w = matvec(z)
            a, b = Q.T @ z, M.T @ z
            samples.append(float(z @ w - 2.0 * (a @ b) + a @ (C @ a)))
            norm_a = float(torch.linalg.vector_norm(a))
            sample_errors.append(2 * gamma * (math.sqrt(matvec.dim) * float(torch.linalg.vector_norm(w))
                                              + 2 * norm_a * float(torch.linalg.vector_norm(b)) + norm_a ** 2 * norm_C))
            bar.update()
            roundoff = exact_error + float(np.mean(sample_errors))
            halfwidth = t_halfwidth(samples, CONFIDENCE) + roundoff
            if len(samples) >= min_probes and halfwidth <= tol * abs(exact + np.mean(samples)):
                stop_reason = "tolerance"
                break
    return TraceResult(
        estimate=exact + (float(np.mean(samples)) if samples else 0.0), ci_halfwidth=halfwidth, confidence=CONFIDENCE,
        method="deflated", samples=np.array(samples), exact_part=exact, roundoff_bound=roundoff, sketch_size=Q.shape[1],
        tol=tol, max_matvecs=max_matvecs, converged=stop_reason == "tolerance", stop_reason=stop_reason,
        matvecs=matvec.count, seed=seed, wall_time=time.perf_counter() - start_time,
    )


def leave_one_out_factors(R: np.ndarray, roundoff: float) -> np.ndarray:
    """Columns s_i of R⁻ᵀ normalised to unit length: Q_(i)Q_(i)ᵀ = Q (I − s_i s_iᵀ) Qᵀ is the projector
    onto the span of every sketch column but the i-th (Y = QR of full column rank). A sketch whose
    R has a diagonal entry ≤ 10·s·``roundoff``·max|R| (numerically rank-deficient at the products'
    unit round-off) is an error."""
    if not np.all(np.isfinite(R)) or np.min(np.abs(np.diag(R))) <= 10 * len(R) * roundoff * np.abs(R).max():
        raise InputError("the sketch is rank-deficient (H has rank below the number of probes): compute it exactly")
    S = np.linalg.inv(R).T
    return S / np.linalg.norm(S, axis=0)


def exchangeable_sketch(matvec: CountedMatvec, max_matvecs: int, rng: np.random.Generator, roundoff: float,
                        method: str) -> tuple[torch.Tensor, ...]:
    """The sketch XTrace and XDiag share (Epperly, Tropp, Webber): s = max_matvecs // 2
    Rademacher probes W, Y = H W, Y = Q R, the leave-one-out factors S of R, and Z = H Q
    (2s products). Returns (W, Y, Q, S, Z), float64 on the operator's device (R, s×s, is
    inverted on the host)."""
    s = max_matvecs // 2
    if s < 2 or s >= matvec.dim:
        raise InputError(f"{method} needs 4 <= max_matvecs and max_matvecs // 2 < dimension {matvec.dim}, got {max_matvecs}")
    W = torch.stack([matvec.rademacher(rng) for _ in range(s)], dim=1)
    Y = torch.stack([matvec(w) for w in W.T], dim=1)
    Q, R = torch.linalg.qr(Y)
    S = matvec.vector(leave_one_out_factors(R.cpu().numpy(), roundoff)).reshape(s, s)
    Z = torch.stack([matvec(q) for q in Q.T], dim=1)
    return W, Y, Q, S, Z


def _xtrace_estimates(matvec: CountedMatvec, max_matvecs: int, rng: np.random.Generator, roundoff: float) -> np.ndarray:
    """The s = max_matvecs // 2 exchangeable XTrace estimates (see ``trace``)."""
    W, Y, Q, S, Z = exchangeable_sketch(matvec, max_matvecs, rng, roundoff, "xtrace")
    s = W.shape[1]
    QtZ = Q.T @ Z
    full = float(torch.trace(QtZ))
    estimates = np.empty(s)
    for i in range(s):
        w, si = W[:, i], S[:, i]
        c = Q.T @ w
        hp = Y[:, i] - Z @ (c - (si @ c) * si)
        d = Q.T @ hp
        deflated = hp - Q @ (d - (si @ d) * si)
        estimates[i] = full - float(si @ QtZ @ si) + float(w @ deflated)
    return estimates
