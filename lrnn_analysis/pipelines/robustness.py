"""The robustness pipeline: accuracy and loss under input and parameter perturbations.

Every model is evaluated under every (perturbation kind, level) of the grid for every seed (see
:func:`~lrnn_analysis.robustness.sweep`); ``hessian-direction`` steps along a seeded unit
combination of each model's top ``top_k`` training-loss Hessian eigenvectors, computed here from
``direction_seed``. Under ``torch.distributed`` the (model, kind, level) cells are dealt out to
the ranks (:func:`~lrnn_analysis.distributed.distributed_sweep`) and the rows gathered in the
single-process order.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..choices import (
    MAX_BATCH_SIZE,
    MAX_EIGENPAIRS,
    MAX_LEVELS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SEEDS,
    SPLITS,
    perturbation_grid,
    perturbation_level,
)
from ..errors import InputError
from ..validation import check_bool, check_choice, check_int, check_optional_int

if TYPE_CHECKING:
    from ..distributed import Ranks
    from ..robustness import SweepResult
    from ..robustness.sweep import Data, Models

__all__ = ["RobustnessSettings", "run"]


@dataclass(frozen=True)
class RobustnessSettings:
    """The perturbation grid and how it is evaluated.

    ``grid`` maps a perturbation kind (or its alias ``input-noise``/``param-noise``) to its levels;
    ``seeds`` seeds 0..seeds-1 per random level; the first ``max_samples`` samples (None: all) of
    the task's ``split``; parameter perturbations on every parameter, or with ``recurrent_only``
    on each model's declared recurrent parameters, or on those the globs ``recurrent`` match."""

    grid: Mapping[str, Sequence[float]] = field(default_factory=dict)
    seeds: int = 5
    split: str = "test"
    max_samples: int | None = None
    batch_size: int = 1000
    recurrent_only: bool = False
    recurrent: tuple[str, ...] | None = None
    top_k: int = 1
    direction_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.grid, Mapping) or not self.grid:
            raise InputError("grid: no perturbation levels given (e.g. gaussian = [0, 0.1, 0.2])")
        grid: dict[str, tuple[float, ...]] = {}
        for kind, levels in perturbation_grid(self.grid).items():
            if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not 1 <= len(levels) <= MAX_LEVELS:
                raise InputError(f"grid.{kind}: expected a list of 1 to {MAX_LEVELS} levels, got {levels!r}")
            values = tuple(perturbation_level(kind, level) for level in levels)
            if len(set(values)) != len(values):
                raise InputError(f"grid.{kind}: duplicate levels {list(values)}")
            grid[kind] = values
        object.__setattr__(self, "grid", grid)
        check_int("seeds", self.seeds, 1, MAX_SEEDS)
        check_choice("split", self.split, SPLITS)
        check_optional_int("max_samples", self.max_samples, 1, MAX_SAMPLES)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_bool("recurrent_only", self.recurrent_only)
        if self.recurrent is not None:
            from ..parameters import parameter_patterns  # here: it imports torch, which settings need not

            patterns = parameter_patterns(self.recurrent) if isinstance(self.recurrent, str) else tuple(self.recurrent)
            if not patterns or not all(isinstance(p, str) and p for p in patterns):
                raise InputError(f"recurrent: expected glob patterns over parameter names, got {self.recurrent!r}")
            if self.recurrent_only:
                raise InputError("recurrent_only and recurrent: give one (recurrent names the parameters itself)")
            object.__setattr__(self, "recurrent", patterns)
        check_int("top_k", self.top_k, 1, MAX_EIGENPAIRS)
        check_int("direction_seed", self.direction_seed, 0, MAX_SEED)

    def to_dict(self) -> dict[str, Any]:
        return {"grid": {k: list(v) for k, v in self.grid.items()}, "seeds": self.seeds, "split": self.split,
                "max_samples": self.max_samples, "batch_size": self.batch_size, "recurrent_only": self.recurrent_only,
                "recurrent": None if self.recurrent is None else list(self.recurrent), "top_k": self.top_k,
                "direction_seed": self.direction_seed}


def run(models: Models, data: Data, settings: RobustnessSettings, *, ranks: Ranks | None = None,
        progress: bool = False) -> SweepResult:
    """Sweep every model of ``models`` (see :func:`~lrnn_analysis.robustness.sweep_models`) on
    ``data`` (a task, or the samples themselves) with ``settings``."""
    import torch

    from ..distributed import Ranks, all_or_none, distributed_sweep
    from ..robustness import SweepModel, hessian_directions, recurrent_parameter_names, sweep
    from ..robustness.sweep import evaluation_task, sweep_models

    ranks = ranks or Ranks(torch.device("cpu"))
    entries = sweep_models(models)
    # Every rank prepares the same models and directions (from the same seed): distributed_sweep
    # checks that they agree bit for bit.
    together = all_or_none if ranks.world_size > 1 else contextlib.nullcontext
    with together():
        task = evaluation_task(data, entries)
        if "hessian-direction" in settings.grid:
            restricted = settings.recurrent_only or settings.recurrent is not None
            prepared = []
            for entry in entries:
                if entry.directions is None:
                    entry.model.check_fits(task, entry.checkpoint)
                    entry.model.module.to(ranks.device)
                    names = recurrent_parameter_names(entry.model, settings.recurrent) if restricted else None
                    directions = hessian_directions(entry.model, task, settings.top_k, params=names,
                                                    seed=settings.direction_seed)
                    entry = SweepModel(entry.label, entry.checkpoint, entry.model, directions)
                prepared.append(entry)
            entries = prepared
    run_sweep = distributed_sweep if ranks.world_size > 1 else sweep
    return run_sweep(entries, task, dict(settings.grid), settings.seeds, split=settings.split, device=ranks.device,
                     batch_size=settings.batch_size, max_samples=settings.max_samples,
                     recurrent_only=settings.recurrent_only,
                     recurrent=None if settings.recurrent is None else list(settings.recurrent),
                     progress=progress and ranks.is_main)
