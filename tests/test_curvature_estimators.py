"""XTrace, diagonal (Hutchinson, XDiag), Frobenius norm, per-block table, density moments and symlog
density, warm starts: each against the exact dense computation on a small float64 Hessian."""
import json

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import nn

from lrnn_analysis.hessian import (
    BLOCK_FIELDS,
    HessianOperator,
    block_curvature,
    diagonal,
    eigenvalues,
    frobenius_norm_squared,
    spectral_density,
    trace,
    track_lambda_max,
)
from lrnn_analysis.models import ModelConfig, build_model


def make_op(seed=0, n=6, T=8):
    model = build_model(ModelConfig("lipschitz", 2, n, 3, eps=0.2), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(8, T, 2, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    return HessianOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64")


@pytest.fixture(scope="module")
def case():
    op = make_op()
    return op, op.to_dense().numpy()


def test_xtrace_is_accurate_and_beats_hutchplusplus_at_equal_budget(case):
    _, H = case
    op, exact = aslinearoperator(H), np.trace(H)
    xt = [trace(op, "xtrace", max_matvecs=40, seed=s) for s in range(30)]
    hpp = [trace(op, "hutch++", tol=0.0, max_matvecs=40, seed=s) for s in range(30)]
    assert all(r.matvecs == 40 and r.sketch_size == 20 and len(r.samples) == 20 for r in xt)
    assert np.mean([(r.estimate - exact) ** 2 for r in xt]) < np.mean([(r.estimate - exact) ** 2 for r in hpp])
    assert np.mean([abs(r.estimate - exact) <= r.ci_halfwidth for r in xt]) >= 0.8
    json.dumps(xt[0].to_dict(), allow_nan=False)


def test_xtrace_is_exact_when_the_rank_is_below_the_probe_count():
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((40, 5)))[0]
    A = U @ np.diag([5.0, 3.0, 2.0, -1.0, 0.5]) @ U.T + 1e-9 * np.eye(40)
    result = trace(aslinearoperator(A), "xtrace", max_matvecs=16, seed=1)
    assert result.estimate == pytest.approx(np.trace(A), rel=1e-6)
    with pytest.raises(ValueError, match="xtrace needs"):
        trace(aslinearoperator(A), "xtrace", max_matvecs=80)
    singular = U @ np.diag([5.0, 3.0, 2.0, -1.0, 0.5]) @ U.T
    with pytest.raises(ValueError, match="rank-deficient"):
        trace(aslinearoperator(singular), "xtrace", max_matvecs=16, seed=1)


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_estimators_against_the_exact_diagonal(case, method):
    _, H = case
    result = diagonal(aslinearoperator(H), method, max_matvecs=60, seed=2)
    exact = np.diag(H)
    assert result.estimate.shape == exact.shape and result.matvecs == 60
    z = np.abs(result.estimate - exact) / np.maximum(result.standard_error, 1e-300)
    assert np.mean(z <= 2.0) >= 0.85
    if method == "hutchinson":
        variance = (H**2).sum(axis=1) - np.diag(H) ** 2
        np.testing.assert_allclose(np.mean(result.standard_error**2 * 60), np.mean(variance), rtol=0.5)
    json.dumps(result.to_dict(), allow_nan=False)


def test_xdiag_is_more_accurate_than_hutchinson_and_exact_for_low_rank(case):
    _, H = case
    errors = {m: np.mean([np.sum((diagonal(aslinearoperator(H), m, 60, seed=s).estimate - np.diag(H)) ** 2)
                          for s in range(5)]) for m in ("hutchinson", "xdiag")}
    assert errors["xdiag"] < errors["hutchinson"]
    rng = np.random.default_rng(1)
    B = rng.standard_normal((30, 4))
    low = B @ B.T
    np.testing.assert_allclose(diagonal(aslinearoperator(low + 1e-10 * np.eye(30)), "xdiag", 12).estimate,
                               np.diag(low), rtol=1e-6, atol=1e-8)


def test_frobenius_norm_squared_interval_covers_the_exact_value(case):
    _, H = case
    exact = np.sum(H**2)
    results = [frobenius_norm_squared(aslinearoperator(H), tol=0.0, max_matvecs=30, seed=s) for s in range(60)]
    assert np.mean([abs(r.estimate - exact) <= r.ci_halfwidth for r in results]) >= 0.85
    stopped = frobenius_norm_squared(aslinearoperator(H), tol=0.1, max_matvecs=500, seed=0)
    assert stopped.converged and stopped.matvecs < 500 and stopped.norm == pytest.approx(np.sqrt(stopped.estimate))
    json.dumps(stopped.to_dict(), allow_nan=False)


def test_block_table_matches_the_dense_diagonal_blocks(case):
    op, H = case
    table = block_curvature(op, tol=1e-8, trace_matvecs=30, seed=0, first=("M_W", "M_A"))
    assert [row["param"] for row in table.rows][:2] == ["M_W", "M_A"]
    assert {row["param"] for row in table.rows} == set(op.names)
    slices = op.block_slices()
    for row in table.rows:
        assert tuple(row) == BLOCK_FIELDS
        block = H[slices[row["param"]], slices[row["param"]]]
        assert row["lambda_max"] == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=1e-6, abs=1e-12)
        assert row["numel"] == block.shape[0]
        if row["trace_method"] == "exact":
            assert row["trace"] == pytest.approx(np.trace(block), rel=1e-10, abs=1e-14)
            assert 0 <= row["trace_ci_halfwidth"] < 1e-9
        else:
            assert abs(row["trace"] - np.trace(block)) <= 3 * row["trace_ci_halfwidth"]
    assert {row["trace_method"] for row in table.rows} == {"exact", "hutch++"}
    assert table.matvecs == sum(row["matvecs"] for row in table.rows)
    json.dumps(table.to_dict(), allow_nan=False)


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
                            for theta, w in zip(result.nodes, result.weights)])
    assert mean_t == pytest.approx(exact_mean_t, abs=0.01 * (mapped.max() - mapped.min()))
    with pytest.raises(ValueError, match="scale"):
        spectral_density(op, n_probes=1, steps=2, scale="log")


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


def test_batched_matmat_matches_the_loop_and_records_its_calibration(case):
    op, H = case
    X = np.random.default_rng(0).standard_normal((op.dim, 6))
    for mode in ("loop", "batched", "auto"):
        fresh = HessianOperator(op.model, op.loss_fn, op.batches, dtype="float64", matmat=mode)
        np.testing.assert_allclose(fresh.matmat(X), H @ X, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fresh.matmat(X), H @ X, rtol=1e-10, atol=1e-12)
        assert fresh.matvecs == 12
        assert (fresh.matmat_calibration is not None) == (mode == "auto")
    with pytest.raises(ValueError, match="matmat"):
        HessianOperator(op.model, op.loss_fn, op.batches, matmat="vmap")
