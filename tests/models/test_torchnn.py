"""torch.nn recurrent layers wrapped as sequence classifiers: their Lur'e forms reproduce the module,
verdicts match hand-built forms, recurrent layers are found in a user's module."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers import rnn_classifier
from lrnn_analysis.lure import LureSystem
from lrnn_analysis.models.torchnn import (
    SequenceClassifier,
    embedding_fed_layers,
    find_recurrent_layers,
    layer_input_maxima,
    record_layer_inputs,
    recurrent_parameter_patterns,
)
from lrnn_analysis.stability import certify
from lrnn_analysis.stability.consistency import check_lure_form


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_rnn_lure_forms_reproduce_the_module(dtype, tol, nonlinearity, batch_first, layers, bias):
    model = rnn_classifier(nonlinearity, batch_first, layers, bias, dtype)
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
    model = rnn_classifier(layers=3, dtype=torch.float64)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    states = x
    for layer in range(3):
        states = model.hidden_states(x, layer)
    output, _ = model.rnn(x)
    assert torch.allclose(states, output, atol=1e-14)


@pytest.mark.parametrize("scale,expected", [(0.5, True), (3.0, False)])
def test_rnn_verdict_matches_hand_built_lure_form(scale, expected):
    model = rnn_classifier(hidden=6, seed=3)
    with torch.no_grad():
        W = model.rnn.weight_hh_l0
        W.mul_(scale / torch.linalg.matrix_norm(W, 2))
    by_hand = LureSystem(np.zeros((6, 6)), W.detach().double().numpy(), method="map")
    ours = certify(model.lure_form(), ["map-norm", "map-lmi"], tiers=("norm", "P=I"))
    reference = certify(by_hand, ["map-norm", "map-lmi"], tiers=("norm", "P=I"))
    assert [r.holds for r in ours] == [r.holds for r in reference]
    assert ours[0].holds == expected
    assert [r.rate for r in ours] == [r.rate for r in reference]


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


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first", [True, False])
def test_layer_input_maxima_are_what_each_layer_reads(kind, batch_first):
    torch.manual_seed(0)
    rnn = kind(3, 5, num_layers=3, batch_first=batch_first).double()
    x = torch.randn(4, 6, 3, dtype=torch.float64) * 3
    shape = (3, 4 if batch_first else 6, 5)
    hx = (torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)) if kind is nn.LSTM \
        else torch.rand(shape, dtype=torch.float64) * 2 - 1
    expected = [float(x.abs().max())]
    states = x
    for layer in range(2):  # run the stack's first layers one at a time
        single = kind(states.shape[-1], 5, batch_first=batch_first).double()
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(single, f"{name}_l0").copy_(getattr(rnn, f"{name}_l{layer}"))
            state = tuple(h[layer:layer + 1] for h in hx) if kind is nn.LSTM else hx[layer:layer + 1]
            states, _ = single(states, state)
        expected.append(float(states.abs().max()))
    assert layer_input_maxima(rnn, x, hx) == pytest.approx(expected, rel=1e-12)
    assert layer_input_maxima(rnn, x[0] if batch_first else x[:, 0])[0] == float((x[0] if batch_first else x[:, 0]).abs().max())


def test_record_layer_inputs_and_embedding_fed_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 3)
            self.drop = nn.Dropout(0.5)
            self.first = nn.GRU(3, 4, batch_first=True)
            self.second = nn.LSTM(4, 4, batch_first=True)

        def forward(self, tokens):
            return self.second(2 * self.first(self.drop(self.embed(tokens)))[0])[0]

    net = Net().train()
    received, embedded = record_layer_inputs(net, torch.tensor([[1, 2, 3]]))
    assert net.training and net.drop.training
    assert [len(received[name].calls) for name in ("first", "second")] == [1, 1]
    assert torch.equal(received["first"].calls[0][0], embedded["embed"][0])
    assert embedding_fed_layers(net) == {"first": "embed"}  # the LSTM reads 2 h, not an embedding
    assert embedding_fed_layers(nn.LSTM(3, 4)) == {}
