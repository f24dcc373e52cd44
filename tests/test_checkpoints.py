"""Round trips and every kind of bad checkpoint (each a CheckpointError naming the file), the integrity
hash, and seeded mutation fuzzing of the loader."""
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from checkpoint_edits import rewrite_header
from helpers import REPO_ROOT, SAVED_CONFIG
from lrnn_analysis import checkpoints
from lrnn_analysis.checkpoints import CheckpointError, IntegrityWarning, load_checkpoint, save_checkpoint, weights_sha256
from lrnn_analysis.cli import main
from lrnn_analysis.models import ModelConfig, build_model

CONFIG = ModelConfig("lipschitz", 1, 6, 3, eps=0.2, discretization="rk2")


@pytest.fixture
def saved_model(tmp_path):
    model = build_model(CONFIG, seed=0)
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"task": {"name": "digits", "seed": 0}})
    return model, path


FUZZ_CHILD = Path(__file__).with_name("checkpoint_fuzz.py")
PEAK_RSS_BUDGET_MB = 700


def test_round_trip(saved_model):
    model, path = saved_model
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


def test_truncated_and_corrupt_files(saved_model, tmp_path):
    _, path = saved_model
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


def test_non_finite_weights(saved_model, tmp_path):
    model, _ = saved_model
    state = model.state_dict()
    state["M_A"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save({"config": CONFIG.to_dict(), "state_dict": state}, path)
    with pytest.raises(CheckpointError, match="tensor M_A has non-finite values"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing to save non-finite"):
        save_checkpoint(tmp_path / "x.safetensors", model)
    assert not (tmp_path / "x.safetensors").exists()


def test_inconsistent_config_and_tensors(saved_model):
    _, path = saved_model
    rewrite_header(path, lambda h: h["__metadata__"].update(
        lrnn_analysis=json.dumps({**json.loads(h["__metadata__"]["lrnn_analysis"]),
                                  "config": {**CONFIG.to_dict(), "hidden": 7}})))
    with pytest.raises(CheckpointError, match="tensor .* has shape .* config implies"):
        load_checkpoint(path)


def test_unknown_architecture_and_bad_metadata(saved_model):
    _, path = saved_model
    original = path.read_bytes()
    rewrite_header(path, lambda h: h["__metadata__"].update(
        lrnn_analysis=json.dumps({"format": checkpoints.FORMAT, "config": {**CONFIG.to_dict(), "arch": "gru"}})))
    with pytest.raises(CheckpointError, match="invalid model config .*unknown architecture 'gru'"):
        load_checkpoint(path)
    path.write_bytes(original)
    rewrite_header(path, lambda h: h["__metadata__"].update(lrnn_analysis="{not json"))
    with pytest.raises(CheckpointError, match="corrupt metadata JSON"):
        load_checkpoint(path)
    path.write_bytes(original)
    rewrite_header(path, lambda h: h.pop("__metadata__"))
    with pytest.raises(CheckpointError, match="no 'lrnn_analysis' metadata"):
        load_checkpoint(path)


def test_missing_and_extra_tensors(saved_model, tmp_path):
    model, _ = saved_model
    state = model.state_dict()
    del state["M_W"]
    path = tmp_path / "partial.pt"
    torch.save({"config": CONFIG.to_dict(), "state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"missing \['M_W'\]"):
        load_checkpoint(path)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="without a model config"):
        load_checkpoint(tmp_path / "bare.pt")


def test_interrupted_save_leaves_nothing(saved_model, tmp_path, monkeypatch):
    model, _ = saved_model

    def explode(state, filename, metadata):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "sub" / "new.safetensors", model)
    assert list((tmp_path / "sub").iterdir()) == []


def test_header_length_that_looks_like_a_pickle_opcode(tmp_path):
    model = build_model(CONFIG, seed=0)
    path = tmp_path / "m.safetensors"
    for pad in range(300):
        save_checkpoint(path, model, {"note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert load_checkpoint(path).model.config == CONFIG


@pytest.mark.usefixtures("time_limit")
def test_hash_is_recorded_verified_and_shown(saved, capsys):
    loaded = load_checkpoint(saved)
    assert loaded.sha256 == weights_sha256(SAVED_CONFIG, {k: v.float() for k, v in loaded.model.state_dict().items()})
    assert main(["info", str(saved)]) == 0
    assert f"weights_sha256: {loaded.sha256}" in capsys.readouterr().out
    assert main(["info", "--json", str(saved)]) == 0
    assert json.loads(capsys.readouterr().out)["weights_sha256"] == loaded.sha256


@pytest.mark.usefixtures("time_limit")
def test_config_fields_added_since_v1_enter_the_hash_only_away_from_their_default(saved):
    tensors = {k: v.float() for k, v in load_checkpoint(saved).model.state_dict().items()}
    v1_config = {k: v for k, v in SAVED_CONFIG.to_dict().items() if k not in checkpoints.HASH_OMITTED_AT_DEFAULT}
    digest = hashlib.sha256()
    for data in [checkpoints.HASH_DOMAIN, json.dumps(v1_config, sort_keys=True, separators=(",", ":")).encode()] + [
            part for name in sorted(tensors)
            for part in (name.encode(), b"F32", json.dumps(list(tensors[name].shape), separators=(",", ":")).encode(),
                         tensors[name].numpy().tobytes())]:
        digest.update(struct.pack("<Q", len(data)) + data)
    assert weights_sha256(SAVED_CONFIG, tensors) == digest.hexdigest()
    for field, value in (("rho", 0.5), ("rank", 4), ("cond_penalty", 0.0), ("readout", "all")):
        assert weights_sha256(ModelConfig(**{**SAVED_CONFIG.to_dict(), field: value}), tensors) != digest.hexdigest()
    rewrite_header(saved, record_edit=lambda r: r["config"].update(rho=0.5))
    with pytest.raises(CheckpointError, match="integrity check failed"):
        load_checkpoint(saved)


@pytest.mark.usefixtures("time_limit")
def test_a_checkpoint_from_before_readout_loads_as_last_step(saved):
    rewrite_header(saved, record_edit=lambda r: r["config"].pop("readout"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntegrityWarning)
        model = load_checkpoint(saved).model
    assert model.config.readout == "last" and model(torch.zeros(2, 5, SAVED_CONFIG.input_dim)).shape == (2, SAVED_CONFIG.output_dim)


@pytest.mark.usefixtures("time_limit")
def test_a_checkpoint_without_a_hash_loads_with_a_visible_warning(saved, capsys):
    rewrite_header(saved, record_edit=lambda r: r.pop("weights_sha256"))
    with pytest.warns(IntegrityWarning, match="records no integrity hash"):
        loaded = load_checkpoint(saved)
    assert len(loaded.sha256) == 64
    assert main(["info", str(saved)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("lrnn info: warning:") and len(err.splitlines()) == 1


@pytest.mark.usefixtures("time_limit")
def test_committed_reference_models_verify():
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntegrityWarning)
        for path in sorted((REPO_ROOT / "models").glob("*.safetensors")):
            assert "weights_sha256" in json.loads(json.loads(
                path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])["__metadata__"]["lrnn_analysis"])
            load_checkpoint(path)


def test_mutated_checkpoints_load_or_fail_cleanly(tmp_path):
    child = subprocess.run([sys.executable, str(FUZZ_CHILD), str(tmp_path)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["cases"] >= 200
    assert report["failures"] == []
    assert report["loaded"] >= 1 and report["refused"] >= 100
    assert report["peak_rss_mb"] < PEAK_RSS_BUDGET_MB


def _torch_checkpoint(path, state, **metadata):
    torch.save({"config": CONFIG.to_dict(), "state_dict": state, **metadata}, path)
    return path


def test_views_claiming_more_than_they_store_or_sharing_storage_are_refused(saved_model, tmp_path):
    state = {k: v.clone() for k, v in saved_model[0].state_dict().items()}
    flat = torch.zeros(1).expand(6, 6)
    with pytest.raises(CheckpointError, match=r"\['state_dict'\]\['M_A'\] claims 36 elements .* storage holds 4 bytes"):
        load_checkpoint(_torch_checkpoint(tmp_path / "flat.pt", {**state, "M_A": flat}))
    both = torch.randn(2, 6, 6)
    with pytest.raises(CheckpointError, match="are views of one storage"):
        load_checkpoint(_torch_checkpoint(tmp_path / "shared.pt", {**state, "M_A": both[0], "M_W": both[1]}))
    assert load_checkpoint(_torch_checkpoint(tmp_path / "fine.pt", state)).model.config == CONFIG


def test_declared_storage_sizes_are_bounded_before_loading(saved_model, tmp_path):
    from helpers import run_limited

    state = {k: v.clone() for k, v in saved_model[0].state_dict().items()}
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


def test_shared_metadata_lists_nested_deep_are_refused_within_a_budget(saved_model, tmp_path):
    from helpers import time_limit

    nested = [0.5]
    for _ in range(12):
        nested = [nested] * 30  # 30^12 places to visit, a few hundred bytes pickled
    path = _torch_checkpoint(tmp_path / "nested.pt", dict(saved_model[0].state_dict()), metrics={"history": nested})
    with time_limit(60), pytest.raises(CheckpointError, match="shared references expand to more than 16 objects per byte"):
        load_checkpoint(path)
    with time_limit(60), pytest.raises(CheckpointError, match=r"^f.pt: metadata.metrics.history(\[\d+\])+: the metadata "
                                                             "expands to more than 16 values per byte"):
        checkpoints._check_json_value("f.pt", {"metrics": {"history": nested}}, "metadata", 0, [1000])
