"""One process against N (torch.distributed, gloo on this CPU): full-dataset λ_max and a sweep.

    python bench/scale.py [--procs 2] [--repeats 3] [--steps 20] [--hidden 64] [--smnist-samples 32] [--quick]
    python bench/scale.py --repeats 0     # only the single-process sMNIST-size rates

Each launch starts fresh processes (torch.multiprocessing, one thread each); every rank times
its workload between barriers and the launch counts the slowest rank. Launches alternate
1 process, N processes, 1, N, ... so both see the same machine load; the table gives
min/median/max over launches and the speed-up (1-process time / N-process time) as the
median ratio of neighbouring launches with its min/max. The 1-process baseline is the plain
single-process code (``HessianOperator``, ``sweep``), not the distributed code on one rank.

Workloads (digits, T = 64): λ_max of the Hessian of the whole training split by a fixed number
of Lanczos steps (every step one Hessian-vector product over all of it), and a robustness
sweep over the test split (Gaussian input noise and relative parameter noise, 4 levels each,
5 seeds). Also printed: peak resident memory per rank (ru_maxrss), and what the README's
8-GPU/60k plan starts from, measured in one process at sMNIST size (T = 784, n = 128): the
time per Hessian-vector product per sample with the gradient graph cached and recomputed, the
cached graph's bytes per sample, and the aten operations per time step of one product (on a
GPU each is roughly one kernel launch, which is what bounds a 784-step recurrence there).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.distributed import DistributedOperator, distributed_sweep, shard_batches
from lrnn_analysis.hessian import HessianOperator, Lanczos
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.objective import Objective
from lrnn_analysis.robustness import SweepModel, sweep

GRID = {"gaussian": [0.0, 0.1, 0.2, 0.3], "gaussian-relative": [0.0, 0.05, 0.1, 0.2]}
SEEDS = 5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lanczos_lambda_max(op, steps: int) -> float:
    process = Lanczos(op.matvec, np.random.default_rng(0).standard_normal(op.shape[0]))
    for _ in range(steps):
        process.step()
    return float(np.linalg.eigvalsh(process.tridiagonal())[-1])


def _rank(rank: int, world_size: int, port: int, settings: dict, out: str) -> None:
    torch.set_num_threads(1)
    distributed = world_size > 1
    if distributed:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=300))
    barrier = dist.barrier if distributed else (lambda: None)
    task = load_task("digits", seed=0)
    config = ModelConfig("lipschitz", task.input_dim, settings["hidden"], task.output_dim, eps=task.default_eps)
    model = build_model(config, seed=0)
    batches = task.train.batches(128)
    timings = {}

    barrier()
    start = time.perf_counter()
    if distributed:
        op = DistributedOperator(HessianOperator(model, Objective(True, False).loss_fn(), shard_batches(batches, rank, world_size)))
    else:
        op = HessianOperator(model, Objective(True, False).loss_fn(), batches)
    lam = _lanczos_lambda_max(op, settings["steps"])
    barrier()
    timings["lambda_max"] = time.perf_counter() - start

    entry = [SweepModel("lipschitz", "digits-init", model)]
    barrier()
    start = time.perf_counter()
    run_sweep = distributed_sweep if distributed else sweep
    result = run_sweep(entry, task, GRID, SEEDS, device="cpu", progress=False)
    barrier()
    timings["sweep"] = time.perf_counter() - start
    record = {"rank": rank, "timings": timings, "lambda_max": lam, "rows": len(result.rows),
              "accuracy_sum": sum(r["accuracy"] for r in result.rows),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "n_samples": sum(len(x) for x, _ in batches), "dim": op.shape[0]}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    if distributed:
        dist.destroy_process_group()


def launch(world_size: int, settings: dict) -> list[dict]:
    """Run the workloads on ``world_size`` fresh processes; each rank's record."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world_size, _free_port(), settings, out), nprocs=world_size,
                           start_method="spawn", join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world_size)]


class _CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched (on a GPU, roughly one kernel launch each; views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _hvp_ops_per_step(cache_graph: bool) -> float:
    """Aten operations per time step of one Hessian-vector product (difference of T = 32 and T = 16)."""
    model = build_model(ModelConfig("lipschitz", 1, 16, 10, eps=0.03), seed=0)
    counts = []
    for steps in (16, 32):
        generator = torch.Generator().manual_seed(0)
        batch = (torch.rand(8, steps, 1, generator=generator), torch.randint(0, 10, (8,), generator=generator))
        op = HessianOperator(model, Objective(True, False).loss_fn(), batch, cache_graph=cache_graph)
        v = torch.randn(op.dim, generator=generator)
        with _CountOps() as counter:
            op.hvp(v)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / 16


def smnist_hvp_rates(samples: int) -> dict[str, float]:
    """Single-process HVP cost at sMNIST size (T = 784, n = 128), graph cached and recomputed:
    seconds per sample (min of 3), graph bytes per sample, P, and aten operations per time step."""
    torch.set_num_threads(1)
    task = load_task("smnist", seed=0)
    model = build_model(ModelConfig("lipschitz", task.input_dim, 128, task.output_dim, eps=task.default_eps), seed=0)
    batch = (task.train.x[:samples], task.train.y[:samples])
    out: dict[str, float] = {}
    for cache_graph, label in ((True, "cached"), (False, "recomputed")):
        op = HessianOperator(model, Objective(True, False).loss_fn(), batch, cache_graph=None if cache_graph else False)
        if cache_graph:
            out["graph_bytes_per_sample"] = op.graph_bytes / samples
            out["dim"] = op.dim
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
        op.hvp(v)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            op.hvp(v)
            times.append(time.perf_counter() - start)
        out[f"seconds_per_sample_{label}"] = min(times) / samples
        out[f"ops_per_step_{label}"] = _hvp_ops_per_step(cache_graph)
    return out


def _spread(values: list[float]) -> str:
    return f"{min(values):8.3f} {statistics.median(values):8.3f} {max(values):8.3f}"


def compare(procs: int, repeats: int, settings: dict) -> None:
    """1 process against ``procs``, launches alternating; the table of times and speed-ups."""
    runs: dict[int, list[list[dict]]] = {1: [], procs: []}
    for _ in range(repeats):
        for world_size in (1, procs):
            runs[world_size].append(launch(world_size, settings))
    single, multi = runs[1], runs[procs]
    lam1, lamN = single[0][0]["lambda_max"], multi[0][0]["lambda_max"]
    print(f"full training split: {single[0][0]['n_samples']} samples, P = {single[0][0]['dim']}; "
          f"lambda_max after {settings['steps']} steps: 1 process {lam1:.12g}, {procs} processes {lamN:.12g} "
          f"(relative difference {abs(lam1 - lamN) / abs(lam1):.1e})")
    same_rows = single[0][0]["rows"] == multi[0][0]["rows"] and single[0][0]["accuracy_sum"] == multi[0][0]["accuracy_sum"]
    print(f"sweep: {single[0][0]['rows']} rows, identical accuracies in both: {same_rows}")
    print(f"{'workload':>12} {'procs':>5} {'min s':>8} {'median':>8} {'max s':>8}   speed-up min/median/max")
    for workload in ("lambda_max", "sweep"):
        t1 = [max(r["timings"][workload] for r in launch_) for launch_ in single]
        tN = [max(r["timings"][workload] for r in launch_) for launch_ in multi]
        ratios = [a / b for a, b in zip(t1, tN, strict=True)]
        print(f"{workload:>12} {1:>5} {_spread(t1)}")
        print(f"{workload:>12} {procs:>5} {_spread(tN)}   {min(ratios):.2f}x {statistics.median(ratios):.2f}x {max(ratios):.2f}x")
    print("peak RSS per rank (MiB, max over launches): 1 process "
          f"{max(r[0]['peak_rss_mib'] for r in single):.0f}; {procs} processes "
          + ", ".join(f"rank {k} {max(launch_[k]['peak_rss_mib'] for launch_ in multi):.0f}" for k in range(procs)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="launches of each configuration, alternating (0: none)")
    parser.add_argument("--steps", type=int, default=20, help="Lanczos steps (Hessian-vector products) for lambda_max")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--smnist-samples", type=int, default=32, help="batch for the sMNIST-size HVP rates (0: skip)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 5 Lanczos steps, hidden 16, no sMNIST rates")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.hidden, args.smnist_samples = 1, 5, 16, 0
    settings = {"steps": args.steps, "hidden": args.hidden}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU core(s), 1 thread per process, gloo; "
          f"digits, n = {args.hidden}, {args.steps} Lanczos steps, sweep {GRID} x {SEEDS} seeds", flush=True)
    if args.repeats > 0:
        compare(args.procs, args.repeats, settings)
    if args.smnist_samples:
        rates = smnist_hvp_rates(args.smnist_samples)
        print(f"sMNIST size (T = 784, n = 128, P = {rates['dim']:.0f}), 1 process, 1 thread, {args.smnist_samples}-sample "
              f"batch, min of 3: cached graph {rates['graph_bytes_per_sample'] / 2**20:.2f} MiB per sample")
        for label in ("cached", "recomputed"):
            per_sample = rates[f"seconds_per_sample_{label}"]
            print(f"  graph {label:>10}: {per_sample * 1e3:.2f} ms per HVP per sample ({per_sample * 60000:.0f} s over 60k "
                  f"samples), {rates[f'ops_per_step_{label}']:.0f} aten ops per time step per HVP")


if __name__ == "__main__":
    main()
