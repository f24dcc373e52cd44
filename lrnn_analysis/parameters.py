"""Choosing a module's parameters by glob patterns over ``named_parameters()``.

Used by the model under analysis (its recurrent parameters), the curvature operators and the
perturbation sweeps; it knows only ``torch.nn``.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import nn

from .errors import InputError

__all__ = ["glob_parameters", "module_of", "parameter_patterns", "require_parameters"]


def parameter_patterns(recurrent: str | Sequence[str] | None) -> tuple[str, ...]:
    """The patterns of ``recurrent`` (a list, or one comma-separated string), stripped, empty ones dropped."""
    if recurrent is None:
        return ()
    parts = recurrent.split(",") if isinstance(recurrent, str) else list(recurrent)
    if not all(isinstance(p, str) for p in parts):
        raise InputError(f"recurrent parameter patterns must be strings, got {recurrent!r}")
    return tuple(p.strip() for p in parts if p.strip())


def glob_parameters(module: nn.Module, patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the names of ``module``'s parameters that any glob of ``patterns`` matches, in the
    module's order; the patterns that match none)."""
    names = [name for name, _ in module.named_parameters()]
    chosen: set[str] = set()
    unmatched = []
    for pattern in patterns:
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            unmatched.append(pattern)
        chosen.update(matched)
    return [name for name in names if name in chosen], unmatched


def require_parameters(module: nn.Module, patterns: str | Sequence[str], what: str = "model") -> list[str]:
    """Names of ``module``'s parameters matched by the glob ``patterns`` (a list, or one
    comma-separated string), in the module's order. A pattern that matches nothing, or no
    pattern at all, is an error: a selection that silently selects nothing is never returned."""
    wanted = parameter_patterns(patterns)
    if not wanted:
        raise InputError(f"{what}: no parameter patterns given")
    chosen, unmatched = glob_parameters(module, wanted)
    if unmatched:
        names = [name for name, _ in module.named_parameters()]
        raise InputError(f"{what}: parameter pattern {unmatched[0]!r} matches none of {names}")
    return chosen


def module_of(model: Any) -> nn.Module:
    """``model`` itself when it is an ``nn.Module``, else its ``module`` attribute (a model under
    analysis, or anything else that carries one)."""
    if isinstance(model, nn.Module):
        return model
    module = getattr(model, "module", None)
    if not isinstance(module, nn.Module):
        raise InputError(f"expected a torch.nn.Module or an object with one as .module, got {type(model).__name__}")
    return module
