"""The engine's tanh: as accurate as torch.tanh on the machine that runs the tests, in every case.

NumPy computes it only with one intra-op thread; the tests that measure that path set one."""
from __future__ import annotations

import math
import warnings
from decimal import Decimal, localcontext

import numpy
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lrnn_analysis.recurrence import field
from lrnn_analysis.recurrence.field import tanh


@pytest.fixture
def numpy_calls(counted):
    """The calls of NumPy's tanh, counted."""
    return counted(field.numpy, "tanh")


def _exact_tanh(x: float) -> float:
    """tanh(x) to 50 digits (Decimal), rounded to float64."""
    with localcontext() as context:
        context.prec = 60
        d = Decimal(x)
        if abs(d) < Decimal("1e-6"):
            return float(d - d ** 3 / 3 + 2 * d ** 5 / 15)
        e = (2 * d).exp()
        return float((e - 1) / (e + 1))


def _sample(count: int, seed: int) -> numpy.ndarray:
    """Magnitudes log-uniform from 1e-40 to 20 (subnormal float32 to saturation), both signs."""
    rng = numpy.random.default_rng(seed)
    return rng.choice([-1.0, 1.0], count) * 10.0 ** rng.uniform(-40, math.log10(20), count)


def _ulps(actual: numpy.ndarray, exact: numpy.ndarray, dtype: type) -> float:
    """Largest |actual - exact| in units in the last place of exact rounded to ``dtype``."""
    unit = numpy.spacing(numpy.abs(exact.astype(dtype))).astype(numpy.float64)
    return float(numpy.max(numpy.abs(actual.astype(numpy.float64) - exact) / unit))


def test_float32_tanh_is_rounded_from_float64_within_half_a_unit_in_the_last_place(one_thread, numpy_calls):
    x = numpy.concatenate([_sample(200_000, 1), numpy.linspace(-12, 12, 100_001)]).astype(numpy.float32)
    # float64 tanh (within 1 unit of float64's last place) as the truth at float32's precision.
    exact = torch.tanh(torch.from_numpy(x).double()).numpy()
    ours = tanh(torch.from_numpy(x)).numpy()
    reference = torch.tanh(torch.from_numpy(x)).numpy()
    assert numpy_calls == [1]
    assert _ulps(ours, exact, numpy.float32) <= 0.5 + 1e-6
    assert _ulps(ours, exact, numpy.float32) <= _ulps(reference, exact, numpy.float32) + 1e-6


def _error_in_ulps(actual: numpy.ndarray, x: numpy.ndarray) -> float:
    """Largest |actual - tanh(x)| in units in the last place of float64, tanh(x) to 60 digits (not
    rounded to float64 first: that would hide errors between 1 and 1.5 units)."""
    worst = Decimal(0)
    with localcontext() as context:
        context.prec = 60
        for value, v in zip(actual, x):
            d = Decimal(float(v))
            e = (2 * d).exp()
            exact = (e - 1) / (e + 1)
            worst = max(worst, abs(Decimal(float(value)) - exact) / Decimal(float(numpy.spacing(abs(float(exact))))))
    return float(worst)


def test_float64_tanh_is_within_one_unit_in_the_last_place_of_the_exact_value(one_thread):
    """Densely where |p| is about 1/2 too: NumPy's float64 tanh was 1.17 units from tanh there (in 1
    of 330 samples on this project's AVX-512 CPU), torch.tanh 0.76; the engine's float64 is torch's."""
    rng = numpy.random.default_rng(2)
    x = numpy.concatenate([_sample(2000, 2), rng.choice([-1.0, 1.0], 20_000) * rng.uniform(0.3, 0.7, 20_000)])
    x = x[numpy.abs(x) > 1e-6]
    assert _error_in_ulps(tanh(torch.from_numpy(x)).numpy(), x) <= 1.0


def test_special_values_and_signed_zero_match_torch(one_thread, numpy_calls):
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 20.0, -20.0, 400.0])
    x = specials.repeat(500)
    ours, reference = tanh(x), torch.tanh(x)
    assert numpy_calls == [1]
    assert torch.equal(ours.isnan(), reference.isnan())
    finite = ~reference.isnan()
    assert torch.equal(ours[finite], reference[finite])
    assert torch.equal(ours.signbit(), reference.signbit())


def test_strided_input_into_a_row_of_a_buffer_uses_numpy_and_leaves_the_rest_alone(one_thread, numpy_calls):
    z = torch.randn(64, 100, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    p = z[:, 36:]
    buffer = torch.full((3, 64, 64), 7.0)
    tanh(p, out=buffer[1])
    assert numpy_calls == [1]
    assert torch.allclose(buffer[1], torch.tanh(p), rtol=0, atol=1e-7)
    assert (buffer[0] == 7).all() and (buffer[2] == 7).all()


def test_a_recorded_graph_or_another_dtype_goes_through_torch(monkeypatch, one_thread):
    monkeypatch.setattr(field.numpy, "tanh", lambda *a, **k: pytest.fail("NumPy used"))
    p = torch.randn(64, 64, dtype=torch.float64, requires_grad=True)
    s = tanh(p)
    (gradient,) = torch.autograd.grad(s.sum(), p)
    assert torch.allclose(gradient, 1 - torch.tanh(p.detach()) ** 2)
    for other in (torch.bfloat16, torch.float64):
        q = torch.randn(64, 64).to(other)
        assert torch.equal(tanh(q), torch.tanh(q))


def test_several_threads_or_a_small_tensor_go_through_torch(monkeypatch, one_thread):
    monkeypatch.setattr(field.numpy, "tanh", lambda *a, **k: pytest.fail("NumPy used"))
    small = torch.randn(32, 32)
    assert torch.equal(tanh(small), torch.tanh(small))
    torch.set_num_threads(2)
    p = torch.randn(64, 64)
    assert torch.equal(tanh(p), torch.tanh(p))


def test_a_forward_mode_dual_goes_through_torch_and_keeps_its_tangent(one_thread, numpy_calls):
    import torch.autograd.forward_ad as forward_ad

    generator = torch.Generator().manual_seed(7)
    p, direction = torch.randn(64, 64, generator=generator), torch.randn(64, 64, generator=generator)
    with forward_ad.dual_level():
        s, tangent = forward_ad.unpack_dual(tanh(forward_ad.make_dual(p, direction)))
    assert numpy_calls == []
    # torch.tanh's own tangent, exactly (recomputing (1 - s^2) v apart differs in float32 where |p| is a few units).
    expected_s, expected_tangent = torch.func.jvp(torch.tanh, (p,), (direction,))
    assert torch.equal(s, expected_s) and torch.equal(tangent, expected_tangent)


@pytest.mark.parametrize("with_a", [True, False])
def test_tangent_terms_in_place_are_the_padded_sum(with_a):
    """u_dot (one row block per input step, broadcast over the stages) added by a function into the
    product's p columns gives the numbers of [0 | u_dot] + product, and writes into nothing else."""
    generator = torch.Generator().manual_seed(5)
    n, steps, stages, batch = 4, 3, 2, 5
    A, W = (torch.randn(n, n, generator=generator, dtype=torch.float64) for _ in range(2))
    lure = field.LureField(A if with_a else None, W, None)
    Y = torch.randn(steps, stages, batch, n, generator=generator, dtype=torch.float64)
    direction = {name: torch.randn(n, n, generator=generator, dtype=torch.float64) for name in ("A", "W")}
    u_dot = torch.randn(steps, 1, batch, n, generator=generator, dtype=torch.float64)
    kept = [t.clone() for t in (Y, u_dot, *direction.values())]
    seen = []
    in_place, _ = lure.tangent_terms(Y, None, direction, lambda p: seen.append(p.shape) or p.add_(u_dot))
    padded, _ = lure.tangent_terms(Y, None, direction, u_dot)
    assert seen == [(steps, stages, batch, n)]
    assert torch.equal(in_place, padded)
    assert all(torch.equal(a, b) for a, b in zip(kept, (Y, u_dot, *direction.values())))


def test_an_out_whose_elements_share_memory_is_refused_as_torch_refuses_it(one_thread, numpy_calls):
    """NumPy wrote every column of p into the one column behind an expanded ``out`` (the last one
    stayed, silently); torch.tanh refuses such an out."""
    p = torch.randn(64, 64)
    with pytest.raises(RuntimeError, match="single memory location"):
        tanh(p, out=torch.zeros(64, 1).expand(64, 64))
    assert numpy_calls == []


def test_tanh_rows_decides_once_and_writes_each_row_as_tanh_does(one_thread, numpy_calls):
    generator = torch.Generator().manual_seed(6)
    z = torch.randn(5, 64, 128, generator=generator)
    p, out = z[..., 64:], torch.full((5, 64, 64), 7.0)
    row, numpy_rows = field.tanh_rows(p, out, torch.randn(3, 3))
    assert numpy_rows
    for l in (0, 3):
        row(l)
    assert len(numpy_calls) == 2
    for l in (0, 3):
        assert torch.equal(out[l], tanh(p[l]))
    assert (out[1] == 7).all() and (out[2] == 7).all() and (out[4] == 7).all()


def test_tanh_rows_of_a_loop_over_a_dual_or_with_several_threads_use_torch(monkeypatch, one_thread):
    """A source with a forward-mode tangent would make the rows duals once the loop writes them
    (the rows themselves are plain when the choice is made)."""
    import torch.autograd.forward_ad as forward_ad

    monkeypatch.setattr(field.numpy, "tanh", lambda *a, **k: pytest.fail("NumPy used"))
    p, out = torch.randn(2, 64, 64), torch.empty(2, 64, 64)
    with forward_ad.dual_level():
        row, numpy_rows = field.tanh_rows(p, out, forward_ad.make_dual(torch.randn(4), torch.randn(4)), float32_tanh=True)
        row(1)
    assert torch.equal(out[1], torch.tanh(p[1])) and not numpy_rows
    torch.set_num_threads(2)
    row, numpy_rows = field.tanh_rows(p, out, float32_tanh=True)
    row(0)
    assert torch.equal(out[0], torch.tanh(p[0])) and not numpy_rows


@pytest.mark.parametrize("tracer", ["compile", "jit.trace"])
@pytest.mark.parametrize("method", ["euler", "rk2"])
def test_a_traced_engine_uses_torch_tanh(monkeypatch, one_thread, numpy_calls, method, tracer):
    """A traced graph never sees NumPy's writes into a tensor's memory: under torch.compile (aot_eager, the
    tracing of every backend) and replayed from torch.jit.trace, the engine's float32 states came back as
    uninitialised memory (nan, 1e32) with one thread. The trace takes torch.tanh; the states are those
    of the engine with NumPy's tanh turned off."""
    from lrnn_analysis.recurrence import build_scheme, lure_recurrence

    generator = torch.Generator().manual_seed(4)
    u = torch.randn(3, 64, 64, generator=generator)
    A, W = (0.1 * torch.randn(64, 64, generator=generator) for _ in range(2))

    def run(u, A, W):
        return lure_recurrence(u, A, W, scheme=build_scheme(method, 0.3), keep_states=True)

    if tracer == "compile":
        torch._dynamo.reset()
        traced = torch.compile(run, backend="aot_eager")(u, A, W)
        torch._dynamo.reset()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace is deprecated, and still there
            traced = torch.jit.trace(run, (torch.zeros_like(u), A, W), check_trace=False)(u, A, W)
    calls = len(numpy_calls)
    monkeypatch.setattr(field, "_NUMPY_TANH_MIN_ELEMENTS", math.inf)
    torch.testing.assert_close(traced, run(u, A, W))
    assert calls == 0


class _CudaScalarRule(TorchDispatchMode):
    """CUDA's rule for CPU scalars in addcmul, checked on the CPU: a 0-dim tensor made from Python data
    (torch.tensor, torch.scalar_tensor: on the CPU whatever the operands' device) may be its ``tensor2``
    only; as ``self`` or ``tensor1`` CUDA raises. Records the offending calls (forward and backward: a
    dispatch mode reaches the autograd engine's calls too)."""

    def __init__(self):
        super().__init__()
        self.cpu_scalars, self.refused = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("lift_fresh", "lift_fresh_copy", "scalar_tensor") and result.ndim == 0:
            self.cpu_scalars.append(result)
        if name in ("addcmul", "addcmul_", "addcdiv", "addcdiv_"):
            if any(any(t is s for s in self.cpu_scalars) for t in args[:2]):
                self.refused.append(name)
        return result


@pytest.mark.parametrize("method,with_a,with_b", [("euler", True, False), ("rk4", True, False), ("map", False, True)])
def test_the_engine_passes_no_cpu_scalar_where_cuda_refuses_one(method, with_a, with_b):
    """Every backward and Hessian-vector product of the engine forms D = beta (1 - s^2) and R = -2 s q p_dot
    with addcmul; a CPU 0-dim tensor as its first argument is refused on CUDA ("CPU Scalar support for self
    argument is not supported when calling addcmul on CUDA tensors"), so the engine could not differentiate there."""
    from lrnn_analysis.recurrence import build_scheme, lure_recurrence

    generator = torch.Generator().manual_seed(3)
    x, U, b = (torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in ((4, 2, 3), (5, 3), (5,)))
    A, W, B = ((0.3 * torch.randn(5, 5, generator=generator, dtype=torch.float64)).requires_grad_() if given else None
               for given in (with_a, True, with_b))
    params = [t for t in (x, U, b, A, W, B) if t is not None]
    rule = _CudaScalarRule()
    with rule:
        states = lure_recurrence(x, A, W, B, scheme=build_scheme(method, None if method == "map" else 0.2),
                                 input_weight=U, input_bias=b)
        grads = torch.autograd.grad(torch.sin(states).sum(), params, create_graph=True)
        torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params])
    assert rule.refused == []


def test_float32_tanh_of_the_euler_steps_is_within_one_and_a_half_units_in_the_last_place(one_thread, numpy_calls):
    """NumPy's float32 tanh, which the engine's Euler steps take with one thread (``tanh_float32``,
    ``tanh_rows`` with ``float32_tanh``): 1.37 units on this project's CPU; a machine whose NumPy
    computes it less accurately fails here rather than computing states further from the truth."""
    x = numpy.concatenate([_sample(200_000, 3), numpy.linspace(-12, 12, 100_001)]).astype(numpy.float32)
    exact = torch.tanh(torch.from_numpy(x).double()).numpy()
    assert _ulps(field.tanh_float32(torch.from_numpy(x)).numpy(), exact, numpy.float32) <= 1.5
    assert numpy_calls == [1]


def test_tanh_rows_with_float32_tanh_take_numpys_float32_tanh_at_any_size(one_thread, numpy_calls):
    p, out = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(7)), torch.zeros(3, 4, 4)
    row, numpy_rows = field.tanh_rows(p, out, float32_tanh=True)
    row(2)
    assert numpy_rows and len(numpy_calls) == 1
    assert numpy.array_equal(out[2].numpy(), numpy.tanh(p[2].numpy())) and not out[:2].any()
    assert numpy.array_equal(field.tanh_float32(p).numpy(), numpy.tanh(p.numpy()))
    torch.set_num_threads(2)
    assert torch.equal(field.tanh_float32(p), torch.tanh(p))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("beta", [1.0, 0.03])
def test_the_derivative_formed_from_p_is_within_5e_7_of_it_where_one_minus_s_squared_is_not(threads, beta, counted,
                                                                                          one_thread):
    """beta / cosh(p)^2 in float32 against beta tanh'(p) in float64, relative to it wherever it is a
    normal float32 (0 or subnormal beyond |p| of about 44, and there within the smallest normal),
    without a warning where cosh overflows; 1 - s^2 from s rounded to float32 is 8e-4 from it near
    |p| = 5 and 0 beyond 9. With one thread through NumPy, with two through torch."""
    torch.set_num_threads(threads)
    x = numpy.concatenate([_sample(200_000, 2), numpy.linspace(-100, 100, 200_001)]).astype(numpy.float32)
    truth = beta / numpy.cosh(x.astype(numpy.float64)) ** 2
    cosh = counted(field.numpy, "cosh")
    lure = field.LureField(torch.zeros(2, 2), torch.zeros(2, 2), None, beta, identity=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = lure.derivative_of_inputs(torch.from_numpy(x)).numpy().astype(numpy.float64)
    assert bool(cosh) == (threads == 1)
    tiny = float(numpy.finfo(numpy.float32).tiny)
    normal = truth >= tiny
    assert numpy.max(numpy.abs(ours - truth)[normal] / truth[normal]) <= 5e-7
    assert numpy.max(numpy.abs(ours - truth)[~normal]) <= tiny
    s = torch.tanh(torch.from_numpy(x).double()).float()
    from_s = lure.derivative(s).numpy().astype(numpy.float64)
    near_five = normal & (numpy.abs(x) > 4.5) & (numpy.abs(x) < 5.5)
    assert numpy.max(numpy.abs(from_s - truth)[near_five] / truth[near_five]) > 5e-4
