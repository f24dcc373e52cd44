"""PyTorch files (``torch.save``) checked before and after ``torch.load``, so that a small file
cannot make the toolkit allocate or compute on more than it holds.

Before loading, :func:`check_declared_sizes` bounds what ``torch.load`` will allocate:

* zip format (PyTorch >= 1.6): ``torch.load`` allocates each member (``data.pkl`` and one per
  storage) at the uncompressed size the zip's directory declares and checks it against the
  storage's element count. Each member's declared size is at most ``max_member_bytes``, their
  sum at most ``max_total_bytes``, and no two members share a name;
* legacy format: ``torch.load`` allocates each storage at the element count its pickled
  persistent id declares, before reading its bytes. The pickles are walked opcode by opcode
  without executing anything, and the storages they declare must fit in
  the bytes that follow them in the file and in ``max_member_bytes`` each.

After loading, :func:`check_tensors` walks what was loaded (with a budget of
``NODES_PER_BYTE`` objects per byte of the file, counting a shared object at every place it
occurs, so nested shared references cannot make a walk exponential) and refuses a tensor that
is not dense (sparse, ...), a tensor with more elements than its storage holds (a stride-0 or
overlapping view: one stored number can claim any number of elements, and once materialised
the tensor is as large as it claims), several tensors viewing one storage, and a tensor larger
than the limit. What passes holds at most as many elements as the file stores.
"""
from __future__ import annotations

import pickletools
import struct
import zipfile
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

import torch

from .errors import InputError, first_line
from .reference.pickles import PickledObject

__all__ = ["NODES_PER_BYTE", "check_declared_sizes", "check_tensors"]

NODES_PER_BYTE = 16
_MIN_NODE_BUDGET = 2**16
_LEGACY_PICKLES = 5  # magic number, protocol version, system info, the object, the storage keys
# Bytes per element of the storage classes a legacy persistent id names (torch.FloatStorage...);
# a class not listed is counted at the largest size.
_STORAGE_ELEMENT_BYTES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1,
}
_LARGEST_ELEMENT_BYTES = 16


class _StorageId(NamedTuple):
    """A storage a legacy pickle declares: its key, its class name and its element count."""

    key: Any
    storage_class: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * _STORAGE_ELEMENT_BYTES.get(self.storage_class, _LARGEST_ELEMENT_BYTES)


class _Global(NamedTuple):
    """A GLOBAL the pickle names (never imported)."""

    module: str
    name: str


class _Unknown:
    """A value the walk does not compute (the result of a call, a container, ...)."""


_UNKNOWN = _Unknown()


def check_declared_sizes(stream: BinaryIO, size: int, name: str, max_member_bytes: int, max_total_bytes: int,
                         error: type[InputError] = InputError) -> None:
    """Raise ``error`` (naming ``name``) unless everything the zip or legacy PyTorch file in
    ``stream`` (``size`` bytes) declares is bounded as the module docstring says. Leaves the
    stream at its start."""
    stream.seek(0)
    zipped = stream.read(2) == b"PK"
    stream.seek(0)
    try:
        if zipped:
            _check_zip_members(stream, name, max_member_bytes, max_total_bytes, error)
        else:
            _check_legacy_storages(stream, size, name, max_member_bytes, error)
    finally:
        stream.seek(0)


def _check_zip_members(stream: BinaryIO, name: str, max_member_bytes: int, max_total_bytes: int,
                       error: type[InputError]) -> None:
    try:
        members = zipfile.ZipFile(stream).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, struct.error) as failure:
        raise error(f"{name}: not a readable PyTorch file ({first_line(failure)})") from None
    seen: set[str] = set()
    total = 0
    for member in members:
        if member.filename in seen:
            raise error(f"{name}: the zip holds two members named {member.filename!r}")
        seen.add(member.filename)
        if member.file_size > max_member_bytes:
            raise error(f"{name}: member {member.filename!r} declares {member.file_size} bytes, "
                        f"more than the {max_member_bytes}-byte limit")
        total += member.file_size
        if total > max_total_bytes:
            raise error(f"{name}: the zip's members declare more than the {max_total_bytes}-byte limit in all")


def _check_legacy_storages(stream: BinaryIO, size: int, name: str, max_member_bytes: int,
                           error: type[InputError]) -> None:
    declared: dict[Any, int] = {}
    try:
        storages = list(_storage_ids(stream, _LEGACY_PICKLES))
    except _Unbounded as reason:
        raise error(f"{name}: refused to load: {reason}") from None
    for storage in storages:
        if storage.nbytes > max_member_bytes:
            raise error(f"{name}: a storage declares {storage.numel} elements ({storage.nbytes} bytes), "
                        f"more than the {max_member_bytes}-byte limit")
        declared[storage.key] = max(storage.nbytes, declared.get(storage.key, 0))
    stored = size - stream.tell()
    if sum(declared.values()) > stored:
        raise error(f"{name}: its storages declare {sum(declared.values())} bytes but the file holds {stored} "
                    "bytes after its pickles (corrupt or truncated)")


class _Malformed(Exception):
    """The pickle cannot be walked further (torch's unpickler fails at the same place)."""


class _Unbounded(Exception):
    """A persistent id whose size cannot be known without loading it."""


def _storage_ids(stream: BinaryIO, pickles: int) -> Iterator[_StorageId]:
    """The storages that the persistent ids of the next ``pickles`` pickles in ``stream`` declare,
    found without executing anything; leaves ``stream`` after the last pickle read. Stops early,
    without an error, where a pickle is malformed or the stream ends (``torch.load`` fails
    there before it allocates anything further). A persistent id whose kind, storage class or
    element count is not written out literally raises ``_Unbounded``: what it declares
    cannot be known before it is loaded."""
    for _ in range(pickles):
        try:
            yield from _pickle_storage_ids(stream)
        except _Malformed:
            return


def _pickle_storage_ids(stream: BinaryIO) -> Iterator[_StorageId]:
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[Any, Any] = {}

    def pop(count: int) -> list[Any]:
        floor = marks[-1] if marks else 0
        if count > len(stack) - floor:
            raise _Malformed
        taken = stack[len(stack) - count:] if count else []
        del stack[len(stack) - count:]
        return taken

    def pop_mark() -> list[Any]:
        if not marks:
            raise _Malformed
        top = marks.pop()
        taken = stack[top:]
        del stack[top:]
        return taken

    try:
        for opcode, arg, _ in pickletools.genops(stream):
            kind = opcode.name
            if kind == "STOP":
                return
            if kind == "MARK":
                marks.append(len(stack))
            elif kind in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pop(1)[0]
                stack.append(memo[arg])
            elif kind == "MEMOIZE":
                memo[len(memo)] = pop(1)[0]
                stack.append(memo[len(memo) - 1])
            elif kind in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, _UNKNOWN))
            elif kind == "GLOBAL":
                module, _, attribute = str(arg).partition(" ")
                stack.append(_Global(module, attribute))
            elif kind == "STACK_GLOBAL":
                module, attribute = pop(2)
                stack.append(_Global(str(module), str(attribute)) if isinstance(attribute, str) else _UNKNOWN)
            elif kind == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif kind in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
                stack.append(tuple(pop({"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[kind])))
            elif kind == "BINPERSID":
                storage = _storage_id(pop(1)[0])
                if storage is not None:
                    yield storage
                stack.append(_UNKNOWN)
            elif kind == "POP":
                if marks and len(stack) == marks[-1]:
                    marks.pop()
                else:
                    pop(1)
            elif kind in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[kind])
            elif (not opcode.stack_before and len(opcode.stack_after) == 1 and arg is not None
                  and opcode.stack_after[0] is not pickletools.markobject and not kind.startswith("EXT")):
                stack.append(arg)  # a literal: number, text or bytes
            else:
                before = opcode.stack_before
                if pickletools.markobject in before:
                    pop_mark()
                    pop(before.index(pickletools.markobject))
                else:
                    pop(len(before))
                stack.extend(_UNKNOWN for _ in opcode.stack_after)
    except (ValueError, EOFError, UnicodeDecodeError):
        raise _Malformed from None
    raise _Malformed


def _storage_id(pid: Any) -> _StorageId | None:
    """The storage a legacy persistent id declares; None for another kind (a module class)."""
    kind = pid[0] if isinstance(pid, tuple) and pid else _UNKNOWN
    if isinstance(kind, bytes):
        kind = kind.decode("latin1")
    if isinstance(kind, str) and kind != "storage":
        return None
    if kind != "storage" or len(pid) < 5:
        raise _Unbounded("a persistent id whose kind is not written out (its size cannot be known before loading)")
    storage_class, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_class, _Global) or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise _Unbounded("a storage whose class or element count is not written out as a literal "
                         "(its size cannot be known before loading)")
    return _StorageId(key if isinstance(key, (str, bytes, int)) else repr(key), storage_class.name, numel)


def check_tensors(content: Any, name: str, file_bytes: int, max_tensor_bytes: int,
                  error: type[InputError] = InputError) -> None:
    """Raise ``error`` naming ``name`` unless every tensor in ``content`` (what ``torch.load``
    returned from a file of ``file_bytes`` bytes) is dense, has no more elements than its
    storage holds, is at most ``max_tensor_bytes`` and alone on its storage; or when the walk
    needs more than ``NODES_PER_BYTE`` objects per byte of the file."""
    budget = max(_MIN_NODE_BUDGET, NODES_PER_BYTE * file_bytes)
    places: list[tuple[str, int]] = [("", -1)]  # (label, index of the parent place): paths built only for messages
    owners: dict[int, int] = {}
    pending: list[tuple[Any, int]] = [(content, 0)]
    while pending:
        value, place = pending.pop()
        budget -= 1
        if budget < 0:
            raise error(f"{name}: shared references expand to more than {NODES_PER_BYTE} objects per byte of the file")
        if isinstance(value, torch.Tensor):
            _check_tensor(value, place, places, name, max_tensor_bytes, owners, error)
            continue
        if isinstance(value, dict):
            children = [(item, f"[{_short(key)}]") for key, item in value.items()]
            children += [(key, f"<key {_short(key)}>") for key in value]
        elif isinstance(value, (list, tuple, set, frozenset)):
            children = [(item, f"[{index}]") for index, item in enumerate(value)]
        elif isinstance(value, PickledObject):
            children = [(value.attributes, f"<{value.qualified_name}>")]
        else:
            continue
        for item, label in children:
            places.append((label, place))
            pending.append((item, len(places) - 1))


def _short(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _path(places: list[tuple[str, int]], place: int) -> str:
    labels = []
    while place > 0:
        label, place = places[place]
        labels.append(label)
    path = "".join(reversed(labels)) or "the content"
    return path if len(path) <= 200 else "..." + path[-197:]


def _check_tensor(tensor: torch.Tensor, place: int, places: list[tuple[str, int]], name: str, max_tensor_bytes: int,
                  owners: dict[int, int], error: type[InputError]) -> None:
    where = _path(places, place)
    if tensor.layout != torch.strided:
        raise error(f"{name}: {where} is a {str(tensor.layout).removeprefix('torch.')} tensor; only dense tensors are read")
    storage = tensor.untyped_storage()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes > storage.nbytes():
        raise error(f"{name}: {where} claims {tensor.numel()} elements (shape {tuple(tensor.shape)}, strides "
                    f"{tuple(tensor.stride())}) but its storage holds {storage.nbytes()} bytes: a stride-0 or "
                    "overlapping view; save a copy (.clone())")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes > max_tensor_bytes:
        raise error(f"{name}: {where} has {tensor.numel()} elements ({nbytes} bytes), more than the "
                    f"{max_tensor_bytes}-byte limit")
    if storage.nbytes() == 0:
        return
    owner = owners.setdefault(storage.data_ptr(), place)
    if owner != place:
        raise error(f"{name}: {_path(places, owner)} and {where} are views of one storage; "
                    "save each tensor on its own (.clone())")
