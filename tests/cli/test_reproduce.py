"""`lrnn reproduce`: every analysis of a tiny recipe set, only the recipes run are replaced, nothing is
written when a later recipe is bad or fails, recipe outputs stay inside --out."""
import json
import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from helpers import phase_recipe, snapshot
from lrnn_analysis import recipes
from lrnn_analysis.checkpoints import load_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.outputs import MARKER, atomic_write


@pytest.fixture
def fast_figures(monkeypatch):
    """Recipes draw an empty figure and save placeholder bytes: these tests are about where files go."""
    def save(figure, stem):
        paths = [Path(f"{stem}{suffix}") for suffix in recipes.plots.FIGURE_SUFFIXES]
        for path in paths:
            atomic_write(path, lambda tmp: tmp.write_bytes(b"figure"))
        return paths

    monkeypatch.setattr(recipes.plots, "plot_phase_diagram", lambda cells: Figure())
    monkeypatch.setattr(recipes.plots, "save_figure", save)


def test_reproduce_a_tiny_recipe(trained, tmp_path, capsys):
    (tmp_path / "analyses").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.safetensors").write_bytes(trained.read_bytes())
    recipes = {
        "spectra.toml": 'name = "spectra"\nanalysis = "spectra"\noutput = "spectra"\ncheckpoints = ["models/tiny.safetensors"]\n',
        "robust.toml": ('name = "robust"\nanalysis = "robustness"\ntask = "digits"\noutput = "robust"\nseed = 0\n'
                        'checkpoints = ["models/tiny.safetensors"]\nlabels = ["tiny"]\n'
                        '[settings]\nseeds = 2\nmax_samples = 50\n[settings.grid]\ngaussian = [0.0, 0.1]\n'),
        "phase.toml": ('name = "phase"\nanalysis = "phase-diagram"\noutput = "phase"\n'
                       '[settings]\nbetas = {linspace = [0.0, 1.0, 3]}\ngammas = [0.0, 0.5, 1.0]\n'
                       'radius = 0.1\neps = 0.1\ngamma_w = 0.0\n'),
        "hessian.toml": ('name = "hessian"\nanalysis = "hessian"\ntask = "digits"\noutput = "hessian"\n'
                         'checkpoints = ["models/tiny.safetensors"]\n[settings]\nbatch_size = 32\ntrace_matvecs = 20\n'
                         'density_probes = 2\ndensity_steps = 10\n'),
        "certs.toml": ('name = "certs"\nanalysis = "certificates"\ntask = "digits"\noutput = "certs"\n'
                       'checkpoints = ["models/tiny.safetensors"]\n'),
        "log.toml": 'name = "log"\nanalysis = "training-spectra"\noutput = "log"\ncheckpoints = ["models/tiny.safetensors"]\n',
        "land.toml": ('name = "land"\nanalysis = "landscape"\ntask = "digits"\noutput = "land"\n'
                      'checkpoints = ["models/tiny.safetensors"]\n[settings]\nbatch_size = 32\n'
                      'steps = {linspace = [-0.5, 0.5, 3]}\nplane_steps = [-0.5, 0.0, 0.5]\n'),
    }
    for name, text in recipes.items():
        (tmp_path / "analyses" / name).write_text(text)
    out = tmp_path / "figures"
    assert main(["reproduce", "--analyses-dir", str(tmp_path / "analyses"), "--out", str(out), "--quiet"]) == 0
    for stem in ("spectra", "robust", "phase", "hessian", "hessian_density", "certs", "log", "land", "land_plane"):
        for suffix in (".csv", ".json", ".png", ".pdf"):
            assert (out / f"{stem}{suffix}").exists(), f"{stem}{suffix}"
    provenance = json.loads((out / "robust.json").read_text())
    assert provenance["recipe"]["seed"] == 0 and "torch" in provenance["environment"]
    assert set(provenance["checkpoint_sha256"].values()) == {load_checkpoint(trained).sha256}
    printed = capsys.readouterr().out
    assert "recipe" in printed
    assert re.search(r"\d+ of 27 \(cell, test\) pairs certified \(9 cells x 3 tests\)", printed), printed
    (tmp_path / "analyses" / "bad.toml").write_text('name = "x"\nanalysis = "nonsense"\noutput = "x"\n')
    assert main(["reproduce", str(tmp_path / "analyses" / "bad.toml"), "--out", str(out)]) == 2


def test_reproduce_replaces_only_the_recipes_it_runs(tmp_path, fast_figures):
    (tmp_path / "analyses").mkdir()
    for name in ("a", "b"):
        (tmp_path / "analyses" / f"{name}.toml").write_text(phase_recipe(name, name))
    out = tmp_path / "figures"
    assert main(["reproduce", "--analyses-dir", str(tmp_path / "analyses"), "--out", str(out), "--quiet"]) == 0
    b_files = {k: v for k, v in snapshot(out).items() if k.startswith("b.")}
    assert sorted(b_files) == ["b.csv", "b.json", "b.pdf", "b.png"]
    (tmp_path / "analyses" / "a.toml").write_text(phase_recipe("a", "a", 'description = "again"\n'))
    assert main(["reproduce", str(tmp_path / "analyses" / "a.toml"), "--out", str(out), "--quiet"]) == 0
    assert {k: v for k, v in snapshot(out).items() if k.startswith("b.")} == b_files
    assert json.loads((out / "a.json").read_text())["recipe"]["description"] == "again"
    assert set(json.loads((out / MARKER).read_text())["groups"]) == {"a", "b"}


def test_reproduce_writes_nothing_when_a_later_recipe_is_bad_or_fails(tmp_path, monkeypatch, capsys, fast_figures):
    (tmp_path / "analyses").mkdir()
    (tmp_path / "analyses" / "a.toml").write_text(phase_recipe("a", "a"))
    (tmp_path / "analyses" / "b.toml").write_text(phase_recipe("b", "b").replace("radius = 0.1", "radius = -1"))
    out = tmp_path / "figures"
    assert main(["reproduce", "--analyses-dir", str(tmp_path / "analyses"), "--out", str(out), "--quiet"]) == 2
    assert "b.toml: settings.radius" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analyses"]

    (tmp_path / "analyses" / "b.toml").write_text(phase_recipe("b", "b"))
    assert main(["reproduce", "--analyses-dir", str(tmp_path / "analyses"), "--out", str(out), "--quiet"]) == 0
    before = snapshot(out)
    calls = []

    def fail_second(ctx):
        calls.append(ctx.recipe.name)
        if len(calls) == 2:
            raise ValueError("the second recipe failed")
        return original(ctx)

    original = recipes.ANALYSES["phase-diagram"]
    monkeypatch.setitem(recipes.ANALYSES, "phase-diagram", fail_second)
    (tmp_path / "analyses" / "a.toml").write_text(phase_recipe("a", "a", 'description = "new"\n'))
    # A recipe failing inside the computation is a bug (exit 3), not the user's input; nothing is written either way.
    assert main(["reproduce", "--analyses-dir", str(tmp_path / "analyses"), "--out", str(out), "--quiet"]) == 3
    assert calls == ["a", "b"] and snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analyses", "figures"]


@pytest.mark.parametrize("output", ["../../x", "/tmp/lrnn-abs", "", ".", "a/b", "..", ".hidden"])
def test_a_recipe_output_outside_out_is_refused(tmp_path, output, capsys):
    (tmp_path / "analyses").mkdir()
    (tmp_path / "analyses" / "a.toml").write_text(phase_recipe("a", output))
    out = tmp_path / "deep" / "figures"
    assert main(["reproduce", "--analyses-dir", str(tmp_path / "analyses"), "--out", str(out), "--quiet"]) == 2
    assert "a.toml: output" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analyses"] and not Path("/tmp/lrnn-abs.csv").exists()
