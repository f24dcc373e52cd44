"""The gain certificate a ``lipschitz-ren`` model carries by construction, and its stored evidence.

:class:`~lrnn_analysis.models.LipschitzREN` satisfies the gain LMI (*) of :mod:`.gain` with
P = Q = E^T P_c^-1 E (P_c its construction's P), multipliers Lambda, r = 1 and the construction's mu for every
parameter value, with mu = max(||Lambda^(1/2) U||_2^2, delta) (:mod:`lrnn_analysis.models.lipschitz_bounded`). :func:`construction_gain`
checks this in float64 from the weights: the explicit form h+ = A h + B w, w = tanh(C h + U x + b),
A = E^-1 F, B = E^-1 B (:func:`~.gain.explicit_gain_form`) with y = D h_T, and (Q, Lambda, r = 1)
go through the same closed-form mu, readout factors and float64 verification as every tier's
candidates (:func:`~.gain.certificate_at`), so the bound reported is the verified one (at most G up
to round-off) and the per-pair bounds are those of the weights, not of the construction's formula.
The bound holds for every horizon (r = 1).

A trained model stores, under the metadata key ``gain_evidence``, the verified P, multipliers, r,
mu, readout factor, pair factors, tier and the SHA-256 of the weights (JSON floats, read back bit for
bit). :func:`check_stored_gain` re-verifies them with :func:`~.gain.verify_gain` against the
weights as loaded: an edited weight or an edited number fails the check, with the reason.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .evidence import weights_sha256
from .gain import GainCertificate, GainForm, certificate_at, certificate_from_evidence, explicit_gain_form

__all__ = ["GAIN_EVIDENCE_KEY", "GainEvidenceCheck", "StoredGain", "check_stored_gain", "construction_gain",
           "construction_gain_form", "has_gain_construction"]

GAIN_EVIDENCE_KEY = "gain_evidence"
_SCHEMA = "lrnn-analysis/gain-evidence/1"
_TIER = "construction"


def has_gain_construction(model: Any) -> bool:
    """Whether ``model`` (a module) is built to a gain bound (``lipschitz_construction``)."""
    return callable(getattr(model, "lipschitz_construction", None))


def construction_gain_form(model: Any) -> tuple[GainForm, np.ndarray, np.ndarray]:
    """(explicit gain form, Q = E^T P^-1 E, Lambda) of a ``lipschitz-ren`` model, in float64 from its weights."""
    with torch.no_grad():
        c = model.construction(torch.float64)
        U = model.input_matrix(torch.float64)
        D = model.readout_matrix(torch.float64)
        solved = torch.linalg.solve(c.E, torch.cat([c.F, c.B], dim=1))
        Q = c.E.mT @ torch.linalg.solve(c.P, c.E)
    n = c.E.shape[0]
    # detach: in a float64 model, .to(torch.float64) returns the parameters themselves.
    A, B, C, U, D, Q = (t.detach().cpu().numpy() for t in (solved[:, :n], solved[:, n:], c.C, U, D, Q))
    gform = explicit_gain_form(A, B, C, U, D)
    return gform, 0.5 * (Q + Q.T), c.lam.detach().cpu().numpy()


def construction_gain(model: Any, horizon: int) -> GainCertificate:
    """The gain bound of ``model``'s construction over ``horizon`` input steps (the same for every
    horizon), verified in float64 from the weights, tier ``construction`` (module docstring)."""
    gform, Q, lam = construction_gain_form(model)
    return certificate_at(gform, Q, lam, 1.0, horizon, _TIER)


@dataclass(frozen=True, eq=False)
class StoredGain:
    """Gain evidence tied to weights by SHA-256: (P, multipliers, r, mu) satisfy (*), c P >= D^T D
    and pair_factors[i, j] P >= d_ij d_ij^T."""

    P: np.ndarray
    multipliers: np.ndarray
    r: float
    mu: float
    output_factor: float
    pair_factors: np.ndarray
    tier: str
    weights_sha256: str

    @classmethod
    def of(cls, certificate: GainCertificate, model: Any) -> StoredGain:
        """The evidence of a certificate that holds, for ``model``'s weights."""
        c = certificate
        if not c.holds or c.P is None or c.multipliers is None or c.pair_factors is None or c.r is None or c.mu is None \
                or c.output_factor is None or c.tier is None:
            raise ValueError("only a certificate that holds has evidence to store")
        return cls(c.P, c.multipliers, c.r, c.mu, c.output_factor, c.pair_factors, c.tier, weights_sha256(model))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": _SCHEMA, "tier": self.tier, "weights_sha256": self.weights_sha256, "r": float(self.r),
                "mu": float(self.mu), "output_factor": float(self.output_factor),
                "P": np.asarray(self.P, dtype=np.float64).tolist(),
                "multipliers": np.asarray(self.multipliers, dtype=np.float64).tolist(),
                "pair_factors": np.asarray(self.pair_factors, dtype=np.float64).tolist()}

    @classmethod
    def from_dict(cls, data: Any) -> StoredGain:
        """Parse stored gain evidence; ``InputError`` names what is malformed."""
        if not isinstance(data, Mapping) or data.get("schema") != _SCHEMA:
            raise InputError(f"not {_SCHEMA} evidence")
        missing = {"tier", "weights_sha256", "r", "mu", "output_factor", "P", "multipliers", "pair_factors"} - set(data)
        if missing:
            raise InputError(f"gain evidence lacks {sorted(missing)}")
        for key in ("r", "mu", "output_factor"):
            if isinstance(data[key], bool) or not isinstance(data[key], (int, float)):
                raise InputError(f"{key} is not a number: {data[key]!r}")
        for key in ("tier", "weights_sha256"):
            if not isinstance(data[key], str):
                raise InputError(f"{key} is not a string")
        try:
            arrays = [np.array(data[key], dtype=np.float64) for key in ("P", "multipliers", "pair_factors")]
        except (TypeError, ValueError) as error:
            raise InputError(f"P, multipliers or pair_factors are not arrays of numbers ({error})") from error
        P, multipliers, pair_factors = arrays
        return cls(P, multipliers, float(data["r"]), float(data["mu"]), float(data["output_factor"]), pair_factors,
                   data["tier"], data["weights_sha256"])


@dataclass(frozen=True, eq=False)
class GainEvidenceCheck:
    """Outcome of :func:`check_stored_gain`: ``status`` is ``absent``, ``verified`` or ``failed``;
    ``certificate`` is the verified bound when ``verified``."""

    status: str
    reason: str
    seconds: float
    certificate: GainCertificate | None = None

    @property
    def verified(self) -> bool:
        return self.status == "verified"

    def describe(self) -> str:
        if self.status == "absent":
            return "no stored gain evidence"
        if self.verified:
            return f"gain bound verified from stored evidence in {self.seconds * 1e3:.1f} ms"
        return f"STORED GAIN EVIDENCE NOT VERIFIED: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "seconds": self.seconds}


def check_stored_gain(model: Any, metadata: Mapping[str, Any], horizon: int) -> GainEvidenceCheck:
    """Verify the gain evidence stored in ``metadata`` (if any) against ``model``'s weights as they
    are now, over ``horizon`` steps; never raises on bad evidence (``failed`` with the reason)."""
    start = time.perf_counter()
    if GAIN_EVIDENCE_KEY not in metadata:
        return GainEvidenceCheck("absent", "no stored gain evidence", 0.0)

    def failed(reason: str) -> GainEvidenceCheck:
        return GainEvidenceCheck("failed", reason, time.perf_counter() - start)

    if not has_gain_construction(model):
        return failed(f"gain evidence applies to a lipschitz-ren model, not a {type(model).__name__}")
    try:
        stored = StoredGain.from_dict(metadata[GAIN_EVIDENCE_KEY])
    except ValueError as error:
        return failed(f"stored gain evidence is malformed ({error})")
    if stored.tier != _TIER:
        return failed(f"stored gain evidence names the tier {stored.tier[:40]!r}, not {_TIER!r}")
    digest = weights_sha256(model)
    if digest != stored.weights_sha256:
        return failed(f"the weights changed since the gain evidence was stored (SHA-256 {digest[:12]}... "
                      f"!= stored {stored.weights_sha256[:12]}...)")
    gform = construction_gain_form(model)[0]
    certificate = certificate_from_evidence(gform, stored.P, stored.multipliers, stored.r, stored.mu,
                                            stored.output_factor, stored.pair_factors, horizon, _TIER)
    if not certificate.holds:
        return failed(certificate.reason)
    return GainEvidenceCheck("verified", "verified from stored evidence", time.perf_counter() - start, certificate)
