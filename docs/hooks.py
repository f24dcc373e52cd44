"""MkDocs hooks of this site (``hooks:`` in mkdocs.yml).

* ``on_page_markdown`` replaces the marker :data:`CLI_MARKER` with the help of ``lrnn`` and of
  each of its subcommands, rendered from the real parser (``lrnn_analysis.cli.build_parser``)
  at build time, so the CLI reference cannot drift from the options that exist.
* ``on_page_markdown`` also replaces each marker ``<!-- lrnn-api PACKAGE -->`` with the API of
  PACKAGE: its docstring, then one mkdocstrings block per public class and function in its
  ``__all__`` at the module that defines it (the packages load their names lazily, PEP 562, so
  a static reading of ``PACKAGE/__init__.py`` would find none). An object already documented
  higher up the page becomes a link to it; constants are listed with their values.
* ``on_files`` publishes the committed figures (``figures/*.png`` at the repository root) under
  ``figures/`` in the site, so pages show the very files ``lrnn reproduce`` wrote.

The renderers, :func:`cli_reference` and :func:`api_reference`, do not import mkdocs: tests call them.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLI_MARKER = "<!-- lrnn-cli-reference -->"
HELP_WIDTH = "80"  # columns of the rendered help, whatever the terminal building the site
API_MARKER = re.compile(r"<!-- lrnn-api ([\w.]+) -->")


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in the order the parser lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            seen: set[int] = set()
            found = []
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    found.append((name, helps.get(name, ""), sub))
            return found
    raise ValueError("the lrnn parser has no subcommands")


def cli_reference() -> str:
    """Markdown: ``lrnn --help``, then one section per subcommand with its ``--help``."""
    from lrnn_analysis.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        parser = build_parser()
        parts = ["## `lrnn`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, summary, sub in subcommands(parser):
            parts += [f"## `lrnn {name}`", "", f"{summary[:1].upper()}{summary[1:]}.", "",
                      "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(parts)


def api_reference(package: str, documented: dict[str, str]) -> str:
    """Markdown for one package's public API (see the module docstring). ``documented`` maps each
    object's identifier (``module.qualname``) to the package whose section documents it; it is
    updated with the objects documented here."""
    module = importlib.import_module(package)
    parts = [f"::: {package}", "    options:", "      members: false", "      show_root_heading: true", ""]
    constants = []
    for name in module.__all__:
        value = getattr(module, name)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            constants.append(f"`{name}` = `{value!r}`")
            continue
        identifier = f"{value.__module__}.{value.__qualname__}"
        if identifier in documented:
            parts += [f"`{name}`: see [{identifier}][{identifier}] ({documented[identifier]}).", ""]
        else:
            documented[identifier] = package
            parts += [f"::: {identifier}", "    options:", "      heading_level: 3", ""]
    if constants:
        parts += ["Constants: " + "; ".join(constants) + ".", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    documented: dict[str, str] = {}
    return API_MARKER.sub(lambda marker: api_reference(marker.group(1), documented), markdown)


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for figure in sorted((ROOT / "figures").glob("*.png")):
        files.append(File(f"figures/{figure.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
