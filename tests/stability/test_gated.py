"""LSTM/GRU contraction conditions against simulation, and where memory never fades."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lrnn_analysis.models.torchnn import SequenceClassifier
from lrnn_analysis.stability.cascade import certify_layers, certify_recurrent, layer_rows
from lrnn_analysis.stability.gated import BISECTION_RTOL, gated_condition, gated_contraction, largest_input_bound


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


class _Preprocessed(nn.Module):
    """A user module whose LSTM reads Linear(20 I)(x), not x."""

    def __init__(self, lstm):
        super().__init__()
        d = lstm.input_size
        self.pre = nn.Linear(d, d, bias=False).double()
        with torch.no_grad():
            self.pre.weight.copy_(20 * torch.eye(d))
        self.lstm = lstm

    def forward(self, x):
        return self.lstm(self.pre(x))[0]


def _no_inf(reason):
    """No "inf" in a reason other than the norm's name ||.||_inf."""
    return "inf" not in reason.replace("||_inf", "")


def _preprocessed_lstm():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True).double()
    with torch.no_grad():
        lstm.weight_ih_l0.mul_(2.0)
        lstm.weight_hh_l0.mul_(0.3)
        lstm.bias_ih_l0.zero_()
        lstm.bias_hh_l0.zero_()
    return _Preprocessed(lstm)


def _largest_one_step_ratio(lstm, xbar, w, trials=2000):
    """max over states reached with inputs |x_t| = xbar, perturbed, of the weighted distance after one shared step
    over the distance before."""
    g = torch.Generator().manual_seed(0)
    n, d = lstm.hidden_size, lstm.input_size
    signs = lambda t: torch.sign(torch.rand(trials, t, d, generator=g, dtype=torch.float64) - 0.5) * xbar  # noqa: E731
    with torch.no_grad():
        _, (h, c) = lstm(signs(8))
        dh = (torch.rand(1, trials, n, generator=g, dtype=torch.float64) * 2 - 1) * 1e-5
        dc = (torch.rand(1, trials, n, generator=g, dtype=torch.float64) * 2 - 1) * 1e-5
        x = signs(1)
        _, (h1, c1) = lstm(x, (h, c))
        _, (h2, c2) = lstm(x, (h + dh, c + dc))
    size = lambda a, b: torch.maximum(a.abs().amax(-1) / w[0], b.abs().amax(-1) / w[1])  # noqa: E731
    return float((size(c1 - c2, h1 - h2) / size(dc, dh)).max())


def test_a_bound_on_the_network_input_is_not_a_bound_on_a_preprocessed_layer_input():
    model = _preprocessed_lstm()
    # without data the caller's bound is taken for what the module feeds the LSTM, and said so
    (stack,) = certify_recurrent(model, input_bound=0.1)
    (result,) = stack.layers[0]
    assert result.holds and result.input_bound_source == "given"
    assert "for the input of lstm layer 0 (what the module feeds it)" in result.assumptions[0]
    assert "network input" not in result.assumptions[0]
    # with the network inputs the LSTM actually reads, the bound 0.1 is refuted: the layer reads 20 x
    x = torch.sign(torch.rand(16, 10, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.5) * 0.1
    (stack,) = certify_recurrent(model, input_bound=0.1, inputs=x)
    (refuted,) = stack.layers[0]
    assert not stack.holds and not refuted.holds and refuted.rate is None
    assert refuted.observed_input_max == pytest.approx(2.0) and stack.observed_input_max == pytest.approx(2.0)
    assert "the input of lstm layer 0 reaches 2 on the data, beyond the bound 0.1" in refuted.reason
    assert 0.1 < refuted.largest_input_bound < 2.0
    # and the layer does grow for inputs of that size, in the norm certified for 0.1
    assert _largest_one_step_ratio(model.lstm, 2.0, result.weights) > 1.0
    assert _largest_one_step_ratio(model.lstm, 0.1, result.weights) <= result.rate
    # a bound that covers what the layer receives is certified (or not) by the condition alone
    (stack,) = certify_recurrent(model, input_bound=2.0, inputs=x)
    assert stack.layers[0][0].observed_input_max == pytest.approx(2.0) and not stack.holds
    assert "condition fails" in stack.reason and _no_inf(stack.reason)


def test_without_a_bound_data_show_the_observed_maximum_and_the_largest_bound_that_works():
    model = _preprocessed_lstm()
    x = torch.full((2, 5, 3), 0.004, dtype=torch.float64)
    (stack,) = certify_recurrent(model, inputs=x)
    (result,) = stack.layers[0]
    assert not result.holds and result.input_bound is None and result.input_bound_source == "none"
    assert result.observed_input_max == pytest.approx(0.08)
    assert result.largest_input_bound == stack.largest_input_bound > 0.08  # never picked silently as a bound
    assert "reaches 0.08" in result.reason and "give input_bound" in result.reason
    (stack,) = certify_recurrent(model)
    assert not stack.holds and "cannot be bounded from what was given" in stack.layers[0][0].reason


class _RNNModel(nn.Module):
    """PyTorch's word_language_model RNNModel: Embedding, (dropout), LSTM, (dropout), Linear decoder."""

    def __init__(self, ntoken=50, ninp=6, nhid=5, nlayers=2, dropout=0.5):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return torch.log_softmax(decoded, dim=1), hidden


def test_a_layer_reading_an_embedding_gets_its_largest_entry_as_bound_without_data():
    torch.manual_seed(0)
    model = _RNNModel()
    with torch.no_grad():
        model.encoder.weight[7, 2] = 2.64
        for p in model.rnn.parameters():
            p.mul_(0.2)
    model.train()
    (stack,) = certify_recurrent(model)
    assert model.training and model.drop.training  # the probe ran in eval mode and left the modes as they were
    first, second = (results[0] for results in stack.layers)
    assert first.input_bound == float(model.encoder.weight.detach().abs().max()) == pytest.approx(2.64)
    assert first.input_bound_source == "embedding" == stack.input_bound_source
    assert "the largest |entry| of nn.Embedding 'encoder' (max over all 50 tokens)" in first.assumptions[0]
    assert "for the input of rnn layer 0" in first.assumptions[0]
    assert second.input_bound == 1.0 and second.input_bound_source == "previous layer"
    assert "layer 0's states, in [-1, 1]" in second.assumptions[0]
    assert stack.holds == (first.holds and second.holds)
    assert first.holds == (first.largest_input_bound >= 2.64)
    # a smaller given bound would be false for this layer: the exact one is used and the given one named
    (stack,) = certify_recurrent(model, input_bound=0.01)
    assert stack.layers[0][0].input_bound == pytest.approx(2.64)
    assert "given input_bound 0.01 is not used" in stack.layers[0][0].assumptions[0]
    # with data, what the layers receive is recorded too
    tokens = torch.randint(0, 50, (7, 3), generator=torch.Generator().manual_seed(2))
    (stack,) = certify_recurrent(model, inputs=tokens)
    observed = [results[0].observed_input_max for results in stack.layers]
    assert observed[0] == pytest.approx(float(model.encoder.weight.detach()[tokens].abs().max()))
    assert 0 < observed[1] < 1


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_largest_input_bound_is_exact_to_the_bisection_tolerance_and_the_condition_monotone(kind):
    module = _gated(kind, seed=3)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.2)
    condition = gated_condition(module, 0)
    largest = largest_input_bound(condition)
    assert largest is not None and 0 < largest < float("inf")
    assert condition(largest).holds and not condition(largest * (1 + 10 * BISECTION_RTOL)).holds
    (result,) = gated_contraction(module, 1.0)
    assert result.largest_input_bound == largest
    grid = np.linspace(0.0, 3.0 * largest, 301)
    values = [condition(x).value for x in grid]
    holds = [condition(x).holds for x in grid]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert holds == sorted(holds, reverse=True)  # holds below the threshold, fails above it


def test_largest_input_bound_none_and_inf():
    module = _gated("gru", seed=3)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.3)
        module.weight_ih_l0.zero_()  # the input does not enter: holds for every bound
    assert largest_input_bound(gated_condition(module, 0)) == float("inf")
    assert gated_contraction(module, 5.0)[0].largest_input_bound == float("inf")
    module = _gated("lstm", seed=3)
    with torch.no_grad():
        module.weight_hh_l0.mul_(20.0)
    (result,) = gated_contraction(module, 0.5)
    assert result.largest_input_bound is None and "fails even at xbar = 0" in result.reason


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_failure_reasons_are_words(kind):
    module = _gated(kind, seed=2)
    n = module.hidden_size
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.2)
        module.bias_ih_l0[n:2 * n] = 40.0  # forget gate (LSTM) / update gate (GRU) rounds to 1
    (result,) = gated_contraction(module, 1.0)
    gate = "forget" if kind == "lstm" else "update"
    assert not result.holds and f"the {gate} gate of unit" in result.reason
    assert "= 1.0 in float64" in result.reason and "memory never fades" in result.reason
    assert _no_inf(result.reason)
    module = _gated(kind, seed=2)
    with torch.no_grad():
        module.weight_hh_l0.mul_(3.0)
    (result,) = gated_contraction(module, 1.0)
    assert not result.holds and "dominant term" in result.reason and ">= 1 for ||x_t||_inf <= 1" in result.reason
    assert _no_inf(result.reason)


def test_new_fields_in_to_dict_and_layer_rows():
    module = _gated("lstm", layers=2, seed=1)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.2)
    stack = certify_recurrent(SequenceClassifier(module, nn.Linear(6, 2).double()), input_bound=0.5,
                              inputs=torch.full((1, 4, 3), 0.25, dtype=torch.float64))[0]
    record = stack.to_dict()
    assert record["input_bound"] == 0.5 and record["input_bound_source"] == "given"
    assert record["observed_input_max"] == 0.25 and record["largest_input_bound"] > 0.5
    assert record["layers"][1][0]["input_bound_source"] == "previous layer"
    rows = layer_rows([record])
    assert [(r["layer"], r["input_bound"], r["input_bound_source"]) for r in rows] == [
        (0, 0.5, "given"), (1, 1.0, "previous layer")]
    assert rows[0]["observed_input_max"] == 0.25 and 0 < rows[1]["observed_input_max"] < 1
    assert all(r["largest_input_bound"] is not None for r in rows)


def test_a_failed_embedding_probe_is_reported_and_certify_layers_takes_inputs():
    class Net(nn.Module):  # has an embedding, but its LSTM reads float features: the token probe cannot run
        def __init__(self):
            super().__init__()
            self.unused = nn.Embedding(4, 3)
            self.lstm = nn.LSTM(3, 4, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]

    (stack,) = certify_recurrent(Net())
    assert not stack.holds and "a probe run to find an nn.Embedding feeding it failed" in stack.reason
    lstm = _gated("lstm", layers=2, seed=1)
    x = torch.full((2, 5, 3), -0.7, dtype=torch.float64)
    stack = certify_layers(lstm, input_bound=0.5, inputs=x)
    assert stack.observed_input_max == pytest.approx(0.7) and not stack.holds
    assert "reaches 0.7 on the data, beyond the bound 0.5" in stack.layers[0][0].reason
