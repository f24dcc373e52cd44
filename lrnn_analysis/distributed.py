"""Beyond one process: curvature over sharded data and sweeps over sharded cells, on ``torch.distributed``.

The processes are the ranks of one ``torch.distributed`` process group (started by ``torchrun``;
gloo on CPU, NCCL on GPUs). Both wrappers rely only on the public behaviour of what they wrap.

Curvature: rank r builds its curvature operator H_r (``HessianOperator``, or any symmetric
operator that averages over its own batches weighted by sample count) on its shard of the
batches, n_r samples. ``DistributedOperator`` is the operator of all the data,

    H v = Σ_r n_r (H_r v) / Σ_r n_r,

one sum all-reduce per product (a block of vectors for ``matmat``). Every rank must apply it to
the same vectors; the estimators draw them from their seed, so they run unchanged, and each
product checks that the ranks agree (an error, never a silent mix of different vectors).

Sweeps: ``distributed_sweep`` deals the (model, perturbation kind, level) cells of a sweep out to
the ranks, each rank runs ``sweep`` on its cells (all seeds of a cell together), and the tidy rows
come back to every rank in the single-process order, with the summary recomputed from them.
Perturbation noise depends only on the seed (common random numbers), never on the rank.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from .environment import distributed_info, environment
from .errors import InputError, first_line
from .launch import launched_by_torchrun
from .robustness import SweepResult, summarize, sweep
from .robustness.sweep import prepare_models

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where a pipeline runs: its device and, under ``torch.distributed``, this process's rank
    among ``world_size`` (one process: rank 0 of 1)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_process_group(device: torch.device) -> Ranks:
    """Under ``torchrun``: join the process group (gloo on CPU; NCCL on CUDA, one GPU per local
    rank) and return this rank; otherwise one process on ``device``. Joining waits at most
    ``LRNN_RENDEZVOUS_TIMEOUT`` seconds (default 300) for the other ranks: ``RANK`` and
    ``WORLD_SIZE`` set without peers end in an :class:`InputError`, never a wait for ever."""
    if not launched_by_torchrun():
        return Ranks(device)
    seconds = _rendezvous_seconds()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=seconds))
        except (RuntimeError, ValueError) as error:
            raise InputError(f"RANK and WORLD_SIZE are set, but this process could not join a process group of "
                             f"{os.environ['WORLD_SIZE']} (waiting at most {seconds:g} s: {first_line(error)}); start "
                             "every rank with torchrun, or unset RANK and WORLD_SIZE to run one process") from error
        atexit.register(dist.destroy_process_group)
    return Ranks(device, dist.get_rank(), dist.get_world_size())


def _rendezvous_seconds() -> float:
    text = os.environ.get("LRNN_RENDEZVOUS_TIMEOUT", "300")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InputError(f"LRNN_RENDEZVOUS_TIMEOUT must be a number of seconds > 0, got {text[:40]!r}")
    return seconds


def _require_group(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError("torch.distributed is not initialised (start the processes with torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_batches(batches: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s contiguous block of ``batches``: rank 0 the first block, and so on.

    Blocks differ in length by at most one (the first ``len(batches) % world_size`` ranks hold
    one more), so concatenating the shards in rank order gives back ``batches``. Every rank
    needs at least one batch.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is not in a world of size {world_size}")
    if len(batches) < world_size:
        raise InputError(f"{len(batches)} batch(es) cannot be shared by {world_size} processes: "
                         "use smaller batches or fewer processes")
    base, extra = divmod(len(batches), world_size)
    start = rank * base + min(rank, extra)
    return list(batches[start:start + base + (1 if rank < extra else 0)])


@contextmanager
def all_or_none(group: Any = None) -> Iterator[None]:
    """Collective: a step every rank runs, which fails on every rank when it fails on any.

    On leaving the block the ranks exchange their outcomes (one ``all_gather_object``): a rank
    whose block raised re-raises its own exception; the others raise an ``InputError`` (when every
    failure was one) or a ``ValueError`` naming the failed rank(s) and their errors, so that no
    rank goes on to a collective that the failed one will never enter. The block must hold no
    collective of its own: a rank that failed before it would meet the others' collective with
    this exchange. (Errors inside collective work, such as
    an operator's products, are left to end the failed process; ``torchrun`` then stops the group.)
    """
    _, world_size = _require_group(group)
    gathered: list[tuple[str, bool] | None] = [None] * world_size
    try:
        yield
    except Exception as error:
        dist.all_gather_object(gathered, (f"{type(error).__name__}: {error}", isinstance(error, InputError)), group=group)
        raise
    dist.all_gather_object(gathered, None, group=group)
    failed = [(f"rank {rank}: {outcome[0]}", outcome[1]) for rank, outcome in enumerate(gathered) if outcome is not None]
    if failed:
        kind = InputError if all(is_input for _, is_input in failed) else ValueError
        raise kind("; ".join(message for message, _ in failed))


def _communication_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DistributedOperator(LinearOperator):
    """The curvature operator of the data of all ranks, from each rank's operator on its shard.

    ``local_op`` is this rank's symmetric operator (scipy ``LinearOperator``), the mean over its
    n_r scored targets (samples, or unmasked tokens); n_r is ``n_samples`` (default:
    ``local_op.n_scored``, else ``local_op.n_samples``). Products
    are H v = Σ_r n_r (H_r v) / Σ_r n_r, reduced in the operator's dtype: equal to the
    single-process operator on the concatenated batches up to the round-off of the regrouped sum
    (tested: 1e-12 relative in float64). Construction is collective (every rank of ``group``
    calls it, and the ranks' operators must have the same shape and dtype), and so is every
    product: all ranks apply the operator to the same vectors, in the same order, and a product
    whose vector differs between ranks raises on every rank (``check_vectors``: a hash of the
    vector's bytes, one extra two-integer all-reduce per product).
    """

    def __init__(self, local_op: LinearOperator, n_samples: int | None = None, group: Any = None,
                 *, check_vectors: bool = True) -> None:
        self.rank, self.world_size = _require_group(group)
        if n_samples is None:
            n_samples = getattr(local_op, "n_scored", getattr(local_op, "n_samples", None))
            if n_samples is None:
                raise InputError("the local operator has no n_samples: pass its sample count")
        if int(n_samples) < 1:
            raise InputError(f"a rank needs at least one sample, got {n_samples}")
        self.local_op = local_op
        self.group = group
        self.backend = str(dist.get_backend(group))
        self.check_vectors = check_vectors
        self._device = _communication_device(group)
        local = {"shape": tuple(int(s) for s in local_op.shape), "dtype": str(np.dtype(local_op.dtype)),
                 "n_samples": int(n_samples), "batch_sizes": _batch_sizes(local_op)}
        gathered: list[dict[str, Any]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, local, group=group)
        for rank, other in enumerate(gathered):
            if (other["shape"], other["dtype"]) != (local["shape"], local["dtype"]):
                raise InputError(f"rank {rank} has a {other['dtype']} operator of shape {other['shape']}, "
                                 f"rank {self.rank} a {local['dtype']} one of shape {local['shape']}")
        if local["shape"][0] != local["shape"][1]:
            raise InputError(f"expected a square operator, got shape {local['shape']}")
        self.samples_per_rank = tuple(other["n_samples"] for other in gathered)
        self.n_samples = sum(self.samples_per_rank)
        self._weight = local["n_samples"] / self.n_samples
        self._batch_sizes = [size for other in gathered for size in (other["batch_sizes"] or [])]
        super().__init__(dtype=np.dtype(local["dtype"]), shape=local["shape"])

    def _all_reduce(self, array: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self._device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor.cpu().numpy()

    def _check_same_vectors(self, block: np.ndarray) -> None:
        """Every rank's block has the same bytes: the max over ranks of a 56-bit hash equals the min."""
        digest = hashlib.sha256(np.ascontiguousarray(block, dtype=np.float64).tobytes()).digest()
        fingerprint = int.from_bytes(digest[:7], "little")
        tensor = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=self._device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        largest, negated_smallest = tensor.tolist()
        if largest != -negated_smallest:
            raise InputError("the processes applied the operator to different vectors: every rank must "
                             "run the same estimator with the same seed")

    def _product(self, block: np.ndarray, local: np.ndarray) -> np.ndarray:
        if self.check_vectors:
            self._check_same_vectors(block)
        return self._all_reduce(np.asarray(local, dtype=self.dtype) * self.dtype.type(self._weight))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x).reshape(-1)
        return self._product(x, self.local_op.matvec(x))

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        return self._product(X, self.local_op.matmat(X))

    def _adjoint(self) -> DistributedOperator:
        return self

    def describe(self) -> dict[str, Any]:
        """The local operator's description with the data of all ranks and the process group."""
        local = self.local_op.describe() if hasattr(self.local_op, "describe") else {}
        out = {**local, "n_samples": self.n_samples, "samples_per_rank": list(self.samples_per_rank),
               "world_size": self.world_size, "backend": self.backend}
        if self._batch_sizes:
            out.update(n_batches=len(self._batch_sizes), batch_sizes=self._batch_sizes)
        if "graph_bytes_estimate" in local:
            out["graph_bytes_estimate"] = local["graph_bytes_estimate"]
            out["graph_bytes_estimate_of"] = f"rank {self.rank}"
        return out


def _batch_sizes(op: LinearOperator) -> list[int] | None:
    described = op.describe() if hasattr(op, "describe") else {}
    sizes = described.get("batch_sizes")
    return None if sizes is None else [int(s) for s in sizes]


def _fingerprint(value: Any, digest: Any) -> None:
    """Feed ``value``'s content (tensors, modules' state, dataclass fields) into ``digest``."""
    if isinstance(value, Tensor):
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(value, nn.Module):
        for name, tensor in value.state_dict().items():
            digest.update(name.encode())
            _fingerprint(tensor, digest)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            digest.update(item.name.encode())
            _fingerprint(getattr(value, item.name), digest)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _fingerprint(item, digest)
    else:
        digest.update(repr(value).encode())


def _models_fingerprint(models: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    _fingerprint(list(models), digest)
    return digest.hexdigest()


def distributed_sweep(models: Sequence[Any], task: Any, grid: Mapping[str, Sequence[float]],
                      seeds: int | Sequence[int] = 5, *, group: Any = None, progress: bool = True,
                      **options: Any) -> SweepResult:
    """``sweep(models, task, grid, seeds, **options)`` with its cells dealt out to the ranks.

    The cells (model, perturbation kind, level), in the order models × grid kinds × levels, go
    round-robin to the ranks (cell i to rank i mod world size); each rank runs ``sweep`` once per
    model on its cells with every seed (so each model's clean evaluation happens once per rank).
    The rows of all ranks are gathered on every rank and put in the order of the single-process
    sweep (per model and kind: the level-0 and input-perturbation rows, then the
    parameter-perturbation rows, each by level and seed), and the summary is recomputed from
    them, so the rows and the CSV equal the single-process ones number for number on the same
    device with the plain loop over parameter draws (``batched=False``, the CPU default; batched
    draws group differently, so vmapped numbers agree to rounding only). Collective: every rank
    calls it with the same arguments (the models, with their parameters and Hessian directions,
    are fingerprinted and must be bitwise the same on every rank); an error on any rank is raised
    on all of them. A kind's levels must be distinct. Progress is shown on rank 0 only.
    """
    rank, world_size = _require_group(group)
    started = time.perf_counter()
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    for kind, levels in grid.items():
        if len(set(map(float, levels))) != len(levels):
            raise InputError(f"{kind}: duplicate levels {list(levels)}")
    cells = [(m, kind, i) for m in range(len(models)) for kind in grid for i in range(len(grid[kind]))]
    mine = cells[rank::world_size]
    payload: dict[str, Any] = {"rows": [], "settings": None, "error": None, "input_error": False,
                               "models": _models_fingerprint(models)}
    try:
        for m in sorted({cell[0] for cell in mine}):
            subgrid = {kind: [grid[kind][i] for mm, k, i in mine if mm == m and k == kind] for kind in grid}
            subgrid = {kind: levels for kind, levels in subgrid.items() if levels}
            result = sweep([models[m]], task, subgrid, seed_list, progress=progress and rank == 0, **options)
            payload["rows"] += [(m, row) for row in result.rows]
            payload["settings"] = payload["settings"] or result.settings
    except Exception as error:  # re-raised on every rank below, so that no rank waits forever
        payload["error"] = f"{type(error).__name__}: {error}"
        payload["input_error"] = isinstance(error, InputError)
    gathered: list[dict[str, Any]] = [{} for _ in range(world_size)]
    dist.all_gather_object(gathered, payload, group=group)
    errors = [f"rank {r}: {p['error']}" for r, p in enumerate(gathered) if p["error"]]
    bugs = any(p["error"] and not p["input_error"] for p in gathered)
    if len({p["models"] for p in gathered}) > 1:
        errors.append("the ranks were given different models or directions (every rank must sweep the same ones)")
    if errors:
        raise (ValueError if bugs else InputError)("; ".join(errors))
    kind_index = {kind: k for k, kind in enumerate(grid)}
    level_index = {(kind, float(level)): i for kind, levels in grid.items() for i, level in enumerate(levels)}
    seed_index = {seed: s for s, seed in enumerate(seed_list)}

    def single_process_position(item: tuple[int, dict[str, Any]]) -> tuple:
        m, row = item
        deferred = row["target"] == "parameter" and row["level"] != 0
        return (m, kind_index[row["perturbation"]], deferred, level_index[(row["perturbation"], float(row["level"]))],
                seed_index.get(row["seed"], 0))

    tagged = sorted((item for p in gathered for item in p["rows"]), key=single_process_position)
    rows = [row for _, row in tagged]
    selected, training_data, warnings = prepare_models(models, task, grid, options.get("recurrent_only", False),
                                                       options.get("recurrent"))
    settings = next(p["settings"] for p in gathered if p["settings"] is not None)
    settings = {**settings, "grid": {k: list(map(float, v)) for k, v in grid.items()}, "seeds": seed_list,
                "perturbed_parameters": {entry.checkpoint: names for entry, names in zip(models, selected)},
                "training_data": training_data,
                "seconds": time.perf_counter() - started, "cells_per_rank": [len(cells[r::world_size]) for r in range(world_size)]}
    return SweepResult(rows, summarize(rows), settings, environment(options.get("device", "cpu")), tuple(warnings))


__all__ = ["DistributedOperator", "Ranks", "all_or_none", "distributed_info", "distributed_sweep", "join_process_group",
           "shard_batches"]
