"""Outputs never destroy or escape: user files survive, inputs are never written, special files are
refused, report directories are replaced whole (even when killed), concurrent runs are refused,
leftovers are cleaned and modes follow the umask."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import REPO_ROOT, snapshot, write_report
from lrnn_analysis import outputs
from lrnn_analysis.outputs import MARKER, OutputDirectory, OutputError, atomic_write, check_output_file
from lrnn_analysis.writers import write_json

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from lrnn_analysis import outputs

    target, point, tag = sys.argv[1:4]
    if point != "none":
        name, when = point.split(":")
        original = getattr(outputs, name)
        def wrapped(*args, **kwargs):
            if when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(outputs, name, wrapped)
    with outputs.OutputDirectory(target, "lrnn audit") as out:
        names = ("report.json", "report.md", "spectra.png")
        for name in names:
            outputs.atomic_write(out.path(name), lambda tmp, n=name: tmp.write_text(tag + " " + n))
        out.publish({"report": list(names)})
""")


def run_writer(target: Path, point: str, tag: str) -> int:
    return subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), point, tag], cwd=REPO_ROOT, timeout=60).returncode


def report_tag(target: Path) -> str:
    """The tag of the complete report at ``target`` (fails if it is missing, partial or mixed)."""
    marker = json.loads((target / MARKER).read_text())
    names = marker["groups"]["report"]
    tags = {(target / name).read_text().split()[0] for name in names}
    assert sorted(names) == ["report.json", "report.md", "spectra.png"] and len(tags) == 1
    assert set(os.listdir(target)) - {outputs.STAGING_MARKER} == set(names) | {MARKER}
    return tags.pop()


def test_an_existing_file_is_replaced_only_with_force_and_never_an_input(tmp_path):
    existing = tmp_path / "r.csv"
    existing.write_text("mine")
    with pytest.raises(OutputError, match="exists; add --force"):
        check_output_file(existing)
    assert check_output_file(existing, force=True) == existing
    source = tmp_path / "model.safetensors"
    source.write_text("weights")
    os.link(source, tmp_path / "hard.safetensors")
    (tmp_path / "soft.safetensors").symlink_to(source)
    for alias in (source, tmp_path / "hard.safetensors", tmp_path / "sub" / ".." / "model.safetensors"):
        with pytest.raises(OutputError, match="input"):
            check_output_file(alias, force=True, inputs=[tmp_path / "soft.safetensors"])
    with pytest.raises(OutputError, match="same file"):
        check_output_file(tmp_path / "new.json", others=[tmp_path / "." / "new.json"])
    assert source.read_text() == "weights" and existing.read_text() == "mine"


def test_special_files_links_and_directories_are_never_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link.csv"
    (tmp_path / "victim.txt").write_text("keep")
    link.symlink_to(tmp_path / "victim.txt")
    for path, kind in ((fifo, "FIFO"), (link, "symbolic link"), (tmp_path, "directory")):
        with pytest.raises(OutputError, match=kind):
            check_output_file(path, force=True)
        with pytest.raises(OutputError, match=kind):
            atomic_write(path, lambda tmp: tmp.write_text("x"))
    with pytest.raises(OutputError, match="device node"):
        atomic_write("/dev/null", lambda tmp: tmp.write_text("x"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_file(tmp_path / "file" / "out.csv")
    assert (tmp_path / "victim.txt").read_text() == "keep" and link.is_symlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_a_device_node_is_refused(tmp_path):
    node = tmp_path / "null"
    os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))
    with pytest.raises(OutputError, match="device node"):
        check_output_file(node, force=True)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_created_files_and_directories_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.csv", lambda tmp: tmp.write_text("x"))
        with OutputDirectory(tmp_path / "report", "lrnn audit") as out:
            write_report(out, "new")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "report").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "report" / "report.md").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_dead_writers_temporary_file_is_removed_and_a_live_ones_kept(tmp_path):
    import fcntl

    dead = tmp_path / f".r.csv{outputs.TEMP_INFIX}dead"
    live = tmp_path / f".r.csv{outputs.TEMP_INFIX}live"
    dead.write_text("partial")
    live.write_text("partial")
    with open(live) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        atomic_write(tmp_path / "r.csv", lambda tmp: tmp.write_text("whole"))
    assert not dead.exists() and live.exists() and (tmp_path / "r.csv").read_text() == "whole"


def test_a_directory_lrnn_did_not_write_is_refused_untouched(tmp_path, user_dir):
    before = snapshot(user_dir)
    with pytest.raises(OutputError, match="not written by lrnn"):
        with OutputDirectory(user_dir, "lrnn audit", force=True):
            pass
    assert snapshot(user_dir) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_previous_report_is_replaced_and_only_its_own_files(tmp_path):
    target = tmp_path / "report"
    target.mkdir()  # an empty directory holds nothing to lose
    with OutputDirectory(target, "lrnn audit") as out:
        write_report(out, "one")
    marker = json.loads((target / MARKER).read_text())
    assert marker == {"writer": "lrnn audit", "groups": {"report": ["report.json", "report.md", "spectra.png"]}}
    with OutputDirectory(target, "lrnn audit") as out:
        write_report(out, "two", names=("report.json",))
    assert snapshot(target) == {MARKER: (target / MARKER).read_bytes(), "report.json": b"two report.json"}
    with pytest.raises(OutputError, match="add --force"):
        OutputDirectory(target, "lrnn reproduce").__enter__()
    (target / "mine.txt").write_text("added by the user")
    with pytest.raises(OutputError, match="mine.txt"):
        OutputDirectory(target, "lrnn audit", force=True).__enter__()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


@pytest.mark.parametrize("make", [lambda p: p.write_text("plain"), lambda p: p.symlink_to(p.parent / "elsewhere"),
                                  lambda p: os.mkfifo(p)])
def test_a_file_link_or_fifo_at_a_report_path_is_refused(tmp_path, make):
    (tmp_path / "elsewhere").mkdir()
    make(tmp_path / "report")
    before = os.lstat(tmp_path / "report")
    with pytest.raises(OutputError, match="not a report directory"):
        OutputDirectory(tmp_path / "report", "lrnn audit", force=True).__enter__()
    assert os.lstat(tmp_path / "report").st_ino == before.st_ino


@pytest.mark.parametrize("name", ["../escape.csv", "/tmp/abs.csv", "", ".", "..", "a/b.csv", ".hidden", "a..b"])
def test_names_inside_a_report_are_confined(tmp_path, name):
    with OutputDirectory(tmp_path / "report", "lrnn audit") as out:
        with pytest.raises(OutputError, match="not a valid output name"):
            out.path(name)
    assert list(tmp_path.iterdir()) == []


def test_an_input_inside_the_report_directory_is_refused(tmp_path):
    with OutputDirectory(tmp_path / "report", "lrnn audit") as out:
        write_report(out, "one")
    with pytest.raises(OutputError, match="input"):
        OutputDirectory(tmp_path / "report", "lrnn audit", inputs=[tmp_path / "report" / "report.json"]).__enter__()


def test_a_second_concurrent_run_is_refused_and_leaves_nothing(tmp_path):
    target = tmp_path / "report"
    with OutputDirectory(target, "lrnn audit") as first:
        with pytest.raises(OutputError, match="another lrnn run"):
            OutputDirectory(target, "lrnn audit").__enter__()
        write_report(first, "first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert (target / "report.md").read_text() == "first report.md"


def test_without_renameat2_the_swap_still_replaces_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_RENAMEAT2", None)
    for tag in ("one", "two"):
        with OutputDirectory(tmp_path / "report", "lrnn audit") as out:
            write_report(out, tag)
    assert (tmp_path / "report" / "report.md").read_text() == "two report.md"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


@pytest.mark.parametrize("point", ["atomic_write:before", "atomic_write:after", "_exchange:before", "_exchange:after",
                                   "_remove_report:before", "_remove_report:after", "_fsync_directory:after"])
def test_a_killed_report_write_leaves_the_old_or_the_new_report(tmp_path, point):
    target = tmp_path / "report"
    assert run_writer(target, "none", "old") == 0
    assert run_writer(target, point, "new") == -signal.SIGKILL
    assert report_tag(target) in ("old", "new")
    assert run_writer(target, "none", "next") == 0
    assert report_tag(target) == "next"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # leftovers and the lock are gone


def test_only_the_toolkits_own_leftovers_are_cleaned(tmp_path):
    staging = tmp_path / f".report{outputs.STAGING_INFIX}abc"
    staging.mkdir()
    (staging / outputs.STAGING_MARKER).write_text("lrnn audit\nhalf.png\n")  # a killed run records before writing
    (staging / "half.png").write_text("partial")
    lookalike = tmp_path / f".report{outputs.STAGING_INFIX}mine"
    lookalike.mkdir()
    (lookalike / "precious.txt").write_text("keep")
    with OutputDirectory(tmp_path / "report", "lrnn audit") as out:
        write_report(out, "new")
    assert not staging.exists() and (lookalike / "precious.txt").read_text() == "keep"


def test_a_leftover_staging_directory_keeps_files_lrnn_did_not_record(tmp_path):
    """A directory named like a killed run's staging directory, holding a staging marker and a
    file of the user's, is cleaned of what lrnn recorded only: the user's file survives."""
    target = tmp_path / "report"
    leftover = tmp_path / ".report.lrnn-staging-abc123"
    leftover.mkdir()
    (leftover / ".lrnn-staging").write_text("lrnn audit\nreport.json\n")
    (leftover / "report.json").write_text("{}")
    (leftover / "mine.txt").write_text("keep me")
    with OutputDirectory(target, "lrnn audit") as out:
        write_json(out.path("report.json"), {"a": 1})
        out.publish({"report": ["report.json"]})
    assert (leftover / "mine.txt").read_text() == "keep me"
    assert not (leftover / "report.json").exists() and not (leftover / ".lrnn-staging").exists()
    assert json.loads((target / "report.json").read_text()) == {"a": 1}
