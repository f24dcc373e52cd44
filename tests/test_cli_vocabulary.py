"""The command line's start-up, vocabulary and progress bars: `lrnn --help` loads no heavy
library, every old option spelling still parses, defaults show in --help, bars only on a terminal."""
import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lrnn_analysis import progress
from lrnn_analysis.cli import UsageError, build_parser, main
from lrnn_analysis.cli.audit import audit_grid
from lrnn_analysis.cli.options import json_path_beside
from lrnn_analysis.cli.robustness import BESIDE_CSV
from lrnn_analysis.choices import CERTIFICATES, DISCRETIZATIONS, KINDS, MAX_SIZES, PARAMETERIZATION_TESTS, TASK_NAMES

HEAVY = ("torch", "numpy", "scipy", "cvxpy", "matplotlib", "pandas", "seaborn", "sklearn", "tqdm")
COMMANDS = ("train", "info", "stability", "certify", "hessian", "audit", "reproduce", "robustness")


def _json_path(args):
    return json_path_beside(args.out, args.json, BESIDE_CSV)


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
    checkpoint = Path(__file__).resolve().parents[1] / "models" / "digits-vanilla.safetensors"
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


def test_the_light_name_tables_are_those_the_library_uses():
    from lrnn_analysis.constraints import CONSTRAINTS
    from lrnn_analysis.builtin_tasks import TASKS
    from lrnn_analysis.models.config import DISCRETIZATIONS as MODEL_DISCRETIZATIONS, MAX_SIZES as MODEL_MAX_SIZES
    from lrnn_analysis.robustness import KINDS as ROBUSTNESS_KINDS
    from lrnn_analysis.stability import CERTIFICATES as STABILITY_CERTIFICATES, NORM_TESTS

    assert tuple(TASKS) == TASK_NAMES and MODEL_DISCRETIZATIONS is DISCRETIZATIONS and MODEL_MAX_SIZES is MAX_SIZES
    assert ROBUSTNESS_KINDS is KINDS and STABILITY_CERTIFICATES is CERTIFICATES
    assert set(PARAMETERIZATION_TESTS) == set(NORM_TESTS) and set(CONSTRAINTS) <= set(CERTIFICATES)


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


CKPT = "m.safetensors"


@pytest.mark.parametrize("option", ["--tests", "--certificates"])
def test_certificates_and_tests_are_one_option_in_stability_and_certify(option):
    assert _parse("stability", CKPT, option, "euler-norm,euler-lmi").certificates == ["euler-norm", "euler-lmi"]
    args = _parse("certify", "--beta", "0.75", "--gamma", "0.5", "--radius", "0.1", option, "ct-norm,euler-norm")
    assert args.tests == ["ct-norm", "euler-norm"] and args.gamma == 0.5


@pytest.mark.parametrize("option", ["--top-k", "--hessian-k"])
def test_top_k_and_hessian_k_are_one_option(option):
    assert _parse("robustness", CKPT, "--hessian-direction", "0.1", option, "3", "--out", "r.csv").top_k == 3
    assert _parse("hessian", CKPT, option, "3").top_k == 3


@pytest.mark.parametrize("new, old, kind", [("--input-noise", "--gaussian", "gaussian"),
                                            ("--param-noise", "--gaussian-relative", "gaussian-relative")])
def test_perturbation_options_take_both_spellings(new, old, kind):
    dest = new[2:].replace("-", "_")
    for option in (new, old):
        assert getattr(_parse("robustness", CKPT, option, "0,0.1", "--out", "r.csv"), dest) == [0.0, 0.1]


def test_robustness_json_alone_is_beside_the_csv_and_with_a_path_is_that_file():
    assert _json_path(_parse("robustness", CKPT, "--input-noise", "0", "--out", "r.csv")) is None
    assert _json_path(_parse("robustness", CKPT, "--out", "d/r.csv", "--json")) == Path("d/r.json")
    assert _json_path(_parse("robustness", CKPT, "--out", "r.csv", "--json", "j/s.json")) == Path("j/s.json")
    # A checkpoint after a bare --json would be taken as its PATH: refused, never written over.
    with pytest.raises(UsageError, match="must end in .json"):
        _json_path(_parse("robustness", "--json", CKPT, "b.safetensors", "--out", "r.csv"))


def test_json_spellings_of_info_stability_and_hessian_still_parse():
    assert _parse("info", "--json", CKPT).json and _parse("info", CKPT, "--json").json
    assert _parse("stability", CKPT, "--json", "s.json").json == "s.json"
    assert _parse("hessian", CKPT, "--json", "h.json").json == "h.json"


@pytest.mark.parametrize("spelling", ["gaussian", "input-noise"])
def test_gates_name_a_perturbation_in_either_spelling(spelling):
    gate = _parse("audit", CKPT, "--out", "a", "--gate", f"max-accuracy-drop={spelling}:0.1:0.05").gate[0]
    assert str(gate) == "max-accuracy-drop=gaussian:0.1:0.05"
    gate = _parse("audit", CKPT, "--out", "a", "--gate", "max-accuracy-drop=param-noise:0.02:0.1").gate[0]
    assert gate.value == "gaussian-relative:0.02:0.1"
    assert main(["audit", CKPT, "--out", "a", "--gate", "max-accuracy-drop=hessian-direction:0.1:0.1"]) == 2


def test_audit_levels_take_either_spelling_and_refuse_a_kind_twice(capsys):
    args = _parse("audit", CKPT, "--out", "a", "--levels", "input-noise:0,0.1", "--levels", "salt-pepper:0.01",
                  "--hessian-batches", "2", "--trace-matvecs", "30", "--seeds", "2")
    assert audit_grid(args.levels) == {"gaussian": [0.0, 0.1], "salt-pepper": [0.01]}
    assert (args.hessian_batches, args.trace_matvecs, args.seeds) == (2, 30, 2)
    with pytest.raises(UsageError, match="twice"):
        audit_grid(_parse("audit", CKPT, "--out", "a", "--levels", "gaussian:0.1", "--levels", "input-noise:0.2").levels)
    for bad in ("warp:0.1", "salt-pepper:2", "hessian-direction:0.1", "gaussian"):
        assert main(["audit", CKPT, "--out", "a", "--levels", bad]) == 2
        assert "--levels" in capsys.readouterr().err


def test_every_help_shows_the_defaults_and_the_audit_presets_it_names(capsys, monkeypatch):
    from lrnn_analysis.pipelines.audit import AuditSettings

    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside hyphenated names
    text = {}
    for command in COMMANDS:
        assert main([command, "--help"]) == 0
        text[command] = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "--batch-size BATCH_SIZE (default: 1000)" in text["robustness"]
    assert "--lr LR (default: 0.03)" in text["train"] and "--top-k TOP_K, --hessian-k TOP_K eigenvalues at each end of the spectrum (default: 1)" in text["hessian"]
    assert "--device {auto,cpu,cuda} auto = CUDA when present (default: auto)" in text["audit"]
    quick, thorough = AuditSettings(), AuditSettings.thorough()
    assert f"(default: {quick.hessian_batches}, --thorough {thorough.hessian_batches})" in text["audit"]
    assert f"(default: {quick.trace_matvecs}, --thorough {thorough.trace_matvecs})" in text["audit"]
    assert f"(default: {quick.seeds}, --thorough {thorough.seeds})" in text["audit"]
    assert quick.hessian_batch_size == 128 and "batches of 128 samples" in text["audit"]
    for kind, levels in quick.grid.items():
        assert f"{kind}:{','.join(f'{level:g}' for level in levels)}" in text["audit"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_are_drawn_only_on_a_terminal(monkeypatch):
    for stream, enabled, drawn in [(_Terminal(), True, True), (_Terminal(), False, False), (io.StringIO(), True, False)]:
        monkeypatch.setattr(sys, "stderr", stream)
        assert progress.bars_shown(enabled) is drawn
        for _ in progress.progress_bar(range(3), enabled=enabled, desc="work", mininterval=0):
            pass
        assert ("\r" in stream.getvalue()) is drawn


def test_a_command_run_into_a_log_writes_no_progress_bar(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["train", "--task", "digits", "--hidden", "4", "--epochs", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "epoch" not in err, err
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["epochs"] == 2


def test_info_names_the_format_of_a_pytorch_dict_checkpoint(tmp_path, capsys):
    import torch

    from lrnn_analysis.models import ModelConfig, build_model

    model = build_model(ModelConfig("lipschitz", 1, 3, 10), seed=0)
    path = tmp_path / "dict.pt"
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, path)
    assert main(["info", str(path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"checkpoint {path} (PyTorch file with a config and a state dict)" and "None" not in first


def test_certify_refuses_out_without_a_phase_diagram_before_printing(tmp_path, capsys):
    out = tmp_path / "phase.csv"
    assert main(["certify", "--beta", "0.75", "--gamma-a", "0.5", "--gamma-w", "0", "--radius", "0.1", "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and "--out writes only the phase diagram" in printed.err and not out.exists()
