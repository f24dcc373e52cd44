"""Closed-form parameterization certificate: sound bounds, r*, phase-diagram table."""
import json

import numpy as np
import pytest

from helpers import lipschitz_matrix_np as lipschitz_matrix

from lrnn_analysis.stability import (
    LureSystem,
    certify,
    certify_parameterization,
    parameter_bounds,
    phase_diagram,
)


def random_unit_norm(rng, count, n):
    M = rng.standard_normal((count, n, n))
    return M / np.linalg.norm(M, ord=2, axis=(1, 2))[:, None, None]


def test_bounds_hold_for_thousands_of_random_models():
    rng = np.random.default_rng(0)
    count, n = 3000, 5
    for beta, gamma in ((0.0, 0.5), (0.3, 1.0), (0.5, -0.2), (1.0, 2.0), (1.4, 0.3), (-0.5, 0.0)):
        M = random_unit_norm(rng, count, n) * rng.uniform(0.0, 1.0, (count, 1, 1))
        sym_M = np.linalg.eigvalsh(0.5 * (M + np.swapaxes(M, 1, 2)))
        M = np.concatenate([M, (np.eye(n) * sym_M[:, -1:, None])[:10]])
        A = lipschitz_matrix(M, beta, gamma)
        eps = 0.2
        b = parameter_bounds(beta, gamma, beta, gamma, 1.0, eps)
        mu = np.linalg.eigvalsh(0.5 * (A + np.swapaxes(A, 1, 2)))[:, -1]
        assert np.all(mu <= b.mu_A + 1e-12)
        assert np.all(np.linalg.norm(A, ord=2, axis=(1, 2)) <= b.norm_A + 1e-12)
        assert np.all(np.linalg.norm(np.eye(n) + eps * A, ord=2, axis=(1, 2)) <= b.norm_Ahat + 1e-12)


def test_mu_bound_is_attained_by_a_symmetric_model():
    b = parameter_bounds(0.25, 0.1, 0.5, 0.0, 2.0)
    A = lipschitz_matrix(2.0 * np.eye(3), 0.25, 0.1)
    assert np.isclose(np.linalg.eigvalsh(A)[-1], b.mu_A)


@pytest.mark.parametrize("test,eps", [("ct-norm", None), ("euler-norm", 0.1), ("rk2-norm", 0.1), ("rk4-norm", 0.1),
                                      ("rk38-norm", 0.1), ("map-norm", None)])
def test_r_star_is_the_certified_radius(test, eps):
    args = dict(beta_A=0.3, gamma_A=1.2, beta_W=0.5, gamma_W=0.1, eps=eps, tests=[test])
    r_star = certify_parameterization(r=0.1, **args)[0].r_star
    assert r_star > 0
    assert certify_parameterization(r=r_star * (1 - 1e-6), **args)[0].holds
    assert not certify_parameterization(r=r_star * (1 + 1e-6), **args)[0].holds


def test_certified_family_members_pass_the_system_norm_test():
    rng = np.random.default_rng(1)
    beta_A, gamma_A, beta_W, gamma_W, eps = 0.2, 1.5, 0.5, 0.0, 0.1
    result = certify_parameterization(beta_A, gamma_A, beta_W, gamma_W, 0.3, eps=eps,
                                      tests=["ct-norm", "euler-norm", "rk2-norm", "rk38-norm"])
    assert all(r.holds for r in result)
    MA, MW = random_unit_norm(rng, 40, 4) * 0.3, random_unit_norm(rng, 40, 4) * 0.3
    for ma, mw in zip(MA, MW):
        A, W = lipschitz_matrix(ma, beta_A, gamma_A), lipschitz_matrix(mw, beta_W, gamma_W)
        for method in ("euler", "rk2", "rk38"):
            names = ["ct-norm", f"{method}-norm"]
            assert all(r.holds for r in certify(LureSystem(A, W, method=method, eps=eps), names))


def test_phase_diagram_is_a_tidy_table():
    cells = phase_diagram(np.linspace(0, 1, 5), np.linspace(-1, 2, 4), r=0.5, eps=0.1)
    assert len(cells) == 5 * 4 * 3
    rows = [c.to_dict() for c in cells]
    json.dumps(rows)
    assert {r["test"] for r in rows} == {"ct-norm", "euler-norm", "rk2-norm"}
    assert all((r["margin"] > 0) == r["holds"] for r in rows)
    ct = [r for r in rows if r["test"] == "ct-norm" and r["beta_A"] == 0.5]
    assert [r["holds"] for r in ct] == sorted(r["holds"] for r in ct)
