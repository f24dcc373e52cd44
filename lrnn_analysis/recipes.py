"""Declarative analysis recipes (``analyses/*.toml``) and the runner behind ``lrnn reproduce``.

A recipe names checkpoints, a task, one analysis, its settings, a seed and an output
stem. Instead of (or besides) checkpoints it may name your own model, ``model =
"mymodels.py:build"`` (a ``.py`` file or importable module and the function returning the
``nn.Module``, see :mod:`lrnn_analysis.usermodule`), its ``model_args = {hidden = 16}`` and
``weights = ["runA.pt", "runB.pt"]`` (one model per state-dict file); and instead of a task,
``data = "mydata.npz"`` (see :mod:`lrnn_analysis.data_files`). Without ``task`` or ``data``, the
checkpoints are scored on the task they all record (an error when they differ, or when a
``model`` is named: it records none). Relative paths (checkpoints, the model file, weights,
data) are resolved against the project root, the parent of the folder holding the recipe. Running it writes ``<out>/<output>.csv`` (the tidy table),
``<output>.json`` (table, settings, seed, versions, device, timing) and
``<output>.png``/``.pdf`` (the figure drawn from the table).

Every recipe is validated before anything is computed (keys, types and bounds of every
setting, checkpoints that exist, labels, output names), and ``lrnn reproduce`` writes all
its recipes' files into one staging directory that replaces ``--out`` at the end (see
:mod:`lrnn_analysis.outputs`): a failure or a kill leaves the previous outputs untouched.

    name = "hessian-comparison"
    analysis = "hessian"
    task = "digits"
    seed = 0
    output = "hessian_comparison"
    checkpoints = ["models/lipschitz-euler.safetensors", "models/antisymmetric.safetensors"]
    [settings]
    batches = 1
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import plots, tidy_tables
from .builtin_tasks import TASKS, load_task
from .choices import (
    ATTACKS,
    INPUT_BOXES,
    KINDS,
    MAX_ATTACK_STEPS,
    MAX_BATCH_SIZE,
    MAX_BATCHES,
    MAX_DENSITY_PROBES,
    MAX_DENSITY_STEPS,
    MAX_EIGENPAIRS,
    MAX_LEVELS,
    MAX_MATVECS,
    MAX_RESTARTS,
    MAX_SAMPLE_PASSES,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SEEDS,
    PERTURBATION_ALIASES,
    SPLITS,
    TRACE_METHODS,
    perturbation_grid,
    radius_list,
)
from .data_files import load_data
from .distributed import Ranks, all_or_none
from .environment import distributed_info, environment
from .errors import InputError
from .model_under_analysis import ModelUnderAnalysis, load_model
from .outputs import OutputDirectory, check_name
from .pipelines import curvature, robustness, stability
from .robustness import SweepModel
from .stability import CERTIFICATES, phase_diagram
from .stability.parameterization import PARAMETERIZATION_TESTS
from .task import Task
from .training_split import check_training_data
from .usermodule import ModelSpec, load_user_model
from .writers import write_csv, write_json

__all__ = ["ANALYSES", "REPRODUCE_WRITER", "Recipe", "RecipeOutcome", "check_recipe_set", "find_recipes",
    "load_recipe", "run_recipe", "run_recipes"]

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

_RECIPE_KEYS = {"name", "analysis", "task", "task_options", "split_seed", "checkpoints", "labels", "seed", "output",
               "settings", "description", "model", "model_args", "weights", "data"}


@dataclass(frozen=True)
class Recipe:
    name: str
    analysis: str
    output: str
    path: Path
    task: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    split_seed: int = 0
    checkpoints: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    weights: tuple[str, ...] = ()
    data: str | None = None
    recorded_task: dict[str, Any] | None = None

    @property
    def root(self) -> Path:
        return self.path.resolve().parent.parent

    def _resolve(self, path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else self.root / path

    def checkpoint_paths(self) -> list[Path]:
        return [self._resolve(c) for c in self.checkpoints]

    def weight_paths(self) -> list[Path]:
        return [self._resolve(w) for w in self.weights]

    def data_path(self) -> Path | None:
        return None if self.data is None else self._resolve(self.data)

    def model_spec(self) -> ModelSpec | None:
        return None if self.model is None else ModelSpec.parse(self.model, self.root)

    def code_file(self) -> Path | None:
        """The .py file this recipe imports (its ``model``), or None: it runs no code of its own."""
        spec = self.model_spec()
        return None if spec is None else spec.path

    def sources(self) -> tuple[str, ...]:
        """Each model as written in the recipe: its checkpoints, then one per weights file of
        ``model`` (or ``model`` itself without weights)."""
        own = (self.weights or (self.model,)) if self.model is not None else ()
        return (*self.checkpoints, *own)

    def model_labels(self) -> tuple[str, ...]:
        """The labels given, else each model's file stem, else (when two stems are equal,
        e.g. runA/model.pt and runB/model.pt) each model as written in the recipe."""
        if self.labels:
            return self.labels
        sources = self.sources()
        stems = tuple(s if s == self.model else Path(s).stem for s in sources)
        return stems if len(set(stems)) == len(stems) else sources

    def stems(self) -> list[str]:
        """The file stems this recipe writes (each as .csv and .json, some also as .png and .pdf)."""
        return [f"{self.output}{suffix}" for suffix in _STEM_SUFFIXES[self.analysis]]

    def inputs(self) -> list[Path]:
        """Files the recipe reads: its checkpoints, the model file, weights, data file and a data
        file named in its task options."""
        data = self.task_options.get("path")
        spec = self.model_spec()
        return (self.checkpoint_paths() + self.weight_paths() + ([Path(data)] if isinstance(data, str) else [])
                + [p for p in (self.data_path(), spec.path if spec is not None else None) if p is not None])

    def load_task(self) -> Task:
        """The data file, else the named task, else the task every checkpoint records."""
        if self.data is not None:
            return load_data(self.data_path())
        if self.task is not None:
            try:
                return load_task(self.task, seed=self.split_seed, **self.task_options)
            except InputError as error:
                raise _fail(self.path, "task_options", str(error)) from None
        if self.recorded_task is None:
            raise InputError(f"{self.path}: task: no task, data or recorded task")
        record = self.recorded_task
        return load_task(record["name"], seed=record.get("seed", 0), **record.get("options", {}))

    def pipeline_settings(self) -> Any:
        """The settings of the pipeline this recipe runs (checked against their bounds), or None for
        the analyses no pipeline owns (spectra, phase diagram, training spectra, landscape)."""
        s = self.settings
        if self.analysis == "certificates":
            names = s.get("certificates")
            return stability.StabilitySettings(None if names is None else tuple(names), s.get("time_budget", 30.0))
        if self.analysis == "hessian":
            return curvature.CurvatureSettings(
                split=s.get("split", "train"), batch_size=s.get("batch_size", 128), batches=s.get("batches", 1),
                params=s.get("params"), trace=True, trace_matvecs=s.get("trace_matvecs", 100),
                trace_method=s.get("trace_method", "hutchinson"),
                density=s.get("density", True), density_probes=s.get("density_probes", 4),
                density_steps=s.get("density_steps", 40), max_iter=150, seed=self.seed)
        if self.analysis == "robustness":
            return robustness.RobustnessSettings(
                grid=s["grid"], seeds=s.get("seeds", 5), split=s.get("split", "test"), max_samples=s.get("max_samples"),
                recurrent_only=s.get("recurrent_only", False), recurrent=s.get("recurrent"), top_k=s.get("hessian_k", 1),
                direction_seed=self.seed)
        if self.analysis == "certified-robustness":
            return robustness.RobustnessSettings(
                radii=tuple(s["radii"]), certified=True, attack=s.get("attack", "pgd"), seeds=s.get("seeds", 5),
                split=s.get("split", "test"), max_samples=s.get("max_samples"), attack_steps=s.get("attack_steps", 50),
                attack_restarts=s.get("attack_restarts", 1), attack_step_size=s.get("attack_step_size"),
                attack_seed=self.seed, input_box=s.get("input_box", "data"),
                certificate_budget=s.get("certificate_budget", 20.0))
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "analysis": self.analysis, "output": self.output, "path": str(self.path),
                "task": self.task, "task_options": self.task_options, "split_seed": self.split_seed,
                "checkpoints": list(self.checkpoints), "labels": list(self.labels), "seed": self.seed,
                "settings": self.settings, "description": self.description, "model": self.model,
                "model_args": self.model_args, "weights": list(self.weights), "data": self.data,
                "recorded_task": self.recorded_task}


@dataclass(frozen=True)
class RecipeOutcome:
    name: str
    analysis: str
    outputs: tuple[str, ...]
    summary: str
    seconds: float
    warnings: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "analysis": self.analysis, "outputs": list(self.outputs), "summary": self.summary,
                "seconds": self.seconds, "warnings": list(self.warnings)}


REPRODUCE_WRITER = "lrnn reproduce"
_MAX_AXIS_POINTS = 10_001
_MAX_GRID_CELLS = 250_000


def _fail(path: Path, key: str, problem: str) -> InputError:
    return InputError(f"{path}: {key}: {problem}")


def _integer(low: int, high: int) -> Callable[[Path, str, Any], int]:
    def check(path: Path, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _fail(path, key, f"expected an integer in [{low}, {high}], got {value!r}")
        return value
    return check


def _number(low: float, high: float) -> Callable[[Path, str, Any], float]:
    def check(path: Path, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
            raise _fail(path, key, f"expected a finite number in [{low:g}, {high:g}], got {value!r}")
        return float(value)
    return check


def _boolean(path: Path, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, key, f"expected true or false, got {value!r}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Path, str, Any], str]:
    def check(path: Path, key: str, value: Any) -> str:
        if value not in options:
            raise _fail(path, key, f"expected one of {list(options)}, got {value!r}")
        return value
    return check


def _string(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, key, f"expected a non-empty string, got {value!r}")
    return value


def _strings(path: Path, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _fail(path, key, f"expected a non-empty list of strings, got {value!r}")
    return value


def _names(options: tuple[str, ...]) -> Callable[[Path, str, Any], list[str]]:
    def check(path: Path, key: str, value: Any) -> list[str]:
        for name in _strings(path, key, value):
            _choice(options)(path, key, name)
        return value
    return check


def _axis_points(path: Path, key: str, spec: Any, least: int = 1) -> int:
    """Check a grid axis (``least`` to _MAX_AXIS_POINTS finite numbers, as a list or as
    ``{linspace = [start, stop, count]}``); returns its length."""
    if isinstance(spec, dict):
        bounds = spec.get("linspace")
        if set(spec) != {"linspace"} or not isinstance(bounds, list) or len(bounds) != 3:
            raise _fail(path, key, f"expected a list of numbers or {{linspace = [start, stop, count]}}, got {spec!r}")
        _number(-1e12, 1e12)(path, f"{key}.linspace start", bounds[0])
        _number(-1e12, 1e12)(path, f"{key}.linspace stop", bounds[1])
        return _integer(least, _MAX_AXIS_POINTS)(path, f"{key}.linspace count", bounds[2])
    if not isinstance(spec, list) or not least <= len(spec) <= _MAX_AXIS_POINTS:
        raise _fail(path, key, f"expected a list of {least} to {_MAX_AXIS_POINTS} numbers or {{linspace = [start, stop, count]}}")
    for value in spec:
        _number(-1e12, 1e12)(path, key, value)
    return len(spec)


def _axis_setting(least: int) -> Callable[[Path, str, Any], Any]:
    """An axis of at least ``least`` points (a contour plot needs two along each axis)."""
    def check(path: Path, key: str, spec: Any) -> Any:
        _axis_points(path, key, spec, least)
        return spec
    return check


def _grid_setting(path: Path, key: str, grid: Any) -> dict[str, list[float]]:
    if not isinstance(grid, dict) or not grid:
        raise _fail(path, key, f"expected a table of perturbation kinds, e.g. gaussian = [0.0, 0.1], got {grid!r}")
    for kind, levels in grid.items():
        _choice(KINDS + tuple(PERTURBATION_ALIASES))(path, f"{key}.{kind}", kind)
        if not isinstance(levels, list) or not 1 <= len(levels) <= MAX_LEVELS:
            raise _fail(path, f"{key}.{kind}", f"expected a list of 1 to {MAX_LEVELS} levels")
        for level in levels:
            _number(0.0, 1e6)(path, f"{key}.{kind}", level)
    try:
        return perturbation_grid(grid)
    except ValueError as error:
        raise _fail(path, key, str(error)) from None


def _radii_setting(path: Path, key: str, radii: Any) -> tuple[float, ...]:
    try:
        return radius_list(radii)
    except InputError as error:
        raise _fail(path, key, str(error)) from None


_BATCHES = {"split": _choice(SPLITS), "batch_size": _integer(1, MAX_BATCH_SIZE), "batches": _integer(1, MAX_BATCHES)}
_SETTINGS: dict[str, dict[str, Callable[[Path, str, Any], Any]]] = {
    "spectra": {},
    "certificates": {"certificates": _names(CERTIFICATES), "time_budget": _number(1e-3, 1e6)},
    "hessian": {**_BATCHES, "params": _string, "trace_matvecs": _integer(1, MAX_MATVECS), "trace_method": _choice(TRACE_METHODS),
                "density": _boolean,
                "density_probes": _integer(1, MAX_DENSITY_PROBES), "density_steps": _integer(1, MAX_DENSITY_STEPS)},
    "robustness": {"grid": _grid_setting, "recurrent_only": _boolean, "recurrent": _string,
                   "hessian_k": _integer(1, MAX_EIGENPAIRS), "seeds": _integer(1, MAX_SEEDS), "split": _choice(SPLITS),
                   "max_samples": _integer(1, MAX_SAMPLES)},
    "phase-diagram": {"betas": _axis_setting(2), "gammas": _axis_setting(2), "radius": _number(0.0, 1e12),
                      "eps": _number(0.0, 1e12), "slope": _number(0.0, 1e12), "tests": _names(PARAMETERIZATION_TESTS),
                      "beta_w": _number(-1e12, 1e12), "gamma_w": _number(-1e12, 1e12)},
    "training-spectra": {"quantities": _strings},
    "landscape": {**_BATCHES, "steps": _axis_setting(1), "plane_steps": _axis_setting(2)},
    "certified-robustness": {"radii": _radii_setting, "attack": _choice(ATTACKS), "seeds": _integer(1, MAX_SEEDS),
                             "split": _choice(SPLITS), "max_samples": _integer(1, MAX_SAMPLES),
                             "attack_steps": _integer(1, MAX_ATTACK_STEPS), "attack_restarts": _integer(1, MAX_RESTARTS),
                             "attack_step_size": _number(1e-12, 1e6), "input_box": _choice(INPUT_BOXES),
                             "certificate_budget": _number(1e-3, 1e6)},
}
_REQUIRED_SETTINGS = {"robustness": {"grid"}, "phase-diagram": {"betas", "gammas", "radius"},
                      "certified-robustness": {"radii"}}
_NEEDS_TASK = {"certificates", "hessian", "robustness", "landscape", "certified-robustness"}
_WITHOUT_CHECKPOINTS = {"phase-diagram"}
# The file stems an analysis writes, as suffixes of the recipe's ``output``.
_STEM_SUFFIXES = {"spectra": ("", "_summary"), "certificates": ("", "_accuracy"), "hessian": ("", "_density"),
                 "robustness": ("", "_summary"), "phase-diagram": ("",), "training-spectra": ("",),
                 "landscape": ("", "_plane"), "certified-robustness": ("", "_bounds")}


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate one recipe file: every key, type and bound, checkpoints that exist,
    unique labels, a valid output name (errors name the file and the key)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise _fail(path, "recipe", "not a regular file (a directory, FIFO or device is never read)")
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: no such recipe") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the recipe ({error})") from error
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{path}: invalid TOML ({error})") from error
    except RecursionError:
        raise InputError(f"{path}: invalid TOML (nested too deeply to read)") from None
    unknown = set(data) - _RECIPE_KEYS
    missing = {"name", "analysis", "output"} - set(data)
    if unknown or missing:
        raise InputError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    analysis = data["analysis"]
    if not isinstance(analysis, str) or analysis not in ANALYSES:
        raise _fail(path, "analysis", f"unknown analysis {analysis!r}; expected one of {sorted(ANALYSES)}")
    name = _string(path, "name", data["name"])
    output = data["output"]
    check_name(output, f"{path}: output")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail(path, "description", "expected a string")
    task = data.get("task")
    if task is not None and task not in TASKS:
        raise _fail(path, "task", f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    user_data = data.get("data")
    if user_data is not None:
        _string(path, "data", user_data)
        if task is not None or "task_options" in data or "split_seed" in data:
            raise _fail(path, "data", "give either task (with task_options, split_seed) or data, not both")
    model = data.get("model")
    model_args = data.get("model_args", {})
    weights = data.get("weights", [])
    if model is None and ("model_args" in data or "weights" in data):
        raise _fail(path, "model", "model_args and weights go with model = \"MODULE:FACTORY\"")
    if model is not None:
        _string(path, "model", model)
    if not isinstance(model_args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in model_args):
        raise _fail(path, "model_args", f"expected a table of keyword arguments, got {model_args!r}")
    if "weights" in data:
        _strings(path, "weights", weights)
    task_options = data.get("task_options", {})
    if not isinstance(task_options, dict):
        raise _fail(path, "task_options", "expected a table")
    split_seed = _integer(0, MAX_SEED)(path, "split_seed", data.get("split_seed", 0))
    seed = _integer(0, MAX_SEED)(path, "seed", data.get("seed", 0))
    checkpoints = data.get("checkpoints", [])
    if analysis in _WITHOUT_CHECKPOINTS:
        if checkpoints or "labels" in data or model is not None or user_data is not None:
            raise _fail(path, "checkpoints", f"analysis {analysis} takes no checkpoints, model, labels or data")
    elif "checkpoints" in data or model is None:
        _strings(path, "checkpoints", checkpoints)
    labels = data.get("labels", [])
    if "labels" in data:
        _strings(path, "labels", labels)
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise _fail(path, "settings", "expected a table")
    schema = _SETTINGS[analysis]
    for key, value in settings.items():
        if key not in schema:
            raise _fail(path, f"settings.{key}", f"not a setting of analysis {analysis}; expected one of {sorted(schema)}")
        schema[key](path, f"settings.{key}", value)
    for key in sorted(_REQUIRED_SETTINGS.get(analysis, set()) - set(settings)):
        raise _fail(path, f"settings.{key}", f"analysis {analysis} needs it")
    if analysis == "phase-diagram":
        cells = _axis_points(path, "settings.betas", settings["betas"]) * _axis_points(path, "settings.gammas", settings["gammas"])
        if cells > _MAX_GRID_CELLS:
            raise _fail(path, "settings", f"betas x gammas is {cells} cells; at most {_MAX_GRID_CELLS}")
    if analysis == "landscape":
        points = 2 * _axis_points(path, "settings.steps", settings.get("steps", [0.0] * 21))
        if "plane_steps" in settings:
            points += _axis_points(path, "settings.plane_steps", settings["plane_steps"], 2) ** 2
        samples = settings.get("batch_size", 128) * settings.get("batches", 1)
        if points * samples > MAX_SAMPLE_PASSES:
            raise _fail(path, "settings", f"{points} landscape points x {samples} samples is {points * samples:.3g} sample "
                                          f"passes; at most {MAX_SAMPLE_PASSES:.0e} (fewer steps, a smaller plane or batch)")
    if settings.get("recurrent_only") and "recurrent" in settings:
        raise _fail(path, "settings.recurrent", "give recurrent (patterns) or recurrent_only (the declared ones), not both")
    recipe = Recipe(name=name, analysis=analysis, output=output, path=path, task=task, task_options=dict(task_options),
                    split_seed=split_seed, checkpoints=tuple(checkpoints), labels=tuple(labels), seed=seed,
                    settings=dict(settings), description=description, model=model, model_args=dict(model_args),
                    weights=tuple(weights), data=user_data)
    try:
        recipe.pipeline_settings()
    except InputError as error:
        raise _fail(path, "settings", str(error)) from None
    if labels and len(labels) != len(recipe.sources()):
        raise _fail(path, "labels", f"{len(labels)} labels for {len(recipe.sources())} models (checkpoints, then weights)")
    for key, files in (("checkpoints", recipe.checkpoint_paths()), ("weights", recipe.weight_paths()),
                       ("data", [recipe.data_path()] if user_data is not None else [])):
        for file in files:
            if not file.is_file():
                raise _fail(path, key, f"{file} is not an existing file")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise _fail(path, "labels", f"duplicate labels {repeated}: give each model its own label")
    for key, given in (("checkpoints", recipe.checkpoints), ("weights", recipe.weights)):
        repeated = sorted({c for c in given if given.count(c) > 1})
        if repeated:
            raise _fail(path, key, f"duplicate {key} {repeated}")
    if model is not None:
        _check_code_file(recipe)
    if task is None and user_data is None and analysis in _NEEDS_TASK:
        recipe = replace(recipe, recorded_task=_recorded_task(recipe))
    model_labels = recipe.model_labels()
    repeated = sorted({label for label in model_labels if model_labels.count(label) > 1})
    if repeated:
        raise _fail(path, "labels" if labels else "checkpoints",
                    f"the model label(s) {repeated} occur more than once (give each checkpoint its own label)")
    return recipe


def _check_code_file(recipe: Recipe) -> None:
    """A recipe may run code only from a ``.py`` file inside its own directory tree (never an
    importable module such as ``os:system``); the file is checked here and imported only when the
    recipe runs, after every recipe of the run and the output location have been checked."""
    try:
        spec = recipe.model_spec()
    except InputError as error:
        raise _fail(recipe.path, "model", str(error)) from None
    if spec.path is None or spec.path.suffix != ".py":
        raise _fail(recipe.path, "model", f"{recipe.model!r} names an importable module; a recipe may name only a .py "
                                          "file inside its own directory tree (FILE.py:FACTORY)")
    home = recipe.path.resolve().parent
    file = spec.path.resolve()
    if not file.is_relative_to(home):
        raise _fail(recipe.path, "model", f"{spec.path} lies outside the recipe's directory {home}: a recipe may run only "
                                          "a .py file inside its own directory tree")
    if not file.is_file():
        raise _fail(recipe.path, "model", f"{spec.path} is not an existing file")


def _recorded_task(recipe: Recipe) -> dict[str, Any]:
    """The task every checkpoint of a recipe without ``task`` or ``data`` records (each would be
    scored on its own): an error when one records none, they differ, or a ``model`` is named."""
    where = f"analysis {recipe.analysis} needs a task"
    if recipe.model is not None:
        raise _fail(recipe.path, "task", f"{where}: model {recipe.model} records none; give task or data")
    records = {c: load_model(p).metadata.get("task") for c, p in zip(recipe.checkpoints, recipe.checkpoint_paths())}
    distinct = {json.dumps(r, sort_keys=True) for r in records.values()}
    if None in records.values() or len(distinct) > 1:
        listed = ", ".join(f"{c} ({'none' if r is None else r.get('name')})" for c, r in records.items())
        raise _fail(recipe.path, "task", f"{where}: the checkpoints record {listed}; give task or data")
    return next(iter(records.values()))


def check_recipe_set(recipes: Sequence[Recipe]) -> None:
    """Recipes run together write distinct files: no two share an output stem."""
    owners: dict[str, Recipe] = {}
    for recipe in recipes:
        for stem in recipe.stems():
            if stem in owners:
                raise InputError(f"{recipe.path}: output: {recipe.output!r} writes {stem}.*, which "
                                 f"{owners[stem].path} writes too")
            owners[stem] = recipe


@dataclass
class _Context:
    """What a recipe runs with. ``out`` is None on the ranks other than 0 of a distributed run:
    they take part in the recipe's collective computations and write nothing."""

    recipe: Recipe
    out: OutputDirectory | None
    ranks: Ranks
    progress: bool
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    hashes: dict[str, str | None] = field(default_factory=dict)  # label -> weights_sha256 of each checkpoint loaded

    def setting(self, key: str, default: Any) -> Any:
        return self.recipe.settings.get(key, default)

    def together(self) -> contextlib.AbstractContextManager[None]:
        """A step that fails on every rank when it fails on one (nothing to share in one process)."""
        return all_or_none() if self.ranks.world_size > 1 else contextlib.nullcontext()

    def entries(self) -> list[tuple[str, Path | str, ModelUnderAnalysis]]:
        """(label, file, model) per checkpoint, then per weights file of the recipe's ``model`` (the
        spec itself when it has none), in recipe order (labels are unique)."""
        labels = self.recipe.model_labels()
        checkpoints = self.recipe.checkpoint_paths()
        entries: list[tuple[str, Path | str, ModelUnderAnalysis]] = [
            (label, path, load_model(path, name=label)) for label, path in zip(labels, checkpoints)]
        spec = self.recipe.model_spec()
        if spec is not None:
            for label, weights in zip(labels[len(checkpoints):], self.recipe.weight_paths() or [None]):
                subject = load_user_model(spec, weights, self.recipe.model_args, name=label)
                entries.append((label, weights if weights is not None else spec.text, subject))
        for label, _, subject in entries:
            subject.module.to(self.ranks.device).eval()
            self.hashes[label] = subject.metadata.get("weights_sha256")
        return entries

    def models(self) -> dict[str, ModelUnderAnalysis]:
        return {label: subject for label, _, subject in self.entries()}

    def metadata(self) -> dict[str, dict[str, Any]]:
        return {label: dict(subject.metadata) for label, _, subject in self.entries()}

    def task(self) -> Task:
        return self.recipe.load_task()

    def batches(self, task: Task) -> list[tuple[torch.Tensor, torch.Tensor]]:
        split = getattr(task, self.setting("split", "train"))
        return split.batches(self.setting("batch_size", 128), self.setting("batches", 1), self.ranks.device)

    def write(self, rows: list[dict[str, Any]], figure, extra: dict[str, Any] | None = None, suffix: str = "") -> list[str]:
        """The table as CSV and JSON (with provenance) and the figure as PNG and PDF, staged in ``out``."""
        stem = f"{self.recipe.output}{suffix}"
        names = [f"{stem}.csv", f"{stem}.json"] + ([f"{stem}{s}" for s in plots.FIGURE_SUFFIXES] if figure is not None else [])
        paths = [self.out.path(name) for name in names]
        write_csv(paths[0], rows)
        write_json(paths[1], {"recipe": self.recipe.to_dict(), "rows": rows, **(extra or {}),
                              "checkpoint_sha256": dict(self.hashes),
                              "environment": environment(self.ranks.device)})
        if figure is not None:
            plots.save_figure(figure, self.out.staging / stem)
        self.files += names
        return [str(self.out.target / name) for name in names]


def _spectra(ctx: _Context) -> tuple[list[str], str]:
    eigen_rows, model_rows = tidy_tables.spectra_tables(ctx.models())
    written = ctx.write(eigen_rows, plots.plot_spectra(eigen_rows, model_rows), {"models": model_rows})
    written += ctx.write(model_rows, None, suffix="_summary")
    worst = max(model_rows, key=lambda r: r["alpha_A"])
    return written, f"{len(model_rows)} models; largest alpha(A) {worst['alpha_A']:+.3g} ({worst['model']})"


def _certificates(ctx: _Context) -> tuple[list[str], str]:
    models = ctx.models()
    task = ctx.task()
    for label, subject in models.items():
        subject.check_fits(task, label)
    accuracy = {r["model"]: r["accuracy"] for r in tidy_tables.accuracy_table(models, task.test.x, task.test.y, task.objective)}
    found = stability.run(list(models.values()), task, ctx.recipe.pipeline_settings())
    rows = found.rows()
    for row in rows:
        row["test_accuracy"] = accuracy[row["model"]]
        row["parameters"] = models[row["model"]].parameter_count
    eigen_rows, model_rows = [], []
    for certified in found.models:  # the spectra certify_model computed of the forms it certified
        if certified.spectrum is not None and certified.system is not None:
            eigen, row = tidy_tables.spectra_rows(certified.model, certified.system, certified.spectrum)
            eigen_rows += eigen
            model_rows.append(row)
    training_data = {label: check_training_data(subject.metadata, task).to_dict() for label, subject in models.items()}
    ctx.warnings += [f"{label}: {check['warning']}" for label, check in training_data.items() if check["warning"]]
    written = ctx.write(rows, plots.plot_spectra(eigen_rows, model_rows), {"training_data": training_data})
    summary = stability.certified_summary(rows)
    written += ctx.write(summary, plots.plot_certified_accuracy(summary), suffix="_accuracy")
    certified = sorted({r["model"] for r in rows if r["holds"]})
    return written, f"certified: {', '.join(certified) or 'none'}"


def _hessian(ctx: _Context) -> tuple[list[str], str]:
    with ctx.together():
        task = ctx.task()
        models = ctx.models()
    result = curvature.run(list(models.values()), task, ctx.recipe.pipeline_settings(), ranks=ctx.ranks,
                           progress=ctx.progress)
    if ctx.out is None:
        return [], ""
    summary, density = result.rows(), result.density_rows()
    written = ctx.write(summary, plots.plot_hessian_summary(summary), {"batches_shared_by": result.shared_by})
    if density:
        written += ctx.write(density, plots.plot_density(density).figure, {"batches_shared_by": result.shared_by}, suffix="_density")
    top = min(summary, key=lambda r: r["lambda_max"])
    return written, f"smallest lambda_max {top['lambda_max']:.4g} ({top['model']})"


def _robustness(ctx: _Context) -> tuple[list[str], str]:
    # The checkpoint column names each model as the recipe writes it (relative to the project root),
    # so the committed tables do not depend on where the project was checked out.
    with ctx.together():
        task = ctx.task()
        models = [SweepModel(label, written, model)
                  for (label, _, model), written in zip(ctx.entries(), ctx.recipe.sources(), strict=True)]
    result = robustness.run(models, task, ctx.recipe.pipeline_settings(), ranks=ctx.ranks, progress=ctx.progress)
    if ctx.out is None:
        return [], ""
    ctx.warnings += list(result.warnings)
    metric = result.summary[0]["metric"]  # the task's: accuracy, or perplexity (language models) or mse
    figure = plots.plot_robustness(result.summary, "accuracy" if metric == "accuracy" else "value")
    written = ctx.write(result.rows, figure, {"summary": result.summary, "settings": result.settings,
                                              "warnings": list(result.warnings)})
    written += ctx.write(result.summary, None, suffix="_summary")
    top_level = max(r["level"] for r in result.summary)
    at_top = [r for r in result.summary if r["level"] == top_level and r["metric_drop"] is not None]
    best = min(at_top, key=lambda r: r["metric_drop"]) if at_top else None
    change = "drop" if metric == "accuracy" else f"{metric} rise"
    return written, f"{len(result.rows)} rows" + (f"; smallest {change} at level {top_level:g}: {best['model']} ({best['metric_drop']:.3f})"
                                                  if best else "")


def _certified_robustness(ctx: _Context) -> tuple[list[str], str]:
    task = ctx.task()
    models = [SweepModel(label, written, model)
              for (label, _, model), written in zip(ctx.entries(), ctx.recipe.sources(), strict=True)]
    result = robustness.against_radius(models, task, ctx.recipe.pipeline_settings(), ctx.ranks.device)
    bounds = result.bound_rows()
    written = ctx.write(result.rows, plots.plot_certified_robustness(result.rows), {"bounds": bounds, "settings": result.settings})
    written += ctx.write(bounds, None, suffix="_bounds")
    certified = [r for r in result.rows if r["certified_accuracy"]]
    best = max(certified, key=lambda r: (r["radius"], r["certified_accuracy"])) if certified else None
    return written, (f"{len(bounds)} models; " + (f"largest radius with certified accuracy > 0: {best['radius']:g} "
                                                  f"({best['model']}, {best['certified_accuracy']:.3f})" if best
                                                  else "no certified accuracy above 0"))


def _axis(spec: Any) -> list[float]:
    """A grid given as [start, stop, count] (a table key ``linspace``) or as the values themselves."""
    if isinstance(spec, dict):
        start, stop, count = spec["linspace"]
        return [float(v) for v in np.linspace(start, stop, int(count))]
    return [float(v) for v in spec]


def _phase_diagram(ctx: _Context) -> tuple[list[str], str]:
    s = ctx.recipe.settings
    cells = [c.to_dict() for c in phase_diagram(_axis(s["betas"]), _axis(s["gammas"]), float(s["radius"]), s.get("eps"),
                                                float(s.get("slope", 1.0)), s.get("tests"), s.get("beta_w"), s.get("gamma_w"))]
    written = ctx.write(cells, plots.plot_phase_diagram(cells))
    grid = {(c["beta_A"], c["gamma_A"]) for c in cells}
    tests = {c["test"] for c in cells}
    return written, (f"{sum(c['holds'] for c in cells)} of {len(cells)} (cell, test) pairs certified "
                     f"({len(grid)} cells x {len(tests)} tests)")


def _training_spectra(ctx: _Context) -> tuple[list[str], str]:
    rows = tidy_tables.training_log_table({label: meta.get("log", []) for label, meta in ctx.metadata().items()})
    written = ctx.write(rows, plots.plot_training_spectra(rows, tuple(ctx.setting("quantities", ("alpha_A", "mu2_A", "norm_W")))))
    return written, f"{len(rows)} epochs logged"


def _landscape(ctx: _Context) -> tuple[list[str], str]:
    task = ctx.task()
    plane_spec = ctx.setting("plane_steps", None)
    lines, plane = tidy_tables.landscape_tables(ctx.models(), ctx.batches(task), task.objective,
                                             _axis(ctx.setting("steps", {"linspace": [-1.0, 1.0, 21]})),
                                             None if plane_spec is None else _axis(plane_spec), seed=ctx.recipe.seed)
    written = ctx.write(lines, plots.plot_landscape_1d(lines))
    if plane:
        written += ctx.write(plane, plots.plot_landscape_2d(plane), suffix="_plane")
    return written, f"{len(lines) + len(plane)} points"


ANALYSES: dict[str, Callable[[_Context], tuple[list[str], str]]] = {
    "spectra": _spectra,
    "certificates": _certificates,
    "hessian": _hessian,
    "robustness": _robustness,
    "phase-diagram": _phase_diagram,
    "training-spectra": _training_spectra,
    "landscape": _landscape,
    "certified-robustness": _certified_robustness,
}


# The analyses every rank of a distributed run takes part in; the others run on rank 0 alone.
_COLLECTIVE_ANALYSES = ("robustness", "hessian")


def run_recipe(recipe: Recipe, out: OutputDirectory | str | Path | None, device: torch.device | str = "cpu",
               progress: bool = True, force: bool = False) -> RecipeOutcome:
    """Run one recipe and write its table, provenance and figure into ``out``: an open
    :class:`OutputDirectory` (the caller publishes it), or a directory path, where the recipe's
    files replace its previous ones and every other recipe's files stay. Under torch.distributed
    (more than one rank) every rank calls it, rank 0 with the open directory and the others with
    ``out=None`` (they compute their share of a collective analysis and write nothing); see
    :func:`run_recipes`."""
    group = distributed_info()
    if out is None and group["world_size"] == 1:
        raise InputError("out=None is for the ranks other than 0 of a distributed run")
    if out is not None and not isinstance(out, OutputDirectory):
        if group["world_size"] > 1:
            raise InputError("under torch.distributed, run recipes with run_recipes (rank 0 holds the output directory)")
        with OutputDirectory(out, REPRODUCE_WRITER, force=force, inputs=recipe.inputs(), keep_other_groups=True) as directory:
            outcome = run_recipe(recipe, directory, device, progress)
            directory.publish({recipe.output: outcome.files})
            return outcome
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    context = _Context(recipe, out, Ranks(torch.device(device), group.get("rank", 0), group["world_size"]), progress)
    written, summary = ANALYSES[recipe.analysis](context)
    return RecipeOutcome(recipe.name, recipe.analysis, tuple(written), summary, time.perf_counter() - started,
                         tuple(context.warnings), tuple(context.files))


def run_recipes(paths: Sequence[str | Path], out: str | Path, device: torch.device | str = "cpu", *,
                progress: bool = True, force: bool = False, allow_code: bool = True,
                announce: Callable[[Recipe], None] | None = None,
                announce_code: Callable[[Recipe, Path], None] | None = None) -> list[RecipeOutcome]:
    """Load and validate the recipe files (every one, and their outputs distinct) before anything
    is computed, then run them into the report directory ``out`` (one :class:`OutputDirectory`:
    locked, staged, published whole at the end; files of recipes not run are kept). ``announce``
    is called with each recipe as it starts. Returns the outcomes in the order of ``paths``.

    Code: a recipe's ``model`` names a .py file inside its own directory tree, imported when that
    recipe runs. With ``allow_code=False`` a run whose recipes name code is refused before anything
    is imported or computed; otherwise ``announce_code`` is called with each (recipe, file) once
    every recipe and the output location have been checked, before the first recipe runs.

    Under torch.distributed with N > 1 ranks (``lrnn reproduce`` under ``torchrun``) every rank
    calls it with the same arguments. Every rank validates the recipes and rank 0 opens ``out``,
    one step that fails on every rank when it fails on one (:func:`all_or_none`). Then all ranks
    run the collective recipes (robustness: ``distributed_sweep``; Hessian: ``DistributedOperator``
    over the ranks' shards of the batches when there are at least N, else rank 0 alone) in the
    order of ``paths``, each with its loading step shared the same way; an error inside the sweep
    is raised on every rank, and a rank that fails inside the Hessian's products exits and
    ``torchrun`` stops the others. After them the other ranks return (with no outcomes) and
    rank 0 runs the remaining recipes and publishes. Each recipe seeds itself, so running the
    collective ones first changes no result. Only rank 0 writes (the directory, its lock and
    staging); the other ranks write nothing.
    """
    group = distributed_info()
    rank, world_size = group.get("rank", 0), group["world_size"]
    step = all_or_none if world_size > 1 else contextlib.nullcontext
    with contextlib.ExitStack() as stack:
        with step():
            recipes = [load_recipe(path) for path in paths]
            check_recipe_set(recipes)
            code = [(recipe, recipe.code_file()) for recipe in recipes if recipe.code_file() is not None]
            if code and not allow_code:
                listed = ", ".join(f"{recipe.path} ({file})" for recipe, file in code)
                raise InputError(f"recipes that run code were refused (no code allowed): {listed}")
            directory = None if rank != 0 else stack.enter_context(OutputDirectory(
                out, REPRODUCE_WRITER, force=force, inputs=[p for r in recipes for p in r.inputs()], keep_other_groups=True))
        if announce_code is not None and directory is not None:
            for recipe, file in code:
                announce_code(recipe, file)
        collective = [r for r in recipes if world_size > 1 and r.analysis in _COLLECTIVE_ANALYSES]
        outcomes: dict[int, RecipeOutcome] = {}
        for index, recipe in sorted(enumerate(recipes), key=lambda item: item[1] not in collective):
            if directory is None and recipe not in collective:
                break
            if announce is not None and directory is not None:
                announce(recipe)
            outcomes[index] = run_recipe(recipe, directory, device, progress)
        if directory is None:
            return []
        ordered = [outcomes[index] for index in range(len(recipes))]
        directory.publish({recipe.output: outcome.files for recipe, outcome in zip(recipes, ordered)})
    return ordered


def find_recipes(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob("*.toml"))
