"""A recurrent classifier written without the toolkit, declaring what the toolkit may use."""
import torch
from torch import nn

from lrnn_analysis import LureSystem


class MyRNN(nn.Module):
    """h <- h + eps (-h + tanh(rec h + inp(x_t))), read out from the last state; x is (batch, time, 2)."""

    recurrent_parameters = ("rec",)  # globs over named_parameters(): what --recurrent-only perturbs

    def __init__(self, inputs=2, hidden=16, classes=3, eps=0.2):
        super().__init__()
        self.inp = nn.Linear(inputs, hidden)
        self.rec = nn.Parameter(torch.randn(hidden, hidden) / hidden)
        self.out = nn.Linear(hidden, classes)
        self.eps = eps

    def forward(self, x):
        u = self.inp(x)
        h = x.new_zeros(x.shape[0], self.rec.shape[0])
        for t in range(x.shape[1]):
            h = h + self.eps * (-h + torch.tanh(h @ self.rec.T + u[:, t]))
        return self.out(h)

    def lure_form(self):
        """h+ = h + eps (A h + tanh(W h + u)), A = -I, W = rec (column convention): what is certified."""
        return LureSystem(-torch.eye(self.rec.shape[0]), self.rec.detach(), method="euler", eps=self.eps)
