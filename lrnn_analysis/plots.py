"""Figures drawn from tidy tables (sequences of dict rows or DataFrames), never from hidden state.

Every function returns a matplotlib Figure; :func:`save_figure` writes it as PNG and PDF.
One style throughout: seaborn's ``ticks`` theme, a colour-blind palette, and for print
in grey scale every series also differs by marker and line style (bars by hatch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .io import atomic_write  # noqa: E402
from .stability.spectra import STABILITY_POLYNOMIALS, stability_polynomial  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
DASHES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")

Table = Sequence[Mapping[str, Any]] | pd.DataFrame


def _frame(table: Table, required: Iterable[str]) -> pd.DataFrame:
    frame = table.copy() if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))
    missing = [c for c in required if c not in frame.columns]
    if frame.empty or missing:
        raise ValueError(f"table needs rows with columns {list(required)}; missing {missing or 'rows'}")
    return frame


def _style() -> None:
    sns.set_theme(style="ticks", context="paper", palette="colorblind", font_scale=1.1)
    plt.rcParams.update({"figure.dpi": 100, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def _series_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    colours = sns.color_palette("colorblind", len(names))
    return {name: {"color": colours[i], "marker": MARKERS[i % len(MARKERS)], "linestyle": DASHES[i % len(DASHES)]}
            for i, name in enumerate(names)}


def _panels(count: int, width: float = 4.2, height: float = 3.4, ncols: int | None = None) -> tuple[Figure, np.ndarray]:
    ncols = ncols or (2 if count == 4 else min(count, 3))
    nrows = int(np.ceil(count / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes


def save_figure(fig: Figure, stem: str | Path) -> list[Path]:
    """Write ``stem``.png and ``stem``.pdf atomically; returns both paths."""
    paths = []
    for suffix in (".png", ".pdf"):
        path = Path(stem).with_suffix(suffix)
        paths.append(atomic_write(path, lambda tmp, s=suffix: fig.savefig(tmp, format=s[1:], dpi=150)))
    return paths


def stability_region_mask(method: str, eps: float, re: np.ndarray, im: np.ndarray) -> np.ndarray:
    """|R(eps lambda)| on a grid of lambda = re + i im (the region is where it is < 1)."""
    return np.abs(stability_polynomial(method, eps * (re + 1j * im)))


def plot_spectra(eigenvalues: Table, regions: Table) -> Figure:
    """Eigenvalues of A and W per model in the complex plane.

    ``eigenvalues``: rows (model, matrix in {A, W}, re, im). ``regions``: one row per model
    (model, method, eps, re_min, re_max, im_max) with the Bendixson box of A; for a
    discretized model the scheme's stability region {lambda : |R(eps lambda)| < 1} is
    shaded (Euler: the disc of centre -1/eps and radius 1/eps).
    """
    _style()
    eig = _frame(eigenvalues, ["model", "matrix", "re", "im"])
    reg = _frame(regions, ["model", "method", "eps", "re_min", "re_max", "im_max"]).set_index("model")
    models = list(dict.fromkeys(eig["model"]))
    fig, axes = _panels(len(models), 4.4, 4.0)
    marker = {"A": dict(marker="o", facecolors="none", edgecolors="C0", label="eig(A)"),
              "W": dict(marker="x", color="C3", label="eig(W)")}
    for ax, model in zip(axes.flat, models):
        sub = eig[eig["model"] == model]
        for matrix, style in marker.items():
            points = sub[sub["matrix"] == matrix]
            if len(points):
                ax.scatter(points["re"], points["im"], s=18, linewidths=0.9, zorder=3, **style)
        span_re = np.r_[sub["re"].to_numpy(), 0.0]
        span_im = np.r_[sub["im"].to_numpy(), 0.0]
        if model in reg.index:
            r = reg.loc[model]
            ax.add_patch(Rectangle((r["re_min"], -r["im_max"]), r["re_max"] - r["re_min"], 2 * r["im_max"], fill=False,
                                   linestyle="--", edgecolor="0.3", linewidth=1.0, label="Bendixson box of A"))
            span_re = np.r_[span_re, r["re_min"], r["re_max"]]
            span_im = np.r_[span_im, -r["im_max"], r["im_max"]]
            if r["method"] in STABILITY_POLYNOMIALS and pd.notna(r["eps"]):
                extent = 1.5 * max(np.ptp(span_re), np.ptp(span_im), 1e-3)
                centre = 0.5 * (span_re.min() + span_re.max())
                grid_re, grid_im = np.meshgrid(np.linspace(centre - extent, centre + extent, 400),
                                               np.linspace(-extent, extent, 400))
                modulus = stability_region_mask(r["method"], float(r["eps"]), grid_re, grid_im)
                ax.contourf(grid_re, grid_im, modulus, levels=[0, 1], colors=["0.85"], alpha=0.6, zorder=0)
                ax.contour(grid_re, grid_im, modulus, levels=[1], colors=["0.35"], linewidths=0.8, zorder=1)
                ax.plot([], [], color="0.35", linewidth=0.8, label=f"{r['method']} stability region (eps={float(r['eps']):g})")
        ax.axvline(0.0, color="k", linewidth=0.8, label="imaginary axis")
        half_re = 0.55 * max(np.ptp(span_re), 0.25 * np.ptp(span_im), 1e-3)
        half_im = 0.55 * max(np.ptp(span_im), 0.25 * np.ptp(span_re), 1e-3)
        middle_re, middle_im = 0.5 * (span_re.min() + span_re.max()), 0.5 * (span_im.min() + span_im.max())
        ax.set_xlim(middle_re - half_re, middle_re + half_re)
        ax.set_ylim(middle_im - half_im, middle_im + half_im)
        ax.set_title(model)
        ax.set_xlabel("Re λ")
        ax.set_ylabel("Im λ")
    rows = _shared_legend(fig, axes)
    fig.tight_layout(rect=(0, _legend_fraction(fig, rows), 1, 1))
    return fig


def _shared_legend(fig: Figure, axes: np.ndarray) -> int:
    """One legend below the panels with every distinct label of every panel."""
    entries: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=min(len(entries), 4), frameon=False)
    return int(np.ceil(len(entries) / 4))


def _legend_fraction(fig: Figure, rows: int) -> float:
    """Fraction of the figure's height that ``rows`` legend rows below the panels need."""
    return (0.25 * rows + 0.15) / fig.get_figheight()


def plot_phase_diagram(cells: Table) -> Figure:
    """Margin of each parameterization test over (beta_A, gamma_A); the certified region
    (margin > 0) is outlined and hatched, and rows with ``point`` = "user" are starred.
    Rows: (beta_A, gamma_A, test, margin), optionally beta_W, gamma_W (named in the titles) and point."""
    _style()
    frame = _frame(cells, ["beta_A", "gamma_A", "test", "margin"])
    is_user = frame["point"] == "user" if "point" in frame.columns else np.zeros(len(frame), dtype=bool)
    user, frame = frame[is_user], frame[~is_user]
    tests = list(dict.fromkeys(frame["test"]))
    fig, axes = _panels(len(tests), 4.4, 3.8)
    for ax, test in zip(axes.flat, tests):
        rows = frame[frame["test"] == test]
        grid = rows.pivot_table(index="gamma_A", columns="beta_A", values="margin", dropna=False)
        limit = float(np.nanmax(np.abs(grid.to_numpy()))) if np.isfinite(grid.to_numpy()).any() else 1.0
        betas, gammas = grid.columns.to_numpy(float), grid.index.to_numpy(float)
        mesh = ax.pcolormesh(betas, gammas, grid.to_numpy(), cmap="RdBu", vmin=-(limit or 1.0), vmax=limit or 1.0,
                             shading="nearest")
        if np.nanmax(grid.to_numpy()) > 0 > np.nanmin(grid.to_numpy()):
            ax.contour(betas, gammas, grid.to_numpy(), levels=[0.0], colors="k", linewidths=1.5)
        ax.contourf(betas, gammas, grid.to_numpy(), levels=[0.0, np.inf], colors="none", hatches=["//"])
        mine = user[user["test"] == test]
        if len(mine):
            ax.plot(mine["beta_A"], mine["gamma_A"], marker="*", markersize=14, color="gold", markeredgecolor="k",
                    linestyle="none", label="your (β_A, γ_A)")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(f"{test}: certified where margin > 0 (hatched)\n{_w_description(rows)}", fontsize=9)
        ax.set_xlabel("β_A")
        ax.set_ylabel("γ_A")
        fig.colorbar(mesh, ax=ax, label="margin")
    fig.tight_layout()
    return fig


def _w_description(rows: pd.DataFrame) -> str:
    """How W's (beta_W, gamma_W) relate to the axes: shared with A's, or held fixed."""
    parts = []
    for name, axis, symbol in (("beta_W", "beta_A", "β"), ("gamma_W", "gamma_A", "γ")):
        if name not in rows.columns:
            continue
        values = rows[name].unique()
        if np.array_equal(rows[name].to_numpy(), rows[axis].to_numpy()):
            parts.append(f"{symbol}_W = {symbol}_A")
        elif len(values) == 1:
            parts.append(f"{symbol}_W = {values[0]:g}")
    return ", ".join(parts) if parts else "W's parameters not recorded"


def plot_training_spectra(log: Table, quantities: Sequence[str] = ("alpha_A", "mu2_A", "norm_W")) -> Figure:
    """Spectral quantities per epoch, one line per model. Rows: (model, epoch, <quantities>), e.g. a
    checkpoint's training log or :class:`lrnn_analysis.monitor.StabilityMonitor` rows (also ``lambda_max``)."""
    _style()
    frame = _frame(log, ["model", "epoch"])
    quantities = [q for q in quantities if q in frame.columns and frame[q].notna().any()]
    if not quantities:
        raise ValueError("the log has none of the requested spectral quantities")
    labels = {"alpha_A": "spectral abscissa α(A)", "mu2_A": "log-norm μ₂(A)", "norm_A": "‖A‖₂",
              "alpha_W": "spectral abscissa α(W)", "mu2_W": "log-norm μ₂(W)", "norm_W": "‖W‖₂",
              "lambda_max": "Hessian λ_max"}
    models = list(dict.fromkeys(frame["model"]))
    styles = _series_styles(models)
    fig, axes = _panels(len(quantities), 4.2, 3.2)
    for ax, quantity in zip(axes.flat, quantities):
        for model in models:
            sub = frame[(frame["model"] == model) & frame[quantity].notna()]
            every = max(1, len(sub) // 10)
            ax.plot(sub["epoch"], sub[quantity], label=model, markevery=every, markersize=4, **styles[model])
        if quantity.startswith(("alpha", "mu2")):
            ax.axhline(0.0, color="k", linewidth=0.7)
        ax.set_xlabel("epoch")
        ax.set_ylabel(labels.get(quantity, quantity))
    _legend_below(fig, axes.flat[0], len(models))
    return fig


def _legend_below(fig: Figure, ax: plt.Axes, count: int) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(count, 4), frameon=False)
    fig.tight_layout(rect=(0, _legend_fraction(fig, int(np.ceil(count / 4))), 1, 1))


def plot_hessian_summary(rows: Table) -> Figure:
    """Top and bottom Hessian eigenvalues and the trace with its 95% CI, one bar per model.
    Rows: (model, lambda_max, lambda_min, trace, trace_ci95)."""
    _style()
    frame = _frame(rows, ["model", "lambda_max", "lambda_min", "trace", "trace_ci95"])
    models = list(frame["model"])
    colours = sns.color_palette("colorblind", len(models))
    panels = [("lambda_max", None, "top eigenvalue λ_max"), ("lambda_min", None, "bottom eigenvalue λ_min"),
              ("trace", "trace_ci95", "trace (95% CI)")]
    fig, axes = _panels(3, 3.8, 3.6)
    positions = np.arange(len(models))
    for ax, (column, error, title) in zip(axes.flat, panels):
        bars = ax.bar(positions, frame[column], yerr=frame[error] if error else None, capsize=4,
                      color=colours, edgecolor="k", linewidth=0.6)
        for bar, hatch in zip(bars, HATCHES * 3):
            bar.set_hatch(hatch)
        values = frame[column].to_numpy(float)
        if np.all(values > 0) and values.max() > 50 * values.min():
            ax.set_yscale("log")
            title += " (log scale)"
        else:
            ax.axhline(0.0, color="k", linewidth=0.7)
        ax.set_xticks(positions, models, rotation=35, ha="right")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_certified_accuracy(rows: Table) -> Figure:
    """Test accuracy and certified contraction per model: one row per model with
    (model, test_accuracy, certified, rate, certificate); rate is the certified factor per
    step (None where nothing is certified, drawn as a hatched "not certified" bar)."""
    _style()
    frame = _frame(rows, ["model", "test_accuracy", "certified", "rate", "certificate"])
    models = list(frame["model"])
    positions = np.arange(len(models))
    certified = frame["certified"].astype(bool).to_numpy()
    colours = ["tab:green" if c else "tab:gray" for c in certified]
    fig, axes = _panels(2, 4.6, 3.8)
    ax = axes.flat[0]
    ax.bar(positions, frame["test_accuracy"].to_numpy(float), color=colours, edgecolor="k", linewidth=0.6)
    for x, value in zip(positions, frame["test_accuracy"].to_numpy(float)):
        ax.text(x, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("test accuracy (green: certified)", fontsize=10)
    ax.set_xticks(positions, models, rotation=35, ha="right")
    ax = axes.flat[1]
    margins = [1.0 - float(r) if c and r is not None and np.isfinite(float(r)) else np.nan
               for r, c in zip(frame["rate"], certified)]
    finite = [m for m in margins if np.isfinite(m) and m > 0]
    floor = min(finite) / 10 if finite else 1e-6
    for x, margin, label in zip(positions, margins, frame["certificate"]):
        if np.isfinite(margin) and margin > 0:
            ax.bar(x, margin, color="tab:green", edgecolor="k", linewidth=0.6)
            ax.text(x, margin, f"{1 - margin:.5f}\n{label}", ha="center", va="bottom", fontsize=7)
        else:
            ax.bar(x, floor, color="white", edgecolor="k", hatch="//", linewidth=0.6)
            ax.text(x, floor, "not\ncertified", ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 20 * max(finite + [floor]))
    ax.set_title("certified contraction: 1 - rate per step (log)", fontsize=10)
    ax.set_xticks(positions, models, rotation=35, ha="right")
    fig.tight_layout()
    return fig


def plot_density(rows: Table) -> Figure:
    """Smoothed Hessian spectral densities (stochastic Lanczos quadrature) on a log scale,
    models overlaid. Rows: (model, eigenvalue, density)."""
    _style()
    frame = _frame(rows, ["model", "eigenvalue", "density"])
    models = list(dict.fromkeys(frame["model"]))
    styles = _series_styles(models)
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    floor = frame.loc[frame["density"] > 0, "density"].max() * 1e-8
    for model in models:
        sub = frame[frame["model"] == model]
        style = dict(styles[model])
        style.pop("marker")
        ax.plot(sub["eigenvalue"], np.maximum(sub["density"], floor), label=model, linewidth=1.4, **style)
    ax.set_yscale("log")
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def _facet_lines(frame: pd.DataFrame, panel: str, x: str, y: str, xlabel: Mapping[str, str] | str, ylabel: str,
                 band: str | None = None) -> Figure:
    """One panel per value of ``panel``, one styled line per model (with a +-``band`` shade)."""
    panels = list(dict.fromkeys(frame[panel]))
    models = list(dict.fromkeys(frame["model"]))
    styles = _series_styles(models)
    fig, axes = _panels(len(panels), 4.0, 3.3)
    for ax, value in zip(axes.flat, panels):
        for model in models:
            sub = frame[(frame[panel] == value) & (frame["model"] == model)].sort_values(x)
            if sub.empty:
                continue
            mean = sub[y].to_numpy(float)
            ax.plot(sub[x], mean, label=model, markersize=4, markevery=max(1, len(sub) // 8), **styles[model])
            if band is not None:
                half = sub[band].fillna(0).to_numpy(float)
                ax.fill_between(sub[x], mean - half, mean + half, color=styles[model]["color"], alpha=0.18, linewidth=0)
        ax.set_xlabel(xlabel if isinstance(xlabel, str) else xlabel.get(value, value))
        ax.set_ylabel(ylabel)
        ax.set_title(str(value), fontsize=10)
    _legend_below(fig, axes.flat[0], len(models))
    return fig


PERTURBATION_UNITS = {"gaussian": "input noise σ", "salt-pepper": "flip probability p", "occlusion": "fraction of steps occluded",
                      "fgsm": "FGSM budget ε", "gaussian-relative": "relative parameter noise σ",
                      "hessian-direction": "step t along Hessian eigenvectors"}


def plot_robustness(summary: Table) -> Figure:
    """Accuracy against perturbation level, one panel per perturbation kind, one line per
    model with its 95% CI band over seeds. Rows: (model, perturbation, level, accuracy_mean, accuracy_ci95)."""
    _style()
    frame = _frame(summary, ["model", "perturbation", "level", "accuracy_mean", "accuracy_ci95"])
    return _facet_lines(frame, "perturbation", "level", "accuracy_mean", PERTURBATION_UNITS, "test accuracy", band="accuracy_ci95")


def plot_landscape_1d(rows: Table) -> Figure:
    """Loss along 1-D lines through the trained parameters. Rows: (model, direction, t, loss)."""
    _style()
    frame = _frame(rows, ["model", "direction", "t", "loss"])
    return _facet_lines(frame, "direction", "t", "loss", "step t along direction", "loss")


def plot_landscape_2d(rows: Table) -> Figure:
    """Loss on a plane through the trained parameters, one panel per model. Rows: (model, a, b, loss)."""
    _style()
    frame = _frame(rows, ["model", "a", "b", "loss"])
    models = list(dict.fromkeys(frame["model"]))
    fig, axes = _panels(len(models), 4.2, 3.7)
    for ax, model in zip(axes.flat, models):
        grid = frame[frame["model"] == model].pivot_table(index="b", columns="a", values="loss")
        a, b, z = grid.columns.to_numpy(float), grid.index.to_numpy(float), grid.to_numpy()
        filled = ax.contourf(a, b, np.log10(np.maximum(z, 1e-12)), levels=14, cmap="viridis")
        lines = ax.contour(a, b, np.log10(np.maximum(z, 1e-12)), levels=7, colors="k", linewidths=0.6)
        ax.clabel(lines, fontsize=7, fmt="%.1f")
        ax.plot([0], [0], marker="*", color="w", markeredgecolor="k", markersize=11)
        fig.colorbar(filled, ax=ax, label="log10 loss")
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
        ax.set_title(model, fontsize=10)
    fig.tight_layout()
    return fig
