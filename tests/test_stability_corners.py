"""Numerical corner cases of the certificates (issue 9, section 5): none may print a false certificate.

Ground truth comes from exact rational arithmetic on the float64 inputs (fractions), never
from the package's own numerics.
"""
import math
from fractions import Fraction

import cvxpy as cp
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from lrnn_analysis.stability import (
    LureSystem,
    certify,
    certify_parameterization,
    certifying_gamma_A,
    norm_test,
    phase_diagram,
    verify_certificate,
)

U = 2.0**-53


@pytest.fixture(autouse=True)
def _one_thread():
    with threadpool_limits(limits=1):
        yield


# ---------------------------------------------------------------- exact helpers


def exactly_negative_definite(S):
    """Whether the symmetric float matrix S is negative definite, by exact LDL^T in fractions."""
    n = len(S)
    M = [[-Fraction(float(S[i][j])) for j in range(n)] for i in range(n)]
    for k in range(n):
        if M[k][k] <= 0:
            return False
        for i in range(k + 1, n):
            factor = M[i][k] / M[k][k]
            for j in range(k, n):
                M[i][j] -= factor * M[k][j]
    return True


def stiff_symmetric(seed, top, n=6, largest=2.4e5):
    """Q diag(-largest ... , top) Q^T rounded to float64 and made exactly symmetric."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.concatenate([-np.geomspace(largest, 1.0, n - 1), [top]])
    A = Q @ np.diag(eigenvalues) @ Q.T
    return np.triu(A) + np.triu(A, 1).T


W_SCALE = 2.0**-47  # W = W_SCALE * permutation: ||W||_2 = W_SCALE exactly


def small_w(n, seed):
    return W_SCALE * np.eye(n)[np.random.default_rng(seed).permutation(n)]


# ---------------------------------------------------------------- stiff symmetric A


@pytest.mark.parametrize("top", [3.8e-12, -3.8e-12, 0.0, 1e-10, -1e-10])
def test_stiff_symmetric_family_is_never_falsely_certified(top):
    for seed in range(12):
        A, W = stiff_symmetric(seed, top), small_w(6, seed)
        norm_result, lmi_result = certify(LureSystem(A, W), ["ct-norm", "ct-lmi"], tiers=["norm", "P=I"], time_budget=5)
        if norm_result.holds:
            assert exactly_negative_definite(A + W_SCALE * np.eye(6))
        if lmi_result.holds:
            assert exactly_negative_definite(A)
        # ||A|| = 2.4e5: an abscissa within ~1e-10 of 0 is below the round-off of any float64 eigenvalue
        assert not norm_result.holds and not lmi_result.holds


def test_the_reported_stiff_case_and_a_clearly_stable_one():
    A = stiff_symmetric(0, 3.8e-12)
    outcome = norm_test(LureSystem(A, small_w(6, 0)), "ct-norm")
    assert outcome.tolerance >= 64 * 7 * U * 2.4e5 and not outcome.holds
    stable = stiff_symmetric(0, -1.0)
    result = certify(LureSystem(stable, small_w(6, 0)), ["ct-norm"])[0]
    assert result.holds and 0 < result.rate < 1.0
    assert exactly_negative_definite(stable + (W_SCALE + result.rate) * np.eye(6))


def test_ct_norm_and_ct_lmi_never_disagree_about_a_not_hurwitz():
    rng = np.random.default_rng(3)
    systems = [LureSystem(stiff_symmetric(s, top), small_w(6, s)) for s in range(4) for top in (3.8e-12, 1.0, -1.0)]
    for _ in range(20):
        n = int(rng.integers(2, 5))
        A = rng.standard_normal((n, n)) * rng.choice([1e-3, 1.0, 1e3]) - rng.uniform(-0.5, 2.0) * np.eye(n)
        systems.append(LureSystem(A, rng.standard_normal((n, n)) * rng.uniform(0.0, 1.0)))
    for system in systems:
        norm_result, lmi_result = certify(system, ["ct-norm", "ct-lmi"], tiers=["norm"])
        assert norm_result.holds == lmi_result.holds
        assert ("not Hurwitz" in norm_result.reason) == ("not Hurwitz" in lmi_result.reason)
        if "not Hurwitz" in lmi_result.reason or "cannot decide" in lmi_result.reason:
            assert norm_result.reason == lmi_result.reason


def test_discrete_necessary_check_has_a_round_off_band():
    # spectral radius of I + eps A exactly 1 in the reals: never "certified", never a false "> 1"
    system = LureSystem(np.diag([-2.0, 0.0]), np.zeros((2, 2)), method="euler", eps=0.5)
    norm_result, lmi_result = certify(system, ["euler-norm", "euler-lmi"], tiers=["norm"])
    assert not norm_result.holds and not lmi_result.holds
    assert "cannot decide" in lmi_result.reason


# ---------------------------------------------------------------- scale: a time rescaling for ct


def _scale_systems():
    rng = np.random.default_rng(7)
    return [
        LureSystem(-np.eye(3) + 0.1 * rng.standard_normal((3, 3)), 0.2 * rng.standard_normal((3, 3))),  # norm test
        LureSystem(np.array([[-1.0, 4.0, 0.0], [0.0, -1.0, 0.5], [0.0, 0.0, -2.0]]), 0.3 * rng.standard_normal((3, 3))),
        LureSystem(np.array([[0.1, 1.0], [-1.0, 0.1]]), 0.1 * np.eye(2)),  # not Hurwitz
    ]


def test_ct_verdicts_are_scale_invariant_and_rates_scale_with_c():
    for system in _scale_systems():
        reference = certify(system, ["ct-norm", "ct-lmi"], tiers=["norm", "P=I", "diag-P"], time_budget=10)
        for c in 10.0 ** np.arange(-6, 7):
            scaled = LureSystem(system.A * c, system.W * c)
            results = certify(scaled, ["ct-norm", "ct-lmi"], tiers=["norm", "P=I", "diag-P"], time_budget=10)
            for ref, res in zip(reference, results):
                assert res.holds == ref.holds, (c, res.reason, ref.reason)
                if res.holds:
                    assert res.rate / c == pytest.approx(ref.rate, rel=0.05)
                if res.evidence is not None:
                    assert verify_certificate(scaled, res.name, res.evidence.P, res.evidence.multipliers, res.rate).passed


@pytest.mark.parametrize("c", [1e25, 1e200, 1e-300])
def test_extreme_scales_give_the_unscaled_ct_verdict(c):
    system = _scale_systems()[1]
    reference = certify(system, ["ct-norm", "ct-lmi"], tiers=["norm", "diag-P"], time_budget=10)
    results = certify(LureSystem(system.A * c, system.W * c), ["ct-norm", "ct-lmi"], tiers=["norm", "diag-P"], time_budget=10)
    assert [r.holds for r in results] == [r.holds for r in reference] == [False, True]


@pytest.mark.parametrize("c", [1e200, 1e-300])
def test_extreme_scales_of_discrete_schemes_are_not_certified_with_a_reason(c):
    system = _scale_systems()[0]
    for method in ("euler", "rk2", "rk4"):
        scaled = LureSystem(system.A * c, system.W * c, method=method, eps=0.1)
        for result in certify(scaled, time_budget=2):
            assert not result.holds and result.reason


# ---------------------------------------------------------------- inputs and rates


def test_bad_systems_are_one_line_input_errors():
    with pytest.raises(ValueError, match="n >= 1"):
        LureSystem(np.zeros((0, 0)), np.zeros((0, 0)))
    for substeps in (float("inf"), float("nan"), 0, 1.5, True):
        with pytest.raises(ValueError, match="substeps"):
            LureSystem(-np.eye(2), np.eye(2), method="euler", eps=0.1, substeps=substeps)
    with pytest.raises(ValueError, match="eps"):
        LureSystem(-np.eye(2), np.eye(2), method="euler", eps=float("inf"))


def test_huge_step_is_not_certified_without_an_exception():
    system = LureSystem(-np.eye(2), 0.1 * np.eye(2), method="rk4", eps=1e300)
    results = certify(system, time_budget=2)
    assert [r.holds for r in results] == [False, False]
    assert all("overflow" in r.reason or "spectral radius" in r.reason for r in results)


def test_a_million_substeps_never_claims_one_step_convergence():
    system = LureSystem(-0.5 * np.eye(2), 0.1 * np.eye(2), method="euler", eps=0.1, substeps=10**6)
    for result in certify(system, tiers=["norm", "P=I"]):
        assert result.holds and result.rate > 0.0
        assert result.rate == np.finfo(np.float64).tiny  # saturated, an honest upper bound
        assert result.log_rate >= 10**6 * math.log(result.substep_rate) * (1 + 1e-12)
        assert result.log_rate < -4e4


def test_discrete_rates_are_rounded_up_and_reverify():
    system = LureSystem(-np.eye(2), 0.3 * np.eye(2), method="euler", eps=0.1, substeps=3)
    result = certify(system, ["euler-lmi"], tiers=["P=I"])[0]
    assert result.holds
    assert result.rate >= result.substep_rate**3 * (1 - 4 * U)
    assert result.rate >= math.sqrt(result.evidence.r) ** 3
    ev = result.evidence
    assert verify_certificate(system, "euler-lmi", ev.P, ev.multipliers, result.rate).passed


# ---------------------------------------------------------------- solvers


class PanicException(BaseException):
    """Stand-in for pyo3's PanicException (matched by class name, like the real one)."""


def test_a_solver_panic_is_not_certified_and_interrupts_propagate(monkeypatch):
    system = _scale_systems()[1]

    def panic(self, *args, **kwargs):
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(cp.Problem, "solve", panic)
    result = certify(system, ["ct-lmi"], tiers=["diag-P"], time_budget=5)[0]
    assert not result.holds and "PanicException" in result.attempts[0].reason

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cp.Problem, "solve", interrupt)
    with pytest.raises(KeyboardInterrupt):
        certify(system, ["ct-lmi"], tiers=["diag-P"], time_budget=5)


def test_scs_without_a_time_budget_runs_and_says_so(monkeypatch):
    system = _scale_systems()[1]
    result = certify(system, ["ct-lmi"], tiers=["diag-P"], solver="SCS", time_budget=None)[0]
    attempt = result.attempts[0]
    assert result.holds and attempt.solver == "SCS" and "error" not in attempt.reason
    original = cp.Problem.solve

    def scs_fails(self, *args, **kwargs):
        if kwargs.get("solver") == "SCS":
            raise cp.error.SolverError("SCS failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cp.Problem, "solve", scs_fails)
    attempt = certify(system, ["ct-lmi"], tiers=["diag-P"], solver="SCS", time_budget=None)[0].attempts[0]
    assert "fell back to CLARABEL" in attempt.reason


# ---------------------------------------------------------------- parameterization


def exact_value(test, beta_A, gamma_A, beta_W, gamma_W, r, eps, L):
    """Exact value of the parameterization bound, or (for Runge-Kutta tests) an exact
    lower bound on the value and a flag whether it already reaches the threshold."""
    F = Fraction
    bA, gA, bW, gW, r, L = (F(float(x)) for x in (beta_A, gamma_A, beta_W, gamma_W, r, L))
    mu = 2 * abs(1 - bA) * r - gA
    nA = 2 * max(bA, 1 - bA) * r + abs(gA)
    nW = 2 * max(bW, 1 - bW) * r + abs(gW)
    if test == "ct-norm":
        return mu + L * nW
    if test == "map-norm":
        return L * nW
    e = F(float(eps))
    square = 1 + 2 * e * mu + e**2 * nA**2  # value >= 1  <=>  sqrt(square) >= 1 - rest
    rest = e * L * nW
    x = e * (nA + L * nW)
    if test == "rk2-norm":
        rest += x**2 / 2
    if test == "rk4-norm":
        rest += x**2 / 2 + x**3 / 6 + x**4 / 24
    return square, rest


def exactly_holds(test, *args):
    value = exact_value(test, *args)
    if test == "ct-norm":
        return value < 0
    if test == "map-norm":
        return value < 1
    square, rest = value
    return rest < 1 and square < (1 - rest) ** 2


ALL_TESTS = ["ct-norm", "euler-norm", "rk2-norm", "rk4-norm", "map-norm"]


def test_every_certified_radius_is_exactly_certified_up_to_the_last_ulp():
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(8):
        beta_W, gamma_W = rng.uniform(-0.5, 1.5), rng.uniform(-0.2, 0.2)
        eps, L = rng.uniform(0.01, 0.5), rng.uniform(1.0, 2.0)
        cells = phase_diagram(rng.uniform(-0.5, 1.5, 6), rng.uniform(0.0, 3.0, 6), 0.01, eps, L, ALL_TESTS,
                              beta_W=beta_W, gamma_W=gamma_W)
        for cell in cells:
            if cell.r_star == 0:
                continue
            args = (cell.test, cell.beta_A, cell.gamma_A, beta_W, gamma_W)
            r = cell.r_star
            for _ in range(3):
                assert exactly_holds(*args, r, eps, L), (args, r)
                r = np.nextafter(r, 0)
                checked += 1
    assert checked > 500
    for result in certify_parameterization(0.3, 1.2, 0.5, 0.1, 0.1, eps=0.1, tests=ALL_TESTS):
        args = (0.3, 1.2, 0.5, 0.1)
        assert certify_parameterization(*args, result.r_star, eps=0.1, tests=[result.test])[0].holds
        assert not certify_parameterization(*args, np.nextafter(result.r_star, 1), eps=0.1, tests=[result.test])[0].holds


def test_overflowing_and_meaningless_parameters():
    for result in certify_parameterization(0.75, 1e308, 0.75, 0.0, 1.0, eps=1.0):
        if result.test != "ct-norm":
            assert not result.holds and "overflow" in result.reason and math.isnan(result.margin)
    big = certify_parameterization(0.75, 1e308, 0.75, 0.0, 1e308, eps=1.0, tests=["ct-norm", "euler-norm"])
    assert not any(r.holds for r in big[1:])
    for bad in ({"gamma_A": math.inf}, {"gamma_A": math.nan}, {"beta_A": math.inf}, {"r": -1.0}, {"r": math.inf},
                {"eps": math.inf}, {"eps": 1e-320 * 0}, {"gamma_W": math.nan}, {"slope": math.inf}):
        kwargs = {"beta_A": 0.75, "gamma_A": 1.0, "beta_W": 0.75, "gamma_W": 0.0, "r": 0.1, "eps": 0.1, **bad}
        with pytest.raises(ValueError):
            certify_parameterization(**kwargs)
    with pytest.raises(ValueError):
        phase_diagram([0.5, math.nan], [0.1], 0.1)


def test_shared_gamma_is_never_certified_and_the_remedy_certifies():
    r, eps = 0.0218861, 0.03
    for result in certify_parameterization(0.75, 0.001, 0.75, 0.001, r, eps=eps):
        assert not result.holds and not result.holds_at_zero and "cancels" in result.reason
        lo, hi = result.gamma_A_interval
        assert "gamma_W = 0" in result.remedy
        for gamma in (lo, hi if math.isfinite(hi) else 10 * lo):
            assert certify_parameterization(0.75, gamma, 0.75, 0.001, r, eps=eps, tests=[result.test])[0].holds
        for gamma in (lo * (1 - 1e-9), hi * (1 + 1e-9)):
            if math.isfinite(gamma):
                assert not certify_parameterization(0.75, gamma, 0.75, 0.001, r, eps=eps, tests=[result.test])[0].holds
    cells = phase_diagram(np.linspace(0, 1, 9), np.linspace(-1, 1, 9), r, eps)
    assert not any(c.holds for c in cells)


@pytest.mark.parametrize("test", ["ct-norm", "euler-norm", "rk2-norm", "rk4-norm", "map-norm"])
def test_certifying_gamma_interval_is_exact_at_its_ends(test):
    rng = np.random.default_rng(5)
    for _ in range(20):
        beta_A, beta_W, gamma_W = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(-0.1, 0.1)
        r, eps, L = rng.uniform(0, 0.3), rng.uniform(0.01, 0.3), rng.uniform(1.0, 1.5)
        interval = certifying_gamma_A(test, beta_A, beta_W, gamma_W, r, eps, L)
        gammas = np.linspace(-5, 1 / eps + 5, 400)
        cells = phase_diagram([beta_A], gammas, r, eps, L, [test], beta_W=beta_W, gamma_W=gamma_W)
        if interval is None:
            assert not any(c.holds for c in cells)
            continue
        assert all(c.holds == (interval[0] <= c.gamma_A <= interval[1]) for c in cells)
        for gamma in interval:
            if math.isfinite(gamma):
                assert exactly_holds(test, beta_A, gamma, beta_W, gamma_W, r, eps, L)
