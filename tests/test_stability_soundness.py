"""Soundness: certified rates survive sampled Jacobians, exact nonlinear increments and simulation."""
import numpy as np
import pytest

from lrnn_analysis.stability import LureSystem, certify, norm_test, simulate_pairs
from lrnn_analysis.stability.forms import _TABLEAUS, incremental_form


def stage_states(system, h, u):
    """Stage states h_1..h_m of one substep of the explicit scheme (h_1 = h)."""
    a, _ = _TABLEAUS[system.method]
    states, slopes = [], []
    for i in range(len(a)):
        x = h + system.eps * sum(a[i][j] * slopes[j] for j in range(i))
        states.append(x)
        slopes.append(system.vector_field(x, u))
    return states


@pytest.mark.parametrize("method", ["euler", "rk2", "rk4", "rk38", "map", "ode"])
def test_lifted_form_reproduces_the_exact_nonlinear_increment(method):
    rng = np.random.default_rng(0)
    n = 4
    A = np.zeros((n, n)) if method == "map" else rng.standard_normal((n, n))
    W = 2.0 * rng.standard_normal((n, n))
    eps = None if method in ("map", "ode") else 0.3
    system = LureSystem(A, W, method=method, eps=eps)
    form = incremental_form(system, "ct" if method == "ode" else method)
    for _ in range(20):
        h, g, u = rng.standard_normal((3, n)) * 2.0
        if method in ("map", "ode"):
            hs, gs = [h], [g]
        else:
            hs, gs = stage_states(system, h, u), stage_states(system, g, u)
        p = [np.tanh(W @ x + u) - np.tanh(W @ y + u) for x, y in zip(hs, gs)]
        xi = np.concatenate([h - g] + p)
        for s, G in enumerate(form.q_maps):
            np.testing.assert_allclose(G @ xi, W @ (hs[s] - gs[s]), atol=1e-12)
        if method == "ode":
            expected = system.vector_field(h, u) - system.vector_field(g, u)
        else:
            expected = system.step(h, u) - system.step(g, u)
        np.testing.assert_allclose(form.out @ xi, expected, atol=1e-12)


def linear_step(system, D_stages):
    """Per-substep matrix of the scheme for the frozen Jacobians J_i = A + D_i W (one per stage)."""
    n, eps = system.n, system.eps
    if system.method == "map":
        return D_stages[0][:, None] * system.W
    a, b = _TABLEAUS[system.method]
    K = []
    for i in range(len(b)):
        X = np.eye(n) + eps * sum(a[i][j] * K[j] for j in range(i))
        K.append((system.A + D_stages[i][:, None] * system.W) @ X)
    return np.eye(n) + eps * sum(b[i] * K[i] for i in range(len(b)))


def random_system(rng, n, method, eps):
    M = rng.standard_normal((n, n)) / np.sqrt(n)
    A = -np.eye(n) + rng.uniform(0.0, 1.5) * (M - M.T) + rng.uniform(0.0, 0.6) * M
    W = rng.uniform(0.3, 1.2) * rng.standard_normal((n, n)) / np.sqrt(n)
    if method == "map":
        A = np.zeros((n, n))
    return LureSystem(A, W, method=method, eps=eps)


@pytest.mark.parametrize("method,eps", [("ode", None), ("euler", 0.1), ("rk2", 0.2), ("rk4", 0.3), ("rk38", 0.3),
                                        ("map", None)])
def test_certified_rates_survive_sampled_jacobians_and_simulation(method, eps):
    rng = np.random.default_rng(11)
    family = "ct" if method == "ode" else method
    certified = 0
    for trial in range(8):
        system = random_system(rng, 3, method, eps)
        tiers = ["full-P"] if trial % 2 else ["P=I", "diag-P", "full-P"]
        result = certify(system, [f"{family}-lmi"], tiers=tiers)[0]
        if not result.holds:
            continue
        certified += 1
        P = result.evidence.P
        Pinv_half = np.linalg.inv(np.linalg.cholesky(P))
        stages = incremental_form(system, family).stages
        for _ in range(300):
            Ds = [rng.uniform(0.0, system.slope, system.n) * (rng.random() < 0.8) for _ in range(stages)]
            if method == "ode":
                J = system.A + Ds[0][:, None] * system.W
                assert np.linalg.eigvalsh(J.T @ P + P @ J + 2 * result.rate * P)[-1] <= 1e-9 * np.linalg.norm(P)
                assert np.linalg.eigvals(J).real.max() <= -result.rate + 1e-9
            else:
                T = linear_step(system, Ds)
                factor = np.linalg.norm(np.linalg.cholesky(P).T @ T @ Pinv_half.T, 2)
                assert factor <= result.substep_rate * (1 + 1e-9)
                if stages == 1 or all(np.array_equal(Ds[0], d) for d in Ds):
                    assert np.abs(np.linalg.eigvals(T)).max() <= result.substep_rate * (1 + 1e-9)
        sim = simulate_pairs(system, pairs=6, steps=40, seed=trial, input_scale=2.0, init_scale=3.0, dt=0.2, P=P)
        per_step = np.exp(-result.rate * 0.2) if method == "ode" else result.rate
        assert sim.max_step_factor <= per_step * (1 + 1e-6)
        assert sim.max_growth <= result.gain * (1 + 1e-6)
    assert certified >= 2


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
