"""The loss Hessian with respect to (a subset of) a model's parameters as a linear operator, and the
``CurvatureOperator`` base it shares with the GGN and Fisher operators (``curvature.py``).

For parameters θ ∈ R^P, batches (x_b, y_b) with n_b scored targets (N = Σ n_b) and a
mean-reduced loss ℓ_b(θ) = loss_fn(model_θ(x_b), y_b), the operator is

    H = Σ_b (n_b / N) ∇²ℓ_b(θ),

the Hessian of the mean loss over all scored targets of all batches (a mean over batches would
over-weight a short last batch). A scored target is a sample for one target per sequence, and an
unmasked step for per-step targets (:func:`~lrnn_analysis.objective.scored_count`): the Hessian
of a language model is that of its mean per-token loss. Products H v are double-backward Hessian-vector products,
Hv = ∂/∂θ ⟨∇ℓ(θ), v⟩, evaluated at a frozen copy of θ.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import InputError
from ..objective import scored_count
from ..parameters import glob_parameters, module_of
from ..progress import progress_bar
from ..unrolled_rnn import twin_layer_names, unrolled_layers

__all__ = ["Batch", "CurvatureOperator", "DEFAULT_MEMORY_BUDGET", "DEFAULT_MEMO_BUDGET", "HessianOperator", "LossFunction", "ParamSpec",
    "ParameterSelection", "as_batches", "eval_mode", "parameter_selection", "resolve_dtype", "select_parameters"]

Batch = tuple[Tensor, Tensor]
LossFunction = Callable[[Tensor, Tensor], Tensor]
ParamSpec = str | Sequence[str] | None

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
DEFAULT_MEMO_BUDGET = 256 * 1024**2
_MAX_DENSE_DIM = 20_000


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``torch.float32``/``torch.float64`` from a torch dtype, ``"float32"``/``"float64"`` or None (``default``)."""
    if dtype is None:
        return default
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
    return dtype


@dataclass(frozen=True)
class ParameterSelection:
    """Which parameters a ``params`` spec selected: ``names`` (model order), the ``patterns`` given
    (None: every trainable parameter) and the patterns that matched nothing."""

    names: tuple[str, ...]
    patterns: tuple[str, ...] | None
    unmatched_patterns: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "patterns": None if self.patterns is None else list(self.patterns),
                "unmatched_patterns": list(self.unmatched_patterns)}


def parameter_selection(model: nn.Module, params: ParamSpec = None) -> ParameterSelection:
    """The parameters ``params`` selects, leniently.

    ``params`` is None (every parameter with ``requires_grad``), a list of names or glob
    patterns (``"M_*"``, ``"D.*"``), or one string of them separated by commas
    (``"M_A,M_W"``). A pattern may match nothing (``M_A`` on a model that has only ``M_W``):
    it is listed in ``unmatched_patterns``. Only a list that matches nothing at all is an error.
    """
    names = [name for name, _ in model.named_parameters()]
    if params is None:
        trainable = tuple(name for name, p in model.named_parameters() if p.requires_grad)
        if not trainable:
            raise InputError("the model has no trainable parameters")
        return ParameterSelection(trainable, None, ())
    patterns = [part.strip() for part in params.split(",")] if isinstance(params, str) else [str(p).strip() for p in params]
    patterns = [p for p in patterns if p]
    if not patterns:
        raise InputError("no parameters selected: empty parameter list")
    chosen, unmatched = glob_parameters(model, patterns)
    if not chosen:
        raise InputError(f"parameter patterns {patterns} match none of {names}")
    return ParameterSelection(tuple(chosen), tuple(patterns), tuple(unmatched))


def select_parameters(model: nn.Module, params: ParamSpec = None) -> list[str]:
    """Names of the parameters ``params`` selects, in the model's order (see ``parameter_selection``)."""
    return list(parameter_selection(model, params).names)


def as_batches(data: Batch | Iterable[Batch]) -> list[Batch]:
    """One ``(x, y)`` batch or an iterable of them, as a list (so every pass sees the same order)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        batches = [tuple(data)]
    else:
        batches = [tuple(batch) for batch in data]
    if not batches:
        raise InputError("no data: expected an (x, y) batch or a non-empty iterable of them")
    for batch in batches:
        if len(batch) != 2 or not all(isinstance(t, Tensor) for t in batch):
            raise InputError("every batch must be a pair (x, y) of tensors")
        if len(batch[0]) == 0 or len(batch[0]) != len(batch[1]):
            raise InputError(f"batch with {len(batch[0])} inputs and {len(batch[1])} targets")
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


class _ProductMemo:
    """The products of the vectors an operator was asked about, on its device, so that a vector asked
    again (the same seeded probe drawn by two estimators) is answered without a product. A vector is
    looked up by a fingerprint (its inner product with fixed Gaussian weights) and then compared
    entry by entry, so only an identical vector is ever answered from memory. Stores up to
    ``budget`` bytes of (vector, product) pairs; later vectors are multiplied and not stored."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.stored_bytes = 0
        self.reused = 0
        self._weights: Tensor | None = None
        self._entries: dict[float, list[tuple[Tensor, Tensor]]] = {}

    def _fingerprint(self, v: Tensor) -> float:
        if self._weights is None or self._weights.shape != v.shape or self._weights.device != v.device:
            generator = torch.Generator().manual_seed(0)
            self._weights = torch.randn(v.shape, generator=generator, dtype=torch.float64).to(device=v.device, dtype=v.dtype)
        return float(v @ self._weights)

    def product(self, v: Tensor, multiply: Callable[[Tensor], Tensor]) -> Tensor:
        key = self._fingerprint(v)
        for vector, product in self._entries.get(key, []):
            if torch.equal(vector, v):
                self.reused += 1
                return product.clone()
        result = multiply(v)
        size = (v.numel() * v.element_size()) + (result.numel() * result.element_size())
        if self.stored_bytes + size <= self.budget:
            self._entries.setdefault(key, []).append((v.clone(), result.clone()))
            self.stored_bytes += size
        return result


class CurvatureOperator(LinearOperator):
    """A symmetric P×P curvature matrix of the loss as a scipy ``LinearOperator`` (the shared part).

    ``data`` is one ``(x, y)`` batch or an iterable of batches (materialised once, so the
    operator is the same matrix for every product); the matrix of several batches is their
    mean weighted by scored targets (samples, or unmasked steps of per-step targets), weights n_b / N. ``params`` selects a block (names or globs, see
    ``parameter_selection``; ``selection`` records what matched); parameters outside it are held
    fixed. The operator works on its own detached copy of the parameters in ``dtype``
    (default: the model's), runs the model in eval mode and restores its mode, and never
    touches ``.grad`` or the caller's tensors.

    ``matvec``/``matmat`` take and return numpy arrays (scipy convention, in the operator's
    numpy ``dtype``); ``apply`` takes and returns flat torch tensors on the model's device.
    Subclasses implement ``_apply(chunks)`` (one tensor per selected parameter).
    ``model`` may be a :class:`~lrnn_analysis.model_under_analysis.ModelUnderAnalysis` (its module is used;
    ``params=model.recurrent_names()`` selects its recurrent block).

    ``rnn_twin``: the model's ``nn.RNN``/``nn.LSTM``/``nn.GRU`` layers run as their unrolled twins
    (:mod:`lrnn_analysis.unrolled_rnn`: same outputs from the same parameters, differentiable twice
    on every device) under ``"auto"`` on CUDA, where the layers' own kernels have no double
    backward, under ``"on"`` everywhere, under ``"off"`` nowhere. ``rnn_twin_layers`` names the
    layers that do (also in ``describe()``, and logged); the model itself is unchanged afterwards.
    """

    kind = "curvature"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Batch | Iterable[Batch],
        params: ParamSpec = None,
        dtype: torch.dtype | str | None = None,
        *,
        rnn_twin: str = "auto",
        progress: bool = False,
    ) -> None:
        model = module_of(model)
        self.model = model
        self.loss_fn = loss_fn
        self.selection = parameter_selection(model, params)
        self.names = self.selection.names
        named = dict(model.named_parameters())
        reference = named[self.names[0]]
        self.torch_dtype = resolve_dtype(dtype, reference.dtype if reference.is_floating_point() else torch.float32)
        self.device = reference.device
        self.rnn_twin = rnn_twin
        self.rnn_twin_layers = twin_layer_names(model, rnn_twin, self.device)
        self.shapes = tuple(named[name].shape for name in self.names)
        self.numels = tuple(int(np.prod(shape)) for shape in self.shapes)
        dim = sum(self.numels)
        if dim == 0:
            raise InputError("the selected parameters have no entries")
        super().__init__(dtype=np.dtype(str(self.torch_dtype).removeprefix("torch.")), shape=(dim, dim))
        self._leaves = [named[name].detach().to(self.torch_dtype).clone().requires_grad_(True) for name in self.names]
        self._constants = {name: self._cast(tensor.detach()) for name, tensor in
                           [*model.named_parameters(), *model.named_buffers()] if name not in self.names}
        self.batches = as_batches(data)
        self.n_samples = sum(len(x) for x, _ in self.batches)
        counts = [scored_count(y) for _, y in self.batches]
        self.n_scored = sum(counts)
        if self.n_scored == 0:
            raise InputError("no scored targets: every step is masked")
        self.weights = tuple(count / self.n_scored for count in counts)
        self.matvecs = 0
        self._memo: _ProductMemo | None = None
        self._progress = progress

    @property
    def dim(self) -> int:
        return self.shape[0]

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def _cast(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.torch_dtype) if tensor.is_floating_point() else tensor

    def _inputs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        x, y = batch
        return self._cast(x.to(self.device)), self._cast(y.to(self.device))

    def _forward(self, x: Tensor) -> Tensor:
        """The model's output at the frozen parameters (graph to the leaves), in eval mode."""
        state = {**self._constants, **dict(zip(self.names, self._leaves))}
        with eval_mode(self.model), unrolled_layers(self.model, self.rnn_twin_layers):
            return functional_call(self.model, state, (x,))

    def _apply(self, chunks: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def apply(self, v: Tensor) -> Tensor:
        """The product with a flat vector ``v`` of length P (returned flat, on the model's device, in the operator's dtype)."""
        v = v.to(device=self.device, dtype=self.torch_dtype)
        if self._memo is not None:
            return self._memo.product(v, self._product)
        return self._product(v)

    def _product(self, v: Tensor) -> Tensor:
        result = self._apply(self.unflatten_list(v))
        self.matvecs += 1
        return torch.cat([h.reshape(-1) for h in result]).detach()

    @contextlib.contextmanager
    def remembering_products(self, budget: float = DEFAULT_MEMO_BUDGET) -> Iterator[_ProductMemo]:
        """Within the block, a vector asked about again is answered from memory instead of a new
        product (see ``_ProductMemo``; ``memo.reused`` counts those answers, ``matvecs`` only the
        products computed). For estimators that draw the same seeded probes, e.g. ``trace`` and the
        shared-probe traces of ``block_curvature`` with one seed."""
        memo = _ProductMemo(budget)
        self._memo = memo
        try:
            yield memo
        finally:
            self._memo = None

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.torch_dtype)
        return self.apply(v).cpu().numpy().astype(self.dtype, copy=False)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return np.stack([self._matvec(column) for column in np.asarray(X).T], axis=1)

    def _adjoint(self) -> CurvatureOperator:
        return self

    def to_dense(self) -> Tensor:
        """The P×P matrix, column by column (P products); for small models only."""
        if self.dim > _MAX_DENSE_DIM:
            raise InputError(f"refusing to build a dense {self.dim}x{self.dim} matrix (limit {_MAX_DENSE_DIM})")
        eye = torch.eye(self.dim, dtype=self.torch_dtype, device=self.device)
        return torch.stack([self.apply(column) for column in eye], dim=1)

    def unflatten_list(self, v: Tensor) -> list[Tensor]:
        """Flat vector → one tensor per selected parameter, in parameter shapes."""
        if v.shape != (self.dim,):
            raise InputError(f"expected a vector of length {self.dim}, got shape {tuple(v.shape)}")
        return [chunk.reshape(shape) for chunk, shape in zip(torch.split(v, list(self.numels)), self.shapes)]

    def unflatten(self, v: Tensor | np.ndarray) -> dict[str, Tensor]:
        """Flat vector → ``{name: tensor}`` in parameter shapes (e.g. an eigenvector as a direction)."""
        v = torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v, dtype=self.torch_dtype, device=self.device)
        return dict(zip(self.names, self.unflatten_list(v)))

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``{name: tensor}`` over the selected parameters → one flat vector."""
        return torch.cat([tensors[name].to(device=self.device, dtype=self.torch_dtype).reshape(-1) for name in self.names])

    def block_slices(self) -> dict[str, slice]:
        """Where each selected parameter tensor sits in the flat vector."""
        offsets = np.cumsum((0, *self.numels))
        return {name: slice(int(a), int(b)) for name, a, b in zip(self.names, offsets[:-1], offsets[1:])}

    def describe(self) -> dict[str, Any]:
        """What the operator is, for the record."""
        return {
            "operator": self.kind,
            "params": list(self.names),
            "param_patterns": None if self.selection.patterns is None else list(self.selection.patterns),
            "unmatched_patterns": list(self.selection.unmatched_patterns),
            "dim": self.dim,
            "dtype": str(self.torch_dtype).removeprefix("torch."),
            "device": str(self.device),
            "rnn_twin": self.rnn_twin,
            "rnn_twin_layers": list(self.rnn_twin_layers),
            "n_samples": self.n_samples,
            "n_scored": self.n_scored,
            "n_batches": self.n_batches,
            "batch_sizes": [len(x) for x, _ in self.batches],
        }


_MATMAT_MODES = ("auto", "loop", "batched")


class HessianOperator(CurvatureOperator):
    """The loss Hessian H = Σ_b (n_b/N) ∇²ℓ_b(θ) (see ``CurvatureOperator`` for data, params, dtype).

    Selected parameters that the loss does not use (unused in the forward pass, or every
    selected parameter unused) have zero rows and columns and are named in ``no_grad_params``;
    parameters in which the loss is affine (their gradient is a constant, e.g. an output
    bias when it is the only parameter selected) also have zero rows and columns and are
    named in ``zero_curvature_params`` — they do have a gradient.

    Graph reuse: the gradient graph of every batch (``create_graph=True``) is built once and
    each product is one extra backward pass through it (``retain_graph=True``), when the
    graph fits ``memory_budget`` bytes (measured on the first batch from the tensors autograd
    saves, extrapolated by sample count). Otherwise each product recomputes forward, backward
    and double backward batch by batch. ``cache_graph`` True/False overrides the choice.

    ``matmat`` with the cached graph: ``"loop"`` (one backward per column), ``"batched"``
    (one backward for all columns, ``is_grads_batched=True``, i.e. vmap over the double
    backward) or ``"auto"``: the first ``matmat`` of ≥ 2 columns times both on its own
    columns (half each, per column) and later calls use the faster; the timing is in
    ``matmat_calibration``. ``hvp`` is ``apply``.
    """

    kind = "hessian"

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
        matmat: str = "auto",
        rnn_twin: str = "auto",
        progress: bool = False,
    ) -> None:
        super().__init__(model, loss_fn, data, params, dtype, rnn_twin=rnn_twin, progress=progress)
        if matmat not in _MATMAT_MODES:
            raise InputError(f"matmat must be one of {_MATMAT_MODES}, got {matmat!r}")
        self.matmat_mode = matmat
        self.matmat_calibration: dict[str, float] | None = None
        self.graph_bytes: int | None = None
        self._active: set[int] = set()
        self._has_grad: set[int] = set()
        self._grads = self._build_graph(cache_graph, memory_budget)
        self.graph_cached = self._grads is not None
        self.no_grad_params = tuple(name for i, name in enumerate(self.names) if i not in self._has_grad)
        self.zero_curvature_params = tuple(name for i, name in enumerate(self.names)
                                           if i in self._has_grad and i not in self._active)

    def _batch_gradient(self, batch: Batch) -> list[Tensor | None]:
        """∇ℓ_b at the frozen parameters, with its graph (create_graph=True); None where unused."""
        x, y = self._inputs(batch)
        loss = self.loss_fn(self._forward(x), y)
        if not loss.requires_grad:
            return [None] * len(self._leaves)
        grads = torch.autograd.grad(loss, self._leaves, create_graph=True, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                self._has_grad.add(i)
                if g.requires_grad:
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
        for weight, batch in progress_bar(rest, total=len(self.batches) - 1, desc="hessian graph", enabled=self._progress, leave=False):
            for i, g in enumerate(self._batch_gradient(batch)):
                if g is not None:
                    total[i] = weight * g if total[i] is None else total[i] + weight * g
        return total

    def _double_backward(self, grads: Sequence[Tensor | None], chunks: Sequence[Tensor], retain: bool,
                         batched: bool = False) -> list[Tensor]:
        lead = (len(chunks[0]),) if batched else ()
        zeros = [torch.zeros(lead + leaf.shape, dtype=leaf.dtype, device=leaf.device) for leaf in self._leaves]
        pairs = [(g, c) for g, c in zip(grads, chunks) if g is not None and g.requires_grad]
        if not pairs:
            return zeros
        outputs, grad_outputs = zip(*pairs)
        hv = torch.autograd.grad(outputs, self._leaves, grad_outputs=grad_outputs, retain_graph=retain, allow_unused=True,
                                 is_grads_batched=batched)
        return [zero if h is None else h for h, zero in zip(hv, zeros)]

    def _apply(self, chunks: list[Tensor]) -> list[Tensor]:
        if self._grads is not None:
            return self._double_backward(self._grads, chunks, retain=True)
        result = [torch.zeros_like(leaf) for leaf in self._leaves]
        for weight, batch in zip(self.weights, self.batches):
            for acc, h in zip(result, self._double_backward(self._batch_gradient(batch), chunks, retain=False)):
                acc.add_(h, alpha=weight)
        return result

    def hvp(self, v: Tensor) -> Tensor:
        """H v for a flat vector ``v`` of length P (returned flat, on the model's device, in the operator's dtype)."""
        return self.apply(v)

    def _batched_products(self, X: np.ndarray) -> np.ndarray:
        """H X in one batched double backward through the cached graph (X of shape (P, k))."""
        assert self._grads is not None  # _matmat batches only through a cached graph
        V = torch.as_tensor(np.ascontiguousarray(X.T), dtype=self.torch_dtype, device=self.device)
        chunks = [c.reshape((len(V),) + shape) for c, shape in zip(torch.split(V, list(self.numels), dim=1), self.shapes)]
        result = self._double_backward(self._grads, chunks, retain=True, batched=True)
        self.matvecs += len(V)
        out = torch.cat([h.reshape(len(V), -1) for h in result], dim=1).detach()
        return out.T.cpu().numpy().astype(self.dtype, copy=False)

    def _looped_products(self, X: np.ndarray) -> np.ndarray:
        return np.stack([self._matvec(column) for column in X.T], axis=1)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        mode = self.matmat_mode
        if self._grads is None or X.shape[1] < 2 or mode == "loop":
            return self._looped_products(X)
        if mode == "batched":
            return self._batched_products(X)
        if self.matmat_calibration is None:
            half = X.shape[1] // 2
            start = time.perf_counter()
            looped = self._looped_products(X[:, :half])
            loop_seconds = (time.perf_counter() - start) / half
            start = time.perf_counter()
            try:
                batched = self._batched_products(X[:, half:])
            except RuntimeError:  # an operation of the model without a batching rule for the double backward
                self.matmat_calibration = {"loop_s_per_column": loop_seconds, "batched_s_per_column": math.inf,
                                           "columns": float(X.shape[1])}
                return np.concatenate([looped, self._looped_products(X[:, half:])], axis=1)
            batched_seconds = (time.perf_counter() - start) / (X.shape[1] - half)
            self.matmat_calibration = {"loop_s_per_column": loop_seconds, "batched_s_per_column": batched_seconds,
                                       "columns": float(X.shape[1])}
            return np.concatenate([looped, batched], axis=1)
        calibration = self.matmat_calibration
        if calibration["batched_s_per_column"] < calibration["loop_s_per_column"]:
            return self._batched_products(X)
        return self._looped_products(X)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "graph_cached": self.graph_cached,
            "graph_bytes_estimate": self.graph_bytes,
            "no_grad_params": list(self.no_grad_params),
            "zero_curvature_params": list(self.zero_curvature_params),
            "matmat_calibration": self.matmat_calibration,
        }
