"""Your data: a task from arrays, or from an ``.npz`` / PyTorch file holding them.

The arrays are ``x_train, y_train, x_test, y_test`` and optionally ``x_val, y_val``:
x of shape (N, T, D), floating point and finite, with the same T and D in every split; y either
integer class labels of shape (N,) (classification, ``num_classes`` = largest label + 1 unless
given) or floating-point targets of shape (N, k) (regression, mean squared error), the same
kind in every split. Anything else is an error naming the array (and the file). A file is read
without executing code from it: ``np.load(allow_pickle=False)`` with array headers checked
before any data is read, or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .data import TASKS, Split, Task
from .errors import first_line

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("x_val", "y_val")
MAX_ARRAY_BYTES = 8 * 1024**3
MAX_CLASS_LABEL = 2**31 - 1


def _as_array(value: Any, key: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{key}: expected an array, got {type(value).__name__}")
    return value


def _check_x(x: np.ndarray, key: str) -> np.ndarray:
    if x.ndim != 3:
        raise ValueError(f"{key}: expected shape (N, T, D), got {x.shape}")
    if x.dtype.kind != "f":
        raise ValueError(f"{key}: expected floating-point inputs, got dtype {x.dtype}")
    if min(x.shape) < 1:
        raise ValueError(f"{key}: empty array of shape {x.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: refused below
        x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise ValueError(f"{key}: has non-finite values (NaN or inf, in float32)")
    return x32


def _check_y(y: np.ndarray, key: str, n: int) -> np.ndarray:
    if len(y) != n:
        raise ValueError(f"{key}: {len(y)} targets for {n} inputs")
    if y.dtype.kind in "iu":
        if y.ndim != 1:
            raise ValueError(f"{key}: integer class labels must have shape (N,), got {y.shape}")
        if (y < 0).any():
            raise ValueError(f"{key}: class labels must be >= 0, found {int(y.min())}")
        if int(y.max()) > MAX_CLASS_LABEL:
            raise ValueError(f"{key}: class label {int(y.max())} is larger than {MAX_CLASS_LABEL}")
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        if y.ndim != 2:
            raise ValueError(f"{key}: regression targets must have shape (N, k), got {y.shape} "
                             "(reshape (N,) targets to (N, 1); class labels must be integers)")
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: refused below
            y32 = y.astype(np.float32)
        if not np.isfinite(y32).all():
            raise ValueError(f"{key}: has non-finite values (NaN or inf, in float32)")
        return y32
    raise ValueError(f"{key}: expected integer class labels or floating-point targets, got dtype {y.dtype}")


def task_from_arrays(
    x_train: Any, y_train: Any, x_test: Any, y_test: Any, x_val: Any = None, y_val: Any = None, *,
    name: str = "arrays", num_classes: int | None = None, description: str | None = None,
) -> Task:
    """A :class:`Task` on the user's own splits (numpy arrays or tensors); see the module docstring.

    Without ``x_val``/``y_val`` the validation split is empty. ``name`` may not be the name
    of a built-in task (the leakage guard tells the two apart by name).
    """
    if name in TASKS:
        raise ValueError(f"task name {name!r} is a built-in task; give your data another name")
    if (x_val is None) != (y_val is None):
        raise ValueError("x_val and y_val must be given together")
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
            raise ValueError(f"x_{part}: has T, D = {x.shape[1:]}, x_train has {(seq_len, input_dim)}")
        if (y.dtype.kind == "i") != classification or (not classification and y.shape[1] != splits["train"][1].shape[1]):
            raise ValueError(f"y_{part}: {y.dtype} targets of shape {y.shape} do not match y_train's "
                             f"{splits['train'][1].dtype} targets of shape {splits['train'][1].shape}")
    if classification:
        largest = max(int(y.max()) for _, y in splits.values())
        if num_classes is None:
            num_classes = largest + 1
        elif largest >= num_classes:
            raise ValueError(f"a class label {largest} is >= num_classes = {num_classes}")
    elif num_classes is not None:
        raise ValueError("num_classes is for integer class labels; the targets are floating point")
    if "val" not in splits:
        x, y = splits["train"]
        splits["val"] = (x[:0], y[:0])
    train, val, test = (Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))
                        for x, y in (splits["train"], splits["val"], splits["test"]))
    sizes = f"{len(train)} train, {len(val)} val, {len(test)} test"
    kind = f"{num_classes} classes" if classification else f"regression of {train.y.shape[1]} targets"
    return Task(name, description or f"user data ({sizes}; {seq_len} steps of {input_dim}; {kind})",
                train, val, test, int(input_dim), int(seq_len), num_classes, 0, 0.1)


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz, each header checked (no objects, size bounded) before it is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    shape, _, dtype = (np.lib.format.read_array_header_1_0(stream) if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0(stream))
                key = member.removesuffix(".npy")
                if dtype.hasobject:
                    raise ValueError(f"{path}: {key}: holds Python objects; only numeric arrays are read")
                if any(size < 0 for size in shape):
                    raise ValueError(f"{path}: {key}: negative dimension in shape {shape}")
                if math.prod(shape) * dtype.itemsize > MAX_ARRAY_BYTES:  # Python ints: no wrap-around
                    raise ValueError(f"{path}: {key}: shape {shape} of {dtype} exceeds {MAX_ARRAY_BYTES // 1024**3} GiB")
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as error:
        if str(error).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: not a readable .npz file ({error})") from error
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from error


def _torch_arrays(path: Path) -> dict[str, Any]:
    from .reference.pickles import weights_only_reason

    size = path.stat().st_size
    if size > MAX_ARRAY_BYTES:
        raise ValueError(f"{path}: a PyTorch data file of {size} bytes exceeds {MAX_ARRAY_BYTES // 1024**3} GiB")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message advises loading with weights_only=False (running code from the file): never pass it on.
        raise ValueError(f"{path}: refused to unpickle ({weights_only_reason(str(error))}); "
                         "only a dict of tensors is accepted") from error
    except Exception as error:
        raise ValueError(f"{path}: not a readable PyTorch file ({first_line(error)})") from error
    if not isinstance(content, Mapping) or not all(isinstance(k, str) for k in content):
        raise ValueError(f"{path}: expected a dict of named tensors, found {type(content).__name__}")
    return dict(content)


def load_data(path: str | Path, name: str | None = None, num_classes: int | None = None) -> Task:
    """A task from an ``.npz`` (zip) or PyTorch file holding ``x_train, y_train, x_test, y_test``
    (optional ``x_val, y_val``), named after the file (e.g. ``mydata.npz``) unless ``name``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    with open(path, "rb") as stream:
        head = stream.read(4)
    is_zip = head.startswith(b"PK")
    if is_zip and path.suffix == ".npz":
        arrays = _npz_arrays(path)
    elif is_zip or head[:1] == b"\x80":
        arrays = _torch_arrays(path)
    else:
        raise ValueError(f"{path}: not an .npz or PyTorch file")
    unknown = sorted(set(arrays) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected {list(REQUIRED_KEYS)} and optionally {list(OPTIONAL_KEYS)}")
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; expected {list(REQUIRED_KEYS)} and optionally {list(OPTIONAL_KEYS)}")
    try:
        return task_from_arrays(**arrays, name=name or path.name, num_classes=num_classes)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
