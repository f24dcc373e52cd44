"""The command line, a recipe and the audit run the same pipelines: for one model and equal
settings they report the same numbers (certificates, Hessian, robustness)."""
import csv
import json

import pytest

from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.models import ModelConfig, build_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("front-ends")
    (root / "models").mkdir()
    path = root / "models" / "m.safetensors"
    model = build_model(ModelConfig("lipschitz", 1, 4, 10, eps=0.1, gamma_a=1.0, gamma_w=0.0), seed=0)
    save_checkpoint(path, model, {"task": {"name": "digits", "seed": 0, "options": {}}})
    return path


def _recipe(root, name, analysis, settings):
    (root / "analyses").mkdir(exist_ok=True)
    lines = [f'name = "{name}"', f'analysis = "{analysis}"', 'task = "digits"', "seed = 0", f'output = "{name}"',
             'checkpoints = ["models/m.safetensors"]', "[settings]"] + [f"{k} = {v}" for k, v in settings.items()]
    path = root / "analyses" / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_recipe_and_audit_report_equal_numbers(checkpoint, tmp_path):
    root = checkpoint.parent.parent
    assert main(["stability", str(checkpoint), "--json", str(tmp_path / "s.json"), "--quiet"]) in (0, 1)
    # The audit deflates its trace by the λ run's Krylov basis: the same settings here.
    assert main(["hessian", str(checkpoint), "--batch-size", "128", "--batches", "1", "--trace", "--trace-matvecs", "60",
                 "--trace-method", "deflated", "--json", str(tmp_path / "h.json"), "--quiet"]) == 0
    assert main(["robustness", str(checkpoint), "--input-noise", "0,0.1", "--param-noise", "0,0.05", "--seeds", "3",
                 "--max-samples", "1000", "--out", str(tmp_path / "r.csv"), "--quiet"]) == 0
    recipes = [_recipe(root, "cert", "certificates", {"time_budget": 20.0}),
               _recipe(root, "hess", "hessian", {"batch_size": 128, "batches": 1, "trace_matvecs": 60, "density": "false",
                                                 "trace_method": '"deflated"'}),
               _recipe(root, "rob", "robustness", {"seeds": 3, "max_samples": 1000,
                                                   "grid": "{ gaussian = [0.0, 0.1], gaussian-relative = [0.0, 0.05] }"})]
    assert main(["reproduce", *map(str, recipes), "--out", str(tmp_path / "figures"), "--quiet"]) == 0
    assert main(["audit", str(checkpoint), "--out", str(tmp_path / "audit"), "--levels", "gaussian:0,0.1",
                 "--levels", "gaussian-relative:0,0.05", "--quiet"]) == 0

    audit = json.loads((tmp_path / "audit" / "report.json").read_text())
    cli_hessian = json.loads((tmp_path / "h.json").read_text())
    recipe_hessian = json.loads((tmp_path / "figures" / "hess.json").read_text())["rows"][0]
    for key in ("lambda_max", "lambda_min"):
        assert cli_hessian[key] == recipe_hessian[key] == audit["hessian"][key]
    assert cli_hessian["trace"]["estimate"] == recipe_hessian["trace"] == audit["hessian"]["trace"]["estimate"]
    assert cli_hessian["trace"]["ci_halfwidth"] == recipe_hessian["trace_ci95"] == audit["hessian"]["trace"]["ci_halfwidth"]

    def accuracies(rows):
        return {(r["perturbation"], float(r["level"])): float(r["accuracy_mean"]) for r in rows}

    with open(tmp_path / "r.csv") as stream:
        cli_rows = list(csv.DictReader(stream))
    cli_means = {}
    for row in cli_rows:
        cli_means.setdefault((row["perturbation"], float(row["level"])), []).append(float(row["accuracy"]))
    cli_means = {key: sum(v) / len(v) for key, v in cli_means.items()}
    recipe_summary = json.loads((tmp_path / "figures" / "rob.json").read_text())["summary"]
    assert cli_means == pytest.approx(accuracies(recipe_summary), abs=0) == accuracies(audit["robustness"]["summary"])
    assert len(cli_means) == 4

    cli_certificates = {c["name"]: c for c in json.loads((tmp_path / "s.json").read_text())["certificates"]}
    recipe_certificates = {r["certificate"]: r for r in json.loads((tmp_path / "figures" / "cert.json").read_text())["rows"]}
    audit_certificates = {c["name"]: c for c in audit["stability"]["certificates"]}
    assert set(cli_certificates) == set(recipe_certificates) == set(audit_certificates) == {"euler-norm", "euler-lmi"}
    for name, found in cli_certificates.items():
        assert found["holds"] == recipe_certificates[name]["holds"] == audit_certificates[name]["holds"]
        assert found["rate"] == recipe_certificates[name]["rate"] == audit_certificates[name]["rate"]


def test_stability_starts_with_one_verdict_and_exits_0_when_a_stronger_certificate_holds(tmp_path, capsys):
    from pathlib import Path

    contracting = Path(__file__).resolve().parents[2] / "models" / "digits-contracting.safetensors"
    assert main(["stability", str(contracting), "--quiet", "--json", str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("certified: euler-lmi, rate 0.998376 per step (tier stored evidence (construction))")
    certificates = {c["name"]: c["holds"] for c in json.loads((tmp_path / "s.json").read_text())["certificates"]}
    assert certificates == {"euler-lmi": True, "euler-norm": False}  # the weaker norm test fails beside it


def test_stability_exits_1_with_the_strongest_reason_when_nothing_holds(checkpoint, tmp_path, capsys):
    from lrnn_analysis.models import ModelConfig, build_model

    model = build_model(ModelConfig("lipschitz", 1, 4, 10, eps=0.5, gamma_a=-2.0, gamma_w=0.0), seed=0)
    path = tmp_path / "unstable.safetensors"
    save_checkpoint(path, model, {"task": {"name": "digits", "seed": 0, "options": {}}})
    assert main(["stability", str(path), "--quiet", "--time-budget", "10"]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("not certified: no input-uniform certificate can exist")
