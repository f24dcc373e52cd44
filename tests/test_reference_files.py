"""Files of the reference implementation (erichson/LipschitzRNN): the seven models against our own
re-implementation of its forward passes, whole-module pickles read without running their code,
file names, overrides, data conventions and training histories."""
import copyreg
import os
import pickle
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from lrnn_analysis.tidy_tables import training_log_table
from lrnn_analysis.checkpoints import CheckpointError, load_checkpoint
from lrnn_analysis.errors import InputError
from lrnn_analysis.cli import main
from lrnn_analysis.builtin_tasks import load_task, reference_permutation
from lrnn_analysis.reference.models import MODEL_HPARAMS
from lrnn_analysis.reference import (
    MODEL_KEYS,
    REFERENCE_MODELS,
    ReferenceFileWarning,
    convert_reference_model,
    load_plain_pickle,
    parse_reference_filename,
    read_reference_log,
)

N, D, K, T = 6, 2, 4, 12
HP = {"beta": 0.7, "gamma": 0.05, "eps": 0.3, "alpha": 0.6}


def _name(model, task="mnist", steps=392, units=N, solver="euler", eps=HP["eps"], gamma=HP["gamma"], gamma_key="gamma"):
    return (f"{model}_{task}_T_{steps}_units_{units}_beta_{HP['beta']}_alpha_{HP['alpha']}_{gamma_key}_{gamma}_eps_{eps}_"
            f"solver_{solver}_gclip_0_optimizer_Adam_seed_1")


# ---- our own re-implementation of the reference's forward passes (row vectors, per-step E(x_t)) ----

def _lipschitz(M, beta, gamma):
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    return beta * (M - M.transpose(1, 0)) + (1 - beta) * (M + M.transpose(1, 0)) - gamma * eye


def reference_forward(model, state, x, beta=HP["beta"], gamma=HP["gamma"], eps=HP["eps"], alpha=HP["alpha"], solver="euler"):
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
            A, W = _lipschitz(state["B"], beta, gamma), _lipschitz(state["C"], beta, gamma)
            h = h + eps * alpha * torch.matmul(h, A) + eps * torch.tanh(torch.matmul(h, W) + z)
        elif model == "LipschitzRNN_gated":
            A, W = _lipschitz(state["B"], beta, gamma), _lipschitz(state["C"], beta, gamma)
            z_gate = x[:, i, :] @ state["E_gate.weight"].T + state["E_gate.bias"]
            Wh, Ah = torch.matmul(h, W), torch.matmul(h, A)
            h = h + eps * (alpha * Ah + torch.tanh(Wh + z)) * torch.sigmoid(Wh + z_gate)
        elif model == "LipschitzRNN_ODE":
            A, W = _lipschitz(state["func.B"], beta, gamma), _lipschitz(state["func.C"], beta, gamma)

            def f(v):
                return torch.matmul(v, A) + torch.tanh(torch.matmul(v, W) + z)

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
    gen = torch.Generator().manual_seed(seed)
    shapes = {"E.weight": (N, D), "E.bias": (N,), "D.weight": (K, N), "D.bias": (K,), "E_gate.weight": (N, D),
              "E_gate.bias": (N,), "B": (N, N), "C": (N, N), "func.B": (N, N), "func.C": (N, N), "W.weight": (N, N)}
    return {key: (0.4 * torch.randn(*shapes[key], generator=gen, dtype=torch.float64)).to(dtype)
            for key in sorted(MODEL_KEYS[model])}


CASES = [(m, "euler") for m in REFERENCE_MODELS] + [("LipschitzRNN_ODE", "midpoint"), ("LipschitzRNN_ODE", "rk4")]


@pytest.mark.parametrize("model,solver", CASES)
def test_every_model_matches_the_reference_equations(model, solver):
    x = torch.randn(5, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state = random_state(model)
    expected = reference_forward(model, state, x, solver=solver)
    converted = convert_reference_model(model, state, {**HP, "solver": solver}, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, rtol=1e-10, atol=1e-10)
        single = convert_reference_model(model, {k: v.float() for k, v in state.items()}, {**HP, "solver": solver})
        ours = single(x.float()).double()
    expected32 = reference_forward(model, {k: v.float().double() for k, v in state.items()}, x.float().double(), solver=solver)
    assert float((ours - expected32).abs().max() / expected32.abs().max()) < 1e-5


def test_certificates_see_the_real_A_with_alpha_folded_in():
    state = random_state("LipschitzRNN")
    model = convert_reference_model("LipschitzRNN", state, HP, dtype=torch.float64)
    A_ref = _lipschitz(state["B"], HP["beta"], HP["gamma"])
    np.testing.assert_allclose(model.lure_form().A, (HP["alpha"] * A_ref).T.numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(model.lure_form().W, _lipschitz(state["C"], HP["beta"], HP["gamma"]).T.numpy(), atol=1e-14)
    ode = convert_reference_model("LipschitzRNN_ODE", random_state("LipschitzRNN_ODE"), {**HP, "solver": "midpoint"})
    assert (ode.config.arch, ode.config.discretization, ode.config.gamma_a) == ("lipschitz", "rk2", HP["gamma"])
    rk4 = convert_reference_model("LipschitzRNN_ODE", random_state("LipschitzRNN_ODE"), {**HP, "solver": "rk4"})
    assert (rk4.config.discretization, rk4.lure_form().method) == ("rk38", "rk38")


def _save_state(tmp_path, model, name, dtype=torch.float32, prefix=""):
    path = tmp_path / f"{name}.pkl"
    torch.save({prefix + k: v.to(dtype) for k, v in random_state(model).items()}, path)
    return path


def test_state_dicts_of_every_model_load_from_their_file_names(tmp_path):
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(2))
    for model_name, solver in CASES:
        path = _save_state(tmp_path, model_name, _name(model_name, solver=solver), prefix="module.")
        model, metadata = load_checkpoint(path)
        state = {k: v.double() for k, v in random_state(model_name).items()}
        expected = reference_forward(model_name, {k: v.float().double() for k, v in state.items()}, x.double(), solver=solver)
        with torch.no_grad():
            assert float((model(x).double() - expected).abs().max() / expected.abs().max()) < 1e-5
        assert metadata["reference"]["model"] == model_name
        assert metadata["reference"]["file_name"]["model"] == model_name
        assert metadata["task"] == {"name": "smnist", "seed": 0, "options": {"pixels_per_step": 2, "scale": "unit"}}


def test_gated_files_never_load_as_plain_lipschitz(tmp_path):
    renamed = _save_state(tmp_path, "LipschitzRNN_gated", _name("LipschitzRNN"))
    with pytest.raises(CheckpointError, match=r"named/recorded as a LipschitzRNN model.*E_gate\.weight"):
        load_checkpoint(renamed)
    unnamed = _save_state(tmp_path, "LipschitzRNN_gated", "gated")
    with pytest.warns(ReferenceFileWarning, match="alpha is recorded nowhere"):
        model, metadata = load_checkpoint(unnamed, **{k: HP[k] for k in ("beta", "gamma", "eps")})
    assert model.config.arch == "lipschitz-gated" and model.lure_form() is None
    assert metadata["reference"]["hparams"]["alpha"] == {"value": 1.0, "source": "default (not recorded)"}


def test_key_sets_that_identify_no_single_model_are_errors(tmp_path):
    extra = random_state("LipschitzRNN")
    extra["X"] = torch.zeros(2)
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"keys \['B', 'C', 'D.bias', 'D.weight', 'E.bias', 'E.weight', 'X'\]"):
        load_checkpoint(tmp_path / "extra.pt", beta=0.5, gamma=0.1, eps=0.1)
    torch.save(random_state("asymRNN"), tmp_path / "ambiguous.pt")
    with pytest.raises(CheckpointError, match="fit asymRNN and calRNN alike"):
        load_checkpoint(tmp_path / "ambiguous.pt", gamma=0.1, eps=0.1)
    assert load_checkpoint(tmp_path / "ambiguous.pt", model="calRNN").model.config.arch == "cayley"
    mixed = {("module." + k if k.startswith("E") else k): v for k, v in random_state("LipschitzRNN").items()}
    torch.save(mixed, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="DataParallel prefix"):
        load_checkpoint(tmp_path / "mixed.pt", beta=0.5, gamma=0.1, eps=0.1)


def test_ode_solvers_the_toolkit_cannot_run_exactly_are_refused(tmp_path):
    for solver, why in (("dopri5", "adaptive"), ("bosh3", "adaptive"), ("nonsense", "not a torchdiffeq fixed-grid")):
        path = _save_state(tmp_path, "LipschitzRNN_ODE", _name("LipschitzRNN_ODE", solver=solver))
        with pytest.raises(CheckpointError, match=why):
            load_checkpoint(path)
    path = _save_state(tmp_path, "LipschitzRNN_ODE", _name("LipschitzRNN_ODE", solver="rk4"))
    model, metadata = load_checkpoint(path, solver="midpoint", alpha=2.0, eps=0.1, task="pmnist")
    assert model.config.discretization == "rk2" and model.config.eps == 0.1
    assert metadata["reference"]["hparams"]["solver"] == {"value": "midpoint", "source": "override"}
    assert metadata["reference"]["hparams"]["beta"]["source"] == "file name"
    assert "alpha" not in metadata["reference"]["hparams"]  # the ODE model has no alpha
    assert metadata["task"]["options"] == {"pixels_per_step": 2, "scale": "raw", "permutation": "reference"}


def test_parse_every_model_name():
    for model in REFERENCE_MODELS:
        parsed = parse_reference_filename(f"runs/{_name(model, task='pmnist', solver='midpoint')}.pkl")
        assert parsed == {"model": model, "task": "pmnist", "T": 392, "units": N, "beta": 0.7, "alpha": 0.6,
                          "gamma": 0.05, "eps": 0.3, "solver": "midpoint", "gclip": 0.0, "optimizer": "Adam", "seed": 1}
    loss = parse_reference_filename(_name("LipschitzRNN", gamma_key="gamma_A") + "_loss.pkl")
    assert loss["gamma"] == 0.05 and loss["model"] == "LipschitzRNN"
    old = parse_reference_filename("LipschitzRNN_pmnist_T784_units64_beta0.7_gamma0.01_eps0.05_init6_init6_seed2.pkl")
    assert (old["task"], old["T"], old["units"], old["beta"], old["gamma"], old["eps"], old["seed"]) == ("pmnist", 784, 64, 0.7, 0.01, 0.05, 2)
    assert parse_reference_filename("weights.pt") == {}
    for bad in ("LipschitzRNN_mnist_T_1.5_units_8.pkl", "LipschitzRNN_mnist_units_128.9.pkl", "LipschitzRNN_mnist_eps_nan.pkl"):
        with pytest.raises(ValueError, match="which is not a"):
            parse_reference_filename(bad)
    adams = parse_reference_filename(_name("LipschitzRNN_ODE", solver="fixed_adams"))
    assert adams["solver"] == "fixed_adams" and adams["gclip"] == 0
    with pytest.raises(ValueError, match="gives eps twice"):
        parse_reference_filename("LipschitzRNN_mnist_eps_0.1_eps_0.2.pkl")


def test_pixels_per_step_must_match_T(tmp_path):
    path = _save_state(tmp_path, "LipschitzRNN", _name("LipschitzRNN", steps=784))
    with pytest.raises(CheckpointError, match="T = 784 steps, i.e. 1 pixels per step, but E.weight takes 2 inputs"):
        load_checkpoint(path)


# ---- whole-module pickles ----------------------------------------------------------------------

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


@pytest.fixture
def reference_code(tmp_path, monkeypatch):
    """A module named ``models`` with the reference's classes, importable while fixtures are built."""
    code = tmp_path / "reference_code"
    code.mkdir()
    (code / "models.py").write_text(textwrap.dedent(FIXTURE_MODULE))
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    import models

    yield models
    sys.modules.pop("models", None)


def _forget(module, code_dir):
    """Make the fixture classes unimportable, so that loading cannot reach them."""
    sys.modules.pop("models", None)
    while str(code_dir) in sys.path:
        sys.path.remove(str(code_dir))
    module.CALLS.clear()


@pytest.mark.parametrize("class_name,legacy", [("RnnModels", False), ("RnnModels", True), ("rnn_models", False),
                                               ("relaxRNN", True)])
def test_whole_module_pickles_load_without_running_their_code(tmp_path, reference_code, class_name, legacy):
    cls = getattr(reference_code, class_name)
    torch.manual_seed(0)
    x = torch.randn(3, T, D)
    saved = {}
    for model_name, solver in CASES:
        module = cls(D, K, n_units=N, eps=HP["eps"], beta=HP["beta"], gamma=HP["gamma"], alpha=HP["alpha"],
                     model=model_name, solver=solver)
        path = tmp_path / f"{_name(model_name, solver=solver)}.pkl"
        torch.save(module, path, _use_new_zipfile_serialization=not legacy)
        state = {k: v.detach().double() for k, v in module.state_dict().items()}
        saved[path] = (model_name, solver, reference_forward(model_name, state, x.double(), solver=solver))
    _forget(reference_code, tmp_path / "reference_code")
    for path, (model_name, solver, expected) in saved.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model, metadata = load_checkpoint(path)
        with torch.no_grad():
            assert float((model(x).double() - expected).abs().max() / expected.abs().max()) < 1e-5
        info = metadata["reference"]
        assert info["model"] == model_name and info["class"] == f"models.{class_name}"
        assert info["file"] == f"whole-module pickle (models.{class_name})"
        assert all(v["source"] == "pickle attribute" for v in info["hparams"].values())
        assert sorted(info["hparams"]) == sorted(MODEL_HPARAMS[model_name])
    assert reference_code.CALLS == []


def test_pickled_attributes_win_over_the_file_name(tmp_path, reference_code):
    module = reference_code.RnnModels(D, K, n_units=N, eps=0.25, beta=HP["beta"], gamma=HP["gamma"], alpha=HP["alpha"])
    path = tmp_path / f"{_name('LipschitzRNN', eps=0.3)}.pkl"
    torch.save(module, path)
    _forget(reference_code, tmp_path / "reference_code")
    with pytest.warns(ReferenceFileWarning, match=r"the pickle records eps = 0.25 but the file name says 0.3"):
        model, metadata = load_checkpoint(path)
    assert model.config.eps == 0.25 and metadata["reference"]["hparams"]["eps"]["source"] == "pickle attribute"
    assert any("eps = 0.25" in note for note in metadata["reference"]["notes"])


def test_hostile_pickles_are_refused_without_running_code(tmp_path, reference_code):
    canary = tmp_path / "canary"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    class NamesAHelper:
        def __reduce__(self):
            return (reference_code._gaussian, (3,))

    class CallsAStandIn:
        def __reduce__(self):
            return (reference_code.RnnModels, ())

    module = reference_code.RnnModels(D, K, n_units=N)
    payloads = {"system": Exploit(), "reduce_payload": reference_code.make_payload(str(canary)), "helper": NamesAHelper(),
                "empty_call": CallsAStandIn(), "module_and_system": [module, Exploit()]}
    paths = {}
    for name, payload in payloads.items():
        for legacy in (False, True):
            path = tmp_path / f"LipschitzRNN_mnist_{name}_{legacy}.pkl"
            torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
            paths[path] = name
    cls = reference_code.RnnModels
    cls.__reduce_ex__ = lambda self, protocol: (copyreg.__newobj__, (type(self), str(canary)))
    for legacy in (False, True):  # NEWOBJ of a stand-in with arguments
        path = tmp_path / f"LipschitzRNN_mnist_newobj_{legacy}.pkl"
        torch.save(cls.__new__(cls), path, _use_new_zipfile_serialization=not legacy)
        paths[path] = "newobj_args"
    del cls.__reduce_ex__
    _forget(reference_code, tmp_path / "reference_code")
    expected = {"system": r"it would import (posix|os)\.system", "module_and_system": r"it would import (posix|os)\.system",
                "reduce_payload": r"stand-in for models\.RnnModels called or created with arguments \(a __reduce__ payload\)",
                "empty_call": r"stand-in for models\.RnnModels called like a function \(a __reduce__ payload\)",
                "helper": r"models\._gaussian", "newobj_args": r"stand-in for models\.RnnModels called or created with arguments"}
    for path, name in paths.items():
        with pytest.raises(CheckpointError, match=rf"refused to unpickle \(.*{expected[name]}") as caught:
            load_checkpoint(path)
        assert "weights_only=False" not in str(caught.value)
    assert not canary.exists() and reference_code.CALLS == []


def test_cli_info_shows_the_model_and_where_each_hyperparameter_came_from(tmp_path, reference_code, capsys):
    module = reference_code.RnnModels(D, K, n_units=N, eps=HP["eps"], beta=HP["beta"], gamma=HP["gamma"],
                                      alpha=HP["alpha"], model="LipschitzRNN_gated")
    path = tmp_path / f"{_name('LipschitzRNN_gated')}.pkl"
    torch.save(module, path)
    _forget(reference_code, tmp_path / "reference_code")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "reference model: LipschitzRNN_gated (whole-module pickle (models.RnnModels))" in out
    assert "alpha = 0.6  (from pickle attribute)" in out and "lipschitz-gated" in out
    assert "t10k" in out


# ---- data conventions and training histories ---------------------------------------------------

def test_reference_pmnist_permutation_and_raw_pixels(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12008)
        expected = torch.randperm(784)
    assert np.array_equal(reference_permutation(), expected.numpy())
    images = np.random.default_rng(0).integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = np.arange(30) % 10
    np.savez(tmp_path / "mnist.npz", images=images, labels=labels)
    task = load_task("psmnist", path=str(tmp_path / "mnist.npz"), pixels_per_step=4, scale="raw", permutation="reference")
    flat = images.reshape(30, 784)[:, expected.numpy()].astype(np.float32).reshape(30, 196, 4)
    for split in (task.train, task.val, task.test):
        rows = [int(np.flatnonzero((flat == x.numpy()).all(axis=(1, 2)))[0]) for x in split.x]
        assert [int(labels[r]) for r in rows] == split.y.tolist()
    assert task.options == {"pixels_per_step": 4, "path": str(tmp_path / "mnist.npz"), "scale": "raw", "permutation": "reference"}
    unit = load_task("smnist", path=str(tmp_path / "mnist.npz"), pixels_per_step=4)
    assert float(unit.train.x.max()) <= 1.0 and float(task.train.x.max()) > 1.0
    with pytest.raises(ValueError, match=r"does not take options \[.permutation.\]"):
        load_task("smnist", path=str(tmp_path / "mnist.npz"), permutation="reference")


def _history(epochs=3):
    return {"loss": [float(100 - e) for e in range(epochs)], "eigA": [np.float64(-0.1 * (e + 1)) for e in range(epochs)],
            "eigW": [np.float64(0.01 * e) for e in range(epochs)], "testacc": [0.5 + 0.1 * e for e in range(epochs)]}


def test_training_history_beside_the_model_becomes_the_log(tmp_path):
    path = _save_state(tmp_path, "LipschitzRNN", _name("LipschitzRNN"))
    history = tmp_path / f"{_name('LipschitzRNN', gamma_key='gamma_A')}_loss.pkl"
    history.write_bytes(pickle.dumps(_history(), protocol=2))
    _, metadata = load_checkpoint(path)
    log = metadata["log"]
    assert [e["epoch"] for e in log] == [1, 2, 3] and metadata["reference"]["log_file"] == str(history)
    assert log[1] == {"epoch": 2, "test_accuracy": 0.6, "train_loss_sum": 99.0, "alpha_A": pytest.approx(HP["alpha"] * -0.2),
                      "alpha_W": 0.01}
    rows = training_log_table({"ref": log})
    assert rows[2]["alpha_A"] == pytest.approx(HP["alpha"] * -0.3)
    older = {**_history(2), "loss": 42.0}
    (tmp_path / "old_loss.pkl").write_bytes(pickle.dumps(older))
    assert read_reference_log(tmp_path / "old_loss.pkl")[-1]["train_loss_sum"] == 42.0


def test_history_pickles_hold_plain_data_only(tmp_path):
    canary = tmp_path / "canary"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    for payload in ({"eigA": [Exploit()]}, {"eigA": [np.array([1.0, 2.0])]}, {"eigA": [np.dtype("O")]}):
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            load_plain_pickle(pickle.dumps(payload, protocol=2))
    assert load_plain_pickle(pickle.dumps({"a": [np.float32(1.5), np.int64(3), 2.0]})) == {"a": [1.5, 3, 2.0]}
    numpy1 = pickle.dumps([np.float64(-0.25)], protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in numpy1 and load_plain_pickle(numpy1) == [-0.25]  # numpy 1.x, as in 2020
    path = _save_state(tmp_path, "LipschitzRNN", _name("LipschitzRNN"))
    (tmp_path / f"{_name('LipschitzRNN')}_loss.pkl").write_bytes(pickle.dumps({"eigA": [Exploit()], "eigW": [], "testacc": []}))
    with pytest.warns(ReferenceFileWarning, match=r"not a readable reference training history \(refused: GLOBAL (posix|os)\.system"):
        model, metadata = load_checkpoint(path)
    assert "log" not in metadata and not canary.exists()


@pytest.mark.parametrize("history", [
    b"\x80\x02K\x01K\x02a.",  # APPEND to an int
    pickle.dumps(_history(3), protocol=2)[:-9],  # truncated
    pickle.dumps({**_history(2), "testacc": [10**400, 0.5]}),  # a number beyond float64
], ids=["append-to-int", "truncated", "huge-int"])
def test_a_corrupt_history_is_skipped_with_a_warning_and_the_model_loads(tmp_path, history):
    path = _save_state(tmp_path, "LipschitzRNN", _name("LipschitzRNN"))
    (tmp_path / f"{_name('LipschitzRNN')}_loss.pkl").write_bytes(history)
    with pytest.warns(ReferenceFileWarning, match="training history beside it was not read") as caught:
        model, metadata = load_checkpoint(path)
    assert "log" not in metadata and metadata["reference"]["model"] == "LipschitzRNN"
    assert any("not read" in note for note in metadata["reference"]["notes"])
    assert all("\n" not in str(w.message) for w in caught)


@pytest.mark.parametrize("field,token", [("T", "T_0"), ("units", "units_0"), ("T", "T-3")])
def test_a_count_below_one_in_a_reference_file_name_is_one_line(tmp_path, field, token):
    name = _name("LipschitzRNN").replace("T_392", token) if field == "T" else _name("LipschitzRNN").replace(f"units_{N}", token)
    with pytest.raises(InputError, match=f"the name gives {field} = -?[03]; it must be at least 1"):
        parse_reference_filename(f"{name}.pkl")
    path = _save_state(tmp_path, "LipschitzRNN", name)
    with pytest.raises(CheckpointError, match=f"{field} = -?[03]"):
        load_checkpoint(path)


class _OldTorchBackend:
    """Pickles like nn.Module's ``_backend`` attribute of PyTorch <= 1.3."""

    def __reduce__(self):
        import torch.nn.backends.thnn

        return (torch.nn.backends.thnn._get_thnn_function_backend, ())


@pytest.mark.parametrize("legacy", [False, True])
def test_pickles_saved_from_a_gpu_by_old_torch_load_on_the_cpu(tmp_path, reference_code, monkeypatch, legacy):
    module = reference_code.RnnModels(D, K, n_units=N, eps=HP["eps"], beta=HP["beta"], gamma=HP["gamma"],
                                      alpha=HP["alpha"], model="LipschitzRNN_ODE", solver="midpoint")
    path = tmp_path / f"{_name('LipschitzRNN_ODE', solver='midpoint')}.pkl"
    for submodule in (module, module.E, module.func):
        submodule._backend = _OldTorchBackend()
    with monkeypatch.context() as patch:  # the reference trains on CUDA: its storages say cuda:0
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(module, path, _use_new_zipfile_serialization=not legacy)
    raw = path.read_bytes()
    assert b"cuda:0" in raw and b"_get_thnn_function_backend" in raw
    state = {k: v.detach().double() for k, v in module.state_dict().items()}
    x = torch.randn(2, T, D)
    expected = reference_forward("LipschitzRNN_ODE", state, x.double(), solver="midpoint")
    _forget(reference_code, tmp_path / "reference_code")
    model, _ = load_checkpoint(path)
    with torch.no_grad():
        assert float((model(x).double() - expected).abs().max() / expected.abs().max()) < 1e-5
    assert reference_code.CALLS == []


def test_pickled_data_parallel_wrapper_is_unwrapped(tmp_path, reference_code):
    module = reference_code.RnnModels(D, K, n_units=N, eps=HP["eps"], beta=HP["beta"], gamma=HP["gamma"],
                                      alpha=HP["alpha"], model="asymRNN")
    path = tmp_path / f"{_name('asymRNN')}.pkl"
    torch.save(torch.nn.DataParallel(module), path)
    state = {k: v.detach().double() for k, v in module.state_dict().items()}
    x = torch.randn(2, T, D)
    expected = reference_forward("asymRNN", state, x.double())
    _forget(reference_code, tmp_path / "reference_code")
    model, metadata = load_checkpoint(path)
    with torch.no_grad():
        assert float((model(x).double() - expected).abs().max() / expected.abs().max()) < 1e-5
    assert model.config.arch == "antisymmetric" and metadata["reference"]["hparams"]["gamma"]["source"] == "pickle attribute"
