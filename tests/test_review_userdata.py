"""Hostile --data files: one line naming the file, exit 2, for every malformed .npz."""
import io
import struct
import zipfile

import numpy as np
import pytest

from lrnn_analysis.data_files import load_data


def _npy(shape, descr="<f4", data=b""):
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def _saved(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz(path, **override):
    members = {"x_train": _saved(np.zeros((4, 5, 2), "f4")), "y_train": _saved(np.arange(4) % 2),
               "x_test": _saved(np.zeros((2, 5, 2), "f4")), "y_test": _saved(np.arange(2))}
    members.update(override)
    with zipfile.ZipFile(path, "w") as archive:
        for key, data in members.items():
            archive.writestr(key + ".npy", data)
    return path


@pytest.mark.parametrize("case,member,match", [
    ("wrapping-shape", _npy((2**32, 2**32)), "exceeds"),
    ("negative-shape", _npy((-1, 5, 2)), "negative dimension"),
    ("truncated-data", _npy((4, 5, 2), data=b"\0" * 7), "not a readable .npz"),
    ("bad-magic", b"garbage", "not a readable .npz"),
    ("bad-version", b"\x93NUMPY\x03\x00" + b"\0" * 20, "not a readable .npz"),
    ("out-of-float32-range", _saved(np.full((4, 5, 2), 1e300)), "non-finite"),
])
def test_malformed_npz_members_name_the_file(tmp_path, case, member, match):
    path = _npz(tmp_path / f"{case}.npz", x_train=member)
    with pytest.raises(ValueError, match=match) as caught:
        load_data(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_out_of_range_values_give_no_numpy_warning(tmp_path, recwarn):
    with pytest.raises(ValueError, match="non-finite"):
        load_data(_npz(tmp_path / "big.npz", x_train=_saved(np.full((4, 5, 2), 1e300))))
    with pytest.raises(ValueError, match="non-finite"):
        load_data(_npz(tmp_path / "bigy.npz", y_train=_saved(np.full((4, 1), 1e300)),
                       y_test=_saved(np.zeros((2, 1)))))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_unsigned_labels_beyond_int64_are_refused(tmp_path):
    labels = np.array([2**64 - 1, 0, 1, 0], dtype=np.uint64)
    with pytest.raises(ValueError, match="class label 18446744073709551615 is larger"):
        load_data(_npz(tmp_path / "u64.npz", y_train=_saved(labels)))


class _NotATensor:
    pass


def test_a_torch_data_file_with_objects_is_refused_without_torchs_advice(tmp_path):
    import torch

    path = tmp_path / "data.pt"
    torch.save({"x_train": _NotATensor()}, path)
    with pytest.raises(ValueError) as caught:
        load_data(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: refused to unpickle (") and "weights_only=False" not in message
    assert len(message.splitlines()) == 1


def test_a_truncated_torch_data_file_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "data.pt"
    path.write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match=f"^{path}: ") as caught:
        load_data(path)
    assert len(str(caught.value).splitlines()) == 1


def test_a_weights_file_beyond_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    import torch

    from lrnn_analysis import usermodule

    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(100)}, path)
    monkeypatch.setattr(usermodule, "MAX_FILE_BYTES", 64)
    monkeypatch.setattr(usermodule.torch, "load", lambda *a, **k: pytest.fail("read a file beyond the limit"))
    with pytest.raises(ValueError, match="larger than the 64-byte limit"):
        usermodule.read_state_dict(path)
