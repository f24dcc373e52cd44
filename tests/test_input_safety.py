"""Every bad input is one line on stderr naming the file and the problem, exit 2: hostile and
careless checkpoints, task options, command-line options, OS errors; SIGINT and a closed pipe
end without a traceback; the integrity hash detects modified weights and configs."""
import hashlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lrnn_analysis import checkpoints
from lrnn_analysis.cli import info as cli_info
from lrnn_analysis.checkpoints import CheckpointError, IntegrityWarning, load_checkpoint, save_checkpoint, weights_sha256
from lrnn_analysis.cli import main
from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.pipelines.audit import Gate

from checkpoint_edits import rewrite_header

CONFIG = ModelConfig("lipschitz", 1, 4, 10, eps=0.2)
TASK = {"name": "digits", "seed": 0, "options": {}}


@pytest.fixture
def saved(tmp_path):
    model = build_model(CONFIG, seed=0)
    return save_checkpoint(tmp_path / "m.safetensors", model, {"task": TASK, "metrics": {"test_accuracy": 0.5}})


@pytest.fixture(autouse=True)
def time_limit():
    """A hang is a failure, not a stuck suite."""
    def expire(signum, frame):
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _error_line(capsys, command, path=None):
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"lrnn {command}: error: ") and "Traceback" not in err
    if path is not None:
        assert str(path) in err
    return err


def _fails(capsys, argv, *needles, path=None):
    assert main(argv) == 2
    err = _error_line(capsys, argv[0], path)
    for needle in needles:
        assert needle in err, err
    return err


# --- bounded resources -------------------------------------------------------------------

@pytest.mark.parametrize("hidden, needle", [(20000, "more than the limit"), (5000, "config implies")])
def test_small_file_declaring_a_huge_model_is_refused_before_building(saved, capsys, monkeypatch, hidden, needle):
    rewrite_header(saved, record_edit=lambda r: r["config"].update(hidden=hidden))
    monkeypatch.setattr(checkpoints, "build_model", lambda *a, **k: pytest.fail("built a model before validating"))
    _fails(capsys, ["info", str(saved)], needle, path=saved)


@pytest.mark.parametrize("hidden", [10**9, 65537, True, 4.0, "4", -4])
def test_unbounded_or_mistyped_config_sizes(saved, capsys, hidden):
    rewrite_header(saved, record_edit=lambda r: r["config"].update(hidden=hidden))
    _fails(capsys, ["info", str(saved)], "invalid model config", "hidden", path=saved)


@pytest.mark.parametrize("field, value", [("rank", 13), ("rank", -1), ("rank", 2.0), ("rank", True), ("rho", 0.0),
                                          ("rho", 1.5), ("rho", "0.9"), ("cond_penalty", -1.0), ("cond_penalty", None)])
def test_bounded_and_typed_contracting_fields(saved, capsys, field, value):
    rewrite_header(saved, record_edit=lambda r: r["config"].update({field: value}))
    _fails(capsys, ["info", str(saved)], "invalid model config", field, path=saved)


def test_a_contracting_rank_above_twice_hidden_is_refused_before_building(tmp_path, capsys, monkeypatch):
    path = save_checkpoint(tmp_path / "c.safetensors", build_model(ModelConfig("contracting", 1, 4, 10), seed=0))
    rewrite_header(path, record_edit=lambda r: r["config"].update(rank=9))
    monkeypatch.setattr(checkpoints, "build_model", lambda *a, **k: pytest.fail("built a model before validating"))
    _fails(capsys, ["info", str(path)], "invalid model config", "rank", path=path)


def test_a_model_beyond_the_parameter_budget_is_refused_before_allocation():
    with pytest.raises(ValueError, match="more than the limit"):
        build_model(ModelConfig("lipschitz", 1, 60000, 10))


def _fifo(tmp_path, name="fifo"):
    path = tmp_path / name
    os.mkfifo(path)
    return path


def test_fifo_data_path_recorded_in_a_checkpoint_does_not_hang(tmp_path, capsys):
    fifo = _fifo(tmp_path, "data.npz")
    model = build_model(ModelConfig("lipschitz", 1, 4, 10), seed=0)
    path = save_checkpoint(tmp_path / "s.safetensors", model,
                           {"task": {"name": "smnist", "seed": 0, "options": {"path": str(fifo), "pixels_per_step": 1}}})
    _fails(capsys, ["hessian", str(path), "--quiet"], "not a regular file", path=fifo)


def test_fifo_data_path_and_idx_member_and_checkpoint_do_not_hang(tmp_path, saved, capsys):
    fifo = _fifo(tmp_path)
    _fails(capsys, ["hessian", str(saved), "--task", "smnist", "--data-path", str(fifo), "--quiet"], "not a regular file")
    idx = tmp_path / "idx"
    idx.mkdir()
    os.mkfifo(idx / "train-images-idx3-ubyte")
    _fails(capsys, ["hessian", str(saved), "--task", "smnist", "--data-path", str(idx), "--quiet"], "not a regular file")
    _fails(capsys, ["info", str(fifo)], "not a file (a FIFO)", path=fifo)


@pytest.mark.parametrize("options, needle", [
    ({"length": 10**9}, "length must be an integer in [2, 100000]"),
    ({"length": 1e9}, "length must be an integer"),
    ({"length": "100"}, "length must be an integer"),
    ({"length": 10_000, "n_train": 100_000}, "exceeds"),
    ({"n_val": -1}, "n_val must be an integer"),
])
def test_recorded_task_options_are_bounded_and_typed(tmp_path, capsys, options, needle):
    model = build_model(ModelConfig("lipschitz", 2, 4, 1), seed=0)
    path = save_checkpoint(tmp_path / "a.safetensors", model, {"task": {"name": "adding", "seed": 0, "options": options}})
    _fails(capsys, ["hessian", str(path), "--quiet"], needle)


@pytest.mark.parametrize("task, needle", [
    ({"name": "smnist", "seed": 0, "options": {"pixels_per_step": 5}}, "must divide 784"),
    ({"name": "smnist", "seed": 0, "options": {"pixels_per_step": "1"}}, "pixels_per_step must be an integer"),
    ({"name": "smnist", "seed": 0, "options": {"path": 5}}, "path must be a string"),
    ({"name": "digits", "seed": -1, "options": {}}, "split seed"),
])
def test_task_option_types(tmp_path, capsys, task, needle):
    path = save_checkpoint(tmp_path / "t.safetensors", build_model(ModelConfig("lipschitz", 1, 4, 10), seed=0), {"task": task})
    _fails(capsys, ["hessian", str(path), "--quiet"], needle)


def test_corrupt_idx_header_is_a_value_error(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (idx / stem).write_bytes(b"\x00\x00\x08\xff" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        load_task("smnist", path=str(idx))


# --- one line, exit 2, the file named ----------------------------------------------------

def test_unsupported_dtype(saved, capsys):
    rewrite_header(saved, edit=lambda h: h["M_A"].update(dtype="F8_E4M3"))
    _fails(capsys, ["info", str(saved)], "dtype 'F8_E4M3'", path=saved)


def _float64_checkpoint(path, value):
    model = build_model(CONFIG, seed=0)
    state = {name: tensor.double() for name, tensor in model.state_dict().items()}
    state["M_A"][0, 0] = value
    record = {"format": checkpoints.FORMAT, "config": CONFIG.to_dict(), "weights_sha256": weights_sha256(CONFIG, state)}
    save_file(state, str(path), metadata={"lrnn_analysis": json.dumps(record)})
    return path


def test_float64_weight_that_overflows_float32_is_refused(tmp_path, capsys):
    path = _float64_checkpoint(tmp_path / "big.safetensors", 1e300)
    _fails(capsys, ["info", str(path)], "tensor M_A has non-finite values", "float32", path=path)
    fine = load_checkpoint(_float64_checkpoint(tmp_path / "fine.safetensors", 0.5))
    assert fine.model.M_A.dtype == torch.float32 and fine.model.M_A[0, 0].item() == 0.5


@pytest.mark.parametrize("section", ["metrics", "training", "environment", "task", "log", "constraint"])
@pytest.mark.parametrize("value", [[1, 2], "text", 7])
def test_metadata_sections_of_the_wrong_type(saved, capsys, section, value):
    rewrite_header(saved, record_edit=lambda r: r.update({section: value}))
    for command in (["info", str(saved)], ["info", "--json", str(saved)]):
        _fails(capsys, command, "metadata", section, path=saved)


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
    _fails(capsys, ["info", str(saved)], needle, path=saved)


def test_torch_files_with_odd_contents(tmp_path, capsys):
    state = build_model(CONFIG, seed=0).state_dict()
    cases = {
        "keys.pt": ({1: 2, "config": CONFIG.to_dict()}, "non-string key 1"),
        "state-keys.pt": ({"config": CONFIG.to_dict(), "state_dict": {**state, 5: torch.zeros(1)}}, "non-string key 5"),
        "tensor-meta.pt": ({"config": CONFIG.to_dict(), "state_dict": state, "note": torch.zeros(2)}, "holds a Tensor"),
        "bytes-meta.pt": ({"config": CONFIG.to_dict(), "state_dict": state, "note": b"abc"}, "holds a bytes"),
        "nan-config.pt": ({"config": {**CONFIG.to_dict(), "eps": float("nan")}, "state_dict": state}, "not a finite number"),
        "huge-config.pt": ({"config": {**CONFIG.to_dict(), "eps": 10**400}, "state_dict": state}, "more than 20 digits"),
        "f8.pt": ({"config": CONFIG.to_dict(), "state_dict": {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}},
                  "float8_e4m3fn"),
    }
    for name, (content, needle) in cases.items():
        torch.save(content, tmp_path / name)
        _fails(capsys, ["info", "--json", str(tmp_path / name)], needle, path=tmp_path / name)


def test_reference_state_dict_with_a_scalar_B(tmp_path, capsys):
    n = 4
    state = {"B": torch.tensor(1.0), "C": torch.randn(n, n), "E.weight": torch.randn(n, 1), "E.bias": torch.randn(n),
             "D.weight": torch.randn(10, n), "D.bias": torch.randn(10)}
    torch.save(state, tmp_path / "ref.pt")
    _fails(capsys, ["audit", str(tmp_path / "ref.pt"), "--task", "digits", "--out", str(tmp_path / "a"),
                    "--beta", "0.75", "--gamma", "0.001", "--eps", "0.1", "--alpha", "1"], "B has shape ()", path=tmp_path / "ref.pt")
    assert not (tmp_path / "a").exists()


def test_protocol_4_pickle_never_shows_torchs_advice(tmp_path, capsys):
    path = tmp_path / "p4.pkl"
    path.write_bytes(pickle.dumps({"B": [1.0, 2.0]}, protocol=4))
    err = _fails(capsys, ["info", str(path)], "refused to unpickle", path=path)
    assert "weights_only" not in err


def test_os_errors_are_one_line_naming_the_file(saved, capsys, monkeypatch):
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path) == str(saved):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.os, "open", denied)
    _fails(capsys, ["info", str(saved)], "cannot read (Permission denied)", path=saved)
    monkeypatch.undo()
    for error in (PermissionError(13, "Permission denied", "/data/x.csv"), IsADirectoryError(21, "Is a directory", "/data/x.csv"),
                  OSError(28, "No space left on device", "/data/x.csv")):
        def handler(args, error=error):
            raise error

        monkeypatch.setattr(cli_info, "run", handler)
        _fails(capsys, ["info", str(saved)], f"/data/x.csv: {error.strerror}")


def test_a_file_name_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / os.fsdecode(b"caf\xe9.safetensors")
    save_checkpoint(path, build_model(CONFIG, seed=0), {"task": TASK})
    assert main(["info", str(path)]) == 0
    assert "caf\\xe9.safetensors" in capsys.readouterr().out
    missing = tmp_path / os.fsdecode(b"gone\xff.safetensors")
    _fails(capsys, ["info", str(missing)], "gone\\xff.safetensors: no such file")


# --- integrity ---------------------------------------------------------------------------

def test_hash_is_recorded_verified_and_shown(saved, capsys):
    loaded = load_checkpoint(saved)
    assert loaded.sha256 == weights_sha256(CONFIG, {k: v.float() for k, v in loaded.model.state_dict().items()})
    assert main(["info", str(saved)]) == 0
    assert f"weights_sha256: {loaded.sha256}" in capsys.readouterr().out
    assert main(["info", "--json", str(saved)]) == 0
    assert json.loads(capsys.readouterr().out)["weights_sha256"] == loaded.sha256


def test_a_bit_flip_in_the_weights_or_the_config_is_detected(saved, tmp_path, capsys):
    raw = bytearray(saved.read_bytes())
    raw[-3] ^= 0x01  # a low mantissa bit of the last weight: still finite, still the same shape
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    _fails(capsys, ["info", str(flipped)], "integrity check failed", path=flipped)
    rewrite_header(saved, record_edit=lambda r: r["config"].update(eps=0.25))
    _fails(capsys, ["info", str(saved)], "integrity check failed", path=saved)


def test_config_fields_added_since_v1_enter_the_hash_only_away_from_their_default(saved):
    tensors = {k: v.float() for k, v in load_checkpoint(saved).model.state_dict().items()}
    v1_config = {k: v for k, v in CONFIG.to_dict().items() if k not in checkpoints.HASH_OMITTED_AT_DEFAULT}
    digest = hashlib.sha256()
    for data in [checkpoints.HASH_DOMAIN, json.dumps(v1_config, sort_keys=True, separators=(",", ":")).encode()] + [
            part for name in sorted(tensors) for part in (name.encode(), b"F32", json.dumps(list(tensors[name].shape), separators=(",", ":")).encode(),
                                                          tensors[name].numpy().tobytes())]:
        digest.update(struct.pack("<Q", len(data)) + data)
    assert weights_sha256(CONFIG, tensors) == digest.hexdigest()
    for field, value in (("rho", 0.5), ("rank", 4), ("cond_penalty", 0.0)):
        assert weights_sha256(ModelConfig(**{**CONFIG.to_dict(), field: value}), tensors) != digest.hexdigest()
    rewrite_header(saved, record_edit=lambda r: r["config"].update(rho=0.5))
    with pytest.raises(CheckpointError, match="integrity check failed"):
        load_checkpoint(saved)


def test_a_checkpoint_without_a_hash_loads_with_a_visible_warning(saved, capsys):
    rewrite_header(saved, record_edit=lambda r: r.pop("weights_sha256"))
    with pytest.warns(IntegrityWarning, match="records no integrity hash"):
        loaded = load_checkpoint(saved)
    assert len(loaded.sha256) == 64
    assert main(["info", str(saved)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("lrnn info: warning:") and len(err.splitlines()) == 1


def test_committed_reference_models_verify():
    from pathlib import Path

    with warnings.catch_warnings():
        warnings.simplefilter("error", IntegrityWarning)
        for path in sorted((Path(__file__).parent.parent / "models").glob("*.safetensors")):
            assert "weights_sha256" in json.loads(json.loads(
                path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])["__metadata__"]["lrnn_analysis"])
            load_checkpoint(path)


# --- options checked up front ------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["hessian", "{ckpt}", "--top-k", "100000"], "--top-k"),
    (["hessian", "{ckpt}", "--batches", "0"], "--batches"),
    (["hessian", "{ckpt}", "--seed", "-1"], "--seed"),
    (["robustness", "{ckpt}", "--hessian-direction", "0.1", "--hessian-k", "5000", "--out", "{tmp}/r.csv"], "--hessian-k"),
    (["robustness", "{ckpt}", "--input-noise", "0,nan", "--out", "{tmp}/r.csv"], "--input-noise"),
    (["robustness", "{ckpt}", "--input-noise", "-0.1", "--out", "{tmp}/r.csv"], "--input-noise"),
    (["robustness", "{ckpt}", "--salt-pepper", "1.5", "--out", "{tmp}/r.csv"], "--salt-pepper"),
    (["robustness", "{ckpt}", "--input-noise", ",".join(["0.1"] * 101), "--out", "{tmp}/r.csv"], "--input-noise"),
    (["robustness", "{ckpt}", "--input-noise", "0.1", "--seeds", "0", "--out", "{tmp}/r.csv"], "--seeds"),
    (["robustness", "{ckpt}", "--input-noise", "0.1", "--max-samples", "0", "--out", "{tmp}/r.csv"], "--max-samples"),
    (["stability", "{ckpt}", "--time-budget", "-1"], "--time-budget"),
    (["stability", "{ckpt}", "--time-budget", "nan"], "--time-budget"),
    (["stability", "{ckpt}", "--time-budget", "inf"], "--time-budget"),
    (["stability", "{ckpt}", "--certificates", "warp-lmi"], "--certificates"),
    (["certify", "--beta", "0.75", "--gamma-a", "inf", "--radius", "0.1"], "--gamma-a"),
    (["certify", "--beta", "0.75", "--gamma-a", "0.5", "--radius", "-1"], "--radius"),
    (["certify", "--beta", "0.75", "--gamma-a", "0.5", "--radius", "0.1", "--tests", "warp-norm"], "--tests"),
    (["certify", "--beta", "0.75", "--gamma-a", "0.5", "--radius", "0.1", "--phase-betas", "0:1:100000"], "--phase-betas"),
    (["train", "--task", "digits", "--hidden", "100000", "--out", "{tmp}/m.safetensors"], "--hidden"),
    (["train", "--task", "digits", "--lr", "nan", "--out", "{tmp}/m.safetensors"], "--lr"),
    (["train", "--task", "adding", "--length", "1000000000", "--out", "{tmp}/m.safetensors"], "--length"),
    (["train", "--task", "digits", "--epochs", "1.5", "--out", "{tmp}/m.safetensors"], "--epochs"),
    (["train", "--task", "digits", "--threads", "100000", "--out", "{tmp}/m.safetensors"], "--threads"),
    (["audit", "{ckpt}", "--out", "{tmp}/a", "--gate", "min-accuracy=nan"], "min-accuracy"),
    (["audit", "{ckpt}", "--out", "{tmp}/a", "--gate", "min-accuracy=1.5"], "min-accuracy"),
    (["audit", "{ckpt}", "--out", "{tmp}/a", "--gate", "max-lambda=inf"], "max-lambda"),
    (["audit", "{ckpt}", "--out", "{tmp}/a", "--gate", "max-accuracy-drop=gaussian:nan:0.1"], "max-accuracy-drop"),
    (["audit", "{ckpt}", "--out", "{tmp}/a", "--gate", "max-accuracy-drop=salt-pepper:2:0.1"], "salt-pepper"),
])
def test_option_bounds_exit_2_in_one_line_before_any_work(saved, tmp_path, capsys, argv, needle):
    argv = [a.format(ckpt=saved, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "error:" in err and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("text", ["min-accuracy=nan", "max-trace=-inf", "max-lambda=1e999", "min-accuracy=-0.1",
                                  "max-accuracy-drop=gaussian:0.1:2"])
def test_gate_thresholds_are_finite_and_in_range(text):
    with pytest.raises(ValueError, match="bad gate"):
        Gate.parse(text)


# --- signals and pipes (real processes) --------------------------------------------------

_CHILDREN: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_child_left_behind():
    yield
    while _CHILDREN:
        child = _CHILDREN.pop()
        if child.poll() is None:
            child.kill()
            child.wait()


def _interruptible() -> None:
    # A shell that starts the suite in the background (`make test &`) makes its children ignore
    # SIGINT, and Python then installs no KeyboardInterrupt handler: give the child the
    # disposition a command typed at a terminal has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(code_or_argv, **kwargs):
    argv = [sys.executable, "-c", code_or_argv] if isinstance(code_or_argv, str) else [sys.executable, "-m", "lrnn_analysis.cli", *code_or_argv]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_interruptible, **kwargs)
    _CHILDREN.append(child)
    return child


def test_a_closed_pipe_ends_quietly(saved):
    process = _run(["info", "--json", str(saved)])
    process.stdout.close()  # the reader is gone before anything is written, as with `| head -0`
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141 and err == b""


def test_sigint_is_one_line_exit_130_and_nothing_written(tmp_path):
    out = tmp_path / "model.safetensors"
    code = textwrap.dedent(f"""
        import os, signal, sys, threading
        from lrnn_analysis.cli import main
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        sys.exit(main(["train", "--task", "adding", "--length", "50", "--epochs", "100000", "--quiet", "--out", {str(out)!r}]))
    """)
    process = _run(code)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.decode() == "lrnn train: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_mnist_labels_and_pixels_are_checked(tmp_path):
    images = np.zeros((20, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "bad.npz", images=images, labels=np.full(20, 11))
    with pytest.raises(ValueError, match="labels must be the integers 0..9"):
        load_task("smnist", path=str(tmp_path / "bad.npz"))


def test_sigint_while_starting_up_is_one_line_too(tmp_path):
    # torch and the other heavy libraries load when the command runs: an interrupt while they
    # load (or during the work that follows) is one line.
    out = tmp_path / "never.safetensors"
    code = textwrap.dedent(f"""
        import os, signal, sys, threading
        from lrnn_analysis.__main__ import run
        sys.argv = ["lrnn", "train", "--task", "digits", "--epochs", "100000", "--out", {str(out)!r}, "--quiet"]
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        sys.exit(run())
    """)
    process = _run(code)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.decode() == "lrnn train: interrupted\n", err
    assert not out.exists()


@pytest.mark.parametrize("content", [b"PK\x03\x04" + b"\x00" * 40, b"garbage", None])
def test_unreadable_npz_data_is_a_value_error(tmp_path, content):
    path = tmp_path / "data.npz"
    if content is None:
        np.save(tmp_path / "data.npy", np.zeros((20, 28, 28)))
        (tmp_path / "data.npy").rename(path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="data.npz"):
        load_task("smnist", path=str(path))
