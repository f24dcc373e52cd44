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
from .torchnn import RecurrentLayer, SequenceClassifier, find_recurrent_layers, recurrent_parameter_patterns

__all__ = [
    "ARCHITECTURES",
    "DISCRETIZATIONS",
    "MODEL_CLASSES",
    "GatedLipschitzRNN",
    "LipschitzRNN",
    "LureRNN",
    "ModelConfig",
    "RecurrentLayer",
    "RecurrentModel",
    "SequenceClassifier",
    "build_model",
    "find_recurrent_layers",
    "lipschitz_matrix",
    "lure_step",
    "parameter_shapes",
    "recurrent_parameter_patterns",
]
