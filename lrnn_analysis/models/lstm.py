"""The zoo's LSTM: one ``nn.LSTM`` layer (batch_first) and the zoo's decoder D.

PyTorch's equations, column vectors, gates in PyTorch's order (i, f, g, o):

    i = sigmoid(W_ii x_t + b_ii + W_hi h + b_hi),  f = sigmoid(W_if x_t + b_if + W_hf h + b_hf),
    g = tanh(W_ig x_t + b_ig + W_hg h + b_hg),     o = sigmoid(W_io x_t + b_io + W_ho h + b_ho),
    c+ = f * c + i * g,   h+ = o * tanh(c+),   from h = c = 0.

The layer reads x_t itself: its input weights W_i* x_t + b_i* + b_h* play the role of the zoo's
u_t = U x_t + b, so a bound on the data is a bound on what the layer reads (``lrnn stability
--input-bound``). Outputs are D h_T + d, or D h_t + d at every step under ``readout="all"``.
The gates multiply the state, so there is no Lur'e form; the contraction condition of
:mod:`lrnn_analysis.stability.gated` certifies the layer, found inside the model as any user's
``nn.LSTM`` is (:func:`lrnn_analysis.models.torchnn.find_recurrent_layers`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError
from .architectures import RecurrentModel
from .config import ModelConfig

__all__ = ["LSTMModel"]

_GATES = ("i", "f", "g", "o")


class LSTMModel(RecurrentModel):
    """``D(LSTM(x))`` (module docstring); recurrent parameters ``rnn.weight_hh_l0``."""

    recurrent_parameters = ("rnn.weight_hh_*",)
    has_input_map = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.rnn = nn.LSTM(config.input_dim, config.hidden, batch_first=True)

    def _run(self, x: Tensor, keep_states: bool) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.config.input_dim:
            raise InputError(f"lstm model expects input of shape (batch, time, {self.config.input_dim}), got {tuple(x.shape)}")
        states, _ = self.rnn(x)
        return states if keep_states else states[:, -1]

    def recurrent_matrices(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The hidden-to-hidden matrix of each gate, W_hi, W_hf, W_hg, W_ho (column convention),
        named ``Wi``, ``Wf``, ``Wg``, ``Wo``."""
        weight = self.rnn.weight_hh_l0 if dtype is None else self.rnn.weight_hh_l0.to(dtype)
        return {f"W{gate}": block for gate, block in zip(_GATES, weight.chunk(4, dim=0))}
