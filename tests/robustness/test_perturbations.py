"""Input and parameter perturbations: their statistics, budgets and bad arguments."""
import pytest
import torch

from lrnn_analysis.evaluation import evaluate
from lrnn_analysis.robustness import (
    ParameterDirections,
    Perturbation,
    is_deterministic,
    perturb_inputs,
    perturb_parameters,
)


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
    clean = evaluate(small_model, x, y).loss
    assert evaluate(small_model, attacked, y).loss > clean


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
    out = perturb_parameters(params, Perturbation("hessian-direction", 0.5, seed=3),
                             directions=ParameterDirections(("M_A", "M_W"), vectors))
    step = torch.cat([out["M_A"].flatten(), out["M_W"]])
    assert step.norm().item() == pytest.approx(0.5)
    assert torch.all(step[2:] == 0)
    with pytest.raises(ValueError, match="entries"):
        perturb_parameters(params, Perturbation("hessian-direction", 0.5), directions=ParameterDirections(("M_A",), vectors))


def test_one_hessian_direction_is_deterministic_with_a_fixed_sign():
    params = {"w": torch.zeros(3)}
    vector = torch.tensor([[0.6, -0.8, 0.0]])
    directions = ParameterDirections(("w",), vector)
    moved = {seed: perturb_parameters(params, Perturbation("hessian-direction", 0.5, seed=seed), directions=directions)["w"]
             for seed in range(4)}
    assert all(torch.equal(moved[0], m) for m in moved.values())
    assert torch.allclose(moved[0], torch.tensor([-0.3, 0.4, 0.0]))  # largest entry made positive
    flipped = perturb_parameters(params, Perturbation("hessian-direction", 0.5), directions=ParameterDirections(("w",), -vector))
    assert torch.equal(flipped["w"], moved[0])
    assert is_deterministic("hessian-direction", directions) and is_deterministic("fgsm")
    assert not is_deterministic("hessian-direction", ParameterDirections(("w",), torch.eye(3)[:2]))
    assert not is_deterministic("gaussian")


@pytest.mark.parametrize("kind,level", [("gaussian", -0.1), ("warp", 0.1), ("salt-pepper", 1.5), ("gaussian", float("nan"))])
def test_bad_perturbations(kind, level):
    with pytest.raises(ValueError):
        Perturbation(kind, level)


def test_embedding_noise_is_added_to_the_one_embeddings_output_and_refused_without_one():
    from torch import nn

    from lrnn_analysis.errors import InputError
    from lrnn_analysis.robustness.perturbations import embedding_noise, token_input_embedding

    embedding = nn.Embedding(5, 3)
    model = nn.Sequential(embedding, nn.Linear(3, 2))
    assert token_input_embedding(model, "m") is embedding
    tokens = torch.tensor([[0, 1, 4], [2, 2, 3]])
    with embedding_noise(embedding, Perturbation("gaussian", 0.5, seed=7)), torch.no_grad():
        noisy = embedding(tokens)
    expected = embedding.weight[tokens] + 0.5 * torch.randn((2, 3, 3), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(noisy, expected.detach())
    torch.testing.assert_close(embedding(tokens), embedding.weight[tokens])  # the hook is gone afterwards
    with pytest.raises(InputError, match="the model has none"):
        token_input_embedding(nn.Linear(3, 2), "m")
    with pytest.raises(InputError, match=r"the model has 2 \(0, 1\), and which one embeds the inputs is not known"):
        token_input_embedding(nn.Sequential(nn.Embedding(5, 3), nn.Embedding(5, 3)), "m")
