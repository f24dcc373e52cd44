"""The recurrence engine against autograd through the plain loop, in float64: outputs, gradients and
Hessian-vector products of every Lur'e-form architecture and scheme of the zoo, the stored and the
segment-recompute modes, and its use by HessianOperator."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from lrnn_analysis.errors import InputError
from lrnn_analysis.hessian import HessianOperator
from lrnn_analysis.models import DISCRETIZATIONS, MODEL_CLASSES, ModelConfig, build_model, lure_step
from lrnn_analysis.recurrence import build_scheme, lure_recurrence, sqrt_segment
from lrnn_analysis.recurrence import engine as engine_module
from lrnn_analysis.recurrence import field as field_module

T, BATCH, N, INPUT, OUTPUT = 7, 3, 5, 2, 4
ENGINE_VARIANTS = [(arch, disc) for arch, discs in DISCRETIZATIONS.items() for disc in discs
                   if MODEL_CLASSES[arch].engine_supported]
RTOL = 1e-10


def _relative(actual, expected):
    """max |actual - expected| / max |expected| (0 where both are zero)."""
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def _pair(arch, disc, readout="last"):
    """The same float64 model run by the engine and by autograd through the plain loop."""
    config = ModelConfig(arch, INPUT, N, OUTPUT, eps=0.3, discretization=disc, beta_a=0.6, gamma_a=0.2,
                         beta_w=0.8, gamma_w=0.1, init_std=2.0, ode_substeps=2 if arch == "node" else 1, readout=readout)
    engine = build_model(config, seed=3).double()
    plain = copy.deepcopy(engine)
    plain.engine = "autograd"
    return engine, plain


def _data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, T, INPUT, generator=generator, dtype=torch.float64)
    y = torch.randint(0, OUTPUT, (BATCH,), generator=generator)
    weights = torch.randn(BATCH, T, N, generator=generator, dtype=torch.float64)
    return x, y, weights


def _losses(model, x, y, weights):
    """Cross-entropy of the last-step readout, and a loss on every hidden state."""
    return (nn.functional.cross_entropy(model(x), y), (torch.sin(model.hidden_states(x)) * weights).sum())


def _graph_names(tensor):
    """The type names of every node of ``tensor``'s autograd graph."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def _gradient_and_hvp(model, loss, direction):
    """The gradient of ``loss`` and its Hessian times ``direction`` by double backward (zeros where unused)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    live = [(g, v) for g, v in zip(grads, direction) if g.requires_grad]
    hvp = torch.autograd.grad([g for g, _ in live], params, [v for _, v in live], allow_unused=True)
    return grads, [torch.zeros_like(p) if h is None else h for h, p in zip(hvp, params)]


@pytest.mark.parametrize("arch,disc", ENGINE_VARIANTS)
def test_engine_equals_autograd_through_the_loop(arch, disc):
    engine, plain = _pair(arch, disc)
    x, y, weights = _data()
    assert "_RecurrenceBackward" in _graph_names(engine(x))
    assert "_RecurrenceBackward" not in _graph_names(plain(x))
    generator = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in engine.parameters()]
    assert _relative(engine.hidden_states(x), plain.hidden_states(x)) < RTOL
    assert _relative(engine(x), plain(x)) < RTOL
    with torch.no_grad():
        assert _relative(engine.hidden_states(x), plain.hidden_states(x)) < RTOL
        assert _relative(engine(x), plain(x)) < RTOL
    for which, (loss_engine, loss_plain) in enumerate(zip(_losses(engine, x, y, weights), _losses(plain, x, y, weights))):
        grads_engine, hvp_engine = _gradient_and_hvp(engine, loss_engine, direction)
        grads_plain, hvp_plain = _gradient_and_hvp(plain, loss_plain, direction)
        for name, a, b in zip([n for n, _ in engine.named_parameters()], grads_engine, grads_plain):
            assert _relative(a, b) < RTOL, (which, "gradient", name)
        for name, a, b in zip([n for n, _ in engine.named_parameters()], hvp_engine, hvp_plain):
            assert _relative(a, b) < RTOL, (which, "hvp", name)


@pytest.mark.parametrize("arch,disc", [("lipschitz", "euler"), ("antisymmetric", "euler"), ("node", "rk4"), ("contracting", "euler")])
def test_per_step_readout_through_the_engine_equals_autograd(arch, disc):
    """readout="all" runs the engine with keep_states: a per-token cross-entropy's gradient and
    Hessian-vector product equal autograd's through the plain loop."""
    engine, plain = _pair(arch, disc, readout="all")
    x, _, _ = _data()
    tokens = torch.randint(0, OUTPUT, (BATCH, T), generator=torch.Generator().manual_seed(4))
    assert "_RecurrenceBackward" in _graph_names(engine(x)) and "_RecurrenceBackward" not in _graph_names(plain(x))
    assert engine(x).shape == (BATCH, T, OUTPUT) and _relative(engine(x), plain(x)) < RTOL
    generator = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in engine.parameters()]

    def per_token(model):
        return nn.functional.cross_entropy(model(x).reshape(-1, OUTPUT), tokens.reshape(-1))

    for a, b in zip(_gradient_and_hvp(engine, per_token(engine), direction), _gradient_and_hvp(plain, per_token(plain), direction)):
        for name, p, q in zip([n for n, _ in engine.named_parameters()], a, b):
            assert _relative(p, q) < RTOL, name


@pytest.mark.parametrize("arch,disc", [("lipschitz", "rk38"), ("node", "rk4"), ("contracting", "euler"), ("vanilla", "map")])
def test_segment_recompute_equals_the_stored_mode(arch, disc):
    stored, _ = _pair(arch, disc)
    recompute = copy.deepcopy(stored)
    recompute.engine_memory = "recompute"
    x, y, weights = _data(seed=2)
    generator = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in stored.parameters()]
    for loss_stored, loss_recompute in zip(_losses(stored, x, y, weights), _losses(recompute, x, y, weights)):
        assert _relative(loss_recompute, loss_stored) < 1e-13
        for a, b in zip(_gradient_and_hvp(recompute, loss_recompute, direction), _gradient_and_hvp(stored, loss_stored, direction)):
            for p, q in zip(a, b):
                assert _relative(p, q) < 1e-12


def _loop(u, A, W, B, method, eps, substeps, keep_states):
    step = lure_step(A, W, method, eps, substeps)
    h, states = u.new_zeros(u.shape[1], u.shape[2]), []
    for u_t in u.unbind(0):
        h = step(h, u_t) if B is None else h @ A.T + torch.tanh(h @ W.T + u_t) @ B.T
        states.append(h)
    return torch.stack(states) if keep_states else h


@pytest.mark.parametrize("segment", [1, 2, 3, 7, 50])
@pytest.mark.parametrize("keep_states", [False, True])
@pytest.mark.parametrize("method,with_a,with_b", [("euler", True, False), ("rk2", False, False), ("rk4", True, False),
                                                  ("map", False, False), ("map", True, True)])
def test_every_segment_length_and_readout_match_the_loop(segment, keep_states, method, with_a, with_b):
    generator = torch.Generator().manual_seed(4)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()

    u, W = draw(T, BATCH, N), draw(N, N)
    A = draw(N, N, scale=0.5) if with_a else None
    B = draw(N, N, scale=0.5) if with_b else None
    eps, substeps = (None, 1) if method == "map" else (0.3, 2)
    params = [p for p in (u, A, W, B) if p is not None]
    expected = _loop(u, A, W, B, method, eps, substeps, keep_states)
    scheme = build_scheme(method, eps, substeps)
    actual = lure_recurrence(u, A, W, B, scheme=scheme, keep_states=keep_states, segment=segment)
    assert _relative(actual, expected) < RTOL
    weights = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    gradients, hvp = _gradient_and_hvp_of(expected, weights, params, direction)
    for a, b in zip(_gradient_and_hvp_of(actual, weights, params, direction), (gradients, hvp)):
        for p, q in zip(a, b):
            assert _relative(p, q) < RTOL
    # Without create_graph the backward reuses its buffers from segment to segment.
    out = lure_recurrence(u, A, W, B, scheme=scheme, keep_states=keep_states, segment=segment)
    for p, q in zip(torch.autograd.grad((torch.sin(out) * weights).sum(), params), gradients):
        assert _relative(p, q) < RTOL


@pytest.mark.parametrize("keep_states", [False, True])
@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_stored_records_split_into_many_segments_change_nothing(monkeypatch, keep_states, method):
    generator = torch.Generator().manual_seed(6)
    u, A, W = (torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()
               for shape in ((T, BATCH, N), (N, N), (N, N)))
    scheme = build_scheme(method, 0.2, 2)
    weights = torch.randn(T if keep_states else 1, BATCH, N, generator=generator, dtype=torch.float64).squeeze(0)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in (u, A, W)]
    results = []
    for segment_bytes in (engine_module.SEGMENT_BYTES, 1):
        monkeypatch.setattr(engine_module, "SEGMENT_BYTES", segment_bytes)
        out = lure_recurrence(u, A, W, scheme=scheme, keep_states=keep_states)
        plain = torch.autograd.grad((torch.sin(out) * weights).sum(), [u, A, W], retain_graph=True)
        results.append((out, plain, *_gradient_and_hvp_of(out, weights, [u, A, W], direction)))
    (one, *first), (many, *second) = results
    assert _relative(many, one) < 1e-13
    for a, b in zip(first, second):
        for p, q in zip(a, b):
            assert _relative(q, p) < 1e-12


def _gradient_and_hvp_of(out, weights, params, direction):
    grads = torch.autograd.grad((torch.sin(out) * weights).sum(), params, create_graph=True)
    return grads, torch.autograd.grad(grads, params, direction)


@pytest.mark.parametrize("arch,disc", [("lipschitz", "euler"), ("contracting", "euler")])
def test_hessian_operator_is_the_same_matrix_with_either_engine(arch, disc):
    engine, plain = _pair(arch, disc)
    x, y, _ = _data(seed=5)
    dense = {}
    for name, model in (("engine", engine), ("plain", plain)):
        op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64", matmat="batched")
        dense[name] = op.to_dense().numpy()
        X = np.random.default_rng(0).standard_normal((op.dim, 3))
        np.testing.assert_allclose(op.matmat(X), dense[name] @ X, rtol=1e-10, atol=1e-12)
    scale = np.abs(dense["plain"]).max()
    assert np.abs(dense["engine"] - dense["plain"]).max() <= RTOL * scale
    assert np.abs(dense["engine"] - dense["engine"].T).max() <= 1e-12 * scale


def test_float32_engine_agrees_with_the_loop_to_float32_rounding():
    engine, plain = _pair("lipschitz", "euler")
    engine, plain = engine.float(), plain.float()
    x = _data()[0].float()
    assert _relative(engine(x), plain(x)) < 1e-5


def test_third_derivatives_raise_instead_of_returning_wrong_numbers():
    engine, _ = _pair("lipschitz", "euler")
    x, y, _ = _data()
    params = list(engine.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(engine(x), y), params, create_graph=True)
    hvp = torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once only"):
        torch.autograd.grad(sum(h.sum() for h in hvp), params, allow_unused=True)


def test_torch_func_vmap_runs_the_recorded_step():
    engine, plain = _pair("lipschitz", "rk2")
    x = _data()[0]
    params = {name: p.detach() for name, p in engine.named_parameters()}
    stacked = {name: torch.stack([p, 1.1 * p]) for name, p in params.items()}
    with torch.no_grad():
        batched = torch.func.vmap(lambda p: torch.func.functional_call(engine, p, (x,)))(stacked)
        assert _relative(batched[0], plain(x)) < RTOL


def test_engine_options_are_checked():
    assert len(ENGINE_VARIANTS) == 12 and {arch for arch, _ in ENGINE_VARIANTS} == set(DISCRETIZATIONS) - {"lipschitz-gated", "ren", "lstm"}
    gated = build_model(ModelConfig("lipschitz-gated", INPUT, N, OUTPUT))
    assert gated.engine == "autograd"
    with pytest.raises(InputError, match="engine 'autograd'"):
        gated.engine = "recurrence"
    model = build_model(ModelConfig("lipschitz", INPUT, N, OUTPUT))
    assert (model.engine, model.engine_memory) == ("recurrence", "store")
    with pytest.raises(InputError, match="engine must be"):
        model.engine = "fast"
    with pytest.raises(InputError, match="engine_memory"):
        model.engine_memory = "sqrt"
    u, W = torch.zeros(T, BATCH, N), torch.zeros(N, N)
    scheme = build_scheme("euler", 0.1)
    with pytest.raises(InputError, match="inputs"):
        lure_recurrence(u[:0], None, W, scheme=scheme)
    with pytest.raises(InputError, match="A must have shape"):
        lure_recurrence(u, torch.zeros(N, N + 1), W, scheme=scheme)
    x = torch.zeros(T, BATCH, INPUT)
    with pytest.raises(InputError, match="input_weight must have shape"):
        lure_recurrence(x, None, W, scheme=scheme, input_weight=torch.zeros(N, INPUT + 1))
    with pytest.raises(InputError, match="input_bias must have shape"):
        lure_recurrence(x, None, W, scheme=scheme, input_weight=torch.zeros(N, INPUT), input_bias=torch.zeros(N + 1))
    with pytest.raises(InputError, match="input_weight is torch.float64"):
        lure_recurrence(x, None, W, scheme=scheme, input_weight=torch.zeros(N, INPUT, dtype=torch.float64))
    with pytest.raises(InputError, match="without input_weight"):
        lure_recurrence(u, None, W, scheme=scheme, input_bias=torch.zeros(N))
    with pytest.raises(InputError, match="W is torch.float64"):
        lure_recurrence(u, None, W.double(), scheme=scheme)
    with pytest.raises(InputError, match="segment"):
        lure_recurrence(u, None, W, scheme=scheme, segment=0)
    for method, eps, substeps in (("rk5", 0.1, 1), ("euler", 0.0, 1), ("euler", 0.1, 0), ("map", 0.1, 1), ("map", None, 2)):
        with pytest.raises(InputError):
            build_scheme(method, eps, substeps)
    assert [sqrt_segment(t) for t in (1, 2, 4, 5, 784)] == [1, 2, 2, 3, 28]


def _spy_on_second_order(monkeypatch):
    """Records, for every second-order sweep, whether it also carried the states' cotangent (the fused
    Gauss-Newton part)."""
    calls = []
    original = engine_module._second_order_pass

    def spy(plan, tape, field, kept, tangent, cotangent, need_x, workspace=None, factors=None):
        calls.append(cotangent is not None)
        return original(plan, tape, field, kept, tangent, cotangent, need_x, workspace, factors)

    monkeypatch.setattr(engine_module, "_second_order_pass", spy)
    return calls


@pytest.mark.parametrize("readout", ["last", "all"])
@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_hessian_vector_products_fuse_the_gauss_newton_sweep_and_stay_exact(monkeypatch, readout, memory):
    """The Gauss-Newton part (the states' cotangent after the loss) runs in the same backward sweep as
    the second-order adjoint; the product equals autograd's through the loop, also when the same
    gradient graph is differentiated again, after a product that never reaches the recurrence, and
    for several directions at once (is_grads_batched, which runs the unfused sweeps)."""
    calls = _spy_on_second_order(monkeypatch)
    engine, plain = _pair("lipschitz", "euler", readout=readout)
    engine.engine_memory = memory
    x, _, _ = _data(seed=7)
    targets = torch.randint(0, OUTPUT, (BATCH, T) if readout == "all" else (BATCH,),
                            generator=torch.Generator().manual_seed(8))

    def loss(model):
        return nn.functional.cross_entropy(model(x).reshape(-1, OUTPUT), targets.reshape(-1))

    generator = torch.Generator().manual_seed(9)
    directions = [[torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in engine.parameters()]
                  for _ in range(2)]
    params_engine, params_plain = list(engine.parameters()), list(plain.parameters())
    grads_engine = torch.autograd.grad(loss(engine), params_engine, create_graph=True)
    grads_plain = torch.autograd.grad(loss(plain), params_plain, create_graph=True)
    decoder = [i for i, (name, _) in enumerate(engine.named_parameters()) if name.startswith("D.")]
    only_decoder = torch.autograd.grad(grads_engine, [params_engine[i] for i in decoder], directions[0], retain_graph=True)
    expected_decoder = torch.autograd.grad(grads_plain, [params_plain[i] for i in decoder], directions[0], retain_graph=True)
    for a, b in zip(only_decoder, expected_decoder):
        assert _relative(a, b) < RTOL
    for direction in directions:
        calls.clear()
        actual = torch.autograd.grad(grads_engine, params_engine, direction, retain_graph=True)
        expected = torch.autograd.grad(grads_plain, params_plain, direction, retain_graph=True)
        assert calls == [True]
        for a, b in zip(actual, expected):
            assert _relative(a, b) < RTOL
    stacked = [torch.stack(parts) for parts in zip(*directions)]
    calls.clear()
    batched = torch.autograd.grad(grads_engine, params_engine, stacked, retain_graph=True, is_grads_batched=True)
    assert calls and not any(calls)
    for k, direction in enumerate(directions):
        expected = torch.autograd.grad(grads_plain, params_plain, direction, retain_graph=True)
        for a, b in zip(batched, expected):
            assert _relative(a[k], b) < RTOL


def test_without_torchs_graph_task_queries_the_sweeps_run_apart_and_stay_exact(monkeypatch):
    """A torch without the private autograd-engine functions the fused sweep asks: the products run
    the two sweeps apart, equal to autograd's through the loop."""
    calls = _spy_on_second_order(monkeypatch)
    monkeypatch.setattr(engine_module, "_GRAPH_TASK_QUERIES", False)
    for name in ("_current_graph_task_id", "_will_engine_execute_node"):
        monkeypatch.delattr(torch._C, name)
    engine, plain = _pair("lipschitz", "euler")
    x, _, _ = _data(seed=7)
    targets = torch.randint(0, OUTPUT, (BATCH,), generator=torch.Generator().manual_seed(8))
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
                 for p in engine.parameters()]
    products = []
    for model in (engine, plain):
        params = list(model.parameters())
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), targets), params, create_graph=True)
        products.append(torch.autograd.grad(grads, params, direction))
    assert calls == [False]
    for a, b in zip(*products):
        assert _relative(a, b) < RTOL


def test_a_loss_linear_in_the_states_and_two_gradient_graphs_of_one_forward_stay_exact(monkeypatch):
    """Where the loss's derivative does not reach the states the second-order sweep runs alone; two
    gradient graphs of one forward differentiated together count the Gauss-Newton part once."""
    calls = _spy_on_second_order(monkeypatch)
    engine, plain = _pair("contracting", "euler")
    x, y, _ = _data(seed=10)
    generator = torch.Generator().manual_seed(11)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in engine.parameters()]
    weights = torch.randn(BATCH, N, generator=generator, dtype=torch.float64)
    for fused, loss in ((True, lambda m: (m.hidden_states(x)[:, -1] * weights).sum() ** 2),
                        (False, lambda m: (m.hidden_states(x)[:, -1] * weights).sum())):
        calls.clear()
        _, actual = _gradient_and_hvp(engine, loss(engine), direction)
        _, expected = _gradient_and_hvp(plain, loss(plain), direction)
        assert calls == [fused]
        for a, b in zip(actual, expected):
            assert _relative(a, b) < RTOL

    def twice(model):
        params = list(model.parameters())
        out = model(x)
        first = torch.autograd.grad(nn.functional.cross_entropy(out, y), params, create_graph=True)
        second = torch.autograd.grad((out ** 2).sum(), params, create_graph=True)
        return torch.autograd.grad([a + b for a, b in zip(first, second)], params, direction)

    calls.clear()
    actual, expected = twice(engine), twice(plain)
    assert sorted(calls) == [False, True]
    for a, b in zip(actual, expected):
        assert _relative(a, b) < RTOL

    def second_graph_only(model):
        """A gradient graph that reaches the states, then one that does not, differentiated alone."""
        params = list(model.parameters())
        out = model.hidden_states(x)[:, -1]
        torch.autograd.grad((out ** 2).sum(), params, create_graph=True, allow_unused=True)
        linear = torch.autograd.grad((out * weights).sum(), params, create_graph=True, allow_unused=True)
        live = [(g, v) for g, v in zip(linear, direction) if g is not None and g.requires_grad]
        return torch.autograd.grad([g for g, _ in live], params, [v for _, v in live], allow_unused=True)

    calls.clear()
    actual, expected = second_graph_only(engine), second_graph_only(plain)
    assert calls == [False]
    for a, b in zip(actual, expected):
        assert (a is None and b is None) or _relative(a, b) < RTOL


def test_float32_states_are_as_accurate_as_the_recorded_loop():
    """In float32 the engine's states are no further from the float64 truth than twice the recorded
    loop's (at sMNIST-like length and a small step)."""
    config = ModelConfig("lipschitz", INPUT, 32, OUTPUT, eps=0.03, beta_a=0.75, gamma_a=0.001, beta_w=0.75, gamma_w=0.001)
    truth = build_model(config, seed=12).double()
    engine = copy.deepcopy(truth).float()
    plain = copy.deepcopy(engine)
    plain.engine = "autograd"
    x = torch.randn(16, 300, INPUT, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    with torch.no_grad():
        exact = truth.hidden_states(x)
        error_engine = (engine.hidden_states(x.float()).double() - exact).abs().max()
        error_plain = (plain.hidden_states(x.float()).double() - exact).abs().max()
    assert error_engine <= 2 * error_plain + 1e-7 * exact.abs().max()


def test_a_linear_loss_differentiated_after_a_nonlinear_one_of_the_same_forward_keeps_its_second_order_part():
    """Two gradient graphs of one forward: the first from a loss nonlinear in the states (its
    derivative reaches the recurrence), the second from a loss linear in them. The second's
    Hessian-vector product never reaches the recurrence node, so its second-order sweep must run
    in the adjoint node rather than be left to the recurrence node (where it would be dropped)."""
    generator = torch.Generator().manual_seed(21)
    u, A, W = (torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()
               for shape in ((T, BATCH, N), (N, N), (N, N)))
    weights = torch.randn(T, BATCH, N, generator=generator, dtype=torch.float64)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in (u, A, W)]
    products = []
    for out in (lure_recurrence(u, A, W, scheme=build_scheme("euler", 0.3), keep_states=True),
                _loop(u, A, W, None, "euler", 0.3, 1, keep_states=True)):
        torch.autograd.grad((torch.sin(out) * weights).sum(), [u, A, W], create_graph=True, retain_graph=True)
        linear = torch.autograd.grad((out * weights).sum(), [u, A, W], create_graph=True)
        products.append(torch.autograd.grad(linear, [u, A, W], direction, allow_unused=True))
    for actual, expected in zip(*products):
        assert actual is not None and _relative(actual, expected) < RTOL


@pytest.mark.parametrize("substeps", [1, 2])
def test_batched_hessian_vector_products_with_inputs_that_need_no_gradient(substeps):
    """is_grads_batched where u needs no gradient: the direction of u is then an unbatched zero
    tensor while those of A and W are batched, and the buffer-writing sweeps must not run under vmap."""
    generator = torch.Generator().manual_seed(22)
    u = torch.randn(T, BATCH, N, generator=generator, dtype=torch.float64)
    A, W = (torch.randn(N, N, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(2))
    weights = torch.randn(BATCH, N, generator=generator, dtype=torch.float64)
    directions = [torch.randn(2, N, N, generator=generator, dtype=torch.float64) for _ in range(2)]
    results = []
    for out in (lure_recurrence(u, A, W, scheme=build_scheme("euler", 0.3, substeps)), _loop(u, A, W, None, "euler", 0.3, substeps, False)):
        grads = torch.autograd.grad((torch.sin(out) * weights).sum(), [A, W], create_graph=True)
        results.append(torch.autograd.grad(grads, [A, W], directions, is_grads_batched=True))
    for actual, expected in zip(*results):
        assert _relative(actual, expected) < RTOL


def test_hessian_operator_on_the_recurrent_parameters_only_batches_its_products():
    engine, plain = _pair("lipschitz", "euler")
    x, y, _ = _data(seed=23)
    products = []
    for model in (engine, plain):
        op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), params="M_*", dtype="float64", matmat="batched")
        products.append(op.matmat(np.random.default_rng(1).standard_normal((op.dim, 2))))
    np.testing.assert_allclose(products[0], products[1], rtol=1e-10, atol=1e-12 * np.abs(products[1]).max())


@pytest.mark.parametrize("method,with_a", [("euler", True), ("rk2", True), ("map", False)])
def test_small_preactivations_keep_tanh_relative_accuracy(method, with_a):
    """Inputs of 1e-8 keep W h + u near 0, where tanh(p) ~ p: the engine's states equal the loop's to
    1e-10 relative in float64, and in float32 are no further from the float64 truth than the loop's
    (tanh as 2 sigmoid(2 p) - 1 would have an absolute error of a unit of 1: ~1e-8 relative here)."""
    generator = torch.Generator().manual_seed(24)
    u = 1e-8 * torch.randn(T, BATCH, N, generator=generator, dtype=torch.float64)
    A = 0.5 * torch.randn(N, N, generator=generator, dtype=torch.float64) if with_a else None
    W = torch.randn(N, N, generator=generator, dtype=torch.float64)
    eps = None if method == "map" else 0.3
    scheme = build_scheme(method, eps)
    exact = _loop(u, A, W, None, method, eps, 1, keep_states=True)
    assert _relative(lure_recurrence(u, A, W, scheme=scheme, keep_states=True), exact) < RTOL
    single = [None if t is None else t.float() for t in (u, A, W)]
    error_engine = _relative(lure_recurrence(*single, scheme=scheme, keep_states=True).double(), exact)
    error_loop = _relative(_loop(*single, None, method, eps, 1, keep_states=True).double(), exact)
    assert error_engine <= 2 * error_loop + 1e-7


def test_float32_euler_with_a_tiny_step_rounds_once_at_the_size_of_h():
    """Euler with eps = 1e-6 over 300 steps in float32: h + (eps A h + eps tanh(p)) adds the two
    small terms before h, like the loop, instead of rounding twice at the size of h."""
    generator = torch.Generator().manual_seed(25)
    u = torch.randn(300, 4, 8, generator=generator, dtype=torch.float64)
    A, W = (torch.randn(8, 8, generator=generator, dtype=torch.float64) / 8 ** 0.5 for _ in range(2))
    scheme = build_scheme("euler", 1e-6)
    exact = _loop(u, A, W, None, "euler", 1e-6, 1, keep_states=True)
    single = [t.float() for t in (u, A, W)]
    error_engine = _relative(lure_recurrence(*single, scheme=scheme, keep_states=True).double(), exact)
    error_loop = _relative(_loop(*single, None, "euler", 1e-6, 1, keep_states=True).double(), exact)
    assert error_engine <= 2 * error_loop


class _TanhFromInputs(torch.autograd.Function):
    """tanh with tanh'(p) = 4 e / (1 + e)^2, e = exp(-2 |p|), formed from p by differentiable operations:
    the float64 truth near saturation, where 1 - tanh(p)^2 is 0 once |p| > 19."""

    @staticmethod
    def forward(ctx, p):
        ctx.save_for_backward(p)
        return torch.tanh(p)

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        e = torch.exp(-2 * p.abs())
        return grad * (4 * e / (1 + e) ** 2)


def _euler_from_inputs(u, A, W, eps, substeps):
    h = u.new_zeros(u.shape[1], u.shape[2])
    for u_t in u.unbind(0):
        for _ in range(substeps):
            h = h + eps * (h @ A.T + _TanhFromInputs.apply(h @ W.T + u_t))
    return h


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_euler_gradients_near_saturation_are_as_accurate_as_the_recorded_loop(threads, counted, one_thread):
    """Inputs of scale 100 put many |p| where tanh'(p) is small. From s = tanh(p) rounded to float32,
    1 - s^2 loses tanh'(p)'s digits there (a tanh within 3 units in the last place gave gradients 7
    times as far from the truth as the loop's; NumPy's float32 tanh, within 1.4, 2.6 times). With one
    thread the engine takes NumPy's float32 tanh and forms tanh'(p) from p: the largest of its errors
    is then a quarter of the loop's or less (measured: 5.5e-7 against 7.1e-6). With two, it takes
    torch.tanh and 1 - s^2 as the loop does. Either way each error is within twice the loop's."""
    cosh = counted(field_module.numpy, "cosh")
    torch.set_num_threads(threads)
    errors = _errors_near_saturation()
    assert bool(cosh) == (threads == 1)
    for engine, loop in errors:
        assert engine <= 2 * loop + 1e-7
    if threads == 1:
        assert max(engine for engine, _ in errors) <= max(loop for _, loop in errors) / 4


EPS_NEAR_SATURATION = (1e-6, 3)


def _errors_near_saturation() -> list[tuple[float, float]]:
    """(engine's, loop's) relative errors from the float64 truth of the gradient and a Hessian-vector
    product in (u, A, W), each in float32."""
    generator = torch.Generator().manual_seed(10)
    n = 8
    u = 100 * torch.randn(T, BATCH, n, generator=generator, dtype=torch.float64)
    A = torch.randn(n, n, generator=generator, dtype=torch.float64) / n ** 0.5 - 0.5 * torch.eye(n, dtype=torch.float64)
    W = torch.randn(n, n, generator=generator, dtype=torch.float64) / n ** 0.5
    weights = torch.randn(BATCH, n, generator=generator, dtype=torch.float64)
    direction = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (u, A, W)]
    eps, substeps = EPS_NEAR_SATURATION
    scheme = build_scheme("euler", eps, substeps)

    def results(run, dtype):
        params = [t.to(dtype).requires_grad_() for t in (u, A, W)]
        gradients, hvp = _gradient_and_hvp_of(run(*params), weights.to(dtype), params, [d.to(dtype) for d in direction])
        return [*gradients, *hvp]

    exact = results(lambda *p: _euler_from_inputs(*p, eps, substeps), torch.float64)
    engine = results(lambda *p: lure_recurrence(*p, scheme=scheme), torch.float32)
    loop = results(lambda u_, A_, W_: _loop(u_, A_, W_, None, "euler", eps, substeps, False), torch.float32)
    return [(_relative(ours.double(), truth), _relative(theirs.double(), truth))
            for ours, theirs, truth in zip(engine, loop, exact)]


@pytest.mark.parametrize("keep_states", [False, True])
@pytest.mark.parametrize("segment", [None, 2])
def test_float32_records_of_p_give_the_float64_gradients_and_products_in_any_thread_count(keep_states, segment, counted,
                                                                                         one_thread):
    """With one thread an Euler step's records keep p (NumPy's float32 tanh in the forward): the
    gradients and Hessian-vector products are the float64 loop's to float32 accuracy, also where the
    backward passes run with two threads (tanh'(p) and s then formed from p by torch); the states are
    the same with a graph and without one."""
    single, weights, direction, exact = _float32_euler_case(12, keep_states)
    scheme = build_scheme("euler", 0.1, 2)
    cosh = counted(field_module.numpy, "cosh")
    out = lure_recurrence(*single, scheme=scheme, keep_states=keep_states, segment=segment)
    with torch.no_grad():
        assert torch.equal(lure_recurrence(*single, scheme=scheme, keep_states=keep_states, segment=segment), out)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        grads = torch.autograd.grad((torch.sin(out) * weights).sum(), single, create_graph=True)
        products = torch.autograd.grad(grads, single, direction, retain_graph=True)
        assert bool(cosh) == (threads == 1)
        cosh.clear()
        for ours, truth in zip((*grads, *products), exact):
            assert _relative(ours.double(), truth) < 2e-6


def _float32_euler_case(seed: int, keep_states: bool):
    """(u, A, W) in float32 requiring grad, the loss's weights and a direction in float32, and the
    float64 loop's gradient and Hessian-vector product (Euler, eps 0.1, 2 substeps, n = 16)."""
    generator = torch.Generator().manual_seed(seed)
    n = 16
    u = 2 * torch.randn(T, BATCH, n, generator=generator, dtype=torch.float64)
    A = torch.randn(n, n, generator=generator, dtype=torch.float64) / n ** 0.5 - 0.5 * torch.eye(n, dtype=torch.float64)
    W = torch.randn(n, n, generator=generator, dtype=torch.float64) / n ** 0.5
    weights = torch.randn((T, BATCH, n) if keep_states else (BATCH, n), generator=generator, dtype=torch.float64)
    direction = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (u, A, W)]
    params = [t.clone().requires_grad_() for t in (u, A, W)]
    gradients, products = _gradient_and_hvp_of(_loop(*params, None, "euler", 0.1, 2, keep_states), weights, params,
                                               direction)
    return ([t.float().requires_grad_() for t in (u, A, W)], weights.float(), [d.float() for d in direction],
            [*gradients, *products])


@pytest.mark.parametrize("keep_states", [False, True])
def test_float32_records_of_p_in_many_stored_segments_are_each_their_own(keep_states, monkeypatch, counted, one_thread):
    """Stored mode split into one input step per segment: each segment's p (written into a record of
    its own, the workspace's buffers being the next segment's) must be kept in its own memory. Gradients and
    Hessian-vector products are the float64 loop's to float32 accuracy, and no two segments' P
    records share memory."""
    monkeypatch.setattr(engine_module, "SEGMENT_BYTES", 1)
    single, weights, direction, exact = _float32_euler_case(31, keep_states)
    cosh = counted(field_module.numpy, "cosh")
    out = lure_recurrence(*single, scheme=build_scheme("euler", 0.1, 2), keep_states=keep_states)
    records = [t for t in out.grad_fn.saved_tensors[6:]]
    assert len(records) == 2 * T
    pointers = [records[2 * k + 1].untyped_storage().data_ptr() for k in range(T)]
    assert len(set(pointers)) == T
    gradients, products = _gradient_and_hvp_of(out, weights, single, direction)
    assert cosh
    for ours, truth in zip((*gradients, *products), exact):
        assert _relative(ours.double(), truth) < 2e-6


def test_float32_euler_forward_with_numpy_writes_p_into_its_record_and_the_rest_into_one_row(monkeypatch, counted,
                                                                                          one_thread):
    """With one thread an Euler step's forward writes u into p's record, adds each application's
    y W^T to it from a row of [a | y W^T] that all applications share (no segment-sized buffer to
    zero and copy p out of), and s into one shared row too: one NumPy product per application,
    nothing segment-sized kept after the forward but the records, and the float64 loop's gradients and
    Hessian-vector products to float32 accuracy (in several segments, substeps 2)."""
    single, weights, direction, exact = _float32_euler_case(14, False)
    monkeypatch.setattr(engine_module, "SEGMENT_BYTES", 3 * 2 * BATCH * 16 * 4)  # three input steps
    matmul = counted(engine_module.numpy, "matmul")
    engine_module.release_workspace()
    out = lure_recurrence(*single, scheme=build_scheme("euler", 0.1, 2))
    assert len(out.grad_fn.saved_tensors[6:]) == 2 * 3
    assert len(matmul) == 2 * T
    scratch = engine_module._IDLE.workspace.buffers
    assert {name: tuple(t.shape) for name, t in scratch.items()} == {"tanhs": (1, BATCH, 16), "z": (1, BATCH, 32)}
    gradients, products = _gradient_and_hvp_of(out, weights, single, direction)
    for ours, truth in zip((*gradients, *products), exact):
        assert _relative(ours.double(), truth) < 2e-6
    engine_module.release_workspace()


@pytest.mark.parametrize("batched", [False, True])
def test_float32_euler_adjoint_adds_its_product_to_the_cotangent_once(batched):
    """Euler with eps = 1e-3 and 3 substeps in float32: lambda + [g | q] [eps A; W] with the product
    formed first and added once; addmm accumulating the product's terms into lambda rounds at the size
    of lambda for every term (the gradient of u was 10 times as far from the float64 truth as the
    loop's). ``batched``: is_grads_batched products, whose vmap runs the generic sweeps."""
    generator = torch.Generator().manual_seed(10)
    n = 8
    u = 1e-8 * torch.randn(T, BATCH, n, generator=generator, dtype=torch.float64)
    A = torch.randn(n, n, generator=generator, dtype=torch.float64) / n ** 0.5 - 0.5 * torch.eye(n, dtype=torch.float64)
    W = torch.randn(n, n, generator=generator, dtype=torch.float64) / n ** 0.5
    weights = torch.randn(BATCH, n, generator=generator, dtype=torch.float64)
    scheme = build_scheme("euler", 1e-3, 3)

    def gradient(run, dtype):
        u_ = u.to(dtype).requires_grad_()
        out = run(u_, A.to(dtype), W.to(dtype))
        if not batched:
            return torch.autograd.grad((torch.sin(out) * weights.to(dtype)).sum(), u_)[0].double()
        cotangents = torch.stack([weights, -weights]).to(dtype)
        return torch.autograd.grad(torch.sin(out), u_, cotangents, is_grads_batched=True)[0].double()

    def loop(u_, A_, W_):
        return _loop(u_, A_, W_, None, "euler", 1e-3, 3, False)

    exact = gradient(loop, torch.float64)
    error_engine = _relative(gradient(lambda *p: lure_recurrence(*p, scheme=scheme), torch.float32), exact)
    assert error_engine <= 2 * _relative(gradient(loop, torch.float32), exact) + 1e-7


def test_forward_mode_tangents_of_a_recurrence_without_a_graph_are_the_jvp(one_thread):
    """Dual inputs (torch.autograd.forward_ad) need no graph, so the engine runs its plain forward:
    with one thread its tanh went through NumPy, which wrote the primal only, and the tangent came
    back as if tanh(W h + u) did not depend on h and u (a wrong JVP, not an error)."""
    import torch.autograd.forward_ad as forward_ad

    generator = torch.Generator().manual_seed(12)
    n, batch = 64, 64
    u, v = (torch.randn(3, batch, n, generator=generator) for _ in range(2))
    A, W = (0.1 * torch.randn(n, n, generator=generator) for _ in range(2))

    def run(x):
        return lure_recurrence(x, A, W, scheme=build_scheme("rk2", 0.1))

    _, expected = torch.func.jvp(run, (u,), (v,))
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(run(forward_ad.make_dual(u, v))).tangent
    assert torch.allclose(tangent, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch,disc", [("lipschitz", "euler"), ("node", "rk4"), ("vanilla", "map")])
@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_an_empty_batch_runs_like_the_recorded_loop(arch, disc, memory):
    """A batch of no sequences: empty outputs and hidden states, and zero gradients and Hessian-vector
    products, as through the plain loop (the segment length divided by a per-step size of zero)."""
    engine, plain = _pair(arch, disc)
    engine.engine_memory = memory
    x = torch.zeros(0, T, INPUT, dtype=torch.float64)
    assert engine(x).shape == plain(x).shape == (0, OUTPUT)
    assert engine.hidden_states(x).shape == plain.hidden_states(x).shape == (0, T, N)
    direction = [torch.ones_like(p) for p in engine.parameters()]
    for model in (engine, plain):
        for result in _gradient_and_hvp(model, model.hidden_states(x).sum() + model(x).square().sum(), direction):
            assert all(float(r.detach().abs().max()) == 0.0 for r in result)


def test_a_gradient_graph_under_is_grads_batched_raises_instead_of_being_dropped():
    """Under the vmap of is_grads_batched torch drops the graph of a custom node's results built in another's
    backward: the engine's gradient (or Hessian-vector product) with create_graph would come back without
    one, and a further derivative through it would be zero where the loop's is not. It raises instead."""
    generator = torch.Generator().manual_seed(9)
    u, A, W = (torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()
               for shape in ((T, BATCH, N), (N, N), (N, N)))
    scheme = build_scheme("euler", 0.3)
    cotangents = torch.randn(2, BATCH, N, generator=generator, dtype=torch.float64)
    loop = _loop(u, A, W, None, "euler", 0.3, 1, False)
    assert all(g.requires_grad for g in torch.autograd.grad(loop, [u, A, W], cotangents, is_grads_batched=True,
                                                           create_graph=True))
    states = lure_recurrence(u, A, W, scheme=scheme)
    with pytest.raises(RuntimeError, match="is_grads_batched"):
        torch.autograd.grad(states, [u, A, W], cotangents, is_grads_batched=True, create_graph=True)
    grads = torch.autograd.grad(torch.sin(lure_recurrence(u, A, W, scheme=scheme)).sum(), [u, A, W], create_graph=True)
    directions = [torch.randn(2, *p.shape, generator=generator, dtype=torch.float64) for p in (u, A, W)]
    with pytest.raises(RuntimeError, match="is_grads_batched"):
        torch.autograd.grad(grads, [u, A, W], directions, is_grads_batched=True, create_graph=True)
    # Without create_graph the batched products are the loop's.
    products = torch.autograd.grad(grads, [u, A, W], directions, is_grads_batched=True)
    loop_grads = torch.autograd.grad(torch.sin(_loop(u, A, W, None, "euler", 0.3, 1, False)).sum(), [u, A, W], create_graph=True)
    for ours, theirs in zip(products, torch.autograd.grad(loop_grads, [u, A, W], directions, is_grads_batched=True)):
        assert _relative(ours, theirs) < RTOL


def test_compiled_autograd_runs_the_engines_backward_eagerly_with_the_same_numbers():
    """Compiled autograd traces the nodes of a backward; the engine's backward and R-operator run
    eagerly inside it (torch.compiler.disable). Traced, dynamo's resumed frames had ended the adjoint
    sweep early ("a segment has at least one step")."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    engine, _ = _pair("lipschitz", "euler")
    x, y, _ = _data(seed=13)
    params = list(engine.parameters())
    direction = [torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(14)) for p in params]

    def gradients_and_product():
        loss = nn.functional.cross_entropy(engine(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return [g.detach() for g in grads], list(torch.autograd.grad(grads, params, direction))

    expected = gradients_and_product()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        engine.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(engine(x), y).backward()
        compiled = gradients_and_product()
    for ours, theirs in zip(expected[0], [p.grad for p in params]):
        assert _relative(theirs, ours) < RTOL
    for ours, theirs in zip(expected[0] + expected[1], compiled[0] + compiled[1]):
        assert _relative(theirs, ours) < RTOL


def test_under_autocast_the_engine_computes_in_its_inputs_dtype():
    """Autocast would run the engine's products in bfloat16 against its float32 records (a dtype error
    in the forward, and in a backward run under autocast); the engine keeps its inputs' dtype, as
    autocast keeps some ops in float32, and gives the numbers it gives without autocast."""
    model = build_model(ModelConfig("lipschitz", INPUT, N, OUTPUT, eps=0.3), seed=5)
    x = torch.randn(BATCH, T, INPUT, generator=torch.Generator().manual_seed(15))
    params = [model.M_A, model.M_W, model.U.weight, model.U.bias]
    expected = model.hidden_states(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states = model.hidden_states(x)
        grads = torch.autograd.grad(states.square().sum(), params)
    assert states.dtype == torch.float32 and torch.equal(states, expected)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(grads, expected_grads))


@pytest.mark.parametrize("arch, disc", [("lipschitz", "euler"), ("lipschitz", "rk2")])
def test_forward_mode_and_vmap_run_the_general_sweep_recorded(arch, disc):
    """The engine's node has no jvp or vmap rule: with a forward-mode tangent or under torch.func.vmap
    lure_recurrence runs its general sweep, recorded by the mode that is active (it raised
    NotImplementedError for a model with parameters that need a gradient)."""
    import torch.autograd.forward_ad as forward_ad

    engine, plain = _pair(arch, disc)
    x, _, _ = _data(seed=16)
    direction = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    with forward_ad.dual_level():
        out, tangent = forward_ad.unpack_dual(engine(forward_ad.make_dual(x, direction)))
    expected, expected_tangent = torch.func.jvp(plain, (x,), (direction,))
    assert _relative(out, expected) < RTOL and _relative(tangent, expected_tangent) < RTOL
    A, W = (torch.randn(N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(s), requires_grad=True)
            for s in (18, 19))
    u = torch.randn(T, BATCH, N, dtype=torch.float64, generator=torch.Generator().manual_seed(20))
    scheme = build_scheme("euler", 0.3)
    per_sequence = torch.func.vmap(lambda v: lure_recurrence(v[:, None], A, W, scheme=scheme)[0], in_dims=1)(u)
    assert _relative(per_sequence, lure_recurrence(u, A, W, scheme=scheme)) < RTOL


def _euler_model(dtype):
    return build_model(ModelConfig("lipschitz", INPUT, 16, OUTPUT, eps=0.3, init_std=2.0), seed=5).to(dtype)


def _products(model, x, y, directions):
    """The Hessian-vector products of the cross-entropy at each direction, all on one gradient graph."""
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    return [torch.autograd.grad(grads, params, d, retain_graph=True) for d in directions]


@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_the_second_order_factor_is_formed_once_per_gradient_graph(monkeypatch, counted, memory):
    """-2 s q, the part of the second-order term R that no direction changes, is formed by a stored
    gradient graph's first Hessian-vector product, once per segment, and kept with the graph for its
    next products (recompute mode forms it in every product, its records being recomputed); another
    graph forms its own. Every product is autograd's through the loop to 1e-10."""
    monkeypatch.setattr(engine_module, "SEGMENT_BYTES", 3 * 2 * BATCH * N * 8)  # three input steps
    engine, plain = _pair("lipschitz", "euler")
    engine.engine_memory = memory
    x, y, _ = _data(seed=11)
    generator = torch.Generator().manual_seed(12)
    directions = [[torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in engine.parameters()]
                  for _ in range(3)]
    factor = counted(field_module.LureField, "second_order_factor")
    segments = -(-T // 3)
    for _ in range(2):  # two gradient graphs
        factor.clear()
        products = _products(engine, x, y, directions)
        assert len(factor) == segments * (1 if memory == "store" else len(directions))
        for ours, truth in zip(products, _products(plain, x, y, directions), strict=True):
            for a, b in zip(ours, truth, strict=True):
                assert _relative(a, b) < RTOL


@pytest.mark.parametrize("first", ["two threads", "flop counter"])
def test_a_kept_second_order_factor_is_not_reused_where_tanh_would_be_formed_otherwise(one_thread, first):
    """-2 s q kept by a graph's first product is reused only where s would be formed the same way
    (NumPy's float32 tanh with one intra-op thread and no mode observing torch, else torch.tanh): a
    first product with two threads or under FlopCounterMode leaves a later one-thread product the
    same bit for bit as on a fresh graph."""
    from torch.utils.flop_counter import FlopCounterMode
    model = _euler_model(torch.float32)
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(64, 9, INPUT, generator=generator)
    y = torch.randint(0, OUTPUT, (64,), generator=generator)
    directions = [[torch.randn(p.shape, generator=generator) for p in model.parameters()] for _ in range(2)]
    expected = _products(model, x, y, directions[1:])[0]
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    if first == "two threads":
        torch.set_num_threads(2)
        torch.autograd.grad(grads, params, directions[0], retain_graph=True)
        torch.set_num_threads(1)
    else:
        with FlopCounterMode(display=False):
            torch.autograd.grad(grads, params, directions[0], retain_graph=True)
    for ours, theirs in zip(torch.autograd.grad(grads, params, directions[1], retain_graph=True), expected, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_buffers_kept_between_calls_and_products_change_no_number(monkeypatch, one_thread, dtype):
    """The engine keeps its scratch buffers between passes in a thread and a gradient graph keeps its
    products' tangent records: products in directions v1, v2, v1 on one graph, interleaved with passes
    of other shapes, are bit for bit those of a fresh graph for each, and a product returned earlier is
    not written over by a later one. Several stored segments, so that each keeps buffers of its own."""
    monkeypatch.setattr(engine_module, "SEGMENT_BYTES", 2 * BATCH * 16 * torch.finfo(dtype).bits // 8 * 2)
    model = _euler_model(dtype)
    x, y, _ = _data()
    x = x.to(dtype)
    generator = torch.Generator().manual_seed(7)
    params = list(model.parameters())
    v1, v2 = ([torch.randn(p.shape, generator=generator, dtype=dtype) for p in params] for _ in range(2))
    fresh = []
    for direction in (v1, v2):
        engine_module.release_workspace()
        fresh.append(_products(model, x, y, [direction])[0])
    params_grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    first = torch.autograd.grad(params_grads, params, v1, retain_graph=True)
    kept = [t.clone() for t in first]
    model(torch.randn(2 * T, 2 * BATCH, INPUT, dtype=dtype)).sum().backward()   # another shape in between
    second = torch.autograd.grad(params_grads, params, v2, retain_graph=True)
    third = torch.autograd.grad(params_grads, params, v1, retain_graph=True)
    for ours, theirs in [*zip(first, fresh[0]), *zip(second, fresh[1]), *zip(third, fresh[0]), *zip(first, kept)]:
        assert torch.equal(ours, theirs)
    plain = copy.deepcopy(model)
    plain.engine = "autograd"
    for ours, truth in zip(fresh[1], _products(plain, x, y, [v2])[0]):
        assert _relative(ours, truth) < (RTOL if dtype == torch.float64 else 1e-4)
    # States returned without a graph are not the scratch buffers the next call writes into.
    A, W = (torch.randn(16, 16, generator=generator, dtype=dtype) / 4 for _ in range(2))
    with torch.no_grad():
        u = torch.randn(T, BATCH, 16, generator=generator, dtype=dtype)
        first_states = lure_recurrence(u, A, W, scheme=build_scheme("euler", 0.3))
        kept_states = first_states.clone()
        lure_recurrence(2 * u, A, W, scheme=build_scheme("euler", 0.3))
    assert torch.equal(first_states, kept_states)
    engine_module.release_workspace()
    assert getattr(engine_module._IDLE, "workspace", None) is None


def test_row_lists_kept_between_calls_stay_bounded_over_calls_of_many_lengths(one_thread):
    """Calls of ever shorter sequences reuse one buffer; the row lists kept with it are at most two per
    buffer view (not one per length ever seen, a view per row each: 1,200 lengths held 1.2 GiB)."""
    generator = torch.Generator().manual_seed(8)
    A, W = (torch.randn(8, 8, generator=generator, dtype=torch.float64) / 4 for _ in range(2))
    engine_module.release_workspace()
    with torch.no_grad():
        for steps in range(40, 0, -1):
            u = torch.randn(steps, 2, 8, generator=generator, dtype=torch.float64)
            assert _relative(lure_recurrence(u, A, W, scheme=build_scheme("euler", 0.3)),
                             _loop(u, A, W, None, "euler", 0.3, 1, False)) < RTOL
    names = [name for name, _ in engine_module._IDLE.workspace.row_lists]
    assert names and max(names.count(name) for name in names) <= 2
    engine_module.release_workspace()

def test_products_in_two_threads_on_one_graph_equal_them_one_after_the_other(one_thread):
    """Two threads take Hessian-vector products on the same gradient graph at once (each borrows the
    graph's buffers or, while the other holds them, its own), and run forward and backward passes of
    other models meanwhile: the same numbers as one thread alone."""
    import threading

    model = _euler_model(torch.float32)
    x, y, _ = _data()
    x = x.float()
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(8)
    directions = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(4)]
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    expected = [torch.autograd.grad(grads, params, d, retain_graph=True) for d in directions]
    other, other_x = _euler_model(torch.float32), torch.randn(T, 2 * BATCH, INPUT)
    other_grad = torch.autograd.grad(other(other_x).sum(), list(other.parameters()))
    results: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
    mismatches: list[int] = []

    def work(worker: int) -> None:
        torch.set_num_threads(1)
        for round_ in range(6):
            index = (worker + round_) % len(directions)
            results[worker, round_] = torch.autograd.grad(grads, params, directions[index], retain_graph=True)
            if not all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(other(other_x).sum(),
                                                                             list(other.parameters())), other_grad)):
                mismatches.append(worker)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches and len(results) == 12
    for (worker, round_), products in results.items():
        for ours, theirs in zip(products, expected[(worker + round_) % len(directions)]):
            assert torch.equal(ours, theirs)


def test_the_buffers_kept_between_calls_are_the_cpus_only(one_thread):
    """A pass on another device (here meta, standing in for CUDA, whose allocator keeps freed memory
    itself) leaves none of its buffers or row lists in the thread's workspace (it replaced the CPU
    pass's buffers of the same names). float64 on the CPU: the general loop, which keeps row lists."""
    engine_module.release_workspace()
    A, W = torch.zeros(4, 4), torch.zeros(4, 4)
    with torch.no_grad():
        lure_recurrence(torch.zeros(5, 2, 4, dtype=torch.float64), A.double(), W.double(), scheme=build_scheme("euler", 0.1))
        kept = engine_module._IDLE.workspace
        assert kept.buffers and kept.row_lists
        lure_recurrence(torch.zeros(5, 2, 4, device="meta"), A.to("meta"), W.to("meta"), scheme=build_scheme("euler", 0.1))
    workspace = engine_module._IDLE.workspace
    tensors = [*workspace.buffers.values(), *(view for _, rows in workspace.row_lists.values() for view in rows)]
    assert all(t.device.type == "cpu" for t in tensors)
    engine_module.release_workspace()


def test_products_that_fail_midway_leave_nothing_behind_and_the_next_is_exact(one_thread):
    """A hook that raises during a Hessian-vector product stops its graph task after the adjoint node
    posted its second-order sweep for the recurrence node: that work is dropped when the thread posts
    again (it held the product's tangent records, one set per failure), and a later product is exact."""
    generator = torch.Generator().manual_seed(9)
    u, A, W = (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
               for shape, scale in (((T, BATCH, N), 1.0), ((N, N), 0.1), ((N, N), 0.3)))
    params = [t.requires_grad_() for t in (u, A, W)]
    out = lure_recurrence(*params, scheme=build_scheme("euler", 0.2))
    failing = [False]

    def hook(grad):
        if failing[0]:
            raise KeyError("raised by a hook")
    out.register_hook(hook)
    grads = torch.autograd.grad(torch.sin(out).sum(), params, create_graph=True)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    expected = torch.autograd.grad(grads, params, direction, retain_graph=True)
    mailbox = out.grad_fn.mailbox if hasattr(out.grad_fn, "mailbox") else None
    failing[0] = True
    for _ in range(4):
        with pytest.raises(KeyError):
            torch.autograd.grad(grads, params, direction, retain_graph=True)
    failing[0] = False
    if mailbox is not None:
        assert sum(len(work) for work in mailbox.pending.values()) <= 1
    for ours, theirs in zip(torch.autograd.grad(grads, params, direction, retain_graph=True), expected):
        assert torch.equal(ours, theirs)
    if mailbox is not None:
        assert not mailbox.pending


def test_a_product_within_another_on_the_same_graph_keeps_both_second_order_parts(monkeypatch, one_thread):
    """A Hessian-vector product started from a hook of the outer one (a backward within a backward in
    one thread, through the same gradient graph) leaves the outer's pending sweep alone: both exact.
    Where torch's engine entry cannot be counted, the inner product drops it and the outer raises
    rather than return its Gauss-Newton part alone."""
    generator = torch.Generator().manual_seed(10)
    u, A, W = (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
               for shape, scale in (((T, BATCH, N), 1.0), ((N, N), 0.1), ((N, N), 0.3)))
    params = [t.requires_grad_() for t in (u, A, W)]
    out = lure_recurrence(*params, scheme=build_scheme("euler", 0.2))
    grads = torch.autograd.grad(torch.sin(out).sum(), params, create_graph=True)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    expected = torch.autograd.grad(grads, params, direction, retain_graph=True)
    inner: list[tuple[torch.Tensor, ...]] = []
    nested = [False]

    def hook(grad):
        if not nested[0]:  # the inner product runs this hook too
            nested[0] = True
            inner.append(torch.autograd.grad(grads, params, direction, retain_graph=True))
    out.register_hook(hook)
    outer = torch.autograd.grad(grads, params, direction, retain_graph=True)
    for ours, theirs in [*zip(outer, expected), *zip(inner[0], expected)]:
        assert torch.equal(ours, theirs)
    monkeypatch.setattr(engine_module, "_ENGINE_CALL", None)
    nested[0] = False
    with pytest.raises(RuntimeError, match="within another"):
        torch.autograd.grad(grads, params, direction, retain_graph=True)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(inner[1], expected))


def test_records_reuse_memory_only_where_nothing_else_holds_it(monkeypatch, one_thread):
    """A call's records (the states and pre-activations saved for the backward pass) take the memory of
    the last call's once its graph is gone, with the same gradients; while a graph is kept, the next
    call takes fresh memory and the kept graph's gradients do not change. Without torch's count of
    storage references nothing is reused, and nothing is held past ``RECORD_BYTES``."""
    model = _euler_model(torch.float32)
    x, y, _ = _data()
    x = x.float()
    params = list(model.parameters())

    def gradients(inputs=x):
        return torch.autograd.grad(nn.functional.cross_entropy(model(inputs), y), params)

    engine_module.release_workspace()
    first = gradients()
    records = dict(engine_module._IDLE.workspace.records)
    assert {name.split("@")[0] for name in records} == {"states", "P"}
    assert all(torch.equal(a, b) for a, b in zip(gradients(), first))
    assert all(engine_module._IDLE.workspace.records[name] is held for name, held in records.items())
    kept_loss = nn.functional.cross_entropy(model(x), y)
    gradients(2 * x)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(kept_loss, params, retain_graph=True), first))
    renewed = engine_module._IDLE.workspace.records
    assert all(renewed[name] is not held for name, held in records.items())
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    held = dict(engine_module._IDLE.workspace.records)
    del kept_loss
    assert all(torch.equal(a, b) for a, b in zip(gradients(), first))
    assert all(engine_module._IDLE.workspace.records[name] is not t for name, t in held.items())
    monkeypatch.setattr(engine_module, "RECORD_BYTES", 0)
    engine_module.release_workspace()
    gradients()
    assert not engine_module._IDLE.workspace.records
    engine_module.release_workspace()


def test_fake_tensor_passes_leave_the_workspace_alone(one_thread):
    """A pass on fake tensors (FakeTensorMode, as torch.compile and torch.export trace) keeps none of
    its fake buffers or records for the next pass, and takes none of the real ones: the passes after it
    compute the same gradients (they met fake buffers: an error in float32, a crash in float64)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _euler_model(torch.float32)
    x, y, _ = _data()
    x = x.float()
    params = list(model.parameters())

    def gradients():
        return torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)

    engine_module.release_workspace()
    first = gradients()
    held = dict(engine_module._IDLE.workspace.buffers)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_x = mode.from_tensor(x)
        model(fake_x).sum()
        nn.functional.cross_entropy(model(fake_x), y).backward()
    workspace = engine_module._IDLE.workspace
    assert all(type(t) is torch.Tensor for t in (*workspace.buffers.values(), *workspace.records.values()))
    assert all(workspace.buffers[name] is t for name, t in held.items())
    assert all(torch.equal(a, b) for a, b in zip(gradients(), first))
    for p in params:
        p.grad = None
    engine_module.release_workspace()


def test_fake_tensors_outside_their_mode_take_torchs_path_and_leave_nothing(one_thread):
    """Fake tensors used outside their mode report the CPU but hold no memory: NumPy never views them
    (it raised), no row list keys on their addresses, and a real pass afterwards is the loop's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    generator = torch.Generator().manual_seed(9)
    A, W = (torch.randn(8, 8, generator=generator) / 4 for _ in range(2))
    u = torch.randn(5, 3, 8, generator=generator)
    engine_module.release_workspace()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(t) for t in (u, A, W)]
    out = lure_recurrence(*fakes, scheme=build_scheme("euler", 0.3))
    assert type(out) is not torch.Tensor and out.shape == (3, 8)
    workspace = engine_module._IDLE.workspace
    kept = [*workspace.buffers.values(), *workspace.records.values(),
            *(view for _, rows in workspace.row_lists.values() for view in rows)]
    assert all(type(t) is torch.Tensor for t in kept)
    u64, A64, W64 = (t.double() for t in (u, A, W))
    assert _relative(lure_recurrence(u64, A64, W64, scheme=build_scheme("euler", 0.3)),
                     _loop(u64, A64, W64, None, "euler", 0.3, 1, False)) < RTOL
    engine_module.release_workspace()


def test_a_model_traced_by_jit_trace_runs_the_general_sweep_with_the_same_gradients(one_thread):
    """torch.jit.trace of a model whose parameters need gradients failed inside torch on the engine's
    node ("unordered_map::at"); under the tracer the general sweep runs, recorded op by op."""
    import warnings

    model = build_model(ModelConfig("lipschitz", INPUT, N, OUTPUT, eps=0.3, init_std=2.0), seed=5).double()
    x, y, _ = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated, and still there
        traced = torch.jit.trace(model, x)
    params = list(model.parameters())
    ours = torch.autograd.grad(nn.functional.cross_entropy(traced(2 * x), y), params)
    theirs = torch.autograd.grad(nn.functional.cross_entropy(model(2 * x), y), params)
    for a, b in zip(ours, theirs):
        assert _relative(a, b) < RTOL
