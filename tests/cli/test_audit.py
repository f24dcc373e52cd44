"""`lrnn audit`: gates that pass and fail, bad gates and levels refused before any work, the knobs passed on,
an interrupted audit leaving nothing; audits of reference files, user models, LSTMs and REN evidence."""
import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from helpers import snapshot, write_report
from lrnn_analysis import audit_report as report_module
from lrnn_analysis import recipes
from lrnn_analysis.checkpoints import load_checkpoint
from lrnn_analysis.cli import UsageError, main
from lrnn_analysis.cli.audit import audit_grid
from lrnn_analysis.outputs import OutputDirectory
from lrnn_analysis.pipelines.audit import Gate
from lrnn_analysis.stability.evidence import (
    REN_CERTIFICATE,
)
from lrnn_analysis.usermodule import load_user_model
from user_project import hand_accuracy, model_spec

from .helpers import CKPT, fails, parse_args


def test_audit_passing_and_failing_gates(trained, tmp_path, capsys):
    out = tmp_path / "audit"
    code = main(["audit", str(trained), "--out", str(out), "--quiet", "--gate", "min-accuracy=0.2",
                 "--gate", "max-lambda=1e6", "--gate", "certified=euler-norm", "--gate", "max-accuracy-drop=gaussian:0.15:1.0"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and len(report["gates"]) == 4
    assert {"checkpoint", "config", "task", "clean", "stability", "hessian", "robustness", "settings", "timings",
            "environment"} <= set(report)
    assert report["hessian"]["lambda_max"] >= report["hessian"]["lambda_min"]
    assert any(r["level"] == 0.15 for r in report["robustness"]["summary"])
    markdown = (out / "report.md").read_text()
    assert "PASS" in markdown and "![spectra](spectra.png)" in markdown
    digest = load_checkpoint(trained).sha256
    assert report["checkpoint_sha256"] == digest and f"SHA-256: `{digest}`" in markdown
    assert (out / "spectra.png").exists() and (out / "robustness.pdf").exists()
    capsys.readouterr()
    code = main(["audit", str(trained), "--out", str(out), "--quiet", "--gate", "min-accuracy=0.999"])
    assert code == 1
    assert json.loads((out / "report.json").read_text())["passed"] is False
    assert "a gate failed" in capsys.readouterr().out


@pytest.mark.parametrize("gate", ["speed=3", "min-accuracy=high", "certified=warp-lmi", "max-accuracy-drop=gaussian:0.1"])
def test_bad_gates_exit_2_before_any_work(trained, tmp_path, capsys, gate):
    assert main(["audit", str(trained), "--out", str(tmp_path / "a"), "--gate", gate, "--quiet"]) == 2
    assert "bad gate" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError):
        Gate.parse(gate)


def test_interrupted_audit_leaves_nothing(trained, tmp_path, monkeypatch):
    def interrupt(result, out):
        out.path("half.png").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "_figures", interrupt)
    assert main(["audit", str(trained), "--out", str(tmp_path / "audit"), "--quiet"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_audit_of_a_reference_implementation_state_dict(tmp_path):
    import torch

    n = 6
    state = {"B": torch.randn(n, n) / n, "C": torch.randn(n, n) / n, "E.weight": torch.randn(n, 1),
             "E.bias": torch.zeros(n), "D.weight": torch.randn(10, n), "D.bias": torch.zeros(10)}
    path = tmp_path / "LipschitzRNN_mnist_T_784_units_6_beta_0.75_alpha_1_gamma_0.001_eps_0.03_solver_euler_seed_1.pkl"
    torch.save(state, path)
    history = {"loss": [3.0, 2.0], "eigA": [-0.1, -0.05], "eigW": [0.2, 0.1], "testacc": [0.5, 0.7]}
    path.with_name(path.name.replace("_gamma_", "_gamma_A_").replace(".pkl", "_loss.pkl")).write_bytes(pickle.dumps(history))
    out = tmp_path / "audit"
    assert main(["audit", str(path), "--task", "digits", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["eps"] == 0.03 and report["config"]["beta_a"] == 0.75
    assert report["reference"]["model"] == "LipschitzRNN" and report["reference"]["hparams"]["eps"]["source"] == "file name"
    assert "## Reference implementation file" in (out / "report.md").read_text()
    assert (out / "training_log.csv").is_file() and (out / "training_spectra.png").is_file()
    assert {c["name"] for c in report["stability"]["certificates"]} == {"euler-norm", "euler-lmi"}


def test_the_audit_command_passes_its_knobs_on(tmp_path, capsys):
    checkpoint = tmp_path / "m.safetensors"
    assert main(["train", "--task", "digits", "--hidden", "3", "--epochs", "1", "--out", str(checkpoint), "--quiet"]) == 0
    out = tmp_path / "audit"
    assert main(["audit", str(checkpoint), "--out", str(out), "--quiet", "--hessian-batches", "2", "--trace-matvecs", "10",
                 "--seeds", "1", "--levels", "param-noise:0.05", "--gate", "max-trace=1e9", "--max-samples", "50"]) == 0
    report = json.loads((out / "report.json").read_text())
    settings = report["settings"]
    assert (settings["hessian_batches"], settings["trace_matvecs"], settings["seeds"], settings["max_samples"]) == (2, 10, 1, 50)
    assert report["clean"]["n"] == 50 and report["robustness"]["settings"]["n"] == 50  # one definition of the test sample
    assert settings["grid"] == {"gaussian-relative": [0.05]}
    assert "256 training samples" in (out / "report.md").read_text()
    assert "threshold" in capsys.readouterr().out


@pytest.mark.parametrize("kind,weights", [("rnn", "rnn.pt"), ("lstm", "lstm.safetensors")])
def test_audit_of_a_user_model_on_its_own_data(project, tmp_path, capsys, kind, weights):
    out = tmp_path / "audit"
    code = main(["audit", "--model", model_spec(project), "--model-arg", f"kind={kind}", "--model-arg", "hidden=8",
                 "--weights", str(project / weights), "--data", str(project / "data.npz"), "--out", str(out),
                 "--quiet", "--gate", "min-accuracy=0.5"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    accuracy = hand_accuracy(project, weights, kind)
    assert accuracy > 0.6  # trained: far above the 1/3 of chance
    assert report["clean"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert report["checkpoint"] == str(project / weights)
    assert report["checkpoint_sha256"] == hashlib.sha256((project / weights).read_bytes()).hexdigest()
    assert report["module_sha256"] == hashlib.sha256((project / "mymodels.py").read_bytes()).hexdigest()
    printed = capsys.readouterr().out
    assert f"clean test accuracy {accuracy:.4f}" in printed
    if kind == "rnn":
        assert {c["name"] for c in report["stability"]["certificates"]} == {"map-norm", "map-lmi"}
    else:
        assert report["stability"]["lure_form"] is False
        assert report["model"]["recurrent"] == ["lstm.weight_hh_l0"]


def test_audit_of_a_user_lstm_certifies_and_gates_its_layer(project, tmp_path, capsys):
    """No Lur'e form of the whole model: the audit certifies its torch.nn LSTM (as `lrnn stability`
    does) and `certified=lstm-contraction` gates on that layer's condition."""
    from lrnn_analysis.stability import certify_recurrent

    module = load_user_model(model_spec(project), project / "lstm.safetensors", {"kind": "lstm"}).module
    bound = float(np.abs(np.load(project / "data.npz")["x_test"]).max())
    direct = certify_recurrent(module, input_bound=bound)[0]
    common = ["audit", "--model", model_spec(project), "--model-arg", "kind=lstm", "--weights", str(project / "lstm.safetensors"),
              "--data", str(project / "data.npz"), "--quiet", "--seeds", "1", "--trace-matvecs", "10"]
    out = tmp_path / "bounded"
    code = main(common + ["--out", str(out), "--input-bound", str(bound), "--gate", "certified=lstm-contraction",
                          "--gate", "certified=map-lmi"])
    assert code == 1  # map-lmi does not apply to an LSTM
    report = json.loads((out / "report.json").read_text())
    stacks = report["stability"]["recurrent_layers"]
    assert [(c["module"], c["kind"], c["holds"], c["reason"]) for c in stacks] == [("lstm", "lstm", direct.holds, direct.reason)]
    assert "certificates" not in report["stability"]
    assert "torch.nn recurrent layers are certified" in report["stability"]["reason"]
    lstm_gate, map_gate = report["gates"]
    assert lstm_gate["passed"] == direct.holds and map_gate["passed"] is False
    assert "map-lmi does not apply to lstm layer 0 (lstm)" in map_gate["detail"]
    assert not direct.holds  # the trained LSTM's contraction bound is far above 1
    assert lstm_gate["observed"] == pytest.approx(direct.layers[0][0].margin)
    markdown = (out / "report.md").read_text()
    assert "| lstm | lstm | 0 | lstm-contraction |" in markdown
    assert f"torch.nn lstm lstm: {'holds' if direct.holds else 'fails'}" in capsys.readouterr().out
    out = tmp_path / "unbounded"
    assert main(common + ["--out", str(out), "--gate", "certified=lstm-contraction"]) == 1
    gate = json.loads((out / "report.json").read_text())["gates"][0]
    assert gate["passed"] is False and "no certificate without an input bound" in gate["detail"]


@pytest.mark.parametrize("spelling", ["gaussian", "input-noise"])
def test_gates_name_a_perturbation_in_either_spelling(spelling):
    gate = parse_args("audit", CKPT, "--out", "a", "--gate", f"max-accuracy-drop={spelling}:0.1:0.05").gate[0]
    assert str(gate) == "max-accuracy-drop=gaussian:0.1:0.05"
    gate = parse_args("audit", CKPT, "--out", "a", "--gate", "max-accuracy-drop=param-noise:0.02:0.1").gate[0]
    assert gate.value == "gaussian-relative:0.02:0.1"
    assert main(["audit", CKPT, "--out", "a", "--gate", "max-accuracy-drop=hessian-direction:0.1:0.1"]) == 2


def test_audit_levels_take_either_spelling_and_refuse_a_kind_twice(capsys):
    args = parse_args("audit", CKPT, "--out", "a", "--levels", "input-noise:0,0.1", "--levels", "salt-pepper:0.01",
                  "--hessian-batches", "2", "--trace-matvecs", "30", "--seeds", "2")
    assert audit_grid(args.levels) == {"gaussian": [0.0, 0.1], "salt-pepper": [0.01]}
    assert (args.hessian_batches, args.trace_matvecs, args.seeds) == (2, 30, 2)
    with pytest.raises(UsageError, match="twice"):
        audit_grid(parse_args("audit", CKPT, "--out", "a", "--levels", "gaussian:0.1", "--levels", "input-noise:0.2").levels)
    for bad in ("warp:0.1", "salt-pepper:2", "hessian-direction:0.1", "gaussian"):
        assert main(["audit", CKPT, "--out", "a", "--levels", bad]) == 2
        assert "--levels" in capsys.readouterr().err


def test_audit_reports_a_ren_certificate_from_stored_evidence(tmp_path, capsys):
    ckpt = tmp_path / "ren.safetensors"
    assert main(["train", "--task", "digits", "--arch", "ren", "--hidden", "4", "--epochs", "1", "--out", str(ckpt),
                 "--quiet"]) == 0
    out = tmp_path / "audit"
    assert main(["audit", str(ckpt), "--out", str(out), "--quiet", "--gate", f"certified={REN_CERTIFICATE}"]) == 0
    assert "verified from stored evidence" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["stability"]["stored_evidence"]["status"] == "verified"
    assert [c["name"] for c in report["stability"]["certificates"]] == [REN_CERTIFICATE]
    assert [(g["gate"], g["passed"]) for g in report["gates"]] == [(f"certified={REN_CERTIFICATE}", True)]
    assert "Verified from stored evidence" in (out / "report.md").read_text()


@pytest.mark.usefixtures("time_limit")
def test_reference_state_dict_with_a_scalar_B(tmp_path, capsys):
    n = 4
    state = {"B": torch.tensor(1.0), "C": torch.randn(n, n), "E.weight": torch.randn(n, 1), "E.bias": torch.randn(n),
             "D.weight": torch.randn(10, n), "D.bias": torch.randn(10)}
    torch.save(state, tmp_path / "ref.pt")
    fails(capsys, ["audit", str(tmp_path / "ref.pt"), "--task", "digits", "--out", str(tmp_path / "a"),
                    "--beta", "0.75", "--gamma", "0.001", "--eps", "0.1", "--alpha", "1"], "B has shape ()",
          path=tmp_path / "ref.pt")
    assert not (tmp_path / "a").exists()


def test_an_audit_into_a_report_of_another_command_needs_force(tmp_path, checkpoint, capsys):
    target = tmp_path / "figs"
    with OutputDirectory(target, recipes.REPRODUCE_WRITER) as out:
        write_report(out, "old")
    before = snapshot(target)
    assert main(["audit", str(checkpoint), "--out", str(target), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err and snapshot(target) == before


def test_audit_of_a_language_model_gates_on_perplexity(language_project, tmp_path, capsys):
    from language_model import direct_perplexity, load_language_model

    data = np.load(language_project / "data.npz")
    clean = direct_perplexity(load_language_model(language_project), data["x_test"], data["y_test"], data["mask_test"])
    out = tmp_path / "audit"
    spec = ["--model", f"{language_project / 'lm.py'}:build", "--weights", str(language_project / "lm.pt"),
            "--data", str(language_project / "data.npz")]
    code = main(["audit", *spec, "--out", str(out), "--quiet", "--trace-matvecs", "10",
                 "--seeds", "1", "--gate", f"max-perplexity={clean * 1.01}", "--gate", "max-metric-drop=gaussian:0.1:100",
                 "--gate", "max-mse=1"])
    assert code == 1  # max-mse fails: a language model has no mse
    report = json.loads((out / "report.json").read_text())
    assert report["clean"]["perplexity"] == pytest.approx(clean, rel=1e-5)
    assert report["clean"]["count"] == int(data["mask_test"].sum())
    assert [g["passed"] for g in report["gates"]] == [True, True, False]
    assert "has no mse" in report["gates"][2]["detail"]
    assert {r["metric"] for r in report["robustness"]["summary"]} == {"perplexity"}
    markdown = (out / "report.md").read_text()
    assert "| clean test perplexity |" in markdown and "perplexity rise" in markdown
    assert f"clean test perplexity {clean:.4g}" in capsys.readouterr().out
