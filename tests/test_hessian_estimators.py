"""Lanczos eigenvalues, power iteration, trace and SLQ density against dense numpy linear algebra."""
import json

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import nn

from lrnn_analysis.hessian import HessianOperator, Lanczos, eigenvalues, power_iteration, spectral_density, trace
from lrnn_analysis.models import ModelConfig, build_model


def lipschitz_case(loss_fn, outputs=3, n=8, T=12, batch=8, seed=0, dtype="float64"):
    model = build_model(ModelConfig("lipschitz", 2, n, outputs, eps=0.2), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, T, 2, generator=generator)
    y = torch.randint(0, outputs, (batch,), generator=generator) if outputs > 1 else torch.randn(batch, 1, generator=generator)
    op = HessianOperator(model, loss_fn, (x, y), dtype=dtype)
    return op, op.to_dense().double().numpy() if dtype == "float64" else None


@pytest.fixture(scope="module")
def ce():
    return lipschitz_case(nn.CrossEntropyLoss())


@pytest.fixture(scope="module")
def indefinite():
    """The negated MSE: the most negative eigenvalue dominates |λ|, as on a saddle."""
    return lipschitz_case(lambda out, y: -nn.functional.mse_loss(out, y), outputs=1)


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_lanczos_eigenvalues_match_eigvalsh(ce, which):
    op, H = ce
    spectrum = np.linalg.eigvalsh(H)
    result = eigenvalues(op, k=3, which=which, tol=1e-8, seed=3)
    expected = {"LA": spectrum[::-1][:3], "SA": spectrum[:3],
                "LM": spectrum[np.argsort(-np.abs(spectrum))][:3],
                "BE": np.concatenate([spectrum[::-1][:3], spectrum[:3]])}[which]
    np.testing.assert_allclose(result.values, expected, rtol=1e-6)
    assert result.all_converged and np.all(result.residuals <= 1e-8 * np.abs(result.values))
    for value, vector, residual in zip(result.values, result.vectors.T, result.residuals):
        assert np.linalg.norm(H @ vector - value * vector) == pytest.approx(residual, rel=1e-3, abs=1e-12)
    assert result.matvecs == result.iterations < op.dim
    json.dumps(result.to_dict(), allow_nan=False)


def test_lanczos_stops_on_the_ritz_residual_and_is_reproducible(ce):
    op, H = ce
    loose = eigenvalues(op, which="LA", tol=1e-2, seed=0)
    tight = eigenvalues(op, which="LA", tol=1e-8, seed=0)
    assert loose.matvecs < tight.matvecs
    assert loose.relative_residuals[0] <= 1e-2
    top = np.linalg.eigvalsh(H)[-1]
    assert abs(loose.values[0] - top) <= loose.residuals[0] ** 2 / 1e-3 + 1e-12
    again = eigenvalues(op, which="LA", tol=1e-2, seed=0)
    np.testing.assert_array_equal(loose.values, again.values)
    assert loose.seed == 0


def test_lanczos_reports_non_convergence_within_budget(ce):
    op, _ = ce
    result = eigenvalues(op, k=2, which="SA", tol=1e-12, max_iter=6)
    assert result.iterations == 6 and not result.all_converged


def test_float32_operator_reaches_relative_residual_1e3(ce):
    op64, H = ce
    model, loss_fn, batch = op64.model, op64.loss_fn, op64.batches[0]
    op32 = HessianOperator(model, loss_fn, batch)
    spectrum = np.linalg.eigvalsh(H)
    result = eigenvalues(op32, k=1, which="BE", tol=1e-3)
    assert result.all_converged
    np.testing.assert_allclose(result.values, [spectrum[-1], spectrum[0]], rtol=2e-3)


def test_indefinite_case_lanczos_is_right_where_power_iteration_returns_largest_magnitude(indefinite):
    op, H = indefinite
    spectrum = np.linalg.eigvalsh(H)
    assert -spectrum[0] > 2 * spectrum[-1] > 0
    both = eigenvalues(op, which="BE", tol=1e-6)
    np.testing.assert_allclose(both.values, [spectrum[-1], spectrum[0]], rtol=1e-5)
    power = power_iteration(op, k=1, tol=1e-6, max_iter=500)
    assert power.values[0] == pytest.approx(spectrum[0], rel=1e-3)


def test_power_iteration_with_deflation_and_honest_residuals(ce):
    op, H = ce
    spectrum = np.linalg.eigvalsh(H)
    result = power_iteration(op, k=2, tol=1e-3, seed=1)
    by_magnitude = spectrum[np.argsort(-np.abs(spectrum))]
    assert result.values[0] == pytest.approx(by_magnitude[0], rel=1e-2)
    for value, vector, residual in zip(result.values, result.vectors.T, result.residuals):
        assert np.linalg.norm(H @ vector - value * vector) == pytest.approx(residual, rel=1e-6)
    assert result.matvecs == result.iterations


def test_tiny_loss_scale_relative_criteria_still_work():
    op, H = lipschitz_case(lambda out, y: 1e-6 * nn.functional.cross_entropy(out, y))
    spectrum = np.linalg.eigvalsh(H)
    assert np.abs(spectrum).max() < 1e-4
    result = eigenvalues(op, which="BE", tol=1e-6)
    assert result.all_converged
    np.testing.assert_allclose(result.values, [spectrum[-1], spectrum[0]], rtol=1e-5)
    estimate = trace(op, method="hutch++", tol=1e-2, max_matvecs=120)
    assert abs(estimate.estimate - np.trace(H)) <= estimate.ci_halfwidth


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_confidence_interval_covers_exact_trace_in_90_percent_of_seeds(ce, method):
    _, H = ce
    op, exact = aslinearoperator(H), np.trace(H)
    results = [trace(op, method=method, tol=0.0, max_matvecs=24, seed=seed) for seed in range(100)]
    covered = [abs(r.estimate - exact) <= r.ci_halfwidth for r in results]
    assert np.mean(covered) >= 0.9
    assert all(r.matvecs == 24 and r.stop_reason == "budget" and not r.converged for r in results)


def test_hutchplusplus_beats_hutchinson_and_tolerance_stops(ce):
    _, H = ce
    op, exact = aslinearoperator(H), np.trace(H)
    plain = [trace(op, "hutchinson", tol=0.0, max_matvecs=60, seed=s) for s in range(20)]
    plus = [trace(op, "hutch++", tol=0.0, max_matvecs=60, seed=s) for s in range(20)]
    assert np.mean([(r.estimate - exact) ** 2 for r in plus]) < np.mean([(r.estimate - exact) ** 2 for r in plain])
    assert plus[0].sketch_size == 20 and plus[0].exact_part != 0
    stopped = trace(ce[0], "hutch++", tol=0.05, max_matvecs=300, seed=0)
    assert stopped.converged and stopped.stop_reason == "tolerance" and stopped.matvecs < 300
    assert stopped.ci_halfwidth <= 0.05 * abs(stopped.estimate)
    json.dumps(stopped.to_dict(), allow_nan=False)


def test_trace_on_a_full_rank_sketch_is_exact_up_to_its_roundoff_bound(ce):
    A = np.diag(np.arange(1.0, 7.0))
    result = trace(aslinearoperator(A), "hutch++", max_matvecs=18, sketch_size=6)
    assert result.estimate == pytest.approx(21.0) and 0 < result.ci_halfwidth < 1e-12
    assert result.stop_reason == "exact" and result.converged and result.matvecs == 12
    op64, H = ce
    op32 = HessianOperator(op64.model, op64.loss_fn, op64.batches[0])
    full = trace(op32, "hutch++", max_matvecs=2 * op32.dim, sketch_size=op32.dim)
    assert full.ci_halfwidth == full.roundoff_bound > 0
    assert abs(full.estimate - np.trace(H)) <= full.ci_halfwidth
    assert full.roundoff_bound < 1e-2 * abs(np.trace(H))


def test_gauss_quadrature_is_exact_for_low_degree_moments(ce):
    op, H = ce
    probe = np.random.default_rng(0).choice([-1.0, 1.0], op.dim) / np.sqrt(op.dim)
    process = Lanczos(lambda v: H @ v, probe)
    for _ in range(6):
        process.step()
    theta, S = np.linalg.eigh(process.tridiagonal())
    weights = S[0] ** 2
    for power in range(12):
        exact = probe @ np.linalg.matrix_power(H, power) @ probe
        assert np.sum(weights * theta**power) == pytest.approx(exact, rel=1e-8, abs=1e-12)
    Q = process.basis
    np.testing.assert_allclose(Q.T @ Q, np.eye(6), atol=1e-12)


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
