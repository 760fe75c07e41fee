"""ONNX Runtime backend (CPU by default; another execution provider via ``target``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekt.devices.backends.base import Backend, TensorInfo, import_runtime
from edgekt.errors import EdgektError

_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int64)": "int64",
           "tensor(int32)": "int32"}


def _ort():
    return import_runtime("onnxruntime", "onnxruntime")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    module = "onnxruntime"
    pip = "onnxruntime"
    suffixes = (".onnx",)

    def __init__(self, path: Path, *, threads: int | None = None, target: str = "CPU",
                 config: dict[str, Any] | None = None) -> None:
        super().__init__(path, threads=threads, target=target, config=config)
        ort = _ort()
        opts = ort.SessionOptions()
        # One intra-op pool sized as asked; inter-op parallelism only adds jitter for CNNs.
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        for key, value in self.config.items():  # session config entries from the manifest
            opts.add_session_config_entry(str(key), str(value))
        provider = f"{target}ExecutionProvider"
        if provider not in ort.get_available_providers():
            raise EdgektError(f"onnxruntime target {target!r} is not available here (providers: "
                              f"{', '.join(ort.get_available_providers())})")
        if not self.path.is_file():
            raise EdgektError(f"{self.path}: no such model file")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=[provider])
        except Exception as exc:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
            raise EdgektError(f"{self.path}: onnxruntime cannot open it as an ONNX model "
                              f"(truncated, corrupt or not a model?): {exc}") from None
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise EdgektError(f"{self.path}: edgekt runs single-input models; this one has "
                              f"{len(inp)} inputs ({', '.join(i.name for i in inp)})")
        shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in inp[0].shape)
        self._input = TensorInfo(inp[0].name, shape, _DTYPES.get(inp[0].type, inp[0].type))
        self._outputs = [o.name for o in self.session.get_outputs()]

    @staticmethod
    def version() -> str:
        return str(_ort().__version__)

    def metadata(self) -> str | None:
        return self.session.get_modelmeta().custom_metadata_map.get("edgekt")

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        # InferenceSession.run is thread-safe (ORT documents concurrent Run calls).
        return self.session.run(None, {self._input.name: x})

    def bind(self, x: np.ndarray) -> Callable[[], object]:
        run, feed, outs = self.session.run, {self._input.name: x}, self._outputs[:1]
        return lambda: run(outs, feed)

    def settings(self) -> dict[str, object]:
        opts = self.session.get_session_options()
        return {**super().settings(), "intra_op_num_threads": opts.intra_op_num_threads,
                "inter_op_num_threads": opts.inter_op_num_threads,
                "providers": self.session.get_providers()}


BACKEND = OnnxRuntimeBackend
