"""Tidy tables of what no pipeline owns: spectra, clean accuracy, training logs, loss landscapes.

Each function returns lists of dicts, one row per observation, ready for CSV and for
the functions of :mod:`lrnn_analysis.plots`. Models are :class:`ModelUnderAnalysis` (a
toolkit model or a plain module is wrapped with what it declares), keyed by label.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .evaluation import evaluate
from .model_under_analysis import ModelUnderAnalysis, as_model_under_analysis
from .objective import Objective
from .stability import spectrum

if TYPE_CHECKING:
    from .lure import LureSystem
    from .stability.spectra import SpectrumReport

__all__ = ["accuracy_table", "landscape_tables", "spectra_rows", "spectra_tables", "training_log_table"]

Batch = tuple[torch.Tensor, torch.Tensor]
Models = Mapping[str, "ModelUnderAnalysis | torch.nn.Module"]


def _modules(models: Models) -> dict[str, torch.nn.Module]:
    return {label: as_model_under_analysis(model, name=label).module for label, model in models.items()}


def spectra_tables(models: Models) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Eigenvalues of A and W per model (model, matrix, re, im) and one row per model with the
    Bendixson box of A, the scheme and the spectral summary (diagnostics, not certificates).
    Models without a Lur'e form have no rows."""
    eigen_rows, model_rows = [], []
    for label, model in models.items():
        system = as_model_under_analysis(model, name=label).lure_system()
        if system is not None:
            eigen, row = spectra_rows(label, system, spectrum(system))
            eigen_rows += eigen
            model_rows.append(row)
    return eigen_rows, model_rows


def spectra_rows(label: str, system: LureSystem, report: SpectrumReport) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of :func:`spectra_tables` for one model's Lur'e form and its computed spectrum."""
    eigen_rows = [{"model": label, "matrix": matrix, "re": float(v.real), "im": float(v.imag)}
                  for matrix, values in (("A", report.eig_A), ("W", report.eig_W)) for v in values]
    step = report.discretization
    return eigen_rows, {
        "model": label, "method": system.method, "eps": system.eps, **report.bendixson_A.to_dict(),
        "alpha_A": report.abscissa_A, "mu2_A": report.mu2_A, "norm_A": report.norm_A, "norm_W": report.norm_W,
        "step_spectral_radius": None if step is None else step.step_spectral_radius,
        "all_in_stability_region": None if step is None else step.all_in_region,
    }


def accuracy_table(models: Models, x: torch.Tensor, y: torch.Tensor, objective: Objective | None = None) -> list[dict[str, Any]]:
    """Clean loss, accuracy (per token where per step) and the objective's headline metric per
    model on (x, y): rows (model, accuracy, loss, metric, value, n, count, parameters)."""
    rows = []
    for label, model in _modules(models).items():
        result = evaluate(model, x, y, objective)
        rows.append({"model": label, "accuracy": result.accuracy, "loss": result.loss, "metric": result.metric,
                     "value": result.value, "n": result.n, "count": result.count,
                     "parameters": sum(p.numel() for p in model.parameters())})
    return rows


def training_log_table(logs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per-epoch rows (model, epoch, val_accuracy, alpha_X, mu2_X, norm_X) from checkpoint logs."""
    keep = ("epoch", "train_loss", "val_accuracy", "alpha_A", "mu2_A", "norm_A", "alpha_W", "mu2_W", "norm_W")
    return [{"model": label, **{k: entry.get(k) for k in keep}} for label, log in logs.items() for entry in log]


def landscape_tables(
    models: Models,
    batches: Sequence[Batch],
    objective: Objective,
    steps: Sequence[float],
    plane_steps: Sequence[float] | None = None,
    *,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Loss along the top Hessian eigenvector and along a filter-normalised random direction,
    rows (model, direction, t, loss, accuracy, metric, value: the objective's headline metric per
    scored target); with ``plane_steps``, also the loss on the plane
    of two filter-normalised random directions, rows (model, a, b, loss)."""
    from .hessian import HessianOperator, eigenvalues, eigenvector_directions, landscape

    loss_fn = objective.loss_fn()
    lines, plane = [], []
    for label, model in _modules(models).items():
        op = HessianOperator(model, loss_fn, list(batches))
        top = eigenvalues(op, k=1, which="LA", seed=seed)
        for name, directions in (("top Hessian eigenvector", eigenvector_directions(op, top, (0,))), ("random (filter-normalised)", "random")):
            result = landscape(model, loss_fn, list(batches), directions, np.asarray(steps, dtype=float), seed=seed)
            for i, t in enumerate(result.alphas):
                lines.append({"model": label, "direction": name, "t": float(t), "loss": float(result.loss[i]),
                              "accuracy": None if result.accuracy is None else float(result.accuracy[i]),
                              "metric": result.metric, "value": float(result.value[i])})
        if plane_steps is not None:
            axis = np.asarray(plane_steps, dtype=float)
            result = landscape(model, loss_fn, list(batches), "random", (axis, axis), seed=seed)
            plane += [{"model": label, "a": float(a), "b": float(b), "loss": float(result.loss[i, j])}
                      for i, a in enumerate(result.alphas) for j, b in enumerate(result.betas)]
    return lines, plane
