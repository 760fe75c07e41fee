"""Teacher-output cache: the frozen teacher's logits and tapped features for every training image,
computed once into memory-mapped ``.npy`` files and reused across epochs and runs.

Valid only when the input pipeline is deterministic (``data.augment: false``): each image then
always reaches the teacher identically. The key hashes the teacher file (SHA-256), the model, the
taps, the dataset description, the split's pixels and its dataset positions, so a different
teacher, dataset, class subset, ``limit`` or normalisation never reuses a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekt.data import DatasetInfo, TensorSplit
from edgekt.data.base import BatchLoader
from edgekt.errors import EdgektError

FORMAT = "edgekt.teacher-cache/1"


def default_cache_dir() -> Path:
    """``$EDGEKT_CACHE/teacher``, else ``~/.cache/edgekt/teacher``."""
    root = os.environ.get("EDGEKT_CACHE") or Path.home() / ".cache" / "edgekt"
    return Path(root) / "teacher"


def split_positions(split: TensorSplit) -> torch.Tensor:
    """Dataset positions of a split's rows (what ``make_loader(with_index=True)`` yields)."""
    return split.indices if split.indices is not None else torch.arange(len(split))


def cache_key(teacher: dict[str, Any], taps: list[str], info: DatasetInfo, split_name: str,
              split: TensorSplit) -> str:
    """SHA-256 over everything that decides the teacher's outputs for this split."""
    h = hashlib.sha256()
    desc = {"format": FORMAT, "teacher_sha256": teacher["sha256"], "model": teacher["model"],
            "kwargs": teacher["kwargs"], "taps": sorted(taps), "data": vars(info),
            "split": split_name}
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(split.images.numpy()).tobytes())
    h.update(split_positions(split).numpy().astype(np.int64).tobytes())
    return h.hexdigest()


class TeacherCache:
    """Read-only memory-mapped teacher outputs, looked up by dataset position."""

    def __init__(self, directory: Path, positions: torch.Tensor) -> None:
        meta = json.loads((directory / "meta.json").read_text())
        self.directory = directory
        self.arrays = {name: np.load(directory / f"{i}.npy", mmap_mode="r", allow_pickle=False)
                       for i, name in enumerate(meta["names"])}
        n = meta["rows"]
        if any(a.shape[0] != n for a in self.arrays.values()) or len(positions) != n:
            raise ValueError("row count mismatch")
        self.row_of = np.full(int(positions.max()) + 1, -1, dtype=np.int64)
        self.row_of[positions.numpy()] = np.arange(n)

    def lookup(self, pos: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        rows = self.row_of[pos.cpu().numpy()]
        if (rows < 0).any():
            raise EdgektError("teacher cache: a batch holds samples outside the cached split")
        return {name: torch.from_numpy(np.ascontiguousarray(a[rows])).to(device, non_blocking=True)
                for name, a in self.arrays.items()}


def open_or_build(root: Path, key: str, split: TensorSplit, loader: BatchLoader,
                  teacher_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                  log: Callable[[str], None] = print) -> TeacherCache:
    """Open the cache entry ``key`` under ``root``, computing it first if absent or unreadable.

    ``loader`` must iterate ``split`` in order without augmentation; ``teacher_fn`` maps a batch
    to named fp32 outputs. The entry is written to a temporary directory and renamed into place,
    so a crash never leaves a half-written entry that looks valid.
    """
    final = root / key
    positions = split_positions(split)
    if final.is_dir():
        try:
            return TeacherCache(final, positions)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            log(f"teacher cache {final} unreadable ({exc}); rebuilding it")
            shutil.rmtree(final, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _fill(tmp, len(split), loader, teacher_fn)
        try:
            os.replace(tmp, final)
        except OSError:  # another process (DDP rank) finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"teacher cache written: {final}")
    return TeacherCache(final, positions)


def _fill(directory: Path, n: int, loader: BatchLoader,
          teacher_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> None:
    arrays: dict[str, np.memmap] = {}
    names: list[str] = []
    row = 0
    for batch in loader:
        out = teacher_fn(batch[0])
        if not arrays:
            names = list(out)
            for i, name in enumerate(names):
                shape = (n, *out[name].shape[1:])
                arrays[name] = np.lib.format.open_memmap(directory / f"{i}.npy", mode="w+",
                                                         dtype=np.float32, shape=shape)
        b = len(batch[0])
        for name in names:
            arrays[name][row:row + b] = out[name].float().cpu().numpy()
        row += b
    for a in arrays.values():
        a.flush()
    del arrays
    for f in directory.iterdir():  # make the data durable before the rename publishes it
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    (directory / "meta.json").write_text(json.dumps({"format": FORMAT, "names": names, "rows": n}))
