"""Sweeps of perturbation x level x seed over several models, as a tidy table.

One row per (model, checkpoint, perturbation, level, seed) with accuracy (per token for per-step
targets), loss, the task's headline ``metric`` (accuracy, perplexity or mse) and its ``value``, n
(samples), count (scored targets) and device; the summary has the mean and 95% confidence
interval over seeds, and the metric's drop from the clean model (how much worse it got, in the
metric's units). Parameter
draws are evaluated together: the perturbed parameter sets are stacked and the model
is run once over the stack with ``torch.func.vmap`` of ``functional_call`` (the plain
loop over draws, ``batched=False``, gives the same numbers to rounding).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..choices import perturbation_grid
from ..environment import environment
from ..errors import InputError
from ..evaluation import Evaluation, NonFiniteOutputs, evaluate
from ..model_under_analysis import ModelUnderAnalysis, as_model_under_analysis
from ..objective import Objective, Totals, scored_steps
from ..parameters import require_parameters
from ..progress import progress_bar
from ..statistics import t_halfwidth
from ..task import Split, Task, task_from_arrays
from ..training_split import check_training_data
from .perturbations import (
    ParameterDirections,
    Perturbation,
    embedding_noise,
    is_deterministic,
    perturb_inputs,
    perturb_parameters,
    token_input_embedding,
)

__all__ = ["ROW_FIELDS", "SUMMARY_FIELDS", "SweepModel", "SweepResult", "evaluate_parameter_draws", "evaluation_task",
           "prepare_models", "recurrent_parameter_names", "summarize", "sweep", "sweep_models"]

ROW_FIELDS = ("model", "checkpoint", "perturbation", "target", "level", "seed", "accuracy", "loss", "metric", "value", "n",
              "count", "device")
SUMMARY_FIELDS = ("model", "checkpoint", "perturbation", "level", "seeds", "accuracy_mean", "accuracy_ci95",
                  "accuracy_drop", "loss_mean", "loss_ci95", "metric", "value_mean", "value_ci95", "metric_drop")


@dataclass(frozen=True, init=False)
class SweepModel:
    """A model to sweep, how to label it, and (for ``hessian-direction``) its eigenvectors.

    ``model`` is a :class:`ModelUnderAnalysis` (a toolkit model or a plain module is wrapped
    with what it declares)."""

    label: str
    checkpoint: str
    model: ModelUnderAnalysis
    directions: ParameterDirections | None = None

    def __init__(self, label: str, checkpoint: str, model: ModelUnderAnalysis | nn.Module,
                 directions: ParameterDirections | None = None) -> None:
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "checkpoint", checkpoint)
        object.__setattr__(self, "model", as_model_under_analysis(model, name=label))
        object.__setattr__(self, "directions", directions)


@dataclass(frozen=True)
class SweepResult:
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "summary": self.summary, "settings": self.settings, "environment": self.environment,
                "warnings": list(self.warnings)}


def recurrent_parameter_names(model: ModelUnderAnalysis | nn.Module, patterns: str | Sequence[str] | None = None) -> list[str]:
    """The parameters ``patterns`` (globs) match, or else the model's declared recurrent
    parameters; an error when a pattern matches nothing or the model declares none."""
    subject = as_model_under_analysis(model)
    if patterns is not None:
        return require_parameters(subject.module, patterns, subject.name)
    return subject.recurrent_names()


def prepare_models(models: Sequence[SweepModel], task: Task, plan: Mapping[str, Any], recurrent_only: bool,
                   recurrent: str | Sequence[str] | None) -> tuple[list[list[str] | None], dict[str, dict[str, Any]], list[str]]:
    """What ``sweep`` checks and records per model before evaluating anything: that each fits the
    task (and has its Hessian directions when ``plan`` needs them), the parameters each parameter
    perturbation touches (a list parallel to ``models``; None: all), each model's training-data
    check by checkpoint, and the warnings."""
    keys = [(entry.label, entry.checkpoint) for entry in models]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise InputError(f"models listed more than once (label, checkpoint): {repeated}")
    restricted = recurrent is not None or recurrent_only
    selected: list[list[str] | None] = []
    training_data: dict[str, dict[str, Any]] = {}
    warnings = []
    for entry in models:
        entry.model.check_fits(task, entry.checkpoint)
        if "hessian-direction" in plan and entry.directions is None:
            raise InputError(f"{entry.label}: hessian-direction needs its Hessian eigenvectors")
        selected.append(recurrent_parameter_names(entry.model, recurrent) if restricted else None)
        check = check_training_data(entry.model.metadata, task)
        training_data[entry.checkpoint] = check.to_dict()
        if check.warning:
            warnings.append(f"{entry.label} ({entry.checkpoint}): {check.warning}")
    return selected, training_data, warnings


Models = SweepModel | ModelUnderAnalysis | nn.Module | Sequence[SweepModel | ModelUnderAnalysis | nn.Module] | Mapping[str, ModelUnderAnalysis | nn.Module]
Data = Task | Split | tuple[Any, Any] | Iterable[tuple[Any, Any]]


def sweep_models(models: Models) -> list[SweepModel]:
    """``models`` as a list of :class:`SweepModel`: one model (a module or a model under analysis),
    a sequence of them, or a mapping label -> model. A model given without a label is labelled by
    its name (numbered when names repeat) and its checkpoint column reads ``in-memory``."""
    if isinstance(models, (SweepModel, ModelUnderAnalysis, nn.Module)):
        models = [models]
    if isinstance(models, Mapping):
        return [m if isinstance(m, SweepModel) else SweepModel(str(label), "in-memory", m) for label, m in models.items()]
    entries = list(models)
    if not entries:
        raise InputError("no models to sweep")
    names = [as_model_under_analysis(m).name if not isinstance(m, SweepModel) else m.label for m in entries]
    repeated = {name for name in names if names.count(name) > 1}
    counters: dict[str, int] = {}
    swept = []
    for model, name in zip(entries, names):
        if isinstance(model, SweepModel):
            swept.append(model)
            continue
        if name in repeated:
            counters[name] = counters.get(name, 0) + 1
            name = f"{name}-{counters[name]}"
        swept.append(SweepModel(name, "in-memory", model))
    return swept


def evaluation_task(data: Data, models: Sequence[SweepModel] = ()) -> Task:
    """``data`` as a :class:`Task`: a task itself; or the evaluation samples alone — a :class:`Split`,
    an ``(x, y)`` pair of tensors or arrays, or an iterable of ``(x, y)`` batches (a DataLoader),
    concatenated — as a task whose test split is those samples and whose training and validation
    splits are empty (named ``arrays``: input noise draws its range from the samples; nothing is
    claimed about the model's training data; ``hessian-direction`` needs a task with training
    samples). Integer labels are classes, as many as the first model has
    outputs; floating-point targets of shape (N, k) or (N, T, k) are regression targets; integer
    inputs (N, T) are token ids; per-step targets' steps marked unscored (``IGNORE_INDEX`` labels,
    NaN rows) stay unscored."""
    if isinstance(data, Task):
        return data
    if isinstance(data, Split):
        x, y = data.x, data.y
    elif isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple):
        x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    else:
        try:
            batches = [tuple(batch) for batch in data]
        except TypeError:
            raise InputError(f"data must be a Task, a Split, an (x, y) pair or an iterable of (x, y) batches, "
                             f"got {type(data).__name__}") from None
        if not batches or any(len(b) != 2 for b in batches):
            raise InputError("data: expected a non-empty iterable of (x, y) batches")
        x, y = torch.cat([torch.as_tensor(b[0]) for b in batches]), torch.cat([torch.as_tensor(b[1]) for b in batches])
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    num_classes = None
    if not y.is_floating_point() and models:
        module = models[0].model.module
        with torch.no_grad():
            was_training = module.training
            module.eval()
            try:
                sample = x[:1].to(next(module.parameters()).device)
                num_classes = int(module(sample if not sample.is_floating_point() else sample.float()).shape[-1])
            finally:
                module.train(was_training)
    mask = None
    if (y.dtype == torch.int64 and y.ndim == 2) or (y.is_floating_point() and y.ndim == 3):
        # Per-step targets whose unscored steps are already marked (IGNORE_INDEX, NaN rows), e.g. a Task's split.
        mask = scored_steps(y)
        y = y.masked_fill(~mask if y.ndim == 2 else ~mask[..., None], 0)
    checked = task_from_arrays(x, y, x, y, name="arrays", num_classes=num_classes, mask_train=mask, mask_test=mask,
                               description=f"the {len(x)} samples given (as the test split; no training split)")
    empty = Split(checked.test.x[:0], checked.test.y[:0])
    return replace(checked, train=empty, val=empty)


def sweep(
    models: Models,
    data: Data,
    grid: Mapping[str, Sequence[float]],
    seeds: int | Sequence[int] = 5,
    *,
    split: str = "test",
    device: torch.device | str = "cpu",
    batch_size: int = 1000,
    max_samples: int | None = None,
    recurrent_only: bool = False,
    recurrent: str | Sequence[str] | None = None,
    draws_per_call: int = 32,
    batched: bool | None = None,
    progress: bool = True,
) -> SweepResult:
    """Evaluate every model under every (perturbation kind, level) in ``grid`` for every seed.

    ``models``: see :func:`sweep_models` (one module or model under analysis, a list, a mapping
    label -> model, or :class:`SweepModel` entries). ``data``: see :func:`evaluation_task` (a
    :class:`Task`, or the samples themselves). Inputs come from the task's ``split`` (the first
    ``max_samples``). Parameter noise
    perturbs all parameters; with ``recurrent_only`` only each model's declared recurrent
    parameters, and with ``recurrent`` (glob patterns) only those it matches. A model that
    declares none, or a pattern that matches nothing, is an error (never a sweep that
    perturbs nothing). ``warnings`` says which models' training split is not known to be
    ``task``'s (see :mod:`lrnn_analysis.training_split`): their accuracy may include training samples.
    ``batched`` (default: on CUDA only) evaluates up to ``draws_per_call`` parameter draws in one
    vmapped call. On CPU evaluation is compute-bound and the plain loop over draws was measured
    faster (bench/robustness.py), so it is the CPU default. A kind may be named by its alias
    (``input-noise``, ``param-noise``); results name it canonically (``gaussian``, ``gaussian-relative``).
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise InputError("need at least one seed")
    if split not in ("train", "val", "test"):
        raise InputError(f"split must be train, val or test, got {split!r}")
    models = sweep_models(models)
    task = evaluation_task(data, models)
    grid = perturbation_grid(grid)
    plan = {kind: [Perturbation(kind, level) for level in levels] for kind, levels in grid.items()}
    selected, training_data, warnings = prepare_models(models, task, plan, recurrent_only, recurrent)
    device = torch.device(device)
    if batched is None:
        batched = device.type == "cuda"
    samples: Split = getattr(task, split)
    x, y = samples.x[:max_samples].to(device), samples.y[:max_samples].to(device)
    objective = task.objective
    tokens = task.input_kind == "tokens"
    if tokens:
        refused = [kind for kind in plan if kind in ("salt-pepper", "occlusion", "fgsm")]
        if refused:
            raise InputError(f"{', '.join(refused)}: the inputs of task {task.name} are token ids; on token inputs only "
                             "gaussian input noise is defined (added to the embedding's output)")
    data_range = task.input_range
    started = time.perf_counter()
    total = sum(len(p) * (1 if is_deterministic(kind, entry.directions) else len(seed_list)) for entry in models for kind, p in plan.items())
    rows: list[dict[str, Any]] = []
    with progress_bar(total=total, desc="robustness", unit="eval", enabled=progress) as bar:
        for index, entry in enumerate(models):
            model = entry.model.module.to(device).eval()
            embedding = token_input_embedding(model, entry.label) if tokens and "gaussian" in plan else None
            clean = evaluate(model, x, y, objective, batch_size, name=entry.label)
            params = {name: p.detach() for name, p in model.named_parameters()}
            names = selected[index]

            def record(p: Perturbation, result: Evaluation) -> None:
                rows.append({"model": entry.label, "checkpoint": entry.checkpoint, "perturbation": p.kind,  # noqa: B023 (this model's rows)
                             "target": p.target, "level": p.level, "seed": p.seed, "accuracy": result.accuracy,
                             "loss": result.loss, "metric": result.metric, "value": result.value, "n": len(x),
                             "count": result.count, "device": str(device)})
                bar.update()

            for kind, base in plan.items():
                kind_seeds = [0] if is_deterministic(kind, entry.directions) else seed_list
                draws = [Perturbation(kind, b.level, s) for b in base for s in kind_seeds]
                pending = []
                for p in draws:
                    if p.level == 0:
                        record(p, clean)
                    elif p.target == "input" and embedding is not None:
                        with embedding_noise(embedding, p):
                            record(p, evaluate(model, x, y, objective, batch_size, name=_under(entry.label, p)))
                    elif p.target == "input":
                        gradient = ((lambda inputs: _input_gradient(model, inputs, y, objective))  # noqa: B023 (used now)
                                    if kind == "fgsm" else None)
                        perturbed = perturb_inputs(x, p, data_range, gradient)
                        record(p, evaluate(model, perturbed, y, objective, batch_size, name=_under(entry.label, p)))
                    else:
                        pending.append(p)
                for start in range(0, len(pending), draws_per_call):
                    chunk = pending[start:start + draws_per_call]
                    stacked = [perturb_parameters(params, p, names, entry.directions) for p in chunk]
                    scores = evaluate_parameter_draws(model, stacked, x, y, objective, batch_size, batched,
                                                      names=[_under(entry.label, p) for p in chunk])
                    for p, result in zip(chunk, scores):
                        record(p, result)
    settings = {"task": task.to_dict(), "split": split, "n": len(x), "grid": {k: list(map(float, v)) for k, v in grid.items()},
                "seeds": seed_list, "recurrent_only": recurrent_only, "recurrent": recurrent,
                "perturbed_parameters": {entry.checkpoint: names for entry, names in zip(models, selected)},
                "training_data": training_data, "batched": batched, "seconds": time.perf_counter() - started}
    return SweepResult(rows, summarize(rows), settings, environment(device), tuple(warnings))


def _under(label: str, perturbation: Perturbation) -> str:
    """How an error names a model under one perturbation draw."""
    return f"{label} under {perturbation.kind} at level {perturbation.level:g} (seed {perturbation.seed})"


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor, objective: Objective, batch_size: int = 1000) -> Tensor:
    """d loss / d x for each sample, the loss summed over the scored targets (the model's
    parameters get no gradient)."""
    grads = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].detach().requires_grad_(True)
        yb = y[start:start + batch_size]
        loss = objective.loss_fn()(model(xb), yb) * objective.count(yb)
        grads.append(torch.autograd.grad(loss, xb)[0])
    return torch.cat(grads)


def evaluate_parameter_draws(
    model: nn.Module,
    draws: Sequence[Mapping[str, Tensor]],
    x: Tensor,
    y: Tensor,
    objective: Objective | None = None,
    batch_size: int = 1000,
    batched: bool = True,
    names: Sequence[str] | None = None,
) -> list[Evaluation]:
    """The evaluation (loss and metrics, scored by ``objective``, default the one ``y`` means)
    of the model under each parameter set in ``draws``.

    ``batched`` runs all draws in one vmapped functional call per data batch; otherwise
    one functional call per draw. A draw whose outputs are not all finite raises
    ``InputError`` naming it (``names``, one per draw; default "parameter draw i").
    """
    count = len(draws)
    names = list(names) if names is not None else [f"parameter draw {i + 1} of {count}" for i in range(count)]
    if len(names) != count:
        raise InputError(f"{len(names)} names for {count} parameter draws")
    objective = objective or Objective.of_targets(y)
    counts = [NonFiniteOutputs() for _ in range(count)]
    totals = [Totals(0.0, 0 if objective.classification else None, 0) for _ in range(count)]
    stacked = {name: torch.stack([d[name] for d in draws]) for name in draws[0]} if batched else None
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            if batched:
                outputs = vmap(lambda p: functional_call(model, p, (xb,)))(stacked)  # noqa: B023 (called at once)
            else:
                outputs = torch.stack([functional_call(model, dict(d), (xb,)) for d in draws])
            for i in range(count):
                objective.check_outputs(outputs[i], yb, names[i])
                counts[i].add(outputs[i])
                totals[i] = totals[i] + objective.totals(outputs[i], yb)
    for name, count_of in zip(names, counts):
        count_of.check(name, len(x))
    return [Evaluation.of_totals(total, len(x), objective) for total in totals]


def _ci95(values: np.ndarray) -> float | None:
    """The 95% t-interval's half-width over seeds; None for a single draw (no spread to report)."""
    if len(values) < 2:
        return None
    if np.all(values == values[0]):
        return 0.0
    return t_halfwidth(values)


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and 95% t-interval over seeds per (model, checkpoint, perturbation, level); the drops
    are measured from the clean model (the level-0 rows, else none): ``accuracy_drop`` the fall of
    accuracy, ``metric_drop`` how much worse the headline metric got (a fall of accuracy, a rise of
    perplexity or mse)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["checkpoint"], row["perturbation"], row["level"]), []).append(row)
    clean = {(k[0], k[1]): np.mean([r["accuracy"] for r in g]) for k, g in groups.items()
             if k[3] == 0 and g[0]["accuracy"] is not None}
    clean_value = {(k[0], k[1]): np.mean([r["value"] for r in g]) for k, g in groups.items() if k[3] == 0}
    summary = []
    for (model, checkpoint, kind, level), group in groups.items():
        losses = np.array([r["loss"] for r in group], dtype=float)
        accuracies = np.array([r["accuracy"] for r in group], dtype=float) if group[0]["accuracy"] is not None else None
        base = clean.get((model, checkpoint))
        values = np.array([r["value"] for r in group], dtype=float)
        metric = group[0]["metric"]
        base_value = clean_value.get((model, checkpoint))
        drop = None if base_value is None else Objective.worsening_of(metric, float(base_value), float(values.mean()))
        summary.append({
            "model": model, "checkpoint": checkpoint, "perturbation": kind, "level": level, "seeds": len(group),
            "accuracy_mean": float(accuracies.mean()) if accuracies is not None else None,
            "accuracy_ci95": _ci95(accuracies) if accuracies is not None else None,
            "accuracy_drop": float(base - accuracies.mean()) if accuracies is not None and base is not None else None,
            "loss_mean": float(losses.mean()), "loss_ci95": _ci95(losses),
            "metric": metric, "value_mean": float(values.mean()), "value_ci95": _ci95(values), "metric_drop": drop,
        })
    return summary
