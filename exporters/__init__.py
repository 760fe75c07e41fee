"""Exporters: edgekt checkpoints to ONNX and OpenVINO IR (imported as ``edgekt.exporters``)."""
