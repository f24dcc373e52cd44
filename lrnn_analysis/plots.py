"""Figures drawn from tidy tables (sequences of dict rows or DataFrames), never from hidden state.

Every plot function takes its table(s), then these keyword-only arguments, and returns the
:class:`~matplotlib.figure.Figure` it drew on:

* ``labels``  ``{series key: legend label}``; ``colors`` ``{series key: matplotlib colour}``.
  A series is one model (its ``model`` value) except where a function says otherwise; its
  line, markers, band and bars all take the one colour resolved for it.
* ``titles``  ``{panel key: title}`` (each function names its panel keys; ``""`` drops a title).
* ``figsize`` ``(width, height)`` in inches of the figure the function creates.
* ``ax``      draw a one-panel drawing into this Axes; multi-panel functions take ``axes``
  instead (or too): a sequence with one Axes per panel, in panel order. With ``ax``/``axes``
  the function draws into your figure with your rcParams and puts its legend inside the last
  axes; ``figsize`` is then an error.

An unknown key in ``labels``, ``colors`` or ``titles`` is an error, never ignored.

Figures the functions create use the toolkit's style (seaborn's ``ticks``/``paper`` settings,
a colour-blind palette; for grey-scale print every series also differs by marker and line
style, bars by hatch), applied inside :func:`style` (a ``matplotlib.rc_context``): nothing
changes your ``matplotlib.rcParams``, and your ``font.family`` is used. The figures are not
registered with pyplot (display them in a notebook, save them with :func:`save_figure` or
:func:`write_figure`, or draw into your own axes to use ``plt.show()``). The writers embed
TrueType fonts in PDF and PostScript (``pdf.fonttype = ps.fonttype = 42``).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.colors import is_color_like, to_rgba
from matplotlib.figure import Figure
from matplotlib.legend_handler import HandlerTuple
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import Formatter

from .errors import InputError
from .outputs import atomic_write
from .stability.spectra import STABILITY_POLYNOMIALS, stability_polynomial

__all__ = ["FIGURE_SUFFIXES", "PERTURBATION_TITLES", "PERTURBATION_UNITS", "figure_format",
    "plot_certified_accuracy", "plot_density", "plot_hessian_summary", "plot_landscape_1d", "plot_landscape_2d",
    "plot_phase_diagram", "plot_robustness", "plot_spectra", "plot_training_spectra", "save_figure",
    "stability_region_mask", "style", "write_figure"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_DASHES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
_HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")
_PALETTE = tuple(sns.color_palette("colorblind"))

Table = Sequence[Mapping[str, Any]] | pd.DataFrame

# Display title and axis label (with its unit) of each perturbation kind, shared by every figure.
PERTURBATION_TITLES = {
    "gaussian": "Gaussian input noise",
    "salt-pepper": "Salt-and-pepper noise",
    "occlusion": "Occlusion",
    "fgsm": "FGSM",
    "gaussian-relative": "Relative Gaussian parameter noise",
    "hessian-direction": "Along top Hessian eigenvectors",
}
PERTURBATION_UNITS = {
    "gaussian": "noise std σ (input units)",
    "salt-pepper": "replacement probability p",
    "occlusion": "fraction of time steps set to zero",
    "fgsm": "budget ε (input units, per value)",
    "gaussian-relative": "noise std σ (× RMS of each tensor)",
    "hessian-direction": "step t (parameter-space ℓ₂ distance)",
}
_TEST_TITLES = {
    "ct-norm": "Continuous time (ct-norm)",
    "euler-norm": "Forward Euler (euler-norm)",
    "rk2-norm": "RK2 (rk2-norm)",
    "rk4-norm": "RK4 (rk4-norm)",
    "rk38-norm": "3/8-rule RK4 (rk38-norm)",
    "map-norm": "Map h⁺ = σ(Wh + u) (map-norm)",
}

# seaborn's "ticks" style and "paper" context (font_scale 1.1) as plain rcParams, without its
# font family: figures use the user's font.
_SEABORN = {**sns.axes_style("ticks"), **sns.plotting_context("paper", font_scale=1.1)}
_STYLE: dict[str, Any] = {
    **{key: value for key, value in _SEABORN.items() if key not in ("font.family", "font.sans-serif", "image.cmap")},
    "axes.prop_cycle": cycler(color=_PALETTE),
    "axes.titleweight": "bold",
    "figure.dpi": 100,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
}
FIGURE_SUFFIXES = (".png", ".pdf")
_FIGURE_FORMATS = (".png", ".pdf", ".svg")
_PNG_DPI = 150


@contextmanager
def style() -> Iterator[None]:
    """The toolkit's look, for the duration of a ``with`` block only (``matplotlib.rc_context``)."""
    with mpl.rc_context(_STYLE):
        yield


def figure_format(path: str | Path) -> str:
    """The format ``path``'s suffix names: png, pdf or svg; anything else is an ``InputError``."""
    suffix = Path(path).suffix.lower()
    if suffix not in _FIGURE_FORMATS:
        raise InputError(f"{path}: a figure file ends in {', '.join(_FIGURE_FORMATS)} (the suffix chooses the format), "
                         f"not {suffix or 'no suffix'!r}")
    return suffix[1:]


def write_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (PNG at 150 dpi;
    PDF and PostScript fonts embedded as TrueType; no creation date, so equal figures give equal files)."""
    fmt = figure_format(path)
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
    with mpl.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "lrnn"}):
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=_PNG_DPI, metadata=metadata))


def save_figure(fig: Figure, stem: str | Path) -> list[Path]:
    """Write ``stem``.png and ``stem``.pdf atomically (the suffix is appended, never substituted);
    returns both paths."""
    return [write_figure(fig, f"{stem}{suffix}") for suffix in FIGURE_SUFFIXES]


def _frame(table: Table, required: Iterable[str]) -> pd.DataFrame:
    frame = table.copy() if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))
    missing = [c for c in required if c not in frame.columns]
    if frame.empty or missing:
        raise InputError(f"table needs rows with columns {list(required)}; missing {missing or 'rows'}")
    return frame


def _check_keys(what: str, given: Mapping[str, Any] | None, known: Sequence[Any]) -> dict[Any, Any]:
    """``given`` as a dict, after checking that it is a mapping whose keys are all ``known``."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise InputError(f"{what} must be a mapping {{key: value}} with keys among {list(known)}, got {type(given).__name__}")
    unknown = [key for key in given if key not in known]
    if unknown:
        raise InputError(f"{what}: unknown key(s) {unknown}; this figure's keys are {list(known)}")
    return dict(given)


class _Options:
    """The customisation arguments of one call, checked against the figure's series and panels."""

    def __init__(self, series: Sequence[Any], panels: Sequence[Any], labels: Mapping[str, str] | None,
                 colors: Mapping[str, Any] | None, titles: Mapping[str, str] | None):
        self.series, self.panels = list(series), list(panels)
        self._labels = _check_keys("labels", labels, self.series)
        self._colors = _check_keys("colors", colors, self.series)
        self._titles = _check_keys("titles", titles, self.panels)
        bad = [f"{key}={value!r}" for key, value in self._colors.items() if not is_color_like(value)]
        if bad:
            raise InputError(f"colors: not a matplotlib colour: {', '.join(bad)}")

    def label(self, key: Any, default: str | None = None) -> str:
        return str(self._labels.get(key, default if default is not None else key))

    def color(self, key: Any, default: Any) -> tuple[float, float, float, float]:
        return to_rgba(self._colors.get(key, default))

    def title(self, key: Any, default: str) -> str:
        return str(self._titles.get(key, default))

    def styles(self) -> dict[Any, dict[str, Any]]:
        """Colour (resolved once), marker and line style of each series, in series order."""
        return {name: {"color": self.color(name, _PALETTE[i % len(_PALETTE)]), "marker": _MARKERS[i % len(_MARKERS)],
                       "linestyle": _DASHES[i % len(_DASHES)]} for i, name in enumerate(self.series)}


class _Canvas:
    """The axes a plot function draws into: a new figure in the toolkit's style, or the caller's axes."""

    def __init__(self, count: int, names: Sequence[Any], ax: Axes | None, axes: Sequence[Axes] | None,
                 figsize: tuple[float, float] | None, panel_size: tuple[float, float], ncols: int | None = None):
        if ax is not None and axes is not None:
            raise InputError("give ax or axes, not both")
        if ax is not None:
            axes = [ax]
        self.owned = axes is None
        if not self.owned:
            axes = list(axes)
            if not all(isinstance(a, Axes) for a in axes):
                raise InputError("ax/axes must be matplotlib Axes")
            if len(axes) != count:
                raise InputError(f"this table draws {count} panel(s) ({', '.join(map(str, names))}); "
                                 f"got {len(axes)} axes (pass axes=[...] with one Axes per panel, or filter the table)")
            if figsize is not None:
                raise InputError("figsize applies to a figure the function creates; with ax/axes, size your own figure")
            self.axes = axes
            self.figure = axes[0].get_figure(root=True)
            self.free_slot = None
            return
        self.ncols = ncols or (2 if count == 4 else min(count, 3))
        nrows = int(np.ceil(count / self.ncols))
        size = figsize or (panel_size[0] * self.ncols, panel_size[1] * nrows)
        with style():
            self.figure = Figure(figsize=size, layout="constrained")
            grid = self.figure.add_gridspec(nrows, self.ncols)
            self.axes = [self.figure.add_subplot(grid[i // self.ncols, i % self.ncols]) for i in range(count)]
        empty = nrows * self.ncols - count
        self.free_slot = grid[nrows - 1, self.ncols - empty:] if empty else None

    def legend(self, handles: Sequence[Any], labels: Sequence[str], title: str | None = None, inside: bool = False) -> None:
        """One legend for all panels: in the empty grid cells after the last panel when there are
        some, else below the panels; inside the last axes when the caller gave the axes or ``inside``."""
        if not handles:
            return
        options = dict(handler_map={tuple: HandlerTuple(ndivide=1)}, title=title)
        with style() if self.owned else nullcontext():
            if not self.owned or inside:
                self.axes[-1].legend(handles, labels, loc="best", fontsize="small", title_fontsize="small", **options)
            elif self.free_slot is not None:
                slot = self.figure.add_subplot(self.free_slot)
                slot.axis("off")
                slot.legend(handles, labels, loc="center", frameon=False, **options)
            else:
                width = self.figure.get_figwidth()
                ncol = max(1, min(len(handles), int(width // 2.0)))
                self.figure.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False, **options)

    def draw(self):
        """Context for drawing: the toolkit's style on a figure this call created, else the caller's rcParams."""
        return style() if self.owned else nullcontext()


def _legend_entries(axes: Sequence[Axes]) -> tuple[list[Any], list[str]]:
    """Every distinct label of every panel with its first handle (labels starting with _ skipped)."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return list(entries.values()), list(entries)


def stability_region_mask(method: str, eps: float, re: np.ndarray, im: np.ndarray) -> np.ndarray:
    """|R(eps lambda)| on a grid of lambda = re + i im (the region is where it is < 1)."""
    return np.abs(stability_polynomial(method, eps * (re + 1j * im)))


def plot_spectra(eigenvalues: Table, regions: Table, *, labels: Mapping[str, str] | None = None,
                 colors: Mapping[str, Any] | None = None, titles: Mapping[str, str] | None = None,
                 figsize: tuple[float, float] | None = None, ax: Axes | None = None,
                 axes: Sequence[Axes] | None = None) -> Figure:
    """Eigenvalues of A and W per model in the complex plane, one panel per model (panel keys:
    the models; series keys: "A", "W").

    ``eigenvalues``: rows (model, matrix in {A, W}, re, im). ``regions``: one row per model
    (model, method, eps, re_min, re_max, im_max) with the Bendixson box of A; for a
    discretized model the scheme's stability region {lambda : |R(eps lambda)| < 1} is
    shaded (Euler: the disc of centre -1/eps and radius 1/eps).
    """
    eig = _frame(eigenvalues, ["model", "matrix", "re", "im"])
    reg = _frame(regions, ["model", "method", "eps", "re_min", "re_max", "im_max"]).set_index("model")
    models = list(dict.fromkeys(eig["model"]))
    options = _Options(("A", "W"), models, labels, colors, titles)
    canvas = _Canvas(len(models), models, ax, axes, figsize, (3.6, 3.3))
    marker = {"A": dict(marker="o", facecolors="none", edgecolors=[options.color("A", _PALETTE[0])],
                        label=options.label("A", "eig(A)")),
              "W": dict(marker="x", color=options.color("W", _PALETTE[3]), label=options.label("W", "eig(W)"))}
    regions_drawn: dict[str, Patch] = {}
    with canvas.draw():
        for panel, model in zip(canvas.axes, models):
            sub = eig[eig["model"] == model]
            for matrix, style_ in marker.items():
                points = sub[sub["matrix"] == matrix]
                if len(points):
                    panel.scatter(points["re"], points["im"], s=16, linewidths=0.9, zorder=3, **style_)
            span_re, scheme = np.r_[sub["re"].to_numpy(), 0.0], ""
            span_im = np.r_[sub["im"].to_numpy(), 0.0]
            if model in reg.index:
                r = reg.loc[model]
                panel.add_patch(Rectangle((r["re_min"], -r["im_max"]), r["re_max"] - r["re_min"], 2 * r["im_max"],
                                          fill=False, linestyle="--", edgecolor="0.3", linewidth=1.0,
                                          label="Bendixson box of A"))
                span_re = np.r_[span_re, r["re_min"], r["re_max"]]
                span_im = np.r_[span_im, -r["im_max"], r["im_max"]]
                if r["method"] in STABILITY_POLYNOMIALS and pd.notna(r["eps"]):
                    extent = 1.5 * max(np.ptp(span_re), np.ptp(span_im), 1e-3)
                    centre = 0.5 * (span_re.min() + span_re.max())
                    grid_re, grid_im = np.meshgrid(np.linspace(centre - extent, centre + extent, 400),
                                                   np.linspace(-extent, extent, 400))
                    modulus = stability_region_mask(r["method"], float(r["eps"]), grid_re, grid_im)
                    panel.contourf(grid_re, grid_im, modulus, levels=[0, 1], colors=["0.85"], alpha=0.6, zorder=0)
                    panel.contour(grid_re, grid_im, modulus, levels=[1], colors=["0.35"], linewidths=0.8, zorder=1)
                    regions_drawn.setdefault("stability region of the model's scheme",
                                             Patch(facecolor="0.85", edgecolor="0.35", linewidth=0.8))
                    scheme = f"\n{r['method']}, ε = {float(r['eps']):g}"
            panel.axvline(0.0, color="k", linewidth=0.8, label="imaginary axis")
            half_re = 0.55 * max(np.ptp(span_re), 0.25 * np.ptp(span_im), 1e-3)
            half_im = 0.55 * max(np.ptp(span_im), 0.25 * np.ptp(span_re), 1e-3)
            middle_re, middle_im = 0.5 * (span_re.min() + span_re.max()), 0.5 * (span_im.min() + span_im.max())
            panel.set_xlim(middle_re - half_re, middle_re + half_re)
            panel.set_ylim(middle_im - half_im, middle_im + half_im)
            panel.set_title(options.title(model, f"{model}{scheme}"))
            panel.set_xlabel("Re λ")
            panel.set_ylabel("Im λ")
        handles, names = _legend_entries(canvas.axes)
        canvas.legend(handles + list(regions_drawn.values()), names + list(regions_drawn))
    return canvas.figure


def plot_phase_diagram(cells: Table, *, labels: Mapping[str, str] | None = None,
                       colors: Mapping[str, Any] | None = None, titles: Mapping[str, str] | None = None,
                       figsize: tuple[float, float] | None = None, ax: Axes | None = None,
                       axes: Sequence[Axes] | None = None) -> Figure:
    """Margin of each parameterization test over (beta_A, gamma_A), one panel per test (panel
    keys: the tests). The certified region (margin > 0) is hatched and outlined, and rows with
    ``point`` = "user" are starred. Series keys: "certified" (the hatching), "boundary"
    (margin = 0) and "user" (the star).
    Rows: (beta_A, gamma_A, test, margin), optionally beta_W, gamma_W (named in the titles) and point."""
    frame = _frame(cells, ["beta_A", "gamma_A", "test", "margin"])
    is_user = frame["point"] == "user" if "point" in frame.columns else np.zeros(len(frame), dtype=bool)
    user, frame = frame[is_user], frame[~is_user]
    tests = list(dict.fromkeys(frame["test"]))
    options = _Options(("certified", "boundary", "user"), tests, labels, colors, titles)
    canvas = _Canvas(len(tests), tests, ax, axes, figsize, (3.9, 3.3))
    hatch_colour, boundary_colour = options.color("certified", "0.15"), options.color("boundary", "k")
    user_colour = options.color("user", "gold")
    with canvas.draw():
        for panel, test in zip(canvas.axes, tests):
            rows = frame[frame["test"] == test]
            grid = rows.pivot_table(index="gamma_A", columns="beta_A", values="margin", dropna=False)
            values = grid.to_numpy()
            limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
            betas, gammas = grid.columns.to_numpy(float), grid.index.to_numpy(float)
            mesh = panel.pcolormesh(betas, gammas, values, cmap="RdBu", vmin=-(limit or 1.0), vmax=limit or 1.0,
                                    shading="nearest", rasterized=True)
            if np.nanmax(values) > 0 > np.nanmin(values):
                panel.contour(betas, gammas, values, levels=[0.0], colors=[boundary_colour], linewidths=1.5)
            hatched = panel.contourf(betas, gammas, values, levels=[0.0, np.inf], colors="none", hatches=["//"])
            hatched.set_edgecolor(hatch_colour)
            hatched.set_linewidth(0.0)
            mine = user[user["test"] == test]
            if len(mine):
                panel.plot(mine["beta_A"], mine["gamma_A"], marker="*", markersize=13, color=user_colour,
                           markeredgecolor="k", linestyle="none", label=options.label("user", "your (β_A, γ_A)"))
            default = _TEST_TITLES.get(test, str(test))
            panel.set_title(options.title(test, f"{default}\n{_w_description(rows)}"))
            panel.set_xlabel("β_A")
            panel.set_ylabel("γ_A")
            canvas.figure.colorbar(mesh, ax=panel, label="margin (certified where > 0)")
        handles = [Patch(facecolor="white", edgecolor=hatch_colour, hatch="///", linewidth=0.6),
                   Line2D([], [], color=boundary_colour, linewidth=1.5)]
        names = [options.label("certified", "certified (margin > 0)"), options.label("boundary", "margin = 0")]
        user_handles, user_names = _legend_entries(canvas.axes)
        canvas.legend(handles + user_handles, names + user_names)
    return canvas.figure


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


_SPECTRAL_QUANTITIES = {"alpha_A": "spectral abscissa α(A)", "mu2_A": "log-norm μ₂(A)", "norm_A": "‖A‖₂",
                       "alpha_W": "spectral abscissa α(W)", "mu2_W": "log-norm μ₂(W)", "norm_W": "‖W‖₂",
                       "lambda_max": "Hessian λ_max"}


def plot_training_spectra(log: Table, quantities: Sequence[str] = ("alpha_A", "mu2_A", "norm_W"), *,
                          labels: Mapping[str, str] | None = None, colors: Mapping[str, Any] | None = None,
                          titles: Mapping[str, str] | None = None, figsize: tuple[float, float] | None = None,
                          ax: Axes | None = None, axes: Sequence[Axes] | None = None) -> Figure:
    """Spectral quantities per epoch, one panel per quantity (panel keys: the quantities), one
    line per model. Rows: (model, epoch, <quantities>), e.g. a checkpoint's training log or
    :class:`lrnn_analysis.monitor.StabilityMonitor` rows (also ``lambda_max``)."""
    frame = _frame(log, ["model", "epoch"])
    quantities = [q for q in quantities if q in frame.columns and frame[q].notna().any()]
    if not quantities:
        raise InputError("the log has none of the requested spectral quantities")
    models = list(dict.fromkeys(frame["model"]))
    options = _Options(models, quantities, labels, colors, titles)
    styles = options.styles()
    canvas = _Canvas(len(quantities), quantities, ax, axes, figsize, (3.6, 2.8))
    with canvas.draw():
        for panel, quantity in zip(canvas.axes, quantities):
            for model in models:
                sub = frame[(frame["model"] == model) & frame[quantity].notna()]
                every = max(1, len(sub) // 10)
                panel.plot(sub["epoch"], sub[quantity], label=options.label(model), markevery=every, markersize=4,
                           **styles[model])
            if quantity.startswith(("alpha", "mu2")):
                panel.axhline(0.0, color="k", linewidth=0.7)
            panel.set_xlabel("epoch")
            panel.set_ylabel(_SPECTRAL_QUANTITIES.get(quantity, quantity))
            panel.set_title(options.title(quantity, ""))
        canvas.legend(*_legend_entries(canvas.axes))
    return canvas.figure


_HESSIAN_PANELS = {"lambda_max": ("lambda_max", None, "Top eigenvalue λ_max", "Hessian eigenvalue"),
                  "lambda_min": ("lambda_min", None, "Bottom eigenvalue λ_min", "Hessian eigenvalue"),
                  "trace": ("trace", "trace_ci95", "Trace tr(H), 95% CI", "Hessian trace")}


def plot_hessian_summary(rows: Table, quantities: Sequence[str] = ("lambda_max", "lambda_min", "trace"), *,
                         labels: Mapping[str, str] | None = None, colors: Mapping[str, Any] | None = None,
                         titles: Mapping[str, str] | None = None, figsize: tuple[float, float] | None = None,
                         ax: Axes | None = None, axes: Sequence[Axes] | None = None) -> Figure:
    """Top and bottom Hessian eigenvalues and the trace with its 95% CI, one bar per model,
    one panel per quantity (panel keys: ``quantities``, among "lambda_max", "lambda_min", "trace").
    Rows: (model, lambda_max, lambda_min, trace, trace_ci95)."""
    unknown = [q for q in quantities if q not in _HESSIAN_PANELS]
    if unknown or not quantities:
        raise InputError(f"quantities: expected some of {list(_HESSIAN_PANELS)}, got {list(quantities)}")
    frame = _frame(rows, ["model", "lambda_max", "lambda_min", "trace", "trace_ci95"])
    models = list(frame["model"])
    options = _Options(models, quantities, labels, colors, titles)
    styles = options.styles()
    canvas = _Canvas(len(quantities), quantities, ax, axes, figsize, (3.5, 3.3))
    positions = np.arange(len(models))
    with canvas.draw():
        for panel, quantity in zip(canvas.axes, quantities):
            column, error, title, ylabel = _HESSIAN_PANELS[quantity]
            bars = panel.bar(positions, frame[column], yerr=frame[error] if error else None, capsize=4,
                             color=[styles[m]["color"] for m in models], edgecolor="k", linewidth=0.6)
            for bar, hatch in zip(bars, _HATCHES * (len(models) // len(_HATCHES) + 1)):
                bar.set_hatch(hatch)
            values = frame[column].to_numpy(float)
            if np.all(values > 0) and values.max() > 50 * values.min():
                panel.set_yscale("log")
                title += " (log scale)"
            else:
                panel.axhline(0.0, color="k", linewidth=0.7)
            panel.set_xticks(positions, [options.label(m) for m in models], rotation=35, ha="right")
            panel.set_ylabel(ylabel)
            panel.set_title(options.title(quantity, title))
    return canvas.figure


_CERTIFIED_PANELS = {"accuracy": "Test accuracy", "certified": "Certified contraction margin"}


def plot_certified_accuracy(rows: Table, *, labels: Mapping[str, str] | None = None,
                            colors: Mapping[str, Any] | None = None, titles: Mapping[str, str] | None = None,
                            figsize: tuple[float, float] | None = None, ax: Axes | None = None,
                            axes: Sequence[Axes] | None = None) -> Figure:
    """Test accuracy and certified contraction, one bar per model, two panels (panel keys
    "accuracy", "certified"). Rows: one per model (model, test_accuracy, certified, rate,
    certificate); ``rate`` is the certified contraction factor per step, drawn as the margin
    1 − rate on a log axis and labelled with the rate and its certificate. A model with
    nothing certified gets a white hatched "not certified" bar at the axis floor."""
    frame = _frame(rows, ["model", "test_accuracy", "certified", "rate", "certificate"])
    models = list(frame["model"])
    options = _Options(models, tuple(_CERTIFIED_PANELS), labels, colors, titles)
    styles = options.styles()
    canvas = _Canvas(2, tuple(_CERTIFIED_PANELS), ax, axes, figsize, (4.6, 3.8))
    positions = np.arange(len(models))
    hatches = _HATCHES * (len(models) // len(_HATCHES) + 1)
    accuracy = frame["test_accuracy"].to_numpy(float)
    certified = frame["certified"].astype(bool).to_numpy()
    margins = [1.0 - float(rate) if ok and rate is not None and np.isfinite(float(rate)) else np.nan
               for rate, ok in zip(frame["rate"], certified)]
    positive = [m for m in margins if np.isfinite(m) and m > 0]
    floor = min(positive) / 10 if positive else 1e-6
    ticks = [options.label(m) for m in models]
    with canvas.draw():
        panel_accuracy, panel_certified = canvas.axes
        bars = panel_accuracy.bar(positions, accuracy, color=[styles[m]["color"] for m in models], edgecolor="k",
                                  linewidth=0.6)
        for bar, hatch, x, value in zip(bars, hatches, positions, accuracy):
            bar.set_hatch(hatch)
            panel_accuracy.text(x, value, f"{value:.3f}", ha="center", va="bottom", fontsize="x-small")
        panel_accuracy.set_ylim(0, 1.08)
        panel_accuracy.set_ylabel("test accuracy")
        panel_accuracy.set_title(options.title("accuracy", _CERTIFIED_PANELS["accuracy"]))
        for model, hatch, x, margin, certificate in zip(models, hatches, positions, margins, frame["certificate"]):
            if np.isfinite(margin) and margin > 0:
                panel_certified.bar(x, margin, color=styles[model]["color"], hatch=hatch, edgecolor="k", linewidth=0.6)
                panel_certified.text(x, margin, f"{1 - margin:.5f}\n{certificate}", ha="center", va="bottom",
                                     fontsize="xx-small")
            else:
                panel_certified.bar(x, floor, color="white", hatch="//", edgecolor="k", linewidth=0.6)
                panel_certified.text(x, floor, "not\ncertified", ha="center", va="bottom", fontsize="xx-small")
        panel_certified.set_yscale("log")
        panel_certified.set_ylim(floor / 2, 20 * max(positive + [floor]))
        panel_certified.set_ylabel("1 − certified rate per step (log scale)")
        panel_certified.set_title(options.title("certified", _CERTIFIED_PANELS["certified"]))
        for panel in canvas.axes:
            panel.set_xticks(positions, ticks, rotation=35, ha="right")
    return canvas.figure


def plot_density(rows: Table, *, labels: Mapping[str, str] | None = None, colors: Mapping[str, Any] | None = None,
                 titles: Mapping[str, str] | None = None, figsize: tuple[float, float] | None = None,
                 ax: Axes | None = None) -> Axes:
    """Smoothed Hessian spectral densities (stochastic Lanczos quadrature) on a log scale,
    models overlaid in one panel (panel key "density"). Rows: (model, eigenvalue, density).
    Axes-level: draws into ``ax`` (else a new figure in the toolkit's style) and returns the Axes."""
    frame = _frame(rows, ["model", "eigenvalue", "density"])
    models = list(dict.fromkeys(frame["model"]))
    options = _Options(models, ("density",), labels, colors, titles)
    styles = options.styles()
    canvas = _Canvas(1, ("density",), ax, None, figsize, (5.6, 3.6))
    floor = frame.loc[frame["density"] > 0, "density"].max() * 1e-8
    with canvas.draw():
        panel = canvas.axes[0]
        for model in models:
            sub = frame[frame["model"] == model]
            style_ = {key: value for key, value in styles[model].items() if key != "marker"}
            # Below 1e-8 of the peak the log axis stops: those points are left out, not drawn at a floor.
            shown = sub["density"].where(sub["density"] >= floor)
            panel.plot(sub["eigenvalue"], shown, label=options.label(model), linewidth=1.4, **style_)
        panel.set_yscale("log")
        panel.set_xlabel("Hessian eigenvalue λ")
        panel.set_ylabel("spectral density (log scale)")
        panel.set_title(options.title("density", "Hessian spectral density (SLQ)"))
        canvas.legend(*_legend_entries(canvas.axes), inside=True)
    return canvas.axes[0]


def _share_y(axes: Sequence[Axes]) -> None:
    """One y-range for every panel: the union of their ranges."""
    low = min(a.get_ylim()[0] for a in axes)
    high = max(a.get_ylim()[1] for a in axes)
    for a in axes:
        a.set_ylim(low, high)


def _facet_lines(frame: pd.DataFrame, panel_column: str, x: str, y: str, options: _Options, canvas: _Canvas,
                 xlabel: Mapping[str, str] | str, ylabel: str, default_titles: Mapping[str, str],
                 band: str | None = None, clip: tuple[float, float] = (-np.inf, np.inf), percent: bool = False) -> Figure:
    """One panel per value of ``panel_column``, one styled line per model, with a +-``band``
    shade clipped to ``clip`` (accuracies: [0, 1]) in the line's colour."""
    styles = options.styles()
    with canvas.draw():
        for panel, value in zip(canvas.axes, options.panels):
            for model in options.series:
                sub = frame[(frame[panel_column] == value) & (frame["model"] == model)].sort_values(x)
                if sub.empty:
                    continue
                mean = sub[y].to_numpy(float)
                (line,) = panel.plot(sub[x], mean, label=options.label(model), markersize=4,
                                     markevery=max(1, len(sub) // 8), **styles[model])
                if band is not None:
                    half = sub[band].fillna(0).to_numpy(float)
                    shade = panel.fill_between(sub[x], np.clip(mean - half, *clip), np.clip(mean + half, *clip),
                                               color=styles[model]["color"], alpha=0.18, linewidth=0)
                    shade.set_gid(f"band:{model}")
                    line.set_gid(f"line:{model}")
            panel.set_xlabel(xlabel if isinstance(xlabel, str) else xlabel.get(value, str(value)))
            panel.set_ylabel(ylabel)
            panel.set_title(options.title(value, default_titles.get(value, str(value))))
            if percent:
                panel.yaxis.set_major_formatter(_Percent())
        handles, names = _legend_entries(canvas.axes)
        if band is not None:
            handles = [(Patch(facecolor=h.get_color(), alpha=0.18, linewidth=0), h) for h in handles]
        canvas.legend(handles, names, title="mean over seeds, 95% CI shaded" if band is not None else None)
    return canvas.figure


class _Percent(Formatter):
    """Fractions as percentages, with the fewest decimals that show the tick spacing exactly."""

    ticks: Sequence[float] = ()

    def set_locs(self, locs: Sequence[float]) -> None:
        self.ticks = list(locs)

    def __call__(self, x: float, pos: int | None = None) -> str:
        step = 100 * float(np.min(np.diff(self.ticks))) if len(self.ticks) > 1 else 100.0
        decimals = next((d for d in range(4) if abs(round(step, d) - step) < 1e-6 * max(step, 1e-12)), 3)
        return f"{100 * x:.{decimals}f}%"


def plot_robustness(summary: Table, metric: str = "accuracy", *, labels: Mapping[str, str] | None = None,
                    colors: Mapping[str, Any] | None = None, titles: Mapping[str, str] | None = None,
                    figsize: tuple[float, float] | None = None, ax: Axes | None = None,
                    axes: Sequence[Axes] | None = None) -> Figure:
    """Accuracy (or, with ``metric="loss"``, the loss; with ``metric="value"`` the task's headline
    metric named in the rows' ``metric`` column — perplexity of a language model, mse of a
    regression) against perturbation level, one panel per perturbation kind (panel keys: the kinds,
    titled by :data:`PERTURBATION_TITLES`), one line per model with its 95% CI band over seeds,
    clipped to [0, 1] (others: to >= 0). The panels share one y-axis, so drops compare across
    kinds. Rows: (model, perturbation, level, <metric>_mean, <metric>_ci95[, metric])."""
    if metric not in ("accuracy", "loss", "value"):
        raise InputError(f"metric must be 'accuracy', 'loss' or 'value', got {metric!r}")
    mean, half = f"{metric}_mean", f"{metric}_ci95"
    frame = _frame(summary, ["model", "perturbation", "level", mean, half] + (["metric"] if metric == "value" else []))
    if pd.to_numeric(frame[mean], errors="coerce").isna().all():
        raise InputError(f"the table has no {mean} values (a regression task has no accuracy: use metric='loss')")
    kinds = list(dict.fromkeys(frame["perturbation"]))
    options = _Options(list(dict.fromkeys(frame["model"])), kinds, labels, colors, titles)
    canvas = _Canvas(len(kinds), kinds, ax, axes, figsize, (4.0, 3.0))
    if metric == "accuracy":
        figure = _facet_lines(frame, "perturbation", "level", mean, options, canvas, PERTURBATION_UNITS,
                              "test accuracy (%)", PERTURBATION_TITLES, band=half, clip=(0.0, 1.0), percent=True)
    else:
        names = sorted(set(frame["metric"])) if metric == "value" else ["loss"]
        if len(names) != 1:
            raise InputError(f"the rows mix metrics {names}: plot one task's sweep at a time")
        figure = _facet_lines(frame, "perturbation", "level", mean, options, canvas, PERTURBATION_UNITS,
                              f"test {names[0]}", PERTURBATION_TITLES, band=half, clip=(0.0, np.inf))
    _share_y(canvas.axes)
    return figure


def plot_landscape_1d(rows: Table, *, labels: Mapping[str, str] | None = None, colors: Mapping[str, Any] | None = None,
                      titles: Mapping[str, str] | None = None, figsize: tuple[float, float] | None = None,
                      ax: Axes | None = None, axes: Sequence[Axes] | None = None) -> Figure:
    """Loss along 1-D lines θ* + t d through the trained parameters θ*, one panel per direction
    (panel keys: the directions). Rows: (model, direction, t, loss)."""
    frame = _frame(rows, ["model", "direction", "t", "loss"])
    directions = list(dict.fromkeys(frame["direction"]))
    options = _Options(list(dict.fromkeys(frame["model"])), directions, labels, colors, titles)
    canvas = _Canvas(len(directions), directions, ax, axes, figsize, (4.0, 3.0))
    return _facet_lines(frame, "direction", "t", "loss", options, canvas, "step t in θ* + t·d", "training loss",
                        {d: str(d)[:1].upper() + str(d)[1:] for d in directions})


def plot_landscape_2d(rows: Table, *, labels: Mapping[str, str] | None = None, colors: Mapping[str, Any] | None = None,
                      titles: Mapping[str, str] | None = None, figsize: tuple[float, float] | None = None,
                      ax: Axes | None = None, axes: Sequence[Axes] | None = None) -> Figure:
    """Loss on the plane θ* + a d₁ + b d₂ through the trained parameters θ*, one panel per model
    (panel keys: the models; series key "trained": the star at θ*). Rows: (model, a, b, loss)."""
    frame = _frame(rows, ["model", "a", "b", "loss"])
    models = list(dict.fromkeys(frame["model"]))
    options = _Options(("trained",), models, labels, colors, titles)
    canvas = _Canvas(len(models), models, ax, axes, figsize, (3.7, 3.2))
    with canvas.draw():
        for panel, model in zip(canvas.axes, models):
            grid = frame[frame["model"] == model].pivot_table(index="b", columns="a", values="loss")
            a, b, z = grid.columns.to_numpy(float), grid.index.to_numpy(float), grid.to_numpy()
            filled = panel.contourf(a, b, np.log10(np.maximum(z, 1e-12)), levels=14, cmap="viridis")
            lines = panel.contour(a, b, np.log10(np.maximum(z, 1e-12)), levels=7, colors="k", linewidths=0.6)
            panel.clabel(lines, fontsize=7, fmt="%.1f")
            panel.plot([0], [0], marker="*", color=options.color("trained", "w"), markeredgecolor="k", markersize=11,
                       linestyle="none", label=options.label("trained", "trained parameters θ*"))
            canvas.figure.colorbar(filled, ax=panel, label="log₁₀ training loss")
            panel.set_xlabel("a (along d₁)")
            panel.set_ylabel("b (along d₂)")
            panel.set_title(options.title(model, str(model)))
        canvas.legend(*_legend_entries(canvas.axes[-1:]), inside=True)
    return canvas.figure
