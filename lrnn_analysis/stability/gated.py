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

Assumptions (every result states them): the **layer's own input** satisfies ||x_t||_inf <=
xbar, initial states in the invariant set below (PyTorch's default zero state is), and the
module in eval mode. With other inputs nothing is claimed: gates can saturate at 1 and
memory never fades. Where xbar comes from is part of every result (``input_bound_source``):

- ``previous layer``: layer l >= 1 of a stack reads layer l-1's states, |h| < 1, so xbar = 1;
- ``given``: the caller's ``input_bound`` for the first layer's input, i.e. what the module
  feeds that layer (after any preprocessing of the network input: a bound on the network
  input is not a bound on the layer's input);
- ``embedding``: the first layer reads an ``nn.Embedding``'s output directly, so xbar is the
  embedding's largest |entry| over all tokens (exact, no data needed);
- ``none``: nothing bounds the first layer's input; it is not certified.

Sample inputs, when given, show what each layer actually receives (``observed_input_max``):
a bound below that is refuted by the data and not certified.

**Monotonicity in xbar.** Every quantity below is a non-decreasing function of xbar: the
radii R_j = a_j xbar + s_j grow with xbar, so the gate bounds sigmoid(b + R), tanh(|b| + R)
grow, the slope bounds sigmoid'/tanh' at the point of [b - R, b + R] closest to 0 grow (the
interval only widens), zlow decreases while zbar increases (the GRU's bracket is a maximum of
an affine function of z over [zlow, zbar], which can only grow as the interval widens),
and cbar = ibar gbar / (1 - fbar) grows. Sums and products of non-negative non-decreasing
terms are non-decreasing, so the entries of M (LSTM) and the GRU's brackets are, and so is the
spectral radius of the non-negative M (Perron-Frobenius). Hence the condition holds for every
xbar below a threshold and fails above it: ``largest_input_bound`` finds that threshold by
bisection (:func:`largest_input_bound`; None when even xbar = 0 fails, inf when it holds in
the limit xbar -> inf).

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..errors import InputError
from ..models.torchnn import layer_kind, layer_parameters

__all__ = ["BISECTION_RTOL", "GatedCertificate", "InputBound", "gated_condition", "gated_contraction",
           "largest_input_bound"]

_REFERENCES = {
    "lstm": "Bonassi, Terzi, Farina, Scattolini, 'LSTM neural networks: input to state stability and "
            "probabilistic safety verification', L4DC 2020",
    "gru": "Bonassi, Farina, Scattolini, 'On the stability properties of Gated Recurrent Units neural networks', "
           "Systems & Control Letters 155, 2021",
}
_UNIT_ROUNDOFF = np.finfo(np.float64).eps / 2.0
BISECTION_RTOL = 1e-9
"""Relative width of the final bisection bracket of :func:`largest_input_bound`."""
_HUGE = 1e300  # the condition evaluated here stands for the limit xbar -> inf


@dataclass(frozen=True)
class InputBound:
    """A bound xbar on ||x_t||_inf of a first layer's input and where it comes from.

    ``source`` is ``"given"`` (the caller's ``input_bound``), ``"embedding"`` (the largest
    |entry| of an ``nn.Embedding`` the layer reads directly) or ``"none"`` (``value`` None);
    ``description`` says it in words (it ends the result's first assumption).
    """

    value: float | None
    source: str
    description: str = ""


@dataclass(frozen=True)
class GatedCertificate:
    """Outcome of the contraction condition of one LSTM/GRU layer.

    ``rate`` is the contraction factor per step of ``norm`` (None when it does not hold
    or cannot be evaluated); ``value`` the computed factor at ``input_bound``, compared with
    1 after adding ``tolerance`` (None when no bound is known or a gate reaches 1);
    ``weights`` the positive w of the LSTM's weighted norm on (||dc||_inf, ||dh||_inf)
    (None for the GRU). ``input_bound`` bounds ||x_t||_inf of **this layer's input**;
    ``input_bound_source`` says where it comes from (``previous layer``, ``given``,
    ``embedding``, ``none``); ``observed_input_max`` is the largest |x_t| the layer received
    on sample inputs (None without them); ``largest_input_bound`` the largest xbar for which
    the condition holds (None when even xbar = 0 fails; inf when it holds for every xbar).
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
    input_bound_source: str = "none"
    observed_input_max: float | None = None
    largest_input_bound: float | None = None

    @property
    def margin(self) -> float | None:
        return None if self.value is None else 1.0 - (self.value + self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "layer": self.layer, "holds": self.holds, "value": self.value,
            "tolerance": self.tolerance, "margin": self.margin, "rate": self.rate, "input_bound": self.input_bound,
            "input_bound_source": self.input_bound_source, "observed_input_max": self.observed_input_max,
            "largest_input_bound": self.largest_input_bound,
            "norm": self.norm, "reason": self.reason, "assumptions": list(self.assumptions),
            "reference": self.reference, "weights": None if self.weights is None else list(self.weights),
        }


@dataclass(frozen=True)
class Evaluation:
    """The condition of one layer at one xbar: ``value`` None when a gate can reach 1 (LSTM forget gate);
    ``failure`` says in words why it fails ("" when it holds)."""

    holds: bool
    value: float | None
    tolerance: float
    weights: tuple[float, float] | None
    failure: str


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _closest_to_zero(center: np.ndarray, radius: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(center) - radius, 0.0)


def _sigmoid_slope_bound(center: np.ndarray, radius: np.ndarray) -> np.ndarray:
    s = _sigmoid(_closest_to_zero(center, radius))
    return s * (1.0 - s)


def _tanh_slope_bound(center: np.ndarray, radius: np.ndarray) -> np.ndarray:
    return 1.0 - np.tanh(_closest_to_zero(center, radius)) ** 2


def _gate_sums(rnn: nn.RNNBase, layer: int, gates: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray,
                                                                  np.ndarray, int]:
    """Row sums a = ||W_k,j||_1, s = ||U_k,j||_1 per gate k, the biases b_ih, b_hh, and the input size."""
    p = layer_parameters(rnn, layer)
    W = p["weight_ih"].detach().cpu().double().numpy()
    U = p["weight_hh"].detach().cpu().double().numpy()
    n = rnn.hidden_size
    zeros = np.zeros(gates * n)
    b_ih = zeros if p["bias_ih"] is None else p["bias_ih"].detach().cpu().double().numpy()
    b_hh = zeros if p["bias_hh"] is None else p["bias_hh"].detach().cpu().double().numpy()
    a = [np.abs(W[k * n:(k + 1) * n]).sum(axis=1) for k in range(gates)]
    s = [np.abs(U[k * n:(k + 1) * n]).sum(axis=1) for k in range(gates)]
    return a, s, b_ih, b_hh, W.shape[1]


def _lstm_condition(rnn: nn.LSTM, layer: int) -> Callable[[float], Evaluation]:
    a, s, b_ih, b_hh, d = _gate_sums(rnn, layer, 4)
    n = rnn.hidden_size
    b = b_ih + b_hh
    bi, bf, bg, bo = (b[k * n:(k + 1) * n] for k in range(4))

    def evaluate(xbar: float) -> Evaluation:
        Ri, Rf, Rg, Ro = (a[k] * xbar + s[k] for k in range(4))
        ibar, fbar, obar = _sigmoid(bi + Ri), _sigmoid(bf + Rf), _sigmoid(bo + Ro)
        gbar = np.tanh(np.abs(bg) + Rg)
        if fbar.max() >= 1.0:  # a forget gate that can reach 1 in float64: no bound on c
            j = int(np.argmax(bf + Rf))
            return Evaluation(False, None, 0.0, None,
                              f"the forget gate of unit {j} can reach 1 (sigmoid(b + a xbar + s) = sigmoid({bf[j]:.6g} + "
                              f"{a[1][j]:.6g}*{xbar:g} + {s[1][j]:.6g}) = 1.0 in float64): memory never fades, so no "
                              f"input-uniform contraction holds for ||x_t||_inf <= {xbar:g}")
        si, sf, so = (_sigmoid_slope_bound(c, r) for c, r in ((bi, Ri), (bf, Rf), (bo, Ro)))
        sg = _tanh_slope_bound(bg, Rg)
        cbar = ibar * gbar / (1.0 - fbar)
        parts = (sf * s[1] * cbar, ibar * sg * s[2], si * s[0] * gbar)
        beta = parts[0] + parts[1] + parts[2]
        output = so * s[3] * np.tanh(cbar)
        M = np.array([[fbar.max(), beta.max()], [(obar * fbar).max(), (obar * beta + output).max()]])
        if not np.all(np.isfinite(M)):  # 1 - fbar so small that cbar overflows
            j = int(np.argmax(fbar))
            return Evaluation(False, None, 0.0, None,
                              f"the forget gate of unit {j} comes within {1.0 - fbar[j]:.3g} of 1 (fbar = {fbar[j]:.17g}): "
                              f"the cell state bound overflows, memory practically never fades for "
                              f"||x_t||_inf <= {xbar:g}")
        eigenvalues, vectors = np.linalg.eig(M + 1e-9 * max(M.max(), 1e-300) * np.ones((2, 2)))
        w = np.abs(vectors[:, int(np.argmax(eigenvalues.real))].real)
        w = w / w.max()
        value = float(np.max((M @ w) / w))
        tolerance = float(64.0 * (n + d + 8) * _UNIT_ROUNDOFF * (M.sum() + 1.0) * (w.max() / w.min()))
        holds = value + tolerance < 1.0
        failure = ""
        if not holds:
            entries = {
                "the forget-gate bound max_j fbar_j (how much of the cell is kept per step)": (M[0, 0], int(np.argmax(fbar))),
                "the cell's sensitivity to h, max_j beta_j": (M[0, 1], int(np.argmax(beta))),
                "the output's carry of the cell, max_j obar_j fbar_j": (M[1, 0], int(np.argmax(obar * fbar))),
                "the output's sensitivity to h, max_j (obar_j beta_j + so'_j s_o,j tanh(cbar_j))":
                    (M[1, 1], int(np.argmax(obar * beta + output))),
            }
            what, (size, j) = max(entries.items(), key=lambda item: item[1][0])
            failure = (f"the contraction factor {value + tolerance:.6g} >= 1 for ||x_t||_inf <= {xbar:g} "
                       f"(a sufficient condition only); dominant term: {what} = {size:.6g} at unit {j}")
            if "beta" in what:
                names = ("forget-gate slope sf' s_f cbar", "candidate slope ibar sg' s_g", "input-gate slope si' s_i gbar")
                k = int(np.argmax([part[j] for part in parts]))
                failure += (f", mostly its {names[k]} = {parts[k][j]:.6g} (cell bound cbar = {cbar[j]:.6g}, "
                            f"forget gate up to {fbar[j]:.6g})")
        return Evaluation(holds, value, tolerance, (float(w[0]), float(w[1])), failure)

    return evaluate


def _gru_condition(rnn: nn.GRU, layer: int) -> Callable[[float], Evaluation]:
    a, s, b_ih, b_hh, d = _gate_sums(rnn, layer, 3)
    n = rnn.hidden_size
    br, bz = b_ih[:n] + b_hh[:n], b_ih[n:2 * n] + b_hh[n:2 * n]
    b_in, b_hn = b_ih[2 * n:], b_hh[2 * n:]

    def evaluate(xbar: float) -> Evaluation:
        Rr, Rz = a[0] * xbar + s[0], a[1] * xbar + s[1]
        rbar = _sigmoid(br + Rr)
        zlow, zbar = _sigmoid(bz - Rz), _sigmoid(bz + Rz)
        Rn = a[2] * xbar + rbar * (s[2] + np.abs(b_hn))
        nbar = np.tanh(np.abs(b_in) + Rn)
        sr, sz, sn = _sigmoid_slope_bound(br, Rr), _sigmoid_slope_bound(bz, Rz), _tanh_slope_bound(b_in, Rn)
        a_n = sn * (rbar * s[2] + sr * s[0] * (s[2] + np.abs(b_hn)))
        convex = np.maximum((1.0 - zlow) * a_n + zlow, (1.0 - zbar) * a_n + zbar)
        gate = sz * s[1] * (1.0 + nbar)
        per_unit = convex + gate
        value = float(per_unit.max())
        tolerance = float(64.0 * (n + d + 8) * _UNIT_ROUNDOFF * (value + 1.0))
        holds = value + tolerance < 1.0
        failure = ""
        if not holds and zbar.max() >= 1.0:
            j = int(np.argmax(bz + Rz))
            failure = (f"the update gate of unit {j} can reach 1 (sigmoid(b + a xbar + s) = sigmoid({bz[j]:.6g} + "
                       f"{a[1][j]:.6g}*{xbar:g} + {s[1][j]:.6g}) = 1.0 in float64): h+ = h, memory never fades, so no "
                       f"input-uniform contraction holds for ||x_t||_inf <= {xbar:g}")
        elif not holds:
            j = int(np.argmax(per_unit))
            dominant = (f"the state-carrying term max over z in [{zlow[j]:.6g}, {zbar[j]:.6g}] of (1 - z) a_n + z = "
                        f"{convex[j]:.6g} (candidate sensitivity a_n = {a_n[j]:.6g})" if convex[j] >= gate[j] else
                        f"the update-gate slope term sz' s_z (1 + nbar) = {gate[j]:.6g}")
            failure = (f"the contraction factor {value + tolerance:.6g} >= 1 for ||x_t||_inf <= {xbar:g} "
                       f"(a sufficient condition only); dominant term at unit {j}: {dominant}")
        return Evaluation(holds, value, tolerance, None, failure)

    return evaluate


def gated_condition(rnn: nn.RNNBase, layer: int) -> Callable[[float], Evaluation]:
    """The condition of one layer as a function of xbar (row sums computed once)."""
    if isinstance(rnn, nn.LSTM):
        return _lstm_condition(rnn, layer)
    if isinstance(rnn, nn.GRU):
        return _gru_condition(rnn, layer)
    raise InputError(f"{layer_kind(rnn)} is not a gated layer")


def largest_input_bound(condition: Callable[[float], Evaluation], rtol: float = BISECTION_RTOL) -> float | None:
    """The largest xbar for which ``condition`` holds, to relative accuracy ``rtol`` (it holds at the
    returned value and fails at value * (1 + rtol) or below): None when it fails at xbar = 0, inf when it
    holds in the limit. Bisection is exact because the condition is monotone in xbar (module docstring)."""
    if not condition(0.0).holds:
        return None
    if condition(_HUGE).holds:
        return float("inf")
    lo, hi = 0.0, 1.0
    while condition(hi).holds:
        lo, hi = hi, hi * 2.0
    for _ in range(400):  # halvings from [0, 1] down to 2**-400 at most; then hi - lo <= rtol * hi
        if hi - lo <= rtol * hi:
            break
        mid = 0.5 * (lo + hi)
        if condition(mid).holds:
            lo = mid
        else:
            hi = mid
    return lo


def _layer_name(name: str, layer: int) -> str:
    return f"{name} layer {layer}" if name else f"layer {layer}"


def gated_contraction(
    rnn: nn.RNNBase,
    input_bound: float | InputBound | None,
    *,
    observed_input_max: Sequence[float | None] | None = None,
    name: str = "",
) -> list[GatedCertificate]:
    """The condition for every layer of an ``nn.LSTM``/``nn.GRU`` (see the module docstring).

    ``input_bound`` bounds ||x_t||_inf of the **first layer's input** (what the module feeds
    it): a number (source ``given``), an :class:`InputBound`, or None (the first layer is not
    certified: its input range is unknown). Layer l >= 1 reads states bounded by 1.
    ``observed_input_max[l]`` is the largest |x_t| layer l received on sample inputs: a bound
    below it is refuted by the data and not certified. ``name`` names the module in messages.
    """
    kind = layer_kind(rnn)
    if kind not in ("lstm", "gru"):
        raise InputError(f"{kind} is not a gated layer")
    bound = input_bound if isinstance(input_bound, InputBound) or input_bound is None else \
        InputBound(float(input_bound), "given")
    if bound is None:
        bound = InputBound(None, "none")
    if bound.value is not None and not (np.isfinite(bound.value) and bound.value >= 0):
        raise InputError(f"input_bound must be a finite number >= 0, got {bound.value!r}")
    observed = list(observed_input_max) if observed_input_max is not None else [None] * rnn.num_layers
    if len(observed) != rnn.num_layers:
        raise InputError(f"observed_input_max has {len(observed)} entries for {rnn.num_layers} layer(s)")
    label = f"{kind}-contraction"
    if getattr(rnn, "proj_size", 0) or rnn.bidirectional:
        return [GatedCertificate(label, l, False, None, 0.0, None, bound.value if l == 0 else 1.0, "-",
                                 "no certificate available for this architecture (bidirectional or projected LSTM)",
                                 (), _REFERENCES[kind], input_bound_source=bound.source if l == 0 else "previous layer",
                                 observed_input_max=observed[l]) for l in range(rnn.num_layers)]
    return [_layer_certificate(rnn, kind, l, bound if l == 0 else InputBound(1.0, "previous layer"), observed[l], name)
            for l in range(rnn.num_layers)]


def _layer_certificate(rnn: nn.RNNBase, kind: str, layer: int, bound: InputBound, observed: float | None,
                       name: str) -> GatedCertificate:
    where = _layer_name(name, layer)
    norm = "max(||dc||_inf / w_1, ||dh||_inf / w_2)" if kind == "lstm" else "||dh||_inf"
    condition = gated_condition(rnn, layer)
    largest = largest_input_bound(condition)
    holds_for = ("the condition fails even at xbar = 0" if largest is None else
                 "the condition holds for every xbar" if largest == float("inf") else
                 f"the condition holds for ||x_t||_inf <= {largest:.6g} at most")
    fields = dict(input_bound_source=bound.source, observed_input_max=observed, largest_input_bound=largest)
    if bound.value is None:
        if observed is not None:
            reason = (f"no certificate without an input bound for {where}: no input_bound given and it reads no nn.Embedding; on the "
                      f"data it reaches {observed:.6g} and {holds_for} (give input_bound to certify: the data's "
                      "maximum bounds only the data)")
        else:
            reason = (f"no certificate without an input bound for {where}: its input range cannot be bounded from what was given (no "
                      f"input_bound, no nn.Embedding read directly, no sample inputs); {holds_for} (give input_bound, "
                      "the bound on what the module feeds this layer)")
        if bound.description:
            reason += f"; {bound.description}"
        return GatedCertificate(f"{kind}-contraction", layer, False, None, 0.0, None, None, norm, reason, (),
                                _REFERENCES[kind], **fields)  # type: ignore[arg-type]
    xbar = bound.value
    result = condition(xbar)
    if bound.source == "previous layer":
        statement = f"||x_t||_inf <= {xbar:g} for the input of {where}: layer {layer - 1}'s states, in [-1, 1]"
    elif bound.source == "embedding":
        statement = f"||x_t||_inf <= {xbar:g} for the input of {where}: {bound.description}"
    else:
        statement = f"||x_t||_inf <= {xbar:g} for the input of {where} (what the module feeds it)" + (
            f": {bound.description}" if bound.description else "")
    state = "|h| <= 1 and |c_j| <= cbar_j" if kind == "lstm" else "|h| <= 1"
    assumptions = (
        f"inputs bounded: {statement}",
        f"initial states in the invariant set {state} (PyTorch's zero initial state is)",
        "two trajectories driven by the same input (incremental contraction); module in eval mode",
    )
    refuted = observed is not None and observed > xbar
    holds = result.holds and not refuted
    if refuted:
        reason = (f"the input of {where} reaches {observed:.6g} on the data, beyond the bound {xbar:g}: "
                  f"the bound is false for these inputs ({holds_for})")
    elif holds:
        assert result.value is not None
        reason = f"contraction factor {result.value + result.tolerance:.6g} < 1 for {statement}"
    else:
        reason = f"condition fails: {result.failure} ({holds_for})"
    rate = result.value + result.tolerance if holds and result.value is not None else None
    return GatedCertificate(f"{kind}-contraction", layer, holds, result.value, result.tolerance, rate, xbar, norm,
                            reason, assumptions, _REFERENCES[kind], result.weights, **fields)  # type: ignore[arg-type]
