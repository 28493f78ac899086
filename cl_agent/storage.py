"""Crash-safe file writes: temp file, fsync, rename, fsync of the folder.

A reader sees either the old file or the new one, never a partial one, and a
write that returned survives a power cut (as far as the filesystem honours fsync).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from cl_agent.errors import BusyError


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], mode: int | None = None) -> Path:
    """Have ``write(file)`` write ``path``'s new content, atomically and durably; returns the path.

    ``mode``: the file's permission bits, set before the rename (so no reader sees another
    mode); None keeps the private 0600 of a temporary file. Whatever ``write`` raises leaves
    the old file in place and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically and durably (``atomic_write``); returns the path."""
    return atomic_write(path, lambda f: f.write(data), mode)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


WORKDIR_LOCK_FILE = "agent.lock"  # held by a running agent (or `cl-agent ingest`) for its whole life


def lock_workdir(workdir: str | Path):
    """Hold ``workdir``'s lock for as long as the returned file stays open; BusyError (exit 75), naming the
    holder's pid, when an agent or an ingest process holds it. Take it before writing anything there."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock_file = open(workdir / WORKDIR_LOCK_FILE, "a+")
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise BusyError(f"another agent (pid {holder}) is running in {workdir}") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file
