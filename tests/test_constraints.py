"""Stability-constrained training: the projection makes the chosen norm certificate hold."""
import pytest
import torch

from lrnn_analysis.checkpoints import load_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.constraints import StabilityConstraint, check_feasible, project
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.stability import certify, norm_test
from lrnn_analysis.training import TrainSettings, train_model
import math
from lrnn_analysis.stability.evidence import METADATA_KEY, StoredEvidence, certificate_result, check_stored, weights_sha256


def _model(gamma_a=1.0, init_std=40.0, eps=0.1, disc="euler"):
    return build_model(ModelConfig("lipschitz", 1, 12, 10, eps=eps, discretization=disc, gamma_a=gamma_a, init_std=init_std), seed=0)


@pytest.mark.parametrize("name", ["ct-norm", "euler-norm", "rk2-norm"])
def test_projection_certifies_with_margin_and_is_nearly_maximal(name):
    model = _model(disc="rk2" if name == "rk2-norm" else "euler")
    constraint = StabilityConstraint(name, margin=0.005)
    assert norm_test(model.lure_form(), name).value > constraint.bound  # the random model violates it
    before = model.M_A.detach().clone()
    projection = project(model, constraint)
    assert 0 < projection.scale < 1
    torch.testing.assert_close(model.M_A.detach(), before * projection.scale)
    outcome = norm_test(model.lure_form(), name)
    assert outcome.holds and outcome.value + outcome.tolerance <= constraint.bound
    assert certify(model.lure_form(), [name])[0].holds
    bigger = _model(disc=model.config.discretization)
    with torch.no_grad():
        bigger.M_A.copy_(before * projection.scale * 1.01)
        bigger.M_W.mul_(projection.scale * 1.01)
    assert norm_test(bigger.lure_form(), name).value > constraint.bound


def test_projection_leaves_a_feasible_model_alone():
    model = _model(init_std=0.01)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert project(model, StabilityConstraint("ct-norm", 0.01)).scale == 1.0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_infeasible_and_unsupported_requests():
    with pytest.raises(ValueError, match="cannot hold for any M_A, M_W"):
        check_feasible(_model(gamma_a=0.001), StabilityConstraint("euler-norm", 0.01))
    with pytest.raises(ValueError, match="certifies the rk2 scheme but the model runs euler"):
        check_feasible(_model(), StabilityConstraint("rk2-norm", 0.01))
    with pytest.raises(ValueError, match="supports the lipschitz architecture"):
        check_feasible(build_model(ModelConfig("antisymmetric", 1, 4, 2)), StabilityConstraint("ct-norm"))
    for bad in (("map-norm", 0.0), ("euler-norm", 1.5), ("ct-norm", -0.1)):
        with pytest.raises(ValueError):
            StabilityConstraint(*bad)


def test_constrained_training_keeps_the_certificate_every_epoch(digits_task):
    model = _model(init_std=0.1)
    constraint = StabilityConstraint("euler-norm", 0.002)
    result = train_model(model, digits_task, TrainSettings(epochs=3, lr=0.05), torch.device("cpu"), progress=False,
                         constraint=constraint)
    assert all(entry["constraint_value"] <= constraint.bound for entry in result.log)
    assert certify(model.lure_form(), ["euler-norm"])[0].holds


def test_cli_constrained_training_records_the_certificate(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    code = main(["train", "--task", "digits", "--hidden", "8", "--epochs", "1", "--constrain", "ct-norm", "--margin", "0.05",
                 "--gamma-a", "1", "--out", str(out), "--quiet"])
    assert code == 0
    _, metadata = load_checkpoint(out)
    record = metadata["constraint"]
    assert record["certificate"] == "ct-norm" and record["margin"] == 0.05
    assert record["certificate_result"]["holds"] is True and record["certificate_result"]["margin"] >= 0.05 - 1e-9
    assert "constraint ct-norm" in capsys.readouterr().out
    assert main(["train", "--task", "digits", "--hidden", "8", "--epochs", "1", "--constrain", "euler-norm",
                 "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 2
    assert "raise gamma_a" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# Stored evidence is reported under the meaning of its own certificate, with a checked tier.
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
