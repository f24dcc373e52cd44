"""Stability analysis of Lur'e-form RNNs: spectra, certificates, parameterization bounds, falsification.

Public API::

    from lrnn_analysis.stability import LureSystem, spectrum, certify, certify_parameterization

Submodules load on first use (PEP 562), so a command that needs only the parameterization
bounds does not import the SDP solvers or torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BendixsonBox": ".spectra",
    "CERTIFICATES": ".certificates",
    "CascadeCertificate": ".cascade",
    "CertificateResult": ".certificates",
    "DerivedForm": ".derivation",
    "DiscretizationDiagnostics": ".spectra",
    "Evidence": ".certificates",
    "FormCheck": ".consistency",
    "GAIN_TIERS": ".gain",
    "GainCertificate": ".gain",
    "GatedCertificate": ".gated",
    "InitRadius": ".parameterization",
    "LureConsistency": ".consistency",
    "LureSystem": "..lure",
    "NORM_TESTS": ".norms",
    "NormTestOutcome": ".norms",
    "ParameterBounds": ".parameterization",
    "ParameterizationResult": ".parameterization",
    "PhaseCell": ".parameterization",
    "SimulationResult": ".simulate",
    "SpectrumReport": ".spectra",
    "TIERS": ".certificates",
    "TierAttempt": ".certificates",
    "Verification": ".verification",
    "bendixson_box": ".spectra",
    "certify": ".certificates",
    "certified_radii": ".gain",
    "certify_gain": ".gain",
    "construction_gain": ".construction_gain",
    "check_stored_gain": ".construction_gain",
    "certify_layers": ".cascade",
    "certify_parameterization": ".parameterization",
    "certify_recurrent": ".cascade",
    "certifying_gamma_A": ".parameterization",
    "check_form": ".consistency",
    "check_lure_form": ".consistency",
    "default_certificates": ".certificates",
    "derive_lure_form": ".derivation",
    "gated_contraction": ".gated",
    "gaussian_init_radius": ".parameterization",
    "norm_certificate_value": ".norms",
    "norm_test": ".norms",
    "norm_test_threshold": ".norms",
    "norm_test_value": ".norms",
    "parameter_bounds": ".parameterization",
    "phase_diagram": ".parameterization",
    "sequence_map": ".gain",
    "simulate_pairs": ".simulate",
    "spectrum": ".spectra",
    "verify_certificate": ".certificates",
    "verify_gain": ".gain",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
