"""The reference implementation's seven models against our own re-implementation of its forward
passes; which model a set of keys identifies; solvers the toolkit cannot run exactly."""
import numpy as np
import pytest
import torch

from lrnn_analysis.checkpoints import CheckpointError, load_checkpoint
from lrnn_analysis.reference import (
    ReferenceFileWarning,
    convert_reference_model,
)
from reference_files import CASES, HP, D, T, random_state, reference_forward, reference_lipschitz, reference_name, save_state


@pytest.mark.parametrize("model,solver", CASES)
def test_every_model_matches_the_reference_equations(model, solver):
    x = torch.randn(5, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state = random_state(model)
    expected = reference_forward(model, state, x, solver=solver)
    converted = convert_reference_model(model, state, {**HP, "solver": solver}, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, rtol=1e-10, atol=1e-10)
        single = convert_reference_model(model, {k: v.float() for k, v in state.items()}, {**HP, "solver": solver})
        ours = single(x.float()).double()
    expected32 = reference_forward(model, {k: v.float().double() for k, v in state.items()}, x.float().double(), solver=solver)
    assert float((ours - expected32).abs().max() / expected32.abs().max()) < 1e-5


def test_certificates_see_the_real_A_with_alpha_folded_in():
    state = random_state("LipschitzRNN")
    model = convert_reference_model("LipschitzRNN", state, HP, dtype=torch.float64)
    A_ref = reference_lipschitz(state["B"], HP["beta"], HP["gamma"])
    np.testing.assert_allclose(model.lure_form().A, (HP["alpha"] * A_ref).T.numpy(), rtol=0, atol=1e-14)
    W_ref = reference_lipschitz(state["C"], HP["beta"], HP["gamma"])
    np.testing.assert_allclose(model.lure_form().W, W_ref.T.numpy(), atol=1e-14)
    ode = convert_reference_model("LipschitzRNN_ODE", random_state("LipschitzRNN_ODE"), {**HP, "solver": "midpoint"})
    assert (ode.config.arch, ode.config.discretization, ode.config.gamma_a) == ("lipschitz", "rk2", HP["gamma"])
    assert model.config.readout == ode.config.readout == "last"  # the reference classifiers read the last state only
    rk4 = convert_reference_model("LipschitzRNN_ODE", random_state("LipschitzRNN_ODE"), {**HP, "solver": "rk4"})
    assert (rk4.config.discretization, rk4.lure_form().method) == ("rk38", "rk38")


def test_gated_files_never_load_as_plain_lipschitz(tmp_path):
    renamed = save_state(tmp_path, "LipschitzRNN_gated", reference_name("LipschitzRNN"))
    with pytest.raises(CheckpointError, match=r"named/recorded as a LipschitzRNN model.*E_gate\.weight"):
        load_checkpoint(renamed)
    unnamed = save_state(tmp_path, "LipschitzRNN_gated", "gated")
    with pytest.warns(ReferenceFileWarning, match="alpha is recorded nowhere"):
        model, metadata = load_checkpoint(unnamed, **{k: HP[k] for k in ("beta", "gamma", "eps")})
    assert model.config.arch == "lipschitz-gated" and model.lure_form() is None
    assert metadata["reference"]["hparams"]["alpha"] == {"value": 1.0, "source": "default (not recorded)"}


def test_key_sets_that_identify_no_single_model_are_errors(tmp_path):
    extra = random_state("LipschitzRNN")
    extra["X"] = torch.zeros(2)
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"keys \['B', 'C', 'D.bias', 'D.weight', 'E.bias', 'E.weight', 'X'\]"):
        load_checkpoint(tmp_path / "extra.pt", beta=0.5, gamma=0.1, eps=0.1)
    torch.save(random_state("asymRNN"), tmp_path / "ambiguous.pt")
    with pytest.raises(CheckpointError, match="fit asymRNN and calRNN alike"):
        load_checkpoint(tmp_path / "ambiguous.pt", gamma=0.1, eps=0.1)
    assert load_checkpoint(tmp_path / "ambiguous.pt", model="calRNN").model.config.arch == "cayley"
    mixed = {("module." + k if k.startswith("E") else k): v for k, v in random_state("LipschitzRNN").items()}
    torch.save(mixed, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="DataParallel prefix"):
        load_checkpoint(tmp_path / "mixed.pt", beta=0.5, gamma=0.1, eps=0.1)


def test_ode_solvers_the_toolkit_cannot_run_exactly_are_refused(tmp_path):
    for solver, why in (("dopri5", "adaptive"), ("bosh3", "adaptive"), ("nonsense", "not a torchdiffeq fixed-grid")):
        path = save_state(tmp_path, "LipschitzRNN_ODE", reference_name("LipschitzRNN_ODE", solver=solver))
        with pytest.raises(CheckpointError, match=why):
            load_checkpoint(path)
    path = save_state(tmp_path, "LipschitzRNN_ODE", reference_name("LipschitzRNN_ODE", solver="rk4"))
    model, metadata = load_checkpoint(path, solver="midpoint", alpha=2.0, eps=0.1, task="pmnist")
    assert model.config.discretization == "rk2" and model.config.eps == 0.1
    assert metadata["reference"]["hparams"]["solver"] == {"value": "midpoint", "source": "override"}
    assert metadata["reference"]["hparams"]["beta"]["source"] == "file name"
    assert "alpha" not in metadata["reference"]["hparams"]  # the ODE model has no alpha
    assert metadata["task"]["options"] == {"pixels_per_step": 2, "scale": "raw", "permutation": "reference"}
