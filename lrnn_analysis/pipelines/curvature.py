"""The curvature pipeline: the loss Hessian (or GGN, Fisher, empirical Fisher) of models under analysis.

For every model, one :func:`~lrnn_analysis.hessian.analyze` on the same batches: λ_max and λ_min
by Lanczos (the ``top_k`` at each end), and on request tr(C) with a 95% confidence interval, the
SLQ spectral density, the diagonal, ‖C‖_F² and the per-tensor block table. Every random draw
comes from ``seed``, so two front ends with equal settings get equal numbers.

The batches are the first ``batches`` consecutive batches of ``batch_size`` samples of the task's
``split`` (``batches=None``: the whole split, products weighted by samples). Under
``torch.distributed`` (an :class:`~lrnn_analysis.distributed.Ranks` with more than one rank) the
batches are cut into contiguous shards and every product is one all-reduce
(:class:`~lrnn_analysis.distributed.DistributedOperator`); with fewer batches than ranks, rank 0
computes alone (``shared_by`` records which).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..choices import (
    CURVATURE_BACKENDS,
    CURVATURE_ESTIMATES,
    CURVATURE_OPERATORS,
    DENSITY_SCALES,
    DIAGONAL_METHODS,
    DTYPES,
    MAX_BATCH_SIZE,
    MAX_BATCHES,
    MAX_DENSITY_PROBES,
    MAX_DENSITY_STEPS,
    MAX_EIGENPAIRS,
    MAX_ITERATIONS,
    MAX_MATVECS,
    MAX_MC_SAMPLES,
    MAX_SAMPLE_PASSES,
    MAX_SEED,
    RNN_TWIN_MODES,
    SPLITS,
    TRACE_METHODS,
)
from ..errors import InputError
from ..validation import check_bool, check_choice, check_int, check_optional_int

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..distributed import Ranks
    from ..hessian import HessianReport
    from ..hessian.density import DensityResult
    from ..model_under_analysis import ModelUnderAnalysis
    from ..objective import Objective
    from ..task import Task

__all__ = ["CurvatureResult", "CurvatureSettings", "ModelCurvature", "run"]


@dataclass(frozen=True)
class CurvatureSettings:
    """What to compute and on which samples; every field checked against its bound when built.

    ``params``: parameter names or globs (comma-separated or a list; None: all). ``trace``,
    ``density``: whether to estimate them; ``estimates``: any of ``diag``, ``frobenius``,
    ``blocks``. ``max_iter`` caps the Lanczos steps (None: the estimator's default). ``dtype``:
    ``float32`` or ``float64`` for the model and the batches (None: the model's own and the data's).
    ``rnn_twin``: when torch.nn RNN/LSTM/GRU layers run as their unrolled twins (``auto``: on CUDA;
    ``on``, ``off``; see :class:`~lrnn_analysis.hessian.CurvatureOperator`)."""

    operator: str = "hessian"
    split: str = "train"
    batch_size: int = 128
    batches: int | None = 1
    params: str | tuple[str, ...] | None = None
    top_k: int = 1
    trace: bool = False
    trace_method: str = "hutchinson"
    trace_matvecs: int = 200
    density: bool = False
    density_probes: int = 5
    density_steps: int = 80
    density_scale: str = "linear"
    mc_samples: int = 1
    estimates: tuple[str, ...] = ()
    diagonal_method: str = "hutchinson"
    backend: str = "native"
    dtype: str | None = None
    max_iter: int | None = None
    seed: int = 0
    rnn_twin: str = "auto"

    def __post_init__(self) -> None:
        check_choice("operator", self.operator, CURVATURE_OPERATORS)
        check_choice("split", self.split, SPLITS)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_optional_int("batches", self.batches, 1, MAX_BATCHES)
        if self.params is not None and not isinstance(self.params, str):
            patterns = tuple(self.params)
            if not patterns or not all(isinstance(p, str) and p for p in patterns):
                raise InputError(f"params: expected parameter names or globs, got {self.params!r}")
            object.__setattr__(self, "params", patterns)
        check_int("top_k", self.top_k, 1, MAX_EIGENPAIRS)
        check_bool("trace", self.trace)
        check_choice("trace_method", self.trace_method, TRACE_METHODS)
        check_int("trace_matvecs", self.trace_matvecs, 1, MAX_MATVECS)
        check_bool("density", self.density)
        check_int("density_probes", self.density_probes, 1, MAX_DENSITY_PROBES)
        check_int("density_steps", self.density_steps, 1, MAX_DENSITY_STEPS)
        check_choice("density_scale", self.density_scale, DENSITY_SCALES)
        check_int("mc_samples", self.mc_samples, 1, MAX_MC_SAMPLES)
        unknown = [e for e in self.estimates if e not in CURVATURE_ESTIMATES]
        if isinstance(self.estimates, str) or unknown:
            raise InputError(f"estimates must be among {CURVATURE_ESTIMATES}, got {unknown or self.estimates!r}")
        object.__setattr__(self, "estimates", tuple(self.estimates))
        check_choice("diagonal_method", self.diagonal_method, DIAGONAL_METHODS)
        check_choice("backend", self.backend, CURVATURE_BACKENDS)
        if self.dtype is not None:
            check_choice("dtype", self.dtype, DTYPES)
        check_optional_int("max_iter", self.max_iter, 1, MAX_ITERATIONS)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_choice("rnn_twin", self.rnn_twin, RNN_TWIN_MODES)
        if self.batches is not None and self.products() * 3 * self.batch_size * self.batches > MAX_SAMPLE_PASSES:
            raise InputError(f"{self.products()} operator products on {self.batch_size * self.batches} samples is more than "
                             f"{MAX_SAMPLE_PASSES:.0e} sample passes (a product costs about 3): fewer samples, density "
                             "probes or steps, or a smaller trace budget")
        if self.backend == "pyhessian" and (self.operator != "hessian" or self.estimates or self.density):
            raise InputError("backend: pyhessian gives only the Hessian's eigenvalues and trace; use backend native")

    def products(self) -> int:
        """An estimate of the operator products these settings ask for, to bound their work: Lanczos at
        both ends (``max_iter``, 150 when None), the trace budget, probes x steps of the density, and
        100 per extra estimate."""
        lanczos = 2 * (self.max_iter if self.max_iter is not None else 150)
        return (lanczos + (self.trace_matvecs if self.trace else 0)
                + (self.density_probes * self.density_steps if self.density else 0) + 100 * len(self.estimates))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["estimates"] = list(self.estimates)
        if isinstance(self.params, tuple):
            data["params"] = list(self.params)
        return data


@dataclass(frozen=True, eq=False)
class ModelCurvature:
    """One model's :class:`~lrnn_analysis.hessian.HessianReport` under its label."""

    model: str
    report: HessianReport

    def summary(self) -> dict[str, Any]:
        """λ_max, λ_min, tr ± 95% CI (None when not estimated), convergence, products, seconds."""
        r = self.report
        return {"model": self.model, "lambda_max": r.lambda_max, "lambda_min": r.lambda_min,
                "trace": None if r.trace is None else r.trace.estimate,
                "trace_ci95": None if r.trace is None else r.trace.ci_halfwidth,
                "eigen_converged": r.eigen.all_converged, "matvecs": r.matvecs, "seconds": r.wall_time, "seed": r.seed}

    def density_rows(self) -> list[dict[str, Any]]:
        d = self.report.density
        return [] if d is None else _density_rows(self.model, d)


@dataclass(frozen=True, eq=False)
class CurvatureResult:
    """Every model's curvature (empty on the ranks that only took part in the products) and how
    many ranks shared the batches."""

    models: tuple[ModelCurvature, ...]
    settings: CurvatureSettings
    shared_by: int = 1

    def rows(self) -> list[dict[str, Any]]:
        return [m.summary() for m in self.models]

    def density_rows(self) -> list[dict[str, Any]]:
        """Every model's density, re-smoothed with one kernel width on one grid (``smooth_together``)
        so that the overlaid curves are comparable; the width is the rows' ``kernel_width``."""
        from ..hessian.density import smooth_together

        estimated = [m for m in self.models if m.report.density is not None]
        together = smooth_together([m.report.density for m in estimated])  # type: ignore[misc]
        return [row for m, d in zip(estimated, together) for row in _density_rows(m.model, d)]


def _density_rows(model: str, d: DensityResult) -> list[dict[str, Any]]:
    return [{"model": model, "eigenvalue": float(t), "density": float(v), "kernel_width": d.sigma}
            for t, v in zip(d.grid, d.density)]


def _batches_of(data: Task | Any, settings: CurvatureSettings,
                device: torch.device | str = "cpu") -> tuple[list[tuple[Any, Any]], Objective]:
    """The batches ``settings`` selects from a task (its split, batch size and count), in the
    settings' dtype (token ids and class labels stay integers), and the objective they are scored
    by; ``data`` that is already an (x, y) batch or a list of them is used as given."""
    import torch

    from ..objective import Objective
    from ..task import Task

    if isinstance(data, Task):
        split = getattr(data, settings.split)
        if len(split) == 0:
            raise InputError(f"split: the {settings.split} split of task {data.name} is empty")
        batches = split.batches(settings.batch_size, settings.batches, device)
        objective = data.objective
    else:
        from ..hessian.operator import as_batches

        batches = [(x.to(device), y.to(device)) for x, y in as_batches(data)]
        objective = Objective.of_targets(batches[0][1])
    if settings.dtype is None:
        return batches, objective
    dtype = getattr(torch, settings.dtype)
    return [(x.to(dtype) if x.is_floating_point() else x, y.to(dtype) if y.is_floating_point() else y)
            for x, y in batches], objective


def run(
    subjects: Sequence[ModelUnderAnalysis] | ModelUnderAnalysis,
    data: Task | Any,
    settings: CurvatureSettings = CurvatureSettings(),
    *,
    ranks: Ranks | None = None,
    progress: bool = False,
    starts: Sequence[np.ndarray | None] | None = None,
) -> CurvatureResult:
    """The curvature of every model of ``subjects`` on the same batches of ``data`` (a task,
    or (x, y) batches). The loss is the targets' objective's (cross-entropy or MSE, per token
    for per-step targets over the unmasked steps). The models are moved to the ranks' device and
    the settings' dtype. ``starts``: one Lanczos warm start (or None) per model, over its selected
    parameters (``analyze``'s ``start``; the same on every rank), e.g. the top eigenvectors of an earlier run of the
    same models."""
    import torch

    from ..distributed import DistributedOperator, Ranks, shard_batches
    from ..hessian import analyze
    from ..model_under_analysis import ModelUnderAnalysis
    from ..task import Task

    ranks = ranks or Ranks(torch.device("cpu"))
    if isinstance(subjects, ModelUnderAnalysis):
        subjects = [subjects]
    batches, objective = _batches_of(data, settings, ranks.device)
    shared_by = ranks.world_size if len(batches) >= ranks.world_size else 1
    if shared_by == 1 and not ranks.is_main:
        return CurvatureResult((), settings, shared_by)
    if shared_by > 1:
        batches = shard_batches(batches, ranks.rank, ranks.world_size)
    starts = [None] * len(subjects) if starts is None else list(starts)
    if len(starts) != len(subjects):
        raise InputError(f"starts: one start vector (or None) per model, got {len(starts)} for {len(subjects)} models")
    found = []
    for subject, start in zip(subjects, starts):
        if isinstance(data, Task):
            subject.check_fits(data)
        dtype = None if settings.dtype is None else getattr(torch, settings.dtype)
        subject.module.to(device=ranks.device, dtype=dtype)
        params = settings.params if isinstance(settings.params, (str, type(None))) else list(settings.params)
        report = analyze(subject, objective.loss_fn(), batches, params=params, top_k=settings.top_k,
                         trace=settings.trace, density=settings.density, backend=settings.backend, seed=settings.seed,
                         dtype=dtype, progress=progress, max_iter=settings.max_iter,
                         trace_method=settings.trace_method, trace_matvecs=settings.trace_matvecs,
                         density_probes=settings.density_probes, density_steps=settings.density_steps,
                         operator=settings.operator, mc_samples=settings.mc_samples, estimates=settings.estimates,
                         diagonal_method=settings.diagonal_method, density_scale=settings.density_scale,
                         rnn_twin=settings.rnn_twin, wrap_operator=DistributedOperator if shared_by > 1 else None,
                         start=start)
        found.append(ModelCurvature(subject.name, report))
    return CurvatureResult(tuple(found) if ranks.is_main else (), settings, shared_by)
