"""Training loop: Adam with step learning-rate decay, optional gradient clipping,
per-epoch validation and the spectral abscissa of the recurrent matrices."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .constraints import StabilityConstraint, check_feasible, project
from .errors import InputError
from .evaluation import Evaluation, evaluate
from .models import RecurrentModel
from .progress import progress_bar
from .stability.spectra import mu2, norm2, spectral_abscissa
from .task import Task

__all__ = ["TrainResult", "TrainSettings", "TrainedModel", "lipschitz_margin_logits", "spectral_summary", "train_and_certify",
    "train_model", "training_metadata"]


def lipschitz_margin_logits(logits: torch.Tensor, targets: torch.Tensor, pair_lipschitz: torch.Tensor,
                            radius: float) -> torch.Tensor:
    """logits with radius * K[y, j] added to every non-target logit j (K: bounds on the Lipschitz
    constants of y_i - y_j, e.g. :meth:`~lrnn_analysis.models.LipschitzREN.pair_lipschitz`).

    Cross-entropy on these is the Lipschitz-margin loss: its minimiser pushes the margin
    y_t - y_j above K[t, j] * radius, the margin at which the prediction is certified at ``radius``
    (a perturbation of l2 norm radius moves y_t - y_j by at most K[t, j] * radius)."""
    shift = radius * pair_lipschitz[targets]
    shift = shift.scatter(1, targets[:, None], 0.0)
    return logits + shift


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser settings. The learning rate is multiplied by ``lr_decay`` after each epoch in
    ``decay_epochs`` (default: once, after 75% of the epochs). ``margin_radius`` > 0 (delta_0)
    trains a model with per-pair Lipschitz bounds (``pair_lipschitz()``, ``lipschitz-ren``) on the
    Lipschitz-margin loss (:func:`lipschitz_margin_logits`) for certified robustness at that radius."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.03
    lr_decay: float = 0.1
    decay_epochs: tuple[int, ...] | None = None
    weight_decay: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    margin_radius: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not (self.lr > 0 and 0 < self.lr_decay <= 1 and self.weight_decay >= 0):
            raise InputError("need lr > 0, 0 < lr_decay <= 1 and weight_decay >= 0")
        if not (math.isfinite(self.margin_radius) and self.margin_radius >= 0):
            raise InputError(f"margin_radius must be a finite number >= 0, got {self.margin_radius}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InputError(f"grad_clip must be > 0, got {self.grad_clip}")
        decay = (max(1, round(0.75 * self.epochs)),) if self.decay_epochs is None else self.decay_epochs
        object.__setattr__(self, "decay_epochs", tuple(sorted(int(e) for e in decay)))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["decay_epochs"] = list(self.decay_epochs)
        return data


@dataclass(frozen=True)
class TrainResult:
    metrics: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "log": list(self.log)}


def spectral_summary(model: RecurrentModel) -> dict[str, float]:
    """For each recurrent matrix X (A, W): alpha_X = max Re lambda(X), mu2_X = lambda_max((X + X^T)/2)
    and norm_X = ||X||_2, in float64 (the reference driver logged only alpha)."""
    with torch.no_grad():
        mats = model.recurrent_matrices(torch.float64)
    summary = {}
    for name, matrix in mats.items():
        X = matrix.cpu().numpy()
        summary[f"alpha_{name}"] = spectral_abscissa(X)
        summary[f"mu2_{name}"] = mu2(X)
        summary[f"norm_{name}"] = norm2(X)
    return summary


def train_model(
    model: RecurrentModel,
    task: Task,
    settings: TrainSettings,
    device: torch.device,
    progress: bool = True,
    constraint: StabilityConstraint | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``task.train`` with the task's loss (per token, over the unmasked
    steps, for per-step targets); validate each epoch; test at the end (the metrics of
    :func:`_split_metrics`).

    With a ``constraint`` the recurrent parameters are projected after every optimizer
    step (and once before training) so that its norm certificate holds with its margin.
    A model whose ``regularization()`` returns a tensor has it added to the loss that is
    minimised (``train_loss`` in the log is the data loss alone).
    """
    if len(task.val) == 0:
        raise InputError(f"task {task.name} has no validation split, and training validates every epoch (give x_val, y_val)")
    task.check_fits(model.config.input_dim, model.config.output_dim, f"the {model.config.arch} model")
    readout = "all" if task.objective.per_step else "last"
    if model.config.readout != readout:
        targets = "a target at every step" if readout == "all" else "one target per sequence"
        raise InputError(f"task {task.name} has {targets}: train a model with readout {readout!r} (lrnn train --readout {readout}), "
                         f"not {model.config.readout!r}")
    torch.manual_seed(settings.seed)
    model.to(device)
    if constraint is not None:
        check_feasible(model, constraint)
        projection = project(model, constraint)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    objective = task.objective
    criterion = objective.loss_fn()
    margin = settings.margin_radius > 0
    if margin and not (task.is_classification and not task.per_step and callable(getattr(model, "pair_lipschitz", None))):
        raise InputError(f"margin_radius needs a classification task with one label per sequence and a model with per-pair Lipschitz bounds "
                         f"(lipschitz-ren), got task {task.name} and a {model.config.arch} model")
    x_train, y_train = task.train.x.to(device), task.train.y.to(device)
    order_rng = torch.Generator().manual_seed(settings.seed)
    log: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = progress_bar(range(1, settings.epochs + 1), desc=f"train {model.config.arch}", unit="epoch", enabled=progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=order_rng).to(device)
        total, scored = 0.0, 0
        smallest_scale = 1.0
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            outputs = model(x_train[idx])
            if margin:
                outputs = lipschitz_margin_logits(outputs, y_train[idx], model.pair_lipschitz(), settings.margin_radius)
            loss = criterion(outputs, y_train[idx])
            if not torch.isfinite(loss):
                # Adam would carry the NaN into every weight, and the model saved would be garbage.
                raise InputError(f"training diverged: the loss is {float(loss.detach())} in epoch {epoch} "
                                 "(a smaller lr or margin_radius, or grad_clip, may help)")
            penalty = model.regularization()
            optimizer.zero_grad(set_to_none=True)
            (loss if penalty is None else loss + penalty).backward()
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            if constraint is not None:
                projection = project(model, constraint)
                smallest_scale = min(smallest_scale, projection.scale)
            count = objective.count(y_train[idx])
            total += float(loss.detach()) * count
            scored += count
        val = evaluate(model, task.val.x, task.val.y, objective,
                       name=f"the {model.config.arch} model after epoch {epoch} (validation)")
        entry = {
            "epoch": epoch,
            "train_loss": total / scored,
            **_split_metrics("val", val),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
            **spectral_summary(model),
        }
        if constraint is not None:
            entry["constraint_value"] = projection.value
            entry["constraint_smallest_scale"] = smallest_scale
        log.append(entry)
        bar.set_postfix(loss=f"{entry['train_loss']:.3f}", val_acc="-" if val.accuracy is None else f"{val.accuracy:.3f}")
        if epoch in settings.decay_epochs:
            for group in optimizer.param_groups:
                group["lr"] *= settings.lr_decay
    seconds = time.perf_counter() - started
    trained = f"the trained {model.config.arch} model"
    test = evaluate(model, task.test.x, task.test.y, objective, name=f"{trained} (test)")
    # The last epoch's validation is of the model returned (nothing changes it after): not run again.
    metrics = {
        **_split_metrics("test", test),
        **_split_metrics("val", val),
        "train_seconds": seconds,
        "epochs": settings.epochs,
    }
    return TrainResult(metrics, log)


def _split_metrics(split: str, evaluation: Evaluation) -> dict[str, float | None]:
    """``{split}_loss``, ``{split}_accuracy`` (per token where per step; None for regression) and,
    per step, ``{split}_perplexity`` and ``{split}_bits_per_token`` (or ``{split}_mse``)."""
    extra = {key: value for key, value in evaluation.metrics.items() if key not in ("loss", "accuracy", "token_accuracy")}
    if not evaluation.objective.per_step:
        extra = {}
    return {f"{split}_loss": evaluation.loss, f"{split}_accuracy": evaluation.accuracy,
            **{f"{split}_{key}": value for key, value in extra.items()}}


def training_metadata(task: Task, settings: TrainSettings, result: TrainResult, device: torch.device) -> dict[str, Any]:
    """What a trained checkpoint records besides its config: task and split seed, the
    fingerprint of the training split (the leakage guard of lrnn_analysis.training_split),
    settings, metrics, the per-epoch log, versions and device."""
    from .environment import environment
    from .training_split import split_fingerprint

    return {
        "task": task.to_dict(),
        "train_fingerprint": split_fingerprint(task.train),
        "training": settings.to_dict(),
        "metrics": dict(result.metrics),
        "log": list(result.log),
        "environment": environment(device),
    }


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """A trained model, the metadata its checkpoint records, the training result, the
    ``--constrain`` certificate's outcome (a dict, or None) and a line on its stored evidence."""

    model: RecurrentModel
    metadata: dict[str, Any]
    result: TrainResult
    constraint_certificate: dict[str, Any] | None
    evidence_line: str | None


def train_and_certify(config: Any, task: Task, settings: TrainSettings, device: torch.device, *,
                      constraint: Any = None, progress: bool = False) -> TrainedModel:
    """Build the model of ``config`` (seeded by ``settings.seed``), train it on ``task``, and
    record what its checkpoint carries: training metadata; with a ``constraint``
    (:class:`~lrnn_analysis.constraints.StabilityConstraint`) the outcome of its certificate; and,
    for a constrained, contracting or REN model, certificate evidence verified in float64 (or the
    reason none is stored)."""
    from .models import build_model

    model = build_model(config, seed=settings.seed)
    result = train_model(model, task, settings, device, progress=progress, constraint=constraint)
    metadata = training_metadata(task, settings, result, device)
    constrained = None
    if constraint is not None:
        from .stability import certify

        outcome = certify(model.lure_form(), [constraint.certificate])[0]
        constrained = outcome.to_dict(include_matrices=False)
        metadata["constraint"] = {**constraint.to_dict(), "certificate_result": constrained}
    evidence_line = None
    if constraint is not None or config.arch in ("contracting", "ren", "lipschitz-ren"):
        from .stability.evidence import METADATA_KEY, certify_trained

        evidence, evidence_line = certify_trained(model)
        if evidence is not None:
            metadata[METADATA_KEY] = evidence.to_dict()
    if config.arch == "lipschitz-ren":
        evidence_line = "\n".join(line for line in (evidence_line, _store_gain_evidence(model, task, metadata)) if line)
    return TrainedModel(model, metadata, result, constrained, evidence_line)


def _store_gain_evidence(model: RecurrentModel, task: Task, metadata: dict[str, Any]) -> str:
    """Store the float64-verified gain evidence of a model built to a bound; one line saying what was stored."""
    from .stability.construction_gain import GAIN_EVIDENCE_KEY, StoredGain, construction_gain

    certificate = construction_gain(model, task.seq_len)
    if not certificate.holds:
        return f"gain evidence NOT stored: {certificate.reason}"
    metadata[GAIN_EVIDENCE_KEY] = StoredGain.of(certificate, model).to_dict()
    return (f"gain evidence stored: Lipschitz bound {certificate.lipschitz:.6g} of the whole input sequence -> outputs "
            f"(built to {model.config.lipschitz:g}; tier {certificate.tier}, every horizon)")
