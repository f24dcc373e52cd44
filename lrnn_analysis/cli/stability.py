"""``lrnn stability``: spectra and certificates of one model (see :mod:`lrnn_analysis.pipelines.stability`)."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..outputs import check_output_file
from . import options as o

if TYPE_CHECKING:
    from ..model_under_analysis import ModelUnderAnalysis
    from ..pipelines.stability import LipschitzBound, ModelCertificate

__all__ = ["add_parser", "run"]

_CERTIFICATE_COLUMNS = ["name", "holds", "margin", "rate", "tier", "seconds", "reason"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    stability = sub.add_parser("stability", help="spectra and global-stability certificates of a checkpoint")
    stability.add_argument("checkpoint", nargs="?", default=None)
    o.add_model_options(stability, task=True)
    o.add_data_option(stability)
    stability.add_argument("--certificates", "--tests", dest="certificates", type=o.certificate_list, default=None,
                           help="comma-separated, e.g. euler-norm,euler-lmi (default: those of the scheme the model runs)")
    stability.add_argument("--time-budget", type=o.positive, default=None, help="seconds for all LMI tiers together")
    stability.add_argument("--input-bound", type=o.positive, default=None, metavar="XBAR",
                           help="torch.nn LSTM/GRU layers: their conditions hold for inputs with ||x_t||_inf <= XBAR")
    stability.add_argument("--json", default=None, metavar="PATH", help="write spectra and certificates as JSON")
    stability.add_argument("--evidence", action="store_true", help="include P and the multipliers in the JSON")
    stability.add_argument("--force", action="store_true", help=o.FORCE_HELP)
    stability.add_argument("--cell", default=None, metavar="NAME",
                           help="certify the recurrence of this submodule of --model (an nn.RNNCell-like cell or a module "
                                "with step(state, x)), its Lur'e form derived and checked; the rest of the model is not")
    stability.add_argument("--lipschitz", action="store_true",
                           help="also certify a Lipschitz bound (incremental l2-gain) of the map from the whole input "
                                "sequence to the outputs (the toolkit's models in Lur'e form, and lipschitz-ren by construction)")
    stability.add_argument("--horizon", type=o.int_in(1, 10**7), default=None,
                           help="with --lipschitz: input steps of the sequence (default: the recorded task's length)")
    stability.add_argument("--trust-unchecked-form", action="store_true",
                           help="exit 0 on a certificate of a Lur'e form that could not be compared with the module")
    stability.add_argument("--quiet", action="store_true", help="no progress bar")
    stability.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..pipelines import stability
    from ..progress import progress_bar

    if args.json:
        check_output_file(args.json, force=args.force, inputs=o.input_files(args))
    subject = o.load_subject(args)
    data = None
    if args.task is not None or args.data is not None:
        data = o.task_source(args).load_for([(args.checkpoint, subject)])
        print(f"note: {'--task' if args.task else '--data'} only sets the input size a Lur'e form is checked with and "
              "shows the range of the inputs LSTM/GRU layers receive: the certificates hold for every input sequence")
    settings = stability.StabilitySettings(None if args.certificates is None else tuple(args.certificates),
                                           args.time_budget, args.input_bound, args.cell)
    found = stability.run(subject, data, settings, wrap=lambda names: progress_bar(
        names, desc="certificates", unit="cert", enabled=not args.quiet)).models[0]
    if found.source == "none":
        raise o.UsageError(f"{args.checkpoint}: {subject.name}: no Lur'e form: no certificate available for this model")
    print(found.verdict())
    if found.stored.status != "absent":
        print(f"{args.checkpoint}: {found.stored.describe()}", file=sys.stdout if found.stored.verified else sys.stderr)
    if found.source == "torch.nn layers":
        _print_layers(args, subject, found)
    elif found.source == "stored evidence":
        _print_stored_only(args, subject, found, _lipschitz(args, subject, data) if args.lipschitz else None)
    else:
        _print_lure_form(args, subject, found, _lipschitz(args, subject, data) if args.lipschitz else None)
    if found.holds and found.form_unchecked and not args.trust_unchecked_form:
        print(f"the certificate is of a Lur'e form that could not be compared with the module ({found.form_check.reason}); "
              "exit 1 (pass --trust-unchecked-form to accept it)", file=sys.stderr)
        return 1
    return 0 if found.holds else 1


def _print_lure_form(args: argparse.Namespace, subject: ModelUnderAnalysis, found: ModelCertificate,
                     bound: LipschitzBound | None) -> None:
    from ..formatting import format_table
    from ..writers import write_json

    system = found.system
    report = found.spectrum
    assert system is not None and report is not None  # a certificate of a Lur'e form carries it and its spectrum
    scheme = system.method if system.eps is None else f"{system.method}, eps {system.eps:g}" + (
        f" x {system.substeps} substeps" if system.substeps > 1 else "")
    print(f"{args.checkpoint}: {o.architecture(subject)} ({scheme}), n = {system.n}, slope L = {system.slope:g}")
    print("spectra (diagnostics: necessary conditions only, never a certificate)")
    box = report.bendixson_A
    print(f"  alpha(A) = {report.abscissa_A:+.5f}   mu2(A) = {report.mu2_A:+.5f}   ||A||_2 = {report.norm_A:.5f}   ||W||_2 = {report.norm_W:.5f}")
    print(f"  Bendixson box of A: Re in [{box.re_min:+.5f}, {box.re_max:+.5f}], |Im| <= {box.im_max:.5f}")
    if report.discretization is not None:
        d = report.discretization
        print(f"  {d.method} step matrix of A: spectral radius {d.step_spectral_radius:.6f}, "
              f"every eps*lambda(A) in the stability region: {'yes' if d.all_in_region else 'no'}")
    print("certificates")
    print(format_table([r.to_dict(include_matrices=False) for r in found.certificates], _CERTIFICATE_COLUMNS))
    _print_gain(bound)
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "verdict": found.verdict(),
                               "config": subject.metadata.get("config"), "spectrum": report.to_dict(),
                               "certificates": [r.to_dict(include_matrices=args.evidence) for r in found.certificates],
                               **({} if bound is None else {"lipschitz_bound": bound.to_dict(include_matrices=args.evidence)})})


def _print_gain(bound: LipschitzBound | None) -> None:
    """The certified bound and, when measured, its empirical lower bounds and looseness."""
    from ..pipelines import stability

    gain = None if bound is None else bound.certificate
    if gain is not None and gain.holds:
        print(f"Lipschitz bound of the inputs (all {gain.horizon} steps) -> outputs: {gain.lipschitz:.6g} "
              f"(l2 over time and features; tier {gain.tier}, rho {gain.rho:.6g}, {gain.seconds:.2f} s)")
    elif gain is not None:
        print(f"no Lipschitz bound certified over {gain.horizon} steps: {gain.reason}")
    tight = None if bound is None else bound.tightness
    if tight is not None and tight.holds:
        print(f"empirical lower bounds on {tight.samples} test inputs: largest input-Jacobian norm of the logits "
              f"{tight.gradient_lower_bound:.6g}, largest ||dz||/||dx|| of the l2 PGD attack at radius "
              f"{stability.TIGHTNESS_RADIUS:g} {tight.attack_lower_bound:.6g}; looseness (bound / largest) "
              f"{tight.looseness:.4g}, of the closest pair bound {tight.pair_looseness:.4g}")


def _lipschitz(args: argparse.Namespace, subject: ModelUnderAnalysis, data: Any) -> LipschitzBound:
    """The certified Lipschitz bound of x -> outputs over the horizon
    (:func:`~lrnn_analysis.pipelines.stability.lipschitz_bound`), beside its empirical lower bounds
    on the task's test inputs when a task is known (--task, --data or the recorded one)."""
    from ..pipelines import stability

    task = data
    if task is None and (args.horizon is None or subject.metadata.get("task")):
        task = o.task_source(args).load_for([(args.checkpoint, subject)])
    horizon = args.horizon if args.horizon is not None else task.seq_len
    found = stability.lipschitz_bound(subject, horizon, time_budget=args.time_budget, data=task)
    if found.stored is not None and found.stored.status != "absent":
        print(f"{args.checkpoint}: {found.stored.describe()}", file=sys.stdout if found.stored.verified else sys.stderr)
    return found


def _print_layers(args: argparse.Namespace, subject: ModelUnderAnalysis, found: ModelCertificate) -> None:
    """A model without a Lur'e form of its own that contains torch.nn RNN/LSTM/GRU layers: each
    layer and each stack of layers is certified; how the model combines their states is not."""
    from ..formatting import format_table
    from ..stability.cascade import layer_rows
    from ..writers import write_json

    print(f"{args.checkpoint}: {subject.name}: no Lur'e form of the whole model; certifying its torch.nn recurrent "
          "layers (what the model does with their states is not certified)")
    print(format_table(layer_rows([c.to_dict() for c in found.layers]), ["module", "kind", "layer", "name", "holds", "rate", "reason"]))
    for cascade in found.layers:
        print(f"{cascade.module or '(root)'} ({cascade.kind}): {'holds' if cascade.holds else 'fails'}: {cascade.reason}")
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "model": subject.describe(),
                               "recurrent_layers": [c.to_dict() for c in found.layers]})


def _print_stored_only(args: argparse.Namespace, subject: ModelUnderAnalysis, found: ModelCertificate,
                       bound: LipschitzBound | None) -> None:
    """A model without a Lur'e form whose stored certificate verified (and, with ``--lipschitz``, its gain bound)."""
    from ..formatting import format_table
    from ..writers import write_json

    config = subject.module.config
    print(f"{args.checkpoint}: {o.architecture(subject)} (no Lur'e form; its own contraction certificate), n = {config.hidden}")
    print("certificates")
    print(format_table([r.to_dict(include_matrices=False) for r in found.certificates], _CERTIFICATE_COLUMNS))
    _print_gain(bound)
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "config": subject.metadata.get("config"),
                               "certificates": [r.to_dict(include_matrices=args.evidence) for r in found.certificates],
                               **({} if bound is None else {"lipschitz_bound": bound.to_dict(include_matrices=args.evidence)})})
