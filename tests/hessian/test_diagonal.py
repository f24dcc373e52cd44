"""Diagonal estimators (Hutchinson, XDiag) and the Frobenius norm against the exact dense values."""
import json

import numpy as np
import pytest
from scipy.sparse.linalg import aslinearoperator

from lrnn_analysis.hessian import (
    diagonal,
    frobenius_norm_squared,
)


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
