"""Lur'e forms derived from the step a module runs, and forms checked against the module.

Each cell is written as its authors write it; the hand-written forms it is compared with are read
off the published equations (column convention, float64).
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrnn_analysis.errors import InputError
from lrnn_analysis.lure import LureSystem, activation
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.models.torchnn import SequenceClassifier
from lrnn_analysis.stability import certify
from lrnn_analysis.stability.consistency import check_form
from lrnn_analysis.stability.derivation import derive_lure_form

F64 = torch.float64


def _numpy(tensor):
    return tensor.detach().double().numpy()


class CoRNNCell(nn.Module):
    """Rusch and Mishra (2021), as in their code: hz <- hz + dt (tanh(W [x, hz, hy] + b) - gamma hy - eps hz),
    then hy <- hy + dt hz (the new hz)."""

    def __init__(self, n_inp, n_hid, dt, gamma, epsilon):
        super().__init__()
        self.dt, self.gamma, self.epsilon = dt, gamma, epsilon
        self.i2h = nn.Linear(n_inp + n_hid + n_hid, n_hid)

    def step(self, state, x):
        hy, hz = state
        hz = hz + self.dt * (torch.tanh(self.i2h(torch.cat((x, hz, hy), 1))) - self.gamma * hy - self.epsilon * hz)
        hy = hy + self.dt * hz
        return hy, hz


class AntisymmetricCell(nn.Module):
    """Chang et al. (2019): h <- h + eps tanh((W - W^T - gamma I) h + V x + b)."""

    def __init__(self, n_inp, n_hid, eps, gamma):
        super().__init__()
        self.eps, self.gamma = eps, gamma
        self.W = nn.Parameter(torch.randn(n_hid, n_hid) / n_hid**0.5)
        self.V = nn.Linear(n_inp, n_hid)

    def step(self, h, x):
        M = self.W - self.W.t() - self.gamma * torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return h + self.eps * torch.tanh(F.linear(h, M) + self.V(x))


class IndRNNCell(nn.Module):
    """Li et al. (2018): h <- relu(W x + u * h + b), the recurrence elementwise."""

    def __init__(self, n_inp, n_hid):
        super().__init__()
        self.input = nn.Linear(n_inp, n_hid)
        self.u = nn.Parameter(torch.rand(n_hid) * 0.9)

    def step(self, h, x):
        return F.relu(self.input(x) + self.u * h)


class LipschitzCell(nn.Module):
    """A user's Lipschitz RNN (Erichson et al. 2021): h <- h + eps (A h + tanh(W h + U x + b)) with
    A = (1 - beta)(M_A + M_A^T) + beta (M_A - M_A^T) - gamma I and W likewise."""

    def __init__(self, n_inp, n_hid, eps=0.1, beta=0.75, gamma=0.5):
        super().__init__()
        self.eps, self.beta, self.gamma = eps, beta, gamma
        self.M_A = nn.Parameter(torch.randn(n_hid, n_hid) / n_hid)
        self.M_W = nn.Parameter(torch.randn(n_hid, n_hid) / n_hid)
        self.U = nn.Linear(n_inp, n_hid)

    def matrix(self, M):
        eye = torch.eye(M.shape[0], dtype=M.dtype)
        return (1 - self.beta) * (M + M.T) + self.beta * (M - M.T) - self.gamma * eye

    def step(self, h, x):
        A, W = self.matrix(self.M_A), self.matrix(self.M_W)
        return h + self.eps * (h @ A.T + torch.tanh(h @ W.T + self.U(x)))


class VanillaCell(nn.Module):
    """h <- tanh(W h + U x), written in the row convention."""

    def __init__(self, n_inp, n_hid, scale=0.5):
        super().__init__()
        self.W = nn.Parameter(scale * torch.randn(n_hid, n_hid) / n_hid**0.5)
        self.U = nn.Parameter(torch.randn(n_hid, n_inp))

    def step(self, h, x):
        return torch.tanh(h @ self.W.T + x @ self.U.T)


def _cells():
    """(name, module, state shapes, input shape, hand-written LureSystem, its inputs u(x), coordinates)."""
    torch.manual_seed(0)
    n, d = 5, 3
    anti = AntisymmetricCell(d, n, eps=0.2, gamma=0.5).double()
    M = _numpy(anti.W) - _numpy(anti.W).T - 0.5 * np.eye(n)
    ind = IndRNNCell(d, n).double()
    lip = LipschitzCell(d, n).double()
    vanilla = VanillaCell(d, n).double()
    rnn_tanh = nn.RNNCell(d, n).double()
    rnn_relu = nn.RNNCell(d, n, nonlinearity="relu").double()
    with torch.no_grad():
        rnn_relu.weight_hh.mul_(0.5)
    zeros = np.zeros((n, n))
    return [
        ("antisymmetric", anti, (n,), (d,), LureSystem(zeros, M, method="euler", eps=0.2), anti.V),
        ("indrnn", ind, (n,), (d,), LureSystem(zeros, np.diag(_numpy(ind.u)), method="map", activation="relu"), ind.input),
        ("lipschitz", lip, (n,), (d,), LureSystem(_numpy(lip.matrix(lip.M_A)), _numpy(lip.matrix(lip.M_W)),
                                                  method="euler", eps=0.1), lip.U),
        ("vanilla", vanilla, (n,), (d,), LureSystem(zeros, _numpy(vanilla.W), method="map"), lambda x: x @ vanilla.U.T),
        ("rnncell-tanh", rnn_tanh, None, None, LureSystem(zeros, _numpy(rnn_tanh.weight_hh), method="map"),
         lambda x: x @ rnn_tanh.weight_ih.T + rnn_tanh.bias_ih + rnn_tanh.bias_hh),
        ("rnncell-relu", rnn_relu, None, None,
         LureSystem(zeros, _numpy(rnn_relu.weight_hh), method="map", activation="relu"),
         lambda x: x @ rnn_relu.weight_ih.T + rnn_relu.bias_ih + rnn_relu.bias_hh),
    ]


CELLS = {case[0]: case for case in _cells()}


def _cornn(n=3, d=2):
    """A coRNN on the edge of stability (dt 0.1, gamma 20, epsilon 1, hz -> hz weights 1.05 I + noise)."""
    torch.manual_seed(0)
    cell = CoRNNCell(d, n, dt=0.1, gamma=20.0, epsilon=1.0).double()
    with torch.no_grad():
        cell.i2h.weight.mul_(0.02)
        cell.i2h.weight[:, d:d + n] += 1.05 * torch.eye(n, dtype=F64)
    return cell


def _cornn_hand_forms(cell, n, d):
    """The correct form, in zeta = (hz, hy - dt hz) (h = T zeta), and the form that forgets tanh drives hy."""
    weight = _numpy(cell.i2h.weight)
    Wz, Wy = weight[:, d:d + n], weight[:, d + n:]
    dt, g, e = cell.dt, cell.gamma, cell.epsilon
    I, Z = np.eye(n), np.zeros((n, n))
    # hz+ = hz + dt (s - g hy - e hz), hy+ = hy + dt hz+: with zeta_a = hz, zeta_b = hy - dt hz,
    # zeta_a+ = zeta_a + dt (s - (g dt + e) zeta_a - g zeta_b), zeta_b+ = zeta_b + dt zeta_a.
    correct = LureSystem(np.block([[-(g * dt + e) * I, -g * I], [I, Z]]), np.block([[Wz + dt * Wy, Wy], [Z, Z]]),
                         method="euler", eps=dt)
    T = np.block([[dt * I, I], [I, Z]])
    # hy+ = hy + dt hz + dt^2 (-g hy - e hz): the dt^2 tanh term is missing.
    wrong = LureSystem(np.block([[-dt * g * I, (1 - dt * e) * I], [-g * I, -e * I]]), np.block([[Z, Z], [Wy, Wz]]),
                       method="euler", eps=dt)

    def drive(x):
        return cell.i2h(torch.cat([x, torch.zeros(x.shape[0], 2 * n, dtype=x.dtype)], 1))

    return correct, T, (lambda x: torch.cat([drive(x), torch.zeros(x.shape[0], n, dtype=x.dtype)], 1)), \
        wrong, (lambda x: torch.cat([torch.zeros(x.shape[0], n, dtype=x.dtype), drive(x)], 1))


def _trajectory(cell, step_state, xs):
    states = []
    with torch.no_grad():
        for t in range(xs.shape[1]):
            step_state = cell(xs[:, t], step_state) if isinstance(cell, nn.RNNCellBase) else cell.step(step_state, xs[:, t])
            parts = step_state if isinstance(step_state, tuple) else (step_state,)
            states.append(np.concatenate([_numpy(p) for p in parts], axis=1))
    return np.stack(states, axis=1)


def _verdicts(system):
    return [r.holds for r in certify(system, time_budget=60)]


@pytest.mark.parametrize("name", list(CELLS) + ["cornn"])
def test_derived_form_reproduces_the_modules_states(name):
    if name == "cornn":
        cell, state_shapes, x_shape = _cornn(), ((3,), (3,)), (2,)
    else:
        _, cell, state_shapes, x_shape, _, _ = CELLS[name]
    form = derive_lure_form(cell, state_shapes, x_shape)
    generator = torch.Generator().manual_seed(1)
    shapes = form.state_shapes
    h0 = tuple(torch.randn(4, *s, generator=generator, dtype=F64) for s in shapes)
    h0 = h0 if form.state_is_tuple else h0[0]
    xs = torch.randn(4, 30, *form.input_shape, generator=generator, dtype=F64)
    expected = _trajectory(cell, h0, xs)
    assert np.abs(form.simulate(h0, xs) - expected).max() <= 1e-10 * (1 + np.abs(expected).max())
    check = check_form(cell, form)
    assert check.passed and check.relative_error <= 1e-13, check


@pytest.mark.parametrize("name", list(CELLS))
def test_derived_form_is_the_published_form_and_certifies_alike(name):
    _, cell, state_shapes, x_shape, hand, inputs = CELLS[name]
    form = derive_lure_form(cell, state_shapes, x_shape)
    system = form.system
    assert form.in_module_coordinates
    assert (system.method, system.eps, system.activation) == (hand.method, hand.eps, hand.activation)
    assert system.slope == hand.slope
    assert np.abs(system.A - hand.A).max() <= 1e-12 and np.abs(system.W - hand.W).max() <= 1e-12
    x = torch.randn(6, *form.input_shape, dtype=F64)
    assert np.abs(form.inputs(x) - _numpy(inputs(x))).max() <= 1e-12
    assert _verdicts(system) == _verdicts(hand)
    assert check_form(cell, hand, state=state_shapes, x=x_shape, inputs=inputs).passed


def test_cornn_form_that_forgets_tanh_drives_hy_is_refused_and_the_derived_form_is_not_certified():
    n, d = 3, 2
    cell = _cornn(n, d)
    correct, T, correct_inputs, wrong, wrong_inputs = _cornn_hand_forms(cell, n, d)
    # The hand form with the mistake certifies; the model's own form cannot be certified.
    wrong_result = certify(wrong, ["euler-lmi"], time_budget=60)[0]
    assert wrong_result.holds and wrong_result.rate < 1
    derived = derive_lure_form(cell, ((n,), (n,)), (d,))
    assert derived.state_is_tuple and derived.state_size == 2 * n and not derived.in_module_coordinates
    for system in (derived.system, correct):
        results = certify(system, time_budget=60)
        assert not any(r.holds for r in results)
        reason = results[-1].reason
        assert "no input-uniform certificate can exist" in reason and "spectral radius 1.00" in reason
    # The frozen step matrix at slope 1 is similar in both forms: the same spectral radius > 1.
    radii = [max(abs(np.linalg.eigvals(np.eye(2 * n) + s.eps * (s.A + s.W)))) for s in (derived.system, correct)]
    assert radii[0] > 1 and math.isclose(radii[0], radii[1], rel_tol=1e-12)
    # check_form tells the forms apart.
    shapes = dict(state=((n,), (n,)), x=(d,))
    refused = check_form(cell, wrong, inputs=wrong_inputs, **shapes)
    assert refused.status == "refused" and refused.relative_error > 1e-4 and 1 <= refused.worst_step <= refused.steps
    assert check_form(cell, correct, inputs=correct_inputs, coordinates=T, **shapes).passed
    assert check_form(cell, derived).passed


def _wrong(name):
    """(cell, a wrong form, the cell's input map) for each mistake."""
    _, cell, _, _, hand, inputs = CELLS["vanilla" if name in ("transposed", "another model") else "lipschitz"]
    if name == "transposed":
        return cell, LureSystem(hand.A, hand.W.T, method="map"), inputs
    if name == "another model":
        torch.manual_seed(5)
        other = VanillaCell(3, 5).double()
        return cell, LureSystem(hand.A, _numpy(other.W), method="map"), inputs
    if name == "eps":
        return cell, LureSystem(hand.A, hand.W, method="euler", eps=0.12), inputs
    return cell, LureSystem(-hand.A, hand.W, method="euler", eps=0.1), inputs


@pytest.mark.parametrize("name", ["transposed", "another model", "eps", "sign of A"])
def test_wrong_forms_are_refused(name):
    cell, form, inputs = _wrong(name)
    for given in (inputs, None):  # the cell's u_t given, or read off its own derived form
        result = check_form(cell, form, state=(5,), x=(3,), inputs=given)
        assert result.status == "refused" and not result.passed, result
        assert result.relative_error > 1e3 * result.tolerance and f"at step {result.worst_step}" in result.reason


def test_toolkit_models_are_checked_through_their_hidden_states():
    model = build_model(ModelConfig("lipschitz", 3, 6, 2), seed=0)
    stored = model.lure_form()
    good = check_form(model, stored)
    assert good.passed and good.inputs == "lure_inputs" and good.dtype == "float32"
    assert good.tolerance == pytest.approx(16 * ((6 + 3) * 2.0**-24 + 6 * 2.0**-53))
    for A, W, eps in ((stored.A, stored.W, 0.11), (-stored.A, stored.W, 0.1), (stored.A, stored.W.T, 0.1)):
        wrong = LureSystem(A, W, method="euler", eps=eps)
        assert check_form(model, wrong).status == "refused"
    assert check_form(model, LureSystem(stored.A[:5, :5], stored.W[:5, :5], method="euler", eps=0.1)).status == "refused"
    torch.manual_seed(0)
    stack = SequenceClassifier(nn.RNN(3, 4, num_layers=2, batch_first=True), nn.Linear(4, 2))
    for layer, system in enumerate(stack.lure_forms()):
        assert check_form(stack, system, layer=layer).passed
        transposed = LureSystem(system.A, system.W.T, method="map")
        assert check_form(stack, transposed, layer=layer).status == "refused"


def test_float32_cell_passes_at_float32_tolerance():
    torch.manual_seed(0)
    cell = nn.RNNCell(4, 16)
    form = derive_lure_form(cell)
    result = check_form(cell, form, steps=32, batch=8, seed=3)
    assert result.passed and result.dtype == "float32" and 1e-9 < result.relative_error <= result.tolerance
    assert np.array_equal(form.system.W, _numpy(cell.weight_hh))
    wrong = check_form(cell, LureSystem(np.zeros((16, 16)), form.system.W.T, method="map"))
    assert wrong.status == "refused"


CONFIGS = [("lipschitz", "euler", 1), ("lipschitz", "rk2", 1), ("lipschitz", "rk38", 1), ("antisymmetric", "euler", 1),
           ("cayley", "map", 1), ("residual", "euler", 1), ("vanilla", "map", 1), ("node", "rk4", 3), ("node", "rk2", 2),
           ("node", "euler", 2), ("contracting", "euler", 1)]


@pytest.mark.parametrize("arch,scheme,substeps", CONFIGS)
def test_derived_form_of_every_zoo_architecture_is_its_stored_form(arch, scheme, substeps):
    model = build_model(ModelConfig(arch, 3, 5, 2, discretization=scheme, ode_substeps=substeps), seed=1).double()
    stored = model.lure_form()
    step = model._step_function()
    eps = model.config.eps if arch == "contracting" else None
    form = derive_lure_form(lambda h, x: step(h, model.U(x)), (5,), (3,), eps=eps)
    system = form.system
    assert (system.method, system.substeps, system.activation, system.slope) == (stored.method, stored.substeps, "tanh", 1.0)
    assert system.eps == pytest.approx(stored.eps, rel=1e-12, abs=0) if stored.eps else system.eps is None
    assert np.abs(system.A - stored.A).max() <= 1e-12 and np.abs(system.W - stored.W).max() <= 1e-12
    T = model.coordinates() if arch == "contracting" else np.eye(5)
    assert np.abs(form.coordinates - T).max() <= 1e-12
    x = torch.randn(4, 3, dtype=F64)
    assert np.abs(form.inputs(x) - _numpy(model.U(x))).max() <= 1e-12
    assert form.stages == {"map": 1, "euler": 1, "rk2": 2, "rk4": 4, "rk38": 4}[scheme] * substeps


@pytest.mark.parametrize("arch", ["lipschitz-gated", "ren"])
def test_zoo_architectures_without_a_lure_form_are_not_derived(arch):
    model = build_model(ModelConfig(arch, 3, 5, 2), seed=1).double()
    assert model.lure_form() is None
    step = model._step_function()
    width = 10 if arch == "lipschitz-gated" else 8
    with pytest.raises(InputError, match="cannot derive a Lur'e form"):
        derive_lure_form(step, (5,), (width,))


@pytest.mark.parametrize("cell,match", [
    (nn.LSTMCell(3, 4), r"`torch.mul` at node mul\w* multiplies two state-dependent values: a multiplicative gate"),
    (nn.GRUCell(3, 4), r"multiplicative gate \(as in LSTM and GRU cells\)"),
])
def test_gated_cells_are_not_derivable(cell, match):
    with pytest.raises(InputError, match=match):
        derive_lure_form(cell)


W4 = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
# Examples fix the dtype of a plain callable's state and input (feature shapes alone mean float32).
H4 = torch.zeros(1, 4, dtype=F64)


def _branching(h, x):
    return torch.tanh(h @ W4.T) if h.sum() > 0 else h


@pytest.mark.parametrize("step,match", [
    (lambda h, x: torch.sin(h @ W4.T + x), r"^cannot derive a Lur'e form: `torch.sin` at node sin acts on the state and is "
                                           r"neither a linear map nor an elementwise sector nonlinearity"),
    (lambda h, x: torch.tanh(h @ W4.T) + x, r"the input reaches the state outside every nonlinearity \(through node"),
    (lambda h, x: torch.cat([torch.tanh(h[:, :2]), torch.relu(h[:, 2:] + x[:, 2:])], 1), "different nonlinearities"),
    (lambda h, x: torch.tanh(h @ W4.T) * x, "multiplies the state by an input-dependent value"),
    (lambda h, x: torch.tanh((W4 @ h.T).T + x), "row convention"),
    (lambda h, x: F.leaky_relu(h @ W4.T + x, -0.5), "negative slope -0.5"),
    (lambda h, x: torch.clamp(h @ W4.T + x, -1.0, 2.0), r"clips to \[-1.0, 2.0\]"),
    (lambda h, x: torch.tanh(h @ W4.T + torch.randn_like(x)), "draws random numbers"),
    (lambda h, x: torch.tanh(torch.tanh(h @ W4.T + x) @ W4.T + h), "not an explicit Runge-Kutta scheme"),
    (_branching, "branches on the values of tensors"),
    (lambda h, x: torch.tanh(h @ W4.T / torch.zeros(4, dtype=F64) + x), "not finite"),
])
def test_what_cannot_be_derived_is_an_input_error_naming_the_operation(step, match):
    with pytest.raises(InputError, match=match):
        derive_lure_form(step, (4,), (4,))


def test_bad_arguments_are_input_errors():
    cell = VanillaCell(3, 4).double()
    with pytest.raises(InputError, match="needs the state and the input"):
        derive_lure_form(cell)
    with pytest.raises(InputError, match="eps must be a finite number > 0"):
        derive_lure_form(cell, (4,), (3,), eps=-0.1)
    with pytest.raises(InputError, match="returns a tuple of 2, but the state is one tensor"):
        derive_lure_form(lambda h, x: (h, h), (4,), (3,))
    with pytest.raises(InputError, match="has no step"):
        derive_lure_form(nn.Linear(3, 4), (4,), (3,))
    with pytest.raises(InputError, match="the step fails when traced"):
        derive_lure_form(cell, (5,), (3,))
    with pytest.raises(InputError, match="form must be a LureSystem or a DerivedForm"):
        check_form(cell, "W")


def _simulated_error(step, form):
    generator = torch.Generator().manual_seed(2)
    h0 = torch.randn(3, 4, generator=generator, dtype=F64)
    xs = torch.randn(3, 12, 4, generator=generator, dtype=F64)
    h, expected = h0, []
    for t in range(12):
        h = step(h, xs[:, t])
        expected.append(_numpy(h))
    expected = np.stack(expected, axis=1)
    return np.abs(form.simulate(h0, xs) - expected).max() / (1 + np.abs(expected).max())


A4 = -torch.eye(4, dtype=F64) + 0.3 * W4


@pytest.mark.parametrize("name,step,kind", [
    ("sigmoid map", lambda h, x: torch.sigmoid(h @ W4.T + x), "tanh"),
    ("sigmoid euler", lambda h, x: h + 0.1 * (h @ A4.T + torch.sigmoid(h @ W4.T + x)), "tanh"),
    ("clip to 2", lambda h, x: F.hardtanh(h @ W4.T + x, -2.0, 2.0), "hardtanh"),
    ("leaky relu", lambda h, x: h + 0.1 * F.leaky_relu(h @ W4.T + x, 0.1), "leaky_relu(0.1)"),
    ("linear", lambda h, x: 0.5 * h @ W4.T + x, "identity"),
    ("two parallel tanh", lambda h, x: h + 0.1 * (torch.tanh(h @ W4.T + x) + torch.tanh(h @ W4 - x)), "tanh"),
    ("halves", lambda h, x: torch.cat([torch.tanh(h[:, :2] @ W4[:2, :2].T + x[:, :2]), torch.tanh(0.5 * h[:, 2:])], 1),
     "tanh"),
])
def test_other_nonlinearities_and_shapes_reproduce_the_states(name, step, kind):
    form = derive_lure_form(step, H4, H4)
    assert form.system.activation == kind
    assert _simulated_error(step, form) <= 1e-10
    assert check_form(step, form).passed


def test_sigmoid_enters_as_tanh_with_its_slope_one_quarter_carried_by_W():
    form = derive_lure_form(lambda h, x: torch.sigmoid(h @ W4.T + x), H4, H4)
    # 2 sigmoid(z) - 1 = tanh(z / 2): zeta = 2 (h - c) with c the shift, so W_zeta = W / 4.
    assert np.abs(form.coordinates - 0.5 * np.eye(4)).max() == 0
    assert np.abs(form.system.W - _numpy(W4) / 4).max() <= 1e-15
    assert any("sigmoid(z) = 1/2 + tanh(z/2)/2" in note for note in form.notes)


def test_parallel_nonlinearities_get_ghost_states_and_a_well_conditioned_change_of_coordinates():
    form = derive_lure_form(lambda h, x: h + 0.1 * (torch.tanh(h @ W4.T + x) + torch.tanh(h @ W4 - x)), H4, H4)
    assert form.ghost_states == 4 and form.system.n == 8 and np.linalg.cond(form.coordinates) < 10


def test_a_runge_kutta_step_written_by_a_user_is_recognised():
    W, U = W4 * 0.5, torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3))

    def midpoint(h, x):
        u = x @ U.T
        f = lambda v: -v + torch.tanh(v @ W.T + u)  # noqa: E731
        return h + 0.05 * f(h + 0.025 * f(h))

    form = derive_lure_form(midpoint, H4, torch.zeros(1, 3, dtype=F64))
    assert (form.system.method, form.system.eps, form.system.substeps, form.stages) == ("rk2", 0.05, 1, 2)
    assert np.abs(form.system.A + np.eye(4)).max() <= 1e-12 and np.abs(form.system.W - _numpy(W)).max() <= 1e-12
    assert check_form(midpoint, form).passed
    with pytest.raises(InputError, match="eps = 0.1 was given, but the step is rk2 with step 0.05"):
        derive_lure_form(midpoint, (4,), (3,), eps=0.1)


def test_a_step_updating_its_state_in_place_is_derived_and_leaves_the_examples_alone():
    def step(h, x):
        h.mul_(0.5)
        return torch.tanh(h @ W4.T + x)

    example = torch.ones(2, 4, dtype=F64)
    form = derive_lure_form(step, example, H4)
    assert torch.equal(example, torch.ones(2, 4, dtype=F64))
    assert np.abs(form.system.W - 0.5 * _numpy(W4)).max() <= 1e-15
    assert check_form(step, form).passed


def test_forms_that_cannot_be_checked_are_unchecked_never_passed():
    contracting = build_model(ModelConfig("contracting", 3, 5, 2), seed=0)
    # Its form lives in zeta = T^-1 h: compared in its own coordinates it passes, in h it is refused.
    assert check_form(contracting, contracting.lure_form(), coordinates=contracting.coordinates()).passed
    assert check_form(contracting, contracting.lure_form()).status == "refused"
    n, d = 3, 2
    cell = _cornn(n, d)
    correct, T, _, _, _ = _cornn_hand_forms(cell, n, d)
    no_inputs = check_form(cell, correct, state=((n,), (n,)), x=(d,), coordinates=T)
    assert no_inputs.status == "unchecked" and "pass inputs=" in no_inputs.reason
    no_shapes = check_form(lambda h, x: torch.tanh(h), LureSystem(np.zeros((2, 2)), np.eye(2), method="map"))
    assert no_shapes.status == "unchecked" and "pass state= and x=" in no_shapes.reason
    ode = LureSystem(np.zeros((4, 4)), np.eye(4))
    assert check_form(nn.RNNCell(3, 4), ode).status == "unchecked"
    lstm = SequenceClassifier(nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2))
    gated = check_form(lstm, LureSystem(np.zeros((4, 4)), np.eye(4), method="map"))
    assert gated.status == "unchecked" and "Lur'e inputs" in gated.reason
    json.dumps(gated.to_dict())


def test_results_serialise():
    form = derive_lure_form(_cornn(), ((3,), (3,)), (2,))
    record = json.loads(json.dumps(form.to_dict()))
    assert record["state_shapes"] == [[3], [3]] and record["system"]["method"] == "euler" and record["dtype"] == "float64"
    check = check_form(_cornn(), form)
    assert json.loads(json.dumps(check.to_dict()))["passed"] is True


def test_lure_system_runs_the_new_activations():
    z = np.linspace(-3, 3, 13)
    assert np.array_equal(activation("hardtanh").function(z), np.clip(z, -1, 1))
    assert np.array_equal(activation("leaky_relu(0.1)").function(z), np.where(z >= 0, z, 0.1 * z))
    assert activation("leaky_relu(2.0)").max_slope == 2.0
    system = LureSystem(np.zeros((2, 2)), np.eye(2), method="map", activation="leaky_relu(0.10)")
    assert system.activation == "leaky_relu(0.1)"
    assert np.allclose(system.step(np.array([1.0, -1.0]), np.zeros(2)), [1.0, -0.1])
    with pytest.raises(ValueError, match="slope 1.0 must be >= 2.0"):
        LureSystem(np.zeros((2, 2)), np.eye(2), method="map", activation="leaky_relu(2.0)")
    for bad in ("sin", "leaky_relu(-1)", "leaky_relu(x)"):
        with pytest.raises(ValueError, match="unknown activation"):
            activation(bad)
