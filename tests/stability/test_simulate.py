"""Empirical falsification: seeded, reproducible, consistent with linear theory."""
import json

import numpy as np
import pytest

from lrnn_analysis.stability import LureSystem, simulate_pairs

EULER_A = np.array([[-0.1, 1.0], [-1.0, -0.1]])


def test_seeded_and_reproducible():
    system = LureSystem(EULER_A, 0.5 * np.eye(2), method="rk2", eps=0.1)
    a = simulate_pairs(system, pairs=4, steps=30, seed=7)
    b = simulate_pairs(system, pairs=4, steps=30, seed=7)
    assert a.seed == 7 and a.to_dict() == b.to_dict()
    json.dumps(a.to_dict())
    assert simulate_pairs(system, pairs=4, steps=30, seed=8).max_step_factor != a.max_step_factor


def test_forward_euler_counterexample_diverges():
    result = simulate_pairs(LureSystem(EULER_A, 0.05 * np.eye(2), method="euler", eps=0.5), pairs=4, steps=100)
    assert result.max_growth > 10.0 and result.top_lyapunov_exponent > 0


def test_lyapunov_exponents_of_linear_systems():
    A = np.diag([-1.0, -2.0])
    ode = simulate_pairs(LureSystem(A, np.zeros((2, 2))), pairs=2, steps=200, dt=1.0, lyapunov_vectors=2)
    np.testing.assert_allclose(ode.lyapunov_exponents, [-1.0, -2.0], atol=0.02)
    np.testing.assert_allclose(ode.lyapunov_exponents.sum(), -3.0, atol=1e-6)
    euler = simulate_pairs(LureSystem(A, np.zeros((2, 2)), method="euler", eps=0.1), pairs=2, steps=400, lyapunov_vectors=2)
    np.testing.assert_allclose(euler.lyapunov_exponents, np.log([0.9, 0.8]), atol=0.01)
    np.testing.assert_allclose(euler.lyapunov_exponents.sum(), np.log(0.72), atol=1e-12)
    np.testing.assert_allclose(euler.max_step_factor, 0.9, atol=1e-12)
    assert euler.lyapunov_unit == "per input step" and ode.lyapunov_unit == "per unit time"


@pytest.mark.parametrize("method", ["euler", "rk2", "rk4", "rk38"])
def test_tangent_step_is_the_jacobian_of_the_step(method):
    from lrnn_analysis.stability.simulate import _tangent_step

    rng = np.random.default_rng(7)
    n = 4
    system = LureSystem(rng.standard_normal((n, n)), rng.standard_normal((n, n)), method=method, eps=0.3, substeps=2)
    h, u = rng.standard_normal(n), rng.standard_normal(n)
    stepped, V = _tangent_step(system, h, np.eye(n), u)
    np.testing.assert_allclose(stepped, system.step(h, u), atol=1e-14)
    t = 1e-6
    central = np.stack([(system.step(h + t * e, u) - system.step(h - t * e, u)) / (2 * t) for e in np.eye(n)], axis=1)
    np.testing.assert_allclose(V, central, atol=1e-7)
