"""Loss and accuracy of a model on a split, in batches, without gradients."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


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


def evaluate(model: nn.Module, x: Tensor, y: Tensor, is_classification: bool, batch_size: int = 1000) -> Evaluation:
    """Sample-weighted mean loss and accuracy (None for regression) over (x, y)."""
    if len(x) == 0:
        raise ValueError("no samples to evaluate (empty split)")
    device = next(model.parameters()).device
    criterion = loss_function(is_classification)
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)
            yb = y[start:start + batch_size].to(device)
            out = model(xb)
            total_loss += float(criterion(out, yb)) * len(xb)
            if is_classification:
                correct += int((out.argmax(dim=1) == yb).sum())
    model.train(was_training)
    n = len(x)
    return Evaluation(total_loss / n, correct / n if is_classification else None, n)
