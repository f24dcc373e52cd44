"""The robustness pipeline and ``sweep`` take plain modules and plain data: one module, a mapping
of them, (x, y) tensors or a DataLoader give the numbers a Task gives."""
import pytest
from torch.utils.data import DataLoader, TensorDataset

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.errors import InputError
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.pipelines.robustness import RobustnessSettings, run
from lrnn_analysis.robustness import sweep

GRID = {"gaussian": [0.0, 0.2], "gaussian-relative": [0.05]}


@pytest.fixture(scope="module")
def case():
    task = load_task("digits", seed=0)
    model = build_model(ModelConfig("lipschitz", 1, 6, 10, eps=0.1), seed=0)
    return task, model


def _accuracies(result):
    return [(r["perturbation"], r["level"], r["accuracy_mean"], r["loss_mean"]) for r in result.summary]


def test_plain_module_and_tensors_give_the_numbers_of_a_task(case):
    task, model = case
    x, y = task.test.x[:60], task.test.y[:60]
    from_task = sweep(model, task, GRID, seeds=2, max_samples=60, progress=False)
    from_tensors = sweep(model, (x, y), GRID, seeds=2, progress=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=25)
    from_loader = sweep({"mine": model}, loader, GRID, seeds=2, progress=False)
    assert _accuracies(from_task) == _accuracies(from_tensors) == _accuracies(from_loader)
    assert {r["model"] for r in from_loader.rows} == {"mine"} and {r["checkpoint"] for r in from_tensors.rows} == {"in-memory"}
    assert from_tensors.settings["n"] == 60


def test_models_with_one_name_are_numbered_and_tensors_have_no_training_split(case):
    task, model = case
    twin = build_model(ModelConfig("lipschitz", 1, 6, 10, eps=0.1), seed=1)
    result = sweep([model, twin], (task.test.x[:20], task.test.y[:20]), {"gaussian": [0.0]}, seeds=1, progress=False)
    assert sorted({r["model"] for r in result.rows}) == ["lipschitz (euler)-1", "lipschitz (euler)-2"]
    with pytest.raises(InputError, match="no training samples"):
        run(model, (task.test.x[:20], task.test.y[:20]), RobustnessSettings(grid={"hessian-direction": [0.1]}, seeds=1))
    with pytest.raises(InputError, match="data must be"):
        sweep(model, 3.0, {"gaussian": [0.0]}, seeds=1, progress=False)


def test_radii_settings_stand_alone_and_are_checked():
    settings = RobustnessSettings(radii=[0.5, 0.1], certified=True, attack="pgd")
    assert settings.radii == (0.5, 0.1) and settings.grid == {}
    assert settings.to_dict()["attack_steps"] == 50 and settings.to_dict()["input_box"] == "data"
    for bad in ({"certified": True}, {"attack": "pgd"}, {"radii": [0.1], "attack": "fgsm"}, {"radii": [0.1, 0.1]},
                {"radii": [float("inf")]}, {"radii": [0.1], "input_box": "pixels"}, {"radii": [0.1], "attack_steps": 0},
                {"radii": [0.1], "attack_step_size": 0.0}, {"radii": [0.1], "certificate_budget": -1.0}, {}):
        with pytest.raises(InputError):
            RobustnessSettings(**bad)


def test_against_radius_needs_a_classification_task():
    from lrnn_analysis.pipelines.robustness import against_radius

    adding = build_model(ModelConfig("lipschitz", 2, 4, 1, eps=0.1), seed=0)
    with pytest.raises(InputError, match="classification"):
        against_radius([adding], load_task("adding", length=5), RobustnessSettings(radii=[0.1]))
