"""certify_model certifies the module that runs: a given Lur'e form is compared with the module
first (refused when it computes something else, marked UNCHECKED when it cannot be compared), a
module with a step and no form gets its form derived; every front end refuses a wrong form."""
import json

import numpy as np
import pytest
import torch

from lrnn_analysis.cli import main
from lrnn_analysis.errors import InputError
from lrnn_analysis.lure import LureSystem
from lrnn_analysis.model_under_analysis import ModelUnderAnalysis
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.pipelines.audit import AuditSettings
from lrnn_analysis.pipelines.audit import run as run_audit
from lrnn_analysis.pipelines.stability import certify_model
from lrnn_analysis.task import Task

MODULE = '''
import torch
from torch import nn
from lrnn_analysis.lure import LureSystem


class Euler(nn.Module):
    """h <- h + eps (-h + tanh(W h + U x_t)), read out from the last state; a step and a Lur'e form."""

    def __init__(self, form="right", checkable=True, hidden=4):
        super().__init__()
        torch.manual_seed(0)
        self.U = nn.Linear(2, hidden)
        self.W = nn.Parameter(0.3 * torch.randn(hidden, hidden))
        self.out = nn.Linear(hidden, 3)
        self.eps, self.form, self.checkable = 0.2, form, checkable
        self.input_shape = (2,)

    def hidden_states(self, x):
        h, states = x.new_zeros(x.shape[0], self.W.shape[0]), []
        for t in range(x.shape[1]):
            h = h + self.eps * (-h + torch.tanh(h @ self.W.T + self.U(x[:, t])))
            states.append(h)
        return torch.stack(states, 1)

    def forward(self, x):
        return self.out(self.hidden_states(x)[:, -1])

    def lure_form(self):
        W = self.W.detach().double()
        W = {"right": W, "transposed": W.T, "sign": W}[self.form]
        A = torch.eye(W.shape[0], dtype=W.dtype) * (1.0 if self.form == "sign" else -1.0)
        return LureSystem(A, W, method="euler", eps=self.eps)


def build(form="right"):
    return Euler(form)
'''


_NAMESPACE: dict = {}
exec(MODULE, _NAMESPACE)  # the module's class in this process; the command-line tests load it from a file
Euler = _NAMESPACE["Euler"]


def _checkable(module, yes):
    """The module without hidden_states/lure_inputs (nothing to compare its form with) when not ``yes``."""
    if not yes:
        module.lure_inputs = None
    else:
        module.lure_inputs = lambda x: module.U(x)
    return module


def _task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, 2, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return Task.from_arrays(x, y, x, y, name="toy")


@pytest.mark.parametrize("form", ["transposed", "sign"])
def test_a_wrong_form_is_refused_by_the_api(form):
    module = _checkable(Euler(form), True)
    with pytest.raises(InputError, match="the Lur'e form does not describe the module"):
        certify_model(ModelUnderAnalysis.from_module(module, name=form))


def test_a_right_form_is_checked_and_an_uncomparable_one_is_marked_unchecked():
    checked = certify_model(ModelUnderAnalysis.from_module(_checkable(Euler("right"), True), name="right"), time_budget=20)
    assert checked.form == "given, checked" and checked.holds and "form given, checked" in checked.verdict()
    unchecked = certify_model(ModelUnderAnalysis.from_module(_checkable(Euler("right"), False), name="bare"), time_budget=20)
    assert unchecked.form_unchecked and unchecked.form.startswith("given, UNCHECKED") and unchecked.holds


def test_an_unchecked_form_passes_no_certified_gate_without_the_trust_option():
    subject = ModelUnderAnalysis.from_module(_checkable(Euler("right"), False), name="bare")
    settings = AuditSettings(certificate_budget=10.0, hessian_batch_size=16, trace_matvecs=5, seeds=1,
                             grid={"gaussian": (0.0,)}, max_samples=20, gates=("certified=euler-lmi",))
    refused = run_audit(subject, _task(), settings)
    assert not refused.passed and "could not be compared with the module" in refused.gates[0].detail
    trusted = run_audit(subject, _task(), AuditSettings(**{**settings.__dict__, "trust_unchecked_form": True}))
    assert trusted.passed and trusted.report["settings"]["trust_unchecked_form"] is True
    assert trusted.report["stability"]["form_check"]["status"] == "unchecked"


@pytest.fixture
def wrong_form_project(tmp_path):
    (tmp_path / "analyses").mkdir()
    (tmp_path / "analyses" / "euler.py").write_text(MODULE + '''

Euler.lure_inputs = lambda self, x: self.U(x)
''')
    g = np.random.default_rng(0)
    x = g.standard_normal((40, 6, 2)).astype(np.float32)
    y = g.integers(0, 3, 40)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    return tmp_path


def test_a_wrong_form_is_refused_by_every_front_end(wrong_form_project, capsys):
    root = wrong_form_project
    spec = ["--model", f"{root / 'analyses' / 'euler.py'}:build", "--model-arg", "form=transposed"]
    assert main(["stability", *spec, "--quiet"]) == 2
    assert "the Lur'e form does not describe the module" in capsys.readouterr().err
    assert main(["audit", *spec, "--data", str(root / "data.npz"), "--out", str(root / "audit"), "--quiet",
                 "--gate", "certified=euler-lmi"]) == 2
    assert "the Lur'e form does not describe the module" in capsys.readouterr().err and not (root / "audit").exists()
    recipe = root / "analyses" / "cert.toml"
    recipe.write_text('name = "cert"\nanalysis = "certificates"\noutput = "cert"\nmodel = "analyses/euler.py:build"\n'
                      'model_args = {form = "transposed"}\ndata = "data.npz"\n')
    assert main(["reproduce", str(recipe), "--out", str(root / "figures"), "--quiet"]) == 2
    assert "the Lur'e form does not describe the module" in capsys.readouterr().err
    assert main(["stability", "--model", f"{root / 'analyses' / 'euler.py'}:build", "--quiet",
                 "--json", str(root / "s.json")]) == 0
    assert json.loads((root / "s.json").read_text())["verdict"].endswith("form given, checked")


CELL_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A classifier looping an nn.RNNCell over time: no Lur'e form of its own, no step."""

    def __init__(self, scale=0.2):
        super().__init__()
        torch.manual_seed(0)
        self.cell = nn.RNNCell(2, 5)
        with torch.no_grad():
            self.cell.weight_hh.mul_(scale)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 5)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.out(h)


def build(scale=0.2):
    return Net(scale)
'''


def test_a_cell_named_on_the_command_line_is_derived_checked_and_certified(tmp_path, capsys):
    (tmp_path / "net.py").write_text(CELL_MODULE)
    spec = ["--model", f"{tmp_path / 'net.py'}:build"]
    assert main(["stability", *spec, "--quiet"]) == 2  # no form, no step, no torch.nn layer: nothing to certify
    capsys.readouterr()
    assert main(["stability", *spec, "--cell", "cell", "--quiet", "--json", str(tmp_path / "s.json")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("certified: map-") and "form derived from the cell cell, checked" in first
    record = json.loads((tmp_path / "s.json").read_text())
    assert {c["name"] for c in record["certificates"] if c["holds"]} >= {"map-lmi"}
    namespace: dict = {}
    exec(CELL_MODULE, namespace)
    net = namespace["build"](0.2)
    W = net.cell.weight_hh.detach().double().numpy()
    assert record["spectrum"]["norm_W"] == pytest.approx(float(np.linalg.norm(W, 2)), rel=1e-9)
    assert main(["stability", *spec, "--cell", "nothing", "--quiet"]) == 2
    assert "no submodule 'nothing'" in capsys.readouterr().err


PREPROCESSED_LSTM = '''
import torch
from torch import nn


class Net(nn.Module):
    """An LSTM that reads Linear(20 I)(x), not the network input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.pre.weight.copy_(20 * torch.eye(2))
        self.lstm = nn.LSTM(2, 4, batch_first=True)
        with torch.no_grad():
            self.lstm.weight_hh_l0.mul_(0.05)
            self.lstm.weight_ih_l0.mul_(0.2)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.lstm(self.pre(x))[0][:, -1])


def build():
    return Net()
'''


def test_an_lstm_bound_is_of_the_layer_input_and_data_refute_a_bound_it_exceeds(tmp_path, capsys):
    (tmp_path / "net.py").write_text(PREPROCESSED_LSTM)
    g = np.random.default_rng(0)
    x = g.standard_normal((30, 5, 2)).astype(np.float32)
    y = g.integers(0, 3, 30)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    spec = ["--model", f"{tmp_path / 'net.py'}:build", "--input-bound", "0.1", "--quiet"]
    assert main(["stability", *spec, "--json", str(tmp_path / "s.json")]) == 0  # certified for layer inputs <= 0.1 ...
    stated = (tmp_path / "s.json").read_text()
    assert "for the input of lstm layer 0 (what the module feeds it)" in stated and "network input" not in stated
    capsys.readouterr()
    assert main(["stability", *spec, "--data", str(tmp_path / "data.npz")]) == 1  # ... which the data exceed 20-fold
    printed = capsys.readouterr().out
    assert "reaches" in printed and "on the data, beyond the bound 0.1" in printed


def test_the_forms_of_torch_nn_rnn_layers_are_checked_against_the_layers(monkeypatch):
    from torch import nn

    from lrnn_analysis.models import torchnn
    from lrnn_analysis.pipelines.stability import check_layer_forms

    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.rnn = nn.RNN(3, 5, num_layers=2, batch_first=True)
            self.out = nn.Linear(5, 2)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    model = Stacked()
    check_layer_forms(model)  # the toolkit's reading of both layers' weights reproduces them
    right = torchnn.rnn_lure_forms

    def transposed(rnn):
        return tuple(LureSystem(f.A, f.W.T, method="map", activation=f.activation) for f in right(rnn))

    monkeypatch.setattr(torchnn, "rnn_lure_forms", transposed)
    with pytest.raises(InputError, match="rnn layer 0: its Lur'e form does not reproduce the layer"):
        certify_model(ModelUnderAnalysis.from_module(model, name="stacked"), time_budget=5)


@pytest.mark.parametrize("arch", ["lipschitz", "contracting"])
def test_certificates_do_not_depend_on_the_readout(arch):
    """The readout is the decoder only: a per-step model's form is checked and certified as the last-step model's."""
    found = []
    for readout in ("last", "all"):
        model = build_model(ModelConfig(arch, 3, 5, 4, beta_a=1.0, gamma_a=0.5, readout=readout), seed=0)
        result = certify_model(model, time_budget=30)
        assert result.form == "given, checked" and result.holds
        found.append([{k: v for k, v in row.items() if k != "seconds"} for row in result.rows()])
    assert found[0] == found[1]


@pytest.mark.parametrize("x", [np.zeros((4, 6, 2), np.float32), np.zeros((4, 6), np.int64)])
def test_data_that_do_not_fit_the_model_are_refused(x):
    """The data set the input size a form is checked with: data of 2 features, or token ids, for a
    model of 3 float features were taken as they came."""
    from lrnn_analysis.pipelines.stability import run
    from lrnn_analysis.task import task_from_arrays

    y = np.arange(4) % 4
    subject = ModelUnderAnalysis.from_recurrent_model(build_model(ModelConfig("lipschitz", 3, 5, 4), seed=0))
    with pytest.raises(InputError, match="^lipschitz \\(euler\\): (model \\(input_dim 3|the model takes float inputs)"):
        run(subject, task_from_arrays(x, y, x, y, name="mine", num_classes=4))


def test_the_verdict_says_not_certified_once_when_the_reason_says_it_too():
    """A spectral radius within round-off of 1 (the antisymmetric Euler step at J = A is I) gives a
    reason that starts with "not certified:"; the verdict line does not repeat it."""
    model = build_model(ModelConfig(arch="antisymmetric", input_dim=1, hidden=4, output_dim=2))
    result = certify_model(ModelUnderAnalysis.from_module(model, name="antisymmetric"), time_budget=5)
    reasons = [c.reason for c in result.certificates]
    assert reasons and all(r.startswith("not certified: ") and "float64 cannot decide" in r for r in reasons)
    verdict = result.verdict()
    assert verdict.startswith("not certified: the step matrix at J = A has spectral radius 1") and verdict.count("not certified") == 1
