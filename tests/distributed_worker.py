"""One rank of the 2-process checks in test_distributed.py (started there by torchrun, gloo on CPU).

Usage: torchrun --nproc_per_node 2 tests/distributed_worker.py OUT_DIR CHECKPOINT RECIPE...
Rank 0 writes what the ranks computed together into OUT_DIR; the test compares it with one process.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distributed_cases import SWEEP_GRID, SWEEP_SEEDS, TRACE_OPTIONS, hessian_case, sweep_case
from lrnn_analysis.cli import main
from lrnn_analysis.distributed import DistributedOperator, distributed_sweep, shard_batches
from lrnn_analysis.hessian import HessianOperator, analyze, eigenvalues
from lrnn_analysis.robustness import ROW_FIELDS
from lrnn_analysis.writers import write_csv


def run(out: Path, checkpoint: str, recipes: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, loss_fn, batches = hessian_case()
    local = HessianOperator(model, loss_fn, shard_batches(batches, rank, world), dtype=torch.float64)
    op = DistributedOperator(local)
    dense_matmat = op.matmat(np.eye(op.shape[0]))
    dense_matvec = np.stack([op.matvec(column) for column in np.eye(op.shape[0])], axis=1)
    top = eigenvalues(op, k=2, which="BE", seed=3)
    report = analyze(model, loss_fn, shard_batches(batches, rank, world), dtype=torch.float64,
                     wrap_operator=DistributedOperator, **TRACE_OPTIONS)
    deflated = analyze(model, loss_fn, shard_batches(batches, rank, world), dtype=torch.float64,
                       wrap_operator=DistributedOperator, trace_method="deflated", **TRACE_OPTIONS)
    try:
        op.matvec(np.full(op.shape[0], float(rank)))
        mismatch = "no error"
    except ValueError as error:
        mismatch = str(error)
    models, task, options = sweep_case()
    result = distributed_sweep(models, task, SWEEP_GRID, SWEEP_SEEDS, progress=False, **options)
    try:
        distributed_sweep(models[rank:rank + 1], task, {"gaussian": [0.0]}, [0], progress=False, **options)
        model_mismatch = "no error"
    except ValueError as error:
        model_mismatch = str(error)
    mismatches = [None for _ in range(world)]
    dist.all_gather_object(mismatches, [mismatch, model_mismatch])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "dense_matmat.npy", dense_matmat)
        np.save(out / "dense_matvec.npy", dense_matvec)
        np.save(out / "eigenvalues.npy", top.values)
        write_csv(out / "sweep.csv", result.rows, ROW_FIELDS)
        (out / "result.json").write_text(json.dumps({
            "describe": op.describe(), "report": report.to_dict(), "deflated": deflated.to_dict(), "mismatch": mismatches,
            "sweep_environment": result.environment, "sweep_settings": result.settings, "summary": result.summary,
            "sweep_warnings": list(result.warnings)}))
    common = ["--quiet", "--device", "cpu"]
    codes = [main(["hessian", checkpoint, "--full", "--split", "test", "--batch-size", "128", "--dtype", "float64",
                   "--params", "M_A,M_W", "--json", str(out / "hessian_cli.json"), *common]),
             main(["robustness", checkpoint, "--input-noise", "0,0.2", "--param-noise", "0,0.05,0.1", "--seeds", "2",
                   "--max-samples", "60", "--out", str(out / "robustness_cli.csv"), "--json", *common]),
             main(["reproduce", *recipes, "--out", str(out / "reproduce" / "report"), *common]),
             main(["reproduce", *recipes, "--out", str(out / "foreign"), *common])]
    if rank == 0:
        (out / "cli_codes.json").write_text(json.dumps(codes))
    # Both ranks tear the group down together: a rank that destroyed its gloo group while the other
    # was still finishing its last collective sometimes died of SIGABRT ("terminate called without
    # an active exception") at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
