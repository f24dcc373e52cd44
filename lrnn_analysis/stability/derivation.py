"""Lur'e forms derived from the step a module runs: :func:`derive_lure_form`.

A step is a module's ``step(h, x)`` method, an ``nn.RNNCell``-like ``cell(x, h)`` or any callable;
the state h is one tensor (batch, ...) or a tuple of them (coRNN's (hy, hz)), stacked here into one
vector, tensor by tensor in argument order, each flattened. Its trace is read as

    h+ = M h + B s + d,   s = phi(C h + u(x))                                      (*)

with s the outputs of the elementwise nonlinearities phi (several applied side by side form one
block), u(x) the state-independent part of their argument and d what reaches the state outside
them. The result is a :class:`DerivedForm`: a :class:`LureSystem` (what every certificate routine
takes) in coordinates zeta with h = T zeta + c, its inputs u_t as a function of x_t, and a step
that runs it in the module's coordinates.

Tracing. ``make_fx`` (torch.fx's dispatch-level tracer) in fake-tensor mode, then functionalised
(in-place operations become out-of-place ones). Chosen over ``torch.fx.symbolic_trace`` because it
sees through Python and module calls (``nn.RNNCell`` is the aten operations it runs, its input
checks included), and over ``torch.export`` because it gives the same aten graph of any callable,
no ``nn.Module`` wrapper needed, in about a tenth of the time per trace (0.02 s against 0.2 s for
non-strict export with decompositions of an ``nn.RNNCell``, warm, on a shared CPU). With fake
tensors a branch on a tensor's value cannot be baked into the trace: it is refused.

Reading (*). The trace is interpreted in float64 (parameters and constants converted exactly; a
float32 module's form is that of its float32 weights), each state-dependent value kept affine in
the atoms: h, the output of each nonlinearity, and each input-dependent tensor that meets the
state. Sums, scaling by constants, products with constant matrices, slicing, concatenation,
reshaping and sums over features act on the coefficients; an elementwise nonlinearity adds an
atom. Anything else acting on the state is refused naming the operation and the node, e.g. a
product of two state-dependent values (the multiplicative gates of LSTM and GRU cells: not
derivable; :mod:`lrnn_analysis.stability.gated` has conditions for them).

Nonlinearities. A certificate uses only that phi acts elementwise with slopes in [0, L]:

* ``tanh``, ``relu``, ``leaky_relu(a)`` (a >= 0) as they are; clipping to [-c, c] (``hardtanh``,
  ``clamp``) is c hardtanh(z / c); ``clamp(min=0)`` is relu;
* ``sigmoid``: sigmoid(z) = 1/2 + tanh(z/2)/2. The affine change 2 sigmoid(z) - 1 = tanh(z/2)
  makes it tanh (sector [0, 1], phi(0) = 0) with its argument and its input matrix halved, so the
  slope bound 1/4 of sigmoid is carried by W; the constant 1/2 B 1 joins d;
* identity: a step with no nonlinearity, h+ = M h + V x_t + d, is the map h+ = identity(M h + u).

Drives. An input-dependent d (x_t added to the state outside every nonlinearity) has no place in
h+ = h + eps (A h + sigma(W h + u)): refused. A constant d is removed by the shift h = h~ + c with
(I - M) c = d (u gains C c), refused when no such c exists.

One stage (no nonlinearity's argument depends on another's output):

* B of rank r < m (m channels): k = m - r ghost states g, g+ = G s with G spanning B's null
  space, so that [B; G] has full column rank; g never feeds back, h runs exactly as before, and a
  contraction of (h, g) is one of h;
* M = 0: the map zeta+ = sigma(W zeta + u) with T = [B, Q] (Q a basis of the complement of
  range(B)), W = [C T; 0], u = [u; 0]: the padding channels see 0, and sigma(0) = 0;
* otherwise euler with step eps (``eps=`` if given, else ||B||_2, which is |b| when B = b I; the map
  is the same for every eps): T = [B / eps, Q], A = (T^-1 M T - I) / eps, W = [C T; 0].

Q and G are scaled to ||B||_2 so that T is as well conditioned as B allows.

T = I exactly when B = I (map) or B = eps I (euler): such forms are in the module's coordinates.

Several stages: the step must be an explicit Runge-Kutta scheme (euler with substeps, rk2, rk4,
rk38) of one field A h + sigma(W h + u) with u held over the step and B = I: eps from the last
stage (coefficient eps b_m I), A from the second-last (eps b_{m-1} I + eps^2 b_m a_{m,m-1} A, or
(I + eps A) eps for euler substeps), W and u from the first; the candidate's own trace (through
:func:`lrnn_analysis.models.lure_step`) must equal the module's, matrix by matrix.
"""
from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import InputError, UserCodeError, first_line
from ..lure import LureSystem, activation
from .forms import _TABLEAUS

__all__ = ["DerivedForm", "derive_lure_form", "resolve_step"]

_TRACE_BATCH = 3
# Two float64 matrices of one derivation are "the same" when they agree to this, relative to their size
# (a few hundred units of roundoff of the reconstructions, e.g. A from eps^2 A / 2 in rk2).
_AGREEMENT = 1e-11
# The derived form's step and the traced step, both in float64, agree to this (times cond(T)).
_SELF_CHECK = 1e-10
# Columns of B whose singular values fall below this, relative to the largest, get ghost states.
_RANK_TOLERANCE = 1e-8
_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "normal",
           "native_dropout", "uniform", "exponential", "multinomial", "randperm", "poisson", "cauchy"}
_IDENTITY = {"clone", "alias", "detach", "lift_fresh_copy", "contiguous"}
_MOVES = {"t", "permute", "transpose", "view", "_unsafe_view", "reshape", "expand", "slice", "select",
          "unsqueeze", "squeeze", "flip", "narrow", "split", "split_with_sizes", "unsafe_split",
          "unsafe_split_with_sizes", "chunk", "unbind", "repeat", "index_select", "roll", "diagonal"}
_SCATTERS = {"slice_scatter", "select_scatter"}
_SHAPE_ONLY = {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full"}
_NONLINEARITIES = {"tanh", "sigmoid", "relu", "leaky_relu", "hardtanh", "clamp", "clamp_min"}
_KNOWN_NONLINEARITIES = "tanh, sigmoid, relu, leaky_relu, hardtanh, identity"


def _op(target: Any) -> str:
    """The aten operation's name without overload (``sin``), or the Python function's."""
    packet = getattr(target, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(target, "__name__", str(target))


def _shown(target: Any) -> str:
    name = _op(target)
    return f"torch.{name}" if hasattr(torch, name) else f"aten.{name}"


def _refuse(node: Any, what: str) -> InputError:
    return InputError(f"cannot derive a Lur'e form: `{_shown(node.target)}` at node {node.name} {what}")


def _float64(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.detach().to("cpu", torch.float64)
    if isinstance(value, Tensor):
        return value.detach().cpu()
    return value


# ---------------------------------------------------------------------------------------------
# Resolving the step and tracing it


def resolve_step(step: Any, input_first: bool | None = None) -> tuple[Callable[[Any, Any], Any], nn.Module | None, bool]:
    """(f, module, input_first): f(state, x) runs one step; ``module`` owns the parameters (or None).

    An ``nn.RNNCellBase`` is called as ``cell(x, h)``; a module with a ``step`` method as
    ``module.step(h, x)``; any other callable as ``step(h, x)`` unless ``input_first``.
    """
    module = step if isinstance(step, nn.Module) else getattr(step, "__self__", None)
    module = module if isinstance(module, nn.Module) else None
    if isinstance(step, nn.RNNCellBase):
        first = True if input_first is None else input_first
        call: Callable[..., Any] = step
    elif isinstance(step, nn.Module) and callable(method := getattr(step, "step", None)):
        first, call = bool(input_first), method
    elif isinstance(step, nn.Module) and input_first is not None:
        first, call = input_first, step
    elif isinstance(step, nn.Module):
        raise InputError(f"{type(step).__name__} has no step(h, x) method and is not an RNN cell; pass its step, "
                         "or input_first=True for a module called as cell(x, h)")
    elif callable(step):
        first, call = bool(input_first), step
    else:
        raise InputError(f"the step must be a module or a callable, got {type(step).__name__}")
    return ((lambda state, x: call(x, state)) if first else call), module, first


def _shapes(value: Any, name: str) -> tuple[tuple[tuple[int, ...], ...], bool]:
    """Feature shapes (batch removed) of an example tensor / tuple of tensors, or of shapes given as
    ints; and whether the state is a tuple."""
    def is_shape(v: Any) -> bool:
        return isinstance(v, (tuple, list, torch.Size)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 1
                                                               for i in v)
    if isinstance(value, Tensor):
        if value.dim() < 2:
            raise InputError(f"{name}: an example needs a batch dimension first, got shape {tuple(value.shape)}")
        return (tuple(value.shape[1:]),), False
    if is_shape(value) and len(value) > 0:
        return (tuple(value),), False
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) or is_shape(v) for v in value):
        shapes = [_shapes(v, name)[0][0] for v in value]
        return tuple(shapes), True
    raise InputError(f"{name} must be an example tensor (batch, ...), a tuple of them, or feature shapes, got {value!r}")


def _default_shapes(step: Any) -> tuple[Any, Any]:
    if isinstance(step, nn.RNNCellBase):
        state = ((step.hidden_size,), (step.hidden_size,)) if isinstance(step, nn.LSTMCell) else (step.hidden_size,)
        return state, (step.input_size,)
    return None, None


@dataclass(frozen=True)
class _Signature:
    state_shapes: tuple[tuple[int, ...], ...]
    state_is_tuple: bool
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def state_size(self) -> int:
        return sum(math.prod(s) for s in self.state_shapes)

    def examples(self, generator: torch.Generator, batch: int, dtype: torch.dtype) -> tuple[list[Tensor], Tensor]:
        """States and an input of ``batch`` rows on the CPU, entries N(0, 1) drawn from ``generator``."""
        states = [torch.randn(batch, *s, generator=generator, dtype=dtype) for s in self.state_shapes]
        return states, torch.randn(batch, *self.input_shape, generator=generator, dtype=dtype)

    def pack(self, states: Sequence[Tensor]) -> Any:
        return tuple(states) if self.state_is_tuple else states[0]

    def unpack(self, out: Any, what: str) -> list[Tensor]:
        """The step's result as a list of state tensors, checked against the state's structure and shapes."""
        parts = list(out) if isinstance(out, (tuple, list)) else [out]
        if (isinstance(out, (tuple, list)) != self.state_is_tuple or len(parts) != len(self.state_shapes)
                or not all(isinstance(p, Tensor) for p in parts)):
            raise InputError(f"{what} returns {_describe(out)}, but the state is {_describe_shapes(self)}")
        for p, s in zip(parts, self.state_shapes):
            if tuple(p.shape[1:]) != s:
                expected = ", ".join(map(str, s))
                raise InputError(f"{what} returns a state of shape {tuple(p.shape)}, expected (batch, {expected})")
        return parts

    def stack(self, states: Sequence[Tensor]) -> np.ndarray:
        """The state tensors flattened and concatenated: (batch, N), float64."""
        return np.concatenate([s.detach().cpu().double().reshape(s.shape[0], -1).numpy() for s in states], axis=1)


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"one tensor {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return type(out).__name__


def _describe_shapes(signature: _Signature) -> str:
    if signature.state_is_tuple:
        return f"a tuple of {len(signature.state_shapes)} tensors"
    return "one tensor"


def _signature(step: Any, module: nn.Module | None, state: Any, x: Any) -> _Signature:
    default_state, default_x = _default_shapes(step)
    state = default_state if state is None else state
    x = default_x if x is None else x
    if state is None or x is None:
        raise InputError("derive_lure_form needs the state and the input: example tensors (batch first) or feature shapes")
    state_shapes, is_tuple = _shapes(state, "state")
    input_shapes, x_tuple = _shapes(x, "x")
    if x_tuple:
        raise InputError("x must be one tensor (batch, ...) or one feature shape")
    examples = [v for v in tree_flatten((state, x))[0] if isinstance(v, Tensor)]
    floating = [p for p in (module.parameters() if module is not None else []) if p.is_floating_point()]
    dtype = next((v.dtype for v in examples if v.is_floating_point()), None) or (
        floating[0].dtype if floating else torch.get_default_dtype())
    device = examples[0].device if examples else (floating[0].device if floating else torch.device("cpu"))
    return _Signature(state_shapes, is_tuple, input_shapes[0], dtype, device)


def _trace(f: Callable[[Any, Any], Any], signature: _Signature) -> torch.fx.GraphModule:
    """The functional aten graph of one step, traced with fake tensors of batch ``_TRACE_BATCH``."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    count = len(signature.state_shapes)

    def flat(*tensors: Tensor) -> tuple[Tensor, ...]:
        out = f(signature.pack(list(tensors[:count])), tensors[count])
        return tuple(signature.unpack(out, "the step"))

    generator = torch.Generator().manual_seed(0)
    states, x = signature.examples(generator, _TRACE_BATCH, signature.dtype)
    states, x = [s.to(signature.device) for s in states], x.to(signature.device)
    # The fake-tensor layer logs a traceback for every failing operation before raising; the failure is reported below.
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad():
            graph = make_fx(flat, tracing_mode="fake", _allow_non_fake_inputs=True)(*states, x)
            graph = make_fx(torch.func.functionalize(graph, remove="mutations"), tracing_mode="fake",
                            _allow_non_fake_inputs=True)(*states, x)
    except InputError:
        raise
    except (GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException) as error:
        raise InputError("cannot derive a Lur'e form: the step branches on the values of tensors "
                         f"(data-dependent control flow): {first_line(error)}") from error
    except Exception as error:  # the user's step: any failure is theirs to fix
        raise UserCodeError(f"the step fails when traced (state: {_describe_shapes(signature)} of feature shapes "
                            f"{list(signature.state_shapes)}, input of feature shape {list(signature.input_shape)}): "
                            f"{type(error).__name__}: {first_line(error)}") from error
    finally:
        logger.setLevel(level)
    for node in graph.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable and not (
                _op(node.target) == "copy_" and node.args[0].op == "placeholder"):
            raise _refuse(node, "updates a tensor in place that is not an argument of the step: the step keeps state "
                                "outside its arguments")
    graph.graph.eliminate_dead_code()
    return graph


# ---------------------------------------------------------------------------------------------
# Interpreting the trace


@dataclass(frozen=True)
class _Atom:
    kind: str  # "state", "sigma" or "input"
    node: str
    start: int
    width: int

    @property
    def columns(self) -> slice:
        return slice(self.start, self.start + self.width)


class _Affine:
    """A state-dependent value of shape (batch, *features): sum over atoms of coef[d] * atom[:, d] + const.

    ``coef`` has shape (D, *features) for the D atoms known when it was made (later atoms have
    coefficient 0), or is None for 0; ``const`` has shape ``features`` or is None for 0.
    """

    __slots__ = ("coef", "const", "features")

    def __init__(self, coef: Tensor | None, const: Tensor | None, features: tuple[int, ...]) -> None:
        self.coef, self.const, self.features = coef, const, tuple(features)

    @property
    def shape(self) -> tuple[int, ...]:
        return (_TRACE_BATCH, *self.features)

    def matrix(self, D: int) -> Tensor:
        """Coefficients as (features flattened, D)."""
        width = math.prod(self.features)
        if self.coef is None:
            return torch.zeros(width, D, dtype=torch.float64)
        coef = self.coef.reshape(self.coef.shape[0], width).T
        return torch.nn.functional.pad(coef, (0, D - coef.shape[1]))

    def offset(self) -> Tensor:
        width = math.prod(self.features)
        return torch.zeros(width, dtype=torch.float64) if self.const is None else self.const.reshape(width)


@dataclass(frozen=True)
class _Stage:
    """One elementwise nonlinearity of the trace: phi_raw(z) = out_scale * activation(in_scale * z) + shift."""

    node: str
    op: str
    kind: str
    in_scale: float
    out_scale: float
    shift: float
    atom: _Atom
    argument: _Affine


@dataclass(frozen=True)
class _Structure:
    """(*) read off the trace, every matrix over all atoms (columns), float64."""

    atoms: tuple[_Atom, ...]
    outputs: Tensor  # (N, D)
    output_const: Tensor  # (N,)
    stages: tuple[_Stage, ...]
    arguments: tuple[Tensor, ...]  # (width_j, D) per stage
    argument_consts: tuple[Tensor, ...]  # (width_j,) per stage
    N: int


def _sum(a: Any, b: Any, scale: float) -> Any:
    if a is None:
        return None if b is None else scale * b
    return a if b is None else a + scale * b


def _shape(value: Any) -> tuple[int, ...]:
    return value.shape if isinstance(value, _Affine) else tuple(torch.as_tensor(value).shape)


def _values(node: torch.fx.Node, env: dict[str, Any]) -> tuple[Any, Any]:
    """The node's (args, kwargs) with every input node replaced by its value in ``env``."""
    return tree_map(lambda a: env[a.name] if isinstance(a, torch.fx.Node) else a, (node.args, node.kwargs))


def _pad_rows(coef: Tensor | None, D: int) -> Tensor | None:
    if coef is None or coef.shape[0] == D:
        return coef
    return torch.cat([coef, coef.new_zeros(D - coef.shape[0], *coef.shape[1:])])


class _Interpreter:
    """Runs a traced step in float64: concretely, or with the state kept affine (module docstring)."""

    def __init__(self, graph: torch.fx.GraphModule, signature: _Signature) -> None:
        self.graph = graph
        self.signature = signature
        self.placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
        self.constants = {n.target: _float64(getattr(graph, n.target)).clone() for n in graph.graph.nodes
                          if n.op == "get_attr"}
        self.symbolic: set[str] = set()

    # -- concrete evaluation --------------------------------------------------------------------

    def evaluate(self, states: Sequence[Tensor], x: Tensor, skip: AbstractSet[str] = frozenset()) -> dict[str, Any]:
        """Every node's value for a batch of ``_TRACE_BATCH`` (nodes in ``skip`` are not computed)."""
        env: dict[str, Any] = {}
        for node in self.graph.graph.nodes:
            if node.name in skip:
                continue
            if node.op == "placeholder":
                index = self.placeholders.index(node)
                env[node.name] = _float64(states[index] if index < len(states) else x).clone()
            elif node.op == "get_attr":
                env[node.name] = self.constants[node.target]
            elif node.op == "call_function" and _op(node.target) == "copy_":
                env[node.name] = env[node.args[1].name]
            elif node.op == "call_function":
                env[node.name] = _execute(node, *_values(node, env))
            elif node.op == "output" and not skip:
                env["output"] = [env[a.name] for a in node.args[0]]
        return env

    # -- affine evaluation ----------------------------------------------------------------------

    def structure(self, x: Tensor) -> _Structure:
        """The structure (*) of the step, read with the input ``x`` (batch ``_TRACE_BATCH``)."""
        self.atoms: list[_Atom] = []
        self.stages: list[_Stage] = []
        self.varies: dict[str, bool] = {}
        self.symbolic = set()
        env: dict[str, Any] = {}
        states = self.placeholders[:-1]
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                if node in states:
                    shape = self.signature.state_shapes[states.index(node)]
                    atom = self._atom("state", node.name, math.prod(shape))
                    env[node.name] = self._basis(atom, shape)
                    self.symbolic.add(node.name)
                else:
                    env[node.name] = _float64(x)
                    self.varies[node.name] = True
            elif node.op == "get_attr":
                env[node.name] = self.constants[node.target]
            elif node.op == "call_function":
                env[node.name] = self._call(node, env)
            elif node.op == "output":
                outputs = [self._as_affine(env[a.name], a, (_TRACE_BATCH, *shape), node)
                           for a, shape in zip(node.args[0], self.signature.state_shapes)]
        D = self.atoms[-1].start + self.atoms[-1].width
        matrix = torch.cat([o.matrix(D) for o in outputs])
        const = torch.cat([o.offset() for o in outputs])
        return _Structure(tuple(self.atoms), matrix, const, tuple(self.stages),
                          tuple(s.argument.matrix(D) for s in self.stages),
                          tuple(s.argument.offset() for s in self.stages), self.signature.state_size)

    def _atom(self, kind: str, name: str, width: int) -> _Atom:
        start = self.atoms[-1].start + self.atoms[-1].width if self.atoms else 0
        atom = _Atom(kind, name, start, width)
        self.atoms.append(atom)
        return atom

    def _basis(self, atom: _Atom, features: tuple[int, ...]) -> _Affine:
        coef = torch.zeros(atom.start + atom.width, atom.width, dtype=torch.float64)
        coef[atom.columns] = torch.eye(atom.width, dtype=torch.float64)
        return _Affine(coef.reshape(-1, *features), None, features)

    def _call(self, node: torch.fx.Node, env: dict[str, Any]) -> Any:
        values = _values(node, env)
        nodes = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, torch.fx.Node)]
        name = _op(node.target)
        if name == "copy_":  # the write-back of a step that updates its state argument in place (_trace allows no other)
            source = node.args[1]
            if isinstance(source, torch.fx.Node) and source.name in self.symbolic:
                self.symbolic.add(node.name)
            return values[0][1]
        if name in _RANDOM:
            raise InputError(f"cannot derive a Lur'e form: the step draws random numbers (`{_shown(node.target)}` at node "
                             f"{node.name}); a certificate is for a deterministic recurrence (use eval mode)")
        symbolic = any(a.name in self.symbolic for a in nodes)
        if not symbolic:
            self.varies[node.name] = any(self.varies.get(a.name, False) for a in nodes)
            return _execute(node, *values)
        if name in _SHAPE_ONLY:
            self.varies[node.name] = False
            args, kwargs = values
            dummy = torch.zeros(args[0].shape, dtype=torch.float64)
            return _execute(node, (dummy, *args[1:]), kwargs)
        self.symbolic.add(node.name)
        args, kwargs = values
        if node.target is operator.getitem:
            return args[0][args[1]]
        handler = _HANDLERS.get(name)
        if handler is None:
            raise _refuse(node, "acts on the state and is neither a linear map nor an elementwise sector "
                                f"nonlinearity the toolkit knows ({_KNOWN_NONLINEARITIES})")
        return handler(self, node, args, kwargs)

    # operands ------------------------------------------------------------------------------------

    def _varies(self, arg: Any) -> bool:
        return isinstance(arg, torch.fx.Node) and self.varies.get(arg.name, False)

    def _as_affine(self, value: Any, arg: Any, shape: tuple[int, ...], node: torch.fx.Node) -> _Affine:
        """``value`` (the operand ``arg`` of ``node``) as an affine value broadcast to ``shape``."""
        if isinstance(value, _Affine):
            return value if value.shape == tuple(shape) else self._expand(value, shape, node)
        tensor = torch.as_tensor(value, dtype=torch.float64)
        if self._varies(arg):
            if tensor.dim() == 0 or tensor.shape[0] != _TRACE_BATCH:
                raise _refuse(node, f"meets the state with an input-dependent value of shape {tuple(tensor.shape)} "
                                    "whose first dimension is not the batch")
            atom = next((a for a in self.atoms if a.kind == "input" and a.node == arg.name), None)
            if atom is None:
                atom = self._atom("input", arg.name, math.prod(tensor.shape[1:]))
            basis = self._basis(atom, tuple(tensor.shape[1:]))
            return basis if basis.shape == tuple(shape) else self._expand(basis, shape, node)
        try:
            full = tensor.broadcast_to(shape)
        except RuntimeError:
            raise _refuse(node, f"broadcasts a state of shape {tuple(shape)} with a constant of shape "
                                f"{tuple(tensor.shape)}") from None
        if not torch.equal(full, full[:1].expand_as(full)):
            raise _refuse(node, "combines the state with a constant that differs between batch rows")
        return _Affine(None, full[0].clone(), tuple(shape[1:]))

    def _factor(self, value: Any, arg: Any, shape: tuple[int, ...], node: torch.fx.Node) -> Tensor:
        """A constant multiplying the state, as one row of ``shape[1:]``: input-dependent ones are gates."""
        if isinstance(value, _Affine):
            raise _refuse(node, "multiplies two state-dependent values: a multiplicative gate (as in LSTM and GRU "
                                "cells) is not a Lur'e form; gated cells cannot be derived")
        if self._varies(arg):
            raise _refuse(node, "multiplies the state by an input-dependent value: an input gate is not a Lur'e form")
        constant = self._as_affine(value, None, shape, node)
        assert constant.const is not None  # a value that is not affine (checked above) becomes a constant with const set
        return constant.const

    def _broadcast(self, operands: Sequence[Any], node: torch.fx.Node) -> tuple[int, ...]:
        shapes = [_shape(v) for v in operands]
        shape = tuple(torch.broadcast_shapes(*shapes))
        if not shape or shape[0] != _TRACE_BATCH or any(isinstance(v, _Affine) and len(v.shape) != len(shape)
                                                       for v in operands):
            raise _refuse(node, f"broadcasts the state of shape {[s for s in shapes]} across its batch dimension")
        return shape

    # handlers ------------------------------------------------------------------------------------

    def _linear_combination(self, node: torch.fx.Node, terms: Sequence[tuple[Any, Any, float]]) -> _Affine:
        shape = self._broadcast([value for value, _, _ in terms], node)
        parts = [(self._as_affine(value, arg, shape, node), scale) for value, arg, scale in terms]
        D = self.atoms[-1].start + self.atoms[-1].width
        coef = const = None
        for part, scale in parts:
            coef = _sum(_pad_rows(coef, D), _pad_rows(part.coef, D), scale)
            const = _sum(const, part.const, scale)
        return _Affine(coef, const, shape[1:])

    def _add(self, node, args, kwargs) -> _Affine:
        alpha = kwargs.get("alpha", 1)
        sign = -1.0 if _op(node.target) == "sub" else 1.0
        return self._linear_combination(node, [(args[0], node.args[0], 1.0), (args[1], node.args[1], sign * alpha)])

    def _rsub(self, node, args, kwargs) -> _Affine:
        alpha = kwargs.get("alpha", 1)
        return self._linear_combination(node, [(args[1], node.args[1], 1.0), (args[0], node.args[0], -alpha)])

    def _neg(self, node, args, kwargs) -> _Affine:
        return self._linear_combination(node, [(args[0], node.args[0], -1.0)])

    def _scale(self, node, args, kwargs) -> _Affine:
        (a, b), (arg_a, arg_b) = args[:2], node.args[:2]
        if _op(node.target) == "div":
            if isinstance(b, _Affine):
                raise _refuse(node, "divides by a state-dependent value")
            if kwargs.get("rounding_mode") is not None:
                raise _refuse(node, "rounds the state")
        elif not isinstance(a, _Affine):
            (a, b), (arg_a, arg_b) = (b, a), (arg_b, arg_a)
        shape = self._broadcast([a, b], node)
        value = self._as_affine(a, arg_a, shape, node)
        factor = self._factor(b, arg_b, shape, node)
        if _op(node.target) == "div":
            factor = 1.0 / factor
        coef = None if value.coef is None else value.coef * factor
        const = None if value.const is None else value.const * factor
        return _Affine(coef, const, shape[1:])

    def _product(self, node: torch.fx.Node, value: _Affine, matrix: Any, arg: Any) -> _Affine:
        """value @ matrix for a constant matrix (row convention: the state's features times the matrix)."""
        if isinstance(matrix, _Affine):
            raise _refuse(node, "multiplies two state-dependent values: a multiplicative gate (as in LSTM and GRU "
                                "cells) is not a Lur'e form; gated cells cannot be derived")
        if self._varies(arg):
            raise _refuse(node, "multiplies the state by an input-dependent matrix: not a Lur'e form")
        if len(value.features) != 1:
            raise _refuse(node, f"multiplies a state-dependent tensor of shape {value.shape} by a matrix; "
                                "only (batch, features) @ matrix is read")
        matrix = torch.as_tensor(matrix, dtype=torch.float64)
        coef = None if value.coef is None else value.coef @ matrix
        const = None if value.const is None else value.const @ matrix
        return _Affine(coef, const, (matrix.shape[1],))

    def _left(self, node: torch.fx.Node) -> InputError:
        return _refuse(node, "multiplies a matrix by the state from the left: the batch dimension must stay first "
                             "(write the step in PyTorch's row convention, h @ W.T or F.linear)")

    def _mm(self, node, args, kwargs) -> _Affine:
        if not isinstance(args[0], _Affine):
            raise self._left(node)
        return self._product(node, args[0], args[1], node.args[1])

    def _addmm(self, node, args, kwargs) -> _Affine:
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        bias, left, right = args[:3]
        if isinstance(right, _Affine) and not isinstance(left, _Affine):
            raise self._left(node)
        left = self._as_affine(left, node.args[1], _shape(left), node)
        product = self._product(node, left, right, node.args[2])
        return self._linear_combination(node, [(bias, node.args[0], beta), (product, None, alpha)])

    def _identity(self, node, args, kwargs) -> Any:
        if _op(node.target) == "_to_copy":
            dtype = kwargs.get("dtype")
            if dtype is not None and not dtype.is_floating_point:
                raise _refuse(node, f"converts the state to {dtype}")
        return args[0]

    def _rearrange(self, node: torch.fx.Node, operands: Sequence[tuple[Any, Any]],
                   apply: Callable[[list[Tensor]], Any]) -> list[_Affine]:
        """A data movement (view, slice, permute, split, cat, slice_scatter, ...) of the operands, applied to
        their coefficients through index tensors: entry k of an output comes from entry index[k] of the
        operands' features laid end to end. A marker tensor holding the batch row checks that each
        output row comes from the same row of the inputs."""
        parts = [self._as_affine(value, arg, _shape(value), node) for value, arg in operands]
        D = self.atoms[-1].start + self.atoms[-1].width
        widths = [math.prod(p.features) for p in parts]
        starts = np.cumsum([0] + widths)
        indices = [torch.arange(int(start), int(start) + w).reshape(p.features).expand(p.shape).clone()
                   for start, w, p in zip(starts, widths, parts)]
        markers = [torch.arange(_TRACE_BATCH).reshape(_TRACE_BATCH, *[1] * len(p.features)).expand(p.shape).clone()
                   for p in parts]
        table = torch.cat([p.matrix(D).T for p in parts], dim=1)
        consts = torch.cat([p.offset() for p in parts])
        moved, marks = apply(indices), apply(markers)
        moved = list(moved) if isinstance(moved, (tuple, list)) else [moved]
        marks = list(marks) if isinstance(marks, (tuple, list)) else [marks]
        results = []
        for out, mark in zip(moved, marks):
            batch = torch.arange(_TRACE_BATCH).reshape(_TRACE_BATCH, *[1] * (mark.dim() - 1)) if mark.dim() else None
            if batch is None or mark.shape[0] != _TRACE_BATCH or not torch.equal(mark, batch.expand_as(mark)) \
                    or not torch.equal(out, out[:1].expand_as(out)):
                raise _refuse(node, "moves or mixes the batch dimension of a state-dependent tensor (write the step "
                                    "with the batch first, in PyTorch's row convention)")
            selected = out[0].reshape(-1)
            features = tuple(out.shape[1:])
            results.append(_Affine(table[:, selected].reshape(D, *features), consts[selected].reshape(features), features))
        return results

    def _expand(self, value: _Affine, shape: tuple[int, ...], node: torch.fx.Node) -> _Affine:
        return self._rearrange(node, [(value, None)], lambda ts: ts[0].expand(shape))[0]

    def _moves(self, node, args, kwargs) -> Any:
        results = self._rearrange(node, [(args[0], node.args[0])], lambda ts: node.target(ts[0], *args[1:], **kwargs))
        returns = node.target._schema.returns
        single = len(returns) == 1 and not isinstance(returns[0].type, torch.ListType)
        return results[0] if single else results

    def _join(self, node, args, kwargs) -> _Affine:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return self._rearrange(node, list(zip(args[0], node.args[0])), lambda ts: node.target(ts, dim))[0]

    def _copied(self, node, args, kwargs) -> _Affine:
        """copy(self, src): src broadcast to the shape of self."""
        return self._as_affine(args[1], node.args[1], _shape(args[0]), node)

    def _scatter(self, node, args, kwargs) -> _Affine:
        operands = [(args[0], node.args[0]), (args[1], node.args[1])]
        return self._rearrange(node, operands, lambda ts: node.target(ts[0], ts[1], *args[2:], **kwargs))[0]

    def _reduce(self, node, args, kwargs) -> _Affine:
        value = args[0]
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        rank = len(value.shape)
        dims = [d % rank for d in ([dims] if isinstance(dims, int) else (dims or range(rank)))]
        if 0 in dims:
            raise _refuse(node, "sums the state over the batch dimension")
        count = math.prod(value.shape[d] for d in dims) if _op(node.target) == "mean" else 1
        coef = None if value.coef is None else value.coef.sum(dims, keepdim=keepdim) / count
        const = None if value.const is None else value.const.sum([d - 1 for d in dims], keepdim=keepdim) / count
        features = tuple(torch.zeros(value.shape).sum(dims, keepdim=keepdim).shape[1:])
        return _Affine(coef, const, features)

    def _nonlinearity(self, node, args, kwargs) -> _Affine:
        value = args[0]
        if not isinstance(value, _Affine):
            raise _refuse(node, "has a state-dependent parameter")
        kind, in_scale, out_scale, shift = _normalised(node, args, kwargs)
        atom = self._atom("sigma", node.name, math.prod(value.features))
        self.stages.append(_Stage(node.name, _shown(node.target), kind, in_scale, out_scale, shift, atom, value))
        return self._basis(atom, value.features)


def _normalised(node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, float, float, float]:
    """(activation, in_scale, out_scale, shift) with phi(z) = out_scale * activation(in_scale * z) + shift."""
    name = _op(node.target)
    if name == "tanh":
        return "tanh", 1.0, 1.0, 0.0
    if name == "sigmoid":
        return "tanh", 0.5, 0.5, 0.5
    if name == "relu":
        return "relu", 1.0, 1.0, 0.0
    if name == "leaky_relu":
        a = float(args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01))
        if not (math.isfinite(a) and a >= 0):
            raise _refuse(node, f"has negative slope {a}: its slopes leave [0, L], so it is not a sector nonlinearity")
        return activation(f"leaky_relu({a!r})").name, 1.0, 1.0, 0.0
    if name == "hardtanh":
        low, high = (list(args[1:3]) + [None, None])[:2]
        low = kwargs.get("min_val", -1.0) if low is None else low
        high = kwargs.get("max_val", 1.0) if high is None else high
    elif name == "clamp_min":
        low, high = args[1], None
    else:
        low = args[1] if len(args) > 1 else kwargs.get("min")
        high = args[2] if len(args) > 2 else kwargs.get("max")
    if low is not None and high is None and float(low) == 0.0:
        return "relu", 1.0, 1.0, 0.0
    if low is not None and high is not None and float(high) > 0 and float(low) == -float(high):
        c = float(high)
        return "hardtanh", 1.0 / c, c, 0.0
    raise _refuse(node, f"clips to [{low}, {high}]: only clipping to [0, inf) (relu) or to [-c, c] (c hardtanh(z / c)) "
                        "is a sector nonlinearity the toolkit knows")


_HANDLERS: dict[str, Callable[..., Any]] = {
    "add": _Interpreter._add, "sub": _Interpreter._add, "rsub": _Interpreter._rsub, "neg": _Interpreter._neg,
    "mul": _Interpreter._scale, "div": _Interpreter._scale, "mm": _Interpreter._mm, "addmm": _Interpreter._addmm,
    "cat": _Interpreter._join, "stack": _Interpreter._join, "sum": _Interpreter._reduce, "mean": _Interpreter._reduce,
    **{name: _Interpreter._identity for name in _IDENTITY | {"_to_copy"}},
    **{name: _Interpreter._moves for name in _MOVES},
    **{name: _Interpreter._scatter for name in _SCATTERS}, "copy": _Interpreter._copied,
    **{name: _Interpreter._nonlinearity for name in _NONLINEARITIES},
}


def _execute(node: torch.fx.Node, args: Any, kwargs: Any) -> Any:
    """Run one operation on concrete values in float64 on the CPU."""
    kwargs = dict(kwargs)
    if "device" in kwargs:
        kwargs["device"] = torch.device("cpu")
    if isinstance(kwargs.get("dtype"), torch.dtype) and kwargs["dtype"].is_floating_point:
        kwargs["dtype"] = torch.float64
    target = node.target
    assert callable(target)  # only call_function nodes are executed, and their target is the function
    return tree_map(_float64, target(*args, **kwargs))


# ---------------------------------------------------------------------------------------------
# From the structure to a Lur'e system


@dataclass(frozen=True)
class _Assembled:
    system: LureSystem
    T: np.ndarray
    offset: np.ndarray
    ghosts: int
    stages: int
    input_nodes: tuple[str, ...]
    input_matrix: np.ndarray
    input_const: np.ndarray
    notes: tuple[str, ...]


def _nonzero(matrix: Tensor) -> bool:
    return bool(matrix.numel()) and bool(matrix.abs().max() > 0)


def _agree(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        return False
    size = max(1.0, float(a.abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0)
    return not a.numel() or float((a - b).abs().max()) <= _AGREEMENT * size


def _live_stages(s: _Structure) -> list[int]:
    """Indices of the stages that reach the next state (directly or through later live stages)."""
    live: list[int] = []
    for j in reversed(range(len(s.stages))):
        columns = s.stages[j].atom.columns
        if _nonzero(s.outputs[:, columns]) or any(_nonzero(s.arguments[i][:, columns]) for i in live):
            live.append(j)
    return sorted(live)


def _input_part(s: _Structure, matrix: Tensor) -> Tensor:
    parts = [matrix[:, a.columns] for a in s.atoms if a.kind == "input"]
    return torch.cat(parts, dim=1) if parts else matrix.new_zeros(matrix.shape[0], 0)


def _refuse_drive(s: _Structure) -> None:
    for atom in s.atoms:
        if atom.kind == "input" and _nonzero(s.outputs[:, atom.columns]):
            raise InputError(f"cannot derive a Lur'e form: the input reaches the state outside every nonlinearity "
                             f"(through node {atom.node}); a Lur'e form h+ = h + eps (A h + sigma(W h + u)) takes the "
                             "input only inside sigma")


def _assemble(s: _Structure, eps: float | None) -> _Assembled:
    parts = (s.outputs, s.output_const, *s.arguments, *s.argument_consts)
    if not all(bool(torch.isfinite(p).all()) for p in parts):
        raise InputError("cannot derive a Lur'e form: the step's matrices are not finite (its weights hold inf or nan, "
                         "or it divides by zero)")
    live = _live_stages(s)
    for j in live:
        for i in live:
            if i != j and _nonzero(s.arguments[j][:, s.stages[i].atom.columns]):
                return _runge_kutta(s, live, eps)
    if live:
        _refuse_drive(s)
    return _one_stage(s, live, eps)


def _one_stage(s: _Structure, live: list[int], eps: float | None) -> _Assembled:
    N = s.N
    M = s.outputs[:, :N].numpy()
    drive = s.output_const.clone()
    notes: list[str] = []
    input_nodes = tuple(a.node for a in s.atoms if a.kind == "input")
    if not live:
        notes.append("no nonlinearity reaches the state: the linear step h+ = M h + u is the map "
                     "h+ = identity(M h + u), identity being a sector-[0, 1] nonlinearity")
        system = LureSystem(np.zeros((N, N)), M, slope=1.0, method="map", activation="identity")
        matrix = _input_part(s, s.outputs).numpy()
        return _Assembled(system, np.eye(N), np.zeros(N), 0, 1, input_nodes, matrix, drive.numpy(), tuple(notes))
    stages = [s.stages[j] for j in live]
    kinds = sorted({stage.kind for stage in stages})
    if len(kinds) > 1:
        listed = ", ".join(f"{stage.op} at node {stage.node}" for stage in stages)
        raise InputError(f"cannot derive a Lur'e form: the step applies different nonlinearities ({listed}); "
                         "a Lur'e system has one elementwise sigma")
    B_parts, C_parts, L_parts, u_parts = [], [], [], []
    for j, stage in zip(live, stages):
        B_j = s.outputs[:, stage.atom.columns]
        drive = drive + stage.shift * B_j.sum(dim=1)
        B_parts.append(stage.out_scale * B_j)
        C_parts.append(stage.in_scale * s.arguments[j][:, :N])
        L_parts.append(stage.in_scale * _input_part(s, s.arguments[j]))
        u_parts.append(stage.in_scale * s.argument_consts[j])
        if stage.op == "torch.sigmoid":
            notes.append(f"{stage.op} at node {stage.node}: sigmoid(z) = 1/2 + tanh(z/2)/2, written as tanh with its "
                         "argument and input matrix halved (slope 1/4 overall) and 1/2 B 1 a constant input")
        elif stage.kind == "hardtanh" and stage.out_scale != 1.0:
            notes.append(f"{stage.op} at node {stage.node}: clipping to [-c, c] is c hardtanh(z / c), c = {stage.out_scale}")
    B = torch.cat(B_parts, dim=1).numpy()
    C = torch.cat(C_parts).numpy()
    L = torch.cat(L_parts).numpy()
    u = torch.cat(u_parts).numpy()
    m = B.shape[1]
    offset = np.zeros(N)
    d = drive.numpy()
    if np.any(d != 0):
        I_minus_M = np.eye(N) - M
        offset = np.linalg.lstsq(I_minus_M, d, rcond=None)[0]
        residual = np.abs(I_minus_M @ offset - d).max()
        if not residual <= _AGREEMENT * (np.abs(d).max() + np.abs(I_minus_M).max() * np.abs(offset).max()):
            raise InputError("cannot derive a Lur'e form: a constant reaches the state outside every nonlinearity and no "
                             "shift of the state removes it ((I - M) c = d has no solution)")
        u = u + C @ offset
        notes.append("a constant d reaches the state outside the nonlinearity: removed by the shift h = h~ + c, "
                     "(I - M) c = d")
    singular = np.linalg.svd(B, compute_uv=False)
    norm = float(singular[0])
    rank = int(np.sum(singular > _RANK_TOLERANCE * norm))
    ghosts = m - rank
    if ghosts:
        G = norm * np.linalg.svd(B)[2][rank:]
        B = np.vstack([B, G])
        M = np.block([[M, np.zeros((N, ghosts))], [np.zeros((ghosts, N + ghosts))]])
        C = np.hstack([C, np.zeros((m, ghosts))])
        notes.append(f"{ghosts} ghost state(s) g+ = G s make the nonlinearity's input matrix [B; G] full column rank; "
                     "g never feeds back")
    n = N + ghosts
    method = "euler" if np.any(M != 0) else "map"
    scalar = B.shape[0] == B.shape[1] and np.array_equal(B, B[0, 0] * np.eye(n)) and B[0, 0] != 0
    step = 1.0 if method == "map" else (eps if eps is not None else (abs(float(B[0, 0])) if scalar else norm))
    if method == "euler" and eps is None and not scalar:
        notes.append(f"euler step eps = ||B||_2 = {norm:.6g}: the nonlinearity's input matrix B is not a multiple of "
                     "the identity, and every eps gives the same map (pass eps= to choose)")
    scaled = B / step
    if scaled.shape[0] == scaled.shape[1] and np.array_equal(scaled, np.eye(n)):
        T = np.eye(n)
    else:
        complement = np.linalg.svd(B, full_matrices=True)[0][:, m:] * (norm / step)
        T = np.hstack([scaled, complement])
        columns = "B" if method == "map" else "B / eps"
        notes.append(f"coordinates h = T zeta with T = [{columns}, Q], Q spanning the complement of range(B) "
                     f"(condition number of T {np.linalg.cond(T):.3g})")
    W = np.zeros((n, n))
    W[:m] = C @ T
    A = np.zeros((n, n)) if method == "map" else (np.linalg.solve(T, M @ T) - np.eye(n)) / step
    if method == "euler" and np.array_equal(T, np.eye(n)):
        A = (M - np.eye(n)) / step
    kind = stages[0].kind
    system = LureSystem(A, W, slope=activation(kind).max_slope, method=method,
                        eps=None if method == "map" else step, activation=kind)
    input_matrix = np.zeros((n, L.shape[1]))
    input_matrix[:m] = L
    input_const = np.zeros(n)
    input_const[:m] = u
    return _Assembled(system, T, offset, ghosts, 1, input_nodes, input_matrix, input_const, tuple(notes))


def _runge_kutta(s: _Structure, live: list[int], eps: float | None) -> _Assembled:
    """The explicit Runge-Kutta scheme the stages form, checked matrix by matrix against its own trace."""
    from ..models.architectures import lure_step

    N, stages = s.N, [s.stages[j] for j in live]
    first = next((st, other) for j, st in zip(live, stages) for other in stages
                 if st is not other and _nonzero(s.arguments[j][:, other.atom.columns]))
    refusal = (f"cannot derive a Lur'e form: the argument of {first[0].op} at node {first[0].node} depends on the output "
               f"of {first[1].op} at node {first[1].node}, and the step is not an explicit Runge-Kutta scheme (euler "
               "with substeps, rk2, rk4, rk38) of one field A h + sigma(W h + u) with u held over the step")
    kinds = {(st.kind, st.in_scale, st.out_scale, st.shift) for st in stages}
    if len(kinds) != 1 or next(iter(kinds))[1:] != (1.0, 1.0, 0.0) or any(st.atom.width != N for st in stages) \
            or _nonzero(s.output_const) or _nonzero(_input_part(s, s.outputs)):
        raise InputError(refusal)
    K = len(stages)
    arguments = [s.arguments[j] for j in live]
    inputs = [_input_part(s, a) for a in arguments]
    consts = [s.argument_consts[j] for j in live]
    if not all(_agree(inputs[0], v) and _agree(consts[0], c) for v, c in zip(inputs, consts)):
        raise InputError(refusal)
    last = s.outputs[:, stages[-1].atom.columns]
    scale = float(last.diagonal().mean())
    eye = torch.eye(N, dtype=torch.float64)
    if scale <= 0 or not _agree(last, scale * eye):
        raise InputError(refusal)
    previous = s.outputs[:, stages[-2].atom.columns]
    W = arguments[0][:, :N]
    signature = _Signature(((N,),), False, (N,), torch.float64, torch.device("cpu"))
    for name, (a, b) in _TABLEAUS.items():
        m = len(b)
        if K % m or (m == 1 and K < 2):
            continue
        h = scale / b[-1]
        # sigma of the second-last stage enters the next state through eps b_{m-1} I + eps^2 b_m a_{m,m-1} A
        # (through (I + eps A) eps for euler substeps): A from it, W from the first stage.
        A = (previous / h - eye) / h if m == 1 else (previous - h * b[-2] * eye) / (h * h * b[-1] * a[-1][-2])
        substeps = K // m
        with torch.no_grad():  # the linear part first: tanh(0 h + 0) = 0, one cheap evaluation rules most schemes out
            linear_part = lure_step(A, torch.zeros_like(W), name, h, substeps)(eye, torch.zeros_like(eye)).T
        if not _agree(linear_part, s.outputs[:, :N]):
            continue
        candidate = _Interpreter(_trace(lure_step(A, W, name, h, substeps), signature), signature)
        c = candidate.structure(torch.zeros(_TRACE_BATCH, N, dtype=torch.float64))
        if len(c.stages) == K and all(
                _agree(c.outputs[:, cs.atom.columns], s.outputs[:, ms.atom.columns])
                and _agree(c.arguments[j][:, :N], arguments[j][:, :N])
                and all(_agree(c.arguments[j][:, ci.atom.columns], arguments[j][:, mi.atom.columns])
                        for ci, mi in zip(c.stages, stages))
                for j, (cs, ms) in enumerate(zip(c.stages, stages))):
            if eps is not None and not math.isclose(eps, h, rel_tol=1e-12):
                raise InputError(f"eps = {eps} was given, but the step is {name} with step {h} per substep")
            system = LureSystem(A.numpy(), W.numpy(), slope=activation(stages[0].kind).max_slope, method=name, eps=h,
                                substeps=substeps, activation=stages[0].kind)
            notes = (f"{K} nonlinearity evaluations form {name} with {substeps} substep(s) of step eps = {h}, "
                     "checked matrix by matrix against the scheme's own trace",)
            input_nodes = tuple(atom.node for atom in s.atoms if atom.kind == "input")
            return _Assembled(system, np.eye(N), np.zeros(N), 0, K, input_nodes, inputs[0].numpy(), consts[0].numpy(), notes)
    raise InputError(refusal)


# ---------------------------------------------------------------------------------------------
# The derived form


@dataclass(frozen=True, eq=False)
class _InputMap:
    """u_t = L v(x_t) + c, v the values of the trace's input atoms, computed by its state-free nodes."""

    interpreter: _Interpreter
    skip: frozenset[str]
    nodes: tuple[str, ...]
    matrix: np.ndarray
    const: np.ndarray

    def __call__(self, x: Tensor) -> np.ndarray:
        signature = self.interpreter.signature
        x = torch.as_tensor(x).detach().cpu().double()
        if tuple(x.shape[1:]) != signature.input_shape or x.dim() < 1:
            expected = ", ".join(map(str, signature.input_shape))
            raise InputError(f"x has shape {tuple(x.shape)}; the step takes (batch, {expected})")
        batch = x.shape[0]
        padded = torch.cat([x, x.new_zeros((-batch) % _TRACE_BATCH, *x.shape[1:])])
        zeros = [torch.zeros(_TRACE_BATCH, *shape, dtype=torch.float64) for shape in signature.state_shapes]
        values = []
        for chunk in padded.split(_TRACE_BATCH):
            env = self.interpreter.evaluate(zeros, chunk, self.skip)
            values.append(torch.cat([env[name].reshape(_TRACE_BATCH, -1) for name in self.nodes], dim=1)
                          if self.nodes else chunk.new_zeros(_TRACE_BATCH, 0))
        return torch.cat(values)[:batch].numpy() @ self.matrix.T + self.const


@dataclass(frozen=True, eq=False)
class DerivedForm:
    """The Lur'e form of a step (module docstring) and how it relates to the module's state.

    ``system`` runs on zeta with (h - offset, g) = T zeta: h the module's state stacked
    (``state_shapes``, flattened, in argument order), ``offset`` the shift c, g the
    ``ghost_states`` (0 when the module's state is mapped in; they never feed back), T =
    ``coordinates``. Its inputs are ``inputs(x_t)``. ``stages`` counts the nonlinearity
    evaluations per step (1, or those of a Runge-Kutta scheme); ``nonlinearities`` names the
    module's own operations; ``notes`` say what the derivation did beyond reading the matrices off;
    ``dtype`` and ``device`` are the module's (the form itself is float64 on the CPU).
    """

    system: LureSystem
    coordinates: np.ndarray
    offset: np.ndarray
    state_shapes: tuple[tuple[int, ...], ...]
    state_is_tuple: bool
    input_shape: tuple[int, ...]
    input_first: bool
    dtype: torch.dtype
    device: torch.device
    ghost_states: int
    stages: int
    nonlinearities: tuple[str, ...]
    notes: tuple[str, ...]
    _inputs: _InputMap = field(repr=False)

    @property
    def state_size(self) -> int:
        """N, the number of units of the module's stacked state."""
        return sum(math.prod(s) for s in self.state_shapes)

    @property
    def in_module_coordinates(self) -> bool:
        """zeta is the module's stacked state itself: T = I, no shift, no ghost states."""
        return not self.ghost_states and not np.any(self.offset) and np.array_equal(self.coordinates, np.eye(self.system.n))

    def inputs(self, x: Tensor) -> np.ndarray:
        """u_t of ``system`` for one input step x_t of shape (batch, *input_shape): (batch, n), float64."""
        return self._inputs(x)

    def stacked(self, state: Any) -> np.ndarray:
        """The module's state (a tensor, a tuple of them, or an array (batch, N) already stacked) as (batch, N)."""
        if isinstance(state, np.ndarray):
            return np.asarray(state, dtype=np.float64)
        parts = list(state) if isinstance(state, (tuple, list)) else [state]
        flat = [torch.as_tensor(p).detach().cpu().double().reshape(p.shape[0], -1).numpy() for p in parts]
        return np.concatenate(flat, axis=1)

    def to_system(self, state: Any) -> np.ndarray:
        """zeta = T^-1 (h - offset, 0): (batch, n)."""
        h = self.stacked(state) - self.offset
        lifted = np.hstack([h, np.zeros((h.shape[0], self.ghost_states))])
        return lifted if self.in_module_coordinates else np.linalg.solve(self.coordinates, lifted.T).T

    def from_system(self, zeta: np.ndarray) -> np.ndarray:
        """The module's stacked state h = (T zeta)[:N] + offset: (batch, N)."""
        return (zeta @ self.coordinates.T)[..., :self.state_size] + self.offset

    def step(self, state: Any, x: Tensor) -> np.ndarray:
        """One step of the form from the module's state, in the module's coordinates: (batch, N), float64."""
        return self.from_system(self.system.step(self.to_system(state), self.inputs(x)))

    def simulate(self, state: Any, xs: Tensor) -> np.ndarray:
        """States h_1..h_T of the form from the module's state h_0 for inputs xs (batch, T, *input_shape): (batch, T, N)."""
        zeta = self.to_system(state)
        states = []
        for t in range(xs.shape[1]):
            zeta = self.system.step(zeta, self.inputs(xs[:, t]))
            states.append(self.from_system(zeta))
        return np.stack(states, axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system.to_dict(),
            "coordinates": self.coordinates.tolist(),
            "offset": self.offset.tolist(),
            "state_shapes": [list(s) for s in self.state_shapes],
            "input_shape": list(self.input_shape),
            "input_first": self.input_first,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "ghost_states": self.ghost_states,
            "stages": self.stages,
            "nonlinearities": list(self.nonlinearities),
            "notes": list(self.notes),
        }


def derive_lure_form(
    step: Any,
    state: Any = None,
    x: Any = None,
    *,
    eps: float | None = None,
    input_first: bool | None = None,
) -> DerivedForm:
    """The Lur'e form of one step of a recurrent network (module docstring).

    ``step``: a module with a ``step(h, x)`` method, an ``nn.RNNCell``/``GRUCell``/``LSTMCell``-like
    cell called as ``cell(x, h)``, or a callable ``step(h, x)`` (``input_first=True`` for
    ``step(x, h)``). ``state``: an example state (a tensor (batch, ...) or a tuple of them) or its
    feature shapes (``(n,)``, ``((n,), (n,))``); ``x``: an example input or its feature shape. Both
    default to an ``nn.RNNCellBase``'s sizes; feature shapes take the dtype of the module's
    parameters, float32 for a plain callable (give examples for a float64 one). ``eps``: the Euler
    step of a one-stage form (module docstring); not used for a map (M = 0); for a Runge-Kutta step
    it must equal the step the trace shows.

    The form is a snapshot of the module's weights when derived. The module is traced in eval mode
    and its tensors are restored afterwards (a step that updates tensors outside its arguments is
    refused; such tensors of a plain callable are updated as by two calls). What cannot be derived
    raises :class:`InputError` naming the operation and the node.
    """
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
                            or eps <= 0):
        raise InputError(f"eps must be a finite number > 0, got {eps!r}")
    f, module, first = resolve_step(step, input_first)
    signature = _signature(step, module, state, x)
    training = module.training if module is not None else False
    saved = {k: v.clone() for k, v in module.state_dict().items()} if module is not None else {}
    if module is not None:
        module.eval()
    try:
        graph = _trace(f, signature)
    finally:
        if module is not None:
            module.train(training)
            with torch.no_grad():
                for name, value in module.state_dict().items():
                    value.copy_(saved[name])  # a step that updates its module's tensors is refused; undo its updates
    interpreter = _Interpreter(graph, signature)
    generator = torch.Generator().manual_seed(0)
    states, example = signature.examples(generator, _TRACE_BATCH, torch.float64)
    structure = interpreter.structure(example)
    assembled = _assemble(structure, eps)
    placeholders = {n.name for n in interpreter.placeholders}
    inputs = _InputMap(interpreter, frozenset(interpreter.symbolic - placeholders), assembled.input_nodes,
                       assembled.input_matrix, assembled.input_const)
    notes = assembled.notes
    if signature.state_is_tuple:
        notes = (f"the state's {len(signature.state_shapes)} tensors are stacked in argument order into h of "
                 f"{signature.state_size} units",) + notes
    form = DerivedForm(assembled.system, assembled.T, assembled.offset, signature.state_shapes, signature.state_is_tuple,
                       signature.input_shape, first, signature.dtype, signature.device, assembled.ghosts, assembled.stages,
                       tuple(dict.fromkeys(stage.op for stage in structure.stages)), notes, inputs)
    _self_check(form, interpreter, states, example)
    return form


def _self_check(form: DerivedForm, interpreter: _Interpreter, states: list[Tensor], x: Tensor) -> None:
    """The form's step equals the traced step run concretely in float64; otherwise the derivation has a bug."""
    expected = interpreter.signature.stack(interpreter.evaluate(states, x)["output"])
    actual = form.step(states, x)
    error = float(np.abs(actual - expected).max())
    if not error <= _SELF_CHECK * np.linalg.cond(form.coordinates) * (1.0 + float(np.abs(expected).max())):
        raise RuntimeError(f"derive_lure_form: the derived form differs from the traced step by {error:.3g}; "
                           "this is a bug of the derivation")
