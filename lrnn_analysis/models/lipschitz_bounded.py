"""A recurrent network whose sequence map x -> y has incremental l2-gain at most G for every
value of its parameters (``lipschitz-ren``).

It is the contracting model of :mod:`.contracting` with its input and readout made part of the
construction, in the spirit of the Lipschitz-bounded ((Q, S, R) = (-I/G, 0, G I)) recurrent
equilibrium networks of Revay, Wang and Manchester (IEEE TAC 2023); the readout acts on the
final state only, so the supply needs no output term. The model runs

    E h+ = F h + B tanh(C h + U x_t + b),   h_0 = 0,   y = D h_T + d.

Free parameters: Z = [Z_1, Z_3] (m x 2n, stored as Z_1 and dZ = Z_3 - Z_1), B, C (n x n),
ell (n), U (n x d), R (k x n), the biases b and d. With delta = ``_DELTA``,
Lambda = diag(ell^2 + delta) / 2, mu = max(||Lambda^(1/2) U||_2^2, delta) and

    N = 2 Lambda - Lambda U U^T Lambda / mu = Lambda^(1/2) (2 I - Ut Ut^T) Lambda^(1/2)   (>= Lambda > 0,
        Ut = Lambda^(1/2) U / sqrt(mu), ||Ut||_2 <= 1),
    M = K^T N^-1 K + [Z_1, 0, Z_3]^T [Z_1, 0, Z_3] + delta diag(I, 0, I),   K = [-Lambda C, N, B^T],

the blocks M_11 = C^T Lambda N^-1 Lambda C + Z_1^T Z_1 + delta I, M_21 = -Lambda C, M_22 = N,
F = M_31 = -B N^-1 Lambda C + Z_3^T Z_1, M_32 = B, P = M_33 = B N^-1 B^T + Z_3^T Z_3 + delta I give
the model's E = (M_11 / rho^2 + P) / 2. M > 0: a vector in its kernel has zero first and last
blocks by the delta terms, then a zero middle block as N > 0.

Gain. Increments (Delta, p, Delta x) of two runs, p = tanh(C h + U x + b) - tanh(C h~ + U x~ + b),
obey 2 p^T Lambda (C Delta + U Delta x - p) >= 0 (tanh has slopes in [0, 1]). With Q = E^T P^-1 E
>= E + E^T - P = M_11 / rho^2 and the Schur complement of P in M > 0,

    [F B]^T P^-1 [F B] < [[rho^2 Q, -C^T Lambda], [-Lambda C, N]],

and max over Delta x of 2 p^T Lambda U Delta x - mu ||Delta x||^2 = p^T Lambda U U^T Lambda p / mu = p^T (2 Lambda - N) p,
so V(Delta) = Delta^T Q Delta obeys

    V(Delta+) - rho^2 V(Delta) <= mu ||Delta x_t||^2,   hence   V(Delta_T) <= mu sum_t ||Delta x_t||^2 = mu ||Delta x||^2

from Delta_0 = 0, for every horizon T: this is the gain LMI (*) of :mod:`lrnn_analysis.stability.gain`
with P = Q, multipliers Lambda, r = 1 and this mu, holding for every parameter value. The readout is
D = (G / sqrt(mu)) Rb L with Rb = R / max(1, ||R||_2) and L = chol(P)^-1 E (L^T L = Q), so
||D Delta||^2 <= (G^2 / mu) ||L Delta||^2 = (G^2 / mu) V(Delta) and

    ||y(x) - y(x~)|| <= G ||x - x~||,   |Delta (y_i - y_j)| <= G ||Rb_i - Rb_j|| ||x - x~||

(:meth:`LipschitzREN.pair_lipschitz`). U is free: the LMI is homogeneous in (Q, Lambda, mu), and
fixing mu = 1 instead (U = Lambda^(-1/2) Ut) ties the input's scale to Lambda and so to every
block of M, a coordinated move the optimiser makes badly (clean digits accuracy 0.905 against
0.942 with U free, G = 32, 100 epochs, plain cross-entropy); here a larger U raises mu and lowers
the readout's scale by the same factor. At Delta x = 0 the same inequality makes the model
contract at rate rho, certified like the explicit REN (``ren-contraction`` on the lifted form
h+ = A h + B w, v = C h + u, with P = Q and multipliers Lambda). The float64 gain certificate of
the stored weights is :func:`lrnn_analysis.stability.construction_gain.construction_gain`.

``lure_rewrite`` (the euler Lur'e form in zeta = T^-1 h, T = E^-1 B / eps, of
:class:`~.contracting.ContractingRNN`) still holds, but ``lure_form()`` is None: the certificates
above need no T, so training adds no conditioning penalty on T (``cond_penalty`` is not used;
it cost 7 points of certified accuracy at radius 0.25 on digits), and T may then be too
ill-conditioned for a float64 check of the form against the module.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .contracting import _DELTA, _PARAMETER_SCALE, Construction, ContractingRNN, _scaled, _stored

__all__ = ["LipschitzREN", "lipschitz_construction"]


def _unit_bounded(X: Tensor) -> Tensor:
    """X / max(1, ||X||_2): spectral norm at most 1."""
    return X / torch.clamp(torch.linalg.matrix_norm(X, ord=2), min=1.0)


def lipschitz_construction(Z: Tensor, B: Tensor, C: Tensor, ell: Tensor, U: Tensor, rho: float) -> tuple[Construction, Tensor]:
    """E, F, B, C, P, Lambda of :class:`LipschitzREN` and mu (module docstring)."""
    n = B.shape[0]
    eye = torch.eye(n, dtype=Z.dtype, device=Z.device)
    Z1, Z3 = Z[:, :n], Z[:, n:]
    lam = 0.5 * (ell * ell + _DELTA)
    root = torch.sqrt(lam)
    mu = torch.clamp(torch.linalg.matrix_norm(root[:, None] * U, ord=2) ** 2, min=_DELTA)
    Ut = root[:, None] * U / torch.sqrt(mu)
    N = root[:, None] * (2.0 * eye - Ut @ Ut.mT) * root[None, :]
    LC = lam[:, None] * C
    solved = torch.linalg.solve(N, torch.cat([LC, B.mT], dim=1))
    N_LC, N_Bt = solved[:, :n], solved[:, n:]
    M11 = LC.mT @ N_LC + Z1.mT @ Z1 + _DELTA * eye
    F = Z3.mT @ Z1 - B @ N_LC
    P = B @ N_Bt + Z3.mT @ Z3 + _DELTA * eye
    E = 0.5 * (M11 / rho**2 + P)
    return Construction(E, F, B, C, P, lam, None), mu


class LipschitzREN(ContractingRNN):
    """E h+ = F h + B tanh(C h + U x_t + b), y = D h_T + d with ||y(x) - y(x~)|| <= G ||x - x~|| for
    every parameter value, G = ``config.lipschitz`` (module docstring).

    Parameters (``Z1``, ``dZ``, ``B``, ``C`` and ``R`` stored divided by ``_PARAMETER_SCALE``): those of
    :class:`~.contracting.ContractingRNN`, ``ell`` (stored as is: it scales the multipliers
    Lambda, which must move freely), ``input_weight`` (U, n x d, initialised as the other models' U),
    ``R`` (k x n, the readout), ``input_bias`` (b) and ``output_bias`` (d).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        del self.U, self.D
        n, d, k = config.hidden, config.input_dim, config.output_dim
        self.ell = nn.Parameter(torch.ones(n))
        self.input_weight = nn.Parameter(nn.init.xavier_normal_(torch.empty(n, d)))
        self.R = _stored(torch.randn(k, n) / n**0.5)
        self.input_bias = nn.Parameter(torch.zeros(n))
        self.output_bias = nn.Parameter(torch.zeros(k))

    def lipschitz_construction(self, dtype: torch.dtype | None = None) -> tuple[Construction, Tensor]:
        """The construction's matrices and mu (module docstring), in ``dtype`` (default: the parameters')."""
        Z1, dZ, B, C = _scaled((self.Z1, self.dZ, self.B, self.C), dtype)
        ell, U = (p if dtype is None else p.to(dtype) for p in (self.ell, self.input_weight))
        return lipschitz_construction(torch.cat([Z1, Z1 + dZ], dim=-1), B, C, ell, U, self.config.rho)

    def construction(self, dtype: torch.dtype | None = None) -> Construction:
        return self.lipschitz_construction(dtype)[0]

    def input_matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        """U (n x d): u_t = U x_t + b."""
        return self.input_weight if dtype is None else self.input_weight.to(dtype)

    def readout_matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        """D = (G / sqrt(mu)) Rb chol(P)^-1 E (k x n): y = D h_T + d."""
        c, mu = self.lipschitz_construction(dtype)
        L = torch.linalg.solve_triangular(torch.linalg.cholesky(c.P), c.E, upper=False)
        R = self.R if dtype is None else self.R.to(dtype)
        return (self.config.lipschitz / torch.sqrt(mu)) * _unit_bounded(R * _PARAMETER_SCALE) @ L

    def pair_lipschitz(self) -> Tensor:
        """G ||Rb_i - Rb_j|| (k x k): the construction's bound on the Lipschitz constant of y_i - y_j
        (differentiable; the certified pair bounds are computed in float64 from the weights)."""
        Rb = _unit_bounded(self.R * _PARAMETER_SCALE)
        diff = Rb[:, None, :] - Rb[None, :, :]
        return self.config.lipschitz * torch.sqrt((diff * diff).sum(-1) + 1e-12)

    def explicit_matrices(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """h+ = A h + B w, v = K h + D w + u with A = E^-1 F, B = E^-1 B, K = C and D = 0 (the form
        the ``ren-contraction`` certificate is checked on)."""
        A, B, C = self._explicit(dtype)
        return {"A": A, "B": B, "K": C, "D": torch.zeros_like(C)}

    def lure_form(self) -> None:
        """None: see the module docstring (its certificates are ``ren-contraction`` and the gain's)."""
        return None

    def regularization(self) -> None:
        return None

    def _input_sequence(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x.transpose(0, 1), self.input_matrix(), self.input_bias)

    def forward(self, x: Tensor) -> Tensor:
        """D h_T + d, or D h_t + d for every step under ``readout="all"`` (each step's output then has
        the same bound G over the inputs up to that step: the argument stops at t)."""
        states = self._run(x, keep_states=self.config.readout == "all")
        return nn.functional.linear(states, self.readout_matrix(), self.output_bias)
