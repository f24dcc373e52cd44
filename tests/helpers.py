"""Test helpers shared by several test modules."""
import numpy as np
import torch

from lrnn_analysis.models import lipschitz_matrix


def lipschitz_matrix_np(M, beta, gamma) -> np.ndarray:
    """The models' Lipschitz parameterization applied to numpy arrays (float64, batched)."""
    as_tensor = lambda v: torch.as_tensor(np.asarray(v, dtype=np.float64))  # noqa: E731
    return lipschitz_matrix(as_tensor(M), as_tensor(beta), as_tensor(gamma)).numpy()


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
              "result['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
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
