"""Every plot function renders from a small tidy table and saves PNG and PDF."""
import numpy as np
import pytest

from lrnn_analysis import plots


def _save(fig, tmp_path, name):
    paths = plots.save_figure(fig, tmp_path / name)
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)
    plots.plt.close(fig)


def test_every_plot_renders(tmp_path):
    eig = [{"model": m, "matrix": x, "re": r, "im": i} for m in ("a", "b") for x in ("A", "W") for r, i in ((-0.5, 1.0), (-0.2, -1.0))]
    regions = [{"model": "a", "method": "euler", "eps": 0.5, "re_min": -0.6, "re_max": -0.1, "im_max": 1.2},
               {"model": "b", "method": "rk2", "eps": 0.5, "re_min": -0.6, "re_max": -0.1, "im_max": 1.2}]
    _save(plots.plot_spectra(eig, regions), tmp_path, "spectra")
    cells = [{"beta_A": b, "gamma_A": g, "beta_W": 0.75, "gamma_W": 0.0, "test": t, "margin": g - 0.5 * b, "point": "grid"}
             for b in np.linspace(0, 1, 4) for g in np.linspace(0, 1, 4) for t in ("ct-norm", "euler-norm")]
    cells += [{"beta_A": 0.75, "gamma_A": 0.3, "beta_W": 0.75, "gamma_W": 0.0, "test": t, "margin": -0.1, "point": "user"}
              for t in ("ct-norm", "euler-norm")]
    _save(plots.plot_phase_diagram(cells), tmp_path, "phase")
    log = [{"model": m, "epoch": e, "alpha_A": -0.1 * e, "mu2_A": 0.1, "norm_W": 1 + e} for m in ("a", "b") for e in range(5)]
    _save(plots.plot_training_spectra(log), tmp_path, "training")
    hess = [{"model": m, "lambda_max": v, "lambda_min": -v / 10, "trace": 3 * v, "trace_ci95": 0.5} for m, v in (("a", 2.0), ("b", 5.0))]
    _save(plots.plot_hessian_summary(hess), tmp_path, "hessian")
    grid = np.linspace(-1, 5, 50)
    density = [{"model": m, "eigenvalue": x, "density": np.exp(-(x - s) ** 2)} for m, s in (("a", 0), ("b", 2)) for x in grid]
    _save(plots.plot_density(density), tmp_path, "density")
    summary = [{"model": m, "perturbation": k, "level": lv, "accuracy_mean": 0.9 - lv, "accuracy_ci95": 0.02}
               for m in ("a", "b") for k in ("gaussian", "gaussian-relative") for lv in (0.0, 0.1, 0.2)]
    _save(plots.plot_robustness(summary), tmp_path, "robustness")
    line = [{"model": m, "direction": d, "t": t, "loss": t ** 2 + 0.1} for m in ("a", "b") for d in ("top", "random")
            for t in np.linspace(-1, 1, 9)]
    _save(plots.plot_landscape_1d(line), tmp_path, "landscape1d")
    plane = [{"model": "a", "a": a, "b": b, "loss": a ** 2 + 2 * b ** 2 + 0.1} for a in np.linspace(-1, 1, 7) for b in np.linspace(-1, 1, 7)]
    _save(plots.plot_landscape_2d(plane), tmp_path, "landscape2d")


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
