"""A stability monitor for any training loop: call ``update(model, epoch=...)`` once per epoch.

    monitor = StabilityMonitor("my-rnn", hessian=(loss_fn, (x_batch, y_batch)))
    for epoch in range(epochs):
        train_one_epoch(...)
        monitor.update(model, epoch=epoch, val_accuracy=acc)
    monitor.write_csv("training_spectra.csv")
    plot_training_spectra(monitor.rows)

Each update adds one tidy row per recurrent component of the model:

* every Lur'e form (``lure_forms()`` or ``lure_form()``, e.g. the toolkit's models and
  ``SequenceClassifier`` over ``nn.RNN``; one per layer of a stack) or, failing that, every
  ``torch.nn`` recurrent layer found inside the model: spectra alpha, mu2, ||.||_2 of A and W
  and the cheap certificate tiers (default: the norm test and the P = I tier of the
  scheme's certificates, within ``time_budget`` seconds per update);
* ``nn.LSTM``/``nn.GRU`` layers: the contraction condition of
  :mod:`lrnn_analysis.stability.gated` (needs ``input_bound``);
* a model with ``recurrent_matrices()`` but no Lur'e form: its spectra only.

With ``hessian=(loss_fn, data)`` each row also carries lambda_max of the loss Hessian from
a few Lanczos steps (``hessian_steps`` Hessian-vector products at most) started from the
previous epoch's top eigenvector (a random seeded vector the first time), with its residual
||H v - theta v|| (the estimate is only as good as that residual says). No training framework
is needed.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import InputError
from .hessian import HessianOperator, Lanczos
from .lure import LureSystem
from .models.torchnn import find_recurrent_layers, rnn_lure_forms
from .stability.certificates import certify, default_certificates
from .stability.gated import gated_contraction
from .stability.spectra import mu2, norm2, spectral_abscissa
from .writers import write_csv

__all__ = ["StabilityMonitor"]


class StabilityMonitor:
    """Per-epoch spectra, cheap certificates and (optionally) lambda_max of the Hessian, as tidy rows."""

    def __init__(
        self,
        label: str = "model",
        *,
        certificates: bool = True,
        tiers: Sequence[str] = ("norm", "P=I"),
        time_budget: float = 2.0,
        input_bound: float | None = None,
        hessian: tuple[Callable[[Tensor, Tensor], Tensor], Any] | None = None,
        hessian_params: str | Sequence[str] | None = None,
        hessian_steps: int = 8,
        hessian_tol: float = 1e-2,
        seed: int = 0,
    ) -> None:
        if hessian_steps < 1 or time_budget <= 0:
            raise InputError("hessian_steps must be >= 1 and time_budget > 0")
        self.label = label
        self.certificates = certificates
        self.tiers = tuple(tiers)
        self.time_budget = float(time_budget)
        self.input_bound = input_bound
        self.hessian = hessian
        self.hessian_params = hessian_params
        self.hessian_steps = int(hessian_steps)
        self.hessian_tol = float(hessian_tol)
        self.seed = seed
        self.rows: list[dict[str, Any]] = []
        self._vector: Tensor | None = None

    def update(self, model: nn.Module, epoch: int, **metrics: Any) -> list[dict[str, Any]]:
        """Measure ``model`` now; returns (and keeps) this epoch's rows. ``metrics`` are copied into every row."""
        started = time.perf_counter()
        common: dict[str, Any] = {"epoch": epoch, **metrics}
        if self.hessian is not None:
            common.update(self._lambda_max(model))
        rows = [{"model": self.label if label is None else f"{self.label} {label}", **common, **values}
                for label, values in self._components(model)]
        seconds = time.perf_counter() - started
        for row in rows:
            row["monitor_seconds"] = seconds
        self.rows.extend(rows)
        return rows

    def write_csv(self, path: str | Path) -> Path:
        """All rows so far as one CSV (columns: the union of every row's keys, in first-seen order)."""
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        return write_csv(path, self.rows, columns)

    def _components(self, model: nn.Module) -> list[tuple[str | None, dict[str, Any]]]:
        systems = _lure_systems(model)
        if systems:
            deadline = time.monotonic() + self.time_budget
            return [(None if len(systems) == 1 else f"layer {l}", {"layer": l, **self._system_values(s, deadline)})
                    for l, s in enumerate(systems)]
        found = find_recurrent_layers(model)
        if found:
            return [item for layer in found for item in self._layer_values(layer.name, layer.module)]
        if hasattr(model, "recurrent_matrices"):
            with torch.no_grad():
                matrices = model.recurrent_matrices(torch.float64)
            return [(None, {name: value for key, X in matrices.items() for name, value in
                            _matrix_summary(key, X.cpu().numpy()).items()})]
        return [(None, {})]

    def _system_values(self, system: LureSystem, deadline: float) -> dict[str, Any]:
        values: dict[str, Any] = {**_matrix_summary("A", system.A), **_matrix_summary("W", system.W)}
        if self.certificates:
            for result in certify(system, default_certificates(system), max(deadline - time.monotonic(), 1e-3),
                                  tiers=self.tiers):
                values[f"{result.name}_holds"] = result.holds
                values[f"{result.name}_rate"] = result.rate
                values[f"{result.name}_tier"] = result.tier
                values[f"{result.name}_budget_exhausted"] = result.budget_exhausted
        return values

    def _layer_values(self, name: str, rnn: nn.RNNBase) -> list[tuple[str | None, dict[str, Any]]]:
        prefix = f"{name} " if name else ""
        if isinstance(rnn, nn.RNN):
            deadline = time.monotonic() + self.time_budget
            return [(f"{prefix}layer {l}", {"layer": l, **self._system_values(s, deadline)})
                    for l, s in enumerate(rnn_lure_forms(rnn))]
        out = []
        for result in gated_contraction(rnn, self.input_bound):
            values: dict[str, Any] = {"layer": result.layer}
            if self.certificates:
                values.update({f"{result.name}_holds": result.holds, f"{result.name}_rate": result.rate,
                               f"{result.name}_value": result.value})
            out.append((f"{prefix}layer {result.layer}", values))
        return out

    def _lambda_max(self, model: nn.Module) -> dict[str, Any]:
        loss_fn, data = self.hessian
        op = HessianOperator(model, loss_fn, data, params=self.hessian_params)
        dim = op.shape[0]
        if self._vector is None or self._vector.numel() != dim:
            start = torch.as_tensor(np.random.default_rng(self.seed).standard_normal(dim), device=op.device)
        else:
            start = self._vector
        process = Lanczos(op.apply, start)  # on the operator's device, in float64
        while True:
            process.step()
            theta, S, estimates = process.ritz()
            if estimates[-1] <= self.hessian_tol * abs(theta[-1]) or process.exhausted or process.steps >= self.hessian_steps:
                break
        s = torch.as_tensor(S[:, -1], device=op.device)
        vector = process.basis_tensor @ s
        residual = float(torch.linalg.vector_norm(process.products_tensor @ s - theta[-1] * vector))
        self._vector = vector
        return {"lambda_max": float(theta[-1]), "lambda_max_residual": residual, "hessian_matvecs": process.steps}


def _lure_systems(model: nn.Module) -> list[LureSystem]:
    forms = getattr(model, "lure_forms", None)
    if callable(forms):
        systems = forms()
        if systems is not None:
            return list(systems)
    form = getattr(model, "lure_form", None)
    if callable(form):
        system = form()
        if system is not None:
            return [system]
    return []


def _matrix_summary(name: str, X: np.ndarray) -> dict[str, float]:
    return {f"alpha_{name}": spectral_abscissa(X), f"mu2_{name}": mu2(X), f"norm_{name}": norm2(X)}
