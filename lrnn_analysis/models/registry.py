"""Architecture name -> model class, and ``build_model``."""
from __future__ import annotations

import torch

from .architectures import AntisymmetricRNN, CayleyRNN, GatedLipschitzRNN, LipschitzRNN, PlainWRNN, RecurrentModel
from .config import ModelConfig
from .contracting import ContractingREN, ContractingRNN

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
}


def build_model(config: ModelConfig, seed: int | None = None) -> RecurrentModel:
    """A freshly initialised model for ``config`` (initialisation drawn from ``seed`` if given)."""
    if seed is None:
        return MODEL_CLASSES[config.arch](config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODEL_CLASSES[config.arch](config)
