"""Labels of accuracy-vs-latency plots never overlap, however close the points are."""

from __future__ import annotations

import itertools

import pytest

from edgekt.devices.plot import annotate_without_overlap, plot_rows, text_box


def _boxes(fig, annotations):
    renderer = fig.canvas.get_renderer()
    return [text_box(a, renderer) for a in annotations]


@pytest.mark.parametrize("n", [2, 8, 16])
def test_clustered_points_get_separate_labels(n):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # Same model in several runtimes/precisions: almost the same latency and accuracy.
    pts = [(0.10 + 0.001 * i, 88.0 + 0.01 * (i % 3)) for i in range(n)]
    ax.scatter(*zip(*pts, strict=True))
    ax.set_xscale("log")
    fig.tight_layout()
    labels = [f"student_{i} onnxruntime int8" for i in range(n)]
    anns = annotate_without_overlap(ax, pts, labels)
    fig.canvas.draw()
    boxes = _boxes(fig, anns)
    assert sorted(a.get_text() for a in anns) == sorted(labels)  # none dropped
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    for box in boxes:  # and none is cut off by the figure's edge
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
    plt.close(fig)


def test_profile_plot_with_accuracy_writes_png(tmp_path):
    rows = [{"status": "ok", "artifact": {"file": f"m{i}.onnx", "accuracy": 0.88},
             "backend_name": "onnxruntime", "device": "local",
             "latency_ms": {"model": {"p50": 0.1}}, "samples_ms": {"model": [0.1, 0.11]}}
            for i in range(4)]
    out = plot_rows(rows, tmp_path / "p.png")
    assert out.stat().st_size > 10_000
