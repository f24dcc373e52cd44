"""The ``lrnn`` command: parses options, calls the Python API, prints results.

Exit codes: 0 success, 1 a check failed, 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .constraints import CONSTRAINTS, StabilityConstraint
from .data import TASKS, load_task
from .io import write_csv, write_json
from .models import ARCHITECTURES, ModelConfig, build_model
from .runtime import DEVICE_CHOICES, resolve_device
from .tables import format_table, format_value
from .training import TrainSettings, spectral_summary, train_model, training_metadata


class UsageError(Exception):
    """Bad input detected after parsing; reported as one line with exit code 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto = CUDA when present")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="CPU threads (these small recurrent models run fastest on one)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_task_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--task", choices=sorted(TASKS), required=required, help="task name")
    parser.add_argument("--split-seed", type=int, default=None, help="seed of the train/val/test split (default 0, or the checkpoint's)")
    parser.add_argument("--data-path", default=None, help="smnist/psmnist: .npz or MNIST IDX directory (default: vendored 10k digits)")
    parser.add_argument("--pixels-per-step", type=_positive_int, default=None, help="smnist/psmnist: pixels per time step")
    parser.add_argument("--length", type=_positive_int, default=None, help="adding: sequence length")


def _task_from_args(args: argparse.Namespace, recorded: dict[str, Any] | None = None):
    """The task named on the command line, or else the one recorded in a checkpoint."""
    recorded = recorded or {}
    name = args.task or recorded.get("name")
    if name is None:
        raise UsageError("no --task given and the checkpoint records none")
    options = dict(recorded.get("options", {})) if name == recorded.get("name") else {}
    options.update({k: v for k, v in {"path": args.data_path, "pixels_per_step": args.pixels_per_step,
                                       "length": args.length}.items() if v is not None})
    seed = args.split_seed if args.split_seed is not None else recorded.get("seed", 0)
    return load_task(name, seed=seed, **options)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def cmd_train(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    device = resolve_device(args.device)
    task = _task_from_args(args)
    config = ModelConfig(
        arch=args.arch,
        input_dim=task.input_dim,
        hidden=args.hidden,
        output_dim=task.output_dim,
        eps=args.eps if args.eps is not None else task.default_eps,
        discretization=args.discretization or "",
        beta_a=args.beta_a if args.beta_a is not None else args.beta,
        gamma_a=args.gamma_a if args.gamma_a is not None else args.gamma,
        beta_w=args.beta_w if args.beta_w is not None else args.beta,
        gamma_w=args.gamma_w if args.gamma_w is not None else args.gamma,
        init_std=args.init_std,
        ode_substeps=args.ode_substeps,
        rho=args.rho,
        rank=args.rank,
        cond_penalty=args.cond_penalty,
    )
    settings = TrainSettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
        decay_epochs=args.decay_epochs, weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
    )
    constraint = StabilityConstraint(args.constrain, args.margin) if args.constrain else None
    model = build_model(config, seed=args.seed)
    result = train_model(model, task, settings, device, progress=not args.quiet, constraint=constraint)
    metadata = training_metadata(task, settings, result, device)
    if constraint is not None:
        from .stability import certify

        certificate = certify(model.lure_form(), [constraint.certificate])[0]
        metadata["constraint"] = {**constraint.to_dict(), "certificate_result": certificate.to_dict(include_matrices=False)}
    evidence_line = None
    if constraint is not None or config.arch in ("contracting", "ren"):
        from .stability.evidence import METADATA_KEY, certify_trained

        evidence, evidence_line = certify_trained(model)
        if evidence is not None:
            metadata[METADATA_KEY] = evidence.to_dict()
    metadata["command"] = "lrnn " + shlex.join(args.argv)
    out = save_checkpoint(args.out, model, metadata)
    metrics = result.metrics
    print(f"task {task.name} (split seed {task.seed}), arch {config.arch} ({config.discretization}), "
          f"hidden {config.hidden}, eps {config.eps:g}, {sum(p.numel() for p in model.parameters())} parameters")
    accuracy = metrics["test_accuracy"]
    score = f"test accuracy {accuracy:.4f}" if accuracy is not None else f"test MSE {metrics['test_loss']:.5f}"
    print(f"{score}, test loss {metrics['test_loss']:.4f}, trained {settings.epochs} epochs in {metrics['train_seconds']:.1f} s on {device}")
    print(_spectral_line(model))
    if constraint is not None:
        verdict = metadata["constraint"]["certificate_result"]
        print(f"constraint {constraint.certificate} (margin {constraint.margin:g}): holds {verdict['holds']}, margin {verdict['margin']:.4g}")
    if evidence_line is not None:
        print(evidence_line)
    print(f"saved {out}")
    return 0


def _spectral_line(model) -> str:
    parts = [f"{key.split('_')[0]}({key.split('_')[1]}) = {value:+.4f}" for key, value in spectral_summary(model).items()]
    return "spectra: " + ", ".join(parts)


def cmd_info(args: argparse.Namespace) -> int:
    model, metadata = load_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(metadata, indent=2, sort_keys=True))
        return 0
    config = model.config.to_dict()
    print(f"checkpoint {args.checkpoint} ({metadata.get('format')})")
    print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    if "task" in metadata:
        task = metadata["task"]
        print(f"task: {task.get('name')} (split seed {task.get('seed')}, options {task.get('options', {})})")
    for key in ("training", "metrics", "reference_hparams", "environment"):
        if key in metadata:
            print(f"{key}: " + ", ".join(f"{k}={format_value(v)}" for k, v in metadata[key].items()))
    log = metadata.get("log") or []
    if log:
        names = [key for key in log[0] if key.split("_")[0] in ("alpha", "mu2", "norm")]
        header = f"{'epoch':>5} {'train_loss':>10} {'val_loss':>9} {'val_acc':>8} {'lr':>8}" + "".join(f" {n:>10}" for n in names)
        print(header)
        for entry in log:
            row = (f"{entry['epoch']:>5} {entry['train_loss']:>10.4f} {entry['val_loss']:>9.4f} "
                   f"{format_value(entry.get('val_accuracy')):>8} {entry['lr']:>8.2g}")
            row += "".join(f" {entry[n]:>+10.4f}" for n in names)
            print(row)
    print(_spectral_line(model))
    return 0


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error


ROBUSTNESS_OPTIONS = {
    "input_noise": "gaussian",
    "salt_pepper": "salt-pepper",
    "occlusion": "occlusion",
    "fgsm": "fgsm",
    "param_noise": "gaussian-relative",
    "hessian_direction": "hessian-direction",
}


def cmd_robustness(args: argparse.Namespace) -> int:
    from .robustness import SweepModel, hessian_directions, recurrent_parameter_names, sweep

    _set_threads(args.threads)
    device = resolve_device(args.device)
    loaded = [(path, *load_checkpoint(path)) for path in args.checkpoints]
    task = _task_from_args(args, loaded[0][2].get("task"))
    grid = {kind: getattr(args, option) for option, kind in ROBUSTNESS_OPTIONS.items() if getattr(args, option)}
    if not grid:
        raise UsageError("no perturbation levels given (e.g. --input-noise 0,0.1,0.2)")
    for path, model, _ in loaded:
        _check_model_fits_task(path, model, task)
    models = []
    for path, model, _ in loaded:
        directions = None
        if "hessian-direction" in grid:
            names = recurrent_parameter_names(model) if args.recurrent_only else None
            directions = hessian_directions(model.to(device), task, args.hessian_k, params=names, seed=0)
        models.append(SweepModel(_model_label(model), str(path), model, directions))
    result = sweep(models, task, grid, args.seeds, split=args.split, device=device, batch_size=args.batch_size,
                   max_samples=args.max_samples, recurrent_only=args.recurrent_only, progress=not args.quiet)
    result.write_csv(args.out)
    if args.json:
        result.write_json(str(Path(args.out).with_suffix(".json")))
    print(format_table(result.summary, ["model", "checkpoint", "perturbation", "level", "seeds", "accuracy_mean",
                                        "accuracy_ci95", "accuracy_drop", "loss_mean"],
                       ["model", "checkpoint", "perturbation", "level", "seeds", "accuracy", "+-95%", "drop", "loss"]))
    print(f"wrote {args.out}" + (f" and {Path(args.out).with_suffix('.json')}" if args.json else ""))
    return 0


def _model_label(model) -> str:
    config = model.config
    return f"{config.arch} ({config.discretization})"


def cmd_stability(args: argparse.Namespace) -> int:
    from .stability import certify, default_certificates, spectrum

    from .stability.evidence import certificate_result, check_stored

    model, metadata = load_checkpoint(args.checkpoint)
    stored = check_stored(model, metadata)
    if stored.status != "absent":
        print(f"{args.checkpoint}: {stored.describe()}", file=sys.stdout if stored.verified else sys.stderr)
    system = model.lure_form()
    if system is None:
        if stored.verified:
            return _print_stored_only(args, model, certificate_result(stored, model))
        raise UsageError(f"{args.checkpoint}: a {model.config.arch} model has no Lur'e form, so no certificate applies")
    report = spectrum(system)
    names = args.certificates or list(default_certificates(system))
    started = time.monotonic()
    results = []
    for name in tqdm(names, desc="certificates", unit="cert", disable=args.quiet):
        if stored.verified and name == stored.evidence.certificate:
            results.append(certificate_result(stored, model))
            continue
        remaining = None if args.time_budget is None else max(0.0, args.time_budget - (time.monotonic() - started))
        results += certify(system, [name], time_budget=remaining)
    scheme = system.method if system.eps is None else f"{system.method}, eps {system.eps:g}" + (
        f" x {system.substeps} substeps" if system.substeps > 1 else "")
    print(f"{args.checkpoint}: {model.config.arch} ({scheme}), n = {system.n}, slope L = {system.slope:g}")
    print("spectra (diagnostics: necessary conditions only, never a certificate)")
    box = report.bendixson_A
    print(f"  alpha(A) = {report.abscissa_A:+.5f}   mu2(A) = {report.mu2_A:+.5f}   ||A||_2 = {report.norm_A:.5f}   ||W||_2 = {report.norm_W:.5f}")
    print(f"  Bendixson box of A: Re in [{box.re_min:+.5f}, {box.re_max:+.5f}], |Im| <= {box.im_max:.5f}")
    if report.discretization is not None:
        d = report.discretization
        print(f"  {d.method} step matrix of A: spectral radius {d.step_spectral_radius:.6f}, "
              f"every eps*lambda(A) in the stability region: {'yes' if d.all_in_region else 'no'}")
    rows = [r.to_dict(include_matrices=False) for r in results]
    print("certificates")
    print(format_table(rows, ["name", "holds", "margin", "rate", "tier", "seconds", "reason"]))
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "config": model.config.to_dict(),
                               "spectrum": report.to_dict(), "certificates": [r.to_dict(include_matrices=args.evidence) for r in results]})
    return 0 if all(r.holds for r in results) else 1


def _print_stored_only(args: argparse.Namespace, model, result) -> int:
    """``lrnn stability`` of a model without a Lur'e form whose stored certificate verified."""
    print(f"{args.checkpoint}: {model.config.arch} (no Lur'e form; its own contraction certificate), n = {model.config.hidden}")
    rows = [result.to_dict(include_matrices=False)]
    print("certificates")
    print(format_table(rows, ["name", "holds", "margin", "rate", "tier", "seconds", "reason"]))
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "config": model.config.to_dict(),
                               "certificates": [result.to_dict(include_matrices=args.evidence)]})
    return 0


def cmd_hessian(args: argparse.Namespace) -> int:
    from .evaluation import loss_function
    from .hessian import analyze

    _set_threads(args.threads)
    device = resolve_device(args.device)
    model, metadata = load_checkpoint(args.checkpoint)
    task = _task_from_args(args, metadata.get("task"))
    _check_model_fits_task(args.checkpoint, model, task)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model = model.to(device=device, dtype=dtype)
    batches = [(x.to(dtype), y if task.is_classification else y.to(dtype))
               for x, y in getattr(task, args.split).batches(args.batch_size, None if args.full else args.batches, device)]
    report = analyze(model, loss_function(task.is_classification), batches, params=args.params, top_k=args.top_k,
                     trace=args.trace, density=args.density, backend=args.backend, seed=args.seed, dtype=dtype,
                     progress=not args.quiet, trace_method=args.trace_method)
    info = report.operator
    print(f"{args.checkpoint}: {model.config.arch}, {len(info.get('params', []))} parameter tensors "
          f"({', '.join(info.get('params', []))}), {info.get('n_samples')} samples of {task.name}/{args.split} "
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
        print(f"spectral density: {d.n_probes} probes x {d.steps} Lanczos steps, Gaussian kernel width {d.sigma:.3g}")
    print(f"{report.matvecs} Hessian-vector products in {report.wall_time:.1f} s")
    for note in report.notes:
        print(f"note: {note}")
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "task": task.to_dict(), "split": args.split,
                               **report.to_dict()})
    return 0


def _check_model_fits_task(path: str, model, task) -> None:
    task.check_fits(model.config.input_dim, model.config.output_dim, str(path))


def cmd_audit(args: argparse.Namespace) -> int:
    from .report import AuditSettings, Gate, run_audit, write_audit

    gates = [Gate.parse(text) for text in args.gate]
    _set_threads(args.threads)
    device = resolve_device(args.device)
    overrides = {"beta": args.beta, "gamma": args.gamma, "eps": args.eps}
    model, metadata = load_checkpoint(args.checkpoint, **overrides)
    task = _task_from_args(args, metadata.get("task"))
    _check_model_fits_task(args.checkpoint, model, task)
    settings = AuditSettings.thorough(args.seed) if args.thorough else AuditSettings(seed=args.seed)
    result = run_audit(model, task, str(args.checkpoint), metadata, settings, gates, device, progress=not args.quiet)
    out = write_audit(result, args.out)
    report = result.report
    print(f"audit of {args.checkpoint} ({model.config.arch}, task {task.name}) written to {out}/report.md and report.json")
    print(f"clean test accuracy {format_value(report['clean']['accuracy'])}, lambda_max {report['hessian']['lambda_max']:.4g}, "
          f"lambda_min {report['hessian']['lambda_min']:.4g}, trace {report['hessian']['trace']['estimate']:.4g} "
          f"+- {report['hessian']['trace']['ci_halfwidth']:.3g}")
    stored = report["stability"]["stored_evidence"]
    if stored["status"] == "verified":
        print(f"verified from stored evidence: {stored['certificate']} at rate {stored['rate']:.6g} (tier {stored['tier']})")
    elif stored["status"] == "failed":
        print(f"STORED EVIDENCE NOT VERIFIED: {stored['reason']}; certificates searched as usual", file=sys.stderr)
    for certificate in report["stability"].get("certificates", []):
        print(f"certificate {certificate['name']}: {'holds' if certificate['holds'] else 'fails'} ({certificate['reason']})")
    if result.gates:
        print(format_table([g.to_dict() for g in result.gates], ["gate", "passed", "observed", "detail"]))
        print("all gates pass" if result.passed else "a gate failed")
    return 0 if result.passed else 1


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .recipes import find_recipes, load_recipe, run_recipe

    _set_threads(args.threads)
    device = resolve_device(args.device)
    paths = args.recipes or find_recipes(args.analyses_dir)
    if not paths:
        raise UsageError(f"no recipes given and none in {args.analyses_dir}")
    recipes = [load_recipe(path) for path in paths]
    outcomes = []
    for recipe in recipes:
        if not args.quiet:
            print(f"running {recipe.name} ({recipe.analysis}) ...", flush=True)
        outcomes.append(run_recipe(recipe, args.out, device, progress=not args.quiet))
    rows = [{"recipe": o.name, "analysis": o.analysis, "seconds": o.seconds, "outputs": len(o.outputs), "summary": o.summary}
            for o in outcomes]
    print(format_table(rows, ["recipe", "analysis", "seconds", "outputs", "summary"]))
    print(f"wrote {sum(len(o.outputs) for o in outcomes)} files into {args.out}")
    return 0


_MAX_GRID = 100_000


def _grid(text: str) -> list[float]:
    """'a,b,c' or 'start:stop:count' (inclusive, evenly spaced, 1 <= count <= 100000); finite values."""
    if ":" in text:
        try:
            start, stop, count = text.split(":")
            size = int(count)
            if not 1 <= size <= _MAX_GRID:
                raise ValueError
            values = [float(v) for v in np.linspace(float(start), float(stop), size)]
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"expected start:stop:count with 1 <= count <= {_MAX_GRID}, got {text!r}") from error
    else:
        values = _float_list(text)
    if not values or not all(np.isfinite(values)) or len(values) > _MAX_GRID:
        raise argparse.ArgumentTypeError(f"expected 1 to {_MAX_GRID} finite numbers, got {text!r}")
    return values


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from error
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _certify_settings(args: argparse.Namespace) -> tuple[float, float, float, str, float, str]:
    """(beta_W, gamma_A, gamma_W, how gamma_W was set, r, how r was set) from the certify options."""
    if args.gamma_a is None and args.gamma is None:
        raise UsageError("give --gamma (gamma_A = gamma_W) or --gamma-a (and optionally --gamma-w)")
    gamma_a = args.gamma if args.gamma_a is None else args.gamma_a
    if args.gamma_w is not None:
        gamma_w, w_source = args.gamma_w, "--gamma-w"
    elif args.gamma is not None:
        gamma_w, w_source = args.gamma, "shared --gamma"
    else:
        gamma_w, w_source = gamma_a, "default: gamma_W = gamma_A"
    beta_w = args.beta if args.beta_w is None else args.beta_w
    from_init = args.hidden is not None or args.init_std is not None
    if from_init == (args.radius is not None):
        raise UsageError("give either --radius or both --hidden and --init-std")
    if from_init:
        if args.hidden is None or args.init_std is None:
            raise UsageError("--hidden and --init-std go together (they derive the radius of the initialisation)")
        from .stability import gaussian_init_radius

        init = gaussian_init_radius(args.hidden, args.init_std, args.init_failure_probability)
        return beta_w, gamma_a, gamma_w, w_source, init.radius, f"the initialisation's radius: {init.describe()}"
    return beta_w, gamma_a, gamma_w, w_source, args.radius, "--radius"


def cmd_certify(args: argparse.Namespace) -> int:
    from .stability import certify_parameterization, phase_diagram

    beta_w, gamma_a, gamma_w, w_source, radius, r_source = _certify_settings(args)
    phase = args.phase_betas or args.phase_gammas
    if phase and not (args.phase_betas and args.phase_gammas and args.out):
        raise UsageError("a phase diagram needs --phase-betas, --phase-gammas and --out")
    if phase and len(args.phase_betas) * len(args.phase_gammas) > _MAX_GRID:
        raise UsageError(f"the phase diagram has more than {_MAX_GRID} cells")
    results = certify_parameterization(args.beta, gamma_a, beta_w, gamma_w, radius, args.eps, args.slope, args.tests)
    print(f"Lipschitz parameterization: beta_A = {args.beta:g}, gamma_A = {gamma_a:g}, beta_W = {beta_w:g}, "
          f"gamma_W = {gamma_w:g} ({w_source}), eps = {args.eps}, L = {args.slope:g}")
    print(f"every M_A, M_W with ||M||_2 <= r = {radius:.6g} ({r_source})")
    print(format_table([r.to_dict() for r in results], ["test", "holds", "value", "margin", "r_star"],
                       ["test", "every model certified", "value", "margin", "largest certified r*"]))
    for result in results:
        if not result.holds:
            print(f"{result.test}: {result.reason}")
            print(f"  what to change: {result.remedy}")
    shared = gamma_w == gamma_a and args.gamma_w is None
    if shared and not any(r.holds_at_zero for r in results):
        print(f"one shared gamma (gamma_W = gamma_A = {gamma_a:g}) makes every norm test impossible for L >= 1: W's "
              "shift -gamma_W I adds L |gamma_W| to ||W||_2 and cancels A's -gamma_A I. Set --gamma-w 0 "
              "(or smaller than gamma_A / L) and raise --gamma-a as suggested above.")
    if phase:
        cells = phase_diagram(args.phase_betas, args.phase_gammas, radius, args.eps, args.slope, args.tests,
                              beta_W=args.beta_w, gamma_W=args.gamma_w, user_point=(args.beta, gamma_a))
        write_csv(args.out, [c.to_dict() for c in cells])
        grid = [c for c in cells if c.point == "grid"]
        certified = sum(c.holds for c in grid)
        w_axes = ("beta_W = beta_A" if args.beta_w is None else f"beta_W = {args.beta_w:g}") + ", " + (
            "gamma_W = gamma_A" if args.gamma_w is None else f"gamma_W = {args.gamma_w:g}")
        n_cells = len(args.phase_betas) * len(args.phase_gammas)
        print(f"phase diagram over beta_A x gamma_A ({w_axes}) at r = {radius:.6g}: {n_cells} cells x "
              f"{len(grid) // n_cells} tests, {certified} of {len(grid)} certified; your point (beta_A, gamma_A) = "
              f"({args.beta:g}, {gamma_a:g}) is in the rows with point = user; written to {args.out}")
        if certified == 0 and args.gamma_w is None:
            print("0 cells certified because W shares each cell's gamma: gamma_W = gamma_A cancels A's shift "
                  "(see above). Hold W's shift fixed with --gamma-w 0.")
    return 0 if all(r.holds for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrnn", description="Stability, curvature and robustness of continuous-time RNNs.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model on a task and save a checkpoint")
    _add_task_options(train, required=True)
    train.add_argument("--arch", choices=ARCHITECTURES, default="lipschitz")
    train.add_argument("--hidden", type=_positive_int, default=64)
    train.add_argument("--eps", type=float, default=None, help="step per input (default: the task's)")
    train.add_argument("--discretization", default=None, help="euler|rk2 (lipschitz), rk4|rk2|euler (node)")
    train.add_argument("--beta", type=float, default=0.75, help="beta of A and W")
    train.add_argument("--gamma", type=float, default=0.001, help="gamma of A and W")
    train.add_argument("--beta-a", type=float, default=None)
    train.add_argument("--beta-w", type=float, default=None)
    train.add_argument("--gamma-a", type=float, default=None)
    train.add_argument("--gamma-w", type=float, default=None)
    train.add_argument("--init-std", type=float, default=0.1, help="recurrent init: N(0, (init_std/hidden)^2)")
    train.add_argument("--ode-substeps", type=_positive_int, default=1, help="node: solver steps per input step")
    train.add_argument("--rho", type=float, default=0.999, help="contracting/ren: contraction factor per step they are built to")
    train.add_argument("--rank", type=int, default=0, help="contracting/ren: rows of X (0: hidden)")
    train.add_argument("--cond-penalty", type=float, default=0.1,
                       help="contracting: kappa of the loss term kappa * mean(log^2 sigma_i(T))")
    train.add_argument("--epochs", type=_positive_int, default=100)
    train.add_argument("--batch-size", type=_positive_int, default=128)
    train.add_argument("--lr", type=float, default=0.03)
    train.add_argument("--lr-decay", type=float, default=0.1)
    train.add_argument("--decay-epochs", type=_int_list, default=None, help="comma-separated (default: 75%% of epochs)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--grad-clip", type=float, default=None)
    train.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    train.add_argument("--constrain", choices=CONSTRAINTS, default=None,
                       help="project M_A, M_W after every step so this norm certificate holds (lipschitz only)")
    train.add_argument("--margin", type=float, default=0.01, help="margin of the --constrain certificate")
    train.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    _add_run_options(train)
    train.set_defaults(handler=cmd_train)

    info = sub.add_parser("info", help="print a checkpoint's config, metrics and training log")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true", help="print the metadata as JSON")
    info.set_defaults(handler=cmd_info)
    stability = sub.add_parser("stability", help="spectra and global-stability certificates of a checkpoint")
    stability.add_argument("checkpoint")
    stability.add_argument("--certificates", type=_name_list, default=None,
                           help="comma-separated, e.g. euler-norm,euler-lmi (default: those of the scheme the model runs)")
    stability.add_argument("--time-budget", type=float, default=None, help="seconds for all LMI tiers together")
    stability.add_argument("--json", default=None, metavar="PATH", help="write spectra and certificates as JSON")
    stability.add_argument("--evidence", action="store_true", help="include P and the multipliers in the JSON")
    stability.add_argument("--quiet", action="store_true", help="no progress bar")
    stability.set_defaults(handler=cmd_stability)

    cert = sub.add_parser("certify", help="certify every model of a Lipschitz parameterization with ||M_A||_2, ||M_W||_2 <= r")
    cert.add_argument("--beta", type=_finite_float, required=True, help="beta_A (and beta_W unless --beta-w)")
    cert.add_argument("--gamma", type=_finite_float, default=None, help="one shared gamma: gamma_A = gamma_W")
    cert.add_argument("--gamma-a", type=_finite_float, default=None, help="gamma_A (overrides --gamma)")
    cert.add_argument("--beta-w", type=_finite_float, default=None)
    cert.add_argument("--gamma-w", type=_finite_float, default=None,
                      help="gamma_W (overrides --gamma; default: gamma_A)")
    cert.add_argument("--eps", type=_finite_float, default=None, help="step of the discretization (adds euler-norm, rk2-norm)")
    cert.add_argument("--radius", type=_finite_float, default=None, help="bound r on ||M_A||_2 and ||M_W||_2")
    cert.add_argument("--hidden", type=_positive_int, default=None,
                      help="with --init-std: r = the radius of the toolkit's initialisation of this hidden size")
    cert.add_argument("--init-std", type=_finite_float, default=None,
                      help="with --hidden: entries of M ~ N(0, (init_std/hidden)^2), as `lrnn train` initialises them")
    cert.add_argument("--init-failure-probability", type=_finite_float, default=1e-6,
                      help="probability allowed that an initial M_A or M_W exceeds the derived radius (default 1e-6)")
    cert.add_argument("--slope", type=_finite_float, default=1.0, help="Lipschitz constant L of the activation")
    cert.add_argument("--tests", type=_name_list, default=None, help="e.g. ct-norm,euler-norm")
    cert.add_argument("--phase-betas", type=_grid, default=None,
                      help="beta_A grid (a,b,c or start:stop:count); W shares beta and gamma unless --beta-w/--gamma-w fix them")
    cert.add_argument("--phase-gammas", type=_grid, default=None, help="gamma_A grid: a,b,c or start:stop:count")
    cert.add_argument("--out", default=None, help="CSV of the phase diagram (one row per beta_A, gamma_A, test; your point marked)")
    cert.set_defaults(handler=cmd_certify)

    hess = sub.add_parser("hessian", help="loss Hessian: extreme eigenvalues, trace with CI, spectral density")
    hess.add_argument("checkpoint")
    _add_task_options(hess, required=False)
    hess.add_argument("--split", choices=("train", "val", "test"), default="train")
    hess.add_argument("--batch-size", type=_positive_int, default=128)
    amount = hess.add_mutually_exclusive_group()
    amount.add_argument("--batches", type=_positive_int, default=1, help="use the first N batches of the split")
    amount.add_argument("--full", action="store_true", help="use the whole split (HVPs weighted by samples)")
    hess.add_argument("--params", default=None, help="parameter names or globs, e.g. M_A,M_W (default: all)")
    hess.add_argument("--top-k", type=_positive_int, default=1, help="eigenvalues at each end of the spectrum")
    hess.add_argument("--trace", action="store_true", help="estimate the trace with a 95%% CI")
    hess.add_argument("--trace-method", choices=("hutchinson", "hutch++"), default="hutchinson")
    hess.add_argument("--density", action="store_true", help="spectral density by stochastic Lanczos quadrature")
    hess.add_argument("--backend", choices=("native", "pyhessian"), default="native")
    hess.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    hess.add_argument("--seed", type=int, default=0)
    hess.add_argument("--json", default=None, metavar="PATH", help="write every number and its uncertainty as JSON")
    _add_run_options(hess)
    hess.set_defaults(handler=cmd_hessian)

    audit = sub.add_parser("audit", help="stability, Hessian and robustness report of one checkpoint, with gates")
    audit.add_argument("checkpoint")
    _add_task_options(audit, required=False)
    audit.add_argument("--gate", action="append", default=[], metavar="KIND=VALUE",
                       help="certified=NAME, min-accuracy=A, max-lambda=X, max-trace=X, max-accuracy-drop=KIND:LEVEL:DROP")
    audit.add_argument("--out", required=True, help="report directory (written atomically)")
    audit.add_argument("--thorough", action="store_true", help="paper-grade settings (slow)")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--beta", type=float, default=None, help="reference state dicts: beta (else from the file name)")
    audit.add_argument("--gamma", type=float, default=None, help="reference state dicts: gamma")
    audit.add_argument("--eps", type=float, default=None, help="reference state dicts: eps")
    _add_run_options(audit)
    audit.set_defaults(handler=cmd_audit)

    reproduce = sub.add_parser("reproduce", help="run analysis recipes (default: all of analyses/) into figures/")
    reproduce.add_argument("recipes", nargs="*", help="recipe files (default: every analyses/*.toml)")
    reproduce.add_argument("--analyses-dir", default="analyses")
    reproduce.add_argument("--out", default="figures", help="output directory")
    _add_run_options(reproduce)
    reproduce.set_defaults(handler=cmd_reproduce)

    robust = sub.add_parser("robustness", help="accuracy under input and parameter perturbations (tidy CSV)")
    robust.add_argument("checkpoints", nargs="+", metavar="CKPT")
    _add_task_options(robust, required=False)
    robust.add_argument("--input-noise", type=_float_list, default=None, help="Gaussian input noise sigmas, e.g. 0,0.1,0.2,0.3")
    robust.add_argument("--salt-pepper", type=_float_list, default=None, help="salt-and-pepper probabilities")
    robust.add_argument("--occlusion", type=_float_list, default=None, help="fractions of time steps set to zero")
    robust.add_argument("--fgsm", type=_float_list, default=None, help="FGSM budgets in input units")
    robust.add_argument("--param-noise", type=_float_list, default=None, help="relative Gaussian parameter noise sigmas")
    robust.add_argument("--hessian-direction", type=_float_list, default=None,
                        help="steps t along a seeded unit combination of the top Hessian eigenvectors")
    robust.add_argument("--hessian-k", type=_positive_int, default=1, help="number of top eigenvectors spanning the directions")
    robust.add_argument("--recurrent-only", action="store_true", help="parameter perturbations only on M_A, M_W")
    robust.add_argument("--seeds", type=_positive_int, default=5, help="number of seeds (0..N-1)")
    robust.add_argument("--split", choices=("train", "val", "test"), default="test")
    robust.add_argument("--max-samples", type=_positive_int, default=None)
    robust.add_argument("--batch-size", type=_positive_int, default=1000)
    robust.add_argument("--out", required=True, help="tidy CSV (one row per model, perturbation, level, seed)")
    robust.add_argument("--json", action="store_true", help="also write rows, summary and provenance as JSON beside the CSV")
    _add_run_options(robust)
    robust.set_defaults(handler=cmd_robustness)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (CheckpointError, UsageError, ValueError, FileNotFoundError) as error:
        print(f"lrnn {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
