"""analyze() (what ``lrnn hessian`` runs) and landscapes through the trained parameters."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from lrnn_analysis.evaluation import evaluate
from lrnn_analysis.hessian import (
    HessianOperator,
    analyze,
    eigenvalues,
    eigenvector_directions,
    landscape,
    random_directions,
)
from lrnn_analysis.models import ModelConfig, build_model


@pytest.fixture(scope="module")
def case():
    model = build_model(ModelConfig("lipschitz", 2, 6, 3, eps=0.2), seed=0)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 10, 2, generator=generator), torch.randint(0, 3, (9,), generator=generator)
    return model, x, y


def test_analyze_reports_both_ends_trace_and_density(case):
    model, x, y = case
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    report = analyze(model, nn.CrossEntropyLoss(), batches, top_k=2, trace=True, density=True, seed=3,
                     dtype="float64", progress=False, trace_method="hutch++", density_steps=10)
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64").to_dense().numpy()
    spectrum = np.linalg.eigvalsh(H)
    assert report.lambda_max == pytest.approx(spectrum[-1], rel=1e-5)
    assert report.lambda_min == pytest.approx(spectrum[0], rel=1e-5)
    assert len(report.eigen.values) == 4 and report.eigen.which == "BE"
    assert abs(report.trace.estimate - np.trace(H)) <= 2 * report.trace.ci_halfwidth
    assert report.density.dim == H.shape[0]
    assert report.matvecs == report.eigen.matvecs + report.trace.matvecs + report.density.matvecs
    assert report.seed == 3 and report.operator["n_batches"] == 2 and report.operator["n_samples"] == 9
    assert report.environment["device"] == "cpu" and "torch" in report.environment
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["eigen"]["values"][0] == pytest.approx(report.lambda_max)
    assert "vectors" not in data["eigen"] and data["trace"]["ci_halfwidth"] > 0
    assert {"lambda_max", "lambda_min", "eigen", "trace", "density", "matvecs", "wall_time", "notes"} <= set(data)


def test_analyze_rejects_unknown_backend(case):
    model, x, y = case
    with pytest.raises(ValueError, match="backend"):
        analyze(model, nn.CrossEntropyLoss(), (x, y), backend="other", progress=False)


def test_analyze_refuses_the_block_table_of_a_wrapped_operator(case):
    model, x, y = case
    with pytest.raises(ValueError, match="per-block table"):
        analyze(model, nn.CrossEntropyLoss(), (x, y), estimates=("blocks",), wrap_operator=lambda op: op, progress=False)


def test_landscape_at_zero_is_the_evaluated_loss_and_model_is_unchanged(case):
    model, x, y = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = landscape(model, nn.CrossEntropyLoss(), [(x[:5], y[:5]), (x[5:], y[5:])], "random",
                       (np.linspace(-1, 1, 3), np.linspace(-0.5, 0.5, 5)), seed=4)
    assert result.loss.shape == (3, 5) and result.accuracy.shape == (3, 5) and result.seed == 4
    reference = evaluate(model, x, y, is_classification=True)
    assert result.loss[1, 2] == pytest.approx(reference.loss, rel=1e-6)
    assert result.accuracy[1, 2] == pytest.approx(reference.accuracy)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    json.dumps(result.to_dict(), allow_nan=False)


def test_filter_normalised_directions_match_row_norms(case):
    model, _, _ = case
    first, second = random_directions(model, n=2, seed=0)
    for name, weight in model.named_parameters():
        d = first[name]
        if weight.ndim >= 2:
            torch.testing.assert_close(d.norm(dim=1), weight.detach().norm(dim=1))
        else:
            torch.testing.assert_close(d.norm(), weight.detach().norm())
    assert not torch.equal(first["M_A"], second["M_A"])
    assert torch.equal(random_directions(model, n=1, seed=0)[0]["M_A"], first["M_A"])


def test_landscape_curvature_along_eigenvectors_is_the_eigenvalue(case):
    model, x, y = case
    model64 = build_model(model.config).double()
    model64.load_state_dict(model.state_dict())
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model64, loss_fn, (x.double(), y), params="M_*")
    pairs = eigenvalues(op, k=1, which="BE", tol=1e-8)
    h = 1e-3
    line = landscape(model64, loss_fn, (x.double(), y), eigenvector_directions(op, pairs, (0,)), [-h, 0.0, h])
    curvature = (line.loss[0] - 2 * line.loss[1] + line.loss[2]) / h**2
    assert curvature == pytest.approx(pairs.values[0], rel=1e-3)
    plane = landscape(model64, loss_fn, (x.double(), y), eigenvector_directions(op, pairs, (0, 1)), [-h, 0.0, h])
    assert plane.params == ("M_A", "M_W") and plane.loss.shape == (3, 3)
    curvature_min = (plane.loss[1, 0] - 2 * plane.loss[1, 1] + plane.loss[1, 2]) / h**2
    assert curvature_min == pytest.approx(pairs.values[1], rel=1e-3)


def test_block_table_puts_the_models_own_recurrent_parameters_first():
    """Not hard-coded M_A/M_W: a contracting model's Z1, dZ, B, C, ell lead the table, in its declared order."""
    model = build_model(ModelConfig("contracting", 1, 3, 2, eps=0.1), seed=0)
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 4, 1, generator=generator), torch.randint(0, 2, (5,), generator=generator)
    report = analyze(model, nn.CrossEntropyLoss(), (x, y), params="D.*,ell,Z1,dZ,B,C", estimates=("blocks",),
                     dtype="float64", progress=False, trace=False)
    assert [row["param"] for row in report.blocks.rows] == ["Z1", "dZ", "B", "C", "ell", "D.weight", "D.bias"]


def test_analyze_ggn_with_diag_frobenius_and_blocks(case):
    from lrnn_analysis.hessian import GGNOperator

    model, x, y = case
    report = analyze(model, nn.CrossEntropyLoss(), (x, y), params="M_A,M_W,D.*,nothing", operator="ggn",
                     estimates=("diag", "frobenius", "blocks"), dtype="float64", progress=False, estimate_matvecs=40)
    G = GGNOperator(model, nn.CrossEntropyLoss(), (x, y), params="M_A,M_W,D.*", dtype="float64").to_dense().numpy()
    assert report.operator["operator"] == "ggn" and report.operator["unmatched_patterns"] == ["nothing"]
    assert any("nothing" in note for note in report.notes)
    assert report.lambda_max == pytest.approx(np.linalg.eigvalsh(G)[-1], rel=1e-5)
    assert report.diagonal.estimate.shape == (G.shape[0],) and report.frobenius.matvecs <= 40
    assert [row["param"] for row in report.blocks.rows] == ["M_A", "M_W", "D.weight", "D.bias"]
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["blocks"]["rows"][0]["param"] == "M_A" and "estimate" in data["frobenius"]
    with pytest.raises(ValueError, match="pyhessian"):
        analyze(model, nn.CrossEntropyLoss(), (x, y), backend="pyhessian", operator="ggn", progress=False)
