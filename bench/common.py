"""Timing helpers shared by the bench scripts.

Machines here are shared and noisy, so every comparison is measured in one run with the
contenders alternating (A B A B ...) and reported as min / median / max, together with the
ratio of each pair of consecutive runs (which cancels slow drifts of the machine's speed).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def alternating_times(contenders: Mapping[str, Callable[[], object]], repeats: int, warmup: bool = True,
                      sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Wall times of ``repeats`` rounds; each round calls every contender once, in order.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and before it stops,
    so asynchronous device work is counted in the call that launched it.
    """
    sync = sync or (lambda: None)
    if warmup:
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def summary(values: list[float]) -> dict[str, float]:
    """min / median / max of a list of measurements, and how many there are."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "rounds": len(values)}


def spread(values: list[float], unit: str = "s", digits: int = 3) -> str:
    """``median (min-max)`` of a list of measurements."""
    return (f"{statistics.median(values):.{digits}f} {unit} "
            f"(min {min(values):.{digits}f}, max {max(values):.{digits}f}, n={len(values)})")


def ratio_spread(numerator: list[float], denominator: list[float]) -> str:
    """Pairwise ratios numerator[i] / denominator[i] (same round) as ``median (min-max)``."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)"

