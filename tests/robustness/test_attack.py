"""The l2 PGD attack: the exact worst case of a linear classifier, feasible perturbations (ball and
box), seeded, and its settings checked."""
import pytest
import torch
from torch import nn

from lrnn_analysis.errors import InputError
from lrnn_analysis.robustness import PgdSettings, pgd_l2


class LinearSequenceClassifier(nn.Module):
    """z = W vec(x) + b: the margin over class j moves by at most ||w_y - w_j|| ||dx||."""

    def __init__(self, steps: int, features: int, classes: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.readout = nn.Linear(steps * features, classes).double()
        with torch.no_grad():
            self.readout.weight.copy_(torch.randn(classes, steps * features, generator=generator, dtype=torch.float64))
            self.readout.bias.copy_(torch.randn(classes, generator=generator, dtype=torch.float64))

    def forward(self, x):
        return self.readout(x.flatten(1))


def _closed_form_accuracy(model, x, y, radius):
    """Fraction correct with margin_yj / ||w_y - w_j|| > radius for every j != y (float64)."""
    with torch.no_grad():
        z = model(x.double())
    W = model.readout.weight.detach()
    robust = []
    for zi, yi in zip(z, y):
        others = [j for j in range(len(zi)) if j != yi]
        robust.append(all(float(zi[yi] - zi[j]) / float((W[yi] - W[j]).norm()) > radius for j in others))
    return sum(robust) / len(robust)


@pytest.mark.parametrize("classes", [2, 3])
def test_pgd_finds_the_exact_worst_case_of_a_linear_classifier(classes):
    model = LinearSequenceClassifier(8, 2, classes, seed=classes)
    x = torch.randn(300, 8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[::7] = (y[::7] + 1) % classes  # some clean misclassifications: never counted robust
    for radius in (0.0, 0.1, 0.3, 1.0):
        # A step of the radius itself halves the angle to the worst direction at every step (tan(a/2)):
        # 60 steps reach it to rounding, so samples at any distance from the boundary are decided right.
        found = pgd_l2(model, x, y, radius, PgdSettings(steps=60, restarts=3, step_size=1.0, seed=0))
        assert found.accuracy == pytest.approx(_closed_form_accuracy(model, x, y, radius), abs=1e-12)


def test_the_ratio_is_a_lower_bound_of_the_lipschitz_constant_and_near_it_on_a_linear_map():
    model = LinearSequenceClassifier(6, 1, 2, seed=0)
    x = torch.randn(50, 6, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    found = pgd_l2(model, x, y, 0.5, PgdSettings(steps=40))
    spectral = float(torch.linalg.matrix_norm(model.readout.weight.detach(), 2))
    assert float(found.ratio.max()) <= spectral * (1 + 1e-12)
    # The attack moves along u = (w_1 - w_0) / ||w_1 - w_0||, which W stretches by at least ||w_1 - w_0|| / sqrt(2).
    pair = float((model.readout.weight[1] - model.readout.weight[0]).detach().norm()) / 2 ** 0.5
    assert float(found.ratio.max()) >= pair * (1 - 1e-6)


def test_every_perturbation_stays_in_the_ball_and_the_box(digits_task):
    from lrnn_analysis.model_under_analysis import load_model

    subject = load_model("models/digits-lipschitz-certified.safetensors")
    x, y = digits_task.test.x[:40], digits_task.test.y[:40]
    for radius in (0.1, 1.0):
        found = pgd_l2(subject.module, x, y, radius, PgdSettings(steps=5, box=(0.0, 1.0)))
        norms = found.perturbation.flatten(1).norm(dim=1)
        assert float(norms.max()) <= radius * (1 + 1e-6)
        moved = x + found.perturbation
        assert float(moved.min()) >= 0.0 and float(moved.max()) <= 1.0


def test_an_input_outside_the_box_is_never_moved_beyond_the_radius():
    # A test input beyond the training range: clamping it into the box would move it by 2, not by at most 0.1.
    model = LinearSequenceClassifier(5, 2, 3, seed=0)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(20, 5, 2, generator=generator, dtype=torch.float64)
    x[:, 0, 0] = 3.0
    y = torch.randint(0, 3, (20,), generator=generator)
    found = pgd_l2(model, x, y, 0.1, PgdSettings(steps=5, box=(0.0, 1.0)))
    assert float(found.perturbation.flatten(1).norm(dim=1).max()) <= 0.1 * (1 + 1e-9)
    moved = x + found.perturbation
    assert float(moved[:, 0, 0].min()) >= 2.9 and float(moved[:, 1:].min()) >= 0.0 and float(moved[:, 1:].max()) <= 1.0


def test_the_attack_is_seeded():
    model = LinearSequenceClassifier(5, 2, 3, seed=4)
    x = torch.randn(30, 5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.zeros(30, dtype=torch.int64)
    first, again = (pgd_l2(model, x, y, 0.4, PgdSettings(steps=3, seed=7)) for _ in range(2))
    other = pgd_l2(model, x, y, 0.4, PgdSettings(steps=3, seed=8))
    assert torch.equal(first.perturbation, again.perturbation) and torch.equal(first.robust, again.robust)
    assert not torch.equal(first.perturbation, other.perturbation)


@pytest.mark.parametrize("changes", [{"steps": 0}, {"restarts": 0}, {"seed": -1}, {"step_size": 0.0},
                                     {"step_size": float("nan")}, {"box": (1.0, 0.0)}, {"box": (0.0, float("inf"))}])
def test_bad_settings_are_input_errors(changes):
    with pytest.raises(InputError):
        PgdSettings(**changes)


def test_a_bad_radius_or_batch_is_an_input_error():
    model = LinearSequenceClassifier(2, 1, 2, seed=0)
    x, y = torch.zeros(3, 2, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)
    for radius in (-0.1, float("inf"), True):
        with pytest.raises(InputError):
            pgd_l2(model, x, y, radius)
    with pytest.raises(InputError):
        pgd_l2(model, x, y[:2], 0.1)
