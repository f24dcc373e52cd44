"""A task: a data set split three ways (train, validation, test) and what a model needs to know about it.

Inputs are float32 tensors ``x`` of shape (N, T, input_dim); targets ``y`` are int64 class labels
(N,) or float32 regression targets (N, k). :meth:`Task.from_arrays` builds one from the user's own
arrays and checks them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .choices import TASK_NAMES
from .errors import InputError

__all__ = ["Split", "Task", "task_from_arrays"]

_MAX_CLASS_LABEL = 2**31 - 1


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def batches(self, size: int, count: int | None = None,
                device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``count`` (default: all) consecutive batches of ``size`` samples, on ``device``."""
        starts = list(range(0, len(self), size))[:count]
        return [(self.x[s:s + size].to(device), self.y[s:s + size].to(device)) for s in starts]


@dataclass(frozen=True)
class Task:
    """A dataset split three ways, with what a model needs to know about it."""

    name: str
    description: str
    train: Split
    val: Split
    test: Split
    input_dim: int
    seq_len: int
    num_classes: int | None
    seed: int
    default_eps: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_classification(self) -> bool:
        return self.num_classes is not None

    @property
    def output_dim(self) -> int:
        """Number of classes, or of regression targets (y has shape (N, k))."""
        return self.num_classes if self.num_classes is not None else int(self.train.y.shape[-1])

    @property
    def input_range(self) -> tuple[float, float]:
        """Smallest and largest input value in the training split (in the test split of a task
        that has no training samples)."""
        x = self.train.x if len(self.train) else self.test.x
        return float(x.min()), float(x.max())

    @classmethod
    def from_arrays(cls, x_train: Any, y_train: Any, x_test: Any, y_test: Any, x_val: Any = None, y_val: Any = None,
                    *, name: str = "arrays", num_classes: int | None = None) -> Task:
        """A task on your own splits: x (N, T, D) float, y integer classes (N,) or float targets
        (N, k); validated by :func:`lrnn_analysis.data_files.task_from_arrays`."""
        return task_from_arrays(x_train, y_train, x_test, y_test, x_val, y_val, name=name, num_classes=num_classes)

    def check_fits(self, input_dim: int, output_dim: int, where: str) -> None:
        """Raise ``InputError`` unless a model with these sizes can run on this task."""
        if (input_dim, output_dim) != (self.input_dim, self.output_dim):
            raise InputError(f"{where}: model (input_dim {input_dim}, {output_dim} outputs) does not fit task {self.name} "
                             f"(input_dim {self.input_dim}, {self.output_dim} outputs)")

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild this task with ``load_task``."""
        return {"name": self.name, "seed": self.seed, "options": dict(self.options)}

    def summary(self) -> dict[str, Any]:
        return {
            **self.to_dict(),
            "description": self.description,
            "input_dim": self.input_dim,
            "seq_len": self.seq_len,
            "num_classes": self.num_classes,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
        }



# Tensors with a numpy counterpart that a split may hold (bfloat16, float8, ... have none).
_NUMPY_TENSOR_DTYPES = (torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.int32,
                       torch.int64, torch.bool, torch.complex64, torch.complex128)


def _as_array(value: Any, key: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise InputError(f"{key}: a {str(value.layout).removeprefix('torch.')} tensor; give a dense one (.to_dense())")
        if value.dtype not in _NUMPY_TENSOR_DTYPES:
            raise InputError(f"{key}: a {str(value.dtype).removeprefix('torch.')} tensor, which numpy cannot hold; "
                             "convert it, e.g. with .float()")
        value = value.detach().cpu().resolve_conj().resolve_neg().numpy()
    if not isinstance(value, np.ndarray):
        raise InputError(f"{key}: expected an array, got {type(value).__name__}")
    return value


def _check_x(x: np.ndarray, key: str) -> np.ndarray:
    if x.ndim != 3:
        raise InputError(f"{key}: expected shape (N, T, D), got {x.shape}")
    if x.dtype.kind != "f":
        raise InputError(f"{key}: expected floating-point inputs, got dtype {x.dtype}")
    if min(x.shape) < 1:
        raise InputError(f"{key}: empty array of shape {x.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: refused below
        x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise InputError(f"{key}: has non-finite values (NaN or inf, in float32)")
    return x32


def _check_y(y: np.ndarray, key: str, n: int) -> np.ndarray:
    if y.ndim == 0:
        raise InputError(f"{key}: a single number; expected class labels (N,) or targets (N, k)")
    if len(y) != n:
        raise InputError(f"{key}: {len(y)} targets for {n} inputs")
    if y.dtype.kind in "iu":
        if y.ndim != 1:
            raise InputError(f"{key}: integer class labels must have shape (N,), got {y.shape}")
        if (y < 0).any():
            raise InputError(f"{key}: class labels must be >= 0, found {int(y.min())}")
        if int(y.max()) > _MAX_CLASS_LABEL:
            raise InputError(f"{key}: class label {int(y.max())} is larger than {_MAX_CLASS_LABEL}")
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        if y.ndim != 2 or y.shape[1] < 1:
            raise InputError(f"{key}: regression targets must have shape (N, k) with k >= 1, got {y.shape} "
                             "(reshape (N,) targets to (N, 1); class labels must be integers)")
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: refused below
            y32 = y.astype(np.float32)
        if not np.isfinite(y32).all():
            raise InputError(f"{key}: has non-finite values (NaN or inf, in float32)")
        return y32
    raise InputError(f"{key}: expected integer class labels or floating-point targets, got dtype {y.dtype}")


def task_from_arrays(
    x_train: Any, y_train: Any, x_test: Any, y_test: Any, x_val: Any = None, y_val: Any = None, *,
    name: str = "arrays", num_classes: int | None = None, description: str | None = None,
) -> Task:
    """A :class:`Task` on the user's own splits (numpy arrays or tensors); see the module docstring.

    Without ``x_val``/``y_val`` the validation split is empty. ``name`` may not be the name
    of a built-in task (the leakage guard tells the two apart by name).
    """
    if not isinstance(name, str):
        raise InputError(f"task name must be a string, got {type(name).__name__}")
    if name in TASK_NAMES:
        raise InputError(f"task name {name!r} is a built-in task; give your data another name")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
                                    or not 1 <= num_classes <= _MAX_CLASS_LABEL + 1):
        raise InputError(f"num_classes must be an integer in [1, {_MAX_CLASS_LABEL + 1}], got {num_classes!r:.40}")
    if (x_val is None) != (y_val is None):
        raise InputError("x_val and y_val must be given together")
    given = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    if x_val is not None:
        given |= {"x_val": x_val, "y_val": y_val}
    arrays = {key: _as_array(value, key) for key, value in given.items()}
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for part in ("train", "val", "test"):
        if f"x_{part}" in arrays:
            x = _check_x(arrays[f"x_{part}"], f"x_{part}")
            splits[part] = (x, _check_y(arrays[f"y_{part}"], f"y_{part}", len(x)))
    _, seq_len, input_dim = splits["train"][0].shape
    classification = splits["train"][1].dtype.kind == "i"
    for part, (x, y) in splits.items():
        if x.shape[1:] != (seq_len, input_dim):
            raise InputError(f"x_{part}: has T, D = {x.shape[1:]}, x_train has {(seq_len, input_dim)}")
        if (y.dtype.kind == "i") != classification or (not classification and y.shape[1] != splits["train"][1].shape[1]):
            raise InputError(f"y_{part}: {y.dtype} targets of shape {y.shape} do not match y_train's "
                             f"{splits['train'][1].dtype} targets of shape {splits['train'][1].shape}")
    if classification:
        largest = max(int(y.max()) for _, y in splits.values())
        if num_classes is None:
            num_classes = largest + 1
        elif largest >= num_classes:
            raise InputError(f"a class label {largest} is >= num_classes = {num_classes}")
    elif num_classes is not None:
        raise InputError("num_classes is for integer class labels; the targets are floating point")
    if "val" not in splits:
        x, y = splits["train"]
        splits["val"] = (x[:0], y[:0])
    train, val, test = (Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))
                        for x, y in (splits["train"], splits["val"], splits["test"]))
    sizes = f"{len(train)} train, {len(val)} val, {len(test)} test"
    kind = f"{num_classes} classes" if classification else f"regression of {train.y.shape[1]} targets"
    return Task(name, description or f"user data ({sizes}; {seq_len} steps of {input_dim}; {kind})",
                train, val, test, int(input_dim), int(seq_len), num_classes, 0, 0.1)
