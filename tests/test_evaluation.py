"""Loss and accuracy are never computed from non-finite outputs; the count of NaN and inf is exact."""
import pytest
import torch
from torch import nn

from lrnn_analysis.errors import InputError
from lrnn_analysis.evaluation import evaluate


class Planted(nn.Module):
    """Outputs x[:, 0, :] (batch, 3): the inputs carry the NaN and inf planted in them."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * x[:, 0, :]


def test_non_finite_outputs_are_an_error_counting_them_across_batches():
    x = torch.zeros(10, 4, 3)
    x[1, 0, 2] = x[7, 0, 0] = x[8, 0, 1] = float("nan")
    x[3, 0, 0], x[9, 0, 2] = float("inf"), -float("inf")
    y = torch.zeros(10, dtype=torch.long)
    for batch_size in (1, 4, 1000):
        with pytest.raises(InputError, match=r"^planted: 3 NaN and 2 inf among its 30 outputs on 10 samples; "
                                             "no loss or accuracy is computed from non-finite outputs$"):
            evaluate(Planted(), x, y, batch_size=batch_size, name="planted")
    with pytest.raises(InputError, match="^Planted: 3 NaN and 2 inf"):
        evaluate(Planted(), x, torch.zeros(10, 3))


def test_finite_outputs_give_the_loss_and_accuracy_computed_directly():
    x = torch.randn(10, 4, 3, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10) % 3
    result = evaluate(Planted(), x, y, batch_size=4)
    assert result.loss == pytest.approx(float(nn.functional.cross_entropy(x[:, 0], y)), rel=1e-6)
    assert result.accuracy == int((x[:, 0].argmax(1) == y).sum()) / 10 and result.n == 10
