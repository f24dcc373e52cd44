"""User data files (--data): every malformed array or file is a one-line error naming the file and the array."""
import io
import json
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch

from helpers import run_limited
from lrnn_analysis.data_files import MAX_ARRAY_BYTES, load_data
from lrnn_analysis.errors import InputError
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
        "intx": (dict(x_train=x.astype(np.int32), y_train=y, x_test=x, y_test=y), "x_train: integer inputs are token ids of shape (N, T)"),
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


def _npy_header(shape, descr="<f4") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _zip(members) -> bytes:
    """A zip of (name, stored bytes, method, declared uncompressed size, crc) members, written by
    hand so that a member may declare any size."""
    out, directory = bytearray(), bytearray()
    for name, data, method, size, crc in members:
        encoded = name.encode()
        fields = struct.pack("<HHHHHIII", 20, 0, method, 0, 0x21, crc, len(data), size)
        directory += b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHHHII", len(encoded), 0, 0, 0, 0, 0,
                                                                                 len(out)) + encoded
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(encoded), 0) + encoded + data
    end = struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(directory), len(out), 0)
    return bytes(out + directory + b"PK\x05\x06" + end)


def _stored(name, data):
    return (name, data, zipfile.ZIP_STORED, len(data), zlib.crc32(data))


def _splits(**override):
    x, y = np.zeros((4, 5, 2), "f4"), np.arange(4) % 2
    members = {"x_train": _saved(x), "y_train": _saved(y), "x_test": _saved(x), "y_test": _saved(y)}
    members.update(override)
    return [_stored(f"{key}.npy", data) for key, data in members.items()]


def _zeros_deflated(count: int) -> bytes:
    """A raw deflate stream of ``count`` zero bytes (count a multiple of 1 MiB), made of one
    fully flushed MiB repeated: a few bytes per MiB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return chunk * (count // 2**20) + compressor.flush(zlib.Z_FINISH)


def test_a_decompression_bomb_is_refused_before_it_is_inflated(tmp_path):
    declared = 1536 * 2**20  # 1.5 GiB of float32 zeros behind a 1.5 MB member
    header = _npy_header((declared // 40, 5, 2))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH) + _zeros_deflated(declared)
    members = _splits()[1:] + [("x_train.npy", body, zipfile.ZIP_DEFLATED, len(header) + declared, 0)]
    path = tmp_path / "bomb.npz"
    path.write_bytes(_zip(members))
    assert path.stat().st_size < 4 * 2**20
    result = run_limited(f"""
from lrnn_analysis.data_files import load_data
from lrnn_analysis.errors import InputError
try:
    load_data({str(path)!r})
    result = {{"loaded": True}}
except InputError as error:
    result = {{"error": str(error)}}
""")
    assert result["error"].startswith(f"{path}: x_train: declares {len(header) + declared} bytes uncompressed, more than "
                                      f"the {MAX_ARRAY_BYTES}-byte limit")
    assert result["peak_rss_mb"] < 1024


@pytest.mark.parametrize("case,member,match", [
    ("just-over-1-GiB", _npy_header((2**28 + 1, 1, 1)), r"x_train: shape \(268435457, 1, 1\) of float32 exceeds 1 GiB"),
    ("too-many-elements", _npy_header((2**28 + 1, 1, 1), "|u1"), "or 268435456 elements"),
    ("header-beyond-member", _npy_header((4, 5, 2)) + bytes(16), "its header declares 160 bytes of data, the member holds 16"),
])
def test_member_headers_are_bounded_before_the_data_are_read(tmp_path, case, member, match):
    path = tmp_path / f"{case}.npz"
    path.write_bytes(_zip(_splits(x_train=member)))
    with pytest.raises(InputError, match=match) as caught:
        load_data(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_the_arrays_of_a_file_are_bounded_in_all(tmp_path):
    header = _npy_header((3 * 2**26, 1, 1))  # 0.75 GiB, three times: 2.25 GiB
    members = _splits()[:2] + [(f"{key}.npy", header, zipfile.ZIP_STORED, len(header) + 3 * 2**28, 0)
                               for key in ("x_test", "x_val", "y_test")]
    path = tmp_path / "large.npz"
    path.write_bytes(_zip(members + [_stored("y_val.npy", _saved(np.arange(4)))]))
    with pytest.raises(InputError, match=f"{path}: its members declare more than 2147483648 bytes in all"):
        load_data(path)


@pytest.mark.parametrize("second", ["x_train.npy", "x_train"])
def test_two_members_of_one_name_are_refused(tmp_path, second):
    other = _saved(np.ones((4, 5, 2), "f4"))
    path = tmp_path / "twice.npz"
    path.write_bytes(_zip(_splits() + [_stored(second, other)]))
    with pytest.raises(InputError, match=f"{path}: holds two members named 'x_train'; which one is meant is ambiguous"):
        load_data(path)


def test_a_member_compressed_otherwise_than_numpy_writes_is_refused(tmp_path):
    path = tmp_path / "bzip.npz"
    data = _saved(np.zeros((4, 5, 2), "f4"))
    path.write_bytes(_zip(_splits()[1:] + [("x_train.npy", data, zipfile.ZIP_BZIP2, len(data), zlib.crc32(data))]))
    with pytest.raises(InputError, match="x_train: compressed with zip method 12"):
        load_data(path)


def _torch_splits(**override):
    x, y = torch.zeros(4, 5, 2), torch.arange(4) % 2
    return {"x_train": x, "y_train": y, "x_test": x.clone(), "y_test": y.clone(), **override}


def test_stride_0_and_huge_declared_pytorch_data_are_refused_under_a_memory_limit(tmp_path):
    huge_view = tmp_path / "view.pt"  # 2^36 float32 elements (256 GiB once materialised) from 4 stored bytes
    torch.save(_torch_splits(x_train=torch.zeros(1).expand(2**16, 2**10, 2**10)), huge_view)
    legacy = io.BytesIO()
    torch.save(_torch_splits(), legacy, _use_new_zipfile_serialization=False)
    data = legacy.getvalue()
    count = struct.pack("<B", 40)  # x_train's 40 elements, as BININT1 40 before its persistent id
    at = data.index(b"cpu") + data[data.index(b"cpu"):].index(b"K" + count)
    declared = tmp_path / "declared.pt"
    declared.write_bytes(data[:at] + b"J" + struct.pack("<i", 2**29) + data[at + 2:])  # 2 GiB of float32
    result = run_limited(f"""
from lrnn_analysis.data_files import load_data
from lrnn_analysis.errors import InputError
result = {{}}
for path in {[str(huge_view), str(declared)]!r}:
    try:
        load_data(path)
        result[path] = "loaded"
    except InputError as error:
        result[path] = str(error)
""")
    assert result[str(huge_view)].startswith(f"{huge_view}: ['x_train'] claims 68719476736 elements")
    assert "stride-0 or overlapping view" in result[str(huge_view)]
    assert result[str(declared)].startswith(f"{declared}: a storage declares 536870912 elements (2147483648 bytes)")
    assert result["peak_rss_mb"] < 1024


@pytest.mark.parametrize("override,match", [
    ({"x_train": torch.zeros(4, 5, 2, dtype=torch.bfloat16)}, "x_train: a bfloat16 tensor; a data file holds float16/32/64"),
    ({"y_train": (torch.arange(4) % 2).to_sparse()}, r"\['y_train'\] is a sparse_coo tensor; only dense tensors are read"),
    ({"y_train": torch.tensor(1)}, "y_train: a single number; expected class labels"),
    ({"x_train": (x := torch.zeros(4, 5, 2)), "x_test": x[:2]}, "are views of one storage"),
])
def test_pytorch_data_a_task_cannot_use_is_one_line(tmp_path, override, match):
    path = tmp_path / "data.pt"
    torch.save(_torch_splits(**override), path)
    with pytest.raises(InputError, match=match) as caught:
        load_data(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_a_good_npz_and_pytorch_file_still_load(tmp_path):
    path = tmp_path / "good.npz"
    path.write_bytes(_zip(_splits()))
    task = load_data(path)
    torch.save(_torch_splits(), tmp_path / "good.pt")
    same = load_data(tmp_path / "good.pt")
    assert torch.equal(task.train.x, same.train.x) and torch.equal(task.test.y, same.test.y)
    assert json.loads(json.dumps(task.summary()))["sizes"] == {"train": 4, "val": 0, "test": 4}


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_token_ids_per_step_targets_and_masks_load_from_npz_and_torch_files(tmp_path, suffix):
    from language_model import token_sequences
    from lrnn_analysis.objective import IGNORE_INDEX

    x, y, mask = token_sequences(np.random.default_rng(0), 6)
    arrays = dict(x_train=x, y_train=y, mask_train=mask, x_test=x[:3], y_test=y[:3], mask_test=mask[:3])
    path = tmp_path / f"lm{suffix}"
    if suffix == ".npz":
        np.savez(path, **arrays)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    task = load_data(path)
    assert (task.input_kind, task.per_step, task.objective.headline) == ("tokens", True, "perplexity")
    assert torch.equal(task.train.y == IGNORE_INDEX, torch.from_numpy(~mask))
    assert torch.equal(task.test.x, torch.from_numpy(x[:3]))
    np.savez(tmp_path / "floaty.npz", **{**arrays, "y_train": y.astype(np.float32)})
    with pytest.raises(InputError, match="floaty.npz: y_train: floating-point targets of shape .* per-step regression targets "
                                         r"need shape \(N, T, k\)"):
        load_data(tmp_path / "floaty.npz")
