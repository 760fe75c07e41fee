"""Torch-free device runtime (imported as ``edgekt.devices``): numpy + onnxruntime/OpenVINO/LiteRT.

``EdgeModel`` is imported on first use, so ``import edgekt.devices`` (and its light submodules,
such as the runner and the fingerprint) cost nothing on a device until a model is loaded.
"""

from typing import TYPE_CHECKING, Any

from edgekt.errors import EdgektError

if TYPE_CHECKING:
    from edgekt.devices.model import EdgeModel

__all__ = ["EdgeModel", "EdgektError"]


def __getattr__(name: str) -> Any:
    if name == "EdgeModel":
        from edgekt.devices.model import EdgeModel

        return EdgeModel
    raise AttributeError(f"module 'edgekt.devices' has no attribute {name!r}")
