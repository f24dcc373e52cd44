"""Perturbations' statistics, sweep determinism, batched == looped, and bad options."""
import csv

import pytest
import torch

from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.task import Split, Task
from lrnn_analysis.evaluation import evaluate
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.robustness import (
    ParameterDirections,
    Perturbation,
    SweepModel,
    evaluate_parameter_draws,
    perturb_inputs,
    perturb_parameters,
    sweep,
)


@pytest.fixture(scope="module")
def small_model():
    return build_model(ModelConfig("lipschitz", 1, 12, 10, eps=0.1, init_std=4.0), seed=0)


@pytest.fixture(scope="module")
def digits(digits_task):
    return digits_task


def test_gaussian_input_statistics():
    x = torch.zeros(200, 50, 4)
    noisy = perturb_inputs(x, Perturbation("gaussian", 0.3, seed=1), (0.0, 1.0))
    assert noisy.std().item() == pytest.approx(0.3, rel=0.02) and abs(noisy.mean().item()) < 0.005
    assert torch.equal(perturb_inputs(x, Perturbation("gaussian", 0.3, seed=1), (0.0, 1.0)), noisy)
    assert torch.equal(perturb_inputs(x + 0.25, Perturbation("gaussian", 0.0, seed=1), (0.0, 1.0)), x + 0.25)


def test_salt_pepper_flip_rate_and_values():
    x = torch.full((300, 100, 1), 0.5)
    out = perturb_inputs(x, Perturbation("salt-pepper", 0.1, seed=0), (-1.0, 2.0))
    flipped = out != 0.5
    assert flipped.float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert set(out[flipped].unique().tolist()) == {-1.0, 2.0}
    assert (out[flipped] == 2.0).float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_occlusion_zeroes_the_requested_fraction_of_steps():
    x = torch.ones(100, 40, 3)
    out = perturb_inputs(x, Perturbation("occlusion", 0.25, seed=2), (0.0, 1.0))
    zero_steps = (out == 0).all(dim=2)
    assert torch.all(zero_steps.sum(1) == 10)
    assert torch.all((out == 0) == zero_steps.unsqueeze(-1))


def test_fgsm_moves_each_input_by_the_budget_in_the_loss_increasing_direction(small_model, digits):
    x, y = digits.test.x[:64], digits.test.y[:64]

    def gradient(inputs):
        inputs = inputs.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(small_model(inputs), y)
        return torch.autograd.grad(loss, inputs)[0]

    attacked = perturb_inputs(x, Perturbation("fgsm", 0.05), (0.0, 1.0), gradient)
    assert torch.allclose((attacked - x).abs().max(), torch.tensor(0.05))
    clean = evaluate(small_model, x, y, True).loss
    assert evaluate(small_model, attacked, y, True).loss > clean


def test_relative_parameter_noise_statistics():
    params = {"a": torch.randn(300, 300) * 3.0, "b": torch.full((50000,), 0.2)}
    out = perturb_parameters(params, Perturbation("gaussian-relative", 0.1, seed=4))
    for name, theta in params.items():
        rms = theta.pow(2).mean().sqrt()
        assert ((out[name] - theta) / rms).std().item() == pytest.approx(0.1, rel=0.02)
    only_a = perturb_parameters(params, Perturbation("gaussian-relative", 0.1, seed=4), names=["a"])
    assert torch.equal(only_a["b"], params["b"]) and not torch.equal(only_a["a"], params["a"])
    with pytest.raises(ValueError, match="no parameters named"):
        perturb_parameters(params, Perturbation("gaussian-relative", 0.1), names=["c"])


def test_hessian_direction_moves_exactly_level_along_the_span():
    params = {"M_A": torch.zeros(2, 2), "M_W": torch.zeros(3)}
    vectors = torch.eye(7)[:2]
    out = perturb_parameters(params, Perturbation("hessian-direction", 0.5, seed=3), directions=ParameterDirections(("M_A", "M_W"), vectors))
    step = torch.cat([out["M_A"].flatten(), out["M_W"]])
    assert step.norm().item() == pytest.approx(0.5)
    assert torch.all(step[2:] == 0)
    with pytest.raises(ValueError, match="entries"):
        perturb_parameters(params, Perturbation("hessian-direction", 0.5), directions=ParameterDirections(("M_A",), vectors))


@pytest.mark.parametrize("kind,level", [("gaussian", -0.1), ("warp", 0.1), ("salt-pepper", 1.5), ("gaussian", float("nan"))])
def test_bad_perturbations(kind, level):
    with pytest.raises(ValueError):
        Perturbation(kind, level)


GRID = {"gaussian": [0, 0.2], "salt-pepper": [0, 0.05], "occlusion": [0, 0.2], "fgsm": [0, 0.02], "gaussian-relative": [0, 0.1]}


def test_sweep_level_zero_is_clean_and_nothing_is_mutated(small_model, digits):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    x_before = digits.test.x.clone()
    result = sweep([SweepModel("m", "m.safetensors", small_model)], digits, GRID, seeds=2, progress=False)
    clean = evaluate(small_model, digits.test.x, digits.test.y, True)
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
        batched = evaluate_parameter_draws(model, draws, x, y, True, batch_size=64, batched=True)
        looped = evaluate_parameter_draws(model, draws, x, y, True, batch_size=64, batched=False)
        for (acc_b, loss_b), (acc_l, loss_l) in zip(batched, looped):
            assert acc_b == acc_l and loss_b == pytest.approx(loss_l, rel=1e-5)


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


def test_fragile_model_degrades_more_than_robust_one():
    task = _threshold_task()
    robust, fragile = _threshold_model(0.0), _threshold_model(0.38)
    result = sweep([SweepModel("robust", "r", robust), SweepModel("fragile", "f", fragile)], task,
                   {"gaussian": [0, 0.3], "gaussian-relative": [0, 0.3]}, seeds=10, progress=False)
    summary = {(s["model"], s["perturbation"], s["level"]): s for s in result.summary}
    for kind, level in (("gaussian", 0.3), ("gaussian-relative", 0.3)):
        assert summary[("robust", kind, 0.0)]["accuracy_mean"] == summary[("fragile", kind, 0.0)]["accuracy_mean"] == 1.0
        assert summary[("fragile", kind, level)]["accuracy_drop"] > summary[("robust", kind, level)]["accuracy_drop"] + 0.1


def test_cli_robustness_writes_tidy_csv(tmp_path, small_model, capsys):
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", small_model, {"task": {"name": "digits", "seed": 0, "options": {}}})
    out = tmp_path / "results.csv"
    code = main(["robustness", str(checkpoint), "--input-noise", "0,0.1", "--param-noise", "0,0.05", "--seeds", "2",
                 "--max-samples", "50", "--out", str(out), "--json", "--quiet"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8 and set(rows[0]) >= {"model", "checkpoint", "perturbation", "level", "seed", "accuracy", "loss", "n", "device"}
    assert (tmp_path / "results.json").exists()
    assert "gaussian-relative" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--input-noise", "0,-0.1"], "level must be a finite number >= 0"),
    (["--input-noise", "0.1", "--task", "smnist", "--pixels-per-step", "28"], "does not fit task smnist (input_dim 28"),
    ([], "no perturbation levels"),
])
def test_cli_robustness_bad_options(tmp_path, small_model, capsys, argv, message):
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", small_model, {"task": {"name": "digits", "seed": 0}})
    out = tmp_path / "results.csv"
    assert main(["robustness", str(checkpoint), "--out", str(out), "--quiet"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_cli_unknown_perturbation_option_is_a_usage_error(tmp_path):
    assert main(["robustness", "x.safetensors", "--warp", "0.1", "--out", str(tmp_path / "r.csv")]) == 2


def test_hessian_directions_are_unit_top_eigenvectors_and_drive_a_sweep(digits):
    from lrnn_analysis.hessian import HessianOperator
    from lrnn_analysis.robustness import hessian_directions

    model = build_model(ModelConfig("lipschitz", 1, 4, 10, init_std=3.0), seed=0).double()
    task = Task("digits64", "digits in float64", Split(digits.train.x[:64].double(), digits.train.y[:64]),
                digits.val, Split(digits.test.x[:64].double(), digits.test.y[:64]), 1, 64, 10, 0, 0.1)
    directions = hessian_directions(model, task, k=2, batch_size=64, params=["M_A", "M_W"])
    assert directions.names == ("M_A", "M_W") and directions.vectors.shape == (2, 32)
    dense = HessianOperator(model, torch.nn.CrossEntropyLoss(), (task.train.x, task.train.y), params=["M_A", "M_W"]).to_dense()
    top = torch.linalg.eigvalsh(torch.as_tensor(dense))[-2:].flip(0)
    for vector, value in zip(directions.vectors, top):
        assert vector.norm().item() == pytest.approx(1.0, abs=1e-9)
        hv = torch.as_tensor(dense) @ vector
        assert torch.allclose(hv, value * vector, atol=1e-3 * value.abs())
    result = sweep([SweepModel("m", "c", model, directions)], task, {"hessian-direction": [0, 0.5]}, seeds=2, progress=False)
    assert [r["level"] for r in result.rows] == [0.0, 0.0, 0.5, 0.5]
    assert result.rows[2]["loss"] != result.rows[0]["loss"]


def test_models_sharing_a_checkpoint_name_keep_their_own_recurrent_parameters(digits):
    """Two entries with the same checkpoint text and different labels: each is perturbed on its
    own declared recurrent parameters (a lipschitz model's M_A, M_W; an antisymmetric model's M_W)."""
    from lrnn_analysis.model_under_analysis import ModelUnderAnalysis

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
        expected = evaluate_parameter_draws(subject.module, [drawn], x, y, True, 1000, False)[0]
        row = next(r for r in result.rows if r["model"] == label and r["level"] == 0.5)
        assert (row["accuracy"], row["loss"]) == pytest.approx(expected, rel=1e-6)


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
