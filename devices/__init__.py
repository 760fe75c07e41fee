"""Torch-free device runtime (imported as ``edgekt.devices``): numpy + onnxruntime/OpenVINO.

Only light modules are imported here, so ``import edgekt.devices`` stays cheap on a device;
the runtime itself is imported when a model is loaded.
"""

from edgekt.devices.model import EdgeModel

from edgekt.errors import EdgektError

__all__ = ["EdgeModel", "EdgektError"]
