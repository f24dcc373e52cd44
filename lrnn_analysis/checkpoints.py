"""Checkpoints: safetensors weights with JSON metadata in the same file, written atomically.

Loading reads and checks everything before it builds a model, and never executes code from
the file (PyTorch files are read with ``torch.load(weights_only=True)``):

* the file is a regular file (never a FIFO or device, which could block or never end);
* the safetensors header is parsed here, not by the library: its length is at most
  ``_MAX_HEADER_BYTES`` and fits in the file, its JSON is at most ``_MAX_JSON_DEPTH`` deep with
  finite numbers and integers of at most ``_MAX_INT_DIGITS`` digits and no duplicate keys,
  every tensor has a float16/bfloat16/float32/float64 dtype, a shape whose byte size equals its
  data range, and the ranges tile the data section exactly up to the end of the file;
* the model config is valid and bounded (``ModelConfig``) and every tensor has the shape the
  config implies, computed without allocating the model; the metadata sections have their
  types (``task``, ``metrics``, ... are mappings, ``log`` a list of mappings);
* the integrity hash recorded at save time matches (``weights_sha256``);
* every weight is finite after the conversion to float32.

Integrity hash: ``weights_sha256(config, tensors)`` is the SHA-256 of a sequence of fields,
each preceded by its byte length as an 8-byte little-endian integer: the text
``lrnn-analysis weights v1``; the config as canonical JSON (``ModelConfig.to_dict()`` without
the fields added since v1, ``HASH_OMITTED_AT_DEFAULT``, while they hold their default value, so
hashes recorded before those fields existed still verify; sorted keys, separators ``,`` and ``:``); then for every tensor in the order of its name (sorted by
code point) the name in UTF-8, the safetensors dtype code (``F32``...), the shape as JSON
(``[64,64]``) and the raw little-endian bytes of the data as stored. It covers the weights and
the config, not the other metadata (metrics, log).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import stat
import struct
import warnings
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file

from .errors import CheckpointError, IntegrityWarning, display_name, first_line  # noqa: F401 (re-exported)
from .models import ModelConfig, RecurrentModel, build_model, parameter_shapes
from .outputs import atomic_write
from .reference import is_reference_content, load_reference, load_torch_file
from .torch_files import NODES_PER_BYTE, check_declared_sizes, check_tensors
from .writers import dumps

__all__ = ["FORMAT", "HASH_DOMAIN", "HASH_OMITTED_AT_DEFAULT", "LoadedCheckpoint", "MAX_FILE_BYTES",
    "MAX_TENSOR_BYTES", "METADATA_KEY", "load_checkpoint", "save_checkpoint", "weights_sha256"]

FORMAT = "lrnn-analysis/1"
METADATA_KEY = "lrnn_analysis"
_HASH_KEY = "weights_sha256"
HASH_DOMAIN = b"lrnn-analysis weights v1"
# ModelConfig fields added after the v1 hash was defined (see the module docstring).
HASH_OMITTED_AT_DEFAULT = ("rho", "rank", "cond_penalty", "readout", "lipschitz")
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}

_MAX_HEADER_BYTES = 100 * 2**20
MAX_FILE_BYTES = 2 * 2**30
MAX_TENSOR_BYTES = 2**30  # one tensor (storage) of a PyTorch file
_MAX_JSON_DEPTH = 32
_MAX_INT_DIGITS = 20
_MAX_TENSOR_DIMS = 8
_METADATA_SECTIONS = {"config": dict, "task": dict, "training": dict, "metrics": dict, "environment": dict,
                     "constraint": dict, "reference_hparams": dict, "log": list, "command": str, "format": str,
                     _HASH_KEY: str}


class LoadedCheckpoint(NamedTuple):
    model: RecurrentModel
    metadata: dict[str, Any]

    @property
    def sha256(self) -> str:
        """``weights_sha256`` of the loaded weights and config (verified when the file records one)."""
        return self.metadata[_HASH_KEY]


def weights_sha256(config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> str:
    """The integrity hash defined in the module docstring."""
    digest = hashlib.sha256()

    def field(data: bytes | np.ndarray) -> None:
        digest.update(struct.pack("<Q", memoryview(data).nbytes))
        digest.update(data)

    field(HASH_DOMAIN)
    record = config.to_dict()
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    for name in HASH_OMITTED_AT_DEFAULT:
        if record[name] == defaults[name]:
            del record[name]
    field(json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        field(name.encode("utf-8"))
        field(_DTYPE_CODES[tensor.dtype].encode())
        field(json.dumps(list(tensor.shape), separators=(",", ":")).encode())
        field(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: RecurrentModel, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` and ``metadata`` (JSON-serialisable) to ``path`` atomically, with the
    integrity hash of its weights and config."""
    path = Path(path)
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in model.state_dict().items()}
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise CheckpointError(f"{display_name(path)}: refusing to save non-finite weights in {bad}")
    record = {"format": FORMAT, **dict(metadata or {}), "config": model.config.to_dict(),
              _HASH_KEY: weights_sha256(model.config, state)}
    try:
        header = dumps(record, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{display_name(path)}: metadata is not JSON-serialisable ({error})") from error
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={METADATA_KEY: header}))


def load_checkpoint(path: str | Path, **reference_hparams: float | str | None) -> LoadedCheckpoint:
    """Load a native checkpoint, or a PyTorch file: a state dict with a config, or a file of the
    reference implementation (a state dict or a whole-module pickle, see ``lrnn_analysis.reference``;
    ``reference_hparams`` beta/gamma/eps/alpha/solver/task/model override what the file records).
    Every failure is a one-line ``CheckpointError``."""
    path = Path(path)
    name = display_name(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{name}: no such file") from None
    except OSError as error:
        raise CheckpointError(f"{name}: cannot read ({error.strerror or error})") from error
    _check_regular(name, info)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise CheckpointError(f"{name}: cannot read ({error.strerror or error})") from error
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(stream.fileno())
        _check_regular(name, info)
        if info.st_size > MAX_FILE_BYTES:
            raise CheckpointError(f"{name}: file of {info.st_size} bytes is larger than the {MAX_FILE_BYTES}-byte limit")
        try:
            head = stream.read(9)
            if len(head) < 9:
                raise CheckpointError(f"{name}: file is empty or truncated ({len(head)} bytes)")
            stream.seek(0)
            looks_like_safetensors = head[8:9] == b"{"  # 8-byte header length, then the JSON header
            if not looks_like_safetensors and (head.startswith(b"PK") or head[:1] == b"\x80"):
                loaded = _load_torch_file(path, reference_hparams, stream, info.st_size)
            else:
                loaded = _load_safetensors(path, stream, info.st_size)
        except OSError as error:
            raise CheckpointError(f"{name}: cannot read ({error.strerror or error})") from error
    given = sorted(k for k, v in reference_hparams.items() if v is not None)
    if given and loaded.metadata.get("format") != "reference":
        raise CheckpointError(f"{name}: {', '.join(given)} override(s) apply only to files of the reference "
                              "implementation; this checkpoint records its own config")
    return loaded


def _check_regular(name: str, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = ("directory" if stat.S_ISDIR(info.st_mode) else "FIFO" if stat.S_ISFIFO(info.st_mode)
                else "socket" if stat.S_ISSOCK(info.st_mode) else "device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
                else "special file")
        raise CheckpointError(f"{name}: not a file (a {kind})")


def _read_exact(name: str, stream: BinaryIO, count: int, what: str) -> bytes:
    data = stream.read(count)
    if len(data) != count:
        raise CheckpointError(f"{name}: not a readable safetensors checkpoint ({what} truncated: {len(data)} of {count} bytes)")
    return data


def _load_safetensors(path: Path, stream: BinaryIO, size: int) -> LoadedCheckpoint:
    name = display_name(path)
    (length,) = struct.unpack("<Q", _read_exact(name, stream, 8, "header length"))
    if length > _MAX_HEADER_BYTES or length > size - 8:
        raise CheckpointError(f"{name}: not a readable safetensors checkpoint (header length {length} exceeds "
                              f"{'the file' if length > size - 8 else f'the {_MAX_HEADER_BYTES}-byte limit'})")
    try:
        text = _read_exact(name, stream, length, "header").decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{name}: not a readable safetensors checkpoint (header is not UTF-8: {error.reason})") from None
    header = _parse_json(name, text, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: not a readable safetensors checkpoint (header is a {_json_type(header)}, not an object)")
    file_metadata = header.pop("__metadata__", None)
    entries = {key: _tensor_entry(name, key, spec) for key, spec in header.items()}
    data_size = size - 8 - length
    _check_layout(name, entries, data_size)
    if not isinstance(file_metadata, dict) or not all(isinstance(v, str) for v in file_metadata.values()):
        if file_metadata is not None:
            raise CheckpointError(f"{name}: not a readable safetensors checkpoint (__metadata__ must map names to strings)")
        file_metadata = {}
    if METADATA_KEY not in file_metadata:
        raise CheckpointError(f"{name}: safetensors file has no '{METADATA_KEY}' metadata (not written by lrnn-analysis)")
    metadata = _parse_json(name, file_metadata[METADATA_KEY], "metadata")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise CheckpointError(f"{name}: unsupported checkpoint format {found!r}")
    _check_metadata(name, metadata)
    config = _config(name, metadata.get("config"))
    _check_shapes(name, config, {key: entry[1] for key, entry in entries.items()})
    data = _read_exact(name, stream, data_size, "tensor data")
    tensors = {}
    for key, (dtype, shape, begin, end) in entries.items():
        tensor = torch.empty(0, dtype=dtype) if begin == end else torch.frombuffer(bytearray(data[begin:end]), dtype=dtype)
        tensors[key] = tensor.reshape(shape)
    if _HASH_KEY not in metadata:
        warnings.warn(f"{name}: records no integrity hash (written by an older lrnn-analysis); its weights are not verified",
                      IntegrityWarning, stacklevel=3)
    return _finish(name, config, tensors, metadata, metadata.get(_HASH_KEY))


def _tensor_entry(name: str, key: str, spec: Any) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    where = f"{name}: not a readable safetensors checkpoint (tensor {key!r}"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where} needs exactly dtype, shape and data_offsets)")
    code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if code not in DTYPES:
        raise CheckpointError(f"{name}: tensor {key!r} has dtype {code!r}; supported: {', '.join(DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > _MAX_TENSOR_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where} has shape {shape!r}: expected at most {_MAX_TENSOR_DIMS} sizes >= 0)")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise CheckpointError(f"{where} has data_offsets {offsets!r}: expected [begin, end] with 0 <= begin <= end)")
    nbytes = int(np.prod(shape, dtype=object)) * DTYPES[code].itemsize
    if nbytes != offsets[1] - offsets[0]:
        raise CheckpointError(f"{where} declares {nbytes} bytes for shape {shape} but its data range holds {offsets[1] - offsets[0]})")
    return DTYPES[code], tuple(shape), offsets[0], offsets[1]


def _check_layout(name: str, entries: Mapping[str, tuple[Any, Any, int, int]], data_size: int) -> None:
    """The data ranges must tile [0, data_size) exactly: no gap, no overlap, nothing after the last."""
    position = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            raise CheckpointError(f"{name}: not a readable safetensors checkpoint (tensor {key!r} starts at byte {begin}, "
                                  f"expected {position}: data ranges overlap or leave a gap)")
        position = end
    if position != data_size:
        raise CheckpointError(f"{name}: not a readable safetensors checkpoint (tensor data ends at byte {position} "
                              f"but the file holds {data_size} bytes of data)")


def _load_torch_file(path: Path, reference_hparams: Mapping[str, float], stream: BinaryIO, size: int) -> LoadedCheckpoint:
    name = display_name(path)
    check_declared_sizes(stream, size, name, MAX_TENSOR_BYTES, MAX_FILE_BYTES, CheckpointError)
    try:
        with warnings.catch_warnings():  # torch's warnings about pickle protocols are not for our users
            warnings.simplefilter("ignore")
            content = load_torch_file(stream)
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False (running code from the file): never pass it on.
        culprit = re.search(r"GLOBAL ([\w.]+)", str(error))
        opcode = re.search(r"Unsupported operand (\d+)", str(error))
        what = (f"it would import {culprit.group(1)}" if culprit
                else f"pickle opcode {opcode.group(1)} is not read by the safe loader; re-save it with torch.save" if opcode
                else first_line(error))
        raise CheckpointError(f"{name}: refused to unpickle ({what}); only tensors, plain containers and the "
                              "reference implementation's modules are read") from error
    except Exception as error:
        raise CheckpointError(f"{name}: corrupt or truncated PyTorch file ({_torch_reason(error)})") from error
    check_tensors(content, name, size, MAX_TENSOR_BYTES, CheckpointError)
    if is_reference_content(content):
        try:
            model, metadata = load_reference(path, content, reference_hparams)
        except (ValueError, RuntimeError, TypeError, IndexError, OverflowError) as error:
            raise CheckpointError(f"{name}: {first_line(error)}") from error
        tensors = model.state_dict()
        _check_finite(name, tensors)
        return LoadedCheckpoint(model, {**metadata, _HASH_KEY: weights_sha256(model.config, tensors)})
    if not isinstance(content, dict):
        raise CheckpointError(f"{name}: expected a state dict, found {type(content).__name__}")
    _check_string_keys(name, content, "the file")
    if isinstance(content.get("config"), dict) and isinstance(content.get("state_dict"), dict):
        state = content["state_dict"]
        _check_string_keys(name, state, "state_dict")
        metadata = {k: v for k, v in content.items() if k != "state_dict"}
        _check_json_value(name, metadata, "metadata", 0, [NODES_PER_BYTE * size])
        _check_metadata(name, metadata)
        config = _config(name, metadata["config"])
        _check_tensor_types(name, state)
        _check_shapes(name, config, {key: tuple(t.shape) for key, t in state.items()})
        return _finish(name, config, state, metadata, metadata.get(_HASH_KEY))
    raise CheckpointError(
        f"{name}: state dict without a model config (keys {sorted(content)[:6]}...); save it with lrnn-analysis "
        "or as {'config': ..., 'state_dict': ...}"
    )


def _finish(name: str, config: ModelConfig, tensors: Mapping[str, torch.Tensor], metadata: dict[str, Any],
            recorded: str | None) -> LoadedCheckpoint:
    """Verify the recorded hash, convert to float32, check finiteness, build the model."""
    digest = weights_sha256(config, tensors)
    if recorded is not None and digest != recorded:
        raise CheckpointError(f"{name}: integrity check failed: the weights and config hash to {digest[:16]}..., "
                              f"the checkpoint records {recorded[:16]}... (the file was modified or corrupted)")
    converted = {key: tensor.to(torch.float32) for key, tensor in tensors.items()}
    _check_finite(name, converted)
    model = build_model(config)
    model.load_state_dict(converted)
    return LoadedCheckpoint(model, {**metadata, _HASH_KEY: digest})


def _check_string_keys(name: str, mapping: Mapping[Any, Any], where: str) -> None:
    bad = [key for key in mapping if not isinstance(key, str)]
    if bad:
        raise CheckpointError(f"{name}: {where} has a non-string key {bad[0]!r} ({type(bad[0]).__name__})")


def _check_tensor_types(name: str, tensors: Mapping[str, Any]) -> None:
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{name}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in _DTYPE_CODES:
            raise CheckpointError(f"{name}: tensor {key} has dtype {tensor.dtype}; supported: float16, bfloat16, float32, float64")
        if tensor.ndim > _MAX_TENSOR_DIMS:
            raise CheckpointError(f"{name}: tensor {key} has {tensor.ndim} dimensions")


def _check_finite(name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{name}: tensor {key} has non-finite values (NaN or inf) as float32")


def _check_shapes(name: str, config: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    try:
        expected = parameter_shapes(config)
    except ValueError as error:
        raise CheckpointError(f"{name}: invalid model config ({first_line(error)})") from error
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{name}: tensors do not match a {config.arch} model: missing {missing}, unexpected {unexpected}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise CheckpointError(f"{name}: tensor {key} has shape {tuple(shapes[key])}, config implies {shape}")


def _config(name: str, data: Any) -> ModelConfig:
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError, OverflowError) as error:
        raise CheckpointError(f"{name}: invalid model config ({first_line(error)})") from error


def _check_metadata(name: str, metadata: Mapping[str, Any]) -> None:
    """The sections the toolkit reads have the types it reads them as."""
    for key, kind in _METADATA_SECTIONS.items():
        if key in metadata and not isinstance(metadata[key], kind):
            raise CheckpointError(f"{name}: metadata '{key}' is a {_json_type(metadata[key])}, expected a {_json_type(kind())}")
    task = metadata.get("task", {})
    for key, kind in (("name", str), ("seed", int), ("options", dict)):
        value = task.get(key)
        if key in task and (not isinstance(value, kind) or isinstance(value, bool)):
            raise CheckpointError(f"{name}: metadata task '{key}' is a {_json_type(value)}, expected a {_json_type(kind())}")
    for index, entry in enumerate(metadata.get("log", [])):
        if not isinstance(entry, dict) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in entry.values()):
            raise CheckpointError(f"{name}: metadata log entry {index} must map names to numbers")
    recorded = metadata.get(_HASH_KEY)
    if recorded is not None and not re.fullmatch(r"[0-9a-f]{64}", recorded):
        raise CheckpointError(f"{name}: metadata '{_HASH_KEY}' is not a SHA-256 hex digest")


def _check_json_value(name: str, value: Any, where: str, depth: int, budget: list[int]) -> None:
    """Metadata of a PyTorch file: plain JSON values only (a tensor or bytes there is refused),
    at most ``budget[0]`` values in all, counting a shared one at every place it occurs."""
    budget[0] -= 1
    if budget[0] < 0:
        raise CheckpointError(f"{name}: {where}: the metadata expands to more than {NODES_PER_BYTE} values "
                              "per byte of the file (shared references)")
    if depth > _MAX_JSON_DEPTH:
        raise CheckpointError(f"{name}: {where} is nested more than {_MAX_JSON_DEPTH} levels deep")
    if isinstance(value, dict):
        _check_string_keys(name, value, where)
        for key, item in value.items():
            _check_json_value(name, item, f"{where}.{key[:40]}", depth + 1, budget)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json_value(name, item, f"{where}[{index}]", depth + 1, budget)
    elif isinstance(value, float):
        if not np.isfinite(value):
            raise CheckpointError(f"{name}: {where} is {value}, not a finite number")
    elif isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 10**_MAX_INT_DIGITS:
            raise CheckpointError(f"{name}: {where} is an integer with more than {_MAX_INT_DIGITS} digits")
    elif not (value is None or isinstance(value, (str, bool))):
        raise CheckpointError(f"{name}: {where} holds a {type(value).__name__}, not a JSON value")


def _parse_json(name: str, text: Any, what: str) -> Any:
    """``json.loads`` bounded: nesting depth, integer digits, finite numbers, unique keys."""
    if not isinstance(text, str):
        raise CheckpointError(f"{name}: {what} is not text")
    depth = _nesting_depth(text)
    if depth > _MAX_JSON_DEPTH:
        raise CheckpointError(f"{name}: {what} JSON is nested {depth} levels deep (at most {_MAX_JSON_DEPTH})")
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_reject_constant,
                          object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{name}: corrupt {what} JSON ({first_line(error)})") from None


def _nesting_depth(text: str) -> int:
    """Largest bracket depth outside string literals."""
    skeleton = re.sub(r'"(?:[^"\\]|\\.)*"', "", text).encode("utf-8", "surrogatepass")
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max()) if steps.size else 0


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"integer with {len(text.lstrip('-'))} digits (at most {_MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise ValueError(f"number {text[:24]} is out of the float64 range")
    return value


def _reject_constant(text: str) -> float:
    raise ValueError(f"{text} is not a finite number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"duplicate key {duplicate!r}")
    return result


def _json_type(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _torch_reason(error: BaseException) -> str:
    """The first line of a torch error, unless it is torch's advice about ``weights_only``."""
    line = first_line(error)
    return type(error).__name__ if "weights_only" in line or "can still be loaded" in line else line
