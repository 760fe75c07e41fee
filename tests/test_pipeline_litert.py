"""The pipeline's export and profile stages with ``litert`` listed in ``export.targets``."""

from __future__ import annotations

import pytest
import torch

from edgekt.errors import EdgektError
from edgekt.pipeline.config import PipelineConfig, load_pipeline_config
from edgekt.pipeline.run import stage_export, stage_profile


def test_quick_preset_lists_litert_when_its_converter_is_installed(monkeypatch):
    import edgekt.exporters.base as base

    cfg = load_pipeline_config(None, "quick", [])
    assert cfg.export.resolved_targets() == (["onnx", "openvino", "litert"], [])
    assert cfg.export.for_export(["fp32"]).targets == ["onnx", "openvino", "litert"]
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name: None)  # not installed
    assert cfg.export.resolved_targets() == (["onnx", "openvino"], ["litert"])
    bad = load_pipeline_config(None, "quick", ["export.optional_targets=[tflite]"])
    with pytest.raises(EdgektError, match="tflite"):
        bad.export.resolved_targets()


def test_litert_target_is_exported_and_profiled_on_its_runtime(tiny_checkpoint, tmp_path):
    torch.set_num_threads(1)
    cfg = PipelineConfig(
        data={"name": "fashion-mnist", "limit": 2000},
        export={"targets": ["onnx", "litert"], "precisions": ["fp32"], "calib_samples": 50,
                "teacher": False},
        # profile.backends does not name litert: the exported target brings its runtime.
        profile={"backends": ["onnxruntime"], "seconds": 0.2, "warmup": 3,
                 "torch_eager": False})
    exports = stage_export(cfg, tmp_path, {}, {"xs": {"checkpoint": str(tiny_checkpoint)}})
    files = {a["file"]: a for a in exports["xs"]["artifacts"]}
    assert set(files) == {"model.onnx", "model.tflite"}
    assert files["model.tflite"]["runtime"] == "litert"
    assert files["model.tflite"]["parity"]["passed"]
    rows = stage_profile(cfg, exports, log=lambda _msg: None)["rows"]
    ok = {(r["file"], r["backend"]) for r in rows if r["status"] == "ok"}
    assert ok == {("model.onnx", "onnxruntime"), ("model.tflite", "litert")}
