"""``lrnn hessian``: curvature of the loss of one model (see :mod:`lrnn_analysis.pipelines.curvature`)."""
from __future__ import annotations

import argparse

from ..choices import (
    CURVATURE_BACKENDS,
    CURVATURE_OPERATORS,
    DENSITY_SCALES,
    DIAGONAL_METHODS,
    DTYPES,
    MAX_BATCH_SIZE,
    MAX_BATCHES,
    MAX_EIGENPAIRS,
    MAX_MATVECS,
    MAX_MC_SAMPLES,
    RNN_TWIN_MODES,
    SPLITS,
    TRACE_METHODS,
)
from ..outputs import check_output_file
from . import options as o

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    hess = sub.add_parser("hessian", help="loss Hessian: extreme eigenvalues, trace with CI, spectral density")
    hess.add_argument("checkpoint", nargs="?", default=None)
    o.add_model_options(hess)
    o.add_task_options(hess, required=False)
    o.add_data_option(hess)
    hess.add_argument("--split", choices=SPLITS, default="train")
    hess.add_argument("--batch-size", type=o.int_in(1, MAX_BATCH_SIZE), default=128)
    amount = hess.add_mutually_exclusive_group()
    amount.add_argument("--batches", type=o.int_in(1, MAX_BATCHES), default=1, help="use the first N batches of the split")
    amount.add_argument("--full", action="store_true", help="use the whole split (HVPs weighted by samples)")
    hess.add_argument("--params", default=None, help="parameter names or globs, e.g. M_A,M_W (default: all)")
    hess.add_argument("--top-k", "--hessian-k", dest="top_k", type=o.int_in(1, MAX_EIGENPAIRS), default=1,
                      help="eigenvalues at each end of the spectrum")
    hess.add_argument("--trace", action="store_true", help="estimate the trace with a 95%% CI")
    hess.add_argument("--trace-method", choices=TRACE_METHODS, default="hutchinson")
    hess.add_argument("--trace-matvecs", type=o.int_in(1, MAX_MATVECS), default=200,
                      help="most operator products for the trace")
    hess.add_argument("--density", action="store_true", help="spectral density by stochastic Lanczos quadrature")
    hess.add_argument("--density-scale", choices=DENSITY_SCALES, default="linear",
                      help="symlog: density of sign(l)*log10(1+|l|/linthresh)")
    hess.add_argument("--operator", choices=CURVATURE_OPERATORS, default="hessian",
                      help="Hessian, generalized Gauss-Newton, Monte-Carlo Fisher or empirical Fisher")
    hess.add_argument("--mc-samples", type=o.int_in(1, MAX_MC_SAMPLES), default=1, help="sampled labels per input (--operator fisher)")
    hess.add_argument("--estimate", type=o.name_list, default=[], metavar="diag,frobenius,blocks",
                      help="also estimate the diagonal, the squared Frobenius norm and/or per-tensor trace and lambda_max")
    hess.add_argument("--diag-method", choices=DIAGONAL_METHODS, default="hutchinson")
    hess.add_argument("--backend", choices=CURVATURE_BACKENDS, default="native")
    hess.add_argument("--rnn-twin", choices=RNN_TWIN_MODES, default="auto",
                      help="run torch.nn RNN/LSTM/GRU layers as unrolled twins (auto: on CUDA, where they cannot be "
                      "differentiated twice)")
    hess.add_argument("--dtype", choices=DTYPES, default="float32")
    hess.add_argument("--seed", type=o.seed, default=0)
    hess.add_argument("--json", default=None, metavar="PATH", help="write every number and its uncertainty as JSON")
    hess.add_argument("--figure", default=None, metavar="PATH", help="with --density: draw it (.png, .pdf or .svg)")
    hess.add_argument("--force", action="store_true", help=o.FORCE_HELP)
    o.add_run_options(hess)
    hess.set_defaults(handler=run)


def settings_from(args: argparse.Namespace):
    from ..pipelines.curvature import CurvatureSettings

    return CurvatureSettings(
        operator=args.operator, split=args.split, batch_size=args.batch_size, batches=None if args.full else args.batches,
        params=args.params, top_k=args.top_k, trace=args.trace, trace_method=args.trace_method, trace_matvecs=args.trace_matvecs,
        density=args.density,
        density_scale=args.density_scale, mc_samples=args.mc_samples, estimates=tuple(args.estimate),
        diagonal_method=args.diag_method, backend=args.backend, dtype=args.dtype, seed=args.seed, rnn_twin=args.rnn_twin)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..formatting import format_table
    from ..pipelines import curvature
    from ..writers import write_json

    if args.json:
        check_output_file(args.json, force=args.force, inputs=o.input_files(args))
    if args.figure is not None and not args.density:
        raise o.UsageError("--figure draws the spectral density: add --density")
    o.check_figure(args.figure, args.force, o.input_files(args), [args.json])
    settings = settings_from(args)
    o.set_threads(args.threads)
    ranks = o.ranks_for(args)
    subject = o.load_subject(args)
    task = o.task_source(args).load_for([(args.checkpoint, subject)])
    subject.check_fits(task, str(args.checkpoint))
    result = curvature.run(subject, task, settings, ranks=ranks, progress=not args.quiet)
    if not ranks.is_main:
        return 0
    report = result.models[0].report
    info = report.operator
    fisher = f" ({args.mc_samples} label sample(s) per input)" if args.operator == "fisher" else ""
    print(f"{args.checkpoint}: {o.architecture(subject)}, {args.operator}{fisher}, {len(info.get('params', []))} parameter tensors "
          f"({', '.join(info.get('params', []))}), {info.get('n_samples')} samples"
          + (f" ({info.get('n_scored')} scored steps, {task.objective.loss_name})" if task.per_step else "")
          + f" of {task.name}/{args.split} "
          f"in {info.get('n_batches')} batch(es), {args.backend} backend, {info.get('dtype')}, seed {args.seed}")
    eigen = report.eigen
    rows = [{"eigenvalue": float(v), "residual": float(r), "relative residual": float(r / abs(v)) if v else None,
             "converged": bool(c)} for v, r, c in zip(eigen.values, eigen.residuals, eigen.converged)]
    print(format_table(rows, ["eigenvalue", "residual", "relative residual", "converged"]))
    lam_min = "-" if report.lambda_min is None else f"{report.lambda_min:.6g}"
    print(f"lambda_max = {report.lambda_max:.6g}, lambda_min = {lam_min}")
    if report.trace is not None:
        t = report.trace
        print(f"trace = {t.estimate:.6g} +- {t.ci_halfwidth:.3g} (95% CI, {t.method}, {t.matvecs} HVPs, stopped on {t.stop_reason})")
    if report.density is not None:
        d = report.density
        scale = "" if d.scale == "linear" else f" in symlog units (linthresh {d.linthresh:.3g})"
        print(f"spectral density: {d.n_probes} probes x {d.steps} Lanczos steps, Gaussian kernel width {d.sigma:.3g}{scale}")
        print("moments tr(C^k)/P: " + ", ".join(f"k={k}: {m:.4g} +- {h:.2g}" for k, (m, h) in
                                                 enumerate(zip(d.moments, d.moment_ci_halfwidths), start=1)))
    if report.diagonal is not None:
        g = report.diagonal
        print(f"diagonal ({g.method}, {g.matvecs} products): sum {g.estimate.sum():.6g}, max {g.estimate.max():.4g}, "
              f"median standard error {np.median(g.standard_error):.3g}")
    if report.frobenius is not None:
        f = report.frobenius
        print(f"squared Frobenius norm = {f.estimate:.6g} +- {f.ci_halfwidth:.3g} (95% CI, {f.matvecs} products)")
    if report.blocks is not None:
        print(format_table(list(report.blocks.rows), ["param", "numel", "lambda_max", "trace", "trace_ci_halfwidth",
                                                      "trace_method", "matvecs"]))
    print(f"{report.matvecs} operator products in {report.wall_time:.1f} s")
    for note in report.notes:
        print(f"note: {note}")
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "task": task.to_dict(), "split": args.split,
                               **report.to_dict()})
    if args.figure is not None:
        from ..plots import plot_density

        o.write_figure(plot_density(result.density_rows()).figure, args.figure)
    return 0
