"""The certified incremental l2-gain of a whole sequence map: its algebra against exact
computations, its bound against brute force (optimized input pairs and exact Jacobian norms of
the unrolled map, float64), soundness on random systems, tampered evidence and infeasibility."""
import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch

from lrnn_analysis.errors import InputError
from lrnn_analysis.lure import LureSystem
from lrnn_analysis.models import ModelConfig, build_model, lure_step
from lrnn_analysis.stability import certify
from lrnn_analysis.stability import gain as gain_module
from lrnn_analysis.stability.forms import _TABLEAUS
from lrnn_analysis.stability.gain import (
    _DualRiccati,
    certified_radii,
    certify_gain,
    gain_form,
    sequence_map,
    verify_gain,
)

METHODS = ("euler", "rk2", "rk4", "rk38", "map")


def random_system(rng, n, method, eps=0.3, substeps=1, spread=0.4, weight=0.8):
    A = np.zeros((n, n)) if method == "map" else -np.eye(n) + spread * rng.standard_normal((n, n))
    W = weight * rng.standard_normal((n, n))
    return LureSystem(A, W, method=method, eps=None if method == "map" else eps,
                      substeps=1 if method == "map" else substeps)


def readout(system, U, D, b, x):
    """y = D h_T for inputs x (..., T, d), u_t = U x_t + b, h_0 = 0: the scheme as LureSystem runs it."""
    h = system.simulate(np.zeros(x.shape[:-2] + (system.n,)), x @ U.T + b)
    return h[..., -1, :] @ D.T


def unrolled(system, U, D, b):
    """x (T, d) -> y as a float64 torch function: the models' own step (``lure_step``)."""
    A, W, U_t, D_t, b_t = (torch.tensor(np.array(X)) for X in (system.A, system.W, U, D, b))
    step = lure_step(None if system.method == "map" else A, W, system.method, system.eps, system.substeps)

    def run(x):
        h = torch.zeros(1, system.n, dtype=torch.float64)
        for x_t in x:
            h = step(h, (U_t @ x_t + b_t)[None])
        return D_t @ h[0]

    return run


def jacobian_norm(run, x, rows=None):
    J = torch.autograd.functional.jacobian(run, torch.as_tensor(x)).reshape(-1, x.size)
    J = J if rows is None else rows @ J
    return float(torch.linalg.matrix_norm(J, 2))


def largest_jacobian_norm(run, shape, rng, starts=6):
    """max over x of ||d y / d x||_2 by L-BFGS from 0 and random starts: the Lipschitz constant is its sup."""
    best = 0.0
    for k in range(starts):
        x0 = np.zeros(shape) if k == 0 else rng.normal(scale=1.5, size=shape)

        def negative(z):
            x = torch.tensor(z.reshape(shape), requires_grad=True)
            J = torch.autograd.functional.jacobian(run, x, create_graph=True).reshape(-1, x.numel())
            value = torch.linalg.matrix_norm(J, 2)
            (grad,) = torch.autograd.grad(value, x)
            return -float(value.detach()), -grad.numpy().ravel()

        result = scipy.optimize.minimize(negative, x0.ravel(), jac=True, method="L-BFGS-B", options={"maxiter": 60})
        best = max(best, -result.fun, -negative(x0.ravel())[0])
    return best


def largest_pair_ratio(system, U, D, b, shape, rng, starts=4):
    """max over input pairs of ||y(x) - y(x~)|| / ||x - x~||, optimized from random pairs."""
    best = 0.0
    size = int(np.prod(shape))
    for _ in range(starts):
        z0 = rng.normal(scale=1.5, size=2 * size)

        def negative(z):
            x, dx = z[:size].reshape(shape), z[size:].reshape(shape)
            norm = np.linalg.norm(dx)
            if norm < 1e-9:
                return 0.0
            return -np.linalg.norm(readout(system, U, D, b, x + dx) - readout(system, U, D, b, x)) / norm

        result = scipy.optimize.minimize(negative, z0, method="Powell", options={"maxfev": 3000, "xtol": 1e-6})
        best = max(best, -result.fun)
    return best


def stage_states(system, h, u):
    a, _ = _TABLEAUS[system.method]
    states, slopes = [], []
    for i in range(len(a)):
        z = h + system.eps * sum(a[i][j] * slopes[j] for j in range(i))
        states.append(z)
        slopes.append(system.vector_field(z, u))
    return states


@pytest.mark.parametrize("method", METHODS)
def test_the_input_blocks_reproduce_the_dissipation_identity_of_the_exact_increment(method):
    """chi^T M_mu chi = V(delta+) - r V(delta) - mu ||dx||^2 + sum_s 2 p_s^T Lambda_s (L q_s - p_s), with
    xi from the nonlinear stages of two trajectories driven by different inputs, and q_s = G_s xi + U dx."""
    rng = np.random.default_rng(0)
    n, d = 3, 2
    system = random_system(rng, n, method, weight=2.0)
    U, D = rng.standard_normal((n, d)), rng.standard_normal((2, n))
    gform = gain_form(system, U, D)
    m = gform.form.stages
    M0 = rng.standard_normal((n, n))
    P, lam, r, mu = M0 @ M0.T + np.eye(n), rng.uniform(0.2, 2.0, (m, n)), 0.9, 1.7
    M, _ = gform.assemble(P, lam, r, mu)
    for _ in range(10):
        h, g = 2.0 * rng.standard_normal((2, n))
        x, y = rng.standard_normal((2, d))
        b = rng.standard_normal(n)
        u, v = U @ x + b, U @ y + b
        hs, gs = ([h], [g]) if method == "map" else (stage_states(system, h, u), stage_states(system, g, v))
        p = [np.tanh(system.W @ s + u) - np.tanh(system.W @ t + v) for s, t in zip(hs, gs)]
        xi = np.concatenate([h - g] + p)
        q = [G @ xi + U @ (x - y) for G in gform.form.q_maps]
        for q_s, s, t in zip(q, hs, gs):
            np.testing.assert_allclose(q_s, system.W @ (s - t) + U @ (x - y), atol=1e-12)
        delta_next = system.step(h, u) - system.step(g, v)
        np.testing.assert_allclose(gform.form.out @ xi, delta_next, atol=1e-12)
        chi = np.concatenate([xi, x - y])
        sector = sum(2.0 * p_s @ (lam[s] * (q[s] - p_s)) for s, p_s in enumerate(p))
        expected = delta_next @ P @ delta_next - r * (h - g) @ P @ (h - g) - mu * (x - y) @ (x - y) + sector
        assert chi @ M @ chi == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_euler_matrix_is_the_block_matrix_of_the_docstring():
    rng = np.random.default_rng(1)
    n, d, eps = 3, 2, 0.2
    system = random_system(rng, n, "euler", eps=eps)
    U = rng.standard_normal((n, d))
    gform = gain_form(system, U, rng.standard_normal((2, n)))
    M0 = rng.standard_normal((n, n))
    P, lam, r, mu = M0 @ M0.T + np.eye(n), rng.uniform(0.5, 2.0, n), 0.95, 3.0
    Ah, Lam = np.eye(n) + eps * system.A, np.diag(lam)
    expected = np.block([
        [Ah.T @ P @ Ah - r * P, eps * Ah.T @ P + system.W.T @ Lam, np.zeros((n, d))],
        [eps * P @ Ah + Lam @ system.W, eps**2 * P - 2.0 * Lam, Lam @ U],
        [np.zeros((d, n)), U.T @ Lam, -mu * np.eye(d)],
    ])
    np.testing.assert_allclose(gform.assemble(P, lam[None], r, mu)[0], expected, atol=1e-13)


@pytest.mark.parametrize("method", METHODS)
def test_closed_form_mu_is_the_smallest_mu_satisfying_the_lmi(method):
    rng = np.random.default_rng(2)
    n = 3
    system = random_system(rng, n, method, weight=0.3)
    gform = gain_form(system, rng.standard_normal((n, 2)), rng.standard_normal((2, n)))
    lam = np.ones((gform.form.stages, n))
    r = 4.0
    mu = gform.smallest_mu(np.eye(n), lam, r)
    assert mu is not None and mu > 0

    def top(value):
        return np.linalg.eigvalsh(gform.assemble(np.eye(n), lam, r, value)[0])[-1]

    assert abs(top(mu)) < 1e-9 * mu
    assert top(mu * (1.0 - 1e-6)) > 0 > top(mu * (1.0 + 1e-6))


def test_readout_factor_is_the_squared_norm_of_d_p_to_the_minus_half():
    rng = np.random.default_rng(3)
    n = 4
    gform = gain_form(random_system(rng, n, "euler"), rng.standard_normal((n, 1)), rng.standard_normal((3, n)))
    M0 = rng.standard_normal((n, n))
    P = M0 @ M0.T + 0.1 * np.eye(n)
    root = np.real(scipy.linalg.sqrtm(np.linalg.inv(P)))
    G = gform.readout_gram(P)
    assert np.linalg.eigvalsh(G)[-1] == pytest.approx(np.linalg.norm(gform.D @ root, 2) ** 2, rel=1e-10)
    diff = gform.D[0] - gform.D[2]
    assert G[0, 0] + G[2, 2] - 2 * G[0, 2] == pytest.approx(np.linalg.norm(diff @ root) ** 2, rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_dual_riccati_gradient_matches_finite_differences(method):
    rng = np.random.default_rng(4)
    n = 4
    system = random_system(rng, n, method, spread=0.2, weight=0.3)
    gform = gain_form(system, rng.standard_normal((n, 2)), rng.standard_normal((3, n)))
    m = gform.form.stages

    def objective(lam, mu, r, tau):
        """Solved afresh (no Newton warm start, whose stopping rule would hide changes below eta)."""
        return _DualRiccati(gform, 1e-6).objective(lam, mu, r, tau, beta=tau)

    lam, r = rng.uniform(0.5, 2.0, (m, n)), 1.1
    mu = next(mu for mu in 10.0 ** np.arange(0, 6) if objective(lam, mu, r, 0.0) is not None)
    for tau in (1e-2, 0.0):
        value, _, d_lam, d_mu, d_r = objective(lam, mu, r, tau)
        h = 1e-7
        for i in range(m * n):
            e = np.zeros(m * n)
            e[i] = h
            e = e.reshape(m, n)
            fd = (objective(lam + e, mu, r, tau)[0] - objective(lam - e, mu, r, tau)[0]) / (2 * h)
            assert fd == pytest.approx(d_lam.ravel()[i], abs=1e-6)
        fd_mu = (objective(lam, mu * (1 + h), r, tau)[0] - objective(lam, mu * (1 - h), r, tau)[0]) / (2 * h * mu)
        fd_r = (objective(lam, mu, r + h, tau)[0] - objective(lam, mu, r - h, tau)[0]) / (2 * h)
        assert fd_mu == pytest.approx(d_mu, rel=1e-5, abs=1e-9)
        assert fd_r == pytest.approx(d_r, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("seed", range(3))
def test_riccati_solution_is_the_largest_p_for_fixed_multipliers(seed):
    """At the SDP solver's (Lambda, mu), the stabilizing solution of the dual Riccati equation gives
    a P at least as large (Loewner order) as the solver's, hence a readout factor at least as small."""
    from lrnn_analysis.stability.gain import _SdpProblem

    rng = np.random.default_rng(100 + seed)
    n = 3
    system = random_system(rng, n, METHODS[seed], spread=0.3, weight=0.4)
    gform = gain_form(system, rng.standard_normal((n, 2)), rng.standard_normal((3, n)))
    (P_sdp, lam, mu), status = _SdpProblem(gform).solve(1.0, "CLARABEL", math.inf)
    assert status == "optimal"
    assert np.linalg.eigvalsh(gform.assemble(P_sdp, lam, 1.0, mu)[0])[-1] < 0
    Y, _ = _DualRiccati(gform, 1e-9).solve(lam, mu, 1.0)
    P_riccati = np.linalg.inv(Y)
    assert np.linalg.eigvalsh(P_riccati - P_sdp)[0] >= -1e-6 * np.linalg.norm(P_sdp, 2)
    c_riccati = np.linalg.eigvalsh(gform.D @ Y @ gform.D.T)[-1]
    c_sdp = np.linalg.eigvalsh(gform.readout_gram(P_sdp))[-1]
    assert c_riccati <= c_sdp * (1 + 1e-6)
    assert np.linalg.eigvalsh(gform.assemble(P_riccati, lam, 1.0, mu)[0])[-1] <= 1e-9 * np.linalg.norm(P_riccati)


@pytest.mark.parametrize("seed", range(3))
def test_riccati_tier_comes_close_to_the_sdp_optimum_at_rho_one(seed):
    """The descent over the multipliers is a local method; on these small systems it ends within 10%
    of the optimum of the whole family that the SDP solver finds (seeds 0 and 2: to 1e-6)."""
    rng = np.random.default_rng(100 + seed)
    n = 3
    system = random_system(rng, n, METHODS[seed], spread=0.3, weight=0.4)
    U, D = rng.standard_normal((n, 2)), rng.standard_normal((3, n))
    riccati = certify_gain(system, U, D, 5, rho=1.0, tiers=["closed-form", "riccati"])
    sdp = certify_gain(system, U, D, 5, rho=1.0, tiers=["sdp"])
    assert riccati.holds and sdp.holds
    assert sdp.lipschitz * (1 - 1e-6) <= riccati.lipschitz <= sdp.lipschitz * 1.1


BRUTE_FORCE = [("euler", 1), ("euler", 2), ("rk2", 1), ("rk2", 2), ("rk4", 1), ("rk38", 1), ("map", 1)]


@pytest.mark.parametrize("method,substeps", BRUTE_FORCE)
def test_bound_exceeds_brute_force_worst_case_on_tiny_systems(method, substeps):
    rng = np.random.default_rng(5 + BRUTE_FORCE.index((method, substeps)))
    n, d, k = int(rng.integers(2, 4)), 1, 3
    T = int(rng.integers(3, 7))
    system = random_system(rng, n, method, eps=0.4, substeps=substeps, weight=1.2)
    U, D, b = rng.standard_normal((n, d)), rng.standard_normal((k, n)), 0.3 * rng.standard_normal(n)
    certificate = certify_gain(system, U, D, T)
    assert certificate.holds, certificate.reason
    run = unrolled(system, U, D, b)
    x = rng.standard_normal((T, d))
    np.testing.assert_allclose(run(torch.as_tensor(x)).numpy(), readout(system, U, D, b, x), atol=1e-12)
    worst_jacobian = largest_jacobian_norm(run, (T, d), rng)
    worst_pair = largest_pair_ratio(system, U, D, b, (T, d), rng)
    assert worst_pair <= worst_jacobian * (1 + 1e-6) + 1e-9  # the sup of ||J|| is the Lipschitz constant
    assert worst_jacobian <= certificate.lipschitz
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        rows = torch.zeros(1, k, dtype=torch.float64)
        rows[0, i], rows[0, j] = 1.0, -1.0
        margin_gradient = max(jacobian_norm(run, rng.normal(scale=1.5, size=(T, d)), rows) for _ in range(20))
        assert margin_gradient <= certificate.pair_bounds[i, j]
        assert certificate.pair_bounds[i, j] <= certificate.lipschitz * math.sqrt(2.0) * (1 + 1e-12)


def test_bound_is_sound_on_hundreds_of_random_systems():
    """No sampled pair, nearby pair or input-gradient norm exceeds the bound or a pair bound."""
    rng = np.random.default_rng(6)
    checked = 0
    for trial in range(200):
        method = METHODS[trial % len(METHODS)]
        n, d, k = int(rng.integers(2, 4)), int(rng.integers(1, 3)), int(rng.integers(2, 4))
        T = int(rng.integers(1, 9))
        system = random_system(rng, n, method, eps=float(rng.uniform(0.1, 0.6)), substeps=int(rng.integers(1, 3)),
                               spread=float(rng.uniform(0.1, 0.8)), weight=float(rng.uniform(0.2, 2.0)))
        U, D, b = rng.standard_normal((n, d)), rng.standard_normal((k, n)), rng.standard_normal(n)
        certificate = certify_gain(system, U, D, T, tiers=["closed-form", "riccati"], time_budget=2.0)
        if not certificate.holds:
            continue
        checked += 1
        x = rng.normal(scale=2.0, size=(40, T, d))
        dx = rng.normal(size=(40, T, d)) * rng.choice([1e-4, 1e-1, 3.0], size=(40, 1, 1))
        dy = readout(system, U, D, b, x + dx) - readout(system, U, D, b, x)
        norms = np.linalg.norm(dx.reshape(40, -1), axis=1)
        assert np.all(np.linalg.norm(dy, axis=1) <= certificate.lipschitz * norms)
        for i in range(k):
            for j in range(k):
                assert np.all(np.abs(dy[:, i] - dy[:, j]) <= certificate.pair_bounds[i, j] * norms)
        run = unrolled(system, U, D, b)
        assert max(jacobian_norm(run, x[s]) for s in range(5)) <= certificate.lipschitz
    assert checked >= 150


@pytest.fixture(scope="module")
def certified_case():
    rng = np.random.default_rng(7)
    n = 3
    system = random_system(rng, n, "rk2", spread=0.2, weight=0.4)
    U, D = rng.standard_normal((n, 2)), rng.standard_normal((3, n))
    certificate = certify_gain(system, U, D, 6, rho=1.0, tiers=["closed-form", "riccati"])
    assert certificate.holds
    return gain_form(system, U, D), certificate


def test_stored_evidence_reverifies_and_tampered_evidence_fails(certified_case):
    gform, c = certified_case
    evidence = dict(P=c.P, multipliers=c.multipliers, r=c.r, mu=c.mu, output_factor=c.output_factor,
                    pair_factors=c.pair_factors)
    assert verify_gain(gform, **evidence).passed
    assert c.verification.margin > 0 and c.verification.output_margin > 0 and c.verification.pair_margin > 0
    tampered = {
        "mu": dict(mu=c.mu * 0.99),
        "P shrunk": dict(P=c.P / 1.01),
        "P grown": dict(P=c.P * 1.01),
        "P entry": dict(P=c.P + 0.01 * np.outer(np.eye(3)[0], np.eye(3)[0])),
        "multipliers": dict(multipliers=c.multipliers * 1.5),
        "output factor": dict(output_factor=c.output_factor * 0.99),
        "pair factor": dict(pair_factors=c.pair_factors * np.where(np.eye(3) == 1, 1.0, 0.99)),
        "rate": dict(r=c.r * 0.99),
        "asymmetric P": dict(P=c.P + np.triu(np.full((3, 3), 1e-3), 1)),
        "negative multiplier": dict(multipliers=-c.multipliers),
    }
    for name, change in tampered.items():
        verification = verify_gain(gform, **{**evidence, **change})
        assert not verification.passed, name


def test_pair_factors_are_formed_once_for_the_best_candidate_and_the_next_best_stands_in(monkeypatch):
    from lrnn_analysis.stability import gain

    rng = np.random.default_rng(7)
    system = random_system(rng, 3, "rk2", spread=0.2, weight=0.4)
    U, D = rng.standard_normal((3, 2)), rng.standard_normal((3, 3))
    calls, real = [], gain._with_pairs

    def counted(gform, candidate, horizon):
        calls.append(candidate.lipschitz)
        return real(gform, candidate, horizon)

    monkeypatch.setattr(gain, "_with_pairs", counted)
    best = certify_gain(system, U, D, 6, tiers=["closed-form", "riccati"])
    assert best.holds and calls == [best.lipschitz]
    gform = gain_form(system, U, D)
    assert verify_gain(gform, best.P, best.multipliers, best.r, best.mu, best.output_factor, best.pair_factors).passed

    def failing_on_the_best(gform, candidate, horizon):
        calls.append(candidate.lipschitz)
        return (None, "refused here") if candidate.lipschitz <= best.lipschitz else real(gform, candidate, horizon)

    calls.clear()
    monkeypatch.setattr(gain, "_with_pairs", failing_on_the_best)
    second = certify_gain(system, U, D, 6, tiers=["closed-form", "riccati"])
    assert second.holds and second.lipschitz > best.lipschitz and calls[0] == best.lipschitz and len(calls) >= 2
    assert second.tier == next(a.tier for a in second.attempts if a.holds)  # closed-form verified the runner-up
    # the attempts list the smaller bound without pair factors: the certificate says why it reports a larger one
    assert f"the smaller bound {best.lipschitz:.6g} that {best.tier} verified is not reported: refused here" in second.reason
    assert verify_gain(gform, second.P, second.multipliers, second.r, second.mu, second.output_factor,
                       second.pair_factors).passed
    monkeypatch.setattr(gain, "_with_pairs", lambda *args: (None, "refused here"))
    none = certify_gain(system, U, D, 6, tiers=["closed-form"])
    assert not none.holds and none.reason == "not certified: refused here"


def test_a_numerical_failure_while_forming_pair_factors_is_reported_not_raised(monkeypatch):
    """Pair factors are formed after the tiers (outside their handling of numerical failures): an
    eigensolver failure there is a reason, as it is inside a tier."""
    from lrnn_analysis.stability import gain

    def failing(*args):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    rng = np.random.default_rng(7)
    system = random_system(rng, 3, "rk2", spread=0.2, weight=0.4)
    monkeypatch.setattr(gain, "_with_pairs", failing)
    result = certify_gain(system, rng.standard_normal((3, 2)), rng.standard_normal((3, 3)), 6, tiers=["closed-form"])
    assert not result.holds and result.reason == "not certified: numerical failure: LinAlgError: Eigenvalues did not converge"


def test_runners_up_get_pair_factors_only_within_the_budget(certified_case, monkeypatch):
    from lrnn_analysis.stability import gain

    gform, c = certified_case
    best = gain._Candidate(c.P, c.multipliers, c.r, c.mu, c.output_factor, None, c.verification, c.lipschitz, None)
    search = gain._Search(gform, 6, None, math.inf, [], verified=[(best, "riccati"), (dataclasses.replace(best, lipschitz=2 * c.lipschitz), "sdp")])
    tried = []
    monkeypatch.setattr(gain, "_with_pairs", lambda gform, candidate, horizon: (tried.append(candidate.lipschitz), (None, "refused here"))[1])
    reported, tier, why = gain._reported(search, -math.inf)
    assert reported is None and tried == [c.lipschitz] and why == "not certified: refused here (the next candidates not tried: time budget exhausted)"
    tried.clear()
    assert gain._reported(search, math.inf) == (None, None, "not certified: refused here") and tried == [c.lipschitz, 2 * c.lipschitz]


def test_pair_factors_fall_back_to_one_by_one_back_offs_when_the_first_try_fails(certified_case, monkeypatch):
    from lrnn_analysis.stability import gain

    gform, c = certified_case
    candidate = gain._Candidate(c.P, c.multipliers, c.r, c.mu, c.output_factor, None, c.verification, c.lipschitz, None)
    first, _ = gain._with_pairs(gform, candidate, 6)
    verified = []

    def failing_once(*args):
        result = verify_gain(*args)
        verified.append(result.passed)
        return dataclasses.replace(result, passed=False) if len(verified) == 1 else result

    monkeypatch.setattr(gain, "verify_gain", failing_once)
    again, reason = gain._with_pairs(gform, candidate, 6)
    assert reason == "verified" and verified == [True, True]
    assert np.all(again.pair_factors >= first.pair_factors) and np.array_equal(first.pair_bounds > 0, again.pair_bounds > 0)
    assert verify_gain(gform, again.P, again.lam, again.r, again.mu, again.output_factor, again.pair_factors).passed
    assert gain._pair_seconds(dataclasses.replace(gform, D=gform.D[:1])) == 0.0 and gain._pair_seconds(gform) > 0


@pytest.mark.parametrize("method", ["euler", "rk4", "map"])
def test_nearly_equal_readout_rows_get_pair_factors_that_verify_and_hold(method):
    """Rows of D 1e-9 apart: c_ij = d_ij^T P^-1 d_ij ~ 1e-18, far below the rounding of G_ii + G_jj - 2 G_ij
    (G = D P^-1 D^T, entries ~ 1): formed from d_ij itself it verifies, and the tiny pair bound holds."""
    rng = np.random.default_rng(11)
    n, k, T = 3, 3, 4
    system = random_system(rng, n, method, spread=0.2, weight=0.4)
    U, D, b = rng.standard_normal((n, 1)), rng.standard_normal((k, n)), rng.standard_normal(n)
    D[1] = D[0] + 1e-9 * rng.standard_normal(n)
    certificate = certify_gain(system, U, D, T, tiers=["closed-form", "riccati"])
    assert certificate.holds, certificate.reason
    gform = gain_form(system, U, D)
    assert verify_gain(gform, certificate.P, certificate.multipliers, certificate.r, certificate.mu,
                       certificate.output_factor, certificate.pair_factors).passed
    d = D[0] - D[1]
    assert certificate.pair_factors[0, 1] >= d @ np.linalg.solve(certificate.P, d)
    assert certificate.pair_bounds[0, 1] < 1e-6 * certificate.lipschitz
    x = rng.normal(scale=2.0, size=(200, T, 1))
    dx = rng.normal(size=(200, T, 1)) * rng.choice([1e-3, 1.0], size=(200, 1, 1))
    dy = readout(system, U, D, b, x + dx) - readout(system, U, D, b, x)
    norms = np.linalg.norm(dx.reshape(200, -1), axis=1)
    for i in range(k):
        for j in range(k):
            assert np.all(np.abs(dy[:, i] - dy[:, j]) <= certificate.pair_bounds[i, j] * norms)


def test_an_expanding_system_has_no_bound_with_rho_at_most_one_and_says_so():
    """A = I / 2 makes Euler's step expand at every slope: the SDP is infeasible at rho = 1, which is
    reported as such; with rho searched a (large) bound with rho > 1 exists and is sound."""
    rng = np.random.default_rng(8)
    n = 2
    system = LureSystem(0.5 * np.eye(n), 0.3 * rng.standard_normal((n, n)), method="euler", eps=0.2)
    U, D = rng.standard_normal((n, 1)), rng.standard_normal((2, n))
    fixed = certify_gain(system, U, D, 4, rho=1.0)
    assert not fixed.holds and not fixed.budget_exhausted
    sdp = fixed.attempts[-1]
    assert sdp.tier == "sdp" and sdp.reason.startswith("no bound of this family with rho <= 1 exists (")
    free = certify_gain(system, U, D, 4)
    assert free.holds and free.rho > 1.0
    x = rng.standard_normal((100, 4, 1))
    dx = rng.standard_normal((100, 4, 1))
    dy = readout(system, U, D, np.zeros(n), x + dx) - readout(system, U, D, np.zeros(n), x)
    assert np.all(np.linalg.norm(dy, axis=1) <= free.lipschitz * np.linalg.norm(dx.reshape(100, -1), axis=1))


def test_a_budget_running_out_is_not_reported_as_infeasibility():
    rng = np.random.default_rng(9)
    system = random_system(rng, 3, "euler")
    result = certify_gain(system, rng.standard_normal((3, 1)), rng.standard_normal((2, 3)), 5, time_budget=1e-9)
    assert not result.holds and result.budget_exhausted
    assert all("no bound of this family" not in a.reason for a in result.attempts)
    assert "time budget" in result.reason


def test_contraction_evidence_is_a_starting_point_and_the_certificate_serializes():
    rng = np.random.default_rng(10)
    system = random_system(rng, 3, "euler", spread=0.2, weight=0.3)
    contraction = certify(system, ["euler-lmi"])[0]
    assert contraction.holds
    U, D = rng.standard_normal((3, 1)), rng.standard_normal((4, 3))
    result = certify_gain(system, U, D, 8, evidence=contraction.evidence, tiers=["closed-form"])
    assert result.holds and result.tier == "closed-form" and result.rho == pytest.approx(1.0)
    summary = result.to_dict()
    json.dumps(summary)
    assert "P" not in summary and len(summary["pair_bounds"]) == 4
    full = result.to_dict(include_matrices=True)
    assert np.array_equal(np.array(full["P"]), result.P)
    assert np.array_equal(np.array(full["pair_factors"]), result.pair_factors)


def test_certified_radii():
    bounds = np.array([[0.0, 2.0, 1.0], [2.0, 0.0, 4.0], [1.0, 4.0, 0.0]])
    logits = np.array([[3.0, 1.0, 2.5], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    radii = certified_radii(logits, bounds)
    # sample 0: class 0, margins 2 (pair bound 2) and 0.5 (pair bound 1); sample 1: class 1, 2/2 and 1/4.
    assert radii[0] == pytest.approx(0.5) and radii[0] <= 0.5
    assert radii[1] == pytest.approx(0.25) and radii[1] <= 0.25
    assert radii[2] == 0.0
    with pytest.raises(InputError):
        certified_radii(logits[:, :2], bounds)


@pytest.mark.parametrize("arch", ["lipschitz", "contracting"])
def test_sequence_map_reproduces_the_module_and_the_bound_holds_on_it(arch):
    """U, D (D T for the contracting model, whose form lives in zeta = T^-1 h) describe the module's
    own outputs; the certified bound holds for its float64 forward pass."""
    model = build_model(ModelConfig(arch, 2, 4, 3, eps=0.2, init_std=0.5), seed=0).double().eval()
    system, U, D = sequence_map(model)
    assert U.shape == (4, 2) and D.shape == (3, 4)
    bias = model.U.bias.detach().numpy()
    rng = np.random.default_rng(11)
    x = rng.standard_normal((30, 5, 2))
    x2 = x + rng.standard_normal((30, 5, 2))
    with torch.no_grad():
        dy_module = (model(torch.as_tensor(x2)) - model(torch.as_tensor(x))).numpy()
    np.testing.assert_allclose(readout(system, U, D, bias, x2) - readout(system, U, D, bias, x), dy_module,
                               atol=1e-10)
    certificate = certify_gain(system, U, D, 5, tiers=["closed-form", "riccati"])
    assert certificate.holds
    assert np.all(np.linalg.norm(dy_module, axis=1)
                  <= certificate.lipschitz * np.linalg.norm((x2 - x).reshape(30, -1), axis=1))


@pytest.mark.parametrize("arch", ["lipschitz", "contracting"])
def test_one_bound_per_step_for_a_per_step_readout(arch):
    """With readout 'all' the output at step t is D h_t, a function of x_1..x_t: the bound over
    horizon t holds for it, and it is at most the bound over the whole horizon (the horizon factor
    max(1, rho^(2s(t - 1))) grows with t)."""
    model = build_model(ModelConfig(arch, 2, 4, 3, eps=0.2, init_std=0.5, readout="all"), seed=0).double().eval()
    system, U, D = sequence_map(model)
    horizon = 6
    bounds = [certify_gain(system, U, D, t, tiers=["closed-form", "riccati"]) for t in (1, 3, horizon)]
    assert all(b.holds for b in bounds)
    whole = bounds[-1].lipschitz
    rng = np.random.default_rng(12)
    x = rng.standard_normal((40, horizon, 2))
    x2 = x + rng.standard_normal((40, horizon, 2))
    with torch.no_grad():
        dy = (model(torch.as_tensor(x2)) - model(torch.as_tensor(x))).numpy()
    assert dy.shape == (40, horizon, 3)
    for t, bound in zip((1, 3, horizon), bounds, strict=True):
        moved = np.linalg.norm(dy[:, t - 1], axis=1)
        assert np.all(moved <= bound.lipschitz * np.linalg.norm((x2 - x)[:, :t].reshape(40, -1), axis=1))
        assert np.all(moved <= whole * np.linalg.norm((x2 - x).reshape(40, -1), axis=1))


def test_degenerate_but_valid_systems_give_answers_not_exceptions():
    rng = np.random.default_rng(13)
    system = random_system(rng, 3, "rk2", spread=0.2, weight=0.3)
    D = rng.standard_normal((2, 3))
    silent = certify_gain(system, np.zeros((3, 1)), D, 6, tiers=["closed-form"])
    assert silent.holds and silent.lipschitz < 1e-4  # 0 up to the round-off margins of verification
    blind = certify_gain(system, rng.standard_normal((3, 1)), np.zeros((2, 3)), 6, tiers=["closed-form"])
    assert blind.holds and blind.lipschitz < 1e-4
    relu = LureSystem(system.A, system.W, method="rk2", eps=0.3, activation="relu")
    assert certify_gain(relu, rng.standard_normal((3, 1)), D, 6).holds
    huge = LureSystem(1e200 * np.eye(2), np.eye(2), method="rk4", eps=1e200)
    overflow = certify_gain(huge, np.ones((2, 1)), np.ones((1, 2)), 3)
    assert not overflow.holds and "overflows float64" in overflow.reason


def test_bad_input_raises_input_error():
    rng = np.random.default_rng(12)
    system = random_system(rng, 3, "euler")
    U, D = rng.standard_normal((3, 1)), rng.standard_normal((2, 3))
    bad = [
        lambda: certify_gain(LureSystem(system.A, system.W), U, D, 5),
        lambda: certify_gain(system, U[:2], D, 5),
        lambda: certify_gain(system, U, D[:, :2], 5),
        lambda: certify_gain(system, U, D * np.nan, 5),
        lambda: certify_gain(system, U, D, 0),
        lambda: certify_gain(system, U, D, 2.5),
        lambda: certify_gain(system, U, D, True),
        lambda: certify_gain(system, U, D, 5, rho=-1.0),
        lambda: certify_gain(system, U, D, 5, rho=float("inf")),
        lambda: certify_gain(system, U, D, 5, tiers=["bogus"]),
        lambda: certify_gain(system, U, D, 5, tiers=[]),
        lambda: certify_gain(system, U, D, 5, solver="MOSEK"),
        lambda: certify_gain(system, U, D, 5, time_budget=0),
        lambda: certify_gain(system, U, D, 5, evidence=object()),
        lambda: certify_gain(system, U, D, 5, evidence=type("E", (), {"P": np.eye(2), "multipliers": np.ones(2)})()),
        lambda: sequence_map(torch.nn.Linear(2, 2)),
    ]
    for call in bad:
        with pytest.raises(InputError):
            call()


def test_batched_pair_margins_equal_the_margin_of_each_pair_alone():
    """The stacked eigenvalue problems of the pair checks give each pair's margin as
    _readout_margin gives it for that pair (the tolerance's norms summed in another order: 1e-12)."""
    rng = np.random.default_rng(11)
    n, m = 5, 40
    A = rng.standard_normal((n, n))
    P = A @ A.T + np.eye(n)
    P /= np.linalg.eigvalsh(P)[-1]
    V = rng.standard_normal((m, n)) * 10.0 ** rng.uniform(-3, 3, (m, 1))
    exact = np.einsum("ij,ij->j", V.T, np.linalg.solve(P, V.T))
    factors = exact * rng.choice([0.999, 1.0 + 1e-6, 2.0], m)
    batched = gain_module._rank_one_margins(P, factors, V)
    one_by_one = np.array([gain_module._readout_margin(P, c, v[:, None]) for c, v in zip(factors, V)])
    assert np.allclose(batched, one_by_one, rtol=1e-12, atol=0)
    assert np.array_equal(batched > 0, factors > exact)


def test_pair_factors_and_bounds_do_not_depend_on_the_chunk_size(monkeypatch):
    rng = np.random.default_rng(12)
    n, k = 3, 9
    system = random_system(rng, n, "euler", spread=0.2, weight=0.4)
    U, D = rng.standard_normal((n, 2)), rng.standard_normal((k, n))
    whole = certify_gain(system, U, D, 6, rho=1.0, tiers=["closed-form", "riccati"])
    monkeypatch.setattr(gain_module, "_PAIR_CHUNK_ENTRIES", 2 * n * n)
    chunked = certify_gain(system, U, D, 6, rho=1.0, tiers=["closed-form", "riccati"])
    assert whole.holds and chunked.holds
    # Equal up to the last bits of the tolerances' sums, which a BLAS may order by the chunk's shape.
    np.testing.assert_allclose(chunked.pair_factors, whole.pair_factors, rtol=1e-13, atol=0)
    np.testing.assert_allclose(chunked.pair_bounds, whole.pair_bounds, rtol=1e-13, atol=0)


def test_evidence_whose_scaled_factors_overflow_fails_instead_of_raising(certified_case):
    """P scaled by 2^1000 (the multipliers and mu with it): factors that the verifier's scaling
    takes past float64's range are refused as evidence, not an OverflowError."""
    gform, c = certified_case
    big = 2.0 ** 1000
    evidence = dict(P=c.P * big, multipliers=c.multipliers * big, r=c.r, mu=c.mu * big,
                    output_factor=c.output_factor / big, pair_factors=c.pair_factors / big)
    assert verify_gain(gform, **evidence).passed
    for change in (dict(output_factor=c.output_factor * 2.0 ** 30), dict(pair_factors=c.pair_factors * 2.0 ** 30)):
        verification = verify_gain(gform, **{**evidence, **change})
        assert not verification.passed and "overflows" in verification.reason


def test_a_pair_whose_check_is_nan_fails_wherever_it_comes(certified_case, monkeypatch):
    """A pair margin that is nan (c P - d d^T overflowed) fails the evidence also when it is not the
    first pair checked: min() over Python floats would pass it over."""
    gform, c = certified_case
    evidence = dict(P=c.P, multipliers=c.multipliers, r=c.r, mu=c.mu, output_factor=c.output_factor,
                    pair_factors=c.pair_factors)
    original = gain_module._rank_one_margins

    def last_is_nan(P, factors, V):
        margins = original(P, factors, V)
        margins[-1] = np.nan
        return margins

    monkeypatch.setattr(gain_module, "_rank_one_margins", last_is_nan)
    verification = verify_gain(gform, **evidence)
    assert not verification.passed and math.isnan(verification.pair_margin)


@pytest.mark.parametrize("factors", ["output", "pair"])
def test_factors_near_the_top_of_float64_fail_instead_of_raising(certified_case, factors):
    """c P - d d^T with entries above half of float64's largest number is finite, but 0.5 (K + K^T)
    overflowed on its diagonal and LAPACK raised LinAlgError (stored evidence is any JSON's numbers)."""
    gform, c = certified_case
    huge = 1.5e308
    change = dict(output_factor=huge) if factors == "output" else dict(pair_factors=np.where(np.eye(3) == 1, 0.0, huge))
    evidence = dict(P=np.eye(3) * 0.75, multipliers=c.multipliers, r=c.r, mu=c.mu, output_factor=c.output_factor,
                    pair_factors=c.pair_factors)
    with np.errstate(over="ignore"):
        verification = verify_gain(gform, **{**evidence, **change})
    margin = verification.output_margin if factors == "output" else verification.pair_margin
    assert not verification.passed and not margin > 0


@pytest.mark.parametrize("factors", ["output", "pair"])
def test_a_check_whose_round_off_bound_overflows_says_so(certified_case, factors):
    """Valid evidence but for a factor at the top of float64's range once scaled: c P - d d^T is
    positive definite, but its round-off bound overflows, so it is not verified, and the reason
    says the matrix overflowed, not that the factor is too small."""
    gform, c = certified_case
    exponent = math.frexp(float(np.linalg.eigvalsh(c.P)[-1]))[1]
    huge = math.ldexp(1.5e308, -exponent)
    change = dict(output_factor=huge) if factors == "output" else dict(pair_factors=np.where(np.eye(3) == 1, 0.0, huge))
    evidence = dict(P=c.P, multipliers=c.multipliers, r=c.r, mu=c.mu, output_factor=c.output_factor,
                    pair_factors=c.pair_factors)
    verification = verify_gain(gform, **{**evidence, **change})
    assert not verification.passed
    assert "overflows float64" in verification.reason and "too small" not in verification.reason
