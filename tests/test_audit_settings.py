"""The audit's knobs between quick and --thorough reach report.json and report.md; gates record
threshold and observed value; a max-trace gate compares the upper end of the trace's CI."""
import json

import pytest

from lrnn_analysis.cli import main
from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.audit_report import _markdown
from lrnn_analysis.model_under_analysis import ModelUnderAnalysis
from lrnn_analysis.pipelines.audit import AuditSettings, Gate, _evaluate_gate
from lrnn_analysis.pipelines.audit import run as run_audit


def test_presets_and_changes_between_them():
    assert AuditSettings().preset() == "quick" and AuditSettings.thorough(3).preset() == "thorough"
    changed = AuditSettings.thorough().with_changes(seeds=2, trace_matvecs=None, grid={"input-noise": [0.1]})
    assert (changed.seeds, changed.trace_matvecs, changed.hessian_batches) == (2, 400, 8)
    assert changed.grid == {"gaussian": (0.1,)} and changed.preset() == "custom"
    assert AuditSettings().with_changes(input_bound=2.0).to_dict()["input_bound"] == 2.0
    for bad in ({"seeds": 0}, {"hessian_batches": 1.5}, {"grid": {"gaussian": [0.1], "input-noise": [0.2]}},
                {"grid": {"occlusion": [2.0]}}, {"grid": {"hessian-direction": [0.1]}}, {"input_bound": 0.0},
                {"input_bound": float("nan")}):
        with pytest.raises(ValueError):
            AuditSettings(**bad)


@pytest.mark.parametrize("threshold, passed", [(11.0, False), (12.5, True)])
def test_a_max_trace_gate_compares_the_upper_end_of_the_confidence_interval(threshold, passed):
    report = {"hessian": {"trace": {"estimate": 10.0, "ci_halfwidth": 2.0}}}
    result = _evaluate_gate(Gate.parse(f"max-trace={threshold}"), report)
    assert (result.passed, result.observed, result.threshold) == (passed, 12.0, threshold)
    assert "upper end" in result.quantity and "upper end 12" in result.detail


def test_a_failed_certificate_gate_says_no_tier_verified_it():
    report = {"stability": {"certificates": [{"name": "euler-lmi", "holds": False, "margin": -0.1, "tier": None,
                                              "reason": "no P found"}]}}
    result = _evaluate_gate(Gate.parse("certified=euler-lmi"), report)
    assert not result.passed and result.detail == "no tier verified it: no P found" and "None" not in result.detail


def test_the_knobs_reach_report_json_and_report_md(tmp_path):
    task = load_task("digits", seed=0)
    model = build_model(ModelConfig("lipschitz", task.input_dim, 3, task.output_dim, eps=0.1), seed=0)
    settings = AuditSettings(certificate_budget=5.0, hessian_batches=2, hessian_batch_size=16, trace_matvecs=12,
                             grid={"input-noise": (0.1,)}, seeds=2, max_samples=32,
                             gates=(Gate.parse("min-accuracy=0"), Gate.parse("max-accuracy-drop=input-noise:0.1:1")))
    result = run_audit(ModelUnderAnalysis.from_recurrent_model(model, {}), task, settings,
                       label=str(tmp_path / "runs" / "tiny.safetensors"))
    report = json.loads(json.dumps(result.report, allow_nan=False))
    assert report["settings"] == {**settings.to_dict(), "grid": {"gaussian": [0.1]}, "preset": "custom"}
    assert report["hessian"]["operator"]["n_samples"] == 32 and report["hessian"]["trace"]["matvecs"] <= 12
    assert {row["perturbation"] for row in report["robustness"]["summary"]} == {"gaussian"}
    assert {row["seeds"] for row in report["robustness"]["summary"]} == {2}
    accuracy, drop = report["gates"]
    assert accuracy["kind"] == "min-accuracy" and accuracy["threshold"] == 0.0 and accuracy["observed"] == report["clean"]["accuracy"]
    assert drop["gate"] == "max-accuracy-drop=gaussian:0.1:1" and drop["threshold"] == 1.0 and drop["passed"]
    markdown = _markdown(result, {})
    assert markdown.startswith("# Audit of `tiny.safetensors`\n") and str(tmp_path) not in markdown.splitlines()[0]
    assert "sample of 32 training samples" in markdown and "λ_max depends on that sample" in markdown
    assert "| Hessian sample | 32 training samples: 2 batch(es) of 16 (`--hessian-batches`) |" in markdown
    assert "| robustness seeds | 2 (`--seeds`) |" in markdown and "| preset | custom" in markdown
    robustness = markdown.split("## Robustness\n\n", 1)[1].splitlines()
    assert robustness[0] == "| perturbation | level | seeds | accuracy | ± (95% CI) | drop |" and robustness[2].startswith("| gaussian | 0 |")
    assert "\n    " not in markdown  # no indented code blocks


def test_the_audit_command_passes_its_knobs_on(tmp_path, capsys):
    checkpoint = tmp_path / "m.safetensors"
    assert main(["train", "--task", "digits", "--hidden", "3", "--epochs", "1", "--out", str(checkpoint), "--quiet"]) == 0
    out = tmp_path / "audit"
    assert main(["audit", str(checkpoint), "--out", str(out), "--quiet", "--hessian-batches", "2", "--trace-matvecs", "10",
                 "--seeds", "1", "--levels", "param-noise:0.05", "--gate", "max-trace=1e9"]) == 0
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert (settings["hessian_batches"], settings["trace_matvecs"], settings["seeds"]) == (2, 10, 1)
    assert settings["grid"] == {"gaussian-relative": [0.05]}
    assert "256 training samples" in (out / "report.md").read_text()
    assert "threshold" in capsys.readouterr().out
