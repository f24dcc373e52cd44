"""``torch.nn`` recurrent layers as models under analysis.

:class:`SequenceClassifier` wraps an ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` and a head:
x of shape (batch, time, input) (whatever the layer's ``batch_first``) maps to
``head(h_T)``, the last hidden state of the last layer. :func:`find_recurrent_layers`
finds such layers inside any user module and names their recurrent parameters.

``nn.RNN`` layer l (column vectors, PyTorch's own equations) is exactly the Lur'e map

    h_t = sigma(W_hh h_{t-1} + u_t),   u_t = W_ih x_t + b_ih + b_hh,

sigma = tanh or relu (slope L = 1), where x_t is the network input for l = 0 and
layer l-1's state h_t for l >= 1 (same time step). :meth:`SequenceClassifier.lure_forms`
returns one :class:`LureSystem` (method ``map``) per layer; ``lure_form()`` returns it
for a one-layer RNN and None for several layers (a stack of layers is a cascade of
Lur'e maps, not one: :func:`lrnn_analysis.stability.torchnn.certify_recurrent` certifies
each layer and the cascade). LSTM and GRU layers have no Lur'e form; their stability
conditions are in :mod:`lrnn_analysis.stability.gated`.

Everything is evaluated as in ``eval()`` mode: inter-layer dropout is not part of the
recurrence that is certified.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import InputError, UserCodeError, first_line
from ..lure import LureSystem

__all__ = ["LayerInputs", "LayerParameters", "RecurrentLayer", "SequenceClassifier", "embedding_fed_layers",
    "fed_by_embedding", "find_recurrent_layers", "layer_input_maxima", "layer_kind", "layer_parameters", "record_layer_inputs",
    "recurrent_parameter_patterns", "rnn_lure_forms"]

_RECURRENT_LAYER_TYPES = (nn.RNN, nn.LSTM, nn.GRU)


@dataclass(frozen=True)
class RecurrentLayer:
    """A ``torch.nn`` recurrent layer found inside a module, with its name there (``""`` for the root)."""

    name: str
    module: nn.RNNBase

    @property
    def kind(self) -> str:
        """``rnn-tanh``, ``rnn-relu``, ``lstm`` or ``gru``."""
        return layer_kind(self.module)

    @property
    def recurrent_patterns(self) -> tuple[str, ...]:
        """Glob patterns of the hidden-to-hidden weights, e.g. ``("rnn.weight_hh_*",)``."""
        prefix = f"{self.name}." if self.name else ""
        return (f"{prefix}weight_hh_*",)


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.LSTM):
        return "lstm"
    if isinstance(module, nn.GRU):
        return "gru"
    if isinstance(module, nn.RNN):
        return f"rnn-{module.nonlinearity}"
    raise InputError(f"{type(module).__name__} is not a torch.nn recurrent layer (RNN, LSTM, GRU)")


def find_recurrent_layers(module: nn.Module) -> list[RecurrentLayer]:
    """Every ``nn.RNN``/``nn.LSTM``/``nn.GRU`` inside ``module`` (itself included), in module order."""
    return [RecurrentLayer(name, sub) for name, sub in module.named_modules() if isinstance(sub, _RECURRENT_LAYER_TYPES)]


def recurrent_parameter_patterns(module: nn.Module) -> tuple[str, ...]:
    """Default recurrent parameter patterns of ``module``: the ``weight_hh_*`` of each torch.nn recurrent layer."""
    return tuple(p for layer in find_recurrent_layers(module) for p in layer.recurrent_patterns)


def _check_supported(rnn: nn.Module) -> None:
    """Refuse what the wrapper cannot represent exactly: bidirectional layers and LSTM projections."""
    layer_kind(rnn)
    if rnn.bidirectional:
        raise InputError("bidirectional recurrent layers are not supported: the last state is not one causal recurrence")
    if getattr(rnn, "proj_size", 0):
        raise InputError("LSTM with proj_size > 0 is not supported")


class LayerParameters(TypedDict):
    """The parameters of one layer of a ``torch.nn`` recurrent module (biases None without bias)."""

    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Tensor | None
    bias_hh: Tensor | None


def layer_parameters(rnn: nn.RNNBase, layer: int) -> LayerParameters:
    """``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` of one layer (biases None without bias)."""
    if not 0 <= layer < rnn.num_layers:
        raise InputError(f"layer {layer} out of range: the module has {rnn.num_layers} layer(s)")
    weight_ih, weight_hh = getattr(rnn, f"weight_ih_l{layer}", None), getattr(rnn, f"weight_hh_l{layer}", None)
    if weight_ih is None or weight_hh is None:
        raise InputError(f"layer {layer} of the {type(rnn).__name__} has no weight_ih_l{layer}/weight_hh_l{layer}")
    return LayerParameters(weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=getattr(rnn, f"bias_ih_l{layer}", None),
                           bias_hh=getattr(rnn, f"bias_hh_l{layer}", None))


def _single_layer(rnn: nn.RNNBase, layer: int, input_size: int) -> tuple[nn.RNNBase, dict[str, Tensor]]:
    """A one-layer module of the same kind and the parameters of ``layer``, for ``functional_call``."""
    options: dict[str, Any] = {"bias": rnn.bias, "batch_first": True}
    if isinstance(rnn, nn.RNN):
        options["nonlinearity"] = rnn.nonlinearity
    reference = next(rnn.parameters())
    with torch.device("meta"):
        single = type(rnn)(input_size, rnn.hidden_size, 1, **options)
    params = {f"{k}_l0": v for k, v in layer_parameters(rnn, layer).items() if isinstance(v, Tensor)}  # biases None without bias
    return single.to_empty(device=reference.device).to(reference.dtype), params


def _layer_states(rnn: nn.RNNBase, x: Tensor, hx: Any, layer: int) -> Tensor:
    """Layer ``layer``'s states (batch, time, hidden) from x (batch, time, input) and the module's initial state."""
    single, params = _single_layer(rnn, layer, x.shape[-1])
    if hx is None:
        states, _ = functional_call(single, params, (x,))
        return states
    state = tuple(h[layer:layer + 1] for h in hx) if isinstance(hx, tuple) else hx[layer:layer + 1]
    states, _ = functional_call(single, params, (x, state))
    return states


def layer_input_maxima(rnn: nn.RNNBase, x: Any, hx: Any = None) -> tuple[float | None, ...]:
    """The largest |x_t| each layer of ``rnn`` reads when the module is called as ``rnn(x, hx)``:
    layer 0 reads x, layer l >= 1 the states of layer l - 1 (computed layer by layer as in eval mode;
    None for those of a bidirectional or projected module).

    ``x`` is a tensor in the module's layout (or unbatched) or a ``PackedSequence`` (whose later
    layers are computed from the zero state)."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        x, lengths = nn.utils.rnn.pad_packed_sequence(x, batch_first=True)
        masks = [torch.arange(x.shape[1])[None, :] < lengths[:, None]]
        if hx is not None and x.shape[0] > 1:  # packed hx is in the sorted order of the packed batch; keep it simple
            hx = None
    else:
        if not isinstance(x, Tensor):
            raise InputError(f"the input of a recurrent layer is a {type(x).__name__}, not a tensor")
        masks = []
        if x.ndim == 2:  # unbatched (time, input)
            x = x.unsqueeze(0)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        elif not rnn.batch_first:
            x = x.transpose(0, 1)
    def largest(values: Tensor) -> float:
        values = values.detach()
        if masks:
            values = values[masks[0]]
        return float(values.abs().max()) if values.numel() else 0.0
    out: list[float | None] = [largest(x)]
    if rnn.bidirectional or getattr(rnn, "proj_size", 0):
        return tuple(out + [None] * (rnn.num_layers - 1))
    states = x
    with torch.no_grad():
        for layer in range(rnn.num_layers - 1):
            states = _layer_states(rnn, states, hx, layer)
            out.append(largest(states))
    return tuple(out)


@dataclass
class LayerInputs:
    """What one recurrent module received during a run: every call's (input, hx)."""

    calls: list[tuple[Any, Any]] = field(default_factory=list)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _call(model: nn.Module, x: Any) -> None:
    """``model(x)``, passing None for any further required positional argument (an initial state, as in
    PyTorch's word_language_model ``forward(input, hidden)``)."""
    extra = 0
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
        required = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                    and p.default is p.empty]
        extra = max(len(required) - 1, 0)
    except (TypeError, ValueError):
        pass
    model(x, *([None] * extra))


def record_layer_inputs(model: nn.Module, x: Any) -> tuple[dict[str, LayerInputs], dict[str, list[Tensor]]]:
    """Run ``model`` on ``x`` (eval mode, no gradients) with forward hooks: what every recurrent layer
    received (by name in ``model``) and every ``nn.Embedding``'s outputs. A failing ``forward`` raises
    :class:`~lrnn_analysis.errors.UserCodeError`."""
    received: dict[str, LayerInputs] = {layer.name: LayerInputs() for layer in find_recurrent_layers(model)}
    embedded: dict[str, list[Tensor]] = {name: [] for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    handles = []

    def on_layer(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            received[name].calls.append((args[0] if args else kwargs.get("input"), hx))
        return hook

    def on_embedding(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Tensor) -> None:
            embedded[name].append(output)
        return hook

    modules = dict(model.named_modules())
    try:
        for name in received:
            handles.append(modules[name].register_forward_pre_hook(on_layer(name), with_kwargs=True))
        for name in embedded:
            handles.append(modules[name].register_forward_hook(on_embedding(name)))
        with _eval_mode(model), torch.no_grad():
            try:
                _call(model, x)
            except Exception as error:  # the user's forward
                raise UserCodeError(f"{type(model).__name__}: forward raised {type(error).__name__}: "
                                    f"{first_line(error)}") from error
    finally:
        for handle in handles:
            handle.remove()
    return received, embedded


def _same_values(received: Any, output: Tensor) -> bool:
    if not isinstance(received, Tensor):
        return False
    if received is output or (received.shape == output.shape and torch.equal(received, output)):
        return True
    swapped = output.transpose(0, 1) if output.ndim >= 2 else output
    return received.shape == swapped.shape and torch.equal(received, swapped)


def embedding_fed_layers(model: nn.Module, x: Any = None) -> dict[str, str]:
    """The recurrent layers of ``model`` whose first layer reads an ``nn.Embedding``'s output directly, by
    name, with that embedding's name: on every call during a run of ``model`` on ``x`` (default: a probe
    of seeded tokens of shape (2, 3)), the layer's input equals the embedding's output (eval mode, so
    dropout in between is the identity). Empty when the model has no embedding."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        return {}
    if x is None:
        tokens = min(m.num_embeddings for m in embeddings)
        x = torch.randint(0, tokens, (2, 3), generator=torch.Generator().manual_seed(0))
    return fed_by_embedding(*record_layer_inputs(model, x))


def fed_by_embedding(received: dict[str, LayerInputs], embedded: dict[str, list[Tensor]]) -> dict[str, str]:
    """From a run recorded by :func:`record_layer_inputs`: the recurrent layers whose input equals an
    ``nn.Embedding``'s output on every call (or its first two axes swapped), with that embedding's name."""
    found = {}
    for name, inputs in received.items():
        for embedding, outputs in embedded.items():
            if inputs.calls and all(any(_same_values(inp, out) for out in outputs) for inp, _ in inputs.calls):
                found[name] = embedding
                break
    return found


def rnn_lure_forms(rnn: nn.RNN) -> tuple[LureSystem, ...]:
    """The Lur'e map h+ = sigma(W_hh h + u) of every layer of an ``nn.RNN`` (float64, method ``map``)."""
    if not isinstance(rnn, nn.RNN):
        raise InputError(f"{type(rnn).__name__} has no Lur'e form; only nn.RNN layers do")
    _check_supported(rnn)
    with torch.no_grad():
        weights = [layer_parameters(rnn, l)["weight_hh"].double().cpu() for l in range(rnn.num_layers)]
    return tuple(LureSystem(torch.zeros_like(W), W, slope=1.0, method="map", activation=rnn.nonlinearity)
                 for W in weights)


class SequenceClassifier(nn.Module):
    """``head(h_T)`` of a ``torch.nn`` recurrent layer; input (batch, time, features) always.

    ``rnn`` is an ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (unidirectional, no projection),
    ``head`` any module mapping (batch, hidden) to outputs (e.g. ``nn.Linear``).
    """

    def __init__(self, rnn: nn.RNNBase, head: nn.Module, name: str | None = None) -> None:
        super().__init__()
        _check_supported(rnn)
        self.rnn = rnn
        self.head = head
        self.name = name or f"{layer_kind(rnn)} x{rnn.num_layers}, hidden {rnn.hidden_size}"

    @property
    def kind(self) -> str:
        return layer_kind(self.rnn)

    @property
    def recurrent_parameters(self) -> tuple[str, ...]:
        """Glob patterns of the recurrent weights: ``("rnn.weight_hh_*",)``."""
        return ("rnn.weight_hh_*",)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.rnn.input_size:
            raise InputError(f"expected input of shape (batch, time, {self.rnn.input_size}), got {tuple(x.shape)}")

    def _output(self, x: Tensor) -> Tensor:
        """The last layer's states for every step, (batch, time, hidden)."""
        self._check_input(x)
        output, _ = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))
        return output if self.rnn.batch_first else output.transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self._output(x)[:, -1])

    def hidden_states(self, x: Tensor, layer: int | None = None) -> Tensor:
        """Hidden states h_1..h_T of ``layer`` (default: the last), shape (batch, time, hidden), from zero state.

        The last layer's states come from the module itself; an earlier layer's from the
        module's own code run on that layer's parameters alone (``functional_call``).
        """
        last = self.rnn.num_layers - 1
        layer = last if layer is None else layer
        if layer == last:
            return self._output(x)
        self._check_input(x)
        states = x
        for index in range(layer + 1):
            single, params = _single_layer(self.rnn, index, states.shape[-1])
            states, _ = functional_call(single, params, (states,))
        return states

    def layer_inputs(self, x: Tensor, layer: int) -> Tensor:
        """What ``layer`` reads at each step: x itself for layer 0, else the previous layer's states."""
        return x if layer == 0 else self.hidden_states(x, layer - 1)

    def lure_inputs(self, x: Tensor, layer: int | None = None) -> Tensor:
        """u_t = W_ih x_t + b_ih + b_hh of an ``nn.RNN`` layer (default: the last), shape (batch, time, hidden)."""
        self._require_rnn()
        layer = self.rnn.num_layers - 1 if layer is None else layer
        p = layer_parameters(self.rnn, layer)
        u = self.layer_inputs(x, layer) @ p["weight_ih"].T
        if p["bias_ih"] is not None:
            u = u + p["bias_ih"] + p["bias_hh"]
        return u

    def _require_rnn(self) -> None:
        if not isinstance(self.rnn, nn.RNN):
            raise InputError(f"{self.kind} has no Lur'e form (gates multiply the state); see lrnn_analysis.stability.gated")

    def lure_forms(self) -> tuple[LureSystem, ...] | None:
        """One Lur'e map h+ = sigma(W_hh h + u) per ``nn.RNN`` layer (float64); None for LSTM/GRU."""
        return rnn_lure_forms(self.rnn) if isinstance(self.rnn, nn.RNN) else None

    def lure_form(self) -> LureSystem | None:
        """The Lur'e map of a one-layer ``nn.RNN``; None for several layers (see :meth:`lure_forms`) or LSTM/GRU."""
        forms = self.lure_forms()
        return forms[0] if forms is not None and len(forms) == 1 else None
