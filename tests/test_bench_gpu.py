"""bench/gpu.py without a CUDA device says so and exits 0 (it measures nothing then); its CPU smoke
run goes through every section and prints each ratio against a baseline of the same run."""
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "bench" / "gpu.py"
RATIO = r"\d+\.\d\dx \(min \d+\.\d\dx, max \d+\.\d\dx\) vs "


def test_gpu_bench_without_cuda_says_so_and_exits_cleanly():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no CUDA device")
    assert "Traceback" not in done.stderr


def test_gpu_bench_smoke_run_on_the_cpu_covers_every_section():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--repeats", "1"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for section in range(1, 7):
        assert re.search(rf"^{section}\. ", out, re.MULTILINE), f"section {section} missing:\n{out}"
    assert re.search(r"toolkit engine .*" + RATIO + "reference loop", out)
    assert re.search(r"engine R-operator .*" + RATIO + "autograd double backward", out)
    for layer in ("RNN", "LSTM", "GRU"):
        match = re.search(rf"{layer}: max relative difference of the outputs, twin vs layer: (\S+)", out)
        assert match and float(match[1]) < 1e-5, out
    assert len(re.findall(r"twin fwd\+bwd .*" + RATIO + "layer fwd\\+bwd", out)) == 3
    assert len(re.findall(r"HVP twin .*" + RATIO + "HVP layer", out)) == 3
    assert re.search(r"lrnn audit of an untrained .* exit 0", out)
