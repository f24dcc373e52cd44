"""`lrnn train`: training, saving and reporting, constrained training and stored evidence, bad options
and usage errors as exit 2 in one line, no progress bar in a log."""
import json

import pytest

from lrnn_analysis.checkpoints import load_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.stability.evidence import (
    check_stored,
)


def test_a_command_run_into_a_log_writes_no_progress_bar(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["train", "--task", "digits", "--hidden", "4", "--epochs", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "epoch" not in err, err
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["epochs"] == 2


def test_cli_constrained_training_records_the_certificate(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    code = main(["train", "--task", "digits", "--hidden", "8", "--epochs", "1", "--constrain", "ct-norm", "--margin", "0.05",
                 "--gamma-a", "1", "--out", str(out), "--quiet"])
    assert code == 0
    _, metadata = load_checkpoint(out)
    record = metadata["constraint"]
    assert record["certificate"] == "ct-norm" and record["margin"] == 0.05
    assert record["certificate_result"]["holds"] is True and record["certificate_result"]["margin"] >= 0.05 - 1e-9
    assert "constraint ct-norm" in capsys.readouterr().out
    assert main(["train", "--task", "digits", "--hidden", "8", "--epochs", "1", "--constrain", "euler-norm",
                 "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 2
    assert "raise gamma_a" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_trains_ren_and_contracting_with_evidence(tmp_path, capsys):
    for arch in ("contracting", "ren"):
        out = tmp_path / f"{arch}.safetensors"
        assert main(["train", "--task", "digits", "--arch", arch, "--hidden", "4", "--epochs", "1", "--out", str(out),
                     "--quiet"]) == 0
        assert "certificate evidence stored" in capsys.readouterr().out
        certificates = ["--certificates", "euler-lmi"] if arch == "contracting" else []
        assert main(["stability", str(out), "--quiet", *certificates]) == 0
        assert "verified from stored evidence" in capsys.readouterr().out


def test_constrained_training_stores_evidence(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["train", "--task", "digits", "--hidden", "4", "--epochs", "1", "--gamma-a", "1", "--gamma-w", "0",
                 "--constrain", "euler-norm", "--margin", "0.01", "--out", str(out), "--quiet"]) == 0
    assert "certificate evidence stored: euler-lmi" in capsys.readouterr().out
    model, metadata = load_checkpoint(out)
    assert check_stored(model, metadata).verified


def test_cli_train_and_info(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    code = main(["train", "--task", "digits", "--arch", "node", "--hidden", "8", "--epochs", "2",
                 "--seed", "4", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "spectra: alpha(W)" in printed and str(out) in printed
    model, metadata = load_checkpoint(out)
    assert model.config.arch == "node" and model.config.eps == 0.1
    assert metadata["task"] == {"name": "digits", "seed": 0, "options": {}}
    assert metadata["training"]["seed"] == 4 and len(metadata["log"]) == 2
    assert metadata["environment"]["device"] == "cpu" and "torch" in metadata["environment"]
    assert metadata["command"].startswith("lrnn train --task digits")
    assert main(["info", str(out)]) == 0
    assert "alpha_W" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["hidden"] == 8


def test_cli_trains_per_step_models_on_chars_and_lorenz(tmp_path, capsys):
    out = tmp_path / "lm.safetensors"
    assert main(["train", "--task", "chars", "--length", "32", "--arch", "lstm", "--readout", "all", "--hidden", "4",
                 "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "readout all" in printed and "test perplexity" in printed and "bits per token" in printed
    model, metadata = load_checkpoint(out)
    assert (model.config.arch, model.config.readout, model.config.input_dim, model.config.output_dim) == ("lstm", "all", 97, 97)
    assert metadata["task"]["options"]["length"] == 32 and len(metadata["task"]["options"]["text_sha256"]) == 64
    assert metadata["metrics"]["test_perplexity"] > 1 and "alpha_Wf" in metadata["log"][0]
    assert main(["stability", str(out), "--input-bound", "1", "--quiet"]) in (0, 1)
    assert "lstm-contraction" in capsys.readouterr().out
    assert main(["train", "--task", "lorenz", "--length", "10", "--arch", "lipschitz", "--readout", "all", "--hidden", "4",
                 "--epochs", "1", "--out", str(tmp_path / "lorenz.safetensors"), "--quiet"]) == 0
    assert "test MSE" in capsys.readouterr().out
    assert main(["train", "--task", "chars", "--arch", "lstm", "--hidden", "4", "--epochs", "1",
                 "--out", str(tmp_path / "last.safetensors"), "--quiet"]) == 2
    assert "has a target at every step: train a model with readout 'all'" in capsys.readouterr().err
    assert main(["train", "--task", "digits", "--readout", "all", "--hidden", "4", "--epochs", "1",
                 "--out", str(tmp_path / "all.safetensors"), "--quiet"]) == 2
    assert "one target per sequence" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--eps", "-1"], "argument --eps: must be a finite number in (0, inf]"),
    (["--discretization", "rk4"], "runs with"),
    (["--task", "smnist", "--data-path", "/nonexistent.npz"], "not found"),
    (["--arch", "lstm", "--beta", "0.5"], "--beta: not read by a lstm model (it reads none of these options)"),
    (["--arch", "vanilla", "--gamma-a", "0.5", "--ode-substeps", "2"], "--gamma-a, --ode-substeps: not read by a vanilla model (it reads --init-std)"),
    (["--arch", "lipschitz", "--rho", "0.9"], "--rho: not read by a lipschitz model"),
    (["--arch", "ren", "--cond-penalty", "0.2"], "--cond-penalty: not read by a ren model (it reads --init-std, --rank, --rho)"),
    (["--arch", "cayley", "--eps", "0.5"], "--eps: not read by a cayley model (it reads --init-std)"),
])
def test_cli_bad_options_exit_2_with_one_line(tmp_path, capsys, argv, message):
    base = ["train", "--task", "digits", "--epochs", "1", "--hidden", "4", "--out", str(tmp_path / "x.safetensors"), "--quiet"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_usage_errors_exit_2(capsys):
    for argv in (["train", "--task", "digits", "--arch", "gru", "--out", "x"], ["train", "--task", "digits"],
                 ["info"], ["nonsense"]):
        assert main(argv) == 2
        assert len(capsys.readouterr().err.splitlines()) == 1


def test_cli_trains_a_lipschitz_ren_whose_stability_command_prints_the_construction_bound(tmp_path, capsys):
    out = tmp_path / "lren.safetensors"
    assert main(["train", "--task", "digits", "--arch", "lipschitz-ren", "--lipschitz", "3", "--margin-radius", "0.2",
                 "--hidden", "4", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "gain evidence stored: Lipschitz bound" in printed and "built to 3" in printed
    model, metadata = load_checkpoint(out)
    assert model.config.lipschitz == 3.0 and metadata["training"]["margin_radius"] == 0.2
    json_path = tmp_path / "s.json"
    assert main(["stability", str(out), "--lipschitz", "--quiet", "--json", str(json_path)]) == 0
    printed = capsys.readouterr().out
    assert "certified: ren-contraction" in printed and "verified from stored evidence" in printed
    bound = json.loads(json_path.read_text())["lipschitz_bound"]
    assert bound["holds"] and bound["tier"] == "construction" and bound["lipschitz"] <= 3.0 * (1 + 1e-6)
    assert "gain bound verified from stored evidence" in printed
    assert f"Lipschitz bound of the inputs (all 64 steps) -> outputs: {bound['lipschitz']:.6g}" in printed
    assert "tier construction" in printed
    assert main(["train", "--task", "digits", "--arch", "lipschitz", "--margin-radius", "0.2", "--hidden", "4", "--epochs", "1",
                 "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 2
    assert "per-pair Lipschitz" in capsys.readouterr().err
