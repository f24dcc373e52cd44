"""`lrnn info`: what it shows of native, reference, dict and user-model checkpoints and of stored
evidence, and one line on stderr naming the file for every hostile or careless checkpoint."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from checkpoint_edits import edit_evidence, rewrite_header
from helpers import SAVED_CONFIG, SAVED_TASK
from lrnn_analysis import checkpoints
from lrnn_analysis.checkpoints import load_checkpoint, save_checkpoint, weights_sha256
from lrnn_analysis.cli import info as cli_info
from lrnn_analysis.cli import main
from lrnn_analysis.models import ModelConfig, build_model
from reference_files import HP, D, K, N, forget_reference_code, reference_name
from user_project import model_spec

from .helpers import fails, reference_file


def _float64_checkpoint(path, value):
    model = build_model(SAVED_CONFIG, seed=0)
    state = {name: tensor.double() for name, tensor in model.state_dict().items()}
    state["M_A"][0, 0] = value
    record = {"format": checkpoints.FORMAT, "config": SAVED_CONFIG.to_dict(),
              "weights_sha256": weights_sha256(SAVED_CONFIG, state)}
    save_file(state, str(path), metadata={"lrnn_analysis": json.dumps(record)})
    return path


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and err.startswith("lrnn info: error:")


def test_info_describes_a_user_model(project, capsys):
    assert main(["info", "--model", model_spec(project), "--weights", str(project / "rnn.pt")]) == 0
    out = capsys.readouterr().out
    assert "model args: none" in out and "rnn.weight_hh_l0: (8, 8)" in out
    assert "recurrent parameters: rnn.weight_hh_l0" in out and "Lur'e form: map, n = 8" in out
    assert "task: none recorded" in out
    assert main(["info", "--model", model_spec(project), "--weights", str(project / "rnn.pt"), "--task", "digits"]) == 0
    assert "task: digits (from --task; the model records none)" in capsys.readouterr().out


def test_info_shows_overrides_and_where_each_value_came_from(tmp_path, capsys):
    path = reference_file(tmp_path)
    assert main(["info", str(path), "--beta", "0.9", "--alpha", "0.5", "--task", "digits"]) == 0
    out = capsys.readouterr().out
    assert "beta = 0.9  (from override)" in out and "alpha = 0.5  (from override)" in out
    assert "gamma = 0.05  (from file name)" in out and "eps = 0.3  (from file name)" in out
    assert "task: digits (from --task; the checkpoint records smnist)" in out


def test_info_names_the_format_of_a_pytorch_dict_checkpoint(tmp_path, capsys):
    import torch

    from lrnn_analysis.models import ModelConfig, build_model

    model = build_model(ModelConfig("lipschitz", 1, 3, 10), seed=0)
    path = tmp_path / "dict.pt"
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, path)
    assert main(["info", str(path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"checkpoint {path} (PyTorch file with a config and a state dict)" and "None" not in first


def test_cli_info_shows_whether_the_stored_evidence_verifies(certified_checkpoint, capsys):
    path, _ = certified_checkpoint
    assert main(["info", str(path)]) == 0
    assert "certificate evidence: verified from stored evidence: euler-lmi" in capsys.readouterr().out
    edit_evidence(path, lambda e: e.__setitem__("rate", e["rate"] * 0.5))
    assert main(["info", str(path)]) == 0
    captured = capsys.readouterr()
    assert "certificate evidence: STORED EVIDENCE NOT VERIFIED" in captured.err and "verified from" not in captured.out


@pytest.mark.usefixtures("time_limit")
@pytest.mark.parametrize("hidden, needle", [(20000, "more than the limit"), (5000, "config implies")])
def test_small_file_declaring_a_huge_model_is_refused_before_building(saved, capsys, monkeypatch, hidden, needle):
    rewrite_header(saved, record_edit=lambda r: r["config"].update(hidden=hidden))
    monkeypatch.setattr(checkpoints, "build_model", lambda *a, **k: pytest.fail("built a model before validating"))
    fails(capsys, ["info", str(saved)], needle, path=saved)


@pytest.mark.usefixtures("time_limit")
@pytest.mark.parametrize("hidden", [10**9, 65537, True, 4.0, "4", -4])
def test_unbounded_or_mistyped_config_sizes(saved, capsys, hidden):
    rewrite_header(saved, record_edit=lambda r: r["config"].update(hidden=hidden))
    fails(capsys, ["info", str(saved)], "invalid model config", "hidden", path=saved)


@pytest.mark.usefixtures("time_limit")
@pytest.mark.parametrize("field, value", [("rank", 13), ("rank", -1), ("rank", 2.0), ("rank", True), ("rho", 0.0),
                                          ("rho", 1.5), ("rho", "0.9"), ("cond_penalty", -1.0), ("cond_penalty", None)])
def test_bounded_and_typed_contracting_fields(saved, capsys, field, value):
    rewrite_header(saved, record_edit=lambda r: r["config"].update({field: value}))
    fails(capsys, ["info", str(saved)], "invalid model config", field, path=saved)


@pytest.mark.usefixtures("time_limit")
def test_a_contracting_rank_above_twice_hidden_is_refused_before_building(tmp_path, capsys, monkeypatch):
    path = save_checkpoint(tmp_path / "c.safetensors", build_model(ModelConfig("contracting", 1, 4, 10), seed=0))
    rewrite_header(path, record_edit=lambda r: r["config"].update(rank=9))
    monkeypatch.setattr(checkpoints, "build_model", lambda *a, **k: pytest.fail("built a model before validating"))
    fails(capsys, ["info", str(path)], "invalid model config", "rank", path=path)


@pytest.mark.usefixtures("time_limit")
def test_unsupported_dtype(saved, capsys):
    rewrite_header(saved, edit=lambda h: h["M_A"].update(dtype="F8_E4M3"))
    fails(capsys, ["info", str(saved)], "dtype 'F8_E4M3'", path=saved)


@pytest.mark.usefixtures("time_limit")
def test_float64_weight_that_overflows_float32_is_refused(tmp_path, capsys):
    path = _float64_checkpoint(tmp_path / "big.safetensors", 1e300)
    fails(capsys, ["info", str(path)], "tensor M_A has non-finite values", "float32", path=path)
    fine = load_checkpoint(_float64_checkpoint(tmp_path / "fine.safetensors", 0.5))
    assert fine.model.M_A.dtype == torch.float32 and fine.model.M_A[0, 0].item() == 0.5


@pytest.mark.usefixtures("time_limit")
@pytest.mark.parametrize("section", ["metrics", "training", "environment", "task", "log", "constraint"])
@pytest.mark.parametrize("value", [[1, 2], "text", 7])
def test_metadata_sections_of_the_wrong_type(saved, capsys, section, value):
    rewrite_header(saved, record_edit=lambda r: r.update({section: value}))
    for command in (["info", str(saved)], ["info", "--json", str(saved)]):
        fails(capsys, command, "metadata", section, path=saved)


@pytest.mark.usefixtures("time_limit")
@pytest.mark.parametrize("fragment, needle", [
    ('"hidden": 1' + "0" * 400, "digits"),
    ('"eps": 1e400', "out of the float64 range"),
    ('"eps": NaN', "NaN is not a finite number"),
    ('"deep": ' + "[" * 5000 + "]" * 5000, "nested"),
])
def test_hostile_numbers_and_nesting_in_the_metadata(saved, capsys, fragment, needle):
    def edit(header):
        record = json.loads(header["__metadata__"]["lrnn_analysis"])
        key = fragment.split('"')[1]
        record["config"].pop(key, None)
        text = json.dumps(record)
        header["__metadata__"]["lrnn_analysis"] = text.replace('"config": {', '"config": {' + fragment + ", ", 1)

    rewrite_header(saved, edit=edit)
    fails(capsys, ["info", str(saved)], needle, path=saved)


@pytest.mark.usefixtures("time_limit")
def test_torch_files_with_odd_contents(tmp_path, capsys):
    state = build_model(SAVED_CONFIG, seed=0).state_dict()
    cases = {
        "keys.pt": ({1: 2, "config": SAVED_CONFIG.to_dict()}, "non-string key 1"),
        "state-keys.pt": ({"config": SAVED_CONFIG.to_dict(), "state_dict": {**state, 5: torch.zeros(1)}}, "non-string key 5"),
        "tensor-meta.pt": ({"config": SAVED_CONFIG.to_dict(), "state_dict": state, "note": torch.zeros(2)}, "holds a Tensor"),
        "bytes-meta.pt": ({"config": SAVED_CONFIG.to_dict(), "state_dict": state, "note": b"abc"}, "holds a bytes"),
        "nan-config.pt": ({"config": {**SAVED_CONFIG.to_dict(), "eps": float("nan")}, "state_dict": state},
                          "not a finite number"),
        "huge-config.pt": ({"config": {**SAVED_CONFIG.to_dict(), "eps": 10**400}, "state_dict": state}, "more than 20 digits"),
        "f8.pt": ({"config": SAVED_CONFIG.to_dict(), "state_dict": {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}},
                  "float8_e4m3fn"),
    }
    for name, (content, needle) in cases.items():
        torch.save(content, tmp_path / name)
        fails(capsys, ["info", "--json", str(tmp_path / name)], needle, path=tmp_path / name)


@pytest.mark.usefixtures("time_limit")
def test_protocol_4_pickle_never_shows_torchs_advice(tmp_path, capsys):
    path = tmp_path / "p4.pkl"
    path.write_bytes(pickle.dumps({"B": [1.0, 2.0]}, protocol=4))
    err = fails(capsys, ["info", str(path)], "refused to unpickle", path=path)
    assert "weights_only" not in err


def test_os_errors_are_one_line_naming_the_file(saved, capsys, monkeypatch):
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path) == str(saved):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.os, "open", denied)
    fails(capsys, ["info", str(saved)], "cannot read (Permission denied)", path=saved)
    monkeypatch.undo()
    for error in (PermissionError(13, "Permission denied", "/data/x.csv"), IsADirectoryError(21, "Is a directory", "/data/x.csv"),
                  OSError(28, "No space left on device", "/data/x.csv")):
        def handler(args, error=error):
            raise error

        monkeypatch.setattr(cli_info, "run", handler)
        fails(capsys, ["info", str(saved)], f"/data/x.csv: {error.strerror}")


@pytest.mark.usefixtures("time_limit")
def test_a_file_name_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / os.fsdecode(b"caf\xe9.safetensors")
    save_checkpoint(path, build_model(SAVED_CONFIG, seed=0), {"task": SAVED_TASK})
    assert main(["info", str(path)]) == 0
    assert "caf\\xe9.safetensors" in capsys.readouterr().out
    missing = tmp_path / os.fsdecode(b"gone\xff.safetensors")
    fails(capsys, ["info", str(missing)], "gone\\xff.safetensors: no such file")


@pytest.mark.usefixtures("time_limit")
def test_a_bit_flip_in_the_weights_or_the_config_is_detected(saved, tmp_path, capsys):
    raw = bytearray(saved.read_bytes())
    raw[-3] ^= 0x01  # a low mantissa bit of the last weight: still finite, still the same shape
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    fails(capsys, ["info", str(flipped)], "integrity check failed", path=flipped)
    rewrite_header(saved, record_edit=lambda r: r["config"].update(eps=0.25))
    fails(capsys, ["info", str(saved)], "integrity check failed", path=saved)


def test_cli_info_shows_the_model_and_where_each_hyperparameter_came_from(tmp_path, reference_code, capsys):
    module = reference_code.RnnModels(D, K, n_units=N, eps=HP["eps"], beta=HP["beta"], gamma=HP["gamma"],
                                      alpha=HP["alpha"], model="LipschitzRNN_gated")
    path = tmp_path / f"{reference_name('LipschitzRNN_gated')}.pkl"
    torch.save(module, path)
    forget_reference_code(reference_code, tmp_path / "reference_code")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "reference model: LipschitzRNN_gated (whole-module pickle (models.RnnModels))" in out
    assert "alpha = 0.6  (from pickle attribute)" in out and "lipschitz-gated" in out
    assert "t10k" in out


def test_a_reference_file_warning_is_one_line(tmp_path, capsys):
    path = tmp_path / "LipschitzRNN_mnist_eps_0.1_beta_0.5_gamma_0.1.pkl"  # no alpha in the name: a warning
    torch.save({"E.weight": torch.zeros(3, 1), "E.bias": torch.zeros(3), "D.weight": torch.zeros(10, 3),
                "D.bias": torch.zeros(10), "C": torch.zeros(3, 3), "B": torch.zeros(3, 3)}, path)
    assert main(["info", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("lrnn info: warning:") and "alpha is recorded nowhere" in err
    assert len(err.splitlines()) == 1 and ".py:" not in err


def test_info_with_per_step_data_names_its_objective_and_checks_the_model(language_project, capsys):
    spec = ["--model", f"{language_project / 'lm.py'}:build", "--weights", str(language_project / "lm.pt")]
    assert main(["info", *spec, "--data", str(language_project / "data.npz")]) == 0
    out = capsys.readouterr().out
    scored = int(np.load(language_project / "data.npz")["mask_train"].sum())
    assert (f"inputs token ids (N, 10) < 12; per-step classification (per-token cross-entropy, metric perplexity), "
            f"{scored} scored steps in train") in out
    assert "the model fits the data: one output per step, 12 classes" in out
    assert "lrnn stability certifies its torch.nn recurrent layers rnn (LSTM)" in out
