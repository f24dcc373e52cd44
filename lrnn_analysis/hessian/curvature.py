"""Curvature matrices of the form Jᵀ M J: generalized Gauss–Newton, Monte-Carlo Fisher, empirical Fisher.

For per-sample outputs f_i = f(x_i; θ) ∈ R^K (logits for cross-entropy) with Jacobian
J_i = ∂f_i/∂θ (K×P), per-sample losses ℓ_i and mean-reduced batch losses ℓ_b = (1/n_b) Σ_{i∈b} ℓ_i,
each operator here is

    C = Σ_b (n_b/N) (1/n_b) Σ_{i∈b} J_iᵀ M_i J_i = (1/N) Σ_i J_iᵀ M_i J_i,

the same sample weighting as ``HessianOperator``, with a symmetric positive semi-definite K×K M_i:

- GGN: M_i = ∇²_f ℓ_i — cross-entropy: diag(p_i) − p_i p_iᵀ with p_i = softmax(f_i); MSE
  (ℓ_i = ‖f_i − y_i‖²/K, ``nn.MSELoss`` averages over the K outputs too): (2/K) I.
- Monte-Carlo Fisher: M_i = (1/S) Σ_s r_is r_isᵀ with r_is = ∇_f ℓ(f_i, ŷ_is) for S = ``mc_samples``
  labels drawn (seeded, once, at construction) from the model's predictive distribution:
  cross-entropy ŷ ~ Categorical(p_i), r = p_i − e_ŷ; MSE ŷ = f_i + √(K/2)·ε, ε ~ N(0, I) (the
  Gaussian whose negative log-likelihood is ℓ_i up to a constant), r = (2/K)(f_i − ŷ).
  E[r rᵀ] equals the GGN's M_i in both cases, so E[Fisher] = GGN.
- Empirical Fisher: M_i = r_i r_iᵀ with r_i = ∇_f ℓ(f_i, y_i) at the true labels, so that
  C = (1/N) Σ_i g_i g_iᵀ with g_i = J_iᵀ r_i = ∇_θ ℓ_i, the per-sample gradients.

Per-step outputs (B, T, K) against per-step targets (int64 (B, T), float (B, T, k)) — the
per-token cross-entropy and per-step MSE of :class:`~lrnn_analysis.objective.Objective` — are
flattened to the (M, K) outputs of their M scored (unmasked) steps: every sum above then runs
over scored tokens i = (sequence, step), N is the number of scored tokens of all batches, and
the GGN's M_i = diag(p_i) − p_i p_iᵀ is the output Hessian of one token's loss.

Products C v = (1/N) Σ_i J_iᵀ M_i (J_i v). J v comes from the double-backward trick: for a
cotangent u, Jᵀu = ∂⟨f, u⟩/∂θ is linear in u, and J v = ∂⟨Jᵀu, v⟩/∂u; Jᵀ w is one backward pass.
The forward graph and the Jᵀu graph of each batch are built once and reused (while they fit the
memory budget), so a product costs three backward passes and no forward pass.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ..choices import CURVATURE_OPERATORS
from ..errors import InputError
from ..objective import Objective, StepMSELoss
from .operator import DEFAULT_MEMORY_BUDGET, Batch, CurvatureOperator, HessianOperator, LossFunction, ParamSpec, _SavedBytes

__all__ = ["EmpiricalFisherOperator", "FisherOperator", "GGNOperator", "JacobianSandwichOperator", "OPERATOR_KINDS",
    "curvature_operator"]


def _loss_kind(loss_fn: LossFunction) -> str:
    """``"cross_entropy"`` or ``"mse"`` for the losses whose output Hessian is known exactly.

    Only ``nn.CrossEntropyLoss`` (mean reduction, no class weights, no label smoothing, class
    index targets; per-token with :class:`~lrnn_analysis.objective.TokenCrossEntropyLoss`),
    ``nn.MSELoss`` (mean reduction) and :class:`~lrnn_analysis.objective.StepMSELoss` qualify;
    anything else is an error rather than a guess.
    """
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.reduction != "mean" or loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise InputError("the GGN/Fisher operators support nn.CrossEntropyLoss only with reduction='mean', "
                             "no class weights and no label smoothing")
        return "cross_entropy"
    if isinstance(loss_fn, nn.MSELoss):
        if loss_fn.reduction != "mean":
            raise InputError("the GGN/Fisher operators support nn.MSELoss only with reduction='mean'")
        return "mse"
    if isinstance(loss_fn, StepMSELoss):
        return "mse"
    raise InputError(f"the GGN/Fisher operators need nn.CrossEntropyLoss or nn.MSELoss, got {type(loss_fn).__name__}")


def _output_hessian(kind: str, f: Tensor) -> Tensor:
    """∇²_f ℓ_i per sample, shape (n, K, K): diag(p) − ppᵀ (cross-entropy) or (2/K) I (MSE)."""
    n, K = f.shape
    if kind == "cross_entropy":
        p = torch.softmax(f, dim=1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return (2.0 / K) * torch.eye(K, dtype=f.dtype, device=f.device).expand(n, K, K)


def _output_gradient(kind: str, f: Tensor, y: Tensor) -> Tensor:
    """∇_f ℓ_i(f_i, y_i) per sample, shape (n, K): p − e_y (cross-entropy) or (2/K)(f − y) (MSE)."""
    if kind == "cross_entropy":
        return torch.softmax(f, dim=1) - nn.functional.one_hot(y.long(), f.shape[1]).to(f.dtype)
    return (2.0 / f.shape[1]) * (f - y)


def _sample_targets(kind: str, f: Tensor, mc_samples: int, generator: torch.Generator) -> Tensor:
    """``mc_samples`` labels per sample from the model's predictive distribution, shape (S, n[, K])."""
    if kind == "cross_entropy":
        p = torch.softmax(f.double(), dim=1).cpu()
        return torch.multinomial(p, mc_samples, replacement=True, generator=generator).T.to(f.device)
    noise = torch.randn((mc_samples, *f.shape), generator=generator, dtype=torch.float64).to(device=f.device, dtype=f.dtype)
    return f[None] + (f.shape[1] / 2.0) ** 0.5 * noise


class _Linearization:
    """One batch's forward graph f(θ) of its scored outputs (M, K), their targets ``y``, and the
    graph of Jᵀu, for J v and Jᵀ w products."""

    def __init__(self, f: Tensor, y: Tensor, leaves: list[Tensor]) -> None:
        self.f, self.y = f, y
        self.u = torch.zeros_like(f, requires_grad=True)
        # allow_unused: None for a leaf f does not depend on
        self.vjp_graph: Sequence[Tensor | None] = torch.autograd.grad(f, leaves, grad_outputs=self.u, create_graph=True, allow_unused=True)
        self.leaves = leaves

    def jvp(self, chunks: list[Tensor]) -> Tensor:
        pairs = [(g, c) for g, c in zip(self.vjp_graph, chunks) if g is not None and g.requires_grad]
        if not pairs:
            return torch.zeros_like(self.f)
        outputs, grad_outputs = zip(*pairs)
        (jv,) = torch.autograd.grad(outputs, self.u, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.f) if jv is None else jv

    def vjp(self, w: Tensor) -> list[Tensor]:
        grads = torch.autograd.grad(self.f, self.leaves, grad_outputs=w, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, self.leaves)]


class JacobianSandwichOperator(CurvatureOperator):
    """C = (1/N) Σ_i J_iᵀ M_i J_i for the per-sample (per-token) K×K matrices of ``_output_matrices``
    (see the module docstring; ``CurvatureOperator`` for data, params, dtype, eval mode).

    ``_loss_kind`` is ``"cross_entropy"`` or ``"mse"`` (from the loss function). The model's
    output must have shape (n, K), or (n, T, K) with per-step targets. Selected parameters the output does not depend on have zero
    rows and columns and are named in ``no_grad_params``. ``cache_graph``/``memory_budget`` as
    for ``HessianOperator`` (the cached graphs are the forward graph and the Jᵀu graph).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Batch | Iterable[Batch],
        params: ParamSpec = None,
        dtype: torch.dtype | str | None = None,
        *,
        cache_graph: bool | None = None,
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
        rnn_twin: str = "auto",
        progress: bool = False,
    ) -> None:
        self.loss_kind = _loss_kind(loss_fn)
        super().__init__(model, loss_fn, data, params, dtype, rnn_twin=rnn_twin, progress=progress)
        self._has_grad: set[int] = set()
        self.matrices: list[Tensor] = []
        self.graph_bytes: int | None = None
        self._linearizations: list[_Linearization] | None = []
        for index, batch in enumerate(self.batches):
            counter = _SavedBytes()
            # Only the first batch's graph is measured: hooks left on cached graphs would run at every product.
            hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack) if index == 0 else nullcontext()
            with hooks:
                linearization = self._linearize(batch)
            self.matrices.append(self._output_matrices(index, linearization.f.detach(), linearization.y) / self.n_scored)
            if index == 0:
                self.graph_bytes = int(counter.bytes * self.n_samples / len(batch[0]))
                if cache_graph is False or (cache_graph is None and self.graph_bytes > memory_budget):
                    self._linearizations = None
            if self._linearizations is not None:
                self._linearizations.append(linearization)
        self.graph_cached = self._linearizations is not None
        self.no_grad_params = tuple(name for i, name in enumerate(self.names) if i not in self._has_grad)

    def _linearize(self, batch: Batch) -> _Linearization:
        x, y = self._inputs(batch)
        f = self._forward(x)
        if (y.dtype == torch.int64 and y.ndim == 2) or (y.is_floating_point() and y.ndim == 3):
            objective = Objective.of_targets(y)
            if objective.classification != (self.loss_kind == "cross_entropy"):
                raise InputError(f"{objective.name} targets for a {self.loss_kind} loss")
            objective.check_outputs(f, y, "the GGN/Fisher operators")
            f, y = objective.flatten(f, y)
        elif f.ndim != 2 or len(f) != len(x):
            raise InputError(f"the GGN/Fisher operators need model outputs of shape (n, K) or (n, T, K) with per-step "
                             f"targets, got {tuple(f.shape)}")
        if self.loss_kind == "cross_entropy":
            if y.dtype not in (torch.int64, torch.int32) or y.shape != (len(f),):
                raise InputError("cross-entropy GGN/Fisher needs integer class targets of shape (n,) or (n, T)")
            if isinstance(self.loss_fn, nn.CrossEntropyLoss) and bool((y == self.loss_fn.ignore_index).any()):
                raise InputError(f"targets equal to ignore_index {self.loss_fn.ignore_index} are not supported")
        elif y.shape != f.shape:
            raise InputError(f"MSE targets of shape {tuple(y.shape)} for outputs of shape {tuple(f.shape)}")
        if not f.requires_grad:
            return _NoLinearization(f, y, self._leaves)
        linearization = _Linearization(f, y, self._leaves)
        self._has_grad.update(i for i, g in enumerate(linearization.vjp_graph) if g is not None)
        return linearization

    def _output_matrices(self, batch_index: int, f: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply(self, chunks: list[Tensor]) -> list[Tensor]:
        result = [torch.zeros_like(leaf) for leaf in self._leaves]
        for index, batch in enumerate(self.batches):
            linearization = self._linearize(batch) if self._linearizations is None else self._linearizations[index]
            jv = linearization.jvp(chunks)
            w = torch.einsum("nij,nj->ni", self.matrices[index], jv)
            for acc, part in zip(result, linearization.vjp(w)):
                acc.add_(part)
        return result

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "_loss_kind": self.loss_kind, "graph_cached": self.graph_cached,
                "graph_bytes_estimate": self.graph_bytes, "no_grad_params": list(self.no_grad_params)}


class _NoLinearization(_Linearization):
    """An output that depends on none of the selected parameters: J = 0."""

    def __init__(self, f: Tensor, y: Tensor, leaves: list[Tensor]) -> None:
        self.f, self.y, self.leaves, self.vjp_graph = f, y, leaves, [None] * len(leaves)

    def vjp(self, w: Tensor) -> list[Tensor]:
        return [torch.zeros_like(leaf) for leaf in self.leaves]


class GGNOperator(JacobianSandwichOperator):
    """The generalized Gauss–Newton matrix G = (1/N) Σ_i J_iᵀ ∇²_f ℓ_i J_i (exact; see the module docstring)."""

    kind = "ggn"

    def _output_matrices(self, batch_index: int, f: Tensor, y: Tensor) -> Tensor:
        return _output_hessian(self.loss_kind, f)


class EmpiricalFisherOperator(JacobianSandwichOperator):
    """The empirical Fisher (1/N) Σ_i ∇_θℓ_i ∇_θℓ_iᵀ at the true labels (see the module docstring)."""

    kind = "ef"

    def _output_matrices(self, batch_index: int, f: Tensor, y: Tensor) -> Tensor:
        r = _output_gradient(self.loss_kind, f, y)
        return r[:, :, None] * r[:, None, :]


class FisherOperator(JacobianSandwichOperator):
    """The Monte-Carlo Fisher (1/N) Σ_i (1/S) Σ_s g_is g_isᵀ, g_is = ∇_θ ℓ(f_i, ŷ_is), ŷ_is sampled from
    the model's predictive distribution (``mc_samples`` = S per sample, drawn once from ``seed``;
    see the module docstring). Its expectation over the draws is the GGN. ``sampled_targets[b]``
    holds batch b's labels, shape (S, n_b[, K]).
    """

    kind = "fisher"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Batch | Iterable[Batch],
        params: ParamSpec = None,
        dtype: torch.dtype | str | None = None,
        *,
        mc_samples: int = 1,
        seed: int = 0,
        cache_graph: bool | None = None,
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
        rnn_twin: str = "auto",
        progress: bool = False,
    ) -> None:
        if mc_samples < 1:
            raise InputError(f"mc_samples must be >= 1, got {mc_samples}")
        self.mc_samples = mc_samples
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self.sampled_targets: list[Tensor] = []
        super().__init__(model, loss_fn, data, params, dtype, cache_graph=cache_graph, memory_budget=memory_budget,
                         rnn_twin=rnn_twin, progress=progress)

    def _output_matrices(self, batch_index: int, f: Tensor, y: Tensor) -> Tensor:
        targets = _sample_targets(self.loss_kind, f, self.mc_samples, self._generator)
        self.sampled_targets.append(targets)
        r = torch.stack([_output_gradient(self.loss_kind, f, t) for t in targets])
        return torch.einsum("sni,snj->nij", r, r) / self.mc_samples

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mc_samples": self.mc_samples, "seed": self.seed}


OPERATOR_KINDS = CURVATURE_OPERATORS


def curvature_operator(
    kind: str,
    model: nn.Module,
    loss_fn: LossFunction,
    data: Batch | Iterable[Batch],
    params: ParamSpec = None,
    dtype: torch.dtype | str | None = None,
    *,
    mc_samples: int = 1,
    seed: int = 0,
    cache_graph: bool | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    rnn_twin: str = "auto",
    progress: bool = False,
) -> CurvatureOperator:
    """The operator of ``kind`` (one of ``OPERATOR_KINDS``); ``mc_samples`` and ``seed`` are the Fisher's,
    ``rnn_twin`` as for ``CurvatureOperator``."""
    shared: dict[str, Any] = {"cache_graph": cache_graph, "memory_budget": memory_budget, "rnn_twin": rnn_twin, "progress": progress}
    if kind == "hessian":
        return HessianOperator(model, loss_fn, data, params, dtype, **shared)
    if kind == "ggn":
        return GGNOperator(model, loss_fn, data, params, dtype, **shared)
    if kind == "fisher":
        return FisherOperator(model, loss_fn, data, params, dtype, mc_samples=mc_samples, seed=seed, **shared)
    if kind == "ef":
        return EmpiricalFisherOperator(model, loss_fn, data, params, dtype, **shared)
    raise InputError(f"operator must be one of {OPERATOR_KINDS}, got {kind!r}")
