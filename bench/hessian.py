"""Curvature products and estimators against the peer libraries, on a Lipschitz RNN at sMNIST size (real MNIST digits).

Measures in one run (machines here are noisy, so only ratios measured in the same run compare):
  1. seconds per Hessian-vector product, every available implementation timed in alternation
     (round-robin, ``--repeats`` rounds, min/median/max): native HessianOperator (double backward
     through the cached gradient graph), PyHessian 0.1 (the same idea, its single-batch mode),
     curvlinops (HessianLinearOperator: forward, backward and double backward per product),
     hessian-eigenthings (if installed; its adapter follows the upstream HVPOperator API and was not
     run here, the package is not on the registry), torch.func forward-over-reverse (jvp of grad); and GGN
     products, native GGNOperator vs curvlinops GGNLinearOperator. Peers that are not installed
     are skipped and named in the output;
  2. matmat: batched double backward (is_grads_batched) vs a loop of products, alternating, per
     column, on the same operator (what matmat="auto" decides per operator and device);
  3. products needed for λ_max: native Lanczos to relative Ritz residual tol vs PyHessian's power
     iteration at the same tol (its stopping rule: relative change of the estimate), and vs plain
     power iteration run until it meets the same residual test (capped);
  4. trace error vs product budget, Hutchinson, Hutch++, XTrace and the deflated trace (its own
     Krylov basis within the budget, and the audit's: the basis of the λ_max/λ_min Lanczos run, not
     counted) (``--seeds`` seeds each), against the exact trace of a smaller model (dense Hessian,
     float64), and the coverage of Hutchinson's 95% t-interval over ``--coverage-seeds`` seeds on
     that exact matrix.

    python bench/hessian.py [--quick] [--T 784] [--hidden 128] [--batch 128] [--tol 1e-3] [--repeats 5]
                            [--small-hidden 16] [--small-pixels 8] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from collections.abc import Callable

import common
import numpy as np
import torch
from common import summary
from scipy.sparse.linalg import aslinearoperator
from torch.func import functional_call, grad, jvp

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.environment import environment
from lrnn_analysis.hessian import GGNOperator, HessianOperator, eigenvalues, pyhessian_eigenvalues, trace
from lrnn_analysis.hessian.pyhessian_backend import _PyHessianRun
from lrnn_analysis.hessian.trace import krylov_start
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.objective import Objective

PEER_MODULES = {"pyhessian": "pyhessian", "curvlinops": "curvlinops", "eigenthings": "hessian_eigenthings"}


def lipschitz(input_dim: int, hidden: int, eps: float) -> torch.nn.Module:
    return build_model(ModelConfig("lipschitz", input_dim, hidden, 10, eps=eps, beta_a=0.75, gamma_a=0.001,
                                   beta_w=0.75, gamma_w=0.001), seed=0)


def alternating_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """Each function once per round, in turn (after one warm-up call each): min/median/max seconds."""
    return {name: summary(values) for name, values in common.alternating_times(fns, rounds).items()}


def ratios(times: dict[str, dict[str, float]], baseline: str) -> dict[str, float]:
    """Median seconds of ``baseline`` over each other implementation's median (< 1: baseline faster)."""
    return {name: times[baseline]["median"] / t["median"] for name, t in times.items() if name != baseline}


def product_times(model, loss_fn, batch, repeats: int) -> dict:
    """Seconds per product of every available implementation, alternating in one loop."""
    available = {name: importlib.util.find_spec(module) is not None for name, module in PEER_MODULES.items()}
    params = list(model.parameters())
    op = HessianOperator(model, loss_fn, batch, matmat="loop")
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    hvps: dict[str, Callable[[], object]] = {"native": lambda: op.hvp(v)}  # noqa: F821 - runs before the del below
    cleanup = []
    if available["pyhessian"]:
        run = _PyHessianRun(model, loss_fn, batch, None, None, 0, "auto")
        theirs_params = run.hessian.params
        split = torch.split(v, [p.numel() for p in theirs_params])
        chunks = [c.reshape(p.shape) for c, p in zip(split, theirs_params, strict=True)]
        hvps["pyhessian"] = lambda: run.hvp(chunks)
        cleanup.append(run.close)
    if available["curvlinops"]:
        from curvlinops import HessianLinearOperator

        theirs = HessianLinearOperator(model, loss_fn, params, [batch], check_deterministic=False)
        hvps["curvlinops"] = lambda: theirs @ v
    if available["eigenthings"]:
        from hessian_eigenthings.hvp_operator import HVPOperator

        eig = HVPOperator(model, [batch], loss_fn, use_gpu=False, full_dataset=True)
        hvps["eigenthings"] = lambda: eig.apply(v)
    named = {k: p.detach() for k, p in model.named_parameters()}
    pieces = torch.split(v, [p.numel() for p in named.values()])
    tangents = dict(zip(named, (c.reshape(p.shape) for c, p in zip(pieces, named.values(), strict=True)), strict=True))
    x, y = batch

    def loss(p):
        return loss_fn(functional_call(model, p, (x,)), y)

    hvps["torch_func_forward_over_reverse"] = lambda: jvp(grad(loss), (named,), (tangents,))
    hessian = alternating_times(hvps, repeats)
    out = {"hessian": hessian, "hessian_ratio_native_over": ratios(hessian, "native"),
           "graph_bytes_estimate": op.graph_bytes, "peers_missing": [n for n, ok in available.items() if not ok]}
    for close in cleanup:
        close()
    del op, hvps

    ggn = GGNOperator(model, loss_fn, batch)
    ggns: dict[str, Callable[[], object]] = {"native": lambda: ggn.apply(v)}
    if available["curvlinops"]:
        from curvlinops import GGNLinearOperator

        their_ggn = GGNLinearOperator(model, loss_fn, params, [batch], check_deterministic=False)
        ggns["curvlinops"] = lambda: their_ggn @ v
    out["ggn"] = alternating_times(ggns, repeats)
    out["ggn_ratio_native_over"] = ratios(out["ggn"], "native")
    return out


def matmat_times(model, loss_fn, batch, columns: int, repeats: int) -> dict:
    """Per-column seconds of the batched double backward vs the loop, alternating, same operator."""
    op = HessianOperator(model, loss_fn, batch, matmat="loop")
    X = np.random.default_rng(0).standard_normal((op.dim, columns)).astype(np.float32)
    times = alternating_times({"loop": lambda: op._looped_products(X), "batched": lambda: op._batched_products(X)}, repeats)
    per_column = {name: {k: (v / columns if k != "rounds" else v) for k, v in t.items()} for name, t in times.items()}
    return {"columns": columns, "per_column": per_column,
            "ratio_batched_over_loop": per_column["batched"]["median"] / per_column["loop"]["median"]}


def power_to_residual(op: HessianOperator, tol: float, seed: int, max_iter: int) -> dict:
    """Products plain power iteration needs until ‖Hv − θv‖ ≤ tol·|θ| (the criterion Lanczos stops on)."""
    v = np.random.default_rng(seed).standard_normal(op.dim)
    for count in range(1, max_iter + 1):  # noqa: B007 - the count is returned
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


# "deflated" builds its own Krylov basis within the budget; "deflated by the λ run" is the audit's
# trace, deflated by the basis of the eigenvalue run (its products not counted in the budget).
TRACE_ROWS = ("hutchinson", "hutch++", "xtrace", "deflated", "deflated by the λ run")


def trace_error(model, loss_fn, batch, budgets: list[int], seeds: int, coverage_seeds: int) -> dict:
    op = HessianOperator(model, loss_fn, batch, dtype="float64")
    start = time.perf_counter()
    H = op.to_dense().numpy()
    exact = float(np.trace(H))
    dense_seconds = time.perf_counter() - start
    rows = []
    # The λ_max/λ_min Lanczos run analyze does anyway, from the stream the deflated trace needs.
    runs = [eigenvalues(op, which="BE", v0=krylov_start(s, op.dim), keep_krylov=True) for s in range(seeds)]
    for budget in budgets:
        for method in TRACE_ROWS:
            if method == "deflated by the λ run":
                results = [trace(op, "deflated", tol=0.0, max_matvecs=budget, seed=s, krylov=runs[s].krylov) for s in range(seeds)]
            else:
                results = [trace(op, method, tol=0.0, max_matvecs=budget, seed=s) for s in range(seeds)]
            errors = np.array([r.estimate - exact for r in results])
            rows.append({"method": method, "matvecs": budget,
                         "rms_relative_error": float(np.sqrt(np.mean(errors**2)) / abs(exact)),
                         "mean_ci_halfwidth_relative": float(np.mean([r.ci_halfwidth for r in results]) / abs(exact)),
                         "coverage": float(np.mean([abs(e) <= r.ci_halfwidth for e, r in zip(errors, results, strict=True)]))})
    dense = aslinearoperator(H)
    coverage = []
    for probes in (10, 30, 100):
        results = [trace(dense, "hutchinson", tol=0.0, max_matvecs=probes, seed=s) for s in range(coverage_seeds)]
        coverage.append({"probes": probes, "seeds": coverage_seeds,
                         "coverage": float(np.mean([abs(r.estimate - exact) <= r.ci_halfwidth for r in results]))})
    return {"dim": op.dim, "exact_trace": exact, "dense_seconds": dense_seconds, "seeds": seeds, "rows": rows,
            "hutchinson_coverage": coverage}


def print_times(title: str, times: dict, ratios_: dict) -> None:
    print(f"  {title} (seconds; min / median / max over {next(iter(times.values()))['rounds']} alternating rounds):")
    for name, t in times.items():
        ratio = "" if name == "native" else f"   native/{name} = {ratios_[name]:.2f}x"
        print(f"    {name:<32} {t['min']:.3f} / {t['median']:.3f} / {t['max']:.3f}{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (T=100, n=32, batch 32) for a smoke run")
    parser.add_argument("--T", type=int, default=None, help="sequence length (default 784; quick: 100)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden units (default 128; quick: 32)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128; quick: 32)")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds of the timing sections")
    parser.add_argument("--columns", type=int, default=8, help="matmat columns")
    parser.add_argument("--small-hidden", type=int, default=None, help="trace model hidden units (default 16; quick: 8)")
    parser.add_argument("--small-pixels", type=int, default=8, help="trace model: pixels per step (784/k steps)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--coverage-seeds", type=int, default=2000, help="seeds for the t-interval coverage (dense matrix)")
    parser.add_argument("--power-max-iter", type=int, default=150, help="cap of the power-to-residual run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    T = args.T or (100 if args.quick else 784)
    hidden = args.hidden or (32 if args.quick else 128)
    batch_size = args.batch or (32 if args.quick else 128)
    small_hidden = args.small_hidden or (8 if args.quick else 16)
    torch.set_num_threads(args.threads)
    loss_fn = Objective(True, False).loss_fn()

    task = load_task("smnist", seed=0)
    batch = (task.train.x[:batch_size, :T], task.train.y[:batch_size])
    model = lipschitz(1, hidden, 0.03)
    report = {"sizes": {"T": T, "hidden": hidden, "batch": batch_size}, "threads": args.threads,
              "load_average_at_start": os.getloadavg(), "environment": environment("cpu"),
              "notes": ["CPU only (torch threads as given); the machine is shared, so compare ratios within a run.",
                        "Untrained model (seed 0) on the first real MNIST training digits of the vendored set."]}
    print(f"Lipschitz RNN T={T} n={hidden} batch={batch_size} on {task.description}; CPU, {args.threads} thread(s)")

    report["products"] = product_times(model, loss_fn, batch, args.repeats)
    h = report["products"]
    print_times("per Hessian-vector product", h["hessian"], h["hessian_ratio_native_over"])
    print_times("per GGN-vector product", h["ggn"], h["ggn_ratio_native_over"])
    print(f"    peers not installed (skipped): {', '.join(h['peers_missing']) or 'none'}; "
          f"native cached graph ~{h['graph_bytes_estimate'] / 2**20:.0f} MiB")

    report["matmat"] = matmat_times(model, loss_fn, batch, args.columns, args.repeats)
    m = report["matmat"]
    print(f"  matmat, {m['columns']} columns, seconds per column (min / median / max): loop "
          f"{m['per_column']['loop']['min']:.3f} / {m['per_column']['loop']['median']:.3f} / "
          f"{m['per_column']['loop']['max']:.3f}, "
          f"batched {m['per_column']['batched']['min']:.3f} / {m['per_column']['batched']['median']:.3f} / "
          f"{m['per_column']['batched']['max']:.3f}; batched/loop {m['ratio_batched_over_loop']:.2f}x")
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
    report["trace"] = trace_error(small, loss_fn, small_batch, budgets, args.seeds, args.coverage_seeds)
    t = report["trace"]
    print(f"  trace vs budget (n={small_hidden}, T={small_task.seq_len}, batch 64, P={t['dim']}, exact {t['exact_trace']:.6g}, "
          f"{t['seeds']} seeds; relative RMS error / mean relative CI half-width / coverage):")
    for method in TRACE_ROWS:
        cells = [f"{r['matvecs']}: {r['rms_relative_error']:.3f}/{r['mean_ci_halfwidth_relative']:.3f}/{r['coverage']:.1f}"
                 for r in t["rows"] if r["method"] == method]
        print(f"    {method:<21} " + "  ".join(cells))
    print("  Hutchinson 95% t-interval coverage of the exact trace: " + ", ".join(
        f"{c['probes']} probes {c['coverage']:.3f}" for c in t["hutchinson_coverage"]) + f" ({args.coverage_seeds} seeds)")
    print("  notes: " + " ".join(report["notes"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
