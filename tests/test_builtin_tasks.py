"""Every built-in task's shapes, ranges, splits and determinism; MNIST files that are checked, not trusted."""
import gzip
import random
import struct

import numpy as np
import pytest
import torch

from lrnn_analysis.builtin_tasks import TASKS, load_task, reference_permutation


def _assert_task(task, n_steps, input_dim, classes):
    for split in (task.train, task.val, task.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (n_steps, input_dim)
        assert len(split.x) == len(split.y) > 0
    assert (task.seq_len, task.input_dim, task.num_classes) == (n_steps, input_dim, classes)
    assert task.description


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_digits_shapes_range_and_disjoint_splits(digits_task):
    _assert_task(digits_task, 64, 1, 10)
    assert digits_task.train.x.min() >= 0 and digits_task.train.x.max() <= 1
    assert len(digits_task.train) + len(digits_task.val) + len(digits_task.test) == 1797
    rows = {tuple(r) for r in digits_task.train.x.squeeze(-1).numpy().round(4)}
    overlap = sum(tuple(r) in rows for r in digits_task.test.x.squeeze(-1).numpy().round(4))
    assert overlap < 5  # the digits data set itself has a few exact duplicates
    assert set(digits_task.test.y.tolist()) == set(range(10))


def test_splits_are_deterministic_and_depend_on_seed(digits_task):
    again = load_task("digits", seed=0)
    assert torch.equal(again.train.x, digits_task.train.x) and torch.equal(again.test.y, digits_task.test.y)
    assert not torch.equal(load_task("digits", seed=1).test.y, digits_task.test.y)


def test_pdigits_is_a_fixed_permutation_of_digits(digits_task):
    permuted = load_task("pdigits", seed=0)
    _assert_task(permuted, 64, 1, 10)
    assert torch.equal(permuted.test.y, digits_task.test.y)
    assert not torch.equal(permuted.test.x, digits_task.test.x)
    assert torch.equal(permuted.test.x.sort(dim=1).values, digits_task.test.x.sort(dim=1).values)
    assert torch.equal(load_task("pdigits", seed=3).test.x.sort(1).values, load_task("digits", seed=3).test.x.sort(1).values)


def test_mnist1d_is_offline_and_keeps_global_rng_state():
    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    task = load_task("mnist1d", seed=0)
    assert (random.random(), np.random.rand()) == expected
    _assert_task(task, 40, 1, 10)
    assert len(task.test) == 1000 and len(task.train) + len(task.val) == 4000


def test_smnist_from_vendored_digits():
    task = load_task("smnist", seed=0)
    _assert_task(task, 784, 1, 10)
    assert len(task.train) + len(task.val) + len(task.test) == 10000
    assert 0 <= task.train.x.min() and task.train.x.max() <= 1
    rows = load_task("smnist", seed=0, pixels_per_step=28)
    _assert_task(rows, 28, 28, 10)
    assert torch.equal(rows.test.x.reshape(len(rows.test), 784), task.test.x.reshape(len(task.test), 784))
    permuted = load_task("psmnist", seed=0, pixels_per_step=16)
    _assert_task(permuted, 49, 16, 10)
    with pytest.raises(ValueError, match="must divide 784"):
        load_task("smnist", pixels_per_step=5)


def test_smnist_from_idx_directory(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 24), ("t10k", 6)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, count))
    task = load_task("smnist", path=str(tmp_path), pixels_per_step=196)
    _assert_task(task, 4, 196, 10)
    assert len(task.test) == 6 and len(task.train) + len(task.val) == 24
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        load_task("smnist", path=str(tmp_path))


def test_smnist_npz_validation(tmp_path):
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="missing arrays"):
        load_task("smnist", path=str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError):
        load_task("smnist", path=str(tmp_path / "absent.npz"))


def test_adding_problem_targets():
    task = load_task("adding", seed=0, length=30, n_train=50, n_val=10, n_test=10)
    _assert_task(task, 30, 2, None)
    x, y = task.train.x, task.train.y
    assert torch.all(x[:, :, 1].sum(1) == 2)
    torch.testing.assert_close((x[:, :, 0] * x[:, :, 1]).sum(1, keepdim=True), y)
    assert torch.all(x[:, :15, 1].sum(1) == 1)
    assert task.output_dim == 1 and not task.is_classification


def test_bad_task_requests():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("cifar")
    with pytest.raises(ValueError, match="does not take options"):
        load_task("digits", length=3)
    assert set(TASKS) == {"digits", "pdigits", "mnist1d", "smnist", "psmnist", "adding", "chars", "lorenz"}


@pytest.mark.usefixtures("time_limit")
def test_corrupt_idx_header_is_a_value_error(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (idx / stem).write_bytes(b"\x00\x00\x08\xff" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        load_task("smnist", path=str(idx))


@pytest.mark.usefixtures("time_limit")
def test_mnist_labels_and_pixels_are_checked(tmp_path):
    images = np.zeros((20, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "bad.npz", images=images, labels=np.full(20, 11))
    with pytest.raises(ValueError, match="labels must be the integers 0..9"):
        load_task("smnist", path=str(tmp_path / "bad.npz"))


@pytest.mark.usefixtures("time_limit")
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


def test_reference_pmnist_permutation_and_raw_pixels(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12008)
        expected = torch.randperm(784)
    assert np.array_equal(reference_permutation(), expected.numpy())
    images = np.random.default_rng(0).integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = np.arange(30) % 10
    np.savez(tmp_path / "mnist.npz", images=images, labels=labels)
    task = load_task("psmnist", path=str(tmp_path / "mnist.npz"), pixels_per_step=4, scale="raw", permutation="reference")
    flat = images.reshape(30, 784)[:, expected.numpy()].astype(np.float32).reshape(30, 196, 4)
    for split in (task.train, task.val, task.test):
        rows = [int(np.flatnonzero((flat == x.numpy()).all(axis=(1, 2)))[0]) for x in split.x]
        assert [int(labels[r]) for r in rows] == split.y.tolist()
    assert task.options == {"pixels_per_step": 4, "path": str(tmp_path / "mnist.npz"), "scale": "raw", "permutation": "reference"}
    unit = load_task("smnist", path=str(tmp_path / "mnist.npz"), pixels_per_step=4)
    assert float(unit.train.x.max()) <= 1.0 and float(task.train.x.max()) > 1.0
    with pytest.raises(ValueError, match=r"does not take options \[.permutation.\]"):
        load_task("smnist", path=str(tmp_path / "mnist.npz"), permutation="reference")
