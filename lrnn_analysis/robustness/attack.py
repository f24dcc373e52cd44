"""An l2 PGD attack on the whole input sequence: the empirical side of certified accuracy.

For a sample (x, y) with x of shape (T, d) and a radius delta, the attack searches the ball
||x' - x||_2 <= delta (l2 over time and features together, the norm of the gain certificate)
for an x' the model misclassifies, by projected gradient ascent on the **margin loss**

    l(x') = max_{j != y} z_j(x') - z_y(x')       (z the logits; x' is misclassified when l > 0).

The margin loss is used rather than cross-entropy because it is the quantity a certificate
bounds (a pair margin moves by at most pair_bounds[y, j] * delta) and it does not saturate on
confidently classified samples. Each restart starts from a point drawn uniformly in the ball
(a Gaussian direction scaled by delta * U^(1/D), D = T d), then takes ``steps`` steps

    x' <- x + Pi(x' - x + alpha * g / ||g||_2),   g = grad l(x'),

with Pi the projection onto the ball (rescaling to norm delta) followed, when the inputs are
bounded, by the projection of x + (x' - x) onto the input box [low, high] (clamping; for an x
outside the box, onto the box widened to contain x, so x itself is never moved). Clamping
toward x shrinks every coordinate of the perturbation, so the result stays in the ball: every
candidate is a valid perturbation of norm <= delta (the composition is not the exact projection
onto the intersection of ball and box, only a feasible point of it). The default step size
is alpha = 2.5 delta / steps. A sample counts as broken when any iterate of any restart
misclassifies it, confirmed on a float64 copy of the model (the precision certified accuracy is
computed in); the attack accuracy at delta is the fraction never broken (clean
misclassifications count as broken). All randomness comes from a CPU generator seeded with ``seed``.

The attack also records, per sample, the largest ratio ||z(x') - z(x)||_2 / ||x' - x||_2 over
its iterates: an empirical lower bound on the Lipschitz constant of the logit map, re-evaluated
in float64 on the perturbation that attained it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import InputError

__all__ = ["AttackResult", "PgdSettings", "pgd_l2"]


@dataclass(frozen=True)
class PgdSettings:
    """``steps`` gradient steps per restart, ``restarts`` random starts, step size ``step_size``
    as a multiple of the radius (None: 2.5 / steps), ``seed`` of the random starts, ``box`` the
    input box (low, high) projected onto, or None for unbounded inputs."""

    steps: int = 50
    restarts: int = 1
    step_size: float | None = None
    seed: int = 0
    box: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for name, value, least in (("steps", self.steps, 1), ("restarts", self.restarts, 1), ("seed", self.seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"attack {name} must be an integer >= {least}, got {value!r}")
        if self.step_size is not None and (isinstance(self.step_size, bool) or not isinstance(self.step_size, (int, float))
                                           or not math.isfinite(self.step_size) or self.step_size <= 0):
            raise InputError(f"attack step_size must be a finite number > 0 (a multiple of the radius), got {self.step_size!r}")
        if self.box is not None:
            low, high = self.box
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise InputError(f"attack box must be finite (low, high) with low < high, got {self.box!r}")
            object.__setattr__(self, "box", (float(low), float(high)))

    @property
    def relative_step(self) -> float:
        """The step size alpha / delta."""
        return self.step_size if self.step_size is not None else 2.5 / self.steps

    def to_dict(self) -> dict[str, object]:
        return {"attack": "pgd", "norm": "l2 over time and features", "loss": "margin (max_j!=y z_j - z_y)",
                "steps": self.steps, "restarts": self.restarts, "step_size": self.relative_step,
                "step_size_unit": "multiple of the radius", "seed": self.seed,
                "box": None if self.box is None else list(self.box)}


@dataclass(frozen=True)
class AttackResult:
    """Per sample: ``robust`` (False where the clean input or the attack's adversarial input is
    misclassified, both checked in float64), ``ratio`` (the largest ||dz|| / ||dx|| the iterates
    reached, recomputed in float64) and ``perturbation`` (the first iterate that misclassified the
    sample, else its last one)."""

    radius: float
    robust: Tensor
    ratio: Tensor
    perturbation: Tensor

    @property
    def accuracy(self) -> float:
        return float(self.robust.double().mean())


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} z_j - z_y per sample (> 0: misclassified; a tie counts as not misclassified)."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], -torch.inf)
    return others.max(dim=1).values - true


def _norms(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (v.ndim - 1)))


def into_box(x: Tensor, moved: Tensor, box: tuple[float, float]) -> Tensor:
    """``moved`` clamped, coordinate by coordinate, to the box [low, high] widened to contain ``x``:
    toward x, so |moved - x| only shrinks, even for an x outside the box (a test input beyond the
    training range) whose own coordinates the box would otherwise move by more than the radius."""
    low, high = box
    return torch.maximum(torch.minimum(moved, torch.clamp(x, min=high)), torch.clamp(x, max=low))


def _project(x: Tensor, delta: Tensor, radius: float, box: tuple[float, float] | None) -> Tensor:
    """Onto the l2 ball of ``radius`` (rescaling), then x + delta onto the box (clamping, see :func:`into_box`)."""
    delta = delta * torch.clamp(radius / _norms(delta), max=1.0)
    if box is not None:
        delta = into_box(x, x + delta, box) - x
    return delta


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, radius: float, settings: PgdSettings = PgdSettings(), *,
           batch_size: int = 1000) -> AttackResult:
    """Attack every sample of (x, y) at l2 ``radius`` (module docstring). The search runs the model
    in its own dtype; what it finds is confirmed on a float64 copy of the model: a sample counts as
    broken only when its adversarial input (or its clean input) is misclassified in float64, the
    precision certified accuracy is computed in, and the ratio is recomputed there."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
        raise InputError(f"attack radius must be a finite number >= 0, got {radius!r}")
    if x.ndim < 2 or len(x) != len(y) or len(x) == 0:
        raise InputError(f"the attack needs a non-empty batch x (N, T, ...) and labels y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    generator = torch.Generator().manual_seed(settings.seed)
    was_training = model.training
    model.eval()
    found: list[tuple[Tensor, Tensor]] = []
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device, dtype)
            yb = y[start:start + batch_size].to(device)
            found.append(_attack_batch(model, xb, yb, float(radius), settings, generator))
    finally:
        model.train(was_training)
    breaker, best = torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])
    twin = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        robust, ratio = [], []
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device, torch.float64)
            yb = y[start:start + batch_size].to(device)
            clean = twin(xb)
            attacked = twin(xb + breaker[start:start + batch_size].to(device, torch.float64))
            robust.append(((_margin(clean, yb) <= 0) & (_margin(attacked, yb) <= 0)).cpu())
            pb = best[start:start + batch_size].to(device, torch.float64)
            moved = (twin(xb + pb) - clean).flatten(1).norm(dim=1)
            norms = pb.flatten(1).norm(dim=1)
            ratio.append(torch.where(norms > 0, moved / norms.clamp_min(1e-300), torch.zeros_like(norms)).cpu())
    return AttackResult(float(radius), torch.cat(robust), torch.cat(ratio), breaker)


def _attack_batch(model: nn.Module, x: Tensor, y: Tensor, radius: float, settings: PgdSettings,
                  generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(the first iterate that misclassified each sample, else its last one; the iterate with the
    largest ||dz|| / ||dx||) for one batch, in the model's dtype."""
    with torch.no_grad():
        clean = model(x)
    if clean.ndim != 2:
        raise InputError(f"the attack needs one row of logits per sequence, (N, classes); the model returns "
                         f"{tuple(clean.shape)} (a model reading out every step?)")
    unbroken = torch.ones(len(x), dtype=torch.bool, device=x.device)
    best_ratio = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    breaker, best = torch.zeros_like(x), torch.zeros_like(x)
    if radius == 0:
        return breaker.cpu(), best.cpu()
    alpha = settings.relative_step * radius
    size = x[0].numel()
    shape = (-1,) + (1,) * (x.ndim - 1)
    for _ in range(settings.restarts):
        direction = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device, x.dtype)
        scale = radius * torch.rand(len(x), generator=generator, dtype=torch.float64) ** (1.0 / size)
        delta = _project(x, direction / _norms(direction) * scale.to(x.device, x.dtype).view(shape), radius, settings.box)
        for step in range(settings.steps + 1):
            last = step == settings.steps
            delta = delta.detach().requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                logits = model(x + delta)
                margin = _margin(logits, y)
            with torch.no_grad():
                current = delta.detach()
                broken = unbroken & ((margin > 0) | ~torch.isfinite(margin))  # a non-finite output is kept for the float64 check
                breaker[broken | unbroken] = current[broken | unbroken]
                unbroken &= ~broken
                moved = (logits - clean).flatten(1).norm(dim=1).double()
                ratio = moved / current.flatten(1).norm(dim=1).double().clamp_min(1e-300)
                better = ratio > best_ratio
                best_ratio = torch.where(better, ratio, best_ratio)
                best[better] = current[better]
            if last:
                break
            (gradient,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                delta = _project(x, delta + alpha * gradient / _norms(gradient), radius, settings.box)
    return breaker.cpu(), best.cpu()
