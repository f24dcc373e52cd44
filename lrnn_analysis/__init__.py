"""lrnn-analysis: certify, measure and draw the stability, curvature and robustness of continuous-time RNNs.

The public API, grouped by role (``import lrnn_analysis as L``)::

    subject = L.load_model("models/digits-lipschitz-euler.safetensors")   # or L.ModelUnderAnalysis.from_module(m)
    L.certify_model(subject)                                            # stored evidence, Lur'e form, torch.nn layers
    op = L.HessianOperator(subject, loss_fn, (x, y))
    L.eigenvalues(op, k=1, which="LA"), L.trace(op)
    L.sweep(subject, (x, y), {"gaussian": [0, 0.1]}, seeds=3)

Names load on first use (PEP 562): ``import lrnn_analysis`` imports neither torch nor scipy.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module, or (module, attribute): the attribute None stands for the module itself.
_EXPORTS: dict[str, str | tuple[str, str | None]] = {
    # the model under analysis, its loaders and data
    "ModelUnderAnalysis": ".model_under_analysis",
    "load_model": ".model_under_analysis",
    "load_user_model": ".usermodule",
    "LureSystem": ".lure",
    "Task": ".task",
    "load_task": ".builtin_tasks",
    "load_data": ".data_files",
    # what a model is scored on: loss and metrics, one output per sequence or per step
    "Objective": ".objective",
    "evaluate": ".evaluation",
    # the pipelines every front end runs: settings in, result out
    "pipelines": (".pipelines", None),
    # stability
    "StabilitySettings": ".pipelines.stability",
    "certify_model": ".pipelines.stability",
    "certify": ".stability",
    "certify_parameterization": ".stability",
    "spectrum": ".stability",
    # curvature
    "CurvatureSettings": ".pipelines.curvature",
    "HessianOperator": ".hessian",
    "GGNOperator": ".hessian",
    "FisherOperator": ".hessian",
    "EmpiricalFisherOperator": ".hessian",
    "eigenvalues": ".hessian",
    "trace": ".hessian",
    "spectral_density": ".hessian",
    "diagonal": ".hessian",
    "analyze": ".hessian",
    # robustness
    "RobustnessSettings": ".pipelines.robustness",
    "Perturbation": ".robustness",
    "sweep": ".robustness",
    # audit
    "AuditSettings": ".pipelines.audit",
    "Gate": ".pipelines.audit",
    "run_audit": (".pipelines.audit", "run"),
    "write_audit": ".audit_report",
    # figures (axes-level functions take ax= and return the Axes; multi-panel ones return the Figure)
    "plot_certified_accuracy": ".plots",
    "plot_density": ".plots",
    "plot_hessian_summary": ".plots",
    "plot_landscape_1d": ".plots",
    "plot_landscape_2d": ".plots",
    "plot_phase_diagram": ".plots",
    "plot_robustness": ".plots",
    "plot_spectra": ".plots",
    "plot_training_spectra": ".plots",
    # errors
    "InputError": ".errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _EXPORTS[name]
    path, attribute = where if isinstance(where, tuple) else (where, name)
    module = importlib.import_module(path, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
