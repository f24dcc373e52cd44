"""The recurrence h_t = Phi(h_{t-1}, u_t), h_0 = 0, as one autograd node per sequence.

Phi is one input step of a scheme (:mod:`.schemes`) on the field f(h, u) = A h + B tanh(W h + u)
(:mod:`.field`). :func:`lure_recurrence` takes u_1..u_T (the input projections U x_t + b of all
steps, computed beforehand in one product) and returns h_1..h_T or h_T.

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

Memory: by default every stage input y and s = tanh(p) are stored (O(T * batch * n * stages)).
``segment=K`` stores only the state at the start of every K-th input step and recomputes a
segment's stage records in the backward passes (O((T / K + K * stages) * batch * n));
``sqrt_segment(T)`` = ceil(sqrt(T)) balances the two. Both modes compute the same numbers.
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

__all__ = ["lure_recurrence", "sqrt_segment"]


def sqrt_segment(steps: int) -> int:
    """ceil(sqrt(steps)): the segment length that minimises stored states plus one segment's records."""
    return max(1, math.isqrt(steps - 1) + 1) if steps > 1 else 1


@dataclass(frozen=True)
class _Plan:
    scheme: Scheme
    keep_states: bool
    segment: int | None

    def bounds(self, steps: int) -> list[tuple[int, int]]:
        """[t0, t1) of every segment (one segment when every record is stored)."""
        length = steps if self.segment is None else self.segment
        return [(t0, min(t0 + length, steps)) for t0 in range(0, steps, length)]


def _stack(records: list[Tensor], steps: int) -> Tensor:
    """Stage records in stage order as (steps, substeps * stages, batch, width)."""
    stacked = torch.stack(records)
    return stacked.reshape(steps, -1, *stacked.shape[1:])


def _run(field: LureField, scheme: Scheme, h: Tensor, u_padded: Tensor,
         keep_states: bool) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """(last state, states, Y, S) over the input steps of ``u_padded`` from h."""
    inputs = u_padded.unbind(0)

    def stage(t: int, l: int, y: Tensor) -> tuple[Tensor, Tensor]:
        return field.value(y, inputs[t])

    h, states, ys, ss = forward_sweep(scheme, h, len(inputs), stage, keep_states)
    return h, states, _stack(ys, len(inputs)), _stack(ss, len(inputs))


def _adjoint(field: LureField, scheme: Scheme, lam: Tensor | None, cotangents: Tensor | None,
             S: Tensor, keep_g: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(cotangent of the segment's start state, D, G, Q) for one segment with records S."""
    steps = S.shape[0]
    D = 1.0 - S * S
    d = D.reshape(-1, *D.shape[2:]).unbind(0)

    def stage(l: int, g: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        return field.vjp(g, d[l], base)

    lam, gs, qs = backward_sweep(scheme, lam, steps, cotangents, stage, keep_g)
    return lam, D, (_stack(gs, steps) if keep_g else None), _stack(qs, steps)


def _add(total: dict[str, Tensor], part: dict[str, Tensor]) -> dict[str, Tensor]:
    return part if not total else {name: total[name] + part[name] for name in total}


class _Recurrence(torch.autograd.Function):
    """(u, A, W, B) -> states; backward through :class:`_Adjoint`."""

    @staticmethod
    def forward(ctx, u: Tensor, A: Tensor | None, W: Tensor, B: Tensor | None, plan: _Plan) -> Tensor:
        field = LureField(A, W, B)
        u_padded = field.pad(u)
        h = u.new_zeros(u.shape[1], W.shape[0])
        states: list[Tensor] = []
        if plan.segment is None:
            h, states, Y, S = _run(field, plan.scheme, h, u_padded, plan.keep_states)
            kept = (Y, S)
        else:
            starts = []
            with torch.no_grad():
                for t0, t1 in plan.bounds(u.shape[0]):
                    starts.append(h)
                    h, part = _forward_only(field, plan.scheme, h, u_padded[t0:t1], plan.keep_states)
                    states.extend(part)
            kept = (torch.stack(starts),)
        ctx.save_for_backward(u, A, W, B, *kept)
        ctx.plan = plan
        return torch.stack(states) if plan.keep_states else h

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        u, A, W, B, *kept = ctx.saved_tensors
        tape = tuple(t.detach() for t in kept)
        grads = _Adjoint.apply(grad, u, A, W, B, tape, ctx.plan, torch.is_grad_enabled())
        du, dW, rest = grads[0], grads[1], list(grads[2:])
        dA = rest.pop(0) if A is not None else None
        dB = rest.pop(0) if B is not None else None
        return du, dA, dW, dB, None


def _forward_only(field: LureField, scheme: Scheme, h: Tensor, u_padded: Tensor,
                  keep_states: bool) -> tuple[Tensor, list[Tensor]]:
    """The states over one segment without stage records."""
    inputs = u_padded.unbind(0)
    h_end, states, _, _ = forward_sweep(scheme, h, len(inputs), lambda t, l, y: field.value(y, inputs[t]), keep_states)
    return h_end, states


class _Segments:
    """The stage records of each segment: stored by the forward pass, or recomputed from its start state."""

    def __init__(self, field: LureField, plan: _Plan, u_padded: Tensor, tape: tuple[Tensor, ...]) -> None:
        self.field, self.plan, self.u_padded = field, plan, u_padded
        self.bounds = plan.bounds(u_padded.shape[0])
        self.tape = tape

    def records(self, k: int) -> tuple[Tensor, Tensor]:
        """(Y, S) of segment k."""
        if self.plan.segment is None:
            return self.tape[0], self.tape[1]
        t0, t1 = self.bounds[k]
        _, _, Y, S = _run(self.field, self.plan.scheme, self.tape[0][k], self.u_padded[t0:t1], keep_states=False)
        return Y, S


class _Adjoint(torch.autograd.Function):
    """(gbar, u, A, W, B) -> (du, dW[, dA][, dB]) = J^T gbar; its backward is the R-operator (module docstring)."""

    @staticmethod
    def forward(ctx, grad: Tensor, u: Tensor, A: Tensor | None, W: Tensor, B: Tensor | None,
                tape: tuple[Tensor, ...], plan: _Plan, differentiable: bool) -> tuple[Tensor, ...]:
        field = LureField(A, W, B)
        segments = _Segments(field, plan, field.pad(u), tape)
        cotangents = grad if plan.keep_states else None
        lam = None if plan.keep_states else grad
        ends: list[Tensor | None] = [None] * len(segments.bounds)
        du_parts: list[Tensor] = []
        weights: dict[str, Tensor] = {}
        cache = None
        for k in reversed(range(len(segments.bounds))):
            t0, t1 = segments.bounds[k]
            Y, S = segments.records(k)
            ends[k] = lam
            lam, _, G, Q = _adjoint(field, plan.scheme, lam, None if cotangents is None else cotangents[t0:t1], S,
                                    field.keeps_g)
            weights = _add(weights, field.weight_gradients(Y, S, G, Q))
            du_parts.append(Q.sum(dim=1))
            if differentiable and plan.segment is None:
                cache = (G, Q)
        if differentiable:
            # Stored mode keeps G and Q; segment mode the cotangents and lambda at every later segment's end.
            kept = cache if plan.segment is None else (grad, *ends[:-1])
            ctx.save_for_backward(u, A, W, B, *kept)
            ctx.tape, ctx.plan = tape, plan
        du_parts.reverse()
        outputs = [torch.cat(du_parts), weights["W"]]
        outputs += [weights[name] for name in ("A", "B") if name in weights]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, v_u: Tensor, v_W: Tensor, *rest: Tensor) -> tuple[Tensor | None, ...]:
        u, A, W, B, *kept = ctx.saved_tensors
        with torch.no_grad():
            results = _r_operator(ctx, u, A, W, B, kept, v_u, v_W, rest)
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


def _r_operator(ctx, u: Tensor, A: Tensor | None, W: Tensor, B: Tensor | None, kept: list[Tensor],
                v_u: Tensor, v_W: Tensor, rest: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    """The backward of :class:`_Adjoint`: cotangents of (gbar, u, A, W, B, tape, plan, differentiable)."""
    plan: _Plan = ctx.plan
    field = LureField(A, W, B)
    rest_list = list(rest)
    direction = {"W": v_W}
    if field.has_a:
        direction["A"] = rest_list.pop(0)
    if field.has_b:
        direction["B"] = rest_list.pop(0)
    segments = _Segments(field, plan, field.pad(u), ctx.tape)
    scheme, bounds = plan.scheme, segments.bounds
    # Forward in time: the tangent of the states, kept at every segment start (and every state if returned).
    h_dot = u.new_zeros(u.shape[1], W.shape[0])
    starts: list[Tensor] = []
    state_dots: list[Tensor] = []
    stored = None
    for k, (t0, t1) in enumerate(bounds):
        starts.append(h_dot)
        Y, S = segments.records(k)
        D = 1.0 - S * S
        h_dot, part, Y_dot, P_dot = _tangent(field, scheme, h_dot, Y, S, D, direction, v_u[t0:t1], plan.keep_states)
        state_dots.extend(part)
        if plan.segment is None:
            stored = (Y, S, D, Y_dot, P_dot)
    # Backward in time: the second-order adjoint, segment by segment.
    if plan.segment is None:
        G, Q = kept
    else:
        grad, *later = kept
        ends = [*later, None if plan.keep_states else grad]
    lam_dot = u.new_zeros(u.shape[1], W.shape[0])
    du_parts: list[Tensor] = []
    weights: dict[str, Tensor] = {}
    for k in reversed(range(len(bounds))):
        t0, t1 = bounds[k]
        if plan.segment is None:
            Y, S, D, Y_dot, P_dot = stored
        else:
            Y, S = segments.records(k)
            cotangents = grad[t0:t1] if plan.keep_states else None
            _, D, G, Q = _adjoint(field, scheme, ends[k], cotangents, S, field.keeps_g)
            _, _, Y_dot, P_dot = _tangent(field, scheme, starts[k], Y, S, D, direction, v_u[t0:t1], False)
        R, P = field.second_order_terms(S, D, G, Q, P_dot, direction)
        r, p, d = (x.reshape(-1, *x.shape[2:]).unbind(0) for x in (R, P, D))

        def stage(l: int, g_dot: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
            return field.vjp_dot(g_dot, d[l], r[l], p[l], base)

        lam_dot, g_dots, q_dots = backward_sweep(scheme, lam_dot, t1 - t0, None, stage, field.keeps_g)
        G_dot = _stack(g_dots, t1 - t0) if field.keeps_g else None
        Q_dot = _stack(q_dots, t1 - t0)
        weights = _add(weights, field.second_order_gradients(Y, Y_dot, S, D, P_dot, G, Q, G_dot, Q_dot))
        du_parts.append(Q_dot.sum(dim=1))
    du_parts.reverse()
    grad_dot = torch.stack(state_dots) if plan.keep_states else h_dot
    return (grad_dot, torch.cat(du_parts), weights.get("A"), weights["W"], weights.get("B"), None, None, None)


def _tangent(field: LureField, scheme: Scheme, h_dot: Tensor, Y: Tensor, S: Tensor, D: Tensor,
             direction: dict[str, Tensor], u_dot: Tensor, keep_states: bool) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """(last tangent, tangents of the states, Y_dot, P_dot) over one segment from the tangent h_dot of its start."""
    C, E = field.tangent_terms(Y, S, direction, u_dot[:, None])
    c = C.reshape(-1, *C.shape[2:]).unbind(0)
    e = None if E is None else E.reshape(-1, *E.shape[2:]).unbind(0)
    d = D.reshape(-1, *D.shape[2:]).unbind(0)

    def stage(t: int, l: int, y_dot: Tensor) -> tuple[Tensor, Tensor]:
        return field.jvp(y_dot, d[l], c[l], None if e is None else e[l])

    h_dot, states, y_dots, p_dots = forward_sweep(scheme, h_dot, Y.shape[0], stage, keep_states)
    return h_dot, states, _stack(y_dots, Y.shape[0]), _stack(p_dots, Y.shape[0])


def lure_recurrence(inputs: Tensor, A: Tensor | None, W: Tensor, B: Tensor | None = None, *, scheme: Scheme,
                    keep_states: bool = False, segment: int | None = None) -> Tensor:
    """The states of h_t = Phi(h_{t-1}, u_t), h_0 = 0 (module docstring), as one autograd node.

    ``inputs`` holds u_1..u_T time-major, shape (T, batch, n); A (or None: zero), W and B (or
    None: identity) are n x n in the column convention, in the dtype and on the device of
    ``inputs``. Returns h_1..h_T, shape (T, batch, n), with ``keep_states``, else h_T, shape
    (batch, n). ``segment``: None stores every stage record, K recomputes them per segment of K
    input steps in the backward passes.
    """
    if inputs.ndim != 3 or inputs.shape[0] == 0:
        raise InputError(f"inputs must have shape (T >= 1, batch, n), got {tuple(inputs.shape)}")
    n = inputs.shape[-1]
    for name, matrix in (("A", A), ("W", W), ("B", B)):
        if matrix is None:
            continue
        if matrix.shape != (n, n):
            raise InputError(f"{name} must be {n} x {n} like the inputs' last axis, got shape {tuple(matrix.shape)}")
        if matrix.dtype != inputs.dtype or matrix.device != inputs.device:
            raise InputError(f"{name} is {matrix.dtype} on {matrix.device}, the inputs {inputs.dtype} on {inputs.device}")
    if not inputs.is_floating_point():
        raise InputError(f"inputs must be floating point, got {inputs.dtype}")
    if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int) or segment < 1):
        raise InputError(f"segment must be None or a positive integer, got {segment!r}")
    if W is None:
        raise InputError("W is required")
    return _Recurrence.apply(inputs, A, W, B, _Plan(scheme, bool(keep_states), segment))
