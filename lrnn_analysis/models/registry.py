"""Architecture name -> model class, the meta-device shape check, and ``build_model``."""
from __future__ import annotations

import math

import torch

from ..errors import InputError
from .architectures import AntisymmetricRNN, CayleyRNN, GatedLipschitzRNN, LipschitzRNN, PlainWRNN, RecurrentModel
from .config import ModelConfig
from .contracting import ContractingREN, ContractingRNN
from .lipschitz_bounded import LipschitzREN
from .lstm import LSTMModel

__all__ = ["CHECKED_HYPERPARAMETERS", "HYPERPARAMETERS", "MODEL_CLASSES", "build_model", "parameter_shapes"]

MODEL_CLASSES: dict[str, type[RecurrentModel]] = {
    "lipschitz": LipschitzRNN,
    "lipschitz-gated": GatedLipschitzRNN,
    "antisymmetric": AntisymmetricRNN,
    "cayley": CayleyRNN,
    "residual": PlainWRNN,
    "vanilla": PlainWRNN,
    "node": PlainWRNN,
    "contracting": ContractingRNN,
    "ren": ContractingREN,
    "lipschitz-ren": LipschitzREN,
    "lstm": LSTMModel,
}

_LIPSCHITZ = frozenset({"beta_a", "gamma_a", "beta_w", "gamma_w", "init_std"})
_CONSTRUCTED = frozenset({"rho", "rank", "init_std"})
# Of the hyper-parameters below, the ones each architecture reads (tested: changing any other one
# changes neither its parameters, outputs, Lur'e form nor loss term): ``lrnn train`` refuses an
# option that would be ignored. ``ode_substeps`` splits the step of every Lur'e-form scheme but a map;
# ``eps`` is read by the architectures that discretise a continuous-time field.
CHECKED_HYPERPARAMETERS = ("eps", "beta_a", "gamma_a", "beta_w", "gamma_w", "init_std", "ode_substeps", "rho", "rank",
                           "cond_penalty")
HYPERPARAMETERS: dict[str, frozenset[str]] = {
    "lipschitz": _LIPSCHITZ | {"eps", "ode_substeps"},
    "lipschitz-gated": _LIPSCHITZ | {"eps"},
    "antisymmetric": frozenset({"eps", "gamma_w", "init_std", "ode_substeps"}),
    "cayley": frozenset({"init_std"}),
    "residual": frozenset({"eps", "init_std", "ode_substeps"}),
    "vanilla": frozenset({"init_std"}),
    "node": frozenset({"eps", "init_std", "ode_substeps"}),
    "contracting": _CONSTRUCTED | {"eps", "cond_penalty"},
    "ren": _CONSTRUCTED,
    "lipschitz-ren": _CONSTRUCTED,
    "lstm": frozenset(),
}

# At most this many parameters (400 MB in float32): checked before anything is allocated.
_MAX_PARAMETERS = 100_000_000


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every state-dict tensor of the model ``config`` describes, computed
    on the meta device (nothing is allocated); ``InputError`` beyond ``_MAX_PARAMETERS``."""
    with torch.device("meta"):
        model = MODEL_CLASSES[config.arch](config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    count = sum(math.prod(shape) for shape in shapes.values())
    if count > _MAX_PARAMETERS:
        raise InputError(f"a {config.arch} model with hidden {config.hidden}, input_dim {config.input_dim} and "
                         f"output_dim {config.output_dim} has {count} parameters, more than the limit {_MAX_PARAMETERS}")
    return shapes


def build_model(config: ModelConfig, seed: int | None = None) -> RecurrentModel:
    """A freshly initialised model for ``config`` (initialisation drawn from ``seed`` if given)."""
    parameter_shapes(config)
    if seed is None:
        return MODEL_CLASSES[config.arch](config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODEL_CLASSES[config.arch](config)
