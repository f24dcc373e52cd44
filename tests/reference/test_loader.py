"""Loading the reference implementation's files: hyper-parameters from the file name, the pickle or
arguments, pixels per step against T, DataParallel wrappers."""
import pytest
import torch

from lrnn_analysis.checkpoints import CheckpointError, load_checkpoint
from lrnn_analysis.reference import (
    ReferenceFileWarning,
)
from reference_files import (
    CASES,
    HP,
    D,
    K,
    N,
    T,
    forget_reference_code,
    random_state,
    reference_forward,
    reference_name,
    save_state,
)


def _reference_state(n=4):
    return {"B": torch.randn(n, n), "C": torch.randn(n, n), "E.weight": torch.randn(n, 1), "E.bias": torch.randn(n),
            "D.weight": torch.randn(10, n), "D.bias": torch.randn(10)}


def test_reference_state_dict_hparams_from_filename_or_arguments(tmp_path):
    name = ("LipschitzRNN_mnist_T_784_units_4_beta_0.75_alpha_1_gamma_0.001_eps_0.03_solver_euler_gclip_0_"
            "optimizer_Adam_seed_1.pkl")
    torch.save(_reference_state(), tmp_path / name)
    model, metadata = load_checkpoint(tmp_path / name)
    assert (model.config.eps, model.config.beta_a, model.config.gamma_w) == (0.03, 0.75, 0.001)
    assert metadata["reference_hparams"]["seed"] == 1
    torch.save({f"module.{k}": v for k, v in _reference_state().items()}, tmp_path / "ref.pt")
    with pytest.raises(CheckpointError, match=r"needs \['beta', 'gamma', 'eps'\]"):
        load_checkpoint(tmp_path / "ref.pt")
    with pytest.warns(UserWarning, match="alpha is recorded nowhere"):
        model, _ = load_checkpoint(tmp_path / "ref.pt", beta=0.5, gamma=0.1, eps=0.2)
    assert (model.config.beta_w, model.config.eps) == (0.5, 0.2)


def test_state_dicts_of_every_model_load_from_their_file_names(tmp_path):
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(2))
    for model_name, solver in CASES:
        path = save_state(tmp_path, model_name, reference_name(model_name, solver=solver), prefix="module.")
        model, metadata = load_checkpoint(path)
        state = {k: v.double() for k, v in random_state(model_name).items()}
        expected = reference_forward(model_name, {k: v.float().double() for k, v in state.items()}, x.double(), solver=solver)
        with torch.no_grad():
            assert float((model(x).double() - expected).abs().max() / expected.abs().max()) < 1e-5
        assert metadata["reference"]["model"] == model_name
        assert metadata["reference"]["file_name"]["model"] == model_name
        assert metadata["task"] == {"name": "smnist", "seed": 0, "options": {"pixels_per_step": 2, "scale": "unit"}}


def test_pixels_per_step_must_match_T(tmp_path):
    path = save_state(tmp_path, "LipschitzRNN", reference_name("LipschitzRNN", steps=784))
    with pytest.raises(CheckpointError, match="T = 784 steps, i.e. 1 pixels per step, but E.weight takes 2 inputs"):
        load_checkpoint(path)


def test_pickled_attributes_win_over_the_file_name(tmp_path, reference_code):
    module = reference_code.RnnModels(D, K, n_units=N, eps=0.25, beta=HP["beta"], gamma=HP["gamma"], alpha=HP["alpha"])
    path = tmp_path / f"{reference_name('LipschitzRNN', eps=0.3)}.pkl"
    torch.save(module, path)
    forget_reference_code(reference_code, tmp_path / "reference_code")
    with pytest.warns(ReferenceFileWarning, match=r"the pickle records eps = 0.25 but the file name says 0.3"):
        model, metadata = load_checkpoint(path)
    assert model.config.eps == 0.25 and metadata["reference"]["hparams"]["eps"]["source"] == "pickle attribute"
    assert any("eps = 0.25" in note for note in metadata["reference"]["notes"])


def test_pickled_data_parallel_wrapper_is_unwrapped(tmp_path, reference_code):
    module = reference_code.RnnModels(D, K, n_units=N, eps=HP["eps"], beta=HP["beta"], gamma=HP["gamma"],
                                      alpha=HP["alpha"], model="asymRNN")
    path = tmp_path / f"{reference_name('asymRNN')}.pkl"
    torch.save(torch.nn.DataParallel(module), path)
    state = {k: v.detach().double() for k, v in module.state_dict().items()}
    x = torch.randn(2, T, D)
    expected = reference_forward("asymRNN", state, x.double())
    forget_reference_code(reference_code, tmp_path / "reference_code")
    model, metadata = load_checkpoint(path)
    with torch.no_grad():
        assert float((model(x).double() - expected).abs().max() / expected.abs().max()) < 1e-5
    assert model.config.arch == "antisymmetric" and metadata["reference"]["hparams"]["gamma"]["source"] == "pickle attribute"
