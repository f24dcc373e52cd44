"""A user's own module and data, used through the Python API: the module's source (its own
parameter names, batch-first input), written to a file and imported from there; its data; the
model under analysis it becomes. The ``user`` fixture (conftest.py) trains it."""
import importlib.util

import numpy as np
import torch

from lrnn_analysis.lure import LureSystem
from lrnn_analysis.model_under_analysis import ModelUnderAnalysis

MODEL_SOURCE = '''
import torch
from torch import nn


class MyLipschitzRNN(nn.Module):
    """h <- h + eps (A h + tanh(W h + enc(x_t))), A and W from the user's own parameters."""

    def __init__(self, inputs, hidden, classes, eps=0.2, beta=0.8, gamma=0.05):
        super().__init__()
        self.enc = nn.Linear(inputs, hidden)
        self.rec_a = nn.Parameter(torch.randn(hidden, hidden) / hidden)
        self.rec_w = nn.Parameter(torch.randn(hidden, hidden) / hidden)
        self.head = nn.Linear(hidden, classes)
        self.eps, self.beta, self.gamma = eps, beta, gamma

    def _matrix(self, M):
        eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        return (1 - self.beta) * (M + M.T) + self.beta * (M - M.T) - self.gamma * eye

    def matrices(self):
        return self._matrix(self.rec_a), self._matrix(self.rec_w)

    def forward(self, x):
        A, W = self.matrices()
        u = self.enc(x)
        h = x.new_zeros(x.shape[0], A.shape[0])
        for t in range(x.shape[1]):
            h = h + self.eps * (h @ A.T + torch.tanh(h @ W.T + u[:, t]))
        return self.head(h)


def build(hidden=8):
    torch.manual_seed(0)
    return MyLipschitzRNN(2, hidden, 3)
'''


def import_from_file(path):
    """The module file at ``path``, imported as ``mymodels``."""
    spec = importlib.util.spec_from_file_location("mymodels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sequences(rng, n):
    """Three classes of 10-step, 2-channel sequences: a rising, falling or flat first channel."""
    y = rng.integers(0, 3, n)
    slope = np.array([1.0, -1.0, 0.0])[y]
    t = np.linspace(0, 1, 10)
    x = np.stack([slope[:, None] * t + 1.0 * rng.standard_normal((n, 10)), rng.standard_normal((n, 10))], axis=-1)
    return x.astype(np.float32), y.astype(np.int64)


def user_subject(module, **kwargs):
    """The module under analysis, with its Lur'e form (Euler) and recurrent parameters rec_*."""

    def lure_form():
        A, W = module.matrices()
        return LureSystem(A, W, method="euler", eps=module.eps)

    return ModelUnderAnalysis.from_module(module, lure_form=lure_form, recurrent="rec_*", name="mine", **kwargs)


def accuracy_by_hand(module, x, y):
    """Test accuracy of ``module`` on (x, y), computed here directly."""
    with torch.no_grad():
        return float((module(x).argmax(dim=1) == y).double().mean())
