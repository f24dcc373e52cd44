"""Contracting-by-construction models (contracting, ren): every draw certified, the Lur'e form,
trajectories contracting at the certified rate, the equations neuron by neuron.

Every certificate here is checked by the toolkit's float64 verification, never by the
construction's own algebra."""
import numpy as np
import pytest
import torch

from helpers import REPO_ROOT
from lrnn_analysis.checkpoints import load_checkpoint
from lrnn_analysis.models import ModelConfig, build_model, contracting_construction, ren_construction
from lrnn_analysis.stability import verify_certificate
from lrnn_analysis.stability.evidence import (
    REN_CERTIFICATE,
    certify_trained,
    check_stored,
    construction_evidence,
    explicit_increment_form,
)
from lrnn_analysis.stability.spectra import UNIT_ROUNDOFF
from lrnn_analysis.stability.verification import verify


def _random_parameters(rng, n, m):
    """X with column scales spread over 1.5 decades (ill-conditioned H, yet cond(Q) below the
    verification's floor of 1e9 on cond(P)), Y arbitrary."""
    X = rng.normal(size=(m, 3 * n)) * 10.0 ** rng.uniform(-0.75, 0.75, size=(1, 3 * n))
    Y = rng.normal(size=(n, n)) * 10.0 ** rng.uniform(-1, 1)
    return torch.from_numpy(X), torch.from_numpy(Y)


def _q(c):
    E, P = c.E.numpy(), c.P.numpy()
    Q = E.T @ np.linalg.solve(P, E)
    return 0.5 * (Q + Q.T)


def _contracting_parameters(rng, n, m):
    """Z with column scales spread over 1.5 decades, B and C with row scales spread over a decade,
    ell over a decade (ill-conditioned M and Q)."""
    Z = rng.normal(size=(m, 2 * n)) * 10.0 ** rng.uniform(-0.75, 0.75, size=(1, 2 * n))
    B = rng.normal(size=(n, n)) * 10.0 ** rng.uniform(-0.5, 0.5, size=(n, 1))
    C = rng.normal(size=(n, n)) * 10.0 ** rng.uniform(-0.5, 0.5, size=(n, 1))
    ell = rng.choice([-1.0, 1.0], size=n) * 10.0 ** rng.uniform(-0.5, 0.5, size=n)
    return (torch.from_numpy(a) for a in (Z, B, C, ell))


def _pair_contraction(step, P, rate, n, rng, steps=60):
    """Largest ||Delta_k||_P / (rate^k ||Delta_0||_P) over pairs driven by the same random inputs."""
    worst = 0.0
    for _ in range(5):
        inputs = rng.normal(scale=3.0, size=(steps, n))
        a, b = rng.normal(scale=2.0, size=n), rng.normal(scale=2.0, size=n)
        size0 = np.sqrt((a - b) @ P @ (a - b))
        for k, u in enumerate(inputs, start=1):
            a, b = step(a, u), step(b, u)
            worst = max(worst, np.sqrt((a - b) @ P @ (a - b)) / (rate**k * size0))
    return worst


def test_contracting_construction_certifies_every_draw():
    rng = np.random.default_rng(0)
    cond = []
    for _ in range(300):
        n = int(rng.integers(1, 5))
        m = int(rng.integers(1, 2 * n + 1))
        rho = float(rng.uniform(0.5, 1.0))
        c = contracting_construction(*_contracting_parameters(rng, n, m), rho)
        E = c.E.numpy()
        form = explicit_increment_form(np.linalg.solve(E, c.F.numpy()), np.linalg.solve(E, c.B.numpy()), c.C.numpy(),
                                       np.zeros((n, n)))
        Q = _q(c)
        cond.append(np.linalg.cond(Q))
        check = verify(form, Q, c.lam.numpy(), rho**2 * (1 - 8 * UNIT_ROUNDOFF))
        assert check.passed, (n, m, rho, check.reason)
    assert max(cond) > 1e4  # the draws include ill-conditioned Lyapunov matrices


def test_contracting_multiplier_block_is_exact():
    """M_22 = 2 Lambda: the sector multipliers are exactly what the certificate needs, none
    spent on off-diagonal terms (the full M is rebuilt and checked positive definite)."""
    rng = np.random.default_rng(1)
    n, m, rho = 5, 3, 0.9
    Z, B, C, ell = _contracting_parameters(rng, n, m)
    c = contracting_construction(Z, B, C, ell, rho)
    lam = c.lam.numpy()
    np.testing.assert_allclose(lam, 0.5 * (ell.numpy() ** 2 + 1e-3))
    E, P = c.E.numpy(), c.P.numpy()
    M11 = rho**2 * (E + E.T - P)
    M = np.block([[M11, -(lam[:, None] * c.C.numpy()).T, c.F.numpy().T],
                  [-(lam[:, None] * c.C.numpy()), np.diag(2 * lam), c.B.numpy().T],
                  [c.F.numpy(), c.B.numpy(), P]])
    np.testing.assert_allclose(M, M.T, atol=1e-12)
    assert np.linalg.eigvalsh(M)[0] > 0


def test_ren_construction_certifies_every_draw():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 6))
        m = int(rng.integers(1, 3 * n + 1))
        rho = float(rng.uniform(0.5, 1.0))
        block = int(rng.integers(1, n + 1))
        X, Y = _random_parameters(rng, n, m)
        c = ren_construction(X, Y, rho, block=block)
        D11 = c.D11.numpy()
        assert np.all(np.triu(D11) == 0)  # strictly lower triangular: w is explicit
        E, lam = c.E.numpy(), c.lam.numpy()
        form = explicit_increment_form(np.linalg.solve(E, c.F.numpy()), np.linalg.solve(E, c.B.numpy()),
                                       c.C.numpy() / lam[:, None], D11 / lam[:, None])
        check = verify(form, _q(c), lam, rho**2 * (1 - 8 * UNIT_ROUNDOFF))
        assert check.passed, (n, m, rho, block, check.reason)


def _model(arch, hidden=6, seed=0, **options):
    return build_model(ModelConfig(arch, 1, hidden, 3, eps=0.1, **options), seed=seed)


def test_lure_form_of_random_contracting_models_is_certified_by_the_toolkit():
    """The rewritten (Lur'e) certificate needs a well-conditioned T (hence the training penalty):
    every draw with cond(T) <= 1e3 verifies through ``verify_certificate``."""
    rng = np.random.default_rng(0)
    checked = 0
    for seed in range(30):
        model = _model("contracting", hidden=int(rng.integers(2, 7)), seed=seed, rho=float(rng.uniform(0.8, 1.0)))
        with torch.no_grad():
            model.B.add_(torch.randn_like(model.B) * 3.0)
            model.C.normal_(std=3.0)
        if np.linalg.cond(model.coordinates()) > 1e3:
            continue
        checked += 1
        evidence, verification = construction_evidence(model)
        assert verification.passed and evidence.rate <= model.config.rho, (seed, verification.reason)
        again = verify_certificate(model.lure_form(), "euler-lmi", evidence.P, evidence.multipliers, evidence.rate)
        assert again.passed
    assert checked >= 20


def test_lure_form_runs_the_model_in_rotated_coordinates():
    model = _model("contracting", hidden=5).double()
    x = torch.rand(3, 12, 1, dtype=torch.float64)
    with torch.no_grad():
        h = model.hidden_states(x).numpy()
        u = model.U(x).numpy()  # u_t = U x_t + b
    zeta = model.lure_form().simulate(np.zeros((3, 5)), u)
    np.testing.assert_allclose(zeta @ model.coordinates().T, h, atol=1e-10)


def test_trained_contracting_model_trajectories_contract_at_the_certified_rate(digits_task):
    from lrnn_analysis.training import TrainSettings, train_model

    model = build_model(ModelConfig("contracting", 1, 8, 10, eps=0.1, rho=0.95), seed=0)
    train_model(model, digits_task, TrainSettings(epochs=2, batch_size=256), torch.device("cpu"), progress=False)
    evidence, verification = construction_evidence(model)
    assert verification.passed and evidence.rate <= 0.95
    system = model.lure_form()
    worst = _pair_contraction(system.step, evidence.P, evidence.rate, 8, np.random.default_rng(0))
    assert worst <= 1.0 + 1e-9


def test_the_committed_contracting_model_contracts_at_its_stored_rate():
    """The shipped digits model (trained 100 epochs): its stored evidence verifies and simulated
    pairs of its Lur'e form never separate faster than the stored rate in the stored P-norm."""
    path = REPO_ROOT / "models" / "digits-contracting.safetensors"
    model, metadata = load_checkpoint(path)
    check = check_stored(model, metadata)
    assert check.verified and check.evidence.certificate == "euler-lmi" and check.evidence.rate < 1
    system = model.lure_form()
    worst = _pair_contraction(system.step, check.evidence.P, check.evidence.rate, system.n, np.random.default_rng(1))
    assert worst <= 1.0 + 1e-9


def test_ren_trajectories_contract_at_the_certified_rate():
    model = _model("ren", hidden=20, rho=0.9).double()
    evidence, verification = construction_evidence(model)
    assert verification.passed and evidence.certificate == REN_CERTIFICATE
    step_fn = model._step_function()

    def step(h, u):
        with torch.no_grad():
            inputs = torch.cat([torch.from_numpy(u)[None], torch.zeros(1, 1, dtype=torch.float64)], dim=1)
            return step_fn(torch.from_numpy(h)[None], inputs)[0].numpy()

    assert _pair_contraction(step, evidence.P, evidence.rate, 20, np.random.default_rng(1)) <= 1.0 + 1e-9


def test_ren_block_structure_is_explicit():
    model = _model("ren", hidden=40)
    D = model.explicit_matrices(torch.float64)["D"].detach().numpy()
    assert np.all(np.triu(D) == 0) and np.any(D != 0)


def test_parameter_counts_and_regularizer():
    contracting, lipschitz = _model("contracting", hidden=64), _model("lipschitz", hidden=64)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(contracting) <= 2 * count(lipschitz)
    penalty = contracting.regularization()
    assert penalty.ndim == 0 and penalty.item() > 0
    penalty.backward()
    assert all(contracting.get_parameter(name).grad is not None for name in ("Z1", "dZ", "B", "C", "ell"))
    assert _model("contracting", cond_penalty=0.0).regularization() is None
    with pytest.raises(ValueError, match="rank"):
        _model("contracting", hidden=6, rank=13)


def test_ren_matches_its_equations_neuron_by_neuron():
    """E x+ = F x + B1 w + B2 x_t, Lambda v = C1 x + D11 w + Lambda u, w = tanh(v), solved one neuron at a time."""
    model = _model("ren", hidden=40, seed=3).double()
    with torch.no_grad():
        model.B2.weight.normal_()
    c = model.construction(torch.float64)
    E, F, B1, C1, lam, D11 = (t.detach().numpy() for t in (c.E, c.F, c.B, c.C, c.lam, c.D11))
    p = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 1, dtype=torch.float64)
    expected = []
    for sample in x.numpy():
        h = np.zeros(40)
        for x_t in sample:
            u = p["U.weight"] @ x_t + p["U.bias"]
            w = np.zeros(40)
            for i in range(40):
                w[i] = np.tanh((C1[i] @ h + D11[i] @ w) / lam[i] + u[i])
            h = np.linalg.solve(E, F @ h + B1 @ w + p["B2.weight"] @ x_t)
        expected.append(p["D.weight"] @ h + p["D.bias"])
    np.testing.assert_allclose(model(x).detach().numpy(), np.stack(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed,library", [(2, "numpy"), (6, "torch")])
def test_a_singular_rewrite_ends_as_evidence_not_stored(seed, library):
    model = build_model(ModelConfig("contracting", 1, 4, 2), seed=seed)
    with torch.no_grad():
        model.B[0] = 0.0  # B singular: T = E^-1 B / eps has no inverse
    with pytest.raises((np.linalg.LinAlgError, torch.linalg.LinAlgError)) as raised:
        construction_evidence(model)
    assert type(raised.value).__module__.startswith(library)
    evidence, line = certify_trained(model)
    assert evidence is None
    assert line.startswith("certificate evidence NOT stored: the construction's matrices are singular in float64 (")
    assert "\n" not in line
