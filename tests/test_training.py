"""Training learns; the CLI trains, saves, reports and rejects bad options with exit code 2."""
import json

import pytest
import torch

from lrnn_analysis.checkpoints import load_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.training import TrainSettings, train_model


def test_short_training_learns_digits(digits_task):
    model = build_model(ModelConfig("lipschitz", 1, 32, 10, eps=0.1), seed=0)
    result = train_model(model, digits_task, TrainSettings(epochs=12, seed=0), torch.device("cpu"), progress=False)
    assert result.metrics["test_accuracy"] > 0.5  # chance is 0.1
    assert len(result.log) == 12
    assert {"alpha_A", "mu2_A", "norm_A", "alpha_W", "mu2_W", "norm_W"} <= set(result.log[0])
    assert result.log[-1]["alpha_A"] <= result.log[-1]["mu2_A"] <= result.log[-1]["norm_A"]
    assert result.log[-1]["lr"] == pytest.approx(0.003)  # decayed after 75% of the epochs


def test_training_is_deterministic_given_seed(digits_task):
    def run():
        model = build_model(ModelConfig("antisymmetric", 1, 8, 10), seed=3)
        train_model(model, digits_task, TrainSettings(epochs=1, seed=3), torch.device("cpu"), progress=False)
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_regression_task_trains():
    task = load_task("adding", seed=0, length=10, n_train=256, n_val=64, n_test=64)
    model = build_model(ModelConfig("lipschitz", 2, 16, 1, eps=0.5), seed=0)
    result = train_model(model, task, TrainSettings(epochs=15, lr=0.01), torch.device("cpu"), progress=False)
    assert result.metrics["test_accuracy"] is None
    assert result.metrics["test_loss"] < 0.167  # predicting the mean gives Var(a + b) = 1/6


def test_cli_train_and_info(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    code = main(["train", "--task", "digits", "--arch", "node", "--hidden", "8", "--epochs", "2",
                 "--seed", "4", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "spectra: alpha(W)" in printed and str(out) in printed
    model, metadata = load_checkpoint(out)
    assert model.config.arch == "node" and model.config.eps == 0.1
    assert metadata["task"] == {"name": "digits", "seed": 0, "options": {}}
    assert metadata["training"]["seed"] == 4 and len(metadata["log"]) == 2
    assert metadata["environment"]["device"] == "cpu" and "torch" in metadata["environment"]
    assert metadata["command"].startswith("lrnn train --task digits")
    assert main(["info", str(out)]) == 0
    assert "alpha_W" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["hidden"] == 8


@pytest.mark.parametrize("argv,message", [
    (["--eps", "-1"], "argument --eps: must be a finite number in (0, inf]"),
    (["--discretization", "rk4"], "runs with"),
    (["--task", "smnist", "--data-path", "/nonexistent.npz"], "not found"),
])
def test_cli_bad_options_exit_2_with_one_line(tmp_path, capsys, argv, message):
    base = ["train", "--task", "digits", "--epochs", "1", "--hidden", "4", "--out", str(tmp_path / "x.safetensors"), "--quiet"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_usage_errors_exit_2(capsys):
    for argv in (["train", "--task", "digits", "--arch", "lstm", "--out", "x"], ["train", "--task", "digits"],
                 ["info"], ["nonsense"]):
        assert main(argv) == 2
        assert len(capsys.readouterr().err.splitlines()) == 1
