"""Hessian analysis speed against PyHessian 0.1, on a Lipschitz RNN at sMNIST size (real MNIST digits).

Measures in one run (machines here are noisy, so only the ratios are comparable):
  1. seconds per Hessian-vector product: native HessianOperator (double backward through the cached
     gradient graph) vs PyHessian (the same, its single-batch mode), and once, for the record,
     torch.func forward-over-reverse (jvp of grad, no graph reuse possible);
  2. products needed for λ_max: native Lanczos to relative Ritz residual tol vs PyHessian's power
     iteration at the same tol (its stopping rule: relative change of the estimate), and vs plain
     power iteration run until it meets the same residual test (capped), with the
     residual each answer really has (PyHessian's count is its own products, without the one
     residual check added here; Lanczos computes its residuals from products it already has);
  3. trace error vs product budget, Hutchinson and Hutch++ (10 seeds each), against the exact
     trace of a smaller model (dense Hessian, float64).

    python bench/hessian.py [--quick] [--T 784] [--hidden 128] [--batch 128] [--tol 1e-3]
                            [--small-hidden 16] [--small-pixels 8] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from torch.func import functional_call, grad, jvp

from lrnn_analysis.data import load_task
from lrnn_analysis.evaluation import loss_function
from lrnn_analysis.hessian import HessianOperator, eigenvalues, pyhessian_eigenvalues, trace
from lrnn_analysis.hessian.pyhessian_backend import _PyHessianRun
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.runtime import environment

from common import best_time


def lipschitz(input_dim: int, hidden: int, eps: float) -> torch.nn.Module:
    return build_model(ModelConfig("lipschitz", input_dim, hidden, 10, eps=eps, beta_a=0.75, gamma_a=0.001,
                                   beta_w=0.75, gamma_w=0.001), seed=0)


def hvp_times(model, loss_fn, batch, repeats: int, with_func: bool) -> dict:
    op = HessianOperator(model, loss_fn, batch)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    op.hvp(v)
    native = best_time(lambda: op.hvp(v), repeats, warmup=False)
    graph_bytes = op.graph_bytes
    del op

    run = _PyHessianRun(model, loss_fn, batch, None, None, 0)
    chunks = [c.reshape(p.shape) for c, p in zip(torch.split(v, [p.numel() for p in run.hessian.params]), run.hessian.params)]
    run.hvp(chunks)
    theirs = best_time(lambda: run.hvp(chunks), repeats, warmup=False)
    run.close()
    del run

    out = {"native_s": native, "pyhessian_s": theirs, "ratio_native_over_pyhessian": native / theirs,
           "graph_bytes_estimate": graph_bytes}
    if with_func:
        params = {k: p.detach() for k, p in model.named_parameters()}
        tangents = dict(zip(params, (c.reshape(p.shape) for c, p in zip(torch.split(v, [p.numel() for p in params.values()]), params.values()))))
        x, y = batch

        def loss(p):
            return loss_fn(functional_call(model, p, (x,)), y)

        out["torch_func_forward_over_reverse_s"] = best_time(lambda: jvp(grad(loss), (params,), (tangents,)), 2, warmup=False)
        out["ratio_func_over_native"] = out["torch_func_forward_over_reverse_s"] / native
    return out


def power_to_residual(op: HessianOperator, tol: float, seed: int, max_iter: int) -> dict:
    """Products plain power iteration needs until ‖Hv − θv‖ ≤ tol·|θ| (the criterion Lanczos stops on)."""
    v = np.random.default_rng(seed).standard_normal(op.dim)
    for count in range(1, max_iter + 1):
        v = v / np.linalg.norm(v)
        hv = op.matvec(v).astype(np.float64)
        theta = float(v @ hv)
        relative = float(np.linalg.norm(hv - theta * v) / abs(theta))
        if relative <= tol:
            break
        v = hv
    return {"matvecs": count, "value": theta, "relative_residual": relative, "reached": relative <= tol}


def top_eigenvalue(model, loss_fn, batch, tol: float, seed: int, power_max_iter: int) -> dict:
    op = HessianOperator(model, loss_fn, batch)
    native = eigenvalues(op, k=1, which="LA", tol=tol, seed=seed)
    power = power_to_residual(op, tol, seed, power_max_iter)
    del op
    theirs = pyhessian_eigenvalues(model, loss_fn, batch, top_k=1, tol=tol, seed=seed)
    return {
        "native": {"lambda_max": float(native.values[0]), "relative_residual": float(native.relative_residuals[0]),
                   "converged": bool(native.converged[0]), "matvecs": native.matvecs, "seconds": native.wall_time},
        "pyhessian": {"top_eigenvalue": float(theirs.values[0]), "relative_residual": float(theirs.relative_residuals[0]),
                      "meets_tol": bool(theirs.converged[0]), "matvecs": theirs.iterations, "seconds": theirs.wall_time},
        "ratio_matvecs_native_over_pyhessian": native.matvecs / theirs.iterations,
        "power_iteration_to_same_residual": power,
        "ratio_matvecs_native_over_power_same_residual": native.matvecs / power["matvecs"],
    }


def trace_error(model, loss_fn, batch, budgets: list[int], seeds: int) -> dict:
    op = HessianOperator(model, loss_fn, batch, dtype="float64")
    start = time.perf_counter()
    exact = float(torch.trace(op.to_dense()))
    dense_seconds = time.perf_counter() - start
    rows = []
    for budget in budgets:
        for method in ("hutchinson", "hutch++"):
            results = [trace(op, method, tol=0.0, max_matvecs=budget, seed=s) for s in range(seeds)]
            errors = np.array([r.estimate - exact for r in results])
            rows.append({"method": method, "matvecs": budget,
                         "rms_relative_error": float(np.sqrt(np.mean(errors**2)) / abs(exact)),
                         "mean_ci_halfwidth_relative": float(np.mean([r.ci_halfwidth for r in results]) / abs(exact)),
                         "coverage": float(np.mean([abs(e) <= r.ci_halfwidth for e, r in zip(errors, results)]))})
    return {"dim": op.dim, "exact_trace": exact, "dense_seconds": dense_seconds, "seeds": seeds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (T=100, n=32, batch 32) for a smoke run")
    parser.add_argument("--T", type=int, default=None, help="sequence length (default 784; quick: 100)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden units (default 128; quick: 32)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128; quick: 32)")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small-hidden", type=int, default=None, help="trace model hidden units (default 16; quick: 8)")
    parser.add_argument("--small-pixels", type=int, default=8, help="trace model: pixels per step (784/k steps)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--power-max-iter", type=int, default=150, help="cap of the power-to-residual run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    T = args.T or (100 if args.quick else 784)
    hidden = args.hidden or (32 if args.quick else 128)
    batch_size = args.batch or (32 if args.quick else 128)
    small_hidden = args.small_hidden or (8 if args.quick else 16)
    torch.set_num_threads(args.threads)
    loss_fn = loss_function(True)

    task = load_task("smnist", seed=0)
    batch = (task.train.x[:batch_size, :T], task.train.y[:batch_size])
    model = lipschitz(1, hidden, 0.03)
    report = {"sizes": {"T": T, "hidden": hidden, "batch": batch_size}, "threads": args.threads,
              "load_average_at_start": os.getloadavg(), "environment": environment("cpu"),
              "notes": ["No GPU is available in this task: every number is CPU-only (torch threads as given).",
                        "Untrained model (seed 0) on the first real MNIST training digits of the vendored set."]}
    print(f"Lipschitz RNN T={T} n={hidden} batch={batch_size} on {task.description}; CPU, {args.threads} thread(s)")

    report["hvp"] = hvp_times(model, loss_fn, batch, args.repeats, with_func=True)
    h = report["hvp"]
    print(f"  per HVP: native {h['native_s']:.3f} s, PyHessian {h['pyhessian_s']:.3f} s  "
          f"(ratio {h['ratio_native_over_pyhessian']:.2f}x, target <= 1.0x); "
          f"torch.func forward-over-reverse {h['torch_func_forward_over_reverse_s']:.3f} s "
          f"({h['ratio_func_over_native']:.1f}x native); cached graph ~{h['graph_bytes_estimate'] / 2**20:.0f} MiB")

    report["lambda_max"] = top_eigenvalue(model, loss_fn, batch, args.tol, 0, args.power_max_iter)
    e = report["lambda_max"]
    print(f"  lambda_max, tol {args.tol:g}: native Lanczos {e['native']['lambda_max']:.6g} in {e['native']['matvecs']} HVPs "
          f"(rel. residual {e['native']['relative_residual']:.1e}); PyHessian {e['pyhessian']['top_eigenvalue']:.6g} in "
          f"{e['pyhessian']['matvecs']} HVPs (rel. residual {e['pyhessian']['relative_residual']:.1e}); "
          f"ratio {e['ratio_matvecs_native_over_pyhessian']:.2f}x (target <= 0.5x)")
    p = e["power_iteration_to_same_residual"]
    print(f"    power iteration to the same rel. residual {args.tol:g}: {p['matvecs']} HVPs "
          f"({'reached' if p['reached'] else 'NOT reached, cap'}; rel. residual {p['relative_residual']:.1e}); "
          f"ratio native/power {e['ratio_matvecs_native_over_power_same_residual']:.2f}x")

    small_task = load_task("smnist", seed=0, pixels_per_step=args.small_pixels)
    small_batch = (small_task.train.x[:64], small_task.train.y[:64])
    small = lipschitz(args.small_pixels, small_hidden, 0.03 * args.small_pixels)
    budgets = [12, 24, 48, 96] if args.quick else [12, 24, 48, 96, 192]
    report["trace"] = trace_error(small, loss_fn, small_batch, budgets, args.seeds)
    t = report["trace"]
    print(f"  trace vs budget (n={small_hidden}, T={small_task.seq_len}, batch 64, P={t['dim']}, exact {t['exact_trace']:.6g}, "
          f"{t['seeds']} seeds; relative RMS error / mean relative CI half-width / coverage):")
    for method in ("hutchinson", "hutch++"):
        cells = [f"{r['matvecs']}: {r['rms_relative_error']:.3f}/{r['mean_ci_halfwidth_relative']:.3f}/{r['coverage']:.1f}"
                 for r in t["rows"] if r["method"] == method]
        print(f"    {method:<10} " + "  ".join(cells))
    print("  notes: " + " ".join(report["notes"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
