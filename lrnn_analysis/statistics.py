"""Confidence intervals shared by the estimators and the sweeps."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["t_halfwidth"]


def t_halfwidth(samples: Sequence[float] | np.ndarray, confidence: float = 0.95) -> float:
    """Half-width t_{(1+confidence)/2, m-1} * s / sqrt(m) of the t-interval for the mean of m samples
    (infinite for m < 2: one sample says nothing about the spread)."""
    from scipy import stats  # imported here: scipy.stats takes longer to import than all the rest of the toolkit

    m = len(samples)
    if m < 2:
        return math.inf
    return float(stats.t.ppf(0.5 + confidence / 2, m - 1) * np.std(samples, ddof=1) / math.sqrt(m))
