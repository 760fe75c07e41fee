"""Advisory inter-process lock for device state files (``fcntl.flock`` on ``NAME.lock``).

Few-shot and continual state files are read-modify-commit: two processes changing one file at
once would each commit their own view and silently lose the other's change. Every writer takes
this lock around its read-modify-commit. The lock file is never deleted (deleting it would let
two processes lock two different files); it holds the pid of the last holder, for the message
shown to a process that gives up waiting. The lock is released when the holder exits, however
it exits (the kernel drops ``flock`` locks with the file descriptor).

On a system without ``fcntl`` (Windows) there is no inter-process locking: one process per
state file there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgekt.errors import EdgektError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

DEFAULT_TIMEOUT = 10.0
"""Seconds a writer waits for another one; a commit takes milliseconds, so this is generous."""


class StateLockedError(EdgektError):
    """Another process held the state file's lock for longer than the timeout."""


def lock_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".lock")


@contextmanager
def state_lock(path: str | Path, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Hold the exclusive lock of state file ``path`` (waits up to ``timeout`` seconds)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    lp = lock_path(path)
    lp.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StateLockedError(
                        f"{path} is being changed by another process ({_holder(fd)}; lock file "
                        f"{lp}) and it did not finish within {timeout:g} s. Let it finish (or "
                        "stop it) and try again; one process should own a state file."
                    ) from None
                time.sleep(0.005)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "holder unknown"
