"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file the project writes that something later reads (configs, manifests, reports, checkpoints) goes through
here: write to a temporary name in the same directory, flush and fsync, then `os.replace`, which is atomic on POSIX
file systems when source and target share a directory.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def writable_dir_problem(path: str | os.PathLike) -> str | None:
    """Why a directory cannot be created or written at `path` (None when it can), found by writing a probe file
    in it, or in its nearest existing ancestor when it does not exist yet (nothing is left behind)."""
    path = Path(path).expanduser()
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.is_symlink():
            return f"{probe_dir} is a broken symlink"
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"{probe_dir} is not a directory, so {path} cannot be created"
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        where = "" if probe_dir == path else f" (its nearest existing parent {probe_dir})"
        return f"{path}{where} is not writable: {err.strerror or err}"
    return None


def umask_mode(directory: bool = False) -> int:
    """The mode `open()` / `mkdir()` would give a new file (0666) or directory (0777) under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically, creating parent directories; returns the path.

    The file gets the mode of any newly created file (0666 less the umask: 0644 with the usual 022), not mkstemp's
    private 0600: a teammate on a shared cluster can read the adapter, configs and reports as they read the rest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # The temporary file is ours alone; remove it so a failed write leaves no debris, then re-raise.
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write `obj` as UTF-8 JSON (non-ASCII kept readable: Arabic text stays Arabic) atomically."""
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def replace_directory(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move a fully written `staging` directory to `target`, replacing any previous `target`.

    The previous directory is renamed aside first and deleted only after the new one is in place, so an
    interruption leaves either the old or the new directory under `target` (plus, at worst, a `.old` leftover).
    """
    staging, target = Path(staging), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)
    return target


def _owner() -> str:
    """`<host>-<pid>`: who writes a staging directory, so a later run can tell a dead writer's leftovers from a live
    one's work."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname())}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_staging(target: str | os.PathLike, started: float) -> tuple[list[Path], list[Path]]:
    """(stale, live) staging directories `staged_directory` left beside `target`.

    Stale: written on this host by a process that is no longer alive, or (named before owners were recorded)
    last changed before `started`, the time the current run began. Live: anything else (a concurrent run on this
    host, or one on another host sharing the file system, which cannot be checked); those are never touched."""
    target = Path(target)
    if not target.parent.is_dir():
        return [], []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:(?P<host>.+)-(?P<pid>\d+)-)?[^.]*\.partial$")
    host = _owner().rsplit("-", 1)[0]
    stale, live = [], []
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.*.partial")):
        match = pattern.match(path.name)
        if match is None or not path.is_dir():
            continue
        if match["pid"] is not None and match["host"] == host:
            dead = int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"]))
        elif match["pid"] is None:
            try:
                dead = path.stat().st_mtime < started
            except OSError:
                continue
        else:
            dead = False
        (stale if dead else live).append(path)
    return stale, live


@contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh directory beside `target` to write into, published as `target` when the block succeeds.

    On success every file and directory gets the umask's mode (temporary ones are created private) and the directory
    replaces `target` (`replace_directory`); if the block raises, the staging directory is removed and `target` is
    untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_owner()}-", suffix=".partial", dir=target.parent))
    try:
        yield staging
        for path in [staging, *staging.rglob("*")]:
            path.chmod(umask_mode(directory=path.is_dir()))
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
