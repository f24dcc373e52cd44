"""The recurrence h_t = Phi(h_{t-1}, u_t), h_0 = 0, as one autograd node per sequence.

Phi is one input step of a scheme (:mod:`.schemes`) on the field f(h, u) = A h + B tanh(W h + u)
(:mod:`.field`). :func:`lure_recurrence` takes u_1..u_T (the input projections U x_t + b of all
steps, computed beforehand in one product) and returns h_1..h_T or h_T. An Euler step with a
linear part, h + eps (A h + tanh(W h + u)), runs as the map (I + eps A) h + eps tanh(W h + u) (one
operation less per step and per pass); I + eps A is formed outside the node, so autograd carries
its derivative.

Gradient. For the cotangents gbar_t of the returned states, the adjoint lambda_t of h_t is

    lambda_T = gbar_T,   lambda_{t-1} = gbar_{t-1} + (d Phi / d h)(h_{t-1}, u_t)^T lambda_t,

run stage by stage with one fused product per stage evaluation (:mod:`.sweeps`); the gradients
of A, W, B and u_t are sums over all stage evaluations (:mod:`.field`), formed afterwards as single
products over all T * batch * stages rows.

Hessian-vector products. The backward pass is itself an autograd node (``_Adjoint``) mapping
(gbar, u, A, W, B) to (du, dA, dW, dB) = J^T gbar, J the Jacobian of the states in
theta = (u, A, W, B). Its backward, for a direction v = (v_u, v_A, v_W, v_B) on its outputs, is
the R-operator:

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

Memory: by default every stage input y and s = tanh(p) are stored (O(T * batch * n * stages)),
in segments of about ``SEGMENT_BYTES``: buffers of the whole sequence (tens of MiB at sMNIST size)
are fresh allocations on every call and measured slower on the CPU than segment-sized ones, whose
products over all their rows still run at the matrix-multiply rate. ``segment=K`` stores only the state at the
start of every K-th input step and recomputes a segment's stage records in the backward passes
(O((T / K + K * stages) * batch * n)); ``sqrt_segment(T)`` = ceil(sqrt(T)) balances the two.
Both modes compute the same numbers up to the order of floating-point sums over segments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from .field import LureField
from .schemes import Scheme
from .sweeps import backward_sweep, forward_sweep

__all__ = ["SEGMENT_BYTES", "lure_recurrence", "sqrt_segment"]

# Stored mode keeps the records of about this many bytes per segment (module docstring).
SEGMENT_BYTES = 2 * 2**20


def sqrt_segment(steps: int) -> int:
    """ceil(sqrt(steps)): the segment length that minimises stored states plus one segment's records."""
    return math.isqrt(steps - 1) + 1 if steps > 1 else 1


@dataclass(frozen=True)
class _Plan:
    """How one call runs: the scheme, whether every state is returned, and the segments [t0, t1)
    whose records are stored (``recompute`` False) or recomputed from their start state."""

    scheme: Scheme
    beta: float
    keep_states: bool
    recompute: bool
    bounds: tuple[tuple[int, int], ...]

    def field(self, A: Tensor | None, W: Tensor, B: Tensor | None) -> LureField:
        return LureField(A, W, B, self.beta)


def _make_plan(scheme: Scheme, beta: float, keep_states: bool, segment: int | None, u: Tensor) -> _Plan:
    steps, batch, n = u.shape
    if segment is None:
        # The largest per-step buffer: one record per stage evaluation, or the padded inputs [0 | u].
        per_step = batch * n * u.element_size() * max(2, scheme.stages * scheme.substeps)
        length = max(1, SEGMENT_BYTES // per_step)
    else:
        length = segment
    bounds = tuple((t0, min(t0 + length, steps)) for t0 in range(0, steps, length))
    return _Plan(scheme, beta, keep_states, segment is not None, bounds)


def _stack(records: list[Tensor], steps: int) -> Tensor:
    """Stage records in stage order as (steps, substeps * stages, batch, width)."""
    stacked = torch.stack(records)
    return stacked.reshape(steps, -1, *stacked.shape[1:])


def _rows(records: Tensor) -> tuple[Tensor, ...]:
    """The (batch, width) record of every stage evaluation, in stage order."""
    return records.reshape(-1, *records.shape[2:]).unbind(0)


def _forward(field: LureField, scheme: Scheme, h: Tensor, u: Tensor, keep_states: bool,
             record: bool) -> tuple[Tensor, list[Tensor], Tensor | None, Tensor | None]:
    """(last state, states, Y, S) over the input steps of u from h (Y, S None unless ``record``)."""
    inputs = field.pad(u).unbind(0)

    def stage(t: int, l: int, y: Tensor) -> tuple[Tensor, Tensor]:
        return field.value(y, inputs[t])

    h, states, ys, ss = forward_sweep(scheme, h, len(inputs), stage, keep_states, record)
    return h, states, (_stack(ys, len(inputs)) if record else None), (_stack(ss, len(inputs)) if record else None)


def _adjoint(field: LureField, scheme: Scheme, lam: Tensor | None, cotangents: Tensor | None, S: Tensor,
             workspace: _Workspace | None = None, keep_records: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(cotangent of the segment's start state, D, records X) for one segment with records S.

    With a ``workspace``, D (and X unless ``keep_records``) live in its buffers: valid until the
    next segment's call."""
    D = field.derivative(S, None if workspace is None else workspace.buffer("D", S.shape, S))
    if scheme.stages == 1 and not scheme.residual and not _legacy_batched(cotangents if lam is None else lam):
        lam, X = _map_adjoint(field, scheme, lam, cotangents, D, None if keep_records else workspace)
        return lam, D, X
    d = _rows(D)

    def stage(l: int, g: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        return field.vjp(g, d[l], base)

    lam, records = backward_sweep(scheme, lam, S.shape[0], cotangents, stage)
    return lam, D, _stack(records, S.shape[0])


class _Workspace:
    """Buffers reused from segment to segment of one pass: a fresh buffer costs a page fault per
    4 KiB on first touch, a reused one nothing. ``capacity``: the longest segment's input steps."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffers: dict[str, Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` (first axis: input steps) in the buffer ``name``."""
        held = self.buffers.get(name)
        if held is None or held.shape[1:] != tuple(shape[1:]) or held.dtype != like.dtype:
            held = self.buffers[name] = like.new_empty((self.capacity, *shape[1:]))
        return held[:shape[0]]


def _legacy_batched(tensor: Tensor) -> bool:
    """Whether ``tensor`` is batched by the vmap of ``autograd.grad(..., is_grads_batched=True)``, under
    which nothing can be written into a buffer (``out=``); True where torch cannot tell."""
    check = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return check is None or check(tensor)


def _map_adjoint(field: LureField, scheme: Scheme, lam: Tensor | None, cotangents: Tensor | None, D: Tensor,
                 workspace: _Workspace | None) -> tuple[Tensor, Tensor]:
    """The first-order sweep of a one-stage map (h+ = f(h)) written straight into its records.

    Row l of X is [g_l | q_l] (q_l where no gradient needs g). For a map, g_l is the cotangent of
    the output of application l, i.e. y_bar_{l+1} (plus the state's own cotangent at the end of an
    input step), so the fused product of row l + 1 is written into the g-slot of row l: no
    concatenation per step and no stacking afterwards. Same numbers as :func:`backward_sweep`.
    """
    steps, m = D.shape[0], scheme.substeps
    d = D.reshape(-1, *D.shape[2:])
    shape = (steps, m, d.shape[1], 2 * field.n if field.keeps_g else field.n)
    X = D.new_empty(shape) if workspace is None else workspace.buffer("X", shape, D)
    rows = X.view(-1, *shape[2:])
    G, Q = field.split_record(rows)
    g = lam if cotangents is None else (cotangents[-1] if lam is None else lam + cotangents[-1])
    if G is not None:
        g = G[-1].copy_(g)
    for l in reversed(range(len(rows))):
        torch.mul(g @ field.B if field.has_b else g, d[l], out=Q[l])
        product = torch.mm(rows[l] if field.has_a else Q[l], field.backward_matrix,
                           out=None if G is None or l == 0 else G[l - 1])
        if l == 0:
            return product, X
        g = product
        if cotangents is not None and l % m == 0:
            g.add_(cotangents[l // m - 1])
    raise AssertionError("a segment has at least one step")


def _tangent(field: LureField, scheme: Scheme, h_dot: Tensor, Y: Tensor, S: Tensor, D: Tensor,
             direction: dict[str, Tensor], u_dot: Tensor, keep_states: bool) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """(last tangent, tangents of the states, Y_dot, P_dot) over one segment from the tangent h_dot of its start."""
    C, E = field.tangent_terms(Y, S, direction, u_dot[:, None])
    c, d = _rows(C), _rows(D)
    e = None if E is None else _rows(E)

    def stage(t: int, l: int, y_dot: Tensor) -> tuple[Tensor, Tensor]:
        return field.jvp(y_dot, d[l], c[l], None if e is None else e[l])

    h_dot, states, y_dots, p_dots = forward_sweep(scheme, h_dot, Y.shape[0], stage, keep_states, True)
    return h_dot, states, _stack(y_dots, Y.shape[0]), _stack(p_dots, Y.shape[0])


def _per_step(Q: Tensor) -> Tensor:
    """The gradient of each u_t: the sum of q over the stage evaluations of input step t."""
    return Q[:, 0] if Q.shape[1] == 1 else Q.sum(dim=1)


def _add(total: dict[str, Tensor], part: dict[str, Tensor]) -> dict[str, Tensor]:
    return part if not total else {name: total[name] + part[name] for name in total}


class _Tape:
    """The records (Y, S) of every segment: kept by the forward pass, or recomputed from the segment's start state."""

    def __init__(self, field: LureField, plan: _Plan, u: Tensor, kept: tuple[Tensor, ...]) -> None:
        self.field, self.plan, self.u, self.kept = field, plan, u, kept

    def records(self, k: int) -> tuple[Tensor, Tensor]:
        if not self.plan.recompute:
            return self.kept[2 * k], self.kept[2 * k + 1]
        t0, t1 = self.plan.bounds[k]
        _, _, Y, S = _forward(self.field, self.plan.scheme, self.kept[k], self.u[t0:t1], False, True)
        return Y, S


class _Recurrence(torch.autograd.Function):
    """(u, A, W, B) -> states; backward through :class:`_Adjoint`."""

    @staticmethod
    def forward(ctx, u: Tensor, A: Tensor | None, W: Tensor, B: Tensor | None, plan: _Plan) -> Tensor:
        field = plan.field(A, W, B)
        h = u.new_zeros(u.shape[1], W.shape[0])
        states: list[Tensor] = []
        kept: list[Tensor] = []
        for t0, t1 in plan.bounds:
            if plan.recompute:
                kept.append(h)
            h, part, Y, S = _forward(field, plan.scheme, h, u[t0:t1], plan.keep_states, not plan.recompute)
            if not plan.recompute:
                kept += [Y, S]
            states.extend(part)
        ctx.save_for_backward(u, A, W, B, *kept)
        ctx.plan = plan
        return torch.stack(states) if plan.keep_states else h

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        u, A, W, B, *kept = ctx.saved_tensors
        tape = _Tape(ctx.plan.field(*(None if t is None else t.detach() for t in (A, W, B))), ctx.plan, u.detach(),
                     tuple(t.detach() for t in kept))
        grads = list(_Adjoint.apply(grad, u, A, W, B, tape, ctx.plan, torch.is_grad_enabled()))
        du, dW = grads.pop(0), grads.pop(0)
        dA = grads.pop(0) if A is not None else None
        dB = grads.pop(0) if B is not None else None
        return du, dA, dW, dB, None


class _Adjoint(torch.autograd.Function):
    """(gbar, u, A, W, B) -> (du, dW[, dA][, dB]) = J^T gbar; its backward is the R-operator (module docstring)."""

    @staticmethod
    def forward(ctx, grad: Tensor, u: Tensor, A: Tensor | None, W: Tensor, B: Tensor | None,
                tape: _Tape, plan: _Plan, differentiable: bool) -> tuple[Tensor, ...]:
        field = plan.field(A, W, B)
        lam = None if plan.keep_states else grad
        segments = len(plan.bounds)
        ends: list[Tensor | None] = [None] * segments
        adjoints: list[Tensor | None] = [None] * segments
        weights: dict[str, Tensor] = {}
        workspace = _Workspace(max(t1 - t0 for t0, t1 in plan.bounds))
        # du is written segment by segment (the records may live in the workspace), except under
        # the vmap of is_grads_batched, where nothing can be written into a buffer.
        du = None if _legacy_batched(grad) else u.new_empty(u.shape)
        du_parts: list[Tensor] = []
        for k in reversed(range(segments)):
            t0, t1 = plan.bounds[k]
            Y, S = tape.records(k)
            ends[k] = lam
            lam, _, X = _adjoint(field, plan.scheme, lam, grad[t0:t1] if plan.keep_states else None, S, workspace,
                                 keep_records=differentiable or du is None)
            weights = _add(weights, field.weight_gradients(Y, S, X))
            Q = field.split_record(X)[1]
            if du is None:
                du_parts.append(_per_step(Q))
            else:
                torch.sum(Q, dim=1, out=du[t0:t1])
            if differentiable and not plan.recompute:
                adjoints[k] = X
        if differentiable:
            # Stored mode keeps the records; recompute mode the cotangents and lambda at every later segment's end.
            ctx.save_for_backward(u, A, W, B, *(adjoints if not plan.recompute else (grad, *ends[:-1])))
            ctx.tape, ctx.plan = tape, plan
        outputs = [torch.cat(du_parts[::-1]) if du is None else du, weights["W"]]
        outputs += [weights[name] for name in ("A", "B") if name in weights]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, v_u: Tensor, v_W: Tensor, *rest: Tensor) -> tuple[Tensor | None, ...]:
        u, A, W, B, *kept = ctx.saved_tensors
        with torch.no_grad():
            results = _r_operator(ctx.plan, ctx.tape, ctx.plan.field(A, W, B), kept, v_u, v_W, rest)
        if not torch.is_grad_enabled():
            return results
        # create_graph=True: the results depend on (u, A, W, B) through terms this node does not
        # differentiate, so a further derivative must fail rather than miss them.
        sources = [t for t in (u, A, W, B, v_u, v_W, *rest) if t is not None and t.requires_grad]
        present = [i for i, r in enumerate(results) if r is not None]
        marked = list(_ThirdOrder.apply(len(present), *[results[i] for i in present], *sources))
        return tuple(marked.pop(0) if r is not None else None for r in results)


class _ThirdOrder(torch.autograd.Function):
    """Passes the R-operator's results through; differentiating them raises (no third derivatives)."""

    @staticmethod
    def forward(ctx, count: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[None, ...]:
        raise RuntimeError("the recurrence engine's Hessian-vector products are differentiable once only; "
                           "for third derivatives set the model's engine to 'autograd'")


def _r_operator(plan: _Plan, tape: _Tape, field: LureField, kept: list[Tensor], v_u: Tensor, v_W: Tensor,
                rest: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    """The backward of :class:`_Adjoint`: cotangents of (gbar, u, A, W, B, tape, plan, differentiable)."""
    rest_list = list(rest)
    direction = {"W": v_W}
    if field.has_a:
        direction["A"] = rest_list.pop(0)
    if field.has_b:
        direction["B"] = rest_list.pop(0)
    scheme, bounds = plan.scheme, plan.bounds
    batch = v_u.shape[1]
    # Forward in time: the tangent of the states, kept at every segment start (and every state if returned).
    h_dot = v_u.new_zeros(batch, field.n)
    starts: list[Tensor] = []
    state_dots: list[Tensor] = []
    tangents: list[tuple[Tensor, Tensor, Tensor]] = []
    for k, (t0, t1) in enumerate(bounds):
        starts.append(h_dot)
        Y, S = tape.records(k)
        D = field.derivative(S)
        h_dot, part, Y_dot, P_dot = _tangent(field, scheme, h_dot, Y, S, D, direction, v_u[t0:t1], plan.keep_states)
        state_dots.extend(part)
        if not plan.recompute:
            tangents.append((D, Y_dot, P_dot))
    # Backward in time: the second-order adjoint, segment by segment.
    if plan.recompute:
        grad, *later = kept
        ends = [*later, None if plan.keep_states else grad]
    lam_dot = v_u.new_zeros(batch, field.n)
    du_parts: list[Tensor] = []
    weights: dict[str, Tensor] = {}
    for k in reversed(range(len(bounds))):
        t0, t1 = bounds[k]
        Y, S = tape.records(k)
        if plan.recompute:
            _, D, X = _adjoint(field, scheme, ends[k], grad[t0:t1] if plan.keep_states else None, S)
            _, _, Y_dot, P_dot = _tangent(field, scheme, starts[k], Y, S, D, direction, v_u[t0:t1], False)
        else:
            (D, Y_dot, P_dot), X = tangents[k], kept[k]
        R, P = field.second_order_terms(S, D, X, P_dot, direction)
        r, p, d = _rows(R), _rows(P), _rows(D)

        def stage(l: int, g_dot: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
            return field.vjp_dot(g_dot, d[l], r[l], p[l], base)  # noqa: B023 (called within this segment only)

        lam_dot, records = backward_sweep(scheme, lam_dot, t1 - t0, None, stage)
        X_dot = _stack(records, t1 - t0)
        weights = _add(weights, field.second_order_gradients(Y, Y_dot, S, D, P_dot, X, X_dot))
        du_parts.append(_per_step(field.split_record(X_dot)[1]))
    du_parts.reverse()
    grad_dot = torch.stack(state_dots) if plan.keep_states else h_dot
    return (grad_dot, torch.cat(du_parts), weights.get("A"), weights["W"], weights.get("B"), None, None, None)


def lure_recurrence(inputs: Tensor, A: Tensor | None, W: Tensor, B: Tensor | None = None, *, scheme: Scheme,
                    keep_states: bool = False, segment: int | None = None) -> Tensor:
    """The states of h_t = Phi(h_{t-1}, u_t), h_0 = 0 (module docstring), as one autograd node.

    ``inputs`` holds u_1..u_T time-major, shape (T, batch, n); A (or None: zero), W and B (or
    None: identity) are n x n in the column convention, in the dtype and on the device of
    ``inputs``. Returns h_1..h_T, shape (T, batch, n), with ``keep_states``, else h_T, shape
    (batch, n). ``segment``: None stores every stage record, K recomputes them per segment of K
    input steps in the backward passes. Without a graph to build (no grad mode or nothing that
    requires grad) nothing is recorded.
    """
    if not isinstance(inputs, Tensor) or inputs.ndim != 3 or inputs.shape[0] == 0 or not inputs.is_floating_point():
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise InputError(f"inputs must be a floating-point tensor of shape (T >= 1, batch, n), got {shape}")
    n = inputs.shape[-1]
    if not isinstance(W, Tensor):
        raise InputError(f"W must be a tensor, got {type(W).__name__}")
    for name, matrix in (("A", A), ("W", W), ("B", B)):
        if matrix is None:
            continue
        if matrix.shape != (n, n):
            raise InputError(f"{name} must be {n} x {n} like the inputs' last axis, got shape {tuple(matrix.shape)}")
        if matrix.dtype != inputs.dtype or matrix.device != inputs.device:
            raise InputError(f"{name} is {matrix.dtype} on {matrix.device}, the inputs {inputs.dtype} on {inputs.device}")
    if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int) or segment < 1):
        raise InputError(f"segment must be None or a positive integer, got {segment!r}")
    beta = 1.0
    if scheme.method == "euler" and A is not None and B is None:
        # h + eps (A h + tanh(W h + u)) = (I + eps A) h + eps tanh(W h + u): one operation less per step.
        A = torch.add(torch.eye(n, dtype=A.dtype, device=A.device), A, alpha=scheme.c[0])
        scheme, beta = Scheme("map", None, scheme.substeps, ((),), (1.0,), residual=False), scheme.c[0]
    plan = _make_plan(scheme, beta, bool(keep_states), segment, inputs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (inputs, A, W, B)):
        return _Recurrence.apply(inputs, A, W, B, plan)
    field = plan.field(A, W, B)
    h = inputs.new_zeros(inputs.shape[1], n)
    states: list[Tensor] = []
    for t0, t1 in plan.bounds:
        h, part, _, _ = _forward(field, scheme, h, inputs[t0:t1], plan.keep_states, False)
        states.extend(part)
    return torch.stack(states) if plan.keep_states else h
