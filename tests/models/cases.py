"""A model configuration shared by the models' tests."""
from lrnn_analysis.models import ModelConfig


def model_config(arch, disc, n=5, d=3, out=4, **kw):
    """``arch`` run with ``disc``, every parameterization knob away from its default."""
    return ModelConfig(arch, d, n, out, eps=0.3, discretization=disc, beta_a=0.6, gamma_a=0.2,
                       beta_w=0.8, gamma_w=0.1, init_std=3.0, **kw)
