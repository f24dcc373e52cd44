"""Stability-constrained training of the Lipschitz RNN by projection.

After every optimizer step the recurrent parameters are shrunk radially,
M_A <- s M_A and M_W <- s M_W with the largest s in [0, 1] for which the chosen norm
certificate holds with margin m:

* ``ct-norm``     mu2(A) + L ||W||_2 <= -m;
* ``euler-norm``  ||I + eps A||_2 + eps L ||W||_2 <= 1 - m;
* ``rk2-norm``    ||I + eps A||_2 + eps L ||W||_2 + (eps^2/2)(||A||_2 + L ||W||_2)^2 <= 1 - m,

each evaluated in float64 with its round-off tolerance (``stability.norm_test``).
With A(s) = s A_0 - gamma_A I and W(s) = s W_0 - gamma_W I, where A_0, W_0 are the
unshifted parameterizations, every test value is a convex function of s, so the
feasible s form an interval [0, s*], found by a bracketing secant search. The shifts gamma are not
trained; s = 0 must be feasible (e.g. ct-norm needs gamma_A - L |gamma_W| >= m),
which is checked before training starts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .choices import CONSTRAINTS
from .errors import InputError
from .lure import LureSystem
from .models import LipschitzRNN, RecurrentModel
from .stability import norm_test, norm_test_threshold

__all__ = ["Projection", "StabilityConstraint", "check_feasible", "project"]

_SECANT_STEPS = 30


@dataclass(frozen=True)
class StabilityConstraint:
    certificate: str
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.certificate not in CONSTRAINTS:
            raise InputError(f"unknown constraint {self.certificate!r}; expected one of {CONSTRAINTS}")
        if not (np.isfinite(self.margin) and 0 <= self.margin < (1.0 if self.certificate != "ct-norm" else np.inf)):
            raise InputError(f"margin must be >= 0 (and < 1 for a discrete test), got {self.margin}")

    @property
    def bound(self) -> float:
        """The largest allowed test value (threshold minus margin)."""
        return norm_test_threshold(self.certificate) - self.margin

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Projection:
    scale: float
    value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unshifted(model: LipschitzRNN) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    c = model.config
    with torch.no_grad():
        A, W = model.matrices(torch.float64)
    eye = np.eye(c.hidden)
    return (A.cpu().numpy() + c.gamma_a * eye, W.cpu().numpy() + c.gamma_w * eye, c.gamma_a, c.gamma_w, c.eps)


def _test_value(constraint: StabilityConstraint, A: np.ndarray, W: np.ndarray, eps: float) -> float:
    """Test value plus its round-off tolerance: certified with the margin iff <= bound."""
    outcome = norm_test(LureSystem(A, W, method="euler", eps=eps), constraint.certificate)
    return outcome.value + outcome.tolerance


def check_feasible(model: RecurrentModel, constraint: StabilityConstraint) -> None:
    """Raise ``InputError`` unless ``model`` can satisfy ``constraint`` by shrinking (s = 0)."""
    if not isinstance(model, LipschitzRNN):
        raise InputError(f"stability-constrained training supports the lipschitz architecture, not {model.config.arch}")
    c = model.config
    scheme = constraint.certificate.split("-")[0]
    if scheme != "ct" and scheme != c.discretization:
        raise InputError(f"{constraint.certificate} certifies the {scheme} scheme but the model runs {c.discretization}")
    eye = np.eye(c.hidden)
    value = _test_value(constraint, -c.gamma_a * eye, -c.gamma_w * eye, c.eps)
    if value > constraint.bound:
        raise InputError(
            f"{constraint.certificate} with margin {constraint.margin} cannot hold for any M_A, M_W with "
            f"gamma_a={c.gamma_a}, gamma_w={c.gamma_w}, eps={c.eps} (value {value:.4g} at M = 0 exceeds "
            f"{constraint.bound:.4g}); raise gamma_a"
        )


def project(model: LipschitzRNN, constraint: StabilityConstraint) -> Projection:
    """Shrink M_A, M_W in place so the constraint holds; returns the scale applied and the final value.

    The scale comes from the Illinois variant of regula falsi on g(s) = f(s) - bound over a
    bracket [low, high] with low feasible and high infeasible; the bracket shrinks until it is
    within 1e-3 relative, and the feasible end is kept. f is convex in s, so the feasible set
    is [0, s*] and the bracket always contains s*.
    """
    A0, W0, gamma_a, gamma_w, eps = _unshifted(model)
    eye = np.eye(A0.shape[0])

    def excess(s: float) -> float:
        return _test_value(constraint, s * A0 - gamma_a * eye, s * W0 - gamma_w * eye, eps) - constraint.bound

    g_high = excess(1.0)
    if g_high <= 0:
        return Projection(1.0, g_high + constraint.bound)
    low, g_low, high = 0.0, excess(0.0), 1.0
    kept = None
    for _ in range(_SECANT_STEPS):
        if high - low <= 1e-3 * high:
            break
        candidate = low + (high - low) * (-g_low) / (g_high - g_low)
        g = excess(candidate)
        if g <= 0:
            low, g_low = candidate, g
            if kept == "low":
                g_high *= 0.5
            kept = "low"
        else:
            high, g_high = candidate, g
            if kept == "high":
                g_low *= 0.5
            kept = "high"
    scale = low
    with torch.no_grad():
        originals = (model.M_A.detach().clone(), model.M_W.detach().clone())
        while True:
            model.M_A.copy_(originals[0] * scale)
            model.M_W.copy_(originals[1] * scale)
            A, W, *_ = _unshifted(model)
            final = _test_value(constraint, A - gamma_a * eye, W - gamma_w * eye, eps)
            if final <= constraint.bound or scale == 0.0:
                return Projection(scale, final)
            scale = scale * (1.0 - 1e-6) if scale > 1e-12 else 0.0
