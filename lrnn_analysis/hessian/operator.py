"""The loss Hessian with respect to (a subset of) a model's parameters as a linear operator.

For parameters θ ∈ R^P, batches (x_b, y_b) of n_b samples (N = Σ n_b) and a mean-reduced loss
ℓ_b(θ) = loss_fn(model_θ(x_b), y_b), the operator is

    H = Σ_b (n_b / N) ∇²ℓ_b(θ),

the Hessian of the sample-weighted mean loss over all batches (a mean over batches would
over-weight a short last batch). Products H v are double-backward Hessian-vector products,
Hv = ∂/∂θ ⟨∇ℓ(θ), v⟩, evaluated at a frozen copy of θ.
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

Batch = tuple[Tensor, Tensor]
LossFunction = Callable[[Tensor, Tensor], Tensor]
ParamSpec = str | Sequence[str] | None

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
MAX_DENSE_DIM = 20_000


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``torch.float32``/``torch.float64`` from a torch dtype, ``"float32"``/``"float64"`` or None (``default``)."""
    if dtype is None:
        return default
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return dtype


def select_parameters(model: nn.Module, params: ParamSpec = None) -> list[str]:
    """Names of the parameters ``params`` selects, in the model's order.

    ``params`` is None (every parameter with ``requires_grad``), a list of names or glob
    patterns (``"M_*"``, ``"D.*"``), or one string of them separated by commas
    (``"M_A,M_W"``). A pattern that matches nothing is an error.
    """
    names = [name for name, _ in model.named_parameters()]
    if params is None:
        return [name for name, p in model.named_parameters() if p.requires_grad]
    patterns = [part.strip() for part in params.split(",")] if isinstance(params, str) else list(params)
    patterns = [p for p in patterns if p]
    if not patterns:
        raise ValueError("no parameters selected: empty parameter list")
    chosen = set()
    for pattern in patterns:
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"parameter pattern {pattern!r} matches none of {names}")
        chosen.update(matched)
    return [name for name in names if name in chosen]


def as_batches(data: Batch | Iterable[Batch]) -> list[Batch]:
    """One ``(x, y)`` batch or an iterable of them, as a list (so every pass sees the same order)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        batches = [tuple(data)]
    else:
        batches = [tuple(batch) for batch in data]
    if not batches:
        raise ValueError("no data: expected an (x, y) batch or a non-empty iterable of them")
    for batch in batches:
        if len(batch) != 2 or not all(isinstance(t, Tensor) for t in batch):
            raise ValueError("every batch must be a pair (x, y) of tensors")
        if len(batch[0]) == 0 or len(batch[0]) != len(batch[1]):
            raise ValueError(f"batch with {len(batch[0])} inputs and {len(batch[1])} targets")
    return batches


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode and restore its own train/eval flags afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _SavedBytes:
    """Bytes of distinct storages that autograd saves for backward: the graph's memory."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: Tensor) -> Tensor:
        return tensor


class HessianOperator(LinearOperator):
    """Symmetric P×P operator v ↦ H v of the loss Hessian (scipy ``LinearOperator``).

    ``data`` is one ``(x, y)`` batch or an iterable of batches (materialised once, so the
    operator is the same matrix for every product); the Hessian of several batches is their
    sample-weighted mean. ``params`` selects a block (names or globs, see
    ``select_parameters``); parameters outside it are held fixed.

    The operator works on its own detached copy of the parameters in ``dtype`` (default: the
    model's), runs the model in eval mode and restores its mode, and never touches ``.grad``
    or the caller's tensors. Selected parameters that the loss does not depend on (unused in
    the forward pass) have zero rows and columns; their names are in ``no_grad_params``.

    Graph reuse: the gradient graph of every batch (``create_graph=True``) is built once and
    each product is one extra backward pass through it (``retain_graph=True``), when the
    graph fits ``memory_budget`` bytes (measured on the first batch from the tensors autograd
    saves, extrapolated by sample count). Otherwise each product recomputes forward, backward
    and double backward batch by batch. ``cache_graph`` True/False overrides the choice.

    ``matvec``/``matmat`` take and return numpy arrays (scipy convention, in the operator's
    numpy ``dtype``); ``hvp`` takes and returns flat torch tensors on the model's device.
    ``model`` may be a :class:`~lrnn_analysis.subject.ModelUnderAnalysis` (its module is used;
    ``params=model.recurrent_names()`` selects its recurrent block).
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
        progress: bool = False,
    ) -> None:
        from ..subject import as_module

        model = as_module(model)
        self.model = model
        self.loss_fn = loss_fn
        self.names = tuple(select_parameters(model, params))
        named = dict(model.named_parameters())
        reference = named[self.names[0]] if self.names else next(model.parameters())
        self.torch_dtype = resolve_dtype(dtype, reference.dtype if reference.is_floating_point() else torch.float32)
        self.device = reference.device
        self.shapes = tuple(named[name].shape for name in self.names)
        self.numels = tuple(int(np.prod(shape)) for shape in self.shapes)
        dim = sum(self.numels)
        if dim == 0:
            raise ValueError("the selected parameters have no entries")
        super().__init__(dtype=np.dtype(str(self.torch_dtype).removeprefix("torch.")), shape=(dim, dim))

        self._leaves = [named[name].detach().to(self.torch_dtype).clone().requires_grad_(True) for name in self.names]
        self._constants = {name: self._cast(tensor.detach()) for name, tensor in
                           [*model.named_parameters(), *model.named_buffers()] if name not in self.names}
        self.batches = as_batches(data)
        self.n_samples = sum(len(x) for x, _ in self.batches)
        self.weights = tuple(len(x) / self.n_samples for x, _ in self.batches)
        self.matvecs = 0
        self.graph_bytes: int | None = None
        self._progress = progress
        self._active: set[int] = set()
        self._grads = self._build_graph(cache_graph, memory_budget)
        self.graph_cached = self._grads is not None
        self.no_grad_params = tuple(name for i, name in enumerate(self.names) if i not in self._active)

    @property
    def dim(self) -> int:
        return self.shape[0]

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def _cast(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.torch_dtype) if tensor.is_floating_point() else tensor

    def _batch_gradient(self, batch: Batch) -> list[Tensor | None]:
        """∇ℓ_b at the frozen parameters, with its graph (create_graph=True); None where unused."""
        x, y = (self._cast(t.to(self.device)) for t in batch)
        state = {**self._constants, **dict(zip(self.names, self._leaves))}
        with eval_mode(self.model):
            loss = self.loss_fn(functional_call(self.model, state, (x,)), y)
        grads = torch.autograd.grad(loss, self._leaves, create_graph=True, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None and g.requires_grad:
                self._active.add(i)
        return list(grads)

    def _build_graph(self, cache_graph: bool | None, memory_budget: float) -> list[Tensor | None] | None:
        """Σ_b w_b ∇ℓ_b with its graph when it is to be cached, else None (after finding the active parameters)."""
        if cache_graph is False:
            for batch in self.batches:
                self._batch_gradient(batch)
            return None
        counter = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            first = self._batch_gradient(self.batches[0])
        self.graph_bytes = int(counter.bytes * self.n_samples / len(self.batches[0][0]))
        if cache_graph is None and self.graph_bytes > memory_budget:
            del first
            for batch in self.batches[1:]:
                self._batch_gradient(batch)
            return None
        total: list[Tensor | None] = [None if g is None else self.weights[0] * g for g in first]
        rest = zip(self.weights[1:], self.batches[1:])
        for weight, batch in tqdm(rest, total=len(self.batches) - 1, desc="hessian graph", disable=not self._progress, leave=False):
            for i, g in enumerate(self._batch_gradient(batch)):
                if g is not None:
                    total[i] = weight * g if total[i] is None else total[i] + weight * g
        return total

    def _double_backward(self, grads: Sequence[Tensor | None], chunks: Sequence[Tensor], retain: bool) -> list[Tensor]:
        pairs = [(g, c) for g, c in zip(grads, chunks) if g is not None and g.requires_grad]
        if not pairs:
            return [torch.zeros_like(leaf) for leaf in self._leaves]
        outputs, grad_outputs = zip(*pairs)
        hv = torch.autograd.grad(outputs, self._leaves, grad_outputs=grad_outputs, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(leaf) if h is None else h for h, leaf in zip(hv, self._leaves)]

    def hvp(self, v: Tensor) -> Tensor:
        """H v for a flat vector ``v`` of length P (returned flat, on the model's device, in the operator's dtype)."""
        chunks = self.unflatten_list(v.to(device=self.device, dtype=self.torch_dtype))
        if self._grads is not None:
            result = self._double_backward(self._grads, chunks, retain=True)
        else:
            result = [torch.zeros_like(leaf) for leaf in self._leaves]
            for weight, batch in zip(self.weights, self.batches):
                for acc, h in zip(result, self._double_backward(self._batch_gradient(batch), chunks, retain=False)):
                    acc.add_(h, alpha=weight)
        self.matvecs += 1
        return torch.cat([h.reshape(-1) for h in result]).detach()

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.torch_dtype)
        return self.hvp(v).cpu().numpy().astype(self.dtype, copy=False)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return np.stack([self._matvec(column) for column in np.asarray(X).T], axis=1)

    def _adjoint(self) -> "HessianOperator":
        return self

    def to_dense(self) -> Tensor:
        """The P×P matrix, column by column (P products); for small models only."""
        if self.dim > MAX_DENSE_DIM:
            raise ValueError(f"refusing to build a dense {self.dim}x{self.dim} Hessian (limit {MAX_DENSE_DIM})")
        eye = torch.eye(self.dim, dtype=self.torch_dtype, device=self.device)
        return torch.stack([self.hvp(column) for column in eye], dim=1)

    def unflatten_list(self, v: Tensor) -> list[Tensor]:
        """Flat vector → one tensor per selected parameter, in parameter shapes."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a vector of length {self.dim}, got shape {tuple(v.shape)}")
        return [chunk.reshape(shape) for chunk, shape in zip(torch.split(v, self.numels), self.shapes)]

    def unflatten(self, v: Tensor | np.ndarray) -> dict[str, Tensor]:
        """Flat vector → ``{name: tensor}`` in parameter shapes (e.g. an eigenvector as a direction)."""
        v = torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v, dtype=self.torch_dtype, device=self.device)
        return dict(zip(self.names, self.unflatten_list(v)))

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``{name: tensor}`` over the selected parameters → one flat vector."""
        return torch.cat([tensors[name].to(device=self.device, dtype=self.torch_dtype).reshape(-1) for name in self.names])

    def describe(self) -> dict[str, Any]:
        """What the operator is, for the record."""
        return {
            "params": list(self.names),
            "dim": self.dim,
            "dtype": str(self.torch_dtype).removeprefix("torch."),
            "device": str(self.device),
            "n_samples": self.n_samples,
            "n_batches": self.n_batches,
            "batch_sizes": [len(x) for x, _ in self.batches],
            "graph_cached": self.graph_cached,
            "graph_bytes_estimate": self.graph_bytes,
            "no_grad_params": list(self.no_grad_params),
        }
