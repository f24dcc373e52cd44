"""A user's own module named on the command line or in a recipe: ``MODULE:FACTORY`` plus weights.

``MODULE`` is a path to a ``.py`` file (it ends in ``.py`` or contains a ``/``) or the name of an
importable module; ``FACTORY`` is an attribute of it (dots reach nested attributes, e.g.
``MyRNN.build``) that, called with the keyword arguments given, returns the ``nn.Module``.
This runs the user's code because the user named it; a weights file never names code to run:
it is a state dict (``.pt``/``.pth`` read with ``torch.load(weights_only=True)``, or
``.safetensors``, told apart by their content), whose keys and shapes must equal those of the
module's ``state_dict()`` exactly, every floating-point value finite.

Model arguments given as ``key=value`` text are parsed as JSON literals when they parse
(``hidden=16`` is the integer 16, ``eps=0.1`` a float, ``bias=true`` a boolean,
``sizes=[8,8]`` a list, ``act="relu"`` a string) and are taken as plain strings otherwise
(``act=relu`` is the string ``"relu"``).

Every failure is one line naming the spec: a :class:`UserCodeError` when the user's code raises
(running the file or importing the module, the factory, including ``sys.exit``; the exception
is its ``__cause__``), a :class:`UserModelError` otherwise (both are ``InputError``).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import pickle
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from .checkpoints import MAX_FILE_BYTES, MAX_TENSOR_BYTES
from .errors import InputError, UserCodeError, display_name, first_line
from .model_under_analysis import ModelUnderAnalysis
from .torch_files import check_declared_sizes, check_tensors

__all__ = ["ModelSpec", "UserModelError", "load_user_model", "parse_model_args", "read_state_dict"]


class UserModelError(InputError):
    """A user model that cannot be built or loaded; the message names the spec and the problem."""


def _first_line(error: BaseException) -> str:
    """``Type: first line`` of ``error``'s message (the type alone when it is empty)."""
    return f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__


@dataclass(frozen=True)
class ModelSpec:
    """``MODULE:FACTORY`` as given (``text``), split, with a file path resolved against ``root``."""

    text: str
    module: str
    factory: str
    path: Path | None

    @classmethod
    def parse(cls, text: str, root: str | Path | None = None) -> ModelSpec:
        module, sep, factory = text.rpartition(":")
        if not sep or not module or not factory:
            raise UserModelError(f"model {text!r}: expected MODULE:FACTORY (a .py file or importable module, "
                                 "a colon, the name of a function returning the nn.Module)")
        if not all(part.isidentifier() for part in factory.split(".")):
            raise UserModelError(f"model {text}: factory {factory!r} is not a Python name")
        if module.endswith(".py") or "/" in module:
            path = Path(module)
            if not path.is_absolute() and root is not None:
                path = Path(root) / path
            return cls(text, module, factory, path)
        if not all(part.isidentifier() for part in module.split(".")):
            raise UserModelError(f"model {text}: {module!r} is neither a .py file nor a module name")
        return cls(text, module, factory, None)

    def __str__(self) -> str:
        return self.text


def parse_model_args(items: Sequence[str], spec: str = "model") -> dict[str, Any]:
    """``key=value`` texts as keyword arguments: the value as a JSON literal when it parses, else the text."""
    arguments: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserModelError(f"{spec}: --model-arg {item!r}: expected KEY=VALUE with KEY a Python name")
        if key in arguments:
            raise UserModelError(f"{spec}: --model-arg {key} given twice")
        try:
            arguments[key] = json.loads(value, parse_constant=_non_finite(f"{spec}: --model-arg {item!r}"))
        except json.JSONDecodeError:
            arguments[key] = value
    return arguments


def _non_finite(where: str) -> Callable[[str], Any]:
    def refuse(constant: str) -> Any:
        raise UserModelError(f"{where}: {constant} is not a finite number")

    return refuse


def _import(spec: ModelSpec) -> Any:
    if spec.path is None:
        try:
            return importlib.import_module(spec.module)
        except ModuleNotFoundError as error:
            if error.name is not None and spec.module.startswith(error.name):
                hint = f" (for the file, write ./{spec.module}.py:{spec.factory})" if Path(f"{spec.module}.py").is_file() else ""
                raise UserModelError(f"model {spec}: no module named {error.name!r}{hint}") from error
            raise UserModelError(f"model {spec}: importing {spec.module} failed: {_first_line(error)}") from error
        except (Exception, SystemExit) as error:  # the user's code: any failure is reported, not raised through
            raise UserCodeError(f"model {spec}: importing {spec.module} failed: {_first_line(error)}") from error
    path = spec.path
    if not path.is_file():
        raise UserModelError(f"model {spec}: {path} is not an existing file")
    resolved = path.resolve()
    name = f"lrnn_user.{resolved.stem}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) != str(resolved):
        name = f"{name}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise UserModelError(f"model {spec}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    # Like `python file.py`: the file's folder is importable while it runs, so it may import its neighbours.
    sys.path.insert(0, str(resolved.parent))
    try:
        loader_spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        del sys.modules[name]
        raise UserCodeError(f"model {spec}: running {path} failed: {_first_line(error)}") from error
    finally:
        sys.path.remove(str(resolved.parent))
    return module


def _import_factory(spec: ModelSpec | str) -> Callable[..., Any]:
    """The callable ``spec`` names (importing its module or running its file once per process)."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    target: Any = _import(spec)
    for part in spec.factory.split("."):
        if not hasattr(target, part):
            where = spec.path if spec.path is not None else spec.module
            raise UserModelError(f"model {spec}: {where} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserModelError(f"model {spec}: {spec.factory} is a {type(target).__name__}, not callable")
    return target


def _build_module(spec: ModelSpec | str, model_args: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the factory with ``model_args``; it must return an ``nn.Module`` with parameters."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    factory = _import_factory(spec)
    try:
        module = factory(**dict(model_args or {}))
    except (Exception, SystemExit) as error:  # the user's code (sys.exit included: it must not end the toolkit)
        raise UserCodeError(f"model {spec}: {spec.factory}({_arguments(model_args)}) raised {_first_line(error)}") from error
    if not isinstance(module, nn.Module):
        raise UserModelError(f"model {spec}: {spec.factory} returned a {type(module).__name__}, not a torch.nn.Module")
    if not any(True for _ in module.parameters()):
        raise UserModelError(f"model {spec}: the module {spec.factory} returned has no parameters")
    return module


def _arguments(model_args: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (model_args or {}).items())


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a state-dict file (safetensors, or PyTorch read with ``weights_only=True``),
    every one a tensor with finite values where it is floating point, and the SHA-256 of the
    bytes they were read from (the file is read once). A PyTorch file is checked before and after
    loading as :mod:`lrnn_analysis.torch_files` says. Raises ``InputError``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InputError(f"{path}: weights file of {size} bytes is larger than the {MAX_FILE_BYTES}-byte limit")
    data = path.read_bytes()
    head = data[:9]
    if len(head) < 9:
        raise InputError(f"{path}: weights file is empty or truncated ({len(head)} bytes)")
    if head[8:9] == b"{" and not head.startswith(b"PK"):
        try:
            content: Any = load_safetensors(data)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise InputError(f"{path}: not a readable safetensors file ({_first_line(error)})") from error
    elif head.startswith(b"PK") or head[:1] == b"\x80":
        stream = io.BytesIO(data)
        check_declared_sizes(stream, len(data), display_name(path), MAX_TENSOR_BYTES, MAX_FILE_BYTES)
        try:
            content = torch.load(stream, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            culprit = re.search(r"GLOBAL ([\w.]+)", str(error))
            what = f"it would import {culprit.group(1)}" if culprit else "not plain tensors"
            raise InputError(f"{path}: refused to unpickle ({what}); only a state dict of tensors is read: "
                             "save model.state_dict()") from error
        except Exception as error:
            raise InputError(f"{path}: corrupt or truncated PyTorch file ({_first_line(error)})") from error
    else:
        raise InputError(f"{path}: neither a PyTorch (.pt/.pth) nor a safetensors file")
    check_tensors(content, display_name(path), len(data), MAX_TENSOR_BYTES)
    if not isinstance(content, Mapping):
        raise InputError(f"{path}: expected a state dict (save model.state_dict()), found a {type(content).__name__}")
    nested = sorted(str(k) for k, v in content.items() if isinstance(v, Mapping))
    if nested:
        raise InputError(f"{path}: expected a flat state dict of tensors, but the entries {nested} are dicts "
                         "(save the model's state_dict() alone)")
    for key, value in content.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(f"{path}: entry {key!r} is a {type(value).__name__}, not a named tensor")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(f"{path}: tensor {key} has non-finite values (NaN or inf)")
    return dict(content), hashlib.sha256(data).hexdigest()


def _load_weights(module: nn.Module, path: str | Path, spec: ModelSpec | str = "model") -> str:
    """Load a state-dict file into ``module``: exactly the module's keys, shapes and kinds of dtype.
    Returns the SHA-256 of the file as it was read."""
    try:
        state, digest = read_state_dict(path)
    except ValueError as error:
        raise UserModelError(f"model {spec}: weights {error}") from error
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        hint = " (keys start with 'module.': saved from a DataParallel wrapper; save model.module.state_dict())" if (
            unexpected and all(k.startswith("module.") for k in unexpected)) else ""
        raise UserModelError(f"model {spec}: weights {path} do not match the module: missing keys {missing}, "
                             f"unexpected keys {unexpected}{hint}")
    for key, tensor in expected.items():
        given = state[key]
        if tuple(given.shape) != tuple(tensor.shape):
            raise UserModelError(f"model {spec}: weights {path}: {key} has shape {tuple(given.shape)}, "
                                 f"the module's has {tuple(tensor.shape)}")
        if given.is_floating_point() != tensor.is_floating_point():
            raise UserModelError(f"model {spec}: weights {path}: {key} has dtype {given.dtype}, the module's {tensor.dtype}")
    module.load_state_dict(state, strict=True)
    return digest


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_user_model(
    spec: ModelSpec | str,
    weights: str | Path | None = None,
    model_args: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> ModelUnderAnalysis:
    """The module ``spec`` builds (with ``model_args``), with ``weights`` loaded when given, in eval
    mode, as a model under analysis: its declared ``lure_form()`` and ``recurrent_parameters`` are
    used (see :meth:`ModelUnderAnalysis.from_module`). The metadata records the spec, the
    arguments, the module file's SHA-256 (read before it is imported) and the weights file with its
    SHA-256; it records no task (the toolkit cannot know
    what the module was trained on)."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    module_sha256 = _file_sha256(spec.path) if spec.path is not None and spec.path.is_file() else None
    module = _build_module(spec, model_args)
    source: dict[str, Any] = {"model": spec.text, "model_args": dict(model_args or {}), "weights": None,
                              "module_sha256": module_sha256}
    if weights is not None:
        source |= {"weights": str(weights), "weights_sha256": _load_weights(module, weights, spec)}
    module.eval()
    try:
        return ModelUnderAnalysis.from_module(module, name=name, metadata={"format": "user module", "user_model": source})
    except (TypeError, ValueError) as error:
        raise UserModelError(f"model {spec}: {_first_line(error)}") from error
