"""The per-step built-in tasks: chars (text, vocabulary, contiguous splits, next-character targets, the
text's hash) and lorenz (RK4 against an independent solver, next-observation targets, seeds)."""
import hashlib
import string

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.next_step_tasks import CHARS_VOCABULARY, chars_text, encode_characters, lorenz_trajectories, unigram_cross_entropy

SMALL = {"chars": 6000, "length": 16}


def _ids(split):
    """The character ids a split's one-hot inputs spell, window by window, and its targets."""
    x, y = split.x, split.y
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[:2] == y.shape
    assert torch.equal(x.sum(-1), torch.ones(y.shape)) and set(x.unique().tolist()) <= {0.0, 1.0}
    return x.argmax(-1).numpy(), y.numpy()


def test_vocabulary_is_unk_newline_and_printable_ascii():
    assert len(CHARS_VOCABULARY) == 97 and CHARS_VOCABULARY[:2] == ("<unk>", "\n")
    assert "".join(CHARS_VOCABULARY[2:]) == "".join(sorted(set(string.printable) - set("\t\n\r\x0b\x0c")))
    ids = encode_characters("a\n\t€ ~")
    assert ids.tolist() == [CHARS_VOCABULARY.index("a"), 1, 0, 0, CHARS_VOCABULARY.index(" "), CHARS_VOCABULARY.index("~")]


def test_chars_splits_are_the_text_in_order_with_next_character_targets():
    task = load_task("chars", **SMALL)
    text, digest = chars_text()
    assert task.options == {**SMALL, "text_sha256": digest} and digest == hashlib.sha256(text.encode()).hexdigest()
    assert (task.input_dim, task.num_classes, task.seq_len, task.output_dim) == (97, 97, 16, 97)
    ids = encode_characters(text[:SMALL["chars"]])
    starts = {"train": 0, "val": 4800, "test": 5400}  # contiguous 80/10/10 of 6000 characters
    for name, start in starts.items():
        x, y = _ids(getattr(task, name))
        n = len(x)
        assert n == (600 - 1) // 16 if name != "train" else (4800 - 1) // 16
        # inputs are consecutive windows of the split's own slice of the text; each target the next character
        np.testing.assert_array_equal(x.reshape(-1), ids[start:start + 16 * n])
        np.testing.assert_array_equal(y.reshape(-1), ids[start + 1:start + 16 * n + 1])
        end = start + 16 * n + 1
        assert end <= (starts["val"] if name == "train" else starts["test"] if name == "val" else 6000)
    decoded = "".join(CHARS_VOCABULARY[i] for i in _ids(task.test)[0][0])
    assert decoded == "".join(c if c in CHARS_VOCABULARY[1:] else "<unk>" for c in text[5400:5416])


def test_chars_is_deterministic_and_checks_its_options():
    first, second = load_task("chars", **SMALL), load_task("chars", **SMALL)
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.test.y, second.test.y)
    digest = first.options["text_sha256"]
    assert torch.equal(load_task("chars", text_sha256=digest, **SMALL).val.y, first.val.y)
    with pytest.raises(ValueError, match="this Python's .* text has"):
        load_task("chars", text_sha256="0" * 64, **SMALL)
    with pytest.raises(ValueError, match="no seed"):
        load_task("chars", seed=1, **SMALL)
    with pytest.raises(ValueError, match="exceeds the"):
        load_task("chars", chars=len(chars_text()[0]) + 1)
    with pytest.raises(ValueError, match="shorter than one sequence"):
        load_task("chars", chars=100, length=64)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        load_task("chars", text_sha256="abc", **SMALL)
    with pytest.raises(ValueError, match="does not take options"):
        load_task("chars", stride=2)


def test_lorenz_rk4_matches_an_independent_solver():
    initial = np.array([[1.0, 2.0, 20.0], [-5.0, -3.0, 30.0]])
    ours = lorenz_trajectories(initial, 50, 2)
    assert ours.shape == (2, 51, 3) and ours.dtype == np.float64
    s, r, b = 10.0, 28.0, 8.0 / 3.0
    for start, path in zip(initial, ours):
        exact = solve_ivp(lambda _t, v: [s * (v[1] - v[0]), v[0] * (r - v[2]) - v[1], v[0] * v[1] - b * v[2]],
                          (0.0, 1.0), start, t_eval=np.arange(51) * 0.02, method="DOP853", rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(path, exact.y.T, atol=1e-5 * np.abs(exact.y).max())


def test_lorenz_targets_are_the_next_observation_and_seeds_matter():
    task = load_task("lorenz", length=20, n_train=8, n_val=3, n_test=4, noise=0.0)
    assert (task.input_dim, task.output_dim, task.num_classes, task.seq_len) == (3, 3, None, 20)
    for split, n in ((task.train, 8), (task.val, 3), (task.test, 4)):
        assert split.x.shape == split.y.shape == (n, 20, 3) and split.y.dtype == torch.float32
        assert torch.equal(split.x[:, 1:], split.y[:, :-1])
    # noise-free observations are the scaled RK4 states: step t + 1 follows from step t
    state = task.train.x[:, 0].double().numpy() * 10 + np.array([0.0, 0.0, 25.0])
    following = lorenz_trajectories(state, 1, 2)[:, 1]
    np.testing.assert_allclose(task.train.y[:, 0].double().numpy(), (following - [0.0, 0.0, 25.0]) / 10, atol=1e-5)
    again = load_task("lorenz", length=20, n_train=8, n_val=3, n_test=4, noise=0.0)
    assert torch.equal(again.test.y, task.test.y)
    assert not torch.equal(load_task("lorenz", seed=1, length=20, n_train=8, n_val=3, n_test=4, noise=0.0).test.y, task.test.y)
    noisy = load_task("lorenz", length=20, n_train=8, n_val=3, n_test=4, noise=0.05)
    assert float((noisy.train.x - task.train.x).std()) == pytest.approx(0.05, rel=0.1)
    for noise in (-1.0, float("nan"), 1e308):  # 1e308 became inf in float32: a task of non-finite data
        with pytest.raises(ValueError, match="noise must be"):
            load_task("lorenz", noise=noise)
    with pytest.raises(ValueError, match="stride must be"):
        load_task("lorenz", stride=0)
    with pytest.raises(ValueError, match="1000000 steps a trajectory"):
        load_task("lorenz", length=100_000, stride=20, n_train=1, n_val=1, n_test=1)
    with pytest.raises(ValueError, match="10000000 observations"):
        load_task("lorenz", length=10_000, n_train=1000, n_val=1, n_test=1)


def test_unigram_baseline_is_the_cross_entropy_of_training_frequencies():
    train = torch.tensor([[0, 1, 1], [2, 1, 1]])  # p = (1/6, 4/6, 1/6, 0)
    test = torch.tensor([[1, 2], [1, 1]])
    expected = -(3 * np.log(4 / 6) + np.log(1 / 6)) / 4
    assert unigram_cross_entropy(train, test, 4) == pytest.approx(expected, rel=1e-12)
    assert unigram_cross_entropy(train, torch.tensor([[3]]), 4) == float("inf")
    uniform = torch.arange(5).repeat(3)
    assert np.exp(unigram_cross_entropy(uniform, uniform, 5)) == pytest.approx(5.0)
