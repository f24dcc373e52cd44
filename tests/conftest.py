"""Fixtures shared by test modules in more than one folder: saved checkpoints, a user's own model
and project, the reference implementation's module, and the time limit of the input-safety tests."""
import signal
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import language_model
import user_module
import user_project
from helpers import SAVED_CONFIG, SAVED_TASK
from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.data_files import load_data
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.stability.evidence import METADATA_KEY, construction_evidence
from lrnn_analysis.usermodule import load_user_model
from reference_files import FIXTURE_MODULE

pytest.register_assert_rewrite("cli.helpers")

# Tiny recurrent models run fastest single-threaded; it also keeps tests stable on 2-core CI.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_task():
    from lrnn_analysis.builtin_tasks import load_task

    return load_task("digits", seed=0)


@pytest.fixture
def time_limit():
    """A hang is a failure, not a stuck suite."""
    def expire(signum, frame):
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def saved(tmp_path):
    """A native checkpoint of SAVED_CONFIG recording SAVED_TASK and a test accuracy."""
    model = build_model(SAVED_CONFIG, seed=0)
    return save_checkpoint(tmp_path / "m.safetensors", model, {"task": SAVED_TASK, "metrics": {"test_accuracy": 0.5}})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny native digits checkpoint."""
    model = build_model(ModelConfig("lipschitz", 1, 4, 10, eps=0.1), seed=0)
    return save_checkpoint(tmp_path_factory.mktemp("models") / "tiny.safetensors", model,
                           {"task": {"name": "digits", "seed": 0, "options": {}}})


@pytest.fixture
def task_checkpoints(tmp_path):
    """Checkpoints of a digits model and of an adding-problem (regression) model."""
    digits = build_model(ModelConfig("lipschitz", 1, 6, 10, eps=0.1, gamma_a=1.0, gamma_w=0.0, init_std=0.1), seed=0)
    adding = build_model(ModelConfig("lipschitz", 2, 4, 1, eps=0.1), seed=0)
    return (save_checkpoint(tmp_path / "digits.safetensors", digits, {"task": {"name": "digits", "seed": 0, "options": {}}}),
            save_checkpoint(tmp_path / "adding.safetensors", adding,
                            {"task": {"name": "adding", "seed": 0, "options": {"length": 5}}}))


@pytest.fixture(scope="module")
def small_model():
    """A digits model with large initial weights, which perturbations visibly hurt."""
    return build_model(ModelConfig("lipschitz", 1, 12, 10, eps=0.1, init_std=4.0), seed=0)


@pytest.fixture
def certified_checkpoint(tmp_path):
    """A contracting model saved with the certificate evidence of its construction, and that evidence."""
    model = build_model(ModelConfig("contracting", 1, 4, 3, eps=0.1), seed=0)
    evidence, verification = construction_evidence(model)
    assert verification.passed
    path = save_checkpoint(tmp_path / "c.safetensors", model, {METADATA_KEY: evidence.to_dict()})
    return path, evidence


@pytest.fixture
def user_dir(tmp_path):
    """A directory of the user's own files, which no command may replace."""
    directory = tmp_path / "mine"
    (directory / "sub").mkdir(parents=True)
    (directory / "notes.txt").write_text("my notes\n")
    (directory / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return directory


@pytest.fixture(scope="session")
def user(tmp_path_factory):
    """The user's module file, data file, trained module and task."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "mymodels.py").write_text(user_module.MODEL_SOURCE)
    rng = np.random.default_rng(0)
    (x_train, y_train), (x_test, y_test) = user_module.sequences(rng, 240), user_module.sequences(rng, 90)
    np.savez(folder / "mydata.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    task = load_data(folder / "mydata.npz")
    module = user_module.import_from_file(folder / "mymodels.py").build()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.03)
    for _ in range(8):
        for start in range(0, len(task.train), 60):
            loss = torch.nn.functional.cross_entropy(module(task.train.x[start:start + 60]), task.train.y[start:start + 60])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    module.eval()
    return folder, module, task


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """mymodels.py, data.npz, and each variant trained briefly: rnn.pt (torch.save) and lstm.safetensors."""
    root = tmp_path_factory.mktemp("project")
    (root / "mymodels.py").write_text(user_project.MODULE_SOURCE)
    (root / "analyses").mkdir()
    (root / "analyses" / "mymodels.py").write_text(user_project.MODULE_SOURCE)  # a recipe runs only code inside its own folder
    rng = np.random.default_rng(0)
    (x_train, y_train), (x_test, y_test) = user_project.sequences(rng, 300), user_project.sequences(rng, 200)
    np.savez(root / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    spec = f"{root / 'mymodels.py'}:build"
    for kind, file in (("rnn", "rnn.pt"), ("lstm", "lstm.safetensors")):
        module = load_user_model(spec, model_args={"kind": kind}).module.train()
        optimizer = torch.optim.Adam(module.parameters(), lr=0.03)
        x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(module(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if file.endswith(".pt"):
            torch.save(state, root / file)
        else:
            save_file(state, str(root / file))
    return root


@pytest.fixture(scope="session")
def language_project(tmp_path_factory):
    """lm.py (an RNNModel with tied weights), data.npz (token ids, next-token targets, masks of
    trailing padding) and lm.pt, its weights after a short training (each tensor saved on its own:
    the loader refuses tensors sharing a storage, and loading re-ties them)."""
    root = tmp_path_factory.mktemp("language")
    (root / "lm.py").write_text(language_model.MODULE_SOURCE)
    rng = np.random.default_rng(0)
    (x_train, y_train, m_train), (x_test, y_test, m_test) = (language_model.token_sequences(rng, n) for n in (48, 24))
    np.savez(root / "data.npz", x_train=x_train, y_train=y_train, mask_train=m_train, x_test=x_test, y_test=y_test,
             mask_test=m_test)
    module = load_user_model(f"{root / 'lm.py'}:build").module.train()
    task = load_data(root / "data.npz")
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(40):
        loss = task.objective.loss_fn()(module(task.train.x), task.train.y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, root / "lm.pt")
    return root


@pytest.fixture
def reference_code(tmp_path, monkeypatch):
    """A module named ``models`` with the reference's classes, importable while fixtures are built."""
    code = tmp_path / "reference_code"
    code.mkdir()
    (code / "models.py").write_text(textwrap.dedent(FIXTURE_MODULE))
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    import models

    yield models
    sys.modules.pop("models", None)
