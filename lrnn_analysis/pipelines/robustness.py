"""The robustness pipeline: accuracy and loss under input and parameter perturbations.

Every model is evaluated under every (perturbation kind, level) of the grid for every seed (see
:func:`~lrnn_analysis.robustness.sweep`); ``hessian-direction`` steps along a seeded unit
combination of each model's top ``top_k`` training-loss Hessian eigenvectors, computed here from
``direction_seed``. Under ``torch.distributed`` the (model, kind, level) cells are dealt out to
the ranks (:func:`~lrnn_analysis.distributed.distributed_sweep`) and the rows gathered in the
single-process order. With ``radii`` it also measures, per l2 radius, certified accuracy (from
each model's gain certificate), accuracy under an l2 PGD attack on the whole sequence and under
l2-normalised Gaussian noise (:mod:`lrnn_analysis.robustness.certified`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..choices import (
    ATTACKS,
    INPUT_BOXES,
    MAX_ATTACK_STEPS,
    MAX_BATCH_SIZE,
    MAX_EIGENPAIRS,
    MAX_LEVELS,
    MAX_RESTARTS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SEEDS,
    SPLITS,
    perturbation_grid,
    perturbation_level,
    radius_list,
)
from ..errors import InputError
from ..validation import check_bool, check_choice, check_int, check_number, check_optional_int

if TYPE_CHECKING:
    from ..distributed import Ranks
    from ..robustness import SweepResult
    from ..robustness.attack import PgdSettings
    from ..robustness.certified import CertifiedRobustness
    from ..robustness.sweep import Data, Models
    from ..task import Task

__all__ = ["RobustnessSettings", "against_radius", "run"]


@dataclass(frozen=True)
class RobustnessSettings:
    """The perturbation grid and how it is evaluated.

    ``grid`` maps a perturbation kind (or its alias ``input-noise``/``param-noise``) to its levels;
    ``seeds`` seeds 0..seeds-1 per random level; the first ``max_samples`` samples (None: all) of
    the task's ``split``; parameter perturbations on every parameter, or with ``recurrent_only``
    on each model's declared recurrent parameters, or on those the globs ``recurrent`` match.

    Against l2 radius (:mod:`lrnn_analysis.robustness.certified`), at every radius of ``radii``:
    ``certified`` adds the certified accuracy (each model's gain certificate, searched for at most
    ``certificate_budget`` seconds); ``attack`` ("pgd") the accuracy under the l2 PGD attack on the
    whole sequence (``attack_steps`` steps, ``attack_restarts`` random starts, step size
    ``attack_step_size`` times the radius, default 2.5 / steps, seeded with ``attack_seed``);
    every radius also gets the accuracy under Gaussian noise of that l2 norm over ``seeds`` seeds.
    ``input_box``: "data" projects attacked and noisy inputs onto [min, max] of the task's training
    inputs (the pixel range of the image tasks; a test input outside it keeps its own values, so
    no perturbation exceeds the radius), "none" leaves them unbounded. With ``radii`` the
    perturbation ``grid`` may be empty."""

    grid: Mapping[str, Sequence[float]] = field(default_factory=dict)
    seeds: int = 5
    split: str = "test"
    max_samples: int | None = None
    batch_size: int = 1000
    recurrent_only: bool = False
    recurrent: tuple[str, ...] | None = None
    top_k: int = 1
    direction_seed: int = 0
    radii: tuple[float, ...] = ()
    certified: bool = False
    attack: str | None = None
    attack_steps: int = 50
    attack_restarts: int = 1
    attack_step_size: float | None = None
    attack_seed: int = 0
    input_box: str = "data"
    certificate_budget: float | None = 20.0

    def __post_init__(self) -> None:
        check_bool("certified", self.certified)
        if self.attack is not None:
            check_choice("attack", self.attack, ATTACKS)
        if self.radii:
            object.__setattr__(self, "radii", radius_list(self.radii))
        elif self.certified or self.attack is not None:
            raise InputError("certified accuracy and the attack need radii (e.g. radii = [0.1, 0.25, 0.5, 1])")
        check_int("attack_steps", self.attack_steps, 1, MAX_ATTACK_STEPS)
        check_int("attack_restarts", self.attack_restarts, 1, MAX_RESTARTS)
        if self.attack_step_size is not None:
            check_number("attack_step_size", self.attack_step_size, 0.0, 1e6, above=True)
        check_int("attack_seed", self.attack_seed, 0, MAX_SEED)
        check_choice("input_box", self.input_box, INPUT_BOXES)
        if self.certificate_budget is not None:
            check_number("certificate_budget", self.certificate_budget, 0.0, 1e6, above=True)
        if not isinstance(self.grid, Mapping) or (not self.grid and not self.radii):
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

    def attack_settings(self, task: Task) -> PgdSettings | None:
        """The attack's settings on ``task`` (None without an attack)."""
        from ..robustness.attack import PgdSettings

        if self.attack is None:
            return None
        return PgdSettings(self.attack_steps, self.attack_restarts, self.attack_step_size, self.attack_seed,
                           task.input_range if self.input_box == "data" else None)

    def to_dict(self) -> dict[str, Any]:
        return {"grid": {k: list(v) for k, v in self.grid.items()}, "seeds": self.seeds, "split": self.split,
                "max_samples": self.max_samples, "batch_size": self.batch_size, "recurrent_only": self.recurrent_only,
                "recurrent": None if self.recurrent is None else list(self.recurrent), "top_k": self.top_k,
                "direction_seed": self.direction_seed, "radii": list(self.radii), "certified": self.certified,
                "attack": self.attack, "attack_steps": self.attack_steps, "attack_restarts": self.attack_restarts,
                "attack_step_size": self.attack_step_size, "attack_seed": self.attack_seed, "input_box": self.input_box,
                "certificate_budget": self.certificate_budget}


def run(models: Models, data: Data, settings: RobustnessSettings, *, ranks: Ranks | None = None,
        progress: bool = False) -> SweepResult:
    """Sweep every model of ``models`` (see :func:`~lrnn_analysis.robustness.sweep_models`) on
    ``data`` (a task, or the samples themselves) with ``settings``; with ``settings.radii`` the
    result's ``certified`` holds the accuracies against l2 radius (computed on the main rank)."""
    import torch

    from ..distributed import Ranks, all_or_none, distributed_sweep
    from ..environment import environment
    from ..robustness import SweepModel, SweepResult, hessian_directions, recurrent_parameter_names, sweep
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
    if settings.grid:
        result = run_sweep(entries, task, dict(settings.grid), settings.seeds, split=settings.split, device=ranks.device,
                           batch_size=settings.batch_size, max_samples=settings.max_samples,
                           recurrent_only=settings.recurrent_only,
                           recurrent=None if settings.recurrent is None else list(settings.recurrent),
                           progress=progress and ranks.is_main)
    else:
        result = SweepResult([], [], {"task": task.to_dict(), "split": settings.split}, environment(ranks.device))
    if not settings.radii or not ranks.is_main:
        return result
    return replace(result, certified=against_radius(entries, task, settings, ranks.device))


def against_radius(models: Models, task: Task, settings: RobustnessSettings, device: Any = "cpu") -> CertifiedRobustness:
    """Certified, attack and l2-noise accuracy at ``settings.radii`` on the first ``max_samples``
    samples of the task's split (:func:`~lrnn_analysis.robustness.certified_robustness`)."""
    import torch

    from ..robustness.certified import certified_robustness
    from ..robustness.sweep import sweep_models
    from .stability import gain_certificate

    if not task.is_classification or task.test.y.ndim != 1:
        raise InputError(f"task {task.name}: certified accuracy and the attack need a classification task with one "
                         "class label per sequence")
    entries = sweep_models(models)
    for entry in entries:
        entry.model.check_fits(task, entry.checkpoint)
        entry.model.module.to(torch.device(device)).eval()
    split = getattr(task, settings.split)
    x, y = split.x[:settings.max_samples], split.y[:settings.max_samples]
    return certified_robustness(entries, x, y, settings.radii, settings.attack_settings(task),
                                bound=gain_certificate if settings.certified else None,
                                noise_seeds=settings.seeds, time_budget=settings.certificate_budget,
                                batch_size=settings.batch_size)
