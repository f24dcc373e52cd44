"""The engine forming u_t = x_t U^T + b itself (``input_weight``, ``input_bias``) against the engine on u
formed beforehand by autograd's linear, in float64: states, gradients of x, U, b, A, W (and B) and
Hessian-vector products, whose cross terms between x and U the projection's own second derivative
supplies (:mod:`lrnn_analysis.recurrence.inputs`)."""
import pytest
import torch

from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.recurrence import build_scheme, lure_recurrence
from lrnn_analysis.recurrence.inputs import Inputs

T, BATCH, N, INPUT = 7, 3, 5, 2
RTOL = 1e-11


def _relative(actual, expected):
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def _tensors(with_bias, with_b, x_grad, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()

    tensors = {"x": draw(T, BATCH, INPUT).requires_grad_(x_grad), "U": draw(N, INPUT), "A": draw(N, N, scale=0.4),
               "W": draw(N, N, scale=0.6)}
    if with_bias:
        tensors["b"] = draw(N)
    if with_b:
        tensors["B"] = draw(N, N, scale=0.5)
    return tensors


def _states(tensors, fused, scheme, keep_states, segment):
    x, U, b = tensors["x"], tensors["U"], tensors.get("b")
    A, W, B = tensors["A"], tensors["W"], tensors.get("B")
    if fused:
        return lure_recurrence(x, A, W, B, scheme=scheme, keep_states=keep_states, segment=segment,
                               input_weight=U, input_bias=b)
    return lure_recurrence(torch.nn.functional.linear(x, U, b), A, W, B, scheme=scheme, keep_states=keep_states,
                           segment=segment)


def _loss(states, seed=1):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(states.shape, generator=generator, dtype=torch.float64)
    return (torch.sin(states) * weights).sum()


CASES = [
    # (scheme, with B, with bias, x needs a gradient)
    (("euler", 0.3), False, True, True),
    (("euler", 0.3), False, False, True),
    (("euler", 0.3), False, True, False),
    (("rk2", 0.3), False, True, True),
    (("map", None), True, True, True),
    (("rk4", 0.2), True, False, False),
]


@pytest.mark.parametrize("segment", [None, 3])
@pytest.mark.parametrize("keep_states", [False, True])
@pytest.mark.parametrize(("method", "with_b", "with_bias", "x_grad"), CASES)
def test_affine_inputs_give_the_states_gradients_and_hessian_products_of_the_formed_inputs(
        method, with_b, with_bias, x_grad, keep_states, segment):
    scheme = build_scheme(*method)
    tensors = _tensors(with_bias, with_b, x_grad)
    params = [t for t in tensors.values() if t.requires_grad]
    generator = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    results = {}
    for fused in (True, False):
        states = _states(tensors, fused, scheme, keep_states, segment)
        grads = torch.autograd.grad(_loss(states), params, create_graph=True)
        products = torch.autograd.grad(grads, params, direction)
        results[fused] = (states, grads, products)
    (states, grads, products), (states_ref, grads_ref, products_ref) = results[True], results[False]
    assert _relative(states, states_ref) < RTOL
    for name, ours, reference in zip([k for k, t in tensors.items() if t.requires_grad], grads, grads_ref):
        assert _relative(ours, reference) < RTOL, name
    for name, ours, reference in zip([k for k, t in tensors.items() if t.requires_grad], products, products_ref):
        assert _relative(ours, reference) < RTOL, name


def test_batched_hessian_products_and_a_loss_linear_in_the_states():
    """is_grads_batched (the vmap runs the unfused sweeps, nothing written in place) and a loss linear in
    the states (no Gauss-Newton part) with x needing a gradient."""
    scheme = build_scheme("euler", 0.3)
    tensors = _tensors(True, False, True, seed=4)
    params = list(tensors.values())
    generator = torch.Generator().manual_seed(5)
    directions = [torch.randn(3, *p.shape, generator=generator, dtype=torch.float64) for p in params]
    results = {}
    for fused in (True, False):
        states = _states(tensors, fused, scheme, True, None)
        grads = torch.autograd.grad(_loss(states), params, create_graph=True)
        batched = torch.autograd.grad(grads, params, directions, retain_graph=True, is_grads_batched=True)
        weights = torch.randn(states.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        linear = torch.autograd.grad((states * weights).sum(), params, create_graph=True)
        results[fused] = (batched, torch.autograd.grad(linear, params, [d[0] for d in directions]))
    for ours, reference in zip(results[True][0] + results[True][1], results[False][0] + results[False][1]):
        assert _relative(ours, reference) < RTOL


def test_zoo_model_runs_its_own_projection_through_the_engine(monkeypatch):
    """A Lipschitz RNN passes U and b to the engine, which then never forms u for the whole sequence;
    the outputs and gradients equal those of the engine on u formed by the model."""
    from lrnn_analysis.recurrence import engine as engine_module

    model = build_model(ModelConfig("lipschitz", INPUT, N, 3, eps=0.3), seed=1).double()
    x = torch.randn(BATCH, T, INPUT, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    seen = []
    original = engine_module.lure_recurrence

    def spy(inputs, *args, **kwargs):
        seen.append(kwargs.get("input_weight") is not None)
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr("lrnn_analysis.models.architectures.lure_recurrence", spy)
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert seen == [True]
    monkeypatch.setattr(type(model), "_engine_projection", lambda self: None)
    reference = model(x)
    reference_grads = torch.autograd.grad(reference.square().sum(), list(model.parameters()))
    assert seen == [True, False]
    assert _relative(out, reference) < RTOL
    for ours, theirs in zip(grads, reference_grads):
        assert _relative(ours, theirs) < RTOL


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("change", ["hooked", "subclass"])
def test_an_input_layer_the_weights_do_not_describe_is_called_instead(change):
    """A hook on U (the old spectral_norm recomputes the weight in a forward pre-hook) or a layer that
    is not a plain nn.Linear: the engine takes U(x), so the model computes what its loop computes."""
    model = build_model(ModelConfig("lipschitz", INPUT, N, 3, eps=0.3), seed=2).double()
    if change == "hooked":
        torch.nn.utils.spectral_norm(model.U)
    else:
        layer = _ScaledLinear(INPUT, N).double()
        layer.load_state_dict(model.U.state_dict())
        model.U = layer
    assert model._engine_projection() is None
    model.eval()  # spectral_norm's power iteration moves the weight on every call in training mode
    x = torch.randn(BATCH, T, INPUT, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    engine = model(x)
    model.engine = "autograd"
    assert _relative(engine, model(x)) < RTOL



@pytest.mark.parametrize("features", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("substeps", [None, 1, 2])
def test_inputs_written_into_a_buffer_are_the_formed_inputs(features, with_bias, substeps):
    """The forward writes u_t = x_t U^T + b straight into the u columns of its buffer (steps, substeps,
    batch, [0 | u]): as an outer product with one feature, a product into the buffer's rows with more,
    formed and copied where the steps and batch axes do not merge (two substeps); u itself copied where
    given. Nothing is written outside those columns. (substeps None: a contiguous buffer of u alone.)"""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(T, BATCH, features, generator=generator, dtype=torch.float64)
    U = torch.randn(N, features, generator=generator, dtype=torch.float64)
    b = torch.randn(N, generator=generator, dtype=torch.float64) if with_bias else None
    u = torch.randn(T, BATCH, N, generator=generator, dtype=torch.float64)
    for inputs, expected in ((Inputs(x, U, b), torch.nn.functional.linear(x, U, b)), (Inputs(u, None, None), u)):
        buffer = torch.full((4, substeps or 1, BATCH, N if substeps is None else 2 * N), float("nan"), dtype=torch.float64)
        out = buffer[:, 0] if substeps is None else buffer[:, 0, :, N:]
        assert inputs.segment(2, 6, out=out).data_ptr() == out.data_ptr()
        assert _relative(out, expected[2:6]) < 1e-15
        assert int(buffer.isnan().sum()) == buffer.numel() - out.numel()
        assert torch.equal(inputs.segment(2, 6), expected[2:6])


@pytest.mark.parametrize("features", [1, 3])
@pytest.mark.parametrize("parts", ["U", "U b", "U b x", "x"])
@pytest.mark.parametrize("stages", [1, 2])
def test_input_tangents_added_in_place_are_the_formed_ones(features, parts, stages):
    """u_dot = x U_dot^T + b_dot + x_dot U^T added into the p columns of the tangent pass's buffer (one
    stage: in place, by an outer product or a product into the rows; several: formed and broadcast)
    equals u_dot formed by :meth:`Inputs.tangent` and added; x_dot alone where u is given."""
    generator = torch.Generator().manual_seed(4)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x, U, b = draw(T, BATCH, features), draw(N, features), draw(N)
    if parts == "x":
        inputs, direction = Inputs(draw(T, BATCH, N), None, None), (draw(T, BATCH, N), None, None)
    else:
        inputs = Inputs(x, U, b)
        direction = (draw(T, BATCH, features) if "x" in parts else None, draw(N, features), draw(N) if "b" in parts else None)
    buffer = draw(4, stages, BATCH, 2 * N)
    expected = buffer.clone()
    expected[..., N:] += inputs.tangent(direction, 2, 6)[:, None]
    inputs.add_tangent(direction, 2, 6, buffer[..., N:])
    assert _relative(buffer, expected) < 1e-15
    assert torch.equal(buffer[..., :N], expected[..., :N])
