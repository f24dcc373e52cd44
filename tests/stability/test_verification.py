"""Float64 verification of LMI evidence: corrupted, subtly corrupted, too optimistic or meaningless
evidence is rejected, and subnormal scaling fools nothing."""
import itertools

import numpy as np
import pytest

from lrnn_analysis.stability import (
    LureSystem,
    certify,
    verify_certificate,
)
from lrnn_analysis.stability.forms import incremental_form
from lrnn_analysis.stability.verification import verify

from .cases import EULER_A, MULTISTABLE_A


def _certified(system, name, tiers=("full-P",)):
    result = certify(system, [name], tiers=list(tiers))[0]
    assert result.holds, result.reason
    return result


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
