"""`lrnn stability`: exit codes and JSON, user RNNs and LSTMs against hand-built forms, reference-file
overrides, stored evidence and its visible fallback."""
import json

import numpy as np
import pytest
import torch

from checkpoint_edits import edit_evidence
from lrnn_analysis.cli import main
from lrnn_analysis.lure import LureSystem
from lrnn_analysis.stability import certify
from lrnn_analysis.usermodule import load_user_model
from user_project import model_spec

from .helpers import reference_file


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


def test_stability_of_a_user_rnn_equals_its_hand_built_lure_form(project, tmp_path, capsys):
    json_path = tmp_path / "stability.json"
    code = main(["stability", "--model", model_spec(project), "--weights", str(project / "rnn.pt"), "--json", str(json_path),
                 "--quiet"])
    W = torch.load(project / "rnn.pt", weights_only=True)["rnn.weight_hh_l0"].double()
    by_hand = certify(LureSystem(torch.zeros(8, 8, dtype=torch.float64), W, slope=1.0, method="map", activation="tanh"),
                      ["map-norm", "map-lmi"])
    result = json.loads(json_path.read_text())["certificates"]
    assert [(r["name"], r["holds"]) for r in result] == [(r.name, r.holds) for r in by_hand]
    assert [r["margin"] for r in result] == pytest.approx([r.margin for r in by_hand], rel=1e-9, abs=1e-12)
    assert code == (0 if all(r.holds for r in by_hand) else 1)
    assert f"{project / 'rnn.pt'}: " in capsys.readouterr().out


def test_stability_of_a_user_lstm_certifies_its_layer(project, tmp_path, capsys):
    from lrnn_analysis.stability import certify_recurrent

    module = load_user_model(model_spec(project), project / "lstm.safetensors", {"kind": "lstm"}).module
    bound = float(np.abs(np.load(project / "data.npz")["x_test"]).max())
    direct = certify_recurrent(module, input_bound=bound)[0]
    json_path = tmp_path / "lstm.json"
    code = main(["stability", "--model", model_spec(project), "--model-arg", "kind=lstm", "--weights",
                 str(project / "lstm.safetensors"), "--input-bound", str(bound), "--json", str(json_path)])
    assert code == (0 if direct.holds else 1)
    layers = json.loads(json_path.read_text())["recurrent_layers"]
    assert [(c["module"], c["kind"], c["holds"], c["reason"]) for c in layers] == [("lstm", "lstm", direct.holds, direct.reason)]
    assert "no Lur'e form of the whole model; certifying its torch.nn recurrent layers" in capsys.readouterr().out
    assert main(["stability", "--model", model_spec(project), "--model-arg", "kind=lstm", "--weights",
                 str(project / "lstm.safetensors")]) == 1
    assert "no certificate without an input bound" in capsys.readouterr().out


def test_stability_overrides_change_the_certified_matrices(tmp_path, capsys):
    path = reference_file(tmp_path)
    results = {}
    for gamma in ("0.05", "3"):
        json_path = tmp_path / f"stability_{gamma}.json"
        main(["stability", str(path), "--gamma", gamma, "--json", str(json_path), "--quiet"])
        results[gamma] = json.loads(json_path.read_text())
    # A = alpha (beta (B - B^T) + (1 - beta)(B + B^T) - gamma I): the abscissa moves by -alpha * delta gamma.
    shift = results["3"]["spectrum"]["abscissa_A"] - results["0.05"]["spectrum"]["abscissa_A"]
    assert shift == pytest.approx(-0.6 * (3 - 0.05), rel=1e-9)
    capsys.readouterr()
    assert main(["info", str(path), "--solver", "midpoint"]) == 0
    captured = capsys.readouterr()
    assert "note: " + path.name + ": the override(s) solver do not apply to a LipschitzRNN model" in captured.out
    assert [line for line in captured.err.splitlines() if "the override" in line][0].startswith("lrnn info: warning: ")


def test_cli_stability_uses_stored_evidence_and_falls_back_visibly(certified_checkpoint, capsys):
    path, evidence = certified_checkpoint
    assert main(["stability", str(path), "--quiet", "--certificates", "euler-lmi"]) == 0
    out = capsys.readouterr().out
    assert "verified from stored evidence" in out and "stored evidence (construction)" in out
    edit_evidence(path, lambda e: e.__setitem__("rate", e["rate"] * 0.5))
    code = main(["stability", str(path), "--quiet", "--certificates", "euler-lmi", "--time-budget", "20"])
    captured = capsys.readouterr()
    assert "STORED EVIDENCE NOT VERIFIED" in captured.err
    assert "stored evidence (construction)" not in captured.out and code in (0, 1)


def test_lipschitz_prints_and_writes_the_certified_bound_of_the_sequence_map(tmp_path, capsys):
    from lrnn_analysis.checkpoints import save_checkpoint
    from lrnn_analysis.models import ModelConfig, build_model
    from lrnn_analysis.stability import certify_gain, sequence_map

    model = build_model(ModelConfig("lipschitz", 2, 4, 3, eps=0.1, gamma_a=1.0, gamma_w=0.0), seed=0)
    path = save_checkpoint(tmp_path / "m.safetensors", model, {})
    out = tmp_path / "s.json"
    assert main(["stability", str(path), "--lipschitz", "--horizon", "8", "--time-budget", "20", "--quiet",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    bound = json.loads(out.read_text())["lipschitz_bound"]
    assert bound["holds"] and f"Lipschitz bound of the inputs (all 8 steps) -> outputs: {bound['lipschitz']:.6g}" in printed
    direct = certify_gain(*sequence_map(model), 8, time_budget=20)
    assert direct.lipschitz == pytest.approx(bound["lipschitz"], rel=1e-9)


def test_stability_of_a_language_model_certifies_its_lstm_on_the_embedded_tokens(language_project, tmp_path, capsys):
    """The certificates concern the recurrence: the LSTM layers of an RNNModel are certified as
    any others; the input range shown for the first layer is that of the embedded tokens."""
    from language_model import load_language_model
    from lrnn_analysis.pipelines.stability import SAMPLE_INPUTS

    json_path = tmp_path / "lm.json"
    code = main(["stability", "--model", f"{language_project / 'lm.py'}:build", "--weights", str(language_project / "lm.pt"),
                 "--data", str(language_project / "data.npz"), "--json", str(json_path)])
    layers = json.loads(json_path.read_text())["recurrent_layers"]
    assert code == (0 if all(c["holds"] for c in layers) else 1)
    assert [(c["module"], c["kind"]) for c in layers] == [("rnn", "lstm")]
    module = load_language_model(language_project)
    tokens = torch.from_numpy(np.load(language_project / "data.npz")["x_train"][:SAMPLE_INPUTS])
    with torch.no_grad():
        embedded = float(module.encoder(tokens).abs().max())
    assert f"||x_t||_inf <= {embedded:.6g}" in capsys.readouterr().out
