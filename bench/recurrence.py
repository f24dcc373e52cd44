"""Forward+backward time of the Lipschitz RNN recurrence at sMNIST size, against the reference loop.

Measures in one run (machines here are noisy, so only the ratios are comparable):
  * our ``lipschitz`` model (one input matmul for all steps, time-major unbind, one fused
    matmul per step);
  * a faithful re-implementation of the reference loop (erichson/LipschitzRNN models.py,
    ``rnn_models.forward``: A and W built once per forward at the first step, E(x_t) applied
    inside the loop, two separate matmuls per step);
  * the machine's matmul rate at the step's shape, giving a FLOP-bound time.

FLOPs counted: the recurrence does one (B x n) @ (n x 2n) product per step, 4 B n^2 FLOPs,
and its backward twice that, so forward+backward ~ 12 T B n^2 (input projection, tanh and
decoder are lower order and ignored).

The two are timed alternating in one run; each is reported as median (min, max) and the
speed-up as the median of the per-round ratios with its range.

    python bench/recurrence.py [--T 784] [--batch 128] [--hidden 128] [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import alternating_times, ratio_spread, spread

from lrnn_analysis.environment import environment
from lrnn_analysis.models import ModelConfig, build_model


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


def matmul_rate(batch: int, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of (batch x n) @ (n x 2n), the recurrence's shape."""
    a, b = torch.randn(batch, n), torch.randn(n, 2 * n)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            torch.mm(a, b)
        reps += 100
    return reps * 2 * batch * n * 2 * n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=784)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    beta, gamma, eps = 0.75, 0.001, 0.03
    torch.manual_seed(0)
    model = build_model(ModelConfig("lipschitz", 1, args.hidden, 10, eps=eps, beta_a=beta, gamma_a=gamma,
                                    beta_w=beta, gamma_w=gamma), seed=0)
    ref = {"B": model.M_A.detach().T.clone(), "C": model.M_W.detach().T.clone(), "E.weight": model.U.weight.detach().clone(),
           "E.bias": model.U.bias.detach().clone(), "D.weight": model.D.weight.detach().clone(),
           "D.bias": model.D.bias.detach().clone()}
    ref = {k: v.requires_grad_() for k, v in ref.items()}
    x = torch.rand(args.batch, args.T, 1)
    y = torch.randint(0, 10, (args.batch,))
    loss = torch.nn.functional.cross_entropy

    def ours() -> None:
        model.zero_grad(set_to_none=True)
        loss(model(x), y).backward()

    def theirs() -> None:
        for p in ref.values():
            p.grad = None
        loss(reference_loop(ref, x, beta, gamma, eps), y).backward()

    with torch.no_grad():
        diff = (model(x) - reference_loop(ref, x, beta, gamma, eps)).abs().max().item()
    times = alternating_times({"ours": ours, "reference": theirs}, args.repeats)
    t_ours = statistics.median(times["ours"])
    rate = matmul_rate(args.batch, args.hidden)
    flops = 12 * args.T * args.batch * args.hidden ** 2
    env = environment("cpu")
    print(f"forward+backward, T={args.T}, batch={args.batch}, n={args.hidden}, Euler, float32, "
          f"{torch.get_num_threads()} thread(s), torch {env['torch']}")
    print(f"  max |ours - reference| on outputs: {diff:.2e}")
    print(f"  ours:            {spread(times['ours'])}")
    print(f"  reference loop:  {spread(times['reference'])}")
    print(f"  time ratio (ours / reference), per round: {ratio_spread(times['ours'], times['reference'])}")
    print(f"  matmul rate at ({args.batch}x{args.hidden})@({args.hidden}x{2 * args.hidden}): {rate / 1e9:.1f} GFLOP/s")
    print(f"  FLOP-bound time for {flops / 1e9:.1f} GFLOP: {flops / rate:.3f} s  "
          f"(ours runs at {flops / rate / t_ours:.0%} of the matmul rate)")
    parts = gap_breakdown(model, x, y, loss, args.repeats)
    print("  where our time goes (each \"whole\" line against the matmul-only line above it):")
    for name, values in parts.items():
        print(f"    {name:<44} {spread(values)}")


def gap_breakdown(model, x: torch.Tensor, y: torch.Tensor, loss, repeats: int) -> dict[str, list[float]]:
    """Times that separate the recurrence's cost into its ingredients.

    Forward: the step's matmul alone (T plain products at the step's shape, no autograd), then
    the forward pass without autograd (adds tanh, scaling, adds and the per-step operator
    dispatch), then with autograd recording (adds saving states and building the graph).
    Forward+backward: the three matmuls per step alone (the forward product and the two
    backward products), then the whole forward+backward (adds the backward's elementwise work
    and the graph's replay).
    """
    T, batch, n = x.shape[1], x.shape[0], model.config.hidden
    h, w, g = torch.randn(batch, n), torch.randn(n, 2 * n), torch.randn(batch, 2 * n)

    def forward_matmuls() -> None:
        for _ in range(T):
            torch.mm(h, w)

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

    return alternating_times({"forward: step matmul only": forward_matmuls,
                              "forward: whole, no autograd": forward_no_grad,
                              "forward: whole, autograd recording": forward_recorded,
                              "forward+backward: step matmuls only": all_matmuls,
                              "forward+backward: whole": forward_backward}, repeats)


if __name__ == "__main__":
    main()
