"""Exporters: edgekt checkpoints to ONNX, OpenVINO IR, LiteRT (imported as ``edgekt.exporters``).

``export_package(checkpoint, out_dir, targets=[...], precisions=[...])`` is the public entry
point; it is imported lazily so that ``import edgekt.exporters`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Manifest", "export_package"]


def __getattr__(name: str) -> Any:
    if name == "export_package":
        from edgekt.exporters.package import export_package

        return export_package
    if name == "Manifest":
        from edgekt.exporters.manifest import Manifest

        return Manifest
    raise AttributeError(name)
