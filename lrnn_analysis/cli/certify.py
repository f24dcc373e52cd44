"""``lrnn certify``: certify every model of a Lipschitz parameterization with ||M_A||_2, ||M_W||_2 <= r,
and draw its phase diagram over (beta_A, gamma_A)."""
from __future__ import annotations

import argparse

from ..choices import MAX_SIZES, PARAMETERIZATION_TESTS
from ..outputs import check_output_file
from . import options as o

__all__ = ["add_parser", "run"]

_MAX_GRID_POINTS = 500


def add_parser(sub: argparse._SubParsersAction) -> None:
    cert = sub.add_parser("certify", help="certify every model of a Lipschitz parameterization with ||M_A||_2, ||M_W||_2 <= r")
    cert.add_argument("--beta", type=o.finite, required=True, help="beta_A (and beta_W unless --beta-w)")
    cert.add_argument("--gamma", type=o.finite, default=None, help="one shared gamma: gamma_A = gamma_W")
    cert.add_argument("--gamma-a", type=o.finite, default=None, help="gamma_A (overrides --gamma)")
    cert.add_argument("--beta-w", type=o.finite, default=None)
    cert.add_argument("--gamma-w", type=o.finite, default=None,
                      help="gamma_W (overrides --gamma; default: gamma_A)")
    cert.add_argument("--eps", type=o.positive, default=None, help="step of the discretization (adds euler-norm, rk2-norm)")
    cert.add_argument("--radius", type=o.nonnegative, default=None, help="bound r on ||M_A||_2 and ||M_W||_2")
    cert.add_argument("--hidden", type=o.int_in(1, MAX_SIZES["hidden"]), default=None,
                      help="with --init-std: r = the radius of the toolkit's initialisation of this hidden size")
    cert.add_argument("--init-std", type=o.nonnegative, default=None,
                      help="with --hidden: entries of M ~ N(0, (init_std/hidden)^2), as `lrnn train` initialises them")
    cert.add_argument("--init-failure-probability", type=o.positive, default=1e-6,
                      help="probability allowed that an initial M_A or M_W exceeds the derived radius")
    cert.add_argument("--slope", type=o.positive, default=1.0, help="Lipschitz constant L of the activation")
    cert.add_argument("--certificates", "--tests", dest="tests", type=o.parameterization_tests, default=None,
                      help=f"comma-separated, from {','.join(PARAMETERIZATION_TESTS)} (default: ct-norm, and euler-norm, rk2-norm with --eps)")
    cert.add_argument("--phase-betas", type=_grid, default=None,
                      help="beta_A grid (a,b,c or start:stop:count); W shares beta and gamma unless --beta-w/--gamma-w fix them")
    cert.add_argument("--phase-gammas", type=_grid, default=None, help="gamma_A grid: a,b,c or start:stop:count")
    cert.add_argument("--out", default=None, help="CSV of the phase diagram (one row per beta_A, gamma_A, test; your point marked)")
    cert.add_argument("--figure", default=None, metavar="PATH",
                      help="draw the phase diagram, your point starred (.png, .pdf or .svg)")
    cert.add_argument("--force", action="store_true", help=o.FORCE_HELP)
    cert.set_defaults(handler=run)


_MAX_GRID = 100_000


def _grid(text: str) -> list[float]:
    """'a,b,c' or 'start:stop:count' (inclusive, evenly spaced, 1 <= count <= _MAX_GRID_POINTS); finite values."""
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected start:stop:count, got {text[:40]!r}")
        start, stop, count = o.finite(parts[0]), o.finite(parts[1]), o.int_in(1, _MAX_GRID_POINTS)(parts[2])
        import numpy as np

        return [float(v) for v in np.linspace(start, stop, count)]
    return o.float_list(text)


def _certify_settings(args: argparse.Namespace) -> tuple[float, float, float, str, float, str]:
    """(beta_W, gamma_A, gamma_W, how gamma_W was set, r, how r was set) from the certify options."""
    if args.gamma_a is None and args.gamma is None:
        raise o.UsageError("give --gamma (gamma_A = gamma_W) or --gamma-a (and optionally --gamma-w)")
    gamma_a = args.gamma if args.gamma_a is None else args.gamma_a
    if args.gamma_w is not None:
        gamma_w, w_source = args.gamma_w, "--gamma-w"
    elif args.gamma is not None:
        gamma_w, w_source = args.gamma, "shared --gamma"
    else:
        gamma_w, w_source = gamma_a, "default: gamma_W = gamma_A"
    beta_w = args.beta if args.beta_w is None else args.beta_w
    from_init = args.hidden is not None or args.init_std is not None
    if from_init == (args.radius is not None):
        raise o.UsageError("give either --radius or both --hidden and --init-std")
    if from_init:
        if args.hidden is None or args.init_std is None:
            raise o.UsageError("--hidden and --init-std go together (they derive the radius of the initialisation)")
        from ..stability import gaussian_init_radius

        init = gaussian_init_radius(args.hidden, args.init_std, args.init_failure_probability)
        return beta_w, gamma_a, gamma_w, w_source, init.radius, f"the initialisation's radius: {init.describe()}"
    return beta_w, gamma_a, gamma_w, w_source, args.radius, "--radius"


def run(args: argparse.Namespace) -> int:
    from ..formatting import format_table
    from ..stability import certify_parameterization, phase_diagram
    from ..writers import write_csv

    beta_w, gamma_a, gamma_w, w_source, radius, r_source = _certify_settings(args)
    phase = args.phase_betas or args.phase_gammas
    if (phase or args.out or args.figure) and not (args.phase_betas and args.phase_gammas and (args.out or args.figure)):
        raise o.UsageError("a phase diagram needs --phase-betas, --phase-gammas and --out and/or --figure "
                         "(--out writes only the phase diagram)")
    if phase and len(args.phase_betas) * len(args.phase_gammas) > _MAX_GRID:
        raise o.UsageError(f"the phase diagram has more than {_MAX_GRID} cells")
    if args.out:
        check_output_file(args.out, force=args.force)
    o.check_figure(args.figure, args.force, [], [args.out])
    results = certify_parameterization(args.beta, gamma_a, beta_w, gamma_w, radius, args.eps, args.slope, args.tests)
    print(f"Lipschitz parameterization: beta_A = {args.beta:g}, gamma_A = {gamma_a:g}, beta_W = {beta_w:g}, "
          f"gamma_W = {gamma_w:g} ({w_source}), eps = {args.eps}, L = {args.slope:g}")
    print(f"every M_A, M_W with ||M||_2 <= r = {radius:.6g} ({r_source})")
    print(format_table([r.to_dict() for r in results], ["test", "holds", "value", "margin", "r_star"],
                       ["test", "every model certified", "value", "margin", "largest certified r*"]))
    for result in results:
        if not result.holds:
            print(f"{result.test}: {result.reason}")
            print(f"  what to change: {result.remedy}")
    shared = gamma_w == gamma_a and args.gamma_w is None
    if shared and not any(r.holds_at_zero for r in results):
        print(f"one shared gamma (gamma_W = gamma_A = {gamma_a:g}) makes every norm test impossible for L >= 1: W's "
              "shift -gamma_W I adds L |gamma_W| to ||W||_2 and cancels A's -gamma_A I. Set --gamma-w 0 "
              "(or smaller than gamma_A / L) and raise --gamma-a as suggested above.")
    if phase:
        cells = phase_diagram(args.phase_betas, args.phase_gammas, radius, args.eps, args.slope, args.tests,
                              beta_W=args.beta_w, gamma_W=args.gamma_w, user_point=(args.beta, gamma_a))
        if args.out:
            write_csv(args.out, [c.to_dict() for c in cells])
        grid = [c for c in cells if c.point == "grid"]
        certified = sum(c.holds for c in grid)
        cells_certified = len({(c.beta_A, c.gamma_A) for c in grid if c.holds})
        w_axes = ("beta_W = beta_A" if args.beta_w is None else f"beta_W = {args.beta_w:g}") + ", " + (
            "gamma_W = gamma_A" if args.gamma_w is None else f"gamma_W = {args.gamma_w:g}")
        n_cells = len(args.phase_betas) * len(args.phase_gammas)
        print(f"phase diagram over beta_A x gamma_A ({w_axes}) at r = {radius:.6g}: {n_cells} cells x "
              f"{len(grid) // n_cells} tests = {len(grid)} rows; {certified} of the {len(grid)} (cell, test) pairs "
              f"certified, {cells_certified} of the {n_cells} cells by at least one test; your point (beta_A, gamma_A) = "
              f"({args.beta:g}, {gamma_a:g}) is in the rows with point = user" + (f"; written to {args.out}" if args.out else ""))
        if args.figure:
            from ..plots import plot_phase_diagram

            o.write_figure(plot_phase_diagram([c.to_dict() for c in cells]), args.figure)
        if certified == 0 and args.gamma_w is None:
            print("0 cells certified because W shares each cell's gamma: gamma_W = gamma_A cancels A's shift "
                  "(see above). Hold W's shift fixed with --gamma-w 0.")
    return 0 if all(r.holds for r in results) else 1


