"""Small curvature cases shared by the estimator tests: a Lipschitz RNN's Hessian as an operator,
with its dense float64 matrix where the test compares against it."""
import torch
from torch import nn

from lrnn_analysis.hessian import HessianOperator
from lrnn_analysis.models import ModelConfig, build_model


def lipschitz_case(loss_fn, outputs=3, n=8, T=12, batch=8, seed=0, dtype="float64"):
    """The operator of ``loss_fn`` on a Lipschitz RNN and random data, and its dense matrix (float64 only)."""
    model = build_model(ModelConfig("lipschitz", 2, n, outputs, eps=0.2), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, T, 2, generator=generator)
    y = torch.randint(0, outputs, (batch,), generator=generator) if outputs > 1 else torch.randn(batch, 1, generator=generator)
    op = HessianOperator(model, loss_fn, (x, y), dtype=dtype)
    return op, op.to_dense().double().numpy() if dtype == "float64" else None


def make_op(seed=0, n=6, T=8):
    """The float64 cross-entropy Hessian of a Lipschitz RNN with n hidden units on 8 random sequences of T steps."""
    model = build_model(ModelConfig("lipschitz", 2, n, 3, eps=0.2), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(8, T, 2, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    return HessianOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64")
