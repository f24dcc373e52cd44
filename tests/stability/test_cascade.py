"""Stacked recurrent layers: the cascade bound holds on simulated pairs."""
import numpy as np
import pytest
import torch
from torch import nn

from lrnn_analysis.stability.cascade import certify_layers


def test_cascade_bound_holds_on_simulated_pairs():
    torch.manual_seed(4)
    rnn = nn.RNN(3, 6, num_layers=2, batch_first=True).double()
    with torch.no_grad():
        for layer in range(2):
            W = getattr(rnn, f"weight_hh_l{layer}")
            W.mul_(0.8 / torch.linalg.matrix_norm(W, 2))
    cert = certify_layers(rnn, ["map-norm"])
    assert cert.holds and cert.polynomial_degree == 1
    rho, g = cert.rate, cert.coupling_gains[0]
    assert g == pytest.approx(np.linalg.norm(rnn.weight_ih_l1.detach().numpy(), 2))
    x = torch.rand(8, 30, 3, dtype=torch.float64) * 4 - 2
    h0 = torch.randn(2, 8, 6, dtype=torch.float64)
    g0 = torch.randn(2, 8, 6, dtype=torch.float64)
    # both layers' states: run layer by layer from the two initial states
    first = nn.RNN(3, 6, batch_first=True).double()
    second = nn.RNN(6, 6, batch_first=True).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(first, f"{name}_l0").copy_(getattr(rnn, f"{name}_l0"))
            getattr(second, f"{name}_l0").copy_(getattr(rnn, f"{name}_l1"))
        a1, _ = first(x, h0[:1])
        b1, _ = first(x, g0[:1])
        a2, _ = second(a1, h0[1:])
        b2, _ = second(b1, g0[1:])
        stacked, _ = rnn(x, h0)
    assert torch.allclose(stacked, a2)
    e1_0 = (h0[0] - g0[0]).norm(dim=-1).numpy()
    e2_0 = (h0[1] - g0[1]).norm(dim=-1).numpy()
    e2 = (a2 - b2).norm(dim=-1).numpy()
    for t in range(1, 31):
        bound = rho**t * e2_0 + t * rho**t * g * e1_0  # C(t, 1) = t
        assert np.all(e2[:, t - 1] <= bound * (1 + 1e-9) + 1e-12)
