"""The field f(y, u) = A y + B tanh(W y + u) and the derivatives the engine's sweeps need.

Column convention for the matrices, row convention for the batch (one row per sequence): with
z = y [A^T | W^T] + [0 | u], a = z_:n, p = z_n: and s = tanh(p), the field is k = a + s B^T.
A is None when it is zero and B None when it is the identity; neither is then multiplied.

First order (cotangent g of k, D = 1 - s^2 = tanh'(p)):

    q = (g B) * D,   y_bar = g A + q W = [g | q] [A; W],
    dA += g^T y,   dW += q^T y,   dB += g^T s,   du += q.

Tangent along (y_dot; A_dot, W_dot, B_dot, u_dot):

    p_dot = y_dot W^T + (y W_dot^T + u_dot),   k_dot = y_dot A^T + y A_dot^T + (D * p_dot) B^T + s B_dot^T.

Second order, the derivative of the first-order map along the tangent (g_dot given; tanh'' = -2 s D):

    q_dot = (g_dot B) * D + R,   R = (g B_dot) * D - 2 s * q * p_dot,
    y_bar_dot = [g_dot | q_dot] [A; W] + P,   P = g A_dot + q W_dot,
    dA_dot += g_dot^T y + g^T y_dot,   dW_dot += q_dot^T y + q^T y_dot,
    dB_dot += g_dot^T s + g^T (D * p_dot),   du_dot += q_dot.

The terms in brackets, R and P involve only stored quantities and the direction, so they are
formed for all steps at once (``tangent_terms``, ``second_order_terms``); the per-step work is
one fused product with [A^T | W^T] or [A; W] (and one with B or B^T when B is given).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LureField"]


def _rows(tensor: Tensor) -> Tensor:
    """All leading axes as rows: (..., width) -> (rows, width)."""
    return tensor.reshape(-1, tensor.shape[-1])


class LureField:
    """f(y, u) = A y + B tanh(W y + u) for matrices A (or None: zero), W and B (or None: identity)."""

    def __init__(self, A: Tensor | None, W: Tensor, B: Tensor | None) -> None:
        self.n = W.shape[0]
        self.A, self.W, self.B = A, W, B
        self.has_a, self.has_b = A is not None, B is not None
        # z = y @ forward_matrix gives [a | p - u]; y_bar = [g | q] @ backward_matrix.
        self.backward_matrix = torch.cat([A, W], dim=0) if self.has_a else W
        self.forward_matrix = self.backward_matrix.T
        self.B_T = B.T if self.has_b else None

    @property
    def keeps_g(self) -> bool:
        """Whether the weight gradients need the cotangents g of k (they do for A and B)."""
        return self.has_a or self.has_b

    def pad(self, u: Tensor) -> Tensor:
        """The additive term of z: [0 | u] when A is given, else u."""
        return torch.cat([torch.zeros_like(u), u], dim=-1) if self.has_a else u

    def _split(self, z: Tensor) -> tuple[Tensor | None, Tensor]:
        return (z[..., :self.n], z[..., self.n:]) if self.has_a else (None, z)

    def _output(self, a: Tensor | None, s: Tensor) -> Tensor:
        """k = a + s B^T (a None: zero)."""
        if self.has_b:
            return s @ self.B_T if a is None else torch.addmm(a, s, self.B_T)
        return s if a is None else a + s

    # -- per step ---------------------------------------------------------------------------

    def value(self, y: Tensor, u_padded: Tensor) -> tuple[Tensor, Tensor]:
        """(k, s): the field at y and s = tanh(p)."""
        a, p = self._split(torch.addmm(u_padded, y, self.forward_matrix))
        s = torch.tanh(p)
        return self._output(a, s), s

    def vjp(self, g: Tensor, d: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        """(base + y_bar, q) for the cotangent g of k, with d = tanh'(p)."""
        q = (g @ self.B if self.has_b else g) * d
        gq = torch.cat([g, q], dim=1) if self.has_a else q
        y_bar = gq @ self.backward_matrix if base is None else torch.addmm(base, gq, self.backward_matrix)
        return y_bar, q

    def jvp(self, y_dot: Tensor, d: Tensor, c: Tensor, e: Tensor | None) -> tuple[Tensor, Tensor]:
        """(k_dot, p_dot) for the tangent y_dot of y; c = y [A_dot^T | W_dot^T] + [0 | u_dot], e = s B_dot^T."""
        a_dot, p_dot = self._split(torch.addmm(c, y_dot, self.forward_matrix))
        if e is not None:
            a_dot = e if a_dot is None else a_dot + e
        return self._output(a_dot, d * p_dot), p_dot

    def vjp_dot(self, g_dot: Tensor, d: Tensor, r: Tensor, p: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        """(base + y_bar_dot, q_dot) for the derivative g_dot of g; r and p are R and P of the module docstring."""
        q_dot = torch.addcmul(r, g_dot @ self.B if self.has_b else g_dot, d)
        gq = torch.cat([g_dot, q_dot], dim=1) if self.has_a else q_dot
        y_bar_dot = torch.addmm(p if base is None else p + base, gq, self.backward_matrix)
        return y_bar_dot, q_dot

    # -- all steps at once (rows of Y, S, G, Q: one per stage evaluation and sequence) ----------

    def weight_gradients(self, Y: Tensor, S: Tensor, G: Tensor | None, Q: Tensor) -> dict[str, Tensor]:
        """{"A": sum g^T y, "W": sum q^T y, "B": sum g^T s} (A, B only where given)."""
        Y = _rows(Y)
        grads = {"W": _rows(Q).T @ Y}
        if self.has_a:
            grads["A"] = _rows(G).T @ Y
        if self.has_b:
            grads["B"] = _rows(G).T @ _rows(S)
        return grads

    def tangent_terms(self, Y: Tensor, S: Tensor, direction: dict[str, Tensor], u_dot: Tensor) -> tuple[Tensor, Tensor | None]:
        """(c, e) for every stage evaluation: c = y [A_dot^T | W_dot^T] + [0 | u_dot], e = s B_dot^T or None.

        ``u_dot`` broadcasts against Y's leading axes (one row block per input step)."""
        dot_matrix = torch.cat([direction["A"], direction["W"]], dim=0) if self.has_a else direction["W"]
        c = Y @ dot_matrix.T + self.pad(u_dot)
        e = S @ direction["B"].T if self.has_b else None
        return c, e

    def second_order_terms(self, S: Tensor, D: Tensor, G: Tensor | None, Q: Tensor, P_dot: Tensor,
                           direction: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(R, P) of the module docstring for every stage evaluation (P_dot: the tangents of p)."""
        R = -2.0 * S * Q * P_dot
        if self.has_b:
            R = torch.addcmul(R, G @ direction["B"], D)
        P = Q @ direction["W"]
        if self.has_a:
            P = P + G @ direction["A"]
        return R, P

    def second_order_gradients(self, Y: Tensor, Y_dot: Tensor, S: Tensor, D: Tensor, P_dot: Tensor,
                               G: Tensor | None, Q: Tensor, G_dot: Tensor | None, Q_dot: Tensor) -> dict[str, Tensor]:
        """The derivatives of ``weight_gradients`` along the tangent (module docstring)."""
        Y, Y_dot = _rows(Y), _rows(Y_dot)
        grads = {"W": _rows(Q_dot).T @ Y + _rows(Q).T @ Y_dot}
        if self.has_a:
            grads["A"] = _rows(G_dot).T @ Y + _rows(G).T @ Y_dot
        if self.has_b:
            grads["B"] = _rows(G_dot).T @ _rows(S) + _rows(G).T @ _rows(D * P_dot)
        return grads
