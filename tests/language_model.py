"""A user's language model and its per-step data, the way PyTorch's word_language_model example
writes one: token ids -> nn.Embedding -> 2-layer nn.LSTM (batch first) -> nn.Linear decoder at
every step, its weight tied to the embedding's, (B, T, V) logits. The ``language_project``
fixture (conftest.py) writes the module and its masked .npz data to a folder and trains it
briefly; the small per-step model here serves the exact (float64) curvature tests."""
import textwrap

import numpy as np
import torch
from torch import nn

VOCAB, STEPS = 12, 10

MODULE_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class RNNModel(nn.Module):
        """Embedding, 2-layer LSTM, a decoder at every step with the embedding's weight (tied)."""

        def __init__(self, ntoken=12, ninp=8, nlayers=2):
            super().__init__()
            self.encoder = nn.Embedding(ntoken, ninp)
            self.rnn = nn.LSTM(ninp, ninp, nlayers, batch_first=True)
            self.decoder = nn.Linear(ninp, ntoken)
            self.decoder.weight = self.encoder.weight

        def forward(self, x):
            states, _ = self.rnn(self.encoder(x))
            return self.decoder(states)


    def build():
        torch.manual_seed(0)
        return RNNModel()
''')


def token_sequences(rng, n, steps=STEPS, vocab=VOCAB):
    """Arithmetic progressions modulo ``vocab`` (next token = this one + a step of 1 or 2) of random
    lengths 4..steps, with trailing padding: x (n, steps) int64 token ids (padding 0), y (n, steps)
    next tokens (padding -1, never scored) and the mask (n, steps) of the steps that are scored."""
    start, stride = rng.integers(0, vocab, n), rng.integers(1, 3, n)
    series = (start[:, None] + stride[:, None] * np.arange(steps + 1)[None]) % vocab
    mask = np.arange(steps)[None] < rng.integers(4, steps + 1, n)[:, None]
    x, y = series[:, :-1].copy(), series[:, 1:].copy()
    x[~mask], y[~mask] = 0, -1
    return x.astype(np.int64), y.astype(np.int64), mask


class StepModel(nn.Module):
    """A tiny per-step model on float inputs (B, T, 2): an nn.RNN of 3 units and a linear readout
    at every step, (B, T, outputs)."""

    def __init__(self, outputs=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = nn.RNN(2, 3, batch_first=True)
        self.readout = nn.Linear(3, outputs)

    def forward(self, x):
        return self.readout(self.rnn(x)[0])


def load_language_model(root):
    """The trained RNNModel of a ``language_project`` folder, in eval mode."""
    from lrnn_analysis.usermodule import load_user_model

    return load_user_model(f"{root / 'lm.py'}:build", root / "lm.pt").module.eval()


def direct_perplexity(module, x, y, mask, noise=None):
    """exp of the mean cross-entropy over the scored steps, computed here from the arrays; with
    ``noise`` (N, T, E) added to the embedding's output."""
    x, y, mask = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)
    with torch.no_grad():
        embedded = module.encoder(x) + (0 if noise is None else noise)
        logits = module.decoder(module.rnn(embedded)[0])
        return float(torch.exp(nn.functional.cross_entropy(logits[mask].double(), y[mask])))
