"""Training histories beside a reference model: read as the training log, plain data only."""
import os
import pickle

import numpy as np
import pytest

from lrnn_analysis.checkpoints import load_checkpoint
from lrnn_analysis.reference import (
    ReferenceFileWarning,
    load_plain_pickle,
    read_reference_log,
)
from lrnn_analysis.tidy_tables import training_log_table
from reference_files import HP, reference_name, save_state


def _history(epochs=3):
    return {"loss": [float(100 - e) for e in range(epochs)], "eigA": [np.float64(-0.1 * (e + 1)) for e in range(epochs)],
            "eigW": [np.float64(0.01 * e) for e in range(epochs)], "testacc": [0.5 + 0.1 * e for e in range(epochs)]}


def test_training_history_beside_the_model_becomes_the_log(tmp_path):
    path = save_state(tmp_path, "LipschitzRNN", reference_name("LipschitzRNN"))
    history = tmp_path / f"{reference_name('LipschitzRNN', gamma_key='gamma_A')}_loss.pkl"
    history.write_bytes(pickle.dumps(_history(), protocol=2))
    _, metadata = load_checkpoint(path)
    log = metadata["log"]
    assert [e["epoch"] for e in log] == [1, 2, 3] and metadata["reference"]["log_file"] == str(history)
    assert log[1] == {"epoch": 2, "test_accuracy": 0.6, "train_loss_sum": 99.0, "alpha_A": pytest.approx(HP["alpha"] * -0.2),
                      "alpha_W": 0.01}
    rows = training_log_table({"ref": log})
    assert rows[2]["alpha_A"] == pytest.approx(HP["alpha"] * -0.3)
    older = {**_history(2), "loss": 42.0}
    (tmp_path / "old_loss.pkl").write_bytes(pickle.dumps(older))
    assert read_reference_log(tmp_path / "old_loss.pkl")[-1]["train_loss_sum"] == 42.0


def test_history_pickles_hold_plain_data_only(tmp_path):
    canary = tmp_path / "canary"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    for payload in ({"eigA": [Exploit()]}, {"eigA": [np.array([1.0, 2.0])]}, {"eigA": [np.dtype("O")]}):
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            load_plain_pickle(pickle.dumps(payload, protocol=2))
    assert load_plain_pickle(pickle.dumps({"a": [np.float32(1.5), np.int64(3), 2.0]})) == {"a": [1.5, 3, 2.0]}
    numpy1 = pickle.dumps([np.float64(-0.25)], protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in numpy1 and load_plain_pickle(numpy1) == [-0.25]  # numpy 1.x, as in 2020
    path = save_state(tmp_path, "LipschitzRNN", reference_name("LipschitzRNN"))
    (tmp_path / f"{reference_name('LipschitzRNN')}_loss.pkl").write_bytes(pickle.dumps({"eigA": [Exploit()], "eigW": [], "testacc": []}))
    with pytest.warns(ReferenceFileWarning, match=r"not a readable reference training history \(refused: GLOBAL (posix|os)\.system"):
        model, metadata = load_checkpoint(path)
    assert "log" not in metadata and not canary.exists()


@pytest.mark.parametrize("history", [
    b"\x80\x02K\x01K\x02a.",  # APPEND to an int
    pickle.dumps(_history(3), protocol=2)[:-9],  # truncated
    pickle.dumps({**_history(2), "testacc": [10**400, 0.5]}),  # a number beyond float64
], ids=["append-to-int", "truncated", "huge-int"])
def test_a_corrupt_history_is_skipped_with_a_warning_and_the_model_loads(tmp_path, history):
    path = save_state(tmp_path, "LipschitzRNN", reference_name("LipschitzRNN"))
    (tmp_path / f"{reference_name('LipschitzRNN')}_loss.pkl").write_bytes(history)
    with pytest.warns(ReferenceFileWarning, match="training history beside it was not read") as caught:
        model, metadata = load_checkpoint(path)
    assert "log" not in metadata and metadata["reference"]["model"] == "LipschitzRNN"
    assert any("not read" in note for note in metadata["reference"]["notes"])
    assert all("\n" not in str(w.message) for w in caught)
