"""Atomic file writes: temp file in the same directory, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from edgekt.errors import EdgektError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temp file next to ``path``, fsync it, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        check_writable(path)  # names the ancestor that is a file
        raise
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def check_writable(path: str | Path, what: str = "output", *, directory: bool = False) -> Path:
    """Refuse, before any heavy work, an output path that cannot be created.

    Catches the usual mistakes: an ancestor that is a regular file, a file where a directory
    is wanted (or the reverse), and a directory that exists but is not writable.
    """
    p = Path(path)
    if p.exists() and p.is_dir() != directory:
        kind = "a directory" if p.is_dir() else "a file"
        raise EdgektError(f"{what} {p} is {kind}; expected a "
                          f"{'directory' if directory else 'file'} path")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise EdgektError(f"{what} {p}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK) and not p.exists():
                raise EdgektError(f"{what} {p}: directory {parent} is not writable")
            break
    return p


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _fsync_dir(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
