"""``lrnn audit``: stability, curvature and robustness of one checkpoint, gated, written atomically.

The audit runs, on one model and task:
  * stability: spectra (diagnostics) and the certificates of the scheme the model runs;
  * Hessian: λ_max, λ_min and tr(H) with a 95% CI on a fixed number of training batches;
  * robustness: clean test accuracy and a short perturbation grid over seeds;
and writes ``report.md`` (human), ``report.json`` (every number, settings, seeds, versions,
device, timings), tables (CSV) and figures (PNG, PDF) into a directory that appears whole
or not at all. Gates decide the exit code:

  certified=NAME                 certificate NAME holds (e.g. euler-lmi)
  min-accuracy=A                 clean test accuracy >= A
  max-lambda=X                   λ_max <= X
  max-trace=X                    tr(H) estimate <= X
  max-accuracy-drop=KIND:LEVEL:D mean accuracy drop under perturbation KIND at LEVEL <= D
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import analyses, plots
from .data import Task
from .evaluation import evaluate, loss_function
from .io import write_csv, write_json
from .models import RecurrentModel
from .robustness import KINDS, SweepModel, sweep
from .runtime import environment
from .stability import CERTIFICATES, certify, default_certificates, spectrum
from .stability.evidence import certificate_result, check_stored
from .tables import format_table, format_value

GATE_KINDS = ("certified", "min-accuracy", "max-lambda", "max-trace", "max-accuracy-drop")


@dataclass(frozen=True)
class AuditSettings:
    """Quick by default; ``thorough()`` gives paper-grade settings."""

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

    @classmethod
    def thorough(cls, seed: int = 0) -> "AuditSettings":
        return cls(seed=seed, certificate_budget=600.0, hessian_batches=8, trace_matvecs=400, density=True,
                   grid={"gaussian": (0.0, 0.05, 0.1, 0.2, 0.3), "salt-pepper": (0.0, 0.01, 0.03, 0.05),
                         "occlusion": (0.0, 0.1, 0.2), "fgsm": (0.0, 0.01, 0.02, 0.05),
                         "gaussian-relative": (0.0, 0.01, 0.02, 0.05, 0.1)},
                   seeds=10, max_samples=None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["grid"] = {k: list(v) for k, v in self.grid.items()}
        return data


@dataclass(frozen=True)
class Gate:
    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> "Gate":
        kind, sep, value = text.partition("=")
        if not sep or kind not in GATE_KINDS or not value:
            raise ValueError(f"bad gate {text!r}: expected KIND=VALUE with KIND one of {GATE_KINDS}")
        if kind == "certified" and value not in CERTIFICATES:
            raise ValueError(f"bad gate {text!r}: unknown certificate {value!r}; expected one of {CERTIFICATES}")
        if kind == "max-accuracy-drop":
            parts = value.split(":")
            if len(parts) != 3 or parts[0] not in KINDS or not all(_is_float(p) for p in parts[1:]):
                raise ValueError(f"bad gate {text!r}: expected max-accuracy-drop=KIND:LEVEL:DROP with KIND one of {KINDS}")
        elif kind != "certified" and not _is_float(value):
            raise ValueError(f"bad gate {text!r}: {kind} takes a number")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}={self.value}"


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    observed: Any
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


def run_audit(
    model: RecurrentModel,
    task: Task,
    checkpoint: str,
    metadata: dict[str, Any],
    settings: AuditSettings = AuditSettings(),
    gates: Sequence[Gate] = (),
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> AuditResult:
    """Measure everything the report shows and evaluate the gates."""
    device = torch.device(device)
    model = model.to(device).eval()
    timings: dict[str, float] = {}
    classification = task.is_classification

    started = time.perf_counter()
    system = model.lure_form()
    stored = check_stored(model, metadata)
    stability: dict[str, Any] = {"lure_form": system is not None, "stored_evidence": stored.to_dict()}
    tables: dict[str, list[dict[str, Any]]] = {}
    from_evidence = [certificate_result(stored, model)] if stored.verified else []
    if system is None and from_evidence:
        stability["certificates"] = [r.to_dict(include_matrices=False) for r in from_evidence]
    if system is not None:
        wanted = list(default_certificates(system))
        wanted += [g.value for g in gates if g.kind == "certified" and g.value not in wanted]
        searched = [n for n in wanted if not (from_evidence and n == stored.evidence.certificate)]
        results = from_evidence + certify(system, searched, time_budget=settings.certificate_budget)
        stability["spectrum"] = spectrum(system).to_dict()
        stability["certificates"] = [r.to_dict(include_matrices=False) for r in results]
        tables["spectra"], tables["spectra_summary"] = analyses.spectra_tables({checkpoint: model})
    timings["stability"] = time.perf_counter() - started

    started = time.perf_counter()
    from .hessian import analyze

    batches = task.train.batches(settings.hessian_batch_size, settings.hessian_batches, device)
    hessian = analyze(model, loss_function(classification), batches, trace=True, density=settings.density,
                      seed=settings.seed, progress=progress, trace_matvecs=settings.trace_matvecs)
    timings["hessian"] = time.perf_counter() - started
    if hessian.density is not None:
        tables["hessian_density"] = [{"model": checkpoint, "eigenvalue": float(t), "density": float(d)}
                                     for t, d in zip(hessian.density.grid, hessian.density.density)]

    started = time.perf_counter()
    grid = {kind: sorted(set(levels)) for kind, levels in settings.grid.items()}
    for gate in gates:
        if gate.kind == "max-accuracy-drop":
            kind, level, _ = gate.value.split(":")
            grid[kind] = sorted(set(grid.get(kind, [0.0])) | {0.0, float(level)})
    clean = evaluate(model, task.test.x[:settings.max_samples], task.test.y[:settings.max_samples], classification)
    robustness = sweep([SweepModel(Path(checkpoint).stem, checkpoint, model)], task, grid, settings.seeds, device=device,
                       max_samples=settings.max_samples, progress=progress)
    tables["robustness"], tables["robustness_summary"] = robustness.rows, robustness.summary
    timings["robustness"] = time.perf_counter() - started
    if metadata.get("log") and "norm_W" in metadata["log"][0]:
        tables["training_log"] = analyses.training_log_table({Path(checkpoint).stem: metadata["log"]})

    report = {
        "checkpoint": checkpoint,
        "config": model.config.to_dict(),
        "task": task.to_dict(),
        "training_metrics": metadata.get("metrics"),
        "clean": clean.to_dict(),
        "stability": stability,
        "hessian": hessian.to_dict(),
        "robustness": {"summary": robustness.summary, "settings": robustness.settings},
        "settings": settings.to_dict(),
        "timings": timings,
        "environment": environment(device),
    }
    gate_results = tuple(_evaluate_gate(g, report) for g in gates)
    report["gates"] = [g.to_dict() for g in gate_results]
    report["passed"] = all(g.passed for g in gate_results)
    return AuditResult(report, gate_results, tables)


def _evaluate_gate(gate: Gate, report: dict[str, Any]) -> GateResult:
    if gate.kind == "certified":
        found = [c for c in report["stability"].get("certificates", []) if c["name"] == gate.value]
        if not found:
            return GateResult(str(gate), False, None, "the model has no Lur'e form, so no certificate applies")
        c = found[0]
        return GateResult(str(gate), bool(c["holds"]), c["margin"], f"tier {c['tier']}: {c['reason']}")
    if gate.kind == "min-accuracy":
        observed = report["clean"]["accuracy"]
        if observed is None:
            return GateResult(str(gate), False, None, "a regression task has no accuracy")
        return GateResult(str(gate), observed >= float(gate.value), observed, f"clean test accuracy {observed:.4f}")
    if gate.kind == "max-lambda":
        observed = report["hessian"]["lambda_max"]
        return GateResult(str(gate), observed <= float(gate.value), observed, f"lambda_max {observed:.4g}")
    if gate.kind == "max-trace":
        trace = report["hessian"]["trace"]
        return GateResult(str(gate), trace["estimate"] <= float(gate.value), trace["estimate"],
                          f"trace {trace['estimate']:.4g} +- {trace['ci_halfwidth']:.3g}")
    kind, level, allowed = gate.value.split(":")
    rows = [r for r in report["robustness"]["summary"] if r["perturbation"] == kind and r["level"] == float(level)]
    observed = rows[0]["accuracy_drop"] if rows else None
    if observed is None:
        return GateResult(str(gate), False, None, f"no accuracy drop measured for {kind} at {level}")
    return GateResult(str(gate), observed <= float(allowed), observed,
                      f"mean drop {observed:.4f} under {kind} at level {level} over {rows[0]['seeds']} seeds")


def _figures(result: AuditResult, directory: Path) -> dict[str, str]:
    drawn = {}
    tables = result.tables
    figures = {
        "spectra": lambda: plots.plot_spectra(tables["spectra"], tables["spectra_summary"]) if "spectra" in tables else None,
        "robustness": lambda: plots.plot_robustness(tables["robustness_summary"]),
        "hessian_density": lambda: plots.plot_density(tables["hessian_density"]) if "hessian_density" in tables else None,
        "training_spectra": lambda: plots.plot_training_spectra(tables["training_log"]) if "training_log" in tables else None,
    }
    for name, draw in figures.items():
        figure = draw()
        if figure is not None:
            plots.save_figure(figure, directory / name)
            plots.plt.close(figure)
            drawn[name] = f"{name}.png"
    return drawn


def _markdown(result: AuditResult, figures: dict[str, str]) -> str:
    r = result.report
    hessian, stability = r["hessian"], r["stability"]
    lines = [f"# Audit of `{r['checkpoint']}`", "",
             f"{r['config']['arch']} ({r['config']['discretization']}), hidden {r['config']['hidden']}, "
             f"task {r['task']['name']} (split seed {r['task']['seed']}), device {r['environment'].get('device')}.", ""]
    if result.gates:
        lines += ["## Gates", "", "| gate | result | observed | detail |", "|---|---|---|---|"]
        lines += [f"| `{g.gate}` | {'PASS' if g.passed else 'FAIL'} | {format_value(g.observed)} | {g.detail} |" for g in result.gates]
        lines += ["", f"**Overall: {'PASS' if result.passed else 'FAIL'}**", ""]
    lines += ["## Key numbers", "", "| quantity | value |", "|---|---|",
              f"| clean test accuracy | {format_value(r['clean']['accuracy'])} (loss {format_value(r['clean']['loss'])}, n = {r['clean']['n']}) |",
              f"| Hessian λ_max | {format_value(hessian['lambda_max'])} |", f"| Hessian λ_min | {format_value(hessian['lambda_min'])} |",
              f"| Hessian trace | {format_value(hessian['trace']['estimate'])} ± {format_value(hessian['trace']['ci_halfwidth'])} (95% CI) |"]
    if "spectrum" in stability:
        s = stability["spectrum"]
        lines += [f"| α(A), μ₂(A) | {format_value(s['abscissa_A'])}, {format_value(s['mu2_A'])} |", f"| ‖A‖₂, ‖W‖₂ | {format_value(s['norm_A'])}, {format_value(s['norm_W'])} |"]
    lines += ["", "## Certificates", ""]
    stored = stability.get("stored_evidence") or {}
    if stored.get("status") == "verified":
        lines += [f"Verified from stored evidence: {stored['certificate']} at rate {stored['rate']:.6g} (tier {stored['tier']}).", ""]
    elif stored.get("status") == "failed":
        lines += [f"**Stored evidence NOT verified**: {stored['reason']}; certificates searched as usual.", ""]
    if stability.get("certificates"):
        lines += ["| certificate | holds | margin | rate | tier | seconds | reason |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['name']} | {'yes' if c['holds'] else 'no'} | {format_value(c['margin'])} | {format_value(c['rate'])} | {c['tier'] or '-'} | "
                  f"{format_value(c['seconds'])} | {c['reason']} |" for c in stability["certificates"]]
    else:
        lines.append("The model has no Lur'e form: no toolkit certificate applies.")
    robustness = format_table(r["robustness"]["summary"], ["perturbation", "level", "seeds", "accuracy_mean", "accuracy_ci95", "accuracy_drop"])
    lines += ["", "Spectra are diagnostics (necessary conditions), not certificates.", "", "## Robustness", ""]
    lines += ["    " + line for line in robustness.splitlines()] + [""]
    for name, file in figures.items():
        lines += [f"![{name}]({file})", ""]
    lines += [f"Timings (s): {', '.join(f'{k} {v:.1f}' for k, v in r['timings'].items())}. "
              f"Seed {r['settings']['seed']}. Versions: {', '.join(f'{k} {v}' for k, v in r['environment'].items() if k != 'platform')}.", ""]
    return "\n".join(lines)


def write_audit(result: AuditResult, out_dir: str | Path) -> Path:
    """Write the report into ``out_dir`` atomically: built in a sibling temporary directory,
    then renamed into place (an existing ``out_dir`` is replaced only once the new one is whole)."""
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        figures = _figures(result, staging)
        for name, rows in result.tables.items():
            if rows:
                write_csv(staging / f"{name}.csv", rows)
        write_json(staging / "report.json", result.report)
        (staging / "report.md").write_text(_markdown(result, figures))
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
