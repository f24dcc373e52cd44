"""`lrnn certify`: the initialisation radius, a reason and a remedy for every "no", the phase diagram's
axes and its table and figure, bad options as exit 2."""
import csv

import pytest

from lrnn_analysis.cli import main
from lrnn_analysis.stability import certify_parameterization, gaussian_init_radius

PAPER = ["certify", "--beta", "0.75", "--gamma", "0.001", "--eps", "0.03", "--hidden", "128", "--init-std", "0.1"]


CERTIFY = ["certify", "--beta", "0.75", "--gamma-a", "1", "--gamma-w", "0", "--eps", "0.1", "--radius", "0.1",
           "--phase-betas", "0:1:3", "--phase-gammas", "0.5,1"]


def test_certify_parameterization_and_phase_table(tmp_path, capsys):
    assert main(["certify", "--beta", "0.75", "--gamma-a", "1", "--gamma-w", "0", "--eps", "0.1", "--radius", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "ct-norm" in printed and "largest certified r*" in printed
    assert main(["certify", "--beta", "0.75", "--gamma-a", "0.001", "--radius", "1"]) == 1
    capsys.readouterr()
    out = tmp_path / "phase.csv"
    assert main(["certify", "--beta", "0.75", "--gamma-a", "1", "--gamma-w", "0", "--eps", "0.1", "--radius", "0.1",
                 "--phase-betas", "0:1:3", "--phase-gammas", "0.5,1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 * 2 * 3 + 3 and set(rows[0]) >= {"beta_A", "gamma_A", "beta_W", "gamma_W", "test", "holds",
                                                           "margin", "r_star", "point"}
    assert [(r["beta_A"], r["gamma_A"]) for r in rows if r["point"] == "user"] == [("0.75", "1.0")] * 3
    assert main(["certify", "--beta", "0.75", "--gamma-a", "1", "--radius", "0.1", "--phase-betas", "0,1"]) == 2


def test_paper_setting_says_why_and_what_to_change(capsys):
    assert main(PAPER) == 1
    out = capsys.readouterr().out
    assert "Gordon" in out and "probability" in out and "0.0218861" in out
    for test in ("ct-norm", "euler-norm", "rk2-norm"):
        assert f"{test}: not certified" in out
    assert out.count("what to change: ") == 3 and "cancels" in out
    assert "one shared gamma" in out and "--gamma-w 0" in out
    result = certify_parameterization(0.75, 0.001, 0.75, 0.0, gaussian_init_radius(128, 0.1).radius, eps=0.03)[0]
    assert f"gamma_A >= {result.gamma_A_interval[0]:.6g}" in out  # the gamma_W = 0 remedy is printed


def test_following_the_remedy_certifies(capsys):
    r = gaussian_init_radius(128, 0.1).radius
    results = certify_parameterization(0.75, 0.001, 0.75, 0.0, r, eps=0.03)
    gamma_a = max(res.gamma_A_interval[0] for res in results)
    assert all(res.gamma_A_interval[0] <= gamma_a <= res.gamma_A_interval[1] for res in results)
    argv = ["certify", "--beta", "0.75", "--gamma-a", repr(gamma_a), "--gamma-w", "0", "--eps", "0.03",
            "--hidden", "128", "--init-std", "0.1"]
    assert main(argv) == 0
    assert "what to change" not in capsys.readouterr().out


def test_phase_diagram_names_the_axes_and_marks_the_user_point(tmp_path, capsys):
    out = tmp_path / "phase.csv"
    assert main(PAPER + ["--phase-betas", "0:1:5", "--phase-gammas", "0:1:7", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "35 cells x 3 tests = 105 rows; 0 of the 105 (cell, test) pairs certified, 0 of the 35 cells" in printed
    assert "0 cells certified because W shares each cell's gamma" in printed
    assert "--gamma-w 0" in printed
    rows = list(csv.DictReader(out.open()))
    assert {"beta_A", "gamma_A", "beta_W", "gamma_W", "point"} <= set(rows[0])
    user = [r for r in rows if r["point"] == "user"]
    assert len(user) == 3 and all((r["beta_A"], r["gamma_A"]) == ("0.75", "0.001") for r in user)
    fixed = tmp_path / "fixed.csv"
    assert main(["certify", "--beta", "0.75", "--gamma-a", "0.5", "--gamma-w", "0", "--eps", "0.03", "--radius", "0.02",
                 "--phase-betas", "0:1:5", "--phase-gammas", "0:1:7", "--out", str(fixed)]) == 0
    rows = list(csv.DictReader(fixed.open()))
    assert {r["gamma_W"] for r in rows} == {"0.0"} and any(r["holds"] == "True" for r in rows)
    assert "gamma_W = 0" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["certify", "--beta", "0.75", "--radius", "0.1"],  # no gamma
    ["certify", "--beta", "0.75", "--gamma", "0.1"],  # no radius
    ["certify", "--beta", "0.75", "--gamma", "0.1", "--radius", "0.1", "--hidden", "8", "--init-std", "0.1"],
    ["certify", "--beta", "0.75", "--gamma", "0.1", "--hidden", "8"],
    ["certify", "--beta", "0.75", "--gamma", "0.1", "--radius", "-1"],
    ["certify", "--beta", "0.75", "--gamma-a", "inf", "--radius", "0.1"],
    ["certify", "--beta", "nan", "--gamma", "0.1", "--radius", "0.1"],
    ["certify", "--beta", "0.75", "--gamma", "0.1", "--radius", "0.1", "--eps", "1e400"],
    ["certify", "--beta", "0.75", "--gamma", "0.1", "--radius", "0.1", "--phase-betas", "0:1:100000000",
     "--phase-gammas", "0,1", "--out", "x.csv"],
    ["certify", "--beta", "0.75", "--gamma", "0.1", "--hidden", "8", "--init-std", "0.1",
     "--init-failure-probability", "1.5"],
])
def test_bad_certify_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_huge_gamma_is_not_certified_without_a_traceback(capsys):
    assert main(["certify", "--beta", "0.75", "--gamma-a", "1e308", "--gamma-w", "0", "--eps", "1", "--radius", "1"]) == 1
    assert "overflows float64" in capsys.readouterr().out


def test_certify_refuses_out_without_a_phase_diagram_before_printing(tmp_path, capsys):
    out = tmp_path / "phase.csv"
    assert main(["certify", "--beta", "0.75", "--gamma-a", "0.5", "--gamma-w", "0", "--radius", "0.1", "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and "--out writes only the phase diagram" in printed.err and not out.exists()


def test_certify_figure_is_written_checked_up_front_and_never_replaces_a_user_file(tmp_path, capsys):
    figure = tmp_path / "phase.pdf"
    assert main(CERTIFY + ["--figure", str(figure)]) == 0
    assert b"/FontFile2" in figure.read_bytes() and f"wrote the figure {figure}" in capsys.readouterr().out
    user = tmp_path / "mine.png"
    user.write_bytes(b"my own figure")
    assert main(CERTIFY + ["--figure", str(user)]) == 2
    assert "exists" in capsys.readouterr().err and user.read_bytes() == b"my own figure"
    assert main(CERTIFY + ["--figure", str(tmp_path / "phase.jpg")]) == 2
    err = capsys.readouterr()
    assert len(err.err.strip().splitlines()) == 1 and ".svg" in err.err and err.out == ""
    assert main(CERTIFY + ["--out", str(tmp_path / "p.csv"), "--figure", str(tmp_path / "p.csv")]) == 2
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "phase.jpg").exists()
    assert main(CERTIFY[:11] + ["--figure", str(tmp_path / "nogrid.png")]) == 2
