"""Checkpoints the command-line tests run the commands on."""
import pytest

from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.models import ModelConfig, build_model

TASK = {"name": "digits", "seed": 0, "options": {}}


@pytest.fixture
def checkpoints(tmp_path):
    """A stable, an unstable and a gated (no Lur'e form) digits model, saved."""
    stable = build_model(ModelConfig("lipschitz", 1, 6, 10, eps=0.1, gamma_a=1.0, gamma_w=0.0, init_std=0.1), seed=0)
    unstable = build_model(ModelConfig("lipschitz", 1, 6, 10, eps=0.1, gamma_a=-0.5, init_std=0.1), seed=0)
    gated = build_model(ModelConfig("lipschitz-gated", 1, 6, 10), seed=0)
    return {name: save_checkpoint(tmp_path / f"{name}.safetensors", model, {"task": TASK})
            for name, model in (("stable", stable), ("unstable", unstable), ("gated", gated))}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny digits model trained by `lrnn train` under the euler-norm constraint (built once)."""
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    assert main(["train", "--task", "digits", "--hidden", "8", "--epochs", "6", "--gamma-a", "1", "--gamma-w", "0",
                 "--constrain", "euler-norm", "--margin", "0.01", "--out", str(path), "--quiet"]) == 0
    return path
