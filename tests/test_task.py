"""A task's splits: batches; per-step targets, token inputs and masks from the user's arrays, the
shapes that could mean two things refused, and masked steps that change no number."""
import math
import re

import numpy as np
import pytest
import torch

from language_model import StepModel, token_sequences
from lrnn_analysis.errors import InputError
from lrnn_analysis.evaluation import evaluate
from lrnn_analysis.hessian import HessianOperator, eigenvalues, trace
from lrnn_analysis.objective import IGNORE_INDEX
from lrnn_analysis.robustness import SweepModel, sweep
from lrnn_analysis.task import task_from_arrays


def test_split_batches_are_consecutive_and_counted(digits_task):
    split = digits_task.test
    all_batches = split.batches(100)
    assert [len(x) for x, _ in all_batches] == [100, 100, 100, len(split) - 300]
    assert torch.equal(torch.cat([x for x, _ in all_batches]), split.x)
    assert len(split.batches(100, count=2)) == 2 and split.batches(100, count=2)[1][1].shape == (100,)


def _float_steps(n=6, steps=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, steps, 2)).astype(np.float32)


def test_token_inputs_and_masked_per_step_labels_make_a_per_step_classification_task():
    x, y, mask = token_sequences(np.random.default_rng(0), 8)
    task = task_from_arrays(x, y, x, y, name="lm", mask_train=mask, mask_test=mask)
    assert (task.input_kind, task.per_step, task.vocab_size, task.num_classes) == ("tokens", True, int(x.max()) + 1, int(y[mask].max()) + 1)
    assert task.objective.name == "per-step classification" and task.objective.headline == "perplexity"
    assert task.train.x.dtype == torch.int64 and torch.equal(task.train.y == IGNORE_INDEX, torch.from_numpy(~mask))
    assert torch.equal(task.train.y[torch.from_numpy(mask)], torch.from_numpy(y[mask]))
    assert task_from_arrays(x, y, x, y, name="lm", vocab_size=40, mask_train=mask, mask_test=mask).vocab_size == 40
    regression = task_from_arrays(_float_steps(), _float_steps(), _float_steps(), _float_steps(), name="steps")
    assert regression.per_step and regression.objective.name == "per-step regression" and regression.output_dim == 2


@pytest.mark.parametrize("change,message", [
    (dict(y_train=np.zeros((6, 5, 1), np.int64)), "y_train: integer targets of shape (6, 5, 1): per-step regression targets "
                                                  "(N, T, k) must be floating point"),
    (dict(y_train=np.zeros((6, 5), np.float32)), "y_train: floating-point targets of shape (6, 5) have one value per step of the "
                                                 "5-step inputs: per-step regression targets need shape (N, T, k)"),
    (dict(y_train=np.zeros((6, 4), np.int64)), "y_train: per-step class labels of shape (6, 4) for inputs of 5 steps; expected (N, 5)"),
    (dict(x_train=np.zeros((6, 5), np.float32)), "x_train: expected shape (N, T, D), got (6, 5) (token ids (N, T) must be integers)"),
    (dict(x_train=np.zeros((6, 5, 2), np.int64)), "x_train: integer inputs are token ids of shape (N, T)"),
    (dict(mask_train=np.ones((6, 5), bool), y_train=np.zeros(6, np.int64)), "mask_train: a mask marks the scored steps of per-step"),
    (dict(mask_train=np.ones((6, 5), np.int64)), "mask_train: expected a boolean mask of shape (6, 5)"),
    (dict(mask_train=np.arange(30).reshape(6, 5) >= 5), "mask_train: sequence 0 has every step masked"),
    (dict(y_train=np.full((6, 5), -1, np.int64), mask_train=np.ones((6, 5), bool)), "y_train: class labels must be >= 0, found -1"),
    (dict(x_train=np.full((6, 5), 3, np.int64), vocab_size=3), "x_train: token id 3 is >= vocab_size = 3"),
    (dict(mask_train=np.zeros((6, 5), bool)), "mask_train: sequence 0 has every step masked"),
    (dict(x_train=np.zeros((6, 5, 2), np.float32), y_train=np.zeros((6, 5, 1), np.float32), mask_train=np.zeros((6, 5), bool)),
     "mask_train: sequence 0 has every step masked"),
])
def test_shapes_that_could_mean_two_things_are_refused_naming_what_is_expected(change, message):
    arrays = dict(x_train=np.zeros((6, 5), np.int64), y_train=np.zeros((6, 5), np.int64),
                  x_test=np.zeros((6, 5), np.int64), y_test=np.zeros((6, 5), np.int64))
    with pytest.raises(InputError, match="^" + re.escape(message)):
        task_from_arrays(**{**arrays, **change}, name="mine")


def test_a_fully_masked_sequence_is_an_error():
    x, y, mask = token_sequences(np.random.default_rng(1), 4)
    test_mask = mask.copy()
    mask[2] = False
    with pytest.raises(InputError, match="^mask_train: sequence 2 has every step masked"):
        task_from_arrays(x, y, x, y, name="lm", mask_train=mask, mask_test=test_mask)


def test_zoo_models_refuse_token_inputs_with_a_reason():
    x, y, mask = token_sequences(np.random.default_rng(2), 4)
    task = task_from_arrays(x, y, x, y, name="lm", mask_train=mask, mask_test=mask)
    with pytest.raises(InputError, match=r"takes float inputs \(N, T, 3\); task lm gives integer token ids \(N, T\)"):
        task.check_fits(3, 12, "model")


def test_changing_padded_inputs_and_targets_changes_no_number():
    """Trailing padding (inputs and targets at masked steps) enters no loss, no λ_max or trace and
    no robustness row, here redrawn at random between two otherwise equal tasks."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 6, 2))
    y = rng.integers(0, 3, (10, 6))
    mask = np.arange(6)[None] < rng.integers(1, 7, 10)[:, None]
    other_x, other_y = x.copy(), y.copy()
    other_x[~mask] = rng.standard_normal((int((~mask).sum()), 2)) * 100
    other_y[~mask] = rng.integers(-5, 50, int((~mask).sum()))
    numbers = []
    for xs, ys in ((x, y), (other_x, other_y)):
        task = task_from_arrays(xs, ys, xs, ys, name="padded", mask_train=mask, mask_test=mask, num_classes=3)
        model = StepModel(outputs=3)
        op = HessianOperator(model, task.objective.loss_fn(), task.train.batches(4), dtype=torch.float64)
        found = sweep([SweepModel("m", "memory", model)], task, {"gaussian": [0.0, 0.5], "gaussian-relative": [0.1]}, seeds=2,
                      progress=False)
        numbers.append((evaluate(model, task.test.x, task.test.y).metrics, float(eigenvalues(op, k=1, seed=0).values[0]),
                        trace(op, max_matvecs=20, seed=0).estimate, [(r["value"], r["loss"], r["accuracy"]) for r in found.rows]))
    assert numbers[0] == numbers[1]
    assert math.isfinite(numbers[0][1]) and numbers[0][0]["perplexity"] > 1
