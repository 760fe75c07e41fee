"""onnxruntime static INT8 quantization (QDQ, per-channel) with an accuracy-control loop.

The loop mirrors NNCF's ``quantize_with_accuracy_control`` for ORT: quantize everything; if the
validation accuracy drops more than ``--max-drop``, rank the quantizable nodes by how much
accuracy keeping each one alone in float recovers, then keep the top 1, 2, ... in float until
the drop is met or ``max_float_fraction`` of the nodes would be float (then fail with a report).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from edgekt.errors import EdgektError
from edgekt.exporters.base import ExportContext, meta_for, static_batch

if TYPE_CHECKING:
    from edgekt.exporters.onnx_export import OnnxExporter

# Ops that carry weights: the ones whose quantization matters and that we may keep in float.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def quantize_onnx(ctx: ExportContext, out: Path, exporter: OnnxExporter) -> dict[str, Any]:
    """Write ``out`` (INT8 QDQ ONNX) and return what the manifest records about it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgekt.exporters.onnx_export import save_onnx, set_metadata

    opts = ctx.options
    pre = ctx.scratch / "model.pre.onnx"
    if not pre.exists():
        # Fuses and infers shapes the way ORT's quantizer expects (its documented first step).
        quant_pre_process(str(ctx.onnx_fp32()), str(pre), skip_symbolic_shape=True)
    ref_acc = ctx.data.val_accuracy(ctx.data.ref_val)

    tries: list[dict[str, Any]] = []
    paths: dict[tuple[str, ...], Path] = {}

    def attempt(exclude: list[str]) -> float:
        path = ctx.scratch / f"int8.try{len(tries)}.onnx"
        _quantize(pre, path, ctx, exclude)
        acc = ctx.data.val_accuracy(exporter.runner(path, threads=opts.threads)(ctx.data.val_x))
        tries.append({"float_nodes": list(exclude), "val_acc": acc,
                      "drop_pt": round(100 * (ref_acc - acc), 4)})
        paths[tuple(exclude)] = path
        return acc

    exclude: list[str] = []
    acc = attempt(exclude)
    if opts.max_drop is not None and 100 * (ref_acc - acc) > opts.max_drop:
        exclude = _restore_accuracy(pre, ref_acc, opts.max_drop, opts.max_float_fraction,
                                    attempt, tries)
    model = onnx.load(paths[tuple(exclude)])
    final = next(t for t in tries if t["float_nodes"] == exclude)
    info = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "per_channel": True, "activations": "int8", "weights": "int8",
            "calib_method": opts.calib_method, "calib_samples": len(ctx.data.calib_x),
            "float_nodes": exclude, "max_drop_pt": opts.max_drop, "ref_val_acc": ref_acc,
            "val_acc": final["val_acc"], "tries": tries}
    set_metadata(model, meta_for(ctx.meta, "int8", quantization={
        k: info[k] for k in ("tool", "calib_method", "calib_samples", "float_nodes")}))
    save_onnx(model, out)
    return info


def _restore_accuracy(pre: Path, ref_acc: float, max_drop: float, max_float_fraction: float,
                      attempt: Callable[[list[str]], float], tries: list[dict[str, Any]]
                      ) -> list[str]:
    nodes = [n.name for n in onnx.load(pre).graph.node if n.op_type in WEIGHTED_OPS]
    limit = math.floor(max_float_fraction * len(nodes))
    if limit >= 1:
        # Sensitivity: accuracy recovered by keeping each node alone in float.
        gain = {n: attempt([n]) for n in nodes}
        ranked = sorted(nodes, key=lambda n: -gain[n])
        if 100 * (ref_acc - gain[ranked[0]]) <= max_drop:
            return ranked[:1]
        for k in range(2, limit + 1):
            exclude = ranked[:k]
            if 100 * (ref_acc - attempt(exclude)) <= max_drop:
                return exclude
    report = "\n".join(f"    float nodes {len(t['float_nodes']):>2}: val acc {t['val_acc']:.4f} "
                       f"(drop {t['drop_pt']:.2f} pt) {', '.join(t['float_nodes'][:3])}"
                       for t in tries)
    raise EdgektError(
        f"INT8 (onnxruntime) cannot meet --max-drop {max_drop} pt: reference validation accuracy "
        f"{ref_acc:.4f}; keeping up to {limit} of {len(nodes)} weighted nodes in float "
        f"(max_float_fraction {max_float_fraction}) was not enough. Tries:\n{report}\n"
        "  Raise --max-drop, try --calib-method entropy or percentile, more --calib-samples, or "
        "ship the FP32/FP16 artifact.")


def _quantize(pre: Path, out: Path, ctx: ExportContext, exclude: list[str]) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[ctx.options.calib_method]
    quantize_static(
        str(pre), str(out), _Reader(ctx.data.calib_x, static_batch(ctx.meta), ctx.meta.input.name),
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=exclude,
    )


class _Reader(CalibrationDataReader):
    """A reader over the real calibration samples, in the model's batch size."""

    def __init__(self, x: np.ndarray, batch: int | None, name: str) -> None:
        step = batch or 32
        self.batches = [x[i : i + step] for i in range(0, len(x), step)]
        if batch:  # a static batch cannot take a short last chunk
            self.batches = [b for b in self.batches if len(b) == batch]
        self.name, self.pos = name, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return {self.name: np.ascontiguousarray(self.batches[self.pos - 1])}

    def rewind(self) -> None:
        self.pos = 0
