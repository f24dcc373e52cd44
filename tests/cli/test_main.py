"""The `lrnn` entry point: start-up imports, option spellings and defaults shared by the commands,
option bounds checked before any work, outputs that never replace inputs, SIGINT and closed pipes."""
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO_ROOT, snapshot
from lrnn_analysis.checkpoints import save_checkpoint
from lrnn_analysis.cli import main
from lrnn_analysis.models import ModelConfig, build_model
from user_project import model_spec

from .helpers import CKPT, parse_args

HEAVY = ("torch", "numpy", "scipy", "cvxpy", "matplotlib", "pandas", "seaborn", "sklearn", "tqdm")


COMMANDS = ("train", "info", "stability", "certify", "hessian", "audit", "reproduce", "robustness")


_CHILDREN: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_child_left_behind():
    yield
    while _CHILDREN:
        child = _CHILDREN.pop()
        if child.poll() is None:
            child.kill()
            child.wait()


def _interruptible() -> None:
    # A shell that starts the suite in the background (`make test &`) makes its children ignore
    # SIGINT, and Python then installs no KeyboardInterrupt handler: give the child the
    # disposition a command typed at a terminal has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(code_or_argv, **kwargs):
    if isinstance(code_or_argv, str):
        argv = [sys.executable, "-c", code_or_argv]
    else:
        argv = [sys.executable, "-m", "lrnn_analysis.cli", *code_or_argv]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_interruptible, **kwargs)
    _CHILDREN.append(child)
    return child


def test_help_of_lrnn_and_every_command_imports_no_heavy_library():
    code = (f"import sys\nfrom lrnn_analysis.cli import main\n"
            f"codes = [main(argv) for argv in [['--help']] + [[c, '--help'] for c in {COMMANDS!r}]]\n"
            f"print(codes, sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"{[0] * (len(COMMANDS) + 1)} []"


def test_each_command_imports_only_what_it_uses():
    """`lrnn certify` (closed-form bounds) needs numpy alone; `lrnn info` needs torch to read a
    checkpoint but neither the SDP solvers nor the plotting stack."""
    checkpoint = REPO_ROOT / "models" / "digits-vanilla.safetensors"
    cases = {"certify": (["certify", "--beta", "0.75", "--gamma-a", "0.5", "--gamma-w", "0", "--radius", "0.1"],
                         {"torch", "scipy", "cvxpy", "matplotlib", "pandas"}),
             "info": (["info", str(checkpoint)], {"cvxpy", "matplotlib", "pandas", "seaborn"})}
    for command, (argv, forbidden) in cases.items():
        code = (f"import sys\nfrom lrnn_analysis.cli import main\ncode = main({argv!r})\n"
                f"print(code, sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(forbidden)!r})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "0 []", (command, done.stdout.splitlines()[-1])


def test_python_m_lrnn_analysis_help_imports_no_heavy_library():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "lrnn_analysis", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: lrnn" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "lrnn_analysis" in imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.parametrize("option", ["--tests", "--certificates"])
def test_certificates_and_tests_are_one_option_in_stability_and_certify(option):
    assert parse_args("stability", CKPT, option, "euler-norm,euler-lmi").certificates == ["euler-norm", "euler-lmi"]
    args = parse_args("certify", "--beta", "0.75", "--gamma", "0.5", "--radius", "0.1", option, "ct-norm,euler-norm")
    assert args.tests == ["ct-norm", "euler-norm"] and args.gamma == 0.5


@pytest.mark.parametrize("option", ["--top-k", "--hessian-k"])
def test_top_k_and_hessian_k_are_one_option(option):
    assert parse_args("robustness", CKPT, "--hessian-direction", "0.1", option, "3", "--out", "r.csv").top_k == 3
    assert parse_args("hessian", CKPT, option, "3").top_k == 3


def test_json_spellings_of_info_stability_and_hessian_still_parse():
    assert parse_args("info", "--json", CKPT).json and parse_args("info", CKPT, "--json").json
    assert parse_args("stability", CKPT, "--json", "s.json").json == "s.json"
    assert parse_args("hessian", CKPT, "--json", "h.json").json == "h.json"


def test_every_help_shows_the_defaults_and_the_audit_presets_it_names(capsys, monkeypatch):
    from lrnn_analysis.pipelines.audit import AuditSettings

    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside hyphenated names
    text = {}
    for command in COMMANDS:
        assert main([command, "--help"]) == 0
        text[command] = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "--batch-size BATCH_SIZE (default: 1000)" in text["robustness"]
    assert "--lr LR (default: 0.03)" in text["train"]
    assert "--top-k TOP_K, --hessian-k TOP_K eigenvalues at each end of the spectrum (default: 1)" in text["hessian"]
    assert "--device {auto,cpu,cuda} auto = CUDA when present (default: auto)" in text["audit"]
    quick, thorough = AuditSettings(), AuditSettings.thorough()
    assert f"(default: {quick.hessian_batches}, --thorough {thorough.hessian_batches})" in text["audit"]
    assert f"(default: {quick.trace_matvecs}, --thorough {thorough.trace_matvecs})" in text["audit"]
    assert f"(default: {quick.seeds}, --thorough {thorough.seeds})" in text["audit"]
    assert quick.hessian_batch_size == 128 and "batches of 128 samples" in text["audit"]
    for kind, levels in quick.grid.items():
        assert f"{kind}:{','.join(f'{level:g}' for level in levels)}" in text["audit"]


def test_single_model_commands_take_one_model(project, capsys):
    spec = model_spec(project)
    assert main(["hessian", "--model", spec, "--weights", str(project / "rnn.pt"), "--weights", str(project / "rnn.pt"),
                 "--data", str(project / "data.npz")]) == 2
    assert "give one --weights file" in capsys.readouterr().err
    assert main(["info"]) == 2
    assert "give a checkpoint or --model" in capsys.readouterr().err


def test_overrides_on_a_native_checkpoint_are_an_error(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(ModelConfig("lipschitz", 8, 4, 10)),
                           {"task": {"name": "digits", "seed": 0, "options": {}}})
    for command in (["info"], ["stability"], ["hessian"], ["audit", "--out", str(tmp_path / "audit")]):
        assert main([*command[:1], str(path), *command[1:], "--beta", "0.5"]) == 2
        assert "override(s) apply only to files of the reference implementation" in capsys.readouterr().err
    assert not (tmp_path / "audit").exists()


@pytest.mark.usefixtures("time_limit")
@pytest.mark.parametrize("argv, needle", [
    (["hessian", "{ckpt}", "--top-k", "100000"], "--top-k"),
    (["hessian", "{ckpt}", "--batches", "0"], "--batches"),
    (["hessian", "{ckpt}", "--seed", "-1"], "--seed"),
    (["robustness", "{ckpt}", "--hessian-direction", "0.1", "--hessian-k", "5000", "--out", "{tmp}/r.csv"], "--hessian-k"),
    (["robustness", "{ckpt}", "--input-noise", "0,nan", "--out", "{tmp}/r.csv"], "--input-noise"),
    (["robustness", "{ckpt}", "--input-noise", "-0.1", "--out", "{tmp}/r.csv"], "--input-noise"),
    (["robustness", "{ckpt}", "--salt-pepper", "1.5", "--out", "{tmp}/r.csv"], "--salt-pepper"),
    (["robustness", "{ckpt}", "--input-noise", ",".join(["0.1"] * 101), "--out", "{tmp}/r.csv"], "--input-noise"),
    (["robustness", "{ckpt}", "--input-noise", "0.1", "--seeds", "0", "--out", "{tmp}/r.csv"], "--seeds"),
    (["robustness", "{ckpt}", "--input-noise", "0.1", "--max-samples", "0", "--out", "{tmp}/r.csv"], "--max-samples"),
    (["stability", "{ckpt}", "--time-budget", "-1"], "--time-budget"),
    (["stability", "{ckpt}", "--time-budget", "nan"], "--time-budget"),
    (["stability", "{ckpt}", "--time-budget", "inf"], "--time-budget"),
    (["stability", "{ckpt}", "--certificates", "warp-lmi"], "--certificates"),
    (["certify", "--beta", "0.75", "--gamma-a", "inf", "--radius", "0.1"], "--gamma-a"),
    (["certify", "--beta", "0.75", "--gamma-a", "0.5", "--radius", "-1"], "--radius"),
    (["certify", "--beta", "0.75", "--gamma-a", "0.5", "--radius", "0.1", "--tests", "warp-norm"], "--tests"),
    (["certify", "--beta", "0.75", "--gamma-a", "0.5", "--radius", "0.1", "--phase-betas", "0:1:100000"], "--phase-betas"),
    (["train", "--task", "digits", "--hidden", "100000", "--out", "{tmp}/m.safetensors"], "--hidden"),
    (["train", "--task", "digits", "--lr", "nan", "--out", "{tmp}/m.safetensors"], "--lr"),
    (["train", "--task", "adding", "--length", "1000000000", "--out", "{tmp}/m.safetensors"], "--length"),
    (["train", "--task", "digits", "--epochs", "1.5", "--out", "{tmp}/m.safetensors"], "--epochs"),
    (["train", "--task", "digits", "--threads", "100000", "--out", "{tmp}/m.safetensors"], "--threads"),
    (["audit", "{ckpt}", "--out", "{tmp}/a", "--gate", "min-accuracy=nan"], "min-accuracy"),
    (["audit", "{ckpt}", "--out", "{tmp}/a", "--gate", "min-accuracy=1.5"], "min-accuracy"),
    (["audit", "{ckpt}", "--out", "{tmp}/a", "--gate", "max-lambda=inf"], "max-lambda"),
    (["audit", "{ckpt}", "--out", "{tmp}/a", "--gate", "max-accuracy-drop=gaussian:nan:0.1"], "max-accuracy-drop"),
    (["audit", "{ckpt}", "--out", "{tmp}/a", "--gate", "max-accuracy-drop=salt-pepper:2:0.1"], "salt-pepper"),
])
def test_option_bounds_exit_2_in_one_line_before_any_work(saved, tmp_path, capsys, argv, needle):
    argv = [a.format(ckpt=saved, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "error:" in err and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.usefixtures("time_limit")
def test_a_closed_pipe_ends_quietly(saved):
    process = _run(["info", "--json", str(saved)])
    process.stdout.close()  # the reader is gone before anything is written, as with `| head -0`
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141 and err == b""


@pytest.mark.usefixtures("time_limit")
def test_sigint_is_one_line_exit_130_and_nothing_written(tmp_path):
    out = tmp_path / "model.safetensors"
    code = textwrap.dedent(f"""
        import os, signal, sys, threading
        from lrnn_analysis.cli import main
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        sys.exit(main(["train", "--task", "adding", "--length", "50", "--epochs", "100000", "--quiet", "--out", {str(out)!r}]))
    """)
    process = _run(code)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.decode() == "lrnn train: interrupted\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("time_limit")
def test_sigint_while_starting_up_is_one_line_too(tmp_path):
    # torch and the other heavy libraries load when the command runs: an interrupt while they
    # load (or during the work that follows) is one line.
    out = tmp_path / "never.safetensors"
    code = textwrap.dedent(f"""
        import os, signal, sys, threading
        from lrnn_analysis.__main__ import run
        sys.argv = ["lrnn", "train", "--task", "digits", "--epochs", "100000", "--out", {str(out)!r}, "--quiet"]
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        sys.exit(run())
    """)
    process = _run(code)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.decode() == "lrnn train: interrupted\n", err
    assert not out.exists()


def test_every_command_refuses_a_user_directory_or_file_and_its_inputs(tmp_path, checkpoint, user_dir, capsys):
    ckpt = str(checkpoint)
    existing = tmp_path / "results.csv"
    existing.write_text("my results\n")
    before = {path: snapshot(path) for path in (user_dir, existing, checkpoint, checkpoint.parent)}
    commands = [
        ["audit", ckpt, "--out", str(user_dir)],
        ["audit", ckpt, "--out", str(checkpoint.parent)],
        ["audit", ckpt, "--out", ckpt],
        ["audit", ckpt, "--out", str(existing), "--force"],
        ["reproduce", "--analyses-dir", str(REPO_ROOT / "analyses"), "--out", str(user_dir)],
        ["robustness", ckpt, "--input-noise", "0", "--out", ckpt, "--force"],
        ["robustness", ckpt, "--input-noise", "0", "--out", str(existing)],
        ["robustness", ckpt, "--input-noise", "0", "--out", str(tmp_path / "r.json"), "--json"],
        ["robustness", ckpt, "--input-noise", "0", "--out", str(user_dir), "--force"],
        ["stability", ckpt, "--json", ckpt, "--force"],
        ["stability", ckpt, "--json", str(existing)],
        ["hessian", ckpt, "--json", ckpt, "--force"],
        ["certify", "--beta", "0.5", "--gamma-a", "0.5", "--radius", "0.1", "--phase-betas", "0,1",
         "--phase-gammas", "0,1", "--out", str(existing)],
        ["train", "--task", "digits", "--epochs", "1", "--hidden", "4", "--out", str(existing)],
        ["train", "--task", "digits", "--epochs", "1", "--hidden", "4", "--out", str(user_dir), "--force"],
    ]
    for argv in commands:
        assert main(argv + ["--quiet"] * (argv[0] not in ("certify",))) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (argv, err)
    assert {path: snapshot(path) for path in before} == before
    assert not (tmp_path / "r.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "results.csv"]


def test_an_interrupt_while_the_parser_is_built_is_one_line(monkeypatch, capsys):
    import lrnn_analysis.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["info", "x"]) == 130
    assert capsys.readouterr().err == "lrnn: interrupted\n"


def test_traceback_shows_the_users_own_exception_after_the_one_line(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("def build():\n    raise RuntimeError('my factory is broken')\n")
    spec = f"{tmp_path / 'broken.py'}:build"
    assert main(["stability", "--model", spec]) == 2
    short = capsys.readouterr().err
    assert short.count("\n") == 1 and "build() raised RuntimeError: my factory is broken" in short
    assert main(["--traceback", "stability", "--model", spec]) == 2
    long = capsys.readouterr().err
    assert long.startswith(short) and "Traceback (most recent call last)" in long and "broken.py" in long
