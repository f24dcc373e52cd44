"""run_audit's curvature part: Hessian and GGN λ_max, per-block table (recurrent matrices first), sample count."""
import json

import numpy as np
import pytest
from torch import nn

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.hessian import GGNOperator
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.audit_report import _markdown
from lrnn_analysis.pipelines.audit import AuditSettings
from lrnn_analysis.pipelines.audit import run as run_audit


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
    assert result.tables["hessian_blocks"][0]["param"] == "M_A"
    markdown = _markdown(result, {})
    assert "GGN λ_max" in markdown and "16 training samples" in markdown and "recurrent matrices first" in markdown
