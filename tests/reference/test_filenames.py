"""File names of the reference implementation's runs, parsed."""
import pytest

from lrnn_analysis.checkpoints import CheckpointError, load_checkpoint
from lrnn_analysis.errors import InputError
from lrnn_analysis.reference import (
    REFERENCE_MODELS,
    parse_reference_filename,
)
from reference_files import N, reference_name, save_state


def test_parse_every_model_name():
    for model in REFERENCE_MODELS:
        parsed = parse_reference_filename(f"runs/{reference_name(model, task='pmnist', solver='midpoint')}.pkl")
        assert parsed == {"model": model, "task": "pmnist", "T": 392, "units": N, "beta": 0.7, "alpha": 0.6,
                          "gamma": 0.05, "eps": 0.3, "solver": "midpoint", "gclip": 0.0, "optimizer": "Adam", "seed": 1}
    loss = parse_reference_filename(reference_name("LipschitzRNN", gamma_key="gamma_A") + "_loss.pkl")
    assert loss["gamma"] == 0.05 and loss["model"] == "LipschitzRNN"
    old = parse_reference_filename("LipschitzRNN_pmnist_T784_units64_beta0.7_gamma0.01_eps0.05_init6_init6_seed2.pkl")
    assert (old["task"], old["T"], old["units"], old["beta"], old["gamma"], old["eps"], old["seed"]) == (
        "pmnist", 784, 64, 0.7, 0.01, 0.05, 2)
    assert parse_reference_filename("weights.pt") == {}
    for bad in ("LipschitzRNN_mnist_T_1.5_units_8.pkl", "LipschitzRNN_mnist_units_128.9.pkl", "LipschitzRNN_mnist_eps_nan.pkl"):
        with pytest.raises(ValueError, match="which is not a"):
            parse_reference_filename(bad)
    adams = parse_reference_filename(reference_name("LipschitzRNN_ODE", solver="fixed_adams"))
    assert adams["solver"] == "fixed_adams" and adams["gclip"] == 0
    with pytest.raises(ValueError, match="gives eps twice"):
        parse_reference_filename("LipschitzRNN_mnist_eps_0.1_eps_0.2.pkl")


@pytest.mark.parametrize("field,token", [("T", "T_0"), ("units", "units_0"), ("T", "T-3")])
def test_a_count_below_one_in_a_reference_file_name_is_one_line(tmp_path, field, token):
    name = reference_name("LipschitzRNN").replace("T_392", token) if field == "T" else reference_name("LipschitzRNN").replace(f"units_{N}", token)
    with pytest.raises(InputError, match=f"the name gives {field} = -?[03]; it must be at least 1"):
        parse_reference_filename(f"{name}.pkl")
    path = save_state(tmp_path, "LipschitzRNN", name)
    with pytest.raises(CheckpointError, match=f"{field} = -?[03]"):
        load_checkpoint(path)
