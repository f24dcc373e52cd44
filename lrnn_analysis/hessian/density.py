"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ)."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator

from ..errors import InputError
from ..progress import progress_bar
from ..statistics import t_halfwidth
from ._common import CountedMatvec
from ._results import dataclass_dict
from .lanczos import Lanczos

__all__ = ["DensityResult", "smooth_together", "spectral_density", "symlog"]


@dataclass(frozen=True)
class DensityResult:
    """SLQ: per probe v, Gauss quadrature nodes θ_j (Ritz values) and weights w_j = (e_1ᵀ s_j)².

    For unit Rademacher probes v = z/√P, Σ_j w_j f(θ_j) ≈ vᵀ f(H) v, exact for polynomials f of
    degree ≤ 2m − 1 (m Lanczos steps), and E[vᵀ f(H) v] = tr f(H) / P. ``density`` is the mean over
    probes of Σ_j w_j N(t; θ_j, sigma²) on ``grid``, which spans [min θ − 3σ, max θ + 3σ] and is
    rescaled so that its trapezoid integral is 1.

    ``scale="symlog"``: the same with every node mapped to t = sign(θ)·log10(1 + |θ|/``linthresh``)
    first, so ``grid`` and ``sigma`` are in t (a density of the symmetric-log eigenvalue, which
    resolves the many tiny eigenvalues next to the few large ones; negative ones keep their sign).

    ``moments[k-1]`` estimates tr(H^k)/P for k = 1..len(moments) (the mean over probes of
    Σ_j w_j θ_j^k, exact per probe for k ≤ 2m − 1) and ``moment_ci_halfwidths`` is the 95%
    t-interval over the probes (infinite with one probe).
    """

    nodes: tuple[np.ndarray, ...]
    weights: tuple[np.ndarray, ...]
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    scale: str
    linthresh: float | None
    moments: np.ndarray
    moment_ci_halfwidths: np.ndarray
    n_probes: int
    steps: int
    dim: int
    matvecs: int
    seed: int
    wall_time: float

    def moment(self, power: int) -> float:
        """Estimate of tr(H^power) / P, the mean over probes of Σ_j w_j θ_j^power."""
        return float(np.mean([np.sum(w * theta**power) for theta, w in zip(self.nodes, self.weights)]))

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


_SCALES = ("linear", "symlog")


def symlog(values: np.ndarray, linthresh: float) -> np.ndarray:
    """sign(λ)·log10(1 + |λ|/linthresh)."""
    return np.sign(values) * np.log10(1.0 + np.abs(values) / linthresh)


def spectral_density(
    op: LinearOperator,
    n_probes: int = 10,
    steps: int = 80,
    seed: int = 0,
    *,
    sigma: float | None = None,
    grid_points: int = 1000,
    scale: str = "linear",
    linthresh: float | None = None,
    max_moment: int = 4,
    progress: bool = False,
) -> DensityResult:
    """Stochastic Lanczos quadrature with full reorthogonalisation (``steps`` products per probe).

    A probe whose Krylov space is exhausted before ``steps`` stops early (its quadrature is then
    exact). ``sigma`` is the Gaussian kernel width; default 1% of the node range
    (max θ − min θ over all probes), or 1e-3·max(1, |θ|) when every node is equal.
    ``scale="symlog"`` smooths in t = sign(θ)·log10(1 + |θ|/linthresh) instead (default
    linthresh: 1e-4·max|θ|, or 1 for a zero spectrum). ``max_moment``: moments tr(H^k)/P for
    k = 1..max_moment, with their interval over probes.
    """
    if n_probes < 1 or steps < 1:
        raise InputError(f"n_probes and steps must be >= 1, got {n_probes} and {steps}")
    if scale not in _SCALES:
        raise InputError(f"scale must be one of {_SCALES}, got {scale!r}")
    start_time = time.perf_counter()
    matvec = CountedMatvec(op)
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    with progress_bar(total=n_probes * steps, desc="SLQ density", enabled=progress, leave=False) as bar:
        for _ in range(n_probes):
            process = Lanczos(matvec, matvec.rademacher(rng))
            while process.steps < steps and not process.exhausted:
                process.step()
                bar.update()
            theta, S = np.linalg.eigh(process.tridiagonal())
            nodes.append(theta)
            weights.append(S[0, :] ** 2)
    per_probe = np.array([[np.sum(w * theta**k) for k in range(1, max_moment + 1)] for theta, w in zip(nodes, weights)])
    moments = per_probe.mean(axis=0)
    halfwidths = np.array([t_halfwidth(per_probe[:, k], 0.95) for k in range(max_moment)])
    mapped, linthresh = _mapped(nodes, scale, linthresh)
    sigma, grid = _width_and_grid(mapped, sigma, grid_points)
    density = _kernel_density(mapped, weights, grid, sigma)
    return DensityResult(
        nodes=tuple(nodes), weights=tuple(weights), grid=grid, density=density, sigma=float(sigma), scale=scale,
        linthresh=linthresh, moments=moments, moment_ci_halfwidths=halfwidths,
        n_probes=n_probes, steps=steps, dim=matvec.dim, matvecs=matvec.count, seed=seed,
        wall_time=time.perf_counter() - start_time,
    )


def _mapped(nodes: Sequence[np.ndarray], scale: str, linthresh: float | None) -> tuple[list[np.ndarray], float | None]:
    """The nodes in the smoothing coordinate t, and the linthresh used (``symlog`` only)."""
    if scale != "symlog":
        return list(nodes), None
    top = float(max(np.abs(theta).max() for theta in nodes))
    linthresh = float(linthresh if linthresh is not None else (1e-4 * top if top > 0 else 1.0))
    if not linthresh > 0:
        raise InputError(f"linthresh must be > 0, got {linthresh}")
    return [symlog(theta, linthresh) for theta in nodes], linthresh


def _width_and_grid(mapped: Sequence[np.ndarray], sigma: float | None, grid_points: int) -> tuple[float, np.ndarray]:
    every = np.concatenate(mapped)
    lo, hi = float(every.min()), float(every.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 1e-3 * max(1.0, abs(hi))
    if not sigma > 0:
        raise InputError(f"sigma must be > 0, got {sigma}")
    return float(sigma), np.linspace(lo - 3 * sigma, hi + 3 * sigma, grid_points)


def _kernel_density(mapped: Sequence[np.ndarray], weights: Sequence[np.ndarray], grid: np.ndarray, sigma: float) -> np.ndarray:
    """Σ over probes of Σ_j w_j N(t; θ_j, σ²) on ``grid``, rescaled to trapezoid integral 1."""
    density = np.zeros_like(grid)
    for theta, w in zip(mapped, weights):
        kernel = np.exp(-0.5 * ((grid[:, None] - theta[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        density += kernel @ w
    return density / np.trapezoid(density, grid)


def smooth_together(results: Sequence[DensityResult], grid_points: int = 1000) -> list[DensityResult]:
    """The densities re-smoothed with one kernel width and one grid (and, for ``symlog``, one
    linthresh) for all of them, so that overlaid curves compare spectra rather than bandwidths:
    σ is 1% of the range of all the models' nodes together (the rule of :func:`spectral_density`).
    Nodes, weights and moments are unchanged; the results must share one scale."""
    if not results:
        return []
    scales = {r.scale for r in results}
    if len(scales) > 1:
        raise InputError(f"densities on different scales {sorted(scales)} cannot share one smoothing")
    scale = results[0].scale
    every, linthresh = _mapped([theta for r in results for theta in r.nodes], scale, None)
    sigma, grid = _width_and_grid(every, None, grid_points)
    return [replace(r, grid=grid, density=_kernel_density(_mapped(r.nodes, scale, linthresh)[0], r.weights, grid, sigma),
                    sigma=sigma, linthresh=linthresh) for r in results]
