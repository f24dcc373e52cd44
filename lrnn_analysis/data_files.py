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

from .task import Task, task_from_arrays
from .errors import first_line

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("x_val", "y_val")
MAX_ARRAY_BYTES = 8 * 1024**3


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
