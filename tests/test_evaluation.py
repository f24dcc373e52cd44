"""Loss and accuracy are never computed from non-finite outputs; the count of NaN and inf is exact."""
import math

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


class Uniform(nn.Module):
    """Equal logits for every token of a vocabulary at every step: the uniform predictor."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.scale * torch.ones(*x.shape[:2], self.vocab)


def test_uniform_predictor_has_the_vocabulary_as_perplexity_and_its_log2_in_bits():
    from lrnn_analysis.objective import apply_mask

    vocab = 29
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, vocab, (7, 9), generator=g), torch.randint(0, vocab, (7, 9), generator=g)
    mask = torch.arange(9)[None] < torch.tensor([9, 1, 4, 9, 2, 7, 3])[:, None]
    result = evaluate(Uniform(vocab), x, apply_mask(y, mask), batch_size=3)
    assert (result.metric, result.count, result.n) == ("perplexity", int(mask.sum()), 7)
    assert result.value == pytest.approx(vocab, rel=1e-12)
    assert result.metrics["bits_per_token"] == pytest.approx(math.log2(vocab), rel=1e-12)
    assert result.loss == pytest.approx(math.log(vocab), rel=1e-12)


def test_per_step_losses_are_means_over_scored_tokens_not_over_batches():
    """Batches of unequal token counts: the loss is the mean over all scored tokens (a mean of
    batch means would weight the short batch's tokens more), as computed here in one piece."""
    from language_model import StepModel
    from lrnn_analysis.objective import apply_mask

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 5, 2, generator=g), torch.randint(0, 3, (6, 5), generator=g)
    mask = torch.arange(5)[None] < torch.tensor([5, 5, 5, 1, 1, 1])[:, None]
    model = StepModel(outputs=3)
    result = evaluate(model, x, apply_mask(y, mask), batch_size=3)
    with torch.no_grad():
        out = model(x)[mask]
    assert result.loss == pytest.approx(float(nn.functional.cross_entropy(out.double(), y[mask])), rel=1e-12)
    assert result.accuracy == int((out.argmax(1) == y[mask]).sum()) / int(mask.sum())
    regression = evaluate(model, x, torch.zeros(6, 5, 3))
    assert regression.metric == "mse" and regression.value == pytest.approx(float((model(x).detach() ** 2).mean()), rel=1e-6)


def test_a_model_with_one_output_per_sequence_is_refused_on_per_step_targets():
    x, y = torch.zeros(4, 3, 3), torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(InputError, match="one output per sequence cannot be scored per step"):
        evaluate(Planted(), x, y, name="planted")
