"""The recurrence h_t = Phi(h_{t-1}, u_t), h_0 = 0, as one autograd node per sequence.

Phi is one input step of a scheme (:mod:`.schemes`) on the field f(h, u) = A h + B tanh(W h + u)
(:mod:`.field`). :func:`lure_recurrence` takes u_1..u_T, or x_1..x_T with U and b and then forms
u_t = U x_t + b itself segment by segment (:mod:`.inputs`: neither u nor its cotangent exists for the
whole sequence; the zoo's models pass their U and b), and returns h_1..h_T or h_T. An Euler step with a
linear part, h + eps (A h + tanh(W h + u)), runs as the map h + (eps A) h + eps tanh(W h + u),
whose sweeps are written into buffers row by row (fewer operations per step than a general
scheme); eps A is formed outside the node, so autograd carries its derivative.

Gradient. For the cotangents gbar_t of the returned states, the adjoint lambda_t of h_t is

    lambda_T = gbar_T,   lambda_{t-1} = gbar_{t-1} + (d Phi / d h)(h_{t-1}, u_t)^T lambda_t,

run stage by stage with one fused product per stage evaluation (:mod:`.sweeps`); the gradients
of A, W, B and u_t are sums over all stage evaluations (:mod:`.field`), formed afterwards as single
products over all T * batch * stages rows.

Hessian-vector products. The backward pass is itself an autograd node (``_Adjoint``) mapping
(gbar, u, A, W, B) to (du, dA, dW, dB) = J^T gbar, J the Jacobian of the states in
theta = (u, A, W, B) (with U and b given, u's part is (x, U, b)'s, by :mod:`.inputs`). Its
backward, for a direction v = (v_u, v_A, v_W, v_B) on its outputs, is the R-operator:

    d/d gbar:   J v = (h_dot_t), the forward tangent of the states along theta_dot = v;
    d/d theta:  sum_t <gbar_t, d^2 h_t[v, .]>, the derivative of J^T gbar along v with gbar fixed,

the second by the second-order adjoint (lambda_dot, g_dot, q_dot of :mod:`.field`), which runs
backward in time like the first-order one. Autograd composes the rest exactly: a double backward
through a loss on the states (``torch.autograd.grad(grad, params, v)``, as
:class:`lrnn_analysis.hessian.HessianOperator` does) gets the Gauss-Newton part by sending
d loss / d states' derivative through this node's first-order backward, and the curvature of
the parameterisations of A, W, B (the Lipschitz, Cayley or contracting constructions) and of the
encoder and decoder through their own graphs. ``_Adjoint``'s backward is not itself differentiable
(third derivatives raise).

Fused Gauss-Newton part. In that double backward the states' cotangent c (J v sent through the
loss's second derivative) reaches the recurrence node after ``_Adjoint``'s backward, and J^T c is
a first-order adjoint sweep with the same transition as the second-order one, linear in its
sources. So where the loss's derivative reaches the recurrence node (checked on the graph of each
gradient built with create_graph, for its own adjoint node), the recurrence node runs later in the
same graph task and no graph is built again, ``_Adjoint``'s backward runs only the tangent pass
and leaves the second-order sweep to the recurrence node's backward, which starts it from c: one backward sweep and one set of
weight-gradient products instead of two (24 T B n^2 FLOPs per product for the Euler map instead
of 32). Elsewhere (a loss linear in the states, is_grads_batched, create_graph) the two sweeps
run apart; both ways give the same numbers up to round-off.

Memory: by default every stage input y and s = tanh(p) (or p in its place: :func:`_map_forward`) are
stored (O(T * batch * n * stages)), and a gradient's graph keeps each segment's D = beta tanh'(p)
for the Hessian-vector products through it, all
in segments of equal length and at most ``SEGMENT_BYTES``: buffers of the whole sequence (tens of
MiB at sMNIST size) are fresh allocations on every call and measured slower on the CPU than
segment-sized ones, whose products over all their rows still run at the matrix-multiply rate; the
longest segment sets the buffers' size, so equal lengths keep it smallest (T = 196: two of 98 steps,
not 128 and 68). ``segment=K`` stores only the state at the
start of every K-th input step and recomputes a segment's stage records in the backward passes
(O((T / K + K * stages) * batch * n)); ``sqrt_segment(T)`` = ceil(sqrt(T)) balances the two.
Both modes compute the same numbers up to the order of floating-point sums over segments.
Buffers outlive a call, on the CPU only (:class:`_Workspace`): each thread keeps the scratch
buffers of its passes (the adjoint's records and D: about 1.5 ``SEGMENT_BYTES``; a segment's
states and p besides without a graph) and the memory of its last call's first records, up to
``RECORD_BYTES``, for the next call to take once nothing else holds it (both freed by
:func:`release_workspace`); a gradient's graph keeps, for its next Hessian-vector product, the
tangent records of its last (3 T * batch * n numbers with the Euler map, stored mode) and a
segment's scratch, and for all its products each segment's -2 s q, the part of the second-order
term that no direction changes (T * batch * n numbers more; the tanh of p and a pass over the
records that each product formed before; a product that would form s otherwise, with another
intra-op thread count or NumPy not allowed, forms and keeps its own), freed with the graph.
Allocated afresh by every call, glibc handed those buffers back to the system and the next call
faulted them in again page by page: at sMNIST size 10 to 25 thousand page faults per product
(``getrusage``), and in a loop at T = 196, batch = n = 64 tens or hundreds per forward+backward as
the process's history had it (``python bench/recurrence.py --page-faults``); now none.

Products: the plain ones (the forward's and the first-order sweep's per-step products, the weight
gradients, the R-operator's products over all rows) and those added into a buffer row by row (the
forward's without A, the tangent's and the second-order adjoint's step products) go through
:mod:`.products`, which takes NumPy's OpenBLAS with one intra-op thread (faster than torch's MKL
on this project's CPU) and torch otherwise.
"""
from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy
import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from ..errors import InputError
from .field import LureField, numpy_tanh_rows, tanh_float32, tanh_rows
from .inputs import InputGradients, Inputs
from .products import legacy_batched, mm, numpy_allowed, numpy_products, one_blas_thread, row_products, row_products_added
from .schemes import Scheme
from .sweeps import backward_sweep, forward_sweep

__all__ = ["RECORD_BYTES", "SEGMENT_BYTES", "lure_recurrence", "release_workspace", "sqrt_segment"]

# Stored mode keeps the records of about this many bytes per segment (module docstring).
SEGMENT_BYTES = 4 * 2**20
RECORD_BYTES = 2 * SEGMENT_BYTES

# The fused Gauss-Newton sweep (module docstring) asks torch's autograd engine, through two private
# functions, which graph task runs and whether a node will run in it; a torch without them runs the
# two sweeps apart, with the same numbers.
_GRAPH_TASK_QUERIES = all(hasattr(torch._C, name) for name in ("_current_graph_task_id", "_will_engine_execute_node"))


def sqrt_segment(steps: int) -> int:
    """ceil(sqrt(steps)): the segment length that minimises stored states plus one segment's records."""
    return math.isqrt(steps - 1) + 1 if steps > 1 else 1


@dataclass(frozen=True)
class _Plan:
    """How one call runs: the scheme, whether every state is returned, and the segments [t0, t1)
    whose records are stored (``recompute`` False) or recomputed from their start state."""

    scheme: Scheme
    beta: float
    identity: bool
    keep_states: bool
    recompute: bool
    bounds: tuple[tuple[int, int], ...]

    def field(self, A: Tensor | None, W: Tensor, B: Tensor | None) -> LureField:
        return LureField(A, W, B, self.beta, self.identity)


def _make_plan(scheme: Scheme, beta: float, identity: bool, keep_states: bool, segment: int | None,
               inputs: Inputs) -> _Plan:
    steps, batch, n = inputs.shape
    if segment is None:
        # The largest per-step buffer: one record per stage evaluation, or the forward's rows of
        # [a | y W^T] where they are not one row (_map_forward).
        # max(1, .): a zero-size batch or state stores nothing per step.
        per_step = max(1, batch * n * inputs.x.element_size() * max(2, scheme.stages * scheme.substeps))
        longest = max(1, SEGMENT_BYTES // per_step)
        length = -(-steps // -(-steps // longest))  # as many segments, of equal length (module docstring)
    else:
        length = segment
    bounds = tuple((t0, min(t0 + length, steps)) for t0 in range(0, steps, length))
    return _Plan(scheme, beta, identity, keep_states, segment is not None, bounds)


@dataclass(frozen=True)
class _Records:
    """One segment's stage records: the stage inputs Y, (steps, substeps * stages, batch, n), and
    s = tanh(p) (S) or, where the map's forward took NumPy's float32 tanh (:func:`_map_forward`), p
    itself (P), from which D is formed without s's rounding and s again where it is needed."""

    Y: Tensor
    S: Tensor | None
    P: Tensor | None = None

    @property
    def stored(self) -> Tensor:
        """S or P, whichever is kept."""
        return self.S if self.P is None else self.P

    def derivative(self, field: LureField, out: Tensor | None = None) -> Tensor:
        """D = beta tanh'(p), written into ``out`` if given."""
        return field.derivative(self.S, out) if self.P is None else field.derivative_of_inputs(self.P, out)

    def tanh(self, out: Tensor | None = None) -> Tensor:
        """S, kept or formed from P (then written into ``out`` if given)."""
        return self.S if self.P is None else tanh_float32(self.P, out)


def _stack(records: list[Tensor], steps: int) -> Tensor:
    """Stage records in stage order as (steps, substeps * stages, batch, width)."""
    stacked = torch.stack(records)
    return stacked.reshape(steps, len(records) // steps, *stacked.shape[1:])


def _merge_leading(tensor: Tensor) -> Tensor:
    """The first two axes as one, sizes explicit (with -1 a zero-size tensor's shape is ambiguous; flatten has
    no rule under the vmap of is_grads_batched)."""
    return tensor.reshape(tensor.shape[0] * tensor.shape[1], *tensor.shape[2:])


def _rows(records: Tensor) -> tuple[Tensor, ...]:
    """The (batch, width) record of every stage evaluation, in stage order."""
    return _merge_leading(records).unbind(0)


def _forward(field: LureField, scheme: Scheme, h: Tensor, sequence: Inputs, bounds: tuple[int, int], keep_states: bool,
             record: bool, workspace: _Workspace | None = None,
             general: bool = False) -> tuple[Tensor, list[Tensor], _Records | None]:
    """(last state, states, records) over the input steps t0 <= t < t1 (``bounds``) of ``sequence`` from h
    (records None unless ``record``); with ``general`` by the general sweep of out-of-place
    operations, never the map's buffers."""
    if (not general and scheme.method == "map" and not field.has_b
            and not any(legacy_batched(t) for t in sequence.tensors() if t is not None)):
        return _map_forward(field, scheme.substeps, h, sequence, bounds, keep_states, record, workspace)
    inputs = field.pad(sequence.segment(*bounds)).unbind(0)

    def stage(t: int, l: int, y: Tensor) -> tuple[Tensor, Tensor]:
        return field.value(y, inputs[t])

    h, states, ys, ss = forward_sweep(scheme, h, len(inputs), stage, keep_states, record)
    return h, states, (_Records(_stack(ys, len(inputs)), _stack(ss, len(inputs))) if record else None)


def _map_forward(field: LureField, substeps: int, h: Tensor, sequence: Inputs, bounds: tuple[int, int], keep_states: bool,
                 record: bool, workspace: _Workspace | None) -> tuple[Tensor, list[Tensor], _Records | None]:
    """:func:`_forward` for a map h+ = [h +] a + beta tanh(p) (B the identity), written into buffers.

    Per application one product, y [A^T | W^T] into a row of its own, whose y W^T is added to u
    (written beforehand into p's buffer), one tanh and one add (two with the identity), each
    writing into its row of a buffer, so the stage inputs Y are the rows of one buffer of states
    and nothing is stacked afterwards. Without A, a = 0 and the product y W^T is added to u by the
    gemm itself. Where NumPy may run, the rows an application writes and reads before the next (the
    product's, s's where it is no record) are one row of memory for all: a segment's [a | y W^T]
    was 3 MiB at T = 196, B = n = 64, zeroed before and p copied out after the steps, and the bench's
    alternation found it out of cache (``python bench/recurrence.py``: 1.96x the reference loop's
    speed before, 2.04x after). Buffers that outlive the call (records, returned states) are fresh or
    the records' memory of an earlier call (:meth:`_Workspace.record`); the others come from
    ``workspace`` where one is given.

    With the identity (an Euler step: beta = eps scales s before it reaches the state) and NumPy
    computing tanh, it is NumPy's float32 tanh (:func:`.field.tanh_rows`), 6 times as fast as the
    float64 route at 128 x 128 and within 1.4 units in the last place of s instead of 0.5: the
    records keep p in place of s, from which the backward passes form D = beta tanh'(p) closer to
    it than beta (1 - s^2) from any float32 s (:meth:`.field.LureField.derivative_of_inputs`).
    """
    (t0, t1), (_, batch, n), like = bounds, sequence.shape, sequence.x
    steps = t1 - t0
    rows = steps * substeps
    scratch = workspace if not (record or keep_states) else None
    states_shape = (rows + 1, batch, n)
    states_buffer = (_Workspace.take(scratch, "states", states_shape, like) if scratch is not None
                     else _Workspace.record(workspace if record else None, f"states@{t0}", states_shape, like))
    states_buffer[0] = h
    matrix, beta = field.forward_matrix, field.beta
    # Where NumPy may run, one row of memory for each buffer an application writes and reads before the
    # next (not elsewhere: under torch.compile such a buffer crashed inside torch).
    one_row = numpy_allowed()

    def scratch_rows(name: str, width: int) -> Tensor:
        if one_row:
            return _Workspace.take(workspace, name, (1, batch, width), like).expand(rows, batch, width)
        return _Workspace.take(workspace, name, (rows, batch, width), like)

    tanhs = scratch_rows("tanhs", n)
    # NumPy's float32 tanh for an Euler step (tanh_rows), whose records then keep p (docstring). p is yet to be
    # made: the choice depends on the kinds of the tensors only, which p shares with tanhs.
    numpy_tanh = numpy_tanh_rows(tanhs, tanhs, states_buffer, matrix, float32_tanh=field.identity)
    keep_p = field.identity and numpy_tanh
    # p = u + y W^T, u written first: where p is kept, straight into its record.
    p_record = record and keep_p
    P = (_Workspace.record(workspace, f"P@{t0}", (rows, batch, n), like) if p_record
         else _Workspace.take(workspace, "p", (rows, batch, n), like))
    inputs = P.view(steps, substeps, batch, n)
    sequence.segment(t0, t1, out=inputs[:, 0])
    if substeps > 1:
        inputs[:, 1:] = inputs[:, :1]
    tanhs_scratch = not record or keep_p
    if not tanhs_scratch:
        tanhs = like.new_empty((rows, batch, n))
    # With A, [a | y W^T] = y [A^T | W^T] into a row of its own (no zeros to add the product to), then
    # y W^T added to u; without, the product added to u in place.
    z = scratch_rows("z", 2 * n) if field.has_a else None
    # keep_p: an Euler step with NumPy's tanh, so NumPy allowed (one row) and s no record.
    if z is not None and keep_p and numpy_products(states_buffer, matrix, z):
        # An Euler step through NumPy, on rows NumPy makes (a sixth of the cost of unbind's): h + (a + beta s),
        # a + beta s in one rounding (torch's scaled add), then h, one rounding at the size of h.
        s, a = tanhs[0], z[0, :, :n]
        s_array, z_array, matrix_array = s.detach().numpy(), z[0].detach().numpy(), matrix.detach().numpy()
        product_array = z_array[:, n:]
        h_arrays = list(states_buffer.detach().numpy())
        # Outputs passed by position (by keyword, 50 ns more per call).
        for h_array, h_next, p_array in zip(h_arrays[:-1], h_arrays[1:], P.detach().numpy(), strict=True):
            numpy.matmul(h_array, matrix_array, z_array)
            numpy.add(p_array, product_array, p_array)
            numpy.tanh(p_array, s_array)
            torch.add(a, s, alpha=beta, out=s)
            numpy.add(h_array, s_array, h_next)
    else:
        tanh_row, _ = tanh_rows(P, tanhs, states_buffer, matrix, float32_tanh=field.identity)
        product = row_products_added(states_buffer, matrix, P) if z is None else row_products(states_buffer, matrix, z)
        h_rows = _Workspace.rows(scratch, "states", states_buffer)
        s_rows = _Workspace.rows(workspace if tanhs_scratch else None, "tanhs", tanhs)
        p_rows = _Workspace.rows(None if p_record else workspace, "p", P)
        a_rows = None if z is None else _Workspace.rows(workspace, "z/a", z[..., :n])
        product_rows = None if z is None else _Workspace.rows(workspace, "z/p", z[..., n:])
        for l in range(rows):
            product(l, l)
            if product_rows is not None:
                p_rows[l].add_(product_rows[l])
            tanh_row(l)
            if a_rows is None:
                torch.mul(s_rows[l], beta, out=h_rows[l + 1])
                continue
            torch.add(a_rows[l], s_rows[l], alpha=beta, out=h_rows[l + 1])
            if field.identity:
                torch.add(h_rows[l], h_rows[l + 1], out=h_rows[l + 1])
    states = list(states_buffer[substeps::substeps].unbind(0)) if keep_states else []
    last = states_buffer[-1].clone()
    if not record:
        return last, states, None
    Y = states_buffer[:-1].view(steps, substeps, batch, n)
    if keep_p:
        return last, states, _Records(Y, None, inputs)
    return last, states, _Records(Y, tanhs.view(steps, substeps, batch, n))


def _adjoint(field: LureField, scheme: Scheme, lam: Tensor | None, cotangents: Tensor | None, records: _Records,
             workspace: _Workspace | None = None, keep_records: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(cotangent of the segment's start state, D, records X) for one segment with ``records``.

    With a ``workspace`` and without ``keep_records``, D and X live in its buffers: valid until the
    next segment's call."""
    Y = records.Y
    D = records.derivative(field, None if workspace is None or keep_records else workspace.buffer("D", Y.shape, Y))
    if scheme.stages == 1 and not scheme.residual and not legacy_batched(cotangents if lam is None else lam):
        lam, X = _map_adjoint(field, scheme, lam, cotangents, D, None if keep_records else workspace)
        return lam, D, X
    d = _rows(D)

    def stage(l: int, g: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        return field.vjp(g, d[l], base)

    lam, X = backward_sweep(scheme, lam, Y.shape[0], cotangents, stage)
    return lam, D, _stack(X, Y.shape[0])


class _Workspace:
    """Buffers reused from segment to segment of a pass and, on the CPU, from call to call (module
    docstring): a fresh buffer costs a page fault per 4 KiB on first touch, a reused one nothing.
    Nothing a call returns, nor any record a later call reads, lives in its buffers; the memory of
    its records is a record's again only once nothing else holds it (:meth:`record`)."""

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}
        self.records: dict[str, Tensor] = {}
        self.row_lists: dict[tuple[str, tuple[int, ...]], tuple[tuple[int, tuple[int, ...]], tuple[Tensor, ...]]] = {}

    @staticmethod
    def borrow(owner: object) -> _Workspace:
        """The workspace ``owner`` (an adjoint node) keeps, until :meth:`give_back`: a fresh one where
        it keeps none or has lent it to a product still running (in another thread)."""
        with _LENDING:
            workspace = getattr(owner, "workspace", None) or _Workspace()
            owner.workspace = None  # type: ignore[attr-defined]
        return workspace

    @staticmethod
    def give_back(owner: object, workspace: _Workspace | None) -> None:
        if workspace is not None:
            owner.workspace = workspace  # type: ignore[attr-defined]

    @staticmethod
    @contextlib.contextmanager
    def borrowed() -> Iterator[_Workspace]:
        """This thread's workspace for one pass, its CPU buffers kept for the next. A pass that starts
        within another gets a workspace of its own, and so does a pass under a mode that sees torch's
        operations (fake tensors, make_fx: their buffers hold no memory a later pass could use, and a
        real buffer handed to them would be one they cannot write)."""
        if torch._C._len_torch_dispatch_stack():
            yield _Workspace()
            return
        workspace = getattr(_IDLE, "workspace", None) or _Workspace()
        _IDLE.workspace = None
        try:
            yield workspace
        finally:
            # CUDA's allocator keeps freed memory for reuse itself: only CPU buffers, and row lists of them, stay;
            # and only plain tensors (a FakeTensor passed in outside its mode makes fake buffers).
            workspace.buffers = {name: t for name, t in workspace.buffers.items() if _kept(t)}
            workspace.records = {name: t for name, t in workspace.records.items() if _kept(t)}
            workspace.row_lists = {key: held for key, held in workspace.row_lists.items()
                                   if held[1] and _kept(held[1][0])}
            _IDLE.workspace = workspace

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` in the buffer ``name`` (grown along the first axis as needed)."""
        held = self.buffers.get(name)
        if (held is None or held.shape[0] < shape[0] or held.shape[1:] != tuple(shape[1:]) or held.dtype != like.dtype
                or held.device != like.device):
            held = self.buffers[name] = like.new_empty(shape)
            self.row_lists = {key: rows for key, rows in self.row_lists.items() if key[0].split("/")[0] != name}
        return held[:shape[0]]

    @staticmethod
    def rows(workspace: _Workspace | None, name: str, tensor: Tensor) -> tuple[Tensor, ...]:
        """tensor.unbind(0) (a tensor made per row), kept in ``workspace`` under ``name``
        (a buffer's name, then "/" and a part's) for the next call with the same view."""
        if workspace is None or type(tensor) is not Tensor:
            return tensor.unbind(0)
        key, view = (name, tuple(tensor.shape)), (tensor.data_ptr(), tensor.stride())
        held = workspace.row_lists.get(key)
        if held is None or held[0] != view:
            # At most two shapes per name (a sequence's segments and its shorter last one): one kept per
            # shape ever seen would grow without bound over calls of ever other lengths, each list
            # holding a view per row.
            for other in [k for k in workspace.row_lists if k[0] == name and k != key][:-1]:
                del workspace.row_lists[other]
            held = workspace.row_lists[key] = (view, tensor.unbind(0))
        return held[1]

    @staticmethod
    def take(workspace: _Workspace | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """``workspace.buffer(...)``, or a fresh tensor without a workspace."""
        return like.new_empty(shape) if workspace is None else workspace.buffer(name, shape, like)

    @staticmethod
    def record(workspace: _Workspace | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` for a record, which outlives the call (saved for the
        backward passes, or returned): the memory of the record ``name`` of an earlier call where
        nothing but the workspace holds it any more (:func:`_unshared`), else fresh memory, which the
        workspace holds for a later call while its records total at most ``RECORD_BYTES``. Handed out
        as a tensor of its own, so that whoever keeps it, or a view of it, keeps its memory from reuse."""
        if workspace is None:
            return like.new_empty(shape)
        held = workspace.records.get(name)
        if (held is not None and held.shape == shape and held.dtype == like.dtype and held.device == like.device
                and _unshared(held)):
            return held.detach()
        workspace.records.pop(name, None)
        fresh = like.new_empty(shape)
        if sum(t.nbytes for t in workspace.records.values()) + fresh.nbytes <= RECORD_BYTES:
            workspace.records[name] = fresh
            return fresh.detach()
        return fresh


def _kept(tensor: Tensor) -> bool:
    """Whether a workspace keeps ``tensor`` past a pass: a plain tensor on the CPU."""
    return tensor.device.type == "cpu" and type(tensor) is Tensor


def _unshared(tensor: Tensor) -> bool:
    """Whether no tensor, view or array but ``tensor`` holds its memory: torch counts as many references
    to its storage as to that of a tensor just made (``torch._C._storage_Use_Count``, which torch's
    own CUDA-graph trees ask the same way); never where torch has no such count."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return False
    alone = torch.empty(1, device="cpu")
    return bool(count(tensor.untyped_storage()._cdata) == count(alone.untyped_storage()._cdata))


_IDLE = threading.local()
_LENDING = threading.Lock()


def release_workspace() -> None:
    """Free the buffers the engine keeps on the CPU between calls in this thread (about 1.5
    ``SEGMENT_BYTES`` of scratch and up to ``RECORD_BYTES`` of records after an Euler model's
    forward and backward; module docstring)."""
    _IDLE.workspace = None


def _map_adjoint(field: LureField, scheme: Scheme, lam: Tensor | None, cotangents: Tensor | None, D: Tensor,
                 workspace: _Workspace | None) -> tuple[Tensor, Tensor]:
    """The first-order sweep of a one-stage map (h+ = f(h)) written straight into its records.

    Row l of X is [g_l | q_l] (q_l where no gradient needs g). For a map, g_l is the cotangent of
    the output of application l, i.e. y_bar_{l+1} (plus the state's own cotangent at the end of an
    input step), so the fused product of row l + 1 is written into the g-slot of row l: no
    concatenation per step and no stacking afterwards (where no gradient needs g, the g_l take a
    buffer of their own). Same numbers as :func:`backward_sweep`.
    """
    steps, m = D.shape[0], scheme.substeps
    d = _merge_leading(D)
    shape = (steps, m, d.shape[1], 2 * field.n if field.keeps_g else field.n)
    X = D.new_empty(shape) if workspace is None else workspace.buffer("X", shape, D)
    rows = X.view(shape[0] * shape[1], *shape[2:])  # a view: the sweep writes X through it
    G, Q = field.split_record(rows)
    if G is None:
        G = _Workspace.take(workspace, "G", Q.shape, Q)
    g = lam if cotangents is None else (cotangents[-1] if lam is None else lam + cotangents[-1])
    G[-1].copy_(g)
    B, identity = field.B, field.identity
    # Rows as lists: indexing a tensor costs about a microsecond per call, a list next to nothing. torch's
    # operations, not NumPy's: NumPy's ufuncs are the slower on the strided rows of [g | q].
    g_rows, q_rows = _Workspace.rows(workspace, "X/g" if field.keeps_g else "G", G), _Workspace.rows(workspace, "X/q", Q)
    d_rows = _Workspace.rows(workspace, "D", d)
    cotangent_rows = None if cotangents is None else cotangents.unbind(0)
    operands = rows if field.has_a else Q
    product_row = row_products(operands, field.backward_matrix, G)
    for l in reversed(range(len(q_rows))):
        g = g_rows[l]
        torch.mul(g if B is None else g @ B, d_rows[l], out=q_rows[l])
        if l == 0:
            break
        product_row(l, l - 1)
        if identity:
            # g + the product formed first: addmm accumulates the product's terms into g, rounding
            # at the size of g for each (measured 10 times the loop's error in float32).
            g_rows[l - 1].add_(g)
        if cotangent_rows is not None and l % m == 0:
            g_rows[l - 1].add_(cotangent_rows[l // m - 1])
    start = product_row(0, None)
    assert start is not None
    return (start.add_(G[0]) if identity else start), X


def _fused_map(field: LureField, scheme: Scheme, *tensors: Tensor | None) -> bool:
    """Whether the sweeps of the R-operator run written into buffers (:func:`_map_tangent`,
    :func:`_map_second_order`): a map with A given and B the identity, none of ``tensors`` under vmap."""
    return (scheme.method == "map" and field.has_a and not field.has_b
            and not any(t is not None and legacy_batched(t) for t in tensors))


def _map_tangent(field: LureField, substeps: int, h_dot: Tensor, Y: Tensor, D: Tensor, C: Tensor,
                 keep_states: bool, tangents: Tensor, workspace: _Workspace | None = None,
                 tag: str = "") -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """:func:`_tangent` for a map with A given and B the identity: y_dot_{l+1} = [y_dot_l +] a_dot + D * p_dot
    with [a_dot | p_dot] = c_l + y_dot_l [A^T | W^T], the product added in place to the rows of C, the
    tangents written into the rows of ``tangents`` (steps * substeps + 1, batch, n)."""
    steps, _, batch, n = Y.shape
    rows = steps * substeps
    tangents[0] = h_dot
    z = C.reshape(rows, batch, 2 * n)
    a_rows, p_rows = _Workspace.rows(workspace, f"C{tag}/a", z[..., :n]), _Workspace.rows(workspace, f"C{tag}/p", z[..., n:])
    t_rows = _Workspace.rows(workspace, "tangents" + tag, tangents)
    d_rows = _Workspace.rows(workspace, "D" + tag, D.reshape(rows, batch, n))
    add_product = row_products_added(tangents, field.forward_matrix, z)
    for l in range(rows):
        add_product(l, l)
        if field.identity:
            a_rows[l].add_(t_rows[l])
        torch.addcmul(a_rows[l], d_rows[l], p_rows[l], out=t_rows[l + 1])
    states = list(t_rows[substeps::substeps]) if keep_states else []
    return (t_rows[-1].clone(), states, tangents[:-1].view(steps, substeps, batch, n),
            z[..., n:].view(steps, substeps, batch, n))


def _map_second_order(field: LureField, substeps: int, lam_dot: Tensor, cotangents: Tensor | None, D: Tensor,
                      R: Tensor, X: Tensor, direction: dict[str, Tensor], X_dot: Tensor,
                      workspace: _Workspace | None = None, tag: str = "") -> Tensor:
    """The second-order adjoint of a map with A given and B the identity, written into its records X_dot
    (shaped as X) like :func:`_map_adjoint`; returns the cotangent of the segment's start.

    Row l of X_dot is [g_dot_l | q_dot_l], q_dot_l = R_l + g_dot_l * D_l, and g_dot_l, the cotangent of
    application l's output, is P_{l+1} + [g_dot | q_dot]_{l+1} [A; W] [+ g_dot_{l+1}] (plus the state's
    own cotangent at the end of an input step), with P = X [A_dot; W_dot] written into the g-slots
    beforehand.
    """
    steps, _, batch, n = D.shape
    rows = steps * substeps
    X_dot = X_dot.view(rows, batch, 2 * n)
    G, Q = X_dot[..., :n], X_dot[..., n:]
    direction_matrix = field.direction_matrix(direction)
    X_rows = X.reshape(rows, batch, 2 * n)
    if rows > 1:
        mm(X_rows[1:].reshape(-1, 2 * n), direction_matrix, out=G[:-1].view(-1, n))
    g = lam_dot if cotangents is None else lam_dot + cotangents[-1]
    G[-1].copy_(g)
    g_rows, q_rows = _Workspace.rows(workspace, "X_dot/g", G), _Workspace.rows(workspace, "X_dot/q", Q)
    d_rows = _Workspace.rows(workspace, "D" + tag, D.reshape(rows, batch, n))
    r_rows, matrix = _Workspace.rows(workspace, "R", R.reshape(rows, batch, n)), field.backward_matrix
    add_product = row_products_added(X_dot, matrix, G)
    for l in reversed(range(rows)):
        torch.addcmul(r_rows[l], g_rows[l], d_rows[l], out=q_rows[l])
        if l == 0:
            start = torch.addmm(X_rows[0] @ direction_matrix, X_dot[0], matrix)
            return start.add_(g_rows[0]) if field.identity else start
        add_product(l, l - 1)
        if field.identity:
            g_rows[l - 1].add_(g_rows[l])
        if cotangents is not None and l % substeps == 0:
            g_rows[l - 1].add_(cotangents[l // substeps - 1])
    raise AssertionError("a segment has at least one step")


def _tangent(field: LureField, scheme: Scheme, h_dot: Tensor, Y: Tensor, S: Tensor | None, D: Tensor,
             direction: dict[str, Tensor], inputs: Inputs, input_direction: tuple[Tensor | None, Tensor | None, Tensor | None],
             bounds: tuple[int, int], keep_states: bool, workspace: _Workspace | None = None,
             tag: str = "") -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """(last tangent, tangents of the states, Y_dot, P_dot) over the segment ``bounds`` from the tangent h_dot of
    its start, along ``direction`` and the direction of ``inputs``' tensors; with a ``workspace``, the
    map's Y_dot and P_dot (and the states' tangents) live in its buffers named with ``tag``."""
    batched = any(legacy_batched(t) for t in (*input_direction, *direction.values()) if t is not None)
    out = None
    if workspace is not None and not batched:
        out = workspace.buffer("C" + tag, (Y.shape[0] * Y.shape[1] * Y.shape[2], field.forward_matrix.shape[1]), Y)
    u_dot = (inputs.tangent(input_direction, *bounds)[:, None] if batched
             else functools.partial(inputs.add_tangent, input_direction, *bounds))
    C, E = field.tangent_terms(Y, S, direction, u_dot, out=out)
    # C is batched where any part of the direction is (h_dot may be an unbatched zero start).
    if _fused_map(field, scheme, h_dot, C):
        tangents = _Workspace.take(workspace, "tangents" + tag, (Y.shape[0] * scheme.substeps + 1, *Y.shape[2:]), Y)
        return _map_tangent(field, scheme.substeps, h_dot, Y, D, C, keep_states, tangents, workspace, tag)
    c, d = _rows(C), _rows(D)
    e = None if E is None else _rows(E)

    def stage(t: int, l: int, y_dot: Tensor) -> tuple[Tensor, Tensor]:
        return field.jvp(y_dot, d[l], c[l], None if e is None else e[l])

    h_dot, states, y_dots, p_dots = forward_sweep(scheme, h_dot, Y.shape[0], stage, keep_states, True)
    return h_dot, states, _stack(y_dots, Y.shape[0]), _stack(p_dots, Y.shape[0])


def _per_step(Q: Tensor) -> Tensor:
    """The gradient of each u_t: the sum of q over the stage evaluations of input step t."""
    # One stage evaluation per step: the records themselves, a view.
    return Q[:, 0] if Q.shape[1] == 1 else Q.sum(dim=1)


def _add(total: dict[str, Tensor], part: dict[str, Tensor]) -> dict[str, Tensor]:
    return part if not total else {name: total[name] + part[name] for name in total}


class _Tape:
    """The records of every segment: kept by the forward pass (Y and S or P, with ``pre_activations``
    saying which), or recomputed from the segment's start state."""

    def __init__(self, field: LureField, plan: _Plan, inputs: Inputs, kept: tuple[Tensor, ...],
                 pre_activations: tuple[bool, ...]) -> None:
        self.field, self.plan, self.inputs, self.kept, self.pre_activations = field, plan, inputs, kept, pre_activations

    def records(self, k: int) -> _Records:
        if not self.plan.recompute:
            Y, stored = self.kept[2 * k], self.kept[2 * k + 1]
            return _Records(Y, None, stored) if self.pre_activations[k] else _Records(Y, stored)
        t0, t1 = self.plan.bounds[k]
        records = _forward(self.field, self.plan.scheme, self.kept[k], self.inputs, (t0, t1), False, True)[2]
        assert records is not None
        return records


# The code of torch's Python entry to its autograd engine, whose frames on a thread's stack count the
# backward calls it is inside (None where torch has no such function: every call then counts as outermost).
_ENGINE_CALL = getattr(getattr(torch.autograd.graph, "_engine_run_backward", None), "__code__", None)


def _backward_depth() -> int:
    """How many autograd backward calls this thread is inside, by the frames of torch's engine entry."""
    frame, depth = sys._getframe(), 0
    while frame is not None:
        depth += frame.f_code is _ENGINE_CALL
        frame = frame.f_back
    return depth


class _Mailbox:
    """Shared by a recurrence node and the adjoint nodes built from it (module docstring, "Fused
    Gauss-Newton part"): the second-order sweeps an adjoint node left to the recurrence node, per
    autograd graph task. Several tasks may run through one graph at once (Hessian-vector products in
    several threads, or one within another's backward): each collects its own.

    On the CPU a graph task runs its nodes in the thread that started it, so work a thread posted in
    another task, no deeper in its backward calls than the task posting now, was left by a task that
    failed before reaching the recurrence node (an exception in a hook, an interrupt): it is dropped,
    or it would hold a product's tangent records for as long as the graph lives, one set per failure.
    A task whose work was dropped all the same (where torch's engine entry cannot be counted) raises
    rather than lose its second-order part."""

    def __init__(self) -> None:
        self.pending: dict[int, list[Callable[[Tensor | None], tuple[Tensor | None, ...]]]] = {}
        self.posters: dict[int, tuple[int, int]] = {}
        self.dropped: set[int] = set()
        self.lock = threading.Lock()

    def post(self, finish: Callable[[Tensor | None], tuple[Tensor | None, ...]], cpu: bool) -> None:
        task = torch._C._current_graph_task_id()
        with self.lock:
            if cpu:
                poster = (threading.get_ident(), _backward_depth())
                for stale in [t for t, (thread, depth) in self.posters.items()
                              if thread == poster[0] and depth >= poster[1] and t != task]:
                    del self.posters[stale]
                    self.pending.pop(stale, None)
                    self.dropped.add(stale)
                self.posters[task] = poster
            self.pending.setdefault(task, []).append(finish)

    def collect(self) -> list[Callable[[Tensor | None], tuple[Tensor | None, ...]]]:
        task = torch._C._current_graph_task_id()
        with self.lock:
            if task in self.dropped:
                self.dropped.discard(task)
                raise RuntimeError("the recurrence engine dropped the second-order part of this Hessian-vector "
                                   "product, taken within another on the same gradient graph; set the model's "
                                   "engine to 'autograd' for nested products")
            self.posters.pop(task, None)
            return self.pending.pop(task, [])


def _reaches(tensor: Tensor, node: object) -> bool:
    """Whether ``node`` is in the autograd graph of ``tensor``."""
    seen: set[int] = set()
    stack = [tensor.grad_fn]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        if current is node:
            return True
        seen.add(id(current))
        stack.extend(next_node for next_node, _ in current.next_functions)
    return False


def _sum_results(results: list[tuple[Tensor | None, ...]]) -> tuple[Tensor | None, ...]:
    return tuple(None if parts[0] is None else sum(parts[1:], parts[0]) for parts in zip(*results))


def _no_autocast(tensor: Tensor) -> contextlib.AbstractContextManager[object]:
    """Autocast off on ``tensor``'s device: the engine computes in its inputs' dtype, as autocast keeps
    some ops in float32 (a product autocast ran in bfloat16 would not match the float32 records)."""
    if tensor.device.type in ("cpu", "cuda"):
        return torch.autocast(tensor.device.type, enabled=False)
    return contextlib.nullcontext()


def _autocast_off(backward: Callable[..., tuple[Tensor | None, ...]]) -> Callable[..., tuple[Tensor | None, ...]]:
    """A node's backward run with autocast off on its cotangents' device (:func:`_no_autocast`)."""
    @functools.wraps(backward)
    def run(ctx: object, *cotangents: Tensor) -> tuple[Tensor | None, ...]:
        with _no_autocast(next(t for t in cotangents if t is not None)):
            return backward(ctx, *cotangents)
    return run


class _Recurrence(torch.autograd.Function):
    """(x, U, b, A, W, B) -> states (U None: x is u); backward through :class:`_Adjoint`."""

    @staticmethod
    def forward(ctx, x: Tensor, U: Tensor | None, b: Tensor | None, A: Tensor | None, W: Tensor, B: Tensor | None,
                plan: _Plan) -> Tensor:
        field, inputs = plan.field(A, W, B), Inputs(x, U, b)
        h = x.new_zeros(x.shape[1], W.shape[0])
        states: list[Tensor] = []
        kept: list[Tensor] = []
        pre_activations: list[bool] = []
        with one_blas_thread(), _Workspace.borrowed() as workspace:
            for t0, t1 in plan.bounds:
                if plan.recompute:
                    kept.append(h)
                h, part, records = _forward(field, plan.scheme, h, inputs, (t0, t1), plan.keep_states,
                                            not plan.recompute, workspace)
                if records is not None:
                    kept += [records.Y, records.stored]
                    pre_activations.append(records.P is not None)
                states.extend(part)
        ctx.save_for_backward(x, U, b, A, W, B, *kept)
        ctx.plan, ctx.mailbox, ctx.pre_activations = plan, _Mailbox(), tuple(pre_activations)
        return torch.stack(states) if plan.keep_states else h

    @staticmethod
    # Under compiled autograd this runs eagerly: dynamo, tracing the sweeps' Python loops, ended them early.
    @torch.compiler.disable
    @_autocast_off
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        finishes = ctx.mailbox.collect() if _GRAPH_TASK_QUERIES else []
        if finishes:
            # A Hessian-vector product: the cotangent of the states is the Gauss-Newton part, swept
            # together with the second-order adjoint of the first adjoint node.
            return *_sum_results([finish(grad if i == 0 else None) for i, finish in enumerate(finishes)]), None
        _refuse_batched_graph(grad)
        # Whether this gradient's graph leads back to this node, which its products' Gauss-Newton part then reaches.
        fusable = _GRAPH_TASK_QUERIES and torch.is_grad_enabled() and grad.requires_grad and _reaches(grad, ctx)
        x, U, b, A, W, B, *kept = ctx.saved_tensors
        detached = [None if t is None else t.detach() for t in (x, U, b, A, W, B)]
        tape = _Tape(ctx.plan.field(*detached[3:]), ctx.plan, Inputs(*detached[:3]), tuple(t.detach() for t in kept),
                     ctx.pre_activations)
        layout = _Layout(U is None or ctx.needs_input_grad[0], U is not None, b is not None, A is not None, B is not None)
        grads = _Adjoint.apply(grad, x, U, b, A, W, B, tape, ctx.plan, (ctx, ctx.mailbox) if fusable else None,
                               torch.is_grad_enabled(), layout)
        return *layout.unpack(grads), None


@dataclass(frozen=True)
class _Layout:
    """Which cotangents the adjoint node returns, in the order x, U, b, W, A, B: x's where u is given
    (x is u) or x needs one, U's and b's where given, W's, then A's and B's where given."""

    x: bool
    U: bool
    b: bool
    A: bool
    B: bool

    def pack(self, inputs: tuple[Tensor | None, ...], weights: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """The node's outputs from the input cotangents (x, U, b) and the weights' {"W", "A", "B"}."""
        present = [tensor for tensor, given in zip(inputs, (self.x, self.U, self.b)) if given]
        return (*present, weights["W"], *(weights[name] for name, given in (("A", self.A), ("B", self.B)) if given))

    def unpack(self, outputs: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """(x, U, b, A, W, B) from outputs in the order of :meth:`pack` (None where absent)."""
        rest = list(outputs)
        x, U, b = (rest.pop(0) if given else None for given in (self.x, self.U, self.b))
        W = rest.pop(0)
        A, B = (rest.pop(0) if given else None for given in (self.A, self.B))
        return x, U, b, A, W, B


class _Adjoint(torch.autograd.Function):
    """(gbar, x, U, b, A, W, B) -> J^T gbar, the cotangents of :class:`_Layout`; its backward is the
    R-operator (module docstring)."""

    @staticmethod
    def forward(ctx, grad: Tensor, x: Tensor, U: Tensor | None, b: Tensor | None, A: Tensor | None, W: Tensor,
                B: Tensor | None, tape: _Tape, plan: _Plan, recurrence: tuple[object, _Mailbox] | None,
                differentiable: bool, layout: _Layout) -> tuple[Tensor, ...]:
        field = plan.field(A, W, B)
        lam = None if plan.keep_states else grad
        segments = len(plan.bounds)
        ends: list[Tensor | None] = [None] * segments
        adjoints: list[Tensor | None] = [None] * segments
        derivatives: list[Tensor | None] = [None] * segments
        weights: dict[str, Tensor] = {}
        # The input cotangents are summed and written segment by segment (the records may live in the
        # workspace), except under the vmap of is_grads_batched, where nothing can be written into a buffer.
        in_place = not legacy_batched(grad)
        input_grads = InputGradients(Inputs(x, U, b), layout.x, in_place)
        with one_blas_thread(), _Workspace.borrowed() as workspace:
            for k in reversed(range(segments)):
                t0, t1 = plan.bounds[k]
                segment = tape.records(k)
                ends[k] = lam
                lam, D, X = _adjoint(field, plan.scheme, lam, grad[t0:t1] if plan.keep_states else None, segment,
                                     workspace, keep_records=differentiable or not in_place)
                weights = _add(weights, field.weight_gradients(segment.Y, segment.S, X))
                input_grads.add(t0, t1, _per_step(field.split_record(X)[1]))
                if differentiable and not plan.recompute:
                    adjoints[k], derivatives[k] = X, D
        if differentiable:
            # Stored mode keeps the records X and D (which every Hessian-vector product would otherwise form
            # again); recompute mode the cotangents and lambda at every later segment's end.
            ctx.save_for_backward(x, U, b, A, W, B,
                                  *(adjoints + derivatives if not plan.recompute else (grad, *ends[:-1])))
            ctx.tape, ctx.plan, ctx.recurrence, ctx.layout = tape, plan, recurrence, layout
            # Stored mode: each segment's -2 s q, formed by the graph's first Hessian-vector product for the next.
            ctx.factors = None if plan.recompute else [None] * segments
        return layout.pack(input_grads.result(), weights)

    @staticmethod
    @torch.compiler.disable  # as _Recurrence.backward
    @_autocast_off
    def backward(ctx, *directions: Tensor) -> tuple[Tensor | None, ...]:
        x, U, b, A, W, B, *kept = ctx.saved_tensors
        plan, tape, layout = ctx.plan, ctx.tape, ctx.layout
        v_x, v_U, v_b, v_A, v_W, v_B = layout.unpack(directions)
        # Fused only where the recurrence node runs later in this graph task: it is executed
        # (it leads to an input asked for), after this node (the gradient's graph leads to it). Not
        # under the vmap of is_grads_batched, where any direction may be batched (an unused one is an
        # unbatched zero tensor).
        fuse = (ctx.recurrence is not None and not torch.is_grad_enabled()
                and not any(legacy_batched(t) for t in directions)
                and torch._C._will_engine_execute_node(ctx.recurrence[0]))
        unused = (None,) * 5
        with torch.no_grad():
            field = plan.field(A, W, B)
            weight_direction = {"W": v_W, **({"A": v_A} if A is not None else {}), **({"B": v_B} if B is not None else {})}
            derivatives = None if plan.recompute else kept[len(plan.bounds):]
            cpu = x.device.type == "cpu"
            workspace = _Workspace.borrow(ctx) if cpu else None
            tangent = _tangent_pass(plan, tape, field, (v_x, v_U, v_b), weight_direction, derivatives, workspace)

            def second_order(cotangent: Tensor | None) -> tuple[Tensor | None, ...]:
                try:
                    return _second_order_pass(plan, tape, field, kept, tangent, cotangent, layout.x, workspace,
                                              ctx.factors)
                finally:
                    _Workspace.give_back(ctx, workspace)
            if fuse:
                ctx.recurrence[1].post(second_order, cpu=cpu)
                return (tangent.grad_dot, *(None,) * 6, *unused)
            second = second_order(None)
        results = (tangent.grad_dot, *second, *unused)
        if not torch.is_grad_enabled():
            return results
        _refuse_batched_graph(*directions)
        # create_graph=True: the results depend on (x, U, b, A, W, B) through terms this node does not
        # differentiate, so a further derivative must fail rather than miss them.
        sources = [t for t in (x, U, b, A, W, B, *directions) if t is not None and t.requires_grad]
        present = [i for i, r in enumerate(results) if r is not None]
        marked = list(_ThirdOrder.apply(len(present), *[results[i] for i in present], *sources))
        return tuple(marked.pop(0) if r is not None else None for r in results)


def _refuse_batched_graph(*cotangents: Tensor) -> None:
    """Raise where a backward of this engine runs with create_graph under the vmap of is_grads_batched:
    torch drops the graph of a custom node's results built inside another's backward there (a further
    derivative would miss them: zero, where the loop's graph gives its value)."""
    check = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    if torch.is_grad_enabled() and check is not None and any(check(t) for t in cotangents):
        raise RuntimeError("the recurrence engine cannot build the graph of a gradient under is_grads_batched=True "
                           "(torch drops it); use create_graph=False, one call per cotangent, or the model's engine 'autograd'")


class _ThirdOrder(torch.autograd.Function):
    """Passes the R-operator's results through; differentiating them raises (no third derivatives)."""

    @staticmethod
    def forward(ctx, count: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[None, ...]:
        raise RuntimeError("the recurrence engine's Hessian-vector products are differentiable once only; "
                           "for third derivatives set the model's engine to 'autograd'")


@dataclass
class _TangentPass:
    """The tangent pass of the R-operator: the direction of the weights and of the input tensors (x, U, b),
    the states' tangent (``grad_dot``), the tangent at every segment's start and, in stored mode, every
    segment's (D, Y_dot, P_dot)."""

    direction: dict[str, Tensor]
    input_direction: tuple[Tensor | None, Tensor | None, Tensor | None]
    grad_dot: Tensor
    starts: list[Tensor]
    records: list[tuple[Tensor, Tensor, Tensor]]


@one_blas_thread()
def _tangent_pass(plan: _Plan, tape: _Tape, field: LureField,
                  input_direction: tuple[Tensor | None, Tensor | None, Tensor | None],
                  direction: dict[str, Tensor], derivatives: list[Tensor] | None = None,
                  workspace: _Workspace | None = None) -> _TangentPass:
    """Forward in time: the tangent of the states along the direction of (x, U, b) and of the weights
    {"W", "A", "B"}; D per segment from ``derivatives`` where given, else formed from the records. In
    stored mode the records of every segment's tangents live in ``workspace`` where given."""
    _, batch, _ = tape.inputs.shape
    h_dot = direction["W"].new_zeros(batch, field.n)
    starts: list[Tensor] = []
    state_dots: list[Tensor] = []
    records: list[tuple[Tensor, Tensor, Tensor]] = []
    for k, (t0, t1) in enumerate(plan.bounds):
        starts.append(h_dot)
        segment = tape.records(k)
        D = segment.derivative(field) if derivatives is None else derivatives[k]
        h_dot, part, Y_dot, P_dot = _tangent(field, plan.scheme, h_dot, segment.Y, segment.S, D, direction, tape.inputs,
                                             input_direction, (t0, t1), plan.keep_states,
                                             None if plan.recompute else workspace, str(k))
        state_dots.extend(part)
        if not plan.recompute:
            records.append((D, Y_dot, P_dot))
    grad_dot = torch.stack(state_dots) if plan.keep_states else h_dot
    return _TangentPass(direction, input_direction, grad_dot, starts, records)


@one_blas_thread()
def _second_order_pass(plan: _Plan, tape: _Tape, field: LureField, kept: list[Tensor], tangent: _TangentPass,
                       cotangent: Tensor | None, need_x: bool, workspace: _Workspace | None = None,
                       factors: list[tuple[tuple[int, bool], Tensor] | None] | None = None) -> tuple[Tensor | None, ...]:
    """Backward in time: the cotangents of (x, U, b, A, W, B) from the second-order adjoint of the first
    adjoint's cotangents, plus J^T ``cotangent`` for a cotangent of the states (the same linear sweep:
    module docstring); x's only with ``need_x`` or where u is given, None where a tensor is absent.
    The map's per-segment s, R and X_dot live in ``workspace`` where given. ``factors`` (stored mode):
    each segment's -2 s q (:meth:`.field.LureField.second_order_factor`) where formed, kept there by
    the map's sweep for the next product on the same records (None where not yet formed), with the
    intra-op thread count and NumPy's permission (:func:`.products.numpy_allowed`) it was formed
    under: a product under others forms and keeps its own, s being NumPy's tanh or torch's, split
    among the threads, so that every product's numbers are those it would form itself."""
    scheme, bounds, direction = plan.scheme, plan.bounds, tangent.direction
    if plan.recompute:
        grad, *later = kept
        ends = [*later, None if plan.keep_states else grad]
    _, batch, _ = tape.inputs.shape
    lam_dot = direction["W"].new_zeros(batch, field.n)
    if cotangent is not None and not plan.keep_states:
        lam_dot = cotangent
    # The input cotangents written into buffers (the records may live in the workspace), except under the
    # vmap of is_grads_batched, where nothing can be written into a buffer.
    batched = any(legacy_batched(t) for t in (*direction.values(), *tangent.input_direction, cotangent) if t is not None)
    input_grads = InputGradients(tape.inputs, need_x, in_place=not batched)
    weights: dict[str, Tensor] = {}
    for k in reversed(range(len(bounds))):
        t0, t1 = bounds[k]
        segment = tape.records(k)
        Y = segment.Y
        if plan.recompute:
            _, D, X = _adjoint(field, scheme, ends[k], grad[t0:t1] if plan.keep_states else None, segment)
            _, _, Y_dot, P_dot = _tangent(field, scheme, tangent.starts[k], Y, segment.S, D, direction,
                                          tape.inputs, tangent.input_direction, (t0, t1), False)
        else:
            (D, Y_dot, P_dot), X = tangent.records[k], kept[k]
        state_cotangents = cotangent[t0:t1] if cotangent is not None and plan.keep_states else None
        if _fused_map(field, scheme, lam_dot, P_dot, state_cotangents):
            out = None if workspace is None else workspace.buffer("R", D.shape, D)
            if factors is None:
                S = segment.tanh(None if workspace is None else workspace.buffer("S", D.shape, D))
                R = field.second_order_terms(S, D, X, P_dot, direction, with_p=False, out=out)[0]
            else:
                # s and -2 s q are the same for every product on these records (two threads may both form them)
                # that forms s the same way: NumPy's tanh or torch's, with as many intra-op threads.
                S, route, kept_factor = None, (torch.get_num_threads(), numpy_allowed()), factors[k]
                if kept_factor is None or kept_factor[0] != route:
                    kept_factor = factors[k] = (route, field.second_order_factor(segment.tanh(), X))
                R = field.second_order_terms(None, D, X, P_dot, direction, with_p=False, out=out,
                                             factor=kept_factor[1])[0]
            X_dot = _Workspace.take(workspace, "X_dot", X.shape, X)
            lam_dot = _map_second_order(field, scheme.substeps, lam_dot, state_cotangents, D, R, X, direction, X_dot,
                                        workspace, "" if plan.recompute else str(k))
        else:
            S = segment.tanh()
            R, P = field.second_order_terms(S, D, X, P_dot, direction)
            r, p, d = _rows(R), _rows(P), _rows(D)

            def stage(l: int, g_dot: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
                return field.vjp_dot(g_dot, d[l], r[l], p[l], base)  # noqa: B023 (called within this segment only)

            lam_dot, records = backward_sweep(scheme, lam_dot, t1 - t0, state_cotangents, stage)
            X_dot = _stack(records, t1 - t0)
        weights = _add(weights, field.second_order_gradients(Y, Y_dot, S, D, P_dot, X, X_dot))
        input_grads.add(t0, t1, _per_step(field.split_record(X_dot)[1]), first=_per_step(field.split_record(X)[1]),
                        direction=tangent.input_direction)
    return (*input_grads.result(), weights.get("A"), weights["W"], weights.get("B"))


def lure_recurrence(inputs: Tensor, A: Tensor | None, W: Tensor, B: Tensor | None = None, *, scheme: Scheme,
                    keep_states: bool = False, segment: int | None = None, input_weight: Tensor | None = None,
                    input_bias: Tensor | None = None) -> Tensor:
    """The states of h_t = Phi(h_{t-1}, u_t), h_0 = 0 (module docstring), as one autograd node.

    ``inputs`` holds u_1..u_T time-major, shape (T, batch, n); with ``input_weight`` U (n x d) it
    holds x_1..x_T, shape (T, batch, d), and u_t = x_t U^T + b (``input_bias`` b of shape (n,), or
    None: none) is formed segment by segment (:mod:`.inputs`). A (or None: zero), W and B (or
    None: identity) are n x n in the column convention; every tensor in the dtype and on the
    device of ``inputs``. Returns h_1..h_T, shape (T, batch, n), with ``keep_states``, else h_T,
    shape (batch, n). ``segment``: None stores every stage record, K recomputes them per segment
    of K input steps in the backward passes. Without a graph to build (no grad mode or nothing
    that requires grad) nothing is recorded. With a forward-mode tangent on any tensor, or under a
    functorch transform (vmap, grad, jvp), which the node has no rule for, the general sweep runs
    instead, its operations recorded by the active mode.
    """
    if not isinstance(inputs, Tensor) or inputs.ndim != 3 or inputs.shape[0] == 0 or not inputs.is_floating_point():
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise InputError(f"inputs must be a floating-point tensor of shape (T >= 1, batch, n), got {shape}")
    if not isinstance(W, Tensor):
        raise InputError(f"W must be a tensor, got {type(W).__name__}")
    n = W.shape[0] if input_weight is not None else inputs.shape[-1]
    if input_weight is None and input_bias is not None:
        raise InputError("input_bias is given without input_weight")
    shapes = {"A": (n, n), "W": (n, n), "B": (n, n), "input_weight": (n, inputs.shape[-1]), "input_bias": (n,)}
    tensors = {"A": A, "W": W, "B": B, "input_weight": input_weight, "input_bias": input_bias}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor) or tensor.shape != shapes[name]:
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise InputError(f"{name} must have shape {shapes[name]} for inputs of shape {tuple(inputs.shape)}, got {got}")
        if tensor.dtype != inputs.dtype or tensor.device != inputs.device:
            raise InputError(f"{name} is {tensor.dtype} on {tensor.device}, the inputs {inputs.dtype} on {inputs.device}")
    if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int) or segment < 1):
        raise InputError(f"segment must be None or a positive integer, got {segment!r}")
    beta, identity = 1.0, False
    if scheme.method == "euler" and A is not None and B is None:
        # h + eps (A h + tanh(W h + u)) as the map h + h (eps A)^T + eps tanh(W h + u) (field.py's docstring).
        A = A * scheme.c[0]
        scheme, beta, identity = Scheme("map", None, scheme.substeps, ((),), (1.0,), residual=False), scheme.c[0], True
    sequence = Inputs(inputs, input_weight, input_bias)
    plan = _make_plan(scheme, beta, identity, bool(keep_states), segment, sequence)
    tensors = [t for t in (*sequence.tensors(), A, W, B) if t is not None]
    # The node has no forward-mode (jvp) or functorch rule: with a tangent or under a transform the
    # general sweep runs instead, every operation recorded by whatever mode is active; so too under
    # torch.jit.trace, which fails inside torch on this Python node ("unordered_map::at").
    general = (torch._C._are_functorch_transforms_active() or torch.jit.is_tracing()
               or any(forward_ad.unpack_dual(t).tangent is not None for t in tensors))
    with _no_autocast(inputs):
        if not general and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _Recurrence.apply(inputs, input_weight, input_bias, A, W, B, plan)
        field = plan.field(A, W, B)
        h = inputs.new_zeros(inputs.shape[1], n)
        states: list[Tensor] = []
        with one_blas_thread(), _Workspace.borrowed() as workspace:
            for t0, t1 in plan.bounds:
                h, part, _ = _forward(field, scheme, h, sequence, (t0, t1), plan.keep_states, False, workspace, general)
                states.extend(part)
        return torch.stack(states) if plan.keep_states else h
