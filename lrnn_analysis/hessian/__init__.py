"""Curvature of the loss: the Hessian as a linear operator and estimators over it.

    from lrnn_analysis.hessian import HessianOperator, eigenvalues, trace
    op = HessianOperator(model, loss_fn, (x, y), params="M_A,M_W")
    top = eigenvalues(op, k=1, which="LA")       # .values, .residuals, .converged, .matvecs
    tr = trace(op, method="hutch++")              # .estimate ± .ci_halfwidth
    G = GGNOperator(model, loss_fn, (x, y))       # also FisherOperator, EmpiricalFisherOperator
"""
from .analysis import BACKENDS, HessianReport, analyze
from .blocks import BLOCK_FIELDS, BlockTable, BlockView, block_curvature
from .curvature import (
    OPERATOR_KINDS,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    JacobianSandwichOperator,
    curvature_operator,
)
from .density import DensityResult, spectral_density
from .diagonal import DIAGONAL_METHODS, DiagonalResult, FrobeniusResult, diagonal, frobenius_norm_squared
from .eigen import WHICH, EigenResult, LambdaMaxTrack, eigenvalues, power_iteration, track_lambda_max, warm_start
from .lanczos import Lanczos
from .landscape import LandscapeResult, eigenvector_directions, landscape, random_directions
from .operator import CurvatureOperator, HessianOperator, ParameterSelection, parameter_selection, select_parameters
from .pyhessian_backend import pyhessian_eigenvalues, pyhessian_trace
from .trace import METHODS, TraceResult, trace

__all__ = [
    "BACKENDS",
    "OPERATOR_KINDS",
    "BLOCK_FIELDS",
    "DIAGONAL_METHODS",
    "BlockTable",
    "BlockView",
    "CurvatureOperator",
    "DiagonalResult",
    "FrobeniusResult",
    "LambdaMaxTrack",
    "block_curvature",
    "diagonal",
    "frobenius_norm_squared",
    "track_lambda_max",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "JacobianSandwichOperator",
    "ParameterSelection",
    "curvature_operator",
    "parameter_selection",
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
    "warm_start",
]
