"""GGN, Monte-Carlo Fisher and empirical Fisher against dense J^T M J built from an independent dense Jacobian."""
import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn
from torch.func import functional_call

from lrnn_analysis.hessian import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    curvature_operator,
    eigenvalues,
    spectral_density,
    trace,
)
from lrnn_analysis.models import ModelConfig, build_model


def case(outputs=3, n=4, T=6, batch=7, seed=0, arch="lipschitz"):
    model = build_model(ModelConfig(arch, 2, n, outputs, eps=0.2, init_std=2.0), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, T, 2, generator=generator)
    y = torch.randint(0, outputs, (batch,), generator=generator) if outputs > 1 else torch.randn(batch, 1, generator=generator)
    return model, x, y


def dense_jacobian(model, x, names):
    """∂f/∂θ of the float64 model outputs (n·K × P) by torch.autograd.functional.jacobian."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    sizes = [params[k].numel() for k in names]

    def outputs(flat):
        chunks = {k: c.reshape(params[k].shape) for k, c in zip(names, torch.split(flat, sizes), strict=True)}
        return functional_call(model, {**params, **chunks}, (x.double(),)).reshape(-1)

    flat = torch.cat([params[k].reshape(-1) for k in names])
    out = functional_call(model, params, (x.double(),))
    return torch.autograd.functional.jacobian(outputs, flat), out.detach()


def dense_sandwich(model, batches, names, matrices):
    """(1/N) Σ_i J_iᵀ M_i J_i with M_i from ``matrices(f, y)`` (n, K, K) per batch."""
    total = sum(len(x) for x, _ in batches)
    result = 0
    for x, y in batches:
        J, f = dense_jacobian(model, x, names)
        n, K = f.shape
        J = J.reshape(n, K, -1)
        M = matrices(f, y)
        result = result + torch.einsum("nkp,nkl,nlq->pq", J, M, J) / total
    return result


def ce_hessian(f, y):
    p = torch.softmax(f, dim=1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def mse_hessian(f, y):
    n, K = f.shape
    return (2.0 / K) * torch.eye(K, dtype=f.dtype).expand(n, K, K)


@pytest.mark.parametrize("loss,outputs,reference", [(nn.CrossEntropyLoss(), 3, ce_hessian), (nn.MSELoss(), 2, mse_hessian)])
@pytest.mark.parametrize("cache_graph", [True, False])
def test_ggn_matches_dense_jacobian_sandwich_with_uneven_batches(loss, outputs, reference, cache_graph):
    model, x, y = case(outputs=outputs)
    if outputs == 2:
        y = torch.randn(len(x), 2, generator=torch.Generator().manual_seed(5))
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    op = GGNOperator(model, loss, batches, dtype="float64", cache_graph=cache_graph)
    names = [k for k, _ in model.named_parameters()]
    expected = dense_sandwich(model, batches, names, reference)
    assert isinstance(op, LinearOperator) and op.graph_cached == cache_graph
    torch.testing.assert_close(op.to_dense(), expected, rtol=1e-8, atol=1e-11)
    assert op.describe()["operator"] == "ggn" and op.describe()["n_samples"] == 7


def test_ggn_of_mse_with_a_linear_readout_equals_the_hessian_block():
    """With MSE and only the readout D selected, the loss is quadratic in D: GGN = Hessian exactly."""
    model, x, _ = case(outputs=2)
    y = torch.randn(len(x), 2, generator=torch.Generator().manual_seed(3))
    ggn = GGNOperator(model, nn.MSELoss(), (x, y), params="D.*", dtype="float64").to_dense()
    hessian = HessianOperator(model, nn.MSELoss(), (x, y), params="D.*", dtype="float64").to_dense()
    torch.testing.assert_close(ggn, hessian, rtol=1e-10, atol=1e-12)


def test_empirical_fisher_is_the_mean_outer_product_of_per_sample_gradients():
    model, x, y = case()
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    op = EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), batches, params="M_*,D.weight", dtype="float64")
    named = {k: v.detach().double().clone().requires_grad_(True) for k, v in model.named_parameters()}
    grads = []
    for i in range(len(x)):
        out = functional_call(model, named, (x[i:i + 1].double(),))
        g = torch.autograd.grad(nn.functional.cross_entropy(out, y[i:i + 1]), [named[k] for k in op.names])
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(grads)
    torch.testing.assert_close(op.to_dense(), G.T @ G / len(x), rtol=1e-8, atol=1e-11)


def test_mc_fisher_is_the_sandwich_of_its_sampled_labels_and_converges_to_the_ggn():
    model, x, y = case()
    names = [k for k, _ in model.named_parameters()]
    few = FisherOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64", mc_samples=3, seed=4)
    targets = few.sampled_targets[0]
    assert targets.shape == (3, len(x))

    def sampled(f, _):
        p = torch.softmax(f, dim=1)
        r = p[None] - nn.functional.one_hot(targets, 3).double()
        return torch.einsum("sni,snj->nij", r, r) / 3

    torch.testing.assert_close(few.to_dense(), dense_sandwich(model, [(x, y)], names, sampled), rtol=1e-8, atol=1e-11)
    again = FisherOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64", mc_samples=3, seed=4)
    assert torch.equal(again.sampled_targets[0], targets)

    ggn = GGNOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64").to_dense()
    many = FisherOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64", mc_samples=20000, seed=0).to_dense()
    assert torch.linalg.norm(many - ggn) <= 0.03 * torch.linalg.norm(ggn)
    assert torch.linalg.norm(few.to_dense() - ggn) > torch.linalg.norm(many - ggn)


def test_output_space_fisher_expectation_is_the_output_hessian_exactly():
    """Σ_c p_c (p − e_c)(p − e_c)ᵀ = diag(p) − ppᵀ (cross-entropy), E[(2/K)² ε ε ᵀ·K/2] = (2/K) I (MSE)."""
    f = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(f, dim=1)
    r = p[:, None, :] - torch.eye(4, dtype=torch.float64)[None]
    torch.testing.assert_close(torch.einsum("nc,nci,ncj->nij", p, r, r), ce_hessian(f, None))
    model, x, _ = case(outputs=2)
    y = torch.zeros(len(x), 2)
    fisher = FisherOperator(model, nn.MSELoss(), (x, y), dtype="float64", mc_samples=40000, seed=1)
    ggn = GGNOperator(model, nn.MSELoss(), (x, y), dtype="float64").to_dense()
    assert torch.linalg.norm(fisher.to_dense() - ggn) <= 0.03 * torch.linalg.norm(ggn)


def test_estimators_run_on_every_operator_and_match_dense():
    model, x, y = case()
    for kind in ("hessian", "ggn", "fisher", "ef"):
        op = curvature_operator(kind, model, nn.CrossEntropyLoss(), (x, y), dtype="float64", mc_samples=2)
        dense = op.to_dense().numpy()
        spectrum = np.linalg.eigvalsh(dense)
        top = eigenvalues(op, k=1, which="LA", tol=1e-8)
        assert top.values[0] == pytest.approx(spectrum[-1], rel=1e-6)
        estimate = trace(op, "hutch++", tol=0.0, max_matvecs=op.dim * 2, sketch_size=op.dim)
        assert estimate.estimate == pytest.approx(np.trace(dense), rel=1e-9)
        density = spectral_density(op, n_probes=3, steps=8, seed=0)
        assert density.dim == op.dim
        if kind != "hessian":
            assert spectrum[0] >= -1e-10 * spectrum[-1]


def test_curvature_operators_reject_losses_they_cannot_represent_exactly():
    model, x, y = case()
    with pytest.raises(ValueError, match="CrossEntropyLoss or nn.MSELoss"):
        GGNOperator(model, lambda out, target: out.sum(), (x, y))
    with pytest.raises(ValueError, match="label smoothing"):
        GGNOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), (x, y))
    with pytest.raises(ValueError, match="operator must be one of"):
        curvature_operator("kfac", model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="mc_samples"):
        FisherOperator(model, nn.CrossEntropyLoss(), (x, y), mc_samples=0)


def test_unused_parameters_have_zero_blocks_and_the_model_is_untouched():
    model, x, y = case()
    model.register_parameter("unused", nn.Parameter(torch.randn(2)))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = GGNOperator(model, nn.CrossEntropyLoss(), (x, y), params="unused,D.bias", dtype="float64")
    assert op.no_grad_params == ("unused",)
    dense = op.to_dense()
    assert torch.all(dense[:, op.block_slices()["unused"]] == 0)
    only = EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), (x, y), params="unused", dtype="float64")
    assert torch.equal(only.to_dense(), torch.zeros(2, 2, dtype=torch.float64))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("classification", [True, False])
@pytest.mark.parametrize("cache_graph", [True, False])
def test_per_token_ggn_is_the_explicit_sandwich_over_unmasked_outputs(classification, cache_graph):
    """Per-step outputs (B, T, K) are flattened to their M unmasked (sequence, step) rows: the GGN is
    (1/M) Σ_tokens J_iᵀ M_i J_i, M_i = diag(p_i) − p_i p_iᵀ per token (or (2/k) I), built here from
    the dense Jacobian of every output."""
    from language_model import StepModel
    from lrnn_analysis.objective import Objective

    from .test_operator import _per_step_batches

    model = StepModel(outputs=3 if classification else 2).double()
    batches, mask = _per_step_batches(classification)
    op = GGNOperator(model, Objective(classification, True).loss_fn(), batches, dtype="float64", cache_graph=cache_graph)
    names = [k for k, _ in model.named_parameters()]
    x = torch.cat([b[0] for b in batches])
    J, f = dense_jacobian(model, x, names)  # rows: every (sequence, step, output)
    K = f.shape[-1]
    J = J.reshape(*f.shape, -1)[mask]  # (M, K, P): the scored tokens only
    M = (ce_hessian if classification else mse_hessian)(f[mask], None)
    exact = torch.einsum("mkp,mkl,mlq->pq", J, M, J) / int(mask.sum())
    assert J.shape[1] == K and op.n_scored == int(mask.sum())
    torch.testing.assert_close(op.to_dense(), exact, rtol=1e-10, atol=1e-12)
    if classification:
        ef = EmpiricalFisherOperator(model, Objective(True, True).loss_fn(), batches, dtype="float64")
        y = torch.cat([b[1] for b in batches])[mask]
        r = torch.softmax(f[mask], dim=1) - nn.functional.one_hot(y, K).double()
        g = torch.einsum("mkp,mk->mp", J, r)
        torch.testing.assert_close(ef.to_dense(), g.T @ g / int(mask.sum()), rtol=1e-10, atol=1e-12)
