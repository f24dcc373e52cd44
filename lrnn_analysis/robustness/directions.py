"""Hessian eigenvectors as parameter-space directions for the ``hessian-direction`` perturbation."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError
from ..hessian import HessianOperator, eigenvalues
from ..model_under_analysis import ModelUnderAnalysis
from ..parameters import module_of
from ..task import Task
from .perturbations import ParameterDirections

__all__ = ["hessian_directions"]


def hessian_directions(
    model: ModelUnderAnalysis | torch.nn.Module,
    task: Task,
    k: int = 1,
    batches: int = 1,
    batch_size: int = 128,
    params: Sequence[str] | None = None,
    seed: int = 0,
) -> ParameterDirections:
    """The top-``k`` eigenvectors (largest algebraic eigenvalues) of the training-loss Hessian
    (the task's loss: per token for per-step targets, over the unmasked tokens) on the first
    ``batches`` training batches, over ``params`` (default: all parameters)."""
    if len(task.train) == 0:
        raise InputError(f"hessian-direction: task {task.name} has no training samples for the Hessian")
    model = module_of(model)
    data = task.train.batches(batch_size, batches, next(model.parameters()).device)
    op = HessianOperator(model, task.objective.loss_fn(), data, params=None if params is None else list(params))
    result = eigenvalues(op, k=k, which="LA", seed=seed)
    assert result.vectors is not None  # Lanczos always returns its Ritz vectors
    vectors = torch.as_tensor(result.vectors.T.copy(), dtype=torch.float64)
    return ParameterDirections(tuple(op.names), vectors)
