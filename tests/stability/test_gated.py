"""LSTM/GRU contraction conditions against simulation, and where memory never fades."""
import warnings

import pytest
import torch
from torch import nn

from lrnn_analysis.models.torchnn import SequenceClassifier
from lrnn_analysis.stability.cascade import certify_recurrent
from lrnn_analysis.stability.gated import gated_contraction


def _gated(kind, layers=1, seed=0, hidden=6, inputs=3):
    torch.manual_seed(seed)
    return (nn.LSTM if kind == "lstm" else nn.GRU)(inputs, hidden, num_layers=layers, batch_first=True).double()


def _step_states(module, x, state):
    """Per-step (h, c) of a one-layer LSTM/GRU from ``state``."""
    hs, cs = [], []
    for t in range(x.shape[1]):
        _, state = module(x[:, t:t + 1], state)
        h, c = (state if isinstance(state, tuple) else (state, None))
        hs.append(h[0])
        cs.append(None if c is None else c[0])
    return hs, cs


def _pairs(module, xbar, steps=25, warmup=5, batch=16, seed=0):
    """Two runs from states reached with different bounded inputs, then driven by the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda t: (torch.rand(batch, t, module.input_size, generator=gen, dtype=torch.float64) * 2 - 1) * xbar  # noqa: E731
    shared = draw(steps)
    runs = []
    with torch.no_grad():
        for _ in range(2):
            _, state = module(draw(warmup))
            runs.append(_step_states(module, shared, state))
    return runs


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gated_certificate_against_simulation(kind):
    module = _gated(kind, seed=1)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.2)
    xbar = 2.0
    (result,) = gated_contraction(module, xbar)
    assert result.holds, result.reason
    assert result.assumptions[0].startswith("inputs bounded: ||x_t||_inf <= 2")
    (ha, ca), (hb, cb) = _pairs(module, xbar)
    w = result.weights
    for t in range(len(ha) - 1):
        if kind == "lstm":
            now = max(float((ca[t] - cb[t]).abs().max()) / w[0], float((ha[t] - hb[t]).abs().max()) / w[1])
            later = max(float((ca[t + 1] - cb[t + 1]).abs().max()) / w[0], float((ha[t + 1] - hb[t + 1]).abs().max()) / w[1])
        else:
            now, later = float((ha[t] - hb[t]).abs().max()), float((ha[t + 1] - hb[t + 1]).abs().max())
        assert later <= result.rate * now * (1 + 1e-9) + 1e-15


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gated_condition_fails_when_memory_never_fades(kind):
    module = _gated(kind, seed=2)
    n = module.hidden_size
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.2)
        if kind == "lstm":
            module.bias_ih_l0[n:2 * n] = 12.0  # forget gate open
        else:
            module.bias_ih_l0[n:2 * n] = 12.0  # update gate z = 1: h+ = h
    (result,) = gated_contraction(module, 1.0)
    assert not result.holds and result.rate is None
    (ha, ca), (hb, cb) = _pairs(module, 1.0, steps=30)
    first = ca[0] - cb[0] if kind == "lstm" else ha[0] - hb[0]
    last = ca[-1] - cb[-1] if kind == "lstm" else ha[-1] - hb[-1]
    assert float(last.abs().max()) > 0.5 * float(first.abs().max())


def test_gated_needs_an_input_bound_and_stacks_use_unit_bounds():
    module = _gated("gru", layers=2)
    results = gated_contraction(module, None)
    assert not any(r.holds for r in results) and "input bound" in results[0].reason
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.1)
    results = gated_contraction(module, 5.0)
    assert [r.input_bound for r in results] == [5.0, 1.0]
    cascade = certify_recurrent(SequenceClassifier(module, nn.Linear(6, 2)), input_bound=5.0)[0]
    assert cascade.holds and cascade.rate == max(r.rate for r in results)


def test_lstm_with_a_saturated_forget_gate_is_not_certified_and_does_not_crash():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(2, 3)
    with torch.no_grad():
        lstm.bias_ih_l0[3:6] = 40.0  # forget gate pre-activation >= 40 - R: sigmoid rounds to 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (result,) = gated_contraction(lstm, 1.0)
    assert not result.holds and result.rate is None
    assert result.to_dict()["holds"] is False
