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

:func:`check_form` asks the same of any form and any module that runs a step: a hand-written
:class:`LureSystem` or a :class:`~lrnn_analysis.stability.derivation.DerivedForm`, against a
module's ``step(h, x)``, an ``nn.RNNCell``-like cell, a callable, or a model with
``hidden_states``/``lure_inputs``. From each state the module reaches on seeded random states and
inputs, both run one step and the next states are compared (teacher forcing: an error made at one
step is not carried into the next, so an expanding model is not refused for rounding). The result
is ``passed``, ``refused`` (the form runs something else: the largest error and its step say where)
or ``unchecked`` (the module does not expose what the check needs, and why; never a pass).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError, UserCodeError, first_line
from ..lure import LureSystem

__all__ = ["FORM_CHECK_STATUSES", "FormCheck", "LureConsistency", "check_form", "check_lure_form"]

FORM_CHECK_STATUSES = ("passed", "refused", "unchecked")
# check_form's tolerance per step, relative to the step's scale: this many units of roundoff per term
# of the longest sum a step computes (see FormCheck).
_ROUNDOFF_FACTOR = 16.0
_DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


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
    if tolerance is None and dtype not in _DEFAULT_TOLERANCE:
        raise InputError(f"no default tolerance for {dtype} states; pass tolerance= explicitly")
    tol = _DEFAULT_TOLERANCE[dtype] if tolerance is None else float(tolerance)
    return LureConsistency(
        max_abs_difference=max_abs, relative_difference=relative, scale=scale,
        worst_step=int(np.unravel_index(np.argmax(difference), difference.shape)[1]) + 1,
        tolerance=tol, consistent=bool(np.isfinite(relative) and relative <= tol), batch=actual.shape[0],
        steps=actual.shape[1], n=system.n, dtype=str(dtype).removeprefix("torch."), layer=layer,
    )


@dataclass(frozen=True)
class FormCheck:
    """Outcome of :func:`check_form` (module docstring).

    At step t (1-based) the module maps its state h_{t-1} to h_t and the form, from the same state,
    to h~_t; ``error_t`` = max |h_t - h~_t| over batch and units, ``scale_t`` = 1 + max |h_{t-1}| +
    max |h_t| + max |u_t|. ``relative_error`` = max_t error_t / scale_t, reached at ``worst_step``
    (``max_error`` = that step's error); ``passed`` iff it is <= ``tolerance``, by default
    ``_ROUNDOFF_FACTOR`` * ((state size + input size) * unit roundoff of the module's dtype +
    n * cond(T) * unit roundoff of float64): the module's rounding plus the form's, which the change
    of coordinates h = T zeta amplifies by up to cond(T).
    ``inputs`` says where the form's u_t came from (``derived form``, ``lure_inputs`` or ``given``).
    """

    status: str
    reason: str
    relative_error: float | None = None
    max_error: float | None = None
    worst_step: int | None = None
    tolerance: float | None = None
    steps: int = 0
    batch: int = 0
    seed: int = 0
    n: int | None = None
    state_size: int | None = None
    dtype: str | None = None
    inputs: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "passed": self.passed}


@dataclass(frozen=True)
class _Mapping:
    """How the form's state zeta and inputs u relate to the module's stacked state h and input x."""

    to_system: Callable[[np.ndarray], np.ndarray]
    from_system: Callable[[np.ndarray], np.ndarray]
    inputs: Callable[[Tensor], np.ndarray] | None
    source: str | None
    condition: float


def _unchecked(reason: str, **fields: Any) -> FormCheck:
    return FormCheck("unchecked", reason, **fields)


def _hand_mapping(system: LureSystem, N: int, coordinates: Any) -> _Mapping | str:
    """zeta <-> h for a hand-written form: h = (T zeta)[:N] (T = I by default), or why the sizes disagree."""
    n = system.n
    if coordinates is None:
        if n != N:
            return f"the form has n = {n} units but the module's state has {N}"
        return _Mapping(lambda h: h, lambda zeta: zeta, None, None, 1.0)
    T = coordinates.detach().cpu().double().numpy() if isinstance(coordinates, Tensor) else coordinates
    T = np.array(T, dtype=np.float64)
    if T.shape != (n, n) or not np.all(np.isfinite(T)):
        raise InputError(f"coordinates must be a finite {n} x {n} matrix T with h = (T zeta)[:N], got shape {T.shape}")
    if n < N:
        return f"the form has n = {n} units but the module's state has {N}"
    return _Mapping(lambda h: np.linalg.solve(T, np.hstack([h, np.zeros((h.shape[0], n - N))]).T).T,
                    lambda zeta: (zeta @ T.T)[:, :N], None, None, float(np.linalg.cond(T)))


def _given_inputs(inputs: Callable[[Tensor], Any], n: int) -> Callable[[Tensor], np.ndarray]:
    def call(x: Tensor) -> np.ndarray:
        try:
            u = inputs(x)
        except Exception as error:  # the caller's function
            raise UserCodeError(f"inputs(x) raised {type(error).__name__}: {first_line(error)}") from error
        u = np.asarray(u.detach().cpu().double().numpy() if isinstance(u, Tensor) else u, dtype=np.float64)
        if u.shape != (x.shape[0], n):
            raise InputError(f"inputs(x) returned shape {u.shape}, expected (batch, n) = ({x.shape[0]}, {n})")
        return u
    return call


def check_form(
    subject: Any,
    form: Any,
    *,
    state: Any = None,
    x: Any = None,
    inputs: Callable[[Tensor], Any] | None = None,
    coordinates: Any = None,
    input_first: bool | None = None,
    layer: int | None = None,
    steps: int = 16,
    batch: int = 4,
    seed: int = 0,
    tolerance: float | None = None,
) -> FormCheck:
    """Does ``form`` run what ``subject`` runs? (module docstring; see :class:`FormCheck`).

    ``subject``: a module with ``step(h, x)``, an ``nn.RNNCellBase``, a callable step
    (``input_first`` as for :func:`~lrnn_analysis.stability.derivation.derive_lure_form`), or a
    model with ``hidden_states(x)`` and ``lure_inputs(x)`` (``layer=`` for a stack, from h_0 = 0).
    ``form``: a :class:`LureSystem` or a ``DerivedForm`` (which knows its coordinates and inputs).
    For a hand-written system: ``state``/``x`` give the step's state and input (examples or feature
    shapes; an RNN cell's own sizes by default), ``coordinates`` T with h = (T zeta)[:N] when the
    form is not in the module's stacked state, and ``inputs(x_t) -> u_t`` its inputs; without
    ``inputs``, u_t are the module's ``lure_inputs``, or those of its derived form when that form is
    in the module's own coordinates, and the check is ``unchecked`` otherwise.
    States and inputs are N(0, 1), drawn from ``seed``: ``batch`` sequences of ``steps`` steps.
    """
    from .derivation import DerivedForm

    for name, value in (("steps", steps), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not math.isfinite(tolerance) or tolerance <= 0):
        raise InputError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    if not isinstance(form, (LureSystem, DerivedForm)):
        raise InputError(f"form must be a LureSystem or a DerivedForm, got {type(form).__name__}")
    system = form.system if isinstance(form, DerivedForm) else form
    common = {"steps": steps, "batch": batch, "seed": seed, "n": system.n}
    if not system.is_discrete:
        return _unchecked("the form is continuous-time: it has no step to compare with the module's", **common)
    if isinstance(form, DerivedForm):
        if coordinates is not None or inputs is not None:
            raise InputError("a DerivedForm carries its own coordinates and inputs: pass neither")
        return _check_step(subject, form, system, None, state, x, form.input_first, common, tolerance)
    if callable(getattr(subject, "hidden_states", None)) and callable(getattr(subject, "lure_inputs", None)):
        return _check_states(subject, system, x, inputs, coordinates, layer, common, tolerance)
    return _check_step(subject, None, system, (inputs, coordinates), state, x, input_first, common, tolerance)


def _check_step(subject: Any, derived: Any, system: LureSystem, hand: tuple[Any, Any] | None, state: Any, x: Any,
                input_first: bool | None, common: dict[str, Any], tolerance: float | None) -> FormCheck:
    from .derivation import _Signature, _signature, derive_lure_form, resolve_step

    try:
        f, module, _ = resolve_step(subject, input_first)
    except InputError as error:
        return _unchecked(f"{first_line(error)}; nor does it expose hidden_states(x) and lure_inputs(x)", **common)
    try:
        signature = (_Signature(derived.state_shapes, derived.state_is_tuple, derived.input_shape, derived.dtype,
                                derived.device) if derived is not None else _signature(subject, module, state, x))
    except InputError as error:
        return _unchecked(f"the step's state and input are unknown ({first_line(error)}): pass state= and x=", **common)
    common = {**common, "state_size": signature.state_size, "dtype": str(signature.dtype).removeprefix("torch.")}
    mapping: _Mapping | str
    if derived is not None:
        mapping = _Mapping(derived.to_system, derived.from_system, derived.inputs, "derived form",
                           float(np.linalg.cond(derived.coordinates)))
    else:
        assert hand is not None  # check_form passes the derived form or the hand-written form's (inputs, coordinates)
        inputs, coordinates = hand
        mapping = _hand_mapping(system, signature.state_size, coordinates)
        if isinstance(mapping, str):
            return FormCheck("refused", mapping, **common)
        if inputs is not None:
            mapping = _Mapping(mapping.to_system, mapping.from_system, _given_inputs(inputs, system.n), "given",
                               mapping.condition)
        else:
            try:
                own = derive_lure_form(subject, state, x, input_first=input_first)
            except InputError as error:
                return _unchecked(f"the form's inputs u_t are unknown: the module has no lure_inputs(x) and "
                                  f"{first_line(error)}; pass inputs=", **common)
            if coordinates is not None or not own.in_module_coordinates or own.system.n != system.n:
                return _unchecked("the form's inputs u_t are unknown: the module has no lure_inputs(x) and its "
                                  "nonlinearity's channels are not its state units (its derived form uses coordinates "
                                  "h = T zeta); pass inputs=", **common)
            mapping = _Mapping(mapping.to_system, mapping.from_system, own.inputs, "derived form", mapping.condition)
    form_inputs = mapping.inputs
    assert form_inputs is not None  # every branch above gives the form's inputs u_t
    device = signature.device
    generator = torch.Generator().manual_seed(common["seed"])
    states, _ = signature.examples(generator, common["batch"], signature.dtype)
    states = [s.to(device) for s in states]
    records = []
    training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        for _ in range(common["steps"]):
            x_t = torch.randn(common["batch"], *signature.input_shape, generator=generator, dtype=signature.dtype).to(device)
            before = signature.stack(states)  # before the step runs: it may update its arguments in place
            try:
                with torch.no_grad():
                    following = signature.unpack(f(signature.pack(states), x_t), "the step")
            except InputError:
                raise
            except Exception as error:  # the user's step
                raise UserCodeError(f"the step raised {type(error).__name__}: {first_line(error)}") from error
            after = signature.stack(following)
            if not np.all(np.isfinite(after)):
                break
            u = form_inputs(x_t.cpu())
            predicted = mapping.from_system(system.step(mapping.to_system(before), u))
            records.append((before, after, predicted, u))
            states = following
    finally:
        if module is not None:
            module.train(training)
    width = math.prod(signature.input_shape)
    return _verdict(records, signature.state_size + width, signature.dtype, mapping.source, mapping.condition, common,
                    tolerance)


def _check_states(model: nn.Module, system: LureSystem, x: Any, inputs: Any, coordinates: Any, layer: int | None,
                  common: dict[str, Any], tolerance: float | None) -> FormCheck:
    """Teacher-forced steps along ``model.hidden_states(x)`` from h_0 = 0, u_t from ``lure_inputs`` (or ``inputs``)."""
    features = _input_features(model, x)
    if features is None:
        return _unchecked("the model's input size is unknown: pass x= (an example (batch, time, ...) or the feature shape)",
                          **common)
    reference = next((p for p in model.parameters()), None)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.get_default_dtype()
    device = reference.device if reference is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(common["seed"])
    xs = torch.randn(common["batch"], common["steps"], *features, generator=generator, dtype=dtype).to(device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            actual = _states(model, "hidden_states", xs, layer)
            lure = _states(model, "lure_inputs", xs, layer) if inputs is None else None
    except ValueError as error:  # the model's own refusal, e.g. an LSTM's lure_inputs
        return _unchecked(f"the model cannot give its states and Lur'e inputs: {first_line(error)}", **common)
    finally:
        model.train(training)
    N = actual.shape[-1]
    common = {**common, "state_size": N, "dtype": str(actual.dtype).removeprefix("torch.")}
    mapping = _hand_mapping(system, N, coordinates)
    if isinstance(mapping, str):
        return FormCheck("refused", mapping, **common)
    given = _given_inputs(inputs, system.n) if inputs is not None else None
    observed = actual.detach().cpu().double().numpy()
    records = []
    before = np.zeros((observed.shape[0], N))
    for t in range(observed.shape[1]):
        after = observed[:, t]
        if not np.all(np.isfinite(after)):
            break
        if given is not None:
            u = given(xs[:, t].cpu())
        else:
            assert lure is not None  # read above whenever no inputs are given
            u = lure[:, t].detach().cpu().double().numpy()
        if u.shape[-1] != system.n:
            return FormCheck("refused", f"the model's Lur'e inputs have {u.shape[-1]} units but the form has n = {system.n}",
                             **common)
        records.append((before, after, mapping.from_system(system.step(mapping.to_system(before), u)), u))
        before = after
    return _verdict(records, N + math.prod(features), actual.dtype, "given" if given else "lure_inputs", mapping.condition,
                    common, tolerance)


def _input_features(model: nn.Module, x: Any) -> tuple[int, ...] | None:
    if isinstance(x, Tensor):
        return tuple(x.shape[2:]) if x.dim() >= 3 else None
    if isinstance(x, (tuple, list)) and x and all(isinstance(i, int) and i >= 1 for i in x):
        return tuple(x)
    input_dim = getattr(getattr(model, "config", None), "input_dim", None)
    if input_dim:
        return (input_dim,)
    rnn = getattr(model, "rnn", None)
    return (rnn.input_size,) if isinstance(rnn, nn.RNNBase) else None


def _verdict(records: Sequence[tuple[np.ndarray, ...]], terms: int, dtype: torch.dtype, source: str | None, condition: float,
             common: dict[str, Any], tolerance: float | None) -> FormCheck:
    if not records:
        return _unchecked("the module's state is not finite after its first step: nothing to compare", **common)
    if tolerance is None:
        if not dtype.is_floating_point:
            raise InputError(f"no default tolerance for {dtype} states; pass tolerance=")
        n = common["n"]
        tolerance = _ROUNDOFF_FACTOR * (terms * torch.finfo(dtype).eps + n * condition * np.finfo(np.float64).eps) / 2
    worst = (-1.0, 0.0, 0)
    for t, (before, after, predicted, u) in enumerate(records, start=1):
        error = float(np.max(np.abs(after - predicted)))
        if not np.isfinite(error):
            worst = (math.inf, error, t)
            break
        scale = 1.0 + float(np.max(np.abs(before))) + float(np.max(np.abs(after))) + float(np.max(np.abs(u), initial=0.0))
        if error / scale > worst[0]:
            worst = (error / scale, error, t)
    relative, error, step = worst
    fields = {**common, "relative_error": relative, "max_error": error, "worst_step": step, "tolerance": float(tolerance),
              "inputs": source, "steps": len(records)}
    if relative <= tolerance:
        return FormCheck("passed", "", **fields)
    return FormCheck("refused", f"at step {step} the form's next state differs from the module's by {error:.3g} "
                                f"({relative:.3g} relative, tolerance {tolerance:.3g})", **fields)
