"""Stage bookkeeping: a stage is skipped when its record's input hash matches, redone otherwise.

Each finished stage writes ``stages/<name>.json`` (atomically) with the hash of everything it
depends on (its config section, upstream results, the edgekt version). A stage interrupted
before its record was written runs again; stages that train resume from their ``last.pt``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import edgekt
from edgekt.errors import EdgektError
from edgekt.io import atomic_write_text

STAGES = ("teacher", "students", "export", "profile", "report")


def input_hash(*parts: Any) -> str:
    blob = json.dumps([edgekt.__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageRunner:
    """Runs stages in order; ``redo_from`` forces that stage and every later one."""

    def __init__(self, run_dir: Path, redo_from: str | None,
                 log: Callable[[str], None] = print) -> None:
        if redo_from is not None and redo_from not in STAGES:
            raise EdgektError(f"--from {redo_from!r}: expected one of {', '.join(STAGES)}")
        self.dir = run_dir / "stages"
        self.redo = set(STAGES[STAGES.index(redo_from):]) if redo_from else set()
        self.log = log
        self.ran: dict[str, str] = {}

    def record(self, stage: str) -> dict[str, Any] | None:
        p = self.dir / f"{stage}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def run(self, stage: str, key: str, fn: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
        """Return the stage's outputs, computing them with ``fn(fresh)`` unless up to date.

        ``fresh`` is True when earlier partial work must be discarded (inputs changed or --from).
        """
        rec = self.record(stage)
        if rec and rec["hash"] == key and stage not in self.redo:
            self.log(f"[dim]stage {stage}: up to date ({key}), skipped[/]")
            self.ran[stage] = "skipped"
            return rec["outputs"]
        fresh = stage in self.redo or (rec is not None and rec["hash"] != key)
        changed = fresh and rec is not None and stage not in self.redo
        self.log(f"[bold]stage {stage}[/]" + (" (inputs changed: redo)" if changed else ""))
        t0 = time.perf_counter()
        try:
            outputs = fn(fresh)
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / f"{stage}.json", json.dumps(
                {"hash": key, "seconds": time.perf_counter() - t0, "outputs": outputs}, indent=2))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise EdgektError(f"stage {stage}: disk full while writing under "
                                  f"{self.dir.parent} ({exc.filename or ''}); free space and "
                                  f"re-run: finished stages are kept") from None
            raise
        self.ran[stage] = "ran"
        return outputs
