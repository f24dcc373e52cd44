"""Two CPU processes (torchrun, gloo) against one: the operator, the estimators, the sweep and the CLI."""
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_cases import SWEEP_GRID, SWEEP_SEEDS, TRACE_OPTIONS, hessian_case, sweep_case, tiny_model, write_recipes
from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.distributed import DistributedOperator, shard_batches
from lrnn_analysis.environment import environment
from lrnn_analysis.hessian import HessianOperator, analyze, eigenvalues
from lrnn_analysis.robustness import ROW_FIELDS, sweep
from lrnn_analysis.writers import write_csv

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """torchrun stops its workers on SIGTERM; whatever is left of its process group is killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run distributed_worker.py on 2 ranks once; its outputs for every test of this module."""
    root = tmp_path_factory.mktemp("distributed")
    checkpoint = save_checkpoint(root / "m.safetensors", tiny_model(0), {"task": {"name": "digits", "seed": 0, "options": {}}})
    out = root / "ranks"
    (out / "foreign").mkdir(parents=True)
    (out / "foreign" / "notes.txt").write_text("not written by lrnn")
    recipes = write_recipes(root / "analyses", checkpoint)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(WORKER), str(out), str(checkpoint), *recipes]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=env)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        output = f"torchrun did not finish within {TIMEOUT} s"
    finally:
        _stop(process)
    assert process.returncode == 0, output
    return out, checkpoint, recipes


def _relative_error(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_operator_equals_single_process_to_round_off(two_ranks):
    out = two_ranks[0]
    model, loss_fn, batches = hessian_case()
    single = HessianOperator(model, loss_fn, batches, dtype=torch.float64).to_dense().numpy()
    for name in ("dense_matmat.npy", "dense_matvec.npy"):
        assert _relative_error(np.load(out / name), single) <= 1e-12
    # The sample weighting matters here (shards of 48 and 22 samples): a plain mean over ranks is far off.
    halves = [HessianOperator(model, loss_fn, shard_batches(batches, r, 2), dtype=torch.float64).to_dense().numpy()
              for r in range(2)]
    assert _relative_error((halves[0] + halves[1]) / 2, single) > 1e-3


def test_estimators_run_unchanged(two_ranks):
    out = two_ranks[0]
    model, loss_fn, batches = hessian_case()
    single = HessianOperator(model, loss_fn, batches, dtype=torch.float64)
    np.testing.assert_allclose(np.load(out / "eigenvalues.npy"), eigenvalues(single, k=2, which="BE", seed=3).values, rtol=1e-10)
    result = json.loads((out / "result.json").read_text())
    report = analyze(model, loss_fn, batches, dtype=torch.float64, **TRACE_OPTIONS)
    distributed = result["report"]
    assert distributed["lambda_max"] == pytest.approx(report.lambda_max, rel=1e-10)
    assert distributed["trace"]["estimate"] == pytest.approx(report.trace.estimate, rel=1e-10)
    assert distributed["operator"]["n_samples"] == 70
    assert distributed["operator"]["batch_sizes"] == [16, 16, 16, 16, 6]
    assert distributed["operator"]["samples_per_rank"] == [48, 22]
    assert distributed["environment"]["distributed"] == {"world_size": 2, "backend": "gloo", "rank": 0}
    # the trace deflated by the eigenvalue run's basis: the same basis, probes and estimate on the ranks' operator
    deflated = analyze(model, loss_fn, batches, dtype=torch.float64, trace_method="deflated", **TRACE_OPTIONS)
    shared = result["deflated"]["trace"]
    assert shared["method"] == "deflated" and shared["sketch_size"] == deflated.trace.sketch_size == deflated.eigen.iterations
    assert shared["estimate"] == pytest.approx(deflated.trace.estimate, rel=1e-10)
    assert shared["ci_halfwidth"] == pytest.approx(deflated.trace.ci_halfwidth, rel=1e-6)


def test_ranks_that_disagree_raise_on_every_rank(two_ranks):
    result = json.loads((two_ranks[0] / "result.json").read_text())
    assert all("different vectors" in vectors for vectors, _ in result["mismatch"])
    assert all("different models" in models for _, models in result["mismatch"])


def test_sweep_csv_identical_to_single_process(two_ranks, tmp_path):
    out = two_ranks[0]
    models, task, options = sweep_case()
    single = sweep(models, task, SWEEP_GRID, SWEEP_SEEDS, progress=False, **options)
    write_csv(tmp_path / "single.csv", single.rows, ROW_FIELDS)
    assert (out / "sweep.csv").read_text() == (tmp_path / "single.csv").read_text()
    assert len(single.rows) == 2 * (2 * 3 + 3 * 3 + 2)
    result = json.loads((out / "result.json").read_text())
    assert result["summary"] == json.loads(json.dumps(single.summary))
    assert result["sweep_environment"]["distributed"]["world_size"] == 2
    assert result["sweep_settings"]["cells_per_rank"] == [7, 7]
    for key in ("perturbed_parameters", "training_data"):  # every model's, not only the first's
        assert result["sweep_settings"][key] == json.loads(json.dumps(single.settings[key]))
    assert result["sweep_warnings"] == list(single.warnings)


def test_cli_under_torchrun_matches_one_process(two_ranks, tmp_path):
    out, checkpoint, _ = two_ranks
    assert json.loads((out / "cli_codes.json").read_text()) == [0, 0, 0, 2]
    assert main(["hessian", str(checkpoint), "--full", "--split", "test", "--batch-size", "128", "--dtype", "float64",
                 "--params", "M_A,M_W", "--json", str(tmp_path / "h.json"), "--quiet", "--device", "cpu"]) == 0
    single, distributed = (json.loads(p.read_text()) for p in (tmp_path / "h.json", out / "hessian_cli.json"))
    assert distributed["lambda_max"] == pytest.approx(single["lambda_max"], rel=1e-10)
    assert distributed["operator"]["n_samples"] == single["operator"]["n_samples"]
    assert single["environment"]["distributed"] == {"world_size": 1, "backend": None}
    assert distributed["environment"]["distributed"]["world_size"] == 2
    assert main(["robustness", str(checkpoint), "--input-noise", "0,0.2", "--param-noise", "0,0.05,0.1", "--seeds", "2",
                 "--max-samples", "60", "--out", str(tmp_path / "r.csv"), "--quiet", "--device", "cpu"]) == 0
    assert (out / "robustness_cli.csv").read_text() == (tmp_path / "r.csv").read_text()
    assert len(list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))) == 2 * 2 + 3 * 2
    provenance = json.loads((out / "robustness_cli.json").read_text())["environment"]["distributed"]
    assert provenance["world_size"] == 2 and provenance["backend"] == "gloo"


def test_reproduce_under_torchrun_matches_one_process(two_ranks, tmp_path):
    out, _, recipes = two_ranks
    # Rank 0 alone wrote, into the report directory only: no lock, staging or other rank's files beside it.
    assert sorted(p.name for p in (out / "reproduce").iterdir()) == ["report"]
    report = out / "reproduce" / "report"
    stems = {"spectra": 4, "spectra_summary": 2, "robust": 4, "robust_summary": 2, "hessian": 4}
    written = sorted(p.name for p in report.iterdir())
    assert len(written) == sum(stems.values()) + 1 and all(name.split(".")[0] in stems for name in written if name[0] != ".")
    single = tmp_path / "single"
    assert main(["reproduce", *recipes, "--out", str(single), "--quiet", "--device", "cpu"]) == 0
    assert sorted(p.name for p in single.iterdir()) == written
    for name in ("robust.csv", "robust_summary.csv", "spectra.csv", "spectra_summary.csv"):
        assert (report / name).read_bytes() == (single / name).read_bytes(), name
    assert len(list(csv.DictReader(io.StringIO((report / "robust.csv").read_text())))) == 2 * 2 + 3 * 2
    distributed, alone = (json.loads((d / "hessian.json").read_text()) for d in (report, single))
    assert distributed["batches_shared_by"] == 2 and alone["batches_shared_by"] == 1
    for key in ("lambda_max", "lambda_min", "trace"):
        assert distributed["rows"][0][key] == pytest.approx(alone["rows"][0][key], rel=1e-4), key
    for name in ("robust.json", "spectra.json", "hessian.json"):
        provenance = json.loads((report / name).read_text())["environment"]["distributed"]
        assert provenance == {"world_size": 2, "backend": "gloo", "rank": 0}, name
    assert json.loads((single / "robust.json").read_text())["environment"]["distributed"] == {"world_size": 1, "backend": None}
    # A directory rank 0 may not replace stops every rank before any work (the launch finished: none waited).
    assert [p.name for p in (out / "foreign").iterdir()] == ["notes.txt"]


def test_shard_batches_contiguous_blocks():
    batches = list(range(7))
    shards = [shard_batches(batches, r, 3) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="cannot be shared"):
        shard_batches(batches[:2], 0, 3)
    with pytest.raises(ValueError, match="not in a world"):
        shard_batches(batches, 3, 3)


def test_single_process_provenance_and_errors(monkeypatch, capsys):
    assert environment()["distributed"] == {"world_size": 1, "backend": None}
    model, loss_fn, batches = hessian_case()
    with pytest.raises(ValueError, match="not initialised"):
        DistributedOperator(HessianOperator(model, loss_fn, batches))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["stability", "unused.safetensors"]) == 2
    assert "run this command without torchrun" in capsys.readouterr().err


def test_rank_and_world_size_without_peers_end_in_one_line_not_a_wait(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    for extra in ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LRNN_RENDEZVOUS_TIMEOUT": "2"}, {}):
        env = {k: v for k, v in {**base, **extra}.items() if extra or k not in ("MASTER_ADDR", "MASTER_PORT")}
        done = subprocess.run([sys.executable, "-m", "lrnn_analysis.cli", "hessian", "models/digits-lipschitz-euler.safetensors",
                               "--quiet"], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "could not join a process group of 2" in done.stderr
