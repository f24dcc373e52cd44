"""analyze() (what `lrnn hessian` runs): both ends of the spectrum, trace and density, GGN estimates,
the block table's order, a user module's recurrent block against the dense Hessian."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from lrnn_analysis.hessian import (
    HessianOperator,
    analyze,
)
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.objective import Objective
from user_module import user_subject


def test_hessian_of_the_recurrent_block_matches_the_dense_hessian(user):
    _, module, task = user
    subject = user_subject(module)
    x, y = task.train.x[:64], task.train.y[:64]
    report = analyze(subject, Objective(True, False).loss_fn(), (x, y), params=subject.recurrent_names(), top_k=1, progress=False)
    assert report.operator["params"] == ["rec_a", "rec_w"]
    params = {name: p.detach() for name, p in module.named_parameters()}
    n = params["rec_a"].numel()

    def loss(flat):
        state = {**params, "rec_a": flat[:n].view_as(params["rec_a"]), "rec_w": flat[n:].view_as(params["rec_w"])}
        return torch.nn.functional.cross_entropy(functional_call(module, state, (x,)), y)

    dense = torch.autograd.functional.hessian(loss, torch.cat([params["rec_a"].reshape(-1), params["rec_w"].reshape(-1)]))
    exact = torch.linalg.eigvalsh(dense.double())
    assert report.lambda_max == pytest.approx(float(exact[-1]), rel=2e-3)
    assert report.lambda_min == pytest.approx(float(exact[0]), rel=2e-3, abs=1e-4)


def test_analyze_reports_both_ends_trace_and_density(model_and_batch):
    model, x, y = model_and_batch
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


def test_analyze_rejects_unknown_backend(model_and_batch):
    model, x, y = model_and_batch
    with pytest.raises(ValueError, match="backend"):
        analyze(model, nn.CrossEntropyLoss(), (x, y), backend="other", progress=False)


def test_analyze_refuses_the_block_table_of_a_wrapped_operator(model_and_batch):
    model, x, y = model_and_batch
    with pytest.raises(ValueError, match="per-block table"):
        analyze(model, nn.CrossEntropyLoss(), (x, y), estimates=("blocks",), wrap_operator=lambda op: op, progress=False)


def test_block_table_puts_the_models_own_recurrent_parameters_first():
    """Not hard-coded M_A/M_W: a contracting model's Z1, dZ, B, C, ell lead the table, in its declared order."""
    model = build_model(ModelConfig("contracting", 1, 3, 2, eps=0.1), seed=0)
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 4, 1, generator=generator), torch.randint(0, 2, (5,), generator=generator)
    report = analyze(model, nn.CrossEntropyLoss(), (x, y), params="D.*,ell,Z1,dZ,B,C", estimates=("blocks",),
                     dtype="float64", progress=False, trace=False)
    assert [row["param"] for row in report.blocks.rows] == ["Z1", "dZ", "B", "C", "ell", "D.weight", "D.bias"]


def test_analyze_ggn_with_diag_frobenius_and_blocks(model_and_batch):
    from lrnn_analysis.hessian import GGNOperator

    model, x, y = model_and_batch
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


def test_the_ggn_warm_started_from_the_hessians_top_eigenvector(model_and_batch):
    from lrnn_analysis.hessian import GGNOperator

    model, x, y = model_and_batch
    loss = nn.CrossEntropyLoss()
    hessian = analyze(model, loss, (x, y), dtype="float64", tol=1e-8, progress=False)
    cold = analyze(model, loss, (x, y), operator="ggn", dtype="float64", tol=1e-8, progress=False)
    warm = analyze(model, loss, (x, y), operator="ggn", dtype="float64", tol=1e-8, progress=False,
                   start=hessian.eigen.vectors[:, 0])
    exact = np.linalg.eigvalsh(GGNOperator(model, loss, (x, y), dtype="float64").to_dense().numpy())[-1]
    assert warm.lambda_max == pytest.approx(exact, rel=1e-8) and cold.lambda_max == pytest.approx(exact, rel=1e-8)
    assert warm.eigen.all_converged and any("started warm" in note for note in warm.notes)
    assert not any("started warm" in note for note in cold.notes)
    with pytest.raises(ValueError, match="v0 must have length"):
        analyze(model, loss, (x, y), operator="ggn", progress=False, start=np.ones(3))
    with pytest.raises(ValueError, match="start vector"):
        analyze(model, loss, (x, y), backend="pyhessian", progress=False, start=hessian.eigen.vectors[:, 0])


def test_probe_estimators_share_their_products_and_numbers(model_and_batch):
    from lrnn_analysis.hessian import block_curvature, diagonal, frobenius_norm_squared, trace

    model, x, y = model_and_batch
    report = analyze(model, nn.CrossEntropyLoss(), (x, y), trace=True, trace_matvecs=20, estimates=("blocks", "diag", "frobenius"),
                     estimate_matvecs=20, dtype="float64", progress=False)
    alone = {"trace": trace(HessianOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64"), "hutchinson", 1e-2, 20),
             "blocks": block_curvature(HessianOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64")),
             "diag": diagonal(HessianOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64"), "hutchinson", 20),
             "frobenius": frobenius_norm_squared(HessianOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64"), 1e-2, 20)}
    assert report.trace.estimate == pytest.approx(alone["trace"].estimate, rel=1e-12)
    assert report.frobenius.estimate == pytest.approx(alone["frobenius"].estimate, rel=1e-12)
    np.testing.assert_allclose(report.diagonal.estimate, alone["diag"].estimate, rtol=1e-12, atol=1e-14)
    for shared, own in zip(report.blocks.rows, alone["blocks"].rows, strict=True):
        assert shared["trace"] == pytest.approx(own["trace"], rel=1e-12, abs=1e-14)
    estimator_products = (report.eigen.matvecs + report.trace.matvecs + report.blocks.matvecs + report.diagonal.matvecs
                          + report.frobenius.matvecs)
    reused = estimator_products - report.matvecs
    # the trace's >= 10 probes begin the diagonal's 20, which are the Frobenius norm's 20 and the first 20 of the blocks' 60
    assert reused >= 10 + 20 + 20
    assert any(f"{reused} products were asked for again" in note for note in report.notes)


def test_analyze_deflates_the_trace_by_its_eigenvalue_run_and_shares_the_probes_with_the_blocks(model_and_batch):
    from lrnn_analysis.hessian import HessianOperator

    model, x, y = model_and_batch
    loss = nn.CrossEntropyLoss()
    H = HessianOperator(model, loss, (x, y), dtype="float64").to_dense().numpy()
    common = dict(trace=True, trace_tol=0.0, trace_matvecs=20, estimates=("blocks",), dtype="float64", tol=1e-8, progress=False)
    plain = analyze(model, loss, (x, y), **common)
    deflated = analyze(model, loss, (x, y), trace_method="deflated", **common)
    assert deflated.trace.method == "deflated" and deflated.trace.sketch_size == deflated.eigen.iterations
    assert abs(deflated.trace.estimate - np.trace(H)) <= deflated.trace.ci_halfwidth < plain.trace.ci_halfwidth
    assert deflated.lambda_max == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-8)
    assert deflated.lambda_min == pytest.approx(np.linalg.eigvalsh(H)[0], rel=1e-6)
    # the block table's traces come from the same probes and products as before
    assert [row["trace"] for row in deflated.blocks.rows] == [row["trace"] for row in plain.blocks.rows]
    assert any("[0, 1]" in note and "deflated" in note for note in deflated.notes) and deflated.eigen.krylov is None
    json.dumps(deflated.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="needs backend='native'"):
        analyze(model, loss, (x, y), backend="pyhessian", trace=True, trace_method="deflated", progress=False)


def test_the_krylov_basis_is_released_before_the_other_estimators_run(model_and_batch, monkeypatch):
    """The deflated trace's basis and products (2·P·m float64) are gone once the trace is done: the
    block table and the density do not run beside them."""
    import gc
    import weakref

    from lrnn_analysis.hessian import analysis

    model, x, y = model_and_batch
    alive: list[bool] = []
    bases: list[weakref.ref] = []
    real_trace, real_blocks, real_density = analysis.trace_estimate, analysis.block_curvature, analysis.spectral_density

    def trace_keeping_refs(*args, krylov=None, **kwargs):
        bases.extend(weakref.ref(t) for t in krylov)
        return real_trace(*args, krylov=krylov, **kwargs)

    def checking(real):
        def run(*args, **kwargs):
            gc.collect()
            alive.append(any(ref() is not None for ref in bases))
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(analysis, "trace_estimate", trace_keeping_refs)
    monkeypatch.setattr(analysis, "block_curvature", checking(real_blocks))
    monkeypatch.setattr(analysis, "spectral_density", checking(real_density))
    analyze(model, nn.CrossEntropyLoss(), (x, y), trace=True, trace_method="deflated", trace_matvecs=12, estimates=("blocks",),
            density=True, density_probes=1, density_steps=4, progress=False)
    assert len(bases) == 2 and alive == [False, False]
