"""Independent review of the stability certificates: derivations, verification edge cases, soundness.

Every test here checks a property that a correct implementation must have; nothing
relies on the certificate code to define what "correct" means.
"""
import itertools

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from helpers import lipschitz_matrix_np as lipschitz_matrix

from lrnn_analysis.stability import (
    LureSystem,
    certify,
    certify_parameterization,
    norm_test,
    verify_certificate,
)
from lrnn_analysis.stability.forms import incremental_form
from lrnn_analysis.stability.verification import verify


@pytest.fixture(autouse=True)
def _one_thread():
    with threadpool_limits(limits=1):
        yield


# ---------------------------------------------------------------- helpers (independent of the package)


def rk_stage_states(A, W, eps, method, h, u):
    """Stage states of one explicit-midpoint / RK4 / Euler substep, written out by hand."""
    f = lambda x: A @ x + np.tanh(W @ x + u)
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


def linear_substep(A, W, eps, method, Ds):
    """Hand-written increment matrix of one substep with stage slopes D_1..D_m (may differ per stage)."""
    n = A.shape[0]
    I = np.eye(n)
    J = [A + d[:, None] * W for d in Ds]
    if method == "map":
        return Ds[0][:, None] * W
    if method == "euler":
        return I + eps * J[0]
    if method == "rk2":
        return I + eps * J[1] @ (I + 0.5 * eps * J[0])
    K1 = J[0]
    K2 = J[1] @ (I + 0.5 * eps * K1)
    K3 = J[2] @ (I + 0.5 * eps * K2)
    K4 = J[3] @ (I + eps * K3)
    return I + eps / 6.0 * (K1 + 2 * K2 + 2 * K3 + K4)


def p_norm_of(T, P):
    """||T||_P = ||R^T T R^{-T}||_2 with P = R R^T."""
    R = np.linalg.cholesky(P)
    return np.linalg.norm(R.T @ T @ np.linalg.inv(R).T, 2)


def slope_samples(rng, n, L, stages, count):
    """Per-stage diagonal slopes: all vertex combinations of a few kinds plus random interior points."""
    vertices = [np.array(v, float) * L for v in itertools.product([0.0, 1.0], repeat=n)]
    out = [[v] * stages for v in vertices]
    for _ in range(count):
        if rng.random() < 0.5:
            out.append([vertices[rng.integers(len(vertices))] for _ in range(stages)])
        else:
            out.append([rng.uniform(0.0, L, n) for _ in range(stages)])
    return out


# ---------------------------------------------------------------- lifted forms, derived by hand


def test_rk2_lifted_form_matches_the_hand_derivation():
    rng = np.random.default_rng(0)
    n, eps = 3, 0.37
    A, W = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    form = incremental_form(LureSystem(A, W, method="rk2", eps=eps), "rk2")
    I, Z = np.eye(n), np.zeros((n, n))
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
        p = [np.tanh(W @ x + u) - np.tanh(W @ y + u) for x, y in zip(hs, gs)]
        xi = np.concatenate([h - g] + p)
        step = lambda x: x + eps * (A @ (x + 0.5 * eps * (A @ x + np.tanh(W @ x + u))) + np.tanh(W @ (x + 0.5 * eps * (A @ x + np.tanh(W @ x + u))) + u))
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


# ---------------------------------------------------------------- verification of corrupted evidence


def _certified(system, name, tiers=("full-P",)):
    result = certify(system, [name], tiers=list(tiers))[0]
    assert result.holds, result.reason
    return result


def test_verification_rejects_subtly_corrupted_ct_evidence():
    A = np.array([[-1.0, 10.0], [0.0, -1.0]])
    system = LureSystem(A, 0.05 * np.eye(2))
    result = _certified(system, "ct-lmi")
    P, lam, a = result.evidence.P, result.evidence.multipliers, result.rate
    form = incremental_form(system, "ct")
    assert verify_certificate(system, "ct-lmi", P, lam, a).passed
    # exact optimum for this (P, Lambda) and anything better must fail
    a_star = form.best_rate(P, lam)
    assert not verify(form, P, lam, a_star).passed
    assert not verify(form, P, lam, a_star * (1 + 1e-12) + 1e-15).passed
    # P with a tiny negative eigenvalue, P asymmetric by one ulp, a negative multiplier
    w, V = np.linalg.eigh(P)
    negative = (V * [-1e-14 * w[-1], w[-1]]) @ V.T
    negative = 0.5 * (negative + negative.T)
    asym = P.copy()
    asym[0, 1] = np.nextafter(asym[0, 1], np.inf)
    neg_lam = lam.copy()
    neg_lam[0, 1] = -1e-300
    for P_bad, lam_bad in ((negative, lam), (asym, lam), (P, neg_lam), (P, np.full_like(lam, np.nan))):
        assert not verify_certificate(system, "ct-lmi", P_bad, lam_bad, a).passed
    assert not verify_certificate(system, "ct-lmi", P, lam, float("nan")).passed
    assert not verify_certificate(system, "ct-lmi", P, lam, float("inf")).passed


@pytest.mark.parametrize("method,eps,substeps", [("euler", 0.1, 1), ("rk2", 0.2, 2), ("rk4", 0.3, 3)])
def test_verification_rejects_a_discrete_rate_below_the_optimum(method, eps, substeps):
    A = np.array([[-1.0, 2.0], [-0.5, -0.8]])
    W = np.array([[0.3, -0.4], [0.2, 0.1]])
    system = LureSystem(A, W, method=method, eps=eps, substeps=substeps)
    result = _certified(system, f"{method}-lmi")
    P, lam = result.evidence.P, result.evidence.multipliers
    assert np.isclose(result.rate, result.substep_rate**substeps, rtol=1e-12)
    assert np.isclose(result.evidence.r, result.substep_rate**2, rtol=1e-12)
    assert verify_certificate(system, f"{method}-lmi", P, lam, result.rate).passed
    form = incremental_form(system, method)
    rho2_star = form.best_rate(P, lam)
    assert not verify(form, P, lam, rho2_star).passed
    rate_star = np.sqrt(rho2_star) ** substeps
    assert not verify_certificate(system, f"{method}-lmi", P, lam, rate_star * (1 - 1e-10)).passed


def test_verification_is_not_fooled_by_subnormal_scaling():
    # (P, Lambda) -> (c P, c Lambda) leaves the LMI's sign unchanged; 0.7266 exceeds the decay
    # rate -alpha(A + D W) = 0.7194 of a frozen Jacobian, so no certificate at that rate exists.
    A = np.array([[-0.91949521, -0.29276441], [-0.67060986, -1.70076011]])
    W = np.array([[0.20107314, 0.39588521], [-0.06571784, -0.42974594]])
    system = LureSystem(A, W)
    bound = min(-np.linalg.eigvals(A + np.diag(d) @ W).real.max() for d in itertools.product([0, 1], repeat=2))
    assert bound < 0.7266
    c = 2.5e-323
    assert not verify_certificate(system, "ct-lmi", c * np.eye(2), 10 * c * np.ones((1, 2)), 0.7266).passed


# ---------------------------------------------------------------- soundness on random systems


def _random_system(rng, family, n):
    G = rng.standard_normal((n, n))
    A = -np.eye(n) * rng.uniform(0.5, 1.5) + rng.uniform(0.3, 1.5) * (G - G.T) / np.sqrt(n)
    A = A + 0.7 * np.triu(rng.standard_normal((n, n)), 1)
    W = rng.uniform(0.2, 0.7) * rng.standard_normal((n, n)) / np.sqrt(n)
    L = float(rng.choice([1.0, 1.5]))
    if family == "ct":
        return LureSystem(A, W, slope=L)
    if family == "map":
        return LureSystem(np.zeros((n, n)), 1.5 * W, slope=L, method="map")
    scale = np.abs(np.linalg.eigvals(A)).max() + L * np.linalg.norm(W, 2)
    return LureSystem(A, W, slope=L, method=family, eps=float(rng.uniform(0.2, 1.0) / scale), substeps=int(rng.integers(1, 3)))


def _check_sound(system, family, result, rng):
    n, L = system.n, system.slope
    P = np.eye(n) if result.evidence is None else result.evidence.P
    stages = {"ct": 1, "map": 1, "euler": 1, "rk2": 2, "rk4": 4}[family]
    for Ds in slope_samples(rng, n, L, stages, 150):
        if family == "ct":
            J = system.A + Ds[0][:, None] * system.W
            top = np.linalg.eigvalsh(J.T @ P + P @ J + 2.0 * result.rate * P)[-1]
            assert top <= 1e-9 * np.linalg.norm(P, 2)
        else:
            T = linear_substep(system.A, system.W, system.eps, family, Ds)
            assert p_norm_of(T, P) <= result.substep_rate * (1 + 1e-9)
    # nonlinear pairs under saturating and small inputs, P-norm must contract every input step
    for scale in (0.0, 0.5, 20.0):
        h = 3.0 * rng.standard_normal(n)
        g = h + 1e-3 * rng.standard_normal(n)
        for _ in range(10):
            u = scale * rng.standard_normal(n)
            d0 = np.sqrt((h - g) @ P @ (h - g))
            if family == "ct":
                dt, sub = 0.1, 20
                for _ in range(sub):
                    h, g = [_rk4(system, x, u, dt / sub) for x in (h, g)]
                factor = np.exp(-result.rate * dt)
            else:
                h, g = system.step(h, u), system.step(g, u)
                factor = result.rate
            d1 = np.sqrt((h - g) @ P @ (h - g))
            if d0 < 1e-9:
                break
            assert d1 <= factor * d0 * (1 + 1e-6) + 1e-13


def _rk4(system, h, u, dt):
    f = lambda x: system.vector_field(x, u)
    k1 = f(h)
    k2 = f(h + 0.5 * dt * k1)
    k3 = f(h + 0.5 * dt * k2)
    k4 = f(h + dt * k3)
    return h + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


@pytest.mark.parametrize("family", ["ct", "euler", "rk2", "rk4", "map"])
def test_every_certified_rate_survives_stagewise_vertex_slopes_and_simulation(family):
    rng = np.random.default_rng({"ct": 10, "euler": 11, "rk2": 12, "rk4": 13, "map": 14}[family])
    certified = 0
    for trial in range(9):
        system = _random_system(rng, family, int(rng.integers(2, 5)))
        tiers = [["P=I"], ["diag-P"], ["full-P"]][trial % 3]
        for result in (certify(system, [f"{family}-norm"])[0], certify(system, [f"{family}-lmi"], tiers=tiers)[0]):
            if not result.holds:
                continue
            certified += 1
            if family != "ct":
                assert np.isclose(result.rate, result.substep_rate ** (system.substeps if family != "map" else 1))
            _check_sound(system, family, result, rng)
    assert certified >= 6


def test_no_certificate_exceeds_the_frozen_jacobian_bound():
    rng = np.random.default_rng(20)
    for _ in range(6):
        system = _random_system(rng, "ct", 3)
        result = certify(system, ["ct-lmi"], tiers=["P=I", "full-P"])[0]
        if result.holds:
            for d in itertools.product([0.0, system.slope], repeat=3):
                J = system.A + np.array(d)[:, None] * system.W
                assert result.rate <= -np.linalg.eigvals(J).real.max() + 1e-9


def test_early_exit_only_rejects_and_reports_the_violated_condition():
    # A + L W has spectral abscissa 0.2 > 0: no certificate for the sector [0, L] exists
    system = LureSystem(-np.eye(2), 0.6 * np.eye(2), slope=2.0)
    for result in certify(system, ["ct-norm", "ct-lmi"]):
        assert not result.holds and result.rate is None
        assert "A + L W is not Hurwitz" in result.reason and "0.2" in result.reason
    euler = LureSystem(np.array([[-0.1, 1.0], [-1.0, -0.1]]), 0.05 * np.eye(2), method="euler", eps=0.5)
    result = certify(euler, ["euler-lmi"])[0]
    radius = np.abs(np.linalg.eigvals(np.eye(2) + 0.5 * euler.A)).max()
    assert not result.holds and radius >= 1.0
    assert f"{radius:.6g}" in result.reason


# ---------------------------------------------------------------- parameterization


def test_parameterization_bounds_cover_w_and_all_tests_for_odd_beta_gamma():
    rng = np.random.default_rng(30)
    n, eps = 4, 0.3
    for beta_A, gamma_A, beta_W, gamma_W, L in ((-0.7, 2.5, 1.6, -0.4, 1.0), (2.0, 3.0, -0.3, 0.2, 1.5), (0.5, 1.0, 0.5, -0.1, 1.2)):
        for r in (0.05, 0.2, 0.5):
            results = certify_parameterization(
                beta_A, gamma_A, beta_W, gamma_W, r, eps=eps, slope=L,
                tests=["ct-norm", "euler-norm", "rk2-norm", "rk4-norm", "map-norm"],
            )
            for _ in range(15):
                MA, MW = rng.standard_normal((2, n, n))
                MA *= r / np.linalg.norm(MA, 2)
                MW *= r / np.linalg.norm(MW, 2)
                A, W = lipschitz_matrix(MA, beta_A, gamma_A), lipschitz_matrix(MW, beta_W, gamma_W)
                b = results[0].bounds
                assert np.linalg.norm(W, 2) <= b.norm_W + 1e-12
                assert np.linalg.eigvalsh(0.5 * (A + A.T))[-1] <= b.mu_A + 1e-12
                for res in results:
                    if not res.holds:
                        continue
                    method = {"ct-norm": "ode", "map-norm": "map"}.get(res.test, res.test.split("-")[0])
                    member = LureSystem(
                        np.zeros((n, n)) if method == "map" else A, W, slope=L, method=method,
                        eps=None if method in ("ode", "map") else eps,
                    )
                    assert norm_test(member, res.test).value <= res.value + 1e-12
                    assert r < res.r_star


def test_verification_rejects_rates_that_certify_nothing():
    from lrnn_analysis.stability import LureSystem, certify, verify_certificate

    system = LureSystem(-np.eye(2), 0.3 * np.eye(2), method="euler", eps=0.1, substeps=1)
    result = certify(system, ["euler-lmi"], tiers=["P=I", "diag-P"])[0]
    assert result.holds
    P, lam = result.evidence.P, result.evidence.multipliers
    assert verify_certificate(system, "euler-lmi", P, lam, result.rate).passed
    for rate in (-0.95, 1.0, 1.5):
        assert not verify_certificate(system, "euler-lmi", P, lam, rate).passed
    two = LureSystem(-np.eye(2), 0.3 * np.eye(2), method="euler", eps=0.05, substeps=2)
    assert not verify_certificate(two, "euler-lmi", P, lam, -0.5).passed


def test_parameterization_rejects_meaningless_eps_and_slope():
    from lrnn_analysis.stability import certify_parameterization

    for kwargs in ({"eps": -0.1}, {"eps": 0.0}, {"slope": 0.5}, {"slope": -1.0}):
        with pytest.raises(ValueError):
            certify_parameterization(0.5, 0.0, 0.5, 0.0, 1.0, **{"eps": 0.1, **kwargs})
