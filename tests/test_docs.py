"""Every code block of the documentation (README.md and docs/) is checked.

* A ``python`` block is either an included example (``--8<-- "examples/..."``, run by
  tests/test_examples.py) or, in README.md, the exact text of such an example; any other is run
  here in a temporary working directory.
* Each ``lrnn ...`` command of a ``bash`` block (also under ``torchrun -m lrnn_analysis.cli`` and
  ``python -m lrnn_analysis``) is parsed by the real parser, so an option that does not exist, a
  bad value or a missing required option fails; a script it runs (``python examples/...``) exists.
* ``toml`` blocks parse, and those that are recipes pass the recipe validator.
* Output is fenced as ``text``, and no ``$ command`` hides in it; every block names its language.

Also: the CLI reference page is rendered from the parser (docs/hooks.py), the repository paths
the pages name exist, and the README stays short.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
LANGUAGES = {"python", "bash", "toml", "text"}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)\s*$")
SNIPPET = re.compile(r'^\s*--8<--\s+"(?P<path>[^"]+)"\s*$')
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
REPO_PATH = re.compile(r"(?<![\w./-])((?:lrnn_analysis|tests|bench|examples|models|analyses|figures|docs)/[\w./-]*\w)"
                       r"(?!\.?[\w/{*-])")  # a whole path, not the stem of a pattern such as figures/NAME.{csv,json}
PLACEHOLDER = re.compile(r"(^|/)[A-Z][A-Z_]*(\.|/|$)")  # models/NAME.md stands for any model


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line} ({self.lang or 'no language'})"


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, in order."""
    blocks, lines = [], page.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        index += 1
        if not opening:
            continue
        start, body = index, []
        while index < len(lines) and lines[index].strip() != opening["fence"]:
            body.append(lines[index][len(opening["indent"]):])
            index += 1
        assert index < len(lines), f"{page}:{start}: unclosed code fence"
        index += 1
        blocks.append(Block(page, start, opening["lang"], "\n".join(body) + "\n"))
    return blocks


BLOCKS = [block for page in PAGES for block in code_blocks(page)]


def by_language(lang: str) -> list[Block]:
    return [block for block in BLOCKS if block.lang == lang]


def included(block: Block) -> list[Path]:
    """The files a block includes with pymdownx.snippets."""
    return [REPO / match["path"] for line in block.text.splitlines() if (match := SNIPPET.match(line))]


def expanded(block: Block) -> str:
    """The block's text with its snippet lines replaced by the files they include, as MkDocs shows it."""
    lines = []
    for line in block.text.splitlines():
        match = SNIPPET.match(line)
        lines.append((REPO / match["path"]).read_text().rstrip("\n") if match else line)
    return "\n".join(lines) + "\n"


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a shell script: continuation lines joined, comments dropped, split at
    ``&&``, ``||``, ``;`` and pipes, leading variable assignments and ``time`` removed."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in SHELL_OPERATORS:
                while command and (command[0] == "time" or re.fullmatch(r"\w+=.*", command[0])):
                    command.pop(0)
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(token)
    return commands


def lrnn_arguments(command: list[str]) -> list[str] | None:
    """The arguments ``lrnn`` gets from ``command``, or None when it runs no ``lrnn``."""
    program = Path(command[0]).name
    if program == "lrnn":
        return command[1:]
    for module in ("lrnn_analysis.cli", "lrnn_analysis"):
        if program in ("torchrun", "python", "python3") and module in command:
            at = command.index(module)
            if command[at - 1] == "-m":
                return command[at + 1:]
    return None


def parse_lrnn(arguments: list[str]) -> str | None:
    """None when the real parser accepts ``arguments``, else its complaint."""
    from lrnn_analysis.cli import build_parser

    stderr, stdout = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            build_parser().parse_args(arguments)
    except SystemExit as done:
        if done.code == 0 and ("-h" in arguments or "--help" in arguments):
            return None
        return stderr.getvalue().strip() or f"exit {done.code}"
    return None


def test_the_parser_checks_what_the_pages_show():
    """The check below can fail: an option that does not exist, or a bad value, is refused."""
    assert parse_lrnn(["stability", "CKPT", "--certificates", "euler-lmi"]) is None
    assert "unrecognized arguments: --no-such-option" in parse_lrnn(["stability", "CKPT", "--no-such-option"])
    assert parse_lrnn(["robustness", "CKPT", "--input-noise", "0,0.1"]) is not None  # --out is required
    assert parse_lrnn(["hessian", "CKPT", "--top-k", "1000"]) is not None
    assert shell_commands("A=1 time lrnn info x.pt && lrnn stability y \\\n  --quiet  # note\n") == [
        ["lrnn", "info", "x.pt"], ["lrnn", "stability", "y", "--quiet"]]


def test_every_block_names_its_language():
    unnamed = [str(block) for block in BLOCKS if block.lang not in LANGUAGES]
    assert not unnamed, f"code blocks must be fenced as one of {sorted(LANGUAGES)}: {unnamed}"


def test_snippets_exist():
    missing = [f"{block}: {path}" for block in BLOCKS for path in included(block) if not path.is_file()]
    assert not missing


@pytest.mark.parametrize("block", by_language("python"), ids=str)
def test_python_blocks_are_examples_or_run(block, tmp_path):
    files = included(block)
    if files:
        assert block.text.strip() == f'--8<-- "{files[0].relative_to(REPO).as_posix()}"', \
            f"{block}: a Python block includes one example and nothing else"
        assert files[0].is_relative_to(REPO / "examples"), f"{block}: Python blocks include scripts of examples/"
        return
    if any(block.text == path.read_text() for path in (REPO / "examples").rglob("*.py")):
        return  # the exact text of an example, which tests/test_examples.py runs
    (tmp_path / "models").symlink_to(REPO / "models", target_is_directory=True)
    done = subprocess.run([sys.executable, "-c", block.text], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block} failed:\n{done.stderr}"


@pytest.mark.parametrize("block", by_language("bash"), ids=str)
def test_shell_blocks_parse(block):
    commands = shell_commands(expanded(block))
    assert commands, f"{block}: no command"
    for command in commands:
        arguments = lrnn_arguments(command)
        if arguments is not None:
            complaint = parse_lrnn(arguments)
            assert complaint is None, f"{block}: `{shlex.join(command)}` is refused by the parser: {complaint}"
        scripts = [word for word in command[1:2] if command[0].endswith(("python", "python3")) and word.endswith(".py")]
        for script in scripts:
            if "/" in script:
                assert (REPO / script).is_file(), f"{block}: {script} does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_inline_commands_use_options_that_exist(page):
    """Prose names commands in fragments (`lrnn train --seed S`): every option such a fragment
    names must exist on its subcommand."""
    from lrnn_analysis.cli import build_parser

    hooks = load_hooks()
    options = {name: {option for action in sub._actions for option in action.option_strings}
               for name, _, sub in hooks.subcommands(build_parser())}
    prose = re.sub(r"^ *(`{3,}|~{3,}).*?^ *\1", "", page.read_text(), flags=re.S | re.M)
    unknown = []
    for span in re.findall(r"`lrnn ([^`]+)`", prose):
        words = span.split()
        if words[0] in options:
            unknown += [f"lrnn {words[0]} {word}" for word in words[1:]
                        if word.startswith("--") and word.split("=")[0] not in options[words[0]]]
    assert not unknown, f"{page.relative_to(REPO)}: options that do not exist: {unknown}"


@pytest.mark.parametrize("block", by_language("text"), ids=str)
def test_output_blocks_hide_no_command(block):
    prompts = [line for line in block.text.splitlines() if line.startswith("$ ")]
    assert not prompts, f"{block}: commands belong in a bash block, output in a text block: {prompts}"


@pytest.mark.parametrize("block", by_language("toml"), ids=str)
def test_toml_blocks_are_valid_recipes(block, tmp_path):
    from lrnn_analysis.recipes import load_recipe

    text = expanded(block)
    data = tomllib.loads(text)
    if "analysis" in data:
        (tmp_path / "models").symlink_to(REPO / "models", target_is_directory=True)
        (tmp_path / "analyses").mkdir()
        recipe = tmp_path / "analyses" / "recipe.toml"
        recipe.write_text(text)
        assert load_recipe(recipe).name == data["name"]


def test_readme_quickstart_is_the_example():
    quickstart = (REPO / "examples" / "quickstart.py").read_text()
    assert any(block.text == quickstart for block in code_blocks(REPO / "README.md") if block.lang == "python")


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_named_repository_paths_exist(page):
    text = re.sub(r"https?://\S+", "", page.read_text())
    named = {path for path in REPO_PATH.findall(text) if not PLACEHOLDER.search(path)}
    missing = sorted(path for path in named if not (REPO / path).exists() and not (page.parent / path).exists())
    assert not missing, f"{page.relative_to(REPO)} names paths that do not exist: {missing}"


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_rendered_from_the_parser():
    from lrnn_analysis.cli import build_parser

    hooks = load_hooks()
    assert hooks.CLI_MARKER in (REPO / "docs" / "cli.md").read_text()
    page = hooks.cli_reference()
    subcommands = hooks.subcommands(build_parser())
    assert {name for name, _, _ in subcommands} >= {"train", "info", "stability", "certify", "hessian", "robustness",
                                                     "audit", "reproduce"}
    for name, _, parser in subcommands:
        assert f"## `lrnn {name}`" in page
        section = page.split(f"## `lrnn {name}`")[1].split("\n## ")[0]
        for action in parser._actions:
            for option in action.option_strings:
                assert option in section, f"lrnn {name}: {option} missing from the rendered help"


def test_api_reference_names_every_public_callable():
    hooks = load_hooks()
    markers = hooks.API_MARKER.findall((REPO / "docs" / "api.md").read_text())
    assert markers[0] == "lrnn_analysis" and "lrnn_analysis.pipelines.stability" in markers
    documented: dict[str, str] = {}
    for package in markers:
        page = hooks.api_reference(package, documented)
        module = importlib.import_module(package)
        for name in module.__all__:
            value = getattr(module, name)
            if callable(value) and hasattr(value, "__qualname__"):
                assert f"{value.__module__}.{value.__qualname__}" in page, f"{package}.{name} is not documented"
