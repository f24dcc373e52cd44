"""Stability-constrained training: the projection makes the chosen norm certificate hold."""
import pytest
import torch

from lrnn_analysis.constraints import StabilityConstraint, check_feasible, project
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.stability import certify, norm_test
from lrnn_analysis.training import TrainSettings, train_model


def _model(gamma_a=1.0, init_std=40.0, eps=0.1, disc="euler"):
    config = ModelConfig("lipschitz", 1, 12, 10, eps=eps, discretization=disc, gamma_a=gamma_a, init_std=init_std)
    return build_model(config, seed=0)


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
