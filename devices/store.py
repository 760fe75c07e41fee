"""Profile results as JSONL: one line per row, keyed so a later run finds its predecessor.

The key is (model sha256, device fingerprint id, backend, settings that change latency), so a
row is compared only with the same model on the same hardware and runtime version with the
same threads/batch/target. Appends are single ``write`` calls followed by fsync; a line cut
by a crash is skipped (and reported) when reading.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def default_store() -> Path:
    """``$EDGEKT_PROFILE_STORE``, else ``~/.edgekt/profiles.jsonl``."""
    env = os.environ.get("EDGEKT_PROFILE_STORE")
    return Path(env) if env else Path.home() / ".edgekt" / "profiles.jsonl"


def row_key(row: dict[str, Any]) -> dict[str, Any] | None:
    """The comparison key of a measured row (None for rows that measured nothing)."""
    if row.get("status") != "ok":
        return None
    s = row["settings"]
    return {"model_sha256": row["model"]["sha256"], "device_id": row["host"]["id"],
            "backend": row["backend"]["name"],
            "settings": {k: s.get(k) for k in ("threads", "batch", "target", "config")}}


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """What the store keeps of a row: everything but the raw samples."""
    return {k: v for k, v in row.items() if k != "samples_ms"}


def append(path: Path, rows: list[dict[str, Any]], run_id: str | None = None) -> str:
    """Append ``rows`` (all of them, failures too, marked) under one run id; returns the id."""
    run_id = run_id or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    partial = any(r.get("status") != "ok" for r in rows)
    lines = "".join(json.dumps({"run_id": run_id, "partial": partial, "key": row_key(r),
                                **summary(r)}, sort_keys=True) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())
    return run_id


def read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    # errors="replace": a line damaged into non-UTF-8 bytes is skipped below like any other.
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping a damaged line (interrupted write?)", path, n)
    return out


def previous(records: list[dict[str, Any]], row: dict[str, Any],
             before_run: str | None = None) -> dict[str, Any] | None:
    """The most recent stored ok record with the same key as ``row`` (from an earlier run)."""
    key = row_key(row)
    if key is None:
        return None
    for rec in reversed(records):
        if rec.get("key") == key and rec.get("status") == "ok" and rec.get("run_id") != before_run:
            return rec
    return None


def last_run(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the most recent run."""
    if not records:
        return []
    run_id = records[-1]["run_id"]
    return [r for r in records if r["run_id"] == run_id]
