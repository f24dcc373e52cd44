"""The audit pipeline: stability, curvature and robustness of one model, with gates.

The audit runs, on one model and task:
  * stability: spectra (diagnostics) and the certificates of the scheme the model runs;
  * Hessian: λ_max, λ_min and tr(H) with a 95% CI, the GGN's λ_max and the per-tensor Hessian
    blocks (trace, λ_max; recurrent matrices first) on a fixed number of training batches;
  * robustness: the clean test metrics and a short perturbation grid over seeds;
(:mod:`lrnn_analysis.audit_report` writes ``report.md``, ``report.json``, tables and figures).
The gates, part of the settings, decide whether the audit passes:

  certified=NAME                 certificate NAME holds (e.g. euler-lmi; for a model without a
                                 Lur'e form made of torch.nn RNN/LSTM/GRU layers: NAME holds on
                                 every layer, e.g. map-lmi or lstm-contraction)
  min-accuracy=A                 clean test accuracy >= A (per token for per-step targets)
  max-perplexity=P               clean test perplexity <= P (per-step classification: language models)
  max-mse=E                      clean test mse <= E (regression, per step or per sequence)
  max-lambda=X                   λ_max <= X
  max-trace=X                    upper end of the 95% CI of tr(H) <= X
  max-accuracy-drop=KIND:LEVEL:D mean accuracy drop under perturbation KIND at LEVEL <= D
                                 (KIND as in tables, e.g. gaussian, or as the option, e.g. input-noise)
  max-metric-drop=KIND:LEVEL:D   mean worsening of the task's metric (accuracy, perplexity or mse)
                                 under perturbation KIND at LEVEL <= D, in the metric's units
  certified-accuracy@R=A         certified accuracy at l2 radius R >= A: the fraction of the test
                                 samples classified correctly with every logit margin above
                                 pair_bound * R, from the model's verified gain certificate (fails,
                                 never passes, for a model without one)

Every number is of the task's loss (per token for per-step targets, over the unmasked steps). On
token-id inputs only gaussian input noise is defined (on the embedding's output): the grid's other
input perturbations are left out.

With ``lipschitz`` (the thorough preset, or any certified-accuracy gate), on a task with one class
label per sequence, the audit also certifies
a Lipschitz bound of the whole sequence map and reports, at ``radii`` (and every gate's radius),
certified accuracy beside the l2 PGD attack's and l2 noise's, and the bound beside its empirical
lower bounds (:func:`lrnn_analysis.pipelines.robustness.against_radius`).

λ_max, λ_min and tr(H) are of the loss on a sample of training batches: other settings (a
quick audit and a thorough one of the same model) give other values, so a ``max-lambda`` or
``max-trace`` gate is comparable only between audits with equal Hessian settings.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..choices import (
    GATE_CERTIFICATES,
    MAX_BATCH_SIZE,
    MAX_BATCHES,
    MAX_MATVECS,
    MAX_RADIUS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SEEDS,
    perturbation_grid,
    perturbation_kind,
    perturbation_level,
    radius_list,
)
from ..errors import InputError
from ..validation import check_bool, check_int, check_number, check_optional_int
from .stability import LAYERS_ONLY, NO_LURE_FORM, SAMPLE_INPUTS

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..model_under_analysis import ModelUnderAnalysis
    from ..task import Task

__all__ = ["GATE_KINDS", "AuditResult", "AuditSettings", "Gate", "GateResult", "run"]

GATE_KINDS = ("certified", "min-accuracy", "max-perplexity", "max-mse", "max-lambda", "max-trace", "max-accuracy-drop",
              "max-metric-drop", "certified-accuracy")
_DROP_GATES = ("max-accuracy-drop", "max-metric-drop")
_TOKEN_REFUSED = ("salt-pepper", "occlusion", "fgsm")
# The attack beside certified accuracy in the audit: steps of the l2 PGD attack (one random start).
AUDIT_ATTACK_STEPS = 20


@dataclass(frozen=True)
class AuditSettings:
    """Quick by default; ``thorough()`` gives paper-grade settings; ``with_changes`` sets any between.

    The Hessian quantities use the first ``hessian_batches`` training batches of
    ``hessian_batch_size`` samples; the trace spends at most ``trace_matvecs`` Hessian-vector
    products. ``grid`` maps a perturbation kind (either spelling, see
    :func:`lrnn_analysis.choices.perturbation_kind`) to its levels, each run with ``seeds`` seeds."""

    seed: int = 0
    certificate_budget: float = 20.0
    hessian_batches: int = 1
    hessian_batch_size: int = 128
    trace_matvecs: int = 60
    density: bool = False
    grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "gaussian": (0.0, 0.05, 0.1, 0.2), "gaussian-relative": (0.0, 0.02, 0.05, 0.1)})
    seeds: int = 3
    max_samples: int | None = 1000
    input_bound: float | None = None
    gates: tuple[Gate, ...] = ()
    trust_unchecked_form: bool = False
    lambda_sample_sets: int = 3
    lipschitz: bool = False
    radii: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)

    def __post_init__(self) -> None:
        check_bool("lipschitz", self.lipschitz)
        object.__setattr__(self, "radii", radius_list(self.radii))
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("lambda_sample_sets", self.lambda_sample_sets, 1, 100)
        check_number("certificate_budget", self.certificate_budget, 0.0, 1e6, above=True)
        check_int("hessian_batches", self.hessian_batches, 1, MAX_BATCHES)
        check_int("hessian_batch_size", self.hessian_batch_size, 1, MAX_BATCH_SIZE)
        check_int("trace_matvecs", self.trace_matvecs, 1, MAX_MATVECS)
        check_bool("density", self.density)
        check_int("seeds", self.seeds, 1, MAX_SEEDS)
        check_optional_int("max_samples", self.max_samples, 1, MAX_SAMPLES)
        check_bool("trust_unchecked_form", self.trust_unchecked_form)
        if self.input_bound is not None:
            check_number("input_bound", self.input_bound, 0.0, above=True)
        grid = {kind: tuple(perturbation_level(kind, level) for level in levels)
                for kind, levels in perturbation_grid(self.grid).items()}
        if "hessian-direction" in grid:
            raise InputError("grid: the audit sweeps no hessian-direction (its eigenvectors are not computed here)")
        object.__setattr__(self, "grid", grid)
        gates = tuple(g if isinstance(g, Gate) else Gate.parse(g) for g in self.gates)
        object.__setattr__(self, "gates", gates)

    @classmethod
    def thorough(cls, seed: int = 0) -> AuditSettings:
        return cls(seed=seed, certificate_budget=600.0, hessian_batches=8, trace_matvecs=400, density=True,
                   grid={"gaussian": (0.0, 0.05, 0.1, 0.2, 0.3), "salt-pepper": (0.0, 0.01, 0.03, 0.05),
                         "occlusion": (0.0, 0.1, 0.2), "fgsm": (0.0, 0.01, 0.02, 0.05),
                         "gaussian-relative": (0.0, 0.01, 0.02, 0.05, 0.1)},
                   seeds=10, max_samples=None, lipschitz=True)

    def preset(self) -> str:
        """``quick`` or ``thorough`` when these are exactly that preset (at this seed, whatever the
        gates), else ``custom``."""
        measured = replace(self, gates=())
        if measured == AuditSettings(seed=self.seed):
            return "quick"
        return "thorough" if measured == AuditSettings.thorough(self.seed) else "custom"

    def with_changes(self, **changes: Any) -> AuditSettings:
        """These settings with the ``changes`` that are not None."""
        return replace(self, **{name: value for name, value in changes.items() if value is not None})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(replace(self, gates=()))
        data["grid"] = {k: list(v) for k, v in self.grid.items()}
        data["radii"] = list(self.radii)
        data["gates"] = [str(g) for g in self.gates]
        data["preset"] = self.preset()
        return data


@dataclass(frozen=True)
class Gate:
    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Gate:
        """Check the gate completely: every threshold finite and in range (an accuracy in [0, 1],
        an accuracy drop in [-1, 1], a perplexity >= 1, an mse >= 0, a perturbation level valid for
        its kind, a radius >= 0)."""
        kind, sep, value = text.partition("=")
        if kind.startswith("certified-accuracy@"):
            radius, minimum = kind.partition("@")[2], value
            if not sep or not _is_finite(radius) or not 0 <= float(radius) <= MAX_RADIUS or not _is_finite(minimum) \
                    or not 0.0 <= float(minimum) <= 1.0:
                raise InputError(f"bad gate {text!r}: expected certified-accuracy@RADIUS=MIN with an l2 radius in [0, {MAX_RADIUS:g}] "
                                 "and an accuracy MIN in [0, 1]")
            return cls("certified-accuracy", f"{float(radius)!r}:{float(minimum)!r}")
        if kind == "certified-accuracy":
            raise InputError(f"bad gate {text!r}: expected certified-accuracy@RADIUS=MIN (an l2 radius and an accuracy)")
        if not sep or kind not in GATE_KINDS or not value:
            raise InputError(f"bad gate {text!r}: expected KIND=VALUE with KIND one of {GATE_KINDS}")
        if kind == "certified" and value not in GATE_CERTIFICATES:
            raise InputError(f"bad gate {text!r}: unknown certificate {value!r}; expected one of {GATE_CERTIFICATES}")
        if kind in _DROP_GATES:
            parts = value.split(":")
            if len(parts) != 3 or not all(_is_finite(p) for p in parts[1:]):
                raise InputError(f"bad gate {text!r}: expected {kind}=KIND:LEVEL:DROP with KIND a perturbation "
                                 "and finite LEVEL and DROP")
            try:
                parts[0] = perturbation_kind(parts[0])
                perturbation_level(parts[0], float(parts[1]))
            except ValueError as error:
                raise InputError(f"bad gate {text!r}: {error}") from None
            if parts[0] == "hessian-direction":
                raise InputError(f"bad gate {text!r}: the audit sweeps no hessian-direction")
            if kind == "max-accuracy-drop" and not -1.0 <= float(parts[2]) <= 1.0:
                raise InputError(f"bad gate {text!r}: an accuracy drop lies in [-1, 1]")
            value = ":".join(parts)
        elif kind != "certified" and not _is_finite(value):
            raise InputError(f"bad gate {text!r}: {kind} takes a finite number")
        elif kind == "min-accuracy" and not 0.0 <= float(value) <= 1.0:
            raise InputError(f"bad gate {text!r}: an accuracy lies in [0, 1]")
        elif kind == "max-perplexity" and not float(value) >= 1.0:
            raise InputError(f"bad gate {text!r}: a perplexity is >= 1")
        elif kind == "max-mse" and not float(value) >= 0.0:
            raise InputError(f"bad gate {text!r}: an mse is >= 0")
        return cls(kind, value)

    @property
    def radius(self) -> float | None:
        """The l2 radius of a certified-accuracy gate (None for the other kinds)."""
        return float(self.value.split(":")[0]) if self.kind == "certified-accuracy" else None

    def __str__(self) -> str:
        if self.kind == "certified-accuracy":
            radius, minimum = self.value.split(":")
            return f"{self.kind}@{radius}={minimum}"
        return f"{self.kind}={self.value}"


def _is_finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome: ``observed`` (None when nothing was measured) compared with
    ``threshold`` (None for ``certified``); ``quantity`` names what was compared."""

    gate: str
    kind: str
    quantity: str
    threshold: float | None
    observed: Any
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AuditResult:
    report: dict[str, Any]
    gates: tuple[GateResult, ...]
    tables: dict[str, list[dict[str, Any]]]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def run(
    subject: ModelUnderAnalysis | torch.nn.Module,
    data: Task,
    settings: AuditSettings = AuditSettings(),
    *,
    label: str | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> AuditResult:
    """Measure everything the report shows and evaluate the gates of ``settings``.

    ``subject`` is a :class:`ModelUnderAnalysis` (a toolkit model or a plain module is wrapped
    with what it declares); ``label`` names it in the report (default: its name); ``data`` is the
    task it is scored on. Without a Lur'e form the stability section says which certificate is
    available instead. ``report["training_data"]`` says whether the model's training split is
    known to be the task's (else a warning)."""
    import torch

    from .. import tidy_tables
    from ..distributed import Ranks
    from ..environment import environment
    from ..evaluation import evaluate
    from ..model_under_analysis import as_model_under_analysis
    from ..robustness import SweepModel
    from ..stability import default_certificates
    from ..training_split import check_training_data
    from . import curvature, robustness
    from .stability import certify_model

    subject = as_model_under_analysis(subject)
    task = data
    label = label or subject.name
    subject.check_fits(task, label)
    ranks = Ranks(torch.device(device))
    model = subject.module.to(ranks.device).eval()
    timings: dict[str, float] = {}
    gates = settings.gates
    training_data = check_training_data(subject.metadata, task)

    started = time.perf_counter()
    system = subject.lure_system()
    names = None
    if system is not None:
        names = list(default_certificates(system))
        names += [g.value for g in gates if g.kind == "certified" and g.value not in names]
    found = certify_model(subject, names, time_budget=settings.certificate_budget, input_bound=settings.input_bound,
                          input_shape=(task.input_dim,) if task.input_kind == "float" else None,
                          inputs=task.train.x[:SAMPLE_INPUTS] if len(task.train) else None)
    stability: dict[str, Any] = {"verdict": found.verdict(), "lure_form": system is not None, "form": found.form,
                                 "form_check": None if found.form_check is None else found.form_check.to_dict(),
                                 "stored_evidence": found.stored.to_dict()}
    tables: dict[str, list[dict[str, Any]]] = {}
    if found.source in ("lure form", "stored evidence"):
        stability["certificates"] = [r.to_dict(include_matrices=False) for r in found.certificates]
    if found.spectrum is not None and found.system is not None:
        stability["spectrum"] = found.spectrum.to_dict()
        eigen_rows, model_row = tidy_tables.spectra_rows(label, found.system, found.spectrum)
        tables["spectra"], tables["spectra_summary"] = eigen_rows, [model_row]
    if found.source == "torch.nn layers":
        stability["recurrent_layers"] = [c.to_dict() for c in found.layers]
    if found.source in ("torch.nn layers", "none"):
        stability["reason"] = found.reason
    timings["stability"] = time.perf_counter() - started

    started = time.perf_counter()
    # The trace deflated by the eigenvalue run's Krylov basis: no products more, a narrower interval.
    hessian = curvature.run(subject, task, curvature.CurvatureSettings(
        trace=True, trace_method="deflated", density=settings.density, trace_matvecs=settings.trace_matvecs, estimates=("blocks",),
        batch_size=settings.hessian_batch_size, batches=settings.hessian_batches, seed=settings.seed),
        ranks=ranks, progress=progress).models[0].report
    # The GGN and the other samples' Hessians are near this Hessian: their Lanczos starts warm from its top eigenvector.
    assert hessian.eigen.vectors is not None  # the native Lanczos returns its Ritz vectors
    top = hessian.eigen.vectors[:, 0]
    ggn = curvature.run(subject, task, curvature.CurvatureSettings(
        operator="ggn", batch_size=settings.hessian_batch_size, batches=settings.hessian_batches, seed=settings.seed),
        ranks=ranks, progress=progress, starts=[top]).models[0].report
    spread = _lambda_max_spread(subject, task, settings, ranks, hessian.lambda_max, top)
    assert hessian.blocks is not None  # analyze computes the blocks estimate it is asked for
    tables["hessian_blocks"] = [{"model": label, **row} for row in hessian.blocks.rows]
    timings["hessian"] = time.perf_counter() - started
    if hessian.density is not None:
        tables["hessian_density"] = [{"model": label, "eigenvalue": float(t), "density": float(d)}
                                     for t, d in zip(hessian.density.grid, hessian.density.density)]

    started = time.perf_counter()
    grid = {kind: sorted(set(levels) | {0.0}) for kind, levels in settings.grid.items()}
    for gate in gates:
        if gate.kind in _DROP_GATES:
            kind, level, _ = gate.value.split(":")
            grid[kind] = sorted(set(grid.get(kind, [0.0])) | {0.0, float(level)})
    if task.input_kind == "tokens":
        grid = {kind: levels for kind, levels in grid.items() if kind not in _TOKEN_REFUSED}
    clean = evaluate(model, task.test.x[:settings.max_samples], task.test.y[:settings.max_samples], task.objective)
    swept = robustness.run([SweepModel(Path(label).stem, label, subject)], task,
                           robustness.RobustnessSettings(grid=grid, seeds=settings.seeds, max_samples=settings.max_samples),
                           ranks=ranks, progress=progress)
    tables["robustness"], tables["robustness_summary"] = swept.rows, swept.summary
    timings["robustness"] = time.perf_counter() - started
    lipschitz = None
    gate_radii = [g.radius for g in gates if g.radius is not None]
    one_label = task.is_classification and task.test.y.ndim == 1  # certified accuracy needs one class per sequence
    if (settings.lipschitz or gate_radii) and one_label:
        started = time.perf_counter()
        against = robustness.against_radius(
            [SweepModel(Path(label).stem, label, subject)], task,
            robustness.RobustnessSettings(radii=tuple(sorted(set(settings.radii) | set(gate_radii))), certified=True,
                                          attack="pgd", attack_steps=AUDIT_ATTACK_STEPS, seeds=settings.seeds,
                                          max_samples=settings.max_samples, certificate_budget=settings.certificate_budget),
            ranks.device)
        bound = against.bounds[0]
        lipschitz = {"bound": bound.to_dict(), "certificate": None if bound.certificate is None else bound.certificate.to_dict(),
                     "rows": against.rows, "settings": against.settings}
        tables["certified_robustness"] = against.rows
        timings["lipschitz"] = time.perf_counter() - started
    log = subject.metadata.get("log")
    if log and {"norm_W", "alpha_A"} & set(log[0]):
        tables["training_log"] = tidy_tables.training_log_table({Path(label).stem: log})

    user = dict(subject.metadata.get("user_model") or {})
    report = {
        "checkpoint": label,
        "model": subject.describe(),
        # A checkpoint's hash of weights and config; for a user module, its weights file's and its .py file's.
        "checkpoint_sha256": subject.metadata.get("weights_sha256") or user.get("weights_sha256"),
        "module_sha256": user.get("module_sha256"),
        "config": subject.metadata.get("config"),
        "task": task.to_dict(),
        "training_data": training_data.to_dict(),
        "training_metrics": subject.metadata.get("metrics"),
        "clean": clean.to_dict(),
        "stability": stability,
        "hessian": hessian.to_dict(),
        "ggn": ggn.to_dict(),
        "lambda_max_spread": spread,
        "robustness": {"summary": swept.summary, "settings": swept.settings},
        "lipschitz": lipschitz,
        "settings": settings.to_dict(),
        "timings": timings,
        "environment": environment(ranks.device),
    }
    if "reference" in subject.metadata:
        report["reference"] = subject.metadata["reference"]
    gate_results = tuple(_evaluate_gate(g, report) for g in gates)
    report["gates"] = [g.to_dict() for g in gate_results]
    report["passed"] = all(g.passed for g in gate_results)
    return AuditResult(report, gate_results, tables)


def _layers_gate(gate: Gate, stacks: list[dict[str, Any]], result: Callable[..., GateResult]) -> GateResult:
    """``certified=NAME`` for a model certified through its torch.nn recurrent layers: NAME must
    hold on every layer of every stack (the smallest margin is the observed value)."""
    quantity = f"smallest margin of {gate.value} over the torch.nn recurrent layers"
    layers = [(stack, index, [r for r in results if r["name"] == gate.value])
              for stack in stacks for index, results in enumerate(stack["layers"])]
    missing = [f"{s['module'] or '(root)'} layer {i} ({s['kind']})" for s, i, found in layers if not found]
    if missing:
        return result(quantity, None, None, False, f"{gate.value} does not apply to {', '.join(missing)}")
    failing = [(s, i, found[0]) for s, i, found in layers if not found[0]["holds"]]
    margins = [found[0]["margin"] for _, _, found in layers if found[0]["margin"] is not None]
    observed = min(margins) if margins else None
    if failing:
        s, i, r = failing[0]
        return result(quantity, None, observed, False, f"{s['module'] or '(root)'} layer {i}: {r['reason']}")
    return result(quantity, None, observed, True, f"{gate.value} holds on all {len(layers)} recurrent layer(s); {LAYERS_ONLY}")


def _evaluate_gate(gate: Gate, report: dict[str, Any]) -> GateResult:
    def result(quantity: str, threshold: float | None, observed: Any, passed: bool, detail: str) -> GateResult:
        return GateResult(str(gate), gate.kind, quantity, threshold, observed, passed, detail)

    if gate.kind == "certified":
        quantity = f"margin of certificate {gate.value}"
        found = [c for c in report["stability"].get("certificates", []) if c["name"] == gate.value]
        if not found and report["stability"].get("recurrent_layers"):
            return _layers_gate(gate, report["stability"]["recurrent_layers"], result)
        if not found:
            return result(quantity, None, None, False, NO_LURE_FORM)
        c = found[0]
        detail = f"verified at tier {c['tier']}: {c['reason']}" if c["tier"] else f"no tier verified it: {c['reason']}"
        check = report["stability"].get("form_check") or {}
        if c["holds"] and check.get("status") == "unchecked" and not report["settings"]["trust_unchecked_form"]:
            return result(quantity, None, c["margin"], False, f"{detail}; but the Lur'e form could not be compared with "
                          f"the module ({check['reason']}): pass trust_unchecked_form (--trust-unchecked-form) to accept it")
        return result(quantity, None, c["margin"], bool(c["holds"]), detail)
    if gate.kind == "min-accuracy":
        observed, threshold = report["clean"]["accuracy"], float(gate.value)
        if observed is None:
            return result("clean test accuracy", threshold, None, False, "a regression task has no accuracy")
        return result("clean test accuracy", threshold, observed, observed >= threshold, f"clean test accuracy {observed:.4f}")
    if gate.kind in ("max-perplexity", "max-mse"):
        metric = gate.kind.removeprefix("max-")
        observed, threshold = report["clean"].get(metric), float(gate.value)
        if observed is None:
            return result(f"clean test {metric}", threshold, None, False,
                          f"a task scored by {report['clean']['metric']} ({report['clean']['objective']}) has no {metric}")
        return result(f"clean test {metric}", threshold, observed, observed <= threshold, f"clean test {metric} {observed:.4g}")
    if gate.kind == "max-lambda":
        threshold = float(gate.value)
        spread = report["lambda_max_spread"]
        low, high = spread["min"], spread["max"]
        over = f"over {spread['sets']} disjoint sample set(s) of {spread['samples_per_set']} training samples"
        if low <= threshold < high:
            return result("largest Hessian lambda_max over the sample sets", threshold, high, False,
                          f"undecided at this sample size: lambda_max ranges over [{low:.4g}, {high:.4g}] {over}; "
                          "audit more samples (--hessian-batches) to decide")
        return result("largest Hessian lambda_max over the sample sets", threshold, high, high <= threshold,
                      f"lambda_max in [{low:.4g}, {high:.4g}] {over}")
    if gate.kind == "max-trace":
        trace, threshold = report["hessian"]["trace"], float(gate.value)
        upper = trace["estimate"] + trace["ci_halfwidth"]
        return result("upper end of the 95% CI of the Hessian trace", threshold, upper, upper <= threshold,
                      f"trace {trace['estimate']:.4g} +- {trace['ci_halfwidth']:.3g} (95% CI upper end {upper:.4g})")
    if gate.kind == "certified-accuracy":
        return _certified_accuracy_gate(gate, report, result)
    kind, level, allowed = gate.value.split(":")
    rows = [r for r in report["robustness"]["summary"] if r["perturbation"] == kind and r["level"] == float(level)]
    metric = "accuracy" if gate.kind == "max-accuracy-drop" else report["clean"]["metric"]
    quantity = f"mean {metric} drop under {kind} at level {level}"
    observed = (rows[0]["accuracy_drop"] if gate.kind == "max-accuracy-drop" else rows[0]["metric_drop"]) if rows else None
    if observed is None:
        why = " (on token inputs only gaussian input noise is defined)" if kind in _TOKEN_REFUSED and not rows else ""
        return result(quantity, float(allowed), None, False, f"no {metric} change measured for {kind} at {level}{why}")
    change = f"drop {observed:.4f}" if gate.kind == "max-accuracy-drop" else \
        f"{metric} {'drop' if metric == 'accuracy' else 'rise'} {observed:.4g}"
    return result(quantity, float(allowed), observed, observed <= float(allowed),
                  f"mean {change} under {kind} at level {level} over {rows[0]['seeds']} seeds")


def _certified_accuracy_gate(gate: Gate, report: dict[str, Any], result: Callable[..., GateResult]) -> GateResult:
    """``certified-accuracy@R=A``: certified accuracy at radius R >= A; a model without a verified
    bound fails it ("no bound"), never passes with 0 or anything else."""
    radius, minimum = (float(v) for v in gate.value.split(":"))
    quantity = f"certified accuracy at l2 radius {radius:g}"
    lipschitz = report["lipschitz"]
    if lipschitz is None:
        return result(quantity, minimum, None, False, "no certified accuracy: the task has no single class label per sequence")
    rows = [r for r in lipschitz["rows"] if r["radius"] == radius]
    bound = lipschitz["bound"]
    if not bound["holds"] or rows[0]["certified_accuracy"] is None:
        return result(quantity, minimum, None, False, f"no bound: {bound['reason']}")
    observed = rows[0]["certified_accuracy"]
    return result(quantity, minimum, observed, observed >= minimum,
                  f"certified accuracy {observed:.4f} on {rows[0]['n']} test samples (attack accuracy "
                  f"{rows[0]['attack_accuracy']:.4f}) from the Lipschitz bound {bound['lipschitz']:.6g} "
                  f"(tier {bound['tier']}, rho {bound['rho']:.6g})")


def _lambda_max_spread(subject: ModelUnderAnalysis, task: Task, settings: AuditSettings, ranks: Any,
                       first: float, start: np.ndarray) -> dict[str, Any]:
    """λ_max of the training loss on up to ``settings.lambda_sample_sets`` disjoint sets of
    training samples, each as large as the audit's Hessian sample (the first set is that sample,
    whose λ_max is ``first`` and top eigenvector ``start``, from which the others' Lanczos starts warm):
    how much λ_max depends on which samples are used."""
    from ..hessian import HessianOperator, eigenvalues, warm_start
    from ..task import Split

    size = settings.hessian_batch_size * settings.hessian_batches
    available = max(1, len(task.train) // size)
    values = [first]
    for k in range(1, min(settings.lambda_sample_sets, available)):
        part = Split(task.train.x[k * size:(k + 1) * size], task.train.y[k * size:(k + 1) * size])
        batches = part.batches(settings.hessian_batch_size, settings.hessian_batches, ranks.device)
        operator = HessianOperator(subject.module, task.objective.loss_fn(), batches)
        values.append(float(eigenvalues(operator, k=1, which="LA", seed=settings.seed,
                                        v0=warm_start(start, settings.seed)).values.max()))
    return {"sets": len(values), "samples_per_set": min(size, len(task.train)), "values": values,
            "min": min(values), "max": max(values)}
