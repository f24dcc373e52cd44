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
    parameter_shapes,
)
from .config import ARCHITECTURES, DISCRETIZATIONS, ModelConfig
from .reference import from_reference_state_dict, is_reference_state_dict, parse_reference_filename

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
    "from_reference_state_dict",
    "is_reference_state_dict",
    "lipschitz_matrix",
    "lure_step",
    "parameter_shapes",
    "parse_reference_filename",
]
