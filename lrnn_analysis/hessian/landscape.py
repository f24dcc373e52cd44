"""Loss (and accuracy) on a line or plane through the trained parameters."""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import InputError
from ..objective import Objective, Totals, scored_count
from ..progress import progress_bar
from ._results import dataclass_dict
from .eigen import EigenResult
from .operator import Batch, HessianOperator, LossFunction, ParamSpec, as_batches, eval_mode, select_parameters

__all__ = ["LandscapeResult", "eigenvector_directions", "landscape", "random_directions"]

Direction = Mapping[str, Tensor]


@dataclass(frozen=True)
class LandscapeResult:
    """L(θ + α d_1) on ``alphas`` (1-D) or L(θ + α d_1 + β d_2) on ``alphas`` × ``betas`` (2-D).

    ``loss`` (and ``accuracy``, per token for per-step targets, None for non-integer targets)
    has shape (len(alphas),) or (len(alphas), len(betas)); the loss is the mean over the scored
    targets of all batches (samples, or unmasked tokens). ``value`` holds the headline ``metric``
    of the targets' objective (accuracy, perplexity or mse; the loss itself for targets of a
    loss of the user's own) on the same grid.
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray | None
    directions: str
    params: tuple[str, ...]
    seed: int | None
    evaluations: int
    wall_time: float
    metric: str = "loss"
    value: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


def random_directions(model: nn.Module, n: int = 2, seed: int = 0, params: ParamSpec = None,
                      filter_normalize: bool = True) -> list[dict[str, Tensor]]:
    """``n`` Gaussian directions, filter-normalised (Li, Xu, Taylor, Studer, Goldstein 2018).

    Each row d_i of a matrix direction (a filter: one output unit) is rescaled to the norm of the
    same row of the weights, ‖d_i‖ = ‖θ_i‖; a vector (bias) is rescaled as a whole. Drawn on the
    CPU from ``seed``, so the directions do not depend on the device.
    """
    generator = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    directions = []
    for _ in range(n):
        direction = {}
        for name in select_parameters(model, params):
            weight = named[name].detach()
            d = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
            if filter_normalize:
                w = weight.to(torch.float64).cpu()
                if d.ndim >= 2:
                    rows_d, rows_w = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
                    d = (rows_d * (rows_w.norm(dim=1) / rows_d.norm(dim=1)).unsqueeze(1)).reshape(d.shape)
                else:
                    d = d * (w.norm() / d.norm())
            direction[name] = d.to(device=weight.device, dtype=weight.dtype)
        directions.append(direction)
    return directions


def eigenvector_directions(op: HessianOperator, result: EigenResult, indices: Sequence[int] = (0, 1)) -> list[dict[str, Tensor]]:
    """Eigenvectors of ``result`` (computed on ``op``) as ``{name: tensor}`` directions of unit norm."""
    if result.vectors is None:
        raise InputError(f"the {result.method} result carries no eigenvectors")
    return [op.unflatten(result.vectors[:, i]) for i in indices]


def _axes(grid: Any, n_directions: int) -> tuple[np.ndarray, np.ndarray | None]:
    two = isinstance(grid, (tuple, list)) and len(grid) == 2 and all(np.ndim(g) == 1 for g in grid)
    if n_directions == 1:
        if two:
            raise InputError("a 1-D landscape takes one grid of step sizes")
        return np.asarray(grid, dtype=np.float64).reshape(-1), None
    if two:
        return np.asarray(grid[0], dtype=np.float64), np.asarray(grid[1], dtype=np.float64)
    axis = np.asarray(grid, dtype=np.float64).reshape(-1)
    return axis, axis


def landscape(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Batch | Iterable[Batch],
    directions: str | Sequence[Direction],
    grid: Any,
    *,
    params: ParamSpec = None,
    seed: int = 0,
    progress: bool = False,
) -> LandscapeResult:
    """Loss and accuracy at θ + α d_1 (+ β d_2) for every grid point, by functional calls.

    ``directions`` is ``"random"`` (filter-normalised Gaussian directions of ``params``, drawn
    from ``seed``; one for a 1-D ``grid``, two for a pair ``(alphas, betas)``) or a sequence of
    one or two ``{name: tensor}`` directions, e.g. from ``eigenvector_directions``; a 2-D plane
    given one grid uses it on both axes. The model runs in eval mode and its parameters are
    never written.
    """
    start_time = time.perf_counter()
    chosen: Sequence[Direction]
    if isinstance(directions, str):
        if directions != "random":
            raise InputError(f"directions must be 'random' or a sequence of direction dicts, got {directions!r}")
        two = isinstance(grid, (tuple, list)) and len(grid) == 2 and all(np.ndim(g) == 1 for g in grid)
        chosen = random_directions(model, 2 if two else 1, seed, params)
        kind, used_seed = "random filter-normalised", seed
    else:
        chosen, kind, used_seed = list(directions), "given", None
    if len(chosen) not in (1, 2):
        raise InputError(f"a landscape takes one or two directions, got {len(chosen)}")
    alphas, betas = _axes(grid, len(chosen))
    named = dict(model.named_parameters())
    names = tuple(sorted(set().union(*chosen), key=list(named).index))
    unknown = set(names) - set(named)
    if unknown:
        raise InputError(f"directions name unknown parameters {sorted(unknown)}")
    base = {name: named[name].detach() for name in names}
    steps = [(float(a), None) for a in alphas] if betas is None else [(float(a), float(b)) for a in alphas for b in betas]
    batches = as_batches(data)
    n_total = sum(scored_count(y) for _, y in batches)
    if n_total == 0:
        raise InputError("no scored targets: every step is masked")
    try:
        objective: Objective | None = Objective.of_targets(batches[0][1])
    except InputError:  # targets of a loss of the user's own: its loss is the only metric
        objective = None
    classification = objective is not None and objective.classification
    device = next(iter(base.values())).device
    losses, accuracies, values = [], [], []
    with torch.no_grad(), eval_mode(model):
        for a, b in progress_bar(steps, desc="landscape", enabled=progress, leave=False):
            point = {}
            for name, theta in base.items():
                shift = a * chosen[0][name].to(theta) if name in chosen[0] else torch.zeros_like(theta)
                if b is not None and name in chosen[1]:
                    shift = shift + b * chosen[1][name].to(theta)
                point[name] = theta + shift
            total, totals = 0.0, Totals(0.0, 0 if classification else None, 0)
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                out = functional_call(model, point, (x,))
                total += float(loss_fn(out, y)) * scored_count(y)
                if objective is not None:
                    totals = totals + objective.totals(out, y)
            losses.append(total / n_total)
            metrics = objective.metrics(totals) if objective is not None else {}
            accuracies.append(metrics.get("token_accuracy", metrics.get("accuracy")))
            values.append(metrics[objective.headline] if objective is not None else total / n_total)
    shape = (len(alphas),) if betas is None else (len(alphas), len(betas))
    return LandscapeResult(
        alphas=alphas, betas=betas, loss=np.array(losses).reshape(shape),
        accuracy=np.array(accuracies).reshape(shape) if classification else None, directions=kind,
        params=names, seed=used_seed, evaluations=len(steps), wall_time=time.perf_counter() - start_time,
        metric=objective.headline if objective is not None else "loss", value=np.array(values, dtype=float).reshape(shape),
    )
