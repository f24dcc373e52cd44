"""Curvature of the loss: the Hessian as a linear operator and estimators over it.

    from lrnn_analysis.hessian import HessianOperator, eigenvalues, trace
    op = HessianOperator(model, loss_fn, (x, y), params="M_A,M_W")
    top = eigenvalues(op, k=1, which="LA")       # .values, .residuals, .converged, .matvecs
    tr = trace(op, method="hutch++")              # .estimate ± .ci_halfwidth
"""
from .analysis import BACKENDS, HessianReport, analyze
from .curvature import (
    OPERATOR_KINDS,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    JacobianSandwichOperator,
    curvature_operator,
)
from .density import DensityResult, spectral_density
from .eigen import WHICH, EigenResult, eigenvalues, power_iteration
from .landscape import LandscapeResult, eigenvector_directions, landscape, random_directions
from .lanczos import Lanczos
from .operator import CurvatureOperator, HessianOperator, ParameterSelection, match_parameters, select_parameters
from .pyhessian_backend import pyhessian_eigenvalues, pyhessian_trace
from .trace import METHODS, TraceResult, trace

__all__ = [
    "BACKENDS",
    "OPERATOR_KINDS",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "JacobianSandwichOperator",
    "ParameterSelection",
    "curvature_operator",
    "match_parameters",
    "METHODS",
    "WHICH",
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "HessianReport",
    "LandscapeResult",
    "Lanczos",
    "TraceResult",
    "analyze",
    "eigenvalues",
    "eigenvector_directions",
    "landscape",
    "power_iteration",
    "pyhessian_eigenvalues",
    "pyhessian_trace",
    "random_directions",
    "select_parameters",
    "spectral_density",
    "trace",
]
