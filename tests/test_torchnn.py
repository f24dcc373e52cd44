"""torch.nn recurrent layers: Lur'e forms of nn.RNN, LSTM/GRU conditions against simulation, the monitor."""
import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from lrnn_analysis.lure import LureSystem
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.models.torchnn import SequenceClassifier, find_recurrent_layers, recurrent_parameter_patterns
from lrnn_analysis.monitor import StabilityMonitor
from lrnn_analysis.stability import certify
from lrnn_analysis.stability.cascade import certify_layers, certify_recurrent
from lrnn_analysis.stability.consistency import check_lure_form
from lrnn_analysis.stability.gated import gated_contraction


def _rnn_model(nonlinearity="tanh", batch_first=True, layers=1, bias=True, dtype=torch.float32, seed=0, hidden=5):
    torch.manual_seed(seed)
    rnn = nn.RNN(3, hidden, num_layers=layers, nonlinearity=nonlinearity, batch_first=batch_first, bias=bias)
    return SequenceClassifier(rnn, nn.Linear(hidden, 2)).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_rnn_lure_forms_reproduce_the_module(dtype, tol, nonlinearity, batch_first, layers, bias):
    model = _rnn_model(nonlinearity, batch_first, layers, bias, dtype)
    x = torch.randn(4, 9, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    systems = model.lure_forms()
    assert len(systems) == layers and all(s.method == "map" and s.activation == nonlinearity for s in systems)
    for layer, system in enumerate(systems):
        result = check_lure_form(model, system, x, layer=layer)
        assert result.consistent and result.relative_difference < tol, result
    # the last layer's states are what the head reads
    out = model(x)
    assert torch.allclose(out, model.head(model.hidden_states(x)[:, -1]))
    assert (model.lure_form() is None) == (layers > 1)


def test_layerwise_states_match_the_stacked_module():
    model = _rnn_model(layers=3, dtype=torch.float64)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    states = x
    for layer in range(3):
        states = model.hidden_states(x, layer)
    output, _ = model.rnn(x)
    assert torch.allclose(states, output, atol=1e-14)


def test_transposed_lure_system_is_caught():
    model = _rnn_model(dtype=torch.float64)
    W = model.rnn.weight_hh_l0.detach().numpy()
    x = torch.randn(3, 12, 3, dtype=torch.float64)
    right = check_lure_form(model, LureSystem(np.zeros_like(W), W, method="map"), x)
    wrong = check_lure_form(model, LureSystem(np.zeros_like(W), W.T, method="map"), x)
    assert right.consistent and not wrong.consistent and wrong.relative_difference > 1e-3


def test_toolkit_model_lure_form_is_consistent():
    model = build_model(ModelConfig("lipschitz", 3, 6, 2, eps=0.1), seed=0).double()
    result = check_lure_form(model, model.lure_form(), torch.randn(2, 10, 3, dtype=torch.float64))
    assert result.consistent and result.relative_difference < 1e-12


@pytest.mark.parametrize("scale,expected", [(0.5, True), (3.0, False)])
def test_rnn_verdict_matches_hand_built_lure_form(scale, expected):
    model = _rnn_model(hidden=6, seed=3)
    with torch.no_grad():
        W = model.rnn.weight_hh_l0
        W.mul_(scale / torch.linalg.matrix_norm(W, 2))
    by_hand = LureSystem(np.zeros((6, 6)), W.detach().double().numpy(), method="map")
    ours = certify(model.lure_form(), ["map-norm", "map-lmi"], tiers=("norm", "P=I"))
    reference = certify(by_hand, ["map-norm", "map-lmi"], tiers=("norm", "P=I"))
    assert [r.holds for r in ours] == [r.holds for r in reference]
    assert ours[0].holds == expected
    assert [r.rate for r in ours] == [r.rate for r in reference]


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


def test_find_recurrent_layers_in_a_user_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.GRU(3, 4, batch_first=True)
            self.blocks = nn.ModuleList([nn.LSTM(4, 4)])
            self.out = nn.Linear(4, 2)

    found = find_recurrent_layers(Net())
    assert [(f.name, f.kind) for f in found] == [("encoder", "gru"), ("blocks.0", "lstm")]
    assert recurrent_parameter_patterns(Net()) == ("encoder.weight_hh_*", "blocks.0.weight_hh_*")
    model = SequenceClassifier(nn.LSTM(3, 4), nn.Linear(4, 2))
    assert model.recurrent_parameters == ("rnn.weight_hh_*",) and model.lure_form() is None
    with pytest.raises(ValueError, match="bidirectional"):
        SequenceClassifier(nn.RNN(3, 4, bidirectional=True), nn.Linear(8, 2))


def _train(model, monitor, epochs=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, 2, generator=gen)
    y = torch.randint(0, 2, (32,), generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(1, epochs + 1):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.update(model, epoch=epoch, train_loss=float(loss.detach()))
    return x, y


def test_monitor_on_a_toolkit_model(tmp_path):
    model = build_model(ModelConfig("lipschitz", 2, 6, 2, eps=0.1), seed=0)
    batch = (torch.randn(16, 8, 2, generator=torch.Generator().manual_seed(5)), torch.randint(0, 2, (16,)))
    monitor = StabilityMonitor("lipschitz", hessian=(nn.functional.cross_entropy, batch), hessian_steps=60, hessian_tol=1e-8)
    _train(model, monitor)
    assert [r["epoch"] for r in monitor.rows] == [1, 2, 3]
    row = monitor.rows[-1]
    system = model.lure_form()
    assert row["norm_W"] == pytest.approx(np.linalg.norm(system.W, 2))
    assert row["euler-norm_holds"] == certify(system, ["euler-norm"])[0].holds
    from lrnn_analysis.hessian import HessianOperator

    exact = np.linalg.eigvalsh(HessianOperator(model, nn.functional.cross_entropy, batch).to_dense())[-1]
    assert row["lambda_max"] == pytest.approx(exact, rel=1e-5, abs=1e-7)
    # warm start: on an unchanged model the previous epoch's vector is (nearly) converged
    warm = StabilityMonitor("lipschitz", hessian=(nn.functional.cross_entropy, batch), hessian_steps=60, hessian_tol=1e-4)
    cold_row, warm_row = warm.update(model, epoch=1)[0], warm.update(model, epoch=2)[0]
    assert warm_row["hessian_matvecs"] < cold_row["hessian_matvecs"]
    assert warm_row["lambda_max"] == pytest.approx(exact, rel=1e-3)
    monitor.update(model, epoch=4)
    from lrnn_analysis import plots

    assert len(plots.plot_training_spectra(monitor.rows, ("norm_W", "lambda_max")).axes) >= 2
    path = monitor.write_csv(tmp_path / "monitor.csv")
    with open(path) as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 4 and float(rows[0]["train_loss"]) == pytest.approx(monitor.rows[0]["train_loss"])


def test_monitor_on_torch_rnn_and_lstm(tmp_path):
    torch.manual_seed(0)
    rnn_model = SequenceClassifier(nn.RNN(2, 5, num_layers=2, batch_first=True), nn.Linear(5, 2))
    monitor = StabilityMonitor("rnn")
    _train(rnn_model, monitor, epochs=2)
    assert [(r["model"], r["layer"]) for r in monitor.rows] == [("rnn layer 0", 0), ("rnn layer 1", 1)] * 2
    systems = rnn_model.lure_forms()
    for row, system in zip(monitor.rows[2:], systems):
        assert row["norm_W"] == pytest.approx(np.linalg.norm(system.W, 2))
        assert row["map-norm_holds"] == certify(system, ["map-norm"])[0].holds
    lstm_monitor = StabilityMonitor("lstm", input_bound=3.0)
    _train(SequenceClassifier(nn.LSTM(2, 5), nn.Linear(5, 2)), lstm_monitor, epochs=2)
    assert all("lstm-contraction_holds" in row for row in lstm_monitor.rows)
    from lrnn_analysis import plots

    figure = plots.plot_training_spectra(monitor.rows, ("norm_W", "mu2_W"))
    assert len(figure.axes) >= 2
    assert math.isfinite(monitor.rows[0]["monitor_seconds"])


@pytest.mark.parametrize("layer", [nn.RNN, nn.LSTM, nn.GRU])
def test_hessian_of_wrapped_layers_matches_autograd(layer):
    from torch.autograd.functional import hessian
    from torch.func import functional_call

    from lrnn_analysis.hessian import HessianOperator

    torch.manual_seed(0)
    model = SequenceClassifier(layer(2, 3, batch_first=False), nn.Linear(3, 2)).double()
    x = torch.randn(4, 5, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    names = [name for name, _ in model.named_parameters() if name.startswith("rnn.weight_hh")]
    dense = HessianOperator(model, nn.functional.cross_entropy, (x, y), params=model.recurrent_parameters).to_dense()
    (W,) = [p.detach() for name, p in model.named_parameters() if name in names]

    def loss(w):
        return nn.functional.cross_entropy(functional_call(model, {names[0]: w}, (x,)), y)

    exact = hessian(loss, W).reshape(W.numel(), W.numel()).detach().numpy()
    np.testing.assert_allclose(dense, exact, rtol=1e-8, atol=1e-10)


def test_check_lure_form_needs_a_tolerance_for_a_dtype_it_has_none_for():
    """bfloat16 states round far more than float32's default tolerance allows: no guess."""
    torch.manual_seed(0)
    model = SequenceClassifier(nn.RNN(3, 4, batch_first=True), nn.Linear(4, 2)).to(torch.bfloat16)
    x = torch.randn(2, 5, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no default tolerance for torch.bfloat16"):
        check_lure_form(model, model.lure_form(), x)
    assert check_lure_form(model, model.lure_form(), x, tolerance=0.05).consistent
