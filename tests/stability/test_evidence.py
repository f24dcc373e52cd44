"""Certificate evidence stored in a checkpoint: exact round trips, tampering and changed weights
detected, the evidence search's tier order."""
import numpy as np
import pytest
import torch

from checkpoint_edits import edit_evidence
from lrnn_analysis.checkpoints import load_checkpoint
from lrnn_analysis.stability import verify_certificate
from lrnn_analysis.stability.evidence import (
    EVIDENCE_TIERS,
    METADATA_KEY,
    StoredEvidence,
    check_stored,
    search_evidence,
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
