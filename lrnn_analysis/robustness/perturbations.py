"""Perturbations of inputs and parameters: each a (kind, level, seed) applied to copies.

Noise for a given seed is the same at every level (common random numbers), so curves
over the level are smooth and level 0 is the unperturbed input or parameters exactly.
All draws come from a CPU ``torch.Generator`` seeded with ``seed``, then move to the
data's device, so results do not depend on the device.

Input kinds (x has shape (N, T, d); for token ids (N, T) only ``gaussian``, added to the output
of the model's one ``nn.Embedding``, :func:`embedding_noise`):

* ``gaussian``      x + level * xi,  xi ~ N(0, 1) i.i.d. over sample, time and channel;
* ``salt-pepper``   each value independently replaced with probability ``level`` by the
                    task's data minimum or maximum (half each);
* ``occlusion``     round(level * T) time steps per sample, chosen at random, set to zero;
* ``fgsm``          x + level * sign(grad_x loss(model(x), y)), the worst-case companion
                    (deterministic: the seed is ignored).

Parameter kinds (applied to a name -> tensor mapping):

* ``gaussian-relative``  theta <- theta + level * rms(theta) * xi per tensor,
                         rms(theta) = sqrt(mean(theta^2)), xi ~ N(0, 1) i.i.d.;
* ``hessian-direction``  theta <- theta + level * v, v a unit vector in the span of the given
                         Hessian eigenvectors: v = sum_i c_i v_i with c uniform on the unit
                         sphere of R^k drawn from the seed. With k = 1 nothing is random:
                         v = v_1 with the sign that makes its largest-magnitude entry positive
                         (an eigenvector's sign is arbitrary), the seed is ignored and the
                         sweep evaluates it once (:func:`is_deterministic`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..choices import INPUT_KINDS, KINDS, PARAMETER_KINDS, perturbation_kind, perturbation_level  # noqa: F401 (re-exported)
from ..errors import InputError

__all__ = ["DETERMINISTIC_KINDS", "ParameterDirections", "Perturbation", "embedding_noise", "is_deterministic", "perturb_inputs",
           "perturb_parameters", "token_input_embedding"]

DETERMINISTIC_KINDS = ("fgsm",)



@dataclass(frozen=True)
class Perturbation:
    kind: str
    level: float
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", perturbation_kind(self.kind))
        object.__setattr__(self, "level", perturbation_level(self.kind, self.level))

    @property
    def target(self) -> str:
        return "input" if self.kind in INPUT_KINDS else "parameter"

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def to_dict(self) -> dict:
        return {**asdict(self), "target": self.target}


@dataclass(frozen=True)
class ParameterDirections:
    """Unit directions in the space of the named parameters, flattened in ``names`` order: (k, P)."""

    names: tuple[str, ...]
    vectors: Tensor

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] < 1:
            raise InputError(f"directions must have shape (k, P) with k >= 1, got {tuple(self.vectors.shape)}")


def is_deterministic(kind: str, directions: ParameterDirections | None = None) -> bool:
    """Whether every seed gives the same perturbation of this kind (fgsm; a Hessian direction
    along one eigenvector): such a perturbation is evaluated once, not once per seed."""
    return kind in DETERMINISTIC_KINDS or (kind == "hessian-direction" and directions is not None
                                           and directions.vectors.shape[0] == 1)


def perturb_inputs(
    x: Tensor,
    perturbation: Perturbation,
    data_range: tuple[float, float],
    gradient: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """A perturbed copy of x (N, T, d). ``gradient(x)`` returns d loss / d x (needed by fgsm)."""
    level, kind = perturbation.level, perturbation.kind
    if kind == "fgsm":
        if gradient is None:
            raise InputError("fgsm needs the loss gradient with respect to the inputs")
        return x + level * torch.sign(gradient(x))
    gen = perturbation.generator()
    if kind == "gaussian":
        return x + level * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    if kind == "salt-pepper":
        flip = torch.rand(x.shape, generator=gen).to(x.device) < level
        salt = torch.rand(x.shape, generator=gen).to(x.device) < 0.5
        low, high = data_range
        return torch.where(flip, torch.where(salt, torch.full_like(x, high), torch.full_like(x, low)), x)
    if kind == "occlusion":
        n, steps = x.shape[0], x.shape[1]
        count = round(level * steps)
        ranks = torch.rand((n, steps), generator=gen).argsort(dim=1).argsort(dim=1).to(x.device)
        return x.masked_fill((ranks < count).unsqueeze(-1), 0.0)
    raise InputError(f"{kind} is not an input perturbation")


def token_input_embedding(model: nn.Module, name: str) -> nn.Embedding:
    """The one ``nn.Embedding`` of ``model``, whose output is the network's input when it is fed
    token ids; an ``InputError`` naming ``name`` when it has none or several (which of them embeds
    the inputs is then not known, and input noise is not defined)."""
    found = [module_name for module_name, module in model.named_modules() if isinstance(module, nn.Embedding)]
    if len(found) != 1:
        raise InputError(f"{name}: gaussian input noise on token ids is added to the output of the model's nn.Embedding; "
                         + ("the model has none" if not found else f"the model has {len(found)} ({', '.join(found)}), "
                            "and which one embeds the inputs is not known"))
    embedding = model.get_submodule(found[0])
    assert isinstance(embedding, nn.Embedding)  # found above as one
    return embedding


@contextlib.contextmanager
def embedding_noise(embedding: nn.Embedding, perturbation: Perturbation) -> Iterator[None]:
    """While inside, the output e (B, T, E) of ``embedding`` is e + level * xi, xi ~ N(0, 1) i.i.d.
    over sample, step and channel, drawn from the seed batch after batch in the order the
    batches are embedded (the same samples in the same batches get the same noise)."""
    generator = perturbation.generator()

    def add_noise(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        xi = torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output.device, output.dtype)
        return output + perturbation.level * xi

    handle = embedding.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


def perturb_parameters(
    params: Mapping[str, Tensor],
    perturbation: Perturbation,
    names: Sequence[str] | None = None,
    directions: ParameterDirections | None = None,
) -> dict[str, Tensor]:
    """New tensors for the parameters (the inputs are not modified).

    ``names`` restricts ``gaussian-relative`` to those parameters (default: all);
    ``hessian-direction`` perturbs exactly the parameters its ``directions`` cover.
    """
    out = dict(params)
    gen = perturbation.generator()
    if perturbation.kind == "gaussian-relative":
        chosen = sorted(params) if names is None else list(names)
        if not chosen:
            raise InputError("no parameters to perturb: the selection is empty")
        unknown = [n for n in chosen if n not in params]
        if unknown:
            raise InputError(f"no parameters named {unknown}; the model has {sorted(params)}")
        for name in chosen:
            theta = params[name]
            rms = theta.detach().pow(2).mean().sqrt()
            xi = torch.randn(theta.shape, generator=gen).to(theta.device, theta.dtype)
            out[name] = theta + perturbation.level * rms * xi
        return out
    if perturbation.kind == "hessian-direction":
        if directions is None:
            raise InputError("hessian-direction needs Hessian eigenvectors (directions)")
        vectors = directions.vectors.detach().cpu().double()
        if len(vectors) == 1:
            v = vectors[0] * torch.sign(vectors[0][vectors[0].abs().argmax()])
        else:
            coefficients = torch.randn(len(vectors), generator=gen, dtype=torch.float64)
            v = coefficients @ vectors
        v /= v.norm()
        offset = 0
        for name in directions.names:
            if name not in params:
                raise InputError(f"direction covers unknown parameter {name!r}")
            theta = params[name]
            size = theta.numel()
            out[name] = theta + perturbation.level * v[offset:offset + size].view(theta.shape).to(theta.device, theta.dtype)
            offset += size
        if offset != directions.vectors.shape[1]:
            raise InputError(f"directions have {directions.vectors.shape[1]} entries but the named parameters have {offset}")
        return out
    raise InputError(f"{perturbation.kind} is not a parameter perturbation")
