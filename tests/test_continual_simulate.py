"""End to end: ``edgekt continual simulate`` on real Fashion-MNIST through the ONNX runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekt.cli.app import app
from edgekt.continual.simulate import camera_shift


def test_camera_shift_changes_images_in_place_of_the_camera():
    img = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (2, 16, 1))
    out = camera_shift(img, "all")
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert out.std() < img.std() and out.mean() > img.mean()


@pytest.mark.slow
def test_simulate_cli_writes_matrix_and_metrics(tmp_path, tiny_checkpoint):
    import torch

    from edgekt.checkpoint import load_checkpoint
    from edgekt.continual.simulate import grid_embedding
    from edgekt.engine.setup import model_from_checkpoint
    from edgekt.exporters.meta import build_meta
    from edgekt.exporters.onnx_export import export_onnx

    torch.set_num_threads(1)
    net, info = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    onnx_path = tmp_path / "backbone.onnx"
    meta = build_meta(info, part="embedding", model_name="cnn_xs",
                      embedding_dim=net.embedding_dim * 4, dynamic_batch=True)
    export_onnx(grid_embedding(net, 2), meta, onnx_path)
    out = tmp_path / "sim.json"
    res = CliRunner().invoke(app, ["continual", "simulate", "--backbone", str(onnx_path),
                                   "--train-per-class", "60", "--test-per-class", "20",
                                   "--buffer-bytes", "200000", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "class-incremental / replay" in res.output and "summary" in res.output
    report = json.loads(out.read_text())
    results = {r["strategy"]: r for r in report["results"]}
    assert set(results) == {"naive", "replay", "ncm", "joint"}
    assert len(report["experiences"]) == 5 and report["embedding_dim"] == net.embedding_dim * 4
    for r in results.values():
        assert len(r["matrix"]) == 5 and all(len(row) == 5 for row in r["matrix"])
        assert r["update_ms_median"] > 0
    # Naive fine-tuning forgets the first experiences (it ends near the last experience's
    # 2 classes of 10); replay and NCM keep most of them (measured 0.20 / 0.57 / 0.71 / 0.68
    # for naive / replay / ncm / joint).
    acc = {k: r["final_avg_acc"] for k, r in results.items()}
    assert acc["naive"] < 0.3 and acc["joint"] > 0.5
    assert min(acc["replay"], acc["ncm"]) > acc["naive"] + 0.2
    assert results["naive"]["forgetting"] > results["replay"]["forgetting"]
    assert results["replay"]["memory_bytes"] <= 200_000 + 4 * 10 * 4 * net.embedding_dim + 40
