"""A user's module as the model under analysis: the data it fits, recurrent selections that match nothing."""
import numpy as np
import pytest
import torch

from lrnn_analysis.model_under_analysis import ModelUnderAnalysis, as_model_under_analysis
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.robustness import Perturbation, SweepModel, perturb_parameters, sweep
from lrnn_analysis.task import Task
from lrnn_analysis.training import TrainSettings, train_model
from user_module import user_subject


def test_data_file_becomes_a_task(user, digits_task):
    folder, module, task = user
    with pytest.raises(ValueError, match="the model does not run on task digits inputs of shape \\(batch, 64, 1\\)"):
        user_subject(module).check_fits(digits_task)
    with np.load(folder / "mydata.npz") as archive:
        np.testing.assert_array_equal(task.test.x.numpy(), archive["x_test"])
        np.testing.assert_array_equal(task.train.y.numpy(), archive["y_train"])
    assert (task.name, task.input_dim, task.seq_len, task.num_classes, len(task.val)) == ("mydata.npz", 2, 10, 3, 0)
    with pytest.raises(ValueError, match="has no validation split"):
        train_model(build_model(ModelConfig("lipschitz", 2, 4, 3)), task, TrainSettings(epochs=1), torch.device("cpu"), False)
    regression = Task.from_arrays(task.train.x.numpy(), np.ones((240, 2), np.float32), task.test.x.numpy(),
                                  np.zeros((90, 2), np.float32), name="mine")
    assert (regression.output_dim, regression.is_classification) == (2, False)
    with pytest.raises(ValueError, match="returns \\(2, 3\\) on a batch of 2; task mine needs \\(batch, 2\\) outputs"):
        user_subject(module).check_fits(regression)


def test_a_model_reading_out_every_step_does_not_fit_a_task_with_one_target_per_sequence(digits_task):
    # Its sizes match (input 1, 10 classes): only its (batch, T, 10) outputs tell.
    subject = as_model_under_analysis(build_model(ModelConfig("vanilla", 1, 4, 10, readout="all"), seed=0))
    with pytest.raises(ValueError, match="returns \\(2, 64, 10\\) on a batch of 2; task digits needs \\(batch, 10\\) outputs"):
        subject.check_fits(digits_task)
    as_model_under_analysis(build_model(ModelConfig("vanilla", 1, 4, 10), seed=0)).check_fits(digits_task)


# Regression 2: recurrent-only perturbations that perturb nothing.
def test_recurrent_selections_that_match_nothing_are_errors(user, digits_task):
    _, module, task = user
    undeclared = ModelUnderAnalysis.from_module(module, name="mine")
    with pytest.raises(ValueError, match="declares no recurrent parameters"):
        sweep([SweepModel("m", "c", undeclared)], task, {"gaussian-relative": [0.0, 0.5]}, seeds=1,
              recurrent_only=True, progress=False)
    with pytest.raises(ValueError, match="pattern 'M_\\*' matches none of"):
        sweep([SweepModel("m", "c", undeclared)], task, {"gaussian-relative": [0.5]}, seeds=1, recurrent="M_*", progress=False)
    with pytest.raises(ValueError, match="matches none of"):
        ModelUnderAnalysis.from_module(module, recurrent=["rec_*", "weight_hh*"])
    with pytest.raises(ValueError, match="selection is empty"):
        perturb_parameters(dict(module.named_parameters()), Perturbation("gaussian-relative", 0.5), names=[])
    toolkit = ModelUnderAnalysis.from_recurrent_model(build_model(ModelConfig("antisymmetric", 1, 8, 10), seed=0))
    assert toolkit.recurrent_names() == ["M_W"]



def test_a_model_reading_out_the_last_step_does_not_fit_a_task_with_a_target_at_every_step(digits_task):
    """The converse of a per-step readout on one target per sequence: sizes that fit, (batch, 10) outputs for (N, 64) labels."""
    from lrnn_analysis.task import task_from_arrays

    x, y = digits_task.test.x[:6].numpy(), digits_task.test.y[:6].numpy()
    labels = np.tile(y[:, None], (1, 64))
    task = task_from_arrays(x, labels, x, labels, name="steps", num_classes=10)
    subject = as_model_under_analysis(build_model(ModelConfig("lipschitz", 1, 4, 10), seed=0))
    with pytest.raises(ValueError, match="returns \\(2, 10\\) on a batch of 2; task steps needs \\(batch, 64, 10\\) outputs"):
        subject.check_fits(task)
