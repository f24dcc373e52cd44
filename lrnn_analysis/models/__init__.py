"""Model zoo: one registry, one interface (``build_model(config)``)."""
from .architectures import GatedLipschitzRNN, LipschitzRNN, LureRNN, RecurrentModel, lipschitz_matrix, lure_step
from .config import ARCHITECTURES, DISCRETIZATIONS, ModelConfig
from .contracting import ContractingREN, ContractingRNN, contracting_construction, ren_construction
from .lipschitz_bounded import LipschitzREN, lipschitz_construction
from .lstm import LSTMModel
from .registry import CHECKED_HYPERPARAMETERS, HYPERPARAMETERS, MODEL_CLASSES, build_model, parameter_shapes
from .torchnn import RecurrentLayer, SequenceClassifier, find_recurrent_layers, recurrent_parameter_patterns

__all__ = [
    "ARCHITECTURES",
    "CHECKED_HYPERPARAMETERS",
    "ContractingREN",
    "ContractingRNN",
    "DISCRETIZATIONS",
    "MODEL_CLASSES",
    "GatedLipschitzRNN",
    "HYPERPARAMETERS",
    "LipschitzREN",
    "LipschitzRNN",
    "LSTMModel",
    "LureRNN",
    "ModelConfig",
    "RecurrentLayer",
    "RecurrentModel",
    "SequenceClassifier",
    "build_model",
    "contracting_construction",
    "find_recurrent_layers",
    "lipschitz_construction",
    "lipschitz_matrix",
    "lure_step",
    "parameter_shapes",
    "recurrent_parameter_patterns",
    "ren_construction",
]
