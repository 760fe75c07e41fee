"""Crash-safe state files for the device: numpy arrays + JSON, written atomically, generations kept.

A save writes ``NAME.tmp``, fsyncs it and renames it over ``NAME``; the previous generation is
kept as ``NAME.prev``. ``NAME`` always exists once the first save returned, so a process killed
at any instant restarts from the last committed state. A file whose checksum does not match is
refused; the loader falls back to ``NAME.prev`` and says so, and never silently starts empty.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekt.errors import EdgektError
from edgekt.io import atomic_write

log = logging.getLogger(__name__)

_META = "__meta__"


class StateCorruptError(EdgektError):
    """The state file (and its previous generation) cannot be trusted."""


@dataclass
class State:
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    generation: int = 0


def _digest(arrays: dict[str, np.ndarray], meta_json: str) -> str:
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_state(path: str | Path, state: State) -> int:
    """Commit ``state`` as the next generation; returns the generation number written."""
    path = Path(path)
    state.generation += 1
    meta_json = json.dumps(state.meta, sort_keys=True)
    header = {"generation": state.generation, "meta": meta_json,
              "sha256": _digest(state.arrays, meta_json)}
    buf = io.BytesIO()
    np.savez(buf, **state.arrays, **{_META: np.frombuffer(json.dumps(header).encode(), np.uint8)})
    if path.exists():
        # Keep the last committed generation as NAME.prev, replaced atomically as well.
        tmp_prev = path.with_name(path.name + ".prev.tmp")
        if tmp_prev.exists():
            tmp_prev.unlink()
        os.link(path, tmp_prev)
        os.replace(tmp_prev, path.with_name(path.name + ".prev"))
    atomic_write(path, lambda f: f.write(buf.getbuffer()))
    return state.generation


def _read(path: Path) -> State:
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a bare .npy array, not an .npz archive")
            if _META not in z.files:
                raise ValueError(f"no {_META!r} entry: not an edgekt state file")
            header = json.loads(bytes(z[_META]).decode())
            arrays = {k: z[k] for k in z.files if k != _META}
        if not isinstance(header, dict) or not {"meta", "sha256", "generation"} <= set(header):
            raise ValueError(f"{_META!r} is not an edgekt state header")
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors.
        raise StateCorruptError(f"{path}: unreadable state file ({exc})") from None
    if _digest(arrays, str(header["meta"])) != header["sha256"]:
        raise StateCorruptError(f"{path}: checksum mismatch (file damaged)")
    try:
        meta, generation = json.loads(header["meta"]), int(header["generation"])
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a mapping")
    except (ValueError, TypeError) as exc:
        raise StateCorruptError(f"{path}: unreadable state header ({exc})") from None
    return State(arrays, meta, generation)


def load_state(path: str | Path) -> State | None:
    """Load the newest good generation, or None when no state was ever saved.

    Raises StateCorruptError when state files exist but none is intact (the damaged files are
    left in place for inspection; delete them to start empty on purpose).
    """
    path = Path(path)
    prev = path.with_name(path.name + ".prev")
    if not path.exists() and not prev.exists():
        return None
    try:
        return _read(path)
    except StateCorruptError as exc:
        if not prev.exists():
            raise StateCorruptError(f"{exc}; no previous generation to fall back to. Move the "
                                    f"file away to start with an empty state.") from None
        log.warning("%s; falling back to the previous generation %s", exc, prev)
        try:
            state = _read(prev)
        except StateCorruptError as exc2:
            raise StateCorruptError(f"{exc}; previous generation also bad: {exc2}") from None
        state.meta["_recovered_from"] = str(prev)
        return state
