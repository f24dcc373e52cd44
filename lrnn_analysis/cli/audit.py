"""``lrnn audit``: stability, curvature and robustness report of one model, with gates a CI can use
(see :mod:`lrnn_analysis.pipelines.audit` and :mod:`lrnn_analysis.audit_report`)."""
from __future__ import annotations

import argparse
import sys

from ..choices import KINDS, MAX_BATCHES, MAX_MATVECS, MAX_SAMPLES, MAX_SEEDS, PERTURBATION_ALIASES, perturbation_kind
from ..errors import InputError, display_name
from ..outputs import OutputDirectory
from . import options as o

__all__ = ["add_parser", "audit_grid", "gate", "run"]


def gate(text: str):
    from ..pipelines.audit import Gate

    try:
        return Gate.parse(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _kind_levels(text: str) -> tuple[str, list[float]]:
    """'KIND:L1,L2,...' with KIND a perturbation in either spelling: (canonical kind, levels)."""
    name, sep, levels = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KIND:L1,L2,..., got {text[:40]!r}")
    try:
        kind = perturbation_kind(name)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if kind == "hessian-direction":
        raise argparse.ArgumentTypeError("the audit sweeps no hessian-direction (use lrnn robustness --hessian-direction)")
    return kind, o.levels(kind)(levels)


def audit_grid(levels: list[tuple[str, list[float]]] | None) -> dict[str, list[float]] | None:
    if levels is None:
        return None
    grid: dict[str, list[float]] = {}
    for kind, values in levels:
        if kind in grid:
            raise o.UsageError(f"--levels names perturbation {kind} twice")
        grid[kind] = values
    return grid


def add_parser(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="stability, Hessian and robustness report of one checkpoint, with gates")
    audit.add_argument("checkpoint", nargs="?", default=None)
    o.add_model_options(audit)
    o.add_task_options(audit, required=False)
    o.add_data_option(audit)
    audit.add_argument("--gate", type=gate, action="append", default=[], metavar="KIND=VALUE",
                       help="certified=NAME, min-accuracy=A, max-perplexity=P, max-mse=E, max-lambda=X, max-trace=X, "
                            "max-accuracy-drop=KIND:LEVEL:DROP, max-metric-drop=KIND:LEVEL:DROP")
    audit.add_argument("--out", required=True, help="report directory (written atomically; replaces only a previous audit report)")
    audit.add_argument("--force", action="store_true", help="also replace a report another lrnn command wrote")
    audit.add_argument("--thorough", action="store_true", help="paper-grade settings (slow); the options below override either preset")
    audit.add_argument("--hessian-batches", type=o.int_in(1, MAX_BATCHES), default=None,
                       help="training batches of 128 samples for the Hessian, GGN and trace (default: 1, --thorough 8)")
    audit.add_argument("--trace-matvecs", type=o.int_in(1, MAX_MATVECS), default=None,
                       help="most Hessian-vector products for the trace (default: 60, --thorough 400)")
    audit.add_argument("--seeds", type=o.int_in(1, MAX_SEEDS), default=None, help="robustness seeds (default: 3, --thorough 10)")
    audit.add_argument("--max-samples", type=o.int_in(1, MAX_SAMPLES), default=None,
                       help="test samples for the clean accuracy and the robustness sweep, the same first N for both "
                            "(default: 1000, --thorough all)")
    audit.add_argument("--levels", type=_kind_levels, action="append", default=None, metavar="KIND:L1,L2",
                       help="robustness levels of one perturbation, repeatable; replaces the preset's grid; KIND as in tables "
                            f"({', '.join(k for k in KINDS if k != 'hessian-direction')}) "
                            f"or as the robustness options ({', '.join(PERTURBATION_ALIASES)}); level 0 "
                            "is always run (default: gaussian:0,0.05,0.1,0.2 and gaussian-relative:0,0.02,0.05,0.1; "
                            "--thorough adds salt-pepper, occlusion and fgsm)")
    audit.add_argument("--input-bound", type=o.positive, default=None, metavar="XBAR",
                       help="a model without a Lur'e form made of torch.nn LSTM/GRU layers: their conditions hold for "
                            "inputs with ||x_t||_inf <= XBAR")
    audit.add_argument("--trust-unchecked-form", action="store_true",
                       help="let a certified= gate pass on a Lur'e form that could not be compared with the module "
                            "(the report records it)")
    audit.add_argument("--seed", type=o.seed, default=0)
    o.add_run_options(audit)
    audit.set_defaults(handler=run)


def settings_from(args: argparse.Namespace):
    from ..pipelines.audit import AuditSettings

    preset = AuditSettings.thorough(args.seed) if args.thorough else AuditSettings(seed=args.seed)
    return preset.with_changes(hessian_batches=args.hessian_batches, trace_matvecs=args.trace_matvecs, seeds=args.seeds,
                               max_samples=args.max_samples,
                               grid=audit_grid(args.levels), input_bound=args.input_bound, gates=tuple(args.gate),
                               trust_unchecked_form=args.trust_unchecked_form or None)


def run(args: argparse.Namespace) -> int:
    from ..audit_report import AUDIT_WRITER, write_audit_into
    from ..environment import resolve_device
    from ..formatting import format_table, format_value
    from ..pipelines import audit

    settings = settings_from(args)
    with OutputDirectory(args.out, AUDIT_WRITER, force=args.force, inputs=o.input_files(args)) as directory:
        o.set_threads(args.threads)
        device = resolve_device(args.device)
        subject = o.load_subject(args)
        task = o.task_source(args).load_for([(args.checkpoint, subject)])
        subject.check_fits(task, str(args.checkpoint))
        result = audit.run(subject, task, settings, label=display_name(args.checkpoint), device=device,
                           progress=not args.quiet)
        out = write_audit_into(result, directory)
    report = result.report
    print(report["stability"]["verdict"])
    print(f"audit of {args.checkpoint} ({o.architecture(subject)}, task {task.name}) written to {out}/report.md and report.json")
    clean = report["clean"]
    print(f"clean test {clean['metric']} {format_value(clean[clean['metric']])}, lambda_max {report['hessian']['lambda_max']:.4g}, "
          f"lambda_min {report['hessian']['lambda_min']:.4g}, trace {report['hessian']['trace']['estimate']:.4g} "
          f"+- {report['hessian']['trace']['ci_halfwidth']:.3g}")
    stored = report["stability"]["stored_evidence"]
    if stored["status"] == "verified":
        print(f"verified from stored evidence: {stored['certificate']} at rate {stored['rate']:.6g} (tier {stored['tier']})")
    elif stored["status"] == "failed":
        print(f"STORED EVIDENCE NOT VERIFIED: {stored['reason']}; certificates searched as usual", file=sys.stderr)
    for certificate in report["stability"].get("certificates", []):
        print(f"certificate {certificate['name']}: {'holds' if certificate['holds'] else 'fails'} ({certificate['reason']})")
    for stack in report["stability"].get("recurrent_layers", []):
        print(f"torch.nn {stack['kind']} {stack['module'] or '(root)'}: {'holds' if stack['holds'] else 'fails'} ({stack['reason']})")
    if result.gates:
        print(format_table([g.to_dict() for g in result.gates], ["gate", "passed", "threshold", "observed", "detail"]))
        print("all gates pass" if result.passed else "a gate failed")
    o.print_warnings([report["training_data"]["warning"]] if report["training_data"]["warning"] else [])
    return 0 if result.passed else 1
