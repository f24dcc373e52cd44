"""Certified accuracy beside the l2 PGD attack and random noise, and how tight the bound is.

For a model with a Lur'e form read out as z = D h_T (+ c), :func:`sequence_bound` certifies an
incremental l2-gain of the whole sequence map (:func:`~lrnn_analysis.stability.certify_gain`,
verified in float64, at the horizon T of the inputs): |(z_i - z_j)(x) - (z_i - z_j)(x')| <=
pair_bounds[i, j] ||x - x'||_2 for all input sequences. A test sample (x, y) is **certified at
radius delta** when it is classified correctly and its logit margin over every other class j
exceeds pair_bounds[y, j] * delta (:func:`~lrnn_analysis.stability.certified_radii`; logits in
float64): then no input within l2 distance delta of x changes the prediction.

Per radius, :func:`certified_robustness` reports three accuracies on the same samples:

* ``certified_accuracy``: the fraction certified (None, "no bound", for a model without a Lur'e
  form or whose bound did not verify: never 0 in its place);
* ``attack_accuracy``: the fraction the l2 PGD attack (:mod:`.attack`) does not break;
* ``noise_accuracy``: the mean over seeds of the accuracy under Gaussian noise rescaled to l2
  norm exactly delta per sequence (x + delta xi / ||xi||, xi ~ N(0, I) over time and features),
  clamped to the input box when there is one (toward x, which only shortens it).

A certified sample can be broken by neither, so certified <= attack and certified <= noise hold
sample by sample; a violation is a bug of the bound or of the attack and raises
:class:`BoundViolation`, it is never reported as a number.

Tightness (:class:`BoundTightness`): beside the bound L, two empirical lower bounds on the
Lipschitz constant of the logit map x -> z: the largest spectral norm of its input Jacobian
max_x ||dz/dx (x)||_2 over the samples (the Jacobian in float64, k backward passes), and the
largest ||z(x') - z(x)|| / ||x' - x|| the attack reached. looseness = L / max(both) >= 1; for the
pairs, pair_looseness = min over (i, j) of pair_bounds[i, j] / max_x ||grad (z_i - z_j)(x)||,
the pair bound closest to its own gradient lower bound. A lower bound above the bound raises
:class:`BoundViolation`.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from ..statistics import t_halfwidth
from .attack import PgdSettings, into_box, pgd_l2

if TYPE_CHECKING:
    from ..model_under_analysis import ModelUnderAnalysis
    from ..stability.gain import GainCertificate

__all__ = ["CERTIFIED_FIELDS", "DEFAULT_ATTACK", "BoundTightness", "BoundViolation", "CertifiedRobustness", "bound_tightness", "certified_robustness",
           "input_jacobian_bounds", "l2_noise", "sequence_bound"]

CERTIFIED_FIELDS = ("model", "checkpoint", "radius", "n", "clean_accuracy", "certified_accuracy", "attack_accuracy",
                    "noise_accuracy", "noise_accuracy_ci95", "lipschitz")
DEFAULT_ATTACK = PgdSettings()
# Relative slack of the comparisons of a float64 lower bound with a bound (rounding of the forward pass).
_RELATIVE_SLACK = 1e-6


class BoundViolation(RuntimeError):
    """A certified sample was broken, or an empirical lower bound exceeds the certified bound: the
    bound or the attack is wrong (a bug, never a result)."""


@dataclass(frozen=True, eq=False)
class BoundTightness:
    """One model's certified bound beside its empirical lower bounds (module docstring).

    ``holds`` False: no verified bound (``reason`` says why; the bound columns are None)."""

    model: str
    checkpoint: str
    holds: bool
    lipschitz: float | None
    gradient_lower_bound: float
    attack_lower_bound: float | None
    looseness: float | None
    pair_looseness: float | None
    horizon: int
    samples: int
    reason: str
    certificate: GainCertificate | None = None

    def to_dict(self) -> dict[str, Any]:
        """The flat summary (the whole certificate: ``certificate.to_dict()``)."""
        c = self.certificate
        return {"model": self.model, "checkpoint": self.checkpoint, "holds": self.holds, "lipschitz": self.lipschitz,
                "gradient_lower_bound": self.gradient_lower_bound, "attack_lower_bound": self.attack_lower_bound,
                "looseness": self.looseness, "pair_looseness": self.pair_looseness, "horizon": self.horizon,
                "samples": self.samples, "rho": None if c is None else c.rho, "mu": None if c is None else c.mu,
                "tier": None if c is None else c.tier, "seconds": None if c is None else c.seconds, "reason": self.reason}


@dataclass(frozen=True, eq=False)
class CertifiedRobustness:
    """``rows``: one per (model, radius) with :data:`CERTIFIED_FIELDS`; ``bounds``: one
    :class:`BoundTightness` per model; ``settings``: radii, attack, noise seeds, samples."""

    rows: list[dict[str, Any]]
    bounds: tuple[BoundTightness, ...]
    settings: dict[str, Any]

    def bound_rows(self) -> list[dict[str, Any]]:
        return [b.to_dict() for b in self.bounds]

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "bounds": self.bound_rows(), "settings": self.settings}


def sequence_bound(subject: ModelUnderAnalysis, horizon: int, time_budget: float | None = None) -> GainCertificate | str:
    """The gain certificate of ``subject``'s sequence map over ``horizon`` steps (its stored
    contraction evidence, when it verifies, as a starting point), or why there is none: toolkit
    models in Lur'e form, and models built to a bound (``lipschitz-ren``) from their stored gain
    evidence when it verifies, else from their construction (as
    :func:`~lrnn_analysis.pipelines.stability.gain_certificate`, which the pipelines pass); never
    from the Lur'e form of such a model, whose T need not be well conditioned."""
    from ..stability.construction_gain import check_stored_gain, construction_gain, has_gain_construction
    from ..stability.evidence import check_stored
    from ..stability.gain import certify_gain, sequence_map

    if has_gain_construction(subject.module):
        stored_gain = check_stored_gain(subject.module, subject.metadata, horizon)
        if stored_gain.verified and stored_gain.certificate is not None:
            return stored_gain.certificate
        return construction_gain(subject.module, horizon)
    try:
        system, U, D = sequence_map(subject)
    except InputError as error:
        return str(error)
    stored = check_stored(subject.module, subject.metadata)
    return certify_gain(system, U, D, horizon, evidence=stored.evidence if stored.verified else None,
                        time_budget=time_budget)


def _float64(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double().eval()


def input_jacobian_bounds(module: nn.Module, x: Tensor, batch_size: int = 500) -> tuple[float, np.ndarray]:
    """(max over samples of ||dz/dx||_2, the k x k maxima over samples of ||grad (z_i - z_j)||_2):
    the input Jacobian of the logit map in float64 (one backward pass per output), x flattened
    over time and features."""
    twin = _float64(module)
    device = next(twin.parameters()).device
    largest, pairs = 0.0, None
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device, torch.float64).requires_grad_(True)
        z = twin(xb)
        if z.ndim != 2:
            raise InputError(f"the input Jacobian of the logit map needs one row of logits per sequence, (N, classes); "
                             f"the model returns {tuple(z.shape)} (a model reading out every step?)")
        k = z.shape[1]
        J = torch.stack([torch.autograd.grad(z[:, i].sum(), xb, retain_graph=i < k - 1)[0].flatten(1)
                         for i in range(k)], dim=1)  # (N, k, T d)
        largest = max(largest, float(torch.linalg.matrix_norm(J, 2).max()))
        diffs = (J[:, :, None, :] - J[:, None, :, :]).norm(dim=3).amax(dim=0).cpu().numpy()
        pairs = diffs if pairs is None else np.maximum(pairs, diffs)
    assert pairs is not None  # x is non-empty
    return largest, pairs


def l2_noise(x: Tensor, radius: float, seed: int, box: tuple[float, float] | None) -> Tensor:
    """x + radius * xi / ||xi||_2 per sequence, xi ~ N(0, I) from a CPU generator seeded ``seed``,
    clamped to ``box`` when given (widened to contain x: the noise never exceeds the radius)."""
    xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    xi = xi / xi.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, *([1] * (x.ndim - 1)))
    noisy = x.double() + radius * xi.to(x.device)
    return into_box(x.double(), noisy, box) if box is not None else noisy


def _predict64(twin: nn.Module, x: Tensor, label: str, batch_size: int = 1000) -> Tensor:
    """The float64 logits of ``x``; ``InputError`` naming the model ``label`` if any is not finite
    (no accuracy is taken from the argmax of NaN)."""
    from ..evaluation import NonFiniteOutputs

    device = next(twin.parameters()).device
    with torch.no_grad():
        logits = torch.cat([twin(x[s:s + batch_size].to(device, torch.float64)).cpu() for s in range(0, len(x), batch_size)])
    counts = NonFiniteOutputs()
    counts.add(logits)
    counts.check(label, len(x))
    return logits


def certified_robustness(
    models: Sequence[Any],
    x: Tensor,
    y: Tensor,
    radii: Sequence[float],
    attack: PgdSettings | None = DEFAULT_ATTACK,
    *,
    bound: Callable[[ModelUnderAnalysis, int, float | None], GainCertificate | str] | None = sequence_bound,
    noise_seeds: int = 5,
    time_budget: float | None = None,
    batch_size: int = 1000,
) -> CertifiedRobustness:
    """Certified, attack and noise accuracy at every radius of ``radii`` for every model (a
    :class:`~lrnn_analysis.robustness.SweepModel`, or anything :func:`~lrnn_analysis.robustness.sweep_models`
    takes) on the classification samples (x, y), and each model's bound beside its empirical lower
    bounds. ``bound(model, horizon, time_budget)`` gives each model's gain certificate, or why it has
    none (default :func:`sequence_bound`); None skips the certificates (``certified_accuracy`` None,
    no bounds);
    ``attack`` None skips the attack (``attack_accuracy`` None); ``noise_seeds`` 0 skips the noise.
    ``time_budget``: seconds for each model's gain certificate (None: no limit)."""
    from ..stability.gain import certified_radii
    from .sweep import sweep_models

    radii = [float(r) for r in radii]
    if not radii or any(not math.isfinite(r) or r < 0 for r in radii) or len(set(radii)) != len(radii):
        raise InputError(f"radii must be distinct finite numbers >= 0, got {radii}")
    if x.ndim < 2 or len(x) == 0 or len(x) != len(y) or y.is_floating_point() or y.ndim != 1:
        raise InputError("certified accuracy needs classification samples with one label per sequence: x (N, T, ...) "
                         "and integer labels y (N,)")
    if isinstance(noise_seeds, bool) or not isinstance(noise_seeds, int) or noise_seeds < 0:
        raise InputError(f"noise_seeds must be an integer >= 0, got {noise_seeds!r}")
    box = attack.box if attack is not None else None
    rows: list[dict[str, Any]] = []
    bounds: list[BoundTightness] = []
    for entry in sweep_models(models):
        subject, label = entry.model, entry.label
        twin = _float64(subject.module)
        logits = _predict64(twin, x, label)
        if logits.shape != (len(x), logits.shape[-1]):
            raise InputError(f"{label}: certified accuracy needs one row of logits per sequence, (N, classes); the model "
                             f"returns {tuple(logits.shape)} (a model reading out every step?)")
        correct = (logits.argmax(dim=1) == y.cpu()).numpy()
        certificate = bound(subject, int(x.shape[1]), time_budget) if bound is not None else "not asked for"
        gain = certificate if not isinstance(certificate, str) and certificate.pair_bounds is not None else None
        cert_radii = None if gain is None or gain.pair_bounds is None else certified_radii(logits, gain.pair_bounds)
        ratios: list[float] = []
        for radius in radii:
            certified = None if cert_radii is None else correct & (cert_radii > radius)
            attacked = None
            if attack is not None:
                found = pgd_l2(subject.module, x, y, radius, attack, batch_size=batch_size)
                attacked = found.robust.numpy()
                ratios.append(float(found.ratio.max()))
            noise = []
            for seed in range(noise_seeds):
                noisy = _predict64(twin, l2_noise(x, radius, seed, box), label)
                robust = (noisy.argmax(dim=1) == y.cpu()).numpy()
                noise.append(float(robust.mean()))
                _check_certified(label, radius, certified, robust, f"Gaussian noise of l2 norm {radius:g} (seed {seed})")
            _check_certified(label, radius, certified, attacked, "the l2 PGD attack")
            rows.append({"model": label, "checkpoint": entry.checkpoint, "radius": radius, "n": len(x),
                         "clean_accuracy": float(correct.mean()),
                         "certified_accuracy": None if certified is None else float(certified.mean()),
                         "attack_accuracy": None if attacked is None else float(attacked.mean()),
                         "noise_accuracy": float(np.mean(noise)) if noise else None,
                         "noise_accuracy_ci95": (t_halfwidth(np.array(noise)) if len(noise) > 1 and len(set(noise)) > 1
                                                 else 0.0) if noise else None,
                         "lipschitz": None if gain is None else gain.lipschitz})
        if bound is not None:
            bounds.append(bound_tightness(label, entry.checkpoint, subject.module, x, certificate,
                                          max(ratios) if ratios else None))
    settings = {"radii": radii, "certified": bound is not None, "samples": len(x), "horizon": int(x.shape[1]), "noise_seeds": noise_seeds,
                "noise": "Gaussian, rescaled to l2 norm = radius per sequence" + (", clamped to the box" if box else ""),
                "attack": None if attack is None else attack.to_dict(), "certificate_time_budget": time_budget}
    return CertifiedRobustness(rows, tuple(bounds), settings)


def _check_certified(label: str, radius: float, certified: np.ndarray | None, robust: np.ndarray | None, by: str) -> None:
    """Every certified sample must survive ``by``; else the bound or the attack is wrong."""
    if certified is None or robust is None:
        return
    broken = np.flatnonzero(certified & ~robust)
    if broken.size:
        raise BoundViolation(f"{label}: {broken.size} sample(s) certified at radius {radius:g} were misclassified under "
                             f"{by} (first: sample {broken[0]}): the gain certificate or the attack is wrong")


def bound_tightness(label: str, checkpoint: str, module: nn.Module, x: Tensor, certificate: GainCertificate | str,
                    attack_ratio: float | None = None) -> BoundTightness:
    """``certificate`` (or why there is none) beside the empirical lower bounds of ``module`` on
    the inputs ``x`` (its input-Jacobian norms, and ``attack_ratio``, the largest ||dz|| / ||dx|| an
    attack reached); raises :class:`BoundViolation` when one exceeds the bound."""
    gradient, pairs = input_jacobian_bounds(module, x)
    horizon = int(x.shape[1])
    if isinstance(certificate, str) or not certificate.holds or certificate.lipschitz is None \
            or certificate.pair_bounds is None:
        reason = certificate if isinstance(certificate, str) else certificate.reason
        return BoundTightness(label, checkpoint, False, None, gradient, attack_ratio, None, None, horizon,
                              len(x), reason, None if isinstance(certificate, str) else certificate)
    bound = float(certificate.lipschitz)
    lower = max(gradient, attack_ratio or 0.0)
    if lower > bound * (1 + _RELATIVE_SLACK):
        raise BoundViolation(f"{label}: an empirical lower bound {lower:.6g} exceeds the certified Lipschitz bound "
                             f"{bound:.6g}: the gain certificate is wrong")
    pair_bounds = np.asarray(certificate.pair_bounds, dtype=np.float64)
    off = ~np.eye(len(pair_bounds), dtype=bool)
    if np.any(pairs[off] > pair_bounds[off] * (1 + _RELATIVE_SLACK)):
        i, j = np.argwhere(off & (pairs > pair_bounds * (1 + _RELATIVE_SLACK)))[0]
        raise BoundViolation(f"{label}: the margin z_{i} - z_{j} has input gradient norm {pairs[i, j]:.6g} above its "
                             f"certified bound {pair_bounds[i, j]:.6g}: the gain certificate is wrong")
    positive = off & (pairs > 0)
    pair_looseness = float(np.min(pair_bounds[positive] / pairs[positive])) if positive.any() else None
    return BoundTightness(label, checkpoint, True, bound, gradient, attack_ratio,
                          bound / lower if lower > 0 else None, pair_looseness, horizon, len(x), certificate.reason,
                          certificate)
