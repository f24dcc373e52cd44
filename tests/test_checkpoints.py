"""Round trips and every kind of bad checkpoint: each a CheckpointError naming the file."""
import json
import os
import pickle

import pytest
import torch

from lrnn_analysis import checkpoints
from lrnn_analysis.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.models import ModelConfig, build_model

from checkpoint_edits import rewrite_header

CONFIG = ModelConfig("lipschitz", 1, 6, 3, eps=0.2, discretization="rk2")


@pytest.fixture
def saved(tmp_path):
    model = build_model(CONFIG, seed=0)
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"task": {"name": "digits", "seed": 0}})
    return model, path


def test_round_trip(saved):
    model, path = saved
    loaded, metadata = load_checkpoint(path)
    assert loaded.config == CONFIG
    assert metadata["task"] == {"name": "digits", "seed": 0} and metadata["format"] == checkpoints.FORMAT
    x = torch.randn(2, 5, 1)
    assert torch.equal(model(x), loaded(x))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_truncated_and_corrupt_files(saved, tmp_path):
    _, path = saved
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=f"{cut}: not a readable safetensors"):
        load_checkpoint(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(raw[:3])
    with pytest.raises(CheckpointError, match="empty or truncated"):
        load_checkpoint(tiny)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_checkpoint(garbage)


def test_hostile_pickle_is_refused_without_running_code(tmp_path):
    canary = tmp_path / "canary"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    for name, save in (("zip.pt", lambda p: torch.save({"w": Exploit()}, p)),
                       ("legacy.pkl", lambda p: p.write_bytes(pickle.dumps({"w": Exploit()}, protocol=2)))):
        path = tmp_path / name
        save(path)
        with pytest.raises(CheckpointError, match=r"refused to unpickle \(it would import (posix|os)\.system\)"):
            load_checkpoint(path)
        assert not canary.exists()


def test_non_finite_weights(saved, tmp_path):
    model, _ = saved
    state = model.state_dict()
    state["M_A"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save({"config": CONFIG.to_dict(), "state_dict": state}, path)
    with pytest.raises(CheckpointError, match="tensor M_A has non-finite values"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing to save non-finite"):
        save_checkpoint(tmp_path / "x.safetensors", model)
    assert not (tmp_path / "x.safetensors").exists()


def test_inconsistent_config_and_tensors(saved):
    _, path = saved
    rewrite_header(path, lambda h: h["__metadata__"].update(
        lrnn_analysis=json.dumps({**json.loads(h["__metadata__"]["lrnn_analysis"]),
                                  "config": {**CONFIG.to_dict(), "hidden": 7}})))
    with pytest.raises(CheckpointError, match="tensor .* has shape .* config implies"):
        load_checkpoint(path)


def test_unknown_architecture_and_bad_metadata(saved):
    _, path = saved
    original = path.read_bytes()
    rewrite_header(path, lambda h: h["__metadata__"].update(
        lrnn_analysis=json.dumps({"format": checkpoints.FORMAT, "config": {**CONFIG.to_dict(), "arch": "lstm"}})))
    with pytest.raises(CheckpointError, match="invalid model config .*unknown architecture 'lstm'"):
        load_checkpoint(path)
    path.write_bytes(original)
    rewrite_header(path, lambda h: h["__metadata__"].update(lrnn_analysis="{not json"))
    with pytest.raises(CheckpointError, match="corrupt metadata JSON"):
        load_checkpoint(path)
    path.write_bytes(original)
    rewrite_header(path, lambda h: h.pop("__metadata__"))
    with pytest.raises(CheckpointError, match="no 'lrnn_analysis' metadata"):
        load_checkpoint(path)


def test_missing_and_extra_tensors(saved, tmp_path):
    model, _ = saved
    state = model.state_dict()
    del state["M_W"]
    path = tmp_path / "partial.pt"
    torch.save({"config": CONFIG.to_dict(), "state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"missing \['M_W'\]"):
        load_checkpoint(path)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="without a model config"):
        load_checkpoint(tmp_path / "bare.pt")


def _reference_state(n=4):
    return {"B": torch.randn(n, n), "C": torch.randn(n, n), "E.weight": torch.randn(n, 1), "E.bias": torch.randn(n),
            "D.weight": torch.randn(10, n), "D.bias": torch.randn(10)}


def test_reference_state_dict_hparams_from_filename_or_arguments(tmp_path):
    name = "LipschitzRNN_mnist_T_784_units_4_beta_0.75_alpha_1_gamma_0.001_eps_0.03_solver_euler_gclip_0_optimizer_Adam_seed_1.pkl"
    torch.save(_reference_state(), tmp_path / name)
    model, metadata = load_checkpoint(tmp_path / name)
    assert (model.config.eps, model.config.beta_a, model.config.gamma_w) == (0.03, 0.75, 0.001)
    assert metadata["reference_hparams"]["seed"] == 1
    torch.save({f"module.{k}": v for k, v in _reference_state().items()}, tmp_path / "ref.pt")
    with pytest.raises(CheckpointError, match=r"needs \['beta', 'gamma', 'eps'\]"):
        load_checkpoint(tmp_path / "ref.pt")
    with pytest.warns(UserWarning, match="alpha is recorded nowhere"):
        model, _ = load_checkpoint(tmp_path / "ref.pt", beta=0.5, gamma=0.1, eps=0.2)
    assert (model.config.beta_w, model.config.eps) == (0.5, 0.2)


def test_interrupted_save_leaves_nothing(saved, tmp_path, monkeypatch):
    model, _ = saved

    def explode(state, filename, metadata):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "sub" / "new.safetensors", model)
    assert list((tmp_path / "sub").iterdir()) == []


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and err.startswith("lrnn info: error:")


def test_header_length_that_looks_like_a_pickle_opcode(tmp_path):
    model = build_model(CONFIG, seed=0)
    path = tmp_path / "m.safetensors"
    for pad in range(300):
        save_checkpoint(path, model, {"note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert load_checkpoint(path).model.config == CONFIG


def _torch_checkpoint(path, state, **metadata):
    torch.save({"config": CONFIG.to_dict(), "state_dict": state, **metadata}, path)
    return path


def test_views_claiming_more_than_they_store_or_sharing_storage_are_refused(saved, tmp_path):
    state = {k: v.clone() for k, v in saved[0].state_dict().items()}
    flat = torch.zeros(1).expand(6, 6)
    with pytest.raises(CheckpointError, match=r"\['state_dict'\]\['M_A'\] claims 36 elements .* storage holds 4 bytes"):
        load_checkpoint(_torch_checkpoint(tmp_path / "flat.pt", {**state, "M_A": flat}))
    both = torch.randn(2, 6, 6)
    with pytest.raises(CheckpointError, match="are views of one storage"):
        load_checkpoint(_torch_checkpoint(tmp_path / "shared.pt", {**state, "M_A": both[0], "M_W": both[1]}))
    assert load_checkpoint(_torch_checkpoint(tmp_path / "fine.pt", state)).model.config == CONFIG


def test_declared_storage_sizes_are_bounded_before_loading(saved, tmp_path):
    from helpers import run_limited

    state = {k: v.clone() for k, v in saved[0].state_dict().items()}
    legacy = tmp_path / "legacy.pt"
    torch.save({"config": CONFIG.to_dict(), "state_dict": state}, legacy, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    at = data.index(b"cpu") + data[data.index(b"cpu"):].index(b"K$")  # the first storage's 36 elements
    legacy.write_bytes(data[:at] + b"J" + (2**28).to_bytes(4, "little") + data[at + 2:])  # 1 GiB of float32
    zipped = _torch_checkpoint(tmp_path / "zipped.pt", state)
    data = bytearray(zipped.read_bytes())
    import zipfile

    with zipfile.ZipFile(zipped) as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
        directory = archive.start_dir
    data[member.header_offset + 22:member.header_offset + 26] = (2**31).to_bytes(4, "little")
    entry = data.index(b"PK\x01\x02", directory)
    while not bytes(data[entry + 46:entry + 46 + len(member.filename)]).decode(errors="replace") == member.filename:
        entry = data.index(b"PK\x01\x02", entry + 4)
    data[entry + 24:entry + 28] = (2**31).to_bytes(4, "little")
    zipped.write_bytes(bytes(data))
    result = run_limited(f"""
from lrnn_analysis.checkpoints import CheckpointError, load_checkpoint
result = {{}}
for path in {[str(legacy), str(zipped)]!r}:
    try:
        load_checkpoint(path)
        result[path] = "loaded"
    except CheckpointError as error:
        result[path] = str(error)
""")
    assert result[str(legacy)].startswith(f"{legacy}: its storages declare 10737")  # 2^30 + the other storages
    assert result[str(legacy)].endswith("bytes after its pickles (corrupt or truncated)")
    assert result[str(zipped)] == (f"{zipped}: member '{member.filename}' declares 2147483648 bytes, more than the "
                                   f"{checkpoints.MAX_TENSOR_BYTES}-byte limit")
    assert result["peak_rss_mb"] < 1024


def test_shared_metadata_lists_nested_deep_are_refused_within_a_budget(saved, tmp_path):
    from helpers import time_limit

    nested = [0.5]
    for _ in range(12):
        nested = [nested] * 30  # 30^12 places to visit, a few hundred bytes pickled
    path = _torch_checkpoint(tmp_path / "nested.pt", dict(saved[0].state_dict()), metrics={"history": nested})
    with time_limit(60), pytest.raises(CheckpointError, match="shared references expand to more than 16 objects per byte"):
        load_checkpoint(path)
    with time_limit(60), pytest.raises(CheckpointError, match=r"^f.pt: metadata.metrics.history(\[\d+\])+: the metadata "
                                                             "expands to more than 16 values per byte"):
        checkpoints._check_json_value("f.pt", {"metrics": {"history": nested}}, "metadata", 0, [1000])
