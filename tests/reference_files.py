"""Files of the reference implementation (erichson/LipschitzRNN) made for the tests: our own
re-implementation of its seven forward passes (row vectors, per-step E(x_t)), random state dicts,
its file names, and the source of a module ``models`` with its classes, which the
``reference_code`` fixture (conftest.py) makes importable while pickles are written."""
import sys

import torch

from lrnn_analysis.reference import MODEL_KEYS, REFERENCE_MODELS

N, D, K, T = 6, 2, 4, 12
HP = {"beta": 0.7, "gamma": 0.05, "eps": 0.3, "alpha": 0.6}


def reference_name(model, task="mnist", steps=392, units=N, solver="euler", eps=HP["eps"], gamma=HP["gamma"], gamma_key="gamma"):
    """The file name the reference's driver gives ``model`` trained with these settings."""
    return (f"{model}_{task}_T_{steps}_units_{units}_beta_{HP['beta']}_alpha_{HP['alpha']}_{gamma_key}_{gamma}_eps_{eps}_"
            f"solver_{solver}_gclip_0_optimizer_Adam_seed_1")


def reference_lipschitz(M, beta, gamma):
    """beta (M - M^T) + (1 - beta)(M + M^T) - gamma I, written as the reference writes it."""
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    return beta * (M - M.transpose(1, 0)) + (1 - beta) * (M + M.transpose(1, 0)) - gamma * eye


def reference_forward(model, state, x, beta=HP["beta"], gamma=HP["gamma"], eps=HP["eps"], alpha=HP["alpha"], solver="euler"):
    """The reference's ``model`` with state dict ``state`` on x (batch, time, D), one step at a time."""
    eye = torch.eye(N, dtype=x.dtype)
    h = torch.zeros(x.shape[0], N, dtype=x.dtype)
    for i in range(x.shape[1]):
        z = x[:, i, :] @ state["E.weight"].T + state["E.bias"]
        if model == "simpleRNN":
            h = torch.tanh(h @ state["W.weight"].T + z)
        elif model == "resRNN":
            h = h + eps * torch.tanh(h @ state["W.weight"].T + z)
        elif model == "asymRNN":
            W = state["C"] - state["C"].transpose(1, 0) - gamma * eye
            h = h + eps * torch.tanh(torch.matmul(h, W) + z)
        elif model == "calRNN":
            S = state["C"] - state["C"].transpose(1, 0)
            W = torch.matmul(torch.inverse(eye + S), eye - S)
            h = torch.tanh(torch.matmul(h, W) + z)
        elif model == "LipschitzRNN":
            A, W = reference_lipschitz(state["B"], beta, gamma), reference_lipschitz(state["C"], beta, gamma)
            h = h + eps * alpha * torch.matmul(h, A) + eps * torch.tanh(torch.matmul(h, W) + z)
        elif model == "LipschitzRNN_gated":
            A, W = reference_lipschitz(state["B"], beta, gamma), reference_lipschitz(state["C"], beta, gamma)
            z_gate = x[:, i, :] @ state["E_gate.weight"].T + state["E_gate.bias"]
            Wh, Ah = torch.matmul(h, W), torch.matmul(h, A)
            h = h + eps * (alpha * Ah + torch.tanh(Wh + z)) * torch.sigmoid(Wh + z_gate)
        elif model == "LipschitzRNN_ODE":
            A, W = reference_lipschitz(state["func.B"], beta, gamma), reference_lipschitz(state["func.C"], beta, gamma)

            def f(v):
                return torch.matmul(v, A) + torch.tanh(torch.matmul(v, W) + z)  # noqa: B023 - called within this step

            # torchdiffeq fixed grid [0, eps], one step: euler, the explicit midpoint rule, or its
            # "rk4", Kutta's 3/8 rule (k2 at t + eps/3, k3 at t + 2 eps/3: f does not read t).
            if solver == "euler":
                h = h + eps * f(h)
            elif solver == "midpoint":
                h = h + eps * f(h + 0.5 * eps * f(h))
            else:
                assert solver == "rk4"
                k1 = f(h)
                k2 = f(h + eps * k1 / 3)
                k3 = f(h + eps * (k2 - k1 / 3))
                k4 = f(h + eps * (k1 - k2 + k3))
                h = h + eps * (k1 + 3 * k2 + 3 * k3 + k4) / 8
    return h @ state["D.weight"].T + state["D.bias"]


def random_state(model, dtype=torch.float64, seed=0):
    """A state dict of the reference's ``model`` with N(0, 0.4^2) entries, seeded."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"E.weight": (N, D), "E.bias": (N,), "D.weight": (K, N), "D.bias": (K,), "E_gate.weight": (N, D),
              "E_gate.bias": (N,), "B": (N, N), "C": (N, N), "func.B": (N, N), "func.C": (N, N), "W.weight": (N, N)}
    return {key: (0.4 * torch.randn(*shapes[key], generator=gen, dtype=torch.float64)).to(dtype)
            for key in sorted(MODEL_KEYS[model])}


CASES = [(m, "euler") for m in REFERENCE_MODELS] + [("LipschitzRNN_ODE", "midpoint"), ("LipschitzRNN_ODE", "rk4")]


def save_state(tmp_path, model, name, dtype=torch.float32, prefix=""):
    """random_state(model) saved by torch.save as ``name``.pkl, every key prefixed by ``prefix``."""
    path = tmp_path / f"{name}.pkl"
    torch.save({prefix + k: v.to(dtype) for k, v in random_state(model).items()}, path)
    return path


FIXTURE_MODULE = '''
import torch
from torch import nn

CALLS = []


def _gaussian(n):
    return torch.randn(n, n) * 0.4


class LipschitzRNN_ODE(nn.Module):
    def __init__(self, n_units, beta, gamma, init_std=1.0):
        CALLS.append(("__init__", type(self).__name__))
        super().__init__()
        self.device = torch.device("cpu")
        self.gamma, self.beta = gamma, beta
        self.tanh = nn.Tanh()
        self.z = torch.zeros(n_units)
        self.C = nn.Parameter(_gaussian(n_units))
        self.B = nn.Parameter(_gaussian(n_units))
        self.I = torch.eye(n_units)
        self.i = 0

    def __setstate__(self, state):
        CALLS.append(("__setstate__", type(self).__name__))
        super().__setstate__(state)


class RnnModels(nn.Module):
    def __init__(self, input_dim, output_classes, n_units=128, eps=0.01, beta=0.8, gamma=0.01, gated=False,
                 init_std=1, alpha=1, model="LipschitzRNN", solver="euler"):
        CALLS.append(("__init__", type(self).__name__))
        super().__init__()
        self.n_units, self.eps, self.model, self.solver = n_units, eps, model, solver
        self.gamma, self.beta, self.alpha = gamma, beta, alpha
        self.tanh, self.sigmoid = nn.Tanh(), nn.Sigmoid()
        self.E = nn.Linear(input_dim, n_units)
        self.D = nn.Linear(n_units, output_classes)
        self.I = torch.eye(n_units)
        if model in ("simpleRNN", "resRNN"):
            self.W = nn.Linear(n_units, n_units, bias=False)
        elif model in ("asymRNN", "calRNN"):
            self.C = nn.Parameter(_gaussian(n_units))
        elif model in ("LipschitzRNN", "LipschitzRNN_gated"):
            self.C = nn.Parameter(_gaussian(n_units))
            self.B = nn.Parameter(_gaussian(n_units))
            if model == "LipschitzRNN_gated":
                self.E_gate = nn.Linear(input_dim, n_units)
        elif model == "LipschitzRNN_ODE":
            self.func = LipschitzRNN_ODE(n_units, beta, gamma, init_std)

    def __setstate__(self, state):
        CALLS.append(("__setstate__", type(self).__name__))
        super().__setstate__(state)


class rnn_models(RnnModels):
    pass


class relaxRNN(RnnModels):
    pass


def make_payload(path):
    class Payload:
        def __reduce__(self):
            return (RnnModels, (path,))
    return Payload()
'''


def forget_reference_code(module, code_dir):
    """Make the fixture classes unimportable, so that loading cannot reach them."""
    sys.modules.pop("models", None)
    while str(code_dir) in sys.path:
        sys.path.remove(str(code_dir))
    module.CALLS.clear()
