"""The Lipschitz-bounded REN (lipschitz-ren): its sequence map has incremental l2-gain at most G for
every parameter value (sampled pairs, an adversarial search and exact Jacobians in float64, over
several seeds and horizons), it runs the recurrence its docstring states, and the margin loss."""
import numpy as np
import pytest
import torch

from lrnn_analysis.errors import InputError
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.stability.evidence import METADATA_KEY, certify_trained, check_stored
from lrnn_analysis.task import Split, Task
from lrnn_analysis.training import TrainSettings, lipschitz_margin_logits, train_model


def _random_model(seed, G, n=5, d=3, k=4, scale=2.0, rank=0):
    """A lipschitz-ren model in float64 with every parameter drawn from N(0, scale^2)."""
    model = build_model(ModelConfig("lipschitz-ren", d, n, k, lipschitz=G, rho=0.97, rank=rank), seed=seed).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale)
    return model


def _ratios(model, x, x2):
    with torch.no_grad():
        return ((model(x) - model(x2)).norm(dim=1) / (x - x2).flatten(1).norm(dim=1)).numpy()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("horizon", [1, 6, 40])
def test_sampled_pairs_and_jacobians_never_exceed_g(seed, horizon):
    G = [0.5, 2.0, 7.0, 30.0][seed]
    model = _random_model(seed, G, rank=[0, 2, 7, 10][seed])
    rng = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(256, horizon, 3, generator=rng, dtype=torch.float64) * 2.0
    small = x + 1e-3 * torch.randn(x.shape, generator=rng, dtype=torch.float64)
    large = torch.randn(x.shape, generator=rng, dtype=torch.float64) * 2.0
    assert _ratios(model, x, small).max() <= G
    assert _ratios(model, x, large).max() <= G
    # The exact Jacobian of y wrt the whole sequence: ||J||_2 <= G and, pair by pair, the construction's bound.
    K = model.pair_lipschitz().detach().numpy()
    for sample in x[:4]:
        J = torch.autograd.functional.jacobian(lambda s: model(s[None])[0], sample).reshape(4, -1).numpy()
        assert np.linalg.norm(J, 2) <= G * (1 + 1e-12)
        for i in range(4):
            for j in range(i + 1, 4):
                assert np.linalg.norm(J[i] - J[j]) <= K[i, j] * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_an_adversarial_search_stays_below_g_and_nearly_reaches_it(seed):
    """Gradient ascent on ||y(x) - y(x~)|| / ||x - x~|| from random pairs: never above G."""
    G = 3.0
    model = _random_model(seed, G, scale=1.0)
    rng = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, 3, generator=rng, dtype=torch.float64).requires_grad_(True)
    x2 = (x.detach() + 0.1 * torch.randn(x.shape, generator=rng, dtype=torch.float64)).requires_grad_(True)
    optimizer = torch.optim.Adam([x, x2], lr=0.05)
    best = 0.0
    for _ in range(150):
        ratio = (model(x) - model(x2)).norm(dim=1) / (x - x2).flatten(1).norm(dim=1)
        best = max(best, float(ratio.detach().max()))
        optimizer.zero_grad()
        (-ratio.sum()).backward()
        optimizer.step()
    assert best <= G
    assert best > 1e-3 * G  # the search moved the outputs: the check above is not vacuous


def test_the_model_runs_the_stated_recurrence():
    """E h+ = F h + B tanh(C h + U x + b), y = D h_T + d, computed here from the construction."""
    model = _random_model(0, 2.0, scale=0.7)
    with torch.no_grad():
        model.input_bias.normal_()
        model.output_bias.normal_()
        c = model.construction()
        U = model.input_matrix()
        D = model.readout_matrix()
        x = torch.randn(3, 7, 3, dtype=torch.float64)
        h = torch.zeros(3, 5, dtype=torch.float64)
        for t in range(7):
            w = torch.tanh(h @ c.C.T + x[:, t] @ U.T + model.input_bias)
            h = torch.linalg.solve(c.E, (h @ c.F.T + w @ c.B.T).T).T
        expected = h @ D.T + model.output_bias
        for engine in ("recurrence", "autograd"):
            model.engine = engine
            torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_the_construction_satisfies_its_inequalities_in_float64():
    """The dissipation inequality V(h+) - rho^2 V(h) <= mu ||dx||^2 (with the sector terms) as one
    matrix, and D^T D <= (G^2 / mu) Q, with Q = E^T P^-1 E."""
    for seed in range(5):
        model = _random_model(seed, 4.0)
        with torch.no_grad():
            c, mu = model.lipschitz_construction()
            U = model.input_matrix().numpy()
            D = model.readout_matrix().numpy()
        E, F, B, C, P, lam, mu = (t.numpy() for t in (c.E, c.F, c.B, c.C, c.P, c.lam, mu))
        Q = E.T @ np.linalg.solve(P, E)
        assert np.linalg.eigvalsh(16.0 / mu * Q - D.T @ D)[0] > -1e-9 * np.abs(Q).max() * 16 / mu
        L = np.diag(lam)
        # The dissipation inequality at r = rho^2, mu = 1 (module docstring), as one matrix.
        rho2 = model.config.rho ** 2
        AB = np.linalg.solve(E, np.hstack([F, B]))
        n, d = 5, 3
        Z = np.zeros
        big = np.block([[AB.T @ Q @ AB - np.block([[rho2 * Q, Z((n, n))], [Z((n, n)), Z((n, n))]]), Z((2 * n, d))],
                        [Z((d, 2 * n)), -mu * np.eye(d)]])
        sector = np.block([[Z((n, n)), C.T @ L, Z((n, d))], [L @ C, -2 * L, L @ U], [Z((d, n)), U.T @ L, Z((d, d))]])
        M = big + sector
        assert np.linalg.eigvalsh(0.5 * (M + M.T))[-1] < 1e-9 * np.abs(M).max()


def test_margin_logits_add_the_scaled_pair_bound_to_non_target_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    K = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]])
    shifted = lipschitz_margin_logits(logits, torch.tensor([1, 2]), K, 0.5)
    torch.testing.assert_close(shifted, torch.tensor([[1.5, 2.0, 4.5], [1.5, 0.5, 4.0]]))


def test_margin_training_needs_pair_bounds():
    x = torch.rand(8, 4, 1)
    y = torch.arange(8) % 2
    task = Task("toy", "toy", Split(x, y), Split(x, y), Split(x, y), 1, 4, 2, 0, 0.1)
    settings = TrainSettings(epochs=1, batch_size=8, margin_radius=0.1)
    with pytest.raises(InputError, match="per-pair Lipschitz"):
        train_model(build_model(ModelConfig("lipschitz", 1, 3, 2)), task, settings, torch.device("cpu"), progress=False)
    model = build_model(ModelConfig("lipschitz-ren", 1, 3, 2, lipschitz=2.0), seed=0)
    result = train_model(model, task, settings, torch.device("cpu"), progress=False)
    assert np.isfinite(result.log[0]["train_loss"])
    with pytest.raises(InputError, match="margin_radius"):
        TrainSettings(margin_radius=-1.0)
    with pytest.raises(InputError, match=r"lipschitz must be in \[1e-06, 1e\+06\]"):
        ModelConfig("lipschitz-ren", 1, 3, 2, lipschitz=0.0)


@pytest.mark.parametrize("seed", range(3))
def test_every_draw_is_certified_contracting_by_its_explicit_form(seed):
    """ren-contraction with P = Q and the multipliers Lambda verifies in float64, at a rate <= rho."""
    model = _random_model(seed, 2.0, scale=1.0).float()
    evidence, line = certify_trained(model)
    assert evidence is not None, line
    assert evidence.certificate == "ren-contraction" and evidence.rate <= model.config.rho
    assert check_stored(model, {METADATA_KEY: evidence.to_dict()}).verified
    assert model.lure_form() is None and model.regularization() is None


def test_every_step_of_a_per_step_readout_obeys_the_bound():
    model = build_model(ModelConfig("lipschitz-ren", 3, 5, 4, lipschitz=1.5, readout="all"), seed=3).double()
    rng = torch.Generator().manual_seed(3)
    x = torch.randn(64, 9, 3, generator=rng, dtype=torch.float64)
    x2 = x + torch.randn(x.shape, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    assert y.shape == (64, 9, 4)
    for t in range(9):
        ratio = (y[:, t] - y2[:, t]).norm(dim=1) / (x[:, :t + 1] - x2[:, :t + 1]).flatten(1).norm(dim=1)
        assert float(ratio.max()) <= 1.5
    model.config = ModelConfig("lipschitz-ren", 3, 5, 4, lipschitz=1.5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y[:, -1])
