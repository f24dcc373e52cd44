"""``lrnn info``: what a checkpoint or a user module is, records and carries."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..errors import display_name
from . import options as o

if TYPE_CHECKING:
    from ..model_under_analysis import ModelUnderAnalysis

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="print a checkpoint's config, metrics and training log")
    info.add_argument("checkpoint", nargs="?", default=None)
    info.add_argument("--json", action="store_true", help="print the metadata as JSON")
    o.add_model_options(info, task=True)
    o.add_data_option(info)
    info.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..formatting import format_table, format_value
    from ..stability.evidence import check_stored
    from ..training import spectral_summary
    from .train import spectral_line

    subject = o.load_subject(args)
    metadata = dict(subject.metadata)
    if args.json:
        from ..writers import dumps

        # Non-finite numbers (a reference log's NaN) are printed as null: the output is valid JSON.
        print(dumps(subject.to_dict() if "user_model" in metadata else metadata, indent=2, sort_keys=True))
        return 0
    if "user_model" in metadata:
        _print_user_model(subject, args.task)
        if args.data is not None:
            _print_data(subject, args.data)
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
    print(spectral_line(spectral_summary(model)))
    if args.data is not None:
        _print_data(subject, args.data)
    return 0


def _print_data(subject: ModelUnderAnalysis, path: str) -> None:
    """What the data file holds, how a model is scored on it, and that the model fits it."""
    from ..data_files import load_data

    task = load_data(path)
    summary = task.summary()
    inputs = (f"token ids (N, {task.seq_len}) < {task.vocab_size}" if task.input_kind == "tokens"
              else f"floats (N, {task.seq_len}, {task.input_dim})")
    scored = task.objective
    print(f"data: {display_name(path)}: {summary['sizes']['train']} train, {summary['sizes']['val']} val, "
          f"{summary['sizes']['test']} test sequences; inputs {inputs}; {scored.name} ({scored.loss_name}, "
          f"metric {scored.headline})" + (f", {scored.count(task.train.y)} scored steps in train" if task.per_step else ""))
    subject.check_fits(task, subject.name)
    print(f"the model fits the data: {'one output per step' if task.per_step else 'one output per sequence'}, "
          f"{task.output_dim} {'classes' if task.is_classification else 'targets'}")


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
        from ..models.torchnn import find_recurrent_layers

        if callable(getattr(subject.module, "step", None)):
            print("Lur'e form: none given; lrnn stability derives one from its step and checks it before certifying")
        elif find_recurrent_layers(subject.module):
            layers = ", ".join(f"{found.name or '(root)'} ({type(found.module).__name__})"
                               for found in find_recurrent_layers(subject.module))
            print(f"Lur'e form: none of the whole model; lrnn stability certifies its torch.nn recurrent layers {layers} "
                  "(LSTM/GRU conditions need a bound on the layer's input, --input-bound)")
        else:
            print("Lur'e form: none (no stability certificate for this model; --cell NAME certifies an RNN cell inside it)")
    else:
        from ..stability import spectrum

        report = spectrum(system)
        print(f"Lur'e form: {system.method}, n = {system.n}, slope L = {system.slope:g}; alpha(A) = {report.abscissa_A:+.4f}, "
              f"||A||_2 = {report.norm_A:.4f}, ||W||_2 = {report.norm_W:.4f} (lrnn stability checks it against the module "
              "before certifying)")
    print(f"task: {task} (from --task; the model records none)" if task is not None
          else "task: none recorded (give --task or --data to the commands that evaluate)")
