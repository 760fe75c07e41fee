"""Runtime backends: a registry of lazily imported modules, one per runtime."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from edgekt.devices.backends.base import Backend, MissingRuntimeError, TensorInfo
from edgekt.errors import EdgektError
from edgekt.registry import Registry

__all__ = ["BACKENDS", "Backend", "MissingRuntimeError", "TensorInfo", "backend_class",
           "canonical_name", "open_backend"]

# name -> module path; the module is imported only when the backend is used, so onnxruntime
# users never pay for importing openvino (and vice versa).
BACKENDS: Registry[str] = Registry("runtime backend")
BACKENDS.register("onnxruntime")("edgekt.devices.backends.onnxruntime")
BACKENDS.register("openvino")("edgekt.devices.backends.openvino")

ALIASES = {"ort": "onnxruntime", "ov": "openvino"}


def canonical_name(name: str) -> str:
    """``ort`` -> ``onnxruntime``, ``ov`` -> ``openvino``; unknown names raise listing the valid."""
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    BACKENDS.get(name)
    return name


def backend_class(name: str) -> type[Backend]:
    module = importlib.import_module(BACKENDS.get(canonical_name(name)))
    return module.BACKEND


def default_backend(path: Path) -> str:
    """The runtime a file is native to: ``.xml`` -> openvino, anything else -> onnxruntime."""
    return "openvino" if Path(path).suffix.lower() == ".xml" else "onnxruntime"


def open_backend(path: str | Path, name: str | None = None, *, threads: int | None = None,
                 target: str = "CPU", config: dict[str, Any] | None = None) -> Backend:
    """Open ``path`` with backend ``name`` (default: the file's native runtime)."""
    path = Path(path)
    cls = backend_class(name or default_backend(path))
    if path.suffix.lower() not in cls.suffixes:
        raise EdgektError(f"{path}: the {cls.name} backend opens {', '.join(cls.suffixes)} files, "
                          f"not {path.suffix or 'files without a suffix'}")
    if threads is not None and threads < 1:
        raise EdgektError(f"threads must be >= 1 (got {threads}); leave it unset for the "
                          "runtime's default")
    return cls(path, threads=threads, target=target, config=config)
