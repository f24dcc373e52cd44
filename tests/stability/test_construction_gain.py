"""The gain certificate of lipschitz-ren models: verified in float64 from the weights, never below
what sampled pairs reach (nor is the Lur'e-form search's), stored evidence that round-trips and
whose tampering (edited weights in the safetensors file, edited numbers) is detected."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint_edits import rewrite_header
from lrnn_analysis import load_model
from lrnn_analysis.checkpoints import load_checkpoint, save_checkpoint
from lrnn_analysis.checkpoints import weights_sha256 as checkpoint_sha256
from lrnn_analysis.errors import CheckpointError
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.pipelines.stability import certify_lipschitz
from lrnn_analysis.stability import certify_gain, sequence_map
from lrnn_analysis.stability.construction_gain import (
    GAIN_EVIDENCE_KEY,
    StoredGain,
    check_stored_gain,
    construction_gain,
)


def _model(seed, G=2.0, scale=1.5):
    model = build_model(ModelConfig("lipschitz-ren", 3, 5, 4, lipschitz=G), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model


def _largest_sampled_ratio(model, horizon, seed):
    """max ||y(x) - y(x~)|| / ||x - x~|| and max |Delta(y_i - y_j)| / ||x - x~|| per pair, over random pairs (float64)."""
    model = model.double()
    rng = torch.Generator().manual_seed(seed)
    x = torch.randn(512, horizon, 3, generator=rng, dtype=torch.float64) * 2.0
    x2 = x + torch.randn(x.shape, generator=rng, dtype=torch.float64) * torch.rand(512, 1, 1, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        dy = model(x) - model(x2)
    dx = (x - x2).flatten(1).norm(dim=1)
    pairs = (dy[:, :, None] - dy[:, None, :]).abs() / dx[:, None, None]
    model.float()
    return float((dy.norm(dim=1) / dx).max()), pairs.max(dim=0).values.numpy()


@pytest.mark.parametrize("seed", range(3))
def test_the_construction_bound_verifies_and_is_never_beaten_by_sampled_pairs(seed):
    model = _model(seed)
    certificate = construction_gain(model, 12)
    assert certificate.holds and certificate.tier == "construction"
    assert certificate.verification.passed and certificate.r == 1.0
    assert certificate.lipschitz <= 2.0 * (1 + 1e-6)
    ratio, pairs = _largest_sampled_ratio(model, 12, seed)
    assert ratio <= certificate.lipschitz
    assert np.all(pairs <= certificate.pair_bounds)
    # The same bound for every horizon: r = 1.
    assert construction_gain(model, 784).lipschitz == certificate.lipschitz


def test_a_float64_model_is_certified_like_its_float32_copy():
    # In a float64 model .to(torch.float64) returns the parameters themselves, which require grad.
    model = _model(0)
    in32 = construction_gain(model, 12)
    in64 = construction_gain(model.double(), 12)
    assert in64.holds and in64.lipschitz == pytest.approx(in32.lipschitz, rel=1e-12)
    np.testing.assert_allclose(in64.pair_bounds, in32.pair_bounds, rtol=1e-12)


@pytest.mark.parametrize("seed", range(2))
def test_the_lure_form_search_never_reports_less_than_sampled_pairs_reach(seed):
    """The model also has an euler Lur'e form (zeta = T^-1 h): certify_gain applies to it."""
    model = _model(seed, scale=0.8)
    system, U, D = sequence_map(model)
    searched = certify_gain(system, U, D, 6, tiers=["closed-form", "riccati"], time_budget=30.0)
    assert searched.holds
    ratio, pairs = _largest_sampled_ratio(model, 6, 10 + seed)
    assert ratio <= searched.lipschitz
    assert np.all(pairs <= searched.pair_bounds)


def _trained_checkpoint(tmp_path):
    model = _model(0, scale=0.5)
    certificate = construction_gain(model, 8)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {GAIN_EVIDENCE_KEY: StoredGain.of(certificate, model).to_dict()})
    return path, certificate


def test_stored_gain_evidence_round_trips_and_verifies(tmp_path):
    path, certificate = _trained_checkpoint(tmp_path)
    model, metadata = load_checkpoint(path)
    check = check_stored_gain(model, metadata, 8)
    assert check.verified, check.reason
    assert check.certificate.lipschitz == certificate.lipschitz
    np.testing.assert_array_equal(check.certificate.pair_bounds, certificate.pair_bounds)
    found = certify_lipschitz(load_model(path), 8)
    assert found.stored.verified and found.certificate.lipschitz == certificate.lipschitz
    assert check_stored_gain(model, {}, 8).status == "absent"


def test_an_edited_weight_tensor_in_the_file_is_detected(tmp_path):
    """An edit of a tensor that also rewrites the file's integrity hash (which alone catches a plain
    edit) still fails the gain evidence, which is tied to the weights it was verified for."""
    path, _ = _trained_checkpoint(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["R"] = tensors["R"] * 1.5
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(CheckpointError, match="integrity check failed"):
        load_checkpoint(path)
    config = ModelConfig.from_dict(json.loads(header["lrnn_analysis"])["config"])
    rewrite_header(path, record_edit=lambda record: record.update(weights_sha256=checkpoint_sha256(config, tensors)))
    model, metadata = load_checkpoint(path)
    check = check_stored_gain(model, metadata, 8)
    assert check.status == "failed" and "weights changed" in check.reason
    # The pipeline then reports the construction's bound of the weights as they are, verified afresh.
    found = certify_lipschitz(load_model(path), 8)
    assert found.stored.status == "failed" and found.certificate.holds and found.certificate.tier == "construction"


@pytest.mark.parametrize("field,change,why", [
    ("mu", lambda v: v * 0.5, "dissipation LMI violated"),
    ("output_factor", lambda v: v * 0.5, "output factor too small"),
    ("pair_factors", lambda v: (np.array(v) * 0.5).tolist(), "pair factor is too small"),
    ("P", lambda v: (np.array(v) * np.array([1.0, 2.0, 1.0, 1.0, 1.0])[:, None]).tolist(), "not symmetric"),
    ("tier", lambda v: "sdp", "names the tier"),
    ("schema", lambda v: "x", "malformed"),
])
def test_edited_gain_evidence_is_detected(tmp_path, field, change, why):
    path, _ = _trained_checkpoint(tmp_path)

    def edit(record):
        evidence = record[GAIN_EVIDENCE_KEY]
        evidence[field] = change(evidence[field])

    rewrite_header(path, record_edit=edit)
    model, metadata = load_checkpoint(path)
    check = check_stored_gain(model, metadata, 8)
    assert check.status == "failed" and why in check.reason
    assert json.dumps(check.to_dict())
