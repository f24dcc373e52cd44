"""A recurrence engine for models in Lur'e form: the whole sequence as one autograd node.

    from lrnn_analysis.recurrence import build_scheme, lure_recurrence
    scheme = build_scheme("euler", 0.1)                               # h+ = h + eps (A h + tanh(W h + u))
    h_T = lure_recurrence(u, A, W, scheme=scheme)                     # u: (T, batch, n)
    h_T = lure_recurrence(x.transpose(0, 1), A, W, scheme=scheme,     # u_t = U x_t + b formed inside
                          input_weight=model.U.weight, input_bias=model.U.bias)

Forward, backward (adjoint recurrence, weight gradients as single large products) and
Hessian-vector products (the backward is differentiable once, by the R-operator) are exact to
rounding; see :mod:`.engine` for the math and the memory modes.
"""
from .engine import lure_recurrence, release_workspace, sqrt_segment
from .field import LureField
from .schemes import METHODS, Scheme, build_scheme

__all__ = ["LureField", "METHODS", "Scheme", "build_scheme", "lure_recurrence", "release_workspace", "sqrt_segment"]
