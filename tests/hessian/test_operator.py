"""HessianOperator against the dense Hessian from torch.func.hessian, for every architecture and for
wrapped torch.nn layers: batches, parameter selections, graph reuse, matmat."""
import fnmatch

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.func import functional_call, hessian

from lrnn_analysis.hessian import (
    HessianOperator,
    eigenvalues,
    landscape,
    power_iteration,
    spectral_density,
    trace,
)
from lrnn_analysis.models import ARCHITECTURES, DISCRETIZATIONS, ModelConfig, build_model
from lrnn_analysis.models.torchnn import SequenceClassifier

ALL_VARIANTS = [(arch, disc) for arch in ARCHITECTURES for disc in DISCRETIZATIONS[arch]]


def small_case(arch="lipschitz", disc="", n=5, T=10, batch=6, classes=3, seed=0):
    model = build_model(ModelConfig(arch, 2, n, classes, eps=0.2, discretization=disc, init_std=2.0), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, 2, generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)
    return model, x, y


def dense_hessian(model, loss_fn, batches, patterns=None):
    """Σ_b (n_b/N) ∇²ℓ_b by forward-over-reverse autodiff of a float64 functional call (independent of the HVPs)."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    names = [k for k in params if patterns is None or any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    flat = torch.cat([params[k].reshape(-1) for k in names])
    sizes = [params[k].numel() for k in names]
    total = sum(len(x) for x, _ in batches)

    def loss(vector):
        chunks = {k: c.reshape(params[k].shape) for k, c in zip(names, torch.split(vector, sizes), strict=True)}
        state = {**params, **chunks}
        return sum(len(x) / total * loss_fn(functional_call(model, state, (x.double(),)), y) for x, y in batches)

    return hessian(loss)(flat)


@pytest.mark.parametrize("arch,disc", ALL_VARIANTS)
def test_hvp_matches_dense_hessian_for_every_architecture(arch, disc):
    model, x, y = small_case(arch, disc)
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, (x, y), dtype=torch.float64)
    exact = dense_hessian(model, loss_fn, [(x, y)])
    assert op.shape == exact.shape
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.hvp(v), exact @ v, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(op.to_dense(), exact, rtol=1e-6, atol=1e-8)


def test_lipschitz_n8_over_16_steps_matches_dense_eigvalsh():
    model, x, y = small_case("lipschitz", n=8, T=16, batch=8)
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, (x, y), dtype="float64")
    exact = dense_hessian(model, loss_fn, [(x, y)]).numpy()
    torch.testing.assert_close(op.to_dense().numpy(), exact, rtol=1e-6, atol=1e-8)
    spectrum = np.linalg.eigvalsh(exact)
    both = eigenvalues(op, k=2, which="BE", tol=1e-8)
    assert both.all_converged
    np.testing.assert_allclose(both.values, [spectrum[-1], spectrum[-2], spectrum[0], spectrum[1]], rtol=1e-6)


def test_float32_default_and_scipy_compatibility():
    model, x, y = small_case()
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, (x, y))
    assert op.torch_dtype == torch.float32 and op.dtype == np.float32 and isinstance(op, LinearOperator)
    exact = dense_hessian(model, loss_fn, [(x, y)]).numpy()
    X = np.random.default_rng(0).standard_normal((op.dim, 3))
    np.testing.assert_allclose(op.matmat(X), exact @ X, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(op.matvec(X[:, 0]), exact @ X[:, 0], rtol=1e-4, atol=1e-4)
    top = eigsh(op, k=1, which="LA", tol=1e-6)[0][0]
    assert top == pytest.approx(np.linalg.eigvalsh(exact)[-1], rel=1e-4)


@pytest.mark.parametrize("cache_graph", [True, False, None])
def test_uneven_batches_are_weighted_by_samples(cache_graph):
    model, x, y = small_case(batch=11)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(x[:2], y[:2]), (x[2:9], y[2:9]), (x[9:], y[9:])]
    op = HessianOperator(model, loss_fn, iter(batches), dtype="float64", cache_graph=cache_graph)
    assert op.weights == pytest.approx((2 / 11, 7 / 11, 2 / 11))
    full = dense_hessian(model, loss_fn, [(x, y)])
    torch.testing.assert_close(op.to_dense(), full, rtol=1e-6, atol=1e-8)
    batch_mean = sum(dense_hessian(model, loss_fn, [b]) for b in batches) / 3
    assert not torch.allclose(op.to_dense(), batch_mean, rtol=1e-3, atol=1e-6)
    assert op.graph_cached == (cache_graph is not False)


def test_memory_budget_decides_graph_reuse():
    model, x, y = small_case()
    loss_fn = nn.CrossEntropyLoss()
    cached = HessianOperator(model, loss_fn, (x, y), dtype="float64")
    recomputed = HessianOperator(model, loss_fn, (x, y), dtype="float64", memory_budget=1)
    assert cached.graph_cached and not recomputed.graph_cached and cached.graph_bytes > 1
    v = torch.randn(cached.dim, dtype=torch.float64)
    torch.testing.assert_close(cached.hvp(v), recomputed.hvp(v), rtol=1e-10, atol=1e-12)


def test_parameter_subsets_by_name_and_glob_give_the_diagonal_block():
    model, x, y = small_case()
    loss_fn = nn.CrossEntropyLoss()
    full = dense_hessian(model, loss_fn, [(x, y)])
    names = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    offsets = dict(zip(names, np.cumsum([0] + sizes[:-1]), strict=True))
    index = np.concatenate([np.arange(offsets[k], offsets[k] + 25) for k in ("M_A", "M_W")])
    for spec in ("M_A,M_W", ["M_*"], ["M_W", "M_A"]):
        op = HessianOperator(model, loss_fn, (x, y), params=spec, dtype="float64")
        assert op.names == ("M_A", "M_W") and op.dim == 50
        torch.testing.assert_close(op.to_dense(), full[index][:, index], rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="match none"):
        HessianOperator(model, loss_fn, (x, y), params="nope,nada")


@pytest.mark.parametrize("arch", ["antisymmetric", "cayley", "residual", "vanilla", "node"])
def test_params_patterns_match_leniently_and_report_what_matched(arch):
    model, x, y = small_case(arch, DISCRETIZATIONS[arch][0])
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), params="M_A,M_W", dtype="float64")
    assert op.names == ("M_W",)
    described = op.describe()
    assert described["params"] == ["M_W"] and described["unmatched_patterns"] == ["M_A"]
    assert described["param_patterns"] == ["M_A", "M_W"]
    full = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)], patterns=["M_W"])
    torch.testing.assert_close(op.to_dense(), full, rtol=1e-6, atol=1e-8)


def test_parameters_without_gradient_give_zero_blocks():
    model, x, y = small_case()
    model.register_parameter("unused", nn.Parameter(torch.randn(3)))
    model.U.bias.requires_grad_(False)
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, (x, y), dtype="float64")
    assert "U.bias" not in op.names and "unused" in op.names and op.no_grad_params == ("unused",)
    dense = op.to_dense()
    torch.testing.assert_close(dense, dense_hessian(model, loss_fn, [(x, y)], patterns=op.names), rtol=1e-6, atol=1e-8)
    start = sum(n for name, n in zip(op.names, op.numels, strict=True) if op.names.index(name) < op.names.index("unused"))
    block = slice(start, start + 3)
    assert torch.all(dense[block] == 0) and torch.all(dense[:, block] == 0)
    frozen = HessianOperator(model, loss_fn, (x, y), params="U.bias", dtype="float64")
    assert frozen.dim == 5 and torch.linalg.norm(frozen.to_dense()) > 0
    assert eigenvalues(op, which="LA").values[0] > 0


def test_only_unused_parameters_selected_give_a_zero_operator_not_an_autograd_error():
    model, x, y = small_case()
    model.register_parameter("unused", nn.Parameter(torch.randn(3)))
    for cache_graph in (True, False):
        op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), params="unused", dtype="float64", cache_graph=cache_graph)
        assert op.no_grad_params == ("unused",) and op.zero_curvature_params == ()
        assert torch.equal(op.to_dense(), torch.zeros(3, 3, dtype=torch.float64))


def test_a_parameter_the_loss_is_affine_in_has_zero_curvature_and_is_not_called_unused():
    model, x, y = small_case()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), params="D.bias", dtype="float64")
    assert op.no_grad_params == () and torch.linalg.norm(op.to_dense()) > 0
    affine = HessianOperator(model, lambda out, target: out.sum(), (x, y), params="D.bias,U.bias", dtype="float64")
    assert affine.zero_curvature_params == ("D.bias",) and affine.no_grad_params == ()
    dense = affine.to_dense()
    block = affine.block_slices()["D.bias"]
    assert torch.all(dense[block] == 0) and torch.all(dense[:, block] == 0)
    torch.testing.assert_close(dense, dense_hessian(model, lambda out, target: out.sum(), [(x, y)], patterns=affine.names),
                               rtol=1e-6, atol=1e-8)
    assert affine.describe()["zero_curvature_params"] == ["D.bias"]


def test_tiny_loss_scale_is_exact():
    model, x, y = small_case()

    def tiny(out, target):
        return 1e-6 * nn.functional.cross_entropy(out, target)

    op = HessianOperator(model, tiny, (x, y), dtype="float64")
    exact = dense_hessian(model, tiny, [(x, y)])
    assert exact.abs().max() < 1e-4
    torch.testing.assert_close(op.to_dense(), exact, rtol=1e-6, atol=1e-14)


def test_operator_and_estimators_leave_model_and_grads_untouched():
    model, x, y = small_case(arch="lipschitz-gated")
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_before, y_before = x.clone(), y.clone()
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, (x, y))
    eigenvalues(op, k=2, which="BE")
    power_iteration(op)
    trace(op, max_matvecs=12)
    spectral_density(op, n_probes=2, steps=5)
    landscape(model, loss_fn, (x, y), "random", np.linspace(-1, 1, 3))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    model.M_W.data.add_(1.0)
    assert op.hvp(torch.ones(op.dim)).shape == (op.dim,)


def test_mse_regression_targets_in_float64():
    model = build_model(ModelConfig("node", 2, 4, 1, eps=0.2), seed=0)
    x, y = torch.randn(5, 8, 2), torch.randn(5, 1)
    op = HessianOperator(model, nn.MSELoss(), (x, y), dtype="float64")
    torch.testing.assert_close(op.to_dense(), dense_hessian(model, nn.MSELoss(), [(x, y)]), rtol=1e-6, atol=1e-8)
    assert op.describe()["n_samples"] == 5


def test_batched_matmat_matches_the_loop_and_records_its_calibration(case):
    op, H = case
    X = np.random.default_rng(0).standard_normal((op.dim, 6))
    for mode in ("loop", "batched", "auto"):
        fresh = HessianOperator(op.model, op.loss_fn, op.batches, dtype="float64", matmat=mode)
        np.testing.assert_allclose(fresh.matmat(X), H @ X, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fresh.matmat(X), H @ X, rtol=1e-10, atol=1e-12)
        assert fresh.matvecs == 12
        assert (fresh.matmat_calibration is not None) == (mode == "auto")
    with pytest.raises(ValueError, match="matmat"):
        HessianOperator(op.model, op.loss_fn, op.batches, matmat="vmap")


@pytest.mark.parametrize("layer", [nn.RNN, nn.LSTM, nn.GRU])
def test_hessian_of_wrapped_layers_matches_autograd(layer):
    from torch.autograd.functional import hessian
    from torch.func import functional_call

    from lrnn_analysis.hessian import HessianOperator

    torch.manual_seed(0)
    model = SequenceClassifier(layer(2, 3, batch_first=False), nn.Linear(3, 2)).double()
    x = torch.randn(4, 5, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    names = [name for name, _ in model.named_parameters() if name.startswith("rnn.weight_hh")]
    dense = HessianOperator(model, nn.functional.cross_entropy, (x, y), params=model.recurrent_parameters).to_dense()
    (W,) = [p.detach() for name, p in model.named_parameters() if name in names]

    def loss(w):
        return nn.functional.cross_entropy(functional_call(model, {names[0]: w}, (x,)), y)

    exact = hessian(loss, W).reshape(W.numel(), W.numel()).detach().numpy()
    np.testing.assert_allclose(dense, exact, rtol=1e-8, atol=1e-10)


def test_remembered_products_answer_only_identical_vectors(case):
    op, H = case
    generator = torch.Generator().manual_seed(7)
    v, w = torch.randn(op.dim, dtype=torch.float64, generator=generator), torch.randn(op.dim, dtype=torch.float64, generator=generator)
    before = op.matvecs
    with op.remembering_products() as memo:
        first = op.apply(v)
        again = op.apply(v.clone())
        other = op.apply(w)
        nearby = op.apply(v + 1e-12 * w)  # not identical: multiplied, never answered from memory
    assert memo.reused == 1 and op.matvecs - before == 3
    assert torch.equal(first, again)
    np.testing.assert_allclose(other.numpy(), H @ w.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(nearby.numpy(), H @ (v + 1e-12 * w).numpy(), rtol=1e-10, atol=1e-12)
    op.apply(v)  # outside the block nothing is remembered
    assert op.matvecs - before == 4
    with op.remembering_products(budget=0) as memo:
        op.apply(v)
        op.apply(v)
    assert memo.reused == 0 and op.matvecs - before == 6


def _per_step_batches(classification, seed=3):
    """Two batches (5 and 3 sequences of 6 steps) of per-step targets with trailing padding:
    int64 labels (IGNORE_INDEX unscored) or float (B, T, 2) targets (NaN rows unscored)."""
    from lrnn_analysis.objective import apply_mask

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8, 6), generator=g) if classification else torch.randn(8, 6, 2, generator=g, dtype=torch.float64)
    mask = torch.arange(6)[None] < torch.tensor([6, 2, 5, 1, 3, 6, 4, 2])[:, None]
    y = apply_mask(y, mask)
    return [(x[:5], y[:5]), (x[5:], y[5:])], mask


@pytest.mark.parametrize("classification", [True, False])
def test_per_token_hessian_is_the_dense_hessian_of_the_mean_loss_over_unmasked_steps(classification):
    """H of per-step targets weights batches by their unmasked steps (not samples): it equals the
    dense Hessian of (1/M) Σ over the M scored (sequence, step) pairs of the per-token loss."""
    from language_model import StepModel
    from lrnn_analysis.objective import Objective

    model = StepModel(outputs=3 if classification else 2).double()
    batches, mask = _per_step_batches(classification)
    objective = Objective(classification, True)
    op = HessianOperator(model, objective.loss_fn(), batches, dtype=torch.float64)
    assert op.n_scored == int(mask.sum()) and op.weights == (int(mask[:5].sum()) / op.n_scored, int(mask[5:].sum()) / op.n_scored)
    params = {k: v.detach() for k, v in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def mean_token_loss(vector):
        state = {k: c.reshape(params[k].shape) for k, c in zip(params, torch.split(vector, sizes), strict=True)}
        out = functional_call(model, state, (x,))[mask]
        if classification:
            return nn.functional.cross_entropy(out, y[mask], reduction="sum") / mask.sum()
        return ((out - y[mask]) ** 2).mean(dim=1).sum() / mask.sum()

    exact = hessian(mean_token_loss)(torch.cat([p.reshape(-1) for p in params.values()]))
    torch.testing.assert_close(op.to_dense(), exact, rtol=1e-10, atol=1e-12)


def test_a_batch_of_per_step_targets_with_nothing_scored_is_an_error():
    from language_model import StepModel
    from lrnn_analysis.errors import InputError
    from lrnn_analysis.objective import IGNORE_INDEX, TokenCrossEntropyLoss

    x, y = torch.randn(2, 4, 2), torch.full((2, 4), IGNORE_INDEX)
    with pytest.raises(InputError, match="no scored targets: every step is masked"):
        HessianOperator(StepModel(), TokenCrossEntropyLoss(), (x, y))
