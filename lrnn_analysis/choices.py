"""The names and bounds the command line offers, importable without torch, numpy or scipy.

Building ``lrnn``'s parser (and so ``lrnn --help``) reads only this module; the modules that
do the work import their tables from here, so each name is defined once.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .errors import InputError

__all__ = ["ARCHITECTURES", "ATTACKS", "CERTIFICATES", "CONSTRAINTS", "CONTRACTION_CERTIFICATES", "CURVATURE_BACKENDS",
    "CURVATURE_ESTIMATES", "CURVATURE_OPERATORS", "DENSITY_SCALES", "DEVICE_CHOICES", "DIAGONAL_METHODS",
    "DISCRETIZATIONS", "DTYPES", "GATE_CERTIFICATES", "INPUT_BOXES", "INPUT_KINDS", "KINDS", "LIPSCHITZ_RANGE", "MAX_ADDING_LENGTH", "MAX_BATCHES",
    "MAX_ATTACK_STEPS", "MAX_BATCH_SIZE", "MAX_DENSITY_PROBES", "MAX_DENSITY_STEPS", "MAX_EIGENPAIRS", "MAX_ITERATIONS", "MAX_LEVELS",
    "MAX_MATVECS", "MAX_MC_SAMPLES", "MAX_RADIUS", "MAX_RESTARTS", "MAX_SAMPLES", "MAX_SEED", "MAX_SEEDS", "MAX_SIZES", "PARAMETERIZATION_TESTS",
    "PARAMETER_KINDS", "PERTURBATION_ALIASES", "READOUTS", "RNN_TWIN_MODES", "SPLITS", "TASK_NAMES", "TRACE_METHODS",
    "perturbation_grid", "perturbation_kind", "perturbation_level", "radius_list"]

TASK_NAMES = ("digits", "pdigits", "mnist1d", "smnist", "psmnist", "adding", "chars", "lorenz")
MAX_SEED = 2**63 - 1
MAX_ADDING_LENGTH = 100_000

# Schemes each architecture can be run with; the first is the default.
DISCRETIZATIONS: dict[str, tuple[str, ...]] = {
    "lipschitz": ("euler", "rk2", "rk38"),
    "lipschitz-gated": ("euler",),
    "antisymmetric": ("euler",),
    "cayley": ("map",),
    "residual": ("euler",),
    "vanilla": ("map",),
    "node": ("rk4", "rk2", "euler"),
    "contracting": ("euler",),
    "ren": ("map",),
    "lipschitz-ren": ("euler",),
    "lstm": ("map",),
}
ARCHITECTURES = tuple(DISCRETIZATIONS)
# What a zoo model outputs: D h_T for the sequence ("last") or D h_t at every step ("all").
READOUTS = ("last", "all")
# Generous but finite: a config from an untrusted file must not ask for unbounded memory or time.
MAX_SIZES = {"input_dim": 65536, "hidden": 65536, "output_dim": 65536, "ode_substeps": 10000}
# The bound G a lipschitz-ren model is built to: its float32 weights scale with G (and 1 / G), so a
# G far outside this range overflows to inf or underflows to a model that outputs a constant.
LIPSCHITZ_RANGE = (1e-6, 1e6)

CERTIFICATES = (
    "ct-norm",
    "ct-lmi",
    "euler-norm",
    "euler-lmi",
    "rk2-norm",
    "rk2-lmi",
    "rk4-norm",
    "rk4-lmi",
    "rk38-norm",
    "rk38-lmi",
    "map-norm",
    "map-lmi",
)
# Contraction certificates of models without a Lur'e form of the toolkit's kind: the explicit REN
# (stored evidence) and torch.nn LSTM/GRU layers (their conditions).
CONTRACTION_CERTIFICATES = ("ren-contraction", "lstm-contraction", "gru-contraction")
GATE_CERTIFICATES = CERTIFICATES + CONTRACTION_CERTIFICATES
PARAMETERIZATION_TESTS = ("ct-norm", "euler-norm", "rk2-norm", "rk4-norm", "rk38-norm", "map-norm")
CONSTRAINTS = ("ct-norm", "euler-norm", "rk2-norm")
DEVICE_CHOICES = ("auto", "cpu", "cuda")

INPUT_KINDS = ("gaussian", "salt-pepper", "occlusion", "fgsm")
PARAMETER_KINDS = ("gaussian-relative", "hessian-direction")
KINDS = INPUT_KINDS + PARAMETER_KINDS
# The command line's option names for two kinds; accepted wherever a kind is named.
PERTURBATION_ALIASES = {"input-noise": "gaussian", "param-noise": "gaussian-relative"}


def perturbation_kind(name: str) -> str:
    """The perturbation kind ``name`` means: a kind of :data:`KINDS` or one of its aliases
    (``input-noise`` = ``gaussian``, ``param-noise`` = ``gaussian-relative``)."""
    kind = PERTURBATION_ALIASES.get(name, name)
    if kind not in KINDS:
        aliases = ", ".join(f"{alias} = {kind}" for alias, kind in PERTURBATION_ALIASES.items())
        raise InputError(f"unknown perturbation {name!r}; expected one of {KINDS} (aliases: {aliases})")
    return kind


def perturbation_level(kind: str, level: object) -> float:
    """``level`` as a float if it is a valid level of perturbation ``kind`` (canonical spelling):
    finite and >= 0, and at most 1 for the probabilities/fractions of salt-pepper and occlusion."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not math.isfinite(level) or level < 0:
        raise InputError(f"{kind} level must be a finite number >= 0, got {level!r}")
    if kind in ("salt-pepper", "occlusion") and level > 1:
        raise InputError(f"{kind} level is a probability/fraction in [0, 1], got {level}")
    return float(level)


def perturbation_grid(grid: Mapping[str, Sequence[float]]) -> dict[str, Sequence[float]]:
    """``grid`` with every kind in its canonical spelling; a kind named twice (e.g. as
    ``gaussian`` and as ``input-noise``) is an error, never a silent merge."""
    canonical: dict[str, Sequence[float]] = {}
    for name, levels in grid.items():
        kind = perturbation_kind(name)
        if kind in canonical:
            raise InputError(f"perturbation {kind!r} given twice (as {name!r} and under another spelling)")
        canonical[kind] = levels
    return canonical

# Certified accuracy against l2 radius (lrnn_analysis.robustness.certified): the attacks beside it and
# the input boxes they project onto ("data": [min, max] of the task's training inputs; "none": unbounded).
ATTACKS = ("pgd",)
INPUT_BOXES = ("data", "none")
MAX_ATTACK_STEPS = 100_000
MAX_RESTARTS = 1_000
# Beyond any input sequence's l2 norm (784 raw pixels of 255 have 7140); the attack's steps and the
# figures' log axes overflow near float's limit.
MAX_RADIUS = 1e6


def radius_list(radii: object) -> tuple[float, ...]:
    """``radii`` as a tuple of 1 to MAX_LEVELS distinct l2 radii in [0, MAX_RADIUS]."""
    if isinstance(radii, (str, bytes)) or not isinstance(radii, Sequence) or not 1 <= len(radii) <= MAX_LEVELS:
        raise InputError(f"radii: expected a list of 1 to {MAX_LEVELS} l2 radii, got {radii!r}")
    values = []
    for radius in radii:
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or not 0 <= radius <= MAX_RADIUS:
            raise InputError(f"radii: a radius is a finite number in [0, {MAX_RADIUS:g}], got {radius!r}")
        values.append(float(radius))
    if len(set(values)) != len(values):
        raise InputError(f"radii: duplicate radii {values}")
    return tuple(values)


SPLITS = ("train", "val", "test")
CURVATURE_OPERATORS = ("hessian", "ggn", "fisher", "ef")
CURVATURE_BACKENDS = ("native", "pyhessian")
# When curvature runs torch.nn RNN/LSTM/GRU layers as their unrolled twins (lrnn_analysis.unrolled_rnn).
RNN_TWIN_MODES = ("auto", "on", "off")
CURVATURE_ESTIMATES = ("diag", "frobenius", "blocks")
TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "deflated")
DIAGONAL_METHODS = ("hutchinson", "xdiag")
DENSITY_SCALES = ("linear", "symlog")
DTYPES = ("float32", "float64")

# Bounds of the settings every front end offers (command line, recipes, Python API): generous, finite.
MAX_BATCH_SIZE = 1_000_000
MAX_BATCHES = 100_000
MAX_SAMPLES = 100_000_000
MAX_EIGENPAIRS = 100
MAX_MATVECS = 100_000
MAX_DENSITY_PROBES = 1_000
MAX_DENSITY_STEPS = 10_000
MAX_MC_SAMPLES = 1_000
MAX_SEEDS = 1_000
MAX_LEVELS = 100
MAX_ITERATIONS = 100_000
# Work a setting may ask for, in samples passed through the model (a curvature product costs about
# three passes of its batch, a loss evaluation one): 10^8 is hours on a CPU, never days.
MAX_SAMPLE_PASSES = 100_000_000
