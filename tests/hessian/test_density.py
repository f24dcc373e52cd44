"""Spectral densities (stochastic Lanczos quadrature): moments with intervals against dense moments,
normalisation on the documented grid, the symlog scale."""
import json

import numpy as np
import pytest

from lrnn_analysis.hessian import (
    spectral_density,
)
from lrnn_analysis.hessian.density import smooth_together


def test_density_moments_with_intervals_match_dense_moments(case):
    op, H = case
    P = op.dim
    result = spectral_density(op, n_probes=40, steps=6, seed=0, max_moment=4)
    assert len(result.moments) == 4
    for k in range(1, 5):
        exact = np.trace(np.linalg.matrix_power(H, k)) / P
        assert result.moments[k - 1] == pytest.approx(result.moment(k))
        assert abs(result.moments[k - 1] - exact) <= 2 * result.moment_ci_halfwidths[k - 1]
    json.dumps(result.to_dict(), allow_nan=False)


def test_symlog_density_is_the_linear_density_of_the_mapped_nodes(case):
    op, H = case
    result = spectral_density(op, n_probes=2, steps=op.dim, seed=1, scale="symlog", linthresh=1e-3)
    assert result.scale == "symlog" and result.linthresh == 1e-3
    spectrum = np.linalg.eigvalsh(H)
    mapped = np.sign(spectrum) * np.log10(1 + np.abs(spectrum) / 1e-3)
    assert result.grid[0] == pytest.approx(mapped.min() - 3 * result.sigma, abs=1e-6)
    assert result.grid[-1] == pytest.approx(mapped.max() + 3 * result.sigma, abs=1e-6)
    assert np.trapezoid(result.density, result.grid) == pytest.approx(1.0)
    mean_t = np.trapezoid(result.grid * result.density, result.grid)
    exact_mean_t = np.mean([np.sum(w * np.sign(theta) * np.log10(1 + np.abs(theta) / 1e-3))
                            for theta, w in zip(result.nodes, result.weights, strict=True)])
    assert mean_t == pytest.approx(exact_mean_t, abs=0.01 * (mapped.max() - mapped.min()))
    with pytest.raises(ValueError, match="scale"):
        spectral_density(op, n_probes=1, steps=2, scale="log")


def test_slq_density_moments_match_dense_moments(ce):
    op, H = ce
    P = op.dim
    result = spectral_density(op, n_probes=30, steps=10, seed=0)
    assert result.moment(0) == pytest.approx(1.0)
    for power in (1, 2, 3):
        A = np.linalg.matrix_power(H, power)
        exact = np.trace(A) / P
        stderr = np.sqrt(2 * (np.sum(A**2) - np.sum(np.diag(A) ** 2)) / 30) / P
        assert abs(result.moment(power) - exact) <= 4 * stderr
    assert result.matvecs == 30 * 10


def test_slq_density_is_normalised_on_the_documented_grid(ce):
    op, H = ce
    result = spectral_density(op, n_probes=1, steps=op.dim, seed=2)
    spectrum = np.linalg.eigvalsh(H)
    assert len(result.nodes[0]) < op.dim
    np.testing.assert_allclose(result.nodes[0][[0, -1]], spectrum[[0, -1]], rtol=1e-10)
    assert np.abs(result.nodes[0][:, None] - spectrum[None, :]).min(axis=1).max() < 1e-8
    assert np.trapezoid(result.density, result.grid) == pytest.approx(1.0)
    assert result.sigma == pytest.approx(0.01 * (spectrum[-1] - spectrum[0]), rel=1e-6)
    assert result.grid[0] == pytest.approx(spectrum[0] - 3 * result.sigma, rel=1e-6)
    assert result.grid[-1] == pytest.approx(spectrum[-1] + 3 * result.sigma, rel=1e-6)
    mean = np.trapezoid(result.grid * result.density, result.grid)
    assert mean == pytest.approx(np.trace(H) / op.dim, abs=0.02 * np.abs(spectrum).max())
    fixed = spectral_density(op, n_probes=1, steps=5, sigma=0.5)
    assert fixed.sigma == 0.5
    json.dumps(fixed.to_dict(), allow_nan=False)


@pytest.mark.parametrize("scale", ["linear", "symlog"])
def test_overlaid_densities_share_one_kernel_width_and_grid(case, scale):
    op, _ = case
    small = spectral_density(op / 10.0, n_probes=2, steps=4, seed=0, scale=scale)
    large = spectral_density(op, n_probes=3, steps=5, seed=1, scale=scale)
    assert small.sigma != large.sigma
    together = smooth_together([small, large], grid_points=400)
    assert together[0].sigma == together[1].sigma
    assert np.array_equal(together[0].grid, together[1].grid)
    assert together[0].linthresh == together[1].linthresh
    for before, after in zip([small, large], together, strict=True):
        assert after.nodes is before.nodes and np.array_equal(after.moments, before.moments)
        assert np.trapezoid(after.density, after.grid) == pytest.approx(1.0)
        mapped = [np.sign(t) * np.log10(1 + np.abs(t) / after.linthresh) if scale == "symlog" else t for t in after.nodes]
        exact_mean = np.mean([np.sum(w * t) for t, w in zip(mapped, after.weights, strict=True)])
        assert np.trapezoid(after.grid * after.density, after.grid) == pytest.approx(exact_mean, abs=0.02 * np.ptp(after.grid))
    # one width: the rule of spectral_density applied to every model's nodes together
    every = np.concatenate([np.sign(t) * np.log10(1 + np.abs(t) / together[0].linthresh) if scale == "symlog" else t
                            for r in (small, large) for t in r.nodes])
    assert together[0].sigma == pytest.approx(0.01 * np.ptp(every))
    with pytest.raises(ValueError, match="different scales"):
        smooth_together([small, spectral_density(op, n_probes=1, steps=3, scale="symlog" if scale == "linear" else "linear")])
