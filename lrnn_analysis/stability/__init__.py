"""Stability analysis of Lur'e-form RNNs: spectra, certificates, parameterization bounds, falsification.

Public API::

    from lrnn_analysis.stability import LureSystem, spectrum, certify, certify_parameterization
"""
from ..lure import LureSystem
from .certificates import (
    CERTIFICATES,
    TIERS,
    CertificateResult,
    Evidence,
    TierAttempt,
    certify,
    default_certificates,
    verify_certificate,
)
from .cascade import CascadeCertificate, certify_layers, certify_recurrent
from .consistency import LureConsistency, check_lure_form
from .gated import GatedCertificate, gated_contraction
from .parameterization import (
    InitRadius,
    ParameterBounds,
    ParameterizationResult,
    PhaseCell,
    certify_parameterization,
    certifying_gamma_A,
    gaussian_init_radius,
    parameter_bounds,
    phase_diagram,
)
from .norms import NORM_TESTS, NormTestOutcome, norm_certificate_value, norm_test, norm_test_threshold, norm_test_value
from .spectra import BendixsonBox, DiscretizationDiagnostics, SpectrumReport, bendixson_box, spectrum
from .simulate import SimulationResult, simulate_pairs
from .verification import Verification

__all__ = [
    "CERTIFICATES",
    "NORM_TESTS",
    "TIERS",
    "BendixsonBox",
    "CascadeCertificate",
    "CertificateResult",
    "DiscretizationDiagnostics",
    "Evidence",
    "GatedCertificate",
    "LureConsistency",
    "InitRadius",
    "LureSystem",
    "NormTestOutcome",
    "ParameterBounds",
    "ParameterizationResult",
    "PhaseCell",
    "SimulationResult",
    "SpectrumReport",
    "TierAttempt",
    "Verification",
    "bendixson_box",
    "certify",
    "certify_layers",
    "certify_recurrent",
    "check_lure_form",
    "certify_parameterization",
    "certifying_gamma_A",
    "default_certificates",
    "gated_contraction",
    "gaussian_init_radius",
    "norm_certificate_value",
    "norm_test",
    "norm_test_threshold",
    "norm_test_value",
    "parameter_bounds",
    "phase_diagram",
    "simulate_pairs",
    "spectrum",
    "verify_certificate",
]
