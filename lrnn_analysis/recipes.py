"""Declarative analysis recipes (``analyses/*.toml``) and the runner behind ``lrnn reproduce``.

A recipe names checkpoints, a task, one analysis, its settings, a seed and an output
stem. Relative checkpoint paths are resolved against the project root, the parent of the
folder holding the recipe. Running it writes ``<out>/<output>.csv`` (the tidy table),
``<output>.json`` (table, settings, seed, versions, device, timing) and
``<output>.png``/``.pdf`` (the figure drawn from the table).

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

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import analyses, plots
from .checkpoints import load_checkpoint
from .data import Task, load_task
from .io import write_csv, write_json
from .models import RecurrentModel
from .robustness import SweepModel, hessian_directions, recurrent_parameter_names, sweep
from .runtime import environment
from .stability import phase_diagram

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

RECIPE_KEYS = {"name", "analysis", "task", "task_options", "split_seed", "checkpoints", "labels", "seed", "output",
               "settings", "description"}


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

    @property
    def root(self) -> Path:
        return self.path.resolve().parent.parent

    def checkpoint_paths(self) -> list[Path]:
        return [p if p.is_absolute() else self.root / p for p in map(Path, self.checkpoints)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "analysis": self.analysis, "output": self.output, "path": str(self.path),
                "task": self.task, "task_options": self.task_options, "split_seed": self.split_seed,
                "checkpoints": list(self.checkpoints), "labels": list(self.labels), "seed": self.seed,
                "settings": self.settings, "description": self.description}


@dataclass(frozen=True)
class RecipeOutcome:
    name: str
    analysis: str
    outputs: tuple[str, ...]
    summary: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "analysis": self.analysis, "outputs": list(self.outputs), "summary": self.summary,
                "seconds": self.seconds}


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate one recipe file (errors name the file)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: no such recipe") from error
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: invalid TOML ({error})") from error
    unknown = set(data) - RECIPE_KEYS
    missing = {"name", "analysis", "output"} - set(data)
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    if data["analysis"] not in ANALYSES:
        raise ValueError(f"{path}: unknown analysis {data['analysis']!r}; expected one of {sorted(ANALYSES)}")
    labels = tuple(data.get("labels", ()))
    checkpoints = tuple(data.get("checkpoints", ()))
    if labels and len(labels) != len(checkpoints):
        raise ValueError(f"{path}: {len(labels)} labels for {len(checkpoints)} checkpoints")
    if not isinstance(data.get("settings", {}), dict):
        raise ValueError(f"{path}: settings must be a table")
    return Recipe(name=str(data["name"]), analysis=data["analysis"], output=str(data["output"]), path=path,
                  task=data.get("task"), task_options=dict(data.get("task_options", {})),
                  split_seed=int(data.get("split_seed", 0)), checkpoints=checkpoints, labels=labels,
                  seed=int(data.get("seed", 0)), settings=dict(data.get("settings", {})),
                  description=str(data.get("description", "")))


@dataclass
class _Context:
    recipe: Recipe
    out_dir: Path
    device: torch.device
    progress: bool

    def setting(self, key: str, default: Any) -> Any:
        return self.recipe.settings.get(key, default)

    def _labelled_paths(self) -> list[tuple[str, Path]]:
        paths = self.recipe.checkpoint_paths()
        return list(zip(self.recipe.labels or tuple(p.stem for p in paths), paths))

    def models(self) -> dict[str, RecurrentModel]:
        return {label: load_checkpoint(path).model.to(self.device).eval() for label, path in self._labelled_paths()}

    def metadata(self) -> dict[str, dict[str, Any]]:
        return {label: load_checkpoint(path).metadata for label, path in self._labelled_paths()}

    def task(self) -> Task:
        if self.recipe.task is None:
            raise ValueError(f"{self.recipe.path}: analysis {self.recipe.analysis} needs a task")
        return load_task(self.recipe.task, seed=self.recipe.split_seed, **self.recipe.task_options)

    def batches(self, task: Task) -> list[tuple[torch.Tensor, torch.Tensor]]:
        split = getattr(task, self.setting("split", "train"))
        return split.batches(int(self.setting("batch_size", 128)), int(self.setting("batches", 1)), self.device)

    def write(self, rows: list[dict[str, Any]], figure, extra: dict[str, Any] | None = None, suffix: str = "") -> list[str]:
        stem = self.out_dir / f"{self.recipe.output}{suffix}"
        write_csv(stem.with_suffix(".csv"), rows)
        write_json(stem.with_suffix(".json"), {"recipe": self.recipe.to_dict(), "rows": rows, **(extra or {}),
                                               "environment": environment(self.device)})
        written = [str(stem.with_suffix(".csv")), str(stem.with_suffix(".json"))]
        if figure is not None:
            written += [str(p) for p in plots.save_figure(figure, stem)]
            plots.plt.close(figure)
        return written


def _spectra(ctx: _Context) -> tuple[list[str], str]:
    eigen_rows, model_rows = analyses.spectra_tables(ctx.models())
    written = ctx.write(eigen_rows, plots.plot_spectra(eigen_rows, model_rows), {"models": model_rows})
    written += ctx.write(model_rows, None, suffix="_summary")
    worst = max(model_rows, key=lambda r: r["alpha_A"])
    return written, f"{len(model_rows)} models; largest alpha(A) {worst['alpha_A']:+.3g} ({worst['model']})"


def _certificates(ctx: _Context) -> tuple[list[str], str]:
    models = ctx.models()
    task = ctx.task()
    accuracy = {r["model"]: r["accuracy"] for r in analyses.accuracy_table(models, task.test.x, task.test.y, task.is_classification)}
    rows = analyses.certificate_table(models, ctx.setting("certificates", None), ctx.setting("time_budget", 30.0),
                                      ctx.metadata())
    for row in rows:
        row["test_accuracy"] = accuracy[row["model"]]
        row["parameters"] = sum(p.numel() for p in models[row["model"]].parameters())
    eigen_rows, model_rows = analyses.spectra_tables(models)
    written = ctx.write(rows, plots.plot_spectra(eigen_rows, model_rows))
    summary = analyses.certified_summary(rows)
    written += ctx.write(summary, plots.plot_certified_accuracy(summary), suffix="_accuracy")
    certified = sorted({r["model"] for r in rows if r["holds"]})
    return written, f"certified: {', '.join(certified) or 'none'}"


def _hessian(ctx: _Context) -> tuple[list[str], str]:
    task = ctx.task()
    summary, density = analyses.hessian_tables(
        ctx.models(), ctx.batches(task), task.is_classification, params=ctx.setting("params", None),
        trace_matvecs=int(ctx.setting("trace_matvecs", 100)), density=bool(ctx.setting("density", True)),
        density_probes=int(ctx.setting("density_probes", 4)), density_steps=int(ctx.setting("density_steps", 40)),
        seed=ctx.recipe.seed, progress=ctx.progress)
    written = ctx.write(summary, plots.plot_hessian_summary(summary))
    if density:
        written += ctx.write(density, plots.plot_density(density), suffix="_density")
    top = min(summary, key=lambda r: r["lambda_max"])
    return written, f"smallest lambda_max {top['lambda_max']:.4g} ({top['model']})"


def _robustness(ctx: _Context) -> tuple[list[str], str]:
    task = ctx.task()
    grid = ctx.setting("grid", {})
    recurrent_only = bool(ctx.setting("recurrent_only", False))
    models = []
    for (label, model), path in zip(ctx.models().items(), ctx.recipe.checkpoints):
        directions = None
        if "hessian-direction" in grid:
            names = recurrent_parameter_names(model) if recurrent_only else None
            directions = hessian_directions(model, task, int(ctx.setting("hessian_k", 1)), params=names, seed=ctx.recipe.seed)
        models.append(SweepModel(label, str(path), model, directions))
    result = sweep(models, task, grid, int(ctx.setting("seeds", 5)), split=ctx.setting("split", "test"),
                   device=ctx.device, max_samples=ctx.setting("max_samples", None),
                   recurrent_only=recurrent_only, progress=ctx.progress)
    written = ctx.write(result.rows, plots.plot_robustness(result.summary), {"summary": result.summary, "settings": result.settings})
    written += ctx.write(result.summary, None, suffix="_summary")
    top_level = max(r["level"] for r in result.summary)
    at_top = [r for r in result.summary if r["level"] == top_level and r["accuracy_drop"] is not None]
    best = min(at_top, key=lambda r: r["accuracy_drop"]) if at_top else None
    return written, f"{len(result.rows)} rows" + (f"; smallest drop at level {top_level:g}: {best['model']} ({best['accuracy_drop']:.3f})" if best else "")


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
    return written, f"{sum(c['holds'] for c in cells)} of {len(cells)} cells certified"


def _training_spectra(ctx: _Context) -> tuple[list[str], str]:
    rows = analyses.training_log_table({label: meta.get("log", []) for label, meta in ctx.metadata().items()})
    written = ctx.write(rows, plots.plot_training_spectra(rows, tuple(ctx.setting("quantities", ("alpha_A", "mu2_A", "norm_W")))))
    return written, f"{len(rows)} epochs logged"


def _landscape(ctx: _Context) -> tuple[list[str], str]:
    task = ctx.task()
    plane_spec = ctx.setting("plane_steps", None)
    lines, plane = analyses.landscape_tables(ctx.models(), ctx.batches(task), task.is_classification,
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
}


def run_recipe(recipe: Recipe, out_dir: str | Path, device: torch.device | str = "cpu", progress: bool = True) -> RecipeOutcome:
    """Run one recipe and write its table, provenance and figure into ``out_dir``."""
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    context = _Context(recipe, Path(out_dir), torch.device(device), progress)
    written, summary = ANALYSES[recipe.analysis](context)
    return RecipeOutcome(recipe.name, recipe.analysis, tuple(written), summary, time.perf_counter() - started)


def find_recipes(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob("*.toml"))
