"""What several commands share: argument types, option groups, and turning parsed options into
the loaders' sources and a device.

Importing this module imports no torch, numpy or scipy (``lrnn --help`` stays instant); the
helpers that need them import them when called.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..choices import (
    CERTIFICATES,
    DEVICE_CHOICES,
    MAX_LEVELS,
    MAX_SEED,
    PARAMETERIZATION_TESTS,
    TASK_NAMES,
    perturbation_kind,
    perturbation_level,
)
from ..errors import InputError, display_name
from ..outputs import check_output_file
from ..sources import REFERENCE_OVERRIDES, ModelSources, TaskSource

if TYPE_CHECKING:
    from ..distributed import Ranks
    from ..model_under_analysis import ModelUnderAnalysis

__all__ = ["FORCE_HELP", "UsageError", "add_data_option", "add_model_options", "add_run_options", "add_task_options",
    "architecture", "certificate_list", "check_figure", "finite", "float_in", "float_list", "input_files", "int_in",
    "int_list", "json_path_beside", "levels", "load_models", "load_subject", "name_list", "nonnegative",
    "parameterization_tests", "positive", "print_warnings", "ranks_for", "seed", "set_threads", "task_source",
    "write_figure"]


class UsageError(InputError):
    """Bad input detected after parsing; reported as one line with exit code 2."""


FORCE_HELP = "replace an existing output file (never an input, a link or a special file)"


class Once(argparse.Action):
    """An option that may be given once: a second occurrence is an error, never a silent override."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, f"_{self.dest}_given", False):
            parser.error(f"{option_string} given twice (give it once)")
        setattr(namespace, f"_{self.dest}_given", True)
        setattr(namespace, self.dest, values)


def int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text[:40]}")
        return value

    return parse


def float_in(low: float = -math.inf, high: float = math.inf, above: bool = False) -> Callable[[str], float]:
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


seed = int_in(0, MAX_SEED)
finite = float_in()
positive = float_in(0.0, above=True)
nonnegative = float_in(0.0)


def _entries(text: str) -> list[str]:
    """The comma-separated entries of ``text``, stripped; an empty entry (``0.1,,0.2``, a trailing
    comma) is refused rather than dropped."""
    entries = [part.strip() for part in text.split(",")]
    if not any(entries):
        return []
    if not all(entries):
        raise argparse.ArgumentTypeError(f"an empty entry in the comma-separated list {text[:60]!r}")
    return entries


def int_list(text: str) -> tuple[int, ...]:
    parse = int_in(1, 10**6)
    values = tuple(parse(part) for part in _entries(text))
    if len(values) > MAX_LEVELS:
        raise argparse.ArgumentTypeError(f"at most {MAX_LEVELS} values, got {len(values)}")
    return values


def name_list(text: str) -> list[str]:
    return _entries(text)


def _names_from(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """A parser of comma-separated names, each one of ``allowed``."""
    def parse(text: str) -> list[str]:
        names = name_list(text)
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; expected names from {', '.join(allowed)}")
        return names

    return parse


certificate_list = _names_from(CERTIFICATES, "certificates")
parameterization_tests = _names_from(PARAMETERIZATION_TESTS, "tests")


def float_list(text: str, parse: Callable[[str], float] = finite) -> list[float]:
    values = [parse(part) for part in _entries(text)]
    if not values or len(values) > MAX_LEVELS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_LEVELS} comma-separated numbers, got {len(values)}")
    return values


def levels(kind: str) -> Callable[[str], list[float]]:
    """Comma-separated levels of perturbation ``kind``, each valid for it."""
    def level(text: str) -> float:
        value = finite(text)
        try:
            perturbation_level(perturbation_kind(kind), value)
        except InputError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return lambda text: float_list(text, level)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto = CUDA when present")
    parser.add_argument("--threads", type=int_in(1, 1024), default=1,
                        help="CPU threads (these small recurrent models run fastest on one)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_task_options(parser: argparse.ArgumentParser, required: bool) -> None:
    from ..choices import MAX_ADDING_LENGTH

    parser.add_argument("--task", choices=sorted(TASK_NAMES), required=required, help="task name")
    parser.add_argument("--split-seed", type=seed, default=None, help="seed of the train/val/test split (default 0, or the checkpoint's)")
    parser.add_argument("--data-path", default=None, help="smnist/psmnist: .npz or MNIST IDX directory (default: vendored 10k digits)")
    parser.add_argument("--pixels-per-step", type=int_in(1, 784), default=None, help="smnist/psmnist: pixels per time step (divides 784)")
    parser.add_argument("--length", type=int_in(2, MAX_ADDING_LENGTH), default=None, help="adding, chars, lorenz: sequence length (steps)")


def add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action=Once, default=None, metavar="FILE",
                        help="your own data: .npz or PyTorch file with x_train, y_train, x_test, y_test (optional x_val, y_val; "
                             "per-step targets may come with masks mask_train, mask_val, mask_test)")


def add_model_options(parser: argparse.ArgumentParser, several: bool = False, task: bool = False) -> None:
    """The options of every command that loads a model: a user module instead of (or, with
    ``several``, besides) checkpoints, and the hyper-parameter overrides of reference files.
    ``task`` adds --task for commands that take no other task options."""
    group = parser.add_argument_group("model to load")
    group.add_argument("--model", action=Once, default=None, metavar="MODULE:FACTORY",
                       help="your own model: a .py file or importable module, and the function returning the nn.Module "
                            "(runs that code)")
    group.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="keyword argument of FACTORY (repeatable); VALUE is read as a JSON literal "
                            "(16, 0.1, true, [8, 8], \"text\") when it parses, else as plain text")
    group.add_argument("--weights", action="append", default=[], metavar="PATH",
                       help="state dict of --model (.pt/.pth read with weights_only=True, or .safetensors)"
                            + ("; repeat for several weight files of the same module" if several else ""))
    group.add_argument("--label", action="append", default=[], metavar="NAME",
                       help="the name of the model in tables, figures and reports (one per model, in order; "
                            "default: the checkpoint's architecture or the module's class)")
    group.add_argument("--beta", type=finite, default=None, help="reference files: beta (else recorded, else from the file name)")
    group.add_argument("--gamma", type=finite, default=None, help="reference files: gamma")
    group.add_argument("--eps", type=positive, default=None, help="reference files: eps")
    group.add_argument("--alpha", type=finite, default=None, help="reference files: alpha (else recorded, else 1 with a warning)")
    group.add_argument("--solver", default=None, help="reference LipschitzRNN_ODE files: torchdiffeq solver (euler, midpoint, rk4)")
    if task:
        group.add_argument("--task", choices=sorted(TASK_NAMES), default=None, help="the task to show/record instead of the recorded one")


def _checkpoint_list(args: argparse.Namespace) -> list[str]:
    checkpoints = getattr(args, "checkpoints", None)
    if checkpoints is None:
        checkpoints = [] if args.checkpoint is None else [args.checkpoint]
    return list(checkpoints)


def _model_sources(args: argparse.Namespace) -> ModelSources:
    reference = {name: getattr(args, name) for name in REFERENCE_OVERRIDES if getattr(args, name) is not None}
    return ModelSources(tuple(_checkpoint_list(args)), args.model, tuple(args.model_arg), tuple(args.weights), reference)


def task_source(args: argparse.Namespace) -> TaskSource:
    options = {k: v for k, v in {"path": getattr(args, "data_path", None), "pixels_per_step": getattr(args, "pixels_per_step", None),
                                 "length": getattr(args, "length", None)}.items() if v is not None}
    return TaskSource(args.task, getattr(args, "split_seed", None), options, getattr(args, "data", None))


def input_files(args: argparse.Namespace) -> list[Any]:
    """Every file the command reads (which its outputs must never replace), known before the
    options are checked against each other (that happens when the models are loaded)."""
    model_file = None
    if args.model is not None:
        from ..usermodule import ModelSpec

        model_file = ModelSpec.parse(args.model).path
    return [*_checkpoint_list(args), *args.weights, model_file, getattr(args, "data_path", None), getattr(args, "data", None)]


def load_models(args: argparse.Namespace) -> list[tuple[str, ModelUnderAnalysis]]:
    """(label, model) for every checkpoint and every --weights file of --model, warnings printed."""
    loaded, warnings = _model_sources(args).load()
    print_warnings(warnings)
    if args.label:
        if len(args.label) != len(loaded):
            raise UsageError(f"{len(args.label)} --label for {len(loaded)} model(s): give one per model, in order")
        repeated = sorted({label for label in args.label if args.label.count(label) > 1})
        if repeated:
            raise UsageError(f"--label {repeated[0]} given twice: give each model its own")
        loaded = [(path, dataclasses.replace(subject, name=label)) for (path, subject), label in zip(loaded, args.label)]
    return loaded


def load_subject(args: argparse.Namespace) -> ModelUnderAnalysis:
    """The one model of a single-model command: its checkpoint, or --model with at most one
    --weights; ``args.checkpoint`` becomes the label that names it in the output."""
    if args.checkpoint is not None and args.model is not None:
        raise UsageError("give either a checkpoint or --model MODULE:FACTORY, not both")
    if len(args.weights) > 1:
        raise UsageError(f"lrnn {args.command} analyses one model: give one --weights file (lrnn robustness takes several)")
    ((label, subject),) = load_models(args)
    args.checkpoint = label
    return subject


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def ranks_for(args: argparse.Namespace) -> Ranks:
    """The device of ``--device``; under ``torchrun`` this process's rank in the process group,
    where ranks other than 0 print nothing and show no progress."""
    from ..distributed import join_process_group
    from ..environment import resolve_device

    ranks = join_process_group(resolve_device(args.device))
    if not ranks.is_main:
        args.quiet = True
        sys.stdout = open(os.devnull, "w")
    return ranks


def architecture(subject: Any) -> str:
    """The toolkit architecture a checkpoint records, else the model's name."""
    return (subject.metadata.get("config") or {}).get("arch", subject.name)


def check_figure(path: str | None, force: bool, inputs: Sequence[Any], others: Sequence[Any]) -> None:
    """Before computing: a --figure path with a known suffix (.png, .pdf, .svg) that may be written."""
    if path is not None:
        from ..plots import figure_format

        figure_format(path)
        check_output_file(path, force=force, inputs=inputs, others=others)


def write_figure(figure: Any, path: str) -> None:
    from ..plots import write_figure as write

    write(figure, path)
    print(f"wrote the figure {path}")


def print_warnings(warnings: Sequence[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def json_path_beside(out: str, given: str | None, beside: str) -> Path | None:
    """Where ``--json`` writes: beside ``out`` when given alone (``beside``), else the .json PATH given."""
    if given is None:
        return None
    if given == beside:
        return Path(out).with_suffix(".json")
    if Path(given).suffix != ".json":
        raise UsageError(f"--json {display_name(given)}: the JSON file's name must end in .json "
                         "(to write it beside the CSV, give --json after the checkpoints, with no PATH)")
    return Path(given)
