"""Recipes: the committed ones validate, bad ones are named with file and key, outputs are distinct,
user models, weights and data, recorded tasks, models keyed by path."""
import csv
import json
import re
import shutil
import textwrap

import numpy as np
import pytest

import user_project
from helpers import REPO_ROOT, phase_recipe
from lrnn_analysis import recipes
from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.errors import InputError
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.outputs import MARKER, OutputDirectory
from lrnn_analysis.recipes import load_recipe, run_recipe
from user_module import accuracy_by_hand
from user_project import hand_accuracy

SPECTRA = 'name = "s"\nanalysis = "spectra"\noutput = "s"\n'


def test_every_committed_recipe_validates_against_the_committed_models():
    """`make run` validates all recipes before computing anything: a recipe naming a model that is
    not committed (or two recipes sharing an output) would stop it at once."""
    from lrnn_analysis.recipes import check_recipe_set, find_recipes, load_recipe

    recipes = [load_recipe(path) for path in find_recipes(REPO_ROOT / "analyses")]
    check_recipe_set(recipes)
    for recipe in recipes:
        assert all(path.is_file() for path in recipe.checkpoint_paths()), recipe.path
    assert {"hessian-comparison", "smnist-hessian", "smnist-robustness"} <= {r.name for r in recipes}


def test_recipe_with_model_weights_and_data(project, tmp_path):
    analyses = project / "analyses"
    analyses.mkdir(exist_ok=True)
    recipe_path = analyses / "mine.toml"
    recipe_path.write_text(textwrap.dedent('''
        name = "my rnn"
        analysis = "robustness"
        output = "mine"
        model = "analyses/mymodels.py:build"
        model_args = {kind = "rnn", hidden = 8}
        weights = ["rnn.pt"]
        data = "data.npz"
        [settings]
        grid = {gaussian-relative = [0.0, 1.0]}
        recurrent = "rnn.weight_hh_*"
        seeds = 2
    '''))
    recipe = load_recipe(recipe_path)
    assert set(recipe.inputs()) == {project / "rnn.pt", project / "data.npz", project / "analyses" / "mymodels.py"}
    assert recipe.model_labels() == ("rnn",)
    outcome = run_recipe(recipe, tmp_path / "figures", progress=False)
    rows = list(csv.DictReader((tmp_path / "figures" / "mine.csv").open()))
    clean = [r for r in rows if float(r["level"]) == 0.0]
    assert clean and float(clean[0]["accuracy"]) == pytest.approx(hand_accuracy(project, "rnn.pt", "rnn"), abs=1e-12)
    assert "mine.csv" in {p.split("/")[-1] for p in outcome.outputs}


def test_recipe_on_per_step_data_names_its_metric(language_project, tmp_path):
    from language_model import direct_perplexity, load_language_model

    (tmp_path / "analyses").mkdir()
    shutil.copy(language_project / "lm.py", tmp_path / "analyses" / "lm.py")
    for name in ("lm.pt", "data.npz"):
        shutil.copy(language_project / name, tmp_path / name)
    (tmp_path / "analyses" / "lm.toml").write_text(textwrap.dedent('''
        name = "language model"
        analysis = "robustness"
        output = "lm"
        model = "analyses/lm.py:build"
        weights = ["lm.pt"]
        data = "data.npz"
        [settings]
        grid = {gaussian = [0.0, 0.3], gaussian-relative = [0.0, 0.1]}
        seeds = 1
    '''))
    outcome = run_recipe(load_recipe(tmp_path / "analyses" / "lm.toml"), tmp_path / "figures", progress=False)
    rows = list(csv.DictReader((tmp_path / "figures" / "lm.csv").open()))
    data = np.load(language_project / "data.npz")
    clean = direct_perplexity(load_language_model(language_project), data["x_test"], data["y_test"], data["mask_test"])
    assert {r["metric"] for r in rows} == {"perplexity"}
    assert float(next(r for r in rows if float(r["level"]) == 0.0)["value"]) == pytest.approx(clean, rel=1e-5)
    assert "smallest perplexity rise at level 0.3" in outcome.summary and (tmp_path / "figures" / "lm.png").is_file()


@pytest.mark.parametrize("lines,message", [
    (['model = "analyses/mymodels.py:build"', 'weights = ["rnn.pt"]'],
     "model analyses/mymodels.py:build records none; give task or data"),
    (['weights = ["rnn.pt"]', 'checkpoints = ["rnn.pt"]', 'task = "digits"'], "model_args and weights go with model"),
    (['model = "analyses/mymodels.py:build"', 'weights = ["missing.pt"]', 'data = "data.npz"'], "missing.pt is not an existing file"),
    (['model = "analyses/mymodels.py:build"', 'data = "data.npz"', 'task = "digits"'], "give either task"),
    (['model = "mymodels.py:build"', 'data = "data.npz"'], "lies outside the recipe's directory"),
    (['model = "os:system"', 'data = "data.npz"', 'model_args = {command = "touch pwned"}'], "names an importable module"),
    (['model = "analyses/absent.py:build"', 'data = "data.npz"'], "is not an existing file"),
])
def test_recipe_user_model_errors(project, lines, message):
    analyses = project / "analyses"
    analyses.mkdir(exist_ok=True)
    path = analyses / "bad.toml"
    path.write_text("\n".join(['name = "bad"', 'analysis = "hessian"', 'output = "bad"', *lines]) + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(path)


def test_recipe_scores_checkpoints_on_their_recorded_task_and_refuses_mixed_ones(project, digits_task):
    analyses = project / "analyses"
    analyses.mkdir(exist_ok=True)
    paths = {}
    for name, task in (("a", "digits"), ("b", "digits"), ("c", "adding")):
        config = ModelConfig("lipschitz", 1 if task == "adding" else 8, 4, 1 if task == "adding" else 10)
        paths[name] = save_checkpoint(project / f"{name}.safetensors", build_model(config),
                                      {"task": {"name": task, "seed": 3, "options": {}}})
    same = analyses / "same.toml"
    same.write_text('name = "s"\nanalysis = "hessian"\noutput = "s"\ncheckpoints = ["a.safetensors", "b.safetensors"]\n')
    recipe = load_recipe(same)
    assert recipe.recorded_task == {"name": "digits", "seed": 3, "options": {}}
    assert recipe.load_task().seed == 3
    mixed = analyses / "mixed.toml"
    mixed.write_text('name = "m"\nanalysis = "hessian"\noutput = "m"\ncheckpoints = ["a.safetensors", "c.safetensors"]\n')
    with pytest.raises(ValueError, match=r"the checkpoints record a.safetensors \(digits\), c.safetensors \(adding\)"):
        load_recipe(mixed)


def _recipe_beside_a_checkpoint(tmp_path, checkpoint, name, text):
    """analyses/NAME holding ``text`` in a project whose models/tiny.safetensors is ``checkpoint``."""
    (tmp_path / "analyses").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.safetensors").write_bytes(checkpoint.read_bytes())
    path = tmp_path / "analyses" / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,key", [
    ('name = "s"\nanalysis = "spectra"\noutput = "s"\ncheckpoints = [', "invalid TOML"),
    (SPECTRA.replace("spectra\"\nout", "nonsense\"\nout"), "analysis"),
    (SPECTRA + 'checkpoints = ["models/missing.safetensors"]\n', "checkpoints"),
    (SPECTRA + 'checkpoints = ["models/tiny.safetensors"]\nlabels = "ab"\n', "labels"),
    (SPECTRA + 'checkpoints = ["models/tiny.safetensors", "models/tiny.safetensors"]\nlabels = ["x", "x"]\n', "labels"),
    (SPECTRA + 'checkpoints = ["models/tiny.safetensors", "models/tiny.safetensors"]\n', "checkpoints"),
    (SPECTRA + 'checkpoints = ["models/tiny.safetensors"]\nlabels = ["x", "y"]\n', "labels"),
    (SPECTRA + 'checkpoints = ["models/tiny.safetensors"]\nsplit_seed = 1.5\n', "split_seed"),
    (SPECTRA + 'checkpoints = ["models/tiny.safetensors"]\nseed = true\n', "seed"),
    (SPECTRA + 'checkpoints = ["models/tiny.safetensors"]\n[settings]\nbatches = 2\n', "settings.batches"),
    ('name = "h"\nanalysis = "hessian"\noutput = "h"\ntask = "digits"\ncheckpoints = ["models/tiny.safetensors"]\n'
     '[settings]\nbatches = -1\n', "settings.batches"),
    ('name = "h"\nanalysis = "hessian"\noutput = "h"\ntask = "nonsense"\ncheckpoints = ["models/tiny.safetensors"]\n', "task"),
    ('name = "l"\nanalysis = "landscape"\noutput = "l"\ntask = "digits"\ncheckpoints = ["models/tiny.safetensors"]\n'
     '[settings]\nsteps = {linspace = [-1.0, 1.0, 100000000]}\n', "settings.steps.linspace count"),
    (phase_recipe("p", "p").replace("gammas = [0.5, 1.0]", "gammas = {linspace = [0.0, 1.0, 10001]}")
     .replace("betas = [0.0, 1.0]", "betas = {linspace = [0.0, 1.0, 10001]}"), "settings"),
    (phase_recipe("p", "p").replace("radius = 0.1\n", ""), "settings.radius"),
    (phase_recipe("p", "p") + 'tests = ["warp-norm"]\n', "settings.tests"),
    ('name = "c"\nanalysis = "certificates"\noutput = "c"\ntask = "digits"\ncheckpoints = ["models/tiny.safetensors"]\n'
     '[settings]\ncertificates = ["ct-lmi", "warp"]\n', "settings.certificates"),
    (phase_recipe("p", "p").replace("gammas = [0.5, 1.0]", "gammas = [0.5]"), "settings.gammas"),
    ('name = "r"\nanalysis = "robustness"\noutput = "r"\ntask = "digits"\ncheckpoints = ["models/tiny.safetensors"]\n'
     '[settings.grid]\nwarp = [0.1]\n', "settings.grid.warp"),
    ('name = "c"\nanalysis = "certified-robustness"\noutput = "c"\ntask = "digits"\ncheckpoints = ["models/tiny.safetensors"]\n',
     "settings.radii"),
    ('name = "c"\nanalysis = "certified-robustness"\noutput = "c"\ntask = "digits"\ncheckpoints = ["models/tiny.safetensors"]\n'
     '[settings]\nradii = [0.1, -0.1]\n', "settings.radii"),
    ('name = "c"\nanalysis = "certified-robustness"\noutput = "c"\ntask = "digits"\ncheckpoints = ["models/tiny.safetensors"]\n'
     '[settings]\nradii = [0.1]\nattack = "fgsm"\n', "settings.attack"),
])
def test_bad_recipes_are_named_with_file_and_key(tmp_path, checkpoint, text, key):
    path = _recipe_beside_a_checkpoint(tmp_path, checkpoint, "bad.toml", text)
    with pytest.raises(ValueError) as error:
        recipes.load_recipe(path)
    assert str(error.value).startswith(f"{path}: ") and key in str(error.value)


def test_recipes_run_together_must_write_distinct_files(tmp_path):
    (tmp_path / "a.toml").write_text(phase_recipe("a", "x"))
    (tmp_path / "b.toml").write_text(phase_recipe("b", "x"))
    with pytest.raises(ValueError, match="b.toml: output"):
        recipes.check_recipe_set([recipes.load_recipe(tmp_path / "a.toml"), recipes.load_recipe(tmp_path / "b.toml")])


def test_the_committed_figures_are_a_report_make_run_may_replace():
    directory = OutputDirectory(REPO_ROOT / "figures", recipes.REPRODUCE_WRITER)
    directory._check()
    assert directory.previous is not None
    listed = {name for files in directory.previous["groups"].values() for name in files}
    assert listed == {p.name for p in (REPO_ROOT / "figures").iterdir()} - {MARKER}
    stems = {stem for path in recipes.find_recipes(REPO_ROOT / "analyses") for stem in recipes.load_recipe(path).stems()}
    assert {name.rsplit(".", 1)[0] for name in listed} <= stems


# Regression 3: checkpoints sharing a file stem, and checkpoints of different tasks.
def test_recipe_keys_models_by_path(tmp_path, digits_task):
    config = ModelConfig("lipschitz", 1, 8, 10)
    accuracies = []
    for run, seed in (("runA", 1), ("runB", 2)):
        model = build_model(config, seed=seed)
        (tmp_path / run).mkdir()
        save_checkpoint(tmp_path / run / "model.safetensors", model, {"task": digits_task.to_dict()})
        accuracies.append(accuracy_by_hand(model, digits_task.test.x[:100], digits_task.test.y[:100]))
    assert accuracies[0] != accuracies[1]
    recipes = tmp_path / "analyses"
    recipes.mkdir()
    (recipes / "r.toml").write_text('name = "r"\nanalysis = "robustness"\ntask = "digits"\noutput = "r"\n'
                                    'checkpoints = ["runA/model.safetensors", "runB/model.safetensors"]\n'
                                    '[settings]\nseeds = 1\nmax_samples = 100\n[settings.grid]\ngaussian = [0.0]\n')
    outcome = run_recipe(load_recipe(recipes / "r.toml"), tmp_path / "out", progress=False)
    assert outcome.warnings == ()
    rows = json.loads((tmp_path / "out" / "r.json").read_text())["rows"]
    assert [(r["model"], r["accuracy"]) for r in rows] == [("runA/model.safetensors", accuracies[0]),
                                                           ("runB/model.safetensors", accuracies[1])]
    (recipes / "dup.toml").write_text('name = "d"\nanalysis = "spectra"\noutput = "d"\n'
                                      'checkpoints = ["runA/model.safetensors", "runB/model.safetensors"]\nlabels = ["x", "x"]\n')
    with pytest.raises(ValueError, match="labels: duplicate labels \\['x'\\]"):
        load_recipe(recipes / "dup.toml")


def test_recipe_code_is_imported_only_when_it_runs_and_announced_or_refused(project, tmp_path, capsys):
    analyses = project / "analyses"
    marker = tmp_path / "imported"
    (analyses / "loud.py").write_text(f"open({str(marker)!r}, 'w').close()\n" + user_project.MODULE_SOURCE)
    recipe = analyses / "loud.toml"
    recipe.write_text('name = "loud"\nanalysis = "robustness"\noutput = "loud"\nmodel = "analyses/loud.py:build"\n'
                      'data = "data.npz"\n[settings]\ngrid = {gaussian = [0.0]}\nseeds = 1\n')
    load_recipe(recipe)
    assert not marker.exists()  # validating a recipe runs none of its code
    assert main(["reproduce", str(recipe), "--out", str(tmp_path / "refused"), "--no-code", "--quiet"]) == 2
    assert "no code allowed" in capsys.readouterr().err and not marker.exists()
    existing = tmp_path / "taken"
    existing.write_text("not a report directory")
    assert main(["reproduce", str(recipe), "--out", str(existing), "--quiet"]) == 2
    assert not marker.exists()  # an output location that is refused is refused before any code runs
    assert main(["reproduce", str(recipe), "--out", str(tmp_path / "ran"), "--quiet"]) == 0
    assert f"recipe loud runs code from {analyses / 'loud.py'}" in capsys.readouterr().err and marker.exists()
    (analyses / "loud.toml").unlink()
    (analyses / "loud.py").unlink()


def test_a_recipe_path_that_is_not_a_regular_file_is_refused_without_reading(tmp_path):
    import os

    fifo = tmp_path / "analyses" / "pipe.toml"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        load_recipe(fifo)


@pytest.mark.parametrize("text, needle", [
    ('name = "a"\nanalysis = ["spectra"]\noutput = "a"\n', "analysis: unknown analysis ['spectra']"),
    ("x = " + "[" * 4000 + "]" * 4000 + "\n", "invalid TOML"),
])
def test_a_recipe_of_the_wrong_shape_is_one_input_error(tmp_path, text, needle):
    path = tmp_path / "analyses" / "bad.toml"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(InputError, match=re.escape(needle)):
        load_recipe(path)


def test_a_certified_robustness_recipe_writes_accuracy_against_radius_and_the_bounds(tmp_path, checkpoint):
    path = _recipe_beside_a_checkpoint(
        tmp_path, checkpoint, "c.toml", 'name = "c"\nanalysis = "certified-robustness"\noutput = "c"\ntask = "digits"\n'
        'checkpoints = ["models/tiny.safetensors"]\n[settings]\nradii = [0.001, 0.1]\nattack_steps = 3\n'
        'seeds = 1\nmax_samples = 30\ncertificate_budget = 5.0\n')
    outcome = recipes.run_recipe(recipes.load_recipe(path), tmp_path / "out", progress=False)
    assert sorted(outcome.files) == ["c.csv", "c.json", "c.pdf", "c.png", "c_bounds.csv", "c_bounds.json"]
    rows = json.loads((tmp_path / "out" / "c.json").read_text())["rows"]
    assert [r["radius"] for r in rows] == [0.001, 0.1]
    assert all(r["certified_accuracy"] <= r["attack_accuracy"] for r in rows)
    bounds = json.loads((tmp_path / "out" / "c_bounds.json").read_text())["rows"]
    assert bounds[0]["holds"] and bounds[0]["looseness"] >= 1


def test_bad_task_options_are_named_with_the_recipe_file(tmp_path, checkpoint):
    path = _recipe_beside_a_checkpoint(
        tmp_path, checkpoint, "bad.toml", 'name = "h"\nanalysis = "hessian"\noutput = "h"\ntask = "adding"\n'
        'checkpoints = ["models/tiny.safetensors"]\n[task_options]\nlength = -3\n')
    with pytest.raises(ValueError) as error:
        recipes.load_recipe(path).load_task()
    assert str(error.value).startswith(f"{path}: task_options: ") and "length" in str(error.value)
