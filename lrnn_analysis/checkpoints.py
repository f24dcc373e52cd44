"""Checkpoints: safetensors weights with JSON metadata in the same file, written atomically.

Loading validates before building (known architecture, every tensor present with
the shape the config implies, all finite) and never executes code from the file:
PyTorch files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .io import atomic_write, dumps
from .models import ModelConfig, RecurrentModel, build_model
from .reference import is_reference_content, load_reference, load_torch_file

FORMAT = "lrnn-analysis/1"
METADATA_KEY = "lrnn_analysis"


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded or saved; the message names the file and the problem."""


class LoadedCheckpoint(NamedTuple):
    model: RecurrentModel
    metadata: dict[str, Any]


def save_checkpoint(path: str | Path, model: RecurrentModel, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` and ``metadata`` (JSON-serialisable) to ``path`` atomically."""
    path = Path(path)
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in model.state_dict().items()}
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise CheckpointError(f"{path}: refusing to save non-finite weights in {bad}")
    record = {"format": FORMAT, **dict(metadata or {}), "config": model.config.to_dict()}
    try:
        header = dumps(record, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: metadata is not JSON-serialisable ({error})") from error
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={METADATA_KEY: header}))


def load_checkpoint(path: str | Path, **reference_hparams: float | str | None) -> LoadedCheckpoint:
    """Load a native checkpoint, or a PyTorch file: a state dict with a config, or a file of the
    reference implementation (a state dict or a whole-module pickle, see ``lrnn_analysis.reference``;
    ``reference_hparams`` beta/gamma/eps/alpha/solver/task/model override what the file records)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    with open(path, "rb") as stream:
        head = stream.read(9)
    if len(head) < 9:
        raise CheckpointError(f"{path}: file is empty or truncated ({len(head)} bytes)")
    looks_like_safetensors = head[8:9] == b"{"  # 8-byte header length, then the JSON header
    if not looks_like_safetensors and (head.startswith(b"PK") or head[:1] == b"\x80"):
        loaded = _load_torch_file(path, reference_hparams)
    else:
        loaded = _load_safetensors(path)
    given = sorted(k for k, v in reference_hparams.items() if v is not None)
    if given and loaded.metadata.get("format") != "reference":
        raise CheckpointError(f"{path}: {', '.join(given)} override(s) apply only to files of the reference "
                              "implementation; this checkpoint records its own config")
    return loaded


def _load_safetensors(path: Path) -> LoadedCheckpoint:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({_first_line(error)})") from error
    if header is None:
        raise CheckpointError(f"{path}: safetensors file has no '{METADATA_KEY}' metadata (not written by lrnn-analysis)")
    try:
        metadata = json.loads(header)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: corrupt metadata JSON ({error})") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {metadata.get('format') if isinstance(metadata, dict) else None!r}")
    return LoadedCheckpoint(_build_validated(path, metadata.get("config"), tensors), metadata)


def _load_torch_file(path: Path, reference_hparams: Mapping[str, float]) -> LoadedCheckpoint:
    try:
        content = load_torch_file(path)
    except pickle.UnpicklingError as error:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"it would import {culprit.group(1)}" if culprit else _first_line(error)
        raise CheckpointError(f"{path}: refused to unpickle ({what}); only plain tensor state dicts are accepted") from error
    except Exception as error:
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch file ({_first_line(error)})") from error
    if is_reference_content(content):
        try:
            return LoadedCheckpoint(*load_reference(path, content, reference_hparams))
        except (ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path}: {_first_line(error)}") from error
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(content).__name__}")
    if isinstance(content.get("config"), dict) and isinstance(content.get("state_dict"), dict):
        metadata = {k: v for k, v in content.items() if k != "state_dict"}
        return LoadedCheckpoint(_build_validated(path, content["config"], content["state_dict"]), metadata)
    raise CheckpointError(
        f"{path}: state dict without a model config (keys {sorted(content)[:6]}...); save it with lrnn-analysis "
        "or as {'config': ..., 'state_dict': ...}"
    )


def _check_tensors(path: Path, tensors: Mapping[str, Any]) -> None:
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name} has non-finite values (NaN or inf)")


def _build_validated(path: Path, config_data: Any, tensors: Mapping[str, Any]) -> RecurrentModel:
    try:
        config = ModelConfig.from_dict(config_data)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid model config ({_first_line(error)})") from error
    model = build_model(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match a {config.arch} model: missing {missing}, unexpected {unexpected}")
    _check_tensors(path, tensors)
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, config implies {shape}")
    model.load_state_dict({name: t.to(torch.float32) for name, t in tensors.items()})
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
