"""Runtime backends: a registry of lazily imported modules, one per runtime.

Adding a runtime: one module defining a :class:`Backend` subclass as ``BACKEND``, and one
``BACKENDS.register(name)(BackendSpec(...))`` line below. Everything that maps files to
runtimes (artifact discovery, the runner bundle, the host fingerprint) reads this registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekt.errors import EdgektError
from edgekt.registry import Registry

if TYPE_CHECKING:
    from edgekt.devices.backends.base import Backend, MissingRuntimeError, TensorInfo

__all__ = ["BACKENDS", "Backend", "BackendSpec", "MissingRuntimeError", "TensorInfo",
           "backend_class", "canonical_name", "default_backend", "model_suffixes",
           "open_backend"]


@dataclass(frozen=True)
class BackendSpec:
    """What is known about a backend without importing it (nor numpy, nor the runtime)."""

    module: str
    """The edgekt module defining ``BACKEND``; imported only when the backend is used, so
    onnxruntime users never pay for importing openvino (and vice versa)."""
    dist: str
    """The runtime's pip distribution (its version goes into host fingerprints)."""
    native: tuple[str, ...]
    """File suffixes this runtime is the native one for (``.xml`` -> openvino)."""
    aliases: tuple[str, ...] = ()


BACKENDS: Registry[BackendSpec] = Registry("runtime backend")
BACKENDS.register("onnxruntime")(BackendSpec("edgekt.devices.backends.onnxruntime",
                                             "onnxruntime", (".onnx",), ("ort",)))
BACKENDS.register("openvino")(BackendSpec("edgekt.devices.backends.openvino", "openvino",
                                          (".xml",), ("ov",)))
BACKENDS.register("litert")(BackendSpec("edgekt.devices.backends.litert", "ai-edge-litert",
                                        (".tflite",), ("tflite", "tflite-runtime")))


def __getattr__(name: str) -> Any:
    # The registry is standard library only (the runner's fingerprint reads it on devices that
    # may lack numpy); the Backend contract, which needs numpy, is imported on first use.
    if name in ("Backend", "MissingRuntimeError", "TensorInfo"):
        from edgekt.devices.backends import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def canonical_name(name: str) -> str:
    """``ort`` -> ``onnxruntime``, ``ov`` -> ``openvino``; unknown names raise listing the valid."""
    name = name.strip().lower()
    name = next((n for n in BACKENDS if name in BACKENDS.get(n).aliases), name)
    BACKENDS.get(name)
    return name


def backend_class(name: str) -> type[Backend]:
    module = importlib.import_module(BACKENDS.get(canonical_name(name)).module)
    return module.BACKEND


def model_suffixes() -> tuple[str, ...]:
    """Every model file suffix some backend is native to (``.onnx``, ``.xml``, ...)."""
    return tuple(s for n in BACKENDS for s in BACKENDS.get(n).native)


def default_backend(path: Path) -> str:
    """The runtime a file is native to (``.xml`` -> openvino); onnxruntime when none claims it."""
    suffix = Path(path).suffix.lower()
    return next((n for n in BACKENDS if suffix in BACKENDS.get(n).native), "onnxruntime")


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
