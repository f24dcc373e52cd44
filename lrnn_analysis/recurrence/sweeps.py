"""The four time loops of the engine, over the input steps of one segment.

A scheme (:mod:`.schemes`) applies a field f ``substeps`` times per input step, each time
through its s stages. Stage evaluations are numbered l = (t * substeps + j) * s + i (input step
t, application j, stage i); the records of a segment stack them in that order.

* forward: h -> h+ (module docstring of :mod:`.schemes`), recording the stage inputs y_l and one
  more tensor per stage (s = tanh(p) for the state, p_dot for its tangent);
* backward: the transpose of the step's Jacobian applied to the cotangent lambda of h+,

      g_i = c_i lambda + sum_{j>i} a_ji y_bar_j,   y_bar_i = (stage vjp)(g_i),
      lambda <- lambda + sum_i y_bar_i   (``residual``),   or   lambda <- y_bar_1   (``map``),

  recording what the weight gradients need (g_l and q_l). The same loop with the derivative of
  the stage vjp (and lambda_dot for lambda) is the second-order adjoint; the forward loop with
  the field's tangent is the tangent pass. The tableau is linear, so only the stage functions
  differ between the loops.

The engine runs the first-order backward of a one-stage map in a buffer of its own instead
(:func:`lrnn_analysis.recurrence.engine._map_adjoint`, the same numbers).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .schemes import Scheme

__all__ = ["backward_sweep", "combine", "forward_sweep"]

# (input step t, stage evaluation l, stage input y) -> (k, recorded tensor)
ForwardStage = Callable[[int, int, Tensor], tuple[Tensor, Tensor]]
# (stage evaluation l, cotangent g of k, base or None) -> (base + y_bar, record)
BackwardStage = Callable[[int, Tensor, Tensor | None], tuple[Tensor, Tensor]]


def combine(base: Tensor | None, coefficients: Sequence[float], tensors: Sequence[Tensor | None]) -> Tensor | None:
    """base + sum_i coefficients[i] * tensors[i], skipping zero coefficients (base None: no base)."""
    total = base
    for coefficient, tensor in zip(coefficients, tensors):
        if coefficient == 0:
            continue
        if total is None:
            total = tensor if coefficient == 1 else coefficient * tensor
        elif coefficient == 1:
            total = total + tensor
        else:
            total = torch.add(total, tensor, alpha=coefficient)
    return total


def forward_sweep(scheme: Scheme, h: Tensor, steps: int, stage: ForwardStage, keep_states: bool,
                  record: bool) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Run ``steps`` input steps from h: (last state, states after each step if ``keep_states``,
    stage inputs y_l and recorded tensors in stage order if ``record``)."""
    states: list[Tensor] = []
    inputs: list[Tensor] = []
    recorded: list[Tensor] = []
    s, l = scheme.stages, 0
    for t in range(steps):
        for _ in range(scheme.substeps):
            ks: list[Tensor] = []
            for i in range(s):
                y = combine(h, scheme.a[i], ks)
                k, extra = stage(t, l, y)
                ks.append(k)
                if record:
                    inputs.append(y)
                    recorded.append(extra)
                l += 1
            h = combine(h if scheme.residual else None, scheme.c, ks)
        if keep_states:
            states.append(h)
    return h, states, inputs, recorded


def backward_sweep(scheme: Scheme, lam: Tensor | None, steps: int, state_cotangents: Tensor | None,
                   stage: BackwardStage) -> tuple[Tensor, list[Tensor]]:
    """The adjoint of :func:`forward_sweep` over ``steps`` input steps, from the cotangent ``lam`` of
    the last state (None: zero) plus ``state_cotangents[t]`` of each state t (None: none).

    Returns the cotangent of the state before the first step (without its own cotangent from
    outside), and the stage's records in stage order.
    """
    s, m = scheme.stages, scheme.substeps
    records: list[Tensor] = []
    for t in reversed(range(steps)):
        if state_cotangents is not None:
            lam = state_cotangents[t] if lam is None else lam + state_cotangents[t]
        for j in reversed(range(m)):
            first = (t * m + j) * s
            y_bars: list[Tensor | None] = [None] * s
            for i in reversed(range(s)):
                later = range(i + 1, s)
                g = combine(None, (scheme.c[i], *(scheme.a[r][i] for r in later)), (lam, *(y_bars[r] for r in later)))
                base = combine(lam if scheme.residual else None, (1.0,) * (s - 1), y_bars[1:]) if i == 0 else None
                y_bars[i], record = stage(first + i, g, base)
                records.append(record)
            lam = y_bars[0]
    records.reverse()
    return lam, records
