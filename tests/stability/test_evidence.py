"""Certificate evidence stored in a checkpoint: exact round trips, tampering and changed weights
detected, the evidence search's tier order."""
import math

import numpy as np
import pytest
import torch

from checkpoint_edits import edit_evidence
from lrnn_analysis.checkpoints import load_checkpoint
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.stability import certify, verify_certificate
from lrnn_analysis.stability.evidence import (
    EVIDENCE_TIERS,
    METADATA_KEY,
    StoredEvidence,
    certificate_result,
    check_stored,
    search_evidence,
    weights_sha256,
)

from .cases import random_system


class _LureModule(torch.nn.Module):
    """The least a model needs for search_evidence: weights (for the SHA-256) and a Lur'e form."""

    def __init__(self, system):
        super().__init__()
        self.system = system
        self.A = torch.nn.Parameter(torch.tensor(system.A))
        self.W = torch.nn.Parameter(torch.tensor(system.W))

    def lure_form(self):
        return self.system


def test_stored_evidence_round_trips_exactly_and_verifies(certified_checkpoint):
    path, evidence = certified_checkpoint
    model, metadata = load_checkpoint(path)
    loaded = StoredEvidence.from_dict(metadata[METADATA_KEY])
    assert np.array_equal(loaded.P, evidence.P) and np.array_equal(loaded.multipliers, evidence.multipliers)
    assert loaded.rate == evidence.rate
    check = check_stored(model, metadata)
    assert check.verified and "verified from stored evidence" in check.describe()


@pytest.mark.parametrize("tamper", [
    lambda e: e["P"][0].__setitem__(0, e["P"][0][0] * 1e-3),
    lambda e: e.__setitem__("rate", e["rate"] * 0.5),
    lambda e: e["multipliers"].__setitem__(0, -1.0),
    lambda e: e.__setitem__("P", "not a matrix"),
])
def test_tampered_evidence_is_detected(certified_checkpoint, tamper):
    path, _ = certified_checkpoint
    edit_evidence(path, tamper)
    model, metadata = load_checkpoint(path)
    check = check_stored(model, metadata)
    assert check.status == "failed" and "NOT VERIFIED" in check.describe()


def test_changed_weights_are_detected(certified_checkpoint):
    path, _ = certified_checkpoint
    model, metadata = load_checkpoint(path)
    with torch.no_grad():
        model.C[0, 1] += 1e-3
    check = check_stored(model, metadata)
    assert check.status == "failed" and "weights changed" in check.reason


def test_search_evidence_tries_the_riccati_tier_before_the_sdp_tiers():
    """Evidence search uses certify's LMI tier order, so a full-P certificate comes from Riccati
    solves instead of an SDP, and the stored evidence verifies in float64."""
    assert EVIDENCE_TIERS == ("P=I", "riccati", "diag-P", "full-P")
    system = random_system(np.random.default_rng(0), 12, "euler", 0.05)
    stored, result = search_evidence(_LureModule(system))
    assert [a.tier for a in result.attempts] == ["P=I", "riccati"] and not result.attempts[0].holds
    assert stored is not None and stored.tier == "riccati" and stored.rate == result.rate
    assert verify_certificate(system, "euler-lmi", stored.P, stored.multipliers, stored.rate).passed


def _euler_model():
    return build_model(ModelConfig("lipschitz", 2, 4, 3, eps=0.2, gamma_a=1.0, gamma_w=0.0), seed=0)


def _stored(model, result, tier=None):
    evidence = StoredEvidence(result.name, result.evidence.P, result.evidence.multipliers, result.rate,
                              tier or result.tier, weights_sha256(model))
    return {METADATA_KEY: evidence.to_dict()}


def test_a_ct_certificate_stored_on_an_euler_model_keeps_its_continuous_time_meaning():
    model = _euler_model()
    ct = certify(model.lure_form(), ["ct-lmi"], tiers=["P=I", "riccati", "diag-P"])[0]
    assert ct.holds and ct.tier in ("P=I", "riccati", "diag-P")
    check = check_stored(model, _stored(model, ct))
    assert check.verified
    reported = certificate_result(check, model)
    assert reported.name == "ct-lmi" and reported.rate == ct.rate
    assert reported.rate_meaning.startswith("decay rate a per unit time")
    assert reported.margin == ct.rate  # a decay rate's margin is a itself, never 1 - a
    assert any("says nothing about a discretization" in a or "underlying ODE" in a for a in reported.assumptions)


def test_an_unknown_tier_label_fails_the_check():
    model = _euler_model()
    found = certify(model.lure_form(), ["euler-lmi"], tiers=["P=I", "riccati", "diag-P"])[0]
    assert found.holds
    assert check_stored(model, _stored(model, found)).verified
    forged = check_stored(model, _stored(model, found, tier="oracle"))
    assert forged.status == "failed" and "unknown tier 'oracle'" in forged.reason


def test_the_transient_gain_bounds_the_condition_of_p_from_above():
    model = _euler_model()
    found = certify(model.lure_form(), ["euler-lmi"], tiers=["diag-P"])[0]
    v = found.verification
    assert found.holds and v.p_tolerance > 0
    assert found.gain > math.sqrt(v.p_condition) and found.gain == v.transient_gain
    low, high = v.p_min_eig - v.p_tolerance, v.p_max_eig + v.p_tolerance
    assert math.isclose(found.gain ** 2, high / low, rel_tol=1e-12)
