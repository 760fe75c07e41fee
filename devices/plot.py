"""PNG reports: latency CDF per row, and accuracy vs latency when the manifests carry accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def row_label(row: dict[str, Any]) -> str:
    art = row.get("artifact") or {}
    name = Path(art.get("file") or row.get("model_arg", "?")).name
    return f"{name} · {row.get('backend_name')} · {row.get('device')}"


def plot_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write the figure to ``path`` (matplotlib is imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    pareto = [r for r in ok if (r.get("artifact") or {}).get("accuracy") is not None]
    fig, axes = plt.subplots(1, 2 if pareto else 1, figsize=(13 if pareto else 7, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    for r in ok:
        samples = (r.get("samples_ms") or {}).get("model")
        if not samples:
            continue
        x = np.sort(np.asarray(samples))
        ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", label=row_label(r))
    ax.set_xscale("log")
    ax.set_xlabel("model-only latency per batch (ms, log scale)")
    ax.set_ylabel("fraction of iterations")
    ax.set_title("latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if pareto:
        _pareto(axes[0][1], pareto)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pareto(ax: Any, rows: list[dict[str, Any]]) -> None:
    pts = sorted((r["latency_ms"]["model"]["p50"], r["artifact"]["accuracy"], row_label(r))
                 for r in rows)
    for lat, acc, label in pts:
        ax.scatter(lat, acc)
        ax.annotate(label, (lat, acc), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front, best = [], -np.inf
    for lat, acc, _ in pts:  # sorted by latency: keep points more accurate than all faster ones
        if acc > best:
            front.append((lat, acc))
            best = acc
    ax.plot(*zip(*front, strict=True), "k--", alpha=0.5, label="Pareto front")
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs latency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
