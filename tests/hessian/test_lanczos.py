"""The Lanczos process: Gauss quadrature exact for low-degree moments, an orthonormal basis."""
import numpy as np
import pytest

from lrnn_analysis.hessian import Lanczos


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
