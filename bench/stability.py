"""Time the certificate tiers; compare the Riccati tier with the cvxpy full-P tier side by side.

    python bench/stability.py                  # per-tier timings, sizes 32 64 128 (minutes)
    python bench/stability.py --quick          # size 32 only
    python bench/stability.py --sizes 64 --tiers full-P --families ct
    python bench/stability.py --compare        # riccati vs full-P, n = 64 128 256 (a few minutes)
    python bench/stability.py --compare --sizes 64 --repeats 5 --sdp-budget 300

Random systems: "random" is A = -I + 1.5 (M - M^T) + 0.3 M, W = 0.9 G / sqrt(n) (M, G
Gaussian, M scaled by 1/sqrt(n)); "lipschitz" is the Lipschitz RNN's parameterization
A = (1 - b)(M + M^T) + b (M - M^T) - g I with b = 0.75, g = 0.5, M ~ N(0, 1/n), and
W the same with g = 0, M ~ N(0, 0.01/n). The norm tests fail on both, LMIs certify them.
Euler uses eps = 0.05 ("random") or 0.1 ("lipschitz"). Full P at n = 128 is skipped in
the per-tier mode unless --full-p-128.

--compare runs, for each system, the riccati tier and the full-P tier alternately
(--repeats times each), each with its own time budget, and prints one JSON line per
system with min/median/max seconds, the rate each certified (per input step; for ct the
decay rate a), the gain sqrt(cond P), the solve counts (for riccati also its Schur forms and
Lyapunov solves, which compare across loads where seconds do not) and the median time ratio
full-P / riccati. Full P is not run above --sdp-max-n (its dense interior-point or SCS solves
do not finish in minutes there); the line says so. --model adds a committed checkpoint (its
Lur'e form), in either mode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from lrnn_analysis.stability import LureSystem, certify


def make_system(n: int, family: str, seed: int) -> LureSystem:
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n)) / np.sqrt(n)
    A = -np.eye(n) + 1.5 * (M - M.T) + 0.3 * M
    W = 0.9 * rng.standard_normal((n, n)) / np.sqrt(n)
    return LureSystem(A, W, method="ode" if family == "ct" else family, eps=None if family == "ct" else 0.05)


def lipschitz_system(n: int, family: str, seed: int) -> LureSystem:
    rng = np.random.default_rng(seed)

    def parameterized(M: np.ndarray, gamma: float) -> np.ndarray:
        return 0.25 * (M + M.T) + 0.75 * (M - M.T) - gamma * np.eye(n)

    A = parameterized(rng.standard_normal((n, n)) / np.sqrt(n), 0.5)
    W = parameterized(0.1 * rng.standard_normal((n, n)) / np.sqrt(n), 0.0)
    return LureSystem(A, W, method="ode" if family == "ct" else family, eps=None if family == "ct" else 0.1)


def run_tier(system: LureSystem, name: str, tier: str, budget: float) -> dict:
    start = time.perf_counter()
    result = certify(system, [name], time_budget=budget, tiers=[tier])[0]
    attempt = result.attempts[-1] if result.attempts else None
    return {
        "seconds": time.perf_counter() - start,
        "holds": result.holds,
        "rate": result.rate,
        "gain": result.gain,
        "solves": None if attempt is None else attempt.solves,
        "work": None if attempt is None else attempt.work,
        "solver": None if attempt is None else attempt.solver,
        "reason": result.reason if attempt is None else attempt.reason,
        "budget_exhausted": result.budget_exhausted,
    }


def spread(runs: list[dict]) -> dict:
    seconds = [r["seconds"] for r in runs]
    rates = [r["rate"] for r in runs if r["holds"]]
    return {
        "seconds_min": round(min(seconds), 3),
        "seconds_median": round(statistics.median(seconds), 3),
        "seconds_max": round(max(seconds), 3),
        "holds": [r["holds"] for r in runs],
        "rate": rates[0] if rates else None,
        "rates_agree": len(set(rates)) <= 1,
        "gain": next((r["gain"] for r in runs if r["holds"]), None),
        "solves": runs[-1]["solves"],
        "work": runs[-1]["work"],
        "reason": runs[-1]["reason"],
        "budget_exhausted": any(r["budget_exhausted"] for r in runs),
    }


def compare(label: str, system: LureSystem, family: str, args: argparse.Namespace) -> None:
    name = f"{family}-lmi"
    norm = certify(system, [f"{family}-norm"])[0]
    riccati_runs, sdp_runs = [], []
    run_sdp = system.n <= args.sdp_max_n
    for _ in range(args.repeats):
        riccati_runs.append(run_tier(system, name, "riccati", args.budget))
        if run_sdp and len(sdp_runs) < args.sdp_repeats:
            sdp_runs.append(run_tier(system, name, "full-P", args.sdp_budget))
    line = {
        "system": label,
        "family": family,
        "n": system.n,
        "norm_test_holds": norm.holds,
        "riccati": spread(riccati_runs),
        "full-P": spread(sdp_runs) if sdp_runs else f"not run (n > --sdp-max-n {args.sdp_max_n})",
    }
    if sdp_runs:
        line["ratio_full-P_over_riccati_median"] = round(
            line["full-P"]["seconds_median"] / max(line["riccati"]["seconds_median"], 1e-9), 2
        )
    print(json.dumps(line), flush=True)


def model_system(path: str) -> LureSystem:
    from lrnn_analysis.checkpoints import load_checkpoint

    system = load_checkpoint(path).model.lure_form()
    if system is None:
        raise SystemExit(f"{path}: the model has no Lur'e form")
    return system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default 32 64 128 (64 128 256 with --compare)")
    parser.add_argument("--families", nargs="+", default=["ct", "euler"], choices=["ct", "euler"])
    parser.add_argument("--tiers", nargs="+", default=["norm", "P=I", "riccati", "diag-P", "full-P"])
    parser.add_argument("--quick", action="store_true", help="size 32 only")
    parser.add_argument("--budget", type=float, default=300.0, help="time budget per tier run (s)")
    parser.add_argument("--full-p-128", action="store_true", help="also run full P at n >= 128")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="riccati vs full-P side by side")
    parser.add_argument("--systems", nargs="+", default=["random", "lipschitz"], choices=["random", "lipschitz"])
    parser.add_argument("--model", nargs="*", default=[], help="checkpoints to add (their Lur'e form)")
    parser.add_argument("--repeats", type=int, default=3, help="riccati runs per system (--compare)")
    parser.add_argument("--sdp-repeats", type=int, default=1, help="full-P runs per system (--compare)")
    parser.add_argument("--sdp-budget", type=float, default=150.0, help="time budget per full-P run (s)")
    parser.add_argument("--sdp-max-n", type=int, default=64, help="largest n full-P runs at (--compare)")
    args = parser.parse_args()
    if args.compare:
        makers = {"random": make_system, "lipschitz": lipschitz_system}
        for path in args.model:
            system = model_system(path)
            compare(path, system, "ct" if system.method == "ode" else system.method, args)
        for n in args.sizes or [64, 128, 256]:
            for kind in args.systems:
                for family in args.families:
                    compare(f"{kind} seed {args.seed}", makers[kind](n, family, args.seed), family, args)
        return
    for path in args.model:
        system = model_system(path)
        family = "ct" if system.method == "ode" else system.method
        for tier in args.tiers:
            print(json.dumps({"model": path, "family": family, "n": system.n, "tier": tier,
                              **run_tier(system, f"{family}-lmi", tier, args.budget)}), flush=True)
    sizes = [32] if args.quick else (args.sizes or [32, 64, 128])
    for n in sizes:
        for family in args.families:
            system = make_system(n, family, args.seed)
            for tier in args.tiers:
                if tier == "full-P" and n >= 128 and not args.full_p_128:
                    continue
                run = run_tier(system, f"{family}-lmi", tier, args.budget)
                print(json.dumps({"family": family, "n": n, "tier": tier, **run}), flush=True)


if __name__ == "__main__":
    main()
