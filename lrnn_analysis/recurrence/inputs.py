"""The inputs u_1..u_T of the engine's recurrence: a tensor, or the affine projection u_t = x_t U^T + b
formed segment by segment inside the engine.

Formed per segment, neither u nor its cotangent du exists as a whole-sequence tensor: at sMNIST size
(T = 784, batch = n = 128) each is 51 MB, written once and read back, where a segment's stays in
cache (``python bench/recurrence.py``). The projection's derivatives, for the cotangents du_t of u_t:

    dx_t = du_t U,   dU = sum_t du_t^T x_t,   db = sum_t du_t;

its tangent along (x_dot, U_dot, b_dot): u_dot_t = x_dot_t U^T + x_t U_dot^T + b_dot; and, u being
bilinear in (x, U), the derivative of the first-order cotangents along that tangent, given the
second-order cotangents du_dot of u (the R-operator of :mod:`.engine`):

    dx_dot = du_dot U + du U_dot,   dU_dot = sum_t du_dot_t^T x_t + du_t^T x_dot_t,   db_dot = sum_t du_dot_t.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .field import _rows

__all__ = ["InputGradients", "Inputs"]


class Inputs:
    """u_t = ``x[t]`` (``weight`` None) or x_t weight^T + bias (bias None: none), x time-major."""

    def __init__(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
        self.x, self.weight, self.bias = x, weight, bias
        self.affine = weight is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, batch, n) of u."""
        steps, batch, width = self.x.shape
        return steps, batch, (self.weight.shape[0] if self.affine else width)

    def tensors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.x, self.weight, self.bias

    def segment(self, t0: int, t1: int, out: Tensor | None = None) -> Tensor:
        """u_t for t0 <= t < t1, written into ``out`` (t1 - t0, batch, n) if given, which may be strided (the
        engine's forward writes u into the columns of a wider buffer)."""
        x, weight, bias = self.x[t0:t1], self.weight, self.bias
        if out is None:
            return x if not self.affine else torch.nn.functional.linear(x, weight, bias)
        if not self.affine:
            return out.copy_(x)
        if weight.shape[1] == 1:
            # One input feature: u = x U^T + b is an outer product, one elementwise pass.
            return torch.mul(x, weight[:, 0], out=out) if bias is None else torch.addcmul(bias, x, weight[:, 0], out=out)
        if out.stride(0) == out.shape[1] * out.stride(1):
            # The steps and batch axes as one: a product written straight into the rows of out.
            rows, inputs = out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])
            if bias is None:
                torch.mm(inputs, weight.T, out=rows)
            else:
                torch.addmm(bias, inputs, weight.T, out=rows)
            return out
        return out.copy_(torch.nn.functional.linear(x, weight, bias))

    def tangent(self, direction: tuple[Tensor | None, Tensor | None, Tensor | None], t0: int, t1: int) -> Tensor:
        """u_dot_t for t0 <= t < t1 along the direction (x_dot, weight_dot, bias_dot) of the tensors;
        a part that is None does not move."""
        x_dot, weight_dot, bias_dot = direction
        if not self.affine:
            return x_dot[t0:t1] if x_dot is not None else self.x.new_zeros(t1 - t0, *self.x.shape[1:])
        u_dot = torch.nn.functional.linear(self.x[t0:t1], weight_dot, bias_dot)
        if x_dot is not None:
            u_dot = u_dot + torch.nn.functional.linear(x_dot[t0:t1], self.weight)
        return u_dot

    def add_tangent(self, direction: tuple[Tensor | None, Tensor | None, Tensor | None], t0: int, t1: int,
                    out: Tensor) -> None:
        """out += u_dot_t for t0 <= t < t1 (:meth:`tangent`), in place and without forming u_dot where
        out's second axis (the stage evaluations of an input step, over which u_dot is broadcast) has
        one entry; ``out`` (t1 - t0, stages, batch, n) may be strided."""
        if out.shape[1] != 1:
            out.add_(self.tangent(direction, t0, t1)[:, None])
            return
        rows = out[:, 0]
        x_dot, weight_dot, bias_dot = direction
        if not self.affine:
            if x_dot is not None:
                rows.add_(x_dot[t0:t1])
            return
        _add_product(rows, self.x[t0:t1], weight_dot)
        if bias_dot is not None:
            rows.add_(bias_dot)
        if x_dot is not None:
            _add_product(rows, x_dot[t0:t1], self.weight)


def _add_product(out: Tensor, x: Tensor, weight: Tensor) -> None:
    """out += x weight^T in place, for x (steps, batch, d): an outer product with one feature, else
    one product into out's rows where its steps and batch axes merge."""
    if weight.shape[1] == 1:
        out.addcmul_(x, weight[:, 0])
    elif out.stride(0) == out.shape[1] * out.stride(1):
        out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.T)
    else:
        out.add_(x @ weight.T)


class InputGradients:
    """The cotangents of the input tensors, summed segment by segment from the cotangents du of u.

    For the second-order cotangents (``add`` with ``first`` and ``direction``) the bilinear terms of
    the module docstring are added. ``need_x``: whether x's cotangent is formed (always where u is
    given). ``in_place``: write and accumulate into buffers (not under the vmap of is_grads_batched)."""

    def __init__(self, inputs: Inputs, need_x: bool, in_place: bool) -> None:
        self.inputs, self.need_x, self.in_place = inputs, need_x or not inputs.affine, in_place
        self.x_parts: list[tuple[int, Tensor]] = []
        self.x_buffer = inputs.x.new_empty(inputs.x.shape) if self.need_x and in_place else None
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def add(self, t0: int, t1: int, du: Tensor, first: Tensor | None = None,
            direction: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None) -> None:
        """Add the cotangents of u_t0..u_(t1-1), ``du`` (t1 - t0, batch, n); for second-order cotangents
        also the first-order ones ``first`` and the direction of the tensors (module docstring)."""
        inputs = self.inputs
        if not inputs.affine:
            self._add_x(t0, du)
            return
        x, weight = inputs.x[t0:t1], inputs.weight
        x_dot, weight_dot = (None, None) if direction is None else direction[:2]
        weight_part = _rows(du).T @ _rows(x)
        if first is not None and x_dot is not None:
            weight_part = torch.addmm(weight_part, _rows(first).T, _rows(x_dot[t0:t1]))
        self.weight = weight_part if self.weight is None else self._sum(self.weight, weight_part)
        if inputs.bias is not None:
            bias_part = _rows(du).sum(0)
            self.bias = bias_part if self.bias is None else self._sum(self.bias, bias_part)
        if self.need_x:
            x_part = du @ weight
            if first is not None and weight_dot is not None:
                x_part = x_part + first @ weight_dot
            self._add_x(t0, x_part)

    def _sum(self, total: Tensor, part: Tensor) -> Tensor:
        return total.add_(part) if self.in_place else total + part

    def _add_x(self, t0: int, part: Tensor) -> None:
        if self.x_buffer is not None:
            self.x_buffer[t0:t0 + part.shape[0]].copy_(part)
        else:
            self.x_parts.append((t0, part))

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(cotangent of x or u, of weight, of bias): None for a tensor not formed."""
        x = self.x_buffer
        if x is None and self.need_x:
            x = torch.cat([part for _, part in sorted(self.x_parts, key=lambda item: item[0])])
        return x, self.weight, self.bias
