"""Empirical falsification: pairs of trajectories under shared random inputs.

For a discrete system the map that is run (``LureSystem.step``) is iterated; for
``ode`` the ODE is integrated accurately (DOP853, rtol 1e-10) with each input held
over an interval of length ``dt``. Reported, over all pairs and times k:

* ``max_growth`` = max ||delta_k|| / ||delta_0|| (Euclidean);
* ``max_step_factor`` = max ||delta_{k+1}||_P / ||delta_k||_P (P = I unless given),
  directly comparable with a certified contraction factor (per input step, or
  per interval dt for ``ode``);
* a finite-time Lyapunov spectrum (top ``lyapunov_vectors`` exponents) along the
  first trajectory by the QR method on the tangent dynamics, per input step
  (discrete) or per unit time (``ode``).

Pairs whose distance falls below ``floor`` * (1 + ||h||) are dropped from the
ratios from then on: there the difference is roundoff, not dynamics.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.integrate

from ..lure import LureSystem, activation

__all__ = ["SimulationResult", "simulate_pairs"]


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of :func:`simulate_pairs` (see the module docstring)."""

    seed: int
    method: str
    pairs: int
    steps: int
    dt: float | None
    input_scale: float
    init_scale: float
    max_growth: float
    growth_curve: np.ndarray
    max_step_factor: float
    lyapunov_exponents: np.ndarray
    lyapunov_unit: str

    @property
    def top_lyapunov_exponent(self) -> float:
        return float(self.lyapunov_exponents[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "method": self.method,
            "pairs": self.pairs,
            "steps": self.steps,
            "dt": self.dt,
            "input_scale": self.input_scale,
            "init_scale": self.init_scale,
            "max_growth": self.max_growth,
            "growth_curve": self.growth_curve.tolist(),
            "max_step_factor": self.max_step_factor,
            "lyapunov_exponents": self.lyapunov_exponents.tolist(),
            "top_lyapunov_exponent": self.top_lyapunov_exponent,
            "lyapunov_unit": self.lyapunov_unit,
        }


def simulate_pairs(
    system: LureSystem,
    *,
    pairs: int = 16,
    steps: int = 100,
    seed: int = 0,
    input_scale: float = 1.0,
    init_scale: float = 1.0,
    dt: float = 0.1,
    P: np.ndarray | None = None,
    lyapunov_vectors: int = 1,
    floor: float = 1e-9,
) -> SimulationResult:
    """Simulate ``pairs`` trajectory pairs for ``steps`` input steps and measure divergence.

    Initial states are independent N(0, init_scale^2) vectors, inputs N(0,
    input_scale^2) shared within a pair. ``dt`` is the input interval for ``ode``
    (ignored otherwise).
    """
    rng = np.random.default_rng(seed)
    n = system.n
    P = np.eye(n) if P is None else np.asarray(P, dtype=np.float64)
    h = init_scale * rng.standard_normal((pairs, n))
    g = init_scale * rng.standard_normal((pairs, n))
    inputs = input_scale * rng.standard_normal((pairs, steps, n))
    advance = _ode_advance(system, dt) if system.method == "ode" else (lambda x, u: system.step(x, u))
    d0 = np.linalg.norm(h - g, axis=1)
    curve = np.ones(steps + 1)
    max_factor = 0.0
    alive = np.ones(pairs, dtype=bool)
    for k in range(steps):
        before = h - g
        h, g = advance(np.vstack([h, g]), np.vstack([inputs[:, k], inputs[:, k]])).reshape(2, pairs, n)
        after = h - g
        p_before = np.sqrt(np.einsum("bi,ij,bj->b", before, P, before))
        p_after = np.sqrt(np.einsum("bi,ij,bj->b", after, P, after))
        scale = 1.0 + np.maximum(np.linalg.norm(h, axis=1), np.linalg.norm(g, axis=1))
        alive &= np.linalg.norm(before, axis=1) > floor * scale
        if np.any(alive):
            max_factor = max(max_factor, float(np.max(p_after[alive] / p_before[alive])))
            curve[k + 1] = float(np.max(np.linalg.norm(after, axis=1)[alive] / d0[alive]))
        else:
            curve[k + 1] = 0.0
    exponents = _lyapunov(system, inputs[0], rng, dt, lyapunov_vectors)
    return SimulationResult(
        seed=seed,
        method=system.method,
        pairs=pairs,
        steps=steps,
        dt=dt if system.method == "ode" else None,
        input_scale=input_scale,
        init_scale=init_scale,
        max_growth=float(curve.max()),
        growth_curve=curve,
        max_step_factor=max_factor,
        lyapunov_exponents=exponents,
        lyapunov_unit="per unit time" if system.method == "ode" else "per input step",
    )


def _ode_advance(system: LureSystem, dt: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def advance(x: np.ndarray, u: np.ndarray) -> np.ndarray:
        shape = x.shape
        def rhs(_t: float, y: np.ndarray) -> np.ndarray:
            return system.vector_field(y.reshape(shape), u).ravel()

        sol = scipy.integrate.solve_ivp(rhs, (0.0, dt), x.ravel(), method="DOP853", rtol=1e-10, atol=1e-12)
        return sol.y[:, -1].reshape(shape)

    return advance


def _tangent_field(system: LureSystem, h: np.ndarray, V: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Directional derivatives of f(h, u) = A h + sigma(W h + u) along the columns of V."""
    slopes = activation(system.activation).derivative(system.W @ h + u)
    return system.A @ V + slopes[:, None] * (system.W @ V)


def _tangent_step(system: LureSystem, h: np.ndarray, V: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One input step of the scheme and of its linearization along V."""
    if system.method == "map":
        z = system.W @ h + u
        return system.step(h, u), activation(system.activation).derivative(z)[:, None] * (system.W @ V)
    def f(x: np.ndarray) -> np.ndarray:
        return system.vector_field(x, u)

    def tf(x: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return _tangent_field(system, x, Y, u)

    e = system.eps
    assert e is not None  # 'ode' is integrated by _ode_tangent and 'map' returned above; LureSystem requires eps for the schemes
    for _ in range(system.substeps):
        if system.method == "euler":
            h, V = h + e * f(h), V + e * tf(h, V)
        elif system.method == "rk2":
            hm, Vm = h + 0.5 * e * f(h), V + 0.5 * e * tf(h, V)
            h, V = h + e * f(hm), V + e * tf(hm, Vm)
        elif system.method == "rk38":
            k1, K1 = f(h), tf(h, V)
            h2, V2 = h + (e / 3.0) * k1, V + (e / 3.0) * K1
            k2, K2 = f(h2), tf(h2, V2)
            h3, V3 = h + e * (k2 - k1 / 3.0), V + e * (K2 - K1 / 3.0)
            k3, K3 = f(h3), tf(h3, V3)
            h4, V4 = h + e * (k1 - k2 + k3), V + e * (K1 - K2 + K3)
            k4, K4 = f(h4), tf(h4, V4)
            h, V = h + (e / 8.0) * (k1 + 3 * (k2 + k3) + k4), V + (e / 8.0) * (K1 + 3 * (K2 + K3) + K4)
        else:
            k1, K1 = f(h), tf(h, V)
            h2, V2 = h + 0.5 * e * k1, V + 0.5 * e * K1
            k2, K2 = f(h2), tf(h2, V2)
            h3, V3 = h + 0.5 * e * k2, V + 0.5 * e * K2
            k3, K3 = f(h3), tf(h3, V3)
            h4, V4 = h + e * k3, V + e * K3
            k4, K4 = f(h4), tf(h4, V4)
            h, V = h + (e / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4), V + (e / 6.0) * (K1 + 2 * K2 + 2 * K3 + K4)
    return h, V


def _lyapunov(system: LureSystem, inputs: np.ndarray, rng: np.random.Generator, dt: float, m: int) -> np.ndarray:
    """Finite-time Lyapunov exponents by QR re-orthonormalization after every input step."""
    n = system.n
    m = max(1, min(m, n))
    h = rng.standard_normal(n)
    Q, _ = np.linalg.qr(rng.standard_normal((n, m)))
    sums = np.zeros(m)
    for u in inputs:
        if system.method == "ode":
            h, V = _ode_tangent(system, h, Q, u, dt)
        else:
            h, V = _tangent_step(system, h, Q, u)
        Q, R = np.linalg.qr(V)
        diag = np.abs(np.diag(R))
        sums += np.log(np.maximum(diag, np.finfo(np.float64).tiny))
    duration = len(inputs) * (dt if system.method == "ode" else 1.0)
    return np.sort(sums / duration)[::-1]


def _ode_tangent(system: LureSystem, h: np.ndarray, V: np.ndarray, u: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    n, m = V.shape

    def rhs(_t: float, y: np.ndarray) -> np.ndarray:
        x, Y = y[:n], y[n:].reshape(n, m)
        return np.concatenate([system.vector_field(x, u), _tangent_field(system, x, Y, u).ravel()])

    y0 = np.concatenate([h, V.ravel()])
    sol = scipy.integrate.solve_ivp(rhs, (0.0, dt), y0, method="DOP853", rtol=1e-10, atol=1e-12)
    y = sol.y[:, -1]
    return y[:n], y[n:].reshape(n, m)
