"""`lrnn robustness`: the tidy CSV and JSON, option spellings, bad options, --figure, user models and
their errors, bad --data files, checkpoints of different tasks."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import UsageError, main
from lrnn_analysis.cli.options import json_path_beside
from lrnn_analysis.cli.robustness import BESIDE_CSV
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.training_split import LEAKAGE_WARNING
from lrnn_analysis.usermodule import load_user_model
from user_project import hand_accuracy, model_spec

from .helpers import CKPT, parse_args


def _json_path(args):
    return json_path_beside(args.out, args.json, BESIDE_CSV)


def _bad_weights(project, tmp_path):
    nan = {k: v.clone() for k, v in torch.load(project / "rnn.pt", weights_only=True).items()}
    nan["head.bias"][0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    torch.save({"model": nan}, tmp_path / "nested.pt")
    torch.save(load_user_model(model_spec(project)).module, tmp_path / "whole.pt")
    return tmp_path


def test_robustness_perturbs_the_named_recurrent_weight_of_each_weights_file(project, tmp_path):
    second = tmp_path / "rnn_untrained.pt"
    torch.save(load_user_model(model_spec(project)).module.state_dict(), second)
    out = tmp_path / "robustness.csv"
    assert main(["robustness", "--model", model_spec(project), "--weights", str(project / "rnn.pt"), "--weights", str(second),
                 "--data", str(project / "data.npz"), "--recurrent", "rnn.weight_hh_*", "--param-noise", "0,1.0",
                 "--seeds", "2", "--out", str(out), "--json", "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    trained = [r for r in rows if r["checkpoint"] == str(project / "rnn.pt")]
    assert {r["checkpoint"] for r in rows} == {str(project / "rnn.pt"), str(second)}
    clean = [r for r in trained if float(r["level"]) == 0.0]
    noisy = [r for r in trained if float(r["level"]) == 1.0]
    assert float(clean[0]["accuracy"]) == pytest.approx(hand_accuracy(project, "rnn.pt", "rnn"), abs=1e-12)
    assert all(float(r["loss"]) != pytest.approx(float(clean[0]["loss"]), rel=1e-3) for r in noisy)
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert settings["perturbed_parameters"][str(project / "rnn.pt")] == ["rnn.weight_hh_l0"]


def test_recurrent_only_is_the_declared_recurrent_weights_of_a_user_module(project, tmp_path):
    out = tmp_path / "lstm.csv"
    assert main(["robustness", "--model", model_spec(project), "--model-arg", "kind=lstm", "--weights",
                 str(project / "lstm.safetensors"), "--data", str(project / "data.npz"), "--recurrent-only",
                 "--param-noise", "0,0.5", "--seeds", "1", "--out", str(out), "--json", "--quiet"]) == 0
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert list(settings["perturbed_parameters"].values()) == [["lstm.weight_hh_l0"]]


def test_outputs_never_replace_the_model_file_weights_or_data(project, capsys):
    before = {name: (project / name).read_bytes() for name in ("mymodels.py", "rnn.pt", "data.npz")}
    for target in before:
        assert main(["robustness", "--model", model_spec(project), "--weights", str(project / "rnn.pt"), "--data",
                     str(project / "data.npz"), "--param-noise", "0", "--seeds", "1", "--out", str(project / target),
                     "--force", "--quiet"]) == 2
        assert "input" in capsys.readouterr().err
    assert {name: (project / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("argv,message", [
    (["--model", "mymodels_build"], "expected MODULE:FACTORY"),
    (["--model", "{dir}/nowhere.py:build"], "nowhere.py is not an existing file"),
    (["--model", "no_such_module_here:build"], "no module named 'no_such_module_here'"),
    (["--model", "{dir}/mymodels.py:missing"], "has no attribute 'missing'"),
    (["--model", "{dir}/mymodels.py:NOT_CALLABLE"], "NOT_CALLABLE is a int, not callable"),
    (["--model", "{dir}/mymodels.py:broken"], "raised RuntimeError: the factory failed on purpose"),
    (["--model", "{dir}/mymodels.py:not_a_module"], "returned a int, not a torch.nn.Module"),
    (["--model", "{dir}/mymodels.py:exits"], "exits() raised SystemExit: 3"),
    (["--model", "{dir}/mymodels.py:misbehaving"], "forward raised KeyError: 'forward failed on purpose'"),
    (["--model", "{dir}/mymodels.py:build", "--model-arg", "kind=lstm", "--weights", "{dir}/rnn.pt"],
     "do not match the module: missing keys ['lstm.weight_ih_l0'"),
    (["--model", "{dir}/mymodels.py:build", "--model-arg", "hidden=4", "--weights", "{dir}/rnn.pt"],
     "rnn.weight_ih_l0 has shape (8, 2), the module's has (4, 2)"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{tmp}/nan.pt"], "head.bias has non-finite values"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{tmp}/nested.pt"], "entries ['model'] are dicts"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{tmp}/whole.pt"], "refused to unpickle (it would import"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{dir}/rnn.pt", "--recurrent", "rnn.weight_xx_*"],
     "parameter pattern 'rnn.weight_xx_*' matches none of"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{dir}/rnn.pt", "--no-data"],
     "a model built by --model records no task: give --task NAME or --data FILE"),
    (["--model", "{dir}/mymodels.py:build", "--weights", "{dir}/rnn.pt", "--beta", "0.5"],
     "--beta: for files of the reference implementation"),
])
def test_user_model_errors_are_one_line_exit_2(project, tmp_path, capsys, argv, message):
    _bad_weights(project, tmp_path)
    argv = [a.format(dir=project, tmp=tmp_path) for a in argv]
    data = [] if "--no-data" in argv else ["--data", str(project / "data.npz")]
    argv = [a for a in argv if a != "--no-data"]
    out = tmp_path / "out.csv"
    code = main(["robustness", *argv, *data, "--param-noise", "0,0.1", "--seeds", "1", "--out", str(out), "--quiet"])
    err = "".join(line + "\n" for line in capsys.readouterr().err.splitlines()
                  if not line.startswith("warning: no --weights"))  # a module run with its factory's parameters
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("lrnn robustness: error: ")
    if "matches none" not in message and "records no task" not in message and "--beta" not in message:
        assert argv[1] in err  # a failure to load names the spec
    assert not out.exists()


@pytest.mark.parametrize("new, old, kind", [("--input-noise", "--gaussian", "gaussian"),
                                            ("--param-noise", "--gaussian-relative", "gaussian-relative")])
def test_perturbation_options_take_both_spellings(new, old, kind):
    dest = new[2:].replace("-", "_")
    for option in (new, old):
        assert getattr(parse_args("robustness", CKPT, option, "0,0.1", "--out", "r.csv"), dest) == [0.0, 0.1]


def test_robustness_json_alone_is_beside_the_csv_and_with_a_path_is_that_file():
    assert _json_path(parse_args("robustness", CKPT, "--input-noise", "0", "--out", "r.csv")) is None
    assert _json_path(parse_args("robustness", CKPT, "--out", "d/r.csv", "--json")) == Path("d/r.json")
    assert _json_path(parse_args("robustness", CKPT, "--out", "r.csv", "--json", "j/s.json")) == Path("j/s.json")
    # A checkpoint after a bare --json would be taken as its PATH: refused, never written over.
    with pytest.raises(UsageError, match="must end in .json"):
        _json_path(parse_args("robustness", "--json", CKPT, "b.safetensors", "--out", "r.csv"))


def test_robustness_and_hessian_figures(task_checkpoints, tmp_path, capsys):
    digits, adding = task_checkpoints
    robust = ["robustness", str(digits), "--input-noise", "0,0.1", "--seeds", "2", "--max-samples", "50",
              "--out", str(tmp_path / "r.csv"), "--quiet"]
    assert main(robust + ["--figure", str(tmp_path / "r.gif")]) == 2 and not (tmp_path / "r.csv").exists()
    assert main(robust + ["--figure", str(tmp_path / "r.csv")]) == 2
    assert main(robust + ["--figure", str(tmp_path / "r.svg")]) == 0
    assert (tmp_path / "r.svg").read_bytes().lstrip().startswith(b"<?xml") and (tmp_path / "r.csv").exists()
    regression = ["robustness", str(adding), "--param-noise", "0,0.1", "--seeds", "2", "--max-samples", "20",
                  "--out", str(tmp_path / "a.csv"), "--figure", str(tmp_path / "a.png"), "--quiet"]
    assert main(regression) == 0 and (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    hessian = ["hessian", str(adding), "--batch-size", "16", "--quiet"]
    assert main(hessian + ["--figure", str(tmp_path / "d.png")]) == 2
    assert "--density" in capsys.readouterr().err
    assert main(hessian + ["--density", "--figure", str(tmp_path / "d.pdf")]) == 0
    assert b"/FontFile2" in (tmp_path / "d.pdf").read_bytes()
    assert main(hessian + ["--density", "--figure", str(tmp_path / "d.pdf")]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_robustness_writes_tidy_csv(tmp_path, small_model, capsys):
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", small_model, {"task": {"name": "digits", "seed": 0, "options": {}}})
    out = tmp_path / "results.csv"
    code = main(["robustness", str(checkpoint), "--input-noise", "0,0.1", "--param-noise", "0,0.05", "--seeds", "2",
                 "--max-samples", "50", "--out", str(out), "--json", "--quiet"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8
    assert set(rows[0]) >= {"model", "checkpoint", "perturbation", "level", "seed", "accuracy", "loss", "n", "device"}
    assert (tmp_path / "results.json").exists()
    assert "gaussian-relative" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--input-noise", "0,-0.1"], "level must be a finite number >= 0"),
    (["--input-noise", "0.1", "--task", "smnist", "--pixels-per-step", "28"], "does not fit task smnist (input_dim 28"),
    ([], "no perturbation levels"),
])
def test_cli_robustness_bad_options(tmp_path, small_model, capsys, argv, message):
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", small_model, {"task": {"name": "digits", "seed": 0}})
    out = tmp_path / "results.csv"
    assert main(["robustness", str(checkpoint), "--out", str(out), "--quiet"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_cli_unknown_perturbation_option_is_a_usage_error(tmp_path):
    assert main(["robustness", "x.safetensors", "--warp", "0.1", "--out", str(tmp_path / "r.csv")]) == 2


def test_cli_data_option_reports_bad_files_in_one_line(tmp_path, capsys):
    model = build_model(ModelConfig("lipschitz", 2, 8, 1), seed=0)
    save_checkpoint(tmp_path / "m.safetensors", model, {})
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((4, 3)), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((4, 3, 2)), y_test=np.zeros(4, np.int64))
    code = main(["robustness", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "bad.npz"), "--input-noise", "0",
                 "--out", str(tmp_path / "r.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.npz: x_train: expected shape (N, T, D)" in err and err.count("\n") == 1
    assert not (tmp_path / "r.csv").exists()
    code = main(["robustness", str(tmp_path / "m.safetensors"), "--task", "adding", "--length", "5", "--param-noise", "0.1",
                 "--recurrent", "M_W,weight_hh*", "--out", str(tmp_path / "r.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pattern 'weight_hh*' matches none of" in err and not (tmp_path / "r.csv").exists()


def test_robustness_refuses_checkpoints_of_different_tasks(tmp_path, digits_task, capsys):
    model = build_model(ModelConfig("lipschitz", 1, 8, 10), seed=0)
    save_checkpoint(tmp_path / "digits.safetensors", model, {"task": digits_task.to_dict()})
    save_checkpoint(tmp_path / "smnist.safetensors", model,
                    {"task": {"name": "smnist", "seed": 0, "options": {"pixels_per_step": 1}}})
    argv = ["robustness", str(tmp_path / "digits.safetensors"), str(tmp_path / "smnist.safetensors"), "--input-noise", "0",
            "--seeds", "1", "--max-samples", "50", "--out", str(tmp_path / "r.csv"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "record different tasks" in err
    assert "digits.safetensors (task digits" in err and "smnist.safetensors (task smnist" in err
    assert not (tmp_path / "r.csv").exists()
    assert main(argv + ["--task", "digits"]) == 0
    err = capsys.readouterr().err
    assert "smnist.safetensors" in err and LEAKAGE_WARNING in err and "digits.safetensors):" not in err


def test_label_names_each_model_and_model_twice_is_refused(tmp_path, capsys):
    checkpoints = [str(Path(__file__).resolve().parents[2] / "models" / name)
                   for name in ("digits-vanilla.safetensors", "digits-cayley.safetensors")]
    out = tmp_path / "r.csv"
    assert main(["robustness", *checkpoints, "--label", "first", "--label", "second", "--input-noise", "0",
                 "--seeds", "1", "--max-samples", "20", "--out", str(out), "--quiet"]) == 0
    assert {row.split(",")[0] for row in out.read_text().splitlines()[1:]} == {"first", "second"}
    assert main(["robustness", *checkpoints, "--label", "only-one", "--input-noise", "0", "--out", str(tmp_path / "x.csv"),
                 "--quiet"]) == 2
    assert "1 --label for 2 model(s)" in capsys.readouterr().err
    assert main(["robustness", "--model", "a.py:f", "--model", "b.py:g", "--input-noise", "0", "--out", str(tmp_path / "y.csv")]) == 2
    assert "--model given twice" in capsys.readouterr().err


def test_certified_accuracy_beside_the_attack_against_radius(tmp_path, capsys):
    out = tmp_path / "radius.csv"
    code = main(["robustness", "models/digits-lipschitz-certified.safetensors", "models/digits-ren.safetensors",
                 "--certified", "--radii", "0.01,0.25", "--attack", "pgd", "--attack-steps", "5", "--seeds", "1",
                 "--max-samples", "40", "--certificate-budget", "5", "--out", str(out), "--json", "--quiet",
                 "--figure", str(tmp_path / "radius.png")])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["radius"] for r in rows] == ["0.01", "0.25"] * 2
    certified = {(r["model"], r["radius"]): r["certified_accuracy"] for r in rows}
    assert certified[("ren (map)", "0.01")] == ""  # no bound: empty, never 0
    for row in rows:
        if row["certified_accuracy"]:
            assert float(row["certified_accuracy"]) <= float(row["attack_accuracy"])
    result = json.loads((tmp_path / "radius.json").read_text())["certified"]
    assert result["settings"]["attack"]["box"] == [0.0, 1.0] and result["settings"]["attack"]["steps"] == 5
    printed = capsys.readouterr().out
    assert "looseness" in printed and "ren (map): a gain certificate needs" in printed
    assert (tmp_path / "radius.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("argv,message", [
    (["--certified"], "need --radii"),
    (["--attack", "pgd"], "need --radii"),
    (["--radii", "0.1", "--input-noise", "0,0.1"], "table of its own"),
    (["--radii", "0.1,-1", "--certified"], "radius is a finite number in [0, 1e+06]"),
    (["--radii", "0.1,1e308", "--certified"], "radius is a finite number in [0, 1e+06]"),
    (["--radii", "0.1", "--attack", "pgd", "--attack-steps", "0"], "--attack-steps"),
    (["--radii", "0.1,,0.2", "--certified"], "an empty entry"),
    (["--radii", "0.1,0.2,", "--certified"], "an empty entry"),
    (["--input-noise", "0,,0.1"], "an empty entry"),
])
def test_against_radius_bad_options_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "r.csv"
    assert main(["robustness", "models/digits-lipschitz-certified.safetensors", "--out", str(out), "--quiet"] + argv) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_robustness_of_a_language_model_reports_perplexity(language_project, tmp_path, capsys):
    """Rows name the metric; the clean row and the embedding-noise row equal the perplexity
    computed here with the same seeded noise added to the embedding's output."""
    from language_model import direct_perplexity, load_language_model

    out = tmp_path / "lm.csv"
    assert main(["robustness", "--model", f"{language_project / 'lm.py'}:build", "--weights", str(language_project / "lm.pt"),
                 "--data", str(language_project / "data.npz"), "--input-noise", "0,0.3", "--param-noise", "0,0.1",
                 "--hessian-direction", "0,0.2", "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    assert "perplexity" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert {row["metric"] for row in rows} == {"perplexity"} and len(rows) == 2 * 2 + 2 * 2 + 2  # one eigenvector: one deterministic direction
    module = load_language_model(language_project)
    data = np.load(language_project / "data.npz")
    x, y, mask = data["x_test"], data["y_test"], data["mask_test"]
    clean = direct_perplexity(module, x, y, mask)
    noise = 0.3 * torch.randn((len(x), x.shape[1], 8), generator=torch.Generator().manual_seed(1))
    expected = {("gaussian", 0.0, 0): clean, ("gaussian", 0.3, 1): direct_perplexity(module, x, y, mask, noise)}
    for row in rows:
        key = (row["perturbation"], float(row["level"]), int(row["seed"]))
        if key in expected:
            assert float(row["value"]) == pytest.approx(expected[key], rel=1e-5)
        assert int(row["count"]) == int(mask.sum())
