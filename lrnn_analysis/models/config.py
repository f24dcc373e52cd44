"""The frozen, JSON-serialisable description from which a model is rebuilt."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# Schemes each architecture can be run with; the first is the default.
DISCRETIZATIONS: dict[str, tuple[str, ...]] = {
    "lipschitz": ("euler", "rk2"),
    "lipschitz-gated": ("euler",),
    "antisymmetric": ("euler",),
    "cayley": ("map",),
    "residual": ("euler",),
    "vanilla": ("map",),
    "node": ("rk4", "rk2", "euler"),
    "contracting": ("euler",),
    "ren": ("map",),
}
ARCHITECTURES = tuple(DISCRETIZATIONS)


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
    for every parameter value; ``rank`` is the number of rows m of their X (0: hidden),
    ``cond_penalty`` the weight kappa of kappa * mean(log^2 sigma_i(T)) added to the
    training loss of ``contracting`` (``eps`` is the step of its euler Lur'e form).
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

    def __post_init__(self) -> None:
        if self.arch not in DISCRETIZATIONS:
            raise ValueError(f"unknown architecture {self.arch!r}; expected one of {ARCHITECTURES}")
        allowed = DISCRETIZATIONS[self.arch]
        if not self.discretization:
            object.__setattr__(self, "discretization", allowed[0])
        elif self.discretization not in allowed:
            raise ValueError(f"{self.arch} runs with {allowed}, not {self.discretization!r}")
        for name in ("input_dim", "hidden", "output_dim", "ode_substeps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be a non-negative integer, got {self.rank!r}")
        for name in ("eps", "beta_a", "gamma_a", "beta_w", "gamma_w", "init_std", "rho", "cond_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")
        if self.cond_penalty < 0:
            raise ValueError(f"cond_penalty must be >= 0, got {self.cond_penalty}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        missing = {"arch", "input_dim", "hidden", "output_dim"} - set(data)
        if missing:
            raise ValueError(f"model config lacks {sorted(missing)}")
        return cls(**data)
