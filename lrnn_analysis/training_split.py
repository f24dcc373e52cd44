"""Leakage guard: was a model trained on the training split of the task it is scored on?

Training records the task (name, split seed, options) and a fingerprint of the training split,
the SHA-256 of its x and y (dtype, shape and bytes). Scoring a model on a built-in task is
trustworthy only when its training split is that task's training split: otherwise the test
split may hold samples it was trained on (a model trained elsewhere on a different split of
the same data, or the same task under another split seed), and accuracy reads too high.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .builtin_tasks import TASKS
from .task import Split, Task

__all__ = ["LEAKAGE_WARNING", "TrainingDataCheck", "check_training_data", "split_fingerprint"]

LEAKAGE_WARNING = "training data unknown: accuracy may include training samples"


def split_fingerprint(split: Split) -> str:
    """SHA-256 (hex) over dtype, shape and bytes of x, then of y (C order, on the CPU)."""
    digest = hashlib.sha256()
    for tensor in (split.x, split.y):
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _is_builtin(task: Task) -> bool:
    """Whether ``task`` is one of the toolkit's own tasks (user data never takes their names)."""
    return task.name in TASKS


@dataclass(frozen=True)
class TrainingDataCheck:
    """``known`` is True when the model's recorded training split is the task's training split
    (equal fingerprints, or, for checkpoints older than fingerprints, the same recorded task,
    split seed and options). ``warning`` is the line to show when it is not known on a
    built-in task (or when a recorded fingerprint contradicts the data), else None."""

    known: bool
    reason: str
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_training_data(metadata: Mapping[str, Any], task: Task) -> TrainingDataCheck:
    """Compare what ``metadata`` records about the training data (``train_fingerprint``,
    ``task``) with ``task``'s training split."""
    recorded_print = metadata.get("train_fingerprint")
    recorded_task = metadata.get("task")
    here = f"{task.name} (split seed {task.seed})"
    if recorded_print is not None:
        if recorded_print == split_fingerprint(task.train):
            return TrainingDataCheck(True, f"trained on the training split of {here} (fingerprint matches)", None)
        reason = f"the recorded training-split fingerprint differs from the training split of {here}"
        return TrainingDataCheck(False, reason, f"{LEAKAGE_WARNING} ({reason})")
    if isinstance(recorded_task, Mapping) and recorded_task.get("name") == task.name \
            and recorded_task.get("seed") == task.seed and dict(recorded_task.get("options") or {}) == dict(task.options):
        return TrainingDataCheck(True, f"trained on {here} (recorded task, split seed and options; no fingerprint)", None)
    if isinstance(recorded_task, Mapping):
        reason = (f"the model records task {recorded_task.get('name')} (split seed {recorded_task.get('seed')}, "
                  f"options {dict(recorded_task.get('options') or {})}), not {here} with options {dict(task.options)}")
    else:
        reason = "the model records no training task or fingerprint"
    if not _is_builtin(task):
        return TrainingDataCheck(False, reason + "; the test split is the user's own", None)
    return TrainingDataCheck(False, reason, f"{LEAKAGE_WARNING} ({reason})")
