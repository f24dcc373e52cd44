"""float32 accuracy of the recurrence engine's Euler map against the recorded loop, both measured from the float64 truth.

For every input scale, step eps, substep count, readout (last state or every state) and memory
mode (records stored, recomputed from sqrt(T) segments, or stored in one-step segments), the
states h, the gradient of sum(sin(h) * weights) in (u, A, W) and its Hessian times a random
direction are computed in float64 through the loop with tanh'(p) formed from p (the truth: formed
from 1 - tanh(p)^2, float64's tanh'(p) is 0 once |p| > 19), and in float32 by the engine and by the
loop. Each line printed is a quantity whose engine error exceeds twice the loop's and 1e-6
(errors: max |x - truth| / max |truth|); the last line counts the quantities where it is the
other way round. Where float32 round-off is amplified (saturated tanh, long sequences) the two
errors differ by chance as much as by method, in either direction. n = 8, batch 3,
A = M / sqrt(n) - I / 2, W = M' / sqrt(n), u = scale * randn, all seeded. Long sequences skip 3
substeps and one-step segments.

    python bench/engine_float32.py [--steps 7,784] [--numpy-tanh [--addmm]] [--paper-size]

By default torch runs its default thread count, and the engine's tanh and products are torch's.
``--numpy-tanh`` runs one thread, as ``lrnn`` does by default: the engine's Euler steps then take
NumPy's float32 tanh and keep p for the backward passes, which form tanh'(p) from it; its other
tanh goes through NumPy's float64 one, here also below its size threshold (4,096 elements); and
its products go through NumPy's OpenBLAS (``lrnn_analysis/recurrence/products.py``).
``--addmm`` keeps the step products that the sweeps add into buffers with torch's addmm there, as
the engine did before it called OpenBLAS's gemm for them. ``--paper-size`` measures instead the
zoo's Lipschitz RNN at sMNIST size (T = 784, n = 128, batch 32, one thread): the errors of the
cross-entropy's gradient and of one Hessian-vector product in all parameters, from the float64
recorded model, for the engine and for the recorded loop in float32.
"""
from __future__ import annotations

import argparse
import functools
import itertools

import torch

from lrnn_analysis.models import ModelConfig, build_model, lure_step
from lrnn_analysis.recurrence import build_scheme, lure_recurrence, sqrt_segment
from lrnn_analysis.recurrence import engine as engine_module
from lrnn_analysis.recurrence import field as field_module
from lrnn_analysis.recurrence import products as products_module

NAMES = ("h", "grad u", "grad A", "grad W", "hvp u", "hvp A", "hvp W")
SCALES, STEPS_EPS = (1e-8, 1e-3, 1.0, 1e2, 1e4), (1e-6, 1e-3, 0.03, 1.0)
N, BATCH = 8, 3


class TanhFromInputs(torch.autograd.Function):
    """tanh with tanh'(p) = 4 e / (1 + e)^2, e = exp(-2 |p|), formed from p by differentiable operations
    (so its second derivative too): accurate in float64 for every p."""

    @staticmethod
    def forward(ctx, p: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p)
        return torch.tanh(p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        e = torch.exp(-2 * p.abs())
        return grad * (4 * e / (1 + e) ** 2)


def truth(u: torch.Tensor, A: torch.Tensor, W: torch.Tensor, eps: float, substeps: int, keep: bool) -> torch.Tensor:
    """The Euler loop of :func:`loop` with :class:`TanhFromInputs`."""
    h, states = u.new_zeros(u.shape[1], u.shape[2]), []
    for u_t in u.unbind(0):
        for _ in range(substeps):
            h = h + eps * (h @ A.T + TanhFromInputs.apply(h @ W.T + u_t))
        states.append(h)
    return torch.stack(states) if keep else h


def loop(u: torch.Tensor, A: torch.Tensor, W: torch.Tensor, eps: float, substeps: int, keep: bool) -> torch.Tensor:
    """The recorded loop: one lure_step per input step."""
    step = lure_step(A, W, "euler", eps, substeps)
    h, states = u.new_zeros(u.shape[1], u.shape[2]), []
    for u_t in u.unbind(0):
        h = step(h, u_t)
        states.append(h)
    return torch.stack(states) if keep else h


def run_engine(u: torch.Tensor, A: torch.Tensor, W: torch.Tensor, **options) -> torch.Tensor:
    return lure_recurrence(u, A, W, **options)


def quantities(run, tensors, weights, direction) -> list[torch.Tensor]:
    """States, gradient and Hessian-vector product of sum(sin(states) * weights) in (u, A, W)."""
    params = [t.clone().requires_grad_() for t in tensors]
    out = run(*params)
    grads = torch.autograd.grad((torch.sin(out) * weights).sum(), params, create_graph=True)
    hvp = torch.autograd.grad(grads, params, direction)
    return [t.detach().double() for t in (out, *grads, *hvp)]


def relative(actual: torch.Tensor, truth: torch.Tensor) -> float:
    return float((actual - truth).abs().max() / truth.abs().max().clamp_min(1e-300))


def paper_size() -> None:
    """Errors of the engine and the recorded loop in float32 at sMNIST size (module docstring)."""
    torch.set_num_threads(1)
    model = build_model(ModelConfig("lipschitz", 1, 128, 10, eps=0.03, beta_a=0.75, gamma_a=0.001, beta_w=0.75,
                                    gamma_w=0.001), seed=0)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 784, 1, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in model.parameters()]

    def gradient_and_product(engine: str, dtype: torch.dtype) -> list[torch.Tensor]:
        replica = build_model(model.config, seed=0).to(dtype)
        replica.load_state_dict(model.state_dict())
        replica.engine = engine
        params = list(replica.parameters())
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(replica(x.to(dtype)), y), params, create_graph=True)
        product = torch.autograd.grad(grads, params, [d.to(dtype) for d in direction])
        return [torch.cat([t.detach().double().flatten() for t in part]) for part in (grads, product)]

    truth = gradient_and_product("autograd", torch.float64)
    for engine in ("recurrence", "autograd"):
        errors = [relative(ours, exact) for ours, exact in zip(gradient_and_product(engine, torch.float32), truth)]
        label = "engine" if engine == "recurrence" else "recorded loop"
        print(f"T=784 n=128 batch 32 float32 {label}: gradient {errors[0]:.2e}, Hessian-vector product {errors[1]:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="7,784", help="sequence lengths T, comma-separated")
    parser.add_argument("--numpy-tanh", action="store_true",
                        help="one thread, and the engine's NumPy tanh also at these small steps (below its size threshold)")
    parser.add_argument("--addmm", action="store_true", help="the step products added into buffers through torch's addmm")
    parser.add_argument("--paper-size", action="store_true", help="the zoo's Lipschitz RNN at sMNIST size instead")
    args = parser.parse_args()
    if args.addmm:
        products_module._gemm = lambda: None
    if args.paper_size:
        paper_size()
        return
    if args.numpy_tanh:
        torch.set_num_threads(1)
        field_module._NUMPY_TANH_MIN_ELEMENTS = 1
    default_bytes, flagged, worst, better = engine_module.SEGMENT_BYTES, 0, 0.0, 0
    for T, scale, eps, substeps, keep, mode in itertools.product(
            [int(t) for t in args.steps.split(",")], SCALES, STEPS_EPS, (1, 3), (False, True), ("stored", "recompute", "one-step")):
        if T > 100 and (substeps == 3 or mode == "one-step"):
            continue
        generator = torch.Generator().manual_seed(T + substeps)
        u = scale * torch.randn(T, BATCH, N, generator=generator, dtype=torch.float64)
        A = torch.randn(N, N, generator=generator, dtype=torch.float64) / N ** 0.5 - 0.5 * torch.eye(N, dtype=torch.float64)
        W = torch.randn(N, N, generator=generator, dtype=torch.float64) / N ** 0.5
        weights = torch.randn((T, BATCH, N) if keep else (BATCH, N), generator=generator, dtype=torch.float64)
        direction = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (u, A, W)]
        scheme = build_scheme("euler", eps, substeps)
        segment = sqrt_segment(T) if mode == "recompute" else None
        engine_module.SEGMENT_BYTES = 1 if mode == "one-step" else default_bytes

        engine = functools.partial(run_engine, scheme=scheme, keep_states=keep, segment=segment)
        recorded = functools.partial(loop, eps=eps, substeps=substeps, keep=keep)
        exact_values = quantities(functools.partial(truth, eps=eps, substeps=substeps, keep=keep), (u, A, W), weights,
                                  direction)
        single = [t.float() for t in (u, A, W)], weights.float(), [d.float() for d in direction]
        for name, exact, ours, theirs in zip(NAMES, exact_values, quantities(engine, *single), quantities(recorded, *single)):
            error_engine, error_loop = relative(ours, exact), relative(theirs, exact)
            better += error_loop > 2 * error_engine and error_loop > 1e-6
            if error_engine > 2 * error_loop and error_engine > 1e-6:
                flagged += 1
                worst = max(worst, error_engine / error_loop)
                print(f"T={T} scale={scale:g} eps={eps:g} substeps={substeps} keep_states={keep} {mode} {name}: "
                      f"engine {error_engine:.2e}, loop {error_loop:.2e} ({error_engine / error_loop:.1f}x)", flush=True)
    engine_module.SEGMENT_BYTES = default_bytes
    print(f"{flagged} quantities beyond twice the loop's error; worst {worst:.1f}x")
    print(f"{better} quantities where the loop's error is beyond twice the engine's (the same test the other way)")


if __name__ == "__main__":
    main()
