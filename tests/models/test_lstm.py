"""The zoo's lstm: its gates' recurrent matrices, and its certificate found by the torch.nn-layer path
exactly as for the same nn.LSTM inside any module (its equations are in test_architectures.py)."""
import torch
from torch import nn

from lrnn_analysis.model_under_analysis import ModelUnderAnalysis
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.models.torchnn import SequenceClassifier
from lrnn_analysis.pipelines.stability import certify_model


def test_recurrent_matrices_are_the_gates_hidden_weights():
    model = build_model(ModelConfig("lstm", 3, 5, 4), seed=0)
    blocks = model.recurrent_matrices(torch.float64)
    assert list(blocks) == ["Wi", "Wf", "Wg", "Wo"] and all(b.dtype == torch.float64 and b.shape == (5, 5) for b in blocks.values())
    torch.testing.assert_close(torch.cat(list(blocks.values())), model.rnn.weight_hh_l0.double())
    assert model.engine == "autograd" and not hasattr(model, "U") and model.lure_form() is None
    assert ModelUnderAnalysis.from_recurrent_model(model).recurrent_names() == ["rnn.weight_hh_l0"]


def test_certified_as_the_same_nn_lstm_in_a_user_module():
    model = build_model(ModelConfig("lstm", 3, 4, 2, readout="all"), seed=1)
    with torch.no_grad():  # small recurrent weights: the LSTM condition holds for ||x_t||_inf <= 1
        for name, parameter in model.rnn.named_parameters():
            parameter.mul_(0.1 if name.startswith("weight_hh") else 0.5)
    ours = certify_model(model, input_bound=1.0)
    wrapped = certify_model(SequenceClassifier(model.rnn, nn.Identity()), input_bound=1.0)
    assert ours.source == wrapped.source == "torch.nn layers" and ours.holds
    assert [c.to_dict() for c in ours.layers] == [c.to_dict() for c in wrapped.layers]
    assert [r["certificate"] for r in ours.rows()] == ["lstm-contraction"]
    refuted = certify_model(model, input_bound=1.0, inputs=3.0 * torch.ones(2, 5, 3))
    assert not refuted.holds and "beyond the bound" in refuted.rows()[0]["reason"]
