"""Certificates of ``torch.nn`` recurrent layers, one layer at a time, and of their cascade.

Layer l of a stack reads layer l-1's state of the same step. For ``nn.RNN`` each layer is
the Lur'e map h+ = sigma(W_hh h + u) (:mod:`lrnn_analysis.models.torchnn`) and is
certified by ``map-norm``/``map-lmi``; ``nn.LSTM``/``nn.GRU`` layers by the conditions of
:mod:`lrnn_analysis.stability.gated`.

**Cascade.** Suppose layer l contracts in a norm ||.||_l with factor rho_l for a shared
input, and its step is Lipschitz in its input with constant g_l measured from ||.||_{l-1}
to ||.||_l. With e_l(t) = ||h^l_t - h~^l_t||_l for two runs of the stack on the same input
sequence,

    e_1(t) <= rho_1 e_1(t-1),   e_l(t) <= rho_l e_l(t-1) + g_l e_{l-1}(t),

so E(t) <= N E(t-1) elementwise with N lower triangular, N_lk = rho_k prod_{m=k+1}^{l} g_m
(k <= l). Counting the non-decreasing index paths from k to l in t steps gives

    e_l(t) <= sum_{k<=l} C(t + l - k - 1, l - k) rho^t (prod_{m=k+1}^{l} g_m) e_k(0),
    rho = max_l rho_l:

the stack contracts at the rate of its slowest layer, up to a polynomial factor of degree
L - 1 in t, with the products of the coupling gains as constants. For an RNN layer certified
with P_l (P = I for the norm test; normalised here to lambda_min(P_l) = 1, so ||v||_2 <=
||v||_{P_l}), ||sigma(z) - sigma(z~)||_{P_l} <= L sqrt(lambda_max(P_l)) ||z - z~||_2 and
z - z~ = W_ih^(l) (h^{l-1} - h~^{l-1}), so g_l = L ||W_ih^(l)||_2 sqrt(lambda_max(P_l)) = L
||W_ih^(l)||_2 sqrt(cond P_l). Gated layers' coupling gains are finite (smooth maps on a
bounded invariant set) but not computed: their cascade reports the rate only.

**Input bounds.** The LSTM/GRU conditions hold for a bound on each layer's own input
(:mod:`lrnn_analysis.stability.gated`): layer l >= 1 reads states in [-1, 1]; the first layer
reads what the module feeds it, bounded by the caller's ``input_bound``, or exactly by the
largest |entry| of an ``nn.Embedding`` whose output it reads directly (found by forward hooks
on a probe run of the module), or by nothing (not certified). With ``inputs`` (sample network
inputs) the module is run on them and each layer's largest received |x_t| is compared with its
bound. ``nn.RNN`` certificates hold for every input (``largest_input_bound`` = inf).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from torch import Tensor, nn

from ..errors import InputError, UserCodeError
from ..models.torchnn import (
    embedding_fed_layers,
    fed_by_embedding,
    find_recurrent_layers,
    layer_input_maxima,
    layer_kind,
    layer_parameters,
    record_layer_inputs,
    rnn_lure_forms,
)
from .certificates import CertificateResult, certify
from .gated import GatedCertificate, InputBound, gated_contraction

__all__ = ["CascadeCertificate", "certify_layers", "certify_recurrent", "layer_rows"]


@dataclass(frozen=True)
class CascadeCertificate:
    """Per-layer certificates of a stack of recurrent layers and what they imply for the stack.

    ``layers[l]`` holds layer l's results (every requested certificate for an RNN layer,
    the gated condition for LSTM/GRU). The stack holds iff every layer holds some
    certificate; ``rate`` = max over layers of the best certified factor;
    ``coupling_gains[l - 1]`` = g_l (RNN only, see the module docstring);
    ``layer_gains[l]`` = sqrt(cond P_l). ``input_bound``, ``input_bound_source`` and
    ``observed_input_max`` concern the first layer's input (what the module feeds the stack;
    later layers' are in ``layers``); ``largest_input_bound`` is the largest bound on it for
    which every layer holds (None when none does; inf for input-uniform RNN certificates).
    """

    module: str
    kind: str
    holds: bool
    rate: float | None
    reason: str
    layers: tuple[tuple[CertificateResult | GatedCertificate, ...], ...]
    coupling_gains: tuple[float, ...] | None = None
    layer_gains: tuple[float, ...] | None = None
    polynomial_degree: int = 0
    assumptions: tuple[str, ...] = field(default=())
    input_bound: float | None = None
    input_bound_source: str | None = None
    observed_input_max: float | None = None
    largest_input_bound: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module, "kind": self.kind, "holds": self.holds, "rate": self.rate, "reason": self.reason,
            "layers": [[r.to_dict() for r in results] for results in self.layers],
            "coupling_gains": None if self.coupling_gains is None else list(self.coupling_gains),
            "layer_gains": None if self.layer_gains is None else list(self.layer_gains),
            "polynomial_degree": self.polynomial_degree, "assumptions": list(self.assumptions),
            "input_bound": self.input_bound, "input_bound_source": self.input_bound_source,
            "observed_input_max": self.observed_input_max, "largest_input_bound": self.largest_input_bound,
        }


_Result = TypeVar("_Result", CertificateResult, GatedCertificate)


def _rate(result: CertificateResult | GatedCertificate) -> float:
    """The contraction factor of a result that holds (``certify`` and ``gated_contraction`` give every one a rate)."""
    assert result.rate is not None
    return result.rate


def _gain(result: CertificateResult) -> float:
    """The transient gain of an RNN layer's certificate that holds (``certify`` gives every one a gain)."""
    assert result.gain is not None
    return result.gain


def _best(results: Sequence[_Result]) -> _Result | None:
    holding = [r for r in results if r.holds]
    return min(holding, key=_rate) if holding else None


def certify_layers(
    rnn: nn.RNNBase,
    names: Sequence[str] | None = None,
    *,
    input_bound: float | InputBound | None = None,
    inputs: Tensor | None = None,
    observed_input_max: Sequence[float | None] | None = None,
    time_budget: float | None = None,
    tiers: Sequence[str] | None = None,
    module_name: str = "",
) -> CascadeCertificate:
    """Certify every layer of ``rnn`` and the stack (see the module docstring).

    ``names`` are the RNN certificates (default ``map-norm``, ``map-lmi``); ``input_bound``
    bounds ||x_t||_inf of the first layer's input (what is fed to ``rnn``; an
    :class:`~lrnn_analysis.stability.gated.InputBound` says where it comes from) and is
    needed by the LSTM/GRU conditions only; ``inputs`` are sample inputs of ``rnn`` itself
    (in its layout), ``observed_input_max`` the largest |x_t| each layer received if
    measured elsewhere; ``time_budget`` is shared by the layers' LMI tiers.
    """
    if inputs is not None and observed_input_max is None:
        observed_input_max = layer_input_maxima(rnn, inputs)
    kind = layer_kind(rnn)
    layers = rnn.num_layers
    per_layer: tuple[tuple[CertificateResult | GatedCertificate, ...], ...]
    best: Sequence[CertificateResult | GatedCertificate | None]
    coupling: tuple[float, ...] | None
    layer_gains: tuple[float, ...] | None
    if kind in ("lstm", "gru"):
        results = gated_contraction(rnn, input_bound, observed_input_max=observed_input_max, name=module_name)
        per_layer = tuple((r,) for r in results)
        best = [r if r.holds else None for r in results]
        coupling = layer_gains = None
        first: GatedCertificate = results[0]
        bound, source, largest = first.input_bound, first.input_bound_source, first.largest_input_bound
        if not all(r.holds for r in results[1:]):
            largest = None
    else:
        assert isinstance(rnn, nn.RNN)  # layer_kind names every other layer it accepts rnn-*
        budget = None if time_budget is None else time_budget / layers
        names = ("map-norm", "map-lmi") if names is None else tuple(names)
        systems = rnn_lure_forms(rnn)
        rnn_results = tuple(tuple(certify(system, names, budget, tiers=tiers)) for system in systems)
        rnn_best = [_best(results) for results in rnn_results]
        layer_gains = tuple(float("nan") if b is None else float(_gain(b)) for b in rnn_best)
        coupling = tuple(
            _coupling_gain(rnn, l, rnn_best[l]) for l in range(1, layers)
        )
        per_layer, best = rnn_results, rnn_best
        given = input_bound.value if isinstance(input_bound, InputBound) else input_bound
        bound, source = given, "not needed (the RNN certificates hold for every input)"
        largest = float("inf") if all(b is not None for b in rnn_best) else None
    failed = [l for l, b in enumerate(best) if b is None]
    holds = not failed
    rate = max(_rate(b) for b in best if b is not None) if holds else None
    if holds:
        reason = f"every layer contracts; the stack contracts with factor {rate:.6g} per step"
        if layers > 1:
            reason += f" (times a polynomial of degree {layers - 1} in t)"
    else:
        reason = f"layer(s) {failed} not certified: {per_layer[failed[0]][-1].reason}"
    assumptions = tuple(dict.fromkeys(a for results in per_layer for r in results for a in r.assumptions))
    return CascadeCertificate(
        module=module_name, kind=kind, holds=holds, rate=rate, reason=reason, layers=per_layer,
        coupling_gains=coupling, layer_gains=layer_gains, polynomial_degree=layers - 1, assumptions=assumptions,
        input_bound=bound, input_bound_source=source,
        observed_input_max=None if observed_input_max is None else observed_input_max[0], largest_input_bound=largest,
    )


def _coupling_gain(rnn: nn.RNN, layer: int, best: CertificateResult | None) -> float:
    """g_l = L ||W_ih^(l)||_2 sqrt(cond P_l) (P = I for the norm test); nan when layer l is not certified."""
    if best is None:
        return float("nan")
    W_ih = layer_parameters(rnn, layer)["weight_ih"].detach().cpu().double().numpy()
    return float(np.linalg.norm(W_ih, 2) * _gain(best))  # slope L = 1 for tanh and relu


_ROW_FIELDS = ("name", "holds", "rate", "reason", "input_bound", "input_bound_source", "observed_input_max",
               "largest_input_bound")


def layer_rows(stacks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (stack, layer, certificate) of :meth:`CascadeCertificate.to_dict` records:
    module (``(root)`` for the model itself), kind, layer, name, holds, rate, reason, and the layer's
    input bound, its source, the observed input maximum and the largest bound that works (None where a
    certificate has none: the RNN ones need no input bound)."""
    return [{"module": stack["module"] or "(root)", "kind": stack["kind"], "layer": index,
             **{key: result.get(key) for key in _ROW_FIELDS}}
            for stack in stacks for index, results in enumerate(stack["layers"]) for result in results]


def certify_recurrent(
    model: nn.Module,
    names: Sequence[str] | None = None,
    *,
    input_bound: float | None = None,
    inputs: Tensor | None = None,
    time_budget: float | None = None,
    tiers: Sequence[str] | None = None,
) -> list[CascadeCertificate]:
    """:func:`certify_layers` for every ``torch.nn`` recurrent layer found inside ``model``.

    Only the recurrent layers are certified: how the model combines their states is its own
    business. A model without any is an error.

    ``input_bound`` bounds ||x_t||_inf of the input of each stack's first layer, i.e. what
    ``model`` feeds it (not the network input, unless the model feeds it unchanged). A first layer
    that reads an ``nn.Embedding``'s output directly gets the embedding's largest |entry| instead
    (exact; detected by a probe run of ``model`` on seeded tokens of shape (2, 3), or on ``inputs``;
    a ``forward`` with further required arguments, such as ``forward(input, hidden)``, gets None for them).
    ``inputs`` (sample network inputs, e.g. a task's training inputs) are run through ``model``
    (eval mode) to record the largest |x_t| every layer receives: a bound below it is not certified.
    """
    found = find_recurrent_layers(model)
    if not found:
        raise InputError(f"{type(model).__name__} contains no torch.nn recurrent layer (RNN, LSTM, GRU)")
    if input_bound is not None and not (np.isfinite(input_bound) and input_bound >= 0):
        raise InputError(f"input_bound must be a finite number >= 0, got {input_bound!r}")
    observed: dict[str, tuple[float | None, ...]] = {}
    note = ""
    fed: dict[str, str] = {}
    if inputs is not None:
        received, embedded = record_layer_inputs(model, inputs)
        fed = fed_by_embedding(received, embedded)
        for layer in found:
            calls = [layer_input_maxima(layer.module, x, hx) for x, hx in received[layer.name].calls]
            if calls:
                observed[layer.name] = tuple(
                    None if any(c[l] is None for c in calls) else max(float(c[l]) for c in calls)  # type: ignore[arg-type]
                    for l in range(layer.module.num_layers))
    else:
        try:
            fed = embedding_fed_layers(model)
        except UserCodeError as error:
            note = f"a probe run to find an nn.Embedding feeding it failed ({error})"
    modules = dict(model.named_modules())
    budget = None if time_budget is None else time_budget / len(found)
    out = []
    for layer in found:
        bound: float | InputBound | None = input_bound
        if layer.name in fed:
            embedding = modules[fed[layer.name]]
            assert isinstance(embedding, nn.Embedding)
            value = float(embedding.weight.detach().abs().max())
            description = (f"the largest |entry| of nn.Embedding '{fed[layer.name]}' (max over all "
                           f"{embedding.num_embeddings} tokens), whose output it reads directly")
            if input_bound is not None and input_bound != value:
                description += f" (the given input_bound {input_bound:g} is not used: this bound is exact)"
            bound = InputBound(value, "embedding", description)
        elif input_bound is None and note:
            bound = InputBound(None, "none", note)
        out.append(certify_layers(layer.module, names, input_bound=bound, observed_input_max=observed.get(layer.name),
                                  time_budget=budget, tiers=tiers, module_name=layer.name))
    return out
