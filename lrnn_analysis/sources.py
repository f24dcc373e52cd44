"""What a command names, loaded: models from checkpoints or a user module with weight files, and
the task to score them on (a built-in task, a data file, or the task the checkpoints record).

The command line builds a :class:`ModelSources` and a :class:`TaskSource` from its options and
calls :meth:`ModelSources.load` and :meth:`TaskSource.load`; nothing here parses options.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    from .model_under_analysis import ModelUnderAnalysis
    from .task import Task

__all__ = ["REFERENCE_OVERRIDES", "ModelSources", "TaskSource", "recorded_task"]

# Hyper-parameters of reference-implementation files that a command may set.
REFERENCE_OVERRIDES = ("beta", "gamma", "eps", "alpha", "solver")


@dataclass(frozen=True)
class ModelSources:
    """Checkpoints (native, PyTorch or reference-implementation files, with ``reference``
    hyper-parameter overrides) and/or a user module ``model`` (``MODULE:FACTORY``) built with
    ``model_args`` (``KEY=VALUE`` texts, see :func:`~lrnn_analysis.usermodule.parse_model_args`) and
    loaded with each of ``weights`` (one model per file)."""

    checkpoints: tuple[str, ...] = ()
    model: str | None = None
    model_args: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    reference: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model is None:
            if self.weights or self.model_args:
                raise InputError("--weights and --model-arg go with --model MODULE:FACTORY")
            if not self.checkpoints:
                raise InputError("give a checkpoint or --model MODULE:FACTORY --weights PATH")
        elif self.reference and not self.checkpoints:
            raise InputError(f"--{', --'.join(self.reference)}: for files of the reference implementation; "
                             "a --model takes its settings as --model-arg KEY=VALUE")
        repeated = sorted({w for w in self.weights if self.weights.count(w) > 1})
        if repeated:
            raise InputError(f"--weights {repeated[0]} given twice")

    def load(self) -> tuple[list[tuple[str, ModelUnderAnalysis]], list[str]]:
        """(label, model) for every checkpoint, then for the user module one per weights file,
        labelled by it (or by the spec without weights); and the warnings to show. Bad
        ``model_args`` fail before any file is read."""
        from .model_under_analysis import load_model
        from .usermodule import ModelSpec, load_user_model, parse_model_args

        spec = None if self.model is None else ModelSpec.parse(self.model)
        model_args = {} if spec is None else parse_model_args(self.model_args, spec.text)
        loaded = [(str(path), load_model(path, **self.reference)) for path in self.checkpoints]
        if spec is None:
            return loaded, []
        if not self.weights:
            warning = f"no --weights: analysing {spec} with the parameters its factory gives the module"
            return loaded + [(spec.text, load_user_model(spec, None, model_args))], [warning]
        return loaded + [(path, load_user_model(spec, path, model_args)) for path in self.weights], []


@dataclass(frozen=True)
class TaskSource:
    """A built-in task (``name`` with ``split_seed`` and options), or a data file ``data``;
    with neither, the task the checkpoints record."""

    name: str | None = None
    split_seed: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    data: str | None = None

    def __post_init__(self) -> None:
        if self.data is not None and self.name is not None:
            raise InputError("give either --task or --data, not both")

    def load(self, recorded: Mapping[str, Any] | None = None) -> Task:
        """The data file, else the named task, else ``recorded`` (a checkpoint's task record);
        options given here override the recorded ones of the same task."""
        if self.data is not None:
            from .data_files import load_data

            return load_data(self.data)
        from .builtin_tasks import load_task

        recorded = recorded or {}
        name = self.name or recorded.get("name")
        if name is None:
            raise InputError("no --task given and the checkpoint records none")
        options = dict(recorded.get("options", {})) if name == recorded.get("name") else {}
        options.update(self.options)
        seed = self.split_seed if self.split_seed is not None else recorded.get("seed", 0)
        return load_task(name, seed=seed, **options)

    def load_for(self, loaded: Sequence[tuple[str, ModelUnderAnalysis]]) -> Task:
        """The task named here, else the one every loaded checkpoint records (a user module
        records none: then a task or data file must be named)."""
        if self.name is None and self.data is None:
            unrecorded = [label for label, subject in loaded if subject.metadata.get("format") == "user module"]
            if unrecorded:
                raise InputError(f"{unrecorded[0]}: a model built by --model records no task: give --task NAME or --data FILE")
            return self.load(recorded_task(loaded))
        return self.load(loaded[0][1].metadata.get("task"))


def recorded_task(loaded: Sequence[tuple[str, Any]]) -> dict[str, Any] | None:
    """The task every checkpoint records; an error when they record different ones (each
    checkpoint is scored on its own task unless a task or data file names one for all)."""
    records = [(path, subject.metadata.get("task")) for path, subject in loaded]
    distinct = {json.dumps(record, sort_keys=True) for _, record in records}
    if len(distinct) > 1:
        listed = ", ".join(f"{path} ({_describe_record(record)})" for path, record in records)
        raise InputError(f"the checkpoints record different tasks: {listed}; give --task or --data to score all on one")
    return records[0][1]


def _describe_record(record: dict[str, Any] | None) -> str:
    if record is None:
        return "no task recorded"
    options = record.get("options") or {}
    return f"task {record.get('name')}, split seed {record.get('seed')}" + (f", options {options}" if options else "")
