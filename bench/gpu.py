"""The GPU path, measured in one run on a CUDA device.

    python bench/gpu.py [--repeats 5] [--draws 32] [--skip-compile] [--skip-audit]
    python bench/gpu.py --smoke      # tiny sizes on the CPU: checks the script, measures nothing useful

At sMNIST size (T = 784 steps, batch 128, n = 128, float32), each timing after a warm-up call,
with torch.cuda.synchronize() around every call, the variants of a comparison alternating, and
min/median/max over ``--repeats`` rounds; a speed-up is the median of the per-round ratios
(baseline / variant) with their min and max, the baseline measured in the same run. On CUDA
the peak memory of one call of each variant is printed too (``torch.cuda.max_memory_allocated``).

1. forward+backward of the recurrence: the reference loop (erichson/LipschitzRNN: E(x_t) applied
   per step, A and W built once per forward at step 0, h ← h + ε·α·(h A) + ε·tanh(h W + z),
   α = 1) against the toolkit's ``lipschitz`` model on the generic autograd path
   (``engine = "autograd"``) and on the recurrence engine (its default), outputs compared;
2. the engine's forward+backward eager, under ``torch.compile`` (compile time reported apart) and
   replayed from CUDA graphs (``torch.cuda.make_graphed_callables``): 784 sequential steps of
   small kernels are launch-bound on a GPU; outputs and gradients compared with eager;
3. one Hessian-vector product (``HessianOperator``, every parameter, one batch of 128 digits):
   the engine's R-operator against autograd's double backward, products compared;
4. ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` (1 input, n hidden, a linear head on h_T) at the same size:
   forward, and forward+backward, of the layer's own kernels (cuDNN on CUDA) against its unrolled
   twin (``lrnn_analysis.unrolled_rnn``), outputs compared; then one Hessian-vector product through
   the twin, against the layer's own double backward where that runs (on the CPU; on CUDA it
   fails, and the error is printed);
5. the parameter-noise sweep's draws: batched (vmap over stacked parameter sets) against the
   loop over draws (``evaluate_parameter_draws``), results compared; target ≥ 3×;
6. the whole ``lrnn audit`` (default settings) of an untrained sMNIST-size model saved to a
   temporary checkpoint, with ``--device cuda``; target ≤ 30 s.

Exit status: 0 after measuring; 0 with the line "no CUDA device ..." when CUDA is not available
(nothing is measured then).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import common
import torch


@dataclass(frozen=True)
class Sizes:
    task: str
    steps: int
    batch: int
    hidden: int
    samples: int


GPU_SIZES = Sizes("smnist", 784, 128, 128, 1000)
SMOKE_SIZES = Sizes("digits", 16, 8, 16, 32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternating_times(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function: one warm-up call each, then ``repeats`` rounds in turn,
    with the device synchronised around every call."""
    return common.alternating_times(fns, repeats, sync=lambda: _sync(device))


def report(times: dict[str, list[float]], baseline: str | None = None) -> None:
    """Each contender's seconds, and its speed-up over ``baseline`` (baseline / contender, same round)."""
    for name, values in times.items():
        line = f"    {name:<28} {common.spread(values, digits=4)}"
        if baseline is not None and name != baseline:
            line += f"   {common.ratio_spread(times[baseline], values)} vs {baseline}"
        print(line, flush=True)


def peak_memory(fns: dict[str, Callable[[], object]], device: torch.device) -> None:
    """On CUDA, the peak memory allocated during one call of each function (nothing on the CPU)."""
    if device.type != "cuda":
        return
    peaks = []
    for name, fn in fns.items():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peaks.append(f"{name} {(torch.cuda.max_memory_allocated(device) - base) / 2**20:.0f} MiB")
    print(f"    peak memory of one call: {', '.join(peaks)}", flush=True)


def reference_forward(ref: dict[str, torch.Tensor], x: torch.Tensor, beta: float, gamma: float, eps: float,
                      alpha: float = 1.0) -> torch.Tensor:
    """The reference implementation's forward pass (LipschitzRNN models.py), written out."""
    B, C = ref["B"], ref["C"]
    eye = torch.eye(B.shape[0], device=x.device)
    h = torch.zeros(x.shape[0], B.shape[0], device=x.device)
    for i in range(x.shape[1]):
        z = torch.nn.functional.linear(x[:, i, :], ref["E.weight"], ref["E.bias"])
        if i == 0:
            A = beta * (B - B.transpose(1, 0)) + (1 - beta) * (B + B.transpose(1, 0)) - gamma * eye
            W = beta * (C - C.transpose(1, 0)) + (1 - beta) * (C + C.transpose(1, 0)) - gamma * eye
        h = h + eps * alpha * torch.matmul(h, A) + eps * torch.tanh(torch.matmul(h, W) + z)
    return torch.nn.functional.linear(h, ref["D.weight"], ref["D.bias"])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _gradients(
    model: torch.nn.Module, forward: Callable[[], torch.Tensor], y: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = forward()
    torch.nn.functional.cross_entropy(out, y).backward()
    return out.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _lipschitz_models(sizes: Sizes, device: torch.device, input_dim: int, outputs: int,
                      eps: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same ``lipschitz`` model twice: on the recurrence engine (its default) and on the autograd path."""
    from lrnn_analysis.models import ModelConfig, build_model

    beta, gamma = 0.75, 0.001
    engine = build_model(ModelConfig("lipschitz", input_dim, sizes.hidden, outputs, eps=eps, beta_a=beta, gamma_a=gamma,
                                     beta_w=beta, gamma_w=gamma), seed=0).to(device)
    autograd = copy.deepcopy(engine)
    autograd.engine = "autograd"
    return engine, autograd


def recurrence(sizes: Sizes, device: torch.device, repeats: int, compile_too: bool) -> None:
    beta, gamma, eps = 0.75, 0.001, 0.03
    model, autograd = _lipschitz_models(sizes, device, 1, 10, eps)
    ref = {"B": model.M_A.detach().T.clone(), "C": model.M_W.detach().T.clone(),
           "E.weight": model.U.weight.detach().clone(), "E.bias": model.U.bias.detach().clone(),
           "D.weight": model.D.weight.detach().clone(), "D.bias": model.D.bias.detach().clone()}
    ref = {k: v.requires_grad_() for k, v in ref.items()}
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(sizes.batch, sizes.steps, 1, generator=generator).to(device)
    y = torch.randint(0, 10, (sizes.batch,), generator=generator).to(device)
    loss = torch.nn.functional.cross_entropy

    def on(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            loss(module(x), y).backward()
        return run

    ours = on(model)

    def reference() -> None:
        for p in ref.values():
            p.grad = None
        loss(reference_forward(ref, x, beta, gamma, eps), y).backward()

    with torch.no_grad():
        expected = reference_forward(ref, x, beta, gamma, eps)
        difference = max(_relative(model(x), expected), _relative(autograd(x), expected))
    print(f"1. recurrence forward+backward, T = {sizes.steps}, batch {sizes.batch}, n = {sizes.hidden}, float32; "
          f"max relative difference of the outputs, toolkit vs reference: {difference:.1e}", flush=True)
    contenders = {"reference loop": reference, "toolkit autograd path": on(autograd), "toolkit engine": ours}
    times = alternating_times(contenders, repeats, device)
    report(times, "reference loop")
    print(f"    engine vs autograd path: {common.ratio_spread(times['toolkit autograd path'], times['toolkit engine'])}",
          flush=True)
    peak_memory(contenders, device)

    print("2. eager vs torch.compile vs CUDA graphs (same model, same batch)", flush=True)
    eager_out, eager_grads = _gradients(model, lambda: model(x), y)
    variants: dict[str, Callable[[], None]] = {"eager": ours}
    if device.type == "cuda":
        # make_graphed_callables replaces a module's forward in place: graph a copy.
        graphed = torch.cuda.make_graphed_callables(copy.deepcopy(model), (x,))
        out, grads = _gradients(graphed, lambda: graphed(x), y)
        print(f"    CUDA graphs vs eager: outputs {_relative(out, eager_out):.1e}, gradients "
              f"{max(_relative(g, e) for g, e in zip(grads, eager_grads, strict=True)):.1e} (max relative difference)",
              flush=True)
        variants["CUDA graphs"] = on(graphed)
    else:
        print("    CUDA graphs: not on the CPU", flush=True)
    if compile_too:
        for mode in ("default", "reduce-overhead"):
            compiled = torch.compile(model, mode=mode)
            start = time.perf_counter()
            out, grads = _gradients(model, lambda: compiled(x), y)  # noqa: B023 - called before the next mode
            _sync(device)
            print(f"    torch.compile(mode={mode!r}): first call (compile) {time.perf_counter() - start:.1f} s; vs eager: "
                  f"outputs {_relative(out, eager_out):.1e}, gradients "
                  f"{max(_relative(g, e) for g, e in zip(grads, eager_grads, strict=True)):.1e}", flush=True)

            def run_compiled(compiled=compiled) -> None:
                model.zero_grad(set_to_none=True)
                loss(compiled(x), y).backward()

            variants[f"compile {mode}"] = run_compiled
    report(alternating_times(variants, repeats, device), "eager")


def hessian_vector_product(sizes: Sizes, device: torch.device, repeats: int) -> None:
    from lrnn_analysis.builtin_tasks import load_task
    from lrnn_analysis.hessian import HessianOperator
    from lrnn_analysis.objective import Objective

    task = load_task(sizes.task, seed=0)
    engine, autograd = _lipschitz_models(sizes, device, task.input_dim, task.output_dim, task.default_eps)
    batch = (task.train.x[:sizes.batch, :sizes.steps].to(device), task.train.y[:sizes.batch].to(device))
    ops = {"autograd double backward": HessianOperator(autograd, Objective(True, False).loss_fn(), batch),
           "engine R-operator": HessianOperator(engine, Objective(True, False).loss_fn(), batch)}
    op = ops["engine R-operator"]
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0)).to(device)
    products = {name: o.hvp(v) for name, o in ops.items()}
    difference = _relative(products["engine R-operator"], products["autograd double backward"])
    print(f"3. Hessian-vector product: P = {op.dim}, {len(batch[0])} samples x {batch[0].shape[1]} steps, graph cached: "
          f"{op.graph_cached} ({(op.graph_bytes or 0) / 2**20:.0f} MiB estimated); max relative difference of the "
          f"products: {difference:.1e}", flush=True)
    contenders = {name: (lambda o=o: o.hvp(v)) for name, o in ops.items()}
    report(alternating_times(contenders, repeats, device), "autograd double backward")
    peak_memory(contenders, device)


def torch_layers(sizes: Sizes, device: torch.device, repeats: int) -> None:
    from torch import nn

    from lrnn_analysis.hessian import HessianOperator
    from lrnn_analysis.models.torchnn import SequenceClassifier
    from lrnn_analysis.unrolled_rnn import unrolled_layers

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(sizes.batch, sizes.steps, 1, generator=generator).to(device)
    y = torch.randint(0, 10, (sizes.batch,), generator=generator).to(device)
    own = "cuDNN" if device.type == "cuda" and torch.backends.cudnn.enabled else "layer"
    loss = torch.nn.CrossEntropyLoss()
    print(f"4. torch.nn layers, T = {sizes.steps}, batch {sizes.batch}, n = {sizes.hidden}, float32: the layer's own "
          f"kernels ({own}) against the unrolled twin", flush=True)
    for layer_type in (nn.RNN, nn.LSTM, nn.GRU):
        torch.manual_seed(0)
        model = SequenceClassifier(layer_type(1, sizes.hidden, batch_first=True), nn.Linear(sizes.hidden, 10)).to(device)

        def forward(twin: bool, backward: bool, model: nn.Module = model) -> torch.Tensor:
            with unrolled_layers(model, ["rnn"] if twin else []), torch.set_grad_enabled(backward):
                out = model(x)
                if backward:
                    model.zero_grad(set_to_none=True)
                    loss(out, y).backward()
            return out.detach()

        difference = _relative(forward(True, False), forward(False, False))
        print(f"  {layer_type.__name__}: max relative difference of the outputs, twin vs layer: {difference:.1e}", flush=True)
        for backward in (False, True):
            contenders = {f"{own} {'fwd+bwd' if backward else 'forward'}": lambda b=backward: forward(False, b),
                          f"twin {'fwd+bwd' if backward else 'forward'}": lambda b=backward: forward(True, b)}
            report(alternating_times(contenders, repeats, device), next(iter(contenders)))
        twin_op = HessianOperator(model, loss, (x, y), rnn_twin="on")
        v = torch.randn(twin_op.dim, generator=torch.Generator().manual_seed(0)).to(device)
        hvps: dict[str, Callable[[], object]] = {}
        try:
            own_op = HessianOperator(model, loss, (x, y), rnn_twin="off")
            hvp_difference = _relative(twin_op.hvp(v), own_op.hvp(v))
            hvps[f"HVP {own}"] = lambda o=own_op, v=v: o.hvp(v)
            print(f"    HVP: max relative difference, twin vs the layer's own double backward: {hvp_difference:.1e}", flush=True)
        except RuntimeError as error:
            print(f"    HVP through the layer's own kernels fails: {str(error).splitlines()[0][:120]}", flush=True)
        hvps["HVP twin"] = lambda o=twin_op, v=v: o.hvp(v)
        report(alternating_times(hvps, repeats, device), next(iter(hvps)) if len(hvps) > 1 else None)


def parameter_draws(sizes: Sizes, device: torch.device, repeats: int, draws: int) -> None:
    from lrnn_analysis.builtin_tasks import load_task
    from lrnn_analysis.models import ModelConfig, build_model
    from lrnn_analysis.robustness import Perturbation, evaluate_parameter_draws, perturb_parameters

    task = load_task(sizes.task, seed=0)
    config = ModelConfig("lipschitz", task.input_dim, sizes.hidden, task.output_dim, eps=task.default_eps)
    model = build_model(config, seed=0).to(device).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    sets = [perturb_parameters(params, Perturbation("gaussian-relative", 0.05, seed=s)) for s in range(draws)]
    x, y = task.test.x[:sizes.samples, :sizes.steps].to(device), task.test.y[:sizes.samples].to(device)

    def run(batched: bool) -> list[tuple[float | None, float]]:
        return evaluate_parameter_draws(model, sets, x, y, batch_size=len(x), batched=batched)

    batched, looped = run(True), run(False)
    agree = all(a.accuracy == b.accuracy and abs(a.loss - b.loss) <= 1e-5 * abs(b.loss) for a, b in zip(batched, looped, strict=True))
    print(f"5. parameter-noise draws: {draws} draws x {len(x)} samples x {x.shape[1]} steps; batched and loop agree "
          f"(same accuracies, losses to 1e-5): {agree}; target: batched >= 3x the loop", flush=True)
    report(alternating_times({"loop over draws": lambda: run(False), "batched (vmap)": lambda: run(True)}, repeats, device),
           "loop over draws")


def audit(sizes: Sizes, device: torch.device) -> None:
    from lrnn_analysis.builtin_tasks import load_task
    from lrnn_analysis.checkpoints import save_checkpoint
    from lrnn_analysis.cli import main as lrnn
    from lrnn_analysis.models import ModelConfig, build_model

    task = load_task(sizes.task, seed=0)
    model = build_model(ModelConfig("lipschitz", task.input_dim, sizes.hidden, task.output_dim, eps=task.default_eps), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(Path(tmp) / "model.safetensors", model,
                                     {"task": {"name": sizes.task, "seed": 0, "options": {}}})
        _sync(device)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = lrnn(["audit", str(checkpoint), "--out", str(Path(tmp) / "audit"), "--device", device.type, "--quiet"])
        _sync(device)
        seconds = time.perf_counter() - start
    print(f"6. lrnn audit of an untrained {sizes.task} model (n = {sizes.hidden}), default settings, --device {device.type}: "
          f"{seconds:.1f} s, exit {code}; target <= 30 s on a GPU", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (its compile time is long)")
    parser.add_argument("--skip-audit", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to check the script only")
    args = parser.parse_args()
    if args.smoke:
        device, sizes = torch.device("cpu"), SMOKE_SIZES
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("no CUDA device: bench/gpu.py measures the GPU path and needs one (torch.cuda.is_available() is False); "
              "nothing measured")
        return 0
    else:
        device, sizes = torch.device("cuda"), GPU_SIZES
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    recurrence(sizes, device, args.repeats, compile_too=not args.skip_compile and not args.smoke)
    hessian_vector_product(sizes, device, args.repeats)
    torch_layers(sizes, device, args.repeats)
    parameter_draws(sizes, device, args.repeats, args.draws)
    if not args.skip_audit:
        audit(sizes, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
