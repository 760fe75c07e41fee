"""The contract every runtime backend meets (one module per runtime, nncf-style)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgekt.errors import EdgektError


@dataclass(frozen=True)
class TensorInfo:
    """Name, static shape (-1 for a dynamic dimension) and numpy dtype of a model input."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class Backend(ABC):
    """An opened model on one runtime. ``run`` must be safe to call from several threads."""

    name: ClassVar[str]
    """Registry name (``onnxruntime``, ``openvino``)."""
    module: ClassVar[str]
    """The Python module the runtime needs (for the install hint)."""
    pip: ClassVar[str]
    """``pip install`` argument that provides it."""
    suffixes: ClassVar[tuple[str, ...]]
    """Model file suffixes this runtime opens."""

    @classmethod
    def files_of(cls, path: Path) -> list[Path]:
        """Every file needed to open ``path`` (an IR's ``.bin`` too), ``path`` first."""
        return [Path(path)]

    def __init__(self, path: Path, *, threads: int | None = None, target: str = "CPU",
                 config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.threads = threads
        self.target = target
        self.config = dict(config or {})
        """Runtime settings recorded by the exporter (``runtime_config`` in the manifest)."""

    @staticmethod
    @abstractmethod
    def version() -> str:
        """Version of the runtime library (imports it)."""

    _input: TensorInfo
    _outputs: list[str]
    """Set by each backend's constructor from the opened model."""

    @property
    def input(self) -> TensorInfo:
        """The model's (single) input."""
        return self._input

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs, in order."""
        return list(self._outputs)

    @abstractmethod
    def metadata(self) -> str | None:
        """The JSON string stored under the ``edgekt`` key, or None when absent."""

    @abstractmethod
    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one batch; returns all outputs (copies the caller may keep)."""

    @abstractmethod
    def bind(self, x: np.ndarray) -> Callable[[], object]:
        """A zero-argument callable running ``x`` with the least overhead the runtime allows.

        The profiler times this in its loop, so the measurement is the model, not our wrapper.
        """

    def last_latency_ms(self) -> float | None:
        """The runtime's own timing of the last ``bind`` call, or None when it keeps none.

        OpenVINO's ``InferRequest.latency`` is what its ``benchmark_app`` reports: the infer
        call measured inside the runtime, without the Python call around it.
        """
        return None

    def settings(self) -> dict[str, object]:
        """Runtime settings worth recording beside a measurement."""
        return {"threads": self.threads if self.threads else "default", "target": self.target}


def import_runtime(module: str, pip: str):
    """Import a runtime module or raise an error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingRuntimeError(module, pip, str(exc)) from None


class MissingRuntimeError(EdgektError):
    """The runtime library is not installed in this Python."""

    def __init__(self, module: str, pip: str, detail: str = "") -> None:
        self.module, self.pip = module, pip
        super().__init__(f"{module} is not installed in this Python ({detail}); install it with: "
                         f"python -m pip install {pip}")
