"""torch.nn recurrent layers wrapped as sequence classifiers: their Lur'e forms reproduce the module,
verdicts match hand-built forms, recurrent layers are found in a user's module."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers import rnn_classifier
from lrnn_analysis.lure import LureSystem
from lrnn_analysis.models.torchnn import SequenceClassifier, find_recurrent_layers, recurrent_parameter_patterns
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
