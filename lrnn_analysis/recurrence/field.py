"""The field f(y, u) = A y + beta B tanh(W y + u) and the derivatives the engine's sweeps need.

Column convention for the matrices, row convention for the batch (one row per sequence): with
z = y [A^T | W^T] + [0 | u], a = z_:n, p = z_n: and s = tanh(p), the field is k = a + beta s B^T.
A is None when it is zero and B None when it is the identity; neither is then multiplied. The
constant beta is 1 unless B is None. With ``identity`` the field is y + f(y, u): the engine runs
an Euler step h + eps (A h + tanh(W h + u)) as the map h + h (eps A)^T + eps tanh(W h + u), i.e.
A = eps A and beta = eps, keeping the identity apart so that float32 loses none of eps A's digits
(I + eps A rounded to float32 does). Every formula below then gains the identity's term: k + y,
y_bar + g, k_dot + y_dot, y_bar_dot + g_dot.

First order (cotangent g of k, D = beta tanh'(p) = beta (1 - s^2)):

    q = (g B) * D,   y_bar = g A + q W = [g | q] [A; W],
    dA += g^T y,   dW += q^T y,   dB += g^T s,   du += q.

Tangent along (y_dot; A_dot, W_dot, B_dot, u_dot):

    p_dot = y_dot W^T + (y W_dot^T + u_dot),   k_dot = y_dot A^T + y A_dot^T + (D * p_dot) B^T + s B_dot^T.

Second order, the derivative of the first-order map along the tangent (g_dot given;
d D / d p = -2 s D):

    q_dot = (g_dot B) * D + R,   R = (g B_dot) * D - 2 s * q * p_dot,
    y_bar_dot = [g_dot | q_dot] [A; W] + P,   P = g A_dot + q W_dot,
    dA_dot += g_dot^T y + g^T y_dot,   dW_dot += q_dot^T y + q^T y_dot,
    dB_dot += g_dot^T s + g^T (D * p_dot),   du_dot += q_dot.

The terms in brackets, R and P involve only stored quantities and the direction, so they are
formed for all steps at once (``tangent_terms``, ``second_order_terms``); the per-step work is
one fused product with [A^T | W^T] or [A; W] (and one with B or B^T when B is given). The
backward records X = [g | q] (or q where no gradient needs g), so dA and dW are one product
X^T Y over all rows.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy
import torch
from torch import Tensor

from .products import mm, numpy_allowed, numpy_view

__all__ = ["LureField", "numpy_tanh_rows", "tanh", "tanh_float32", "tanh_rows"]

# Below about this size NumPy's fixed cost per call outweighs what it saves (32 x 32: 5.4 us against torch.tanh's 3.5).
_NUMPY_TANH_MIN_ELEMENTS = 4096


def tanh(p: Tensor, out: Tensor | None = None) -> Tensor:
    """tanh(p), written into ``out`` if given.

    With one intra-op thread (``torch.get_num_threads() == 1``), CPU float32 tensors outside
    autograd go through NumPy's vectorised float64 tanh on views of the same memory, rounded once
    to float32: on this project's CPU torch.tanh takes 1.8 times as long for a 128 x 128 step there
    (38 us against 20 us; 64 x 64: 10 against 8). With two threads torch.tanh splits the work and
    takes 21 us at 128 x 128, so NumPy's single-threaded call gains nothing and is not used; nor
    below 4,096 elements, where NumPy's fixed cost per call is more than it saves
    (``python bench/recurrence.py --breakdown``).

    Accuracy is torch.tanh's or better: float32 within 0.5 units in the last place of tanh
    (torch.tanh: 0.51), relative to tanh itself, so near p = 0 too; ``tests/recurrence/test_field.py``
    measures it on the machine that runs the tests. float64 stays with torch.tanh (within 0.76
    units; NumPy's float64 tanh, 5 times faster, was 1.17 units from tanh where |p| is about 1/2).
    NumPy's float32 tanh is 6 times faster still but within 1.4 units only, which a backward's
    1 - s^2 magnifies near saturation (``test_engine.py -k saturation``): the engine takes it only
    where s is scaled by a step before it reaches a state and tanh'(p) is formed from p
    (:func:`tanh_rows`' ``float32_tanh``, :func:`tanh_float32`). Everything
    else (CUDA, float64 and other dtypes, a graph to record, forward-mode duals, functorch
    transforms, torch.compile's or torch.jit.trace's tracing, a mode watching torch's operations
    (``products.numpy_allowed``), several threads, small tensors, an ``out`` that is not
    contiguous) calls torch.tanh: NumPy writes the primal only, into an ``out``
    whose elements share memory without complaint (torch.tanh refuses it), and past a traced graph,
    which never sees the write (``out`` then holds whatever its memory held).
    """
    if _numpy_tanh(p.numel(), p, out):
        target = torch.empty(p.shape, dtype=p.dtype, device="cpu") if out is None else out
        numpy.tanh(p.detach().numpy(), out=target.detach().numpy(), dtype=numpy.float64, casting="same_kind")
        return target
    return torch.tanh(p) if out is None else torch.tanh(p, out=out)


def tanh_rows(p: Tensor, out: Tensor, *sources: Tensor,
              float32_tanh: bool = False) -> tuple[Callable[[int], object], bool]:
    """(l -> :func:`tanh` (p[l], out=out[l]) for the rows of p and ``out``, whether NumPy computes them),
    the choice between NumPy and torch.tanh made once for all rows (per call it costs about as much
    as NumPy's tanh of a 64 x 64 row).

    Each row of ``out`` must be contiguous to go through NumPy; rows may share memory (a loop that
    uses each row before the next is written may pass one row expanded to all).

    For a loop that writes the rows of p between the calls by operations on ``sources``: where any
    of those carries a graph or a forward-mode tangent, the rows would too, so all rows go through
    torch.tanh.

    With ``float32_tanh`` NumPy computes float32 rows in float32 (:func:`tanh_float32`), at every
    size: for a loop that scales s by a step eps before adding it to a state, and takes tanh'(p)
    from p rather than from s (:meth:`LureField.derivative_of_inputs`), the one place where
    float32 tanh's 1.4 units in the last place would be magnified."""
    if numpy_tanh_rows(p, out, *sources, float32_tanh=float32_tanh):
        p_arrays, out_arrays = list(p.detach().numpy()), list(out.detach().numpy())
        if float32_tanh:
            return (lambda l: numpy.tanh(p_arrays[l], out=out_arrays[l])), True
        return (lambda l: numpy.tanh(p_arrays[l], out=out_arrays[l], dtype=numpy.float64, casting="same_kind")), True
    p_rows, out_rows = p.unbind(0), out.unbind(0)
    return (lambda l: torch.tanh(p_rows[l], out=out_rows[l])), False


def numpy_tanh_rows(p: Tensor, out: Tensor, *sources: Tensor, float32_tanh: bool = False) -> bool:
    """Whether :func:`tanh_rows` with these arguments computes the rows by NumPy: a matter of the
    tensors' kinds (dtype, device, graph, tangent) and row size, not of their values."""
    return _numpy_tanh(None if float32_tanh else p[0].numel(), p, out[0], *sources)


def tanh_float32(p: Tensor, out: Tensor | None = None) -> Tensor:
    """tanh(p) by NumPy's float32 tanh where :func:`tanh` would take NumPy whatever p's size (within
    1.4 units in the last place of float32 on this project's CPU, 6 times as fast as the float64
    route at 128 x 128 and faster than torch.tanh at every size), else :func:`tanh`; written into
    ``out`` if given."""
    if _numpy_tanh(None, p, out):
        target = torch.empty(p.shape, dtype=p.dtype, device="cpu") if out is None else out
        numpy.tanh(p.detach().numpy(), out=target.detach().numpy())
        return target
    return tanh(p, out)


def _numpy_tanh(elements: int | None, p: Tensor, out: Tensor | None, *sources: Tensor) -> bool:
    """Whether :func:`tanh` of ``elements`` elements of p goes through NumPy (its docstring; None: at any size)."""
    return ((elements is None or elements >= _NUMPY_TANH_MIN_ELEMENTS) and numpy_allowed()
            and _float32_view(p) and (out is None or (_float32_view(out) and out.is_contiguous()))
            and all(_float32_view(source) for source in sources))


def _float32_view(tensor: Tensor) -> bool:
    return numpy_view(tensor, (torch.float32,))


def _rows(tensor: Tensor) -> Tensor:
    """All leading axes as rows: (..., width) -> (rows, width)."""
    return tensor.reshape(-1, tensor.shape[-1])


class LureField:
    """f(y, u) = A y + beta B tanh(W y + u) for matrices A (or None: zero), W and B (or None:
    identity) and a constant beta (1 where B is given); plus y with ``identity``."""

    def __init__(self, A: Tensor | None, W: Tensor, B: Tensor | None, beta: float = 1.0, identity: bool = False) -> None:
        if B is not None and beta != 1.0:
            raise ValueError("beta scales tanh only where B is the identity")
        self.n = W.shape[0]
        self.A, self.W, self.B, self.beta, self.identity = A, W, B, beta, identity
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
        return torch.nn.functional.pad(u, (self.n, 0)) if self.has_a else u

    def derivative(self, S: Tensor, out: Tensor | None = None) -> Tensor:
        """D = beta tanh'(p) = beta (1 - s^2) from s = tanh(p) (written into ``out`` if given)."""
        # beta as a 0-dim tensor filled on S's device: no host-to-device copy (none allowed in a CUDA graph
        # capture), and CUDA's addcmul refuses a CPU scalar as its first argument.
        return torch.addcmul(S.new_full((), self.beta), S, S, value=-self.beta, out=out)

    def derivative_of_inputs(self, P: Tensor, out: Tensor | None = None) -> Tensor:
        """D = beta tanh'(p) = beta / cosh(p)^2 from p itself (written into ``out`` if given).

        In float32 within 5e-7 of D relative to D wherever D is a normal float32 (|p| < 44), and
        within the smallest normal float32 beyond, where cosh(p)^2 overflows and gives D = 0
        (``tests/recurrence/test_field.py`` measures both). From s = tanh(p) rounded to float32,
        1 - s^2 loses D's digits as |p| grows, whatever tanh's accuracy: 8e-4 of D where |p| is near
        5, all of them beyond 9 (D then 0 or several times its value). Through NumPy's float32 cosh
        where :func:`tanh` may take NumPy, else torch."""
        target = torch.empty(P.shape, dtype=P.dtype, device=P.device) if out is None else out
        if _numpy_tanh(None, P, target):
            p, d = P.detach().numpy(), target.detach().numpy()
            with numpy.errstate(over="ignore"):
                numpy.cosh(p, out=d)
                numpy.multiply(d, d, out=d)
            numpy.divide(self.beta, d, out=d)
            return target
        return torch.cosh(P, out=target).square_().reciprocal_().mul_(self.beta)

    def _split(self, z: Tensor) -> tuple[Tensor | None, Tensor]:
        return z.split(self.n, dim=-1) if self.has_a else (None, z)

    def _output(self, a: Tensor | None, x: Tensor, scale: float = 1.0) -> Tensor:
        """a + scale x B^T (a None: zero; scale is 1 where B is given)."""
        if self.has_b:
            return x @ self.B_T if a is None else torch.addmm(a, x, self.B_T)
        if a is None:
            return x if scale == 1.0 else scale * x
        return a + x if scale == 1.0 else torch.add(a, x, alpha=scale)

    # -- per step ---------------------------------------------------------------------------

    def value(self, y: Tensor, u_value: Tensor) -> tuple[Tensor, Tensor]:
        """(k, s): the field at y and s = tanh(p), for u_value = ``pad(u)``.

        s is :func:`tanh` (p), not the cheaper 2 sigmoid(2 p) - 1: that identity's error is a unit
        in the last place of 1, not of s, i.e. relative error ~ulp / |p| where |p| is small (1e-8
        inputs gave 1e-8 relative in float64, 4e-2 in float32).
        """
        a, p = self._split(torch.addmm(u_value, y, self.forward_matrix))
        s = tanh(p)
        k = self._output(a, s, self.beta)
        return (y + k if self.identity else k), s

    def vjp(self, g: Tensor, d: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        """(base + y_bar, record) for the cotangent g of k, with d = beta tanh'(p); the record is
        [g | q] where the weight gradients need g (``keeps_g``), else q."""
        q = (g @ self.B if self.has_b else g) * d
        return self._backward_product(g, q, base, None)

    def jvp(self, y_dot: Tensor, d: Tensor, c: Tensor, e: Tensor | None) -> tuple[Tensor, Tensor]:
        """(k_dot, p_dot) for the tangent y_dot of y; c = y [A_dot^T | W_dot^T] + [0 | u_dot], e = s B_dot^T."""
        a_dot, p_dot = self._split(torch.addmm(c, y_dot, self.forward_matrix))
        if e is not None:
            a_dot = e if a_dot is None else a_dot + e
        if self.has_b or a_dot is None:
            k_dot = self._output(a_dot, d * p_dot)
        else:
            k_dot = torch.addcmul(a_dot, d, p_dot)
        return (y_dot + k_dot if self.identity else k_dot), p_dot

    def vjp_dot(self, g_dot: Tensor, d: Tensor, r: Tensor, p: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        """(base + y_bar_dot, record of g_dot and q_dot) for the derivative g_dot of g; r and p are R and P
        of the module docstring."""
        q_dot = torch.addcmul(r, g_dot @ self.B if self.has_b else g_dot, d)
        return self._backward_product(g_dot, q_dot, base, p)

    def _backward_product(self, g: Tensor, q: Tensor, base: Tensor | None, extra: Tensor | None) -> tuple[Tensor, Tensor]:
        """(base + extra + [g | q] [A; W], record), the product fused where A is given."""
        record = torch.cat([g, q], dim=1) if self.keeps_g else q
        gq = record if self.has_a else q
        if self.identity:
            extra = g if extra is None else extra + g
        if extra is not None:
            base = extra if base is None else extra + base
        # The product formed before base is added (as in the map's adjoint sweep, engine.py).
        y_bar = gq @ self.backward_matrix
        return (y_bar if base is None else y_bar.add_(base)), record

    # -- all steps at once (rows of Y, S and the records X: one per stage evaluation and sequence) --

    def split_record(self, X: Tensor) -> tuple[Tensor | None, Tensor]:
        """(G, Q) from the records X of ``vjp`` or ``vjp_dot`` (G None unless ``keeps_g``)."""
        return tuple(X.split(self.n, dim=-1)) if self.keeps_g else (None, X)

    def weight_gradients(self, Y: Tensor, S: Tensor | None, X: Tensor) -> dict[str, Tensor]:
        """{"A": sum g^T y, "W": sum q^T y, "B": sum g^T s} (A, B only where given) from the records X
        (S is read only where B is given)."""
        G, Q = self.split_record(X)
        Y = _rows(Y)
        # (Y^T X)^T rather than X^T Y (here and in ``second_order_gradients``): the same sums, and MKL's
        # product runs at 104 GFLOP/s in that layout against 100 (``bench/recurrence.py``'s CPU, n = 128).
        if self.has_a:
            grads = dict(zip(("A", "W"), mm(Y.T, _rows(X)).T.split(self.n)))
        else:
            grads = {"W": mm(Y.T, _rows(Q)).T}
        if self.has_b:
            grads["B"] = mm(_rows(G).T, _rows(S))
        return grads

    def tangent_terms(self, Y: Tensor, S: Tensor | None, direction: dict[str, Tensor],
                      u_dot: Tensor | Callable[[Tensor], object], out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(c, e) for every stage evaluation: c = y [A_dot^T | W_dot^T] + [0 | u_dot], e = s B_dot^T or None
        (S is read only where B is given); the product written into ``out`` (rows of Y, columns of c) if given.

        ``u_dot``: a tensor broadcast against Y's leading axes (one row block per input step), padded
        and added; or a function that adds it in place into the product's p columns (the same sums
        without forming the padded copy; not under the vmap of is_grads_batched, which cannot write
        into another tensor's memory)."""
        matrix = self.direction_matrix(direction).T
        product = mm(_rows(Y), matrix, out=out).view(*Y.shape[:-1], matrix.shape[1])
        if callable(u_dot):
            u_dot(product[..., self.n:] if self.has_a else product)
            c = product
        else:
            c = torch.add(self.pad(u_dot), product)
        e = S @ direction["B"].T if self.has_b else None
        return c, e

    def direction_matrix(self, direction: dict[str, Tensor]) -> Tensor:
        """[A_dot; W_dot] where A is given, else W_dot."""
        return torch.cat([direction["A"], direction["W"]], dim=0) if self.has_a else direction["W"]

    def second_order_factor(self, S: Tensor, X: Tensor, out: Tensor | None = None) -> Tensor:
        """-2 s q for every stage evaluation, the part of R that does not depend on the direction
        (R = -2 s q p_dot + ...), written into ``out`` (shaped as S) if given. The same numbers as
        (-2 s) q: scaling by -2 is exact."""
        return torch.addcmul(S.new_zeros(()), S, self.split_record(X)[1], value=-2.0, out=out)

    def second_order_terms(self, S: Tensor | None, D: Tensor, X: Tensor, P_dot: Tensor, direction: dict[str, Tensor],
                           with_p: bool = True, out: Tensor | None = None,
                           factor: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(R, P) of the module docstring for every stage evaluation (P_dot: the tangents of p; P None
        unless ``with_p``); R written into ``out`` (shaped as D) if given. ``factor``:
        :meth:`second_order_factor`, formed before (S is then read only where B is given)."""
        G, Q = self.split_record(X)
        if factor is None:
            assert S is not None
            R = self.second_order_factor(S, X, out=out)
            R = R.mul_(P_dot) if out is not None else R * P_dot
        else:
            R = torch.mul(factor, P_dot, out=out) if out is not None else factor * P_dot
        if self.has_b:
            R = torch.addcmul(R, G @ direction["B"], D)
        if with_p:
            matrix = self.direction_matrix(direction)
            P = mm(_rows(X if self.has_a else Q), matrix).view(*X.shape[:-1], matrix.shape[1])
        else:
            P = None
        return R, P

    def second_order_gradients(self, Y: Tensor, Y_dot: Tensor, S: Tensor | None, D: Tensor, P_dot: Tensor,
                               X: Tensor, X_dot: Tensor) -> dict[str, Tensor]:
        """The derivatives of ``weight_gradients`` along the tangent (module docstring; S is read only
        where B is given)."""
        (G, Q), (G_dot, Q_dot) = self.split_record(X), self.split_record(X_dot)
        Y, Y_dot = _rows(Y), _rows(Y_dot)
        if self.has_a:
            grads = dict(zip(("A", "W"), (mm(Y.T, _rows(X_dot)) + mm(Y_dot.T, _rows(X))).T.split(self.n)))
        else:
            grads = {"W": (mm(Y.T, _rows(Q_dot)) + mm(Y_dot.T, _rows(Q))).T}
        if self.has_b:
            grads["B"] = torch.addmm(_rows(G_dot).T @ _rows(S), _rows(G).T, _rows(D * P_dot))
        return grads
