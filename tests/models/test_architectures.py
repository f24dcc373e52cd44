"""Equations of every architecture against hand-written loops and Lur'e forms; the Lipschitz
parameterization (reference files: tests/reference/)."""
import numpy as np
import pytest
import torch

from helpers import lipschitz_matrix_np
from lrnn_analysis.lure import LureSystem
from lrnn_analysis.models import (
    ARCHITECTURES,
    DISCRETIZATIONS,
    ModelConfig,
    build_model,
    lipschitz_matrix,
)

from .cases import model_config

ALL_VARIANTS = [(arch, disc) for arch in ARCHITECTURES for disc in DISCRETIZATIONS[arch]]


def _numpy_params(model):
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def _hand_written(config, p, x):
    """The issue's equations, one sample and one step at a time, column vectors."""
    n, eps = config.hidden, config.eps
    eye = np.eye(n)

    def lip(M, beta, gamma):
        return (1 - beta) * (M + M.T) + beta * (M - M.T) - gamma * eye

    if config.arch == "contracting":
        Z1, dZ, B, C, ell = (0.1 * p[k] for k in ("Z1", "dZ", "B", "C", "ell"))
        Z3 = Z1 + dZ
        lam = 0.5 * (ell**2 + 1e-3)
        M11 = 0.5 * C.T @ np.diag(lam) @ C + Z1.T @ Z1 + 1e-3 * eye
        F = Z3.T @ Z1 - 0.5 * B @ C
        P = 0.5 * B @ np.diag(1 / lam) @ B.T + Z3.T @ Z3 + 1e-3 * eye
        E = 0.5 * (M11 / config.rho**2 + P)
    if config.arch == "lipschitz-ren":
        Z1, dZ, B, C, R = (0.1 * p[k] for k in ("Z1", "dZ", "B", "C", "R"))
        Z3, ell, U = Z1 + dZ, p["ell"], p["input_weight"]
        lam = 0.5 * (ell**2 + 1e-3)
        mu = max(np.linalg.norm(np.sqrt(lam)[:, None] * U, 2) ** 2, 1e-3)
        Ut = np.sqrt(lam)[:, None] * U / np.sqrt(mu)
        N = np.diag(np.sqrt(lam)) @ (2 * eye - Ut @ Ut.T) @ np.diag(np.sqrt(lam))
        LC = np.diag(lam) @ C
        M11 = LC.T @ np.linalg.solve(N, LC) + Z1.T @ Z1 + 1e-3 * eye
        F = Z3.T @ Z1 - B @ np.linalg.solve(N, LC)
        P = B @ np.linalg.solve(N, B.T) + Z3.T @ Z3 + 1e-3 * eye
        E = 0.5 * (M11 / config.rho**2 + P)
        Rb = R / max(1.0, np.linalg.norm(R, 2))
        D = config.lipschitz / np.sqrt(mu) * Rb @ np.linalg.solve(np.linalg.cholesky(P), E)
        p = {**p, "U.weight": U, "U.bias": p["input_bias"], "D.weight": D, "D.bias": p["output_bias"]}
    if config.arch == "ren":
        H = (0.1 * p["X"]).T @ (0.1 * p["X"]) + 1e-3 * np.eye(3 * n)
        Hb = [[H[i * n:(i + 1) * n, j * n:(j + 1) * n] for j in range(3)] for i in range(3)]
        E = 0.5 * (Hb[0][0] / config.rho**2 + Hb[2][2] + 0.1 * (p["Y"] - p["Y"].T))
        F, B = Hb[2][0], Hb[2][1]
        # n <= 16: one block, D11 = 0 and Lambda from the off-diagonal row sums
        lam = 0.5 * np.abs(Hb[1][1]).sum(axis=1)
        K = -Hb[1][0] / lam[:, None]
    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    outputs = []
    for sample in x:
        h, c = np.zeros(n), np.zeros(n)
        for x_t in sample:
            u = p["U.weight"] @ x_t + p["U.bias"] if "U.weight" in p else None
            if config.arch == "lstm":  # PyTorch's nn.LSTM equations, gates in the order i, f, g, o
                z = p["rnn.weight_ih_l0"] @ x_t + p["rnn.bias_ih_l0"] + p["rnn.weight_hh_l0"] @ h + p["rnn.bias_hh_l0"]
                i, f, g, o = sigmoid(z[:n]), sigmoid(z[n:2 * n]), np.tanh(z[2 * n:3 * n]), sigmoid(z[3 * n:])
                c = f * c + i * g
                h = o * np.tanh(c)
            elif config.arch in ("contracting", "lipschitz-ren"):
                h = np.linalg.solve(E, F @ h + B @ np.tanh(C @ h + u))
            elif config.arch == "ren":
                h = np.linalg.solve(E, F @ h + B @ np.tanh(K @ h + u) + p["B2.weight"] @ x_t)
            elif config.arch in ("lipschitz", "lipschitz-gated"):
                A = lip(p["M_A"], config.beta_a, config.gamma_a)
                W = lip(p["M_W"], config.beta_w, config.gamma_w)
                f = lambda v: A @ v + np.tanh(W @ v + u)  # noqa: E731, B023 - called within this step
                if config.arch == "lipschitz-gated":
                    gate = 1 / (1 + np.exp(-(W @ h + p["V.weight"] @ x_t + p["V.bias"])))
                    h = h + eps * f(h) * gate
                elif config.discretization == "euler":
                    h = h + eps * f(h)
                elif config.discretization == "rk2":
                    h = h + eps * f(h + eps / 2 * f(h))
                else:  # rk38, Kutta's 3/8 rule
                    k1 = f(h)
                    k2 = f(h + eps / 3 * k1)
                    k3 = f(h + eps * (k2 - k1 / 3))
                    k4 = f(h + eps * (k1 - k2 + k3))
                    h = h + eps / 8 * (k1 + 3 * k2 + 3 * k3 + k4)
            elif config.arch == "antisymmetric":
                M = p["M_W"]
                h = h + eps * np.tanh((M - M.T - config.gamma_w * eye) @ h + u)
            elif config.arch == "cayley":
                S = p["M_W"] - p["M_W"].T
                W = np.linalg.inv(eye + S) @ (eye - S)
                h = np.tanh(W @ h + u)
            elif config.arch == "residual":
                h = h + eps * np.tanh(p["M_W"] @ h + u)
            elif config.arch == "vanilla":
                h = np.tanh(p["M_W"] @ h + u)
            elif config.arch == "node":
                f = lambda v: np.tanh(p["M_W"] @ v + u)  # noqa: E731, B023 - called within this step
                dt = eps / config.ode_substeps
                for _ in range(config.ode_substeps):
                    if config.discretization == "euler":
                        h = h + dt * f(h)
                    elif config.discretization == "rk2":
                        h = h + dt * f(h + dt / 2 * f(h))
                    else:
                        k1 = f(h)
                        k2 = f(h + dt / 2 * k1)
                        k3 = f(h + dt / 2 * k2)
                        k4 = f(h + dt * k3)
                        h = h + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        outputs.append(p["D.weight"] @ h + p["D.bias"])
    return np.stack(outputs)


@pytest.mark.parametrize("arch,disc", ALL_VARIANTS)
def test_model_matches_hand_written_equations(arch, disc):
    config = model_config(arch, disc, ode_substeps=2 if arch == "node" else 1)
    model = build_model(config, seed=1).double()
    x = torch.randn(3, 6, config.input_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = _hand_written(config, _numpy_params(model), x.numpy())
    np.testing.assert_allclose(model(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch,disc", [v for v in ALL_VARIANTS if v[0] not in ("lipschitz-gated", "contracting", "ren", "lstm", "lipschitz-ren")])
def test_lure_form_reproduces_hidden_states(arch, disc):
    config = model_config(arch, disc, ode_substeps=3 if arch == "node" else 1)
    model = build_model(config, seed=2).double()
    system = model.lure_form()
    assert isinstance(system, LureSystem)
    assert system.A.dtype == np.float64 and system.W.dtype == np.float64
    x = torch.randn(4, 7, config.input_dim, dtype=torch.float64)
    u = (x @ model.U.weight.T + model.U.bias).detach().numpy()
    simulated = system.simulate(np.zeros((4, config.hidden)), u)
    np.testing.assert_allclose(model.hidden_states(x).detach().numpy(), simulated, rtol=1e-12, atol=1e-13)


def test_lure_form_method_and_matrices():
    model = build_model(model_config("lipschitz", "rk2"), seed=0)
    system = model.lure_form()
    assert (system.method, system.eps, system.slope) == ("rk2", 0.3, 1.0)
    M_A = model.M_A.detach().double().numpy()
    np.testing.assert_allclose(system.A, 0.4 * (M_A + M_A.T) + 0.6 * (M_A - M_A.T) - 0.2 * np.eye(5), atol=1e-12)
    assert build_model(model_config("vanilla", "map")).lure_form().method == "map"
    node = build_model(model_config("node", "rk4", ode_substeps=4)).lure_form()
    assert (node.method, node.substeps, node.eps) == ("rk4", 4, pytest.approx(0.075))
    assert build_model(model_config("lipschitz-gated", "euler")).lure_form() is None
    assert build_model(model_config("lstm", "map")).lure_form() is None


@pytest.mark.parametrize("arch,disc", ALL_VARIANTS)
def test_readout_all_is_the_decoder_at_every_step(arch, disc):
    last = build_model(model_config(arch, disc), seed=4).double()
    every = build_model(model_config(arch, disc, readout="all"), seed=4).double()
    every.load_state_dict(last.state_dict())
    x = torch.randn(3, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        outputs, states = every(x), every.hidden_states(x)
        assert outputs.shape == (3, 6, 4) and states.shape == (3, 6, 5)
        bias = every.output_bias if arch == "lipschitz-ren" else every.D.bias
        np.testing.assert_allclose(outputs.numpy(), (states @ every.readout_matrix().T + bias).numpy(), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(outputs[:, -1].numpy(), last(x).numpy(), rtol=1e-12, atol=1e-13)
        for t in (1, 4):  # a prefix's last-step readout is step t of the whole sequence's
            np.testing.assert_allclose(outputs[:, t - 1].numpy(), last(x[:, :t]).numpy(), rtol=1e-12, atol=1e-13)


def test_readout_is_checked():
    with pytest.raises(ValueError, match=r"readout must be one of \('last', 'all'\), got 'every'"):
        ModelConfig("lipschitz", 2, 4, 3, readout="every")
    assert ModelConfig.from_dict({"arch": "lstm", "input_dim": 2, "hidden": 4, "output_dim": 3}).readout == "last"



def test_symmetric_part_eigenvalues_and_beta_one_normality():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = rng.integers(2, 9)
        M = rng.normal(size=(n, n))
        beta, gamma = rng.uniform(0, 1), rng.uniform(-1, 1)
        A = lipschitz_matrix(torch.tensor(M), beta, gamma).numpy()
        sym = np.linalg.eigvalsh((A + A.T) / 2)
        np.testing.assert_allclose(sym, np.sort((1 - beta) * np.linalg.eigvalsh(M + M.T) - gamma), atol=1e-10)
        A1 = lipschitz_matrix(torch.tensor(M), 1.0, gamma).numpy()
        np.testing.assert_allclose(A1 @ A1.T, A1.T @ A1, atol=1e-10)
        np.testing.assert_allclose(np.linalg.eigvals(A1).real, -gamma, atol=1e-10)


def test_cayley_matrix_is_orthogonal():
    W = build_model(model_config("cayley", "map"), seed=3).lure_form().W
    np.testing.assert_allclose(W.T @ W, np.eye(5), atol=1e-12)


def test_initialisation_scale_is_init_std_over_n():
    n = 200
    model = build_model(ModelConfig("lipschitz", 1, n, 2, init_std=0.1), seed=0)
    assert model.M_A.std().item() == pytest.approx(0.1 / n, rel=0.02)


@pytest.mark.parametrize("arch,disc", ALL_VARIANTS)
def test_models_are_twice_differentiable(arch, disc):
    model = build_model(model_config(arch, disc), seed=0).double()
    x, y = torch.randn(2, 4, 3, dtype=torch.float64), torch.tensor([0, 1])
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hvp = torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, v, strict=True)), params)
    assert all(torch.isfinite(h).all() for h in hvp)
    assert any(h.abs().sum() > 0 for h in hvp)


def test_wrong_input_size_is_a_clear_error():
    model = build_model(ModelConfig("lipschitz", 2, 4, 3))
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, time, 2\)"):
        model(torch.randn(1, 5, 3))


def test_lipschitz_identity_on_thousands_of_random_cases():
    rng = np.random.default_rng(1)
    M = rng.standard_normal((4000, 6, 6))
    beta = rng.uniform(-1.0, 2.0, (4000, 1, 1))
    gamma = rng.uniform(-2.0, 2.0, (4000, 1, 1))
    Mt = np.swapaxes(M, 1, 2)
    direct = M + (1.0 - 2.0 * beta) * Mt - gamma * np.eye(6)
    model = lipschitz_matrix_np(M, beta, gamma)
    np.testing.assert_allclose(model, direct, atol=1e-12)
    np.testing.assert_allclose(lipschitz_matrix_np(M[0], 0.3, 0.7), M[0] + 0.4 * M[0].T - 0.7 * np.eye(6), atol=1e-14)


def _projection_cases():
    """(name, change to a model's input projection) whose effect the engine must see: pruning (its
    pre-hook recomputes U.weight from weight_orig on every call), a forward or backward hook, nn.Linear's
    forward overridden by a subclass or on the instance, the model's own _input_sequence replaced; and a
    parametrized U.weight, which the engine may read directly."""
    from torch.nn.utils import prune

    class Shifted(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + x.sum(-1, keepdim=True)

    def pruned(model):
        prune.l1_unstructured(model.U, "weight", amount=0.5)
        with torch.no_grad():
            model.U.weight_orig.mul_(3.0)  # an optimizer step: U.weight is stale until U is called

    def shifted(model):
        model.U = Shifted(model.U.in_features, model.U.out_features).to(torch.float64)

    def instance_forward(model):
        linear = model.U.forward
        model.U.forward = lambda x: 2.0 * linear(x)

    def instance_inputs(model):
        model._input_sequence = lambda x: 0.5 * model.U(x.transpose(0, 1))

    def backward_hook(model):
        model.U.register_full_backward_pre_hook(lambda _m, grad_output: tuple(3.0 * g for g in grad_output))

    def parametrized(model):  # U.weight is the parametrization's value on every read: the engine may take it
        torch.nn.utils.parametrize.register_parametrization(model.U, "weight", _Doubled())

    return [("pruned", pruned), ("forward hook", lambda m: m.U.register_forward_hook(lambda _m, _i, out: 2.0 * out)),
            ("backward hook", backward_hook), ("subclass", shifted), ("instance forward", instance_forward),
            ("instance inputs", instance_inputs), ("parametrized", parametrized)]


class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2.0 * weight


@pytest.mark.parametrize("name,change", _projection_cases(), ids=[name for name, _ in _projection_cases()])
def test_engine_uses_the_input_projection_the_model_calls(name, change):
    """The engine forms u_t = U x_t + b itself only where calling U would compute exactly that; otherwise the
    model's own inputs go in: outputs and gradients equal the recorded loop's."""
    config = ModelConfig("lipschitz", 2, 5, 3, eps=0.3)
    x = torch.randn(3, 7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = []
    for engine in ("recurrence", "autograd"):
        model = build_model(config, seed=1).double()
        torch.manual_seed(2)  # the subclass's fresh layer
        change(model)
        model.engine = engine
        out = model(x)
        results.append((out, torch.autograd.grad(out.square().sum(), [p for p in model.parameters()])))
    (out, grads), (expected, expected_grads) = results
    assert torch.allclose(out, expected, rtol=1e-12, atol=0.0), name
    for ours, theirs in zip(grads, expected_grads):
        assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-14), name
