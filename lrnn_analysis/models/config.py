"""The frozen, JSON-serialisable description from which a model is rebuilt."""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..choices import ARCHITECTURES, DISCRETIZATIONS, LIPSCHITZ_RANGE, MAX_SIZES, READOUTS
from ..errors import InputError

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and hyper-parameters of a recurrent classifier/regressor.

    ``beta_a``/``gamma_a`` and ``beta_w``/``gamma_w`` build A and W of the Lipschitz
    RNN, X = (1 - beta)(M + M^T) + beta (M - M^T) - gamma I; the antisymmetric RNN
    uses ``gamma_w`` as its diagonal shift. ``eps`` is the step per input step (for
    ``node``, the integration interval [0, eps], split into ``ode_substeps`` steps of
    the fixed-grid solver ``discretization``). Recurrent matrices M are initialised
    with entries ~ N(0, (init_std / hidden)^2), as in the reference implementation.

    ``contracting`` and ``ren`` (:mod:`.contracting`) contract at rate ``rho`` per step
    for every parameter value; ``rank`` is the number of rows m of their Z (contracting,
    at most 2 * hidden) or X (ren, at most 3 * hidden), 0 meaning hidden;
    ``cond_penalty`` the weight kappa of kappa * mean(log^2 sigma_i(T)) added to the
    training loss of ``contracting`` (``eps`` is the step of its euler Lur'e form).
    ``lipschitz-ren`` (:mod:`.lipschitz_bounded`) is built on ``contracting`` (``rho``, ``rank``;
    no ``cond_penalty``), its sequence map x -> y having incremental l2-gain at most ``lipschitz`` (G > 0).

    ``readout`` is what the model outputs: ``"last"`` D h_T + d, shape (batch, output_dim), or
    ``"all"`` D h_t + d for every step t, shape (batch, time, output_dim). It concerns the decoder
    only; the recurrence, and so every certificate, is the same.
    """

    arch: str
    input_dim: int
    hidden: int
    output_dim: int
    eps: float = 0.1
    discretization: str = ""
    beta_a: float = 0.75
    gamma_a: float = 0.001
    beta_w: float = 0.75
    gamma_w: float = 0.001
    init_std: float = 0.1
    ode_substeps: int = 1
    rho: float = 0.999
    rank: int = 0
    cond_penalty: float = 0.1
    lipschitz: float = 1.0
    readout: str = "last"

    def __post_init__(self) -> None:
        for name in ("arch", "discretization", "readout"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name} must be a string, got {_short(getattr(self, name))}")
        if self.arch not in DISCRETIZATIONS:
            raise InputError(f"unknown architecture {self.arch!r}; expected one of {ARCHITECTURES}")
        allowed = DISCRETIZATIONS[self.arch]
        if not self.discretization:
            object.__setattr__(self, "discretization", allowed[0])
        elif self.discretization not in allowed:
            raise InputError(f"{self.arch} runs with {allowed}, not {self.discretization!r}")
        if self.readout not in READOUTS:
            raise InputError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        for name, limit in MAX_SIZES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise InputError(f"{name} must be an integer in [1, {limit}], got {_short(value)}")
        # rank 0 means "hidden"; the constructions use at most the 3 * hidden rows of X.
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank <= 3 * self.hidden:
            raise InputError(f"rank must be an integer in [0, 3 * hidden = {3 * self.hidden}], got {_short(self.rank)}")
        for name in ("eps", "beta_a", "gamma_a", "beta_w", "gamma_w", "init_std", "rho", "cond_penalty", "lipschitz"):
            value = getattr(self, name)
            finite = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max
            if not finite or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {_short(value)}")
            object.__setattr__(self, name, float(value))
        if self.eps <= 0:
            raise InputError(f"eps must be > 0, got {self.eps}")
        if not 0 < self.rho <= 1:
            raise InputError(f"rho must be in (0, 1], got {self.rho}")
        if self.cond_penalty < 0:
            raise InputError(f"cond_penalty must be >= 0, got {self.cond_penalty}")
        if not LIPSCHITZ_RANGE[0] <= self.lipschitz <= LIPSCHITZ_RANGE[1]:
            raise InputError(f"lipschitz must be in [{LIPSCHITZ_RANGE[0]:g}, {LIPSCHITZ_RANGE[1]:g}], got {self.lipschitz}")
        if self.lipschitz != 1.0 and self.arch != "lipschitz-ren":
            raise InputError(f"lipschitz is the bound G a lipschitz-ren model is built to; a {self.arch} model is built to none "
                             f"(got {self.lipschitz})")
        if self.init_std <= 0:
            raise InputError(f"init_std must be > 0, got {self.init_std}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise InputError(f"model config must be a mapping, got {type(data).__name__}")
        if not all(isinstance(key, str) for key in data):
            raise InputError(f"model config keys must be strings, got {[k for k in data if not isinstance(k, str)][:3]}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown model config keys {sorted(unknown)}")
        missing = {"arch", "input_dim", "hidden", "output_dim"} - set(data)
        if missing:
            raise InputError(f"model config lacks {sorted(missing)}")
        return cls(**data)


def _short(value: Any) -> str:
    """repr of a bad value, cut short (a hostile file may hold a 10^400 integer)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= 60 else text[:57] + "..."
