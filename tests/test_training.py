"""Training learns, is deterministic given its seed, and trains regression tasks."""
import pytest
import torch

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
