"""The stability pipeline: certificates of models under analysis.

:func:`certify_model` is the one place that decides how a model is certified:

1. certificate evidence stored in its checkpoint, re-verified in float64 against its weights
   (reported from the evidence, never searched again);
2. its Lur'e form h' = A h + sigma(W h + u): spectra (diagnostics) and the certificates of the
   scheme it runs, searched tier by tier and verified in float64;
3. without a Lur'e form, the ``torch.nn`` RNN/LSTM/GRU layers it contains, each layer and each
   stack certified (what the model does with their states is not);
4. otherwise no certificate, and the reason.

:func:`run` certifies several models with one :class:`StabilitySettings` and returns a
:class:`StabilityResult` whose :meth:`~StabilityResult.rows` is a tidy table.

:func:`lipschitz_bound` certifies a Lipschitz bound of a model's whole sequence map (its
incremental l2-gain, :func:`~lrnn_analysis.stability.certify_gain`) and, given a task, sets it
beside empirical lower bounds measured on test inputs (:mod:`lrnn_analysis.robustness.certified`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..choices import CERTIFICATES, CONTRACTION_CERTIFICATES
from ..errors import InputError

if TYPE_CHECKING:
    from ..lure import LureSystem
    from ..model_under_analysis import ModelUnderAnalysis
    from ..robustness.certified import BoundTightness
    from ..stability import CascadeCertificate, CertificateResult, SpectrumReport
    from ..stability.consistency import FormCheck
    from ..stability.construction_gain import GainEvidenceCheck
    from ..stability.evidence import EvidenceCheck
    from ..stability.gain import GainCertificate
    from ..task import Task

__all__ = ["LAYERS_ONLY", "NO_LURE_FORM", "SAMPLE_INPUTS", "TIGHTNESS_RADIUS", "TIGHTNESS_SAMPLES", "TIGHTNESS_STEPS",
           "LipschitzBound", "ModelCertificate", "ModelGain", "StabilityResult", "StabilitySettings", "certified_summary",
           "certify_lipschitz", "certify_model", "check_layer_forms", "checked_form", "gain_certificate", "lipschitz_bound",
           "run"]

NO_LURE_FORM = "no Lur'e form: no certificate available for this model"
LAYERS_ONLY = ("no Lur'e form of the whole model: its torch.nn recurrent layers are certified "
               "(what the model does with their states is not)")

_SOURCES = ("lure form", "stored evidence", "torch.nn layers", "none")
# Training inputs on which the input range of LSTM/GRU layers is observed.
SAMPLE_INPUTS = 1000
# The empirical lower bounds beside a Lipschitz bound: input-Jacobian norms on this many test inputs,
# and the l2 PGD attack (margin loss, inputs clamped to the training range) at this radius and steps.
TIGHTNESS_SAMPLES = 200
TIGHTNESS_RADIUS = 0.25
TIGHTNESS_STEPS = 20


@dataclass(frozen=True)
class StabilitySettings:
    """Which certificates to try and how long to search.

    ``certificates``: names from :data:`~lrnn_analysis.choices.CERTIFICATES` (None: the defaults
    of the scheme each model runs); ``time_budget``: seconds for all searched certificates of one
    model (None: no limit); ``input_bound``: the bound on ``||x_t||_inf`` under which the
    conditions of ``torch.nn`` LSTM/GRU layers are stated; ``cell``: a submodule whose recurrence is
    certified instead of the model's (see :func:`checked_form`)."""

    certificates: tuple[str, ...] | None = None
    time_budget: float | None = None
    input_bound: float | None = None
    cell: str | None = None

    def __post_init__(self) -> None:
        if self.certificates is not None:
            names = tuple(self.certificates)
            unknown = [n for n in names if n not in CERTIFICATES + CONTRACTION_CERTIFICATES]
            if unknown or not names:
                raise InputError(f"unknown certificates {unknown}; expected names from {', '.join(CERTIFICATES)}")
            object.__setattr__(self, "certificates", names)
        if self.cell is not None and (not isinstance(self.cell, str) or not self.cell):
            raise InputError(f"cell: expected the name of a submodule, got {self.cell!r}")
        for name in ("time_budget", "input_bound"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise InputError(f"stability setting {name} must be a finite number > 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"certificates": None if self.certificates is None else list(self.certificates),
                "time_budget": self.time_budget, "input_bound": self.input_bound, "cell": self.cell}


@dataclass(frozen=True, eq=False)
class ModelCertificate:
    """What :func:`certify_model` found for one model.

    ``source`` says what was certified: ``"lure form"`` (``certificates`` searched on it, the
    stored one first when it verified; ``spectrum`` its diagnostics), ``"stored evidence"`` (a
    model without a Lur'e form whose stored certificate verified), ``"torch.nn layers"``
    (``layers``: one cascade per stack of recurrent layers) or ``"none"`` (``reason`` says why).
    ``form`` says where a Lur'e form came from and whether it was compared with the module
    (``form_check``): ``given, checked``, ``derived, checked`` or ``given, UNCHECKED`` (its
    certificates then hold for the form, not provably for the module); ``system`` is that form."""

    model: str
    source: str
    stored: EvidenceCheck
    certificates: tuple[CertificateResult, ...] = ()
    layers: tuple[CascadeCertificate, ...] = ()
    spectrum: SpectrumReport | None = None
    reason: str = ""
    form: str = "none"
    form_check: FormCheck | None = None
    system: LureSystem | None = None

    @property
    def form_unchecked(self) -> bool:
        """The certificates are of a Lur'e form that could not be compared with the module."""
        return self.form_check is not None and self.form_check.status == "unchecked"

    @property
    def holds(self) -> bool:
        """Some certificate holds (for ``torch.nn`` layers: on every stack). A weaker test failing
        beside a stronger one that holds (the norm test beside the LMI) is no failure."""
        if self.source == "torch.nn layers":
            return bool(self.layers) and all(c.holds for c in self.layers)
        return any(c.holds for c in self.certificates)

    @property
    def strongest(self) -> CertificateResult | None:
        """The certificate that says most: among those that hold, the discrete ones (a contraction
        factor per input step of the scheme the model runs) before ``ct`` ones (a decay rate of
        the underlying ODE), the smallest factor (the largest decay rate) first."""
        held = [c for c in self.certificates if c.holds and c.rate is not None]
        discrete = [c for c in held if not c.name.startswith("ct-")]
        if discrete:
            return min(discrete, key=lambda c: c.rate)
        return max(held, key=lambda c: c.rate) if held else None

    def verdict(self) -> str:
        """One line: ``certified: NAME, rate R per step (tier T)`` or ``not certified: REASON``."""
        if self.source == "torch.nn layers":
            failing = [c for c in self.layers if not c.holds]
            if not failing:
                return f"certified: every torch.nn recurrent layer ({len(self.layers)} stack(s)); {self.reason}"
            return f"not certified: {failing[0].module or '(root)'} ({failing[0].kind}): {failing[0].reason}"
        best = self.strongest
        if best is not None:
            unit = "per unit time (decay rate of the ODE)" if best.name.startswith("ct-") else "per step"
            form = f", form {self.form}" if self.source == "lure form" else ""
            return f"certified: {best.name}, rate {best.rate:.6g} {unit} (tier {best.tier}){form}"
        lmi = [c for c in self.certificates if c.name.endswith("-lmi")]
        reason = (lmi or list(self.certificates))[-1].reason if self.certificates else self.reason
        # Some reasons (float64 cannot decide, an overflow) already begin with the verdict's words.
        return reason if reason.startswith("not certified: ") else f"not certified: {reason}"

    def rows(self) -> list[dict[str, Any]]:
        """One row per certificate: model, certificate, holds, margin, rate, tier, seconds, reason."""
        if self.source == "none":
            return [{"model": self.model, "certificate": None, "holds": False, "reason": self.reason,
                     "stored_evidence": self.stored.status}]
        if self.source == "torch.nn layers":
            from ..stability.cascade import layer_rows

            return [{"model": self.model, "certificate": row["name"], "holds": bool(row["holds"]), "margin": None,
                     "rate": row["rate"], "tier": None, "seconds": None,
                     "reason": f"{row['module'] or '(root)'} {row['kind']} layer {row['layer']}: {row['reason']}",
                     "stored_evidence": self.stored.status}
                    for row in layer_rows([c.to_dict() for c in self.layers])]
        return [{"model": self.model, "certificate": r.name, "holds": bool(r.holds), "margin": r.margin, "rate": r.rate,
                 "tier": r.tier, "seconds": r.seconds, "reason": r.reason, "stored_evidence": self.stored.status}
                for r in self.certificates]

    def to_dict(self, include_matrices: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {"model": self.model, "source": self.source, "holds": self.holds,
                                "verdict": self.verdict(), "form": self.form,
                                "form_check": None if self.form_check is None else self.form_check.to_dict(),
                                "stored_evidence": self.stored.to_dict()}
        if self.spectrum is not None:
            data["spectrum"] = self.spectrum.to_dict()
        if self.source in ("lure form", "stored evidence"):
            data["certificates"] = [r.to_dict(include_matrices=include_matrices) for r in self.certificates]
        if self.source == "torch.nn layers":
            data["recurrent_layers"] = [c.to_dict() for c in self.layers]
        if self.reason:
            data["reason"] = self.reason
        return data


def certify_model(
    subject: ModelUnderAnalysis | Any,
    certificates: Sequence[str] | None = None,
    *,
    time_budget: float | None = None,
    input_bound: float | None = None,
    input_shape: tuple[int, ...] | None = None,
    cell: str | None = None,
    inputs: Any = None,
    wrap: Callable[[list[str]], Iterable[str]] | None = None,
) -> ModelCertificate:
    """Certify one model: stored evidence, else its Lur'e form, else its ``torch.nn`` recurrent
    layers (see the module docstring). ``subject`` is a :class:`ModelUnderAnalysis`, a toolkit
    model or any ``nn.Module``; ``certificates`` the names to try (default: the scheme's);
    ``input_shape`` the feature shape of one input step (for comparing a form with the module when
    neither the model's sizes nor its ``input_shape`` attribute say it); ``wrap`` wraps the names
    searched (a progress bar); ``cell`` the name of a submodule whose recurrence is certified
    instead of the model's (see :func:`checked_form`); ``inputs`` sample network inputs (batch, time,
    ...) on which the input each ``torch.nn`` LSTM/GRU layer receives is observed and compared with
    the bound its condition assumes (see :func:`~lrnn_analysis.stability.certify_recurrent`)."""
    from ..model_under_analysis import as_model_under_analysis
    from ..models.torchnn import find_recurrent_layers
    from ..stability import certify_recurrent, spectrum
    from ..stability.evidence import check_stored, stored_then_searched

    settings = StabilitySettings(None if certificates is None else tuple(certificates), time_budget, input_bound, cell)
    subject = as_model_under_analysis(subject)
    module = subject.module
    # Evidence stored with a model is of the model's own form, never of a cell inside it.
    stored = check_stored(module, subject.metadata if cell is None else {})
    system, form, check = checked_form(subject, input_shape, cell)
    if system is not None:
        found = stored_then_searched(stored, module, system, settings.certificates, settings.time_budget, wrap=wrap)
        return ModelCertificate(subject.name, "lure form", stored, tuple(found), spectrum=spectrum(system), form=form,
                                form_check=check, system=system)
    if stored.verified:
        return ModelCertificate(subject.name, "stored evidence", stored, tuple(stored_then_searched(stored, module, None)))
    if find_recurrent_layers(module):
        check_layer_forms(module)
        layers = certify_recurrent(module, settings.certificates, input_bound=settings.input_bound, inputs=inputs,
                                   time_budget=settings.time_budget)
        return ModelCertificate(subject.name, "torch.nn layers", stored, layers=tuple(layers), reason=LAYERS_ONLY)
    return ModelCertificate(subject.name, "none", stored, reason=NO_LURE_FORM)


@dataclass(frozen=True, eq=False)
class ModelGain:
    """What :func:`certify_lipschitz` found: the gain certificate and, for a model built to a bound,
    the check of the gain evidence its checkpoint stores (None for other models)."""

    certificate: GainCertificate
    stored: GainEvidenceCheck | None


def certify_lipschitz(subject: ModelUnderAnalysis | Any, horizon: int, *, time_budget: float | None = None) -> ModelGain:
    """A certified Lipschitz bound of the map from the whole input sequence (``horizon`` steps) to
    the outputs (:mod:`lrnn_analysis.stability.gain`). A model built to a bound (``lipschitz-ren``)
    reports its stored gain evidence when it verifies in float64 against the weights, else its
    construction's bound verified from the weights (tier ``construction``); any other toolkit model in
    Lur'e form is searched by :func:`~lrnn_analysis.stability.certify_gain` within ``time_budget``,
    starting also from its stored contraction evidence when that verifies."""
    from ..model_under_analysis import as_model_under_analysis
    from ..stability import certify_gain, sequence_map
    from ..stability.construction_gain import check_stored_gain, construction_gain, has_gain_construction
    from ..stability.evidence import check_stored

    subject = as_model_under_analysis(subject)
    module = subject.module
    if has_gain_construction(module):
        stored = check_stored_gain(module, subject.metadata, horizon)
        if stored.verified and stored.certificate is not None:
            return ModelGain(stored.certificate, stored)
        return ModelGain(construction_gain(module, horizon), stored)
    system, U, D = sequence_map(subject)
    stored_contraction = check_stored(module, subject.metadata)
    return ModelGain(certify_gain(system, U, D, horizon, time_budget=time_budget,
                                  evidence=stored_contraction.evidence if stored_contraction.verified else None), None)


def gain_certificate(subject: ModelUnderAnalysis | Any, horizon: int, time_budget: float | None = None) -> GainCertificate | str:
    """:func:`certify_lipschitz`'s certificate, or why the model has none (no Lur'e form read out
    as D h_T and not built to a bound): what certified accuracy is computed from."""
    try:
        return certify_lipschitz(subject, horizon, time_budget=time_budget).certificate
    except InputError as error:
        return str(error)


def checked_form(subject: ModelUnderAnalysis, input_shape: tuple[int, ...] | None = None,
                 cell: str | None = None) -> tuple[LureSystem | None, str, FormCheck | None]:
    """The Lur'e form to certify, where it came from, and its comparison with the module.

    A form the model gives (its loader's, its ``lure_form()``, or the one passed to
    :class:`ModelUnderAnalysis`) is run beside the module (:func:`~lrnn_analysis.stability.check_form`,
    in the module's coordinates ``coordinates()`` when it declares them): a form that computes
    something else raises :class:`InputError` naming the largest error and its step; one that
    cannot be compared is returned marked ``UNCHECKED``. Without a form, a module with a
    ``step(h, x)`` method (and ``state_shapes`` / ``input_shape`` attributes, the feature shapes of
    its state and input, when they are not an RNN cell's own) gets its form derived from that step
    (:func:`~lrnn_analysis.stability.derive_lure_form`) and checked the same way. ``cell`` names a
    submodule (``module.get_submodule(cell)``: an ``nn.RNNCell``-like cell or a module with a step)
    whose form is derived and checked instead: the certificate is then of that cell's recurrence,
    not of what the rest of the model does with its states."""
    from ..stability import check_form, derive_lure_form

    module = subject.module
    if cell is not None:
        try:
            part = module.get_submodule(cell)
        except AttributeError:
            names = [name for name, _ in module.named_modules() if name]
            raise InputError(f"{subject.name}: no submodule {cell!r}; its submodules are {names[:20]}") from None
        derived = derive_lure_form(part, getattr(part, "state_shapes", None), getattr(part, "input_shape", None))
        check = check_form(part, derived)
        if not check.passed:
            raise InputError(f"{subject.name}: the Lur'e form derived from {cell} does not reproduce it: {check.reason}")
        return derived.system, f"derived from the cell {cell}, checked (the rest of the model is not certified)", check
    system = subject.lure_system()
    x = (getattr(module, "input_shape", None) or input_shape
         or ((subject.input_dim,) if subject.input_dim is not None else None))
    if system is not None:
        coordinates_of = getattr(module, "coordinates", None)
        coordinates = coordinates_of() if callable(coordinates_of) else None
        check = check_form(module, system, x=x, coordinates=coordinates)
        if check.status == "refused":
            raise InputError(f"{subject.name}: the Lur'e form does not describe the module: {check.reason}; "
                             "no certificate is issued for it")
        return system, "given, checked" if check.passed else f"given, UNCHECKED ({check.reason})", check
    if not callable(getattr(module, "step", None)):
        return None, "none", None
    state = getattr(module, "state_shapes", None)
    derived = derive_lure_form(module, state, x)
    check = check_form(module, derived)
    if not check.passed:
        raise InputError(f"{subject.name}: the Lur'e form derived from its step does not reproduce it: {check.reason}")
    notes = "; ".join(derived.notes)
    return derived.system, "derived, checked" + (f" ({notes})" if notes else ""), check


def check_layer_forms(module: Any) -> None:
    """Run the Lur'e map of every ``nn.RNN`` layer inside ``module`` (the toolkit's reading of its
    weights, :func:`~lrnn_analysis.models.torchnn.rnn_lure_forms`) beside the layer itself: a form
    that computes something else is an error, never certified. LSTM and GRU layers have no Lur'e
    form: their conditions read the gates' weights directly."""
    from torch import nn

    from ..models.torchnn import SequenceClassifier, find_recurrent_layers, rnn_lure_forms
    from ..stability import check_form

    for found in find_recurrent_layers(module):
        name, layer = found.name, found.module
        if not isinstance(layer, nn.RNN):
            continue
        stack = SequenceClassifier(layer, nn.Identity())
        for index, form in enumerate(rnn_lure_forms(layer)):
            check = check_form(stack, form, x=(layer.input_size,), layer=index)
            if check.status == "refused":
                raise InputError(f"{name or '(root)'} layer {index}: its Lur'e form does not reproduce the layer: "
                                 f"{check.reason}")


@dataclass(frozen=True, eq=False)
class StabilityResult:
    """The certificates of every model, in the order given, and the settings they were found with."""

    models: tuple[ModelCertificate, ...]
    settings: StabilitySettings

    def rows(self) -> list[dict[str, Any]]:
        """One row per (model, certificate): holds, margin, rate, tier, seconds, reason, stored_evidence."""
        return [row for model in self.models for row in model.rows()]

    def to_dict(self, include_matrices: bool = False) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "models": [m.to_dict(include_matrices) for m in self.models]}


def run(subjects: Sequence[ModelUnderAnalysis] | ModelUnderAnalysis, data: Any = None,
        settings: StabilitySettings = StabilitySettings(), *,
        wrap: Callable[[list[str]], Iterable[str]] | None = None) -> StabilityResult:
    """Certify every model of ``subjects`` with ``settings``. Certificates hold for every input
    sequence: ``data`` (a task, or None) tells the input size the forms are checked with (none
    for token ids), and its first ``SAMPLE_INPUTS`` training inputs show the range each LSTM/GRU
    layer's input reaches (the embedded tokens, for a model that embeds them); data that do not fit a
    model's known sizes are an ``InputError``. The readout — one
    output per sequence or per step — plays no part: certificates concern the recurrence."""
    from ..model_under_analysis import ModelUnderAnalysis

    if isinstance(subjects, ModelUnderAnalysis):
        subjects = [subjects]
    from ..task import Task

    if isinstance(data, Task):
        for subject in subjects:  # data of another model's sizes would check its form at the wrong input size
            if subject.input_dim is not None and subject.output_dim is not None:
                data.check_fits(subject.input_dim, subject.output_dim, subject.name)
    shape = (data.input_dim,) if isinstance(data, Task) and data.input_kind == "float" else None
    inputs = data.train.x[:SAMPLE_INPUTS] if isinstance(data, Task) and len(data.train) else None
    found = tuple(certify_model(s, settings.certificates, time_budget=settings.time_budget,
                                input_bound=settings.input_bound, input_shape=shape, cell=settings.cell, inputs=inputs,
                                wrap=wrap)
                  for s in subjects)
    return StabilityResult(found, settings)


def certified_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per model from :meth:`StabilityResult.rows` (with ``test_accuracy``, ``parameters``):
    its best (smallest) certified rate and the certificate that gives it, or certified False."""
    summary: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = summary.setdefault(row["model"], {"model": row["model"], "test_accuracy": row.get("test_accuracy"),
                                                  "parameters": row.get("parameters"), "certified": False,
                                                  "rate": None, "certificate": None, "tier": None})
        if row["holds"] and row.get("rate") is not None and (entry["rate"] is None or row["rate"] < entry["rate"]):
            entry.update(certified=True, rate=row["rate"], certificate=row["certificate"], tier=row["tier"])
    return list(summary.values())


@dataclass(frozen=True, eq=False)
class LipschitzBound:
    """A model's certified Lipschitz bound (``certificate``), the check of the gain evidence its
    checkpoint stores (``stored``, for a model built to a bound) and, when measured, the bound beside
    its empirical lower bounds (``tightness``)."""

    certificate: GainCertificate
    stored: GainEvidenceCheck | None = None
    tightness: BoundTightness | None = None

    def to_dict(self, include_matrices: bool = False) -> dict[str, Any]:
        return {**self.certificate.to_dict(include_matrices),
                "tightness": None if self.tightness is None else self.tightness.to_dict()}


def lipschitz_bound(subject: ModelUnderAnalysis | Any, horizon: int, *, time_budget: float | None = None,
                    data: Task | None = None, label: str | None = None) -> LipschitzBound:
    """The certified incremental l2-gain of ``subject``'s sequence map over ``horizon`` input steps
    (:func:`certify_lipschitz`); with a classification
    task ``data`` of that length, the bound beside its empirical lower bounds on the first
    :data:`TIGHTNESS_SAMPLES` test inputs: the largest input-Jacobian norm of the logit map and the
    largest ||dz|| / ||dx|| the l2 PGD attack reaches at radius :data:`TIGHTNESS_RADIUS`
    (:data:`TIGHTNESS_STEPS` steps). Raises :class:`InputError` for a model without a Lur'e form
    read out as D h_T that is not built to a bound."""
    from ..model_under_analysis import as_model_under_analysis
    from ..robustness.attack import PgdSettings, pgd_l2
    from ..robustness.certified import bound_tightness

    subject = as_model_under_analysis(subject)
    found = certify_lipschitz(subject, horizon, time_budget=time_budget)
    one_label = data is not None and data.is_classification and data.test.y.ndim == 1
    if data is None or not one_label or data.seq_len != horizon or not len(data.test) or not found.certificate.holds:
        return LipschitzBound(found.certificate, found.stored)
    x, y = data.test.x[:TIGHTNESS_SAMPLES], data.test.y[:TIGHTNESS_SAMPLES]
    attack = pgd_l2(subject.module, x, y, TIGHTNESS_RADIUS, PgdSettings(steps=TIGHTNESS_STEPS, box=data.input_range))
    tightness = bound_tightness(label or subject.name, "", subject.module, x, found.certificate, float(attack.ratio.max()))
    return LipschitzBound(found.certificate, found.stored, tightness)
