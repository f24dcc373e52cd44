"""``lrnn audit``: stability, curvature and robustness of one checkpoint, gated, written atomically.

The audit runs, on one model and task:
  * stability: spectra (diagnostics) and the certificates of the scheme the model runs;
  * Hessian: λ_max, λ_min and tr(H) with a 95% CI, the GGN's λ_max and the per-tensor Hessian
    blocks (trace, λ_max; recurrent matrices first) on a fixed number of training batches;
  * robustness: clean test accuracy and a short perturbation grid over seeds;
and writes ``report.md`` (human), ``report.json`` (every number, settings, seeds, versions,
device, timings), tables (CSV) and figures (PNG, PDF) into a directory that appears whole
or not at all. Gates decide the exit code:

  certified=NAME                 certificate NAME holds (e.g. euler-lmi; for a model without a
                                 Lur'e form made of torch.nn RNN/LSTM/GRU layers: NAME holds on
                                 every layer, e.g. map-lmi or lstm-contraction)
  min-accuracy=A                 clean test accuracy >= A
  max-lambda=X                   λ_max <= X
  max-trace=X                    upper end of the 95% CI of tr(H) <= X
  max-accuracy-drop=KIND:LEVEL:D mean accuracy drop under perturbation KIND at LEVEL <= D
                                 (KIND as in tables, e.g. gaussian, or as the option, e.g. input-noise)

λ_max, λ_min and tr(H) are of the loss on a sample of training batches: other settings (a
quick audit and a thorough one of the same model) give other values, so a ``max-lambda`` or
``max-trace`` gate is comparable only between audits with equal Hessian settings.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import tidy_tables, plots
from .builtin_tasks import TASKS
from .task import Task
from .evaluation import evaluate, loss_function
from .writers import write_csv, write_json
from .outputs import OutputDirectory, atomic_write
from .training_split import check_training_data
from .robustness import Perturbation, SweepModel, sweep
from .environment import environment
from .models.torchnn import find_recurrent_layers
from .stability import certify_recurrent, default_certificates, spectrum
from .stability.cascade import layer_rows
from .stability.evidence import check_stored, stored_then_searched
from .model_under_analysis import ModelUnderAnalysis, as_model_under_analysis
from .formatting import format_value
from .choices import GATE_CERTIFICATES, perturbation_grid, perturbation_kind

GATE_KINDS = ("certified", "min-accuracy", "max-lambda", "max-trace", "max-accuracy-drop")
LAYERS_ONLY = ("no Lur'e form of the whole model: its torch.nn recurrent layers are certified "
               "(what the model does with their states is not)")


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

    def __post_init__(self) -> None:
        if self.input_bound is not None and not (math.isfinite(self.input_bound) and self.input_bound > 0):
            raise ValueError(f"audit setting input_bound must be a finite number > 0, got {self.input_bound!r}")
        for name in ("hessian_batches", "hessian_batch_size", "trace_matvecs", "seeds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"audit setting {name} must be an integer >= 1, got {value!r}")
        grid = {kind: tuple(float(level) for level in levels) for kind, levels in perturbation_grid(self.grid).items()}
        if "hessian-direction" in grid:
            raise ValueError("the audit sweeps no hessian-direction (its eigenvectors are not computed here)")
        for kind, levels in grid.items():
            for level in levels:
                Perturbation(kind, level)
        object.__setattr__(self, "grid", grid)

    @classmethod
    def thorough(cls, seed: int = 0) -> "AuditSettings":
        return cls(seed=seed, certificate_budget=600.0, hessian_batches=8, trace_matvecs=400, density=True,
                   grid={"gaussian": (0.0, 0.05, 0.1, 0.2, 0.3), "salt-pepper": (0.0, 0.01, 0.03, 0.05),
                         "occlusion": (0.0, 0.1, 0.2), "fgsm": (0.0, 0.01, 0.02, 0.05),
                         "gaussian-relative": (0.0, 0.01, 0.02, 0.05, 0.1)},
                   seeds=10, max_samples=None)

    def preset(self) -> str:
        """``quick`` or ``thorough`` when these are exactly that preset (at this seed), else ``custom``."""
        if self == AuditSettings(seed=self.seed):
            return "quick"
        return "thorough" if self == AuditSettings.thorough(self.seed) else "custom"

    def with_changes(self, **changes: Any) -> "AuditSettings":
        """These settings with the ``changes`` that are not None."""
        return replace(self, **{name: value for name, value in changes.items() if value is not None})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["grid"] = {k: list(v) for k, v in self.grid.items()}
        data["preset"] = self.preset()
        return data


@dataclass(frozen=True)
class Gate:
    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> "Gate":
        """Check the gate completely: every threshold finite and in range (an accuracy in [0, 1],
        a drop in [-1, 1], a perturbation level valid for its kind)."""
        kind, sep, value = text.partition("=")
        if not sep or kind not in GATE_KINDS or not value:
            raise ValueError(f"bad gate {text!r}: expected KIND=VALUE with KIND one of {GATE_KINDS}")
        if kind == "certified" and value not in GATE_CERTIFICATES:
            raise ValueError(f"bad gate {text!r}: unknown certificate {value!r}; expected one of {GATE_CERTIFICATES}")
        if kind == "max-accuracy-drop":
            parts = value.split(":")
            if len(parts) != 3 or not all(_is_finite(p) for p in parts[1:]):
                raise ValueError(f"bad gate {text!r}: expected max-accuracy-drop=KIND:LEVEL:DROP with KIND a perturbation "
                                 "and finite LEVEL and DROP")
            try:
                parts[0] = perturbation_kind(parts[0])
                Perturbation(parts[0], float(parts[1]))
            except ValueError as error:
                raise ValueError(f"bad gate {text!r}: {error}") from None
            if parts[0] == "hessian-direction":
                raise ValueError(f"bad gate {text!r}: the audit sweeps no hessian-direction")
            if not -1.0 <= float(parts[2]) <= 1.0:
                raise ValueError(f"bad gate {text!r}: an accuracy drop lies in [-1, 1]")
            value = ":".join(parts)
        elif kind != "certified" and not _is_finite(value):
            raise ValueError(f"bad gate {text!r}: {kind} takes a finite number")
        elif kind == "min-accuracy" and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"bad gate {text!r}: an accuracy lies in [0, 1]")
        return cls(kind, value)

    def __str__(self) -> str:
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


def run_audit(
    model: ModelUnderAnalysis | torch.nn.Module,
    task: Task,
    checkpoint: str | None = None,
    metadata: dict[str, Any] | None = None,
    settings: AuditSettings = AuditSettings(),
    gates: Sequence[Gate] = (),
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> AuditResult:
    """Measure everything the report shows and evaluate the gates.

    ``model`` is a :class:`ModelUnderAnalysis` (a toolkit model is wrapped with ``metadata``);
    ``checkpoint`` names it in the report (default: its name). Without a Lur'e form the
    stability section says that no certificate is available. ``report["training_data"]``
    says whether the model's training split is known to be ``task``'s (else a warning)."""
    if isinstance(model, ModelUnderAnalysis) and metadata is not None:
        raise ValueError("metadata belongs to the ModelUnderAnalysis; give it there, not to run_audit")
    subject = as_model_under_analysis(model, metadata)
    checkpoint = checkpoint or subject.name
    subject.check_fits(task, checkpoint)
    device = torch.device(device)
    model = subject.module.to(device).eval()
    timings: dict[str, float] = {}
    classification = task.is_classification
    training_data = check_training_data(subject.metadata, task)

    started = time.perf_counter()
    system = subject.lure_system()
    stored = check_stored(model, subject.metadata)
    stability: dict[str, Any] = {"lure_form": system is not None, "stored_evidence": stored.to_dict()}
    tables: dict[str, list[dict[str, Any]]] = {}
    if system is not None:
        wanted = list(default_certificates(system))
        wanted += [g.value for g in gates if g.kind == "certified" and g.value not in wanted]
        results = stored_then_searched(stored, model, system, wanted, settings.certificate_budget)
        stability["spectrum"] = spectrum(system).to_dict()
        stability["certificates"] = [r.to_dict(include_matrices=False) for r in results]
        tables["spectra"], tables["spectra_summary"] = tidy_tables.spectra_tables({checkpoint: subject})
    elif stored.verified:
        stability["certificates"] = [r.to_dict(include_matrices=False)
                                     for r in stored_then_searched(stored, model, None)]
    elif find_recurrent_layers(model):
        cascades = certify_recurrent(model, input_bound=settings.input_bound, time_budget=settings.certificate_budget)
        stability["recurrent_layers"] = [c.to_dict() for c in cascades]
        stability["reason"] = LAYERS_ONLY
    else:
        stability["reason"] = tidy_tables.NO_LURE_FORM
    timings["stability"] = time.perf_counter() - started

    started = time.perf_counter()
    from .hessian import analyze

    batches = task.train.batches(settings.hessian_batch_size, settings.hessian_batches, device)
    hessian = analyze(model, loss_function(classification), batches, trace=True, density=settings.density,
                      seed=settings.seed, progress=progress, trace_matvecs=settings.trace_matvecs, estimates=("blocks",))
    ggn = analyze(model, loss_function(classification), batches, operator="ggn", seed=settings.seed, progress=progress)
    tables["hessian_blocks"] = [{"model": checkpoint, **row} for row in hessian.blocks.rows]
    timings["hessian"] = time.perf_counter() - started
    if hessian.density is not None:
        tables["hessian_density"] = [{"model": checkpoint, "eigenvalue": float(t), "density": float(d)}
                                     for t, d in zip(hessian.density.grid, hessian.density.density)]

    started = time.perf_counter()
    grid = {kind: sorted(set(levels) | {0.0}) for kind, levels in settings.grid.items()}
    for gate in gates:
        if gate.kind == "max-accuracy-drop":
            kind, level, _ = gate.value.split(":")
            grid[kind] = sorted(set(grid.get(kind, [0.0])) | {0.0, float(level)})
    clean = evaluate(model, task.test.x[:settings.max_samples], task.test.y[:settings.max_samples], classification)
    robustness = sweep([SweepModel(Path(checkpoint).stem, checkpoint, subject)], task, grid, settings.seeds, device=device,
                       max_samples=settings.max_samples, progress=progress)
    tables["robustness"], tables["robustness_summary"] = robustness.rows, robustness.summary
    timings["robustness"] = time.perf_counter() - started
    log = subject.metadata.get("log")
    if log and {"norm_W", "alpha_A"} & set(log[0]):
        tables["training_log"] = tidy_tables.training_log_table({Path(checkpoint).stem: log})

    report = {
        "checkpoint": checkpoint,
        "model": subject.describe(),
        "checkpoint_sha256": subject.metadata.get("weights_sha256"),
        "config": subject.metadata.get("config"),
        "task": task.to_dict(),
        "training_data": training_data.to_dict(),
        "training_metrics": subject.metadata.get("metrics"),
        "clean": clean.to_dict(),
        "stability": stability,
        "hessian": hessian.to_dict(),
        "ggn": ggn.to_dict(),
        "robustness": {"summary": robustness.summary, "settings": robustness.settings},
        "settings": settings.to_dict(),
        "timings": timings,
        "environment": environment(device),
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
            return result(quantity, None, None, False, tidy_tables.NO_LURE_FORM)
        c = found[0]
        detail = f"verified at tier {c['tier']}: {c['reason']}" if c["tier"] else f"no tier verified it: {c['reason']}"
        return result(quantity, None, c["margin"], bool(c["holds"]), detail)
    if gate.kind == "min-accuracy":
        observed, threshold = report["clean"]["accuracy"], float(gate.value)
        if observed is None:
            return result("clean test accuracy", threshold, None, False, "a regression task has no accuracy")
        return result("clean test accuracy", threshold, observed, observed >= threshold, f"clean test accuracy {observed:.4f}")
    if gate.kind == "max-lambda":
        observed, threshold = report["hessian"]["lambda_max"], float(gate.value)
        samples = report["hessian"]["operator"]["n_samples"]
        return result("Hessian lambda_max", threshold, observed, observed <= threshold,
                      f"lambda_max {observed:.4g} on {samples} training samples")
    if gate.kind == "max-trace":
        trace, threshold = report["hessian"]["trace"], float(gate.value)
        upper = trace["estimate"] + trace["ci_halfwidth"]
        return result("upper end of the 95% CI of the Hessian trace", threshold, upper, upper <= threshold,
                      f"trace {trace['estimate']:.4g} +- {trace['ci_halfwidth']:.3g} (95% CI upper end {upper:.4g})")
    kind, level, allowed = gate.value.split(":")
    quantity = f"mean accuracy drop under {kind} at level {level}"
    rows = [r for r in report["robustness"]["summary"] if r["perturbation"] == kind and r["level"] == float(level)]
    observed = rows[0]["accuracy_drop"] if rows else None
    if observed is None:
        return result(quantity, float(allowed), None, False, f"no accuracy drop measured for {kind} at {level}")
    return result(quantity, float(allowed), observed, observed <= float(allowed),
                  f"mean drop {observed:.4f} under {kind} at level {level} over {rows[0]['seeds']} seeds")


def _figures(result: AuditResult, out: OutputDirectory) -> dict[str, str]:
    drawn = {}
    tables = result.tables
    # A regression task has no accuracies: its robustness figure shows the loss.
    metric = "accuracy" if any(r["accuracy_mean"] is not None for r in tables["robustness_summary"]) else "loss"
    figures = {
        "spectra": lambda: plots.plot_spectra(tables["spectra"], tables["spectra_summary"]) if "spectra" in tables else None,
        "robustness": lambda: plots.plot_robustness(tables["robustness_summary"], metric),
        "hessian_density": lambda: plots.plot_density(tables["hessian_density"]) if "hessian_density" in tables else None,
        "training_spectra": lambda: plots.plot_training_spectra(tables["training_log"]) if "training_log" in tables else None,
    }
    for name, draw in figures.items():
        figure = draw()
        if figure is not None:
            for suffix in plots.FIGURE_SUFFIXES:
                out.path(f"{name}{suffix}")
            plots.save_figure(figure, out.staging / name)
            drawn[name] = f"{name}.png"
    return drawn


def _markdown(result: AuditResult, figures: dict[str, str]) -> str:
    r = result.report
    hessian, stability = r["hessian"], r["stability"]
    config = r["config"]
    what = (f"{config['arch']} ({config['discretization']}), hidden {config['hidden']}" if config else
            f"{r['model']['name']} ({r['model']['module']}, {r['model']['parameters']} parameters)")
    lines = [f"# Audit of `{Path(r['checkpoint']).name}`", "",
             f"{what}, task {r['task']['name']}" + (f" (split seed {r['task']['seed']})" if r["task"]["name"] in TASKS else "")
             + f", device {r['environment'].get('device')}.", "",
             f"Checkpoint weights and config SHA-256: `{r['checkpoint_sha256'] or 'not recorded'}`.", ""]
    if r["training_data"]["warning"]:
        lines += [f"**Warning: {r['training_data']['warning']}.**", ""]
    if "reference" in r:
        ref = r["reference"]
        lines += ["## Reference implementation file", "",
                  f"{ref['model']} ({ref['file']}), data: task {r['task']['name']} with options {r['task'].get('options', {})}.", ""]
        lines += [f"- {name} = {format_value(item['value'])} (from {item['source']})" for name, item in ref["hparams"].items()]
        lines += [f"- note: {note}" for note in ref.get("notes", [])] + [""]
    if result.gates:
        lines += ["## Gates", "", "| gate | result | threshold | observed | detail |", "|---|---|---|---|---|"]
        lines += [f"| `{g.gate}` | {'PASS' if g.passed else 'FAIL'} | {format_value(g.threshold)} | {format_value(g.observed)} | "
                  f"{g.detail} |" for g in result.gates]
        lines += ["", f"**Overall: {'PASS' if result.passed else 'FAIL'}**", ""]
    lines += ["## Key numbers", "", "| quantity | value |", "|---|---|",
              f"| clean test accuracy | {format_value(r['clean']['accuracy'])} (loss {format_value(r['clean']['loss'])}, n = {r['clean']['n']}) |",
              f"| Hessian λ_max | {format_value(hessian['lambda_max'])} |", f"| Hessian λ_min | {format_value(hessian['lambda_min'])} |",
              f"| GGN λ_max | {format_value(r['ggn']['lambda_max'])} |",
              f"| curvature samples | {hessian['operator']['n_samples']} training samples ({hessian['operator']['n_batches']} batch(es)) |",
              f"| Hessian trace | {format_value(hessian['trace']['estimate'])} ± {format_value(hessian['trace']['ci_halfwidth'])} "
              f"(95% CI, {hessian['trace']['matvecs']} Hessian-vector products) |"]
    if "spectrum" in stability:
        s = stability["spectrum"]
        lines += [f"| α(A), μ₂(A) | {format_value(s['abscissa_A'])}, {format_value(s['mu2_A'])} |", f"| ‖A‖₂, ‖W‖₂ | {format_value(s['norm_A'])}, {format_value(s['norm_W'])} |"]
    lines += ["", f"The Hessian and GGN numbers are of the training loss on a sample of {hessian['operator']['n_samples']} "
              "training samples. λ_max depends on that sample: the same model audited with other settings (quick "
              "and --thorough, or another --hessian-batches or --seed) gives another λ_max and trace, so compare a "
              "max-lambda or max-trace gate only between audits with equal settings (see Settings below)."]
    lines += ["", "Hessian per parameter tensor (diagonal blocks; recurrent matrices first):", ""]
    lines += _markdown_table(hessian["blocks"]["rows"], ["param", "numel", "lambda_max", "trace", "trace_ci_halfwidth", "trace_method"],
                             ["parameter", "entries", "λ_max", "trace", "± (95% CI)", "trace method"])
    lines += ["", "## Certificates", ""]
    stored = stability.get("stored_evidence") or {}
    if stored.get("status") == "verified":
        lines += [f"Verified from stored evidence: {stored['certificate']} at rate {stored['rate']:.6g} (tier {stored['tier']}).", ""]
    elif stored.get("status") == "failed":
        lines += [f"**Stored evidence NOT verified**: {stored['reason']}; certificates searched as usual.", ""]
    if stability.get("recurrent_layers"):
        lines += [f"{stability['reason'][0].upper()}{stability['reason'][1:]}.", "",
                  "| module | kind | layer | certificate | holds | rate | reason |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {row['module']} | {row['kind']} | {row['layer']} | {row['name']} | {'yes' if row['holds'] else 'no'} | "
                  f"{format_value(row['rate'])} | {row['reason']} |" for row in layer_rows(stability["recurrent_layers"])]
        lines += [""] + [f"- {s['module'] or '(root)'} ({s['kind']}): {'holds' if s['holds'] else 'fails'}: {s['reason']}"
                         for s in stability["recurrent_layers"]]
    elif stability.get("certificates"):
        lines += ["| certificate | holds | margin | rate | tier | seconds | reason |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['name']} | {'yes' if c['holds'] else 'no'} | {format_value(c['margin'])} | {format_value(c['rate'])} | {c['tier'] or '-'} | "
                  f"{format_value(c['seconds'])} | {c['reason']} |" for c in stability["certificates"]]
    else:
        lines.append(f"{stability['reason'][0].upper()}{stability['reason'][1:]}.")
    lines += ["", "Spectra are diagnostics (necessary conditions), not certificates.", "", "## Robustness", ""]
    lines += _markdown_table(r["robustness"]["summary"], ["perturbation", "level", "seeds", "accuracy_mean", "accuracy_ci95", "accuracy_drop"],
                             ["perturbation", "level", "seeds", "accuracy", "± (95% CI)", "drop"]) + [""]
    lines += _settings_section(r["settings"], hessian["operator"])
    for name, file in figures.items():
        lines += [f"![{name}]({file})", ""]
    lines += [f"Timings (s): {', '.join(f'{k} {v:.1f}' for k, v in r['timings'].items())}. "
              f"Seed {r['settings']['seed']}. Versions: {', '.join(f'{k} {v}' for k, v in r['environment'].items() if k not in ('platform', 'distributed'))}.", ""]
    return "\n".join(lines)


def _markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(format_value(row.get(c)) for c in columns) + " |" for row in rows]


def _settings_section(settings: dict[str, Any], operator: dict[str, Any]) -> list[str]:
    grid = "; ".join(f"{kind}: {', '.join(format_value(level) for level in levels)}" for kind, levels in settings["grid"].items())
    budget = settings["certificate_budget"]
    rows = [
        ("preset", f"{settings['preset']} (quick: `lrnn audit`, thorough: `lrnn audit --thorough`)"),
        ("Hessian sample", f"{operator['n_samples']} training samples: {settings['hessian_batches']} batch(es) of "
                           f"{settings['hessian_batch_size']} (`--hessian-batches`)"),
        ("trace budget", f"{settings['trace_matvecs']} Hessian-vector products at most (`--trace-matvecs`)"),
        ("spectral density", "yes" if settings["density"] else "no"),
        ("robustness levels", f"{grid} (`--levels KIND:L1,L2`)"),
        ("robustness seeds", f"{settings['seeds']} (`--seeds`)"),
        ("robustness samples", "the whole test split" if settings["max_samples"] is None else f"the first {settings['max_samples']} test samples (or all, if fewer)"),
        ("certificate time budget", f"{format_value(budget)} s"),
        ("seed", f"{settings['seed']} (`--seed`)"),
    ]
    return ["## Settings", "", "| setting | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows] + [""]


AUDIT_WRITER = "lrnn audit"


def write_audit(result: AuditResult, out_dir: str | Path, force: bool = False) -> Path:
    """Write the report into ``out_dir``; it appears whole or not at all and replaces only an
    empty directory or a previous report (another command's only with ``force``): see
    :mod:`lrnn_analysis.outputs`."""
    with OutputDirectory(out_dir, AUDIT_WRITER, force=force, inputs=[result.report.get("checkpoint")]) as out:
        return write_audit_into(result, out)


def write_audit_into(result: AuditResult, out: OutputDirectory) -> Path:
    """Write the report's files into an open :class:`OutputDirectory` and publish it."""
    figures = _figures(result, out)
    for name, rows in result.tables.items():
        if rows:
            write_csv(out.path(f"{name}.csv"), rows)
    write_json(out.path("report.json"), result.report)
    markdown = _markdown(result, figures)
    atomic_write(out.path("report.md"), lambda tmp: tmp.write_text(markdown))
    return out.publish({"report": out.written})
