"""lrnn hessian --operator/--estimate: printed table, JSON, and bad options as exit 2."""
import json

from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.models import ModelConfig, build_model

TASK = {"name": "digits", "seed": 0}


def test_hessian_cli_ggn_with_estimates_and_lenient_params(tmp_path, capsys):
    model = build_model(ModelConfig("antisymmetric", 1, 3, 10, eps=0.1, init_std=0.1), seed=0)
    path = save_checkpoint(tmp_path / "anti.safetensors", model, {"task": TASK})
    out = tmp_path / "h.json"
    assert main(["hessian", str(path), "--batch-size", "8", "--operator", "ggn", "--params", "M_A,M_W,D.*",
                 "--estimate", "blocks", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ggn" in printed and "M_W" in printed
    assert "matching nothing in this model: M_A" in printed
    data = json.loads(out.read_text())
    assert data["operator"]["operator"] == "ggn" and data["operator"]["params"] == ["M_W", "D.weight", "D.bias"]
    assert [row["param"] for row in data["blocks"]["rows"]] == ["M_W", "D.weight", "D.bias"]
    assert data["lambda_min"] is None and data["eigen"]["which"] == "LA" and data["frobenius"] is None
    assert main(["hessian", str(path), "--operator", "fisher", "--mc-samples", "2", "--batch-size", "8", "--params", "D.bias",
                 "--quiet"]) == 0
    assert "2 label sample(s)" in capsys.readouterr().out
    assert main(["hessian", str(path), "--estimate", "kfac", "--quiet"]) == 2
    assert "estimates must be among" in capsys.readouterr().err
    assert main(["hessian", str(path), "--params", "nope", "--quiet"]) == 2
