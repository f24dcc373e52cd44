"""Recurrent networks that contract for every value of their parameters.

Both models certify themselves with one positive definite 3n x 3n matrix M whose n x n
blocks M_ij (1: the state increment, 2: the nonlinearity's increment, 3: the next state)
give P = M_33, F = M_31, B = M_32, M_21 = -Lambda C and 2 Lambda >= M_22, and with
E = (M_11 / rho^2 + P + Y - Y^T) / 2 (Y = 0 for ``contracting``), in the spirit of the
contracting Recurrent Equilibrium Networks of Revay, Wang and Manchester (2021).

``contracting`` (:class:`ContractingRNN`) runs

    E h+ = F h + B tanh(C h + u),   u = U x + b,

with B, C free n x n matrices, Lambda = diag(l^2 + delta) / 2 (l free, delta = ``_DELTA``) and
Z = [Z_1, Z_3] (m x 2n, m = ``config.rank`` or n) stored as Z_1 and dZ = Z_3 - Z_1:

    M_11 = C^T Lambda C / 2 + Z_1^T Z_1 + delta I,   M_22 = 2 Lambda,
    F = M_31 = -B C / 2 + Z_3^T Z_1,   P = M_33 = B Lambda^-1 B^T / 2 + Z_3^T Z_3 + delta I,

i.e. M = K^T (2 Lambda)^-1 K + [Z_1, 0, Z_3]^T [Z_1, 0, Z_3] + delta diag(I, 0, I) with
K = [-Lambda C, 2 Lambda, B^T]: M > 0, and its middle block is exactly the diagonal
2 Lambda, so no multiplier is spent on off-diagonal terms of M_22 (every M > 0 with a
diagonal middle block arises this way, up to the rank of Z). Storing dZ rather than Z_3 keeps
the near-identity step built in: apart from (rho^-2 - 1) Z_1^T Z_1 / 2, E - F (hence the step
E^-1 F - I) involves Z_1 only together with dZ, B or C, so relative noise on Z_1 and dZ moves
the step far less than independent noise on Z_1 and Z_3, which changes Z_3 - Z_1 by a relative
amount of order |Z_1| / |Z_3 - Z_1| (measured in the README: relative parameter noise).

Increments (Delta, p) with p = tanh(C h + u) - tanh(C h~ + u) obey the sector condition
2 p^T Lambda (C Delta - p) >= 0. With Q = E^T P^-1 E, the bound E^T P^-1 E >= E + E^T - P
= M_11 / rho^2 (from (E - P)^T P^-1 (E - P) >= 0), 2 Lambda >= M_22 and the Schur complement
of M_33 in M > 0,

    [F B]^T P^-1 [F B] - [[rho^2 Q, -C^T Lambda], [-Lambda C, 2 Lambda]] < 0,

so ||Delta+||_Q <= rho ||Delta||_Q for every input sequence. The rewrite h = T zeta,
T = E^-1 B / eps, makes the model the toolkit's euler Lur'e system
zeta+ = zeta + eps (A zeta + tanh(W zeta + u)) with A = (T^-1 E^-1 F T - I) / eps,
W = C T, and the same inequality with P_zeta = T^T Q T (a congruence by diag(T, I)).
T is invertible when B is.

``ren`` (:class:`ContractingREN`) is the explicit contracting REN with M = H = X^T X + delta I
(X of shape m x 3n), F = H_31, B1 = H_32, C1 = -H_21,
D11 = -(strictly block-lower-triangular part of H_22) (blocks of ``_REN_BLOCK`` neurons),
Lambda = diag(H_22)/2 + (sum of |(H_22)_ij| over the other neurons of i's block)/2,

    E x+ = F x + B1 w + B2 x_t,   w = tanh(Lambda^-1 (C1 x + D11 w) + u),

w computed block by block (D11 makes it explicit). 2 Lambda - D11 - D11^T >= H_22 by
diagonal dominance of the difference, so the same argument gives
||Delta+||_Q <= rho ||Delta||_Q with the sector multipliers Lambda on v = Lambda^-1 (C1 x + D11 w) + u.
It is not a Lur'e system h+ = A h + sigma(W h + u) (w feeds back into its own
pre-activation), so its certificate is this contraction LMI, checked in float64 by
the toolkit's verification on the lifted form (Delta, p) -> Delta+ (see
:mod:`lrnn_analysis.stability.evidence`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from ..lure import LureSystem
from ..recurrence import build_scheme
from .architectures import EngineSystem, RecurrentModel, StepFunction
from .config import ModelConfig

__all__ = ["Construction", "ContractingREN", "ContractingRNN", "contracting_construction", "ren_construction"]

_DELTA = 1e-3
_REN_BLOCK = 16
# The parameters are stored divided by this: Adam's steps are absolute, and the recipe's
# learning rate (0.03) on entries of size ~1/sqrt(m) is 10x what trains these models well.
_PARAMETER_SCALE = 0.1


class Construction(NamedTuple):
    """The matrices of one draw of the direct parameterisation (column convention)."""

    E: Tensor
    F: Tensor
    B: Tensor
    C: Tensor
    P: Tensor
    lam: Tensor
    D11: Tensor | None


def _blocks(X: Tensor, n: int) -> list[list[Tensor]]:
    """The n x n blocks H_ij of H = X^T X + delta I."""
    H = X.mT @ X + _DELTA * torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    return [[H[i * n:(i + 1) * n, j * n:(j + 1) * n] for j in range(3)] for i in range(3)]


def contracting_construction(Z: Tensor, B: Tensor, C: Tensor, ell: Tensor, rho: float) -> Construction:
    """E, F, B, C, P, Lambda of :class:`ContractingRNN` from Z = [Z_1, Z_3], B, C and
    Lambda = diag(ell^2 + delta) / 2 (module docstring)."""
    n = B.shape[0]
    eye = torch.eye(n, dtype=Z.dtype, device=Z.device)
    Z1, Z3 = Z[:, :n], Z[:, n:]
    lam = 0.5 * (ell * ell + _DELTA)
    M11 = 0.5 * C.mT @ (lam[:, None] * C) + Z1.mT @ Z1 + _DELTA * eye
    F = Z3.mT @ Z1 - 0.5 * B @ C
    P = 0.5 * B @ (B.mT / lam[:, None]) + Z3.mT @ Z3 + _DELTA * eye
    E = 0.5 * (M11 / rho**2 + P)
    return Construction(E, F, B, C, P, lam, None)


def _block_mask(n: int, block: int, device: torch.device | None = None) -> Tensor:
    """mask[i, j] = 1 where neurons i and j lie in the same block of ``block`` consecutive neurons."""
    ids = torch.arange(n, device=device) // block
    return (ids[:, None] == ids[None, :]).to(torch.float32)


def ren_construction(X: Tensor, Y: Tensor, rho: float, block: int = _REN_BLOCK) -> Construction:
    """E, F, B1, C1, P, Lambda, D11 of :class:`ContractingREN` (module docstring)."""
    n = Y.shape[0]
    H = _blocks(X, n)
    H22 = H[1][1]
    same = _block_mask(n, block, X.device).to(X.dtype)
    eye = torch.eye(n, dtype=X.dtype, device=X.device)
    lam = 0.5 * (torch.diagonal(H22) + (H22.abs() * (same - eye)).sum(dim=1))
    D11 = -torch.tril(H22 * (1.0 - same))
    E = 0.5 * (H[0][0] / rho**2 + H[2][2] + Y - Y.mT)
    return Construction(E, H[2][0], H[2][1], -H[1][0], H[2][2], lam, D11)


def _scaled(parameters: tuple[Tensor, ...], dtype: torch.dtype | None) -> tuple[Tensor, ...]:
    """The construction's matrices from stored parameters: cast to ``dtype``, times ``_PARAMETER_SCALE``."""
    return tuple((p if dtype is None else p.to(dtype)) * _PARAMETER_SCALE for p in parameters)


def _stored(value: Tensor) -> nn.Parameter:
    return nn.Parameter(value / _PARAMETER_SCALE)


def _rows(config: ModelConfig, blocks: int) -> int:
    """m = ``config.rank`` (0: hidden), checked to lie in [1, blocks * hidden]."""
    n = config.hidden
    m = config.rank or n
    if not 1 <= m <= blocks * n:
        raise InputError(f"{config.arch} needs 1 <= rank <= {blocks} * hidden = {blocks * n}, got rank {m}")
    return m


class ContractingRNN(RecurrentModel):
    """E h+ = F h + B tanh(C h + u): contracting at rate rho for every Z1, dZ, B, C, ell (module docstring).

    Parameters (stored divided by ``_PARAMETER_SCALE``): ``Z1`` and ``dZ`` (m x n; Z_3 = Z_1 + dZ),
    ``B`` and ``C`` (n x n), ``ell`` (n).
    """

    recurrent_parameters = ("Z1", "dZ", "B", "C", "ell")
    engine_supported = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        n, m = config.hidden, _rows(config, 2)
        # Near-identity start: a small dZ makes F ~ P ~ E, i.e. h+ ~ h, and B, C small.
        self.Z1 = _stored(torch.randn(m, n) / m**0.5)
        self.dZ = _stored(torch.randn(m, n) * (config.init_std / m**0.5))
        self.B = _stored(torch.randn(n, n) * (config.init_std / n**0.5))
        self.C = _stored(torch.randn(n, n) * (config.init_std / n**0.5))
        self.ell = _stored(torch.ones(n))

    def construction(self, dtype: torch.dtype | None = None) -> Construction:
        Z1, dZ, B, C, ell = _scaled((self.Z1, self.dZ, self.B, self.C, self.ell), dtype)
        return contracting_construction(torch.cat([Z1, Z1 + dZ], dim=-1), B, C, ell, self.config.rho)

    def _explicit(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(E^-1 F, E^-1 B, C): h+ = E^-1 F h + E^-1 B tanh(C h + u)."""
        c = self.construction(dtype)
        solved = torch.linalg.solve(c.E, torch.cat([c.F, c.B], dim=1))
        n = self.config.hidden
        return solved[:, :n], solved[:, n:], c.C

    def _step_function(self) -> StepFunction:
        A_h, B_h, C = self._explicit()
        n = self.config.hidden
        stacked = torch.cat([A_h, C], dim=0).T
        B_T = B_h.T

        def step(h: Tensor, u: Tensor) -> Tensor:
            z = h @ stacked
            return z[:, :n] + torch.tanh(z[:, n:] + u) @ B_T

        return step

    def _engine_system(self) -> EngineSystem:
        A_h, B_h, C = self._explicit()
        return A_h, C, B_h, build_scheme("map")

    def recurrent_matrices(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """A = E^-1 F (the linear part of the step h+ = A h + B tanh(C h + u)), B = E^-1 B and C."""
        A_h, B_h, C = self._explicit(dtype)
        return {"A": A_h, "B": B_h, "C": C}

    def lure_rewrite(self) -> tuple[Construction, LureSystem, np.ndarray]:
        """From one float64 construction: the construction, the Lur'e form
        zeta+ = zeta + eps (A zeta + tanh(W zeta + u)) in zeta = T^-1 h, and T (module docstring)."""
        with torch.no_grad():
            c = self.construction(torch.float64)
            eps = self.config.eps
            T = torch.linalg.solve(c.E, c.B) / eps
            step = torch.linalg.solve(T, torch.linalg.solve(c.E, c.F) @ T)
            eye = torch.eye(T.shape[0], dtype=T.dtype)
            system = LureSystem((step - eye) / eps, c.C @ T, slope=1.0, method="euler", eps=eps)
            return c, system, T.cpu().numpy()

    def coordinates(self) -> np.ndarray:
        """T (float64) with h = T zeta, zeta the state of :meth:`lure_form`."""
        return self.lure_rewrite()[2]

    def lure_inputs(self, x: Tensor) -> Tensor:
        """u_t = U x_t + b, the inputs of the Lur'e form (the same in h and in zeta), (batch, time, hidden)."""
        return self._input_sequence(x).transpose(0, 1)

    def lure_form(self) -> LureSystem:
        """zeta+ = zeta + eps (A zeta + tanh(W zeta + u)) in zeta = T^-1 h (module docstring)."""
        return self.lure_rewrite()[1]

    def regularization(self) -> Tensor | None:
        """kappa * mean(log^2 sigma_i(T)): keeps T, hence P_zeta, well conditioned for float64 checks."""
        kappa = self.config.cond_penalty
        if kappa == 0:
            return None
        c = self.construction()
        T = torch.linalg.solve(c.E, c.B) / self.config.eps
        return kappa * torch.log(torch.linalg.svdvals(T)).square().mean()


class ContractingREN(RecurrentModel):
    """The explicit contracting REN: E x+ = F x + B1 w + B2 x_t, w = tanh(Lambda^-1 (C1 x + D11 w) + u).

    Parameters X (m x 3n) and Y (n x n), stored divided by ``_PARAMETER_SCALE``, and B2.
    """

    recurrent_parameters = ("X", "Y")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        n, m = config.hidden, _rows(config, 3)
        # Near-identity start: X_3 = X_1 + noise makes F ~ P ~ E, i.e. x+ ~ x, and B1, C1 small.
        X1 = torch.randn(m, n) / m**0.5
        X2 = torch.randn(m, n) * (config.init_std / m**0.5)
        X3 = X1 + torch.randn(m, n) * (config.init_std / m**0.5)
        self.X = _stored(torch.cat([X1, X2, X3], dim=1))
        self.Y = nn.Parameter(torch.zeros(n, n))
        self.B2 = nn.Linear(config.input_dim, config.hidden, bias=False)
        nn.init.zeros_(self.B2.weight)

    def construction(self, dtype: torch.dtype | None = None) -> Construction:
        X, Y = _scaled((self.X, self.Y), dtype)
        return ren_construction(X, Y, self.config.rho)

    def _input_sequence(self, x: Tensor) -> Tensor:
        """(u_t, x_t) side by side, time-major: u_t = U x_t + b enters v, x_t enters the state through B2."""
        x = x.transpose(0, 1)
        return torch.cat([self.U(x), x], dim=-1)

    def explicit_matrices(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """x+ = A x + B w + E^-1 B2 x_t and v = K x + D w + u with A = E^-1 F, B = E^-1 B1,
        K = Lambda^-1 C1, D = Lambda^-1 D11 (strictly block-lower-triangular)."""
        c = self.construction(dtype)
        n = self.config.hidden
        solved = torch.linalg.solve(c.E, torch.cat([c.F, c.B], dim=1))
        return {"A": solved[:, :n], "B": solved[:, n:], "K": c.C / c.lam[:, None], "D": c.D11 / c.lam[:, None],
                "E": c.E}

    def recurrent_matrices(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        mats = self.explicit_matrices(dtype)
        return {name: mats[name] for name in ("A", "B", "K", "D")}

    def _step_function(self) -> StepFunction:
        mats = self.explicit_matrices()
        n = self.config.hidden
        stacked = torch.cat([mats["A"], mats["K"]], dim=0).T
        B_T, D, E = mats["B"].T, mats["D"], mats["E"]
        B2_T = torch.linalg.solve(E, self.B2.weight).T
        starts = list(range(0, n, _REN_BLOCK))

        def step(h: Tensor, inputs: Tensor) -> Tensor:
            z = h @ stacked
            base = z[:, n:] + inputs[:, :n]
            blocks: list[Tensor] = []
            for start in starts:
                stop = min(start + _REN_BLOCK, n)
                v = base[:, start:stop]
                if blocks:
                    v = v + torch.cat(blocks, dim=1) @ D[start:stop, :start].T
                blocks.append(torch.tanh(v))
            return z[:, :n] + torch.cat(blocks, dim=1) @ B_T + inputs[:, n:] @ B2_T

        return step
