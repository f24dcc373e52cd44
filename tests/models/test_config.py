"""ModelConfig: round trips and invalid configurations."""
import pytest
import torch

from lrnn_analysis.models import (
    ModelConfig,
    build_model,
)

from .cases import model_config


def test_config_round_trip_rebuilds_same_model():
    config = model_config("lipschitz", "rk2")
    assert ModelConfig.from_dict(config.to_dict()) == config
    a, b = build_model(config, seed=5), build_model(ModelConfig.from_dict(config.to_dict()), seed=5)
    x = torch.randn(2, 3, 3)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("bad", [
    {"arch": "gru"}, {"readout": "every"}, {"hidden": 0}, {"eps": -0.1}, {"eps": float("nan")},
    {"discretization": "rk2", "arch": "vanilla"}, {"input_dim": 1.5},
    {"arch": "lipschitz-ren", "lipschitz": 1e308}, {"arch": "lipschitz-ren", "lipschitz": 1e-300},
    {"arch": "lipschitz-ren", "lipschitz": 0.0}, {"arch": "lstm", "lipschitz": 2.0},
])
def test_invalid_config_is_rejected(bad):
    fields = {"arch": "lipschitz", "input_dim": 1, "hidden": 4, "output_dim": 2, **bad}
    with pytest.raises(ValueError):
        ModelConfig(**fields)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"arch": "lipschitz", "input_dim": 1, "hidden": 4, "output_dim": 2, "colour": 1})
