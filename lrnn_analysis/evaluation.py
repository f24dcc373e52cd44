"""Loss and metrics of a model on a split, in batches, without gradients.

What is scored comes from the targets (:class:`~lrnn_analysis.objective.Objective`): one output
per sequence (cross-entropy and accuracy, or mse) or one per step (per-token cross-entropy with
token accuracy, perplexity and bits per token, or per-step mse). Every mean is over the scored
targets — samples, or the unmasked steps of all sequences — so batches are weighted by their
counts of scored targets, not by their samples.

No metric is computed from non-finite outputs: a model whose outputs hold NaN or inf is an
``InputError`` naming it and counting them (:class:`NonFiniteOutputs`), never a NaN loss or an
accuracy taken from the argmax of NaNs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import InputError, UserCodeError, first_line
from .objective import Objective, Totals

__all__ = ["Evaluation", "NonFiniteOutputs", "evaluate"]


@dataclass(frozen=True)
class Evaluation:
    """``loss``: the mean loss over the ``count`` scored targets of ``n`` samples; ``accuracy``:
    the fraction of scored targets predicted (per token where per step; None for regression);
    ``metrics``: every metric of the ``objective`` (:meth:`Objective.metrics`), among them its
    headline ``metric`` (accuracy, perplexity or mse) whose value is ``value``."""

    loss: float
    accuracy: float | None
    n: int
    count: int
    metrics: dict[str, float | None]
    objective: Objective

    @property
    def metric(self) -> str:
        return self.objective.headline

    @property
    def value(self) -> float:
        value = self.metrics[self.metric]
        assert value is not None  # a headline metric always has a value
        return value

    @classmethod
    def of_totals(cls, totals: Totals, n: int, objective: Objective) -> Evaluation:
        """The evaluation of ``n`` samples whose scored targets add up to ``totals``."""
        metrics = objective.metrics(totals)
        return cls(totals.loss_sum / totals.count, metrics.get("token_accuracy", metrics.get("accuracy")), n,
                   totals.count, metrics, objective)

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective.name, "metric": self.metric, "loss": self.loss, "accuracy": self.accuracy,
                "n": self.n, "count": self.count, **self.metrics}


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


def evaluate(model: nn.Module, x: Tensor, y: Tensor, objective: Objective | None = None, batch_size: int = 1000,
             name: str | None = None) -> Evaluation:
    """Loss and metrics over (x, y), scored by ``objective`` (default: the one ``y`` means,
    :meth:`Objective.of_targets`).

    Outputs that do not go with the targets, and non-finite outputs, raise ``InputError`` naming
    the model (``name``, default its class); the forward of a module that is not one of the
    toolkit's architectures raising is a ``UserCodeError``."""
    from .models import RecurrentModel

    name = name or type(model).__name__
    if len(x) == 0:
        raise InputError(f"{name}: no samples to evaluate (empty split)")
    if objective is not None and not isinstance(objective, Objective):  # the is_classification flag it took before
        raise TypeError(f"objective must be an Objective or None (from the targets), got {type(objective).__name__}")
    objective = objective or Objective.of_targets(y)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = Totals(0.0, 0 if objective.classification else None, 0)
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
                objective.check_outputs(out, yb, name)
                counts.add(out)
                if not (counts.nan or counts.inf):
                    totals = totals + objective.totals(out, yb)
    finally:
        model.train(was_training)
    counts.check(name, len(x))
    return Evaluation.of_totals(totals, len(x), objective)
