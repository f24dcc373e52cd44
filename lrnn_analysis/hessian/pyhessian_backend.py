"""PyHessian 0.1 (the paper's tool) on the same model and data, for parity with published numbers.

PyHessian is run as it is, on a deep copy of the model (it writes ``.grad`` and switches the
model to eval mode), on the model's device (``cuda=False`` on the CPU), from a fixed torch seed
(it draws from the global generator, inside a forked RNG state here). Its known defects are kept
visible rather than repaired: its "top eigenvalue" is the eigenvalue of largest |λ|, its power
iteration stops on the relative change of the estimate (plus an absolute 1e-6), and its trace
loop stops early when the running mean is negative. Two things are worked around because they
crash it: selected parameters without a gradient (unused in the forward pass) are frozen in the
copy (their Hessian rows are zero), and ``density()`` is not offered (it calls the removed
``torch.eig``). Products are counted by wrapping its HVP functions for the duration of a call.
The copy's ``nn.RNN``/``nn.LSTM``/``nn.GRU`` layers run as their unrolled twins under ``rnn_twin``
as for the native operators (``"auto"``: on CUDA, where the layers cannot be differentiated twice).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..objective import scored_count
from ..statistics import t_halfwidth
from ..unrolled_rnn import twin_layer_names, unrolled_layers
from .eigen import EigenResult
from .operator import Batch, LossFunction, ParamSpec, as_batches, resolve_dtype, select_parameters
from .trace import CONFIDENCE, TraceResult

__all__ = ["pyhessian_eigenvalues", "pyhessian_trace"]


class _PyHessianRun:
    """A PyHessian ``hessian`` object on a prepared copy of the model, counting its products."""

    def __init__(self, model: nn.Module, loss_fn: LossFunction, data: Batch | Iterable[Batch], params: ParamSpec,
                 dtype: torch.dtype | str | None, seed: int, rnn_twin: str) -> None:
        self._module: Any = importlib.import_module("pyhessian.hessian")  # untyped; counting() patches its functions
        reference = next(model.parameters())
        self.dtype = resolve_dtype(dtype, reference.dtype)
        self.device = reference.device
        # PyHessian evaluates in eval mode; the copy is put there before its layers are twinned (a
        # twin refuses a dropout layer in training mode).
        self.model = copy.deepcopy(model).to(self.dtype).eval()
        self.rnn_twin_layers = twin_layer_names(self.model, rnn_twin, self.device)
        # The copy is this run's own: its layers stay twinned until close().
        self._twins = contextlib.ExitStack()
        self._twins.enter_context(unrolled_layers(self.model, self.rnn_twin_layers))
        batches = [(x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device),
                    y.to(self.device, self.dtype) if y.is_floating_point() else y.to(self.device))
                   for x, y in as_batches(data)]
        if len(batches) > 1 and any(scored_count(y) != len(y) for _, y in batches):
            raise InputError("the pyhessian backend weights batches by their samples; per-step targets are weighted by "
                             "their scored steps: use the native backend, or one batch")
        self.frozen = self._freeze(loss_fn, batches[0], set(select_parameters(model, params)))
        self.seed = seed
        self.count = 0
        cuda = self.device.type == "cuda"
        with self._seeded(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            if len(batches) == 1:
                self.hessian = self._module.hessian(self.model, loss_fn, data=batches[0], cuda=cuda)
            else:
                self.hessian = self._module.hessian(self.model, loss_fn, dataloader=batches, cuda=cuda)

    def _freeze(self, loss_fn: LossFunction, batch: Batch, selected: set[str]) -> tuple[str, ...]:
        """Freeze parameters outside ``selected`` and those without a (differentiable) gradient on ``batch``."""
        named = list(self.model.named_parameters())
        for name, p in named:
            p.requires_grad_(name in selected)
        live = [(name, p) for name, p in named if p.requires_grad]
        loss = loss_fn(self.model(batch[0]), batch[1])
        # A loss that reaches no selected parameter has no graph to differentiate.
        grads = torch.autograd.grad(loss, [p for _, p in live], create_graph=True, allow_unused=True) if loss.requires_grad else [None] * len(live)
        frozen = []
        for (name, p), g in zip(live, grads):
            if g is None or not g.requires_grad:
                p.requires_grad_(False)
                frozen.append(name)
        if len(frozen) == len(live):
            raise InputError("no selected parameter has a gradient: PyHessian has nothing to differentiate")
        return tuple(frozen)

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        devices = [self.device.index or torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            yield

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count PyHessian's products (single-batch and data-loader paths) while inside."""
        module_hvp = self._module.hessian_vector_product
        instance_hvp = self.hessian.dataloader_hv_product

        def counted_hvp(*args, **kwargs):
            self.count += 1
            return module_hvp(*args, **kwargs)

        def counted_loader(*args, **kwargs):
            self.count += 1
            return instance_hvp(*args, **kwargs)

        self._module.hessian_vector_product = counted_hvp
        self.hessian.dataloader_hv_product = counted_loader
        try:
            with self._seeded():
                yield
        finally:
            self._module.hessian_vector_product = module_hvp
            del self.hessian.dataloader_hv_product

    def close(self) -> None:
        """Break the parameter ↔ ``.grad`` reference cycle that ``backward(create_graph=True)`` leaves."""
        for p in self.model.parameters():
            p.grad = None
        self.hessian = None
        self._twins.close()

    def hvp(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        """H v with PyHessian's own product (for residuals of its answers)."""
        if self.hessian.full_dataset:
            return list(self.hessian.dataloader_hv_product(v)[1])
        return list(self._module.hessian_vector_product(self.hessian.gradsH, self.hessian.params, v))


def pyhessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Batch | Iterable[Batch],
    *,
    params: ParamSpec = None,
    top_k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    rnn_twin: str = "auto",
) -> EigenResult:
    """PyHessian's ``hessian(...).eigenvalues(maxIter, tol, top_n)``: power iteration, largest |λ| first.

    The residual ‖H v − θ v‖ of each answer (v normalised, θ as PyHessian reports it) is computed
    with one more PyHessian product per pair; ``converged`` is that residual ≤ tol·|θ| (the
    native criterion applied to PyHessian's answer). ``vectors`` is None.
    """
    start_time = time.perf_counter()
    run = _PyHessianRun(model, loss_fn, data, params, dtype, seed, rnn_twin)
    try:
        with run.counting():
            values, vectors = run.hessian.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_k)
            residual_list = []
            for value, v in zip(values, vectors):
                norm = float(torch.sqrt(sum((vi * vi).sum() for vi in v)))
                v = [vi / norm for vi in v]
                hv = run.hvp(v)
                residual_list.append(float(torch.sqrt(sum(((h - value * vi) ** 2).sum() for h, vi in zip(hv, v)))))
    finally:
        run.close()
    values, residuals = np.array(values, dtype=np.float64), np.array(residual_list)
    return EigenResult(
        values=values, residuals=residuals, converged=residuals <= tol * np.abs(values), vectors=None, which="LM",
        k=top_k, tol=tol, atol=0.0, method="pyhessian-power", iterations=run.count - len(values), matvecs=run.count,
        seed=seed, wall_time=time.perf_counter() - start_time,
    )


def pyhessian_trace(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Batch | Iterable[Batch],
    *,
    params: ParamSpec = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    rnn_twin: str = "auto",
) -> TraceResult:
    """PyHessian's ``hessian(...).trace(maxIter, tol)``: Hutchinson with its own stopping rule.

    The estimate is the mean of its samples; the 95% t-interval is computed here from the same
    samples (PyHessian reports none). ``stop_reason`` is ``"pyhessian-rule"`` when it stopped
    before ``max_iter`` (which may be after 2–4 samples on a negative running mean).
    """
    start_time = time.perf_counter()
    run = _PyHessianRun(model, loss_fn, data, params, dtype, seed, rnn_twin)
    try:
        with run.counting():
            samples = [float(s) for s in run.hessian.trace(maxIter=max_iter, tol=tol)]
    finally:
        run.close()
    stopped = len(samples) < max_iter
    return TraceResult(
        estimate=float(np.mean(samples)), ci_halfwidth=t_halfwidth(samples, CONFIDENCE), confidence=CONFIDENCE,
        method="pyhessian-hutchinson", samples=np.array(samples), exact_part=0.0, roundoff_bound=0.0, sketch_size=0, tol=tol,
        max_matvecs=max_iter, converged=stopped, stop_reason="pyhessian-rule" if stopped else "budget",
        matvecs=run.count, seed=seed, wall_time=time.perf_counter() - start_time,
    )
