"""Hostile pickles against the reference readers: nothing in a file may change the process or
write a file, and no pickle may make the plain reader recurse or expand without bound."""
import io
import pickle

import pytest
import torch
from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

from lrnn_analysis.reference.pickles import _latin1_bytes, load_plain_pickle, load_torch_file

# A module persistent id of a stand-in, pushed and popped: it makes torch's weights-only reader give
# up on the file, so the rest of the main pickle is read by the restricted legacy reader.
MODULE_PID = b"(X\x06\x00\x00\x00modulecmodels\nRnnModels\nNNtQ0"


def _legacy_file(main: bytes) -> io.BytesIO:
    out = io.BytesIO()
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {}):
        pickle.dump(header, out, protocol=2)
    out.write(main)
    pickle.dump([], out, protocol=2)
    out.seek(0)
    return out


def test_a_stand_in_module_id_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    content = load_torch_file(_legacy_file(b"\x80\x02" + MODULE_PID[:-1] + b"."))
    assert content.__name__ == "RnnModels" and list(tmp_path.iterdir()) == []


def test_build_on_an_allowed_function_is_refused_and_writes_no_patch_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # BUILD {'dump_patches': True} on torch._utils._rebuild_tensor, then a module id naming it:
    # torch's legacy reader would write '_rebuild_tensor.patch' into the working directory.
    main = (b"\x80\x02" + MODULE_PID + b"ctorch._utils\n_rebuild_tensor\nq\x05}X\x0c\x00\x00\x00dump_patches\x88sb0"
            b"(X\x06\x00\x00\x00moduleh\x05X\x03\x00\x00\x00abcX\x03\x00\x00\x00xyztQ.")
    with pytest.raises(pickle.UnpicklingError, match="BUILD"):
        load_torch_file(_legacy_file(main))
    assert not hasattr(torch._utils._rebuild_tensor, "dump_patches")
    assert list(tmp_path.iterdir()) == []


def test_a_module_id_naming_anything_but_a_stand_in_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = b"\x80\x02" + MODULE_PID + b"(X\x06\x00\x00\x00modulectorch._utils\n_rebuild_tensor\nX\x01\x00\x00\x00aX\x01\x00\x00\x00btQ."
    with pytest.raises(pickle.UnpicklingError, match="module persistent id"):
        load_torch_file(_legacy_file(main))
    assert list(tmp_path.iterdir()) == []


def test_plain_reader_refuses_build_on_its_own_functions():
    hostile = b"\x80\x02c_codecs\nencode\nN}X\x0c\x00\x00\x00__defaults__(X\x05\x00\x00\x00utf-8ts\x86b."
    with pytest.raises(pickle.UnpicklingError, match="BUILD"):
        load_plain_pickle(hostile)
    assert _latin1_bytes.__defaults__ == ("latin1",)


def test_plain_reader_bounds_shared_references_and_nesting():
    laughs = b"\x80\x02]q\x00(K\x01K\x02e"  # memo 0 = [1, 2]; memo i = (memo i-1, memo i-1)
    for i in range(1, 60):
        laughs += b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i])
    with pytest.raises(pickle.UnpicklingError, match="shared references"):
        load_plain_pickle(laughs + b".")
    loop: list = []
    loop.append(loop)
    with pytest.raises(pickle.UnpicklingError, match="nested deeper"):
        load_plain_pickle(pickle.dumps(loop))
    with pytest.raises(pickle.UnpicklingError, match="nested deeper"):
        load_plain_pickle(b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b".")
    history = {"loss": [[0.5] * 10] * 3, "eigA": [0.1, 0.2, 0.3], "eigW": [0.0] * 3, "testacc": [90.0] * 3}
    assert load_plain_pickle(pickle.dumps(history)) == history
