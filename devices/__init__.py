"""Torch-free device runtime (imported as ``edgekt.devices``): numpy + onnxruntime/OpenVINO."""
