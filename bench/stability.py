"""Time each certificate tier for ct-lmi and euler-lmi on random systems.

    python bench/stability.py                  # sizes 32 64 128, all tiers (minutes)
    python bench/stability.py --quick          # size 32 only
    python bench/stability.py --sizes 64 --tiers full-P --families ct

The systems are A = -I + 1.5 (M - M^T) + 0.3 M, W = 0.9 G / sqrt(n) (M, G Gaussian,
M scaled by 1/sqrt(n)), for which the norm tests fail, so every tier has work to
do. Euler uses eps = 0.05. Full P at n = 128 is skipped unless --full-p-128.
Prints one JSON line per (family, n, tier).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lrnn_analysis.stability import LureSystem, certify


def make_system(n: int, family: str, seed: int) -> LureSystem:
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n)) / np.sqrt(n)
    A = -np.eye(n) + 1.5 * (M - M.T) + 0.3 * M
    W = 0.9 * rng.standard_normal((n, n)) / np.sqrt(n)
    return LureSystem(A, W, method="ode" if family == "ct" else family, eps=None if family == "ct" else 0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--families", nargs="+", default=["ct", "euler"], choices=["ct", "euler"])
    parser.add_argument("--tiers", nargs="+", default=["norm", "P=I", "diag-P", "full-P"])
    parser.add_argument("--quick", action="store_true", help="size 32 only")
    parser.add_argument("--budget", type=float, default=300.0, help="time budget per tier run (s)")
    parser.add_argument("--full-p-128", action="store_true", help="also run full P at n >= 128")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    sizes = [32] if args.quick else args.sizes
    for n in sizes:
        for family in args.families:
            system = make_system(n, family, args.seed)
            for tier in args.tiers:
                if tier == "full-P" and n >= 128 and not args.full_p_128:
                    continue
                start = time.perf_counter()
                result = certify(system, [f"{family}-lmi"], time_budget=args.budget, tiers=[tier])[0]
                attempt = result.attempts[-1]
                print(
                    json.dumps(
                        {
                            "family": family,
                            "n": n,
                            "tier": tier,
                            "seconds": round(time.perf_counter() - start, 3),
                            "holds": result.holds,
                            "rate": result.rate,
                            "gain": result.gain,
                            "solves": attempt.solves,
                            "solver": attempt.solver,
                            "reason": attempt.reason,
                            "budget_exhausted": result.budget_exhausted,
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
