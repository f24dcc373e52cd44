"""Your data: a task from arrays, or from an ``.npz`` / PyTorch file holding them.

The arrays are ``x_train, y_train, x_test, y_test`` and optionally ``x_val, y_val`` and
``mask_train, mask_val, mask_test``: x floating point and finite of shape (N, T, D), or integer
token ids of shape (N, T) for a model that embeds them (``vocab_size`` = largest id + 1 unless
given), with the same T (and D) in every split; y one target per sequence — integer class labels
(N,) (``num_classes`` = largest label + 1 unless given) or floating-point targets (N, k) — or one
per step — integer labels (N, T) or floating-point targets (N, T, k) — the same kind in every
split; a mask, boolean (N, T), marks the steps of per-step targets that are scored (padding of
variable-length sequences is left out). Shapes that could mean two things (float (N, T) targets)
are refused. Anything else is an error naming the array (and the file); see
:func:`lrnn_analysis.task.task_from_arrays`.

A file is read without executing code from it and without trusting the sizes it declares:

* ``.npz`` (:func:`read_npz`): only the expected members are read, each once (two members of
  one name are refused), stored or deflated, with numeric dtypes; before any data is read, a
  member's declared uncompressed size and the shape in its header are bounded by
  ``MAX_ARRAY_BYTES`` (1 GiB) and ``MAX_ARRAY_ELEMENTS`` (2^28, a float32 GiB), and the
  arrays by ``MAX_TOTAL_BYTES`` (2 GiB) in all;
* PyTorch: ``torch.load(weights_only=True)`` after the checks of :mod:`lrnn_analysis.torch_files`
  (declared sizes bounded before loading; afterwards every tensor dense, not a view overlapping
  itself, alone on its storage), a dict of named tensors of float16/32/64 or integer dtypes
  (not bfloat16: convert with ``.float()``).
"""
from __future__ import annotations

import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError, display_name, first_line
from .reference.pickles import weights_only_reason
from .task import Task, task_from_arrays
from .torch_files import check_declared_sizes, check_tensors

__all__ = ["MAX_ARRAY_BYTES", "MAX_ARRAY_ELEMENTS", "MAX_TOTAL_BYTES", "OPTIONAL_KEYS", "REQUIRED_KEYS",
           "load_data", "read_npz"]

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("x_val", "y_val", "mask_train", "mask_val", "mask_test")
MAX_ARRAY_BYTES = 2**30
MAX_ARRAY_ELEMENTS = 2**28
MAX_TOTAL_BYTES = 2 * 2**30
# Room for a .npy member's header beside its data (numpy reads headers of at most 10,000 bytes).
_NPY_HEADER_BYTES = 2**16
_NPZ_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what numpy.savez / savez_compressed write


def read_npz(path: str | Path, keys: Collection[str], max_array_bytes: int = MAX_ARRAY_BYTES,
             max_total_bytes: int = MAX_TOTAL_BYTES) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays named ``keys`` in the .npz at ``path`` (those it has; member ``key.npy`` or
    ``key``) and the names of its other members, which are not read. Every size is checked
    before the data are read (module docstring); a problem raises ``InputError`` naming the file."""
    path = Path(path)
    name = display_name(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members, others = _npz_members(archive, name, keys, max_array_bytes, max_total_bytes)
            headers = {key: _npy_header(archive, member, name, key, max_array_bytes) for key, member in members.items()}
            arrays = {}
            for key, member in members.items():
                with archive.open(member) as stream:
                    arrays[key] = np.lib.format.read_array(stream, allow_pickle=False)
                if arrays[key].shape != headers[key][0]:
                    raise InputError(f"{name}: {key}: changed while it was read")
            return arrays, others
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, zlib.error, struct.error) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{name}: not a readable .npz file ({first_line(error)})") from error


def _npz_members(archive: zipfile.ZipFile, name: str, keys: Collection[str], max_array_bytes: int,
                 max_total_bytes: int) -> tuple[dict[str, zipfile.ZipInfo], list[str]]:
    """The members holding ``keys``, by key, after the checks that need only the zip's directory
    (their declared sizes bound the arrays' sizes: :func:`_npy_header` checks each fits in its member)."""
    members: dict[str, zipfile.ZipInfo] = {}
    others: list[str] = []
    seen: set[str] = set()
    declared = 0
    for member in archive.infolist():
        key = member.filename.removesuffix(".npy")
        if key in seen:
            raise InputError(f"{name}: holds two members named {key!r}; which one is meant is ambiguous")
        seen.add(key)
        if key not in keys:
            others.append(key)
            continue
        if member.compress_type not in _NPZ_COMPRESSION or member.flag_bits & 0x1:
            raise InputError(f"{name}: {key}: compressed with zip method {member.compress_type}"
                             f"{' and encrypted' if member.flag_bits & 0x1 else ''}; numpy writes stored or deflated members")
        if member.file_size > max_array_bytes + _NPY_HEADER_BYTES:
            raise InputError(f"{name}: {key}: declares {member.file_size} bytes uncompressed, more than the "
                             f"{max_array_bytes}-byte limit")
        declared += member.file_size
        if declared > max_total_bytes + (len(members) + 1) * _NPY_HEADER_BYTES:
            raise InputError(f"{name}: its members declare more than {max_total_bytes} bytes in all")
        members[key] = member
    return members, others


def _npy_header(archive: zipfile.ZipFile, member: zipfile.ZipInfo, name: str, key: str,
                max_array_bytes: int) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data bytes) from a member's .npy header, checked against the limits and
    the member's declared size."""
    with archive.open(member) as stream:
        version = np.lib.format.read_magic(stream)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(stream) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(stream))
        header_bytes = stream.tell()
    if dtype.hasobject:
        raise InputError(f"{name}: {key}: holds Python objects; only numeric arrays are read")
    if any(size < 0 for size in shape):
        raise InputError(f"{name}: {key}: negative dimension in shape {shape}")
    count = math.prod(shape)  # Python ints: no wrap-around
    nbytes = count * dtype.itemsize
    if nbytes > max_array_bytes or count > MAX_ARRAY_ELEMENTS:
        raise InputError(f"{name}: {key}: shape {shape} of {dtype} exceeds {max_array_bytes // 1024**3} GiB "
                         f"or {MAX_ARRAY_ELEMENTS} elements")
    if nbytes > member.file_size - header_bytes:
        raise InputError(f"{name}: {key}: not a readable .npz member (its header declares {nbytes} bytes of data, "
                         f"the member holds {member.file_size - header_bytes})")
    return shape, dtype, nbytes


# The torch dtypes a data file may hold: floating-point inputs and targets, integer labels and token ids, masks.
_TORCH_DTYPES = (torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.int32,
                torch.int64, torch.bool)


def _torch_arrays(path: Path) -> dict[str, Any]:
    name = display_name(path)
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size > MAX_TOTAL_BYTES:
            raise InputError(f"{name}: a PyTorch data file of {size} bytes exceeds {MAX_TOTAL_BYTES // 1024**3} GiB")
        check_declared_sizes(stream, size, name, MAX_ARRAY_BYTES + _NPY_HEADER_BYTES, MAX_TOTAL_BYTES + _NPY_HEADER_BYTES)
        try:
            content = torch.load(stream, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            # torch's message advises loading with weights_only=False (running code from the file): never pass it on.
            raise InputError(f"{name}: refused to unpickle ({weights_only_reason(str(error))}); "
                             "only a dict of tensors is accepted") from error
        except Exception as error:  # torch parsing the user's file: any failure is the file's
            raise InputError(f"{name}: not a readable PyTorch file ({first_line(error)})") from error
    if not isinstance(content, Mapping) or not all(isinstance(k, str) for k in content):
        raise InputError(f"{name}: expected a dict of named tensors, found {type(content).__name__}")
    check_tensors(content, name, size, MAX_ARRAY_BYTES)
    for key, value in content.items():
        if isinstance(value, torch.Tensor) and value.dtype not in _TORCH_DTYPES:
            raise InputError(f"{name}: {key}: a {str(value.dtype).removeprefix('torch.')} tensor; a data file holds "
                             "float16/32/64 inputs and targets, integer labels and token ids and boolean masks "
                             "(convert it, e.g. with .float())")
    return dict(content)


def load_data(path: str | Path, name: str | None = None, num_classes: int | None = None,
              vocab_size: int | None = None) -> Task:
    """A task from an ``.npz`` (zip) or PyTorch file holding ``x_train, y_train, x_test, y_test``
    (optional ``x_val, y_val``, ``mask_train, mask_val, mask_test``), named after the file (e.g.
    ``mydata.npz``) unless ``name``."""
    path = Path(path)
    shown = display_name(path)
    if not path.is_file():
        raise FileNotFoundError(f"{shown}: no such data file")
    with open(path, "rb") as stream:
        head = stream.read(4)
    is_zip = head.startswith(b"PK")
    expected = f"expected {list(REQUIRED_KEYS)} and optionally {list(OPTIONAL_KEYS)}"
    if is_zip and path.suffix == ".npz":
        arrays, unknown = read_npz(path, REQUIRED_KEYS + OPTIONAL_KEYS)
    elif is_zip or head[:1] == b"\x80":
        arrays = _torch_arrays(path)
        unknown = [key for key in arrays if key not in REQUIRED_KEYS + OPTIONAL_KEYS]
    else:
        raise InputError(f"{shown}: not an .npz or PyTorch file")
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if unknown:
        raise InputError(f"{shown}: unknown keys {sorted(unknown)}; {expected}")
    if missing:
        raise InputError(f"{shown}: missing keys {missing}; {expected}")
    try:
        return task_from_arrays(**arrays, name=name or path.name, num_classes=num_classes, vocab_size=vocab_size)
    except InputError as error:
        raise InputError(f"{shown}: {error}") from error
