"""The exporter interface: one module per target (ONNX, OpenVINO), imported only when used.

Following nncf's backend split, everything target-independent (data, parity, the package) lives
outside the targets; a target only knows how to write its files for a precision and how to run
them. ``get_exporter("openvino")`` imports ``openvino_export`` on first use, so exporting to ONNX
never imports OpenVINO and ``edgekt --help`` imports neither.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgekt.errors import EdgektError
from edgekt.metadata import ModelMeta
from edgekt.registry import Registry, unknown_name_message

if TYPE_CHECKING:
    import torch

    from edgekt.exporters.calib import EvalData

PRECISIONS = ("fp32", "fp16", "int8")
CALIB_METHODS = ("minmax", "entropy", "percentile")

EXPORTERS: Registry[type[Exporter]] = Registry("export target")
# target name -> module that registers it (imported lazily by get_exporter).
TARGET_MODULES = {
    "onnx": "edgekt.exporters.onnx_export",
    "openvino": "edgekt.exporters.openvino_export",
}

Runner = Callable[[np.ndarray], np.ndarray]
"""Runs a float32 NCHW batch (any size) through an artifact and returns its output."""


@dataclass
class ExportOptions:
    """Knobs shared by all targets (validated by ``export_package``)."""

    opset: int = 17
    dynamic_batch: bool = False
    simplify: bool = True
    calib_samples: int = 300
    calib_method: str = "minmax"
    max_drop: float | None = None
    """Largest allowed INT8 accuracy drop on the validation samples, in percentage points."""
    max_float_fraction: float = 0.5
    """ORT accuracy control keeps at most this fraction of the quantizable nodes in float."""
    threads: int | None = None
    """Intra-op threads of the runtimes during calibration and parity (None: runtime default)."""


@dataclass
class ExportContext:
    """What a target needs to write its files: the module, its metadata, data and options."""

    module: torch.nn.Module
    meta: ModelMeta
    workdir: Path
    """The package being written (a temp dir renamed into place at the end)."""
    scratch: Path
    """Intermediate files that do not belong in the package."""
    data: EvalData
    options: ExportOptions
    _onnx_fp32: Path | None = None

    def onnx_fp32(self) -> Path:
        """The FP32 ONNX file (exported once, in scratch); OpenVINO converts from it too."""
        if self._onnx_fp32 is None:
            from edgekt.exporters.onnx_export import export_onnx

            path = self.scratch / "model.onnx"
            export_onnx(self.module, self.meta, path, opset=self.options.opset,
                        simplify=self.options.simplify)
            self._onnx_fp32 = path
        return self._onnx_fp32


@dataclass
class Artifact:
    """One model file set in the package (paths relative to the package directory)."""

    file: str
    """The file a runtime opens (``model.onnx``, ``model.fp16.xml``)."""
    files: list[str]
    """Every file of the artifact (``.xml`` and its ``.bin``)."""
    target: str
    runtime: str
    precision: str
    part: str
    runtime_config: dict[str, Any] = field(default_factory=dict)
    """Settings the runtime needs to reproduce the parity numbers (e.g. OpenVINO's precision)."""
    quantization: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None


class Exporter(ABC):
    """A target format. Subclasses register with ``@EXPORTERS.register(name)``."""

    name: ClassVar[str]
    runtime: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]

    @abstractmethod
    def export(self, ctx: ExportContext, precision: str) -> Artifact:
        """Write the artifact for ``precision`` into ``ctx.workdir``, metadata embedded."""

    @abstractmethod
    def runner(self, path: Path, *, runtime_config: dict[str, Any] | None = None,
               threads: int | None = None) -> Runner:
        """Load an artifact written by :meth:`export` for inference."""

    @abstractmethod
    def read_meta(self, path: Path) -> ModelMeta:
        """Read the embedded ``ModelMeta`` back from an artifact."""


def meta_for(meta: ModelMeta, precision: str, **extra: Any) -> ModelMeta:
    """A copy of ``meta`` for one artifact's precision, with target-specific ``extra`` keys."""
    return replace(meta, precision=precision, extra={**meta.extra, **extra})


def get_exporter(name: str) -> Exporter:
    """Import the target's module on first use and return an exporter instance."""
    if name not in TARGET_MODULES:
        raise EdgektError("--to: " + unknown_name_message("export target", name, TARGET_MODULES))
    try:
        importlib.import_module(TARGET_MODULES[name])
    except ImportError as exc:
        raise EdgektError(f"export target {name!r} needs a package that is not installed: {exc}. "
                          "Install it with: pip install 'edgekt[export,openvino]'") from None
    return EXPORTERS.get(name)()


def run_batched(infer: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                batch: int | None) -> np.ndarray:
    """Run ``x`` through ``infer`` in chunks; a static batch size pads the last chunk."""
    step = batch or 256
    outs = []
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        n = len(chunk)
        if batch and n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(infer(np.ascontiguousarray(chunk))[:n])
    return np.concatenate(outs)


def static_batch(meta: ModelMeta) -> int | None:
    """The model's fixed batch size, or None when the batch dimension is dynamic."""
    b = meta.input.shape[0]
    return None if b == -1 else b
