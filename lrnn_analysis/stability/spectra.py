"""Spectral diagnostics of a Lur'e system h' = A h + sigma(W h + u).

Everything here is a *necessary* condition or a descriptive number, never a
certificate: eigenvalues of A alone say nothing about the nonlinear system.

Notation: for a square X, H = (X + X^T)/2 and S = (X - X^T)/2 are its symmetric
and skew parts, mu2(X) = lambda_max(H) is the logarithmic 2-norm and
alpha(X) = max Re lambda(X) the spectral abscissa. Bendixson's theorem:
every eigenvalue lambda of X satisfies lambda_min(H) <= Re lambda <= lambda_max(H)
and |Im lambda| <= ||S||_2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..lure import LureSystem

__all__ = ["BendixsonBox", "DiscretizationDiagnostics", "STABILITY_POLYNOMIALS", "SpectrumReport", "UNDERFLOW_FLOOR",
    "UNIT_ROUNDOFF", "bendixson_box", "mu2", "norm2", "roundoff_bound", "spectral_abscissa", "spectral_radius",
    "spectrum", "stability_polynomial", "step_matrix"]

UNIT_ROUNDOFF = 2.0**-53
# Absolute floor of every round-off bound: results below the smallest normal float64 lose
# relative accuracy (gradual underflow), so each bound also covers an absolute error of this size.
UNDERFLOW_FLOOR = float(np.finfo(np.float64).tiny)

# Coefficients c_k of the stability polynomial R(z) = sum_k c_k z^k of each
# explicit scheme applied to y' = lambda y (one substep).
STABILITY_POLYNOMIALS: dict[str, tuple[float, ...]] = {
    "euler": (1.0, 1.0),
    "rk2": (1.0, 1.0, 0.5),
    "rk4": (1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0),
    # The 3/8 rule has order 4 and four stages, hence the same polynomial as classical RK4:
    # sum b = 1, sum b c = 1/2, sum b_i a_ij c_j = 1/6, b4 a43 a32 a21 = 1/24.
    "rk38": (1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0),
}


def mu2(X: np.ndarray) -> float:
    """Logarithmic 2-norm mu2(X) = lambda_max((X + X^T)/2); nan if X (or its symmetric part) overflowed."""
    with np.errstate(over="ignore", invalid="ignore"):
        H = 0.5 * X + 0.5 * X.T
    return float(np.linalg.eigvalsh(H)[-1]) if np.all(np.isfinite(H)) else float("nan")


def spectral_abscissa(X: np.ndarray) -> float:
    """alpha(X) = max_i Re lambda_i(X); nan if X has non-finite entries."""
    return float(np.max(np.linalg.eigvals(X).real)) if np.all(np.isfinite(X)) else float("nan")


def spectral_radius(X: np.ndarray) -> float:
    """max_i |lambda_i(X)|; nan if X has non-finite entries."""
    return float(np.max(np.abs(np.linalg.eigvals(X)))) if np.all(np.isfinite(X)) else float("nan")


def norm2(X: np.ndarray) -> float:
    """Spectral norm ||X||_2 (largest singular value); nan if X has non-finite entries."""
    if not X.size:
        return 0.0
    return float(np.linalg.norm(X, 2)) if np.all(np.isfinite(X)) else float("nan")


def roundoff_bound(n: int, magnitude: float) -> float:
    """Bound on the float64 error of a 2-norm, logarithmic norm or eigenvalue of an n x n matrix.

    ``magnitude`` is the 2-norm of what is rounded (e.g. ||A||_2 + L ||W||_2 for J = A + D W).
    LAPACK's SVD and symmetric eigensolver are backward stable, so they err by at most
    p(n) u ||X||_2 with a modest p(n) (Golub and Van Loan, sections 8.1 and 8.6); the bound
    is 64 (n + 1) (u * magnitude + eta), u = 2^-53, eta = 2^-1022 (underflow). It scales
    with the size of the matrix, never with the size of the result: a logarithmic norm or
    eigenvalue near 0 of a large matrix is as uncertain as a large one. For eigenvalues of
    a non-normal matrix this is the backward error only, so any conclusion drawn from it
    is a diagnostic, never a certificate.
    """
    return 64.0 * (n + 1) * (UNIT_ROUNDOFF * float(magnitude) + UNDERFLOW_FLOOR)


def stability_polynomial(method: str, z: np.ndarray) -> np.ndarray:
    """R(z) of an explicit scheme, evaluated elementwise (complex z allowed)."""
    value = np.zeros_like(np.asarray(z, dtype=np.complex128))
    for coefficient in reversed(STABILITY_POLYNOMIALS[method]):
        value = value * z + coefficient
    return value


def step_matrix(method: str, eps: float, J: np.ndarray) -> np.ndarray:
    """Linear one-substep matrix R(eps J) of an explicit scheme for x' = J x.

    Euler: I + eps J; RK2 (midpoint): I + eps J + (eps J)^2/2; RK4 and the 3/8 rule
    add (eps J)^3/6 + (eps J)^4/24. Used with J = A (diagnostics) and J = A + D W
    (necessary conditions of the incremental certificates).
    """
    Z = eps * J
    result = np.zeros_like(Z)
    for coefficient in reversed(STABILITY_POLYNOMIALS[method]):
        result = result @ Z + coefficient * np.eye(Z.shape[0])
    return result


@dataclass(frozen=True)
class BendixsonBox:
    """Rectangle containing every eigenvalue of A: re_min <= Re lambda <= re_max, |Im lambda| <= im_max."""

    re_min: float
    re_max: float
    im_max: float

    def contains(self, eigenvalues: np.ndarray, rtol: float = 1e-9) -> bool:
        """Whether every eigenvalue lies in the box, up to ``rtol`` times the box's size (never an absolute 1)."""
        scale = rtol * max(abs(self.re_min), abs(self.re_max), self.im_max) + UNDERFLOW_FLOOR
        ev = np.asarray(eigenvalues)
        return bool(
            np.all(ev.real >= self.re_min - scale)
            and np.all(ev.real <= self.re_max + scale)
            and np.all(np.abs(ev.imag) <= self.im_max + scale)
        )

    def to_dict(self) -> dict[str, float]:
        return {"re_min": self.re_min, "re_max": self.re_max, "im_max": self.im_max}


def bendixson_box(X: np.ndarray) -> BendixsonBox:
    """Bendixson's rectangle of X from its symmetric and skew parts."""
    sym_eigs = np.linalg.eigvalsh(0.5 * X + 0.5 * X.T)
    return BendixsonBox(float(sym_eigs[0]), float(sym_eigs[-1]), norm2(0.5 * X - 0.5 * X.T))


@dataclass(frozen=True)
class DiscretizationDiagnostics:
    """Linear step matrix R(eps A) of the scheme that is run, per substep.

    ``in_region[i]`` says whether z_i = eps lambda_i(A) lies strictly inside the
    scheme's stability region |R(z)| < 1 (Euler |1 + z| < 1, RK2
    |1 + z + z^2/2| < 1, RK4 the quartic). Necessary for stability of the
    linear part only.
    """

    method: str
    eps: float
    substeps: int
    step_eigenvalues: np.ndarray
    step_spectral_radius: float
    in_region: np.ndarray

    @property
    def all_in_region(self) -> bool:
        return bool(np.all(self.in_region))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "eps": self.eps,
            "substeps": self.substeps,
            "step_eigenvalues": _complex_list(self.step_eigenvalues),
            "step_spectral_radius": self.step_spectral_radius,
            "in_region": [bool(x) for x in self.in_region],
            "all_in_region": self.all_in_region,
        }


@dataclass(frozen=True)
class SpectrumReport:
    """Spectral **diagnostics** of a Lur'e system (necessary conditions, not certificates).

    Fields: eigenvalues of A, W and of their symmetric parts (ascending),
    alpha(A), mu2(A), ||A||_2, ||W||_2, Bendixson box of A, and for a discretized
    system the linear step matrix diagnostics.
    """

    n: int
    slope: float
    eig_A: np.ndarray
    eig_W: np.ndarray
    eig_sym_A: np.ndarray
    eig_sym_W: np.ndarray
    abscissa_A: float
    mu2_A: float
    norm_A: float
    norm_W: float
    bendixson_A: BendixsonBox
    discretization: DiscretizationDiagnostics | None
    kind: str = "diagnostics (necessary conditions only; not a certificate)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n": self.n,
            "slope": self.slope,
            "eig_A": _complex_list(self.eig_A),
            "eig_W": _complex_list(self.eig_W),
            "eig_sym_A": self.eig_sym_A.tolist(),
            "eig_sym_W": self.eig_sym_W.tolist(),
            "abscissa_A": self.abscissa_A,
            "mu2_A": self.mu2_A,
            "norm_A": self.norm_A,
            "norm_W": self.norm_W,
            "bendixson_A": self.bendixson_A.to_dict(),
            "discretization": None if self.discretization is None else self.discretization.to_dict(),
        }


def _complex_list(values: np.ndarray) -> list[list[float]]:
    return [[float(v.real), float(v.imag)] for v in np.asarray(values, dtype=np.complex128)]


def _sorted_eigenvalues(X: np.ndarray) -> np.ndarray:
    ev = np.linalg.eigvals(X).astype(np.complex128)
    return ev[np.lexsort((ev.imag, ev.real))]


def spectrum(system: LureSystem) -> SpectrumReport:
    """Spectral diagnostics of ``system`` (see :class:`SpectrumReport`)."""
    A, W = system.A, system.W
    eig_A = _sorted_eigenvalues(A)
    discretization = None
    if system.method in STABILITY_POLYNOMIALS:
        assert system.eps is not None  # LureSystem requires eps for every scheme with a stability polynomial
        eps = float(system.eps)
        step_eigenvalues = stability_polynomial(system.method, eps * eig_A)
        discretization = DiscretizationDiagnostics(
            method=system.method,
            eps=eps,
            substeps=system.substeps,
            step_eigenvalues=step_eigenvalues,
            step_spectral_radius=float(np.max(np.abs(step_eigenvalues))),
            in_region=np.abs(step_eigenvalues) < 1.0,
        )
    return SpectrumReport(
        n=system.n,
        slope=system.slope,
        eig_A=eig_A,
        eig_W=_sorted_eigenvalues(W),
        eig_sym_A=np.linalg.eigvalsh(0.5 * A + 0.5 * A.T),
        eig_sym_W=np.linalg.eigvalsh(0.5 * W + 0.5 * W.T),
        abscissa_A=float(np.max(eig_A.real)),
        mu2_A=mu2(A),
        norm_A=norm2(A),
        norm_W=norm2(W),
        bendixson_A=bendixson_box(A),
        discretization=discretization,
    )
