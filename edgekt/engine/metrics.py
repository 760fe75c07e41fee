"""Metrics files: one JSON object per line (metrics.jsonl), the same rows as CSV, TensorBoard."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` and ``metrics.csv`` in the run directory."""

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from edgekt.errors import EdgektError

                raise EdgektError("train.tensorboard: true needs the tensorboard package "
                                  "(pip install tensorboard), or set it to false") from None

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop rows written after the checkpoint we resumed from."""
        if not self.jsonl.exists():
            return
        rows = [r for r in read_jsonl(self.jsonl) if r.get("epoch", 0) <= epoch]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.csv.unlink(missing_ok=True)
        for r in rows:
            self._csv_row(r)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._csv_row(row)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "epoch":
                    self.tb.add_scalar(k, v, row.get("epoch", 0))

    def _csv_row(self, row: dict[str, Any]) -> None:
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
