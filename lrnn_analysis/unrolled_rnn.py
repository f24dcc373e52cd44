"""Unrolled functional twins of ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``: the same outputs from the
layer's own parameter tensors, computed step by step with matrix products and elementwise
operations that PyTorch can differentiate twice on every device.

Why: curvature needs double backward through the model. On CUDA the layers run cuDNN kernels,
or with cuDNN off the fused GPU cells, and neither has a double backward, so a Hessian- or
GGN-vector product through them fails. The twin reads the parameters from the layer at call time
(``getattr``), so under ``torch.func.functional_call`` it uses the substituted tensors and
derivatives are taken with respect to them.

Per layer l and direction (the reverse direction reads the sequence backwards, parameters with
suffix ``_reverse``), with x_t the network input for l = 0 and the concatenated directions of
layer l - 1 otherwise (PyTorch's equations, row vectors):

    RNN:   h_t = act(x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh),  act = tanh or relu;
    LSTM:  (i, f, g, o) = x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh,
           c_t = σ(f) c_{t-1} + σ(i) tanh(g),   h_t = (σ(o) tanh(c_t)) W_hrᵀ  (W_hr = I without proj_size);
    GRU:   (r, z, n) gates from a = x_t W_ihᵀ + b_ih and b = h_{t-1} W_hhᵀ + b_hh:
           r = σ(a_r + b_r), z = σ(a_z + b_z), n = tanh(a_n + r b_n), h_t = (1 - z) n + z h_{t-1}.

The input products x_t W_ihᵀ of all steps are one product per layer and direction. Inter-layer
dropout is the identity in eval mode or with ``dropout=0``; a layer in training mode with
``dropout>0`` is refused (its random mask is not reproducible here). Packed sequences are refused.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .choices import RNN_TWIN_MODES
from .errors import InputError

__all__ = ["RNN_TWIN_MODES", "twin_layer_names", "unrolled_forward", "unrolled_layers"]

logger = logging.getLogger(__name__)

RnnState = Tensor | tuple[Tensor, Tensor]
_LAYER_TYPES = (nn.RNN, nn.LSTM, nn.GRU)


def _check_layer(layer: nn.Module) -> None:
    if not isinstance(layer, _LAYER_TYPES):
        raise InputError(f"{type(layer).__name__} has no unrolled twin; only nn.RNN, nn.LSTM and nn.GRU do")
    if layer.training and layer.dropout > 0 and layer.num_layers > 1:
        raise InputError(f"the unrolled twin of a {type(layer).__name__} with dropout={layer.dropout} runs only in eval mode "
                         "(the dropout mask of training mode is not reproducible)")


def _initial_state(layer: nn.RNNBase, hx: Any, batch: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
    """(h_0, c_0) of shape (layers * directions, batch, size); c_0 None except for an LSTM."""
    rows = layer.num_layers * (2 if layer.bidirectional else 1)
    h_size = layer.proj_size if isinstance(layer, nn.LSTM) and layer.proj_size else layer.hidden_size
    wanted = [(rows, batch, h_size)] + ([(rows, batch, layer.hidden_size)] if isinstance(layer, nn.LSTM) else [])
    if hx is None:
        states = [like.new_zeros(shape) for shape in wanted]
    else:
        states = list(hx) if isinstance(hx, (tuple, list)) else [hx]
        if len(states) != len(wanted) or any(tuple(s.shape) != shape for s, shape in zip(states, wanted)):
            got = [tuple(s.shape) for s in states]
            raise InputError(f"initial state of shapes {got} for a {type(layer).__name__} expecting {wanted}")
    return states[0], states[1] if len(states) > 1 else None


def _direction(layer: nn.RNNBase, inputs: Tensor, index: int, reverse: bool, h: Tensor,
               c: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer in one direction over time-major ``inputs`` (T, B, F): its states (T, B, H_out) in
    time order and the final (h, c)."""
    suffix = f"l{index}_reverse" if reverse else f"l{index}"
    w_ih, w_hh = getattr(layer, f"weight_ih_{suffix}"), getattr(layer, f"weight_hh_{suffix}")
    b_ih = getattr(layer, f"bias_ih_{suffix}") if layer.bias else None
    b_hh = getattr(layer, f"bias_hh_{suffix}") if layer.bias else None
    w_hr = getattr(layer, f"weight_hr_{suffix}") if isinstance(layer, nn.LSTM) and layer.proj_size else None
    sequence = inputs.flip(0) if reverse else inputs
    drive = sequence @ w_ih.T
    gru = isinstance(layer, nn.GRU)
    if b_ih is not None:
        # The GRU's b_hh sits inside r * (h W_hn^T + b_hn), so only the others fold it into the drive.
        drive = drive + b_ih if gru else drive + (b_ih + b_hh)
    w_hh_t = w_hh.T
    outputs = []
    for a in drive.unbind(0):
        if gru:
            b = h @ w_hh_t if b_hh is None else torch.addmm(b_hh, h, w_hh_t)
            a_r, a_z, a_n = a.chunk(3, dim=-1)
            b_r, b_z, b_n = b.chunk(3, dim=-1)
            r, z = torch.sigmoid(a_r + b_r), torch.sigmoid(a_z + b_z)
            n = torch.tanh(a_n + r * b_n)
            h = n + z * (h - n)
        elif isinstance(layer, nn.LSTM):
            assert c is not None  # _initial_state gives an LSTM its cell state
            i, f, g, o = torch.addmm(a, h, w_hh_t).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if w_hr is not None:
                h = h @ w_hr.T
        else:
            p = torch.addmm(a, h, w_hh_t)
            h = torch.tanh(p) if layer.nonlinearity == "tanh" else torch.relu(p)
        outputs.append(h)
    states = torch.stack(outputs)
    return (states.flip(0) if reverse else states), h, c


def unrolled_forward(layer: nn.RNNBase, input: Tensor, hx: Any = None) -> tuple[Tensor, RnnState]:
    """``layer(input, hx)`` computed by the unrolled twin: the same ``(output, h_n)`` (LSTM:
    ``(output, (h_n, c_n))``) for every ``num_layers``, ``bias``, ``batch_first``,
    ``bidirectional``, LSTM ``proj_size``, RNN ``nonlinearity``, batched or unbatched input.
    Parameters are read from ``layer`` at call time (see the module docstring)."""
    _check_layer(layer)
    if isinstance(input, nn.utils.rnn.PackedSequence):
        raise InputError("the unrolled twin does not take packed sequences; pad them")
    if not isinstance(input, Tensor) or input.ndim not in (2, 3):
        raise InputError(f"a recurrent layer's input is a 2-D or 3-D tensor, got {getattr(input, 'shape', type(input).__name__)}")
    batched = input.ndim == 3
    if not batched:
        input = input.unsqueeze(0 if layer.batch_first else 1)
        if hx is not None:
            hx = tuple(s.unsqueeze(1) for s in hx) if isinstance(hx, (tuple, list)) else hx.unsqueeze(1)
    x = input.transpose(0, 1) if layer.batch_first else input
    h0, c0 = _initial_state(layer, hx, x.shape[1], x)
    directions = 2 if layer.bidirectional else 1
    finals_h, finals_c = [], []
    for index in range(layer.num_layers):
        outputs = []
        for direction in range(directions):
            row = index * directions + direction
            states, h, c = _direction(layer, x, index, direction == 1, h0[row], None if c0 is None else c0[row])
            outputs.append(states)
            finals_h.append(h)
            finals_c.append(c)
        x = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
    output = x.transpose(0, 1) if layer.batch_first else x
    h_n = torch.stack(finals_h)
    state: RnnState = h_n if c0 is None else (h_n, torch.stack([c for c in finals_c if c is not None]))
    if not batched:
        output = output.squeeze(0 if layer.batch_first else 1)
        state = tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)  # type: ignore[assignment]
    return output, state


def twin_layer_names(module: nn.Module, mode: str, device: torch.device) -> tuple[str, ...]:
    """The ``nn.RNN``/``nn.LSTM``/``nn.GRU`` layers of ``module`` (by name) whose twin a curvature
    product runs under ``mode``: ``"auto"`` all of them on CUDA (where the layers cannot be
    differentiated twice) and none elsewhere, ``"on"`` all of them, ``"off"`` none."""
    if mode not in RNN_TWIN_MODES:
        raise InputError(f"rnn_twin must be one of {RNN_TWIN_MODES}, got {mode!r}")
    if mode == "off" or (mode == "auto" and torch.device(device).type != "cuda"):
        return ()
    names = tuple(name for name, sub in module.named_modules() if isinstance(sub, _LAYER_TYPES))
    for name in names:
        logger.info("curvature runs the unrolled twin of %s (%s, rnn_twin=%s, device %s)", name or "the module",
                    type(module.get_submodule(name)).__name__, mode, device)
    return names


@contextmanager
def unrolled_layers(module: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Within the block, the named recurrent layers of ``module`` run their unrolled twin; their
    own ``forward`` is restored afterwards (the module is changed only for the duration)."""
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for name in names:
            layer = module.get_submodule(name)
            _check_layer(layer)
            patched.append((layer, vars(layer).get("forward")))
            layer.forward = functools.partial(unrolled_forward, layer)
        yield
    finally:
        for layer, own in reversed(patched):
            if own is None:
                del layer.forward
            else:
                layer.forward = own
