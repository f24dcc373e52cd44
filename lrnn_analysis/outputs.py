"""Where ``lrnn`` may write, and how it replaces what it wrote before.

Every command that writes goes through this module; the README's "Safety" section states
the rules as promises:

* A file output (``check_output_file`` before computing, ``atomic_write`` to write) is
  refused when it is an input of the command, when two outputs of one command are the same
  file, when the path is a symbolic link, directory, device node, FIFO or socket, and, when
  it exists, unless ``--force``. The file is written beside the target and renamed into
  place, so a reader sees the old file or the whole new one. Modes follow the umask.
* A report directory (``OutputDirectory``) carries a marker file, ``.lrnn-report``, naming
  the command that wrote it and every file it holds. An existing directory is replaced only
  when it is empty or is such a report holding nothing but the files its marker lists; a
  report of another command needs ``--force``. The new report is built in a staging
  directory beside the target and swapped in with one ``renameat2(RENAME_EXCHANGE)``, so a
  kill at any moment leaves the old or the new report at the target. A lock file beside the
  target makes a second concurrent run exit with an error, and the next run removes the
  staging directories and temporary files a killed run left (only those this module made:
  their names carry an ``lrnn`` prefix and the directories a marker).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["MARKER", "OutputDirectory", "OutputError", "STAGING_INFIX", "STAGING_MARKER", "TEMP_INFIX",
    "atomic_write", "check_name", "check_output_file"]

MARKER = ".lrnn-report"
STAGING_MARKER = ".lrnn-staging"
TEMP_INFIX = ".lrnn-tmp-"
STAGING_INFIX = ".lrnn-staging-"
_RETIRED_INFIX = ".lrnn-old-"
_LOCK_SUFFIX = ".lrnn-lock"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


class OutputError(InputError):
    """An output location that ``lrnn`` must not (or cannot) write; reported with exit code 2."""


def check_name(name: Any, what: str) -> str:
    """A file name for inside an output directory: letters, digits, ``_ - . +``, no separators,
    no ``..``, not starting with a dot, at most 128 characters."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise OutputError(f"{what}: {name!r} is not a valid output name (letters, digits, '_', '-', '.', '+'; "
                          "no path separators, no '..', not empty, not starting with '.')")
    return name


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a device node"),
                       (stat.S_ISBLK, "a device node"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one existing file (same device and inode: links and symlinks count)."""
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def _inside(path: str | Path, directory: str | Path) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _check_parent(path: Path) -> None:
    """The nearest existing ancestor of ``path`` is a writable directory (missing ones get created)."""
    ancestor = path.parent
    while _lstat(ancestor) is None and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{path}: cannot write here: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write here: {ancestor} is not writable")


def check_output_file(path: str | Path, *, force: bool = False, inputs: Iterable[str | Path | None] = (),
                      others: Iterable[str | Path | None] = ()) -> Path:
    """Check, before computing, that ``path`` may receive a file output: not an input, not one of
    the command's ``others`` outputs, not a special file or symlink, absent unless ``force``,
    and in a writable place."""
    target = Path(path)
    if target.name in ("", ".", ".."):
        raise OutputError(f"{path}: an output file needs a file name")
    info = _lstat(target)
    for source in filter(None, inputs):
        if (info is not None and _same_file(target, source)) or os.path.realpath(target) == os.path.realpath(source):
            raise OutputError(f"{path}: is an input of this command ({source}); refusing to overwrite it")
    for other in filter(None, others):
        if os.path.realpath(target) == os.path.realpath(other) or _same_file(target, other):
            raise OutputError(f"{path}: two outputs of this command would be the same file ({other})")
    if info is not None:
        if not stat.S_ISREG(info.st_mode):
            raise OutputError(f"{path}: is {_kind(info.st_mode)}; only a regular file is ever replaced")
        if not force:
            raise OutputError(f"{path}: exists; add --force to replace it")
    _check_parent(target)
    return target


def _refuse_non_regular(target: Path) -> None:
    info = _lstat(target)
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise OutputError(f"{target}: is {_kind(info.st_mode)}; only a regular file is ever replaced")


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_orphan_temporaries(target: Path) -> None:
    """Temporary files of ``atomic_write`` for ``target`` whose writer is gone (its lock is free)."""
    for candidate in target.parent.glob(f".{_glob_escape(target.name)}{TEMP_INFIX}*"):
        try:
            descriptor = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(descriptor).st_mode):
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                candidate.unlink()
        except OSError:
            pass
        finally:
            os.close(descriptor)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    Only an absent path or a regular file is replaced; the file gets mode ``0o666 & ~umask``.
    The temporary file stays locked while it is written, so a later call can tell a killed
    writer's leftover from a live one's and remove it."""
    target = Path(path)
    _refuse_non_regular(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphan_temporaries(target)
    descriptor, tmp_name = tempfile.mkstemp(prefix=f".{target.name}{TEMP_INFIX}", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.fchmod(descriptor, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb") as stream:
            os.fsync(stream.fileno())
        _refuse_non_regular(target)
        os.replace(tmp, target)
        _fsync_directory(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(descriptor)
    return target


def _libc_renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _libc_renameat2()


def _renameat2(source: Path, destination: Path, flags: int) -> bool:
    """``renameat2(source, destination, flags)``; False where the kernel or filesystem lacks it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(destination))


def _exchange(staging: Path, target: Path) -> Path:
    """Put ``staging`` at ``target``; returns where the previous ``target`` now is.

    Atomic with ``RENAME_EXCHANGE``; without it (old kernels, some filesystems) two renames,
    and a kill between them leaves the previous report at ``retired``, beside the target."""
    if _renameat2(staging, target, _RENAME_EXCHANGE):
        return staging
    retired = target.parent / f".{target.name}{_RETIRED_INFIX}{secrets.token_hex(6)}"
    os.rename(target, retired)
    os.rename(staging, target)
    return retired


def _place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to the absent ``target`` without ever replacing something that appeared there."""
    if not _renameat2(staging, target, _RENAME_NOREPLACE):
        if _lstat(target) is not None:
            raise OutputError(f"{target}: appeared while the report was written; the new report is left at {staging}")
        os.rename(staging, target)


def _read_marker(directory: Path) -> dict[str, Any] | None:
    marker = directory / MARKER
    info = _lstat(marker)
    if info is None or not stat.S_ISREG(info.st_mode) or info.st_size > 1 << 20:
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(data.get("writer") if isinstance(data, dict) else None, str) or not isinstance(groups, dict):
        return None
    if not all(isinstance(files, list) and all(isinstance(f, str) and _NAME.fullmatch(f) and ".." not in f for f in files)
               for files in groups.values()):
        return None
    return data


def _listed(marker: Mapping[str, Any]) -> set[str]:
    return {name for files in marker["groups"].values() for name in files}


def _staged_names(directory: Path) -> set[str]:
    """The file names a staging directory's marker records (its first line is the writer)."""
    try:
        lines = (directory / STAGING_MARKER).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return set()
    return {line for line in lines[1:] if line and "/" not in line and line not in (".", "..")}


def _remove_report(directory: Path) -> bool:
    """Remove a directory this module made: the files its report marker (or, for a staging
    directory, its staging marker) lists, its markers and temporary files, then the directory
    itself if nothing else is left; a file nobody recorded stays, and so does the directory.
    Returns whether it is gone."""
    marker = _read_marker(directory)
    temporaries = {path.name for path in directory.glob(f".*{TEMP_INFIX}*")}
    recorded = _listed(marker) if marker else _staged_names(directory)
    for name in recorded | {MARKER, STAGING_MARKER} | temporaries:
        path = directory / name
        info = _lstat(path)
        if info is not None and not stat.S_ISDIR(info.st_mode):
            path.unlink()
    try:
        directory.rmdir()
    except OSError:
        return False
    return True


class OutputDirectory:
    """A report directory: checked and locked before computing, built in a staging directory,
    published whole.

        with OutputDirectory("audit", "lrnn audit", inputs=[checkpoint]) as out:
            ...                                     # compute
            write_json(out.path("report.json"), report)
            out.publish({"report": ["report.json"]})

    ``keep_other_groups``: a previous report's groups (a recipe's files, say) that this run
    does not write are carried into the new report instead of being dropped."""

    def __init__(self, target: str | Path, writer: str, *, force: bool = False,
                 inputs: Iterable[str | Path | None] = (), keep_other_groups: bool = False):
        self.target = Path(os.path.abspath(target))
        self.writer = writer
        self.force = force
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.keep_other_groups = keep_other_groups
        self.staging: Path | None = None
        self.previous: dict[str, Any] | None = None
        self._written: set[str] = set()
        self._lock: int | None = None
        self._lock_path = self.target.parent / f".{self.target.name}{_LOCK_SUFFIX}"

    def _check(self) -> None:
        """Refuse a target this run may not replace (raises OutputError)."""
        target = self.target
        if target.name in ("", ".", ".."):
            raise OutputError(f"{target}: not usable as an output directory")
        for source in self.inputs:
            if _inside(source, target):
                raise OutputError(f"{target}: holds {source}, an input of this command; choose another output directory")
        info = _lstat(target)
        self.previous = None
        if info is None:
            _check_parent(target)
            return
        if not stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{target}: exists and is {_kind(info.st_mode)}, not a report directory; nothing was written")
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise OutputError(f"{target}: cannot replace it: {target.parent} is not writable")
        entries = set(os.listdir(target))
        if not entries - {STAGING_MARKER}:
            return
        marker = _read_marker(target)
        if marker is None:
            raise OutputError(f"{target}: exists and was not written by lrnn (no valid {MARKER} marker); "
                              "choose another output directory")
        unknown = sorted(entries - _listed(marker) - {MARKER, STAGING_MARKER})
        if unknown:
            raise OutputError(f"{target}: holds files lrnn did not write ({', '.join(unknown[:3])}"
                              f"{', ...' if len(unknown) > 3 else ''}); move them away first")
        for name in sorted(_listed(marker) & entries):
            entry = _lstat(target / name)
            if entry is not None and not stat.S_ISREG(entry.st_mode):
                raise OutputError(f"{target / name}: is {_kind(entry.st_mode)}; only regular files are ever replaced")
        if marker["writer"] != self.writer and not self.force:
            raise OutputError(f"{target}: holds a report of `{marker['writer']}`; add --force to replace it")
        self.previous = marker

    def _acquire_lock(self) -> None:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if (os.fstat(descriptor).st_ino, os.fstat(descriptor).st_dev) != (os.stat(self._lock_path).st_ino,
                                                                                os.stat(self._lock_path).st_dev):
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(descriptor)
            raise OutputError(f"{self.target}: another lrnn run is writing it (lock {self._lock_path}); "
                              "try again when it has finished") from None
        self._lock = descriptor

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock_path.unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None

    def _remove_leftovers(self) -> None:
        """Staging and retired directories of killed runs into the same target (we hold the lock,
        so no live run owns them). A retired report is kept while the target is missing: it is
        the last complete report, which a kill between two non-atomic renames left there."""
        name = _glob_escape(self.target.name)
        for leftover in self.target.parent.glob(f".{name}{STAGING_INFIX}*"):
            if leftover.is_dir() and not leftover.is_symlink():
                _remove_report(leftover)
        if _lstat(self.target) is not None:
            for leftover in self.target.parent.glob(f".{name}{_RETIRED_INFIX}*"):
                if leftover.is_dir() and not leftover.is_symlink() and _read_marker(leftover) is not None:
                    _remove_report(leftover)

    def __enter__(self) -> OutputDirectory:
        self._check()
        self._acquire_lock()
        try:
            self._remove_leftovers()
            self._check()
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}{STAGING_INFIX}", dir=self.target.parent))
            (self.staging / STAGING_MARKER).write_text(self.writer + "\n")
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self.staging is not None:
                _remove_report(self.staging)
                self.staging = None
        finally:
            self._release_lock()

    def path(self, name: str) -> Path:
        """Where to write the file ``name`` of the new report (inside the staging directory)."""
        if self.staging is None:
            raise RuntimeError("OutputDirectory.path outside its with-block")
        check_name(name, str(self.target))
        if name in self._written:
            raise OutputError(f"{self.target}: two outputs of this run are named {name}")
        path = self.staging / name
        if not _inside(path, self.staging):
            raise OutputError(f"{path}: resolves outside {self.target}")
        self._record(name)
        self._written.add(name)
        return path

    def _record(self, name: str) -> None:
        """Note ``name`` in the staging marker before writing it, so that the next run removes
        what a killed run left there and nothing else."""
        with open(self.staging / STAGING_MARKER, "a") as stream:
            stream.write(name + "\n")

    @property
    def written(self) -> list[str]:
        """The names this run has written so far."""
        return sorted(name for name in self._written if self.staging is not None and (self.staging / name).exists())

    def publish(self, groups: Mapping[str, Sequence[str]]) -> Path:
        """Write the marker and swap the staging directory in at the target (see the module text).

        ``groups`` maps a group (the report, a recipe's output) to the file names it wrote."""
        staging = self.staging
        if staging is None:
            raise RuntimeError("OutputDirectory.publish outside its with-block or twice")
        listed = {name for files in groups.values() for name in files}
        if listed != set(self.written):
            raise RuntimeError(f"the groups list {sorted(listed)} but the run wrote {self.written}")
        kept = {group: list(files) for group, files in groups.items()}
        if self.keep_other_groups and self.previous is not None:
            for group, files in self.previous["groups"].items():
                carried = [name for name in files if group not in kept and name not in listed
                           and _lstat(self.target / name) is not None]
                if carried:
                    for name in carried:
                        self._record(name)
                        _carry(self.target / name, staging / name)
                    kept[group] = carried
        marker = {"writer": self.writer, "groups": {group: sorted(files) for group, files in sorted(kept.items())}}
        atomic_write(staging / MARKER, lambda tmp: tmp.write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n"))
        os.chmod(staging, 0o777 & ~_umask())
        _fsync_directory(staging)
        if self.previous is None and _lstat(self.target) is None:
            _place(staging, self.target)
        else:
            old = _exchange(staging, self.target)
            if not _remove_report(old):
                print(f"lrnn: warning: the previous report was kept at {old} (it holds files lrnn did not write)",
                      file=sys.stderr)
        self.staging = None
        (self.target / STAGING_MARKER).unlink(missing_ok=True)
        _fsync_directory(self.target.parent)
        return self.target


def _carry(source: Path, destination: Path) -> None:
    """A previous report's file into the new one: a hard link (the old directory is removed
    right after), or a copy where links are not possible."""
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)
