"""Every plot function renders from a small tidy table, takes the customisation arguments, leaves
the user's rcParams alone, and the writers embed TrueType fonts."""
import copy

import matplotlib as mpl
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from lrnn_analysis import plots
from lrnn_analysis.robustness import KINDS


def _eigenvalues():
    eig = [{"model": m, "matrix": x, "re": r, "im": i}
           for m in ("a", "b") for x in ("A", "W") for r, i in ((-0.5, 1.0), (-0.2, -1.0))]
    regions = [{"model": "a", "method": "euler", "eps": 0.5, "re_min": -0.6, "re_max": -0.1, "im_max": 1.2},
               {"model": "b", "method": "rk2", "eps": 0.5, "re_min": -0.6, "re_max": -0.1, "im_max": 1.2}]
    return eig, regions


def _cells():
    cells = [{"beta_A": b, "gamma_A": g, "beta_W": 0.75, "gamma_W": 0.0, "test": t, "margin": g - 0.5 * b, "point": "grid"}
             for b in np.linspace(0, 1, 4) for g in np.linspace(0, 1, 4) for t in ("ct-norm", "euler-norm")]
    return cells + [{"beta_A": 0.75, "gamma_A": 0.3, "beta_W": 0.75, "gamma_W": 0.0, "test": t, "margin": -0.1, "point": "user"}
                    for t in ("ct-norm", "euler-norm")]


def _summary(mean=0.9, half=0.02):
    return [{"model": m, "perturbation": k, "level": lv, "accuracy_mean": mean - lv, "accuracy_ci95": half}
            for m in ("a", "b") for k in ("gaussian", "gaussian-relative") for lv in (0.0, 0.1, 0.2)]


def _certified():
    return [{"model": "a", "test_accuracy": 0.95, "certified": True, "rate": 0.999, "certificate": "euler-lmi"},
            {"model": "b", "test_accuracy": 0.97, "certified": False, "rate": None, "certificate": None}]


def _against_radius():
    return [{"model": m, "radius": r, "certified_accuracy": None if m == "b" else 0.9 - r, "attack_accuracy": 0.95 - r / 2,
             "noise_accuracy": 0.96} for m in ("a", "b") for r in (0.01, 0.1, 0.5)]


AXES_LEVEL = ("density",)  # these return the Axes they drew into; the others (facets) return the Figure
# name -> (draw(**options), a series key, a panel key, number of panels)
CASES = {
    "spectra": (lambda **o: plots.plot_spectra(*_eigenvalues(), **o), "W", "a", 2),
    "phase_diagram": (lambda **o: plots.plot_phase_diagram(_cells(), **o), "user", "ct-norm", 2),
    "training_spectra": (lambda **o: plots.plot_training_spectra(
        [{"model": m, "epoch": e, "alpha_A": -0.1 * e, "mu2_A": 0.1, "norm_W": 1 + e} for m in ("a", "b") for e in range(5)],
        **o), "a", "mu2_A", 3),
    "hessian_summary": (lambda **o: plots.plot_hessian_summary(
        [{"model": m, "lambda_max": v, "lambda_min": -v / 10, "trace": 3 * v, "trace_ci95": 0.5}
         for m, v in (("a", 2.0), ("b", 5.0))],
        **o), "a", "trace", 3),
    "certified_accuracy": (lambda **o: plots.plot_certified_accuracy(_certified(), **o), "a", "certified", 2),
    "density": (lambda **o: plots.plot_density(
        [{"model": m, "eigenvalue": x, "density": np.exp(-(x - s) ** 2)} for m, s in (("a", 0), ("b", 2))
         for x in np.linspace(-1, 5, 50)], **o), "a", "density", 1),
    "robustness": (lambda **o: plots.plot_robustness(_summary(), **o), "a", "gaussian", 2),
    "certified_robustness": (lambda **o: plots.plot_certified_robustness(_against_radius(), **o), "a", "radius", 1),
    "landscape_1d": (lambda **o: plots.plot_landscape_1d(
        [{"model": m, "direction": d, "t": t, "loss": t ** 2 + 0.1} for m in ("a", "b") for d in ("top", "random")
         for t in np.linspace(-1, 1, 9)], **o), "a", "top", 2),
    "landscape_2d": (lambda **o: plots.plot_landscape_2d(
        [{"model": "a", "a": a, "b": b, "loss": a ** 2 + 2 * b ** 2 + 0.1} for a in np.linspace(-1, 1, 7)
         for b in np.linspace(-1, 1, 7)], **o), "trained", "a", 1),
}


def _texts(figure):
    """Every title, axis label and legend text of a figure."""
    texts = []
    for ax in figure.axes:
        texts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        texts += [t.get_text() for t in ax.get_xticklabels()]
        if ax.get_legend() is not None:
            texts += [t.get_text() for t in ax.get_legend().get_texts()]
    for legend in figure.legends:
        texts += [t.get_text() for t in legend.get_texts()]
    return texts


def _rcparams():
    return copy.deepcopy(dict(mpl.rcParams))


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_plot_takes_the_customisation_arguments_and_keeps_rcparams(name, tmp_path):
    draw, series, panel, count = CASES[name]
    with mpl.rc_context({"font.family": "serif", "axes.titleweight": "normal", "pdf.fonttype": 3}):
        before = _rcparams()
        figure = draw(labels={series: "Series X"}, colors={series: "#123456"}, titles={panel: "Panel Y"}, figsize=(5.0, 3.0))
        figure = figure.figure if isinstance(figure, Axes) else figure  # an axes-level function returns its Axes
        assert isinstance(figure, Figure) and tuple(figure.get_size_inches()) == (5.0, 3.0)
        assert "Series X" in _texts(figure) and "Panel Y" in _texts(figure)
        paths = plots.save_figure(figure, tmp_path / name)
        assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)
        assert _rcparams() == before

        mine = Figure(figsize=(6, 3))
        axes = list(mine.subplots(1, count, squeeze=False).flat)
        drawn = draw(ax=axes[0]) if count == 1 else draw(axes=axes)
        assert drawn is (axes[0] if name in AXES_LEVEL else mine) and _rcparams() == before
        assert any(ax.get_legend() is not None for ax in axes) or name in ("hessian_summary", "certified_accuracy")
        if count > 1:
            with pytest.raises(ValueError, match=f"draws {count} panel"):
                draw(ax=axes[0])
        with pytest.raises(ValueError, match="figsize"):
            draw(ax=axes[0], figsize=(3, 3)) if count == 1 else draw(axes=axes, figsize=(3, 3))
        with pytest.raises(ValueError, match="unknown key"):
            draw(labels={"no such series": "x"})
        with pytest.raises(ValueError, match="unknown key"):
            draw(titles={"no such panel": "x"})
        with pytest.raises(ValueError, match="colour"):
            draw(colors={series: "not-a-colour"})
        assert _rcparams() == before
        assert mpl.rcParams["font.family"] == ["serif"]


def test_a_line_and_its_band_take_one_colour_and_bands_stay_in_0_1():
    summary = [{"model": m, "perturbation": "gaussian", "level": lv, "accuracy_mean": acc, "accuracy_ci95": 0.1}
               for m, acc in (("a", 0.98), ("b", 0.04)) for lv in (0.0, 0.1)]
    figure = plots.plot_robustness(summary, colors={"a": "red"})
    ax = figure.axes[0]
    lines = {line.get_gid(): line for line in ax.get_lines()}
    bands = {band.get_gid(): band for band in ax.collections}
    assert to_rgba(lines["line:a"].get_color()) == to_rgba("red")
    assert to_rgba(bands["band:a"].get_facecolor()[0])[:3] == to_rgba("red")[:3]
    assert to_rgba(lines["line:b"].get_color()) == to_rgba(bands["band:b"].get_facecolor()[0])[:3] + (1.0,)
    assert to_rgba(lines["line:b"].get_color()) != to_rgba("red")
    for band in bands.values():
        y = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
        assert y.min() >= 0.0 and y.max() <= 1.0
    top = np.concatenate([p.vertices[:, 1] for p in bands["band:a"].get_paths()])
    bottom = np.concatenate([p.vertices[:, 1] for p in bands["band:b"].get_paths()])
    assert top.max() == 1.0 and bottom.min() == 0.0


def test_certified_accuracy_draws_each_model_in_its_colour_and_marks_the_uncertified():
    figure = plots.plot_certified_accuracy(_certified(), colors={"a": "#123456", "b": "#abcdef"})
    accuracy, certified = figure.axes
    assert [to_rgba(p.get_facecolor()) for p in accuracy.patches] == [to_rgba("#123456"), to_rgba("#abcdef")]
    assert [round(p.get_height(), 6) for p in accuracy.patches] == [0.95, 0.97]
    margin, floor = certified.patches
    assert to_rgba(margin.get_facecolor()) == to_rgba("#123456") and np.isclose(margin.get_height(), 1e-3)
    assert to_rgba(floor.get_facecolor()) == to_rgba("white") and floor.get_hatch() == "//"
    texts = [t.get_text() for t in certified.texts]
    assert texts == ["0.99900\neuler-lmi", "not\ncertified"] and certified.get_yscale() == "log"


def test_robustness_panels_have_readable_titles_and_units():
    figure = plots.plot_robustness(_summary())
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["Gaussian input noise", "Relative Gaussian parameter noise"]
    assert all("(" in ax.get_xlabel() for ax in figure.axes[:2])
    assert set(plots.PERTURBATION_TITLES) == set(KINDS) == set(plots.PERTURBATION_UNITS)


def test_writers_embed_truetype_fonts_and_refuse_unknown_suffixes(tmp_path):
    figure = plots.plot_robustness(_summary())
    with mpl.rc_context({"pdf.fonttype": 3, "ps.fonttype": 3}):
        pdf = plots.write_figure(figure, tmp_path / "f.pdf").read_bytes()
    assert b"/FontFile2" in pdf and b"/Subtype /Type3" not in pdf
    assert plots.write_figure(figure, tmp_path / "f.svg").read_bytes().lstrip().startswith(b"<?xml")
    assert plots.write_figure(figure, tmp_path / "f.PNG").read_bytes().startswith(b"\x89PNG")
    for bad in ("f.jpg", "f", "f.pdf.txt"):
        with pytest.raises(ValueError, match="suffix"):
            plots.write_figure(figure, tmp_path / bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.PNG", "f.pdf", "f.svg"]


def test_euler_stability_region_is_the_disc():
    re, im = np.meshgrid(np.linspace(-5, 1, 61), np.linspace(-3, 3, 61))
    inside = plots.stability_region_mask("euler", 0.5, re, im) < 1
    distance = np.hypot(re + 2.0, im)
    clear = np.abs(distance - 2.0) > 1e-9
    np.testing.assert_array_equal(inside[clear], distance[clear] < 2.0)


def test_missing_columns_are_a_clear_error():
    with pytest.raises(ValueError, match="missing"):
        plots.plot_robustness([{"model": "a"}])
    with pytest.raises(ValueError):
        plots.plot_density([])


def test_robustness_of_a_regression_task_draws_the_loss():
    summary = [{**row, "accuracy_mean": None, "accuracy_ci95": None, "loss_mean": 0.01 + row["level"], "loss_ci95": 0.05}
               for row in _summary()]
    with pytest.raises(ValueError, match="metric='loss'"):
        plots.plot_robustness(summary)
    figure = plots.plot_robustness(summary, "loss")
    assert figure.axes[0].get_ylabel() == "test loss"
    band = next(c for c in figure.axes[0].collections if c.get_gid() == "band:a")
    assert np.concatenate([p.vertices[:, 1] for p in band.get_paths()]).min() == 0.0


def test_robustness_panels_share_one_y_axis_and_density_draws_no_floor():
    figure = plots.plot_robustness(_summary())
    limits = {tuple(round(v, 12) for v in ax.get_ylim()) for ax in figure.axes if ax.has_data()}
    assert len(limits) == 1
    rows = [{"model": "a", "eigenvalue": float(x), "density": float(np.exp(-x * x))} for x in np.linspace(-10, 10, 81)]
    ax = plots.plot_density(rows)
    drawn = ax.get_lines()[0].get_ydata()
    assert np.isnan(drawn).sum() > 0 and np.nanmin(drawn) >= 1e-8  # the tails below 1e-8 of the peak are left out


def test_certified_robustness_draws_three_styles_per_model_and_no_certified_line_without_a_bound():
    figure = plots.plot_certified_robustness(_against_radius())
    lines = figure.axes[0].get_lines()
    assert sorted(line.get_linestyle() for line in lines) == ["-", "--", "--", ":", ":"]  # model b: no bound, no solid line
    assert "b (no bound)" in _texts(figure) and figure.axes[0].get_xscale() == "log"
