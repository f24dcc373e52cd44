"""The tiny cases that test_distributed.py runs in one process and distributed_worker.py in two."""

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.objective import Objective
from lrnn_analysis.robustness import SweepModel

SWEEP_GRID = {"gaussian": [0.0, 0.2], "gaussian-relative": [0.1, 0.0, 0.05], "fgsm": [0.0, 0.1]}
SWEEP_SEEDS = [2, 0, 1]


TRACE_OPTIONS = {"trace": True, "trace_matvecs": 12, "seed": 3, "progress": False}


def tiny_model(seed: int):
    return build_model(ModelConfig("lipschitz", 1, 4, 10, eps=0.1, init_std=4.0), seed=seed)


def hessian_case():
    """A float64 model, its loss and 5 batches of digits cut to 10 time steps (the last batch short:
    16, 16, 16, 16, 6 samples)."""
    task = load_task("digits", seed=0)
    x, y = task.train.x[:70, :10].double(), task.train.y[:70]
    batches = [(x[s:s + 16], y[s:s + 16]) for s in range(0, 70, 16)]
    return tiny_model(0).double(), Objective(True, False).loss_fn(), batches


def sweep_case():
    task = load_task("digits", seed=0)
    models = [SweepModel("lipschitz", f"model-{seed}", tiny_model(seed)) for seed in (0, 1)]
    return models, task, {"max_samples": 60, "device": "cpu"}


def write_recipes(directory, checkpoint) -> list:
    """Three recipes on ``checkpoint`` into ``directory``: spectra (rank 0 alone), then a robustness
    sweep and a Hessian over 2 batches (both shared by the ranks)."""
    models = f'checkpoints = ["{checkpoint}"]\n'
    recipes = {
        "spectra.toml": 'name = "spectra"\nanalysis = "spectra"\noutput = "spectra"\n' + models,
        "robust.toml": ('name = "robust"\nanalysis = "robustness"\ntask = "digits"\noutput = "robust"\nseed = 0\n' + models +
                        '[settings]\nseeds = 2\nmax_samples = 40\n[settings.grid]\ngaussian = [0.0, 0.2]\n'
                        'gaussian-relative = [0.0, 0.05, 0.1]\n'),
        "hessian.toml": ('name = "hessian"\nanalysis = "hessian"\ntask = "digits"\noutput = "hessian"\n' + models +
                         '[settings]\nbatches = 2\nbatch_size = 16\ntrace_matvecs = 6\ndensity = false\n'),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in recipes.items():
        (directory / name).write_text(text)
    return [str(directory / name) for name in recipes]
