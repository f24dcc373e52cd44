"""What a model is scored on: its loss and metrics, for one output per sequence or one per step.

Shapes (B samples, T steps, C classes, k regression targets):

============================  =================  ==========================  ==================================
objective                     model outputs      targets ``y``               metrics
============================  =================  ==========================  ==================================
classification                (B, C) logits      int64 (B,)                  accuracy
per-step classification       (B, T, C) logits   int64 (B, T)                token accuracy, perplexity, bits
regression                    (B, k)             float (B, k)                mse
per-step regression           (B, T, k)          float (B, T, k)             mse
============================  =================  ==========================  ==================================

A step without a target (padding of a variable-length sequence) is ``IGNORE_INDEX`` in integer
targets and a row of NaN in float targets; masks given by the user are turned into these
markers once, where data is loaded (:func:`apply_mask`). Every loss is the mean over the scored
targets (tokens, or samples for one output per sequence): per-token cross-entropy
ℓ = −(1/M) Σ_{(i,t) scored} log softmax(f_it)[y_it], per-step MSE ℓ = (1/(M k)) Σ ‖f_it − y_it‖².
Perplexity is exp(ℓ) and bits per token ℓ / ln 2 (bits per character on a character task).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import InputError

__all__ = ["IGNORE_INDEX", "Objective", "StepMSELoss", "TokenCrossEntropyLoss", "Totals", "apply_mask", "scored_count",
           "scored_steps"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Totals:
    """Sums over scored targets, added batch by batch: loss sum, correct predictions, count."""

    loss_sum: float
    correct: int | None
    count: int

    def __add__(self, other: Totals) -> Totals:
        correct = None if self.correct is None or other.correct is None else self.correct + other.correct
        return Totals(self.loss_sum + other.loss_sum, correct, self.count + other.count)


@dataclass(frozen=True)
class Objective:
    """The loss and metrics of a task (module docstring)."""

    classification: bool
    per_step: bool

    @classmethod
    def of_targets(cls, y: Tensor) -> Objective:
        """The objective that targets of this shape and dtype mean (batch dimension first)."""
        if y.dtype in (torch.int64, torch.int32):
            if y.ndim not in (1, 2):
                raise InputError(f"integer class targets must have shape (N,) or (N, T), got {tuple(y.shape)}")
            return cls(True, y.ndim == 2)
        if y.is_floating_point():
            if y.ndim not in (2, 3):
                raise InputError(f"float regression targets must have shape (N, k) or (N, T, k), got {tuple(y.shape)}")
            return cls(False, y.ndim == 3)
        raise InputError(f"targets must be integer classes or float regression targets, got {y.dtype}")

    @property
    def name(self) -> str:
        kind = "classification" if self.classification else "regression"
        return f"per-step {kind}" if self.per_step else kind

    @property
    def loss_name(self) -> str:
        """What the loss is, for tables and reports."""
        if self.classification:
            return "per-token cross-entropy" if self.per_step else "cross-entropy"
        return "per-step mse" if self.per_step else "mse"

    @property
    def headline(self) -> str:
        """The metric tables, figures and gates name: accuracy, perplexity (per-step
        classification) or mse."""
        if self.classification:
            return "perplexity" if self.per_step else "accuracy"
        return "mse"

    @staticmethod
    def worsening_of(metric: str, clean: float, value: float) -> float:
        """How much worse ``value`` of the metric named ``metric`` is than ``clean``, in its units:
        a fall of accuracy, a rise of any other (perplexity, mse, loss); negative when it improved."""
        return clean - value if metric == "accuracy" else value - clean

    def loss_fn(self) -> nn.Module:
        """The loss as a module, mean over scored targets (module docstring)."""
        if self.classification:
            return TokenCrossEntropyLoss() if self.per_step else nn.CrossEntropyLoss()
        return StepMSELoss() if self.per_step else nn.MSELoss()

    def check_outputs(self, outputs: Tensor, y: Tensor, where: str) -> None:
        """Raise ``InputError`` unless model outputs of this shape go with targets ``y``."""
        want = y.ndim + 1 if self.classification else y.ndim
        if outputs.ndim != want or outputs.shape[:want - 1] != y.shape[:want - 1]:
            expected = "(B, T, C) logits" if self.per_step and self.classification else (
                "(B, C) logits" if self.classification else ("(B, T, k)" if self.per_step else "(B, k)"))
            raise InputError(f"{where}: outputs of shape {tuple(outputs.shape)} for {self.name} targets of shape "
                             f"{tuple(y.shape)}; expected {expected}"
                             + (" (a model with one output per sequence cannot be scored per step)"
                                if self.per_step and outputs.ndim == y.ndim - (0 if self.classification else 1) else ""))
        if not self.classification and outputs.shape[-1] != y.shape[-1]:
            raise InputError(f"{where}: {outputs.shape[-1]} outputs per {'step' if self.per_step else 'sample'} "
                             f"for {y.shape[-1]} regression targets")

    def flatten(self, outputs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs (M, C or k) and targets (M,) or (M, k) of the M scored targets."""
        if not self.per_step:
            return outputs, y
        keep = scored_steps(y)
        return outputs[keep], y[keep]

    def count(self, y: Tensor) -> int:
        """Number of scored targets in ``y`` (samples, or unmasked steps)."""
        if not self.per_step:
            return int(y.shape[0])
        return int(scored_steps(y).sum())

    def totals(self, outputs: Tensor, y: Tensor) -> Totals:
        """Loss sum, correct predictions (classification) and count over the scored targets."""
        f, t = self.flatten(outputs, y)
        if self.classification:
            loss_sum = float(nn.functional.cross_entropy(f.double(), t, reduction="sum"))
            return Totals(loss_sum, int((f.argmax(dim=-1) == t).sum()), len(t))
        loss_sum = float(((f.double() - t.double()) ** 2).mean(dim=-1).sum())
        return Totals(loss_sum, None, len(t))

    def metrics(self, totals: Totals) -> dict[str, float | None]:
        """Loss and metrics from accumulated totals; per-step classification adds perplexity and
        bits per token. Raises ``InputError`` when nothing was scored."""
        if totals.count == 0:
            raise InputError("no scored targets: every step is masked")
        loss = totals.loss_sum / totals.count
        if not self.classification:
            return {"loss": loss, "mse": loss}
        accuracy = totals.correct / totals.count if totals.correct is not None else None
        if not self.per_step:
            return {"loss": loss, "accuracy": accuracy}
        return {"loss": loss, "token_accuracy": accuracy, "perplexity": math.exp(min(loss, 700.0)),
                "bits_per_token": loss / math.log(2)}

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.name, "loss": self.loss_name, "metric": self.headline}


class TokenCrossEntropyLoss(nn.CrossEntropyLoss):
    """Per-token cross-entropy of (B, T, C) logits against (B, T) targets: the mean over the
    tokens that are not ``IGNORE_INDEX`` (module docstring)."""

    def __init__(self) -> None:
        super().__init__(ignore_index=IGNORE_INDEX)

    def forward(self, outputs: Tensor, y: Tensor) -> Tensor:
        y = y.reshape(-1)
        if not bool((y != IGNORE_INDEX).any()):
            raise InputError("no scored targets: every step is masked")
        return super().forward(outputs.reshape(-1, outputs.shape[-1]), y)


class StepMSELoss(nn.Module):
    """Mean squared error over the (B, T, k) targets whose row is not NaN (module docstring)."""

    def forward(self, outputs: Tensor, y: Tensor) -> Tensor:
        keep = scored_steps(y)
        if not bool(keep.any()):
            raise InputError("no scored targets: every step is masked")
        return nn.functional.mse_loss(outputs[keep], y[keep])


def apply_mask(y: Tensor, mask: Tensor | None) -> Tensor:
    """Per-step targets with the steps where ``mask`` (N, T) is False marked as unscored;
    a sequence whose every step is masked is an error."""
    if mask is None:
        return y
    if mask.dtype != torch.bool or mask.shape != y.shape[:2] or y.ndim < 2:
        raise InputError(f"a mask must be boolean of shape (N, T) matching per-step targets {tuple(y.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        raise InputError(f"sequence {int(empty.nonzero()[0])} has every step masked (nothing to score)")
    y = y.clone()
    if y.dtype == torch.int64:
        y[~mask] = IGNORE_INDEX
    else:
        y[~mask] = float("nan")
    return y


def scored_steps(y: Tensor) -> Tensor:
    """The (N, T) boolean mask of the scored steps of per-step targets: labels that are not
    ``IGNORE_INDEX`` (int64 (N, T)), rows without NaN (float (N, T, k))."""
    return ~torch.isnan(y).any(dim=-1) if y.is_floating_point() else y != IGNORE_INDEX


def scored_count(y: Tensor) -> int:
    """The number of scored targets in a batch's targets ``y``: its unmasked steps for per-step
    targets (int64 (B, T), float (B, T, k)), its samples otherwise (any other shape, e.g. of a
    loss function of the user's own)."""
    if (y.dtype == torch.int64 and y.ndim == 2) or (y.is_floating_point() and y.ndim == 3):
        return Objective(not y.is_floating_point(), True).count(y)
    return int(y.shape[0])
