"""`lrnn hessian`: the printed table and JSON, native and PyHessian backends, GGN/Fisher operators and
estimates, a user model's exact Hessian, and data or task options that must not hang or pass unchecked."""
import json
import os

import numpy as np
import pytest
import torch

from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.usermodule import load_user_model
from user_project import model_spec

from .helpers import fails

TASK = {"name": "digits", "seed": 0}


def _fifo(tmp_path, name="fifo"):
    path = tmp_path / name
    os.mkfifo(path)
    return path


def test_hessian_cli_native_and_pyhessian(checkpoints, tmp_path, capsys):
    out = tmp_path / "h.json"
    assert main(["hessian", str(checkpoints["stable"]), "--batch-size", "32", "--top-k", "2", "--trace",
                 "--params", "M_A,M_W", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "lambda_max" in printed and "trace" in printed
    data = json.loads(out.read_text())
    assert data["lambda_max"] >= data["lambda_min"] and data["trace"]["ci_halfwidth"] >= 0
    assert data["operator"]["params"] == ["M_A", "M_W"] and data["seed"] == 0
    assert main(["hessian", str(checkpoints["stable"]), "--batch-size", "32", "--backend", "pyhessian", "--quiet"]) == 0
    assert "PyHessian" in capsys.readouterr().out
    assert main(["hessian", str(checkpoints["stable"]), "--task", "adding", "--quiet"]) == 2
    assert "does not fit task adding" in capsys.readouterr().err
    assert main(["hessian", str(checkpoints["stable"]), "--batch-size", "32", "--trace", "--trace-method", "deflated",
                 "--trace-matvecs", "20", "--json", str(out), "--force", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "deflated, 20 HVPs" in printed and "seed stream [0, 1]" in printed
    assert json.loads(out.read_text())["trace"]["method"] == "deflated"
    assert main(["hessian", str(checkpoints["stable"]), "--trace", "--trace-method", "deflated", "--backend", "pyhessian",
                 "--quiet"]) == 2
    assert "needs backend='native'" in capsys.readouterr().err


def test_hessian_cli_ggn_with_estimates_and_lenient_params(tmp_path, capsys):
    model = build_model(ModelConfig("antisymmetric", 1, 3, 10, eps=0.1, init_std=0.1), seed=0)
    path = save_checkpoint(tmp_path / "anti.safetensors", model, {"task": TASK})
    out = tmp_path / "h.json"
    assert main(["hessian", str(path), "--batch-size", "8", "--operator", "ggn", "--params", "M_A,M_W,D.*",
                 "--estimate", "blocks", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ggn" in printed and "M_W" in printed
    assert "matching nothing in this model: M_A" in printed
    data = json.loads(out.read_text())
    assert data["operator"]["operator"] == "ggn" and data["operator"]["params"] == ["M_W", "D.weight", "D.bias"]
    assert [row["param"] for row in data["blocks"]["rows"]] == ["M_W", "D.weight", "D.bias"]
    assert data["lambda_min"] is None and data["eigen"]["which"] == "LA" and data["frobenius"] is None
    assert main(["hessian", str(path), "--operator", "fisher", "--mc-samples", "2", "--batch-size", "8", "--params", "D.bias",
                 "--quiet"]) == 0
    assert "2 label sample(s)" in capsys.readouterr().out
    assert main(["hessian", str(path), "--estimate", "kfac", "--quiet"]) == 2
    assert "estimates must be among" in capsys.readouterr().err
    assert main(["hessian", str(path), "--params", "nope", "--quiet"]) == 2
    # --rnn-twin on for a model without torch.nn recurrent layers says that nothing ran as a twin
    capsys.readouterr()
    assert main(["hessian", str(path), "--params", "D.bias", "--rnn-twin", "on", "--quiet"]) == 0
    assert "note: rnn_twin=on, but the model has no torch.nn RNN, LSTM or GRU layer" in capsys.readouterr().out


def test_hessian_of_a_user_model_matches_the_exact_hessian(project, tmp_path):
    json_path = tmp_path / "hessian.json"
    # --rnn-twin on: the products run through the unrolled twin of the module's nn.RNN, exact all the same
    assert main(["hessian", "--model", model_spec(project), "--weights", str(project / "rnn.pt"), "--data",
                 str(project / "data.npz"), "--params", "rnn.weight_hh_*", "--top-k", "1", "--batch-size", "64",
                 "--dtype", "float64", "--rnn-twin", "on", "--json", str(json_path), "--quiet"]) == 0
    report = json.loads(json_path.read_text())
    assert report["operator"]["params"] == ["rnn.weight_hh_l0"]
    assert report["operator"]["rnn_twin_layers"] == ["rnn"]
    module = load_user_model(model_spec(project), project / "rnn.pt").module.double()
    data = np.load(project / "data.npz")
    x, y = torch.from_numpy(data["x_train"][:64]).double(), torch.from_numpy(data["y_train"][:64])
    params = dict(module.named_parameters())

    def loss(w):
        out = torch.func.functional_call(module, {**params, "rnn.weight_hh_l0": w.reshape(8, 8)}, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, params["rnn.weight_hh_l0"].detach().reshape(-1)))
    assert report["lambda_max"] == pytest.approx(float(exact[-1]), rel=1e-6)


@pytest.mark.usefixtures("time_limit")
def test_fifo_data_path_recorded_in_a_checkpoint_does_not_hang(tmp_path, capsys):
    fifo = _fifo(tmp_path, "data.npz")
    model = build_model(ModelConfig("lipschitz", 1, 4, 10), seed=0)
    path = save_checkpoint(tmp_path / "s.safetensors", model,
                           {"task": {"name": "smnist", "seed": 0, "options": {"path": str(fifo), "pixels_per_step": 1}}})
    fails(capsys, ["hessian", str(path), "--quiet"], "not a regular file", path=fifo)


@pytest.mark.usefixtures("time_limit")
def test_fifo_data_path_and_idx_member_and_checkpoint_do_not_hang(tmp_path, saved, capsys):
    fifo = _fifo(tmp_path)
    fails(capsys, ["hessian", str(saved), "--task", "smnist", "--data-path", str(fifo), "--quiet"], "not a regular file")
    idx = tmp_path / "idx"
    idx.mkdir()
    os.mkfifo(idx / "train-images-idx3-ubyte")
    fails(capsys, ["hessian", str(saved), "--task", "smnist", "--data-path", str(idx), "--quiet"], "not a regular file")
    fails(capsys, ["info", str(fifo)], "not a file (a FIFO)", path=fifo)


@pytest.mark.usefixtures("time_limit")
@pytest.mark.parametrize("options, needle", [
    ({"length": 10**9}, "length must be an integer in [2, 100000]"),
    ({"length": 1e9}, "length must be an integer"),
    ({"length": "100"}, "length must be an integer"),
    ({"length": 10_000, "n_train": 100_000}, "exceeds"),
    ({"n_val": -1}, "n_val must be an integer"),
])
def test_recorded_task_options_are_bounded_and_typed(tmp_path, capsys, options, needle):
    model = build_model(ModelConfig("lipschitz", 2, 4, 1), seed=0)
    path = save_checkpoint(tmp_path / "a.safetensors", model, {"task": {"name": "adding", "seed": 0, "options": options}})
    fails(capsys, ["hessian", str(path), "--quiet"], needle)


@pytest.mark.usefixtures("time_limit")
@pytest.mark.parametrize("task, needle", [
    ({"name": "smnist", "seed": 0, "options": {"pixels_per_step": 5}}, "must divide 784"),
    ({"name": "smnist", "seed": 0, "options": {"pixels_per_step": "1"}}, "pixels_per_step must be an integer"),
    ({"name": "smnist", "seed": 0, "options": {"path": 5}}, "path must be a string"),
    ({"name": "digits", "seed": -1, "options": {}}, "split seed"),
])
def test_task_option_types(tmp_path, capsys, task, needle):
    path = save_checkpoint(tmp_path / "t.safetensors", build_model(ModelConfig("lipschitz", 1, 4, 10), seed=0), {"task": task})
    fails(capsys, ["hessian", str(path), "--quiet"], needle)


def test_hessian_of_a_language_model_is_that_of_its_mean_per_token_loss(language_project, tmp_path):
    from language_model import load_language_model

    json_path = tmp_path / "lm.json"
    assert main(["hessian", "--model", f"{language_project / 'lm.py'}:build", "--weights", str(language_project / "lm.pt"),
                 "--data", str(language_project / "data.npz"), "--params", "rnn.weight_hh_l1", "--dtype", "float64",
                 "--json", str(json_path), "--quiet"]) == 0
    report = json.loads(json_path.read_text())
    data = np.load(language_project / "data.npz")
    assert report["operator"]["n_scored"] == int(data["mask_train"].sum()) < data["mask_train"].size
    module = load_language_model(language_project).double()
    x, y, mask = (torch.from_numpy(data[key]) for key in ("x_train", "y_train", "mask_train"))
    params = dict(module.named_parameters())

    def loss(w):
        out = torch.func.functional_call(module, {**params, "rnn.weight_hh_l1": w.reshape(32, 8)}, (x,))
        return torch.nn.functional.cross_entropy(out[mask], y[mask])

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, params["rnn.weight_hh_l1"].detach().reshape(-1)))
    assert report["lambda_max"] == pytest.approx(float(exact[-1]), rel=1e-6)
