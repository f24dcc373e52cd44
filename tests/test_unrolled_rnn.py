"""The unrolled twins of nn.RNN/LSTM/GRU against the layers themselves: outputs and states, gradients
with respect to the layer's own tensors, and curvature products (the twin forced on the CPU) equal to
the layer's own double backward in float64; the choice of layers and the refusals."""
import logging

import numpy as np
import pytest
import torch
from torch import nn

import lrnn_analysis.unrolled_rnn as unrolled_module
from lrnn_analysis.errors import InputError
from lrnn_analysis.hessian import GGNOperator, HessianOperator, analyze
from lrnn_analysis.unrolled_rnn import twin_layer_names, unrolled_forward, unrolled_layers

LAYERS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
CASES = [
    ("rnn", {}),
    ("rnn", {"nonlinearity": "relu", "num_layers": 2}),
    ("rnn", {"bias": False, "batch_first": True}),
    ("rnn", {"bidirectional": True}),
    ("lstm", {}),
    ("lstm", {"num_layers": 2, "batch_first": True, "dropout": 0.3}),
    ("lstm", {"proj_size": 2}),
    ("lstm", {"bidirectional": True, "num_layers": 2, "proj_size": 2, "bias": False}),
    ("gru", {}),
    ("gru", {"num_layers": 2, "bidirectional": True}),
    ("gru", {"bias": False, "batch_first": True}),
]
IDS = [f"{kind}-{'-'.join(f'{k}={v}' for k, v in options.items()) or 'default'}" for kind, options in CASES]


def make_layer(kind, options, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return LAYERS[kind](2, 3, **options).to(dtype).eval()


def layer_input(layer, batch=3, steps=4, seed=1):
    x = torch.randn(steps, batch, 2, dtype=next(layer.parameters()).dtype, generator=torch.Generator().manual_seed(seed))
    return x.transpose(0, 1).contiguous() if layer.batch_first else x


def initial_state(layer, batch=3, seed=2):
    generator = torch.Generator().manual_seed(seed)
    rows = layer.num_layers * (2 if layer.bidirectional else 1)
    dtype = next(layer.parameters()).dtype
    h_size = getattr(layer, "proj_size", 0) or layer.hidden_size
    h0 = torch.randn(rows, batch, h_size, dtype=dtype, generator=generator)
    return (h0, torch.randn(rows, batch, layer.hidden_size, dtype=dtype, generator=generator)) if isinstance(layer, nn.LSTM) else h0


def assert_same(a, b, tol):
    if isinstance(a, tuple):
        for u, v in zip(a, b, strict=True):
            assert_same(u, v, tol)
        return
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol


class Classifier(nn.Module):
    """Inputs (batch, time, features) through the layer (in its own layout) to a head reading the mean
    output and the final hidden states, so every output of the layer matters."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        directions = 2 if layer.bidirectional else 1
        h_size = getattr(layer, "proj_size", 0) or layer.hidden_size
        self.head = nn.Linear(directions * h_size * (1 + layer.num_layers), 3).to(next(layer.parameters()).dtype)

    def forward(self, x):
        output, state = self.layer(x if self.layer.batch_first else x.transpose(0, 1))
        h = state[0] if isinstance(state, tuple) else state
        pooled = output.mean(dim=1 if self.layer.batch_first else 0)
        return self.head(torch.cat([pooled, h.transpose(0, 1).reshape(len(pooled), -1)], dim=1))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("kind,options", CASES, ids=IDS)
def test_twin_reproduces_the_layer(kind, options, dtype, tol):
    layer = make_layer(kind, options, dtype)
    x = layer_input(layer)
    with torch.no_grad():
        assert_same(unrolled_forward(layer, x), layer(x), tol)
        hx = initial_state(layer)
        assert_same(unrolled_forward(layer, x, hx), layer(x, hx), tol)
        single = x[0] if layer.batch_first else x[:, 0]  # unbatched: (time, features)
        assert_same(unrolled_forward(layer, single), layer(single), tol)


@pytest.mark.parametrize("kind,options", CASES[::3], ids=IDS[::3])
def test_twin_gradients_are_the_layers_own(kind, options):
    layer = make_layer(kind, options)
    x = layer_input(layer)
    weights = torch.randn_like(layer(x)[0])
    grads_layer = torch.autograd.grad((layer(x)[0] * weights).sum(), list(layer.parameters()))
    grads_twin = torch.autograd.grad((unrolled_forward(layer, x)[0] * weights).sum(), list(layer.parameters()))
    for a, b in zip(grads_layer, grads_twin, strict=True):
        assert (a - b).abs().max().item() <= 1e-12


@pytest.mark.parametrize("kind,options", CASES, ids=IDS)
def test_curvature_products_through_the_twin_equal_the_layers_double_backward(kind, options):
    model = Classifier(make_layer(kind, options))
    x = torch.randn(4, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(3))
    loss = nn.CrossEntropyLoss()
    own = HessianOperator(model, loss, (x, y), rnn_twin="off")
    twin = HessianOperator(model, loss, (x, y), rnn_twin="on")
    assert own.rnn_twin_layers == () and twin.rnn_twin_layers == ("layer",)
    generator = torch.Generator().manual_seed(4)
    for _ in range(2):
        v = torch.randn(own.dim, dtype=torch.float64, generator=generator)
        expected = own.apply(v)
        assert expected.abs().max() > 1e-6  # the products are not trivially zero
        assert (twin.apply(v) - expected).abs().max().item() <= 1e-10
    assert "forward" not in vars(model.layer)  # the module runs its own forward again
    assert model.layer.training is False


def test_ggn_products_through_the_twin():
    model = Classifier(make_layer("lstm", {"num_layers": 2}))
    x = torch.randn(3, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (3,), generator=torch.Generator().manual_seed(3))
    own = GGNOperator(model, nn.CrossEntropyLoss(), (x, y), rnn_twin="off")
    twin = GGNOperator(model, nn.CrossEntropyLoss(), (x, y), rnn_twin="on")
    v = torch.randn(own.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert (twin.apply(v) - own.apply(v)).abs().max().item() <= 1e-10


def test_the_twin_is_chosen_visibly(caplog):
    model = Classifier(make_layer("gru", {}))
    x = torch.randn(3, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(3, dtype=torch.long)
    assert twin_layer_names(model, "auto", torch.device("cpu")) == ()
    assert twin_layer_names(model, "auto", torch.device("cuda")) == ("layer",)
    with caplog.at_level(logging.INFO, logger="lrnn_analysis.unrolled_rnn"):
        op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), rnn_twin="on")
    assert "unrolled twin of layer" in caplog.text
    assert op.describe()["rnn_twin"] == "on" and op.describe()["rnn_twin_layers"] == ["layer"]
    assert HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).describe()["rnn_twin_layers"] == []
    report = analyze(model, nn.CrossEntropyLoss(), (x, y), rnn_twin="on", progress=False, max_iter=5)
    assert any("unrolled twins" in note for note in report.notes)
    with pytest.raises(InputError, match="rnn_twin must be one of"):
        HessianOperator(model, nn.CrossEntropyLoss(), (x, y), rnn_twin="always")


def test_refusals_and_restoration():
    layer = make_layer("lstm", {"num_layers": 2, "dropout": 0.5}).train()
    x = layer_input(layer)
    with pytest.raises(InputError, match="eval mode"):
        unrolled_forward(layer, x)
    layer.eval()
    packed = nn.utils.rnn.pack_padded_sequence(x, [4, 3, 2])
    with pytest.raises(InputError, match="packed"):
        unrolled_forward(layer, packed)
    with pytest.raises(InputError, match="initial state"):
        unrolled_forward(layer, x, torch.zeros(2, 3, 3, dtype=torch.float64))
    model = Classifier(layer)
    with pytest.raises(RuntimeError, match="inside"), unrolled_layers(model, ["layer"]):
        assert "forward" in vars(model.layer)
        raise RuntimeError("inside")
    assert "forward" not in vars(model.layer)
    with pytest.raises(InputError, match="no unrolled twin"), unrolled_layers(model, ["head"]):
        pass


def test_the_pyhessian_backend_runs_the_twin_too(monkeypatch):
    """rnn_twin reaches the PyHessian backend: with the twin forced on the CPU its products run through
    the twin, and its eigenvalue and trace samples equal those through the layer's own double backward."""
    pytest.importorskip("pyhessian")
    model = Classifier(make_layer("lstm", {"num_layers": 2}))
    x = torch.randn(4, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(3))
    calls = []
    original = unrolled_module.unrolled_forward

    def counted(layer, *args, **kwargs):
        calls.append(layer)
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(unrolled_module, "unrolled_forward", counted)
    reports = {mode: analyze(model, nn.CrossEntropyLoss(), (x, y), backend="pyhessian", rnn_twin=mode, trace=True,
                             trace_matvecs=4, max_iter=20, progress=False, dtype="float64") for mode in ("off", "on")}
    assert calls and "forward" not in vars(model.layer)
    assert reports["on"].operator["rnn_twin_layers"] == ["layer"] and reports["off"].operator["rnn_twin_layers"] == []
    assert any("unrolled twins" in note for note in reports["on"].notes)
    assert abs(reports["on"].lambda_max - reports["off"].lambda_max) <= 1e-10 * abs(reports["off"].lambda_max)
    np.testing.assert_allclose(reports["on"].trace.samples, reports["off"].trace.samples, rtol=1e-10)
