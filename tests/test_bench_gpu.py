"""bench/gpu.py without a CUDA device says so and exits 0 (it measures nothing then)."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "bench" / "gpu.py"


def test_gpu_bench_without_cuda_says_so_and_exits_cleanly():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no CUDA device")
    assert "Traceback" not in done.stderr
