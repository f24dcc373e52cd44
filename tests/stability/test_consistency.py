"""check_lure_form: a model's claimed Lur'e form against its own states."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers import rnn_classifier
from lrnn_analysis.lure import LureSystem
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.models.torchnn import SequenceClassifier
from lrnn_analysis.stability.consistency import check_lure_form


def test_transposed_lure_system_is_caught():
    model = rnn_classifier(dtype=torch.float64)
    W = model.rnn.weight_hh_l0.detach().numpy()
    x = torch.randn(3, 12, 3, dtype=torch.float64)
    right = check_lure_form(model, LureSystem(np.zeros_like(W), W, method="map"), x)
    wrong = check_lure_form(model, LureSystem(np.zeros_like(W), W.T, method="map"), x)
    assert right.consistent and not wrong.consistent and wrong.relative_difference > 1e-3


def test_toolkit_model_lure_form_is_consistent():
    model = build_model(ModelConfig("lipschitz", 3, 6, 2, eps=0.1), seed=0).double()
    result = check_lure_form(model, model.lure_form(), torch.randn(2, 10, 3, dtype=torch.float64))
    assert result.consistent and result.relative_difference < 1e-12


def test_check_lure_form_needs_a_tolerance_for_a_dtype_it_has_none_for():
    """bfloat16 states round far more than float32's default tolerance allows: no guess."""
    torch.manual_seed(0)
    model = SequenceClassifier(nn.RNN(3, 4, batch_first=True), nn.Linear(4, 2)).to(torch.bfloat16)
    x = torch.randn(2, 5, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no default tolerance for torch.bfloat16"):
        check_lure_form(model, model.lure_form(), x)
    assert check_lure_form(model, model.lure_form(), x, tolerance=0.05).consistent
