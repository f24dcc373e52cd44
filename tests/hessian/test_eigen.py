"""Lanczos eigenvalues and power iteration against numpy's eigvalsh; warm starts and lambda_max tracking."""
import json

import numpy as np
import pytest
from scipy.sparse.linalg import LinearOperator
from torch import nn

from lrnn_analysis.hessian import (
    HessianOperator,
    eigenvalues,
    power_iteration,
    trace,
    track_lambda_max,
    warm_start,
)

from .cases import lipschitz_case, make_op


@pytest.fixture(scope="module")
def indefinite():
    """The negated MSE: the most negative eigenvalue dominates |λ|, as on a saddle."""
    return lipschitz_case(lambda out, y: -nn.functional.mse_loss(out, y), outputs=1)


def test_warm_start_reuses_the_eigenvector_and_the_tracker_counts_saved_products():
    ops = [make_op(seed=0), make_op(seed=0), make_op(seed=0)]
    exact = np.linalg.eigvalsh(ops[0].to_dense().numpy())[-1]
    cold = eigenvalues(ops[0], which="LA", tol=1e-6, seed=0)
    warm = eigenvalues(ops[0], which="LA", tol=1e-6, v0=cold.vectors[:, 0])
    assert warm.matvecs < cold.matvecs and warm.values[0] == pytest.approx(exact, rel=1e-6) and warm.seed is None
    with pytest.raises(ValueError, match="v0"):
        eigenvalues(ops[0], v0=np.ones(3))
    track = track_lambda_max(iter(ops), tol=1e-6, seed=0, labels=["e1", "e2", "e3"])
    assert [row["checkpoint"] for row in track.rows] == ["e1", "e2", "e3"]
    assert all(row["lambda_max"] == pytest.approx(exact, rel=1e-6) for row in track.rows)
    assert track.rows[1]["matvecs"] < track.rows[1]["cold_matvecs"]
    assert track.hvps_saved == track.hvps_cold - track.hvps_warm > 0
    json.dumps(track.to_dict(), allow_nan=False)


def test_a_warm_start_finds_a_top_eigenvector_the_previous_vector_lacks():
    # The previous operator's top eigenvector is an eigenvector of this one, but not its top one: from the
    # bare vector Lanczos stops at once on the wrong eigenvalue; warm_start keeps every direction.
    spectrum = np.linspace(1.0, 0.01, 40)
    spectrum[:2] = [3.0, 2.0]
    op = LinearOperator((40, 40), matvec=lambda v: spectrum * v.reshape(-1), dtype=np.float64)
    previous = np.zeros(40)
    previous[1] = -2.5
    bare = eigenvalues(op, which="LA", tol=1e-8, v0=previous)
    assert bare.values[0] == pytest.approx(2.0) and bare.all_converged  # a converged, wrong answer
    warm = eigenvalues(op, which="LA", tol=1e-8, v0=warm_start(previous, seed=3))
    assert warm.values[0] == pytest.approx(3.0, rel=1e-10) and warm.all_converged
    start = warm_start(previous, seed=3)
    gaussian = np.random.default_rng(3).standard_normal(40)
    np.testing.assert_allclose(start, previous / 2.5 + gaussian / np.linalg.norm(gaussian), rtol=1e-15)
    for bad in (np.zeros(40), np.full(40, np.nan), np.full(40, np.inf)):
        with pytest.raises(ValueError, match="warm start"):
            warm_start(bad)
    for scale in (1e-170, 1e-310, 1e200):  # finite and non-zero, though their squares under- or overflow
        np.testing.assert_allclose(warm_start(scale * previous, seed=3), start, rtol=1e-14)


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
    for value, vector, residual in zip(result.values, result.vectors.T, result.residuals, strict=True):
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
    for value, vector, residual in zip(result.values, result.vectors.T, result.residuals, strict=True):
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
