"""Import of checkpoints from the reference implementation (erichson/LipschitzRNN).

The reference stores row vectors and runs
    h <- h + eps * alpha * (h @ A_ref) + eps * tanh(h @ W_ref + E(x_t)),
with A_ref built from parameter ``B`` and W_ref from ``C`` by the Lipschitz
parameterization (one beta and one gamma shared by both), input map ``E`` and
decoder ``D``. In our column convention A = alpha * A_ref^T and W = W_ref^T. Since
X(M)^T = X(M^T) for the parameterization, M_A = alpha * B^T with gamma_A = alpha *
gamma, and M_W = C^T with gamma_W = gamma.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .architectures import LipschitzRNN, parameter_shapes
from .config import ModelConfig

REFERENCE_KEYS = ("B", "C", "E.weight", "E.bias", "D.weight", "D.bias")
_NUMERIC_FIELDS = {"T": int, "units": int, "beta": float, "alpha": float, "gamma": float,
                   "eps": float, "gclip": float, "seed": int, "init": float}
_TEXT_FIELDS = {"solver", "optimizer"}


def is_reference_state_dict(state_dict: Mapping[str, Any]) -> bool:
    keys = {k.removeprefix("module.") for k in state_dict}
    return {"B", "C", "E.weight", "D.weight"} <= keys


def from_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    beta: float,
    gamma: float,
    eps: float,
    alpha: float = 1.0,
    init_std: float = 0.1,
) -> LipschitzRNN:
    """Our ``lipschitz`` (Euler) model computing exactly what the reference model computes."""
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing = [k for k in REFERENCE_KEYS if k not in state]
    if missing:
        raise ValueError(f"reference state dict lacks {missing}")
    for key in REFERENCE_KEYS:
        if not isinstance(state[key], torch.Tensor):
            raise ValueError(f"reference entry {key} is a {type(state[key]).__name__}, not a tensor")
    B, C = state["B"], state["C"]
    for key in ("B", "E.weight", "D.weight"):
        if state[key].ndim != 2:
            raise ValueError(f"reference tensor {key} has shape {tuple(state[key].shape)}, expected a matrix")
    n = B.shape[0]
    expected = {"B": (n, n), "C": (n, n), "E.bias": (n,), "D.weight": (state["D.weight"].shape[0], n),
                "D.bias": (state["D.weight"].shape[0],), "E.weight": (n, state["E.weight"].shape[1])}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"reference tensor {key} has shape {tuple(state[key].shape)}, expected {shape}")
    config = ModelConfig(
        arch="lipschitz",
        input_dim=int(state["E.weight"].shape[1]),
        hidden=int(n),
        output_dim=int(state["D.weight"].shape[0]),
        eps=float(eps),
        discretization="euler",
        beta_a=float(beta),
        gamma_a=float(alpha * gamma),
        beta_w=float(beta),
        gamma_w=float(gamma),
        init_std=float(init_std),
    )
    parameter_shapes(config)
    model = LipschitzRNN(config)
    ours = {
        "M_A": alpha * B.T,
        "M_W": C.T,
        "U.weight": state["E.weight"],
        "U.bias": state["E.bias"],
        "D.weight": state["D.weight"],
        "D.bias": state["D.bias"],
    }
    with torch.no_grad():
        model.load_state_dict({k: v.detach().to(torch.float32).contiguous() for k, v in ours.items()})
    return model


def parse_reference_filename(path: str | Path) -> dict[str, Any]:
    """Hyper-parameters from a reference checkpoint name, e.g.
    ``LipschitzRNN_mnist_T_784_units_128_beta_0.75_alpha_1_gamma_0.001_eps_0.03_solver_euler_gclip_0_optimizer_Adam_seed_1.pkl``
    (also the older ``..._T784_units128_beta0.75_...`` spelling). Unknown tokens are ignored."""
    stem = Path(path).name.split(".pkl")[0].split(".pt")[0]
    tokens = stem.split("_")
    found: dict[str, Any] = {}
    if len(tokens) >= 2:
        found["model"], found["task"] = tokens[0], tokens[1]
    fields = sorted(set(_NUMERIC_FIELDS) | _TEXT_FIELDS, key=len, reverse=True)
    i = 2
    while i < len(tokens):
        token = tokens[i]
        key = next((f for f in fields if token == f or (token.startswith(f) and _is_number(token[len(f):]))), None)
        if key is None:
            i += 1
            continue
        if token == key and i + 1 < len(tokens):
            raw, i = tokens[i + 1], i + 2
        else:
            raw, i = token[len(key):], i + 1
        if key in _TEXT_FIELDS:
            found[key] = raw
        elif _is_number(raw):
            found[key] = _NUMERIC_FIELDS[key](float(raw))
    return found


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text))
