"""The ``lrnn`` command: parses options, calls the Python API, prints results.

Exit codes: 0 success, 1 a check failed, 2 bad input (one line on stderr), 3 a bug (an internal
error: a short traceback and a request to report it), 130 interrupted
(SIGINT), 141 the reader of the output went away (a closed pipe, as for a tool killed by SIGPIPE).
Every option is checked against its bounds while parsing, before anything is computed.

Building the parser imports no torch, numpy, scipy, cvxpy or matplotlib (``lrnn --help`` is
instant): its name tables come from :mod:`lrnn_analysis.choices`, and each command imports
what it uses when it runs.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import json
import math
import os
import shlex
import sys
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import InputError, display_name
from .outputs import OutputDirectory, check_output_file
from .choices import (
    ARCHITECTURES,
    CERTIFICATES,
    CONSTRAINTS,
    DEVICE_CHOICES,
    KINDS,
    MAX_ADDING_LENGTH,
    MAX_SEED,
    MAX_SIZES,
    PARAMETERIZATION_TESTS,
    PERTURBATION_ALIASES,
    TASK_NAMES,
    perturbation_kind,
    perturbation_level,
)

if TYPE_CHECKING:
    import torch

    from .model_under_analysis import ModelUnderAnalysis


class UsageError(InputError):
    """Bad input detected after parsing; reported as one line with exit code 2."""


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, when it has one to show."""

    def _format_action(self, action: argparse.Action) -> str:
        default = action.default
        shown = (action.option_strings and action.help is not argparse.SUPPRESS and default is not None
                 and default is not False and default != [] and default is not argparse.SUPPRESS
                 and "%(default)" not in (action.help or ""))
        if shown:
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (no usage block), exit 2; defaults shown in --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# Bounds of the options: generous, finite, checked while parsing.
MAX_LEVELS = 100
MAX_GRID_POINTS = 500
MAX_EIGENPAIRS = 100
MAX_BATCH = 1_000_000


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text[:40]}")
        return value

    return parse


def _float_in(low: float = -math.inf, high: float = math.inf, above: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] (in (low, high] when ``above``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
        if not math.isfinite(value) or value < low or value > high or (above and value == low):
            bounds = f"{'(' if above else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {text[:40]}")
        return value

    return parse


_seed = _int_in(0, MAX_SEED)
_finite = _float_in()
_positive = _float_in(0.0, above=True)
_nonnegative = _float_in(0.0)


def _int_list(text: str) -> tuple[int, ...]:
    parse = _int_in(1, 10**6)
    values = tuple(parse(part) for part in text.split(",") if part.strip())
    if len(values) > MAX_LEVELS:
        raise argparse.ArgumentTypeError(f"at most {MAX_LEVELS} values, got {len(values)}")
    return values


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _names_from(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """A parser of comma-separated names, each one of ``allowed``."""
    def parse(text: str) -> list[str]:
        names = _name_list(text)
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; expected names from {', '.join(allowed)}")
        return names

    return parse


_certificate_list = _names_from(CERTIFICATES, "certificates")
_parameterization_tests = _names_from(PARAMETERIZATION_TESTS, "tests")


def _gate(text: str):
    from .report import Gate

    try:
        return Gate.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto = CUDA when present")
    parser.add_argument("--threads", type=_int_in(1, 1024), default=1,
                        help="CPU threads (these small recurrent models run fastest on one)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_task_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--task", choices=sorted(TASK_NAMES), required=required, help="task name")
    parser.add_argument("--split-seed", type=_seed, default=None, help="seed of the train/val/test split (default 0, or the checkpoint's)")
    parser.add_argument("--data-path", default=None, help="smnist/psmnist: .npz or MNIST IDX directory (default: vendored 10k digits)")
    parser.add_argument("--pixels-per-step", type=_int_in(1, 784), default=None, help="smnist/psmnist: pixels per time step (divides 784)")
    parser.add_argument("--length", type=_int_in(2, MAX_ADDING_LENGTH), default=None, help="adding: sequence length")


def _add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="your own data: .npz or PyTorch file with x_train, y_train, x_test, y_test (optional x_val, y_val)")


def _task_from_args(args: argparse.Namespace, recorded: dict[str, Any] | None = None):
    """The data file or task named on the command line, or else the task recorded in a checkpoint."""
    if getattr(args, "data", None) is not None:
        if args.task is not None:
            raise UsageError("give either --task or --data, not both")
        from .data_files import load_data

        return load_data(args.data)
    from .builtin_tasks import load_task

    recorded = recorded or {}
    name = args.task or recorded.get("name")
    if name is None:
        raise UsageError("no --task given and the checkpoint records none")
    options = dict(recorded.get("options", {})) if name == recorded.get("name") else {}
    options.update({k: v for k, v in {"path": args.data_path, "pixels_per_step": args.pixels_per_step,
                                       "length": args.length}.items() if v is not None})
    seed = args.split_seed if args.split_seed is not None else recorded.get("seed", 0)
    return load_task(name, seed=seed, **options)


REFERENCE_OVERRIDES = ("beta", "gamma", "eps", "alpha", "solver")


def _add_model_options(parser: argparse.ArgumentParser, several: bool = False, task: bool = False) -> None:
    """The options of every command that loads a model: a user module instead of (or, with
    ``several``, besides) checkpoints, and the hyper-parameter overrides of reference files.
    ``task`` adds --task for commands that take no other task options."""
    group = parser.add_argument_group("model to load")
    group.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                       help="your own model: a .py file or importable module, and the function returning the nn.Module "
                            "(runs that code)")
    group.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="keyword argument of FACTORY (repeatable); VALUE is read as a JSON literal "
                            "(16, 0.1, true, [8, 8], \"text\") when it parses, else as plain text")
    group.add_argument("--weights", action="append", default=[], metavar="PATH",
                       help="state dict of --model (.pt/.pth read with weights_only=True, or .safetensors)"
                            + ("; repeat for several weight files of the same module" if several else ""))
    group.add_argument("--beta", type=_finite, default=None, help="reference files: beta (else recorded, else from the file name)")
    group.add_argument("--gamma", type=_finite, default=None, help="reference files: gamma")
    group.add_argument("--eps", type=_positive, default=None, help="reference files: eps")
    group.add_argument("--alpha", type=_finite, default=None, help="reference files: alpha (else recorded, else 1 with a warning)")
    group.add_argument("--solver", default=None, help="reference LipschitzRNN_ODE files: torchdiffeq solver (euler, midpoint, rk4)")
    if task:
        group.add_argument("--task", choices=sorted(TASK_NAMES), default=None, help="the task to show/record instead of the recorded one")


def _reference_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in REFERENCE_OVERRIDES if getattr(args, name) is not None}


def _checkpoint_list(args: argparse.Namespace) -> list[str]:
    checkpoints = getattr(args, "checkpoints", None)
    if checkpoints is None:
        checkpoints = [] if args.checkpoint is None else [args.checkpoint]
    return list(checkpoints)


def _input_files(args: argparse.Namespace) -> list[Any]:
    """Every file the command reads (which its outputs must never replace)."""
    model_file = None
    if args.model is not None:
        from .usermodule import ModelSpec

        model_file = ModelSpec.parse(args.model).path
    return [*_checkpoint_list(args), *args.weights, model_file, getattr(args, "data_path", None), getattr(args, "data", None)]


def _load_models(args: argparse.Namespace) -> list[tuple[str, ModelUnderAnalysis]]:
    """(label, model) for every checkpoint (with the reference overrides), then for --model: one per
    --weights file, labelled by it (or by the spec without weights, with a warning)."""
    checkpoints = _checkpoint_list(args)
    overrides = _reference_overrides(args)
    if args.model is None:
        if args.weights or args.model_arg:
            raise UsageError("--weights and --model-arg go with --model MODULE:FACTORY")
        if not checkpoints:
            raise UsageError("give a checkpoint or --model MODULE:FACTORY --weights PATH")
    elif overrides and not checkpoints:
        raise UsageError(f"--{', --'.join(overrides)}: for files of the reference implementation; "
                         "a --model takes its settings as --model-arg KEY=VALUE")
    from .model_under_analysis import load_model

    loaded = [(str(path), load_model(path, **overrides)) for path in checkpoints]
    if args.model is None:
        return loaded
    from .usermodule import ModelSpec, load_user_model, parse_model_args

    spec = ModelSpec.parse(args.model)
    model_args = parse_model_args(args.model_arg, spec.text)
    repeated = sorted({w for w in args.weights if args.weights.count(w) > 1})
    if repeated:
        raise UsageError(f"--weights {repeated[0]} given twice")
    if not args.weights:
        subject = load_user_model(spec, None, model_args)
        _print_warnings([f"no --weights: analysing {spec} with the parameters its factory gives the module"])
        return loaded + [(spec.text, subject)]
    return loaded + [(str(path), load_user_model(spec, path, model_args)) for path in args.weights]


def _load_subject(args: argparse.Namespace) -> ModelUnderAnalysis:
    """The one model of a single-model command: its checkpoint, or --model with at most one
    --weights; ``args.checkpoint`` becomes the label that names it in the output."""
    if args.checkpoint is not None and args.model is not None:
        raise UsageError("give either a checkpoint or --model MODULE:FACTORY, not both")
    if len(args.weights) > 1:
        raise UsageError(f"lrnn {args.command} analyses one model: give one --weights file (lrnn robustness takes several)")
    ((label, subject),) = _load_models(args)
    args.checkpoint = label
    return subject


def _task_for(args: argparse.Namespace, loaded: Sequence[tuple[str, ModelUnderAnalysis]]):
    """The task of --task/--data, else the one every checkpoint records; a --model records none."""
    if args.task is None and args.data is None:
        unrecorded = [label for label, subject in loaded if subject.metadata.get("format") == "user module"]
        if unrecorded:
            raise UsageError(f"{unrecorded[0]}: a model built by --model records no task: give --task NAME or --data FILE")
        return _task_from_args(args, _recorded_task(loaded))
    return _task_from_args(args, loaded[0][1].metadata.get("task"))


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


DISTRIBUTED_COMMANDS = ("hessian", "robustness", "reproduce")


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class _Ranks:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _distributed_context(args: argparse.Namespace, device: torch.device) -> _Ranks:
    """Under torchrun (RANK and WORLD_SIZE set): join the process group (gloo on CPU, NCCL on
    CUDA with one GPU per local rank); ranks other than 0 print nothing and show no progress.
    Without torchrun: one process on ``device``."""
    if not _launched_by_torchrun():
        return _Ranks(device)
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    ranks = _Ranks(device, dist.get_rank(), dist.get_world_size())
    if not ranks.is_main:
        args.quiet = True
        sys.stdout = open(os.devnull, "w")
    return ranks


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoints import save_checkpoint
    from .constraints import StabilityConstraint
    from .models import ModelConfig, build_model
    from .environment import resolve_device
    from .training import TrainSettings, train_model, training_metadata

    check_output_file(args.out, force=args.force, inputs=[args.data_path])
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
    from .training import spectral_summary

    parts = [f"{key.split('_')[0]}({key.split('_')[1]}) = {value:+.4f}" for key, value in spectral_summary(model).items()]
    return "spectra: " + ", ".join(parts)


def cmd_info(args: argparse.Namespace) -> int:
    from .stability.evidence import check_stored
    from .formatting import format_table, format_value

    subject = _load_subject(args)
    metadata = dict(subject.metadata)
    if args.json:
        print(json.dumps(subject.to_dict() if "user_model" in metadata else metadata, indent=2, sort_keys=True))
        return 0
    if "user_model" in metadata:
        _print_user_model(subject, args.task)
        return 0
    model = subject.module
    config = model.config.to_dict()
    recorded = metadata.get("format")
    print(f"checkpoint {display_name(args.checkpoint)} "
          f"({f'format {recorded}' if recorded else 'PyTorch file with a config and a state dict'})")
    print(f"weights_sha256: {metadata['weights_sha256']}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    if args.task is not None:
        recorded = metadata.get("task")
        print(f"task: {args.task} (from --task; the checkpoint records "
              f"{recorded.get('name') if recorded else 'none'})")
    elif "task" in metadata:
        task = metadata["task"]
        print(f"task: {task.get('name')} (split seed {task.get('seed')}, options {task.get('options', {})})")
    if "reference" in metadata:
        reference = metadata["reference"]
        print(f"reference model: {reference['model']} ({reference['file']})")
        for name, item in reference["hparams"].items():
            print(f"  {name} = {format_value(item['value'])}  (from {item['source']})")
        for note in reference.get("notes", []):
            print(f"note: {note}")
    for key in ("training", "metrics", "environment"):
        if key in metadata:
            print(f"{key}: " + ", ".join(f"{k}={format_value(v)}" for k, v in metadata[key].items()))
    stored = check_stored(model, metadata)
    if stored.verified:
        print(f"certificate evidence: {stored.describe()}")
    elif stored.status != "absent":
        print(f"certificate evidence: STORED EVIDENCE NOT VERIFIED: {stored.reason}", file=sys.stderr)
    log = metadata.get("log") or []
    if log:
        columns = [key for key in log[0] if key not in ("seconds",)]
        print(format_table(log, columns))
    print(_spectral_line(model))
    return 0


def _print_user_model(subject: ModelUnderAnalysis, task: str | None) -> None:
    """What `lrnn info` knows about a --model: spec, arguments, weights, parameters, declared pieces."""
    source = subject.metadata["user_model"]
    described = subject.describe()
    print(f"model {source['model']} ({described['module']}), {described['parameters']} parameters")
    print("model args: " + (", ".join(f"{k}={v!r}" for k, v in source["model_args"].items()) or "none"))
    print(f"weights: {source['weights']} (sha256 {source['weights_sha256']})" if source["weights"]
          else "weights: none (the parameters the factory gives the module)")
    for name, tensor in subject.module.named_parameters():
        print(f"  {name}: {tuple(tensor.shape)}")
    print(f"recurrent parameters: {', '.join(described['recurrent']) or 'none declared'}")
    system = subject.lure_system()
    if system is None:
        print("Lur'e form: none (no stability certificate for this model)")
    else:
        from .stability import spectrum

        report = spectrum(system)
        print(f"Lur'e form: {system.method}, n = {system.n}, slope L = {system.slope:g}; alpha(A) = {report.abscissa_A:+.4f}, "
              f"||A||_2 = {report.norm_A:.4f}, ||W||_2 = {report.norm_W:.4f}")
    print(f"task: {task} (from --task; the model records none)" if task is not None
          else "task: none recorded (give --task or --data to the commands that evaluate)")


def _float_list(text: str, parse: Callable[[str], float] = _finite) -> list[float]:
    values = [parse(part) for part in text.split(",") if part.strip()]
    if not values or len(values) > MAX_LEVELS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_LEVELS} comma-separated numbers, got {len(values)}")
    return values


def _levels(kind: str) -> Callable[[str], list[float]]:
    """Comma-separated levels of perturbation ``kind``, each valid for it."""
    def level(text: str) -> float:
        value = _finite(text)
        try:
            perturbation_level(perturbation_kind(kind), value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return lambda text: _float_list(text, level)


ROBUSTNESS_OPTIONS = {
    "input_noise": "gaussian",
    "salt_pepper": "salt-pepper",
    "occlusion": "occlusion",
    "fgsm": "fgsm",
    "param_noise": "gaussian-relative",
    "hessian_direction": "hessian-direction",
}


def _recorded_task(loaded: Sequence[tuple[str, Any]]) -> dict[str, Any] | None:
    """The task every checkpoint records; an error when they record different ones (each
    checkpoint is scored on its own task unless --task/--data names one for all)."""
    records = [(path, subject.metadata.get("task")) for path, subject in loaded]
    distinct = {json.dumps(record, sort_keys=True) for _, record in records}
    if len(distinct) > 1:
        listed = ", ".join(f"{path} ({_describe_record(record)})" for path, record in records)
        raise UsageError(f"the checkpoints record different tasks: {listed}; give --task or --data to score all on one")
    return records[0][1]


def _describe_record(record: dict[str, Any] | None) -> str:
    if record is None:
        return "no task recorded"
    options = record.get("options") or {}
    return f"task {record.get('name')}, split seed {record.get('seed')}" + (f", options {options}" if options else "")


def _architecture(subject) -> str:
    """The toolkit architecture a checkpoint records, else the model's name."""
    return (subject.metadata.get("config") or {}).get("arch", subject.name)


def _check_figure(path: str | None, force: bool, inputs: Sequence[Any], others: Sequence[Any]) -> None:
    """Before computing: a --figure path with a known suffix (.png, .pdf, .svg) that may be written."""
    if path is not None:
        from .plots import figure_format

        figure_format(path)
        check_output_file(path, force=force, inputs=inputs, others=others)


def _write_figure(figure, path: str) -> None:
    from .plots import write_figure

    write_figure(figure, path)
    print(f"wrote the figure {path}")


def _print_warnings(warnings: Sequence[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


_BESIDE_CSV = ""


def _robustness_json_path(args: argparse.Namespace) -> Path | None:
    """Where ``--json`` writes: beside the CSV when given alone, else the .json PATH given."""
    if args.json is None:
        return None
    if args.json == _BESIDE_CSV:
        return Path(args.out).with_suffix(".json")
    if Path(args.json).suffix != ".json":
        raise UsageError(f"--json {display_name(args.json)}: the JSON file's name must end in .json "
                         "(to write it beside the CSV, give --json after the checkpoints, with no PATH)")
    return Path(args.json)


def cmd_robustness(args: argparse.Namespace) -> int:
    from .distributed import distributed_sweep
    from .robustness import SweepModel, hessian_directions, recurrent_parameter_names, sweep
    from .environment import resolve_device
    from .formatting import format_table

    json_path = _robustness_json_path(args)
    inputs = _input_files(args)
    check_output_file(args.out, force=args.force, inputs=inputs)
    if json_path is not None:
        check_output_file(json_path, force=args.force, inputs=inputs, others=[args.out])
    _check_figure(args.figure, args.force, inputs, [args.out, json_path])
    _set_threads(args.threads)
    ranks = _distributed_context(args, resolve_device(args.device))
    device = ranks.device
    loaded = _load_models(args)
    task = _task_for(args, loaded)
    grid = {kind: getattr(args, option) for option, kind in ROBUSTNESS_OPTIONS.items() if getattr(args, option)}
    if not grid:
        raise UsageError("no perturbation levels given (e.g. --input-noise 0,0.1,0.2)")
    for path, subject in loaded:
        subject.check_fits(task, str(path))
    models = []
    for path, subject in loaded:
        directions = None
        if "hessian-direction" in grid:
            restricted = args.recurrent is not None or args.recurrent_only
            names = recurrent_parameter_names(subject, args.recurrent) if restricted else None
            subject.module.to(device)
            directions = hessian_directions(subject, task, args.top_k, params=names, seed=0)
        models.append(SweepModel(subject.name, display_name(path), subject, directions))
    run_sweep = distributed_sweep if ranks.world_size > 1 else sweep
    result = run_sweep(models, task, grid, args.seeds, split=args.split, device=device, batch_size=args.batch_size,
                       max_samples=args.max_samples, recurrent_only=args.recurrent_only, recurrent=args.recurrent,
                       progress=not args.quiet)
    if not ranks.is_main:
        return 0
    result.write_csv(args.out)
    if json_path is not None:
        result.write_json(str(json_path))
    print(format_table(result.summary, ["model", "checkpoint", "perturbation", "level", "seeds", "accuracy_mean",
                                        "accuracy_ci95", "accuracy_drop", "loss_mean"],
                       ["model", "checkpoint", "perturbation", "level", "seeds", "accuracy", "+-95%", "drop", "loss"]))
    print(f"wrote {args.out}" + (f" and {json_path}" if json_path is not None else ""))
    if args.figure is not None:
        from .plots import plot_robustness

        _write_figure(plot_robustness(result.summary, "accuracy" if task.is_classification else "loss"), args.figure)
    _print_warnings(result.warnings)
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from .writers import write_json
    from .progress import progress_bar
    from .stability import spectrum
    from .stability.evidence import certificate_result, check_stored, stored_then_searched
    from .formatting import format_table

    if args.json:
        check_output_file(args.json, force=args.force, inputs=_input_files(args))
    subject = _load_subject(args)
    if args.task is not None:
        print(f"note: --task {args.task} is not used: the certificates hold for every input sequence")
    model = subject.module
    stored = check_stored(model, subject.metadata)
    if stored.status != "absent":
        print(f"{args.checkpoint}: {stored.describe()}", file=sys.stdout if stored.verified else sys.stderr)
    system = subject.lure_system()
    if system is None:
        from .models.torchnn import find_recurrent_layers

        if stored.verified:
            return _print_stored_only(args, subject, certificate_result(stored, model))
        if find_recurrent_layers(model):
            return _recurrent_layer_stability(args, subject)
        raise UsageError(f"{args.checkpoint}: {subject.name}: no Lur'e form: no certificate available for this model")
    report = spectrum(system)
    results = stored_then_searched(stored, model, system, args.certificates, args.time_budget,
                                   wrap=lambda names: progress_bar(names, desc="certificates", unit="cert",
                                                                   enabled=not args.quiet))
    scheme = system.method if system.eps is None else f"{system.method}, eps {system.eps:g}" + (
        f" x {system.substeps} substeps" if system.substeps > 1 else "")
    print(f"{args.checkpoint}: {_architecture(subject)} ({scheme}), n = {system.n}, slope L = {system.slope:g}")
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
        write_json(args.json, {"checkpoint": str(args.checkpoint), "config": subject.metadata.get("config"),
                               "spectrum": report.to_dict(), "certificates": [r.to_dict(include_matrices=args.evidence) for r in results]})
    return 0 if all(r.holds for r in results) else 1


def _recurrent_layer_stability(args: argparse.Namespace, subject: ModelUnderAnalysis) -> int:
    """`lrnn stability` of a model without a Lur'e form of its own that contains torch.nn
    RNN/LSTM/GRU layers: each layer and each stack of layers is certified (see
    ``lrnn_analysis.stability.cascade``); how the model combines their states is not."""
    from .writers import write_json
    from .stability import certify_recurrent
    from .stability.cascade import layer_rows
    from .formatting import format_table

    results = certify_recurrent(subject.module, args.certificates, input_bound=args.input_bound, time_budget=args.time_budget)
    print(f"{args.checkpoint}: {subject.name}: no Lur'e form of the whole model; certifying its torch.nn recurrent "
          "layers (what the model does with their states is not certified)")
    print(format_table(layer_rows([c.to_dict() for c in results]), ["module", "kind", "layer", "name", "holds", "rate", "reason"]))
    for cascade in results:
        print(f"{cascade.module or '(root)'} ({cascade.kind}): {'holds' if cascade.holds else 'fails'}: {cascade.reason}")
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "model": subject.describe(),
                               "recurrent_layers": [c.to_dict() for c in results]})
    return 0 if all(c.holds for c in results) else 1


def _print_stored_only(args: argparse.Namespace, subject: ModelUnderAnalysis, result) -> int:
    """``lrnn stability`` of a model without a Lur'e form whose stored certificate verified."""
    from .writers import write_json
    from .formatting import format_table

    config = subject.module.config
    print(f"{args.checkpoint}: {_architecture(subject)} (no Lur'e form; its own contraction certificate), n = {config.hidden}")
    rows = [result.to_dict(include_matrices=False)]
    print("certificates")
    print(format_table(rows, ["name", "holds", "margin", "rate", "tier", "seconds", "reason"]))
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "config": subject.metadata.get("config"),
                               "certificates": [result.to_dict(include_matrices=args.evidence)]})
    return 0


def cmd_hessian(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .distributed import DistributedOperator, shard_batches
    from .evaluation import loss_function
    from .hessian import analyze
    from .writers import write_json
    from .environment import resolve_device
    from .formatting import format_table

    if args.json:
        check_output_file(args.json, force=args.force, inputs=_input_files(args))
    if args.figure is not None and not args.density:
        raise UsageError("--figure draws the spectral density: add --density")
    _check_figure(args.figure, args.force, _input_files(args), [args.json])
    _set_threads(args.threads)
    ranks = _distributed_context(args, resolve_device(args.device))
    device = ranks.device
    subject = _load_subject(args)
    task = _task_for(args, [(args.checkpoint, subject)])
    subject.check_fits(task, str(args.checkpoint))
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model = subject.module.to(device=device, dtype=dtype)
    batches = [(x.to(dtype), y if task.is_classification else y.to(dtype))
               for x, y in getattr(task, args.split).batches(args.batch_size, None if args.full else args.batches, device)]
    if ranks.world_size > 1:
        batches = shard_batches(batches, ranks.rank, ranks.world_size)
    report = analyze(model, loss_function(task.is_classification), batches, params=args.params, top_k=args.top_k,
                     trace=args.trace, density=args.density, backend=args.backend, seed=args.seed, dtype=dtype,
                     progress=not args.quiet, trace_method=args.trace_method, operator=args.operator,
                     mc_samples=args.mc_samples, estimates=args.estimate, diagonal_method=args.diag_method,
                     density_scale=args.density_scale,
                     wrap_operator=DistributedOperator if ranks.world_size > 1 else None)
    info = report.operator
    fisher = f" ({args.mc_samples} label sample(s) per input)" if args.operator == "fisher" else ""
    print(f"{args.checkpoint}: {_architecture(subject)}, {args.operator}{fisher}, {len(info.get('params', []))} parameter tensors "
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
    if args.json and ranks.is_main:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "task": task.to_dict(), "split": args.split,
                               **report.to_dict()})
    if args.figure is not None and ranks.is_main:
        from .plots import plot_density

        rows = [{"model": subject.name, "eigenvalue": float(t), "density": float(d)}
                for t, d in zip(report.density.grid, report.density.density)]
        _write_figure(plot_density(rows), args.figure)
    return 0


def _kind_levels(text: str) -> tuple[str, list[float]]:
    """'KIND:L1,L2,...' with KIND a perturbation in either spelling: (canonical kind, levels)."""
    name, sep, levels = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KIND:L1,L2,..., got {text[:40]!r}")
    try:
        kind = perturbation_kind(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if kind == "hessian-direction":
        raise argparse.ArgumentTypeError("the audit sweeps no hessian-direction (use lrnn robustness --hessian-direction)")
    return kind, _levels(kind)(levels)


def _audit_grid(levels: list[tuple[str, list[float]]] | None) -> dict[str, list[float]] | None:
    if levels is None:
        return None
    grid: dict[str, list[float]] = {}
    for kind, values in levels:
        if kind in grid:
            raise UsageError(f"--levels names perturbation {kind} twice")
        grid[kind] = values
    return grid


def cmd_audit(args: argparse.Namespace) -> int:
    from .report import AUDIT_WRITER, AuditSettings, run_audit, write_audit_into
    from .environment import resolve_device
    from .formatting import format_table, format_value

    gates = list(args.gate)
    with OutputDirectory(args.out, AUDIT_WRITER, force=args.force, inputs=_input_files(args)) as directory:
        _set_threads(args.threads)
        device = resolve_device(args.device)
        subject = _load_subject(args)
        task = _task_for(args, [(args.checkpoint, subject)])
        subject.check_fits(task, str(args.checkpoint))
        preset = AuditSettings.thorough(args.seed) if args.thorough else AuditSettings(seed=args.seed)
        settings = preset.with_changes(hessian_batches=args.hessian_batches, trace_matvecs=args.trace_matvecs,
                                       seeds=args.seeds, grid=_audit_grid(args.levels), input_bound=args.input_bound)
        result = run_audit(subject, task, display_name(args.checkpoint), None, settings, gates, device, progress=not args.quiet)
        out = write_audit_into(result, directory)
    report = result.report
    print(f"audit of {args.checkpoint} ({_architecture(subject)}, task {task.name}) written to {out}/report.md and report.json")
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
    for stack in report["stability"].get("recurrent_layers", []):
        print(f"torch.nn {stack['kind']} {stack['module'] or '(root)'}: {'holds' if stack['holds'] else 'fails'} ({stack['reason']})")
    if result.gates:
        print(format_table([g.to_dict() for g in result.gates], ["gate", "passed", "threshold", "observed", "detail"]))
        print("all gates pass" if result.passed else "a gate failed")
    _print_warnings([report["training_data"]["warning"]] if report["training_data"]["warning"] else [])
    return 0 if result.passed else 1


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .recipes import find_recipes, run_recipes
    from .environment import resolve_device
    from .formatting import format_table

    _set_threads(args.threads)
    paths = args.recipes or find_recipes(args.analyses_dir)
    if not paths:
        raise UsageError(f"no recipes given and none in {args.analyses_dir}")
    ranks = _distributed_context(args, resolve_device(args.device))

    def announce(recipe) -> None:
        if not args.quiet:
            print(f"running {recipe.name} ({recipe.analysis}) ...", flush=True)

    outcomes = run_recipes(paths, args.out, ranks.device, progress=not args.quiet, force=args.force, announce=announce)
    if not ranks.is_main:
        return 0
    rows = [{"recipe": o.name, "analysis": o.analysis, "seconds": o.seconds, "outputs": len(o.outputs), "summary": o.summary}
            for o in outcomes]
    print(format_table(rows, ["recipe", "analysis", "seconds", "outputs", "summary"]))
    print(f"wrote {sum(len(o.outputs) for o in outcomes)} files into {args.out}")
    _print_warnings([f"{o.name}: {w}" for o in outcomes for w in o.warnings])
    return 0


_MAX_GRID = 100_000


def _grid(text: str) -> list[float]:
    """'a,b,c' or 'start:stop:count' (inclusive, evenly spaced, 1 <= count <= 100000); finite values."""
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected start:stop:count, got {text[:40]!r}")
        start, stop, count = _finite(parts[0]), _finite(parts[1]), _int_in(1, MAX_GRID_POINTS)(parts[2])
        import numpy as np

        return [float(v) for v in np.linspace(start, stop, count)]
    return _float_list(text)


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
    from .writers import write_csv
    from .stability import certify_parameterization, phase_diagram
    from .formatting import format_table

    beta_w, gamma_a, gamma_w, w_source, radius, r_source = _certify_settings(args)
    phase = args.phase_betas or args.phase_gammas
    if (phase or args.out or args.figure) and not (args.phase_betas and args.phase_gammas and (args.out or args.figure)):
        raise UsageError("a phase diagram needs --phase-betas, --phase-gammas and --out and/or --figure "
                         "(--out writes only the phase diagram)")
    if phase and len(args.phase_betas) * len(args.phase_gammas) > _MAX_GRID:
        raise UsageError(f"the phase diagram has more than {_MAX_GRID} cells")
    if args.out:
        check_output_file(args.out, force=args.force)
    _check_figure(args.figure, args.force, [], [args.out])
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
        if args.out:
            write_csv(args.out, [c.to_dict() for c in cells])
        grid = [c for c in cells if c.point == "grid"]
        certified = sum(c.holds for c in grid)
        cells_certified = len({(c.beta_A, c.gamma_A) for c in grid if c.holds})
        w_axes = ("beta_W = beta_A" if args.beta_w is None else f"beta_W = {args.beta_w:g}") + ", " + (
            "gamma_W = gamma_A" if args.gamma_w is None else f"gamma_W = {args.gamma_w:g}")
        n_cells = len(args.phase_betas) * len(args.phase_gammas)
        print(f"phase diagram over beta_A x gamma_A ({w_axes}) at r = {radius:.6g}: {n_cells} cells x "
              f"{len(grid) // n_cells} tests = {len(grid)} rows; {certified} of the {len(grid)} (cell, test) pairs "
              f"certified, {cells_certified} of the {n_cells} cells by at least one test; your point (beta_A, gamma_A) = "
              f"({args.beta:g}, {gamma_a:g}) is in the rows with point = user" + (f"; written to {args.out}" if args.out else ""))
        if args.figure:
            from .plots import plot_phase_diagram

            _write_figure(plot_phase_diagram([c.to_dict() for c in cells]), args.figure)
        if certified == 0 and args.gamma_w is None:
            print("0 cells certified because W shares each cell's gamma: gamma_W = gamma_A cancels A's shift "
                  "(see above). Hold W's shift fixed with --gamma-w 0.")
    return 0 if all(r.holds for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lrnn", description="Stability, curvature and robustness of continuous-time RNNs.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model on a task and save a checkpoint")
    _add_task_options(train, required=True)
    train.add_argument("--arch", choices=ARCHITECTURES, default="lipschitz")
    train.add_argument("--hidden", type=_int_in(1, MAX_SIZES["hidden"]), default=64)
    train.add_argument("--eps", type=_positive, default=None, help="step per input (default: the task's)")
    train.add_argument("--discretization", default=None, help="euler|rk2|rk38 (lipschitz; rk38 = 3/8-rule RK4), rk4|rk2|euler (node)")
    train.add_argument("--beta", type=_finite, default=0.75, help="beta of A and W")
    train.add_argument("--gamma", type=_finite, default=0.001, help="gamma of A and W")
    train.add_argument("--beta-a", type=_finite, default=None)
    train.add_argument("--beta-w", type=_finite, default=None)
    train.add_argument("--gamma-a", type=_finite, default=None)
    train.add_argument("--gamma-w", type=_finite, default=None)
    train.add_argument("--init-std", type=_positive, default=0.1, help="recurrent init: N(0, (init_std/hidden)^2)")
    train.add_argument("--ode-substeps", type=_int_in(1, MAX_SIZES["ode_substeps"]), default=1, help="node: solver steps per input step")
    train.add_argument("--rho", type=_float_in(0.0, 1.0, above=True), default=0.999,
                       help="contracting/ren: contraction factor per step they are built to")
    train.add_argument("--rank", type=_int_in(0, 3 * MAX_SIZES["hidden"]), default=0,
                       help="contracting/ren: rows of Z (contracting, at most 2 * hidden) or X (ren, at most 3 * hidden); 0: hidden")
    train.add_argument("--cond-penalty", type=_nonnegative, default=0.1,
                       help="contracting: kappa of the loss term kappa * mean(log^2 sigma_i(T))")
    train.add_argument("--epochs", type=_int_in(1, 100_000), default=100)
    train.add_argument("--batch-size", type=_int_in(1, MAX_BATCH), default=128)
    train.add_argument("--lr", type=_positive, default=0.03)
    train.add_argument("--lr-decay", type=_float_in(0.0, 1.0, above=True), default=0.1)
    train.add_argument("--decay-epochs", type=_int_list, default=None, help="comma-separated (default: 75%% of epochs)")
    train.add_argument("--weight-decay", type=_nonnegative, default=0.0)
    train.add_argument("--grad-clip", type=_positive, default=None)
    train.add_argument("--seed", type=_seed, default=0, help="initialisation and batch-order seed")
    train.add_argument("--constrain", choices=CONSTRAINTS, default=None,
                       help="project M_A, M_W after every step so this norm certificate holds (lipschitz only)")
    train.add_argument("--margin", type=_nonnegative, default=0.01, help="margin of the --constrain certificate")
    train.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    train.add_argument("--force", action="store_true", help="replace an existing output file (never an input, a link or a special file)")
    _add_run_options(train)
    train.set_defaults(handler=cmd_train)

    info = sub.add_parser("info", help="print a checkpoint's config, metrics and training log")
    info.add_argument("checkpoint", nargs="?", default=None)
    info.add_argument("--json", action="store_true", help="print the metadata as JSON")
    _add_model_options(info, task=True)
    info.set_defaults(handler=cmd_info)
    stability = sub.add_parser("stability", help="spectra and global-stability certificates of a checkpoint")
    stability.add_argument("checkpoint", nargs="?", default=None)
    _add_model_options(stability, task=True)
    stability.add_argument("--certificates", "--tests", dest="certificates", type=_certificate_list, default=None,
                           help="comma-separated, e.g. euler-norm,euler-lmi (default: those of the scheme the model runs)")
    stability.add_argument("--time-budget", type=_positive, default=None, help="seconds for all LMI tiers together")
    stability.add_argument("--input-bound", type=_positive, default=None, metavar="XBAR",
                           help="torch.nn LSTM/GRU layers: their conditions hold for inputs with ||x_t||_inf <= XBAR")
    stability.add_argument("--json", default=None, metavar="PATH", help="write spectra and certificates as JSON")
    stability.add_argument("--evidence", action="store_true", help="include P and the multipliers in the JSON")
    stability.add_argument("--force", action="store_true", help="replace an existing output file (never an input, a link or a special file)")
    stability.add_argument("--quiet", action="store_true", help="no progress bar")
    stability.set_defaults(handler=cmd_stability)

    cert = sub.add_parser("certify", help="certify every model of a Lipschitz parameterization with ||M_A||_2, ||M_W||_2 <= r")
    cert.add_argument("--beta", type=_finite, required=True, help="beta_A (and beta_W unless --beta-w)")
    cert.add_argument("--gamma", type=_finite, default=None, help="one shared gamma: gamma_A = gamma_W")
    cert.add_argument("--gamma-a", type=_finite, default=None, help="gamma_A (overrides --gamma)")
    cert.add_argument("--beta-w", type=_finite, default=None)
    cert.add_argument("--gamma-w", type=_finite, default=None,
                      help="gamma_W (overrides --gamma; default: gamma_A)")
    cert.add_argument("--eps", type=_positive, default=None, help="step of the discretization (adds euler-norm, rk2-norm)")
    cert.add_argument("--radius", type=_nonnegative, default=None, help="bound r on ||M_A||_2 and ||M_W||_2")
    cert.add_argument("--hidden", type=_int_in(1, MAX_SIZES["hidden"]), default=None,
                      help="with --init-std: r = the radius of the toolkit's initialisation of this hidden size")
    cert.add_argument("--init-std", type=_nonnegative, default=None,
                      help="with --hidden: entries of M ~ N(0, (init_std/hidden)^2), as `lrnn train` initialises them")
    cert.add_argument("--init-failure-probability", type=_positive, default=1e-6,
                      help="probability allowed that an initial M_A or M_W exceeds the derived radius")
    cert.add_argument("--slope", type=_positive, default=1.0, help="Lipschitz constant L of the activation")
    cert.add_argument("--certificates", "--tests", dest="tests", type=_parameterization_tests, default=None,
                      help=f"comma-separated, from {','.join(PARAMETERIZATION_TESTS)} (default: ct-norm, and euler-norm, rk2-norm with --eps)")
    cert.add_argument("--phase-betas", type=_grid, default=None,
                      help="beta_A grid (a,b,c or start:stop:count); W shares beta and gamma unless --beta-w/--gamma-w fix them")
    cert.add_argument("--phase-gammas", type=_grid, default=None, help="gamma_A grid: a,b,c or start:stop:count")
    cert.add_argument("--out", default=None, help="CSV of the phase diagram (one row per beta_A, gamma_A, test; your point marked)")
    cert.add_argument("--figure", default=None, metavar="PATH",
                      help="draw the phase diagram, your point starred (.png, .pdf or .svg)")
    cert.add_argument("--force", action="store_true", help="replace an existing output file (never an input, a link or a special file)")
    cert.set_defaults(handler=cmd_certify)

    hess = sub.add_parser("hessian", help="loss Hessian: extreme eigenvalues, trace with CI, spectral density")
    hess.add_argument("checkpoint", nargs="?", default=None)
    _add_model_options(hess)
    _add_task_options(hess, required=False)
    _add_data_option(hess)
    hess.add_argument("--split", choices=("train", "val", "test"), default="train")
    hess.add_argument("--batch-size", type=_int_in(1, MAX_BATCH), default=128)
    amount = hess.add_mutually_exclusive_group()
    amount.add_argument("--batches", type=_int_in(1, 100_000), default=1, help="use the first N batches of the split")
    amount.add_argument("--full", action="store_true", help="use the whole split (HVPs weighted by samples)")
    hess.add_argument("--params", default=None, help="parameter names or globs, e.g. M_A,M_W (default: all)")
    hess.add_argument("--top-k", "--hessian-k", dest="top_k", type=_int_in(1, MAX_EIGENPAIRS), default=1,
                      help="eigenvalues at each end of the spectrum")
    hess.add_argument("--trace", action="store_true", help="estimate the trace with a 95%% CI")
    hess.add_argument("--trace-method", choices=("hutchinson", "hutch++", "xtrace"), default="hutchinson")
    hess.add_argument("--density", action="store_true", help="spectral density by stochastic Lanczos quadrature")
    hess.add_argument("--density-scale", choices=("linear", "symlog"), default="linear",
                      help="symlog: density of sign(l)*log10(1+|l|/linthresh)")
    hess.add_argument("--operator", choices=("hessian", "ggn", "fisher", "ef"), default="hessian",
                      help="Hessian, generalized Gauss-Newton, Monte-Carlo Fisher or empirical Fisher")
    hess.add_argument("--mc-samples", type=_int_in(1, 1000), default=1, help="sampled labels per input (--operator fisher)")
    hess.add_argument("--estimate", type=_name_list, default=[], metavar="diag,frobenius,blocks",
                      help="also estimate the diagonal, the squared Frobenius norm and/or per-tensor trace and lambda_max")
    hess.add_argument("--diag-method", choices=("hutchinson", "xdiag"), default="hutchinson")
    hess.add_argument("--backend", choices=("native", "pyhessian"), default="native")
    hess.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    hess.add_argument("--seed", type=_seed, default=0)
    hess.add_argument("--json", default=None, metavar="PATH", help="write every number and its uncertainty as JSON")
    hess.add_argument("--figure", default=None, metavar="PATH", help="with --density: draw it (.png, .pdf or .svg)")
    hess.add_argument("--force", action="store_true", help="replace an existing output file (never an input, a link or a special file)")
    _add_run_options(hess)
    hess.set_defaults(handler=cmd_hessian)

    audit = sub.add_parser("audit", help="stability, Hessian and robustness report of one checkpoint, with gates")
    audit.add_argument("checkpoint", nargs="?", default=None)
    _add_model_options(audit)
    _add_task_options(audit, required=False)
    _add_data_option(audit)
    audit.add_argument("--gate", type=_gate, action="append", default=[], metavar="KIND=VALUE",
                       help="certified=NAME, min-accuracy=A, max-lambda=X, max-trace=X, max-accuracy-drop=KIND:LEVEL:DROP")
    audit.add_argument("--out", required=True, help="report directory (written atomically; replaces only a previous audit report)")
    audit.add_argument("--force", action="store_true", help="also replace a report another lrnn command wrote")
    audit.add_argument("--thorough", action="store_true", help="paper-grade settings (slow); the options below override either preset")
    audit.add_argument("--hessian-batches", type=_int_in(1, 100_000), default=None,
                       help="training batches of 128 samples for the Hessian, GGN and trace (default: 1, --thorough 8)")
    audit.add_argument("--trace-matvecs", type=_int_in(1, 100_000), default=None,
                       help="most Hessian-vector products for the trace (default: 60, --thorough 400)")
    audit.add_argument("--seeds", type=_int_in(1, 1000), default=None, help="robustness seeds (default: 3, --thorough 10)")
    audit.add_argument("--levels", type=_kind_levels, action="append", default=None, metavar="KIND:L1,L2",
                       help="robustness levels of one perturbation, repeatable; replaces the preset's grid; KIND as in tables "
                            f"({', '.join(k for k in KINDS if k != 'hessian-direction')}) or as the robustness options ({', '.join(PERTURBATION_ALIASES)}); level 0 "
                            "is always run (default: gaussian:0,0.05,0.1,0.2 and gaussian-relative:0,0.02,0.05,0.1; "
                            "--thorough adds salt-pepper, occlusion and fgsm)")
    audit.add_argument("--input-bound", type=_positive, default=None, metavar="XBAR",
                       help="a model without a Lur'e form made of torch.nn LSTM/GRU layers: their conditions hold for "
                            "inputs with ||x_t||_inf <= XBAR")
    audit.add_argument("--seed", type=_seed, default=0)
    _add_run_options(audit)
    audit.set_defaults(handler=cmd_audit)

    reproduce = sub.add_parser("reproduce", help="run analysis recipes (default: all of analyses/) into figures/")
    reproduce.add_argument("recipes", nargs="*", help="recipe files (default: every analyses/*.toml)")
    reproduce.add_argument("--analyses-dir", default="analyses")
    reproduce.add_argument("--out", default="figures", help="output directory (replaces only the files of the recipes run)")
    reproduce.add_argument("--force", action="store_true", help="also replace a report another lrnn command wrote")
    _add_run_options(reproduce)
    reproduce.set_defaults(handler=cmd_reproduce)

    robust = sub.add_parser("robustness", help="accuracy under input and parameter perturbations (tidy CSV)")
    robust.add_argument("checkpoints", nargs="*", metavar="CKPT")
    _add_model_options(robust, several=True)
    _add_task_options(robust, required=False)
    _add_data_option(robust)
    robust.add_argument("--input-noise", "--gaussian", dest="input_noise", type=_levels("gaussian"), default=None,
                        help="Gaussian input noise sigmas, e.g. 0,0.1,0.2,0.3 (perturbation gaussian)")
    robust.add_argument("--salt-pepper", type=_levels("salt-pepper"), default=None, help="salt-and-pepper probabilities")
    robust.add_argument("--occlusion", type=_levels("occlusion"), default=None, help="fractions of time steps set to zero")
    robust.add_argument("--fgsm", type=_levels("fgsm"), default=None, help="FGSM budgets in input units")
    robust.add_argument("--param-noise", "--gaussian-relative", dest="param_noise", type=_levels("gaussian-relative"), default=None,
                        help="relative Gaussian parameter noise sigmas (perturbation gaussian-relative)")
    robust.add_argument("--hessian-direction", type=_levels("hessian-direction"), default=None,
                        help="steps t along a seeded unit combination of the top Hessian eigenvectors")
    robust.add_argument("--top-k", "--hessian-k", dest="top_k", type=_int_in(1, MAX_EIGENPAIRS), default=1,
                        help="number of top Hessian eigenvectors spanning the --hessian-direction directions")
    recurrent = robust.add_mutually_exclusive_group()
    recurrent.add_argument("--recurrent-only", action="store_true",
                           help="parameter perturbations only on each model's declared recurrent parameters (toolkit models: "
                                "M_A, M_W; torch.nn RNN/LSTM/GRU layers: weight_hh_*; a module's recurrent_parameters)")
    recurrent.add_argument("--recurrent", type=_name_list, default=None, metavar="PATTERNS",
                           help="parameter perturbations only on the parameters these comma-separated globs over parameter "
                                "names match, e.g. 'rnn.weight_hh_*' (each must match)")
    robust.add_argument("--seeds", type=_int_in(1, 1000), default=5, help="number of seeds (0..N-1)")
    robust.add_argument("--split", choices=("train", "val", "test"), default="test")
    robust.add_argument("--max-samples", type=_int_in(1, 10**8), default=None)
    robust.add_argument("--batch-size", type=_int_in(1, MAX_BATCH), default=1000)
    robust.add_argument("--out", required=True, help="tidy CSV (one row per model, perturbation, level, seed)")
    robust.add_argument("--json", nargs="?", const=_BESIDE_CSV, default=None, metavar="PATH",
                        help="also write rows, summary and provenance as JSON to PATH (a .json file; "
                             "--json alone: beside the CSV, with the suffix .json)")
    robust.add_argument("--figure", default=None, metavar="PATH", help="also draw accuracy against level (.png, .pdf or .svg)")
    robust.add_argument("--force", action="store_true", help="replace an existing output file (never an input, a link or a special file)")
    _add_run_options(robust)
    robust.set_defaults(handler=cmd_robustness)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input (files, options, sizes) is one line on stderr and exit 2;
    SIGINT is one line and exit 130; a closed output pipe exits 141 without a word.
    Any other exception is a bug and keeps its traceback."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")  # a file name that is not UTF-8 stays printable
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a bad option already reported in one line
        return done.code if isinstance(done.code, int) else 2
    args.argv = argv
    handler: Callable[[argparse.Namespace], int] = args.handler
    prefix = f"lrnn {args.command}"
    if _launched_by_torchrun() and args.command not in DISTRIBUTED_COMMANDS:
        print(f"{prefix}: error: only {', '.join(DISTRIBUTED_COMMANDS)} run distributed; "
              "run this command without torchrun", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(prefix, warnings.showwarning)
            code = handler(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python docs (signal module, "Note on SIGPIPE"): point stdout at devnull so the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except InputError as error:
        print(f"{prefix}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{prefix}: error: {_os_error_text(error)}", file=sys.stderr)
        return 2
    except Exception:
        _report_bug(prefix)
        return 3


def _report_bug(prefix: str) -> None:
    """An exception that is not about the user's input is a bug: its type, message and the last
    frames of its traceback, and where to report it."""
    import traceback

    error = sys.exc_info()[1]
    frames = traceback.format_exception(error, limit=-6)
    print(f"{prefix}: internal error (a bug in lrnn-analysis or a library under it, not in your input):", file=sys.stderr)
    print("".join(frames).rstrip(), file=sys.stderr)
    print(f"{prefix}: please report this with the command line and the lines above", file=sys.stderr)


def _warning_printer(prefix: str, default: Callable[..., None]) -> Callable[..., None]:
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        # The toolkit's own warnings (integrity, reference files, ...) are one line for the user,
        # not Python's two lines naming our source file; others keep Python's format.
        if getattr(category, "__module__", "").startswith("lrnn_analysis."):
            print(f"{prefix}: warning: {_one_line(str(message))}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


def _os_error_text(error: OSError) -> str:
    """'FILE: reason' for an OSError (permission, directory, device, disk...)."""
    reason = error.strerror or type(error).__name__
    if error.filename is None:
        return _one_line(str(error))
    names = [display_name(os.fsdecode(name)) for name in (error.filename, error.filename2) if name is not None]
    return f"{' -> '.join(names)}: {reason}"


if __name__ == "__main__":
    sys.exit(main())
