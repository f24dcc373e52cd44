"""build_model: a model beyond the parameter budget is refused before allocation."""
import pytest

from lrnn_analysis.models import ModelConfig, build_model


@pytest.mark.usefixtures("time_limit")
def test_a_model_beyond_the_parameter_budget_is_refused_before_allocation():
    with pytest.raises(ValueError, match="more than the limit"):
        build_model(ModelConfig("lipschitz", 1, 60000, 10))
