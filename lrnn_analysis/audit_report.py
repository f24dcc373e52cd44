"""The audit report: ``report.md`` (for people), ``report.json`` (every number, settings, seeds,
versions, device, timings), the tables (CSV) and figures (PNG, PDF) of an
:class:`~lrnn_analysis.pipelines.audit.AuditResult`, written into a directory that appears whole
or not at all (:mod:`lrnn_analysis.outputs`).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import plots
from .builtin_tasks import TASKS
from .formatting import format_value
from .outputs import OutputDirectory, atomic_write
from .pipelines.audit import AuditResult
from .stability.cascade import layer_rows
from .writers import write_csv, write_json

__all__ = ["AUDIT_WRITER", "write_audit", "write_audit_into"]


def _figures(result: AuditResult, out: OutputDirectory) -> dict[str, str]:
    drawn = {}
    tables = result.tables
    # The task's metric: accuracy, or perplexity (language models) or mse (regression), which have no accuracy drop to plot.
    metric = "accuracy" if result.report["clean"]["metric"] == "accuracy" else "value"
    figures = {
        "spectra": lambda: plots.plot_spectra(tables["spectra"], tables["spectra_summary"]) if "spectra" in tables else None,
        "robustness": lambda: plots.plot_robustness(tables["robustness_summary"], metric),
        "hessian_density": lambda: plots.plot_density(tables["hessian_density"]).figure if "hessian_density" in tables else None,
        "certified_robustness": lambda: (plots.plot_certified_robustness(tables["certified_robustness"])
                                         if "certified_robustness" in tables else None),
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
             f"Checkpoint weights and config SHA-256: `{r['checkpoint_sha256'] or 'not recorded'}`"
             + (f"; module file SHA-256: `{r['module_sha256']}`" if r.get("module_sha256") else "") + ".", ""]
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
    clean = r["clean"]
    lines += ["## Key numbers", "", "| quantity | value |", "|---|---|", _clean_line(clean),
              f"| Hessian λ_max | {format_value(hessian['lambda_max'])} |",
              f"| λ_max over {r['lambda_max_spread']['sets']} disjoint sample sets | {format_value(r['lambda_max_spread']['min'])} "
              f"to {format_value(r['lambda_max_spread']['max'])} |", f"| Hessian λ_min | {format_value(hessian['lambda_min'])} |",
              f"| GGN λ_max | {format_value(r['ggn']['lambda_max'])} |",
              f"| curvature samples | {_curvature_sample(hessian['operator'])} ({hessian['operator']['n_batches']} batch(es)) |",
              f"| Hessian trace | {format_value(hessian['trace']['estimate'])} ± {format_value(hessian['trace']['ci_halfwidth'])} "
              f"(95% CI, {hessian['trace']['matvecs']} Hessian-vector products"
              + (f", deflated by the {hessian['trace']['sketch_size']}-vector Krylov basis of the λ_max/λ_min Lanczos run"
                 if hessian['trace']['method'] == "deflated" else "") + ") |"]
    if "spectrum" in stability:
        s = stability["spectrum"]
        lines += [f"| α(A), μ₂(A) | {format_value(s['abscissa_A'])}, {format_value(s['mu2_A'])} |",
                  f"| ‖A‖₂, ‖W‖₂ | {format_value(s['norm_A'])}, {format_value(s['norm_W'])} |"]
    lines += ["", f"The Hessian and GGN numbers are of the training loss ({clean['objective']}: "
              f"{'mean over the unmasked tokens' if clean['objective'].startswith('per-step') else 'mean over the samples'}) "
              f"on a sample of {_curvature_sample(hessian['operator'])}. λ_max depends on that sample: the same model audited with other settings (quick "
              "and --thorough, or another --hessian-batches or --seed) gives another λ_max and trace, so compare a "
              "max-lambda or max-trace gate only between audits with equal settings (see Settings below)."]
    lines += ["", "Hessian per parameter tensor (diagonal blocks; recurrent matrices first):", ""]
    lines += _markdown_table(hessian["blocks"]["rows"], ["param", "numel", "lambda_max", "trace", "trace_ci_halfwidth", "trace_method"],
                             ["parameter", "entries", "λ_max", "trace", "± (95% CI)", "trace method"])
    lines += ["", "## Certificates", "", f"**{stability['verdict'][0].upper()}{stability['verdict'][1:]}**", ""]
    if stability.get("form", "none") != "none":
        lines += [f"Lur'e form: {stability['form']}"
                  + (" (trusted for the gates: --trust-unchecked-form)." if r["settings"].get("trust_unchecked_form") else "."), ""]
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
    if clean["metric"] == "accuracy":
        lines += _markdown_table(r["robustness"]["summary"], ["perturbation", "level", "seeds", "accuracy_mean", "accuracy_ci95", "accuracy_drop"],
                                 ["perturbation", "level", "seeds", "accuracy", "± (95% CI)", "drop"]) + [""]
    else:
        metric = clean["metric"]
        lines += _markdown_table(r["robustness"]["summary"], ["perturbation", "level", "seeds", "value_mean", "value_ci95", "metric_drop"],
                                 ["perturbation", "level", "seeds", metric, "± (95% CI)", f"{metric} rise"]) + [""]
    if r.get("lipschitz") is not None:
        lines += _lipschitz_section(r["lipschitz"])
    lines += _settings_section(r["settings"], hessian["operator"])
    for name, file in figures.items():
        lines += [f"![{name}]({file})", ""]
    lines += [f"Timings (s): {', '.join(f'{k} {v:.1f}' for k, v in r['timings'].items())}. "
              f"Seed {r['settings']['seed']}. Versions: "
              f"{', '.join(f'{k} {v}' for k, v in r['environment'].items() if k not in ('platform', 'distributed'))}.", ""]
    return "\n".join(lines)


def _lipschitz_section(lipschitz: dict[str, Any]) -> list[str]:
    """The certified Lipschitz bound, its empirical lower bounds, and accuracy against l2 radius."""
    bound, attack = lipschitz["bound"], lipschitz["settings"]["attack"]
    lines = ["## Certified robustness", ""]
    if bound["holds"]:
        lines += [f"Certified Lipschitz bound of the logits over the whole input sequence (l2 over {bound['horizon']} "
                  f"steps and features): **{format_value(bound['lipschitz'])}** (tier {bound['tier']}, rho "
                  f"{format_value(bound['rho'])}, {format_value(bound['seconds'])} s, verified in float64). Empirical "
                  f"lower bounds on {bound['samples']} test inputs: largest input-Jacobian norm "
                  f"{format_value(bound['gradient_lower_bound'])}, largest ||dz||/||dx|| of the attack "
                  f"{format_value(bound['attack_lower_bound'])}; looseness {format_value(bound['looseness'])}.", ""]
    else:
        lines += [f"No bound: {bound['reason']}. Certified accuracy is not available (\"no bound\", not 0).", ""]
    lines += [f"Accuracy against l2 radius: certified, under the l2 PGD attack ({attack['steps']} steps, margin loss, "
              f"inputs clamped to {attack['box']}) and under Gaussian noise of that l2 norm.", ""]
    lines += _markdown_table(lipschitz["rows"], ["radius", "certified_accuracy", "attack_accuracy", "noise_accuracy"],
                             ["l2 radius", "certified", "attack", "l2 noise"]) + [""]
    return lines


def _clean_line(clean: dict[str, Any]) -> str:
    """The key-numbers row of the clean test metrics: accuracy, or perplexity and bits per token
    (per-step classification), or mse."""
    n = f"n = {clean['n']}" + (f", {clean['count']} scored steps" if clean["objective"].startswith("per-step") else "")
    if clean["metric"] == "perplexity":
        return (f"| clean test perplexity | {format_value(clean['perplexity'])} (bits per token "
                f"{format_value(clean['bits_per_token'])}, token accuracy {format_value(clean['token_accuracy'])}, "
                f"loss {format_value(clean['loss'])}, {n}) |")
    if clean["metric"] == "mse":
        return f"| clean test mse | {format_value(clean['mse'])} ({n}) |"
    return f"| clean test accuracy | {format_value(clean['accuracy'])} (loss {format_value(clean['loss'])}, {n}) |"


def _curvature_sample(operator: dict[str, Any]) -> str:
    scored = operator.get("n_scored", operator["n_samples"])
    tokens = f", {scored} scored steps" if scored != operator["n_samples"] else ""
    return f"{operator['n_samples']} training samples{tokens}"


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
        ("test samples (clean accuracy and robustness alike)", "the whole test split" if settings["max_samples"] is None
         else f"the first {settings['max_samples']} test samples (or all, if fewer; `--max-samples`)"),
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
