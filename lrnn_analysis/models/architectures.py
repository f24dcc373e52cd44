"""The model zoo: every architecture maps x (batch, time, input_dim) to outputs
D h_T + d from its final hidden state (``readout="last"``), or to D h_t + d at every step t,
shape (batch, time, output_dim) (``readout="all"``), with inputs entering as u_t = U x_t + b.

Row vectors are used inside the recurrence (h @ X^T computes X h for each row);
matrices returned by ``matrices``/``lure_form`` are in the column convention.

``engine`` chooses how ``forward`` and ``hidden_states`` run the recurrence: ``"recurrence"``
(the default where a model's step is a Lur'e-form step, h+ = A h + B tanh(W h + u) under a
fixed scheme) runs the whole sequence as one autograd node of :mod:`lrnn_analysis.recurrence`,
with an exact adjoint backward and R-operator Hessian-vector products, and forms u_t = U x_t + b
itself segment by segment where the model's inputs are its own U's (``_engine_projection``); ``"autograd"`` records
the step op by op (the only choice for the gated RNN and the REN). Inside torch.func transforms
(vmap, grad) and under torch.compile the step is always recorded op by op; with forward-mode
tangents (``torch.autograd.forward_ad``) the engine runs its general sweep, recorded. ``engine_memory``
``"recompute"`` keeps only every ceil(sqrt(T))-th state for the backward pass (same numbers,
less memory).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..lure import LureSystem
from ..recurrence import Scheme, build_scheme, lure_recurrence, sqrt_segment
from .config import ModelConfig

__all__ = ["AntisymmetricRNN", "CayleyRNN", "EngineSystem", "GatedLipschitzRNN", "LipschitzRNN", "LureRNN",
    "PlainWRNN", "RecurrentModel", "StepFunction", "lipschitz_matrix", "lure_step"]

StepFunction = Callable[[Tensor, Tensor], Tensor]
# (A or None, W, B or None, scheme): the step h+ of the engine, see lrnn_analysis.recurrence.
EngineSystem = tuple[Tensor | None, Tensor, Tensor | None, Scheme]
_ENGINES = ("recurrence", "autograd")
_ENGINE_MEMORY = ("store", "recompute")


def lipschitz_matrix(M: Tensor, beta: float | Tensor, gamma: float | Tensor) -> Tensor:
    """X = (1 - beta)(M + M^T) + beta (M - M^T) - gamma I (batched over leading axes of M, beta, gamma)."""
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    return (1.0 - beta) * (M + M.mT) + beta * (M - M.mT) - gamma * eye


def lure_step(A: Tensor | None, W: Tensor, method: str, eps: float | None, substeps: int = 1) -> StepFunction:
    """One input step of h' = A h + tanh(W h + u) under ``method`` (row convention).

    A is None when it is zero. Both matrix products of a stage share one matmul
    with the stacked matrix [A^T | W^T].
    """
    if method == "map":
        W_T = W.T
        return lambda h, u: torch.tanh(h @ W_T + u)
    n = W.shape[0]
    if A is None:
        W_T = W.T

        def field(h: Tensor, u: Tensor) -> Tensor:
            return torch.tanh(h @ W_T + u)
    else:
        stacked = torch.cat([A, W], dim=0).T

        def field(h: Tensor, u: Tensor) -> Tensor:
            z = h @ stacked
            return z[:, :n] + torch.tanh(z[:, n:] + u)

    def scheme(h: Tensor, u: Tensor) -> Tensor:
        if method == "euler":
            return h + eps * field(h, u)
        if method == "rk2":
            return h + eps * field(h + (0.5 * eps) * field(h, u), u)
        k1 = field(h, u)
        if method == "rk38":
            k2 = field(h + (eps / 3.0) * k1, u)
            k3 = field(h + eps * (k2 - k1 / 3.0), u)
            k4 = field(h + eps * (k1 - k2 + k3), u)
            return h + (eps / 8.0) * (k1 + 3.0 * (k2 + k3) + k4)
        k2 = field(h + (0.5 * eps) * k1, u)
        k3 = field(h + (0.5 * eps) * k2, u)
        k4 = field(h + eps * k3, u)
        return h + (eps / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

    if substeps == 1:
        return scheme

    def repeated(h: Tensor, u: Tensor) -> Tensor:
        for _ in range(substeps):
            h = scheme(h, u)
        return h

    return repeated


class RecurrentModel(nn.Module):
    """Shared input map, decoder and time loop; subclasses define one step."""

    # Glob patterns of the parameters that build the recurrent matrices (see lrnn_analysis.model_under_analysis).
    recurrent_parameters: tuple[str, ...] = ("M_*",)
    # Whether the step is one the recurrence engine runs (``_engine_system``).
    engine_supported = False
    # Whether inputs enter through the zoo's U (the LSTM reads x_t with its own input weights).
    has_input_map = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.engine = "recurrence" if self.engine_supported else "autograd"
        self.engine_memory = "store"
        if self.has_input_map:
            self.U = nn.Linear(config.input_dim, config.hidden)
        self.D = nn.Linear(config.hidden, config.output_dim)
        for layer in (self.U, self.D) if self.has_input_map else (self.D,):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _square_parameter(self) -> nn.Parameter:
        n = self.config.hidden
        return nn.Parameter(torch.randn(n, n) * (self.config.init_std / n))

    def _input_sequence(self, x: Tensor) -> Tensor:
        """All input projections in one matmul, time-major: (T, B, n)."""
        return self.U(x.transpose(0, 1))

    def _engine_projection(self) -> tuple[Tensor, Tensor | None] | None:
        """(U, b) for the engine to form u_t = U x_t + b itself, segment by segment
        (:mod:`lrnn_analysis.recurrence.inputs`), where ``_input_sequence`` is this class's (not
        replaced on the instance either) and calling ``self.U`` computes exactly
        ``linear(x, U.weight, U.bias)``: nn.Linear's ``forward`` and no hooks (pruning and the hook-based
        weight and spectral norms recompute ``U.weight`` in a pre-hook, which reading it directly would
        skip; a backward hook may change the gradients); None otherwise: the engine then takes U(x)."""
        layer = getattr(self, "U", None)
        if (getattr(self._input_sequence, "__func__", None) is not RecurrentModel._input_sequence
                or not _plain_linear_call(layer)):
            return None
        return layer.weight, layer.bias

    @property
    def engine(self) -> str:
        """``"recurrence"`` or ``"autograd"`` (module docstring)."""
        return self._engine

    @engine.setter
    def engine(self, value: str) -> None:
        if value not in _ENGINES:
            raise InputError(f"engine must be one of {_ENGINES}, got {value!r}")
        if value == "recurrence" and not self.engine_supported:
            raise InputError(f"engine 'recurrence' runs Lur'e-form steps only; {self.config.arch} needs engine 'autograd'")
        self._engine = value

    @property
    def engine_memory(self) -> str:
        """``"store"`` or ``"recompute"`` (module docstring)."""
        return self._engine_memory

    @engine_memory.setter
    def engine_memory(self, value: str) -> None:
        if value not in _ENGINE_MEMORY:
            raise InputError(f"engine_memory must be one of {_ENGINE_MEMORY}, got {value!r}")
        self._engine_memory = value

    def _uses_engine(self) -> bool:
        """Whether this call runs the engine: its autograd node has no vmap rule and torch.compile
        traces the recorded step better than a Python loop inside one node."""
        return (self._engine == "recurrence" and not torch._C._are_functorch_transforms_active()
                and not torch.compiler.is_compiling())

    def _step_function(self) -> StepFunction:
        raise NotImplementedError

    def _engine_system(self) -> EngineSystem:
        raise NotImplementedError

    def _run(self, x: Tensor, keep_states: bool) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.config.input_dim:
            raise InputError(
                f"{self.config.arch} model expects input of shape (batch, time, {self.config.input_dim}), got {tuple(x.shape)}"
            )
        if self._uses_engine():
            A, W, B, scheme = self._engine_system()
            segment = sqrt_segment(x.shape[1]) if self._engine_memory == "recompute" else None
            projection = self._engine_projection()
            weight, bias = (None, None) if projection is None else projection
            inputs = self._input_sequence(x) if projection is None else x.transpose(0, 1)
            states = lure_recurrence(inputs, A, W, B, scheme=scheme, keep_states=keep_states, segment=segment,
                                     input_weight=weight, input_bias=bias)
            return states.transpose(0, 1) if keep_states else states
        inputs = self._input_sequence(x)
        step = self._step_function()
        h = inputs.new_zeros(x.shape[0], self.config.hidden)
        states = []
        for u_t in inputs.unbind(0):
            h = step(h, u_t)
            if keep_states:
                states.append(h)
        return torch.stack(states, dim=1) if keep_states else h

    def forward(self, x: Tensor) -> Tensor:
        """D h_T + d, or D h_t + d for every step under ``readout="all"`` (from :meth:`hidden_states`)."""
        if self.config.readout == "all":
            return self.D(self._run(x, keep_states=True))
        return self.D(self._run(x, keep_states=False))

    def hidden_states(self, x: Tensor) -> Tensor:
        """Hidden states h_1..h_T, shape (batch, time, hidden)."""
        return self._run(x, keep_states=True)

    def recurrent_matrices(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The matrices of the recurrence (column convention), e.g. {"A": ..., "W": ...}."""
        raise NotImplementedError

    def input_matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        """U (hidden x input_dim) of u_t = U x_t + b."""
        return _cast(self.U.weight, dtype)

    def readout_matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        """D (output_dim x hidden) of the output D h_T + d."""
        return _cast(self.D.weight, dtype)

    def lure_form(self) -> LureSystem | None:
        """h' = A h + tanh(W h + u) with the scheme that is run, or None if there is none."""
        return None

    def regularization(self) -> Tensor | None:
        """A term the model adds to the training loss (None: nothing)."""
        return None


class LureRNN(RecurrentModel):
    """A model whose recurrence is exactly a Lur'e system run with a fixed scheme."""

    engine_supported = True

    def matrices(self, dtype: torch.dtype | None = None) -> tuple[Tensor | None, Tensor]:
        """(A, W) in the column convention; A is None where it is zero."""
        raise NotImplementedError

    @property
    def _scheme(self) -> tuple[str, float | None, int]:
        c = self.config
        if c.discretization == "map":
            return "map", None, 1
        return c.discretization, c.eps / c.ode_substeps, c.ode_substeps

    def _step_function(self) -> StepFunction:
        A, W = self.matrices()
        return lure_step(A, W, *self._scheme)

    def _engine_system(self) -> EngineSystem:
        A, W = self.matrices()
        return A, W, None, build_scheme(*self._scheme)

    def recurrent_matrices(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        A, W = self.matrices(dtype)
        return {"W": W} if A is None else {"A": A, "W": W}

    def lure_inputs(self, x: Tensor) -> Tensor:
        """u_t = U x_t + b, the inputs of the Lur'e form, shape (batch, time, hidden)."""
        return self._input_sequence(x).transpose(0, 1)

    def lure_form(self) -> LureSystem:
        with torch.no_grad():
            A, W = self.matrices(torch.float64)
        method, eps, substeps = self._scheme
        A = torch.zeros_like(W) if A is None else A
        return LureSystem(A, W, slope=1.0, method=method, eps=eps, substeps=substeps)


def _plain_linear_call(module: nn.Module | None) -> bool:
    """Whether ``module(x)`` is ``linear(x, module.weight, module.bias)``: nn.Linear's forward, and no
    module or global hooks (the conditions of nn.Module's call without hooks)."""
    hooks = nn.modules.module
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and "forward" not in vars(module)
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or module._backward_pre_hooks or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                     or hooks._global_backward_hooks or hooks._global_backward_pre_hooks))


def _cast(parameter: Tensor, dtype: torch.dtype | None) -> Tensor:
    return parameter if dtype is None else parameter.to(dtype)


class LipschitzRNN(LureRNN):
    """dh/dt = A h + tanh(W h + u), A and W from M_A, M_W by the Lipschitz parameterization."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.M_A = self._square_parameter()
        self.M_W = self._square_parameter()

    def matrices(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        c = self.config
        return (lipschitz_matrix(_cast(self.M_A, dtype), c.beta_a, c.gamma_a),
                lipschitz_matrix(_cast(self.M_W, dtype), c.beta_w, c.gamma_w))


class AntisymmetricRNN(LureRNN):
    """h <- h + eps tanh((M - M^T - gamma I) h + u)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.M_W = self._square_parameter()

    def matrices(self, dtype: torch.dtype | None = None) -> tuple[None, Tensor]:
        M = _cast(self.M_W, dtype)
        return None, M - M.T - self.config.gamma_w * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


class CayleyRNN(LureRNN):
    """h <- tanh(W h + u) with the orthogonal W = (I + S)^-1 (I - S), S = M - M^T."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.M_W = self._square_parameter()

    def matrices(self, dtype: torch.dtype | None = None) -> tuple[None, Tensor]:
        M = _cast(self.M_W, dtype)
        S = M - M.T
        eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        return None, torch.linalg.solve(eye + S, eye - S)


class PlainWRNN(LureRNN):
    """Recurrences with a free matrix W = M_W: residual (euler), vanilla (map), node (ODE solver)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.M_W = self._square_parameter()

    def matrices(self, dtype: torch.dtype | None = None) -> tuple[None, Tensor]:
        return None, _cast(self.M_W, dtype)


class GatedLipschitzRNN(RecurrentModel):
    """h <- h + eps (A h + tanh(W h + u)) * sigmoid(W h + V x + c); no Lur'e form."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.M_A = self._square_parameter()
        self.M_W = self._square_parameter()
        self.V = nn.Linear(config.input_dim, config.hidden)
        nn.init.xavier_normal_(self.V.weight)
        nn.init.zeros_(self.V.bias)

    def recurrent_matrices(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        c = self.config
        return {"A": lipschitz_matrix(_cast(self.M_A, dtype), c.beta_a, c.gamma_a),
                "W": lipschitz_matrix(_cast(self.M_W, dtype), c.beta_w, c.gamma_w)}

    def _input_sequence(self, x: Tensor) -> Tensor:
        weight = torch.cat([self.U.weight, self.V.weight], dim=0)
        bias = torch.cat([self.U.bias, self.V.bias], dim=0)
        return nn.functional.linear(x.transpose(0, 1), weight, bias)

    def _step_function(self) -> StepFunction:
        mats = self.recurrent_matrices()
        stacked = torch.cat([mats["A"], mats["W"]], dim=0).T
        n, eps = self.config.hidden, self.config.eps

        def step(h: Tensor, inputs: Tensor) -> Tensor:
            z = h @ stacked
            Wh = z[:, n:]
            update = (z[:, :n] + torch.tanh(Wh + inputs[:, :n])) * torch.sigmoid(Wh + inputs[:, n:])
            return h + eps * update

        return step
