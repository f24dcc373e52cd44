"""Model zoo: one registry, one interface (``build_model(config)``)."""
from .architectures import (
    MODEL_CLASSES,
    GatedLipschitzRNN,
    LipschitzRNN,
    LureRNN,
    RecurrentModel,
    build_model,
    lipschitz_matrix,
    lure_step,
)
from .config import ARCHITECTURES, DISCRETIZATIONS, ModelConfig

__all__ = [
    "ARCHITECTURES",
    "DISCRETIZATIONS",
    "MODEL_CLASSES",
    "GatedLipschitzRNN",
    "LipschitzRNN",
    "LureRNN",
    "ModelConfig",
    "RecurrentModel",
    "build_model",
    "lipschitz_matrix",
    "lure_step",
]
