"""A reference implementation file (state dict or whole-module pickle) as a toolkit model with
metadata saying where each hyper-parameter came from."""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, first_line
from .filenames import parse_reference_filename
from .logs import loss_file_candidates, read_reference_log
from .models import MODEL_HPARAMS, convert_reference_model, identify_model, strip_data_parallel
from .pickles import DATA_PARALLEL, REFERENCE_MODULE_CLASSES, PickledObject, class_name

__all__ = ["OVERRIDES", "ReferenceFileWarning", "is_reference_content", "load_reference"]

_HPARAMS = ("beta", "gamma", "eps", "alpha", "solver")
OVERRIDES = (*_HPARAMS, "task", "model")
_PICKLED_ATTRIBUTES = ("n_units", "eps", "beta", "gamma", "alpha", "model", "solver")
SOURCE_PICKLE, SOURCE_NAME, SOURCE_OVERRIDE = "pickle attribute", "file name", "override"
_TEST_SET_NOTE = ("the bundled 10k MNIST digits may overlap the standard 60k training set the reference model was "
                 "trained on, so accuracy on them can overstate the test score; --data-path to a directory with the "
                 "standard t10k IDX files gives the true test score")
_PARAMETER_NAMES = {"B", "C", "func.B", "func.C", "W.weight", "E_gate.weight"}


class ReferenceFileWarning(UserWarning):
    """Something about a reference file the user should know: the model still loads exactly."""


def is_reference_content(content: Any) -> bool:
    """A whole reference module, or a state dict with the reference's parameter names."""
    if isinstance(content, PickledObject):
        return True
    if not isinstance(content, dict) or not all(isinstance(k, str) for k in content):
        return False
    keys = {k.removeprefix("module.") for k in content}
    return {"E.weight", "D.weight"} <= keys and bool(keys & _PARAMETER_NAMES)


def load_reference(path: str | Path, content: Any, overrides: Mapping[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The toolkit model and metadata of a reference file whose unpickled ``content`` is a state dict
    or an inert ``PickledObject`` tree; ``overrides`` (beta, gamma, eps, alpha, solver, task, model) win over
    the pickled attributes, which win over the file name. Raises ``InputError`` on anything inexact.
    A training history beside the file (``*_loss.pkl``) that cannot be read is skipped with a
    ``ReferenceFileWarning``: the model loads without its log."""
    path = Path(path)
    unknown = {k for k, v in overrides.items() if v is not None} - set(OVERRIDES)
    if unknown:
        raise InputError(f"unknown reference overrides {sorted(unknown)}; expected {list(OVERRIDES)}")
    parsed = parse_reference_filename(path)
    notes: list[str] = []
    if isinstance(content, PickledObject):
        state, pickled, kind = _unpack_module(content)
    else:
        state, pickled, kind = strip_data_parallel(content), {}, "state dict"
    _check_tensors(state)
    for key in sorted(set(pickled) & set(parsed) & {"eps", "beta", "gamma", "alpha", "model", "solver"}):
        if not _same(pickled[key], parsed[key]):
            _warn(notes, f"{path.name}: the pickle records {key} = {pickled[key]!r} but the file name says "
                         f"{parsed[key]!r}; using the pickle's (the file may have been renamed)")
    if "n_units" in pickled and "units" in parsed and pickled["n_units"] != parsed["units"]:
        _warn(notes, f"{path.name}: the pickle records n_units = {pickled['n_units']} but the file name says {parsed['units']}")
    model_name = identify_model(set(state), overrides.get("model") or pickled.get("model", parsed.get("model")))
    unused = [k for k in _HPARAMS if overrides.get(k) is not None and k not in MODEL_HPARAMS[model_name]]
    if unused:
        _warn(notes, f"{path.name}: the override(s) {', '.join(unused)} do not apply to a {model_name} model "
                     f"(its hyper-parameters: {', '.join(MODEL_HPARAMS[model_name]) or 'none'}); ignored")
    values, sources = {}, {}
    for key in MODEL_HPARAMS[model_name]:
        for source, table in ((SOURCE_OVERRIDE, overrides), (SOURCE_PICKLE, pickled), (SOURCE_NAME, parsed)):
            if table.get(key) is not None:
                values[key], sources[key] = table[key], source
                break
    missing = [k for k in MODEL_HPARAMS[model_name] if k not in values and k != "alpha"]
    if missing:
        raise InputError(f"reference {kind} needs {missing}; pass them or keep the reference file name")
    if "alpha" in MODEL_HPARAMS[model_name] and "alpha" not in values:
        values["alpha"] = 1.0
        if kind == "state dict":
            sources["alpha"] = "default (not recorded)"
            _warn(notes, f"{path.name}: alpha is recorded nowhere (older file names omit it); using the driver's "
                         "default 1 - pass alpha=... if the model was trained with another")
        else:
            sources["alpha"] = "pickle (no alpha attribute: the saving code had no alpha)"
    if "n_units" in pickled and pickled["n_units"] != state["E.weight"].shape[0]:
        raise InputError(f"the pickle records n_units = {pickled['n_units']} but E.weight has {state['E.weight'].shape[0]} rows")
    model = convert_reference_model(model_name, state, values)
    task_name = overrides.get("task") or parsed.get("task")
    task = _task(task_name, parsed.get("T"), model.config.input_dim, notes)
    if task is not None and "solver" not in parsed and "T" in parsed:
        _warn(notes, f"{path.name}: an older driver's file name; the data conventions recorded are the newest "
                     "driver's (older ones normalised MNIST by mean 0.1307/std 0.3081 and permuted pmnist by rows "
                     "and columns with seed 42)")
    metadata: dict[str, Any] = {
        "format": "reference",
        "source": "erichson/LipschitzRNN",
        "reference": {
            "model": model_name,
            "file": kind,
            **({"class": pickled["class"]} if "class" in pickled else {}),
            "hparams": {k: {"value": values[k], "source": sources[k]} for k in values},
            "file_name": parsed,
            "notes": notes,
        },
        "reference_hparams": {**parsed, **{k: v for k, v in pickled.items() if k != "class"}, **values},
        "config": model.config.to_dict(),
    }
    if task is not None:
        metadata["task"] = task
        metadata["reference"]["notes"].append(_TEST_SET_NOTE)
    log_path = next((p for p in loss_file_candidates(path) if p.is_file()), None)
    if log_path is not None:
        try:
            metadata["log"] = read_reference_log(log_path, float(values.get("alpha", 1.0)))
            metadata["reference"]["log_file"] = str(log_path)
        except (InputError, OSError) as error:  # the history is beside the model, not part of it
            _warn(notes, f"{path.name}: the training history beside it was not read ({first_line(error)}); "
                         "the model loads without its log")
    return model, metadata


def _unpack_module(root: PickledObject) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    if class_name(root) == DATA_PARALLEL:
        children = root.attributes.get("_modules") or {}
        if set(children) != {"module"}:
            raise InputError(f"a pickled DataParallel with submodules {sorted(children)}, expected ['module']")
        root = children["module"]
    name = class_name(root)
    if name not in REFERENCE_MODULE_CLASSES:
        raise InputError(f"the pickled module is a {name}, not one of the reference's {list(REFERENCE_MODULE_CLASSES)}")
    state: dict[str, torch.Tensor] = {}
    _collect(root, "", state, depth=0)
    pickled: dict[str, Any] = {"class": name}
    for key in _PICKLED_ATTRIBUTES:
        if key in root.attributes:
            value = root.attributes[key]
            expected = str if key in ("model", "solver") else (int if key == "n_units" else (int, float))
            if isinstance(value, bool) or not isinstance(value, expected):
                raise InputError(f"the pickled attribute {key} is a {type(value).__name__}, expected {expected}")
            pickled[key] = value
    func = (root.attributes.get("_modules") or {}).get("func")
    if isinstance(func, PickledObject):
        for key in ("beta", "gamma"):
            if key in func.attributes and key in pickled and not _same(func.attributes[key], pickled[key]):
                raise InputError(f"the pickled ODE function has {key} = {func.attributes[key]!r}, its model {pickled[key]!r}")
    return state, pickled, f"whole-module pickle ({name})"


def _collect(module: PickledObject, prefix: str, state: dict[str, torch.Tensor], depth: int) -> None:
    if depth > 4:
        raise InputError("pickled modules nested deeper than the reference's")
    for group in ("_parameters", "_buffers"):
        entries = module.attributes.get(group) or {}
        if not isinstance(entries, dict):
            raise InputError(f"{prefix or 'the model'}: {group} is a {type(entries).__name__}")
        for name, tensor in entries.items():
            if tensor is not None:
                state[prefix + name] = tensor
    children = module.attributes.get("_modules") or {}
    if not isinstance(children, dict):
        raise InputError(f"{prefix or 'the model'}: _modules is a {type(children).__name__}")
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(child, PickledObject):
            raise InputError(f"submodule {prefix}{name} is a {type(child).__name__}")
        _collect(child, f"{prefix}{name}.", state, depth + 1)


def _check_tensors(state: Mapping[str, Any]) -> None:
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise InputError(f"tensor {name} has dtype {tensor.dtype}, expected floating point")
        if not torch.isfinite(tensor).all():
            raise InputError(f"tensor {name} has non-finite values (NaN or inf)")


def _task(name: str | None, steps: int | None, input_dim: int, notes: list[str]) -> dict[str, Any] | None:
    """The toolkit task with the reference driver's data conventions for its ``mnist``/``pmnist``."""
    if name not in ("mnist", "pmnist"):
        if name is not None:
            notes.append(f"the reference task {name!r} has no toolkit counterpart (only mnist and pmnist do); pass --task")
        return None
    if steps is not None and (784 % steps or 784 // steps != input_dim):
        raise InputError(f"the file name says T = {steps} steps, i.e. {784 / steps:g} pixels per step, "
                         f"but E.weight takes {input_dim} inputs")
    if 784 % input_dim:
        raise InputError(f"E.weight takes {input_dim} inputs, which does not divide the 784 pixels of MNIST")
    if name == "mnist":
        return {"name": "smnist", "seed": 0, "options": {"pixels_per_step": input_dim, "scale": "unit"}}
    return {"name": "psmnist", "seed": 0, "options": {"pixels_per_step": input_dim, "scale": "raw", "permutation": "reference"}}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _warn(notes: list[str], message: str) -> None:
    notes.append(message)
    warnings.warn(message, ReferenceFileWarning, stacklevel=3)
