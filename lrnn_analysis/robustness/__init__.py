"""Perturbation-robustness sweeps: input and parameter perturbations, batched, seeded, tidy results."""
from .directions import hessian_directions
from .perturbations import (
    INPUT_KINDS,
    KINDS,
    PARAMETER_KINDS,
    ParameterDirections,
    Perturbation,
    is_deterministic,
    perturb_inputs,
    perturb_parameters,
)
from .sweep import (
    ROW_FIELDS,
    SUMMARY_FIELDS,
    SweepModel,
    SweepResult,
    evaluate_parameter_draws,
    recurrent_parameter_names,
    summarize,
    sweep,
)

__all__ = [
    "INPUT_KINDS", "KINDS", "PARAMETER_KINDS", "ROW_FIELDS", "SUMMARY_FIELDS", "ParameterDirections", "Perturbation",
    "SweepModel", "SweepResult", "evaluate_parameter_draws", "hessian_directions", "is_deterministic", "perturb_inputs", "perturb_parameters",
    "recurrent_parameter_names", "summarize", "sweep",
]
