"""lrnn stability, certify and hessian: tables on stdout, JSON out, exit codes 0/1/2."""
import csv
import json

import pytest

from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.models import ModelConfig, build_model

TASK = {"name": "digits", "seed": 0, "options": {}}


@pytest.fixture
def checkpoints(tmp_path):
    stable = build_model(ModelConfig("lipschitz", 1, 6, 10, eps=0.1, gamma_a=1.0, gamma_w=0.0, init_std=0.1), seed=0)
    unstable = build_model(ModelConfig("lipschitz", 1, 6, 10, eps=0.1, gamma_a=-0.5, init_std=0.1), seed=0)
    gated = build_model(ModelConfig("lipschitz-gated", 1, 6, 10), seed=0)
    return {name: save_checkpoint(tmp_path / f"{name}.safetensors", model, {"task": TASK})
            for name, model in (("stable", stable), ("unstable", unstable), ("gated", gated))}


def test_stability_exit_codes_and_json(checkpoints, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["stability", str(checkpoints["stable"]), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "diagnostics" in printed and "euler-norm" in printed and "euler-lmi" in printed
    data = json.loads(out.read_text())
    assert {c["name"] for c in data["certificates"]} == {"euler-norm", "euler-lmi"}
    assert all(c["holds"] for c in data["certificates"]) and data["spectrum"]["kind"].startswith("diagnostics")
    assert main(["stability", str(checkpoints["unstable"]), "--certificates", "ct-norm,euler-norm"]) == 1
    assert "no input-uniform certificate can exist" in capsys.readouterr().out
    assert main(["stability", str(checkpoints["gated"])]) == 2
    assert "no Lur'e form" in capsys.readouterr().err
    assert main(["stability", str(checkpoints["stable"]), "--certificates", "warp-norm"]) == 2


def test_certify_parameterization_and_phase_table(tmp_path, capsys):
    assert main(["certify", "--beta", "0.75", "--gamma-a", "1", "--gamma-w", "0", "--eps", "0.1", "--radius", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "ct-norm" in printed and "largest certified r*" in printed
    assert main(["certify", "--beta", "0.75", "--gamma-a", "0.001", "--radius", "1"]) == 1
    capsys.readouterr()
    out = tmp_path / "phase.csv"
    assert main(["certify", "--beta", "0.75", "--gamma-a", "1", "--gamma-w", "0", "--eps", "0.1", "--radius", "0.1",
                 "--phase-betas", "0:1:3", "--phase-gammas", "0.5,1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 * 2 * 3 + 3 and set(rows[0]) >= {"beta_A", "gamma_A", "beta_W", "gamma_W", "test", "holds",
                                                           "margin", "r_star", "point"}
    assert [(r["beta_A"], r["gamma_A"]) for r in rows if r["point"] == "user"] == [("0.75", "1.0")] * 3
    assert main(["certify", "--beta", "0.75", "--gamma-a", "1", "--radius", "0.1", "--phase-betas", "0,1"]) == 2


def test_hessian_cli_native_and_pyhessian(checkpoints, tmp_path, capsys):
    out = tmp_path / "h.json"
    assert main(["hessian", str(checkpoints["stable"]), "--batch-size", "32", "--top-k", "2", "--trace",
                 "--params", "M_A,M_W", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "lambda_max" in printed and "trace" in printed
    data = json.loads(out.read_text())
    assert data["lambda_max"] >= data["lambda_min"] and data["trace"]["ci_halfwidth"] >= 0
    assert data["operator"]["params"] == ["M_A", "M_W"] and data["seed"] == 0
    assert main(["hessian", str(checkpoints["stable"]), "--batch-size", "32", "--backend", "pyhessian", "--quiet"]) == 0
    assert "PyHessian" in capsys.readouterr().out
    assert main(["hessian", str(checkpoints["stable"]), "--task", "adding", "--quiet"]) == 2
    assert "does not fit task adding" in capsys.readouterr().err
