"""User data files (--data): every malformed array or file is a one-line error naming the file and the array."""
import io
import struct
import zipfile

import numpy as np
import pytest
import torch

from lrnn_analysis.data_files import load_data
from lrnn_analysis.task import Task


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


class _NotATensor:
    pass


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


def test_user_data_validation_errors_name_the_file_and_the_array(tmp_path):
    x, y = np.zeros((4, 3, 2), np.float32), np.zeros(4, np.int64)
    cases = {
        "extra": (dict(x_train=x, y_train=y, x_test=x, y_test=y, notes=y), "unknown keys ['notes']"),
        "missing": (dict(x_train=x, y_train=y, x_test=x), "missing keys ['y_test']"),
        "flat": (dict(x_train=x[:, :, 0], y_train=y, x_test=x, y_test=y), "x_train: expected shape (N, T, D)"),
        "intx": (dict(x_train=x.astype(np.int32), y_train=y, x_test=x, y_test=y), "x_train: expected floating-point"),
        "nan": (dict(x_train=x, y_train=y, x_test=np.full_like(x, np.nan), y_test=y), "x_test: has non-finite"),
        "floaty": (dict(x_train=x, y_train=y.astype(np.float32), x_test=x, y_test=y),
                   "y_train: regression targets must have shape (N, k)"),
        "length": (dict(x_train=x, y_train=y[:3], x_test=x, y_test=y), "y_train: 3 targets for 4 inputs"),
        "steps": (dict(x_train=x, y_train=y, x_test=x[:, :2], y_test=y), "x_test: has T, D = (2, 2)"),
        "kinds": (dict(x_train=x, y_train=y, x_test=x, y_test=np.zeros((4, 1), np.float32)), "y_test: float32 targets"),
        "halfval": (dict(x_train=x, y_train=y, x_test=x, y_test=y, x_val=x), "x_val and y_val must be given together"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError) as error:
            load_data(path)
        assert str(error.value).startswith(str(path)) and message in str(error.value), name
        assert "\n" not in str(error.value)
    objects = tmp_path / "objects.npz"
    np.savez(objects, x_train=np.array([{"a": 1}], dtype=object), y_train=y, x_test=x, y_test=y)
    with pytest.raises(ValueError, match="x_train: holds Python objects"):
        load_data(objects)
    torch.save({"x_train": torch.zeros(4, 3, 2), "y_train": torch.zeros(4, dtype=torch.int64),
                "x_test": torch.zeros(4, 3, 2), "y_test": torch.zeros(4, dtype=torch.int64)}, tmp_path / "data.pt")
    assert load_data(tmp_path / "data.pt").num_classes == 1
    with pytest.raises(ValueError, match="is a built-in task"):
        Task.from_arrays(x, y, x, y, name="digits")
