"""PyTorch files bounded before torch.load (declared sizes) and checked after (views, sharing, budget)."""
import io
import pickletools
import struct
import zipfile

import pytest
import torch

from helpers import time_limit
from lrnn_analysis.errors import InputError
from lrnn_analysis.torch_files import _storage_ids, check_declared_sizes, check_tensors


def _legacy(content) -> bytes:
    buffer = io.BytesIO()
    torch.save(content, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _zipped(content) -> bytes:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


def _with_numel(data: bytes, numel_opcode: bytes) -> bytes:
    """The legacy file with the element count of its first storage replaced by ``numel_opcode``."""
    stream = io.BytesIO(data)
    for _ in range(3):
        list(pickletools.genops(stream))
    ops = list(pickletools.genops(stream))
    persistent_id = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
    count = next(i for i in range(persistent_id, 0, -1) if ops[i][0].name.startswith("BININT"))  # the id's last integer
    return data[:ops[count][2]] + numel_opcode + data[ops[count + 1][2]:]


def _with_declared_size(data: bytes, member_suffix: str, size: int) -> bytes:
    """The zip with ``member``'s uncompressed size in its local header and directory entry set to ``size``."""
    patched = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
        directory = archive.start_dir
    struct.pack_into("<I", patched, info.header_offset + 22, size)
    while True:
        name_length = struct.unpack_from("<H", patched, directory + 28)[0]
        if bytes(patched[directory + 46:directory + 46 + name_length]).decode().endswith(member_suffix):
            struct.pack_into("<I", patched, directory + 24, size)
            return bytes(patched)
        extra, comment = struct.unpack_from("<HH", patched, directory + 30)
        directory += 46 + name_length + extra + comment


def test_the_legacy_walk_finds_the_storages_torch_allocates():
    content = {"a": torch.zeros(3, 5), "b": torch.arange(7, dtype=torch.int16), "c": [torch.ones(2, dtype=torch.float64)],
               "d": torch.zeros(4, dtype=torch.bfloat16)}
    data = _legacy(content)
    stream = io.BytesIO(data)
    declared = {storage.key: storage.nbytes for storage in _storage_ids(stream, 5)}
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    tensors = [loaded["a"], loaded["b"], loaded["c"][0], loaded["d"]]
    assert sorted(declared.values()) == sorted(t.untyped_storage().nbytes() for t in tensors)
    assert len(data) - stream.tell() == sum(declared.values()) + 8 * len(declared)  # each storage: its size, its bytes


def test_a_legacy_storage_declaring_more_than_the_file_holds_is_refused_before_loading():
    data = _with_numel(_legacy({"w": torch.zeros(6)}), b"J" + struct.pack("<i", 2**28))
    with pytest.raises(InputError, match=r"f.pt: its storages declare 1073741824 bytes but the file holds \d+ bytes"):
        check_declared_sizes(io.BytesIO(data), len(data), "f.pt", 2**31, 2**31)
    with pytest.raises(InputError, match="declares 268435456 elements .* more than the 1024-byte limit"):
        check_declared_sizes(io.BytesIO(data), len(data), "f.pt", 1024, 2**31)
    intact = _legacy({"w": torch.zeros(6)})
    check_declared_sizes(io.BytesIO(intact), len(intact), "f.pt", 1024, 2**31)


def test_a_legacy_element_count_that_is_not_a_literal_is_refused():
    # GET of an unset memo slot: the count is only known by running the pickle
    data = _with_numel(_legacy({"w": torch.zeros(6)}), b"h\xfe")
    with pytest.raises(InputError, match="not written out as a literal"):
        check_declared_sizes(io.BytesIO(data), len(data), "f.pt", 2**31, 2**31)


def test_zip_members_declaring_sizes_beyond_the_limits_are_refused():
    data = _zipped({"w": torch.zeros(6)})
    check_declared_sizes(io.BytesIO(data), len(data), "f.pt", 1024, 4096)
    bomb = _with_declared_size(data, "/data/0", 2**31)
    with pytest.raises(InputError, match=r"f.pt: member '.*/data/0' declares 2147483648 bytes, more than the 1024-byte limit"):
        check_declared_sizes(io.BytesIO(bomb), len(bomb), "f.pt", 1024, 4096)
    with pytest.raises(InputError, match="more than the 100-byte limit in all"):
        check_declared_sizes(io.BytesIO(data), len(data), "f.pt", 1024, 100)
    buffer = io.BytesIO(data[:0])
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("archive/data.pkl", b"\x80\x02]q\x00.")
    twice = buffer.getvalue()
    with pytest.raises(InputError, match="two members named 'archive/data.pkl'"):
        check_declared_sizes(io.BytesIO(twice), len(twice), "f.pt", 1024, 4096)


@pytest.mark.parametrize("content,match", [
    ({"x": torch.zeros(1).expand(2**20, 2**20)},
     r"\['x'\] claims 1099511627776 elements \(shape \(1048576, 1048576\), strides \(0, 0\)\) but its storage holds 4 bytes"),
    ({"x": torch.zeros(4).as_strided((3, 2), (1, 1))}, r"claims 6 elements .* storage holds 16 bytes: a stride-0 or overlapping view"),
    ({"a": (t := torch.zeros(6)), "b": [t[2:]]}, r"\['a'\] and \['b'\]\[0\] are views of one storage|\['b'\]\[0\] and \['a'\]"),
    ({"x": torch.zeros(3, 3).to_sparse()}, r"\['x'\] is a sparse_coo tensor; only dense tensors are read"),
    ({"x": torch.zeros(300)}, r"\['x'\] has 300 elements \(1200 bytes\), more than the 1024-byte limit"),
])
def test_loaded_tensors_that_claim_more_than_they_store_are_refused(content, match):
    with pytest.raises(InputError, match=match):
        check_tensors(content, "f.pt", 10**6, 1024)
    loaded = torch.load(io.BytesIO(_zipped(content)), weights_only=True)
    with pytest.raises(InputError, match=match):
        check_tensors(loaded, "f.pt", 10**6, 1024)


def test_shared_references_nested_deep_are_refused_within_the_budget():
    nested = [0]
    for _ in range(12):
        nested = [nested] * 30  # 30^12 places, a few hundred bytes pickled
    data = _zipped({"deep": nested})
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    with time_limit(60), pytest.raises(InputError, match="shared references expand to more than 16 objects per byte of the file"):
        check_tensors(loaded, "f.pt", len(data), 1024)
    # views that store what they claim: a slice, a transpose, and overlapping strides within the storage
    check_tensors({"fine": [torch.zeros(2), torch.ones(3, 4)[1:].T, torch.zeros(6).as_strided((2, 2), (1, 1))]},
                  "f.pt", 100, 1024)
