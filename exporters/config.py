"""``ExportConfig``: the one description of an export, shared by the library, the CLI and the
pipeline (no torch import; the pipeline validates it when its YAML loads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from edgekt.config import Strict, merge_options
from edgekt.errors import EdgektError


class ExportConfig(Strict):
    """What to export and how to gate it. The CLI flag of a field is ``--`` + its name with
    dashes (``calib_samples`` -> ``--calib-samples``); ``--to`` sets ``targets``."""

    model_config = ConfigDict(Strict.model_config, use_attribute_docstrings=True)

    targets: list[str] = Field(default_factory=lambda: ["onnx"])
    """Export targets, comma-separated on the command line: onnx, openvino, litert."""
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: ["fp32"])
    """fp32, fp16, int8 (each made by every selected target that has it; LiteRT: fp32, int8)."""
    part: Literal["classifier", "embedding"] = "classifier"
    """classifier (logits) or embedding (trunk only; the head goes to head.npz)."""
    opset: int = Field(17, ge=7, le=20)
    """ONNX opset (the TorchScript exporter supports 7..20)."""
    dynamic_batch: bool = False
    """Dynamic batch dimension (default: static batch 1, which NPUs prefer)."""
    simplify: bool = True
    """Run onnx-simplifier on the ONNX graph."""
    calib_samples: int = Field(300, ge=1)
    """Real training images used to calibrate INT8."""
    calib_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    """INT8 range calibration: minmax, entropy or percentile."""
    max_drop: float | None = Field(None, ge=0.0)
    """Largest allowed INT8 validation accuracy drop, in points: keeps sensitive layers in
    float, or fails (None: no accuracy control)."""
    max_float_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """INT8 accuracy control keeps at most this fraction of the quantizable layers in float."""
    threads: int | None = Field(None, ge=1)
    """Runtime intra-op threads during calibration and parity (None: the runtime's choice)."""
    val_samples: int = Field(1000, ge=0)
    """Validation images for parity and accuracy control (0: all)."""
    test_samples: int = Field(0, ge=0)
    """Test images for the accuracy column (0: all)."""
    min_agreement: float = Field(0.99, ge=0.0, le=1.0)
    """Minimum top-1 agreement with PyTorch for FP32/FP16 artifacts."""
    min_agreement_int8: float = Field(0.97, ge=0.0, le=1.0)
    """Minimum top-1 agreement with PyTorch for INT8 artifacts."""
    allow_mismatch: bool = False
    """Write the package even if an artifact fails the parity gate."""


FLAGS = {"targets": "--to", "precisions": "--precision"}


def export_config(base: ExportConfig | str | Path | None = None, **changes: Any) -> ExportConfig:
    """``base`` (a config, a YAML file of one, or the defaults) with ``changes`` applied; an
    invalid or unknown option is an ``EdgektError`` naming its flag, its key and the value."""
    unknown = sorted(set(changes) - set(ExportConfig.model_fields))
    if unknown:
        raise EdgektError(f"unknown export option(s) {unknown} "
                          f"(valid: {', '.join(ExportConfig.model_fields)})")
    return merge_options(ExportConfig, base, changes, "export options", FLAGS)
