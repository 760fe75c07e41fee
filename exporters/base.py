"""The exporter interface: one module per target (ONNX, OpenVINO, LiteRT), imported when used.

Following nncf's backend split, everything target-independent (data, parity, the package) lives
outside the targets; a target only knows how to write its files for a precision. Running them
is not its business: the parity gate and INT8 accuracy control open every file with the
``edgekt.devices`` backend of the target's runtime (:func:`artifact_runner`), the code that ships
to devices. ``get_exporter("openvino")`` imports ``openvino_export`` on first use, so exporting
to ONNX never imports OpenVINO and ``edgekt --help`` imports neither.

Adding a target: one module with an ``@EXPORTERS.register(name)`` class and one
``TARGETS.register(name)("module path")`` line below (plus the runtime's backend module and its
line in ``edgekt.devices.backends``).
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgekt.errors import EdgektError
from edgekt.metadata import ArtifactEntry, ModelMeta
from edgekt.registry import Registry

if TYPE_CHECKING:
    import torch

    from edgekt.exporters.calib import EvalData
    from edgekt.exporters.config import ExportConfig


EXPORTERS: Registry[type[Exporter]] = Registry("export target")
"""Exporter classes, filled when their module is imported."""


@dataclass(frozen=True)
class Target:
    """Where a target's exporter lives and which extra installs its converter."""

    module: str
    """Imported by :func:`get_exporter` on first use; it registers the class in EXPORTERS."""
    extra: str
    """What to ``pip install`` when that import fails."""
    converter: str
    """The top-level package the exporter needs (checked without importing it)."""


TARGETS: Registry[Target] = Registry("export target")
TARGETS.register("onnx")(Target("edgekt.exporters.onnx_export", "edgekt[export]", "onnx"))
TARGETS.register("openvino")(Target("edgekt.exporters.openvino_export",
                                    "edgekt[export,openvino]", "openvino"))
TARGETS.register("litert")(Target("edgekt.exporters.litert_export", "edgekt[litert-export]",
                                  "litert_torch"))


def target_installed(name: str) -> bool:
    """Whether the converter of a registered target is installed (nothing is imported)."""
    return importlib.util.find_spec(TARGETS.get(name).converter) is not None

Runner = Callable[[np.ndarray], np.ndarray]
"""Runs a float32 NCHW batch (any size) through an artifact and returns its output."""


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
    options: ExportConfig
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


Artifact = ArtifactEntry
"""One model file set in the package (paths relative to the package directory)."""


class Exporter(ABC):
    """A target format. Subclasses register with ``@EXPORTERS.register(name)``."""

    name: ClassVar[str]
    runtime: ClassVar[str]
    """The ``edgekt.devices`` backend that runs its files (parity and devices alike)."""
    precisions: ClassVar[tuple[str, ...]]

    @abstractmethod
    def export(self, ctx: ExportContext, precision: str) -> Artifact:
        """Write the artifact for ``precision`` into ``ctx.workdir``, metadata embedded."""

    def runner(self, path: Path, *, runtime_config: dict[str, Any] | None = None,
               threads: int | None = None) -> Runner:
        """The artifact on its device backend (what parity and accuracy control run)."""
        return artifact_runner(path, self.runtime, config=runtime_config, threads=threads)

    def read_meta(self, path: Path) -> ModelMeta:
        """The ``ModelMeta`` embedded in an artifact, read by its device backend."""
        from edgekt.devices.backends import open_backend

        text = open_backend(path, self.runtime).metadata()
        if text is None:
            raise EdgektError(f"{path}: no edgekt metadata (not exported by edgekt?)")
        return ModelMeta.from_json(text)


def artifact_runner(path: Path, runtime: str, *, config: dict[str, Any] | None = None,
                    threads: int | None = None) -> Runner:
    """Open ``path`` with the ``edgekt.devices`` backend ``runtime``; the runner takes float32
    NCHW batches of any size (chunked, and padded for a model with a static batch)."""
    from edgekt.devices.backends import open_backend

    backend = open_backend(path, runtime, threads=threads, config=config)
    batch = backend.input.shape[0] if backend.input.shape and backend.input.shape[0] > 0 \
        else None
    return lambda x: run_batched(lambda chunk: backend.run(chunk)[0], x, batch)


def meta_for(meta: ModelMeta, precision: str, **extra: Any) -> ModelMeta:
    """A copy of ``meta`` for one artifact's precision, with target-specific ``extra`` keys."""
    return replace(meta, precision=precision, extra={**meta.extra, **extra})


def get_exporter(name: str) -> Exporter:
    """Import the target's module on first use and return an exporter instance."""
    try:
        target = TARGETS.get(name)
    except EdgektError as exc:
        raise EdgektError(f"--to: {exc}") from None
    try:
        importlib.import_module(target.module)
    except ImportError as exc:
        raise EdgektError(f"export target {name!r} needs a package that is not installed: {exc}. "
                          f"Install it with: pip install '{target.extra}'") from None
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
