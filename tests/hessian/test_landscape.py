"""Loss landscapes through the trained parameters: the evaluated loss at zero, filter-normalised
directions, curvature along eigenvectors."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from lrnn_analysis.evaluation import evaluate
from lrnn_analysis.hessian import (
    HessianOperator,
    eigenvalues,
    eigenvector_directions,
    landscape,
    random_directions,
)
from lrnn_analysis.models import build_model


def test_landscape_at_zero_is_the_evaluated_loss_and_model_is_unchanged(model_and_batch):
    model, x, y = model_and_batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = landscape(model, nn.CrossEntropyLoss(), [(x[:5], y[:5]), (x[5:], y[5:])], "random",
                       (np.linspace(-1, 1, 3), np.linspace(-0.5, 0.5, 5)), seed=4)
    assert result.loss.shape == (3, 5) and result.accuracy.shape == (3, 5) and result.seed == 4
    reference = evaluate(model, x, y)
    assert result.loss[1, 2] == pytest.approx(reference.loss, rel=1e-6)
    assert result.accuracy[1, 2] == pytest.approx(reference.accuracy)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    json.dumps(result.to_dict(), allow_nan=False)


def test_landscape_of_per_step_targets_is_the_per_token_loss_and_perplexity():
    from language_model import StepModel
    from lrnn_analysis.objective import Objective, apply_mask

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 5, 2, generator=g), torch.randint(0, 3, (6, 5), generator=g)
    y = apply_mask(y, torch.arange(5)[None] < torch.tensor([5, 1, 2, 5, 3, 4])[:, None])
    model = StepModel(outputs=3)
    result = landscape(model, Objective(True, True).loss_fn(), [(x[:2], y[:2]), (x[2:], y[2:])], "random", np.linspace(-1, 1, 3),
                       seed=0)
    reference = evaluate(model, x, y)
    assert result.metric == "perplexity" and result.value[1] == pytest.approx(reference.value, rel=1e-6)
    assert result.loss[1] == pytest.approx(reference.loss, rel=1e-6) and result.accuracy[1] == pytest.approx(reference.accuracy)


def test_filter_normalised_directions_match_row_norms(model_and_batch):
    model, _, _ = model_and_batch
    first, second = random_directions(model, n=2, seed=0)
    for name, weight in model.named_parameters():
        d = first[name]
        if weight.ndim >= 2:
            torch.testing.assert_close(d.norm(dim=1), weight.detach().norm(dim=1))
        else:
            torch.testing.assert_close(d.norm(), weight.detach().norm())
    assert not torch.equal(first["M_A"], second["M_A"])
    assert torch.equal(random_directions(model, n=1, seed=0)[0]["M_A"], first["M_A"])


def test_landscape_curvature_along_eigenvectors_is_the_eigenvalue(model_and_batch):
    model, x, y = model_and_batch
    model64 = build_model(model.config).double()
    model64.load_state_dict(model.state_dict())
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model64, loss_fn, (x.double(), y), params="M_*")
    pairs = eigenvalues(op, k=1, which="BE", tol=1e-8)
    h = 1e-3
    line = landscape(model64, loss_fn, (x.double(), y), eigenvector_directions(op, pairs, (0,)), [-h, 0.0, h])
    curvature = (line.loss[0] - 2 * line.loss[1] + line.loss[2]) / h**2
    assert curvature == pytest.approx(pairs.values[0], rel=1e-3)
    plane = landscape(model64, loss_fn, (x.double(), y), eigenvector_directions(op, pairs, (0, 1)), [-h, 0.0, h])
    assert plane.params == ("M_A", "M_W") and plane.loss.shape == (3, 3)
    curvature_min = (plane.loss[1, 0] - 2 * plane.loss[1, 1] + plane.loss[1, 2]) / h**2
    assert curvature_min == pytest.approx(pairs.values[1], rel=1e-3)
