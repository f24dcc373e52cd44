"""``lrnn train``: train a model of the zoo on a task and save a checkpoint."""
from __future__ import annotations

import argparse
import shlex

from ..choices import ARCHITECTURES, CONSTRAINTS, LIPSCHITZ_RANGE, MAX_BATCH_SIZE, MAX_SIZES, READOUTS
from ..outputs import check_output_file
from . import options as o

__all__ = ["add_parser", "run", "spectral_line"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model on a task and save a checkpoint")
    o.add_task_options(train, required=True)
    train.add_argument("--arch", choices=ARCHITECTURES, default="lipschitz")
    train.add_argument("--readout", choices=READOUTS, default="last",
                       help="last: one output D h_T per sequence; all: an output D h_t at every step (per-step targets)")
    train.add_argument("--hidden", type=o.int_in(1, MAX_SIZES["hidden"]), default=64)
    train.add_argument("--eps", type=o.positive, default=None, help="step per input (default: the task's)")
    train.add_argument("--discretization", default=None, help="euler|rk2|rk38 (lipschitz; rk38 = 3/8-rule RK4), rk4|rk2|euler (node)")
    # Options an architecture does not read are refused (models.HYPERPARAMETERS); defaults: ModelConfig's.
    train.add_argument("--beta", type=o.finite, default=None, help="beta of A and W (lipschitz, lipschitz-gated; default 0.75)")
    train.add_argument("--gamma", type=o.finite, default=None,
                       help="gamma of A and W (lipschitz, lipschitz-gated; of W: antisymmetric; default 0.001)")
    train.add_argument("--beta-a", type=o.finite, default=None)
    train.add_argument("--beta-w", type=o.finite, default=None)
    train.add_argument("--gamma-a", type=o.finite, default=None)
    train.add_argument("--gamma-w", type=o.finite, default=None)
    train.add_argument("--init-std", type=o.positive, default=None,
                       help="recurrent init: N(0, (init_std/hidden)^2) (every architecture but lstm; default 0.1)")
    train.add_argument("--ode-substeps", type=o.int_in(1, MAX_SIZES["ode_substeps"]), default=None,
                       help="steps of the scheme per input step (lipschitz, antisymmetric, residual, node: solver steps; default 1)")
    train.add_argument("--rho", type=o.float_in(0.0, 1.0, above=True), default=None,
                       help="contracting/ren/lipschitz-ren: contraction factor per step they are built to (default 0.999)")
    train.add_argument("--rank", type=o.int_in(0, 3 * MAX_SIZES["hidden"]), default=None,
                       help="contracting/ren/lipschitz-ren: rows of Z (contracting, at most 2 * hidden) or X (ren, at most 3 * hidden); "
                            "0 (the default): hidden")
    train.add_argument("--cond-penalty", type=o.nonnegative, default=None,
                       help="contracting: kappa of the loss term kappa * mean(log^2 sigma_i(T)) (default 0.1)")
    train.add_argument("--lipschitz", type=o.float_in(*LIPSCHITZ_RANGE), default=1.0, metavar="G",
                       help="lipschitz-ren: the bound G on the Lipschitz constant (incremental l2-gain) of the map from the "
                            "whole input sequence to the outputs that the model is built to")
    train.add_argument("--margin-radius", type=o.nonnegative, default=0.0, metavar="DELTA0",
                       help="lipschitz-ren: train on the Lipschitz-margin loss for certified robustness at this l2 radius "
                            "(cross-entropy with DELTA0 times the pair bound added to every non-target logit); 0: plain cross-entropy")
    train.add_argument("--epochs", type=o.int_in(1, 100_000), default=100)
    train.add_argument("--batch-size", type=o.int_in(1, MAX_BATCH_SIZE), default=128)
    train.add_argument("--lr", type=o.positive, default=0.03)
    train.add_argument("--lr-decay", type=o.float_in(0.0, 1.0, above=True), default=0.1)
    train.add_argument("--decay-epochs", type=o.int_list, default=None, help="comma-separated (default: 75%% of epochs)")
    train.add_argument("--weight-decay", type=o.nonnegative, default=0.0)
    train.add_argument("--grad-clip", type=o.positive, default=None)
    train.add_argument("--seed", type=o.seed, default=0, help="initialisation and batch-order seed")
    train.add_argument("--constrain", choices=CONSTRAINTS, default=None,
                       help="project M_A, M_W after every step so this norm certificate holds (lipschitz only)")
    train.add_argument("--margin", type=o.nonnegative, default=0.01, help="margin of the --constrain certificate")
    train.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    train.add_argument("--force", action="store_true", help=o.FORCE_HELP)
    o.add_run_options(train)
    train.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import save_checkpoint
    from ..constraints import StabilityConstraint
    from ..environment import resolve_device
    from ..models import CHECKED_HYPERPARAMETERS, HYPERPARAMETERS, ModelConfig
    from ..training import TrainSettings, spectral_summary, train_and_certify

    check_output_file(args.out, force=args.force, inputs=[args.data_path])
    o.set_threads(args.threads)
    device = resolve_device(args.device)
    read = HYPERPARAMETERS[args.arch]
    shared = {"beta": ("beta_a", "beta_w"), "gamma": ("gamma_a", "gamma_w")}  # options that set two fields
    given = {**shared, **{name: (name,) for name in CHECKED_HYPERPARAMETERS}}
    ignored = [option for option, fields in given.items() if getattr(args, option) is not None and not read & set(fields)]
    if ignored:
        names = ", ".join("--" + option.replace("_", "-") for option in ignored)
        raise o.UsageError(f"{names}: not read by a {args.arch} model (it reads "
                           f"{', '.join(sorted('--' + f.replace('_', '-') for f in read)) or 'none of these options'})")
    task = o.task_source(args).load()

    # eps defaults to the task's; a field's own option (--beta-a) wins over the shared one (--beta).
    fields = {name: getattr(args, name) for name in CHECKED_HYPERPARAMETERS if name != "eps"}
    for option, names in shared.items():
        for name in names:
            fields[name] = getattr(args, option) if fields[name] is None else fields[name]
    config = ModelConfig(
        arch=args.arch,
        input_dim=task.input_dim,
        hidden=args.hidden,
        output_dim=task.output_dim,
        eps=args.eps if args.eps is not None else task.default_eps,
        discretization=args.discretization or "",
        lipschitz=args.lipschitz,
        readout=args.readout,
        **{name: value for name, value in fields.items() if value is not None},
    )
    settings = TrainSettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
        decay_epochs=args.decay_epochs, weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
        margin_radius=args.margin_radius,
    )
    constraint = StabilityConstraint(args.constrain, args.margin) if args.constrain else None
    trained = train_and_certify(config, task, settings, device, constraint=constraint, progress=not args.quiet)
    trained.metadata["command"] = "lrnn " + shlex.join(args.argv)
    out = save_checkpoint(args.out, trained.model, trained.metadata)
    metrics = trained.result.metrics
    print(f"task {task.name} (split seed {task.seed}), arch {config.arch} ({config.discretization}), "
          f"readout {config.readout}, hidden {config.hidden}, "
          f"{f'eps {config.eps:g}, ' if 'eps' in read else ''}{sum(p.numel() for p in trained.model.parameters())} parameters")
    accuracy = metrics["test_accuracy"]
    if metrics.get("test_perplexity") is not None:
        score = (f"test perplexity {metrics['test_perplexity']:.3f}, {metrics['test_bits_per_token']:.4f} bits per token, "
                 f"token accuracy {accuracy:.4f}")
    else:
        score = f"test accuracy {accuracy:.4f}" if accuracy is not None else f"test MSE {metrics['test_loss']:.5f}"
    print(f"{score}, test loss {metrics['test_loss']:.4f}, trained {settings.epochs} epochs in {metrics['train_seconds']:.1f} s on {device}")
    print(spectral_line(spectral_summary(trained.model)))
    if constraint is not None:
        verdict = trained.constraint_certificate
        print(f"constraint {constraint.certificate} (margin {constraint.margin:g}): holds {verdict['holds']}, margin {verdict['margin']:.4g}")
    if trained.evidence_line is not None:
        print(trained.evidence_line)
    print(f"saved {out}")
    return 0


def spectral_line(summary: dict[str, float]) -> str:
    parts = [f"{key.split('_')[0]}({key.split('_')[1]}) = {value:+.4f}" for key, value in summary.items()]
    return "spectra: " + ", ".join(parts)
