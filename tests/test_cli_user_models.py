"""Your own model through the command line and recipes: a module file written to a temporary
folder (an nn.RNN and an nn.LSTM variant with their own parameter names, batch-first input),
trained briefly on its own .npz data, then `lrnn audit/stability/hessian/robustness/info --model
FILE:build --weights ...` and a recipe, with numbers checked against direct computations; the
errors of user models; the reference-file overrides on every command that loads a checkpoint."""
import csv
import json
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.lure import LureSystem
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.recipes import load_recipe, run_recipe
from lrnn_analysis.stability import certify
from lrnn_analysis.usermodule import UserModelError, load_user_model, parse_model_args

MODULE_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    from lrnn_analysis.models.torchnn import SequenceClassifier

    CALLS = []


    class LSTMNet(nn.Module):
        """readout(last state of an LSTM); x is (batch, time, inputs)."""

        def __init__(self, inputs, hidden, classes):
            super().__init__()
            self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
            self.readout = nn.Linear(hidden, classes)

        def forward(self, x):
            states, _ = self.lstm(x)
            return self.readout(states[:, -1])


    def build(kind="rnn", hidden=8, classes=3):
        CALLS.append((kind, hidden, classes))
        torch.manual_seed(0)
        if kind == "lstm":
            return LSTMNet(2, hidden, classes)
        return SequenceClassifier(nn.RNN(2, hidden, batch_first=True), nn.Linear(hidden, classes))


    def broken():
        raise RuntimeError("the factory failed on purpose")


    def not_a_module():
        return 3


    NOT_CALLABLE = 5


    def exits():
        raise SystemExit(3)


    class Misbehaving(nn.Module):
        """A linear readout of the last step whose forward or lure_form fails as asked."""

        def __init__(self, failure):
            super().__init__()
            self.failure = failure
            self.readout = nn.Linear(2, 3)

        def forward(self, x):
            if self.failure == "forward":
                raise KeyError("forward failed on purpose")
            return self.readout(x[:, -1])

        def lure_form(self):
            if self.failure == "lure_form":
                raise ZeroDivisionError("lure_form failed on purpose")
            return "not a LureSystem"


    def misbehaving(failure="forward"):
        return Misbehaving(failure)
''')


def _sequences(rng, n):
    """Three classes of 10-step, 2-channel sequences: a rising, falling or flat first channel."""
    y = rng.integers(0, 3, n)
    t = np.linspace(0, 1, 10)
    x = np.stack([np.array([1.5, -1.5, 0.0])[y][:, None] * t + 0.7 * rng.standard_normal((n, 10)),
                  rng.standard_normal((n, 10))], axis=-1)
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """mymodels.py, data.npz, and each variant trained briefly: rnn.pt (torch.save) and lstm.safetensors."""
    root = tmp_path_factory.mktemp("project")
    (root / "mymodels.py").write_text(MODULE_SOURCE)
    (root / "analyses").mkdir()
    (root / "analyses" / "mymodels.py").write_text(MODULE_SOURCE)  # a recipe runs only code inside its own folder
    rng = np.random.default_rng(0)
    (x_train, y_train), (x_test, y_test) = _sequences(rng, 300), _sequences(rng, 200)
    np.savez(root / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    spec = f"{root / 'mymodels.py'}:build"
    for kind, file in (("rnn", "rnn.pt"), ("lstm", "lstm.safetensors")):
        module = load_user_model(spec, model_args={"kind": kind}).module.train()
        optimizer = torch.optim.Adam(module.parameters(), lr=0.03)
        x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(module(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if file.endswith(".pt"):
            torch.save(state, root / file)
        else:
            save_file(state, str(root / file))
    return root


def _spec(project):
    return f"{project / 'mymodels.py'}:build"


def _hand_accuracy(project, weights, kind):
    """Accuracy of the trained module on the test split, computed here directly."""
    module = load_user_model(_spec(project), project / weights, {"kind": kind}).module
    data = np.load(project / "data.npz")
    with torch.no_grad():
        predictions = module(torch.from_numpy(data["x_test"])).argmax(1).numpy()
    return float((predictions == data["y_test"]).mean())


def test_model_arguments_are_json_literals_else_text():
    assert parse_model_args(["hidden=16", "eps=0.1", "bias=true", "sizes=[8, 8]", 'act="relu"', "kind=lstm", "x="]) == {
        "hidden": 16, "eps": 0.1, "bias": True, "sizes": [8, 8], "act": "relu", "kind": "lstm", "x": ""}
    with pytest.raises(UserModelError, match="given twice"):
        parse_model_args(["a=1", "a=2"])
    with pytest.raises(UserModelError, match="KEY=VALUE"):
        parse_model_args(["1a=2"])
    for constant in ("NaN", "Infinity", "[1, -Infinity]"):
        with pytest.raises(UserModelError, match="is not a finite number"):
            parse_model_args([f"eps={constant}"])


@pytest.mark.parametrize("kind,weights", [("rnn", "rnn.pt"), ("lstm", "lstm.safetensors")])
def test_audit_of_a_user_model_on_its_own_data(project, tmp_path, capsys, kind, weights):
    out = tmp_path / "audit"
    code = main(["audit", "--model", _spec(project), "--model-arg", f"kind={kind}", "--model-arg", "hidden=8",
                 "--weights", str(project / weights), "--data", str(project / "data.npz"), "--out", str(out),
                 "--quiet", "--gate", "min-accuracy=0.5"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    accuracy = _hand_accuracy(project, weights, kind)
    assert accuracy > 0.6  # trained: far above the 1/3 of chance
    assert report["clean"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert report["checkpoint"] == str(project / weights)
    printed = capsys.readouterr().out
    assert f"clean test accuracy {accuracy:.4f}" in printed
    if kind == "rnn":
        assert {c["name"] for c in report["stability"]["certificates"]} == {"map-norm", "map-lmi"}
    else:
        assert report["stability"]["lure_form"] is False
        assert report["model"]["recurrent"] == ["lstm.weight_hh_l0"]


def test_stability_of_a_user_rnn_equals_its_hand_built_lure_form(project, tmp_path, capsys):
    json_path = tmp_path / "stability.json"
    code = main(["stability", "--model", _spec(project), "--weights", str(project / "rnn.pt"), "--json", str(json_path),
                 "--quiet"])
    W = torch.load(project / "rnn.pt", weights_only=True)["rnn.weight_hh_l0"].double()
    by_hand = certify(LureSystem(torch.zeros(8, 8, dtype=torch.float64), W, slope=1.0, method="map", activation="tanh"),
                      ["map-norm", "map-lmi"])
    result = json.loads(json_path.read_text())["certificates"]
    assert [(r["name"], r["holds"]) for r in result] == [(r.name, r.holds) for r in by_hand]
    assert [r["margin"] for r in result] == pytest.approx([r.margin for r in by_hand], rel=1e-9, abs=1e-12)
    assert code == (0 if all(r.holds for r in by_hand) else 1)
    assert f"{project / 'rnn.pt'}: " in capsys.readouterr().out


def test_stability_of_a_user_lstm_certifies_its_layer(project, tmp_path, capsys):
    from lrnn_analysis.stability import certify_recurrent

    module = load_user_model(_spec(project), project / "lstm.safetensors", {"kind": "lstm"}).module
    bound = float(np.abs(np.load(project / "data.npz")["x_test"]).max())
    direct = certify_recurrent(module, input_bound=bound)[0]
    json_path = tmp_path / "lstm.json"
    code = main(["stability", "--model", _spec(project), "--model-arg", "kind=lstm", "--weights",
                 str(project / "lstm.safetensors"), "--input-bound", str(bound), "--json", str(json_path)])
    assert code == (0 if direct.holds else 1)
    layers = json.loads(json_path.read_text())["recurrent_layers"]
    assert [(c["module"], c["kind"], c["holds"], c["reason"]) for c in layers] == [("lstm", "lstm", direct.holds, direct.reason)]
    assert "no Lur'e form of the whole model; certifying its torch.nn recurrent layers" in capsys.readouterr().out
    assert main(["stability", "--model", _spec(project), "--model-arg", "kind=lstm", "--weights",
                 str(project / "lstm.safetensors")]) == 1
    assert "no certificate without an input bound" in capsys.readouterr().out


def test_audit_of_a_user_lstm_certifies_and_gates_its_layer(project, tmp_path, capsys):
    """No Lur'e form of the whole model: the audit certifies its torch.nn LSTM (as `lrnn stability`
    does) and `certified=lstm-contraction` gates on that layer's condition."""
    from lrnn_analysis.stability import certify_recurrent

    module = load_user_model(_spec(project), project / "lstm.safetensors", {"kind": "lstm"}).module
    bound = float(np.abs(np.load(project / "data.npz")["x_test"]).max())
    direct = certify_recurrent(module, input_bound=bound)[0]
    common = ["audit", "--model", _spec(project), "--model-arg", "kind=lstm", "--weights", str(project / "lstm.safetensors"),
              "--data", str(project / "data.npz"), "--quiet", "--seeds", "1", "--trace-matvecs", "10"]
    out = tmp_path / "bounded"
    code = main(common + ["--out", str(out), "--input-bound", str(bound), "--gate", "certified=lstm-contraction",
                          "--gate", "certified=map-lmi"])
    assert code == 1  # map-lmi does not apply to an LSTM
    report = json.loads((out / "report.json").read_text())
    stacks = report["stability"]["recurrent_layers"]
    assert [(c["module"], c["kind"], c["holds"], c["reason"]) for c in stacks] == [("lstm", "lstm", direct.holds, direct.reason)]
    assert "certificates" not in report["stability"] and "torch.nn recurrent layers are certified" in report["stability"]["reason"]
    lstm_gate, map_gate = report["gates"]
    assert lstm_gate["passed"] == direct.holds and map_gate["passed"] is False
    assert "map-lmi does not apply to lstm layer 0 (lstm)" in map_gate["detail"]
    if direct.holds:
        assert lstm_gate["observed"] == pytest.approx(direct.layers[0][0].margin)
    markdown = (out / "report.md").read_text()
    assert "| lstm | lstm | 0 | lstm-contraction |" in markdown
    assert f"torch.nn lstm lstm: {'holds' if direct.holds else 'fails'}" in capsys.readouterr().out
    out = tmp_path / "unbounded"
    assert main(common + ["--out", str(out), "--gate", "certified=lstm-contraction"]) == 1
    gate = json.loads((out / "report.json").read_text())["gates"][0]
    assert gate["passed"] is False and "no certificate without an input bound" in gate["detail"]


def test_hessian_of_a_user_model_matches_the_exact_hessian(project, tmp_path):
    json_path = tmp_path / "hessian.json"
    assert main(["hessian", "--model", _spec(project), "--weights", str(project / "rnn.pt"), "--data",
                 str(project / "data.npz"), "--params", "rnn.weight_hh_*", "--top-k", "1", "--batch-size", "64",
                 "--dtype", "float64", "--json", str(json_path), "--quiet"]) == 0
    report = json.loads(json_path.read_text())
    assert report["operator"]["params"] == ["rnn.weight_hh_l0"]
    module = load_user_model(_spec(project), project / "rnn.pt").module.double()
    data = np.load(project / "data.npz")
    x, y = torch.from_numpy(data["x_train"][:64]).double(), torch.from_numpy(data["y_train"][:64])
    params = dict(module.named_parameters())

    def loss(w):
        out = torch.func.functional_call(module, {**params, "rnn.weight_hh_l0": w.reshape(8, 8)}, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, params["rnn.weight_hh_l0"].detach().reshape(-1)))
    assert report["lambda_max"] == pytest.approx(float(exact[-1]), rel=1e-6)


def test_robustness_perturbs_the_named_recurrent_weight_of_each_weights_file(project, tmp_path):
    second = tmp_path / "rnn_untrained.pt"
    torch.save(load_user_model(_spec(project)).module.state_dict(), second)
    out = tmp_path / "robustness.csv"
    assert main(["robustness", "--model", _spec(project), "--weights", str(project / "rnn.pt"), "--weights", str(second),
                 "--data", str(project / "data.npz"), "--recurrent", "rnn.weight_hh_*", "--param-noise", "0,1.0",
                 "--seeds", "2", "--out", str(out), "--json", "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    trained = [r for r in rows if r["checkpoint"] == str(project / "rnn.pt")]
    assert {r["checkpoint"] for r in rows} == {str(project / "rnn.pt"), str(second)}
    clean = [r for r in trained if float(r["level"]) == 0.0]
    noisy = [r for r in trained if float(r["level"]) == 1.0]
    assert float(clean[0]["accuracy"]) == pytest.approx(_hand_accuracy(project, "rnn.pt", "rnn"), abs=1e-12)
    assert all(float(r["loss"]) != pytest.approx(float(clean[0]["loss"]), rel=1e-3) for r in noisy)
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert settings["perturbed_parameters"][str(project / "rnn.pt")] == ["rnn.weight_hh_l0"]


def test_recurrent_only_is_the_declared_recurrent_weights_of_a_user_module(project, tmp_path):
    out = tmp_path / "lstm.csv"
    assert main(["robustness", "--model", _spec(project), "--model-arg", "kind=lstm", "--weights",
                 str(project / "lstm.safetensors"), "--data", str(project / "data.npz"), "--recurrent-only",
                 "--param-noise", "0,0.5", "--seeds", "1", "--out", str(out), "--json", "--quiet"]) == 0
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert list(settings["perturbed_parameters"].values()) == [["lstm.weight_hh_l0"]]


def test_info_describes_a_user_model(project, capsys):
    assert main(["info", "--model", _spec(project), "--weights", str(project / "rnn.pt")]) == 0
    out = capsys.readouterr().out
    assert "model args: none" in out and "rnn.weight_hh_l0: (8, 8)" in out
    assert "recurrent parameters: rnn.weight_hh_l0" in out and "Lur'e form: map, n = 8" in out
    assert "task: none recorded" in out
    assert main(["info", "--model", _spec(project), "--weights", str(project / "rnn.pt"), "--task", "digits"]) == 0
    assert "task: digits (from --task; the model records none)" in capsys.readouterr().out


def test_outputs_never_replace_the_model_file_weights_or_data(project, capsys):
    before = {name: (project / name).read_bytes() for name in ("mymodels.py", "rnn.pt", "data.npz")}
    for target in before:
        assert main(["robustness", "--model", _spec(project), "--weights", str(project / "rnn.pt"), "--data",
                     str(project / "data.npz"), "--param-noise", "0", "--seeds", "1", "--out", str(project / target),
                     "--force", "--quiet"]) == 2
        assert "input" in capsys.readouterr().err
    assert {name: (project / name).read_bytes() for name in before} == before


def test_recipe_with_model_weights_and_data(project, tmp_path):
    analyses = project / "analyses"
    analyses.mkdir(exist_ok=True)
    recipe_path = analyses / "mine.toml"
    recipe_path.write_text(textwrap.dedent('''
        name = "my rnn"
        analysis = "robustness"
        output = "mine"
        model = "analyses/mymodels.py:build"
        model_args = {kind = "rnn", hidden = 8}
        weights = ["rnn.pt"]
        data = "data.npz"
        [settings]
        grid = {gaussian-relative = [0.0, 1.0]}
        recurrent = "rnn.weight_hh_*"
        seeds = 2
    '''))
    recipe = load_recipe(recipe_path)
    assert set(recipe.inputs()) == {project / "rnn.pt", project / "data.npz", project / "analyses" / "mymodels.py"}
    assert recipe.model_labels() == ("rnn",)
    outcome = run_recipe(recipe, tmp_path / "figures", progress=False)
    rows = list(csv.DictReader((tmp_path / "figures" / "mine.csv").open()))
    clean = [r for r in rows if float(r["level"]) == 0.0]
    assert clean and float(clean[0]["accuracy"]) == pytest.approx(_hand_accuracy(project, "rnn.pt", "rnn"), abs=1e-12)
    assert "mine.csv" in {p.split("/")[-1] for p in outcome.outputs}


@pytest.mark.parametrize("lines,message", [
    (['model = "analyses/mymodels.py:build"', 'weights = ["rnn.pt"]'],
     "model analyses/mymodels.py:build records none; give task or data"),
    (['weights = ["rnn.pt"]', 'checkpoints = ["rnn.pt"]', 'task = "digits"'], "model_args and weights go with model"),
    (['model = "analyses/mymodels.py:build"', 'weights = ["missing.pt"]', 'data = "data.npz"'], "missing.pt is not an existing file"),
    (['model = "analyses/mymodels.py:build"', 'data = "data.npz"', 'task = "digits"'], "give either task"),
    (['model = "mymodels.py:build"', 'data = "data.npz"'], "lies outside the recipe's directory"),
    (['model = "os:system"', 'data = "data.npz"', 'model_args = {command = "touch pwned"}'], "names an importable module"),
    (['model = "analyses/absent.py:build"', 'data = "data.npz"'], "is not an existing file"),
])
def test_recipe_user_model_errors(project, lines, message):
    analyses = project / "analyses"
    analyses.mkdir(exist_ok=True)
    path = analyses / "bad.toml"
    path.write_text("\n".join(['name = "bad"', 'analysis = "hessian"', 'output = "bad"', *lines]) + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(path)


def test_recipe_scores_checkpoints_on_their_recorded_task_and_refuses_mixed_ones(project, digits_task):
    analyses = project / "analyses"
    analyses.mkdir(exist_ok=True)
    paths = {}
    for name, task in (("a", "digits"), ("b", "digits"), ("c", "adding")):
        config = ModelConfig("lipschitz", 1 if task == "adding" else 8, 4, 1 if task == "adding" else 10)
        paths[name] = save_checkpoint(project / f"{name}.safetensors", build_model(config),
                                      {"task": {"name": task, "seed": 3, "options": {}}})
    same = analyses / "same.toml"
    same.write_text('name = "s"\nanalysis = "hessian"\noutput = "s"\ncheckpoints = ["a.safetensors", "b.safetensors"]\n')
    recipe = load_recipe(same)
    assert recipe.recorded_task == {"name": "digits", "seed": 3, "options": {}}
    assert recipe.load_task().seed == 3
    mixed = analyses / "mixed.toml"
    mixed.write_text('name = "m"\nanalysis = "hessian"\noutput = "m"\ncheckpoints = ["a.safetensors", "c.safetensors"]\n')
    with pytest.raises(ValueError, match=r"the checkpoints record a.safetensors \(digits\), c.safetensors \(adding\)"):
        load_recipe(mixed)


def _bad_weights(project, tmp_path):
    nan = {k: v.clone() for k, v in torch.load(project / "rnn.pt", weights_only=True).items()}
    nan["head.bias"][0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    torch.save({"model": nan}, tmp_path / "nested.pt")
    torch.save(load_user_model(_spec(project)).module, tmp_path / "whole.pt")
    return tmp_path


@pytest.mark.parametrize("argv,message", [
    (["--model", "mymodels_build"], "expected MODULE:FACTORY"),
    (["--model", "{dir}/nowhere.py:build"], "nowhere.py is not an existing file"),
    (["--model", "no_such_module_here:build"], "no module named 'no_such_module_here'"),
    (["--model", "{dir}/mymodels.py:missing"], "has no attribute 'missing'"),
    (["--model", "{dir}/mymodels.py:NOT_CALLABLE"], "NOT_CALLABLE is a int, not callable"),
    (["--model", "{dir}/mymodels.py:broken"], "raised RuntimeError: the factory failed on purpose"),
    (["--model", "{dir}/mymodels.py:not_a_module"], "returned a int, not a torch.nn.Module"),
    (["--model", "{dir}/mymodels.py:exits"], "exits() raised SystemExit: 3"),
    (["--model", "{dir}/mymodels.py:misbehaving"], "forward raised KeyError: 'forward failed on purpose'"),
    (["--model", "{dir}/mymodels.py:build", "--model-arg", "kind=lstm", "--weights", "{dir}/rnn.pt"],
     "do not match the module: missing keys ['lstm.weight_ih_l0'"),
    (["--model", "{dir}/mymodels.py:build", "--model-arg", "hidden=4", "--weights", "{dir}/rnn.pt"],
     "rnn.weight_ih_l0 has shape (8, 2), the module's has (4, 2)"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{tmp}/nan.pt"], "head.bias has non-finite values"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{tmp}/nested.pt"], "entries ['model'] are dicts"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{tmp}/whole.pt"], "refused to unpickle (it would import"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{dir}/rnn.pt", "--recurrent", "rnn.weight_xx_*"],
     "parameter pattern 'rnn.weight_xx_*' matches none of"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{dir}/rnn.pt", "--no-data"],
     "a model built by --model records no task: give --task NAME or --data FILE"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{dir}/rnn.pt", "--beta", "0.5"],
     "--beta: for files of the reference implementation"),
])
def test_user_model_errors_are_one_line_exit_2(project, tmp_path, capsys, argv, message):
    _bad_weights(project, tmp_path)
    argv = [a.format(dir=project, tmp=tmp_path) for a in argv]
    data = [] if "--no-data" in argv else ["--data", str(project / "data.npz")]
    argv = [a for a in argv if a != "--no-data"]
    out = tmp_path / "out.csv"
    code = main(["robustness", *argv, *data, "--param-noise", "0,0.1", "--seeds", "1", "--out", str(out), "--quiet"])
    err = "".join(line + "\n" for line in capsys.readouterr().err.splitlines()
                  if not line.startswith("warning: no --weights"))  # a module run with its factory's parameters
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("lrnn robustness: error: ")
    if "matches none" not in message and "records no task" not in message and "--beta" not in message:
        assert argv[1] in err  # a failure to load names the spec
    assert not out.exists()


@pytest.mark.parametrize("failure,message", [
    ("lure_form", "Misbehaving: lure_form() raised ZeroDivisionError: lure_form failed on purpose"),
    ("returns", "Misbehaving: lure_form() returned a str, not a LureSystem or None"),
])
def test_a_lure_form_that_raises_or_returns_something_else_is_one_line_exit_2(project, capsys, failure, message):
    for command in ("stability", "info"):
        code = main([command, "--model", f"{project / 'mymodels.py'}:misbehaving", "--model-arg", f"failure={failure}"])
        errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: no --weights")]
        assert code == 2 and len(errors) == 1 and errors[0].startswith(f"lrnn {command}: error: ") and message in errors[0]


def test_single_model_commands_take_one_model(project, capsys):
    spec = _spec(project)
    assert main(["hessian", "--model", spec, "--weights", str(project / "rnn.pt"), "--weights", str(project / "rnn.pt"),
                 "--data", str(project / "data.npz")]) == 2
    assert "give one --weights file" in capsys.readouterr().err
    assert main(["info"]) == 2
    assert "give a checkpoint or --model" in capsys.readouterr().err


# ---- overrides of reference files on every command that loads a checkpoint ---------------------

def _reference_file(tmp_path):
    """A LipschitzRNN state dict of the reference implementation, named the way its driver names it."""
    gen = torch.Generator().manual_seed(0)
    state = {"B": 0.3 * torch.randn(6, 6, generator=gen), "C": 0.3 * torch.randn(6, 6, generator=gen),
             "E.weight": torch.randn(6, 2, generator=gen), "E.bias": torch.zeros(6),
             "D.weight": torch.randn(4, 6, generator=gen), "D.bias": torch.zeros(4)}
    path = tmp_path / ("LipschitzRNN_mnist_T_392_units_6_beta_0.7_alpha_0.6_gamma_0.05_eps_0.3_solver_euler_"
                       "gclip_0_optimizer_Adam_seed_1.pkl")
    torch.save(state, path)
    return path


def test_info_shows_overrides_and_where_each_value_came_from(tmp_path, capsys):
    path = _reference_file(tmp_path)
    assert main(["info", str(path), "--beta", "0.9", "--alpha", "0.5", "--task", "digits"]) == 0
    out = capsys.readouterr().out
    assert "beta = 0.9  (from override)" in out and "alpha = 0.5  (from override)" in out
    assert "gamma = 0.05  (from file name)" in out and "eps = 0.3  (from file name)" in out
    assert "task: digits (from --task; the checkpoint records smnist)" in out


def test_stability_overrides_change_the_certified_matrices(tmp_path, capsys):
    path = _reference_file(tmp_path)
    results = {}
    for gamma in ("0.05", "3"):
        json_path = tmp_path / f"stability_{gamma}.json"
        main(["stability", str(path), "--gamma", gamma, "--json", str(json_path), "--quiet"])
        results[gamma] = json.loads(json_path.read_text())
    # A = alpha (beta (B - B^T) + (1 - beta)(B + B^T) - gamma I): the abscissa moves by -alpha * delta gamma.
    shift = results["3"]["spectrum"]["abscissa_A"] - results["0.05"]["spectrum"]["abscissa_A"]
    assert shift == pytest.approx(-0.6 * (3 - 0.05), rel=1e-9)
    capsys.readouterr()
    assert main(["info", str(path), "--solver", "midpoint"]) == 0
    captured = capsys.readouterr()
    assert "note: " + path.name + ": the override(s) solver do not apply to a LipschitzRNN model" in captured.out
    assert [line for line in captured.err.splitlines() if "the override" in line][0].startswith("lrnn info: warning: ")


def test_overrides_on_a_native_checkpoint_are_an_error(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(ModelConfig("lipschitz", 8, 4, 10)),
                           {"task": {"name": "digits", "seed": 0, "options": {}}})
    for command in (["info"], ["stability"], ["hessian"], ["audit", "--out", str(tmp_path / "audit")]):
        assert main([*command[:1], str(path), *command[1:], "--beta", "0.5"]) == 2
        assert "override(s) apply only to files of the reference implementation" in capsys.readouterr().err
    assert not (tmp_path / "audit").exists()


@pytest.mark.parametrize("weights", ["rnn.pt", "lstm.safetensors"])
def test_the_recorded_weights_hash_is_of_the_file_read(project, weights):
    import hashlib

    kind = "lstm" if weights.startswith("lstm") else "rnn"
    subject = load_user_model(_spec(project), project / weights, {"kind": kind})
    expected = hashlib.sha256((project / weights).read_bytes()).hexdigest()
    assert subject.metadata["user_model"]["weights_sha256"] == expected


def test_a_truncated_safetensors_weights_file_is_one_line(project, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((project / "lstm.safetensors").read_bytes()[:200])
    with pytest.raises(UserModelError, match="not a readable safetensors file") as caught:
        load_user_model(_spec(project), cut, {"kind": "lstm"})
    assert len(str(caught.value).splitlines()) == 1


def test_recipe_code_is_imported_only_when_it_runs_and_announced_or_refused(project, tmp_path, capsys):
    analyses = project / "analyses"
    marker = tmp_path / "imported"
    (analyses / "loud.py").write_text(f"open({str(marker)!r}, 'w').close()\n" + MODULE_SOURCE)
    recipe = analyses / "loud.toml"
    recipe.write_text('name = "loud"\nanalysis = "robustness"\noutput = "loud"\nmodel = "analyses/loud.py:build"\n'
                      'data = "data.npz"\n[settings]\ngrid = {gaussian = [0.0]}\nseeds = 1\n')
    load_recipe(recipe)
    assert not marker.exists()  # validating a recipe runs none of its code
    assert main(["reproduce", str(recipe), "--out", str(tmp_path / "refused"), "--no-code", "--quiet"]) == 2
    assert "no code allowed" in capsys.readouterr().err and not marker.exists()
    existing = tmp_path / "taken"
    existing.write_text("not a report directory")
    assert main(["reproduce", str(recipe), "--out", str(existing), "--quiet"]) == 2
    assert not marker.exists()  # an output location that is refused is refused before any code runs
    assert main(["reproduce", str(recipe), "--out", str(tmp_path / "ran"), "--quiet"]) == 0
    assert f"recipe loud runs code from {analyses / 'loud.py'}" in capsys.readouterr().err and marker.exists()
    (analyses / "loud.toml").unlink()
    (analyses / "loud.py").unlink()


def test_a_recipe_path_that_is_not_a_regular_file_is_refused_without_reading(tmp_path):
    import os

    fifo = tmp_path / "analyses" / "pipe.toml"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        load_recipe(fifo)
