"""The ``lrnn`` command: parses options, calls the Python API, prints results.

Exit codes: 0 success, 1 a check failed, 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .data import TASKS, load_task
from .models import ARCHITECTURES, ModelConfig, build_model
from .runtime import DEVICE_CHOICES, resolve_device
from .tables import format_table
from .training import TrainSettings, train_model, training_metadata


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


def _set_threads(threads: int | None) -> None:
    if threads is not None:
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
    )
    settings = TrainSettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
        decay_epochs=args.decay_epochs, weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
    )
    model = build_model(config, seed=args.seed)
    result = train_model(model, task, settings, device, progress=not args.quiet)
    metadata = training_metadata(task, settings, result, device)
    metadata["command"] = "lrnn " + shlex.join(args.argv)
    out = save_checkpoint(args.out, model, metadata)
    metrics = result.metrics
    print(f"task {task.name} (split seed {task.seed}), arch {config.arch} ({config.discretization}), "
          f"hidden {config.hidden}, eps {config.eps:g}, {sum(p.numel() for p in model.parameters())} parameters")
    accuracy = metrics["test_accuracy"]
    score = f"test accuracy {accuracy:.4f}" if accuracy is not None else f"test MSE {metrics['test_loss']:.5f}"
    print(f"{score}, test loss {metrics['test_loss']:.4f}, trained {settings.epochs} epochs in {metrics['train_seconds']:.1f} s on {device}")
    print(_spectral_line(model))
    print(f"saved {out}")
    return 0


def _spectral_line(model) -> str:
    from .training import spectral_abscissas

    parts = [f"alpha({name}) = {value:+.4f}" for name, value in spectral_abscissas(model).items()]
    return "spectral abscissa: " + ", ".join(parts)


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
            print(f"{key}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metadata[key].items()))
    log = metadata.get("log") or []
    if log:
        names = sorted(log[0].get("spectral_abscissa", {}))
        header = f"{'epoch':>5} {'train_loss':>10} {'val_loss':>9} {'val_acc':>8} {'lr':>8}" + "".join(f" {'alpha(' + n + ')':>10}" for n in names)
        print(header)
        for entry in log:
            row = (f"{entry['epoch']:>5} {entry['train_loss']:>10.4f} {entry['val_loss']:>9.4f} "
                   f"{_fmt(entry.get('val_accuracy')):>8} {entry['lr']:>8.2g}")
            row += "".join(f" {entry['spectral_abscissa'][n]:>+10.4f}" for n in names)
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
}


def cmd_robustness(args: argparse.Namespace) -> int:
    from .robustness import SweepModel, sweep

    _set_threads(args.threads)
    device = resolve_device(args.device)
    loaded = [(path, *load_checkpoint(path)) for path in args.checkpoints]
    task = _task_from_args(args, loaded[0][2].get("task"))
    grid = {kind: getattr(args, option) for option, kind in ROBUSTNESS_OPTIONS.items() if getattr(args, option)}
    if not grid:
        raise UsageError("no perturbation levels given (e.g. --input-noise 0,0.1,0.2)")
    models = [SweepModel(_model_label(model), str(path), model) for path, model, _ in loaded]
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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


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
    train.add_argument("--epochs", type=_positive_int, default=100)
    train.add_argument("--batch-size", type=_positive_int, default=128)
    train.add_argument("--lr", type=float, default=0.03)
    train.add_argument("--lr-decay", type=float, default=0.1)
    train.add_argument("--decay-epochs", type=_int_list, default=None, help="comma-separated (default: 75%% of epochs)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--grad-clip", type=float, default=None)
    train.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    train.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    train.add_argument("--threads", type=_positive_int, default=1, help="CPU threads (small recurrent models run fastest on one)")
    train.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)

    info = sub.add_parser("info", help="print a checkpoint's config, metrics and training log")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true", help="print the metadata as JSON")
    info.set_defaults(handler=cmd_info)
    robust = sub.add_parser("robustness", help="accuracy under input and parameter perturbations (tidy CSV)")
    robust.add_argument("checkpoints", nargs="+", metavar="CKPT")
    _add_task_options(robust, required=False)
    robust.add_argument("--input-noise", type=_float_list, default=None, help="Gaussian input noise sigmas, e.g. 0,0.1,0.2,0.3")
    robust.add_argument("--salt-pepper", type=_float_list, default=None, help="salt-and-pepper probabilities")
    robust.add_argument("--occlusion", type=_float_list, default=None, help="fractions of time steps set to zero")
    robust.add_argument("--fgsm", type=_float_list, default=None, help="FGSM budgets in input units")
    robust.add_argument("--param-noise", type=_float_list, default=None, help="relative Gaussian parameter noise sigmas")
    robust.add_argument("--recurrent-only", action="store_true", help="parameter noise only on M_A, M_W")
    robust.add_argument("--seeds", type=_positive_int, default=5, help="number of seeds (0..N-1)")
    robust.add_argument("--split", choices=("train", "val", "test"), default="test")
    robust.add_argument("--max-samples", type=_positive_int, default=None)
    robust.add_argument("--batch-size", type=_positive_int, default=1000)
    robust.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    robust.add_argument("--threads", type=_positive_int, default=1)
    robust.add_argument("--out", required=True, help="tidy CSV (one row per model, perturbation, level, seed)")
    robust.add_argument("--json", action="store_true", help="also write rows, summary and provenance as JSON beside the CSV")
    robust.add_argument("--quiet", action="store_true")
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
