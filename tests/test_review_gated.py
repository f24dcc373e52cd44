"""A legal LSTM whose forget gate rounds to 1 in float64 gets 'not certified', never a crash."""
import warnings

import torch

from lrnn_analysis.stability.gated import gated_contraction


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
