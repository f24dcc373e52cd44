"""``lrnn reproduce``: run analysis recipes (default: every ``analyses/*.toml``) into a report directory."""
from __future__ import annotations

import argparse
import sys

from . import options as o

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    reproduce = sub.add_parser("reproduce", help="run analysis recipes (default: all of analyses/) into figures/")
    reproduce.add_argument("recipes", nargs="*", help="recipe files (default: every analyses/*.toml)")
    reproduce.add_argument("--analyses-dir", default="analyses")
    reproduce.add_argument("--out", default="figures", help="output directory (replaces only the files of the recipes run)")
    reproduce.add_argument("--force", action="store_true", help="also replace a report another lrnn command wrote")
    reproduce.add_argument("--no-code", action="store_true",
                           help="refuse recipes that import a .py file of their own (model = \"FILE.py:FACTORY\")")
    o.add_run_options(reproduce)
    reproduce.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..formatting import format_table
    from ..recipes import find_recipes, run_recipes

    o.set_threads(args.threads)
    paths = args.recipes or find_recipes(args.analyses_dir)
    if not paths:
        raise o.UsageError(f"no recipes given and none in {args.analyses_dir}")
    ranks = o.ranks_for(args)

    def announce(recipe) -> None:
        if not args.quiet:
            print(f"running {recipe.name} ({recipe.analysis}) ...", flush=True)

    def announce_code(recipe, file) -> None:
        print(f"note: recipe {recipe.name} runs code from {file} (refuse such recipes with --no-code)", file=sys.stderr)

    outcomes = run_recipes(paths, args.out, ranks.device, progress=not args.quiet, force=args.force,
                           allow_code=not args.no_code, announce=announce, announce_code=announce_code)
    if not ranks.is_main:
        return 0
    rows = [{"recipe": outcome.name, "analysis": outcome.analysis, "seconds": outcome.seconds, "outputs": len(outcome.outputs), "summary": outcome.summary}
            for outcome in outcomes]
    print(format_table(rows, ["recipe", "analysis", "seconds", "outputs", "summary"]))
    print(f"wrote {sum(len(outcome.outputs) for outcome in outcomes)} files into {args.out}")
    o.print_warnings([f"{outcome.name}: {w}" for outcome in outcomes for w in outcome.warnings])
    return 0
