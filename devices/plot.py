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
    if pareto:  # after the layout: label boxes are measured in their final place
        pts = [(r["latency_ms"]["model"]["p50"], r["artifact"]["accuracy"]) for r in pareto]
        annotate_without_overlap(axes[0][1], pts, [row_label(r) for r in pareto], fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pareto(ax: Any, rows: list[dict[str, Any]]) -> None:
    pts = sorted((r["latency_ms"]["model"]["p50"], r["artifact"]["accuracy"], row_label(r))
                 for r in rows)
    for lat, acc, _ in pts:
        ax.scatter(lat, acc)
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


# Candidate label positions around a point, in points: nearest first, then farther out.
_OFFSETS = [(4, 3), (4, -11), (-4, 3), (-4, -11)] + [
    (sx * 6, sy * step) for step in (14, 24, 34, 44, 54) for sx in (1, -1) for sy in (1, -1)]


def annotate_without_overlap(ax: Any, points: list[tuple[float, float]], labels: list[str], *,
                             fontsize: float = 7) -> list[Any]:
    """Label ``points`` so that no two labels overlap (greedy placement around each point).

    Call it once the axes have their final size, limits and scales (after ``tight_layout``):
    text boxes are measured on the canvas. A label that finds no free spot nearby is placed
    farther out with a thin leader line, still never on top of another label.
    """
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    out = []
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    for i in order:
        xy, text = points[i], labels[i]
        # Inside the axes if any spot is free there, else anywhere on the figure.
        ann = _place(ax, xy, text, fontsize, renderer, placed, ax.bbox) or \
            _place(ax, xy, text, fontsize, renderer, placed, fig.bbox)
        out.append(ann or ax.annotate(text, xy, fontsize=fontsize))  # never drop a label
    return out


def _place(ax: Any, xy: tuple[float, float], text: str, fontsize: float, renderer: Any,
           placed: list[Any], area: Any) -> Any:
    """The first candidate position whose box lies in ``area`` and clears ``placed``."""
    for k, (dx, dy) in enumerate([*_OFFSETS, *_far(len(placed))]):
        far = k >= len(_OFFSETS) or abs(dy) > 11
        ann = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points",
                          fontsize=fontsize, ha="left" if dx >= 0 else "right",
                          va="bottom" if dy >= 0 else "top",
                          arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"}
                          if far else None)
        box = text_box(ann, renderer).expanded(1.04, 1.15)
        inside = area.contains(box.x0, box.y0) and area.contains(box.x1, box.y1)
        if inside and not any(box.overlaps(b) for b in placed):
            placed.append(box)
            return ann
        ann.remove()
    return None


def text_box(ann: Any, renderer: Any) -> Any:
    """The label's own box on the canvas (an Annotation's extent also covers its leader line)."""
    from matplotlib.text import Text

    ann.update_positions(renderer)  # place the text relative to its point first
    return Text.get_window_extent(ann, renderer)


def _far(n: int) -> list[tuple[int, int]]:
    """Last resort: farther and farther up and down (enough room for ``n`` placed labels)."""
    return [(sx * 10, sy * (64 + 10 * j)) for j in range(2 * n + 2) for sy in (1, -1)
            for sx in (1, -1)]
