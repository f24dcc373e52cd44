"""build_model: a model beyond the parameter budget is refused before allocation; the
hyper-parameters each architecture reads."""
import dataclasses

import numpy as np
import pytest
import torch

from lrnn_analysis.models import CHECKED_HYPERPARAMETERS, HYPERPARAMETERS, MODEL_CLASSES, ModelConfig, build_model


@pytest.mark.usefixtures("time_limit")
def test_a_model_beyond_the_parameter_budget_is_refused_before_allocation():
    with pytest.raises(ValueError, match="more than the limit"):
        build_model(ModelConfig("lipschitz", 1, 60000, 10))


CHANGED = {"eps": 0.5, "beta_a": 0.5, "gamma_a": 0.2, "beta_w": 0.3, "gamma_w": 0.2, "init_std": 0.5, "ode_substeps": 2, "rho": 0.9,
           "rank": 3, "cond_penalty": 0.5}


def _observables(config):
    """Everything a hyper-parameter could change: parameters, outputs, the Lur'e form, the loss term."""
    model = build_model(config, seed=0).double()
    x = torch.randn(2, 5, config.input_dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        seen = [p.detach().clone() for p in model.state_dict().values()] + [model(x)]
        form = model.lure_form()
        if form is not None:
            seen += [torch.tensor(np.array(form.A)), torch.tensor(np.array(form.W)), torch.tensor(float(form.eps or 0))]
        term = model.regularization()
        seen += [] if term is None else [term.reshape(1)]
    return seen


@pytest.mark.parametrize("arch", sorted(MODEL_CLASSES))
def test_each_architecture_reads_exactly_its_declared_hyperparameters(arch):
    """HYPERPARAMETERS (what lrnn train lets one set per architecture): changing a declared one
    changes something observable, changing any other of CHECKED_HYPERPARAMETERS changes nothing."""
    assert set(HYPERPARAMETERS) == set(MODEL_CLASSES) and HYPERPARAMETERS[arch] <= set(CHECKED_HYPERPARAMETERS)
    base = ModelConfig(arch, 2, 8, 3, eps=0.2)
    reference = _observables(base)
    for name in CHECKED_HYPERPARAMETERS:
        changed = _observables(dataclasses.replace(base, **{name: CHANGED[name]}))
        same = len(changed) == len(reference) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(changed, reference))
        assert same != (name in HYPERPARAMETERS[arch]), (arch, name)
