"""The audit: presets, knobs and gates reaching report.json and report.md, curvature and robustness
sections, regression tasks, user modules with and without a Lur'e form, LSTM layers."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from lrnn_analysis.audit_report import _markdown
from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.hessian import GGNOperator, HessianOperator
from lrnn_analysis.model_under_analysis import ModelUnderAnalysis
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.pipelines.audit import AuditSettings, Gate, _evaluate_gate
from lrnn_analysis.pipelines.audit import run as run_audit
from lrnn_analysis.robustness import Perturbation, SweepModel, perturb_parameters, sweep
from user_module import accuracy_by_hand, user_subject


class _LSTMClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(2, 6, batch_first=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


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


def test_audit_reports_hessian_and_ggn_lambda_max_and_the_block_table():
    task = load_task("digits", seed=0)
    model = build_model(ModelConfig("lipschitz", task.input_dim, 3, task.output_dim, eps=0.1), seed=0)
    settings = AuditSettings(certificate_budget=5.0, hessian_batch_size=16, trace_matvecs=12,
                             grid={"gaussian": (0.0,)}, seeds=1, max_samples=32)
    result = run_audit(model, task, settings, label="tiny")
    report = json.loads(json.dumps(result.report, allow_nan=False))
    rows = report["hessian"]["blocks"]["rows"]
    assert [row["param"] for row in rows][:2] == ["M_A", "M_W"]
    assert {row["param"] for row in rows} == {name for name, _ in model.named_parameters()}
    assert report["ggn"]["operator"]["operator"] == "ggn" and report["ggn"]["operator"]["n_samples"] == 16
    assert report["hessian"]["operator"]["n_samples"] == 16
    x, y = task.train.batches(16, 1)[0]
    G = GGNOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64").to_dense().numpy()
    assert report["ggn"]["lambda_max"] == pytest.approx(np.linalg.eigvalsh(G)[-1], rel=1e-3)
    assert any("started warm" in note for note in report["ggn"]["notes"])
    assert result.tables["hessian_blocks"][0]["param"] == "M_A"
    markdown = _markdown(result, {})
    assert "GGN λ_max" in markdown and "16 training samples" in markdown and "recurrent matrices first" in markdown


@pytest.mark.usefixtures("time_limit")
@pytest.mark.parametrize("text", ["min-accuracy=nan", "max-trace=-inf", "max-lambda=1e999", "min-accuracy=-0.1",
                                  "max-accuracy-drop=gaussian:0.1:2", "max-perplexity=0.5", "max-perplexity=inf",
                                  "max-mse=-1", "max-metric-drop=gaussian:0.1", "max-metric-drop=occlusion:2:1",
                                  "max-metric-drop=hessian-direction:0.1:1"])
def test_gate_thresholds_are_finite_and_in_range(text):
    with pytest.raises(ValueError, match="bad gate"):
        Gate.parse(text)


def test_metric_gates_parse_with_their_ranges():
    assert str(Gate.parse("max-metric-drop=input-noise:0.1:5")) == "max-metric-drop=gaussian:0.1:5"  # drops in the metric's units
    assert Gate.parse("max-perplexity=1") == Gate("max-perplexity", "1") and Gate.parse("max-mse=0") == Gate("max-mse", "0")


def test_the_audit_report_of_a_regression_task_draws_the_loss(task_checkpoints, tmp_path):
    from lrnn_analysis.audit_report import AUDIT_WRITER, write_audit_into
    from lrnn_analysis.builtin_tasks import load_task
    from lrnn_analysis.model_under_analysis import load_model
    from lrnn_analysis.outputs import OutputDirectory
    from lrnn_analysis.pipelines.audit import AuditSettings
    from lrnn_analysis.pipelines.audit import run as run_audit

    settings = AuditSettings(certificate_budget=5.0, hessian_batch_size=16, trace_matvecs=8, seeds=2, max_samples=20,
                             grid={"gaussian-relative": (0.0, 0.1)})
    result = run_audit(load_model(task_checkpoints[1]), load_task("adding", seed=0, length=5), settings, label="adding")
    with OutputDirectory(tmp_path / "audit", AUDIT_WRITER) as directory:
        out = write_audit_into(result, directory)
    assert (out / "robustness.png").read_bytes().startswith(b"\x89PNG")


def test_audit_of_a_user_module_with_and_without_a_lure_form(user):
    _, module, task = user
    settings = AuditSettings(trace_matvecs=20, seeds=2, certificate_budget=5.0,
                             grid={"gaussian": (0.0, 0.1), "gaussian-relative": (0.0, 0.05)})
    result = run_audit(user_subject(module), task, settings)
    report = result.report
    assert report["clean"]["accuracy"] == pytest.approx(accuracy_by_hand(module, task.test.x, task.test.y), abs=1e-12)
    assert report["model"]["recurrent"] == ["rec_a", "rec_w"] and report["config"] is None
    names = {c["name"] for c in report["stability"]["certificates"]}
    assert names == {"euler-norm", "euler-lmi"}
    system = user_subject(module).lure_system()
    assert report["stability"]["spectrum"]["norm_W"] == pytest.approx(float(np.linalg.norm(system.W, 2)), rel=1e-9)
    assert report["training_data"]["warning"] is None

    bare = run_audit(ModelUnderAnalysis.from_module(module, name="bare"), task, settings)
    assert bare.report["stability"] == {"verdict": "not certified: no Lur'e form: no certificate available for this model",
                                        "lure_form": False, "form": "none", "form_check": None,
                                        "reason": "no Lur'e form: no certificate available for this model",
                                        "stored_evidence": {"status": "absent", "reason": "no stored evidence", "seconds": 0.0,
                                                            "certificate": None, "rate": None, "tier": None,
                                                            "verification": None}}
    from lrnn_analysis.audit_report import _markdown

    assert "No Lur'e form: no certificate available for this model." in _markdown(bare, {})


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
    assert report["clean"]["accuracy"] == pytest.approx(accuracy_by_hand(module, task.test.x, task.test.y), abs=1e-12)


def test_lambda_max_is_reported_with_its_sampling_spread_and_gated_on_its_range():
    from lrnn_analysis.builtin_tasks import load_task
    from lrnn_analysis.models import ModelConfig, build_model
    from lrnn_analysis.pipelines.audit import AuditSettings, _evaluate_gate
    from lrnn_analysis.pipelines.audit import run as run_audit

    task = load_task("digits", seed=0)
    model = build_model(ModelConfig("lipschitz", task.input_dim, 4, task.output_dim, eps=0.1), seed=0)
    settings = AuditSettings(certificate_budget=5.0, hessian_batch_size=32, trace_matvecs=5, seeds=1,
                             grid={"gaussian": (0.0,)}, max_samples=20)
    report = run_audit(model, task, settings).report
    spread = report["lambda_max_spread"]
    assert spread["sets"] == 3 and spread["samples_per_set"] == 32 and spread["values"][0] == report["hessian"]["lambda_max"]
    assert spread["min"] == min(spread["values"]) < spread["max"] == max(spread["values"])
    for k, value in enumerate(spread["values"][1:], start=1):  # warm-started from the first set's eigenvector
        x, y = task.train.x[32 * k:32 * (k + 1)], task.train.y[32 * k:32 * (k + 1)]
        H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), dtype="float64").to_dense().numpy()
        assert value == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-2)
    middle = (spread["min"] + spread["max"]) / 2
    undecided = _evaluate_gate(Gate.parse(f"max-lambda={middle}"), report)
    assert not undecided.passed and "undecided at this sample size" in undecided.detail
    assert _evaluate_gate(Gate.parse(f"max-lambda={spread['max'] * 1.01}"), report).passed
    assert not _evaluate_gate(Gate.parse(f"max-lambda={spread['min'] * 0.99}"), report).passed


@pytest.mark.parametrize("text, radius, minimum", [("certified-accuracy@0.25=0.7", 0.25, 0.7),
                                                   ("certified-accuracy@1=0", 1.0, 0.0)])
def test_a_certified_accuracy_gate_parses_and_prints_as_given(text, radius, minimum):
    gate = Gate.parse(text)
    assert (gate.kind, gate.radius) == ("certified-accuracy", radius)
    assert Gate.parse(str(gate)) == gate and str(gate) == f"certified-accuracy@{radius!r}={minimum!r}"


@pytest.mark.parametrize("text", ["certified-accuracy=0.5", "certified-accuracy@0.1", "certified-accuracy@-0.1=0.5",
                                  "certified-accuracy@nan=0.5", "certified-accuracy@0.1=1.5", "certified-accuracy@0.1=x",
                                  "certified-accuracy@=0.5", "certified-accuracy@1e308=0.1"])
def test_a_malformed_certified_accuracy_gate_is_refused(text):
    with pytest.raises(ValueError, match="certified-accuracy@RADIUS=MIN"):
        Gate.parse(text)


def _lipschitz_report(holds, certified):
    bound = {"holds": holds, "lipschitz": 72.8 if holds else None, "tier": "riccati" if holds else None,
             "rho": 1.0 if holds else None, "reason": "verified" if holds else "no Lur'e form"}
    rows = [{"radius": 0.1, "n": 100, "certified_accuracy": certified, "attack_accuracy": 0.6}]
    return {"lipschitz": {"bound": bound, "rows": rows}}


@pytest.mark.parametrize("minimum, passed", [(0.3, True), (0.4, True), (0.41, False)])
def test_the_certified_accuracy_gate_compares_certified_accuracy_at_its_radius(minimum, passed):
    result = _evaluate_gate(Gate.parse(f"certified-accuracy@0.1={minimum}"), _lipschitz_report(True, 0.4))
    assert (result.passed, result.observed, result.threshold) == (passed, 0.4, minimum)
    assert "attack accuracy 0.6000" in result.detail


def test_the_certified_accuracy_gate_fails_without_a_bound_even_at_zero():
    result = _evaluate_gate(Gate.parse("certified-accuracy@0.1=0"), _lipschitz_report(False, None))
    assert not result.passed and result.observed is None and result.detail == "no bound: no Lur'e form"


def test_the_thorough_preset_certifies_the_lipschitz_bound():
    assert AuditSettings.thorough().lipschitz and not AuditSettings().lipschitz
    with pytest.raises(ValueError):
        AuditSettings(radii=(0.1, -1.0))
