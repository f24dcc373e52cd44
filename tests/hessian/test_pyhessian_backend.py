"""PyHessian parity: agreement where it is right, documented disagreement where it is not, exact values beside."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from lrnn_analysis.hessian import HessianOperator, analyze, eigenvalues, pyhessian_eigenvalues, pyhessian_trace
from lrnn_analysis.models import ModelConfig, build_model


def regression_case(loss_fn):
    model = build_model(ModelConfig("lipschitz", 2, 8, 1, eps=0.2), seed=0)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 12, 2, generator=generator), torch.randn(8, 1, generator=generator)
    op = HessianOperator(model, loss_fn, (x, y), dtype="float64")
    return model, (x, y), op, np.linalg.eigvalsh(op.to_dense().numpy())


def negated_mse(out, y):
    return -nn.functional.mse_loss(out, y)


def test_psd_dominated_case_native_and_pyhessian_agree():
    model, batch, op, spectrum = regression_case(nn.MSELoss())
    assert spectrum[-1] > 3 * abs(spectrum[0])
    native = eigenvalues(op, which="LA", tol=1e-3)
    theirs = pyhessian_eigenvalues(model, nn.MSELoss(), batch, tol=1e-3, dtype="float64")
    assert native.values[0] == pytest.approx(spectrum[-1], rel=1e-6)
    assert theirs.values[0] == pytest.approx(spectrum[-1], rel=2e-3)
    assert theirs.method == "pyhessian-power" and theirs.matvecs >= 3 and theirs.vectors is None
    assert theirs.residuals[0] == pytest.approx(0.0, abs=0.01 * spectrum[-1])


def test_indefinite_case_pyhessian_returns_the_most_negative_eigenvalue():
    model, batch, op, spectrum = regression_case(negated_mse)
    lambda_min, lambda_max = spectrum[0], spectrum[-1]
    assert -lambda_min > 3 * lambda_max > 0
    theirs = pyhessian_eigenvalues(model, negated_mse, batch, dtype="float64")
    native = eigenvalues(op, which="BE", tol=1e-6)
    # PyHessian's "top eigenvalue" is λ_min here; the native λ_max is the true one.
    assert theirs.values[0] == pytest.approx(lambda_min, rel=2e-3)
    np.testing.assert_allclose(native.values, [lambda_max, lambda_min], rtol=1e-6)


def test_indefinite_case_pyhessian_trace_stops_after_a_few_samples():
    model, batch, op, spectrum = regression_case(negated_mse)
    theirs = pyhessian_trace(model, negated_mse, batch, tol=1e-3, dtype="float64")
    assert np.sum(spectrum) < 0
    assert len(theirs.samples) <= 4 and theirs.stop_reason == "pyhessian-rule"
    assert theirs.matvecs == len(theirs.samples)


def test_pyhessian_backend_is_seeded_leaves_model_untouched_and_skips_unused_parameters():
    model, batch, _, _ = regression_case(nn.MSELoss())
    model.register_parameter("unused", nn.Parameter(torch.randn(2)))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = pyhessian_eigenvalues(model, nn.MSELoss(), batch, seed=5)
    second = pyhessian_eigenvalues(model, nn.MSELoss(), batch, seed=5)
    assert first.values[0] == second.values[0] and first.seed == 5
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    block = pyhessian_eigenvalues(model, nn.MSELoss(), batch, params="M_A,M_W", dtype="float64")
    native = eigenvalues(HessianOperator(model, nn.MSELoss(), batch, params="M_A,M_W", dtype="float64"), which="LM")
    assert block.values[0] == pytest.approx(native.values[0], rel=1e-2)


def test_pyhessian_full_dataset_mode_counts_products():
    model, (x, y), _, spectrum = regression_case(nn.MSELoss())
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    theirs = pyhessian_eigenvalues(model, nn.MSELoss(), batches, dtype="float64")
    assert theirs.values[0] == pytest.approx(spectrum[-1], rel=2e-3)
    estimate = pyhessian_trace(model, nn.MSELoss(), batches, max_iter=5, dtype="float64")
    assert estimate.matvecs == len(estimate.samples) <= 5


def test_analyze_with_pyhessian_backend_notes_its_semantics():
    model, batch, _, spectrum = regression_case(negated_mse)
    report = analyze(model, negated_mse, batch, backend="pyhessian", trace=True, progress=False, dtype="float64")
    assert report.lambda_min is None and report.lambda_max == pytest.approx(spectrum[0], rel=2e-3)
    assert any("largest |λ|" in note for note in report.notes)
    assert "pyhessian" in report.environment
    json.dumps(report.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="density"):
        analyze(model, negated_mse, batch, backend="pyhessian", density=True, progress=False)


def test_pyhessian_refuses_several_batches_of_per_step_targets():
    """PyHessian weights batches by samples; per-step targets are weighted by scored steps."""
    from language_model import StepModel
    from lrnn_analysis.errors import InputError
    from lrnn_analysis.objective import Objective

    x, y = torch.randn(4, 5, 2), torch.randint(0, 3, (4, 5))
    with pytest.raises(InputError, match="weights batches by their samples"):
        pyhessian_eigenvalues(StepModel(), Objective(True, True).loss_fn(), [(x[:1], y[:1]), (x[1:], y[1:])])


def _lstm_classifier():
    """A two-layer LSTM with dropout (in training mode, as a model mid-training is) and a linear head."""
    torch.manual_seed(0)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.LSTM(2, 3, num_layers=2, dropout=0.3, batch_first=True).double()
            self.head = nn.Linear(3, 2).double()

        def forward(self, x):
            return self.head(self.layer(x)[0][:, -1])

    x = torch.randn(4, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return Classifier().train(), (x, torch.tensor([0, 1, 1, 0]))


def test_the_twin_runs_for_a_model_in_training_mode_as_the_native_backend_does():
    """PyHessian evaluates the model in eval mode; the twin of a dropout LSTM is refused only in
    training mode, so a model handed over in training mode must still run (the native backend does)."""
    model, batch = _lstm_classifier()
    reports = {backend: analyze(model, nn.CrossEntropyLoss(), batch, backend=backend, rnn_twin="on", max_iter=30, progress=False,
                                dtype="float64") for backend in ("native", "pyhessian")}
    assert reports["pyhessian"].operator["rnn_twin_layers"] == ["layer"]
    assert reports["pyhessian"].lambda_max == pytest.approx(reports["native"].lambda_max, rel=1e-2)
    assert model.training and "forward" not in vars(model.layer)


def test_selected_parameters_without_a_gradient_are_refused_as_bad_input():
    """params selecting only a parameter the loss does not use: an InputError, not autograd's RuntimeError,
    and the model's layers are left as they were (the twin was entered on PyHessian's copy)."""
    from lrnn_analysis.errors import InputError

    model, batch = _lstm_classifier()
    model.eval().register_parameter("unused", nn.Parameter(torch.zeros(2, dtype=torch.float64)))
    with pytest.raises(InputError, match="no selected parameter has a gradient"):
        pyhessian_eigenvalues(model, nn.CrossEntropyLoss(), batch, params="unused", rnn_twin="on")
    assert "forward" not in vars(model.layer)
