"""Hyper-parameters written into the names of the reference implementation's files.

The driver of erichson/LipschitzRNN names its outputs
``{model}_{task}_T_{T}_units_{n}_beta_{b}_alpha_{a}_gamma_{g}_eps_{e}_solver_{s}_gclip_{c}_optimizer_{o}_seed_{k}.pkl``
(older drivers: ``{model}_{task}_T{T}_units{n}_beta{b}_gamma{g}_eps{e}_init{std}_seed{k}.pkl``) and the
training history beside it ``..._gamma_A_{g}_..._loss.pkl``. Model names contain underscores
(``LipschitzRNN_ODE``), so the model is matched against the known names, longest first.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["REFERENCE_MODELS", "parse_reference_filename"]

REFERENCE_MODELS = ("LipschitzRNN", "LipschitzRNN_gated", "LipschitzRNN_ODE", "asymRNN", "calRNN", "resRNN", "simpleRNN")
_NUMERIC_FIELDS = {"T": int, "units": int, "beta": float, "alpha": float, "gamma": float, "eps": float,
                  "gclip": float, "seed": int, "init": float}
_TEXT_FIELDS = {"solver", "optimizer"}
_POSITIVE_FIELDS = {"T", "units"}  # counts: steps per sequence, hidden units
# The driver writes "gamma_A" in the name of the loss file; it is the same gamma.
_ALIASES = {"gamma_A": "gamma"}


def parse_reference_filename(path: str | Path) -> dict[str, Any]:
    """Fields found in a reference file name: ``model`` and ``task`` (when the name starts with a
    known model name), then every ``key_value`` or ``keyvalue`` token of the pattern. Tokens that
    belong to no known field are ignored; a field given twice with different values, or a count
    (``T``, ``units``) below 1, is an ``InputError``."""
    name = Path(path).name
    for suffix in ("_loss.pkl", ".pkl", ".pth", ".pt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    found: dict[str, Any] = {}
    model = next((m for m in sorted(REFERENCE_MODELS, key=len, reverse=True) if name.startswith(m + "_")), None)
    if model is None:
        return found
    found["model"] = model
    tokens = name[len(model) + 1:].split("_")
    if tokens and tokens[0] and not _field_of(tokens[0]):
        found["task"] = tokens.pop(0)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "gamma" and i + 1 < len(tokens) and tokens[i + 1] == "A":
            token, i = "gamma_A", i + 1
        key = _field_of(token)
        if key is None:
            i += 1
            continue
        if token == key and i + 1 < len(tokens) and _ALIASES.get(key, key) in _TEXT_FIELDS:
            # a text value may hold underscores itself (solver fixed_adams): it runs to the next field
            end = next((j for j in range(i + 2, len(tokens)) if _field_of(tokens[j]) is not None), len(tokens))
            raw, i = "_".join(tokens[i + 1:end]), end
        elif token == key and i + 1 < len(tokens):
            raw, i = tokens[i + 1], i + 2
        elif token == key:
            break
        else:
            raw, i = token[len(key):], i + 1
        field = _ALIASES.get(key, key)
        if field in _TEXT_FIELDS:
            value: Any = raw
        elif _NUMERIC_FIELDS[field] is int and re.fullmatch(r"[-+]?\d+", raw):
            value = int(raw)
        elif _NUMERIC_FIELDS[field] is float and _is_number(raw):
            value = float(raw)
        else:
            kind = "a whole number" if _NUMERIC_FIELDS[field] is int else "a number"
            raise InputError(f"{Path(path).name}: the name gives {field} = {raw!r}, which is not {kind}")
        if field in _POSITIVE_FIELDS and value < 1:
            raise InputError(f"{Path(path).name}: the name gives {field} = {value}; it must be at least 1")
        if field in found and found[field] != value:
            raise InputError(f"{Path(path).name}: the name gives {field} twice ({found[field]!r} and {value!r})")
        found[field] = value
    return found


def _field_of(token: str) -> str | None:
    keys = sorted(set(_NUMERIC_FIELDS) | _TEXT_FIELDS | set(_ALIASES), key=len, reverse=True)
    return next((k for k in keys if token == k or (token.startswith(k) and _is_number(token[len(k):]))), None)


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text))
