"""Test helpers shared by several test modules."""
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lrnn_analysis.models import ModelConfig, SequenceClassifier, lipschitz_matrix
from lrnn_analysis.outputs import OutputDirectory, atomic_write

REPO_ROOT = Path(__file__).resolve().parent.parent

# The native checkpoint of the ``saved`` fixture (conftest.py) and the task it records.
SAVED_CONFIG = ModelConfig("lipschitz", 1, 4, 10, eps=0.2)
SAVED_TASK = {"name": "digits", "seed": 0, "options": {}}


def lipschitz_matrix_np(M, beta, gamma) -> np.ndarray:
    """The models' Lipschitz parameterization applied to numpy arrays (float64, batched)."""
    as_tensor = lambda v: torch.as_tensor(np.asarray(v, dtype=np.float64))  # noqa: E731
    return lipschitz_matrix(as_tensor(M), as_tensor(beta), as_tensor(gamma)).numpy()


def rnn_classifier(nonlinearity="tanh", batch_first=True, layers=1, bias=True, dtype=torch.float32, seed=0, hidden=5):
    """An nn.RNN (3 inputs) read out by a linear head to 2 classes, seeded."""
    torch.manual_seed(seed)
    rnn = nn.RNN(3, hidden, num_layers=layers, nonlinearity=nonlinearity, batch_first=batch_first, bias=bias)
    return SequenceClassifier(rnn, nn.Linear(hidden, 2)).to(dtype)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes), to compare byte for byte."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_report(out: OutputDirectory, tag: str, names=("report.json", "report.md", "spectra.png")) -> Path:
    """Files ``names`` holding ``tag`` written into ``out`` and published as its one group, "report"."""
    for name in names:
        atomic_write(out.path(name), lambda tmp, n=name: tmp.write_text(f"{tag} {n}"))
    return out.publish({"report": list(names)})


def phase_recipe(name: str, output: str, extra: str = "") -> str:
    """The text of a small phase-diagram recipe (no model, no data)."""
    return (f'name = "{name}"\nanalysis = "phase-diagram"\noutput = "{output}"\n{extra}'
            '[settings]\nbetas = [0.0, 1.0]\ngammas = [0.5, 1.0]\nradius = 0.1\neps = 0.1\n')


def run_limited(code: str, address_space: int = 3 * 2**30, timeout: float = 300) -> dict:
    """Run ``code`` in a fresh Python under an address-space limit (RLIMIT_AS); return the JSON
    object its last stdout line holds, with ``peak_rss_mb`` added. A bomb that got past the
    checks fails the child (MemoryError or a kill) or its ``timeout``."""
    import json
    import os
    import resource
    import subprocess
    import sys

    script = (f"import json, resource, warnings\nwarnings.simplefilter('ignore')\n{code}\n"
              # VmHWM, not ru_maxrss: the latter also counts the pages of the (large) test process forked here
              "result['peak_rss_mb'] = next(int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
              "print(json.dumps(result))\n")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "OMP_NUM_THREADS": "1"},
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space)))
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


class time_limit:
    """``with time_limit(s):`` raises TimeoutError in the block after ``s`` seconds (SIGALRM): a
    guard against a walk that never ends, not a timing assertion."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        import signal

        def expire(signum, frame):
            raise TimeoutError(f"still running after {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc) -> None:
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)
