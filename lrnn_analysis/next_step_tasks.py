"""Built-in tasks with a target at every step: character-level language modelling (``chars``)
and next-step prediction of the Lorenz-63 system (``lorenz``). Both are offline and deterministic.

``chars``: the text is the Python documentation that every CPython 3 installation ships as the
standard library's ``pydoc_data/topics.py`` (the help topics of ``help()``; Python Software
Foundation, PSF License Agreement): its ``topics`` values joined in the order of their keys, with
one newline between them. Vocabulary, fixed: id 0 is ``<unk>`` (every character outside the other
ids), id 1 the newline, ids 2..96 the printable ASCII characters ``chr(32)`` .. ``chr(126)``. The
first ``chars`` characters of the text are cut, in order, into train (the first 80%), validation
(the next 10%) and test (the last 10%); each split into consecutive, non-overlapping windows of
``length`` + 1 characters c_0..c_T, input the one-hot vectors of c_0..c_{T-1} (N, T, 97) and target
the ids of c_1..c_T (N, T) int64: the next character at every step. No window crosses a split
boundary and nothing is shuffled, so there is no seed. The text differs between Python versions:
the task records the SHA-256 of the whole text as its option ``text_sha256``, and a task rebuilt
from a record (a checkpoint's) whose hash differs from this Python's text is an ``InputError``.

``lorenz``: dx/dt = s (y - x), dy/dt = x (r - z) - y, dz/dt = x y - b z with s = 10, r = 28,
b = 8/3, integrated by the classical RK4 with step 0.01 from initial conditions drawn from
``seed`` (x, y ~ N(0, 10^2), z ~ N(25, 10^2)), first run for 10 time units to reach the attractor,
then observed every ``stride`` steps. Observations are scaled, o = (x, y, z - 25) / 10, and get
independent N(0, noise^2) noise (drawn from ``seed``). Each sequence is one trajectory of
``length`` + 1 observations: input o_0..o_{T-1} (N, T, 3), target o_1..o_T (N, T, 3) float32: the
next observation at every step. Train, validation and test trajectories start from different draws.
"""
from __future__ import annotations

import hashlib
import sys
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .task import Split, Task

__all__ = ["CHARS_DEFAULTS", "CHARS_VOCABULARY", "LORENZ_DEFAULTS", "UNKNOWN_CHARACTER", "chars_task", "chars_text", "encode_characters", "lorenz_task",
    "lorenz_trajectories", "unigram_cross_entropy"]

UNKNOWN_CHARACTER = "<unk>"
# id -> character; id 0 stands for every character not listed.
CHARS_VOCABULARY: tuple[str, ...] = (UNKNOWN_CHARACTER, "\n", *(chr(code) for code in range(32, 127)))
_IDS = {character: index for index, character in enumerate(CHARS_VOCABULARY) if index > 0}
CHARS_DEFAULTS = {"length": 64, "chars": 200_000}
_CHARS_FRACTIONS = (0.8, 0.1, 0.1)

LORENZ_DEFAULTS = {"length": 100, "n_train": 512, "n_val": 128, "n_test": 128, "stride": 2, "noise": 0.01}
_LORENZ = (10.0, 28.0, 8.0 / 3.0)
_LORENZ_DT = 0.01
_LORENZ_BURN_IN = 1000  # steps of 0.01: 10 time units


def chars_text() -> tuple[str, str]:
    """This Python's ``pydoc_data.topics`` text (module docstring) and its SHA-256."""
    try:
        from pydoc_data.topics import topics
    except ImportError as error:  # a trimmed-down Python without the documentation topics
        raise InputError(f"task chars needs the standard library's pydoc_data/topics.py, which this Python lacks ({error})") from None
    text = "\n".join(topics[key] for key in sorted(topics))
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_characters(text: str) -> np.ndarray:
    """The ids of ``text``'s characters in :data:`CHARS_VOCABULARY` (int64; 0 for ``<unk>``)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    ascii_ids = np.zeros(128, dtype=np.int64)
    for character, index in _IDS.items():
        ascii_ids[ord(character)] = index
    return np.where(codes < 128, ascii_ids[np.minimum(codes, 127)], 0)


def _windows(ids: np.ndarray, length: int) -> Split:
    """Consecutive non-overlapping windows of ``length`` + 1 ids: one-hot inputs, next-id targets."""
    count = (len(ids) - 1) // length
    starts = np.arange(count)[:, None] * length
    window = ids[starts + np.arange(length + 1)[None, :]]
    inputs = torch.nn.functional.one_hot(torch.from_numpy(window[:, :-1]), len(CHARS_VOCABULARY)).to(torch.float32)
    return Split(inputs, torch.from_numpy(np.ascontiguousarray(window[:, 1:])))


def chars_task(seed: int, length: int = CHARS_DEFAULTS["length"], chars: int = CHARS_DEFAULTS["chars"],
               text_sha256: str | None = None) -> Task:
    """Character-level language modelling on the Python documentation (module docstring)."""
    if seed != 0:
        raise InputError(f"task chars has contiguous splits and no seed; got split seed {seed}")
    text, digest = chars_text()
    if text_sha256 is not None and text_sha256 != digest:
        raise InputError(f"task chars: the recorded text has SHA-256 {text_sha256[:16]}..., but this Python's "
                         f"({sys.version.split()[0]}) pydoc_data/topics.py text has {digest[:16]}...: its splits differ; "
                         "use the Python version the record was made with")
    if chars > len(text):
        raise InputError(f"task chars: chars = {chars} exceeds the {len(text)} characters of this Python's text")
    ids = encode_characters(text[:chars])
    cuts = np.cumsum([int(f * chars) for f in _CHARS_FRACTIONS[:2]])
    parts = np.split(ids, cuts)
    if min(len(part) for part in parts) <= length:
        raise InputError(f"task chars: {chars} characters leave a split shorter than one sequence of length {length}")
    train, val, test = (_windows(part, length) for part in parts)
    unknown = float((ids == 0).mean())
    description = (f"character-level language modelling on the first {chars} characters of the Python "
                   f"{sys.version.split()[0]} documentation (pydoc_data/topics.py, PSF License; SHA-256 {digest[:16]}...), "
                   f"{len(CHARS_VOCABULARY)} symbols (printable ASCII, newline, <unk> for {unknown:.2%} of characters), "
                   f"contiguous 80/10/10 splits, {length}-step one-hot inputs, next-character targets")
    options = {"length": length, "chars": chars, "text_sha256": digest}
    return Task("chars", description, train, val, test, len(CHARS_VOCABULARY), length, len(CHARS_VOCABULARY), seed,
                round(5.0 / length, 6), options)


def unigram_cross_entropy(train_targets: torch.Tensor, test_targets: torch.Tensor, classes: int) -> float:
    """The baseline a language model must beat: the cross-entropy (nats per token) on ``test_targets``
    of the unigram model p(c) = n_c / n, the relative frequency of each class among ``train_targets``,
    ignoring context: -(1/M) sum_t log p(y_t). Infinite when a test class never occurs in training."""
    counts = torch.bincount(train_targets.reshape(-1), minlength=classes).double()
    probabilities = counts / counts.sum()
    return float(-torch.log(probabilities[test_targets.reshape(-1)]).mean())


def _lorenz_field(state: np.ndarray) -> np.ndarray:
    s, r, b = _LORENZ
    x, y, z = state[..., 0], state[..., 1], state[..., 2]
    return np.stack([s * (y - x), x * (r - z) - y, x * y - b * z], axis=-1)


def lorenz_trajectories(initial: np.ndarray, steps: int, stride: int) -> np.ndarray:
    """RK4 trajectories (step 0.01) of the Lorenz-63 system from ``initial`` (M, 3), float64: the
    state at every ``stride``-th step, ``steps`` + 1 states per trajectory (M, steps + 1, 3), the
    initial state first."""
    state = np.array(initial, dtype=np.float64)
    h = _LORENZ_DT
    out = [state]
    for step in range(1, steps * stride + 1):
        k1 = _lorenz_field(state)
        k2 = _lorenz_field(state + 0.5 * h * k1)
        k3 = _lorenz_field(state + 0.5 * h * k2)
        k4 = _lorenz_field(state + h * k3)
        state = state + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        if step % stride == 0:
            out.append(state)
    return np.stack(out, axis=1)


def lorenz_task(seed: int, length: int = LORENZ_DEFAULTS["length"], n_train: int = LORENZ_DEFAULTS["n_train"],
                n_val: int = LORENZ_DEFAULTS["n_val"], n_test: int = LORENZ_DEFAULTS["n_test"],
                stride: int = LORENZ_DEFAULTS["stride"], noise: float = LORENZ_DEFAULTS["noise"]) -> Task:
    """Next-step prediction of noisy Lorenz-63 observations (module docstring)."""
    rng = np.random.default_rng(seed)
    total = n_train + n_val + n_test
    initial = rng.normal(0.0, 10.0, size=(total, 3)) + np.array([0.0, 0.0, 25.0])
    settled = lorenz_trajectories(initial, _LORENZ_BURN_IN, 1)[:, -1]
    states = lorenz_trajectories(settled, length, stride)
    observed = (states - np.array([0.0, 0.0, 25.0])) / 10.0 + rng.normal(0.0, noise, size=states.shape)
    observed = observed.astype(np.float32)
    cuts = [n_train, n_train + n_val]
    train, val, test = (Split(torch.from_numpy(np.ascontiguousarray(part[:, :-1])), torch.from_numpy(np.ascontiguousarray(part[:, 1:])))
                        for part in np.split(observed, cuts))
    options: dict[str, Any] = {"length": length, "n_train": n_train, "n_val": n_val, "n_test": n_test, "stride": stride,
                               "noise": noise}
    description = (f"next-step prediction of the Lorenz-63 system (s = 10, r = 28, b = 8/3; RK4, step 0.01, observed every "
                   f"{stride} steps), (x, y, z - 25) / 10 with N(0, {noise:g}^2) noise, {length}-step trajectories, "
                   "targets the next observation (MSE)")
    return Task("lorenz", description, train, val, test, 3, length, None, seed, round(5.0 / length, 6), options)
