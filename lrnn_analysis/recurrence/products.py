"""The engine's matrix products on the CPU, C = A B and C += A B, through NumPy's BLAS where that is OpenBLAS.

On this project's CPU (AMD EPYC, one thread) the OpenBLAS that NumPy's wheels ship multiplies
float32 matrices of the engine's shapes 11-16% faster than torch's MKL: 116 against 104 GFLOP/s at
the step's (128 x 128) @ (128 x 256), 121 against 104 for the weight gradients' (256 x 2048) @
(2048 x 128) (``python bench/recurrence.py --breakdown`` prints both rates). So with one intra-op
thread (``torch.get_num_threads() == 1``, the CLI's default) and NumPy's BLAS OpenBLAS, a product of
CPU float32 or float64 tensors that autograd has no stake in (no graph to record, no forward-mode
tangent, no functorch transform or vmap batching) and whose operands and output BLAS can read in
place (a unit stride along one axis) goes through ``numpy.matmul`` on views of the same memory;
everything else through torch. Both compute the same sums, in their own order of floating-point
additions. The passes that use it hold OpenBLAS to one thread (``one_blas_thread``), so that one
thread means one thread.

NumPy has no product that adds into its output, so for the products the sweeps add into a buffer
row by row (:func:`row_products_added`: the tangent's and the second-order adjoint's step
products, and the forward's where A is absent) the engine calls the gemm of NumPy's OpenBLAS
itself, through ctypes, with beta = 1 (:func:`_gemm`), under the same conditions (``python
bench/recurrence.py --breakdown`` times the tangent's step products added into their rows both
ways). Where that gemm is not found, or fails its check on exact products, torch's addmm does
those products.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy
import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

__all__ = ["legacy_batched", "mm", "numpy_allowed", "numpy_products", "numpy_view", "one_blas_thread", "row_products",
           "row_products_added", "uses_numpy"]

_DTYPES = (torch.float32, torch.float64)
_PLAIN = (Tensor, torch.nn.Parameter)


def _numpy_blas() -> dict[str, object]:
    """The BLAS entry of NumPy's build configuration (empty where NumPy does not report one)."""
    return getattr(numpy.__config__, "CONFIG", {}).get("Build Dependencies", {}).get("blas", {})


@functools.cache
def _openblas() -> object | None:
    """threadpoolctl's controller of the OpenBLAS libraries loaded, where NumPy's own BLAS is OpenBLAS
    (by its build configuration: another library, SciPy's, may have loaded one beside an MKL NumPy),
    else None."""
    from threadpoolctl import ThreadpoolController

    if "openblas" not in str(_numpy_blas().get("name", "")).lower():
        return None
    controller = ThreadpoolController().select(internal_api="openblas")
    return controller if controller.lib_controllers else None


def _set_threads(library: Any, count: int) -> None:
    """Set the thread count of one of threadpoolctl's OpenBLAS controllers. In recent threadpoolctl (3.8
    here) its public setter changes a process-wide pool only from its "controlling" Python thread, the
    first to set one, and silently does nothing in the others; :class:`_OneThreadHold` keeps its own account across
    threads, so it sets the count itself where threadpoolctl has the setter without that rule."""
    getattr(library, "_real_set_num_threads", library.set_num_threads)(count)


class _OneThreadHold:
    """OpenBLAS held to one thread while any engine pass runs, the count from before restored when the
    last ends. A pthreads OpenBLAS has one pool for the whole process: the first pass to enter sets
    it, the last to leave restores it (a limit per pass, overlapping in two Python threads, would
    restore the count at the first one's end while the other computes, and at the other's end the
    one thread the first had set, for good). An OpenMP OpenBLAS's count is per thread: held per
    Python thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.shared = _Held()
        self.local = threading.local()

    def enter(self, libraries: list[Any]) -> None:
        with self.lock:
            self.shared.enter([lib for lib in libraries if lib.threading_layer != "openmp"])
        if not hasattr(self.local, "held"):
            self.local.held = _Held()
        self.local.held.enter([lib for lib in libraries if lib.threading_layer == "openmp"])

    def leave(self) -> None:
        self.local.held.leave()
        with self.lock:
            self.shared.leave()


class _Held:
    """Nested holds of some OpenBLAS libraries at one thread: the first sets it, the last restores."""

    def __init__(self) -> None:
        self.holders = 0
        self.saved: list[tuple[Any, int]] = []

    def enter(self, libraries: list[Any]) -> None:
        if self.holders == 0:
            self.saved = [(lib, count) for lib in libraries if (count := lib.get_num_threads()) is not None]
            for lib, _ in self.saved:
                _set_threads(lib, 1)
        self.holders += 1

    def leave(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            for lib, count in self.saved:
                _set_threads(lib, count)
            self.saved = []


_HOLD = _OneThreadHold()


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """The block in which the engine calls :func:`mm`, :func:`row_products` and :func:`row_products_added`:
    OpenBLAS held to one thread where the engine may use it (one intra-op thread), in every Python
    thread until the last such block ends (:class:`_OneThreadHold`), and NumPy's floating-point
    warnings off, as torch's operations give inf and nan without one."""
    controller = _openblas() if torch.get_num_threads() == 1 else None
    if controller is None:
        with numpy.errstate(all="ignore"):
            yield
        return
    _HOLD.enter(controller.lib_controllers)  # type: ignore[attr-defined]
    try:
        with numpy.errstate(all="ignore"):
            yield
    finally:
        _HOLD.leave()


def legacy_batched(tensor: Tensor) -> bool:
    """Whether ``tensor`` is batched by the vmap of ``autograd.grad(..., is_grads_batched=True)``, under
    which nothing can be written into a buffer (``out=``) or viewed by NumPy; True where torch cannot tell."""
    check = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return check is None or check(tensor)


def numpy_view(tensor: Tensor, dtypes: tuple[torch.dtype, ...] = _DTYPES) -> bool:
    """Whether ``tensor`` is a CPU tensor of one of ``dtypes`` that NumPy can view in its own memory
    and autograd has no stake in: no graph to record through it, no forward-mode tangent, no vmap
    batching; and no subclass of its own (a FakeTensor used outside its mode reports the CPU and
    holds no memory)."""
    return (type(tensor) in _PLAIN and tensor.device.type == "cpu" and tensor.layout == torch.strided and tensor.dtype in dtypes
            and not tensor.is_neg() and not tensor.is_conj()
            and not (torch.is_grad_enabled() and tensor.requires_grad)
            and forward_ad.unpack_dual(tensor).tangent is None and not legacy_batched(tensor))


def numpy_allowed() -> bool:
    """Whether the engine may compute with NumPy now: one intra-op thread, no functorch transform, no
    tracer recording (torch.compile, torch.jit.trace: a traced graph never sees NumPy's writes into a
    tensor's memory, and its replay would return whatever that memory held), and no mode observing
    torch's operations (:func:`_observed`)."""
    return (torch.get_num_threads() == 1 and not torch._C._are_functorch_transforms_active()
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not _observed())


def _observed() -> bool:
    """Whether a mode sees torch's operations, which would not see NumPy's: any TorchDispatchMode
    (FlopCounterMode would count none of NumPy's FLOPs; make_fx's tracing, fake tensors), or a
    TorchFunctionMode other than the default device's (``torch.set_default_device``, ``with
    torch.device(...)``), which only places new tensors."""
    if torch._C._len_torch_dispatch_stack():
        return True
    return any(type(torch._C._get_function_stack_at(i)).__name__ != "DeviceContext"
               for i in range(torch._C._len_torch_function_stack()))


def uses_numpy(*tensors: Tensor) -> bool:
    """Whether products of ``tensors`` go through NumPy (module docstring), strides aside."""
    return (numpy_allowed() and _openblas() is not None and len({t.dtype for t in tensors}) == 1
            and all(numpy_view(t) for t in tensors))


def _rows_in_place(tensor: Tensor) -> bool:
    """Whether BLAS reads the rows of ``tensor`` (its last two axes, row-major) in place: a unit last
    stride, rows at least a row apart."""
    return tensor.stride(-1) == 1 and tensor.stride(-2) >= tensor.shape[-1]


def _blas_matrix(tensor: Tensor) -> bool:
    """Whether BLAS reads the 2-D ``tensor`` in place: a unit stride along one axis, the other at least its extent."""
    rows, cols = tensor.shape
    row_stride, col_stride = tensor.stride()
    return (col_stride == 1 and row_stride >= max(cols, 1)) or (row_stride == 1 and col_stride >= max(rows, 1))


def mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b for 2-D a and b, written into ``out`` if given (module docstring for which library)."""
    tensors = (a, b) if out is None else (a, b, out)
    if (uses_numpy(*tensors) and _blas_matrix(a) and _blas_matrix(b)
            and (out is None or _rows_in_place(out))):
        target = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device="cpu") if out is None else out
        numpy.matmul(a.detach().numpy(), b.detach().numpy(), out=target.detach().numpy())
        return target
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def numpy_products(rows: Tensor, matrix: Tensor, outs: Tensor) -> bool:
    """Whether :func:`row_products` (rows, matrix, outs) multiplies through NumPy (the module docstring's
    conditions; rows of ``rows`` and ``outs`` read and written in place)."""
    return uses_numpy(rows, matrix, outs) and _blas_matrix(matrix) and _rows_in_place(rows) and _rows_in_place(outs)


def row_products(rows: Tensor, matrix: Tensor, outs: Tensor) -> Callable[[int, int | None], Tensor | None]:
    """The function (l, k) -> rows[l] @ matrix, written into ``outs[k]``, or returned as a fresh tensor
    where k is None, with the choice of library made once for all rows (per product it would cost
    about a microsecond).

    ``rows`` (L, batch, width) and ``outs`` (L', batch, matrix columns) may be strided views whose rows
    BLAS reads in place (a unit last stride), as the engine's records are."""
    if numpy_products(rows, matrix, outs):
        row_arrays, matrix_array, out_arrays = list(rows.detach().numpy()), matrix.detach().numpy(), list(outs.detach().numpy())
        shape, dtype = (rows.shape[1], matrix.shape[1]), rows.dtype

        def numpy_product(l: int, k: int | None) -> Tensor | None:
            if k is not None:
                numpy.matmul(row_arrays[l], matrix_array, out_arrays[k])  # out by position: 50 ns less a call
                return None
            target = torch.empty(shape, dtype=dtype, device="cpu")
            numpy.matmul(row_arrays[l], matrix_array, out=target.detach().numpy())
            return target
        return numpy_product
    row_tensors, out_tensors = rows.unbind(0), outs.unbind(0)

    def torch_product(l: int, k: int | None) -> Tensor | None:
        if k is not None:
            torch.mm(row_tensors[l], matrix, out=out_tensors[k])
            return None
        return torch.mm(row_tensors[l], matrix)
    return torch_product


# CBLAS's enumerations (cblas.h).
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@functools.cache
def _gemm() -> dict[torch.dtype, Callable[..., None]] | None:
    """{float32: cblas_sgemm, float64: cblas_dgemm} of NumPy's OpenBLAS through ctypes, or None.

    NumPy's OpenBLAS is the loaded OpenBLAS (threadpoolctl's list) whose version is the one NumPy's
    build configuration names, None unless exactly one is. The symbols carry the prefix and suffix of
    the wheels' scipy-openblas builds or none, the same on the two gemms and on openblas_get_config,
    whose answer (the library's own build options) gives the integer width: 64-bit where it says
    USE64BITINT. Not NumPy's configuration, which may not know it: 32-bit integers passed to a 64-bit
    gemm leave the upper halves of lda, ldb and ldc undefined (x86-64: stack slots of 8 bytes), a
    read far out of bounds before any check could see a wrong product. Each function must then give
    small products of integer-valued matrices exactly (:func:`_gemm_exact`), in the two layouts of
    the matrix the engine uses."""
    controller = _openblas()
    if controller is None:
        return None
    version = _numpy_blas().get("version")
    paths = {lib.filepath for lib in controller.lib_controllers if version is not None and lib.version == version}
    if len(paths) != 1:
        return None
    try:
        library = ctypes.CDLL(paths.pop())
    except OSError:
        return None
    bases = ("openblas_get_config", "cblas_sgemm", "cblas_dgemm")
    named = next(([getattr(library, f"{prefix}{base}{suffix}") for base in bases]
                  for prefix in ("scipy_", "") for suffix in ("64_", "_64", "")
                  if all(hasattr(library, f"{prefix}{base}{suffix}") for base in bases)), None)
    if named is None:
        return None
    get_config, *gemms = named
    get_config.argtypes, get_config.restype = [], ctypes.c_char_p
    integer = ctypes.c_int64 if b"USE64BITINT" in (get_config() or b"").split() else ctypes.c_int
    functions = {}
    for dtype, scalar, function in zip(_DTYPES, (ctypes.c_float, ctypes.c_double), gemms, strict=True):
        function.argtypes = ([ctypes.c_int] * 3 + [integer] * 3
                             + [scalar, ctypes.c_void_p, integer, ctypes.c_void_p, integer, scalar, ctypes.c_void_p, integer])
        function.restype = None
        functions[dtype] = function
    return functions if all(_gemm_exact(function, dtype) for dtype, function in functions.items()) else None


def _gemm_exact(function: Callable[..., None], dtype: torch.dtype) -> bool:
    """Whether ``function`` adds rows @ matrix into strided outputs exactly, as :func:`row_products_added`
    calls it, on integer-valued operands (every sum exact in floating point), with the matrix stored
    either way."""
    generator = torch.Generator().manual_seed(0)
    # On the CPU whatever the default device (``torch.set_default_device``): BLAS reads these pointers.
    rows = torch.randint(-8, 9, (2, 3, 7), generator=generator, device="cpu").to(dtype)
    matrix = torch.randint(-8, 9, (7, 5), generator=generator, device="cpu").to(dtype)
    for stored in (matrix, matrix.T.contiguous().T):
        outs = torch.randint(-8, 9, (2, 3, 9), generator=generator, device="cpu").to(dtype)
        expected = outs.clone()
        expected[0, :, 2:7] += rows[1] @ matrix
        _GemmRows(function, rows, stored, outs[..., 2:7])(1, 0)
        if not torch.equal(outs, expected):
            return False
    return True


class _GemmRows:
    """(l, k) -> outs[k] += rows[l] @ matrix by a row-major gemm with beta = 1 on the tensors' memory,
    which it holds."""

    def __init__(self, function: Callable[..., None], rows: Tensor, matrix: Tensor, outs: Tensor) -> None:
        self.function, self.tensors = function, (rows, matrix, outs)
        self.count, self.out_count = rows.shape[0], outs.shape[0]
        # Row-major as stored where its rows are (unit column stride, row stride >= N), else the transpose
        # of its column-major storage (unit row stride, column stride >= K: _blas_matrix holds one of
        # the two). Strides (1, 1) of a (1, N) matrix are only the second: read as rows, ldb = 1 < N.
        layout, leading = (_NO_TRANS, matrix.stride(0)) if _rows_in_place(matrix) else (_TRANS, matrix.stride(1))
        size = rows.element_size()
        self.addresses = tuple(t.data_ptr() for t in self.tensors)
        self.rows, self.outs = (self.addresses[0], rows.stride(0) * size), (self.addresses[2], outs.stride(0) * size)
        # The arguments but the two row addresses as instances of their ctypes types, made once: ctypes
        # converts a Python number on every call, a good part of a call's cost at the engine's sizes.
        types = function.argtypes
        self.head = [kind(value) for kind, value in zip(types[:7], (_ROW_MAJOR, _NO_TRANS, layout, rows.shape[1],
                                                                   matrix.shape[1], rows.shape[2], 1.0))]
        self.middle = [kind(value) for kind, value in zip(types[8:12], (rows.stride(1), self.addresses[1], leading, 1.0))]
        self.tail = types[13](outs.stride(1))

    def __call__(self, l: int, k: int) -> None:
        # The addresses are computed from the indices: out of range they would be another tensor's memory.
        if not (0 <= l < self.count and 0 <= k < self.out_count):
            raise IndexError(f"row {l} of {self.count} into row {k} of {self.out_count}")
        # Holding the tensors keeps their memory, but a storage resized since (freed, or grown and so
        # moved) would leave the addresses pointing at memory no longer theirs.
        rows, matrix, outs = self.tensors
        if (rows.data_ptr(), matrix.data_ptr(), outs.data_ptr()) != self.addresses:
            raise RuntimeError("the memory of the rows, matrix or outputs moved since row_products_added was called")
        (row_pointer, row_step), (out_pointer, out_step) = self.rows, self.outs
        self.function(*self.head, row_pointer + l * row_step, *self.middle, out_pointer + k * out_step, self.tail)


def row_products_added(rows: Tensor, matrix: Tensor, outs: Tensor) -> Callable[[int, int], None]:
    """The function (l, k) -> outs[k] += rows[l] @ matrix (in place), with the library chosen once for all rows.

    Shapes as for :func:`row_products` (``rows`` (L, batch, width), ``outs`` (L', batch, matrix
    columns), rows with a unit last stride); outs[k] must not overlap rows[l]. Through NumPy's
    OpenBLAS (:func:`_gemm`) where :func:`mm` would take NumPy, else torch's addmm_."""
    tensors = (rows, matrix, outs)
    gemm = _gemm() if uses_numpy(*tensors) else None
    if (gemm is not None and rows.dtype in gemm and rows.ndim == 3 and outs.ndim == 3 and matrix.ndim == 2
            and rows.shape[1] == outs.shape[1] and rows.shape[2] == matrix.shape[0] and matrix.shape[1] == outs.shape[2]
            and min(*rows.shape[1:], matrix.shape[1]) > 0 and _blas_matrix(matrix)
            and _rows_in_place(rows) and _rows_in_place(outs)):
        return _GemmRows(gemm[rows.dtype], rows, matrix, outs)
    row_tensors, out_tensors = rows.unbind(0), outs.unbind(0)

    def torch_product(l: int, k: int) -> None:
        out_tensors[k].addmm_(row_tensors[l], matrix)
    return torch_product
