"""Spectral diagnostics: the Bendixson box, stability polynomials and regions, the spectrum report."""
import json

import numpy as np

from lrnn_analysis.stability import LureSystem, bendixson_box, spectrum
from lrnn_analysis.stability.spectra import stability_polynomial, step_matrix


def test_bendixson_box_contains_eigenvalues_of_thousands_of_random_matrices():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8):
        X = rng.standard_normal((1000, n, n)) * rng.uniform(0.1, 10.0, (1000, 1, 1))
        eigs = np.linalg.eigvals(X)
        H = 0.5 * (X + np.swapaxes(X, 1, 2))
        S = 0.5 * (X - np.swapaxes(X, 1, 2))
        sym = np.linalg.eigvalsh(H)
        skew_norm = np.linalg.norm(S, ord=2, axis=(1, 2))
        tol = 1e-9 * (1.0 + np.abs(X).max(axis=(1, 2)))
        assert np.all(eigs.real >= sym[:, :1] - tol[:, None])
        assert np.all(eigs.real <= sym[:, -1:] + tol[:, None])
        assert np.all(np.abs(eigs.imag) <= skew_norm[:, None] + tol[:, None])
    assert bendixson_box(X[0]).contains(np.linalg.eigvals(X[0]))


def test_stability_polynomials_match_step_matrices():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((4, 4))
    for method in ("euler", "rk2", "rk4"):
        T = step_matrix(method, 0.3, A)
        expected = np.sort_complex(stability_polynomial(method, 0.3 * np.linalg.eigvals(A)))
        np.testing.assert_allclose(np.sort_complex(np.linalg.eigvals(T)), expected, atol=1e-10)
    np.testing.assert_allclose(step_matrix("rk2", 0.3, A), np.eye(4) + 0.3 * A + 0.045 * A @ A, atol=1e-14)


def test_spectrum_report_of_the_euler_counterexample():
    A = np.array([[-0.1, 1.0], [-1.0, -0.1]])
    report = spectrum(LureSystem(A, 0.05 * np.eye(2), method="euler", eps=0.5))
    assert "not a certificate" in report.kind
    assert np.isclose(report.abscissa_A, -0.1) and np.isclose(report.mu2_A, -0.1)
    assert np.isclose(report.norm_W, 0.05)
    assert np.isclose(report.bendixson_A.im_max, 1.0)
    disc = report.discretization
    assert disc is not None and not disc.all_in_region
    assert np.isclose(disc.step_spectral_radius, abs(1 + 0.5 * (-0.1 + 1j)))
    json.dumps(report.to_dict())
    small = spectrum(LureSystem(A, 0.05 * np.eye(2), method="rk2", eps=0.05)).discretization
    assert small is not None and small.all_in_region
    assert spectrum(LureSystem(A, np.eye(2))).discretization is None
