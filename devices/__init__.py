"""Torch-free device runtime (imported as ``edgekt.devices``): numpy + onnxruntime/OpenVINO/LiteRT.

``EdgeModel``, ``PrototypeClassifier``, ``ContinualLearner`` and ``LearnerConfig`` are
imported on first use, so ``import edgekt.devices`` (and its light submodules,
such as the runner and the fingerprint) cost nothing on a device until a model is loaded.
"""

from typing import TYPE_CHECKING, Any

from edgekt.errors import EdgektError

if TYPE_CHECKING:
    from edgekt.devices.continual import ContinualLearner, LearnerConfig
    from edgekt.devices.fewshot import PrototypeClassifier
    from edgekt.devices.model import EdgeModel

# Public name -> submodule; each is imported on first use (all of them torch-free).
_LAZY = {"EdgeModel": "model", "PrototypeClassifier": "fewshot", "ContinualLearner": "continual",
         "LearnerConfig": "continual"}
__all__ = ["ContinualLearner", "EdgeModel", "EdgektError", "LearnerConfig", "PrototypeClassifier"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"edgekt.devices.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'edgekt.devices' has no attribute {name!r}")
