"""Certificate evidence carried in a checkpoint and re-verified in float64 before any search.

A certified model stores, under the metadata key ``certificate_evidence``: the certificate
(``euler-lmi`` etc. on the model's Lur'e form, or ``ren-contraction``), P, the diagonal
multipliers, the contraction factor per input step, the tier that found it
(``construction`` for the contracting architectures) and the SHA-256 of the weights it
belongs to. Arrays are nested lists of JSON floats, which Python writes with ``repr`` and
reads back bit for bit.

:func:`check_stored` re-runs the same float64 verification as the search
(:func:`~.certificates.verify_certificate`, or :func:`~.verification.verify` on the
REN's lifted increment form), so a stored certificate costs milliseconds to trust and a
changed weight or an edited number is caught: the check then fails with the reason and
callers search as if nothing were stored.

``ren-contraction``: for x+ = A x + B w (+ input), v = K x + D w + u, w = tanh(v) (the
explicit REN, :class:`~lrnn_analysis.models.ContractingREN`), increments (Delta, p) map to
Delta+ = [A, B] (Delta, p) with q = Delta v = [K, D] (Delta, p) in the sector [0, 1]; the
certificate is M = [A B]^T P [A B] - rho^2 E0^T P E0 + Sigma(Lambda) < 0, the discrete
form of :mod:`.forms` with these maps.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from ..errors import InputError, first_line
from ..lure import LureSystem
from .certificates import TIERS, CertificateResult, Evidence, _assumptions, _rate_meaning, certify, rounded_r, verify_certificate
from .forms import IncrementalForm, incremental_form
from .verification import Verification, verify

__all__ = ["EVIDENCE_TIERS", "EvidenceCheck", "METADATA_KEY", "REN_CERTIFICATE", "StoredEvidence",
    "certificate_result", "certify_trained", "check_stored", "construction_evidence", "explicit_increment_form",
    "search_evidence", "stored_then_searched", "weights_sha256"]

METADATA_KEY = "certificate_evidence"
_SCHEMA = "lrnn-analysis/evidence/1"
REN_CERTIFICATE = "ren-contraction"
_CONSTRUCTION_TIER = "construction"
# The tiers that can have found stored evidence: the search's own, and a model's construction.
_STORED_TIERS = (*TIERS, _CONSTRUCTION_TIER)
_RATE_BACKOFFS = (1e-9, 1e-7, 1e-5, 1e-3)


@dataclass(frozen=True, eq=False)
class StoredEvidence:
    """An LMI certificate of a model's recurrence, tied to its weights by SHA-256.

    ``rate`` is the contraction factor per input step (the units of :class:`CertificateResult`).
    """

    certificate: str
    P: np.ndarray
    multipliers: np.ndarray
    rate: float
    tier: str
    weights_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": _SCHEMA,
            "certificate": self.certificate,
            "tier": self.tier,
            "rate": float(self.rate),
            "weights_sha256": self.weights_sha256,
            "P": np.asarray(self.P, dtype=np.float64).tolist(),
            "multipliers": np.asarray(self.multipliers, dtype=np.float64).tolist(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> StoredEvidence:
        """Parse stored evidence; ``InputError`` names what is malformed."""
        if not isinstance(data, Mapping) or data.get("schema") != _SCHEMA:
            raise InputError(f"not {_SCHEMA} evidence")
        missing = {"certificate", "tier", "rate", "weights_sha256", "P", "multipliers"} - set(data)
        if missing:
            raise InputError(f"evidence lacks {sorted(missing)}")
        rate = data["rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise InputError(f"rate is not a number: {rate!r}")
        for key in ("certificate", "tier", "weights_sha256"):
            if not isinstance(data[key], str):
                raise InputError(f"{key} is not a string")
        try:
            P = np.array(data["P"], dtype=np.float64)
            multipliers = np.array(data["multipliers"], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise InputError(f"P or multipliers are not arrays of numbers ({error})") from error
        if P.ndim != 2 or multipliers.ndim not in (1, 2):
            raise InputError(f"P has shape {P.shape}, multipliers {multipliers.shape}")
        return cls(data["certificate"], P, multipliers, float(rate), data["tier"], data["weights_sha256"])


@dataclass(frozen=True)
class EvidenceCheck:
    """Outcome of :func:`check_stored`: ``status`` is ``absent``, ``verified`` or ``failed``."""

    status: str
    reason: str
    seconds: float
    evidence: StoredEvidence | None = None
    verification: Verification | None = None

    @property
    def verified(self) -> bool:
        return self.status == "verified"

    def _verified_parts(self) -> tuple[StoredEvidence, Verification]:
        """The evidence and its float64 verification of a verified check; ``ValueError`` otherwise."""
        if not self.verified:
            raise ValueError("only verified evidence becomes a certificate result")
        if self.evidence is None or self.verification is None:
            raise ValueError("a verified evidence check must carry its evidence and its verification")
        return self.evidence, self.verification

    def describe(self) -> str:
        if self.status == "absent":
            return "no stored certificate evidence"
        if self.verified:
            e, v = self._verified_parts()
            return (f"verified from stored evidence: {e.certificate} at rate {e.rate:.6g} (tier {e.tier}, "
                    f"LMI margin {v.margin:.3e}) in {self.seconds * 1e3:.1f} ms")
        return f"STORED EVIDENCE NOT VERIFIED: {self.reason}; searching for a certificate as usual"

    def to_dict(self) -> dict[str, Any]:
        e = self.evidence
        return {
            "status": self.status,
            "reason": self.reason,
            "seconds": self.seconds,
            "certificate": None if e is None else e.certificate,
            "rate": None if e is None else e.rate,
            "tier": None if e is None else e.tier,
            "verification": None if self.verification is None else self.verification.to_dict(),
        }


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the weights as a checkpoint stores them: float32, names sorted, with shapes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        digest.update(f"{name}:{tuple(array.shape)};".encode())
        digest.update(array.astype("<f4").tobytes())
    return digest.hexdigest()


def explicit_increment_form(A: np.ndarray, B: np.ndarray, K: np.ndarray, D: np.ndarray) -> IncrementalForm:
    """The discrete lifted form of x+ = A x + B w, v = K x + D w + u, w = sigma(v), sigma in sector [0, 1]."""
    mats = [np.asarray(M, dtype=np.float64) for M in (A, B, K, D)]
    n = mats[0].shape[0]
    if any(M.shape != (n, n) for M in mats):
        raise InputError(f"A, B, K, D must all be {n} x {n}, got {[M.shape for M in mats]}")
    return IncrementalForm("map", n, 1.0, None, np.hstack(mats[:2]), (np.hstack(mats[2:]),))


def _ren_increment_form(model: Any) -> IncrementalForm:
    """:func:`explicit_increment_form` of a :class:`~lrnn_analysis.models.ContractingREN`, in float64."""
    with torch.no_grad():
        mats = model.explicit_matrices(torch.float64)
    return explicit_increment_form(*(mats[k].cpu().numpy() for k in ("A", "B", "K", "D")))


def _verify_stored(model: Any, evidence: StoredEvidence) -> Verification:
    """The float64 verification of ``evidence`` for ``model``'s recurrence as it is now."""
    if not hasattr(model, "config"):
        raise InputError("stored certificate evidence applies to the toolkit's architectures only, "
                         f"not a {type(model).__name__}")
    if evidence.certificate == REN_CERTIFICATE:
        if not hasattr(model, "explicit_matrices"):
            raise InputError(f"{REN_CERTIFICATE} evidence applies to a ren model, not {model.config.arch}")
        meaningful = math.isfinite(evidence.rate) and 0 <= evidence.rate < 1
        r = rounded_r(evidence.rate) if meaningful else evidence.rate
        return verify(_ren_increment_form(model), evidence.P, evidence.multipliers, r)
    system = model.lure_form()
    if system is None:
        raise InputError(f"{evidence.certificate} evidence needs a Lur'e form; a {model.config.arch} model has none")
    return verify_certificate(system, evidence.certificate, evidence.P, evidence.multipliers, evidence.rate)


def check_stored(model: Any, metadata: Mapping[str, Any]) -> EvidenceCheck:
    """Verify the evidence stored in ``metadata`` (if any) against ``model``; never raises on bad evidence."""
    start = time.perf_counter()
    if METADATA_KEY not in metadata:
        return EvidenceCheck("absent", "no stored evidence", 0.0)
    try:
        evidence = StoredEvidence.from_dict(metadata[METADATA_KEY])
    except ValueError as error:
        return EvidenceCheck("failed", f"stored evidence is malformed ({error})", time.perf_counter() - start)
    if evidence.tier not in _STORED_TIERS:
        return EvidenceCheck("failed", f"stored evidence names an unknown tier {evidence.tier[:40]!r} "
                             f"(expected one of {', '.join(_STORED_TIERS)})", time.perf_counter() - start, evidence)
    digest = weights_sha256(model)
    if digest != evidence.weights_sha256:
        return EvidenceCheck("failed", f"the weights changed since the evidence was stored (SHA-256 {digest[:12]}... "
                             f"!= stored {evidence.weights_sha256[:12]}...)", time.perf_counter() - start, evidence)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            verification = _verify_stored(model, evidence)
    except ValueError as error:
        return EvidenceCheck("failed", str(error), time.perf_counter() - start, evidence)
    seconds = time.perf_counter() - start
    if not verification.passed:
        return EvidenceCheck("failed", f"float64 verification of the stored evidence failed: {verification.reason}",
                             seconds, evidence, verification)
    return EvidenceCheck("verified", "verified from stored evidence", seconds, evidence, verification)


def _verified_rate(verify_at: Any, best_r: float | None, rho: float) -> tuple[float, Verification]:
    """The best rate (per step) that verifies: backed-off closed-form optimum, else ``rho`` itself."""
    candidates = []
    if best_r is not None and 0 <= best_r < rho**2:
        candidates = [float(np.nextafter(math.sqrt(best_r * (1 + b)), np.inf)) for b in _RATE_BACKOFFS]
    for rate in [c for c in candidates if c < rho] + [rho]:
        verification = verify_at(rate)
        if verification.passed:
            return rate, verification
    return rho, verification


def construction_evidence(model: Any) -> tuple[StoredEvidence, Verification]:
    """The certificate a contracting or REN model carries by construction (module docstrings).

    contracting: P_zeta = T^T Q T on its euler Lur'e form; ren and lipschitz-ren: P = Q on the lifted form;
    Q = E^T P^-1 E and Lambda from the construction, in float64 from the weights. The rate is
    the best one these (P, Lambda) verify (closed form, backed off), at most rho.
    """
    ren = model.config.arch in ("ren", "lipschitz-ren")
    if ren:
        with torch.no_grad():
            c = model.construction(torch.float64)
    else:
        c, system, T = model.lure_rewrite()
    E, P, lam = (t.cpu().numpy() for t in (c.E, c.P, c.lam))
    Q = E.T @ np.linalg.solve(P, E)
    rho = float(model.config.rho)
    if ren:
        form = _ren_increment_form(model)
        lyapunov = 0.5 * (Q + Q.T)
        certificate = REN_CERTIFICATE
        rate, verification = _verified_rate(lambda rate: verify(form, lyapunov, lam, rounded_r(rate)),
                                            form.best_rate(lyapunov, lam), rho)
    else:
        Pz = T.T @ Q @ T
        lyapunov = 0.5 * (Pz + Pz.T)
        certificate = "euler-lmi"
        form = incremental_form(system, "euler")
        best = form.best_rate(lyapunov / np.abs(lyapunov).max(), lam / np.abs(lyapunov).max())
        rate, verification = _verified_rate(
            lambda rate: verify_certificate(system, certificate, lyapunov, lam, rate), best, rho)
    return StoredEvidence(certificate, lyapunov, lam, rate, _CONSTRUCTION_TIER, weights_sha256(model)), verification


EVIDENCE_TIERS = tuple(tier for tier in TIERS if tier != "norm")


def search_evidence(model: Any, time_budget: float | None = 60.0) -> tuple[StoredEvidence | None, CertificateResult]:
    """Evidence for a Lur'e-form model found by the LMI tiers in ``certify``'s order
    (``P=I``, ``riccati``, ``diag-P``, ``full-P``).

    The ``norm`` tier is left out: a norm test that holds yields no (P, multipliers) to store.
    """
    system = model.lure_form()
    family = "ct" if system.method == "ode" else system.method
    result = certify(system, [f"{family}-lmi"], time_budget=time_budget, tiers=EVIDENCE_TIERS)[0]
    if not result.holds or result.evidence is None:
        return None, result
    assert result.rate is not None and result.tier is not None  # certify sets both on every result with evidence
    stored = StoredEvidence(result.name, result.evidence.P, result.evidence.multipliers, result.rate, result.tier,
                            weights_sha256(model))
    return stored, result


def certify_trained(model: Any) -> tuple[StoredEvidence | None, str]:
    """Evidence a freshly trained certified model stores, and one line saying what it is.

    contracting/ren: the construction's certificate; a Lur'e model (``--constrain``
    training): the LMI tiers' certificate. Returns (None, why) when nothing verifies, or when
    the float64 linear algebra of the construction fails (a nearly singular T = E^-1 B / eps).
    """
    evidence: StoredEvidence | None
    if hasattr(model, "construction"):
        try:
            evidence, verification = construction_evidence(model)
        except (np.linalg.LinAlgError, torch.linalg.LinAlgError) as error:  # a (nearly) singular rewrite
            return None, (f"certificate evidence NOT stored: the construction's matrices are singular in float64 "
                          f"({first_line(error)})")
        if not verification.passed:
            return None, f"certificate evidence NOT stored: the construction's certificate failed in float64 ({verification.reason})"
    else:
        evidence, result = search_evidence(model)
        if evidence is None:
            return None, f"certificate evidence NOT stored: {result.reason}"
    return evidence, (f"certificate evidence stored: {evidence.certificate} at rate {evidence.rate:.6g} "
                      f"(tier {evidence.tier}), verified in float64")


def certificate_result(check: EvidenceCheck, model: Any) -> CertificateResult:
    """A verified stored certificate in the form ``certify`` reports (tier ``stored evidence (...)``)."""
    e, v = check._verified_parts()
    system = model.lure_form()
    family = "map" if e.certificate == REN_CERTIFICATE else e.certificate.split("-")[0]
    if e.certificate == REN_CERTIFICATE or system is None:
        assumptions: tuple[str, ...] = ("sigma = tanh acts elementwise with slopes in [0, 1]",
                                        "holds for every input sequence (input-uniform, incremental)",
                                        "the explicit REN x+ = A x + B w + B2 x_t, w = tanh(K x + D w + u)")
    else:
        assumptions = _assumptions(system, family)
    # A ct certificate stored on a discretised model is a decay rate of the underlying ODE, not a
    # factor per input step: it keeps its own meaning and margin.
    return CertificateResult(
        name=e.certificate, holds=True, margin=e.rate if family == "ct" else 1.0 - e.rate, rate=e.rate,
        gain=v.transient_gain, tier=f"stored evidence ({e.tier})", seconds=check.seconds,
        reason=f"verified from stored evidence in float64 (LMI margin {v.margin:.3e})",
        assumptions=assumptions,
        rate_meaning=_rate_meaning(family),
        evidence=Evidence(e.P, np.asarray(e.multipliers).reshape(1, -1), v.r), verification=v,
    )


def stored_then_searched(
    check: EvidenceCheck,
    model: Any,
    system: LureSystem | None,
    names: Sequence[str] | None = None,
    time_budget: float | None = None,
    wrap: Callable[[list[str]], Iterable[str]] | None = None,
) -> list[CertificateResult]:
    """A model's certificates: the stored one first when ``check`` verified it (reported from
    the evidence, never searched), then every other name in ``names`` (default:
    ``default_certificates(system)``) searched by :func:`certify` on ``system`` within
    ``time_budget`` seconds in all. With no Lur'e form (``system`` None) only the stored one.
    ``wrap`` wraps the names searched (a progress bar)."""
    from .certificates import default_certificates

    results = [certificate_result(check, model)] if check.verified else []
    if system is None:
        return results
    wanted = [n for n in (names or default_certificates(system)) if not (results and n == results[0].name)]
    started = time.monotonic()
    for name in (wanted if wrap is None else wrap(wanted)):
        remaining = None if time_budget is None else max(0.0, time_budget - (time.monotonic() - started))
        results += certify(system, [name], time_budget=remaining)
    return results
