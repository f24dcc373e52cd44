"""Offline, seeded sequence tasks.

Every task yields train/val/test splits as float32 tensors ``x`` of shape
(N, T, input_dim) and targets ``y``: int64 class labels (N,), or float32 (N, 1) for
regression; the tasks of :mod:`lrnn_analysis.next_step_tasks` have a target at every step,
int64 (N, T) next characters (``chars``) or float32 (N, T, 3) next observations (``lorenz``).
Splits depend only on ``seed``; the data themselves never come from the network.
"""
from __future__ import annotations

import gzip
import math
import os
import random
import stat
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .choices import MAX_ADDING_LENGTH, MAX_SEED
from .data_files import read_npz
from .errors import InputError, display_name
from .next_step_tasks import CHARS_DEFAULTS, LORENZ_DEFAULTS, chars_task, lorenz_task
from .task import Split, Task

__all__ = ["TASKS", "load_task", "reference_permutation"]

_VENDORED_MNIST = Path(__file__).parent / "_data" / "mnist10k.npz"
_PERMUTATION_SEED = 1234
# The reference implementation's pmnist: torch.manual_seed(12008); torch.randperm(784).
_REFERENCE_PERMUTATION_SEED = 12008
_PIXEL_SCALES = ("unit", "raw")
_PERMUTATIONS = ("toolkit", "reference")


def reference_permutation() -> np.ndarray:
    """``torch.manual_seed(12008); torch.randperm(784)``, drawn from a private generator."""
    return torch.randperm(784, generator=torch.Generator().manual_seed(_REFERENCE_PERMUTATION_SEED)).numpy()
# Task options come from command lines and from checkpoints (untrusted): bounded sizes.
_MAX_ADDING_SAMPLES = 1_000_000
_MAX_ADDING_VALUES = 50_000_000  # samples x length (x 2 channels of float32: 400 MB)
_MAX_DATA_BYTES = 2**30  # one uncompressed IDX file or .npz member
# chars: its one-hot inputs take 388 bytes a character (97 float32).
_MAX_TEXT_CHARACTERS = 2_000_000
# lorenz: the integration is a loop over steps (vectorised over trajectories); states are float64.
_MAX_LORENZ_STEPS = 1_000_000
_MAX_LORENZ_OBSERVATIONS = 10_000_000
# Observations are of order 1; float32 noise of 1e308 is inf (a task of non-finite data).
_MAX_LORENZ_NOISE = 1e6


def _split(x: np.ndarray, y: np.ndarray, seed: int, fractions: tuple[float, float]) -> tuple[Split, Split, Split]:
    """Shuffle with ``seed`` and cut into train/val/test with the given val and test fractions."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val, n_test = (int(round(f * len(x))) for f in fractions)
    parts = np.split(order, [len(x) - n_val - n_test, len(x) - n_test])
    return tuple(_as_split(x[idx], y[idx]) for idx in parts)  # type: ignore[return-value]


def _as_split(x: np.ndarray, y: np.ndarray) -> Split:
    target = torch.as_tensor(y, dtype=torch.float32) if y.dtype.kind == "f" else torch.as_tensor(y, dtype=torch.int64)
    return Split(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32), target)


def _digits(seed: int, permute: bool) -> Task:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    if permute:
        x = x[:, np.random.default_rng(_PERMUTATION_SEED).permutation(x.shape[1])]
    train, val, test = _split(x[:, :, None], bunch.target.astype(np.int64), seed, (0.1, 0.2))
    name = "pdigits" if permute else "digits"
    what = "permuted " if permute else ""
    return Task(name, f"scikit-learn 8x8 digits as {what}64-step pixel sequences in [0, 1]",
                train, val, test, 1, 64, 10, seed, 0.1)


def _mnist1d(seed: int) -> Task:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global generators; keep the caller's state intact.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = data["x"].astype(np.float32)[:, :, None]
    y = data["y"].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = len(x) // 10
    val_idx, train_idx = order[:n_val], order[n_val:]
    test = _as_split(data["x_test"].astype(np.float32)[:, :, None], data["y_test"].astype(np.int64))
    return Task("mnist1d", "MNIST-1D (make_dataset defaults), 40-step sequences",
                _as_split(x[train_idx], y[train_idx]), _as_split(x[val_idx], y[val_idx]), test,
                1, 40, 10, seed, 0.15)


def _check_regular_file(path: Path) -> None:
    """Refuse anything but a regular file before opening it (a FIFO or device would block or never end)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file")


def _read_idx(path: Path) -> np.ndarray:
    _check_regular_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read(_MAX_DATA_BYTES + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise InputError(f"{path}: corrupt gzip file ({error})") from None
    if len(raw) > _MAX_DATA_BYTES:
        raise InputError(f"{path}: IDX data larger than {_MAX_DATA_BYTES} bytes")
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or len(raw) < 4 + 4 * raw[3]:
        raise InputError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise InputError(f"{path}: truncated IDX file ({body.size} of {math.prod(shape)} values)")
    return body.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if os.path.lexists(candidate):
            return candidate
    raise FileNotFoundError(f"{directory}: no {stem}[.gz] IDX file")


def _load_mnist_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Images and labels from an .npz (``images``, ``labels``) or an IDX directory.

    Returns (images, labels, test) where ``test`` is the IDX directory's own test set, if any.
    """
    if not path.exists():
        raise FileNotFoundError(f"MNIST data not found: {path}")
    if not path.is_dir():
        _check_regular_file(path)
    if path.is_dir():
        train = (_read_idx(_find_idx(path, "train-images-idx3-ubyte")), _read_idx(_find_idx(path, "train-labels-idx1-ubyte")))
        test = (_read_idx(_find_idx(path, "t10k-images-idx3-ubyte")), _read_idx(_find_idx(path, "t10k-labels-idx1-ubyte")))
        return train[0], train[1], test
    arrays, _ = read_npz(path, ("images", "labels"), max_array_bytes=_MAX_DATA_BYTES, max_total_bytes=2 * _MAX_DATA_BYTES)
    missing = {"images", "labels"} - set(arrays)
    if missing:
        raise InputError(f"{display_name(path)}: missing arrays {sorted(missing)}")
    return arrays["images"], arrays["labels"], None


def _check_mnist_values(source: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Pixels are numbers in [0, 255], labels the integers 0..9."""
    if images.dtype.kind not in "uif" or labels.dtype.kind not in "uif":
        raise InputError(f"{source}: images and labels must be numeric, got {images.dtype} and {labels.dtype}")
    if images.size and not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 255):
        raise InputError(f"{source}: pixel values must lie in [0, 255]")
    if labels.size and not (np.isin(labels, np.arange(10))).all():
        raise InputError(f"{source}: labels must be the integers 0..9")


def _smnist(seed: int, permute: bool, path: str | Path | None = None, pixels_per_step: int = 1,
            scale: str = "unit", permutation: str = "toolkit") -> Task:
    if scale not in _PIXEL_SCALES:
        raise InputError(f"scale must be one of {_PIXEL_SCALES}, got {scale!r}")
    if permutation not in _PERMUTATIONS or (permutation != "toolkit" and not permute):
        raise InputError(f"permutation must be one of {_PERMUTATIONS} (psmnist only), got {permutation!r}")
    source = Path(path) if path is not None else _VENDORED_MNIST
    images, labels, idx_test = _load_mnist_arrays(source)
    if images.shape[1:] not in ((28, 28), (784,)) or labels.shape != (len(images),) or len(images) < 10:
        raise InputError(f"{source}: expected N >= 10 28x28 images and N labels, got {images.shape} and {labels.shape}")
    _check_mnist_values(source, images, labels)
    if idx_test is not None:
        _check_mnist_values(source, *idx_test)
    steps = 784 // pixels_per_step
    pixel_order = None
    if permute:
        pixel_order = reference_permutation() if permutation == "reference" else np.random.default_rng(_PERMUTATION_SEED).permutation(784)

    def sequences(raw: np.ndarray) -> np.ndarray:
        flat = raw.reshape(len(raw), 784).astype(np.float32)
        if scale == "unit":
            flat /= 255.0
        if pixel_order is not None:
            flat = flat[:, pixel_order]
        return flat.reshape(len(raw), steps, pixels_per_step)

    x, y = sequences(images), labels.astype(np.int64)
    if idx_test is None:
        train, val, test = _split(x, y, seed, (0.1, 0.1))
    else:
        order = np.random.default_rng(seed).permutation(len(x))
        n_val = len(x) // 12
        train, val = _as_split(x[order[n_val:]], y[order[n_val:]]), _as_split(x[order[:n_val]], y[order[:n_val]])
        test = _as_split(sequences(idx_test[0]), idx_test[1].astype(np.int64))
    name = "psmnist" if permute else "smnist"
    what = "permuted " if permute else ""
    options = {"pixels_per_step": pixels_per_step, **({"path": str(path)} if path is not None else {})}
    if scale != "unit":
        options["scale"] = scale
    if permutation != "toolkit":
        options["permutation"] = permutation
        what = "permuted (the reference implementation's permutation) "
    values = "raw values 0..255" if scale == "raw" else "values in [0, 1]"
    return Task(name, f"{what}pixel-by-pixel MNIST, {steps} steps of {pixels_per_step} pixel(s), {values}, from {source.name}",
                train, val, test, pixels_per_step, steps, 10, seed, 0.03, options)


def _adding(seed: int, length: int = 100, n_train: int = 5000, n_val: int = 1000, n_test: int = 1000) -> Task:
    """The adding problem: sum the two values marked in the second channel."""
    rng = np.random.default_rng(seed)
    total = n_train + n_val + n_test
    values = rng.uniform(0.0, 1.0, size=(total, length)).astype(np.float32)
    markers = np.zeros((total, length), dtype=np.float32)
    half = length // 2
    first = rng.integers(0, half, size=total)
    second = rng.integers(half, length, size=total)
    rows = np.arange(total)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=-1)
    y = (values[rows, first] + values[rows, second])[:, None].astype(np.float32)
    cuts = [n_train, n_train + n_val]
    train, val, test = (_as_split(a, b) for a, b in zip(np.split(x, cuts), np.split(y, cuts)))
    options = {"length": length, "n_train": n_train, "n_val": n_val, "n_test": n_test}
    return Task("adding", f"adding problem, length {length}, MSE target (two input channels)",
                train, val, test, 2, length, None, seed, round(5.0 / length, 6), options)


# Called only through load_task, which checks every option first (_check_options).
TASKS: dict[str, Callable[..., Task]] = {
    "digits": lambda seed: _digits(seed, permute=False),
    "pdigits": lambda seed: _digits(seed, permute=True),
    "mnist1d": _mnist1d,
    "smnist": lambda seed, **opts: _smnist(seed, permute=False, **opts),
    "psmnist": lambda seed, **opts: _smnist(seed, permute=True, **opts),
    "adding": _adding,
    "chars": chars_task,
    "lorenz": lorenz_task,
}

_TASK_OPTIONS: dict[str, set[str]] = {
    "digits": set(),
    "pdigits": set(),
    "mnist1d": set(),
    "smnist": {"path", "pixels_per_step", "scale"},
    "psmnist": {"path", "pixels_per_step", "scale", "permutation"},
    "adding": {"length", "n_train", "n_val", "n_test"},
    "chars": {"length", "chars", "text_sha256"},
    "lorenz": {"length", "n_train", "n_val", "n_test", "stride", "noise"},
}


def load_task(name: str, seed: int = 0, **opts: Any) -> Task:
    """Build task ``name`` with its splits drawn from ``seed``.

    Options: ``smnist``/``psmnist`` take ``path`` (an .npz with ``images``/``labels``
    or a directory of MNIST IDX files; default: the vendored 10k digits), ``pixels_per_step``,
    ``scale`` ("unit": pixels / 255 in [0, 1], the default; "raw": 0..255 as the reference's pmnist
    feeds them) and, for psmnist, ``permutation`` ("toolkit", the default, or "reference":
    ``torch.manual_seed(12008); torch.randperm(784)`` on the flattened image); ``adding`` takes
    ``length`` and split sizes; ``chars`` takes ``length`` (steps per sequence), ``chars`` (characters
    of the text used) and ``text_sha256`` (the text a record was made with; a different text is an
    error); ``lorenz`` takes ``length``, split sizes (trajectories), ``stride`` and ``noise``
    (:mod:`lrnn_analysis.next_step_tasks`).
    """
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    opts = {k: v for k, v in opts.items() if v is not None}
    unknown = set(opts) - _TASK_OPTIONS[name]
    if unknown:
        raise InputError(f"task {name!r} does not take options {sorted(unknown)}; it takes {sorted(_TASK_OPTIONS[name])}")
    _check_options(name, seed, opts)
    return TASKS[name](seed, **opts)


def _check_options(name: str, seed: Any, opts: dict[str, Any]) -> None:
    """Types and bounds of a task's seed and options (they may come from an untrusted checkpoint)."""
    _check_int(f"task {name} split seed", seed, 0, MAX_SEED)
    if "pixels_per_step" in opts:
        _check_int(f"task {name} pixels_per_step", opts["pixels_per_step"], 1, 784)
        if 784 % opts["pixels_per_step"]:
            raise InputError(f"task {name} pixels_per_step must divide 784, got {opts['pixels_per_step']}")
    if "path" in opts and not isinstance(opts["path"], (str, Path)):
        raise InputError(f"task {name} path must be a string, got {type(opts['path']).__name__}")
    if "length" in opts:
        _check_int(f"task {name} length", opts["length"], 2, MAX_ADDING_LENGTH)
    split_defaults = LORENZ_DEFAULTS if name == "lorenz" else {"n_train": 5000, "n_val": 1000, "n_test": 1000}
    sizes = [opts.get(key, split_defaults[key]) for key in ("n_train", "n_val", "n_test")]
    for key, size in zip(("n_train", "n_val", "n_test"), sizes):
        if key in opts:
            _check_int(f"task {name} {key}", size, 1, _MAX_ADDING_SAMPLES)
    if name == "adding" and sum(sizes) * opts.get("length", 100) > _MAX_ADDING_VALUES:
        raise InputError(f"task adding with {sum(sizes)} samples of length {opts.get('length', 100)} exceeds "
                         f"{_MAX_ADDING_VALUES} values")
    if name == "chars":
        _check_int("task chars chars", opts.get("chars", CHARS_DEFAULTS["chars"]), 1, _MAX_TEXT_CHARACTERS)
        digest = opts.get("text_sha256")
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")):
            raise InputError(f"task chars text_sha256 must be 64 lowercase hex digits, got {str(digest)[:70]!r}")
    if name == "lorenz":
        _check_int("task lorenz stride", opts.get("stride", LORENZ_DEFAULTS["stride"]), 1, 1000)
        noise = opts.get("noise", LORENZ_DEFAULTS["noise"])
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= _MAX_LORENZ_NOISE:
            raise InputError(f"task lorenz noise must be a number in [0, {_MAX_LORENZ_NOISE:g}], got {noise!r:.40}")
        length = opts.get("length", LORENZ_DEFAULTS["length"])
        steps = length * opts.get("stride", LORENZ_DEFAULTS["stride"])
        if steps > _MAX_LORENZ_STEPS or sum(sizes) * length > _MAX_LORENZ_OBSERVATIONS:
            raise InputError(f"task lorenz: {sum(sizes)} trajectories of {length} observations, {steps} integration steps each, "
                             f"exceed {_MAX_LORENZ_OBSERVATIONS} observations or {_MAX_LORENZ_STEPS} steps a trajectory")


def _check_int(what: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        huge = isinstance(value, int) and abs(value) > 10**30
        shown = f"an integer of {value.bit_length()} bits" if huge else repr(value)[:40]
        raise InputError(f"{what} must be an integer in [{low}, {high}], got {shown}")
