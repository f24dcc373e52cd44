"""Does a Lur'e system describe a model? Run both side by side: ``check_lure_form``.

A hand-built :class:`LureSystem` with transposed matrices (a row-vector convention
``h @ W`` is W^T in the column convention used here) certifies a different network and can
flip a verdict. ``check_lure_form`` catches it: it simulates the system on the model's own
Lur'e inputs and compares the states with the model's own recurrence.

The model provides two methods (the toolkit's own models and
:class:`~lrnn_analysis.models.torchnn.SequenceClassifier` have them):

* ``hidden_states(x)``: the states h_1..h_T of its recurrence from the zero state, (batch, T, n);
* ``lure_inputs(x)``: the inputs u_1..u_T of its Lur'e form, (batch, T, n).

Both take ``layer=`` for a stack of layers (``check_lure_form(..., layer=l)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..lure import LureSystem
from ..errors import InputError

DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


@dataclass(frozen=True)
class LureConsistency:
    """Largest difference between the model's states and the Lur'e system's on the same inputs.

    ``relative_difference`` = max |h_model - h_system| / max |h_model| over batch, time and
    units; ``consistent`` iff it is <= ``tolerance`` (default 1e-4 for a float32 model,
    1e-10 for float64).
    """

    max_abs_difference: float
    relative_difference: float
    scale: float
    worst_step: int
    tolerance: float
    consistent: bool
    batch: int
    steps: int
    n: int
    dtype: str
    layer: int | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _states(model: nn.Module, method: str, x: Tensor, layer: int | None) -> Tensor:
    function = getattr(model, method, None)
    if function is None:
        raise InputError(f"{type(model).__name__} has no {method}(x): check_lure_form needs hidden_states and lure_inputs")
    return function(x) if layer is None else function(x, layer=layer)


def check_lure_form(
    model: nn.Module, system: LureSystem, x: Tensor, *, layer: int | None = None, tolerance: float | None = None
) -> LureConsistency:
    """Simulate ``system`` from h_0 = 0 on ``model.lure_inputs(x)`` and compare with ``model.hidden_states(x)``.

    Only discrete systems can be compared step by step (a continuous-time ``ode`` system is an error).
    """
    if not system.is_discrete:
        raise InputError("check_lure_form needs the discrete scheme the model runs; this system is continuous-time")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            actual = _states(model, "hidden_states", x, layer)
            inputs = _states(model, "lure_inputs", x, layer)
    finally:
        model.train(was_training)
    if actual.ndim != 3 or inputs.shape != actual.shape:
        raise InputError(f"hidden_states {tuple(actual.shape)} and lure_inputs {tuple(inputs.shape)} must both be (batch, T, n)")
    if actual.shape[-1] != system.n:
        raise InputError(f"the system has n = {system.n} but the model's hidden state has {actual.shape[-1]} units")
    dtype = actual.dtype
    expected = system.simulate(np.zeros((actual.shape[0], system.n)), inputs.detach().cpu().double().numpy())
    observed = actual.detach().cpu().double().numpy()
    difference = np.abs(observed - expected)
    scale = max(float(np.abs(observed).max()), np.finfo(np.float64).tiny)
    max_abs = float(difference.max())
    relative = max_abs / scale
    if tolerance is None and dtype not in DEFAULT_TOLERANCE:
        raise InputError(f"no default tolerance for {dtype} states; pass tolerance= explicitly")
    tol = DEFAULT_TOLERANCE[dtype] if tolerance is None else float(tolerance)
    return LureConsistency(
        max_abs_difference=max_abs, relative_difference=relative, scale=scale,
        worst_step=int(np.unravel_index(np.argmax(difference), difference.shape)[1]) + 1,
        tolerance=tol, consistent=bool(np.isfinite(relative) and relative <= tol), batch=actual.shape[0],
        steps=actual.shape[1], n=system.n, dtype=str(dtype).removeprefix("torch."), layer=layer,
    )
