"""``lrnn robustness``: accuracy — or the task's metric, perplexity or mse — under input and parameter
perturbations of several models, as a tidy CSV (see :mod:`lrnn_analysis.pipelines.robustness`)."""
from __future__ import annotations

import argparse

from ..choices import MAX_BATCH_SIZE, MAX_EIGENPAIRS, MAX_SAMPLES, MAX_SEEDS, SPLITS
from ..errors import display_name
from ..outputs import check_output_file
from . import options as o

__all__ = ["BESIDE_CSV", "add_parser", "run"]

# The options that give levels, and the perturbation kind each names.
_LEVEL_OPTIONS = {
    "input_noise": "gaussian",
    "salt_pepper": "salt-pepper",
    "occlusion": "occlusion",
    "fgsm": "fgsm",
    "param_noise": "gaussian-relative",
    "hessian_direction": "hessian-direction",
}
BESIDE_CSV = ""


def add_parser(sub: argparse._SubParsersAction) -> None:
    robust = sub.add_parser("robustness", help="accuracy (perplexity, mse) under input and parameter perturbations (tidy CSV)")
    robust.add_argument("checkpoints", nargs="*", metavar="CKPT")
    o.add_model_options(robust, several=True)
    o.add_task_options(robust, required=False)
    o.add_data_option(robust)
    robust.add_argument("--input-noise", "--gaussian", dest="input_noise", type=o.levels("gaussian"), default=None,
                        help="Gaussian input noise sigmas, e.g. 0,0.1,0.2,0.3 (perturbation gaussian)")
    robust.add_argument("--salt-pepper", type=o.levels("salt-pepper"), default=None, help="salt-and-pepper probabilities")
    robust.add_argument("--occlusion", type=o.levels("occlusion"), default=None, help="fractions of time steps set to zero")
    robust.add_argument("--fgsm", type=o.levels("fgsm"), default=None, help="FGSM budgets in input units")
    robust.add_argument("--param-noise", "--gaussian-relative", dest="param_noise", type=o.levels("gaussian-relative"), default=None,
                        help="relative Gaussian parameter noise sigmas (perturbation gaussian-relative)")
    robust.add_argument("--hessian-direction", type=o.levels("hessian-direction"), default=None,
                        help="steps t along a seeded unit combination of the top Hessian eigenvectors")
    robust.add_argument("--top-k", "--hessian-k", dest="top_k", type=o.int_in(1, MAX_EIGENPAIRS), default=1,
                        help="number of top Hessian eigenvectors spanning the --hessian-direction directions")
    recurrent = robust.add_mutually_exclusive_group()
    recurrent.add_argument("--recurrent-only", action="store_true",
                           help="parameter perturbations only on each model's declared recurrent parameters (toolkit models: "
                                "M_A, M_W; torch.nn RNN/LSTM/GRU layers: weight_hh_*; a module's recurrent_parameters)")
    recurrent.add_argument("--recurrent", type=o.name_list, default=None, metavar="PATTERNS",
                           help="parameter perturbations only on the parameters these comma-separated globs over parameter "
                                "names match, e.g. 'rnn.weight_hh_*' (each must match)")
    robust.add_argument("--seeds", type=o.int_in(1, MAX_SEEDS), default=5, help="number of seeds (0..N-1)")
    robust.add_argument("--split", choices=SPLITS, default="test")
    robust.add_argument("--max-samples", type=o.int_in(1, MAX_SAMPLES), default=None)
    robust.add_argument("--batch-size", type=o.int_in(1, MAX_BATCH_SIZE), default=1000)
    robust.add_argument("--out", required=True, help="tidy CSV (one row per model, perturbation, level, seed)")
    robust.add_argument("--json", nargs="?", const=BESIDE_CSV, default=None, metavar="PATH",
                        help="also write rows, summary and provenance as JSON to PATH (a .json file; "
                             "--json alone: beside the CSV, with the suffix .json)")
    robust.add_argument("--figure", default=None, metavar="PATH", help="also draw accuracy against level (.png, .pdf or .svg)")
    robust.add_argument("--force", action="store_true", help=o.FORCE_HELP)
    o.add_run_options(robust)
    robust.set_defaults(handler=run)


def settings_from(args: argparse.Namespace):
    from ..pipelines.robustness import RobustnessSettings

    grid = {kind: getattr(args, option) for option, kind in _LEVEL_OPTIONS.items() if getattr(args, option)}
    if not grid:
        raise o.UsageError("no perturbation levels given (e.g. --input-noise 0,0.1,0.2)")
    return RobustnessSettings(grid=grid, seeds=args.seeds, split=args.split, max_samples=args.max_samples,
                              batch_size=args.batch_size, recurrent_only=args.recurrent_only,
                              recurrent=None if args.recurrent is None else tuple(args.recurrent), top_k=args.top_k)


def run(args: argparse.Namespace) -> int:
    from ..formatting import format_table
    from ..pipelines import robustness
    from ..robustness import ROW_FIELDS, SweepModel
    from ..writers import write_csv, write_json

    json_path = o.json_path_beside(args.out, args.json, BESIDE_CSV)
    inputs = o.input_files(args)
    check_output_file(args.out, force=args.force, inputs=inputs)
    if json_path is not None:
        check_output_file(json_path, force=args.force, inputs=inputs, others=[args.out])
    o.check_figure(args.figure, args.force, inputs, [args.out, json_path])
    settings = settings_from(args)
    o.set_threads(args.threads)
    ranks = o.ranks_for(args)
    loaded = o.load_models(args)
    task = o.task_source(args).load_for(loaded)
    for path, subject in loaded:
        subject.check_fits(task, str(path))
    models = [SweepModel(subject.name, display_name(path), subject) for path, subject in loaded]
    result = robustness.run(models, task, settings, ranks=ranks, progress=not args.quiet)
    if not ranks.is_main:
        return 0
    write_csv(args.out, result.rows, ROW_FIELDS)
    if json_path is not None:
        write_json(json_path, result.to_dict())
    metric = task.objective.headline
    if metric == "accuracy":
        print(format_table(result.summary, ["model", "checkpoint", "perturbation", "level", "seeds", "accuracy_mean",
                                            "accuracy_ci95", "accuracy_drop", "loss_mean"],
                           ["model", "checkpoint", "perturbation", "level", "seeds", "accuracy", "+-95%", "drop", "loss"]))
    else:
        accuracy = ["accuracy_mean"] if task.is_classification else []
        print(format_table(result.summary, ["model", "checkpoint", "perturbation", "level", "seeds", "value_mean",
                                            "value_ci95", "metric_drop", *accuracy, "loss_mean"],
                           ["model", "checkpoint", "perturbation", "level", "seeds", metric, "+-95%", "rise",
                            *(["token accuracy"] if accuracy else []), "loss"]))
    print(f"wrote {args.out}" + (f" and {json_path}" if json_path is not None else ""))
    if args.figure is not None:
        from ..plots import plot_robustness

        o.write_figure(plot_robustness(result.summary, "accuracy" if task.objective.headline == "accuracy" else "value"), args.figure)
    o.print_warnings(result.warnings)
    return 0
