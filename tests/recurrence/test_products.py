"""The engine's plain products through NumPy's OpenBLAS: the same products as torch's, taken only where
nothing but the numbers is at stake, with OpenBLAS held to one thread while the engine uses it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_info

from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.recurrence import products
from lrnn_analysis.recurrence.products import mm, one_blas_thread, row_products, row_products_added

pytestmark = pytest.mark.skipif(products._openblas() is None, reason="NumPy's BLAS is not OpenBLAS here")


@pytest.fixture
def numpy_calls(counted):
    """The calls of NumPy's matmul, counted."""
    return counted(products.numpy, "matmul")


def _draw(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_in_every_layout_the_engine_uses_go_through_numpy_and_equal_torchs(one_thread, numpy_calls, dtype):
    tolerance = 1e-5 if dtype == torch.float32 else 1e-13
    a, b = _draw(40, 24, dtype=dtype), _draw(24, 16, dtype=dtype, seed=1)
    records = _draw(40, 32, dtype=dtype, seed=2)
    strided = torch.zeros(24, 32, dtype=dtype)
    cases = [
        (a, b, None),                             # plain
        (a.T.contiguous().T, b, None),            # a column-major operand
        (records[:, 16:].T, records[:, :16], None),  # the weight gradients' Y^T X on record columns
    ]
    for x, y, out in cases:
        expected = torch.mm(x, y)
        assert torch.allclose(mm(x, y, out=out), expected, rtol=tolerance, atol=tolerance)
    out = strided[:, 8:24]                        # an output whose rows are strided (the engine's G columns)
    mm(records[:24, :24], b, out=out)
    assert torch.allclose(out, torch.mm(records[:24, :24], b), rtol=tolerance, atol=tolerance)
    assert (strided[:, :8] == 0).all() and (strided[:, 24:] == 0).all()
    assert len(numpy_calls) == len(cases) + 1


def test_anything_autograd_or_the_thread_count_has_a_stake_in_goes_through_torch(monkeypatch, one_thread):
    import torch.autograd.forward_ad as forward_ad

    monkeypatch.setattr(products.numpy, "matmul", lambda *a, **k: pytest.fail("NumPy used"))
    a, b = _draw(8, 6), _draw(6, 5, seed=1)
    leaf = a.clone().requires_grad_()
    assert mm(leaf, b).grad_fn is not None                                  # a graph to record
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(mm(forward_ad.make_dual(a, torch.ones_like(a)), b)).tangent
    assert torch.allclose(tangent, torch.ones_like(a) @ b)                 # a forward-mode tangent
    for x, y in ((a.to(torch.bfloat16), b.to(torch.bfloat16)), (a, b.double()), (a[:, ::2], b[::2])):
        if x.dtype == y.dtype:
            assert torch.equal(mm(x, y), torch.mm(x, y))                   # another dtype; strides BLAS cannot read
    assert torch.equal(torch.func.vmap(lambda v: mm(v[None], b))(a), torch.func.vmap(lambda v: v[None] @ b)(a))
    torch.set_num_threads(2)
    assert torch.equal(mm(a, b), torch.mm(a, b))                           # several threads


@pytest.mark.parametrize("numpy_path", [True, False])
def test_row_products_write_each_row_or_a_fresh_tensor(monkeypatch, one_thread, numpy_calls, numpy_path):
    if not numpy_path:
        monkeypatch.setattr(products, "_openblas", lambda: None)
    X = _draw(5, 4, 12)                                    # records [g | q] of 5 steps, batch 4
    matrix = _draw(12, 6, seed=1)
    # As the engine's adjoint sweep: row l's product goes into the g-slot of row l - 1, the operand of
    # the next product, and row 0's into a fresh tensor.
    expected = X.clone()
    for l in (4, 3, 2, 1):
        expected[l - 1, :, :6] = expected[l] @ matrix
    product = row_products(X, matrix, X[..., :6])
    for l in (4, 3, 2, 1):
        assert product(l, l - 1) is None
    fresh = product(0, None)
    assert len(numpy_calls) == (5 if numpy_path else 0)
    assert torch.allclose(X, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fresh, expected[0] @ matrix, rtol=1e-5, atol=1e-5)


def _openblas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpool_info() if info["internal_api"] == "openblas"]


def test_openblas_runs_one_thread_within_the_engine_passes_and_is_restored(one_thread):
    before = _openblas_threads()
    with one_blas_thread():
        assert set(_openblas_threads()) == {1}
    assert _openblas_threads() == before


@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_engine_gradients_and_hessian_products_agree_with_one_thread_and_two(memory, one_thread):
    """One thread runs the plain products through NumPy, two through torch: the same numbers in float64."""
    model = build_model(ModelConfig("lipschitz", 2, 6, 3, eps=0.3, init_std=2.0), seed=4).double()
    model.engine_memory = memory
    x = _draw(3, 9, 2, dtype=torch.float64, seed=5)
    params = list(model.parameters())
    direction = [_draw(*p.shape, dtype=torch.float64, seed=6 + i) for i, p in enumerate(params)]
    results = []
    for count in (1, 2):
        torch.set_num_threads(count)
        grads = torch.autograd.grad(torch.sin(model(x)).sum(), params, create_graph=True)
        products_ = torch.autograd.grad(grads, params, direction)
        results.append([t.detach() for t in (*grads, *products_)])
    for one, two in zip(*results):
        assert torch.allclose(one, two, rtol=1e-12, atol=1e-13)


def test_overflow_gives_inf_as_torch_does_without_a_warning(one_thread, numpy_calls):
    import warnings

    a, b = torch.full((4, 4), 3e38), torch.full((4, 4), 3e38)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with one_blas_thread():
            out = mm(a, b)
    assert numpy_calls == [1] and torch.equal(out, torch.mm(a, b)) and torch.isinf(out).all()


def test_a_traced_product_is_torchs_so_the_trace_replays_it(one_thread):
    a, b = _draw(6, 5), _draw(5, 4, seed=1)

    def product(x, y):
        with one_blas_thread():
            return mm(x, y) + 0

    traced = torch.jit.trace(product, (a, b))
    c, d = _draw(6, 5, seed=2), _draw(5, 4, seed=3)
    assert torch.allclose(traced(c, d), c @ d, rtol=1e-6, atol=1e-6)


def test_a_numpy_built_on_another_blas_keeps_torchs_products(monkeypatch):
    """An OpenBLAS that SciPy loaded beside an MKL NumPy is not NumPy's: its thread limit would not hold."""
    monkeypatch.setattr(products.numpy.__config__, "CONFIG", {"Build Dependencies": {"blas": {"name": "mkl-sdl"}}})
    products._openblas.cache_clear()
    try:
        assert products._openblas() is None and not products.uses_numpy(torch.ones(2, 2))
    finally:
        products._openblas.cache_clear()


def _calling_first(before, function, argtypes=None):
    """``function`` (None: nothing) called after ``before``, with its argument types, which the gemm's callers read."""
    def call(*args):
        before()
        if function is not None:
            function(*args)
    call.argtypes = function.argtypes if argtypes is None else argtypes
    return call


@pytest.fixture
def gemm_calls(monkeypatch):
    """The calls of NumPy's OpenBLAS gemm made by row_products_added, counted; skips where that gemm is not found."""
    functions = products._gemm()
    if functions is None:
        pytest.skip("NumPy's OpenBLAS gemm is not found here")
    calls: list[int] = []

    def counting(function):
        return _calling_first(lambda: calls.append(1), function)
    monkeypatch.setattr(products, "_gemm", lambda: {dtype: counting(f) for dtype, f in functions.items()})
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_products_added_row_by_row_equal_torchs_addmm(one_thread, gemm_calls, dtype, transposed):
    """As the sweeps call it: the forward's and the tangent's products into their own row of a buffer
    (the matrix a transposed view), the second-order adjoint's into the strided g-slot of the row before."""
    tolerance = 1e-5 if dtype == torch.float32 else 1e-13
    rows = _draw(5, 4, 12, dtype=dtype)
    matrix = _draw(6, 12, dtype=dtype, seed=1).T if transposed else _draw(12, 6, dtype=dtype, seed=1)
    buffer = _draw(5, 4, 10, dtype=dtype, seed=2)
    outs = buffer[..., 2:8]
    expected = buffer.clone()
    add_product = row_products_added(rows, matrix, outs)
    for l, k in ((0, 0), (4, 3), (2, 2)):
        expected[k, :, 2:8] += rows[l] @ matrix
        add_product(l, k)
    assert len(gemm_calls) == 3
    assert torch.allclose(buffer, expected, rtol=tolerance, atol=tolerance)
    assert torch.equal(buffer[..., :2], expected[..., :2]) and torch.equal(buffer[..., 8:], expected[..., 8:])


def test_products_added_go_through_torch_where_numpy_is_not_taken(monkeypatch, one_thread, gemm_calls):
    rows, matrix = _draw(3, 4, 5), _draw(5, 6, seed=1)

    def check(rows, matrix):
        outs, expected = _draw(3, 4, 6, dtype=rows.dtype, seed=2), _draw(3, 4, 6, dtype=rows.dtype, seed=2)
        row_products_added(rows, matrix, outs)(2, 1)
        expected[1].addmm_(rows[2], matrix)
        assert torch.equal(outs, expected)

    check(rows.to(torch.bfloat16), matrix.to(torch.bfloat16))  # another dtype
    check(rows.transpose(1, 2).contiguous().transpose(1, 2), matrix)  # rows stored column-major
    torch.set_num_threads(2)
    check(rows, matrix)                             # several threads
    torch.set_num_threads(1)
    monkeypatch.setattr(products, "_gemm", lambda: None)
    check(rows, matrix)                             # no gemm found
    assert gemm_calls == []


def test_a_row_out_of_range_raises_and_writes_nothing(one_thread, gemm_calls):
    rows, matrix, outs = _draw(3, 4, 5), _draw(5, 6, seed=1), torch.zeros(2, 4, 6)
    add_product = row_products_added(rows, matrix, outs)
    for l, k in ((3, 0), (0, 2), (-1, 0)):
        with pytest.raises(IndexError):
            add_product(l, k)
    assert gemm_calls == [] and (outs == 0).all()


def test_a_gemm_is_taken_only_if_it_gives_exact_products(monkeypatch):
    """The check on integer-valued products rejects a function that computes anything else, and no
    gemm is taken where NumPy's configuration names no loaded library."""
    functions = products._gemm()
    if functions is None:
        pytest.skip("NumPy's OpenBLAS gemm is not found here")
    for dtype, function in functions.items():
        assert products._gemm_exact(function, dtype)
        assert not products._gemm_exact(_calling_first(lambda: None, None, function.argtypes), dtype)
    config = products.numpy.__config__.CONFIG
    blas = dict(config["Build Dependencies"]["blas"], version="0.0.0")
    monkeypatch.setattr(products.numpy.__config__, "CONFIG", {**config, "Build Dependencies": {"blas": blas}})
    products._gemm.cache_clear()
    try:
        assert products._gemm() is None
    finally:
        products._gemm.cache_clear()


def _states_gradients_and_products(model, x):
    """The model's states without a graph, the gradients of sum(sin(states)) and one Hessian-vector
    product in a seeded direction, detached."""
    params = list(model.parameters())
    direction = [_draw(*p.shape, dtype=x.dtype, seed=6 + i) for i, p in enumerate(params)]
    with torch.no_grad():
        states = model(x)
    grads = torch.autograd.grad(torch.sin(model(x)).sum(), params, create_graph=True)
    return [t.detach() for t in (states, *grads, *torch.autograd.grad(grads, params, direction))]


@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_engine_through_the_gemm_equals_it_through_addmm_and_holds_openblas_to_one_thread(monkeypatch, one_thread,
                                                                                           gemm_calls, memory):
    """The tangent's and second-order adjoint's step products (the forward's are plain products here, A
    being given), in float64; each gemm call made with OpenBLAS at one thread."""
    model = build_model(ModelConfig("lipschitz", 2, 6, 3, eps=0.3, init_std=2.0), seed=4).double()
    model.engine_memory = memory
    x = _draw(3, 9, 2, dtype=torch.float64, seed=5)
    threads: list[list[int]] = []
    counting = products._gemm()

    def watched(function):
        return _calling_first(lambda: threads.append(_openblas_threads()), function)
    monkeypatch.setattr(products, "_gemm", lambda: {dtype: watched(f) for dtype, f in counting.items()})
    through_gemm = _states_gradients_and_products(model, x)
    calls = len(gemm_calls)
    monkeypatch.setattr(products, "_gemm", lambda: None)
    through_addmm = _states_gradients_and_products(model, x)
    assert calls >= 9 + 8 and len(gemm_calls) == calls    # tangent, second order (its last row by addmm)
    assert threads and all(set(t) == {1} for t in threads)
    for a, b in zip(through_gemm, through_addmm, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


def test_the_gemm_of_numpys_wheels_is_found():
    """NumPy's wheels ship scipy-openblas: there the gemm must be found and pass its check, or the step
    products would fall back to torch without a word."""
    if products._numpy_blas().get("name") != "scipy-openblas":
        pytest.skip("NumPy here is not built on the wheels' scipy-openblas")
    assert products._gemm() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_matrix_of_one_row_with_both_strides_one_is_multiplied_not_refused(one_thread, gemm_calls, dtype):
    """A (1, N) matrix transposed from an (N, 1) column has strides (1, 1): BLAS reads it in place only
    as the transpose of an N x 1 matrix (leading dimension 1 < N refused by gemm, which then writes nothing)."""
    rows, matrix = _draw(3, 4, 1, dtype=dtype), _draw(5, 1, dtype=dtype, seed=1).T
    outs = _draw(3, 4, 5, dtype=dtype, seed=2)
    expected = outs.clone()
    expected[1].addmm_(rows[2], matrix)
    row_products_added(rows, matrix, outs)(2, 1)
    assert gemm_calls == [1] and torch.allclose(outs, expected, rtol=1e-6, atol=1e-6)


def test_the_engine_at_hidden_size_one_through_the_gemm_equals_it_through_addmm(monkeypatch, one_thread, gemm_calls):
    """The field's forward matrix [A; W]^T of a one-unit state is such a matrix: forward, gradients and
    Hessian-vector products in float64."""
    model = build_model(ModelConfig("lipschitz", 2, 1, 3, eps=0.3, init_std=2.0), seed=4).double()
    x = _draw(3, 9, 2, dtype=torch.float64, seed=5)
    through_gemm = _states_gradients_and_products(model, x)
    assert gemm_calls
    monkeypatch.setattr(products, "_gemm", lambda: None)
    for a, b in zip(through_gemm, _states_gradients_and_products(model, x), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


def test_the_gemms_integer_width_is_the_one_its_library_reports(monkeypatch):
    """An ILP64 OpenBLAS with plain symbol names (as some Linux distributions build it) under a NumPy whose
    configuration does not say USE64BITINT: 32-bit integers would leave the upper halves of the 64-bit
    stack slots of lda, ldb and ldc undefined (x86-64 System V), reads far out of bounds before any check
    could see a wrong product. The width must be the library's own (its openblas_get_config)."""
    if products._gemm() is None:
        pytest.skip("NumPy's OpenBLAS gemm is not found here")
    real = products.ctypes.CDLL
    checked: list[list[type]] = []

    def plain_names(path, **options):
        library = real(path, **options)
        found = {}
        for name in ("openblas_get_config", "cblas_sgemm", "cblas_dgemm"):
            symbol = next(getattr(library, f"{p}{name}{s}") for p in ("scipy_", "") for s in ("64_", "_64", "")
                          if hasattr(library, f"{p}{name}{s}"))
            found[name] = products.ctypes.CFUNCTYPE(None)(products.ctypes.cast(symbol, products.ctypes.c_void_p).value)
        return type("PlainNames", (), found)()

    config = products.numpy.__config__.CONFIG
    blas = dict(config["Build Dependencies"]["blas"])
    if "USE64BITINT" not in str(blas.get("openblas configuration", "")):
        pytest.skip("NumPy's OpenBLAS here is not ILP64")
    blas["openblas configuration"] = "unknown"
    monkeypatch.setattr(products.numpy.__config__, "CONFIG", {**config, "Build Dependencies": {"blas": blas}})
    monkeypatch.setattr(products.ctypes, "CDLL", plain_names)
    monkeypatch.setattr(products, "_gemm_exact", lambda function, dtype: checked.append(function.argtypes) or True)
    products._gemm.cache_clear()
    try:
        assert products._gemm() is not None
    finally:
        products._gemm.cache_clear()
    assert len(checked) == 2 and all(argtypes[3:6] == [products.ctypes.c_int64] * 3 for argtypes in checked)


def test_engine_passes_overlapping_in_two_threads_hold_openblas_to_one_thread_and_restore_it(one_thread):
    """Thread a enters, thread b enters, a leaves while b still computes, then b leaves: OpenBLAS must stay
    at one thread until b leaves and come back to the count before a entered (a limit per block restores,
    at a's exit, the count while b computes, and at b's exit the one thread a had set)."""
    import threading

    with products._openblas().limit(limits=2):
        before = _openblas_threads()
        if set(before) != {2}:
            pytest.skip("OpenBLAS cannot run two threads here")
        a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
        seen: list[list[int]] = []

        def a():
            with one_blas_thread():
                a_inside.set()
                b_inside.wait(10)
            a_left.set()

        def b():
            a_inside.wait(10)
            with one_blas_thread():
                b_inside.set()
                a_left.wait(10)
                seen.append(_openblas_threads())

        workers = [threading.Thread(target=a), threading.Thread(target=b)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(20)
        after = _openblas_threads()
    assert a_left.is_set() and seen and set(seen[0]) == {1}
    assert after == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_added_equal_addmm_for_every_layout_and_size_one_dimensions(one_thread, gemm_calls, dtype):
    """Rows every other one and offset into padded storage, with the leading axis permuted or expanded;
    the matrix stored either way, padded or not; outputs strided on both axes; M, K and N of 1 included."""
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    generator = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)
    cases = 0
    for M, K, N in ((1, 1, 1), (1, 3, 1), (3, 1, 4), (1, 1, 5), (4, 5, 1), (5, 7, 3)):
        rows_layouts = (draw(6, M, K), draw(13, M, K + 2)[1::2, :, 1:K + 1], draw(M, 6, K).transpose(0, 1),
                        draw(1, M, K).expand(6, M, K))
        matrices = (draw(K, N), draw(N, K).T, draw(K, N + 3)[:, 1:N + 1], draw(N, K + 2)[:, :K].T)
        for rows in rows_layouts:
            for matrix in matrices:
                buffer = draw(7, M, N + 4)
                expected = buffer.clone()
                add_product = row_products_added(rows, matrix, buffer[::2, :, 2:N + 2])
                for l, k in ((0, 0), (5, 3), (2, 1)):
                    add_product(l, k)
                    expected[2 * k, :, 2:N + 2] += rows[l] @ matrix
                assert torch.allclose(buffer, expected, rtol=tolerance, atol=tolerance), (M, K, N, rows.stride(), matrix.stride())
                cases += 1
    assert len(gemm_calls) == 3 * cases


@pytest.mark.parametrize("moved", ["rows", "matrix", "outs"])
def test_memory_freed_or_moved_after_the_function_was_made_raises_before_the_gemm(one_thread, gemm_calls, moved):
    """The gemm reads and writes raw addresses taken when the function was made: a storage freed (resized to
    nothing, as FSDP frees its parameters) or grown (moved) since must be refused, not read or written."""
    for resize in (0, 4096):
        rows, matrix, outs = _draw(3, 4, 5), _draw(5, 6, seed=1), torch.zeros(2, 4, 6)
        add_product = row_products_added(rows, matrix, outs)
        {"rows": rows, "matrix": matrix, "outs": outs}[moved].untyped_storage().resize_(resize)
        with pytest.raises(RuntimeError, match="moved"):
            add_product(1, 0)
    assert gemm_calls == []


def test_a_mode_observing_torchs_operations_sees_all_of_the_engines(one_thread):
    """FlopCounterMode counts the same FLOPs of a forward+backward and a Hessian-vector product with one
    thread (where NumPy would compute unseen) as with two."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(ModelConfig("lipschitz", 2, 16, 3, eps=0.3), seed=4)
    x = _draw(8, 40, 2, seed=5)
    params = list(model.parameters())
    counts = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with FlopCounterMode(display=False) as counter:
            grads = torch.autograd.grad(torch.sin(model(x)).sum(), params, create_graph=True)
            torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params])
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_the_default_device_leaves_numpy_to_the_engine_and_another_function_mode_does_not(one_thread, numpy_calls):
    class Watching(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    a, b = _draw(8, 6), _draw(6, 5, seed=1)
    with torch.device("cpu"):
        mm(a, b)
    assert numpy_calls == [1]
    with Watching():
        assert torch.equal(mm(a, b), torch.mm(a, b))
    assert numpy_calls == [1]


_DEFAULT_DEVICE_SCRIPT = """
import torch
from lrnn_analysis.recurrence import build_scheme, field, lure_recurrence
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
u, A, W = (torch.randn(*s, generator=g).requires_grad_() for s in ((3, 64, 64), (64, 64), (64, 64)))
p = torch.randn(64, 64, generator=g)
with torch.device("meta"):  # as torch.set_default_device("cuda") with CPU tensors: allocations go elsewhere
    for method in ("euler", "rk4"):
        out = lure_recurrence(u, A, W, scheme=build_scheme(method, 0.1), keep_states=True)
        grads = torch.autograd.grad(out.sin().sum(), [u, A, W], create_graph=True)
        torch.autograd.grad(grads, [u, A, W], [torch.ones_like(t, device="cpu") for t in (u, A, W)])
        assert out.device.type == "cpu"
    assert field.tanh(p).device.type == "cpu" and field.tanh_float32(p).device.type == "cpu"
print("ok")
"""


def test_the_numpy_paths_allocate_on_the_cpu_under_another_default_device():
    """The default device's mode leaves NumPy to the engine (``products._observed``), so every tensor
    a NumPy path allocates must be on the CPU whatever the default device: a CUDA or meta one had
    NumPy refuse it (field.tanh, tanh_float32) or handed OpenBLAS a pointer it cannot read
    (``_gemm_exact``'s probe on its first call: a segmentation fault). In a fresh process, where
    ``_gemm`` has not been probed yet."""
    repository = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _DEFAULT_DEVICE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])
