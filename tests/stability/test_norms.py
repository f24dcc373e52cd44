"""Norm tests: the round-off tolerance of a stiff case, RK4 and 3/8-rule bounds dominating stagewise Jacobians."""
import numpy as np

from lrnn_analysis.stability import (
    LureSystem,
    certify,
    norm_test,
)

from .cases import W_SCALE, U, exactly_negative_definite, linear_step, small_w, stiff_symmetric


def test_the_reported_stiff_case_and_a_clearly_stable_one():
    A = stiff_symmetric(0, 3.8e-12)
    outcome = norm_test(LureSystem(A, small_w(6, 0)), "ct-norm")
    assert outcome.tolerance >= 64 * 7 * U * 2.4e5 and not outcome.holds
    stable = stiff_symmetric(0, -1.0)
    result = certify(LureSystem(stable, small_w(6, 0)), ["ct-norm"])[0]
    assert result.holds and 0 < result.rate < 1.0
    assert exactly_negative_definite(stable + (W_SCALE + result.rate) * np.eye(6))


def test_rk4_norm_bound_dominates_stagewise_jacobians():
    rng = np.random.default_rng(3)
    for _ in range(40):
        n = 3
        A = rng.standard_normal((n, n))
        W = rng.standard_normal((n, n))
        system = LureSystem(A, W, method="rk4", eps=rng.uniform(0.01, 0.5))
        bound = norm_test(system, "rk4-norm").value
        rk2_bound = norm_test(LureSystem(A, W, method="rk2", eps=system.eps), "rk2-norm").value
        rk2 = LureSystem(A, W, method="rk2", eps=system.eps)
        for _ in range(50):
            Ds = [rng.uniform(0.0, 1.0, n) for _ in range(4)]
            assert np.linalg.norm(linear_step(system, Ds), 2) <= bound * (1 + 1e-12)
            assert np.linalg.norm(linear_step(rk2, Ds[:2]), 2) <= rk2_bound * (1 + 1e-12)


def test_rk38_norm_bound_dominates_stagewise_jacobians_and_the_linear_step_is_rk4s():
    """The 3/8 rule's step for frozen stage Jacobians J_i = A + D_i W never exceeds rk38-norm, and with
    one common J it is R(eps J), the stability polynomial it shares with classical RK4."""
    from lrnn_analysis.stability.spectra import step_matrix

    rng = np.random.default_rng(4)
    worst = 0.0
    for _ in range(40):
        n = 3
        A, W = rng.standard_normal((n, n)), rng.standard_normal((n, n))
        system = LureSystem(A, W, method="rk38", eps=rng.uniform(0.01, 0.5))
        bound = norm_test(system, "rk38-norm").value
        for _ in range(50):
            Ds = [rng.uniform(0.0, 1.0, n) * (rng.random() < 0.8) for _ in range(4)]
            worst = max(worst, np.linalg.norm(linear_step(system, Ds), 2) / bound)
        d = rng.uniform(0.0, 1.0, n)
        J = A + d[:, None] * W
        np.testing.assert_allclose(linear_step(system, [d] * 4), step_matrix("rk38", system.eps, J), atol=1e-12)
        np.testing.assert_allclose(step_matrix("rk38", system.eps, J), step_matrix("rk4", system.eps, J), atol=0)
        # No input and W = 0: the nonlinear step is the linear one, R(eps A) h.
        h = rng.standard_normal(n)
        linear = LureSystem(A, np.zeros((n, n)), method="rk38", eps=system.eps)
        np.testing.assert_allclose(linear.step(h, np.zeros(n)), step_matrix("rk38", system.eps, A) @ h, atol=1e-12)
    assert worst <= 1 + 1e-12
