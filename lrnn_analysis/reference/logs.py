"""The reference driver's training history (``*_loss.pkl``) as a toolkit training log."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ..errors import InputError, first_line
from .pickles import load_plain_pickle

__all__ = ["loss_file_candidates", "read_reference_log"]

_MAX_LOSS_FILE_BYTES = 64 * 2**20


def loss_file_candidates(model_path: str | Path) -> list[Path]:
    """Where the driver writes the history of ``model_path``: the same name ending ``_loss.pkl``,
    with ``gamma_`` written ``gamma_A_`` in the newer drivers."""
    path = Path(model_path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    names = [f"{stem}_loss.pkl", f"{stem.replace('_gamma_', '_gamma_A_', 1)}_loss.pkl"]
    return [path.with_name(name) for name in dict.fromkeys(names)]


def read_reference_log(path: str | Path, alpha: float = 1.0) -> list[dict[str, Any]]:
    """Per-epoch entries from a driver history ``{'loss', 'eigA', 'eigW', 'testacc'}``.

    ``testacc`` is the test accuracy after each epoch; ``eigA``/``eigW`` are max Re lambda of the
    reference's A_ref and W_ref (row convention, A_ref without alpha), so the toolkit's
    alpha_A = max Re lambda(alpha A_ref^T) = alpha * eigA for alpha > 0 (kept raw as
    ``reference_eigA`` otherwise) and alpha_W = eigW. ``loss`` is the epoch's sum of batch losses
    (a list per epoch, or in older drivers only the last epoch's number), kept as ``train_loss_sum``.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > _MAX_LOSS_FILE_BYTES:
        raise InputError(f"{path}: {size} bytes is too large for a training history")
    try:
        data = load_plain_pickle(path.read_bytes())
    except pickle.UnpicklingError as error:
        raise InputError(f"{path}: not a readable reference training history ({first_line(error)})") from error
    if not isinstance(data, dict) or not {"eigA", "eigW", "testacc"} <= set(data):
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{path}: a reference training history has 'loss', 'eigA', 'eigW', 'testacc'; found {keys}")
    series = {key: data[key] for key in ("eigA", "eigW", "testacc")}
    loss = data.get("loss")
    if isinstance(loss, list):
        series["loss"] = loss
    for key, values in series.items():
        if not isinstance(values, list) or not all(_is_float(v) for v in values):
            raise InputError(f"{path}: '{key}' is not a list of numbers within the float64 range")
    epochs = max(len(v) for v in series.values())
    for key, values in series.items():
        if values and len(values) != epochs:
            raise InputError(f"{path}: '{key}' has {len(values)} entries, other series {epochs}")
    log = []
    for i in range(epochs):
        entry: dict[str, Any] = {"epoch": i + 1}
        if series["testacc"]:
            entry["test_accuracy"] = float(series["testacc"][i])
        if series.get("loss"):
            entry["train_loss_sum"] = float(series["loss"][i])
        if series["eigA"]:
            if alpha > 0:
                entry["alpha_A"] = alpha * float(series["eigA"][i])
            else:
                entry["reference_eigA"] = float(series["eigA"][i])
        if series["eigW"]:
            entry["alpha_W"] = float(series["eigW"][i])
        log.append(entry)
    if _is_float(loss) and log:
        log[-1]["train_loss_sum"] = float(loss)
    return log


def _is_float(value: Any) -> bool:
    """A number (not a boolean) that converts to a float: an integer beyond the float64 range does not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True
