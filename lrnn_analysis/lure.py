"""Lur'e form of a recurrent network: h' = A h + sigma(W h + u).

Every model in the zoo (except gated ones) is written as this linear system in
feedback with an elementwise nonlinearity sigma whose slope lies in [0, L],
together with the scheme that is actually run:

* ``ode``   continuous time, dh/dt = A h + sigma(W h + u);
* ``euler`` h+ = h + eps * f(h, u);
* ``rk2``   explicit midpoint, h+ = h + eps * f(h + eps/2 * f(h, u), u);
* ``rk4``   classical Runge-Kutta with u held over the step;
* ``rk38``  Kutta's 3/8-rule Runge-Kutta (torchdiffeq's fixed-grid ``rk4``) with u held:
            k1 = f(h), k2 = f(h + eps k1/3), k3 = f(h + eps (k2 - k1/3)),
            k4 = f(h + eps (k1 - k2 + k3)), h+ = h + eps (k1 + 3 k2 + 3 k3 + k4)/8;
* ``map``   h+ = sigma(W h + u)  (A is unused and must be zero).

Orientation: column vectors. W acts on the left of the state, h+ = sigma(W h + u), and
entry W[i, j] is the weight from unit j to unit i, as in ``torch.nn`` (``nn.RNN`` computes
W_hh h, its ``weight_hh_l0`` is W as stored). Code written with row vectors (``h @ M``)
has W = M^T: passing M itself describes a different network and can flip a certificate.
:func:`lrnn_analysis.stability.consistency.check_lure_form` and ``check_form`` catch such a mix-up
by running the model and the system side by side;
:func:`lrnn_analysis.stability.derivation.derive_lure_form` reads the form off the step itself.

``substeps`` repeats the scheme that many times per input step (a neural-ODE
RNN integrating over [0, eps_total] with a fixed grid). Matrices are float64
in the column convention; vectors passed to ``step``/``simulate`` may carry
leading batch dimensions (row convention on the last axis).

``activation`` names sigma: ``tanh``, ``relu``, ``hardtanh`` (clip to [-1, 1]), ``identity`` or
``leaky_relu(a)`` (z for z >= 0, a z below, a >= 0). Every one has slopes in [0, its largest
slope], which is all a certificate uses; the name only decides what ``step`` and ``simulate``
compute. :func:`activation` looks a name up.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["ACTIVATIONS", "METHODS", "Activation", "LureSystem", "activation"]

METHODS = ("ode", "euler", "rk2", "rk4", "rk38", "map")
ACTIVATIONS = ("tanh", "relu", "hardtanh", "identity", "leaky_relu(a)")
_LEAKY_RELU = re.compile(r"leaky_relu\((.+)\)")


@dataclass(frozen=True)
class Activation:
    """An elementwise sigma: its function, its derivative and its largest slope (the smallest is >= 0)."""

    name: str
    function: Callable[[np.ndarray], np.ndarray]
    derivative: Callable[[np.ndarray], np.ndarray]
    max_slope: float


_FIXED = {
    "tanh": Activation("tanh", np.tanh, lambda z: 1.0 - np.tanh(z) ** 2, 1.0),
    "relu": Activation("relu", lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(np.float64), 1.0),
    "hardtanh": Activation("hardtanh", lambda z: np.clip(z, -1.0, 1.0), lambda z: (np.abs(z) < 1).astype(np.float64), 1.0),
    "identity": Activation("identity", lambda z: np.array(z, dtype=np.float64), lambda z: np.ones_like(z, dtype=np.float64), 1.0),
}


def _leaky_relu(a: float) -> Activation:
    return Activation(f"leaky_relu({a!r})", lambda z: np.where(z >= 0, z, a * z),
                      lambda z: np.where(z >= 0, 1.0, a), max(1.0, a))


def activation(name: str) -> Activation:
    """The activation called ``name`` (one of :data:`ACTIVATIONS`, ``a`` a number >= 0); InputError otherwise."""
    if name in _FIXED:
        return _FIXED[name]
    match = _LEAKY_RELU.fullmatch(name) if isinstance(name, str) else None
    if match is not None:
        try:
            a = float(match.group(1))
        except ValueError:
            a = math.nan
        if math.isfinite(a) and a >= 0:
            return _leaky_relu(a)
    raise InputError(f"unknown activation {name!r}; expected one of {ACTIVATIONS} with a >= 0")


def _as_float64_matrix(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    array = np.array(value, dtype=np.float64, copy=True)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise InputError(f"{name} must be a square matrix, got shape {array.shape}")
    if array.shape[0] == 0:
        raise InputError(f"{name} is empty: a Lur'e system needs n >= 1 states")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} has non-finite entries")
    array.setflags(write=False)
    return array


def _is_positive_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return int(value) == value and value >= 1
    except (TypeError, ValueError, OverflowError):
        return False


@dataclass(frozen=True, eq=False)
class LureSystem:
    """h' = A h + sigma(W h + u), sigma elementwise with slope in [0, slope]."""

    A: np.ndarray
    W: np.ndarray
    slope: float = 1.0
    method: str = "ode"
    eps: float | None = None
    substeps: int = 1
    activation: str = "tanh"
    _sigma: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        A = _as_float64_matrix(self.A, "A")
        W = _as_float64_matrix(self.W, "W")
        if A.shape != W.shape:
            raise InputError(f"A {A.shape} and W {W.shape} must have the same shape")
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; expected one of {METHODS}")
        sigma = activation(self.activation)
        if not (np.isfinite(self.slope) and self.slope >= sigma.max_slope):
            raise InputError(f"slope {self.slope} must be >= {sigma.max_slope}, the largest slope of {self.activation}")
        if self.method in ("euler", "rk2", "rk4", "rk38"):
            if self.eps is None or not (np.isfinite(self.eps) and self.eps > 0):
                raise InputError(f"method {self.method!r} needs a step eps > 0, got {self.eps}")
        elif self.eps is not None:
            raise InputError(f"method {self.method!r} takes no step eps")
        if self.method == "map" and np.any(A != 0):
            raise InputError("method 'map' has no linear part: A must be zero")
        if not _is_positive_integer(self.substeps):
            raise InputError(f"substeps must be a positive integer, got {self.substeps}")
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "W", W)
        object.__setattr__(self, "slope", float(self.slope))
        object.__setattr__(self, "eps", None if self.eps is None else float(self.eps))
        object.__setattr__(self, "substeps", int(self.substeps))
        object.__setattr__(self, "activation", sigma.name)
        object.__setattr__(self, "_sigma", sigma.function)

    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def is_discrete(self) -> bool:
        return self.method != "ode"

    def vector_field(self, h: np.ndarray, u: np.ndarray) -> np.ndarray:
        """f(h, u) = A h + sigma(W h + u)."""
        return h @ self.A.T + self._sigma(h @ self.W.T + u)

    def step(self, h: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One input step of the discrete system (all substeps); undefined for 'ode'."""
        if self.method == "ode":
            raise InputError("a continuous-time system has no step; integrate vector_field instead")
        if self.method == "map":
            return self._sigma(h @ self.W.T + u)
        for _ in range(self.substeps):
            h = self._scheme_step(h, u)
        return h

    def _scheme_step(self, h: np.ndarray, u: np.ndarray) -> np.ndarray:
        f, e = self.vector_field, self.eps
        assert e is not None  # __post_init__ requires a step eps > 0 for every scheme that steps
        if self.method == "euler":
            return h + e * f(h, u)
        if self.method == "rk2":
            return h + e * f(h + 0.5 * e * f(h, u), u)
        k1 = f(h, u)
        if self.method == "rk38":
            k2 = f(h + (e / 3.0) * k1, u)
            k3 = f(h + e * (k2 - k1 / 3.0), u)
            k4 = f(h + e * (k1 - k2 + k3), u)
            return h + (e / 8.0) * (k1 + 3.0 * (k2 + k3) + k4)
        k2 = f(h + 0.5 * e * k1, u)
        k3 = f(h + 0.5 * e * k2, u)
        k4 = f(h + e * k3, u)
        return h + (e / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

    def simulate(self, h0: np.ndarray, inputs: np.ndarray) -> np.ndarray:
        """Hidden states h_1..h_T of the discrete system for inputs u_1..u_T.

        ``inputs`` has shape (..., T, n) and ``h0`` shape (..., n); returns (..., T, n).
        """
        h = np.asarray(h0, dtype=np.float64)
        states = []
        for t in range(inputs.shape[-2]):
            h = self.step(h, inputs[..., t, :])
            states.append(h)
        return np.stack(states, axis=-2)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "method": self.method,
            "eps": self.eps,
            "substeps": self.substeps,
            "slope": self.slope,
            "activation": self.activation,
            "A": self.A.tolist(),
            "W": self.W.tolist(),
        }
