"""Certified accuracy: never above the attack's or the noise's on every reference digits model, the
bound never below its sampled lower bounds, a doctored bound detected, "no bound" never 0, the
Jacobian lower bounds exact on a linear map."""
import dataclasses
import glob

import numpy as np
import pytest
import torch
from torch import nn

from lrnn_analysis.errors import InputError
from lrnn_analysis.model_under_analysis import as_model_under_analysis, load_model
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.pipelines.stability import gain_certificate
from lrnn_analysis.robustness import (
    BoundViolation,
    PgdSettings,
    SweepModel,
    certified_robustness,
    input_jacobian_bounds,
    l2_noise,
    pgd_l2,
    sequence_bound,
)
from robustness.test_attack import LinearSequenceClassifier

RADII = (0.01, 0.03, 0.1)


@pytest.fixture(scope="module")
def reference_models():
    return [SweepModel(path, path, load_model(path)) for path in sorted(glob.glob("models/digits-*.safetensors"))]


def test_certified_accuracy_never_exceeds_attack_or_noise_accuracy_on_every_reference_model(digits, reference_models):
    x, y = digits.test.x[:40], digits.test.y[:40]
    found = certified_robustness(reference_models, x, y, RADII, PgdSettings(steps=10, box=(0.0, 1.0)), noise_seeds=1,
                                 time_budget=2.0, bound=gain_certificate)
    assert len(found.rows) == len(reference_models) * len(RADII)
    with_bound = 0
    for row in found.rows:
        assert row["attack_accuracy"] <= row["clean_accuracy"] + 1e-12
        if row["certified_accuracy"] is not None:
            with_bound += 1
            assert row["certified_accuracy"] <= min(row["attack_accuracy"], row["noise_accuracy"])
    # the norm-projected, cayley, contracting and lipschitz-ren models have bounds with rho <= 1 (or about)
    assert with_bound >= 4 * len(RADII)
    built = [row for row in found.rows if row["model"] == "models/digits-lipschitz-ren.safetensors"]
    assert built and all(row["certified_accuracy"] > 0.5 for row in built)
    for bound in found.bounds:
        if bound.holds:  # checked in the code too: a lower bound above the bound raises
            assert bound.looseness >= 1.0 and max(bound.gradient_lower_bound, bound.attack_lower_bound) <= bound.lipschitz


def test_a_model_without_a_bound_reads_no_bound_not_zero(digits):
    ren = SweepModel("ren", "models/digits-ren.safetensors", load_model("models/digits-ren.safetensors"))
    found = certified_robustness([ren], digits.test.x[:10], digits.test.y[:10], [0.1], PgdSettings(steps=2), noise_seeds=1)
    assert found.rows[0]["certified_accuracy"] is None and found.rows[0]["lipschitz"] is None
    assert not found.bounds[0].holds and "Lur'e form" in found.bounds[0].reason


def test_the_default_bound_of_a_model_built_to_a_bound_is_its_construction_not_its_lure_form():
    # Its Lur'e form in zeta = T^-1 h (T cond ~ 6e3) certified only 4.6e147 where the construction gives 8.
    subject = load_model("models/digits-lipschitz-ren.safetensors")
    found = sequence_bound(subject, 64, 2.0)
    assert found.holds and found.lipschitz <= subject.module.config.lipschitz * (1 + 1e-6)
    assert found.lipschitz == gain_certificate(subject, 64).lipschitz


def test_a_model_reading_out_every_step_is_an_input_error_not_broadcast_garbage(digits):
    # 10 samples and 10 classes: (N, T, k) logits compared with (N,) labels broadcast instead of failing.
    model = SweepModel("per-step", "-", as_model_under_analysis(build_model(ModelConfig("vanilla", 1, 4, 10, readout="all"), seed=0)))
    with pytest.raises(InputError, match="one row of logits per sequence"):
        certified_robustness([model], digits.test.x[:10], digits.test.y[:10], [0.1], None, noise_seeds=1)
    with pytest.raises(InputError, match="one row of logits per sequence"):
        input_jacobian_bounds(model.model.module, digits.test.x[:3])
    with pytest.raises(InputError, match="one row of logits per sequence"):
        pgd_l2(model.model.module, digits.test.x[:3], digits.test.y[:3], 0.1)


class _NaNOnSequencesStartingAboveOne(nn.Module):
    """Logits x[:, 0, :2] (two classes), NaN where x[:, 0, 0] > 1: argmax would read class 0 there."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        z = self.scale * x[:, 0, :2]
        return torch.where(x[:, :1, 0] > 1, torch.full_like(z, float("nan")), z)


@pytest.mark.parametrize("start", [0.5, 2.0])
def test_non_finite_logits_are_an_input_error_not_an_accuracy(start):
    x = torch.zeros(4, 3, 2)
    x[:, 0, 0] = torch.tensor([start, 0.0, 0.0, 0.0])
    x[:, 0, 1] = -1.0
    model = SweepModel("nan", "-", as_model_under_analysis(_NaNOnSequencesStartingAboveOne()))
    # start 2.0: NaN on the clean input; start 0.5: NaN once a seeded noise of norm 0.9 lifts x[0, 0, 0] above 1.
    with pytest.raises(InputError, match="NaN"):
        certified_robustness([model], x, torch.zeros(4, dtype=torch.int64), [0.9], None, bound=None, noise_seeds=20)


@pytest.mark.parametrize("attack", [PgdSettings(steps=10), None])
def test_a_doctored_bound_is_detected(digits, attack):
    """A bound 100 times too small certifies samples the attack breaks, and lies below the input
    gradients: raised, never reported (with the attack or the lower bounds alone)."""
    def doctored(subject, horizon, time_budget=None):
        real = sequence_bound(subject, horizon, time_budget)
        return dataclasses.replace(real, lipschitz=real.lipschitz / 100, pair_bounds=real.pair_bounds / 100)

    model = SweepModel("norm-projected", "-", load_model("models/digits-lipschitz-certified.safetensors"))
    with pytest.raises(BoundViolation, match="wrong"):
        certified_robustness([model], digits.test.x[:60], digits.test.y[:60], [0.25], attack, bound=doctored,
                             noise_seeds=0, time_budget=2.0)


def test_the_jacobian_lower_bounds_are_exact_on_a_linear_map():
    model = LinearSequenceClassifier(4, 3, 3, seed=5)
    x = torch.randn(7, 4, 3, generator=torch.Generator().manual_seed(0))
    largest, pairs = input_jacobian_bounds(model, x)
    W = model.readout.weight.detach().double()
    assert largest == pytest.approx(float(torch.linalg.matrix_norm(W, 2)), rel=1e-12)
    expected = np.array([[float((W[i] - W[j]).norm()) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(pairs, expected, rtol=1e-12, atol=1e-15)


def test_l2_noise_has_the_radius_as_norm_is_seeded_and_stays_in_the_box():
    x = torch.rand(20, 6, 2, generator=torch.Generator().manual_seed(0))
    noisy = l2_noise(x, 0.3, seed=1, box=None)
    np.testing.assert_allclose((noisy - x.double()).flatten(1).norm(dim=1).numpy(), 0.3, rtol=1e-12)
    assert torch.equal(noisy, l2_noise(x, 0.3, seed=1, box=None))
    assert not torch.equal(noisy, l2_noise(x, 0.3, seed=2, box=None))
    boxed = l2_noise(x, 5.0, seed=1, box=(0.0, 1.0))
    assert float(boxed.min()) >= 0 and float(boxed.max()) <= 1
    assert float((boxed - x.double()).flatten(1).norm(dim=1).max()) <= 5.0
    # An input beyond the box keeps its own coordinates: the noise never exceeds the radius.
    outside = x.clone()
    outside[:, 0, 0] = 3.0
    noisy = l2_noise(outside, 0.3, seed=1, box=(0.0, 1.0))
    assert float((noisy - outside.double()).flatten(1).norm(dim=1).max()) <= 0.3 * (1 + 1e-12)


@pytest.mark.parametrize("radii", [[], [-0.1], [float("nan")], [0.1, 0.1]])
def test_bad_radii_are_input_errors(radii):
    model = LinearSequenceClassifier(2, 1, 2, seed=0)
    with pytest.raises(InputError):
        certified_robustness([model], torch.zeros(2, 2, 1), torch.zeros(2, dtype=torch.int64), radii, None, noise_seeds=0)


def test_regression_targets_are_an_input_error():
    model = LinearSequenceClassifier(2, 1, 2, seed=0)
    with pytest.raises(InputError, match="classification"):
        certified_robustness([model], torch.zeros(2, 2, 1), torch.zeros(2, 2), [0.1], None, noise_seeds=0)
