"""Extreme eigenvalues of the Hessian: Lanczos (the estimator) and power iteration (for comparison)."""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from ..errors import InputError
from ..progress import progress_bar
from ._common import CountedMatvec
from ._results import dataclass_dict, jsonable
from .lanczos import Lanczos

__all__ = ["EigenResult", "LambdaMaxTrack", "WHICH", "eigenvalues", "power_iteration", "track_lambda_max", "warm_start"]

WHICH = ("LA", "SA", "LM", "BE")


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs (θ_i, y_i) with their residuals r_i = ‖H y_i − θ_i y_i‖ (computed, not estimated).

    ``vectors`` has shape (P, len(values)) (float64, unit columns; None when the backend does
    not give them) and is left out of ``to_dict``. ``converged[i]`` is r_i ≤ tol·|θ_i| + atol.
    ``matvecs`` counts every product with H, the residual checks included. ``krylov``: the Lanczos
    basis Q and its products HQ (float64 tensors, P × iterations) when asked for (``keep_krylov``),
    else None; left out of ``to_dict``.
    """

    values: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    vectors: np.ndarray | None
    which: str
    k: int
    tol: float
    atol: float
    method: str
    iterations: int
    matvecs: int
    seed: int | None
    wall_time: float
    krylov: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def relative_residuals(self) -> np.ndarray:
        """r_i / |θ_i|."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.residuals / np.abs(self.values)

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    def to_dict(self) -> dict[str, Any]:
        out = dataclass_dict(self, exclude=("vectors", "krylov"))
        out["relative_residuals"] = jsonable(self.relative_residuals)
        return out


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices into the ascending Ritz values θ of the wanted ones, in report order."""
    m = len(theta)
    k = min(k, m)
    if which == "LA":
        return np.arange(m - 1, m - 1 - k, -1)
    if which == "SA":
        return np.arange(k)
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    top = list(range(m - 1, m - 1 - k, -1))
    return np.asarray(top + [i for i in range(k) if i not in top], dtype=int)


def eigenvalues(
    op: LinearOperator,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-3,
    seed: int = 0,
    *,
    atol: float = 0.0,
    max_iter: int | None = None,
    v0: np.ndarray | None = None,
    keep_krylov: bool = False,
    progress: bool = False,
) -> EigenResult:
    """k extreme eigenpairs of the symmetric operator ``op`` by Lanczos with full reorthogonalisation.

    ``which``: ``"LA"`` the k largest (descending), ``"SA"`` the k smallest (ascending),
    ``"LM"`` the k of largest |λ| (by |λ| descending), ``"BE"`` both ends: the k largest
    (descending) then the k smallest (ascending), so ``values[0]`` is λ_max and ``values[k]``
    is λ_min. The Krylov space grows from ``v0`` (length P, finite, non-zero; for a warm start from
    the eigenvector of a nearby operator pass :func:`warm_start` of it, not the bare vector) or else
    a Gaussian start vector drawn from ``seed``, until
    every wanted Ritz pair has ‖H y − θ y‖ ≤ tol·|θ| + atol (the residual β_m|s_m| of the
    Lanczos relation; never the change between iterates), the space is exhausted, or
    ``max_iter`` steps (default min(P, 300)). The residuals are then computed explicitly,
    ‖(H Q) s − θ Q s‖ from the stored products (H y = (H Q) s by linearity, so no extra
    products); ``converged`` is judged on those. For eigenvalues near 0 a purely relative test
    cannot pass: give ``atol`` (in units of H) there. The Krylov vectors stay on the operator's
    device in float64 (``_common``); ``vectors`` come back as numpy, and with ``keep_krylov`` the
    basis and its products as ``krylov`` (e.g. for :func:`~.trace.trace`'s ``"deflated"`` method).
    """
    if which not in WHICH:
        raise InputError(f"which must be one of {WHICH}, got {which!r}")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    start_time = time.perf_counter()
    matvec = CountedMatvec(op)
    max_iter = min(matvec.dim, 300 if max_iter is None else max_iter)
    needed = min(matvec.dim, 2 * k if which == "BE" else k)
    if v0 is not None:
        v0 = np.asarray(v0, dtype=np.float64).reshape(-1)
        if v0.shape != (matvec.dim,):
            raise InputError(f"v0 must have length {matvec.dim}, got shape {v0.shape}")
    start = np.random.default_rng(seed).standard_normal(matvec.dim) if v0 is None else v0
    process = Lanczos(matvec, matvec.vector(start))
    with progress_bar(total=max_iter, desc=f"lanczos {which}", enabled=progress, leave=False) as bar:
        while True:
            process.step()
            bar.update()
            if process.steps < needed and not process.exhausted:
                continue
            theta, S, estimates = process.ritz()
            idx = _wanted(theta, k, which)
            done = np.all(estimates[idx] <= tol * np.abs(theta[idx]) + atol)
            if done or process.exhausted or process.steps >= max_iter:
                break
    iterations = process.steps
    values = theta[idx]
    coefficients = matvec.vector(S[:, idx]).reshape(S.shape[0], len(idx))
    on_device = process.basis_tensor @ coefficients
    residuals = torch.linalg.vector_norm(process.products_tensor @ coefficients - on_device * matvec.vector(values), dim=0).cpu().numpy()
    vectors = on_device.cpu().numpy()
    return EigenResult(
        values=values, residuals=residuals, converged=residuals <= tol * np.abs(values) + atol,
        vectors=vectors, which=which, k=k, tol=tol, atol=atol, method="lanczos", iterations=iterations,
        matvecs=matvec.count, seed=None if v0 is not None else seed, wall_time=time.perf_counter() - start_time,
        # Views of the process's own buffers: no second copy of 2 P m numbers.
        krylov=(process.basis_tensor, process.products_tensor) if keep_krylov else None,
    )


def warm_start(previous: np.ndarray, seed: int | Sequence[int] = 0) -> np.ndarray:
    """A Lanczos start vector near ``previous`` (an eigenvector of a nearby operator): the sum of two unit
    vectors, ``previous`` and a Gaussian vector drawn from ``seed``.

    Lanczos finds only eigenvalues whose eigenvectors the start vector has a component along; an
    eigenvector of a nearby operator can lack the new operator's top eigenvector altogether (when
    the two top eigenvalues cross, or exactly, when the operators share an eigenvector), and the
    residual test would then pass on the wrong eigenvalue. The Gaussian half gives every direction
    1/√2 of the weight a cold start gives it, so no eigenvalue is missed more often than from a
    cold start, while the ``previous`` half still starts the process close to it.
    """
    vector = np.asarray(previous, dtype=np.float64).reshape(-1)
    largest = float(np.max(np.abs(vector), initial=0.0))
    if not np.isfinite(largest) or largest == 0:
        raise InputError("a warm start needs a finite, non-zero vector")
    # Scaled first: the squares of entries below ~1e-154 (or above ~1e154) under- (over-)flow.
    vector = vector / largest
    norm = float(np.linalg.norm(vector))
    gaussian = np.random.default_rng(seed).standard_normal(vector.size)
    return vector / norm + gaussian / np.linalg.norm(gaussian)


@dataclass(frozen=True)
class LambdaMaxTrack:
    """λ_max along a sequence of operators (checkpoints): one row per checkpoint with the warm-started
    Lanczos answer (``matvecs``) and, when compared, the cold start's (``cold_matvecs``,
    ``cold_lambda_max``). ``hvps_saved`` = Σ cold − Σ warm (None when not compared)."""

    rows: tuple[dict[str, Any], ...]
    tol: float
    seed: int
    hvps_warm: int
    hvps_cold: int | None
    hvps_saved: int | None
    wall_time: float

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


def track_lambda_max(
    operators: Iterable[LinearOperator],
    tol: float = 1e-3,
    seed: int = 0,
    *,
    labels: Sequence[str] | None = None,
    compare_cold: bool = True,
    max_iter: int | None = None,
) -> LambdaMaxTrack:
    """Follow λ_max across checkpoints: Lanczos (``which="LA"``, residual test ``tol``) on each operator,
    started from :func:`warm_start` of the previous checkpoint's top eigenvector (the first from ``seed``). The operators
    must share the dimension (same parameters); they may be a generator, built one at a time.
    ``compare_cold`` also runs the cold start from ``seed`` on each, to report the products saved."""
    start_time = time.perf_counter()
    rows: list[dict[str, Any]] = []
    previous: np.ndarray | None = None
    dim: int | None = None
    for index, op in enumerate(operators):
        if dim is not None and op.shape[0] != dim:
            raise InputError(f"checkpoint {index} has dimension {op.shape[0]}, the previous ones {dim}")
        dim = op.shape[0]
        warm = eigenvalues(op, k=1, which="LA", tol=tol, seed=seed, max_iter=max_iter, v0=None if previous is None else warm_start(previous, seed))
        assert warm.vectors is not None  # Lanczos always returns its Ritz vectors
        previous = warm.vectors[:, 0]
        row: dict[str, Any] = {"checkpoint": labels[index] if labels is not None else index, "lambda_max": float(warm.values[0]),
                               "relative_residual": float(warm.relative_residuals[0]), "converged": bool(warm.converged[0]),
                               "matvecs": warm.matvecs, "warm_started": index > 0}
        if compare_cold:
            cold = eigenvalues(op, k=1, which="LA", tol=tol, seed=seed, max_iter=max_iter)
            row.update(cold_lambda_max=float(cold.values[0]), cold_matvecs=cold.matvecs)
        rows.append(row)
    warm_total = sum(r["matvecs"] for r in rows)
    cold_total = sum(r["cold_matvecs"] for r in rows) if compare_cold else None
    return LambdaMaxTrack(rows=tuple(rows), tol=tol, seed=seed, hvps_warm=warm_total, hvps_cold=cold_total,
                          hvps_saved=None if cold_total is None else cold_total - warm_total,
                          wall_time=time.perf_counter() - start_time)


def power_iteration(
    op: LinearOperator,
    k: int = 1,
    tol: float = 1e-3,
    seed: int = 0,
    *,
    max_iter: int = 100,
    progress: bool = False,
) -> EigenResult:
    """The PyHessian-style estimate: power iteration with deflation, for comparison with Lanczos.

    For each of k pairs: v ← H v / ‖H v‖ (orthogonalised against the pairs already found),
    θ = vᵀ H v, stopping when |θ_t − θ_{t−1}| ≤ tol·|θ_{t−1}| or after ``max_iter`` products.
    It converges to the eigenvalue of largest |λ| (a negative one on an indefinite Hessian),
    at a rate |λ_2/λ_1| per step, and the stopping rule measures stagnation, not accuracy:
    the reported residuals ‖H v − θ v‖ (from the last product, no extra cost) show how far
    from an eigenpair it stopped. ``converged`` is the stopping rule, not the residual test.
    """
    start_time = time.perf_counter()
    matvec = CountedMatvec(op)
    rng = np.random.default_rng(seed)
    values: list[float] = []
    residuals: list[float] = []
    converged: list[bool] = []
    vectors: list[torch.Tensor] = []
    iterations = 0
    with progress_bar(total=k * max_iter, desc="power iteration", enabled=progress, leave=False) as bar:
        for _ in range(min(k, matvec.dim)):
            v = matvec.vector(rng.standard_normal(matvec.dim))
            previous, stopped = None, False
            for _ in range(max_iter):
                for u in vectors:
                    v = v - (u @ v) * u
                v = v / torch.linalg.vector_norm(v)
                hv = matvec(v)
                iterations += 1
                bar.update()
                theta = float(v @ hv)
                residual = float(torch.linalg.vector_norm(hv - theta * v))
                if previous is not None and abs(theta - previous) <= tol * abs(previous):
                    stopped = True
                    break
                previous = theta
                if not bool(hv.any()):
                    break
                v = hv
            values.append(theta)
            residuals.append(residual)
            converged.append(stopped)
            vectors.append(v)
    return EigenResult(
        values=np.array(values), residuals=np.array(residuals), converged=np.array(converged),
        vectors=torch.stack(vectors, dim=1).cpu().numpy(), which="LM", k=k, tol=tol, atol=0.0, method="power",
        iterations=iterations, matvecs=matvec.count, seed=seed, wall_time=time.perf_counter() - start_time,
    )
