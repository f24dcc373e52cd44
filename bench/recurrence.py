"""Forward+backward and Hessian-vector products of the Lipschitz RNN recurrence: the recurrence engine
against the generic autograd path and the reference loop.

Three contenders, each on the same parameters, at T = 196, batch 64, n = 64 and at sMNIST size
T = 784, batch 128, n = 128 (``--quick``: the small size with fewer rounds):
  * engine: our ``lipschitz`` model as it runs by default (``lrnn_analysis.recurrence``: one
    autograd node per sequence, adjoint backward, weight gradients as products over all rows,
    R-operator Hessian-vector products; with one thread its products, plain or added into a
    buffer, through NumPy's OpenBLAS, ``lrnn_analysis/recurrence/products.py``);
  * autograd: the same model with ``engine = "autograd"`` (the step recorded op by op: one input
    matmul for all steps, one fused matmul per step);
  * reference: a faithful re-implementation of the reference loop (erichson/LipschitzRNN
    models.py, ``rnn_models.forward``: A and W built once per forward at the first step, E(x_t)
    applied inside the loop, two separate matmuls per step).

Measured, alternating the contenders round by round (machines here are noisy, so only the ratios
are comparable; each is median (min, max), ratios are medians of per-round ratios):
  * forward+backward of a cross-entropy loss on D h_T + d;
  * one Hessian-vector product as PyHessian computes it: the gradient graph built once
    (create_graph=True), then each product one backward through it (``autograd.grad(grads,
    params, v)``); the graph's construction is timed separately;
  * the fraction of the matmul floor each reaches: FLOPs / (torch's matmul rate at the step's shape
    (B x n) @ (n x 2n), the best window measured before and after the timings) / time. Counted FLOPs: forward+backward ~ 12 T B n^2 (one 4 B n^2 product
    per step forward, one backward, and the weight gradient); the HVP ~ 24 T B n^2, the gradient's
    products differentiated once (each product C = A B gives A_dot B + A B_dot). Autograd's double
    backward does about that, and so does the engine's R-operator (tangent pass and its bulk
    terms, then one backward sweep for the second-order adjoint and the Gauss-Newton part
    together, its bulk terms and weight gradients);
  * peak memory of one call (forward+backward, or graph construction plus one product): the
    rise of the peak resident set size over the resident size before the call, after returning
    freed heap memory to the system (Linux: /proc/self/clear_refs, malloc_trim);
  * with ``--page-faults``, the minor page faults per forward+backward over 30 calls in a plain
    loop, as training runs them, each contender alone in a fresh process (``getrusage``): memory
    the allocator handed back to the system that the next call touches again.

    python bench/recurrence.py [--quick] [--repeats 5] [--threads N] [--T 784 --batch 128 --hidden 128]
                               [--breakdown] [--segment-mib 4] [--page-faults]
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy
import torch
from common import alternating_times, ratio_spread, spread
from threadpoolctl import threadpool_limits

from lrnn_analysis.environment import environment
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.recurrence import engine as engine_module
from lrnn_analysis.recurrence import release_workspace
from lrnn_analysis.recurrence.field import tanh as engine_tanh
from lrnn_analysis.recurrence.field import tanh_rows
from lrnn_analysis.recurrence.products import one_blas_thread, row_products_added

SIZES = ((196, 64, 64), (784, 128, 128))
BETA, GAMMA, EPS = 0.75, 0.001, 0.03


def reference_loop(params: dict[str, torch.Tensor], x: torch.Tensor, beta: float, gamma: float, eps: float) -> torch.Tensor:
    B, C = params["B"], params["C"]
    eye = torch.eye(B.shape[0])
    h = torch.zeros(x.shape[0], B.shape[0])
    for i in range(x.shape[1]):
        z = torch.nn.functional.linear(x[:, i, :], params["E.weight"], params["E.bias"])
        if i == 0:
            A = beta * (B - B.transpose(1, 0)) + (1 - beta) * (B + B.transpose(1, 0)) - gamma * eye
            W = beta * (C - C.transpose(1, 0)) + (1 - beta) * (C + C.transpose(1, 0)) - gamma * eye
        h = h + eps * torch.matmul(h, A) + eps * torch.tanh(torch.matmul(h, W) + z)
    return torch.nn.functional.linear(h, params["D.weight"], params["D.bias"])


def matmul_rate(batch: int, n: int, seconds: float = 1.0, windows: int = 4, rows: int | None = None,
                library: str = "torch") -> float:
    """FLOP/s of (batch x n) @ (n x 2n), the recurrence's shape (with ``rows``: of the weight gradients'
    Y^T X, (n x rows) @ (rows x 2n)), by torch (MKL) or NumPy (its BLAS, held to one thread): the
    best of ``windows`` windows of ``seconds / windows`` each (on a shared machine the best window
    is the closest to the machine's rate)."""
    a, b = (torch.randn(batch, n), torch.randn(n, 2 * n)) if rows is None else (torch.randn(rows, n).T, torch.randn(rows, 2 * n))
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    x, y = a.numpy(), b.numpy()
    product = (lambda: torch.mm(a, b)) if library == "torch" else (lambda: numpy.matmul(x, y))
    best = 0.0
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(windows):
            reps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / windows:
                for _ in range(20):
                    product()
                reps += 20
            best = max(best, reps * flops / (time.perf_counter() - start))
    return best


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory(fn: Callable[[], object]) -> int | None:
    """Bytes by which one call of ``fn`` raises the peak resident set size (None off Linux), the
    engine's scratch buffers kept from earlier calls freed first (so counted)."""
    release_workspace()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) * 1024
    except (OSError, KeyError):
        return None


def page_faults_alone(name: str, steps: int, batch: int, hidden: int, calls: int = 30) -> float:
    """Minor page faults per forward+backward of contender ``name`` over ``calls`` calls in a plain loop,
    as training runs them, after three, in this process and nothing else run in it."""
    c = Contenders(steps, batch, hidden)
    fn = forward_backward(c.losses(), c.parameters())[name]
    for _ in range(3):
        fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def page_faults(steps: int, batch: int, hidden: int) -> dict[str, float]:
    """:func:`page_faults_alone` of each contender, each in a fresh process (the allocator's state,
    and so whether freed memory went back to the system, depends on everything run before)."""
    counts = {}
    for name in ("engine", "autograd", "reference"):
        command = [sys.executable, str(Path(__file__)), "--page-faults-of", name, "--T", str(steps), "--batch", str(batch),
                   "--hidden", str(hidden), "--threads", str(torch.get_num_threads()),
                   "--segment-mib", str(engine_module.SEGMENT_BYTES / 2**20)]
        counts[name] = float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])
    return counts


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


class Contenders:
    """The three implementations on the same parameters, data and loss (module docstring)."""

    def __init__(self, steps: int, batch: int, hidden: int) -> None:
        torch.manual_seed(0)
        self.engine = build_model(ModelConfig("lipschitz", 1, hidden, 10, eps=EPS, beta_a=BETA, gamma_a=GAMMA,
                                              beta_w=BETA, gamma_w=GAMMA), seed=0)
        self.autograd = copy.deepcopy(self.engine)
        self.autograd.engine = "autograd"
        m = self.engine
        self.reference = {"B": m.M_A.detach().T.clone(), "C": m.M_W.detach().T.clone(),
                          "E.weight": m.U.weight.detach().clone(), "E.bias": m.U.bias.detach().clone(),
                          "D.weight": m.D.weight.detach().clone(), "D.bias": m.D.bias.detach().clone()}
        for p in self.reference.values():
            p.requires_grad_()
        self.x = torch.rand(batch, steps, 1)
        self.y = torch.randint(0, 10, (batch,))

    def losses(self) -> dict[str, Callable[[], torch.Tensor]]:
        loss, x, y = torch.nn.functional.cross_entropy, self.x, self.y
        return {"engine": lambda: loss(self.engine(x), y), "autograd": lambda: loss(self.autograd(x), y),
                "reference": lambda: loss(reference_loop(self.reference, x, BETA, GAMMA, EPS), y)}

    def parameters(self) -> dict[str, list[torch.Tensor]]:
        return {"engine": list(self.engine.parameters()), "autograd": list(self.autograd.parameters()),
                "reference": list(self.reference.values())}

    def max_output_difference(self) -> float:
        with torch.no_grad():
            outputs = [self.engine(self.x), self.autograd(self.x), reference_loop(self.reference, self.x, BETA, GAMMA, EPS)]
        return max(float((a - outputs[0]).abs().max()) for a in outputs[1:])


def forward_backward(losses: dict[str, Callable[[], torch.Tensor]],
                     params: dict[str, list[torch.Tensor]]) -> dict[str, Callable[[], None]]:
    def run(name: str) -> Callable[[], None]:
        def call() -> None:
            for p in params[name]:
                p.grad = None
            losses[name]().backward()
        return call
    return {name: run(name) for name in losses}


def gradient_graph(loss: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss(), params, create_graph=True)


def reference_order(tensors: list[torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    """Tensors given per engine parameter, in the reference's order and coordinates (B = M_A^T, C = M_W^T)."""
    t = dict(zip(names, tensors))
    return [t["M_A"].T, t["M_W"].T, t["U.weight"], t["U.bias"], t["D.weight"], t["D.bias"]]


def hessian_products(losses: dict[str, Callable[[], torch.Tensor]], params: dict[str, list[torch.Tensor]],
                     directions: dict[str, list[torch.Tensor]]) -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    """One product per call on a gradient graph built once, PyHessian's way."""
    graphs = {name: gradient_graph(losses[name], params[name]) for name in losses}

    def run(name: str) -> Callable[[], tuple[torch.Tensor, ...]]:
        return lambda: torch.autograd.grad(graphs[name], params[name], directions[name], retain_graph=True)
    return {name: run(name) for name in losses}


def measure(steps: int, batch: int, hidden: int, repeats: int) -> None:
    c = Contenders(steps, batch, hidden)
    losses, params = c.losses(), c.parameters()
    order = ("engine", "autograd", "reference")
    names = [name for name, _ in c.engine.named_parameters()]
    generator = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=generator) for p in params["engine"]]
    directions = {"engine": direction, "autograd": direction, "reference": reference_order(direction, names)}
    rate = matmul_rate(batch, hidden)
    env = environment("cpu")
    print(f"T={steps}, batch={batch}, n={hidden}, Euler, float32, {torch.get_num_threads()} thread(s), torch {env['torch']}, "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"  max |output difference| from the engine's: {c.max_output_difference():.2e}")

    fb = forward_backward(losses, params)
    memory = {name: peak_memory(fn) for name, fn in fb.items()}
    times = alternating_times(fb, repeats)
    rate = max(rate, matmul_rate(batch, hidden))
    print(f"  matmul rate at ({batch}x{hidden})@({hidden}x{2 * hidden}), best window: {rate / 1e9:.1f} GFLOP/s (torch, the floor's); "
          f"NumPy's BLAS {matmul_rate(batch, hidden, library='numpy') / 1e9:.1f} (the engine's plain products with one thread)")
    rows = 16 * batch
    print(f"  weight gradients' Y^T X, ({hidden}x{rows})@({rows}x{2 * hidden}): torch {matmul_rate(batch, hidden, rows=rows) / 1e9:.1f}, "
          f"NumPy's BLAS {matmul_rate(batch, hidden, rows=rows, library='numpy') / 1e9:.1f} GFLOP/s")
    flops = 12 * steps * batch * hidden**2
    print(f"  forward+backward ({flops / 1e9:.2f} GFLOP, matmul floor {flops / rate:.3f} s):")
    for name in order:
        share = flops / rate / statistics.median(times[name])
        print(f"    {name:<10} {spread(times[name])}  {share:4.0%} of the floor  peak {_mib(memory[name])}")
    for name in order[1:]:
        print(f"    speed-up of the engine over {name}: {ratio_spread(times[name], times['engine'])}")

    build = {name: (lambda name=name: gradient_graph(losses[name], params[name])) for name in order}
    hvp = hessian_products(losses, params, directions)
    products = {name: [t.detach() for t in fn()] for name, fn in hvp.items()}
    products["engine"] = reference_order(products["engine"], names)
    products["autograd"] = reference_order(products["autograd"], names)
    scale = max(float(t.abs().max()) for t in products["reference"])
    memory = {name: peak_memory(lambda name=name: hessian_products({name: losses[name]}, {name: params[name]}, directions)[name]())
              for name in order}
    build_times = alternating_times(build, repeats)
    hvp_times = alternating_times(hvp, repeats)
    flops = 24 * steps * batch * hidden**2
    print(f"  Hessian-vector product, PyHessian style ({flops / 1e9:.2f} GFLOP, matmul floor {flops / rate:.3f} s):")
    for name in order[1:]:
        difference = max(float((a - b).abs().max()) for a, b in zip(products["engine"], products[name]))
        print(f"    max |engine - {name}| / max |reference| over the product: {difference / scale:.1e}")
    for name in order:
        share = flops / rate / statistics.median(hvp_times[name])
        print(f"    {name:<10} product {spread(hvp_times[name])}  {share:4.0%} of the floor  "
              f"graph {spread(build_times[name])}  peak (graph + product) {_mib(memory[name])}")
    for name in order[1:]:
        print(f"    speed-up of the engine's product over {name}: {ratio_spread(hvp_times[name], hvp_times['engine'])}")


def gap_breakdown(model, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Times that separate the model's recurrence cost into its ingredients.

    Forward: the step's matmul alone (T plain products at the step's shape, no autograd), the
    products as the engine's Euler forward forms them with one thread (into one row by NumPy's
    product, y W^T then added to u's row of p), the same products added into the rows of a
    (T x batch x 2n) buffer as the tangent pass adds them, by torch's addmm and by the engine's
    ``row_products_added`` (NumPy's OpenBLAS gemm with one thread, torch's addmm otherwise), then
    the forward pass without autograd (adds tanh, scaling, adds and the per-step operator
    dispatch), then with autograd recording; first, T calls at the step's shape of torch.tanh (the
    reference's and the recorded loop's), of the engine's tanh in an Euler step (``lrnn_analysis.
    recurrence.field.tanh_rows`` with ``float32_tanh``: NumPy's float32 tanh with one thread,
    torch.tanh with several) and in the other schemes (``field.tanh``: NumPy's float64 tanh with
    one thread), and of torch.sigmoid (2 sigmoid(2 p) - 1 is cheaper still but loses tanh's
    relative accuracy near p = 0), each on the p columns of a (batch x 2n) product as the other
    schemes read them, the Euler step's on rows of p. Forward+backward: the three matmuls per step
    alone (the forward product and the two backward products), then the whole forward+backward.
    """
    T, batch, n = x.shape[1], x.shape[0], model.config.hidden
    h, w, g = torch.randn(batch, n), torch.randn(n, 2 * n), torch.randn(batch, 2 * n)
    loss = torch.nn.functional.cross_entropy

    def forward_matmuls() -> None:
        for _ in range(T):
            torch.mm(h, w)

    z, states, forward_matrix = torch.randn(T, batch, 2 * n), torch.randn(T, batch, n), torch.randn(2 * n, n).T

    def tangent_addmm() -> None:
        for l in range(T):
            z[l].addmm_(states[l], forward_matrix)

    def tangent_engine_products() -> None:
        with one_blas_thread():
            add_product = row_products_added(states, forward_matrix, z)
            for l in range(T):
                add_product(l, l)

    p_rows, row = torch.zeros(T, batch, n), torch.empty(batch, 2 * n)

    def forward_engine_products() -> None:
        with one_blas_thread():
            matrix, out, product = forward_matrix.numpy(), row.numpy(), row[:, n:].numpy()
            for h_l, p_l in zip(states.numpy(), p_rows.numpy(), strict=True):
                numpy.matmul(h_l, matrix, out)
                numpy.add(p_l, product, p_l)

    def all_matmuls() -> None:
        for _ in range(T):
            torch.mm(h, w)
            torch.mm(g, w.T)
            torch.mm(h.T, g)

    def forward_no_grad() -> None:
        with torch.no_grad():
            model(x)

    def forward_recorded() -> None:
        model(x)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        loss(model(x), y).backward()

    p, s = g[:, n:], torch.empty(batch, n)

    def tanh_steps() -> None:
        for _ in range(T):
            torch.tanh(p, out=s)

    def engine_tanh_steps() -> None:
        for _ in range(T):
            engine_tanh(p, out=s)

    tanh_inputs, s_rows = torch.randn(T, batch, n), torch.empty(T, batch, n)

    def euler_tanh_steps() -> None:
        tanh_row, _ = tanh_rows(tanh_inputs, s_rows, float32_tanh=True)
        for l in range(T):
            tanh_row(l)

    def sigmoid_steps() -> None:
        for _ in range(T):
            torch.sigmoid(p, out=s)

    return alternating_times({"T tanh of (batch x n) (torch.tanh)": tanh_steps,
                              "T tanh of (batch x n) (the engine's Euler step)": euler_tanh_steps,
                              "T tanh of (batch x n) (the engine's, other schemes)": engine_tanh_steps,
                              "T sigmoid of (batch x n) (2 sigmoid(2 p) - 1, not used)": sigmoid_steps,
                              "forward: step matmul only": forward_matmuls,
                              "forward: the engine's step products (one row, + u)": forward_engine_products,
                              "tangent: step products added into rows (addmm)": tangent_addmm,
                              "tangent: the same (the engine's)": tangent_engine_products,
                              "forward: whole, no autograd": forward_no_grad,
                              "forward: whole, autograd recording": forward_recorded,
                              "forward+backward: step matmuls only": all_matmuls,
                              "forward+backward: whole": forward_backward}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small size only, 3 rounds")
    parser.add_argument("--T", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--breakdown", action="store_true", help="also where the engine's forward+backward time goes")
    parser.add_argument("--segment-mib", type=float, default=None,
                        help="the engine's stored segments of about this many MiB (default: SEGMENT_BYTES, 4)")
    parser.add_argument("--page-faults", action="store_true",
                        help="also the page faults per forward+backward in a plain loop, each contender alone in a fresh process")
    parser.add_argument("--page-faults-of", choices=("engine", "autograd", "reference"),
                        help="only print those of one contender (what --page-faults runs in each process)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.segment_mib:
        engine_module.SEGMENT_BYTES = int(args.segment_mib * 2**20)
    sizes = list(SIZES[:1] if args.quick else SIZES)
    if args.T or args.batch or args.hidden:
        sizes = [(args.T or SIZES[-1][0], args.batch or SIZES[-1][1], args.hidden or SIZES[-1][2])]
    repeats = 3 if args.quick else args.repeats
    if args.page_faults_of:
        for steps, batch, hidden in sizes:
            print(page_faults_alone(args.page_faults_of, steps, batch, hidden))
        return
    for steps, batch, hidden in sizes:
        measure(steps, batch, hidden, repeats)
        if args.page_faults:
            counts = page_faults(steps, batch, hidden)
            print("  minor page faults per forward+backward, 30 calls in a loop, each contender alone in a fresh process: "
                  + ", ".join(f"{name} {count:.0f}" for name, count in counts.items()))
        if args.breakdown:
            c = Contenders(steps, batch, hidden)
            print("  where the engine's time goes (each \"whole\" line against the matmul-only line above it):")
            for name, values in gap_breakdown(c.engine, c.x, c.y, repeats).items():
                print(f"    {name:<48} {spread(values)}")


if __name__ == "__main__":
    main()
