"""Incremental-stability (contraction) conditions for ``nn.LSTM`` and ``nn.GRU`` layers.

The conditions follow the approach of F. Bonassi, E. Terzi, M. Farina, R. Scattolini,
"LSTM neural networks: input to state stability and probabilistic safety verification"
(L4DC 2020), and F. Bonassi, M. Farina, R. Scattolini, "On the stability properties of
Gated Recurrent Units neural networks" (Systems & Control Letters 155, 2021): bound every
gate on an invariant set reached with **bounded inputs**, then bound the increments of two
trajectories driven by the same input in the infinity norm. The constants below are derived
here for PyTorch's equations (gate slopes bounded on the interval each pre-activation can
reach, rather than by the global 1/4 and 1), so they are never weaker than the papers'
global-slope versions; the derivation is in this docstring.

Assumptions (every result states them): inputs with ||x_t||_inf <= xbar (``input_bound``;
a layer l >= 1 reads the previous layer's state, for which xbar = 1), initial states in the
invariant set below (PyTorch's default zero state is), and the module in eval mode. With
other inputs nothing is claimed: gates can saturate at 1 and memory never fades.

Notation per unit j: for a gate with input weights W, recurrent weights U and bias b
(b = b_ih + b_hh), a_j = ||W_j||_1, s_j = ||U_j||_1 (row sums of |.|); on the invariant set
(|h| <= 1) its pre-activation lies in [b_j - R_j, b_j + R_j], R_j = a_j xbar + s_j, so the
gate is at most sbar_j = sigmoid(b_j + R_j) and its slope at most sigmoid'(z*) with z* the
point of that interval closest to 0 (likewise tanh).

**LSTM** (c+ = f*c + i*g, h+ = o*tanh(c+)). |h| < 1 always; |c_j| <= cbar_j =
ibar_j gbar_j / (1 - fbar_j) is invariant. For two trajectories with the same input,
with D_c = ||c - c~||_inf, D_h = ||h - h~||_inf:

  |dc+_j| <= fbar_j D_c + beta_j D_h,
      beta_j = sf'_j s_f,j cbar_j + ibar_j sg'_j s_g,j + si'_j s_i,j gbar_j,
  |dh+_j| <= obar_j |dc+_j| + so'_j s_o,j tanh(cbar_j) D_h,

(sX' the slope bounds), so (D_c, D_h)+ <= M (D_c, D_h) elementwise with the non-negative

  M = [[max fbar, max beta], [max obar fbar, max (obar beta + so' s_o tanh(cbar))]].

With a positive vector w and r = max_i (M w)_i / w_i, the weighted norm
max(D_c / w_1, D_h / w_2) contracts by r per step; the certificate holds iff
r + tol < 1 (w is the Perron vector of M, so r is its spectral radius up to round-off).

**GRU** (h+ = (1 - z)*n + z*h, n = tanh(W_n x + b_in + r*(U_n h + b_hn))). |h| <= 1 is
invariant. With D = ||h - h~||_inf and h+ - h~+ = (1 - z) dn + z dh + (z - z~)(h~ - n~):

  |dn_j| <= a_j D,  a_j = sn'_j (rbar_j s_n,j + sr'_j s_r,j (s_n,j + |b_hn,j|)),
  |dh+_j| <= [max over z in {zlow_j, zbar_j} of ((1 - z) a_j + z) + sz'_j s_z,j (1 + nbar_j)] D,

so ||h+ - h~+||_inf <= r D with r the largest bracket; it holds iff r + tol < 1.

``tol`` bounds the float64 round-off of the row sums and gate evaluations
(64 (n + d + 8) u times the size of the terms, u the unit round-off).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..errors import InputError
from ..models.torchnn import layer_kind, layer_parameters

__all__ = ["GatedCertificate", "gated_contraction"]

REFERENCES = {
    "lstm": "Bonassi, Terzi, Farina, Scattolini, 'LSTM neural networks: input to state stability and "
            "probabilistic safety verification', L4DC 2020",
    "gru": "Bonassi, Farina, Scattolini, 'On the stability properties of Gated Recurrent Units neural networks', "
           "Systems & Control Letters 155, 2021",
}
_UNIT_ROUNDOFF = np.finfo(np.float64).eps / 2.0


@dataclass(frozen=True)
class GatedCertificate:
    """Outcome of the contraction condition of one LSTM/GRU layer.

    ``rate`` is the contraction factor per step of ``norm`` (None when it does not hold
    or cannot be evaluated); ``value`` the computed factor, compared with 1 after adding
    ``tolerance``; ``weights`` the positive w of the LSTM's weighted norm on
    (||dc||_inf, ||dh||_inf) (None for the GRU).
    """

    name: str
    layer: int
    holds: bool
    value: float | None
    tolerance: float
    rate: float | None
    input_bound: float | None
    norm: str
    reason: str
    assumptions: tuple[str, ...]
    reference: str
    weights: tuple[float, float] | None = None

    @property
    def margin(self) -> float | None:
        return None if self.value is None else 1.0 - (self.value + self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "layer": self.layer, "holds": self.holds, "value": self.value,
            "tolerance": self.tolerance, "margin": self.margin, "rate": self.rate, "input_bound": self.input_bound,
            "norm": self.norm, "reason": self.reason, "assumptions": list(self.assumptions),
            "reference": self.reference, "weights": None if self.weights is None else list(self.weights),
        }


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _closest_to_zero(center: np.ndarray, radius: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(center) - radius, 0.0)


def _sigmoid_slope_bound(center: np.ndarray, radius: np.ndarray) -> np.ndarray:
    s = _sigmoid(_closest_to_zero(center, radius))
    return s * (1.0 - s)


def _tanh_slope_bound(center: np.ndarray, radius: np.ndarray) -> np.ndarray:
    return 1.0 - np.tanh(_closest_to_zero(center, radius)) ** 2


def _gate_blocks(rnn: nn.RNNBase, layer: int, gates: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    p = layer_parameters(rnn, layer)
    W = p["weight_ih"].detach().cpu().double().numpy()
    U = p["weight_hh"].detach().cpu().double().numpy()
    n = rnn.hidden_size
    zeros = np.zeros(gates * n)
    b_ih = zeros if p["bias_ih"] is None else p["bias_ih"].detach().cpu().double().numpy()
    b_hh = zeros if p["bias_hh"] is None else p["bias_hh"].detach().cpu().double().numpy()
    split = lambda X: [X[k * n:(k + 1) * n] for k in range(gates)]  # noqa: E731
    return split(W), split(U), b_ih, b_hh


def _assumptions(kind: str, layer: int, xbar: float) -> tuple[str, ...]:
    state = "|h| <= 1 and |c_j| <= cbar_j" if kind == "lstm" else "|h| <= 1"
    source = "the network input" if layer == 0 else f"layer {layer - 1}'s state (|h| < 1)"
    return (
        f"inputs bounded: ||x_t||_inf <= {xbar:g} ({source})",
        f"initial states in the invariant set {state} (PyTorch's zero initial state is)",
        "two trajectories driven by the same input (incremental contraction); module in eval mode",
    )


def lstm_contraction(rnn: nn.LSTM, layer: int, input_bound: float) -> GatedCertificate:
    """The LSTM condition of the module docstring for one layer and inputs with ||x||_inf <= input_bound."""
    W, U, b_ih, b_hh = _gate_blocks(rnn, layer, 4)
    n = rnn.hidden_size
    b = b_ih + b_hh
    xbar = float(input_bound)
    bias = [b[k * n:(k + 1) * n] for k in range(4)]
    radius = [np.abs(Wk).sum(axis=1) * xbar + np.abs(Uk).sum(axis=1) for Wk, Uk in zip(W, U)]
    s = [np.abs(Uk).sum(axis=1) for Uk in U]
    (bi, bf, bg, bo), (Ri, Rf, Rg, Ro) = bias, radius
    ibar, fbar, obar = _sigmoid(bi + Ri), _sigmoid(bf + Rf), _sigmoid(bo + Ro)
    gbar = np.tanh(np.abs(bg) + Rg)
    si, sf, so = (_sigmoid_slope_bound(c, r) for c, r in ((bi, Ri), (bf, Rf), (bo, Ro)))
    sg = _tanh_slope_bound(bg, Rg)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # fbar = 1: cbar = inf, checked below
        cbar = ibar * gbar / (1.0 - fbar)
        beta = sf * s[1] * cbar + ibar * sg * s[2] + si * s[0] * gbar
        M = np.array([
            [fbar.max(), beta.max()],
            [(obar * fbar).max(), (obar * beta + so * s[3] * np.tanh(cbar)).max()],
        ])
    if not np.all(np.isfinite(M)):  # a forget gate that can reach 1 in float64: no bound on c
        return _result("lstm-contraction", "lstm", layer, float("inf"), 0.0, xbar,
                       "max(||dc||_inf / w_1, ||dh||_inf / w_2)", None)
    eigenvalues, vectors = np.linalg.eig(M + 1e-9 * max(M.max(), 1e-300) * np.ones((2, 2)))
    w = np.abs(vectors[:, int(np.argmax(eigenvalues.real))].real)
    w = w / w.max()
    value = float(np.max((M @ w) / w))
    d = W[0].shape[1]
    tolerance = float(64.0 * (n + d + 8) * _UNIT_ROUNDOFF * (M.sum() + 1.0) * (w.max() / w.min()))
    return _result("lstm-contraction", "lstm", layer, value, tolerance, xbar,
                   "max(||dc||_inf / w_1, ||dh||_inf / w_2)", (float(w[0]), float(w[1])))


def gru_contraction(rnn: nn.GRU, layer: int, input_bound: float) -> GatedCertificate:
    """The GRU condition of the module docstring for one layer and inputs with ||x||_inf <= input_bound."""
    W, U, b_ih, b_hh = _gate_blocks(rnn, layer, 3)
    n = rnn.hidden_size
    xbar = float(input_bound)
    br, bz = b_ih[:n] + b_hh[:n], b_ih[n:2 * n] + b_hh[n:2 * n]
    b_in, b_hn = b_ih[2 * n:], b_hh[2 * n:]
    a = [np.abs(Wk).sum(axis=1) for Wk in W]
    s = [np.abs(Uk).sum(axis=1) for Uk in U]
    Rr, Rz = a[0] * xbar + s[0], a[1] * xbar + s[1]
    rbar = _sigmoid(br + Rr)
    zlow, zbar = _sigmoid(bz - Rz), _sigmoid(bz + Rz)
    Rn = a[2] * xbar + rbar * (s[2] + np.abs(b_hn))
    nbar = np.tanh(np.abs(b_in) + Rn)
    sr, sz, sn = _sigmoid_slope_bound(br, Rr), _sigmoid_slope_bound(bz, Rz), _tanh_slope_bound(b_in, Rn)
    a_n = sn * (rbar * s[2] + sr * s[0] * (s[2] + np.abs(b_hn)))
    convex = np.maximum((1.0 - zlow) * a_n + zlow, (1.0 - zbar) * a_n + zbar)
    per_unit = convex + sz * s[1] * (1.0 + nbar)
    value = float(per_unit.max())
    d = W[0].shape[1]
    tolerance = float(64.0 * (n + d + 8) * _UNIT_ROUNDOFF * (per_unit.max() + 1.0))
    return _result("gru-contraction", "gru", layer, value, tolerance, xbar, "||dh||_inf", None)


def _result(name: str, kind: str, layer: int, value: float, tolerance: float, xbar: float, norm: str,
            weights: tuple[float, float] | None) -> GatedCertificate:
    holds = bool(np.isfinite(value) and value + tolerance < 1.0)
    reason = (f"contraction factor {value + tolerance:.6g} < 1 for inputs with ||x||_inf <= {xbar:g}" if holds
              else f"condition fails: contraction bound {value:.6g} >= 1 (sufficient condition only)")
    return GatedCertificate(name, layer, holds, value, tolerance, value + tolerance if holds else None, xbar,
                            norm, reason, _assumptions(kind, layer, xbar), REFERENCES[kind], weights)


def gated_contraction(rnn: nn.RNNBase, input_bound: float | None) -> list[GatedCertificate]:
    """The condition for every layer of an ``nn.LSTM``/``nn.GRU``; layer l >= 1 reads states bounded by 1.

    Without ``input_bound`` no condition can be evaluated (they hold only for bounded
    inputs): every layer's result says so and does not hold.
    """
    kind = layer_kind(rnn)
    if kind not in ("lstm", "gru"):
        raise InputError(f"{kind} is not a gated layer")
    name = f"{kind}-contraction"
    if getattr(rnn, "proj_size", 0) or rnn.bidirectional:
        return [GatedCertificate(name, l, False, None, 0.0, None, input_bound, "-",
                                 "no certificate available for this architecture (bidirectional or projected LSTM)",
                                 (), REFERENCES[kind]) for l in range(rnn.num_layers)]
    if input_bound is None or not (np.isfinite(input_bound) and input_bound >= 0):
        return [GatedCertificate(name, l, False, None, 0.0, None, None, "-",
                                 f"no certificate without an input bound: the {kind.upper()} condition holds only for "
                                 "inputs with ||x_t||_inf <= xbar (give input_bound)", (), REFERENCES[kind])
                for l in range(rnn.num_layers)]
    bounds = [input_bound if l == 0 else 1.0 for l in range(rnn.num_layers)]
    if isinstance(rnn, nn.LSTM):
        return [lstm_contraction(rnn, l, bound) for l, bound in enumerate(bounds)]
    assert isinstance(rnn, nn.GRU)  # layer_kind names only these two "lstm" or "gru"
    return [gru_contraction(rnn, l, bound) for l, bound in enumerate(bounds)]
