"""The leakage guard: a model trained on another split of a built-in task is flagged."""
import torch

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.model_under_analysis import ModelUnderAnalysis
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.pipelines.audit import AuditSettings
from lrnn_analysis.pipelines.audit import run as run_audit
from lrnn_analysis.robustness import SweepModel, sweep
from lrnn_analysis.training import TrainResult, TrainSettings, training_metadata
from lrnn_analysis.training_split import LEAKAGE_WARNING, check_training_data, split_fingerprint


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
