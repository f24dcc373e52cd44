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


def test_per_step_training_minimises_the_per_token_loss_and_reports_perplexity():
    """A zoo model read out at every step (readout "all": D applied to every hidden state)
    trained on masked next-value classes: the per-token loss falls below the uniform predictor's,
    and the metrics name perplexity and bits per token."""
    import math

    import numpy as np

    from lrnn_analysis.task import task_from_arrays

    rng = np.random.default_rng(0)
    series = (rng.integers(0, 4, (200, 1)) + np.arange(9)) % 4
    x = np.eye(4, dtype=np.float32)[series[:, :-1]]
    mask = np.arange(8) < rng.integers(3, 9, (200, 1))
    task = task_from_arrays(x[:120], series[:120, 1:], x[160:], series[160:, 1:], x[120:160], series[120:160, 1:], name="count",
                            mask_train=mask[:120], mask_val=mask[120:160], mask_test=mask[160:])
    model = build_model(ModelConfig("lipschitz", 4, 16, 4, eps=0.5, readout="all"), seed=0)
    result = train_model(model, task, TrainSettings(epochs=10, lr=0.02, batch_size=32), torch.device("cpu"), progress=False)
    metrics = result.metrics
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
    assert metrics["test_bits_per_token"] == pytest.approx(metrics["test_loss"] / math.log(2))
    assert metrics["test_perplexity"] < 4 * 0.75 and result.log[-1]["train_loss"] < result.log[0]["train_loss"]


def test_zoo_models_refuse_token_inputs():
    import numpy as np

    from lrnn_analysis.errors import InputError
    from lrnn_analysis.task import task_from_arrays

    tokens = np.arange(40).reshape(8, 5) % 3
    task = task_from_arrays(tokens, tokens, tokens, tokens, tokens, tokens, name="tokens")
    with pytest.raises(InputError, match="takes float inputs"):
        train_model(build_model(ModelConfig("lipschitz", 1, 4, 3), seed=0), task, TrainSettings(epochs=1), torch.device("cpu"),
                    progress=False)


def test_a_loss_that_is_not_finite_stops_training_with_an_input_error(digits_task):
    """A margin radius so large that the margin logits overflow: refused at the first batch, not a
    model of NaN weights saved (or a traceback from certifying it)."""
    from lrnn_analysis.errors import InputError

    model = build_model(ModelConfig("lipschitz-ren", 1, 4, 10, lipschitz=2.0), seed=0)
    with pytest.raises(InputError, match="^training diverged: the loss is nan in epoch 1"):
        train_model(model, digits_task, TrainSettings(epochs=1, margin_radius=1e308), torch.device("cpu"), progress=False)


def test_the_validation_split_is_run_once_per_epoch_and_its_last_result_is_the_metrics(digits_task, monkeypatch):
    """The last epoch's validation is of the model returned: the final metrics reuse it rather than
    running the split again."""
    from lrnn_analysis import training

    evaluated = []
    original = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda model, x, *a, **k: evaluated.append(x) or original(model, x, *a, **k))
    model = build_model(ModelConfig("lipschitz", 1, 8, 10, eps=0.1), seed=0)
    result = train_model(model, digits_task, TrainSettings(epochs=2, seed=0), torch.device("cpu"), progress=False)
    assert sum(x is digits_task.val.x for x in evaluated) == 2 and sum(x is digits_task.test.x for x in evaluated) == 1
    for key in ("loss", "accuracy"):
        assert result.metrics[f"val_{key}"] == result.log[-1][f"val_{key}"]
    again = training.evaluate(model, digits_task.val.x, digits_task.val.y)
    assert result.metrics["val_loss"] == pytest.approx(again.loss, rel=1e-12)
