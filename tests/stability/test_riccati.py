"""The Riccati tier: its equations against the LMIs, its gradient, and its certificates against the SDP tier."""
import numpy as np
import pytest
import scipy.linalg

from lrnn_analysis.stability import LureSystem, certify, simulate_pairs, verify_certificate
from lrnn_analysis.stability.forms import incremental_form
from lrnn_analysis.stability.riccati import RiccatiSolver, _gramian_objective, _Lyapunov

from .cases import random_system


def test_euler_equation_is_the_discrete_riccati_equation_of_the_lmi():
    rng = np.random.default_rng(0)
    n, eps, L, eta, rho2 = 5, 0.1, 1.0, 1e-3, 0.999
    system = random_system(rng, n, "euler", eps, scale_W=0.5)
    lam = rng.uniform(0.5, 2.0, n)
    solution = RiccatiSolver(incremental_form(system, "euler")).solve(lam[None, :], rho2, eta)
    assert solution is not None
    P = solution.P
    rho = np.sqrt(rho2)
    F, G = (np.eye(n) + eps * system.A) / rho, (eps / rho) * np.eye(n)
    S, R = L * system.W.T @ np.diag(lam) / rho2, 2.0 * np.diag(lam) / rho2
    H = R - G.T @ P @ G
    assert np.linalg.eigvalsh(H)[0] > 0 and np.linalg.eigvalsh(P)[0] > 0
    riccati = F.T @ P @ F - P + (F.T @ P @ G + S) @ np.linalg.solve(H, G.T @ P @ F + S.T)
    # Newton (here from P = 0) stops once the residual's Frobenius norm is at most eta / 4, so
    # P matches the Schur method's solution to about eta times the closed loop's Lyapunov gain.
    assert np.linalg.norm(riccati + eta * np.eye(n)) <= 0.25 * eta
    X = scipy.linalg.solve_discrete_are(F, G, -eta * np.eye(n), R, s=-S)
    np.testing.assert_allclose(P, -X, rtol=0, atol=2e-3 * np.abs(X).max())
    M, _ = incremental_form(system, "euler").assemble(P, lam[None, :], rho2)
    assert np.linalg.eigvalsh(M)[-1] < 0


def test_ct_equation_is_the_continuous_riccati_equation_of_the_lmi():
    rng = np.random.default_rng(1)
    n, L, eta, a = 5, 1.0, 1e-3, 0.05
    system = random_system(rng, n, "ode", None, scale_W=0.5)
    lam = rng.uniform(0.5, 2.0, n)
    solution = RiccatiSolver(incremental_form(system, "ct")).solve(lam[None, :], a, eta)
    assert solution is not None
    P, Lam = solution.P, np.diag(lam)
    At = system.A + a * np.eye(n) + 0.5 * L * system.W
    riccati = At.T @ P + P @ At + P @ np.linalg.solve(2.0 * Lam, P) + 0.5 * L**2 * system.W.T @ Lam @ system.W
    assert np.linalg.norm(riccati + eta * np.eye(n)) <= 0.25 * eta
    X = scipy.linalg.solve_continuous_are(system.A + a * np.eye(n), np.eye(n), -eta * np.eye(n), 2.0 * Lam,
                                          s=-L * system.W.T @ Lam)
    np.testing.assert_allclose(P, -X, rtol=0, atol=2e-3 * np.abs(X).max())
    M, _ = incremental_form(system, "ct").assemble(P, lam[None, :], a)
    assert np.linalg.eigvalsh(M)[-1] < 0


@pytest.mark.parametrize("method,eps", [("ode", None), ("euler", 0.1), ("rk2", 0.1), ("rk4", 0.2), ("rk38", 0.2)])
def test_newton_kleinman_matches_the_schur_method_and_infeasible_rates_are_refused(method, eps):
    """Warm (chord and Newton steps from the solution at r0) and cold (Newton from P = 0) solves
    against scipy's Schur method."""
    rng = np.random.default_rng(2)
    system = random_system(rng, 6, method, eps, scale_W=0.5)
    family = "ct" if method == "ode" else method
    form = incremental_form(system, family)
    lam = np.ones((form.stages, 6))
    r0, r1 = (0.05, 0.06) if family == "ct" else (0.9999, 0.9998)
    warm = RiccatiSolver(form)
    assert warm.solve(lam, r0, 1e-4) is not None
    newton = warm.solve(lam, r1, 1e-4)
    cold = RiccatiSolver(form).solve(lam, r1, 1e-4)
    assert newton is not None and cold is not None
    F, B, S, R = warm._data(lam, r1)
    are = scipy.linalg.solve_continuous_are if family == "ct" else scipy.linalg.solve_discrete_are
    schur = -are(F, B, -1e-4 * np.eye(6), R, s=-S)
    # Newton stops once the residual is below eta / 4, so they agree to about eta / ||P||.
    for solution in (newton, cold):
        np.testing.assert_allclose(solution.P, schur, rtol=0, atol=1e-4 * np.abs(schur).max())
    impossible = 10.0 if family == "ct" else 1e-4
    assert RiccatiSolver(form).solve(lam, impossible, 1e-4) is None


@pytest.mark.parametrize("method,eps", [("ode", None), ("euler", 0.1), ("rk2", 0.2)])
def test_barrier_gradient_matches_finite_differences(method, eps):
    rng = np.random.default_rng(3)
    system = random_system(rng, 3, method, eps, scale_W=0.5)
    family = "ct" if method == "ode" else method
    form = incremental_form(system, family)
    theta = 0.3 * rng.standard_normal(form.stages * 3)

    def solver():
        return RiccatiSolver(form, tolerance=1e-8)

    feasible = [r for r in ((0.05, 0.0, -0.5) if family == "ct" else (0.9999, 1.05, 1.5, 3.0))
                if _gramian_objective(solver(), theta, r)[0] < 1e300]
    assert feasible
    r = feasible[0]
    value, grad = _gramian_objective(solver(), theta, r)
    h = 1e-6
    fd = [
        (_gramian_objective(solver(), theta + h * e, r)[0] - _gramian_objective(solver(), theta - h * e, r)[0]) / (2 * h)
        for e in np.eye(theta.size)
    ]
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6 * np.abs(grad).max())


@pytest.mark.parametrize("method,eps,sizes", [("ode", None, (4, 8, 12)), ("euler", 0.05, (4, 6, 8)), ("rk2", 0.1, (4, 5))])
def test_riccati_tier_agrees_with_the_sdp_tier(method, eps, sizes):
    """Same verdicts; the margin (a for ct, 1 - rate for discrete) at least the SDP tier's, to 0.1%.

    Alternating Riccati solves with a multiplier descent is a local method and can stop a
    little short (seen: ct at n = 4, 0.02% below); on the others it beats the SDP tier, whose
    bisection stops at 1% of the range (by 0.1-0.9% here).
    """
    rng = np.random.default_rng(4)
    family = "ct" if method == "ode" else method
    name = f"{family}-lmi"
    compared = 0
    for n in sizes:
        system = random_system(rng, n, method, eps)
        riccati = certify(system, [name], tiers=["riccati"])[0]
        sdp = certify(system, [name], tiers=["full-P"])[0]
        assert riccati.holds == sdp.holds, (n, riccati.reason, sdp.reason)
        if not sdp.holds:
            continue
        compared += 1
        assert riccati.tier == "riccati"
        assert verify_certificate(system, name, riccati.evidence.P, riccati.evidence.multipliers, riccati.rate).passed
        assert riccati.margin >= 0.999 * sdp.margin, (n, riccati.rate, sdp.rate)
    assert compared >= 2


@pytest.mark.parametrize("method,eps", [("ode", None), ("euler", 0.05), ("rk4", 0.1), ("rk38", 0.1)])
def test_riccati_certifies_where_the_norm_test_fails_and_simulations_respect_it(method, eps):
    rng = np.random.default_rng(5)
    family = "ct" if method == "ode" else method
    certified = 0
    for trial in range(3):
        system = random_system(rng, 10, method, eps)
        assert not certify(system, [f"{family}-norm"])[0].holds
        result = certify(system, [f"{family}-lmi"], tiers=["norm", "riccati"])[0]
        if not result.holds:
            continue
        certified += 1
        assert result.tier == "riccati" and [a.tier for a in result.attempts] == ["norm", "riccati"]
        P = result.evidence.P
        assert verify_certificate(system, f"{family}-lmi", P, result.evidence.multipliers, result.rate).passed
        sim = simulate_pairs(system, pairs=6, steps=60, seed=trial, input_scale=2.0, init_scale=3.0, dt=0.2, P=P)
        per_step = np.exp(-result.rate * 0.2) if family == "ct" else result.rate
        assert sim.max_step_factor <= per_step * (1 + 1e-6)
        assert sim.max_growth <= result.gain * (1 + 1e-6)
    assert certified >= 2


def test_ct_riccati_rate_follows_a_rescaling_of_time():
    """(A, W) -> c (A, W) multiplies the best rate by c; the tier's slack and search are relative
    to the system's scale, so its rate follows within the tests' 2% (c not a power of two, so the
    working systems differ)."""
    rng = np.random.default_rng(4)
    random_system(rng, 4, "ode", None)
    system = random_system(rng, 8, "ode", None)
    reference = certify(system, ["ct-lmi"], tiers=["riccati"])[0]
    assert reference.holds
    for c in (0.3, 3.0, 700.0):
        scaled = LureSystem(c * system.A, c * system.W)
        result = certify(scaled, ["ct-lmi"], tiers=["riccati"])[0]
        assert result.holds
        assert abs(result.rate / c - reference.rate) <= 0.02 * reference.rate, (c, result.rate / c, reference.rate)


@pytest.mark.parametrize("discrete", [False, True])
def test_blocked_lyapunov_solves_match_scipy(discrete):
    """n = 101 > the blocking leaf, with 2 x 2 blocks (complex eigenvalues) in the Schur form."""
    rng = np.random.default_rng(6)
    n = 101
    M = rng.standard_normal((n, n)) / np.sqrt(n)
    A = 0.45 * M if discrete else M - 1.5 * np.eye(n)
    Q = rng.standard_normal((n, n))
    Q = Q @ Q.T
    lyapunov = _Lyapunov(A, discrete)
    assert lyapunov.stable and np.any(np.diag(lyapunov.T, -1) != 0)
    for transposed in (False, True):
        X = lyapunov.solve(Q, transposed)
        B = A.T if transposed else A
        expected = scipy.linalg.solve_discrete_lyapunov(B, Q) if discrete else scipy.linalg.solve_continuous_lyapunov(B, -Q)
        np.testing.assert_allclose(X, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    assert not _Lyapunov(3.0 * A if discrete else -A, discrete).stable


def test_riccati_attempt_reports_its_work():
    system = random_system(np.random.default_rng(0), 12, "euler", 0.05)
    attempt = certify(system, ["euler-lmi"], tiers=["riccati"])[0].attempts[-1]
    work = attempt.to_dict()["work"]
    assert work["riccati_solves"] == attempt.solves > 0
    # One Schur form per accepted solve at least; the barrier gradient's three solves each reuse it.
    assert 0 < work["schur_forms"] <= work["lyapunov_solves"]


@pytest.mark.parametrize("family,method,eps", [("ct", "ode", None), ("euler", "euler", 0.1)])
def test_cold_solves_agree_with_the_schur_method_without_calling_it(family, method, eps, monkeypatch):
    """Newton from P = 0 decides feasibility the way scipy's Schur method does on a grid of rates
    up to the bound of the frozen Jacobian at D = L I / 2 (where the start is stable), and never
    needs the Schur method there: past the feasible rates its iteration meets an unstable closed
    loop, which for exact Newton steps from a stabilizing start means no stabilizing solution."""
    system = random_system(np.random.default_rng(2), 6, method, eps, scale_W=0.5)
    form = incremental_form(system, family)
    lam = np.ones((1, 6))
    J = system.A + 0.5 * system.W
    if family == "ct":
        rates = np.linspace(0.0, -np.linalg.eigvals(J).real.max(), 21)[1:-1]
    else:
        rates = np.linspace(np.abs(np.linalg.eigvals(np.eye(6) + eps * J)).max() ** 2, 1.0, 21)[1:-1]
    are = {"ct": scipy.linalg.solve_continuous_are, "euler": scipy.linalg.solve_discrete_are}[family]

    def schur_method_solves(r):
        F, B, S, R = RiccatiSolver(form)._data(lam, r)
        try:
            P = -are(F, B, -1e-4 * np.eye(6), R, s=-S)
        except np.linalg.LinAlgError:
            return False
        P = 0.5 * (P + P.T)
        parts = form.schur(P, lam)
        shift = 2.0 * r if family == "ct" else -r
        return bool(parts is not None and np.linalg.eigvalsh(parts[0] + shift * P)[-1] < 0 and np.linalg.eigvalsh(P)[0] > 0)

    expected = [schur_method_solves(r) for r in rates]
    assert any(expected) and not all(expected)

    def refuse(*args, **kwargs):
        raise AssertionError("the Schur method was called")

    monkeypatch.setattr(scipy.linalg, "solve_continuous_are", refuse)
    monkeypatch.setattr(scipy.linalg, "solve_discrete_are", refuse)
    assert [RiccatiSolver(form).solve(lam, r, 1e-4) is not None for r in rates] == expected
