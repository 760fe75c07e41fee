"""OpenVINO backend: IR (``.xml`` + ``.bin``) or ONNX files, on CPU, GPU or NPU."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekt.devices.backends.base import Backend, TensorInfo, import_runtime
from edgekt.errors import EdgektError


def _ov():
    return import_runtime("openvino", "openvino")


@functools.lru_cache(maxsize=1)
def _core():
    # One Core per process, as OpenVINO recommends: it owns the plugins and their thread pools
    # (creating one per model also crashed in a process that had run PyTorch before).
    return _ov().Core()


class OpenVinoBackend(Backend):
    name = "openvino"
    module = "openvino"
    pip = "openvino"
    suffixes = (".xml", ".onnx")

    @classmethod
    def files_of(cls, path: Path) -> list[Path]:
        path = Path(path)
        return [path, path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [path]

    def __init__(self, path: Path, *, threads: int | None = None, target: str = "CPU",
                 config: dict[str, Any] | None = None) -> None:
        super().__init__(path, threads=threads, target=target, config=config)
        core = _core()  # imports openvino (clear error when missing)
        if not self.path.is_file():
            raise EdgektError(f"{self.path}: no such model file")
        if self.path.suffix.lower() == ".xml" and not self.path.with_suffix(".bin").is_file():
            raise EdgektError(f"{self.path}: the weights file {self.path.with_suffix('.bin').name} "
                              "is missing beside it")

        if target.split(".")[0] not in {d.split(".")[0] for d in core.available_devices}:
            raise EdgektError(f"OpenVINO device {target!r} is not available here (available: "
                              f"{', '.join(core.available_devices)})")
        try:
            self.model = core.read_model(str(self.path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with the parser's text
            raise EdgektError(f"{self.path}: OpenVINO cannot read it as a model (truncated, "
                              f"corrupt or not a model?): {exc}") from None
        if len(self.model.inputs) != 1:
            raise EdgektError(f"{self.path}: edgekt runs single-input models; this one has "
                              f"{len(self.model.inputs)} inputs")
        port = self.model.inputs[0]
        pshape = port.get_partial_shape()
        shape = tuple(d.get_length() if d.is_static else -1 for d in pshape)
        self._input = TensorInfo(port.get_any_name(), shape,
                                 np.dtype(port.get_element_type().to_dtype()).name)
        self._outputs = [o.get_any_name() for o in self.model.outputs]
        # Latency hint, one stream: what a single-request application on a device does.
        config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", **self.config}
        if target == "CPU" and self._precision() == "fp32":
            # On AVX512-BF16/AMX CPUs the CPU plugin would run an FP32 model in bf16 (logits
            # move by ~1e-2); an fp32 artifact is run as fp32 unless its config says otherwise.
            config.setdefault("INFERENCE_PRECISION_HINT", "f32")
        if threads and target == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(self.model, target, config)
        self._lock = threading.Lock()
        self._request = self.compiled.create_infer_request()

    @staticmethod
    def version() -> str:
        return str(_ov().get_version())

    def metadata(self) -> str | None:
        # IR written by edgekt: rt_info["edgekt"]; ONNX read directly: its metadata_props land
        # under rt_info["framework"].
        for path in (["edgekt"], ["framework", "edgekt"]):
            if self.model.has_rt_info(path):
                return self.model.get_rt_info(path).astype(str)
        return None

    def _precision(self) -> str:
        text = self.metadata()
        try:
            return str(json.loads(text).get("precision", "fp32")) if text else "fp32"
        except (ValueError, AttributeError):
            return "fp32"

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        # One request, one call at a time: concurrent InferRequests of one compiled model
        # crashed OpenVINO 2026.4 here (segfault in infer), so calls from threads are serialised.
        with self._lock:
            self._request.infer({0: x})
            return [self._request.get_output_tensor(i).data.copy()
                    for i in range(len(self._outputs))]

    def bind(self, x: np.ndarray) -> Callable[[], object]:
        # The profiler's loop: the input is set once, each call is the bare ``infer()``.
        # It uses the model's one request (a second request per model crashed OpenVINO here).
        x = np.ascontiguousarray(x)
        with self._lock:
            self._request.set_input_tensor(_ov().Tensor(x))
        return self._request.infer

    def last_latency_ms(self) -> float | None:
        return float(self._request.latency)

    def settings(self) -> dict[str, object]:
        props = {}
        for key in ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT",
                    "INFERENCE_PRECISION_HINT"):
            try:
                value = self.compiled.get_property(key)
            except Exception:  # not every device exposes every property
                continue
            props[key.lower()] = (value.get_type_name() if hasattr(value, "get_type_name")
                                  else str(value))
        return {**super().settings(), **props}


BACKEND = OpenVinoBackend
