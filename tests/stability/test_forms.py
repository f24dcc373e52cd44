"""Incremental (lifted) forms against hand derivations and exact nonlinear increments; the assembled
LMI against the S-procedure quadratic form and the documented block matrix."""
import numpy as np
import pytest

from lrnn_analysis.stability import (
    LureSystem,
)
from lrnn_analysis.stability.forms import _TABLEAUS, incremental_form


def rk_stage_states(A, W, eps, method, h, u):
    """Stage states of one explicit-midpoint / RK4 / Euler substep, written out by hand."""
    f = lambda x: A @ x + np.tanh(W @ x + u)  # noqa: E731
    if method == "euler":
        return [h]
    if method == "rk2":
        return [h, h + 0.5 * eps * f(h)]
    k1 = f(h)
    x2 = h + 0.5 * eps * k1
    k2 = f(x2)
    x3 = h + 0.5 * eps * k2
    k3 = f(x3)
    return [h, x2, x3, h + eps * k3]


def stage_states(system, h, u):
    """Stage states h_1..h_m of one substep of the explicit scheme (h_1 = h)."""
    a, _ = _TABLEAUS[system.method]
    states, slopes = [], []
    for i in range(len(a)):
        x = h + system.eps * sum(a[i][j] * slopes[j] for j in range(i))
        states.append(x)
        slopes.append(system.vector_field(x, u))
    return states


def test_rk2_lifted_form_matches_the_hand_derivation():
    rng = np.random.default_rng(0)
    n, eps = 3, 0.37
    A, W = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    form = incremental_form(LureSystem(A, W, method="rk2", eps=eps), "rk2")
    I, Z = np.eye(n), np.zeros((n, n))  # noqa: E741 - the identity, as in the derivation
    # xi = (delta, p1, p2): delta_2 = (I + eps/2 A) delta + eps/2 p1,
    # delta+ = delta + eps (A delta_2 + p2).
    C = np.hstack([I + eps * A + 0.5 * eps**2 * A @ A, 0.5 * eps**2 * A, eps * I])
    G1 = np.hstack([W, Z, Z])
    G2 = np.hstack([W @ (I + 0.5 * eps * A), 0.5 * eps * W, Z])
    np.testing.assert_allclose(form.out, C, atol=1e-14)
    np.testing.assert_allclose(form.q_maps[0], G1, atol=1e-14)
    np.testing.assert_allclose(form.q_maps[1], G2, atol=1e-14)
    # exact tanh increments: delta+ = C xi and the stage sector conditions hold
    L = 1.0
    for _ in range(50):
        h, g, u = rng.standard_normal((3, n)) * rng.choice([0.3, 3.0, 30.0])
        hs, gs = rk_stage_states(A, W, eps, "rk2", h, u), rk_stage_states(A, W, eps, "rk2", g, u)
        p = [np.tanh(W @ x + u) - np.tanh(W @ y + u) for x, y in zip(hs, gs, strict=True)]
        xi = np.concatenate([h - g] + p)
        def step(x, u=u):
            midpoint = x + 0.5 * eps * (A @ x + np.tanh(W @ x + u))
            return x + eps * (A @ midpoint + np.tanh(W @ midpoint + u))

        np.testing.assert_allclose(C @ xi, step(h) - step(g), atol=1e-11)
        for s, G in enumerate((G1, G2)):
            q = G @ xi
            assert np.all(p[s] * (L * q - p[s]) >= -1e-13)


@pytest.mark.parametrize("family,eps", [("ct", None), ("euler", 0.2), ("rk2", 0.3), ("rk4", 0.25), ("map", None)])
def test_assembled_lmi_is_the_s_procedure_quadratic_form(family, eps):
    rng = np.random.default_rng(1)
    n, L, r = 3, 1.7, 0.4
    A = np.zeros((n, n)) if family == "map" else rng.standard_normal((n, n))
    W = rng.standard_normal((n, n))
    method = "ode" if family == "ct" else family
    form = incremental_form(LureSystem(A, W, slope=L, method=method, eps=eps), family)
    B = rng.standard_normal((n, n))
    P = B @ B.T + np.eye(n)
    lam = rng.uniform(0.1, 2.0, (form.stages, n))
    M, _ = form.assemble(P, lam, r)
    for _ in range(20):
        xi = rng.standard_normal(form.N)
        d = xi[:n]
        sector = sum(
            2.0 * xi[n * (s + 1) : n * (s + 2)] @ (lam[s] * (L * (G @ xi) - xi[n * (s + 1) : n * (s + 2)]))
            for s, G in enumerate(form.q_maps)
        )
        y = form.out @ xi
        if family == "ct":
            expected = 2.0 * d @ P @ y + 2.0 * r * d @ P @ d + sector
        else:
            expected = y @ P @ y - r * d @ P @ d + sector
        assert np.isclose(xi @ M @ xi, expected, rtol=1e-10, atol=1e-10)


def test_euler_lmi_matches_the_documented_block_matrix():
    rng = np.random.default_rng(2)
    n, eps, L, rho2 = 3, 0.15, 1.3, 0.8
    A, W = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    form = incremental_form(LureSystem(A, W, slope=L, method="euler", eps=eps), "euler")
    B = rng.standard_normal((n, n))
    P = B @ B.T + np.eye(n)
    lam = rng.uniform(0.1, 2.0, n)
    Ah, Lam = np.eye(n) + eps * A, np.diag(lam)
    expected = np.block(
        [[Ah.T @ P @ Ah - rho2 * P, eps * Ah.T @ P + L * W.T @ Lam], [eps * P @ Ah + L * Lam @ W, eps**2 * P - 2 * Lam]]
    )
    M, _ = form.assemble(P, lam[None, :], rho2)
    np.testing.assert_allclose(M, expected, atol=1e-12)


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
        p = [np.tanh(W @ x + u) - np.tanh(W @ y + u) for x, y in zip(hs, gs, strict=True)]
        xi = np.concatenate([h - g] + p)
        for s, G in enumerate(form.q_maps):
            np.testing.assert_allclose(G @ xi, W @ (hs[s] - gs[s]), atol=1e-12)
        if method == "ode":
            expected = system.vector_field(h, u) - system.vector_field(g, u)
        else:
            expected = system.step(h, u) - system.step(g, u)
        np.testing.assert_allclose(form.out @ xi, expected, atol=1e-12)
