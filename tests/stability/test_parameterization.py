"""Closed-form parameterization certificate: sound bounds, r*, the certifying gamma interval, the
phase-diagram table, the initialisation radius; exact at the last ulp against rational arithmetic."""
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from helpers import lipschitz_matrix_np as lipschitz_matrix
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.stability import (
    LureSystem,
    certify,
    certify_parameterization,
    certifying_gamma_A,
    gaussian_init_radius,
    norm_test,
    parameter_bounds,
    phase_diagram,
)


def random_unit_norm(rng, count, n):
    M = rng.standard_normal((count, n, n))
    return M / np.linalg.norm(M, ord=2, axis=(1, 2))[:, None, None]


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
    for ma, mw in zip(MA, MW, strict=True):
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


def test_init_radius_is_the_stated_bound_and_covers_the_models_initialisation():
    init = gaussian_init_radius(128, 0.1)
    s = 0.1 / 128
    t = math.sqrt(2 * math.log(2 / 1e-6))
    assert init.entry_std == s and init.radius == pytest.approx(s * (2 * math.sqrt(128) + t), rel=1e-15)
    n = 32
    init = gaussian_init_radius(n, 0.1)
    norms = []
    for seed in range(30):
        model = build_model(ModelConfig(arch="lipschitz", input_dim=1, hidden=n, output_dim=2, init_std=0.1), seed=seed)
        norms += [float(np.linalg.norm(m.detach().double().numpy(), 2)) for m in (model.M_A, model.M_W)]
    assert max(norms) <= init.radius
    # the toolkit draws entries with std init_std / hidden: the mean norm sits just below Gordon's 2 s sqrt(N)
    assert 0.8 * init.expected_bound <= np.mean(norms) <= init.expected_bound
    for bad in ((0, 0.1), (8, 0.0), (8, -1.0), (8, math.inf)):
        with pytest.raises(ValueError):
            gaussian_init_radius(*bad)


def test_parameterization_bounds_cover_w_and_all_tests_for_odd_beta_gamma():
    rng = np.random.default_rng(30)
    n, eps = 4, 0.3
    certified = 0
    for beta_A, gamma_A, beta_W, gamma_W, L in ((-0.7, 2.5, 1.6, -0.4, 1.0), (2.0, 3.0, -0.3, 0.2, 1.5),
                                                (0.5, 1.0, 0.5, -0.1, 1.2)):
        for r in (0.05, 0.2, 0.5):
            results = certify_parameterization(
                beta_A, gamma_A, beta_W, gamma_W, r, eps=eps, slope=L,
                tests=["ct-norm", "euler-norm", "rk2-norm", "rk4-norm", "map-norm"],
            )
            certified += sum(res.holds for res in results)
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
    assert certified == 17  # of the 3 settings x 3 radii x 5 tests, each checked on 15 members


def test_parameterization_rejects_meaningless_eps_and_slope():
    from lrnn_analysis.stability import certify_parameterization

    for kwargs in ({"eps": -0.1}, {"eps": 0.0}, {"slope": 0.5}, {"slope": -1.0}):
        with pytest.raises(ValueError):
            certify_parameterization(0.5, 0.0, 0.5, 0.0, 1.0, **{"eps": 0.1, **kwargs})


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


# Of the 20 draws: how many have a certifying interval, and how many finite ends those have. ct-norm's
# intervals are unbounded above; gamma_A does not enter map-norm, whose intervals are the whole line.
INTERVALS = {"ct-norm": (20, 20), "euler-norm": (20, 40), "rk2-norm": (17, 34), "rk4-norm": (16, 32), "map-norm": (20, 0)}


@pytest.mark.parametrize("test", ["ct-norm", "euler-norm", "rk2-norm", "rk4-norm", "map-norm"])
def test_certifying_gamma_interval_is_exact_at_its_ends(test):
    rng = np.random.default_rng(5)
    intervals = finite_ends = 0
    for _ in range(20):
        beta_A, beta_W, gamma_W = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(-0.1, 0.1)
        r, eps, L = rng.uniform(0, 0.3), rng.uniform(0.01, 0.3), rng.uniform(1.0, 1.5)
        interval = certifying_gamma_A(test, beta_A, beta_W, gamma_W, r, eps, L)
        gammas = np.linspace(-5, 1 / eps + 5, 400)
        cells = phase_diagram([beta_A], gammas, r, eps, L, [test], beta_W=beta_W, gamma_W=gamma_W)
        if interval is None:
            assert not any(c.holds for c in cells)
            continue
        intervals += 1
        assert all(c.holds == (interval[0] <= c.gamma_A <= interval[1]) for c in cells)
        for gamma in interval:
            if math.isfinite(gamma):
                finite_ends += 1
                assert exactly_holds(test, beta_A, gamma, beta_W, gamma_W, r, eps, L)
    assert (intervals, finite_ends) == INTERVALS[test]
