"""Hessian directions: unit top eigenvectors that drive a sweep."""
import pytest
import torch

from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.robustness import (
    SweepModel,
    sweep,
)
from lrnn_analysis.task import Split, Task


def test_hessian_directions_are_unit_top_eigenvectors_and_drive_a_sweep(digits):
    from lrnn_analysis.hessian import HessianOperator
    from lrnn_analysis.robustness import hessian_directions

    model = build_model(ModelConfig("lipschitz", 1, 4, 10, init_std=3.0), seed=0).double()
    task = Task("digits64", "digits in float64", Split(digits.train.x[:64].double(), digits.train.y[:64]),
                digits.val, Split(digits.test.x[:64].double(), digits.test.y[:64]), 1, 64, 10, 0, 0.1)
    directions = hessian_directions(model, task, k=2, batch_size=64, params=["M_A", "M_W"])
    assert directions.names == ("M_A", "M_W") and directions.vectors.shape == (2, 32)
    dense = HessianOperator(model, torch.nn.CrossEntropyLoss(), (task.train.x, task.train.y), params=["M_A", "M_W"]).to_dense()
    top = torch.linalg.eigvalsh(torch.as_tensor(dense))[-2:].flip(0)
    for vector, value in zip(directions.vectors, top, strict=True):
        assert vector.norm().item() == pytest.approx(1.0, abs=1e-9)
        hv = torch.as_tensor(dense) @ vector
        assert torch.allclose(hv, value * vector, atol=1e-3 * value.abs())
    result = sweep([SweepModel("m", "c", model, directions)], task, {"hessian-direction": [0, 0.5]}, seeds=2, progress=False)
    assert [r["level"] for r in result.rows] == [0.0, 0.0, 0.5, 0.5]
    assert result.rows[2]["loss"] != result.rows[0]["loss"]
    assert {row["seeds"] for row in result.summary} == {2}
    one = hessian_directions(model, task, k=1, batch_size=64, params=["M_A", "M_W"])
    single = sweep([SweepModel("m", "c", model, one)], task, {"hessian-direction": [0, 0.5]}, seeds=3, progress=False)
    assert [r["level"] for r in single.rows] == [0.0, 0.5]  # one eigenvector: nothing random, evaluated once
    assert [(row["seeds"], row["accuracy_ci95"], row["loss_ci95"]) for row in single.summary] == [(1, None, None)] * 2
