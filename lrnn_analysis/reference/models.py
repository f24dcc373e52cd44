"""The seven models of the reference implementation as toolkit models.

The reference (erichson/LipschitzRNN, ``rnn_models``/``RnnModels``) keeps row vectors,
``h @ X`` acting as X^T on a column h, reads z = E(x_t) per step, starts from h_0 = 0 and
outputs D(h_T). With X(M) = beta (M - M^T) + (1 - beta)(M + M^T) - gamma I:

* ``LipschitzRNN``        h <- h + eps alpha (h A) + eps tanh(h W + z),  A = X(B), W = X(C)
* ``LipschitzRNN_gated``  h <- h + eps [alpha (h A) + tanh(h W + z)] * sigmoid(h W + E_gate(x_t))
* ``LipschitzRNN_ODE``    dh/dt = h A + tanh(h W + z) (no alpha), one step of the fixed-grid solver
                          over [0, eps] (euler, midpoint = rk2, torchdiffeq's rk4 = the 3/8 rule
                          rk38); A = X(func.B), W = X(func.C)
* ``asymRNN``             h <- h + eps tanh(h (C - C^T - gamma I) + z)
* ``calRNN``              h <- tanh(h (I + S)^-1 (I - S) + z),  S = C - C^T
* ``resRNN``              h <- h + eps tanh(W(h) + z)   (``W`` an nn.Linear without bias)
* ``simpleRNN``           h <- tanh(W(h) + z)

In the toolkit's column convention each row-convention matrix X_ref becomes X_ref^T. Since
X(M)^T = X(M^T), (M - M^T - gI)^T = M^T - M - gI and ((I + S)^-1 (I - S))^T = (I - S)^-1 (I + S)
= (I + S^T)^-1 (I - S^T), every square parameter M becomes M^T, and alpha folds into A exactly:
alpha X(B)^T = X(alpha B^T) with gamma_A = alpha gamma. ``nn.Linear`` maps (E, E_gate, D and the
W of resRNN/simpleRNN, ``W(h) = h W.weight^T``) are already in the column convention.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InputError
from ..models import ModelConfig, RecurrentModel, build_model

__all__ = ["MODEL_HPARAMS", "MODEL_KEYS", "convert_reference_model", "identify_model", "strip_data_parallel"]

_IO = ("E.weight", "E.bias", "D.weight", "D.bias")
MODEL_KEYS: dict[str, frozenset[str]] = {
    "LipschitzRNN": frozenset({"B", "C", *_IO}),
    "LipschitzRNN_gated": frozenset({"B", "C", "E_gate.weight", "E_gate.bias", *_IO}),
    "LipschitzRNN_ODE": frozenset({"func.B", "func.C", *_IO}),
    "asymRNN": frozenset({"C", *_IO}),
    "calRNN": frozenset({"C", *_IO}),
    "resRNN": frozenset({"W.weight", *_IO}),
    "simpleRNN": frozenset({"W.weight", *_IO}),
}
# Hyper-parameters each model's forward pass reads (solver: LipschitzRNN_ODE only).
MODEL_HPARAMS: dict[str, tuple[str, ...]] = {
    "LipschitzRNN": ("beta", "gamma", "eps", "alpha"),
    "LipschitzRNN_gated": ("beta", "gamma", "eps", "alpha"),
    "LipschitzRNN_ODE": ("beta", "gamma", "eps", "solver"),
    "asymRNN": ("gamma", "eps"),
    "calRNN": (),
    "resRNN": ("eps",),
    "simpleRNN": (),
}
# torchdiffeq's fixed-grid solvers as the toolkit discretizations that run them exactly. Its
# "rk4" steps with rk4_alt_step_func, Kutta's 3/8 rule (the toolkit's rk38), not classical RK4;
# f does not depend on t, so the stage times it passes do not matter.
_ODE_SOLVERS = {"euler": "euler", "midpoint": "rk2", "rk4": "rk38"}
_KNOWN_UNSUPPORTED_SOLVERS = {
    **{name: "an adaptive solver: its steps depend on its error control, which the toolkit does not reproduce"
       for name in ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "scipy_solver")},
    **{name: "a multistep solver the toolkit does not run" for name in ("explicit_adams", "implicit_adams", "fixed_adams")},
}


def strip_data_parallel(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` prefix nn.DataParallel adds (all keys or none carry it)."""
    prefixed = [k.startswith("module.") for k in state]
    if any(prefixed) and not all(prefixed):
        raise InputError(f"some keys carry the DataParallel prefix 'module.' and some do not: {sorted(state)}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _candidate_models(keys: set[str] | frozenset[str]) -> list[str]:
    """Reference models whose parameters are exactly ``keys``."""
    return [name for name, expected in MODEL_KEYS.items() if set(keys) == expected]


def identify_model(keys: set[str] | frozenset[str], named: str | None) -> str:
    """The one reference model with parameter names ``keys``; ``named`` (from the pickle, the file
    name or the caller) decides between models with the same parameters and must agree with them."""
    candidates = _candidate_models(keys)
    found = sorted(keys)
    if named is not None:
        if named not in MODEL_KEYS:
            raise InputError(f"unknown reference model {named!r}; expected one of {list(MODEL_KEYS)}")
        if named not in candidates:
            expected = sorted(MODEL_KEYS[named])
            raise InputError(f"the file is named/recorded as a {named} model, whose parameters are {expected}, "
                             f"but its keys are {found}" + (f" (those of {' or '.join(candidates)})" if candidates else ""))
        return named
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(f"the keys {found} are those of no reference model "
                         f"({'; '.join(f'{m}: {sorted(k)}' for m, k in MODEL_KEYS.items())})")
    raise InputError(f"the keys {found} fit {' and '.join(candidates)} alike; the model name is needed "
                     "(keep the reference file name or pass model=...)")


def convert_reference_model(model: str, state: Mapping[str, torch.Tensor], hparams: Mapping[str, Any],
                            dtype: torch.dtype = torch.float32) -> RecurrentModel:
    """The toolkit model computing exactly what reference model ``model`` computes with parameters
    ``state`` (keys without the DataParallel prefix) and hyper-parameters ``hparams``."""
    keys = set(state)
    if keys != MODEL_KEYS[model]:
        raise InputError(f"a {model} model has parameters {sorted(MODEL_KEYS[model])}, got {sorted(keys)}")
    missing = [k for k in MODEL_HPARAMS[model] if hparams.get(k) is None]
    if missing:
        raise InputError(f"a {model} model needs {missing}")
    n, input_dim = (int(s) for s in state["E.weight"].shape) if state["E.weight"].ndim == 2 else (0, 0)
    output_dim = int(state["D.weight"].shape[0]) if state["D.weight"].ndim == 2 else 0
    shapes = {"E.weight": (n, input_dim), "E.bias": (n,), "D.weight": (output_dim, n), "D.bias": (output_dim,),
              **{k: (n, n) for k in ("B", "C", "func.B", "func.C", "W.weight")},
              "E_gate.weight": (n, input_dim), "E_gate.bias": (n,)}
    for key in sorted(keys):
        if n == 0 or output_dim == 0 or tuple(state[key].shape) != shapes[key]:
            raise InputError(f"reference tensor {key} has shape {tuple(state[key].shape)}, expected {shapes[key]} "
                             f"(hidden size from E.weight {tuple(state['E.weight'].shape)})")
    beta = float(hparams.get("beta", 0.0) or 0.0)
    gamma = float(hparams.get("gamma", 0.0) or 0.0)
    alpha = float(hparams["alpha"]) if "alpha" in MODEL_HPARAMS[model] else 1.0
    # Models without a step (calRNN, simpleRNN) keep the config's default eps, which they never use.
    sizes: dict[str, Any] = {"input_dim": input_dim, "hidden": n, "output_dim": output_dim}
    if "eps" in MODEL_HPARAMS[model]:
        sizes["eps"] = float(hparams["eps"])
    ours: dict[str, torch.Tensor] = {"U.weight": state["E.weight"], "U.bias": state["E.bias"],
                                     "D.weight": state["D.weight"], "D.bias": state["D.bias"]}
    if model in ("LipschitzRNN", "LipschitzRNN_gated", "LipschitzRNN_ODE"):
        B, C = (state["func.B"], state["func.C"]) if model == "LipschitzRNN_ODE" else (state["B"], state["C"])
        arch = "lipschitz-gated" if model == "LipschitzRNN_gated" else "lipschitz"
        scheme = _ode_scheme(hparams["solver"]) if model == "LipschitzRNN_ODE" else "euler"
        config = ModelConfig(arch, discretization=scheme, beta_a=beta, gamma_a=alpha * gamma,
                             beta_w=beta, gamma_w=gamma, **sizes)
        ours.update({"M_A": alpha * B.T, "M_W": C.T})
        if model == "LipschitzRNN_gated":
            ours.update({"V.weight": state["E_gate.weight"], "V.bias": state["E_gate.bias"]})
    elif model in ("asymRNN", "calRNN"):
        arch = "antisymmetric" if model == "asymRNN" else "cayley"
        config = ModelConfig(arch, gamma_w=gamma, **sizes)
        ours["M_W"] = state["C"].T
    else:
        config = ModelConfig("residual" if model == "resRNN" else "vanilla", **sizes)
        ours["M_W"] = state["W.weight"]
    converted = build_model(config).to(dtype)
    with torch.no_grad():
        converted.load_state_dict({k: v.detach().to(dtype).contiguous() for k, v in ours.items()})
    return converted


def _ode_scheme(solver: Any) -> str:
    if solver in _ODE_SOLVERS:
        return _ODE_SOLVERS[solver]
    why = _KNOWN_UNSUPPORTED_SOLVERS.get(solver, "not a torchdiffeq fixed-grid solver the toolkit knows")
    raise InputError(f"LipschitzRNN_ODE with solver {solver!r} cannot be loaded exactly: {why}; "
                     f"supported: {sorted(_ODE_SOLVERS)}")
