"""The default Hessian analysis behind ``lrnn hessian``: extreme eigenvalues, optional trace and density."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from ..choices import CURVATURE_BACKENDS, CURVATURE_ESTIMATES
from ..environment import environment
from ..errors import InputError
from ..parameters import module_of
from ..unrolled_rnn import twin_layer_names
from ._results import dataclass_dict
from .blocks import BlockTable, block_curvature
from .curvature import OPERATOR_KINDS, curvature_operator
from .density import DensityResult, spectral_density
from .diagonal import DiagonalResult, FrobeniusResult, frobenius_norm_squared
from .diagonal import diagonal as diagonal_estimate
from .eigen import EigenResult, eigenvalues, warm_start
from .operator import DEFAULT_MEMORY_BUDGET, Batch, LossFunction, ParamSpec, as_batches, parameter_selection
from .pyhessian_backend import pyhessian_eigenvalues, pyhessian_trace
from .trace import TraceResult, krylov_start
from .trace import trace as trace_estimate

if TYPE_CHECKING:
    from ..model_under_analysis import ModelUnderAnalysis

__all__ = ["BACKENDS", "HessianReport", "analyze"]

BACKENDS = CURVATURE_BACKENDS
_ESTIMATES = CURVATURE_ESTIMATES


@dataclass(frozen=True)
class HessianReport:
    """Everything one analysis measured, with uncertainties and provenance.

    ``eigen`` holds the eigenpairs (native Hessian: Lanczos, ``which="BE"``, the top_k largest then
    the top_k smallest; GGN/Fisher/EF, positive semi-definite: ``which="LA"``, the top_k largest;
    pyhessian: its power iteration, largest |λ| first). ``lambda_max`` is the largest eigenvalue
    found (for pyhessian: its "top eigenvalue", the largest |λ|, as the paper reports it) and
    ``lambda_min`` the smallest (None for pyhessian, which cannot give it, and for the PSD operators).
    ``matvecs`` totals the operator products of all estimators (a product that several estimators
    asked for with the same seeded probe counted once). ``operator`` describes the
    matrix (``operator["operator"]``: hessian, ggn, fisher or ef), the parameters and data;
    ``diagonal``, ``frobenius`` and ``blocks`` are the optional estimates (``estimates``);
    ``notes`` says what a reader must know to interpret the numbers.
    """

    backend: str
    operator: dict[str, Any]
    lambda_max: float
    lambda_min: float | None
    eigen: EigenResult
    trace: TraceResult | None
    density: DensityResult | None
    diagonal: DiagonalResult | None
    frobenius: FrobeniusResult | None
    blocks: BlockTable | None
    seed: int
    matvecs: int
    wall_time: float
    environment: dict[str, Any]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


def analyze(
    model: nn.Module | ModelUnderAnalysis,
    loss_fn: LossFunction,
    data: Batch | Iterable[Batch],
    *,
    params: ParamSpec = None,
    top_k: int = 1,
    trace: bool = False,
    density: bool = False,
    backend: str = "native",
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    tol: float = 1e-3,
    atol: float = 0.0,
    max_iter: int | None = None,
    trace_method: str = "hutchinson",
    trace_tol: float = 1e-2,
    trace_matvecs: int = 200,
    density_probes: int = 5,
    density_steps: int = 80,
    cache_graph: bool | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    operator: str = "hessian",
    mc_samples: int = 1,
    estimates: Sequence[str] = (),
    diagonal_method: str = "hutchinson",
    estimate_matvecs: int = 100,
    density_scale: str = "linear",
    wrap_operator: Callable[[LinearOperator], LinearOperator] | None = None,
    rnn_twin: str = "auto",
    start: np.ndarray | None = None,
) -> HessianReport:
    """λ_max and λ_min (and the top_k at each end), optionally tr(H) with a CI and the SLQ density.

    ``backend="native"``: one operator (``operator``) shared by ``eigenvalues(which="BE", tol, atol)``,
    ``trace(trace_method, trace_tol, trace_matvecs)`` (``"deflated"``: by the Krylov basis of the
    eigenvalue run, which then starts from the seed stream [seed, 1]) and ``spectral_density(density_probes,
    density_steps)``; ``wrap_operator`` (e.g. ``DistributedOperator`` over the ranks' shards of
    the data) replaces it by an operator built from it, with the same ``describe()``.
    ``backend="pyhessian"``: PyHessian's power iteration (``tol``, ``max_iter`` default 100) and
    trace (``trace_tol``, ``trace_matvecs`` samples); it has no λ_min and no working density, so
    ``density=True`` is an error there. Every random draw comes from ``seed``. ``model`` may be a
    :class:`~lrnn_analysis.model_under_analysis.ModelUnderAnalysis` (``params=model.recurrent_names()`` for its
    recurrent block).

    ``operator``: the matrix analysed, ``"hessian"``, ``"ggn"``, ``"fisher"`` (Monte-Carlo,
    ``mc_samples`` labels per sample from ``seed``) or ``"ef"`` (empirical Fisher); native only.
    ``estimates``: any of ``"diag"`` (``diagonal_method``, ``estimate_matvecs`` products),
    ``"frobenius"`` (‖C‖_F², up to ``estimate_matvecs`` products) and ``"blocks"`` (per-tensor
    trace and λ_max, the model's declared recurrent parameters first). ``density_scale``: ``"linear"`` or ``"symlog"``.
    ``rnn_twin``: when the model's torch.nn RNN/LSTM/GRU layers run as their unrolled twins (``"auto"``:
    on CUDA; ``"on"``, ``"off"``; see ``CurvatureOperator``), for either backend; the layers that did are noted.
    ``start``: a warm start for Lanczos (native only), a vector over the selected parameters such as the top
    eigenvector of a nearby operator (the Hessian's, for its GGN; another sample's): Lanczos starts from
    ``warm_start(start, seed)``, half ``start`` and half the cold start's Gaussian vector, and a note says so.
    """
    if isinstance(model, torch.nn.Module) or not getattr(model, "recurrent", None):
        recurrent_first = tuple(getattr(model, "recurrent_parameters", ()))
    else:
        recurrent_first = tuple(model.recurrent_names())
    model = module_of(model)
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if operator not in OPERATOR_KINDS:
        raise InputError(f"operator must be one of {OPERATOR_KINDS}, got {operator!r}")
    unknown = [e for e in estimates if e not in _ESTIMATES]
    if unknown:
        raise InputError(f"estimates must be among {_ESTIMATES}, got {unknown}")
    if backend == "pyhessian" and (operator != "hessian" or estimates):
        raise InputError("backend='pyhessian' gives only the Hessian's eigenvalues and trace; use backend='native'")
    if wrap_operator is not None and "blocks" in estimates:
        raise InputError("the per-block table needs the operator's own parameter blocks; it is not available with wrap_operator")
    if backend == "pyhessian" and wrap_operator is not None:
        raise InputError("the pyhessian backend builds its own products; wrap_operator needs backend='native'")
    if backend == "pyhessian" and trace and trace_method != "hutchinson":
        raise InputError(f"PyHessian's trace is Hutchinson's; trace_method {trace_method!r} needs backend='native'")
    if backend == "pyhessian" and start is not None:
        raise InputError("PyHessian's power iteration takes no start vector; use backend='native'")
    if backend == "pyhessian" and density:
        raise InputError("PyHessian's density() fails on current torch (torch.eig was removed); use backend='native'")
    start_time = time.perf_counter()
    batches = as_batches(data)
    device = next(model.parameters()).device
    diagonal_result = frobenius_result = blocks_result = None
    reused = 0
    if backend == "native":
        base = curvature_operator(operator, model, loss_fn, batches, params, dtype, mc_samples=mc_samples, seed=seed,
                                  cache_graph=cache_graph, memory_budget=memory_budget, rnn_twin=rnn_twin, progress=progress)
        op = base if wrap_operator is None else wrap_operator(base)
        positive_semidefinite = operator != "hessian"
        # A trace deflated by this Lanczos run's Krylov basis needs the basis independent of its probes
        # (drawn from seed): the run then starts from the stream [seed, 1].
        deflate = trace and trace_method == "deflated"
        v0: np.ndarray | None
        if deflate:
            v0 = krylov_start(seed, op.shape[0]) if start is None else warm_start(start, [seed, 1])
        else:
            v0 = None if start is None else warm_start(start, seed)
        eigen = eigenvalues(op, k=top_k, which="LA" if positive_semidefinite else "BE", tol=tol, seed=seed, atol=atol,
                            max_iter=max_iter, v0=v0, keep_krylov=deflate, progress=progress)
        # The probe-based estimators draw the same Rademacher probes from the same seed: each probe's product is computed once.
        with base.remembering_products() as memo:
            trace_result = trace_estimate(op, trace_method, trace_tol, trace_matvecs, seed, krylov=eigen.krylov,
                                          progress=progress) if trace else None
            # The Krylov basis and its products (2·P·m float64) are released before the other estimators run.
            eigen = dataclasses.replace(eigen, krylov=None)
            if "diag" in estimates:
                diagonal_result = diagonal_estimate(op, diagonal_method, estimate_matvecs, seed)
            if "frobenius" in estimates:
                frobenius_result = frobenius_norm_squared(op, trace_tol, estimate_matvecs, seed)
            if "blocks" in estimates:
                # Each block's λ_max starts warm from its part of the operator's top eigenvector.
                assert eigen.vectors is not None  # Lanczos always returns its Ritz vectors
                blocks_result = block_curvature(op, tol, seed=seed, first=recurrent_first, max_iter=max_iter,
                                                start=eigen.vectors[:, 0])
        reused = memo.reused
        density_result = (spectral_density(op, density_probes, density_steps, seed, scale=density_scale, progress=progress)
                          if density else None)
        described = op.describe()
        lambda_max = float(eigen.values.max())
        lambda_min = None if positive_semidefinite else float(eigen.values.min())
        notes = [f"the {operator} is positive semi-definite by construction: only its largest eigenvalues are computed "
                 "(its smallest is 0 whenever P exceeds the number of samples times outputs)"] if positive_semidefinite else []
        stream = f"[{seed}, 1]" if deflate else str(seed)
        if start is not None:
            notes.append(f"Lanczos started warm: from the given start vector plus a Gaussian vector from seed {stream}")
        if deflate:
            notes.append(f"the trace is Hutchinson's deflated by the {eigen.iterations}-vector Krylov basis of the eigenvalue "
                         f"run (tr(QᵀHQ) exactly, the rest sampled), which started from seed stream [{seed}, 1], "
                         f"independent of the probes (seed {seed})")
        notes += [] if eigen.all_converged else [
            f"not every Ritz pair met ‖Cv − θv‖ ≤ {tol}·|θ| + {atol} within {eigen.iterations} Lanczos steps: "
            "see eigen.converged"]
        if reused:
            notes.append(f"{reused} products were asked for again with the same seeded probe (the trace, diagonal, Frobenius "
                         "and block estimates draw the same probes) and computed once; matvecs counts each product once")
        for key, meaning in (("no_grad_params", "the loss does not use them: zero rows and columns"),
                             ("zero_curvature_params", "the loss is affine in them: zero rows and columns")):
            if described.get(key):
                notes.append(f"{', '.join(described[key])}: {meaning}")
        env = environment(device)
    else:
        eigen = pyhessian_eigenvalues(model, loss_fn, batches, top_k=top_k, tol=tol, max_iter=100 if max_iter is None else max_iter,
                                      params=params, seed=seed, dtype=dtype, rnn_twin=rnn_twin)
        trace_result = pyhessian_trace(model, loss_fn, batches, tol=trace_tol, max_iter=trace_matvecs, params=params, seed=seed,
                                       dtype=dtype, rnn_twin=rnn_twin) if trace else None
        density_result = None
        selection = parameter_selection(model, params)
        described = {"operator": "hessian", "params": list(selection.names),
                     "unmatched_patterns": list(selection.unmatched_patterns), "dtype": str(torch.float32 if dtype is None else dtype).removeprefix("torch."),
                     "device": str(device), "n_samples": sum(len(x) for x, _ in batches), "n_batches": len(batches),
                     "batch_sizes": [len(x) for x, _ in batches], "rnn_twin": rnn_twin,
                     "rnn_twin_layers": list(twin_layer_names(model, rnn_twin, device))}
        lambda_max, lambda_min = float(eigen.values[0]), None
        notes = ["PyHessian's top eigenvalue is the eigenvalue of largest |λ| (negative on an indefinite Hessian "
                 "dominated by negative curvature); its power iteration stops on the change of the estimate: "
                 "see eigen.residuals",
                 "PyHessian gives no smallest eigenvalue"]
        if trace_result is not None:
            notes.append("PyHessian's trace loop stops on its own rule (early when the running mean is negative); "
                         "the confidence interval is computed here from its samples")
        env = {**environment(device), "pyhessian": metadata.version("pyhessian")}
    if described.get("rnn_twin_layers"):
        notes.append(f"torch.nn recurrent layer(s) {', '.join(n or '(the model)' for n in described['rnn_twin_layers'])} "
                     f"ran as their unrolled twins (rnn_twin={rnn_twin}): same outputs, differentiable twice")
    elif rnn_twin == "on":
        notes.append("rnn_twin=on, but the model has no torch.nn RNN, LSTM or GRU layer: nothing ran as a twin")
    if described.get("unmatched_patterns"):
        notes.append(f"parameter pattern(s) matching nothing in this model: {', '.join(described['unmatched_patterns'])}")
    matvecs = eigen.matvecs - reused + sum(r.matvecs for r in (trace_result, density_result, diagonal_result, frobenius_result,
                                                               blocks_result) if r is not None)
    if device.type == "cpu":
        notes.append("computed on the CPU")
    return HessianReport(
        backend=backend, operator=described, lambda_max=lambda_max, lambda_min=lambda_min, eigen=eigen,
        trace=trace_result, density=density_result, diagonal=diagonal_result, frobenius=frobenius_result,
        blocks=blocks_result, seed=seed, matvecs=matvecs,
        wall_time=time.perf_counter() - start_time, environment=env, notes=tuple(notes),
    )
