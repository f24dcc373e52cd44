"""Certificates on systems with known answers, tier behaviour, verification of corrupted evidence."""
import json

import numpy as np
import pytest
import scipy.optimize

from lrnn_analysis.stability import LureSystem, certify, norm_certificate_value, simulate_pairs, verify_certificate

MULTISTABLE_A = np.array([[-1.0, 10.0], [0.0, -1.0]])
MULTISTABLE_W = np.array([[-3.0, 0.0], [0.2, 0.0]])
EULER_A = np.array([[-0.1, 1.0], [-1.0, -0.1]])


def by_name(results):
    return {r.name: r for r in results}


def test_diagonal_system_has_the_exact_rate():
    system = LureSystem(-np.eye(3), 0.5 * np.eye(3))
    results = by_name(certify(system))
    assert results["ct-norm"].holds and np.isclose(results["ct-norm"].rate, 0.5)
    assert np.isclose(norm_certificate_value(system), -0.5)
    lmi = certify(system, ["ct-lmi"], tiers=["P=I", "full-P"])[0]
    assert lmi.holds and lmi.tier == "P=I"
    assert 0.5 - 1e-6 <= lmi.rate <= 0.5
    json.dumps(lmi.to_dict())


def test_nonnormal_system_needs_a_scaled_lyapunov_matrix():
    system = LureSystem(MULTISTABLE_A, 0.05 * np.eye(2))
    results = by_name(certify(system))
    assert not results["ct-norm"].holds and results["ct-norm"].margin < 0
    lmi = results["ct-lmi"]
    assert lmi.holds and lmi.tier == "riccati" and lmi.rate > 0
    assert [a.tier for a in lmi.attempts] == ["norm", "P=I", "riccati"]
    assert lmi.gain > 1.0 and lmi.verification.passed and lmi.verification.margin > 0
    diagonal = certify(system, ["ct-lmi"], tiers=["norm", "P=I", "diag-P"])[0]
    assert diagonal.holds and diagonal.tier == "diag-P" and diagonal.rate > 0
    assert diagonal.gain > 1.0 and diagonal.verification.passed


def test_known_multistable_system_is_never_certified():
    assert np.linalg.eigvals(MULTISTABLE_A).real.max() < 0
    assert np.linalg.eigvals(MULTISTABLE_A + MULTISTABLE_W).real.max() < 0
    field = lambda h: MULTISTABLE_A @ h + np.tanh(MULTISTABLE_W @ h)
    roots = []
    for start in np.random.default_rng(0).uniform(-6, 6, (200, 2)):
        sol = scipy.optimize.root(field, start, tol=1e-12)
        if sol.success and np.linalg.norm(field(sol.x)) < 1e-9 and not any(np.allclose(sol.x, r, atol=1e-6) for r in roots):
            roots.append(sol.x)
    assert len(roots) >= 3
    for method, eps in (("ode", None), ("euler", 0.05), ("rk2", 0.05)):
        system = LureSystem(MULTISTABLE_A, MULTISTABLE_W, method=method, eps=eps)
        names = ["ct-norm", "ct-lmi"] + ([] if method == "ode" else [f"{method}-norm", f"{method}-lmi"])
        assert not any(r.holds for r in certify(system, names))


def test_ct_certificate_does_not_transfer_to_forward_euler():
    system = LureSystem(EULER_A, 0.05 * np.eye(2), method="euler", eps=0.5)
    results = by_name(certify(system, ["ct-norm", "ct-lmi", "euler-norm", "euler-lmi"]))
    assert results["ct-norm"].holds and results["ct-lmi"].holds
    assert not results["euler-norm"].holds and not results["euler-lmi"].holds
    assert "no input-uniform certificate can exist" in results["euler-lmi"].reason
    small = by_name(certify(LureSystem(EULER_A, 0.05 * np.eye(2), method="euler", eps=0.05)))
    assert small["euler-norm"].holds and small["euler-lmi"].holds


def test_map_certificates():
    W = np.array([[0.0, 4.0], [0.1, 0.0]])
    results = by_name(certify(LureSystem(np.zeros((2, 2)), W, method="map")))
    assert not results["map-norm"].holds
    lmi = results["map-lmi"]
    assert lmi.holds and lmi.tier in ("riccati", "diag-P", "full-P")
    assert np.sqrt(0.4) - 1e-6 <= lmi.rate < 1.0
    contractive = certify(LureSystem(np.zeros((2, 2)), 0.5 * np.eye(2), method="map"), ["map-norm"])[0]
    assert contractive.holds and np.isclose(contractive.rate, 0.5)


def test_substeps_compound_the_contraction_factor():
    A = -np.eye(2)
    one = certify(LureSystem(A, 0.3 * np.eye(2), method="rk4", eps=0.1), ["rk4-norm"])[0]
    three = certify(LureSystem(A, 0.3 * np.eye(2), method="rk4", eps=0.1, substeps=3), ["rk4-norm"])[0]
    assert one.holds and three.holds
    assert np.isclose(three.rate, one.rate**3) and np.isclose(three.substep_rate, one.rate)


def random_contractive(rng, n, scale_W):
    M = rng.standard_normal((n, n)) / np.sqrt(n)
    return -np.eye(n) + 0.8 * (M - M.T) + 0.2 * M, scale_W * rng.standard_normal((n, n)) / np.sqrt(n)


@pytest.mark.parametrize("family,eps", [("ct", None), ("euler", 0.1), ("map", None)])
def test_lmi_tiers_never_weaker_than_the_norm_test(family, eps):
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(12):
        A, W = random_contractive(rng, 4, 0.6)
        if family == "map":
            A, W = np.zeros_like(A), 0.9 * W
        method = "ode" if family == "ct" else family
        system = LureSystem(A, W, method=method, eps=eps)
        norm = certify(system, [f"{family}-norm"])[0]
        if not norm.holds:
            continue
        checked += 1
        for tier in ("P=I", "full-P"):
            lmi = certify(system, [f"{family}-lmi"], tiers=[tier])[0]
            assert lmi.holds, (tier, lmi.reason)
            if family == "ct":
                assert lmi.rate >= norm.rate * (1 - 1e-6)
            else:
                assert lmi.rate <= norm.rate * (1 + 1e-6) + 1e-9
    assert checked >= 3


def test_verification_rejects_corrupted_evidence():
    system = LureSystem(MULTISTABLE_A, 0.05 * np.eye(2))
    result = certify(system, ["ct-lmi"], tiers=["full-P"])[0]
    assert result.holds
    P, lam, rate = result.evidence.P, result.evidence.multipliers, result.rate
    assert verify_certificate(system, "ct-lmi", P, lam, rate).passed
    bad_lam = lam.copy()
    bad_lam[0, 0] = -abs(bad_lam[0, 0]) - 1e-3
    indefinite = P - 1.01 * np.linalg.eigvalsh(P)[-1] * np.eye(2)
    eigs, vecs = np.linalg.eigh(P)
    nearly_singular = (vecs * [1e-12 * eigs[-1], eigs[-1]]) @ vecs.T
    nearly_singular = 0.5 * (nearly_singular + nearly_singular.T)
    skewed = P.copy()
    skewed[0, 1] += 1e-6
    corrupted = [
        (P, bad_lam, rate),
        (indefinite, lam, rate),
        (np.zeros((2, 2)), lam, rate),
        (skewed, lam, rate),
        (P, np.zeros_like(lam), rate),
        (P, lam, rate + 1.0),
        (nearly_singular, lam, rate),
    ]
    for P_bad, lam_bad, rate_bad in corrupted:
        assert not verify_certificate(system, "ct-lmi", P_bad, lam_bad, rate_bad).passed


def test_discrete_verification_rejects_a_too_small_factor():
    system = LureSystem(EULER_A, 0.05 * np.eye(2), method="euler", eps=0.05)
    result = certify(system, ["euler-lmi"], tiers=["full-P"])[0]
    assert result.holds
    ev = result.evidence
    assert verify_certificate(system, "euler-lmi", ev.P, ev.multipliers, result.rate).passed
    assert not verify_certificate(system, "euler-lmi", ev.P, ev.multipliers, result.rate - 1e-3).passed


def test_defaults_budget_and_argument_checks():
    system = LureSystem(MULTISTABLE_A, 0.05 * np.eye(2), method="rk2", eps=0.05)
    assert [r.name for r in certify(system)] == ["rk2-norm", "rk2-lmi"]
    starved = certify(system, ["rk2-lmi"], time_budget=0.0)[0]
    assert not starved.holds and starved.budget_exhausted
    assert all(a.reason.startswith("skipped") for a in starved.attempts)
    with pytest.raises(ValueError):
        certify(system, ["euler-norm"])
    with pytest.raises(ValueError):
        certify(LureSystem(-np.eye(2), np.eye(2)), ["euler-lmi"])
    with pytest.raises(ValueError):
        certify(system, ["rk2-lmi"], tiers=["magic"])


def test_rk38_certificates_are_verified_at_least_as_good_as_the_norm_test_and_never_beaten_by_simulation():
    """The 3/8-rule scheme (torchdiffeq's rk4): rk38-norm, and rk38-lmi from the P = I and full-P tiers
    alone, hold in float64 verification, the LMIs never do worse than the norm test, and simulated
    trajectory pairs of the scheme never contract more slowly than any certified rate."""
    rng = np.random.default_rng(5)
    for trial in range(4):
        n = 4
        M = rng.standard_normal((n, n)) / np.sqrt(n)
        A = -np.eye(n) + 0.3 * (M - M.T) + 0.1 * M
        W = 0.3 * rng.standard_normal((n, n)) / np.sqrt(n)
        system = LureSystem(A, W, method="rk38", eps=0.1)
        norm = certify(system, ["rk38-norm"])[0]
        assert norm.holds, norm.reason
        results = [norm]
        for tier in ("P=I", "full-P"):
            lmi = certify(system, ["rk38-lmi"], tiers=[tier])[0]
            assert lmi.holds and lmi.tier == tier, (tier, lmi.reason)
            assert verify_certificate(system, "rk38-lmi", lmi.evidence.P, lmi.evidence.multipliers, lmi.rate).passed
            assert lmi.rate <= norm.rate * (1 + 1e-6)
            results.append(lmi)
        assert certify(system, ["rk38-lmi"])[0].rate <= norm.rate
        for result in results:
            P = None if result.evidence is None else result.evidence.P
            sim = simulate_pairs(system, pairs=6, steps=40, seed=trial, input_scale=2.0, init_scale=3.0, P=P)
            assert sim.max_step_factor <= result.rate * (1 + 1e-6)
            assert sim.max_growth <= result.gain * (1 + 1e-6)


def test_an_infeasible_sdp_says_no_certificate_of_the_family_exists():
    # Both vertex Jacobians of this euler system are stable, yet the full-P SDP with diagonal
    # multipliers is infeasible even at the weakest rate: that is reported as such, not as a
    # search that ran out of tiers or time.
    A = [[-1.0862163123425999, 0.47232248365337604, -0.12983575415477902],
         [-0.2206449877026825, -0.9250643885323999, 0.3094359254608417],
         [0.0483028730146034, -0.17565864723700098, -1.4023659142230007]]
    W = [[-2.102280322376142, 0.7540242748122985, 1.4845695499287075],
         [-0.24644188893793606, -1.611547287342652, 1.3095632289325598],
         [-1.9205909170718596, -1.0696021425889082, 0.9315267803101478]]
    result = certify(LureSystem(A, W, method="euler", eps=0.3), ["euler-lmi"], time_budget=60)[0]
    assert not result.holds and not result.budget_exhausted
    assert result.reason.startswith("no certificate of this family (any P, diagonal multipliers) exists: "
                                    "the full-P SDP is infeasible at the weakest rate")
