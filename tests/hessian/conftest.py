"""Fixtures of the curvature tests: small Hessians with their dense matrices, a model and a batch."""
import pytest
import torch
from torch import nn

from lrnn_analysis.models import ModelConfig, build_model

from .cases import lipschitz_case, make_op


@pytest.fixture(scope="module")
def ce():
    """A Lipschitz RNN's cross-entropy Hessian (n = 8) and its dense matrix."""
    return lipschitz_case(nn.CrossEntropyLoss())


@pytest.fixture(scope="module")
def case():
    """make_op()'s Hessian (n = 6) and its dense matrix."""
    op = make_op()
    return op, op.to_dense().numpy()


@pytest.fixture(scope="module")
def model_and_batch():
    """A Lipschitz RNN (2 inputs, 6 units, 3 classes) and 9 random labelled sequences of 10 steps."""
    model = build_model(ModelConfig("lipschitz", 2, 6, 3, eps=0.2), seed=0)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 10, 2, generator=generator), torch.randint(0, 3, (9,), generator=generator)
    return model, x, y
