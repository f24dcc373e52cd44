"""User modules (--model): model arguments, the recorded weights hash, unreadable or oversized weights files."""
import pytest
import torch

from lrnn_analysis.cli import main
from lrnn_analysis.usermodule import UserModelError, load_user_model, parse_model_args
from user_project import model_spec


def test_model_arguments_are_json_literals_else_text():
    assert parse_model_args(["hidden=16", "eps=0.1", "bias=true", "sizes=[8, 8]", 'act="relu"', "kind=lstm", "x="]) == {
        "hidden": 16, "eps": 0.1, "bias": True, "sizes": [8, 8], "act": "relu", "kind": "lstm", "x": ""}
    with pytest.raises(UserModelError, match="given twice"):
        parse_model_args(["a=1", "a=2"])
    with pytest.raises(UserModelError, match="KEY=VALUE"):
        parse_model_args(["1a=2"])
    for constant in ("NaN", "Infinity", "[1, -Infinity]"):
        with pytest.raises(UserModelError, match="is not a finite number"):
            parse_model_args([f"eps={constant}"])


@pytest.mark.parametrize("weights", ["rnn.pt", "lstm.safetensors"])
def test_the_recorded_weights_hash_is_of_the_file_read(project, weights):
    import hashlib

    kind = "lstm" if weights.startswith("lstm") else "rnn"
    subject = load_user_model(model_spec(project), project / weights, {"kind": kind})
    expected = hashlib.sha256((project / weights).read_bytes()).hexdigest()
    assert subject.metadata["user_model"]["weights_sha256"] == expected


def test_a_truncated_safetensors_weights_file_is_one_line(project, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((project / "lstm.safetensors").read_bytes()[:200])
    with pytest.raises(UserModelError, match="not a readable safetensors file") as caught:
        load_user_model(model_spec(project), cut, {"kind": "lstm"})
    assert len(str(caught.value).splitlines()) == 1


def test_a_weights_file_beyond_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):

    from lrnn_analysis import usermodule

    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(100)}, path)
    monkeypatch.setattr(usermodule, "MAX_FILE_BYTES", 64)
    monkeypatch.setattr(usermodule.torch, "load", lambda *a, **k: pytest.fail("read a file beyond the limit"))
    with pytest.raises(ValueError, match="larger than the 64-byte limit"):
        usermodule.read_state_dict(path)


@pytest.mark.parametrize("failure,message", [
    ("lure_form", "Misbehaving: lure_form() raised ZeroDivisionError: lure_form failed on purpose"),
    ("returns", "Misbehaving: lure_form() returned a str, not a LureSystem or None"),
])
def test_a_lure_form_that_raises_or_returns_something_else_is_one_line_exit_2(project, capsys, failure, message):
    for command in ("stability", "info"):
        code = main([command, "--model", f"{project / 'mymodels.py'}:misbehaving", "--model-arg", f"failure={failure}"])
        errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: no --weights")]
        assert code == 2 and len(errors) == 1 and errors[0].startswith(f"lrnn {command}: error: ") and message in errors[0]
