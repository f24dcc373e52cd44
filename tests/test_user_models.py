"""Your model, your data: a user's own module (own parameter names, batch-first input, written to
a temporary file) trained on its own data saved as .npz, analysed through the Python API, with
numbers checked against direct computations; and the regression tests of three silent wrong
results (leakage on a built-in task, recurrent-only perturbing nothing, checkpoints mixed up)."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from torch.func import functional_call

from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.task import Task
from lrnn_analysis.evaluation import loss_function
from lrnn_analysis.hessian import analyze
from lrnn_analysis.lure import LureSystem
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.training_split import LEAKAGE_WARNING, check_training_data, split_fingerprint
from lrnn_analysis.recipes import load_recipe, run_recipe
from lrnn_analysis.pipelines.audit import AuditSettings
from lrnn_analysis.pipelines.audit import run as run_audit
from lrnn_analysis.robustness import Perturbation, SweepModel, perturb_parameters, sweep
from lrnn_analysis.model_under_analysis import ModelUnderAnalysis
from lrnn_analysis.training import TrainResult, TrainSettings, train_model, training_metadata
from lrnn_analysis.data_files import load_data

MODEL_SOURCE = '''
import torch
from torch import nn


class MyLipschitzRNN(nn.Module):
    """h <- h + eps (A h + tanh(W h + enc(x_t))), A and W from the user's own parameters."""

    def __init__(self, inputs, hidden, classes, eps=0.2, beta=0.8, gamma=0.05):
        super().__init__()
        self.enc = nn.Linear(inputs, hidden)
        self.rec_a = nn.Parameter(torch.randn(hidden, hidden) / hidden)
        self.rec_w = nn.Parameter(torch.randn(hidden, hidden) / hidden)
        self.head = nn.Linear(hidden, classes)
        self.eps, self.beta, self.gamma = eps, beta, gamma

    def _matrix(self, M):
        eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        return (1 - self.beta) * (M + M.T) + self.beta * (M - M.T) - self.gamma * eye

    def matrices(self):
        return self._matrix(self.rec_a), self._matrix(self.rec_w)

    def forward(self, x):
        A, W = self.matrices()
        u = self.enc(x)
        h = x.new_zeros(x.shape[0], A.shape[0])
        for t in range(x.shape[1]):
            h = h + self.eps * (h @ A.T + torch.tanh(h @ W.T + u[:, t]))
        return self.head(h)


def build(hidden=8):
    torch.manual_seed(0)
    return MyLipschitzRNN(2, hidden, 3)
'''


def _import(path):
    spec = importlib.util.spec_from_file_location("mymodels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sequences(rng, n):
    """Three classes of 10-step, 2-channel sequences: a rising, falling or flat first channel."""
    y = rng.integers(0, 3, n)
    slope = np.array([1.0, -1.0, 0.0])[y]
    t = np.linspace(0, 1, 10)
    x = np.stack([slope[:, None] * t + 1.0 * rng.standard_normal((n, 10)), rng.standard_normal((n, 10))], axis=-1)
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's module file, data file, trained module and task."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "mymodels.py").write_text(MODEL_SOURCE)
    rng = np.random.default_rng(0)
    (x_train, y_train), (x_test, y_test) = _sequences(rng, 240), _sequences(rng, 90)
    np.savez(folder / "mydata.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    task = load_data(folder / "mydata.npz")
    module = _import(folder / "mymodels.py").build()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.03)
    for _ in range(8):
        for start in range(0, len(task.train), 60):
            loss = torch.nn.functional.cross_entropy(module(task.train.x[start:start + 60]), task.train.y[start:start + 60])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    module.eval()
    return folder, module, task


def _subject(module, **kwargs):
    def lure_form():
        A, W = module.matrices()
        return LureSystem(A, W, method="euler", eps=module.eps)

    return ModelUnderAnalysis.from_module(module, lure_form=lure_form, recurrent="rec_*", name="mine", **kwargs)


def _accuracy_by_hand(module, x, y):
    with torch.no_grad():
        return float((module(x).argmax(dim=1) == y).double().mean())


def test_data_file_becomes_a_task(user, digits_task):
    folder, module, task = user
    with pytest.raises(ValueError, match="the model does not run on task digits inputs of shape \\(batch, 64, 1\\)"):
        _subject(module).check_fits(digits_task)
    with np.load(folder / "mydata.npz") as archive:
        np.testing.assert_array_equal(task.test.x.numpy(), archive["x_test"])
        np.testing.assert_array_equal(task.train.y.numpy(), archive["y_train"])
    assert (task.name, task.input_dim, task.seq_len, task.num_classes, len(task.val)) == ("mydata.npz", 2, 10, 3, 0)
    with pytest.raises(ValueError, match="has no validation split"):
        train_model(build_model(ModelConfig("lipschitz", 2, 4, 3)), task, TrainSettings(epochs=1), torch.device("cpu"), False)
    regression = Task.from_arrays(task.train.x.numpy(), np.ones((240, 2), np.float32), task.test.x.numpy(),
                                  np.zeros((90, 2), np.float32), name="mine")
    assert (regression.output_dim, regression.is_classification) == (2, False)
    with pytest.raises(ValueError, match="returns \\(2, 3\\) on a batch of 2; task mine needs \\(batch, 2\\) outputs"):
        _subject(module).check_fits(regression)


def test_sweep_of_a_user_module_matches_direct_computation(user):
    _, module, task = user
    subject = _subject(module)
    assert subject.recurrent_names() == ["rec_a", "rec_w"]
    result = sweep([SweepModel("mine", "mymodels.py", subject)], task, {"gaussian-relative": [0.0, 0.5]},
                   seeds=[0], recurrent_only=True, progress=False)
    clean, noisy = result.rows
    assert clean["accuracy"] == pytest.approx(_accuracy_by_hand(module, task.test.x, task.test.y), abs=1e-12)
    assert clean["accuracy"] > 0.6  # trained: well above the 1/3 of chance
    params = {name: p.detach() for name, p in module.named_parameters()}
    perturbed = perturb_parameters(params, Perturbation("gaussian-relative", 0.5, 0), subject.recurrent_names())
    assert not torch.equal(perturbed["rec_a"], params["rec_a"]) and not torch.equal(perturbed["rec_w"], params["rec_w"])
    assert all(perturbed[name] is params[name] for name in ("enc.weight", "enc.bias", "head.weight", "head.bias"))
    with torch.no_grad():
        out = functional_call(module, perturbed, (task.test.x,))
    assert noisy["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out, task.test.y)), rel=1e-5)
    assert noisy["loss"] != clean["loss"]
    assert result.settings["perturbed_parameters"] == {"mymodels.py": ["rec_a", "rec_w"]}
    assert result.warnings == ()  # the user's own split: no leakage warning


def test_hessian_of_the_recurrent_block_matches_the_dense_hessian(user):
    _, module, task = user
    subject = _subject(module)
    x, y = task.train.x[:64], task.train.y[:64]
    report = analyze(subject, loss_function(True), (x, y), params=subject.recurrent_names(), top_k=1, progress=False)
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


def test_audit_of_a_user_module_with_and_without_a_lure_form(user):
    _, module, task = user
    settings = AuditSettings(trace_matvecs=20, seeds=2, certificate_budget=5.0,
                             grid={"gaussian": (0.0, 0.1), "gaussian-relative": (0.0, 0.05)})
    result = run_audit(_subject(module), task, settings)
    report = result.report
    assert report["clean"]["accuracy"] == pytest.approx(_accuracy_by_hand(module, task.test.x, task.test.y), abs=1e-12)
    assert report["model"]["recurrent"] == ["rec_a", "rec_w"] and report["config"] is None
    names = {c["name"] for c in report["stability"]["certificates"]}
    assert names == {"euler-norm", "euler-lmi"}
    system = _subject(module).lure_system()
    assert report["stability"]["spectrum"]["norm_W"] == pytest.approx(float(np.linalg.norm(system.W, 2)), rel=1e-9)
    assert report["training_data"]["warning"] is None

    bare = run_audit(ModelUnderAnalysis.from_module(module, name="bare"), task, settings)
    assert bare.report["stability"] == {"verdict": "not certified: no Lur'e form: no certificate available for this model",
                                        "lure_form": False, "reason": "no Lur'e form: no certificate available for this model",
                                        "stored_evidence": {"status": "absent", "reason": "no stored evidence", "seconds": 0.0,
                                                            "certificate": None, "rate": None, "tier": None,
                                                            "verification": None}}
    from lrnn_analysis.audit_report import _markdown

    assert "No Lur'e form: no certificate available for this model." in _markdown(bare, {})


def test_user_data_validation_errors_name_the_file_and_the_array(tmp_path):
    x, y = np.zeros((4, 3, 2), np.float32), np.zeros(4, np.int64)
    cases = {
        "extra": (dict(x_train=x, y_train=y, x_test=x, y_test=y, notes=y), "unknown keys ['notes']"),
        "missing": (dict(x_train=x, y_train=y, x_test=x), "missing keys ['y_test']"),
        "flat": (dict(x_train=x[:, :, 0], y_train=y, x_test=x, y_test=y), "x_train: expected shape (N, T, D)"),
        "intx": (dict(x_train=x.astype(np.int32), y_train=y, x_test=x, y_test=y), "x_train: expected floating-point"),
        "nan": (dict(x_train=x, y_train=y, x_test=np.full_like(x, np.nan), y_test=y), "x_test: has non-finite"),
        "floaty": (dict(x_train=x, y_train=y.astype(np.float32), x_test=x, y_test=y), "y_train: regression targets must have shape (N, k)"),
        "length": (dict(x_train=x, y_train=y[:3], x_test=x, y_test=y), "y_train: 3 targets for 4 inputs"),
        "steps": (dict(x_train=x, y_train=y, x_test=x[:, :2], y_test=y), "x_test: has T, D = (2, 2)"),
        "kinds": (dict(x_train=x, y_train=y, x_test=x, y_test=np.zeros((4, 1), np.float32)), "y_test: float32 targets"),
        "halfval": (dict(x_train=x, y_train=y, x_test=x, y_test=y, x_val=x), "x_val and y_val must be given together"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError) as error:
            load_data(path)
        assert str(error.value).startswith(str(path)) and message in str(error.value), name
        assert "\n" not in str(error.value)
    objects = tmp_path / "objects.npz"
    np.savez(objects, x_train=np.array([{"a": 1}], dtype=object), y_train=y, x_test=x, y_test=y)
    with pytest.raises(ValueError, match="x_train: holds Python objects"):
        load_data(objects)
    torch.save({"x_train": torch.zeros(4, 3, 2), "y_train": torch.zeros(4, dtype=torch.int64),
                "x_test": torch.zeros(4, 3, 2), "y_test": torch.zeros(4, dtype=torch.int64)}, tmp_path / "data.pt")
    assert load_data(tmp_path / "data.pt").num_classes == 1
    with pytest.raises(ValueError, match="is a built-in task"):
        Task.from_arrays(x, y, x, y, name="digits")


def test_cli_data_option_reports_bad_files_in_one_line(tmp_path, capsys):
    model = build_model(ModelConfig("lipschitz", 2, 8, 1), seed=0)
    save_checkpoint(tmp_path / "m.safetensors", model, {})
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((4, 3)), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((4, 3, 2)), y_test=np.zeros(4, np.int64))
    code = main(["robustness", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "bad.npz"), "--input-noise", "0",
                 "--out", str(tmp_path / "r.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.npz: x_train: expected shape (N, T, D)" in err and err.count("\n") == 1
    assert not (tmp_path / "r.csv").exists()
    code = main(["robustness", str(tmp_path / "m.safetensors"), "--task", "adding", "--length", "5", "--param-noise", "0.1",
                 "--recurrent", "M_W,weight_hh*", "--out", str(tmp_path / "r.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pattern 'weight_hh*' matches none of" in err and not (tmp_path / "r.csv").exists()


# Regression 1: a model trained on another split of digits, scored on the toolkit's split.
def test_leakage_warning_for_a_model_trained_on_another_split(digits_task, tmp_path, capsys):
    other = load_task("digits", seed=1)
    test_rows = {row.tobytes() for row in digits_task.test.x.numpy()}
    seen = sum(row.tobytes() in test_rows for row in other.train.x.numpy())
    assert seen > 200  # most of the toolkit's test digits are in the other split's training set

    metadata = training_metadata(other, TrainSettings(epochs=1), TrainResult({}, []), torch.device("cpu"))
    assert metadata["train_fingerprint"] == split_fingerprint(other.train)
    model = build_model(ModelConfig("lipschitz", 1, 8, 10), seed=0)
    check = check_training_data(metadata, digits_task)
    assert not check.known and check.warning.startswith(LEAKAGE_WARNING)
    assert check_training_data(metadata, other).warning is None

    result = sweep([SweepModel("m", "m", ModelUnderAnalysis.from_recurrent_model(model, metadata))], digits_task,
                   {"gaussian": [0.0]}, seeds=1, max_samples=50, progress=False)
    assert len(result.warnings) == 1 and LEAKAGE_WARNING in result.warnings[0]
    plain = sweep([SweepModel("user", "u", ModelUnderAnalysis.from_module(model))], digits_task, {"gaussian": [0.0]},
                  seeds=1, max_samples=50, progress=False)
    assert "records no training task" in plain.warnings[0]

    settings = AuditSettings(trace_matvecs=5, seeds=1, max_samples=50, hessian_batch_size=32, grid={"gaussian": (0.0,)})
    audit = run_audit(ModelUnderAnalysis.from_recurrent_model(model, metadata), digits_task, settings, label="m")
    assert audit.report["training_data"]["warning"].startswith(LEAKAGE_WARNING)
    from lrnn_analysis.audit_report import _markdown

    assert f"**Warning: {LEAKAGE_WARNING}" in _markdown(audit, {})

    save_checkpoint(tmp_path / "m.safetensors", model, metadata)
    argv = ["robustness", str(tmp_path / "m.safetensors"), "--input-noise", "0", "--seeds", "1", "--max-samples", "50",
            "--out", str(tmp_path / "r.csv"), "--quiet"]
    assert main(argv) == 0
    assert LEAKAGE_WARNING not in capsys.readouterr().err  # scored on its own recorded split
    assert main(argv + ["--split-seed", "0", "--force"]) == 0
    assert LEAKAGE_WARNING in capsys.readouterr().err


# Regression 2: recurrent-only perturbations that perturb nothing.
def test_recurrent_selections_that_match_nothing_are_errors(user, digits_task):
    _, module, task = user
    undeclared = ModelUnderAnalysis.from_module(module, name="mine")
    with pytest.raises(ValueError, match="declares no recurrent parameters"):
        sweep([SweepModel("m", "c", undeclared)], task, {"gaussian-relative": [0.0, 0.5]}, seeds=1,
              recurrent_only=True, progress=False)
    with pytest.raises(ValueError, match="pattern 'M_\\*' matches none of"):
        sweep([SweepModel("m", "c", undeclared)], task, {"gaussian-relative": [0.5]}, seeds=1, recurrent="M_*", progress=False)
    with pytest.raises(ValueError, match="matches none of"):
        ModelUnderAnalysis.from_module(module, recurrent=["rec_*", "weight_hh*"])
    with pytest.raises(ValueError, match="selection is empty"):
        perturb_parameters(dict(module.named_parameters()), Perturbation("gaussian-relative", 0.5), names=[])
    toolkit = ModelUnderAnalysis.from_recurrent_model(build_model(ModelConfig("antisymmetric", 1, 8, 10), seed=0))
    assert toolkit.recurrent_names() == ["M_W"]


# Regression 3: checkpoints sharing a file stem, and checkpoints of different tasks.
def test_recipe_keys_models_by_path(tmp_path, digits_task):
    config = ModelConfig("lipschitz", 1, 8, 10)
    accuracies = []
    for run, seed in (("runA", 1), ("runB", 2)):
        model = build_model(config, seed=seed)
        (tmp_path / run).mkdir()
        save_checkpoint(tmp_path / run / "model.safetensors", model, {"task": digits_task.to_dict()})
        accuracies.append(_accuracy_by_hand(model, digits_task.test.x[:100], digits_task.test.y[:100]))
    assert accuracies[0] != accuracies[1]
    recipes = tmp_path / "analyses"
    recipes.mkdir()
    (recipes / "r.toml").write_text('name = "r"\nanalysis = "robustness"\ntask = "digits"\noutput = "r"\n'
                                    'checkpoints = ["runA/model.safetensors", "runB/model.safetensors"]\n'
                                    '[settings]\nseeds = 1\nmax_samples = 100\n[settings.grid]\ngaussian = [0.0]\n')
    outcome = run_recipe(load_recipe(recipes / "r.toml"), tmp_path / "out", progress=False)
    assert outcome.warnings == ()
    rows = json.loads((tmp_path / "out" / "r.json").read_text())["rows"]
    assert [(r["model"], r["accuracy"]) for r in rows] == [("runA/model.safetensors", accuracies[0]),
                                                           ("runB/model.safetensors", accuracies[1])]
    (recipes / "dup.toml").write_text('name = "d"\nanalysis = "spectra"\noutput = "d"\n'
                                      'checkpoints = ["runA/model.safetensors", "runB/model.safetensors"]\nlabels = ["x", "x"]\n')
    with pytest.raises(ValueError, match="labels: duplicate labels \\['x'\\]"):
        load_recipe(recipes / "dup.toml")


def test_robustness_refuses_checkpoints_of_different_tasks(tmp_path, digits_task, capsys):
    model = build_model(ModelConfig("lipschitz", 1, 8, 10), seed=0)
    save_checkpoint(tmp_path / "digits.safetensors", model, {"task": digits_task.to_dict()})
    save_checkpoint(tmp_path / "smnist.safetensors", model, {"task": {"name": "smnist", "seed": 0, "options": {"pixels_per_step": 1}}})
    argv = ["robustness", str(tmp_path / "digits.safetensors"), str(tmp_path / "smnist.safetensors"), "--input-noise", "0",
            "--seeds", "1", "--max-samples", "50", "--out", str(tmp_path / "r.csv"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "record different tasks" in err and "digits.safetensors (task digits" in err and "smnist.safetensors (task smnist" in err
    assert not (tmp_path / "r.csv").exists()
    assert main(argv + ["--task", "digits"]) == 0
    err = capsys.readouterr().err
    assert "smnist.safetensors" in err and LEAKAGE_WARNING in err and "digits.safetensors):" not in err


class _LSTMClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(2, 6, batch_first=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_a_module_with_a_torch_lstm_is_audited_through_its_layer(user):
    _, _, task = user
    torch.manual_seed(0)
    module = _LSTMClassifier()
    subject = ModelUnderAnalysis.from_module(module)
    assert subject.recurrent_names() == ["lstm.weight_hh_l0"]
    result = sweep([SweepModel("lstm", "l", subject)], task, {"gaussian-relative": [0.0, 1.0]}, seeds=[0],
                   recurrent_only=True, progress=False)
    params = {name: p.detach() for name, p in module.named_parameters()}
    perturbed = perturb_parameters(params, Perturbation("gaussian-relative", 1.0, 0), ["lstm.weight_hh_l0"])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(functional_call(module, perturbed, (task.test.x,)), task.test.y)
    assert result.rows[1]["loss"] == pytest.approx(float(expected), rel=1e-5) and result.rows[1]["loss"] != result.rows[0]["loss"]
    settings = AuditSettings(trace_matvecs=10, seeds=1, grid={"gaussian": (0.0, 0.1)})
    report = run_audit(subject, task, settings).report
    assert report["stability"]["reason"].startswith("no Lur'e form of the whole model: its torch.nn recurrent layers")
    stacks = report["stability"]["recurrent_layers"]
    assert [(c["module"], c["kind"], c["holds"]) for c in stacks] == [("lstm", "lstm", False)]
    assert "no certificate without an input bound" in stacks[0]["layers"][0][0]["reason"]
    assert report["clean"]["accuracy"] == pytest.approx(_accuracy_by_hand(module, task.test.x, task.test.y), abs=1e-12)
