"""A task: a data set split three ways (train, validation, test) and what a model needs to know about it.

Inputs ``x`` are float32 (N, T, input_dim), or int64 token ids (N, T) for a model that embeds
them (``input_kind`` "tokens", ids below ``vocab_size``). Targets ``y`` are, for one output per
sequence, int64 class labels (N,) or float32 regression targets (N, k); for one output per step
(``per_step``), int64 labels (N, T) or float32 targets (N, T, k), with the steps a mask leaves
out marked unscored (``IGNORE_INDEX`` labels, NaN rows; :func:`~lrnn_analysis.objective.apply_mask`).
``objective`` says how a model is scored on them. :meth:`Task.from_arrays` builds one from the
user's own arrays and checks them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .choices import TASK_NAMES
from .errors import InputError
from .objective import Objective, apply_mask

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
    vocab_size: int | None = None

    @property
    def is_classification(self) -> bool:
        return self.num_classes is not None

    @property
    def per_step(self) -> bool:
        """Whether a model is scored at every step ((N, T) or (N, T, k) targets)."""
        return self.train.y.ndim == (2 if self.is_classification else 3)

    @property
    def objective(self) -> Objective:
        """The loss and metrics a model is scored with on this task."""
        return Objective(self.is_classification, self.per_step)

    @property
    def input_kind(self) -> str:
        """``"tokens"`` (int64 ids (N, T), for a model that embeds them) or ``"float"`` ((N, T, D))."""
        return "tokens" if self.vocab_size is not None else "float"

    @property
    def output_dim(self) -> int:
        """Number of classes, or of regression targets (y has shape (N, k) or (N, T, k))."""
        return self.num_classes if self.num_classes is not None else int(self.train.y.shape[-1])

    @property
    def input_range(self) -> tuple[float, float]:
        """Smallest and largest input value in the training split (in the test split of a task
        that has no training samples)."""
        x = self.train.x if len(self.train) else self.test.x
        return float(x.min()), float(x.max())

    @classmethod
    def from_arrays(cls, x_train: Any, y_train: Any, x_test: Any, y_test: Any, x_val: Any = None, y_val: Any = None,
                    *, name: str = "arrays", num_classes: int | None = None, vocab_size: int | None = None,
                    mask_train: Any = None, mask_val: Any = None, mask_test: Any = None) -> Task:
        """A task on your own splits: x (N, T, D) float or (N, T) integer token ids; y integer
        classes (N,) or (N, T), or float targets (N, k) or (N, T, k); optional boolean masks
        (N, T) of the scored steps; validated by :func:`task_from_arrays`."""
        return task_from_arrays(x_train, y_train, x_test, y_test, x_val, y_val, name=name, num_classes=num_classes,
                                vocab_size=vocab_size, mask_train=mask_train, mask_val=mask_val, mask_test=mask_test)

    def check_fits(self, input_dim: int, output_dim: int, where: str) -> None:
        """Raise ``InputError`` unless a model with these sizes can run on this task."""
        if self.input_kind == "tokens":
            raise InputError(f"{where}: the model takes float inputs (N, T, {input_dim}); task {self.name} gives integer "
                             f"token ids (N, T) (one-hot encode them, or use a model with an nn.Embedding)")
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
            "objective": self.objective.name,
            "input_kind": self.input_kind,
            "vocab_size": self.vocab_size,
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


def _check_x(x: np.ndarray, key: str, vocab_size: int | None) -> np.ndarray:
    """Float inputs (N, T, D) as float32, or integer token ids (N, T) as int64."""
    if min(x.shape, default=0) < 1 and x.ndim in (2, 3):
        raise InputError(f"{key}: empty array of shape {x.shape}")
    if x.dtype.kind in "iu":
        if x.ndim != 2:
            raise InputError(f"{key}: integer inputs are token ids of shape (N, T), got {x.shape} "
                             "(float inputs have shape (N, T, D))")
        if (x < 0).any():
            raise InputError(f"{key}: token ids must be >= 0, found {int(x.min())}")
        if vocab_size is not None and int(x.max()) >= vocab_size:
            raise InputError(f"{key}: token id {int(x.max())} is >= vocab_size = {vocab_size}")
        if int(x.max()) > _MAX_CLASS_LABEL:
            raise InputError(f"{key}: token id {int(x.max())} is larger than {_MAX_CLASS_LABEL}")
        return x.astype(np.int64)
    if x.dtype.kind != "f":
        raise InputError(f"{key}: expected floating-point inputs (N, T, D) or integer token ids (N, T), got dtype {x.dtype}")
    if x.ndim != 3:
        raise InputError(f"{key}: expected shape (N, T, D), got {x.shape}"
                         + (" (token ids (N, T) must be integers)" if x.ndim == 2 else ""))
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: refused below
        x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise InputError(f"{key}: has non-finite values (NaN or inf, in float32)")
    return x32


def _check_mask(mask: np.ndarray, key: str, y: np.ndarray, per_step: bool) -> np.ndarray:
    if not per_step:
        raise InputError(f"{key}: a mask marks the scored steps of per-step targets; y has one target per sequence "
                         f"(shape {y.shape})")
    if mask.dtype != np.bool_ or mask.shape != y.shape[:2]:
        raise InputError(f"{key}: expected a boolean mask of shape {y.shape[:2]} (N, T), got {mask.dtype} {mask.shape}")
    unscored = np.flatnonzero(~mask.any(axis=1))
    if len(unscored):
        raise InputError(f"{key}: sequence {int(unscored[0])} has every step masked (nothing to score)")
    return mask


def _check_y(y: np.ndarray, key: str, n: int, seq_len: int, mask: np.ndarray | None) -> np.ndarray:
    """Targets checked against their inputs' N and T; a target at a step ``mask`` leaves out is
    not looked at (padding may hold anything)."""
    if y.ndim == 0:
        raise InputError(f"{key}: a single number; expected class labels (N,) or (N, T), or targets (N, k) or (N, T, k)")
    if len(y) != n:
        raise InputError(f"{key}: {len(y)} targets for {n} inputs")
    if y.dtype.kind in "iu":
        if y.ndim == 3:
            raise InputError(f"{key}: integer targets of shape {y.shape}: per-step regression targets (N, T, k) must be "
                             "floating point; integer class labels have shape (N,) or (N, T)")
        if y.ndim != 1 and y.ndim != 2:
            raise InputError(f"{key}: integer class labels must have shape (N,) or (N, T), got {y.shape}")
        if y.ndim == 2 and y.shape[1] != seq_len:
            raise InputError(f"{key}: per-step class labels of shape {y.shape} for inputs of {seq_len} steps; "
                             f"expected (N, {seq_len}) (one label per step) or (N,) (one per sequence)")
        scored = y if mask is None else y[mask]
        if (scored < 0).any():
            raise InputError(f"{key}: class labels must be >= 0, found {int(scored.min())}")
        if int(scored.max()) > _MAX_CLASS_LABEL:
            raise InputError(f"{key}: class label {int(scored.max())} is larger than {_MAX_CLASS_LABEL}")
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        if y.ndim == 2 and y.shape[1] == seq_len and seq_len > 1:
            raise InputError(f"{key}: floating-point targets of shape {y.shape} have one value per step of the {seq_len}-step "
                             f"inputs: per-step regression targets need shape (N, T, k) (k = 1: y[..., None]); class labels "
                             "must be integers")
        if y.ndim == 3:
            if y.shape[1] != seq_len or y.shape[2] < 1:
                raise InputError(f"{key}: per-step regression targets of shape {y.shape} for inputs of {seq_len} steps; "
                                 f"expected (N, {seq_len}, k) with k >= 1")
        elif y.ndim != 2 or y.shape[1] < 1:
            raise InputError(f"{key}: regression targets must have shape (N, k) with k >= 1 or (N, T, k), got {y.shape} "
                             "(reshape (N,) targets to (N, 1); class labels must be integers)")
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: refused below
            y32 = y.astype(np.float32)
        if not np.isfinite(y32 if mask is None else y32[mask]).all():
            raise InputError(f"{key}: has non-finite values (NaN or inf, in float32)")
        return y32 if mask is None else np.where(mask[..., None], y32, np.float32(0.0))
    raise InputError(f"{key}: expected integer class labels or floating-point targets, got dtype {y.dtype}")


def _check_size(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or not 1 <= value <= _MAX_CLASS_LABEL + 1):
        raise InputError(f"{what} must be an integer in [1, {_MAX_CLASS_LABEL + 1}], got {value!r:.40}")


def task_from_arrays(
    x_train: Any, y_train: Any, x_test: Any, y_test: Any, x_val: Any = None, y_val: Any = None, *,
    name: str = "arrays", num_classes: int | None = None, description: str | None = None,
    vocab_size: int | None = None, mask_train: Any = None, mask_val: Any = None, mask_test: Any = None,
) -> Task:
    """A :class:`Task` on the user's own splits (numpy arrays or tensors); see the module docstring.

    Integer inputs (N, T) are token ids (``vocab_size`` = largest id + 1 unless given); integer
    targets are class labels (``num_classes`` = largest scored label + 1 unless given).
    ``mask_<split>`` (boolean (N, T), optional) marks the steps of per-step targets that are
    scored; a sequence with none is an error. Shapes that could mean two things are refused.
    Without ``x_val``/``y_val`` the validation split is empty. ``name`` may not be the name
    of a built-in task (the leakage guard tells the two apart by name).
    """
    if not isinstance(name, str):
        raise InputError(f"task name must be a string, got {type(name).__name__}")
    if name in TASK_NAMES:
        raise InputError(f"task name {name!r} is a built-in task; give your data another name")
    _check_size(num_classes, "num_classes")
    _check_size(vocab_size, "vocab_size")
    if (x_val is None) != (y_val is None):
        raise InputError("x_val and y_val must be given together")
    if mask_val is not None and x_val is None:
        raise InputError("mask_val without x_val, y_val")
    given = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    if x_val is not None:
        given |= {"x_val": x_val, "y_val": y_val}
    masks_given = {f"mask_{part}": m for part, m in (("train", mask_train), ("val", mask_val), ("test", mask_test)) if m is not None}
    arrays = {key: _as_array(value, key) for key, value in {**given, **masks_given}.items()}
    splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    for part in ("train", "val", "test"):
        if f"x_{part}" in arrays:
            x = _check_x(arrays[f"x_{part}"], f"x_{part}", vocab_size)
            y = arrays[f"y_{part}"]
            per_step = (y.dtype.kind in "iu" and y.ndim == 2) or (y.dtype.kind == "f" and y.ndim == 3)
            mask = arrays.get(f"mask_{part}")
            if mask is not None and not per_step:
                _check_y(y, f"y_{part}", len(x), x.shape[1], None)  # what is wrong with the targets comes first
            mask = None if mask is None else _check_mask(mask, f"mask_{part}", y, per_step)
            splits[part] = (x, _check_y(y, f"y_{part}", len(x), x.shape[1], mask), mask)
    x0, y0, _ = splits["train"]
    tokens = x0.dtype.kind == "i"
    seq_len = x0.shape[1]
    input_dim = 1 if tokens else x0.shape[2]
    classification = y0.dtype.kind == "i"
    for part, (x, y, _) in splits.items():
        if (x.dtype.kind == "i") != tokens:
            raise InputError(f"x_{part}: {x.dtype} inputs of shape {x.shape} do not match x_train's {x0.dtype} inputs of "
                             f"shape {x0.shape} (token ids and float inputs do not mix)")
        if x.shape[1:] != x0.shape[1:]:
            raise InputError(f"x_{part}: has {'T' if tokens else 'T, D'} = {x.shape[1:]}, x_train has {x0.shape[1:]}")
        if (y.dtype.kind == "i") != classification or y.ndim != y0.ndim or (not classification and y.shape[-1] != y0.shape[-1]):
            raise InputError(f"y_{part}: {y.dtype} targets of shape {y.shape} do not match y_train's "
                             f"{y0.dtype} targets of shape {y0.shape}")
    if tokens:
        largest_id = max(int(x.max()) for x, _, _ in splits.values())
        vocab_size = largest_id + 1 if vocab_size is None else vocab_size
    elif vocab_size is not None:
        raise InputError("vocab_size is for integer token-id inputs; the inputs are floating point")
    if classification:
        largest = max(int((y if m is None else y[m]).max()) for _, y, m in splits.values())
        if num_classes is None:
            num_classes = largest + 1
        elif largest >= num_classes:
            raise InputError(f"a class label {largest} is >= num_classes = {num_classes}")
    elif num_classes is not None:
        raise InputError("num_classes is for integer class labels; the targets are floating point")
    if "val" not in splits:
        x, y, _ = splits["train"]
        splits["val"] = (x[:0], y[:0], None)
    train, val, test = (Split(torch.from_numpy(np.ascontiguousarray(splits[part][0])), _masked(*splits[part][1:], f"mask_{part}"))
                        for part in ("train", "val", "test"))
    sizes = f"{len(train)} train, {len(val)} val, {len(test)} test"
    steps = f"{seq_len} token ids < {vocab_size}" if tokens else f"{seq_len} steps of {input_dim}"
    per = " per step" if y0.ndim == (2 if classification else 3) else ""
    kind = f"{num_classes} classes{per}" if classification else f"regression of {train.y.shape[-1]} targets{per}"
    masked = "; masked" if any(m is not None for _, _, m in splits.values()) else ""
    return Task(name, description or f"user data ({sizes}; {steps}; {kind}{masked})",
                train, val, test, int(input_dim), int(seq_len), num_classes, 0, 0.1,
                vocab_size=int(vocab_size) if tokens and vocab_size is not None else None)


def _masked(y: np.ndarray, mask: np.ndarray | None, key: str) -> torch.Tensor:
    target = torch.from_numpy(np.ascontiguousarray(y))
    if mask is None:
        return target
    try:
        return apply_mask(target, torch.from_numpy(np.ascontiguousarray(mask)))
    except InputError as error:
        raise InputError(f"{key}: {error}") from None
