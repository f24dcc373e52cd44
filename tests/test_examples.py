"""The scripts of examples/ run as the documentation shows them: each in a subprocess, in a fresh
temporary working directory, exit 0, and print their key lines.

The toolkit's examples are run from the repository root (``python examples/NAME.py``); here the
working directory is a temporary one that sees the committed checkpoints as ``models/``, so
whatever an example writes lands there. The own-model walk-through (examples/own_model/) runs
its ``run.sh`` in a copy of that folder, as its page says.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
FLOAT = r"[-+]?[0-9.]+(?:e[-+]?[0-9]+)?"


def run(command: list[str], cwd: Path) -> str:
    """Run ``command`` in ``cwd`` with this interpreter's scripts first on PATH; its stdout, after
    asserting exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def run_example(name: str, cwd: Path) -> str:
    return run([sys.executable, str(EXAMPLES / name)], cwd)


def assert_lines(output: str, *patterns: str) -> None:
    """Every pattern (a regular expression) matches a whole line of ``output``."""
    lines = output.splitlines()
    for pattern in patterns:
        assert any(re.fullmatch(pattern, line) for line in lines), f"no line matches {pattern!r} in:\n{output}"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A temporary working directory laid out like the repository root for the examples."""
    (tmp_path / "models").symlink_to(REPO / "models", target_is_directory=True)
    return tmp_path


TESTED = {"quickstart.py", "hessian.py", "robustness_sweep.py", "audit.py", "train_and_certify.py", "torchnn_layers.py",
          "derived_form.py",
          "own_model/mymodels.py", "own_model/make_data.py", "own_model/train.py", "own_model/certify.py",
          "own_model/analyse.py", "own_model/run.sh"}


def test_every_example_is_run_by_a_test():
    found = {p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*") if p.suffix in (".py", ".sh")}
    assert found == TESTED


def test_quickstart(root):
    out = run_example("quickstart.py", root)
    assert_lines(out, r"certified: False \(lure form\)",
                 r"  euler-lmi: fails \(no input-uniform certificate can exist .*spectral radius 1\.0212.*",
                 rf"lambda_max = {FLOAT}", rf"trace = {FLOAT} \+- {FLOAT} \(95% CI, 40 products\)",
                 r"gaussian input noise 0\.0: accuracy 0\.9749 \+- 0\.0000",
                 rf"gaussian input noise 0\.1: accuracy {FLOAT} \+- {FLOAT}")


def test_hessian(root):
    out = run_example("hessian.py", root)
    assert_lines(out, r"Hessian of 8970 parameters on 128 training samples",
                 rf"  eigenvalue +{FLOAT}  relative residual {FLOAT}",
                 rf"trace = {FLOAT} \+- {FLOAT} \(95% CI, hutch\+\+, 30 products\)",
                 rf"tr\(H\^2\)/P = {FLOAT} \+- {FLOAT} \(SLQ, 3 probes\)",
                 r"wrote density.png", rf"GGN of M_A, M_W: lambda_max = {FLOAT}")
    assert (root / "density.png").stat().st_size > 0


def test_robustness_sweep(root):
    out = run_example("robustness_sweep.py", root)
    assert_lines(out, r"lipschitz \(euler\) +gaussian +0\.0  accuracy 0\.9749 \+- 0\.0000  drop \+0\.0000",
                 rf"antisymmetric \(euler\) +gaussian-relative +0\.05  accuracy {FLOAT} \+- {FLOAT}  drop {FLOAT}",
                 r"wrote robustness.png")
    assert (root / "robustness.png").stat().st_size > 0


def test_audit(root):
    out = run_example("audit.py", root)
    assert_lines(out, r"gate certified=euler-lmi: passed \(.*\)", r"gate min-accuracy=0\.7: passed \(clean test accuracy 0\.7242\)",
                 r"gate max-accuracy-drop=gaussian:0\.1:0\.15: passed \(.*\)", r"all gates pass",
                 r"report files: .*report\.json, report\.md.*")
    assert [p.name for p in root.iterdir()] == ["models"]  # the report went to a temporary directory, now gone


def test_train_and_certify(root):
    out = run_example("train_and_certify.py", root)
    assert_lines(out, rf"lipschitz: test accuracy {FLOAT}, alpha\(A\) = {FLOAT}, \|\|W\|\|_2 = {FLOAT}",
                 rf"contracting: test accuracy {FLOAT}, .*", rf"  euler-lmi: holds, rate 0\.99{FLOAT} \(tier .*\)",
                 r"parameterization ct-norm: every model certified, largest certified radius r\* = 0\.025",
                 r"parameterization euler-norm: every model certified, largest certified radius r\* = 0\.02495")


def test_torchnn_layers(root):
    out = run_example("torchnn_layers.py", root)
    assert_lines(out, rf"layer 1 form: relative state difference {FLOAT}, consistent: True",
                 rf"nn.RNN stack: holds True, rate {FLOAT}, coupling gains \[{FLOAT}\]",
                 r"nn.LSTM, input bound None: holds False \(.*no certificate without an input bound.*\)",
                 r"nn.LSTM, input bound 1\.0: holds True \(.*\)", r"certify_model source: torch.nn layers")


def test_derived_form(root):
    out = run_example("derived_form.py", root)
    assert_lines(out, rf"certified: euler-lmi, rate {FLOAT} per step \(tier riccati\), form derived, checked \(.*\)",
                 r"  euler-lmi: holds \(verified in float64 .*\)")


def test_own_model_walkthrough(tmp_path):
    folder = tmp_path / "own_model"
    shutil.copytree(EXAMPLES / "own_model", folder)
    out = run(["bash", "-e", "run.sh"], folder)
    assert_lines(out, r"mydata.npz - user data \(600 train, 0 val, 300 test; 20 steps of 2; 3 classes\)",
                 r"initialised: \|\|W\|\|_2 = 0\.4260, certified: True",
                 r"  euler-lmi: holds, rate 0\.885209 per step \(tier norm\)",
                 r"trained: \|\|W\|\|_2 = 2\.9081, certified: False",
                 r"  euler-lmi: fails \(no input-uniform certificate can exist .*spectral radius 1\.06622 > 1.*\)",
                 rf"Hessian of the recurrent block \['rec'\]: lambda_max {FLOAT}, lambda_min {FLOAT}",
                 r"audit: clean test accuracy 0\.8800, lambda_max .*", r"my-audit/ holds report.json, report.md",
                 r"recurrent parameters: rec", r"audit of my-rnn.pt \(MyRNN, task mydata.npz\) written to .*report.md and report.json",
                 r"MyRNN  my-rnn.pt   gaussian +0\.5 +3 +0\.8611 .*",
                 r"MyRNN  my-rnn.pt   gaussian-relative +0\.5 +3 +0\.85 .*", r"wrote sweep.csv")
    assert (folder / "cli-audit" / "report.md").is_file() and (folder / "sweep.csv").is_file()
