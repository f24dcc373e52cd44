"""Perturbation-robustness sweeps: input and parameter perturbations, batched, seeded, tidy results;
certified accuracy against l2 radius beside an l2 PGD attack."""
from .attack import AttackResult, PgdSettings, pgd_l2
from .certified import (
    CERTIFIED_FIELDS,
    BoundTightness,
    BoundViolation,
    CertifiedRobustness,
    bound_tightness,
    certified_robustness,
    input_jacobian_bounds,
    l2_noise,
    sequence_bound,
)
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
    "CERTIFIED_FIELDS", "AttackResult", "BoundTightness", "BoundViolation", "CertifiedRobustness", "PgdSettings",
    "bound_tightness", "certified_robustness", "input_jacobian_bounds", "l2_noise", "pgd_l2", "sequence_bound",
    "INPUT_KINDS", "KINDS", "PARAMETER_KINDS", "ROW_FIELDS", "SUMMARY_FIELDS", "ParameterDirections", "Perturbation",
    "SweepModel", "SweepResult", "evaluate_parameter_draws", "hessian_directions", "is_deterministic", "perturb_inputs", "perturb_parameters",
    "recurrent_parameter_names", "summarize", "sweep",
]
