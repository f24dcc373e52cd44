import math

import pytest
import torch

from lrnn_analysis.errors import InputError
from lrnn_analysis.objective import IGNORE_INDEX, Objective, apply_mask


def test_uniform_predictor_has_perplexity_of_the_vocabulary():
    vocab = 27
    y = torch.randint(0, vocab, (5, 11), generator=torch.Generator().manual_seed(0))
    objective = Objective.of_targets(y)
    metrics = objective.metrics(objective.totals(torch.zeros(5, 11, vocab), y))
    assert metrics["perplexity"] == pytest.approx(vocab, rel=1e-12)
    assert metrics["bits_per_token"] == pytest.approx(math.log2(vocab), rel=1e-12)


def test_masked_steps_change_no_number():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    outputs = torch.randn(3, 6, 4, generator=g)
    objective = Objective(True, True)
    first = apply_mask(y, mask)
    other_y = y.clone()
    other_y[~mask] = (other_y[~mask] + 1) % 4
    other_outputs = outputs.clone()
    other_outputs[~mask] = torch.randn(int((~mask).sum()), 4, generator=g)
    a = objective.metrics(objective.totals(outputs, first))
    b = objective.metrics(objective.totals(other_outputs, apply_mask(other_y, mask)))
    assert a == b
    assert objective.count(first) == int(mask.sum())
    assert float(objective.loss_fn()(outputs.reshape(-1, 4), first.reshape(-1))) == pytest.approx(a["loss"], rel=1e-6)
    assert int((first == IGNORE_INDEX).sum()) == int((~mask).sum())


def test_step_regression_mask_and_loss():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    masked = apply_mask(y, mask)
    outputs = torch.randn(2, 5, 3, generator=g)
    objective = Objective.of_targets(masked)
    assert objective.per_step and not objective.classification
    expected = ((outputs - y) ** 2)[mask].mean()
    assert float(objective.loss_fn()(outputs, masked)) == pytest.approx(float(expected), rel=1e-6)
    assert objective.metrics(objective.totals(outputs, masked))["mse"] == pytest.approx(float(expected), rel=1e-6)


def test_fully_masked_sequence_is_an_error():
    y = torch.zeros(2, 3, dtype=torch.int64)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(InputError, match="sequence 1 has every step masked"):
        apply_mask(y, mask)


def test_last_step_outputs_for_per_step_targets_are_refused():
    y = torch.zeros(4, 7, dtype=torch.int64)
    with pytest.raises(InputError, match="one output per sequence"):
        Objective.of_targets(y).check_outputs(torch.zeros(4, 10), y, "model")
