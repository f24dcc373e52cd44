"""Reading the reference implementation's pickles without executing anything from them.

Whole-module files (``torch.save(model, path)``) go through torch's own ``weights_only``
unpickler, which rebuilds tensors, parameters, storages, ``OrderedDict``/``set``/``torch.device``
and plain containers and refuses every other global. The classes such a file names (the
reference's ``RnnModels`` under its three historical names, its ``LipschitzRNN_ODE`` and the
``nn.Linear``/``nn.Tanh``/``nn.Sigmoid`` submodules; the ``_backend`` marker of PyTorch <= 1.3)
are allow-listed *by name* as inert stand-ins: a stand-in can only be created empty (NEWOBJ) and given a dict of attributes (BUILD);
calling one (a ``__reduce__`` payload, REDUCE) is refused, and none of the real classes is ever
imported. torch's ``weights_only`` unpickler refuses the legacy (non-zip) format's persistent ids
for module classes outright, so a legacy pickle that holds modules is read by torch's legacy
reader with a restricted ``pickle_module`` whose ``find_class`` knows the same globals and
stand-ins and nothing else (the only way a pickle reaches a callable). The training history (``*_loss.pkl``) is a plain pickled dict read by a restricted
unpickler that knows containers, numbers and numpy's numeric scalars only.
"""
from __future__ import annotations

import io
import pickle
import re
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import first_line

__all__ = ["DATA_PARALLEL", "PickledObject", "REFERENCE_MODULE_CLASSES", "class_name", "load_plain_pickle",
    "load_torch_file", "reference_stand_ins", "weights_only_reason"]

REFERENCE_MODULE_CLASSES = ("models.RnnModels", "models.rnn_models", "models.relaxRNN")
_REFERENCE_SUBMODULE_CLASSES = ("models.LipschitzRNN_ODE",)
_TORCH_MODULE_CLASSES = (
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.activation.Tanh",
    "torch.nn.modules.activation.Sigmoid",
    "torch.nn.parallel.data_parallel.DataParallel",
)
# Up to PyTorch 1.3 every nn.Module held ``_backend``, pickled as a call of this function.
_THNN_BACKEND = "torch.nn.backends.thnn._get_thnn_function_backend"
DATA_PARALLEL = "torch.nn.parallel.data_parallel.DataParallel"


class PickledObject:
    """An inert record of a pickled object: its class name and the attribute dict it was given."""

    qualified_name = ""
    # Read by torch's legacy reader when it compares pickled source code; never write patches.
    dump_patches = False
    attributes: dict[str, Any]

    def __new__(cls, *args: Any) -> PickledObject:
        if args:
            raise pickle.UnpicklingError(f"refused: the stand-in for {cls.qualified_name} called or created with arguments "
                                         "(a __reduce__ payload)")
        instance = object.__new__(cls)
        object.__setattr__(instance, "attributes", {})
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Only REDUCE calls the class, and only a __reduce__ payload makes a pickle do that.
        raise pickle.UnpicklingError(f"refused: the stand-in for {self.qualified_name} called like a function (a __reduce__ payload)")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError(f"refused: {self.qualified_name} given a {type(state).__name__} state, not an attribute dict")
        object.__setattr__(self, "attributes", dict(state))

    def __repr__(self) -> str:
        return f"<pickled {self.qualified_name}>"


def _stand_in(qualified_name: str) -> type[PickledObject]:
    return type(qualified_name.rsplit(".", 1)[1], (PickledObject,), {"qualified_name": qualified_name, "__module__": __name__})


_STAND_INS: dict[str, type[PickledObject]] = {
    name: _stand_in(name) for name in REFERENCE_MODULE_CLASSES + _REFERENCE_SUBMODULE_CLASSES + _TORCH_MODULE_CLASSES
}


def _thnn_backend(*args: Any) -> str:
    """What a pre-1.4 module's ``_backend`` attribute becomes: a marker string."""
    if args:
        raise pickle.UnpicklingError(f"refused: {_THNN_BACKEND} called with arguments")
    return _THNN_BACKEND


@contextmanager
def reference_stand_ins() -> Iterator[None]:
    """Within this context ``torch.load(..., weights_only=True)`` also accepts the reference's module
    classes, as inert ``PickledObject`` stand-ins."""
    allowed = [(cls, name) for name, cls in _STAND_INS.items()] + [(_thnn_backend, _THNN_BACKEND)]
    with torch.serialization.safe_globals(allowed):
        yield


def load_torch_file(stream: BinaryIO) -> Any:
    """``torch.load`` of an open file that executes nothing from it: torch's ``weights_only``
    unpickler with the reference stand-ins allowed, or for a legacy file holding modules the
    restricted legacy reader. Refusals raise ``pickle.UnpicklingError`` with the reason only."""
    with reference_stand_ins():
        try:
            stream.seek(0)
            return torch.load(stream, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            reason = weights_only_reason(str(error))
            stream.seek(0)
            legacy_pickle = stream.read(1) == b"\x80"
            if not (legacy_pickle and reason.startswith("Only persistent_load of storage is allowed")):
                raise pickle.UnpicklingError(reason) from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
        warnings.filterwarnings("ignore", category=torch.serialization.SourceChangeWarning)
        stream.seek(0)
        return torch.load(stream, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)


def weights_only_reason(message: str) -> str:
    """The unpickler's own reason, without torch's advice (to rerun unsafely, to allow-list, to read
    the documentation)."""
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    parts = [p.strip() for p in re.split(r"\n\s*\n", message) if p.strip()]
    kept = [p for p in parts if not p.startswith(("Weights only load failed", "Check the documentation"))]
    reason = " ".join(kept) or "refused by the weights-only unpickler"
    return reason.split(" Please use `torch.serialization")[0].strip()


_TORCH_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    "collections.OrderedDict": OrderedDict,
    "torch.device": torch.device,
    "torch.Size": torch.Size,
    "builtins.set": set,
    "__builtin__.set": set,
    _THNN_BACKEND: _thnn_backend,
}


class _GuardedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Python's pure-Python unpickler with BUILD (setting an object's state) limited to objects
    that validate their own state (``buildable``): a BUILD on an allow-listed function would
    otherwise set its attributes (``__defaults__``, ``__name__``, ...) for the whole process."""

    buildable: tuple[type, ...] = ()
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def _load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, self.buildable):
            raise pickle.UnpicklingError(f"refused: BUILD (setting the state) of a {type(target).__name__}")
        target.__setstate__(state)

    dispatch[pickle.BUILD[0]] = _load_build


class _RestrictedUnpickler(_GuardedUnpickler):
    """Knows the tensor-rebuild functions, plain containers and the reference stand-ins only.
    (torch's legacy reader resolves ``*Storage`` names itself, to dtype markers.)

    torch's legacy reader installs its own ``persistent_load``; it is kept for storages only. A
    module id is answered here, with the stand-in class itself: torch would compare the pickled
    source with the class's and, for a class with ``dump_patches``, write a ``.patch`` file into
    the working directory."""

    buildable = (PickledObject,)

    @property  # type: ignore[override]
    def persistent_load(self) -> Any:
        return self._checked_persistent_load

    @persistent_load.setter
    def persistent_load(self, function: Any) -> None:
        self._torch_persistent_load = function

    def _checked_persistent_load(self, pid: Any) -> Any:
        kind = pid[0] if isinstance(pid, tuple) and pid else None
        if isinstance(kind, bytes):
            kind = kind.decode("latin1")
        if kind == "module":
            if len(pid) != 4 or not any(pid[1] is cls for cls in _STAND_INS.values()):
                raise pickle.UnpicklingError("refused: a module persistent id that is not one of the reference's classes")
            return pid[1]
        if kind == "storage" and getattr(self, "_torch_persistent_load", None) is not None:
            return self._torch_persistent_load(pid)
        raise pickle.UnpicklingError(f"refused: a persistent id of kind {str(kind)[:40]!r}")

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _STAND_INS:
            return _STAND_INS[full]
        if full in _TORCH_GLOBALS:
            return _TORCH_GLOBALS[full]
        if full == "_codecs.encode":
            return _latin1_bytes
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {full} is not allowed in a reference model file")


_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="lrnn_analysis.reference.restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),
)


def class_name(obj: Any) -> str | None:
    return obj.qualified_name if isinstance(obj, PickledObject) else None


# ---- the training history: a plain pickled dict ----------------------------------------------

_NUMPY_SCALAR_CODES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


class _PickledDtype:
    """numpy.dtype as pickled: the type code from its arguments, the byte order from its state."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if code not in _NUMPY_SCALAR_CODES:
            raise pickle.UnpicklingError(f"refused: numpy dtype {code!r:.40} (only numeric scalar types are read)")
        self.code, self.byteorder = code, "="

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
            raise pickle.UnpicklingError("refused: a numpy dtype state that is not a plain byte order")
        self.byteorder = state[1]


def _numpy_scalar(dtype: Any, data: Any) -> int | float | bool:
    if not isinstance(dtype, _PickledDtype) or not hasattr(dtype, "code") or not isinstance(data, bytes):
        raise pickle.UnpicklingError("refused: a numpy scalar that is not a numeric type with its bytes")
    resolved = np.dtype(("" if dtype.byteorder == "|" else dtype.byteorder) + dtype.code)
    if len(data) != resolved.itemsize:
        raise pickle.UnpicklingError(f"refused: a {dtype.code} scalar of {len(data)} bytes")
    return np.frombuffer(data, dtype=resolved)[0].item()


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused: _codecs.encode other than str to latin1 bytes")
    return text.encode("latin1")


_PLAIN_GLOBALS = {
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _PickledDtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _PlainUnpickler(_GuardedUnpickler):
    buildable = (_PickledDtype,)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refused: GLOBAL {module}.{name} (a plain data pickle holds containers and numbers only)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused: a persistent id (not a plain data pickle)")


_MAX_PLAIN_DEPTH = 64


def load_plain_pickle(data: bytes) -> Any:
    """Containers (dict, list, tuple), str, bytes, numbers and numpy numeric scalars (as Python
    numbers) from a pickle; anything else raises ``pickle.UnpicklingError``, as do containers
    nested deeper than ``_MAX_PLAIN_DEPTH`` (a container holding itself included) and more
    elements, counting shared ones at each place they occur, than 16 per byte of the pickle (a
    memo reference is one opcode but can repeat a whole container: nested, exponentially)."""
    budget = [16 * max(len(data), 2**16)]
    try:
        value = _PlainUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError:
        raise
    except Exception as error:  # the unpickler failing on these bytes (APPEND to an int, a truncated stream, ...)
        raise pickle.UnpicklingError(f"{type(error).__name__}: {first_line(error)}") from error
    return _check_plain(value, 0, budget)


def _check_plain(value: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise pickle.UnpicklingError("refused: shared references expand to more than 16 elements per byte of the pickle")
    if isinstance(value, (dict, list, tuple)) and depth >= _MAX_PLAIN_DEPTH:
        raise pickle.UnpicklingError(f"refused: containers nested deeper than {_MAX_PLAIN_DEPTH} levels")
    if isinstance(value, dict):
        return {_check_plain(k, depth + 1, budget): _check_plain(v, depth + 1, budget) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_check_plain(v, depth + 1, budget) for v in value)
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    raise pickle.UnpicklingError(f"refused: a {type(value).__name__} in a plain data pickle")
