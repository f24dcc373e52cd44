"""Sweeps: level zero is clean and nothing is mutated, seeded, batched equals looped, a fragile model
degrades more, each model perturbed on its own recurrent parameters, user modules."""
import pytest
import torch
from torch.func import functional_call

from lrnn_analysis.evaluation import evaluate
from lrnn_analysis.model_under_analysis import ModelUnderAnalysis
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.robustness import (
    Perturbation,
    SweepModel,
    evaluate_parameter_draws,
    perturb_parameters,
    sweep,
)
from lrnn_analysis.task import Split, Task
from user_module import accuracy_by_hand, user_subject

GRID = {"gaussian": [0, 0.2], "salt-pepper": [0, 0.05], "occlusion": [0, 0.2], "fgsm": [0, 0.02], "gaussian-relative": [0, 0.1]}


def _threshold_task():
    """Constant sequences of +0.5 (class 1) or -0.5 (class 0)."""
    labels = torch.arange(400) % 2
    x = ((labels.float() - 0.5)[:, None, None]).expand(400, 20, 1).contiguous()
    split = Split(x, labels)
    return Task("threshold", "toy", split, split, split, 1, 20, 2, 0, 0.1)


def _threshold_model(threshold):
    """h' = -h + tanh(x) (Euler, eps 0.1) read out as class 1 iff h > threshold."""
    model = build_model(ModelConfig("lipschitz", 1, 1, 2, eps=0.1, gamma_a=1.0, gamma_w=0.0), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.U.weight.fill_(1.0)
        model.D.weight.copy_(torch.tensor([[0.0], [10.0]]))
        model.D.bias.copy_(torch.tensor([0.0, -10.0 * threshold]))
    return model


def test_sweep_level_zero_is_clean_and_nothing_is_mutated(small_model, digits):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    x_before = digits.test.x.clone()
    result = sweep([SweepModel("m", "m.safetensors", small_model)], digits, GRID, seeds=2, progress=False)
    clean = evaluate(small_model, digits.test.x, digits.test.y)
    zero_rows = [r for r in result.rows if r["level"] == 0]
    assert len(zero_rows) == 9 and all(r["accuracy"] == clean.accuracy and r["loss"] == clean.loss for r in zero_rows)
    assert all(torch.equal(before[k], v) for k, v in small_model.state_dict().items())
    assert torch.equal(digits.test.x, x_before)
    assert all(p.grad is None for p in small_model.parameters())
    assert len(result.rows) == 2 * 2 * 4 + 2  # fgsm is deterministic: one seed per level
    assert {r["n"] for r in result.rows} == {len(digits.test)}


def test_sweeps_are_deterministic_given_seeds(small_model, digits):
    def run():
        return sweep([SweepModel("m", "c", small_model)], digits, GRID, seeds=[3, 4], max_samples=100, progress=False).rows

    assert run() == run()


def test_batched_parameter_draws_equal_the_plain_loop(digits):
    for arch in ("lipschitz", "cayley", "node", "lipschitz-gated"):
        model = build_model(ModelConfig(arch, 1, 8, 10, init_std=3.0), seed=1)
        params = {k: v.detach() for k, v in model.named_parameters()}
        draws = [perturb_parameters(params, Perturbation("gaussian-relative", 0.2, seed=s)) for s in range(5)]
        x, y = digits.test.x[:150], digits.test.y[:150]
        batched = evaluate_parameter_draws(model, draws, x, y, batch_size=64, batched=True)
        looped = evaluate_parameter_draws(model, draws, x, y, batch_size=64, batched=False)
        for b, lo in zip(batched, looped, strict=True):
            assert b.accuracy == lo.accuracy and b.loss == pytest.approx(lo.loss, rel=1e-5)


def test_fragile_model_degrades_more_than_robust_one():
    task = _threshold_task()
    robust, fragile = _threshold_model(0.0), _threshold_model(0.38)
    result = sweep([SweepModel("robust", "r", robust), SweepModel("fragile", "f", fragile)], task,
                   {"gaussian": [0, 0.3], "gaussian-relative": [0, 0.3]}, seeds=10, progress=False)
    summary = {(s["model"], s["perturbation"], s["level"]): s for s in result.summary}
    for kind, level in (("gaussian", 0.3), ("gaussian-relative", 0.3)):
        assert summary[("robust", kind, 0.0)]["accuracy_mean"] == summary[("fragile", kind, 0.0)]["accuracy_mean"] == 1.0
        assert summary[("fragile", kind, level)]["accuracy_drop"] > summary[("robust", kind, level)]["accuracy_drop"] + 0.1


def test_models_sharing_a_checkpoint_name_keep_their_own_recurrent_parameters(digits):
    """Two entries with the same checkpoint text and different labels: each is perturbed on its
    own declared recurrent parameters (a lipschitz model's M_A, M_W; an antisymmetric model's M_W)."""

    lipschitz = ModelUnderAnalysis.from_recurrent_model(
        build_model(ModelConfig("lipschitz", digits.input_dim, 8, digits.output_dim, eps=0.1), seed=0), {})
    antisymmetric = ModelUnderAnalysis.from_recurrent_model(
        build_model(ModelConfig("antisymmetric", digits.input_dim, 8, digits.output_dim, eps=0.1), seed=0), {})
    result = sweep([SweepModel("a", "same.pt", lipschitz), SweepModel("b", "same.pt", antisymmetric)], digits,
                   {"gaussian-relative": [0.0, 0.5]}, seeds=1, max_samples=40, recurrent_only=True, progress=False)
    assert lipschitz.recurrent_names() == ["M_A", "M_W"] and antisymmetric.recurrent_names() == ["M_W"]
    x, y = digits.test.x[:40], digits.test.y[:40]
    for label, subject in (("a", lipschitz), ("b", antisymmetric)):
        params = {name: p.detach() for name, p in subject.module.named_parameters()}
        drawn = perturb_parameters(params, Perturbation("gaussian-relative", 0.5, seed=0), subject.recurrent_names())
        expected = evaluate_parameter_draws(subject.module, [drawn], x, y, batch_size=1000, batched=False)[0]
        row = next(r for r in result.rows if r["model"] == label and r["level"] == 0.5)
        assert (row["accuracy"], row["loss"]) == pytest.approx((expected.accuracy, expected.loss), rel=1e-6)


def test_sweep_of_a_user_module_matches_direct_computation(user):
    _, module, task = user
    subject = user_subject(module)
    assert subject.recurrent_names() == ["rec_a", "rec_w"]
    result = sweep([SweepModel("mine", "mymodels.py", subject)], task, {"gaussian-relative": [0.0, 0.5]},
                   seeds=[0], recurrent_only=True, progress=False)
    clean, noisy = result.rows
    assert clean["accuracy"] == pytest.approx(accuracy_by_hand(module, task.test.x, task.test.y), abs=1e-12)
    assert clean["accuracy"] > 0.6  # trained: well above the 1/3 of chance
    params = {name: p.detach() for name, p in module.named_parameters()}
    perturbed = perturb_parameters(params, Perturbation("gaussian-relative", 0.5, 0), subject.recurrent_names())
    assert not torch.equal(perturbed["rec_a"], params["rec_a"]) and not torch.equal(perturbed["rec_w"], params["rec_w"])
    assert all(perturbed[name] is params[name] for name in ("enc.weight", "enc.bias", "head.weight", "head.bias"))
    with torch.no_grad():
        out = functional_call(module, perturbed, (task.test.x,))
    assert noisy["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out, task.test.y)), rel=1e-5)
    assert noisy["loss"] != clean["loss"]
    assert result.settings["perturbed_parameters"] == {"mymodels.py": ["rec_a", "rec_w"]}
    assert result.warnings == ()  # the user's own split: no leakage warning


class _SquareRootGain(torch.nn.Module):
    """sqrt(w) * the last input step: NaN everywhere once a draw makes w negative."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.sqrt(self.w) * x[:, -1, :]


@pytest.mark.parametrize("batched", [True, False])
def test_a_sweep_never_scores_non_finite_outputs(batched):
    from lrnn_analysis.errors import InputError
    from lrnn_analysis.task import task_from_arrays

    x = torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(0))
    task = task_from_arrays(x, torch.arange(8) % 2, x, torch.arange(8) % 2, name="pairs")
    grid = {"gaussian-relative": [0.0, 2.0]}
    with pytest.raises(InputError, match=r"^root under gaussian-relative at level 2 \(seed \d\): 16 NaN and 0 inf among its "
                                         "16 outputs on 8 samples; no loss or accuracy is computed"):
        sweep([SweepModel("root", "memory", _SquareRootGain())], task, grid, seeds=5, batched=batched, progress=False)
    broken = _SquareRootGain()
    with torch.no_grad():
        broken.w.fill_(-1.0)
    with pytest.raises(InputError, match=r"^broken: 16 NaN and 0 inf"):
        sweep([SweepModel("broken", "memory", broken)], task, grid, seeds=5, batched=batched, progress=False)


def test_samples_given_with_marked_unscored_steps_sweep_as_their_task():
    """An (x, y) pair of a per-step task's split, its padding marked IGNORE_INDEX, gives the rows
    the task itself gives (the markers stay unscored, never read as labels)."""
    import numpy as np

    from language_model import StepModel
    from lrnn_analysis.task import task_from_arrays

    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((9, 6, 2)), rng.integers(0, 3, (9, 6))
    mask = np.arange(6)[None] < rng.integers(1, 7, (9, 1))
    task = task_from_arrays(x, y, x, y, name="padded", mask_train=mask, mask_test=mask, num_classes=3)
    model = StepModel(outputs=3)
    grid = {"gaussian": [0.0, 0.2], "gaussian-relative": [0.1]}
    from_task = sweep(model, task, grid, seeds=2, progress=False).rows
    from_pair = sweep(model, (task.test.x, task.test.y), grid, seeds=2, progress=False).rows
    assert [(r["value"], r["count"]) for r in from_pair] == [(r["value"], r["count"]) for r in from_task]
    assert from_task[0]["count"] == int(mask.sum())
