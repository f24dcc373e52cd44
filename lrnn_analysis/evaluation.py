"""Loss and accuracy of a model on a split, in batches, without gradients.

No metric is computed from non-finite outputs: a model whose outputs hold NaN or inf is an
``InputError`` naming it and counting them (:class:`NonFiniteOutputs`), never a NaN loss or an
accuracy taken from the argmax of NaNs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .errors import InputError, UserCodeError, first_line

__all__ = ["Evaluation", "NonFiniteOutputs", "evaluate", "loss_function"]


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def loss_function(is_classification: bool) -> nn.Module:
    """Cross-entropy for classification, mean squared error for regression."""
    return nn.CrossEntropyLoss() if is_classification else nn.MSELoss()


class NonFiniteOutputs:
    """Counts of NaN and inf among a model's outputs, accumulated batch by batch."""

    def __init__(self) -> None:
        self.nan = self.inf = self.total = 0

    def add(self, outputs: Tensor) -> None:
        self.nan += int(torch.isnan(outputs).sum())
        self.inf += int(torch.isinf(outputs).sum())
        self.total += outputs.numel()

    def check(self, name: str, n: int) -> None:
        """Raise ``InputError`` naming the model ``name`` if any output counted was not finite."""
        if self.nan or self.inf:
            raise InputError(f"{name}: {self.nan} NaN and {self.inf} inf among its {self.total} outputs on {n} samples; "
                             "no loss or accuracy is computed from non-finite outputs")


def evaluate(model: nn.Module, x: Tensor, y: Tensor, is_classification: bool, batch_size: int = 1000,
             name: str | None = None) -> Evaluation:
    """Sample-weighted mean loss and accuracy (None for regression) over (x, y).

    Non-finite outputs raise ``InputError`` naming the model (``name``, default its class); the
    forward of a module that is not one of the toolkit's architectures raising is a
    ``UserCodeError``."""
    from .models import RecurrentModel

    name = name or type(model).__name__
    if len(x) == 0:
        raise InputError(f"{name}: no samples to evaluate (empty split)")
    device = next(model.parameters()).device
    criterion = loss_function(is_classification)
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    counts = NonFiniteOutputs()
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = x[start:start + batch_size].to(device)
                yb = y[start:start + batch_size].to(device)
                try:
                    out = model(xb)
                except Exception as error:
                    if isinstance(model, RecurrentModel):
                        raise
                    raise UserCodeError(f"{name}: forward raised {type(error).__name__}: {first_line(error)}") from error
                counts.add(out)
                total_loss += float(criterion(out, yb)) * len(xb)
                if is_classification:
                    correct += int((out.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    n = len(x)
    counts.check(name, n)
    return Evaluation(total_loss / n, correct / n if is_classification else None, n)
