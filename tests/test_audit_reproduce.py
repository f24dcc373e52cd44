"""End to end: train a tiny model, audit it with passing and failing gates, reproduce a tiny recipe."""
import json
import re
import pickle
from pathlib import Path

import pytest

from lrnn_analysis import audit_report as report_module
from lrnn_analysis.checkpoints import load_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.pipelines.audit import Gate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    assert main(["train", "--task", "digits", "--hidden", "8", "--epochs", "6", "--gamma-a", "1", "--gamma-w", "0",
                 "--constrain", "euler-norm", "--margin", "0.01", "--out", str(path), "--quiet"]) == 0
    return path


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


def test_reproduce_a_tiny_recipe(trained, tmp_path, capsys):
    (tmp_path / "analyses").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.safetensors").write_bytes(trained.read_bytes())
    recipes = {
        "spectra.toml": 'name = "spectra"\nanalysis = "spectra"\noutput = "spectra"\ncheckpoints = ["models/tiny.safetensors"]\n',
        "robust.toml": ('name = "robust"\nanalysis = "robustness"\ntask = "digits"\noutput = "robust"\nseed = 0\n'
                        'checkpoints = ["models/tiny.safetensors"]\nlabels = ["tiny"]\n'
                        '[settings]\nseeds = 2\nmax_samples = 50\n[settings.grid]\ngaussian = [0.0, 0.1]\n'),
        "phase.toml": ('name = "phase"\nanalysis = "phase-diagram"\noutput = "phase"\n'
                       '[settings]\nbetas = {linspace = [0.0, 1.0, 3]}\ngammas = [0.0, 0.5, 1.0]\nradius = 0.1\neps = 0.1\ngamma_w = 0.0\n'),
        "hessian.toml": ('name = "hessian"\nanalysis = "hessian"\ntask = "digits"\noutput = "hessian"\n'
                         'checkpoints = ["models/tiny.safetensors"]\n[settings]\nbatch_size = 32\ntrace_matvecs = 20\n'
                         'density_probes = 2\ndensity_steps = 10\n'),
        "certs.toml": ('name = "certs"\nanalysis = "certificates"\ntask = "digits"\noutput = "certs"\n'
                       'checkpoints = ["models/tiny.safetensors"]\n'),
        "log.toml": 'name = "log"\nanalysis = "training-spectra"\noutput = "log"\ncheckpoints = ["models/tiny.safetensors"]\n',
        "land.toml": ('name = "land"\nanalysis = "landscape"\ntask = "digits"\noutput = "land"\n'
                      'checkpoints = ["models/tiny.safetensors"]\n[settings]\nbatch_size = 32\n'
                      'steps = {linspace = [-0.5, 0.5, 3]}\nplane_steps = [-0.5, 0.0, 0.5]\n'),
    }
    for name, text in recipes.items():
        (tmp_path / "analyses" / name).write_text(text)
    out = tmp_path / "figures"
    assert main(["reproduce", "--analyses-dir", str(tmp_path / "analyses"), "--out", str(out), "--quiet"]) == 0
    for stem in ("spectra", "robust", "phase", "hessian", "hessian_density", "certs", "log", "land", "land_plane"):
        for suffix in (".csv", ".json", ".png", ".pdf"):
            assert (out / f"{stem}{suffix}").exists(), f"{stem}{suffix}"
    provenance = json.loads((out / "robust.json").read_text())
    assert provenance["recipe"]["seed"] == 0 and "torch" in provenance["environment"]
    assert set(provenance["checkpoint_sha256"].values()) == {load_checkpoint(trained).sha256}
    printed = capsys.readouterr().out
    assert "recipe" in printed
    assert re.search(r"\d+ of 27 \(cell, test\) pairs certified \(9 cells x 3 tests\)", printed), printed
    (tmp_path / "analyses" / "bad.toml").write_text('name = "x"\nanalysis = "nonsense"\noutput = "x"\n')
    assert main(["reproduce", str(tmp_path / "analyses" / "bad.toml"), "--out", str(out)]) == 2


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


def test_every_committed_recipe_validates_against_the_committed_models():
    """`make run` validates all recipes before computing anything: a recipe naming a model that is
    not committed (or two recipes sharing an output) would stop it at once."""
    from lrnn_analysis.recipes import check_recipe_set, find_recipes, load_recipe

    root = Path(__file__).resolve().parents[1]
    recipes = [load_recipe(path) for path in find_recipes(root / "analyses")]
    check_recipe_set(recipes)
    for recipe in recipes:
        assert all(path.is_file() for path in recipe.checkpoint_paths()), recipe.path
    assert {"hessian-comparison", "smnist-hessian", "smnist-robustness"} <= {r.name for r in recipes}
