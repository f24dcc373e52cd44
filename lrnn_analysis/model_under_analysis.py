"""The model under analysis: any ``nn.Module`` mapping (batch, time, input) to outputs, plus what
the toolkit may know about it.

Every analysis (sweeps, audit, Hessian, tables, recipes) takes a :class:`ModelUnderAnalysis`.
Its optional pieces decide what can be computed:

* ``lure_form``: a :class:`LureSystem` (or a zero-argument callable returning one) writing the
  recurrence as h' = A h + sigma(W h + u); without it, no stability certificate is available;
* ``recurrent``: glob patterns over ``named_parameters()`` naming the recurrent weights (used by
  recurrent-only perturbations and Hessian blocks); each pattern must match a parameter;
* ``metadata``: what is known about its training, e.g. ``task`` (the record of
  :meth:`Task.to_dict`) and ``train_fingerprint`` (:func:`lrnn_analysis.training_split.split_fingerprint`).

A module may declare the first two itself: a ``lure_form()`` method and a
``recurrent_parameters`` attribute (a sequence of patterns) are used when the constructor is
not given them. The hidden-to-hidden weights ``weight_hh_l*`` of the ``torch.nn`` RNN, LSTM and
GRU layers a module contains are recurrent by definition and are the default otherwise. The toolkit's own
architectures are one provider (:meth:`from_recurrent_model`,
:func:`load_model`); any user module is another (:meth:`from_module`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import InputError, UserCodeError, first_line
from .lure import LureSystem
from .parameters import parameter_patterns, require_parameters

if TYPE_CHECKING:
    from .models import RecurrentModel
    from .task import Task

__all__ = ["ModelUnderAnalysis", "as_model_under_analysis", "load_model"]

LureSource = LureSystem | Callable[[], "LureSystem | None"] | None


@dataclass(frozen=True, eq=False)
class ModelUnderAnalysis:
    """A module to analyse, its name, its optional Lur'e form, its recurrent parameters
    (glob patterns, validated against ``module.named_parameters()``) and its metadata.

    ``input_dim``/``output_dim`` are the sizes when known (the toolkit's models record them);
    otherwise :meth:`check_fits` runs the module on two samples to check it.
    """

    module: nn.Module
    name: str
    lure_form: LureSource = None
    recurrent: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    input_dim: int | None = None
    output_dim: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.module, nn.Module):
            raise InputError(f"the model under analysis must be a torch.nn.Module, got {type(self.module).__name__}")
        if not any(True for _ in self.module.parameters()):
            raise InputError(f"{self.name}: the module has no parameters")
        if not (self.lure_form is None or isinstance(self.lure_form, LureSystem) or callable(self.lure_form)):
            raise InputError(f"{self.name}: lure_form must be a LureSystem or a callable returning one, "
                             f"got {type(self.lure_form).__name__}")
        object.__setattr__(self, "recurrent", parameter_patterns(self.recurrent))
        if self.recurrent:
            require_parameters(self.module, self.recurrent, self.name)
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata or {})))

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        lure_form: LureSource = None,
        recurrent: str | Sequence[str] | None = None,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ModelUnderAnalysis:
        """Any module mapping (batch, time, input) to outputs. ``lure_form`` and ``recurrent``
        default to what the module declares (a ``lure_form()`` method, a ``recurrent_parameters``
        attribute), else for ``recurrent`` to the ``weight_hh_l*`` of its torch.nn RNN/LSTM/GRU
        layers, and otherwise to none."""
        declared = getattr(module, "lure_form", None)
        if lure_form is None and callable(declared):
            lure_form = declared
        if recurrent is None:
            recurrent = getattr(module, "recurrent_parameters", None)
        if recurrent is None:
            recurrent = [f"{name}.weight_hh_l*" if name else "weight_hh_l*"
                         for name, layer in module.named_modules() if isinstance(layer, nn.RNNBase)]
        return cls(module, name or type(module).__name__, lure_form, parameter_patterns(recurrent), metadata or {})

    @classmethod
    def from_recurrent_model(
        cls, model: RecurrentModel, metadata: Mapping[str, Any] | None = None, name: str | None = None
    ) -> ModelUnderAnalysis:
        """One of the toolkit's architectures (a ``RecurrentModel``), with its checkpoint metadata;
        the name defaults to "ARCH (SCHEME)" and the sizes come from its config."""
        config = model.config
        record = {**dict(metadata or {}), "config": config.to_dict()}
        return cls(model, name or f"{config.arch} ({config.discretization})", model.lure_form,
                   parameter_patterns(model.recurrent_parameters), record, config.input_dim, config.output_dim)

    def lure_system(self) -> LureSystem | None:
        """The Lur'e form (calling the callable if one was given), or None when there is none.

        A callable of the user's module that raises, or returns something other than a
        ``LureSystem`` or None, is a :class:`UserCodeError` naming the model (the exception is its
        cause); the toolkit's own architectures raising is a bug and propagates as it is."""
        if not callable(self.lure_form):
            return self.lure_form
        try:
            system = self.lure_form()
        except Exception as error:
            if self._is_toolkit_model():
                raise
            raise UserCodeError(f"{self.name}: lure_form() raised {type(error).__name__}: {first_line(error)}") from error
        if system is not None and not isinstance(system, LureSystem):
            raise UserCodeError(f"{self.name}: lure_form() returned a {type(system).__name__}, not a LureSystem or None")
        return system

    def _is_toolkit_model(self) -> bool:
        from .models import RecurrentModel

        return isinstance(self.module, RecurrentModel)

    def recurrent_names(self) -> list[str]:
        """Names of the declared recurrent parameters; an error when none are declared."""
        if not self.recurrent:
            raise InputError(f"{self.name}: the model declares no recurrent parameters; "
                             "name them with recurrent=[patterns] (globs over its parameter names)")
        return require_parameters(self.module, self.recurrent, self.name)


    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def check_fits(self, task: Task, where: str | None = None) -> None:
        """Raise ``InputError`` unless the module runs on ``task``'s inputs and returns outputs
        its targets can score: (batch, task.output_dim), or (batch, T, task.output_dim) for a
        per-step task (``UserCodeError`` when its forward raises). Known sizes are compared; unknown
        ones, and the outputs on a per-step task, are probed on two test samples."""
        where = where or self.name
        if self.input_dim is not None and self.output_dim is not None:
            task.check_fits(self.input_dim, self.output_dim, where)
            # A toolkit model reading out every step (readout "all") is probed on a task with one target per sequence.
            if not task.per_step and getattr(getattr(self.module, "config", None), "readout", "last") != "all":
                return
        x = task.test.x[:2].to(self.device)
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                out = self.module(x)
        except Exception as error:  # the user's module: any failure means it does not fit
            inputs = f"(batch, {task.seq_len}) token ids" if task.input_kind == "tokens" else f"(batch, {task.seq_len}, {task.input_dim})"
            raise UserCodeError(f"{where}: the model does not run on task {task.name} inputs of shape "
                                f"{inputs}: forward raised {type(error).__name__}: {first_line(error)}") from error
        finally:
            self.module.train(was_training)
        expected = (len(x), task.seq_len, task.output_dim) if task.per_step else (len(x), task.output_dim)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            per_step = f" (one output per step: task {task.name} is scored per step)" if task.per_step else ""
            raise InputError(f"{where}: the model returns {shape} on a batch of {len(x)}; task {task.name} "
                             f"needs {('(batch, ' + str(task.seq_len) + ', ') if task.per_step else '(batch, '}"
                             f"{task.output_dim}) outputs{per_step}")

    def describe(self) -> dict[str, Any]:
        """What the model is, for reports: name, module class, parameter count, recurrent
        parameters, whether it has a Lur'e form, and its config when it is a toolkit model."""
        return {
            "name": self.name,
            "module": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
            "parameters": self.parameter_count,
            "recurrent": list(self.recurrent_names()) if self.recurrent else [],
            "lure_form": self.lure_form is not None,
            "config": self.metadata.get("config"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.describe(), "metadata": dict(self.metadata)}


def as_model_under_analysis(model: ModelUnderAnalysis | nn.Module, metadata: Mapping[str, Any] | None = None,
                            name: str | None = None) -> ModelUnderAnalysis:
    """``model`` itself, or a toolkit model / plain module wrapped with its declared pieces."""
    if isinstance(model, ModelUnderAnalysis):
        return model
    from .models import RecurrentModel

    if isinstance(model, RecurrentModel):
        return ModelUnderAnalysis.from_recurrent_model(model, metadata, name)
    return ModelUnderAnalysis.from_module(model, name=name, metadata=metadata)


def load_model(path: str | Path, name: str | None = None, **reference_hparams: float | str | None) -> ModelUnderAnalysis:
    """A toolkit checkpoint (native, or the reference implementation's) as a model under
    analysis, with the checkpoint's metadata (task record, training fingerprint, log)."""
    from .checkpoints import load_checkpoint

    model, metadata = load_checkpoint(path, **reference_hparams)
    return ModelUnderAnalysis.from_recurrent_model(model, metadata, name)
