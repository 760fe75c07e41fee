"""LiteRT (formerly TensorFlow Lite) backend: ``.tflite`` files on ai-edge-litert's Interpreter.

``ai-edge-litert`` is the torch-free runtime (about 60 MB, wheels for Linux x86_64/aarch64,
macOS arm64 and Windows). Fully quantized models take int8 input and give int8 output; this
backend quantizes and dequantizes with the scale and zero point of the tensors, so callers
always feed and read float32. LiteRT models have a static batch (the converter cannot keep it
symbolic for CNNs): ``run`` takes any multiple of it and invokes once per chunk.

Setting (``config``, e.g. an export's ``runtime_config``): ``xnnpack_amx: false`` keeps
XNNPACK off Intel AMX in this process (see ``edgekt.devices.backends.amx``: a 4x speed-up for
narrow INT8 CNNs on AMX Xeons, a loss for wide ones; a no-op on CPUs without AMX).
"""

from __future__ import annotations

import struct
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekt.devices.backends.base import Backend, TensorInfo, import_runtime
from edgekt.errors import EdgektError
from edgekt.metadata import METADATA_KEY


def _litert():
    return import_runtime("ai_edge_litert.interpreter", "ai-edge-litert")


_opened = False
"""Whether an interpreter was created in this process (XNNPACK has read the CPU's features)."""


def _amx_setting(path: Path, config: dict[str, Any]) -> str:
    """Apply ``xnnpack_amx`` and say what XNNPACK will do ("default", "off", ...)."""
    want = config.get("xnnpack_amx")
    if want is None or want is True:
        return "default"
    if want is not False:
        raise EdgektError(f"{path.name}: runtime setting 'xnnpack_amx' must be true or false, "
                          f"got {want!r}")
    from edgekt.devices.backends.amx import amx_denied, cpu_has_amx, deny_amx

    if not cpu_has_amx():
        return "off (this CPU has no AMX)"
    if _opened and not amx_denied():
        warnings.warn("xnnpack_amx: false has no effect: a LiteRT model was already loaded in "
                      "this process with AMX allowed (set it on the first model)", stacklevel=3)
        return "default (set too late)"
    try:
        deny_amx()
    except OSError as exc:  # a speed preference: the model still runs, on the default kernels
        warnings.warn(f"{path.name}: xnnpack_amx: false needs a seccomp filter, which this "
                      f"system refused ({exc}); running with XNNPACK's default kernels",
                      stacklevel=3)
        return "default (seccomp refused)"
    return "off"


def read_tflite_metadata(data: bytes, key: str = METADATA_KEY) -> str | None:
    """The string stored under ``key`` in a .tflite flatbuffer's ``metadata`` list, or None.

    Plain LiteRT users can do the same with ``ai_edge_litert.schema_py_generated``::

        m = Model.GetRootAs(data)
        for i in range(m.MetadataLength()):
            if m.Metadata(i).Name() == b"edgekt":
                text = m.Buffers(m.Metadata(i).Buffer()).DataAsNumpy().tobytes().decode()

    That generated module takes about 20 ms to import and flatbuffers' own reader 8 ms (of a
    cold start of about 170 ms), so this walks the three tables it needs with ``struct``
    (FlatBuffers' binary layout; field slots from the TFLite schema: Model.buffers 4,
    Model.metadata 6; Metadata.name 0, .buffer 1; Buffer.data 0). The interpreter has verified
    the file before this runs.
    """
    u32 = struct.Struct("<I").unpack_from

    def field(table: int, slot: int) -> int:
        """Position of a table's field, 0 when absent (vtable entries are uint16)."""
        vtable = table - struct.unpack_from("<i", data, table)[0]
        if 4 + 2 * slot >= struct.unpack_from("<H", data, vtable)[0]:
            return 0
        off = struct.unpack_from("<H", data, vtable + 4 + 2 * slot)[0]
        return table + off if off else 0

    def vector(table: int, slot: int) -> tuple[int, int]:
        """(first element, length) of a vector field, (0, 0) when absent."""
        pos = field(table, slot)
        if not pos:
            return 0, 0
        start = pos + u32(data, pos)[0]
        return start + 4, u32(data, start)[0]

    def element(start: int, j: int) -> int:
        pos = start + 4 * j
        return pos + u32(data, pos)[0]

    model = u32(data, 0)[0]
    entries, count = vector(model, 6)
    for j in range(count):
        entry = element(entries, j)
        name, size = vector(entry, 0)
        if bytes(data[name:name + size]) != key.encode():
            continue
        pos = field(entry, 1)
        index = u32(data, pos)[0] if pos else 0
        buffers, n_buffers = vector(model, 4)
        if index >= n_buffers:
            return None
        start, size = vector(element(buffers, index), 0)
        return bytes(data[start:start + size]).decode("utf-8") if size else None
    return None


class _Quant:
    """float32 <-> int8/uint8 for one tensor (identity for float tensors)."""

    def __init__(self, detail: dict[str, Any]) -> None:
        self.dtype = np.dtype(detail["dtype"])
        self.scale, self.zero = (float(v) for v in detail["quantization"])
        self.quantized = self.dtype.kind in "iu" and self.scale > 0
        if self.quantized:
            info = np.iinfo(self.dtype)
            self.lo, self.hi = info.min, info.max

    def to_model(self, x: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return np.ascontiguousarray(x, dtype=self.dtype)
        q = np.round(x / self.scale) + self.zero
        return np.clip(q, self.lo, self.hi).astype(self.dtype)

    def from_model(self, y: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return y.copy()
        return ((y.astype(np.float32) - self.zero) * self.scale).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype.name, "scale": self.scale, "zero_point": int(self.zero)}


class LiteRTBackend(Backend):
    name = "litert"
    module = "ai_edge_litert"
    pip = "ai-edge-litert"
    suffixes = (".tflite",)

    def __init__(self, path: Path, *, threads: int | None = None, target: str = "CPU",
                 config: dict[str, Any] | None = None) -> None:
        super().__init__(path, threads=threads, target=target, config=config)
        runtime = _litert()  # clear error when ai-edge-litert is missing
        if target.upper() != "CPU":
            raise EdgektError(f"the litert backend runs on the CPU (with XNNPACK); target "
                              f"{target!r} is not supported")
        if not self.path.is_file():
            raise EdgektError(f"{self.path}: no such model file")
        data = self.path.read_bytes()
        self._amx = _amx_setting(self.path, self.config)
        global _opened
        _opened = True
        try:
            # The interpreter verifies the flatbuffer first: truncated or foreign files raise.
            self.interpreter = runtime.Interpreter(model_content=data, num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise EdgektError(f"{self.path}: LiteRT cannot open it as a .tflite model "
                              f"(truncated, corrupt or not a model?): {exc}") from None
        self._meta = read_tflite_metadata(data)
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1:
            raise EdgektError(f"{self.path}: edgekt runs single-input models; this one has "
                              f"{len(inputs)} inputs ({', '.join(i['name'] for i in inputs)})")
        self._in = inputs[0]
        self._outs = self.interpreter.get_output_details()
        self._in_q = _Quant(self._in)
        self._out_q = [_Quant(o) for o in self._outs]
        shape = tuple(int(d) if d > 0 else -1 for d in self._in["shape_signature"])
        # The caller's view: float32 in, float32 out, whatever the tensors hold inside.
        self._input = TensorInfo(self._in["name"], shape, "float32")
        self._outputs = [o["name"] for o in self._outs]
        self._batch = int(self._in["shape"][0])
        self._lock = threading.Lock()

    @staticmethod
    def version() -> str:
        from importlib.metadata import version

        _litert()
        return version("ai-edge-litert")

    def metadata(self) -> str | None:
        return self._meta

    def _check(self, x: np.ndarray) -> None:
        want = tuple(int(d) for d in self._in["shape"][1:])
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise EdgektError(f"{self.path.name}: expected a float32 array of shape "
                              f"(N, {', '.join(map(str, want))}), got "
                              f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
            raise EdgektError(f"{self.path.name}: input of shape {tuple(x.shape)}; expected "
                              f"(N, {', '.join(map(str, want))})")
        if len(x) % self._batch:
            raise EdgektError(f"{self.path.name} has a static batch of {self._batch}; pass a "
                              f"multiple of {self._batch} samples (got {len(x)})")

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        # One interpreter, one call at a time: Interpreter is not thread-safe.
        self._check(x)
        b, it = self._batch, self.interpreter
        chunks: list[list[np.ndarray]] = []
        for i in range(0, len(x), b):
            q = self._in_q.to_model(x[i:i + b])
            with self._lock:
                it.set_tensor(self._in["index"], q)
                it.invoke()
                chunks.append([qo.from_model(it.get_tensor(o["index"]))
                               for o, qo in zip(self._outs, self._out_q, strict=True)])
        if len(chunks) == 1:
            return chunks[0]
        return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]

    def bind(self, x: np.ndarray) -> Callable[[], object]:
        # The profiler's loop: the input is set once, each call is the bare ``invoke()``,
        # exactly what a hand-written Interpreter loop times.
        self._check(x)
        if len(x) != self._batch:
            raise EdgektError(f"{self.path.name} has a static batch of {self._batch}; the "
                              f"profiler needs exactly that batch (got {len(x)})")
        with self._lock:
            self.interpreter.set_tensor(self._in["index"], self._in_q.to_model(x))
        return self.interpreter.invoke

    def settings(self) -> dict[str, object]:
        return {**super().settings(), "num_threads": self.threads or "default",
                "delegate": "XNNPACK (default CPU)", "xnnpack_amx": self._amx,
                "input_tensor": self._in_q.describe(), "output_tensor": self._out_q[0].describe()}


BACKEND = LiteRTBackend
