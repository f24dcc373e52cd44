"""Certified incremental l2-gain of the committed models: time to the bound and its looseness.

    python bench/gain.py                          # models/digits-*.safetensors, 10 s budget each
    python bench/gain.py --budget 30 --sdp        # also the SDP tier (cut off by the budget at n = 64)
    python bench/gain.py models/digits-contracting.safetensors --repeats 3
    python bench/gain.py --pairs 4 400 --budget 2 --repeats 5   # the pair checks of a wide readout

For every checkpoint with a Lur'e form: its horizon T is the sequence length of the checkpoint's
task; the bound comes from ``certify_gain`` (tiers closed-form and riccati, plus sdp with --sdp),
starting also from the checkpoint's stored contraction evidence when it verifies. The empirical
lower bound is the largest spectral norm of the input Jacobian d y / d x of the logit map over the
task's test inputs (float64 copy of the module); every Lipschitz constant is at least that. For the
pair bounds the same with the margin y_i - y_j. One JSON line per model (seconds per repeat, per tier,
the bound, rho, the lower bounds, their ratios and the certified accuracy at a few radii), then a
table. Timings come from a shared machine: compare only within one run.

``--pairs n k``: a random Euler system with n states and a readout of k outputs (seed 3, T = 6):
the time ``certify_gain`` takes against its budget, then the k (k - 1) / 2 pair checks of its
certificate as ``verify_gain`` runs them (stacked, one LAPACK call per chunk of pairs) against
the baseline they replaced (one eigenvalue problem of c P - d d^T per pair, ``_readout_margin``),
alternating, with the largest difference between their margins.
"""
from __future__ import annotations

import argparse
import glob
import json
import time

import numpy as np
import torch
from common import alternating_times, ratio_spread, spread
from threadpoolctl import threadpool_limits

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.errors import InputError
from lrnn_analysis.model_under_analysis import load_model
from lrnn_analysis.stability import LureSystem
from lrnn_analysis.stability import gain as gain_module
from lrnn_analysis.stability.evidence import check_stored
from lrnn_analysis.stability.gain import certified_radii, certify_gain, gain_form, sequence_map

RADII = (0.01, 0.03, 0.1)


def input_jacobians(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """d y / d x for every sample: (N, k, T * d), float64."""
    module = module.double().eval()
    x = x.double().requires_grad_(True)
    y = module(x)
    rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0] for i in range(y.shape[1])]
    return torch.stack(rows, dim=1).reshape(len(x), y.shape[1], -1).detach()


def measure(path: str, budget: float, tiers: list[str], repeats: int) -> dict | None:
    subject = load_model(path)
    try:
        system, U, D = sequence_map(subject)
    except InputError:
        return None
    record = subject.metadata["task"]
    task = load_task(record["name"], seed=record["seed"], **record.get("options", {}))
    stored = check_stored(subject.module, subject.metadata)
    evidence = stored.evidence if stored.verified else None
    seconds, results = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results.append(certify_gain(system, U, D, task.seq_len, evidence=evidence, time_budget=budget, tiers=tiers))
        seconds.append(time.perf_counter() - start)
    result = results[-1]
    J = input_jacobians(subject.module, task.test.x)
    lower = float(torch.linalg.matrix_norm(J, 2).max())
    k = J.shape[1]
    pair_lower = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            pair_lower[i, j] = pair_lower[j, i] = float(torch.linalg.vector_norm(J[:, i] - J[:, j], dim=1).max())
    with torch.no_grad():
        logits = subject.module(task.test.x.double())
    correct = (logits.argmax(1) == task.test.y).numpy()
    line = {
        "model": path, "method": system.method, "n": system.n, "T": task.seq_len, "evidence": evidence is not None,
        "seconds": seconds, "holds": result.holds, "tier": result.tier, "lipschitz": result.lipschitz,
        "rho": result.rho, "lower_bound": lower, "ratio": None if not result.holds else result.lipschitz / lower,
        "tiers": [{"tier": a.tier, "seconds": round(a.seconds, 3), "lipschitz": a.lipschitz, "reason": a.reason,
                   "work": a.work} for a in result.attempts],
        "budget_exhausted": result.budget_exhausted, "test_accuracy": float(correct.mean()),
    }
    if result.holds:
        off = ~np.eye(k, dtype=bool)
        line["pair_ratio_median"] = float(np.median(result.pair_bounds[off] / pair_lower[off]))
        radii = certified_radii(logits.numpy(), result.pair_bounds)
        line["median_certified_radius"] = float(np.median(radii[correct]))
        line["certified_accuracy"] = {str(r): float(np.mean(correct & (radii > r))) for r in RADII}
    return line


def pair_checks(n: int, k: int, budget: float, repeats: int) -> None:
    """The ``--pairs`` mode (module docstring)."""
    rng = np.random.default_rng(3)
    M = rng.standard_normal((n, n)) / np.sqrt(n)
    system = LureSystem(A=-np.eye(n) + 0.5 * (M - M.T), W=0.4 * rng.standard_normal((n, n)) / np.sqrt(n),
                        method="euler", eps=0.3)
    U, D = rng.standard_normal((n, 2)), rng.standard_normal((k, n))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        certificate = certify_gain(system, U, D, 6, tiers=["closed-form", "riccati"], time_budget=budget)
        seconds.append(time.perf_counter() - start)
    print(f"n = {n}, k = {k} ({k * (k - 1) // 2} pairs): certify_gain {spread(seconds)} (budget {budget:g} s), "
          f"holds {certificate.holds}, bound {certificate.lipschitz}")
    if not certificate.holds:
        return
    gform = gain_form(system, U, D)
    # The evidence as verify_gain checks it, scaled to lambda_max(P) = 1 (the factors inversely).
    scale = np.linalg.eigvalsh(certificate.P)[-1]
    P = certificate.P / scale
    rows, cols = np.triu_indices(k, 1)
    factors = certificate.pair_factors[rows, cols] * scale
    margins = {}

    def stacked() -> None:
        margins["stacked"] = gain_module._pair_margins(P, gform.D, rows, cols, factors)

    def one_by_one() -> None:
        margins["one by one"] = np.array([gain_module._readout_margin(P, c, (gform.D[i] - gform.D[j])[:, None])
                                          for c, i, j in zip(factors, rows, cols)])

    times = alternating_times({"stacked": stacked, "one by one": one_by_one}, repeats)
    for name, values in times.items():
        print(f"  pair checks, {name:10s} {spread(values)}")
    print(f"  speed-up of the stacked checks: {ratio_spread(times['one by one'], times['stacked'])}; "
          f"max |margin difference| {np.max(np.abs(margins['stacked'] - margins['one by one'])):.2e}, "
          f"smallest margin {np.min(margins['stacked']):.3e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="checkpoints (default: models/digits-*.safetensors)")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per certificate (default 10)")
    parser.add_argument("--sdp", action="store_true", help="also run the SDP tier within the budget")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--pairs", type=int, nargs=2, metavar=("N", "K"), help="the pair checks of a random system instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.pairs:
        with threadpool_limits(limits=1, user_api="blas"):
            pair_checks(*args.pairs, args.budget, args.repeats)
        return
    tiers = ["closed-form", "riccati"] + (["sdp"] if args.sdp else [])
    lines = []
    for path in args.models or sorted(glob.glob("models/digits-*.safetensors")):
        line = measure(path, args.budget, tiers, args.repeats)
        if line is None:
            print(json.dumps({"model": path, "skipped": "no Lur'e form of the whole sequence map"}))
            continue
        print(json.dumps(line), flush=True)
        lines.append(line)
    print(f"\n{'model':45s} {'scheme':6s} {'time (s)':>26s} {'rho':>9s} {'bound':>10s} {'lower':>8s} {'ratio':>9s}")
    for line in lines:
        bound = f"{line['lipschitz']:.4g}" if line["holds"] else "-"
        ratio = f"{line['ratio']:.3g}" if line["holds"] else "-"
        rho = f"{line['rho']:.6f}" if line["holds"] else "-"
        print(f"{line['model']:45s} {line['method']:6s} {spread(line['seconds']):>26s} {rho:>9s} {bound:>10s} "
              f"{line['lower_bound']:8.4g} {ratio:>9s}")


if __name__ == "__main__":
    main()
