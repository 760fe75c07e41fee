"""``EdgeModel``: an exported edgekt model on onnxruntime, OpenVINO or LiteRT, with no PyTorch."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgekt.devices.artifacts import Artifact, find_artifacts, select_artifact
from edgekt.devices.backends import Backend, canonical_name, default_backend, open_backend
from edgekt.devices.preprocess import Preprocessor
from edgekt.errors import EdgektError
from edgekt.metadata import METADATA_KEY, ModelMeta


class EdgeModel:
    """A loaded model. ``predict``/``predict_proba``/``logits``/``embed`` accept raw uint8 images
    (preprocessed as recorded at export) or normalised float input; safe to call from threads.

    Example::

        from edgekt.devices import EdgeModel
        model = EdgeModel.load("export/", threads=1)
        label = model.predict(image_uint8)          # 'Sneaker'
        probs = model.predict_proba(batch_uint8)    # (N, classes)
    """

    def __init__(self, backend: Backend, *, artifact: Artifact | None = None,
                 siblings: list[Artifact] | None = None) -> None:
        self.backend = backend
        self.artifact = artifact or Artifact(backend.path, backend.name)
        self._siblings = siblings or []
        self._embedder: EdgeModel | None = None
        self._lock = threading.Lock()
        text = backend.metadata()
        try:
            self.meta: ModelMeta | None = ModelMeta.from_json(text) if text else None
        except (ValueError, TypeError, KeyError) as exc:
            raise EdgektError(f"{backend.path}: its {METADATA_KEY!r} metadata is not valid "
                              f"edgekt metadata ({exc})") from None
        self.preprocess = Preprocessor(self.meta.preprocess if self.meta else None, backend.input)
        batch = backend.input.shape[0] if backend.input.shape else -1
        self.fixed_batch: int | None = batch if batch > 0 else None

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None, threads: int | None = None, *,
             precision: str | None = None, part: str | None = None,
             target: str = "CPU", config: dict[str, Any] | None = None) -> EdgeModel:
        """Open an export directory (``manifest.json``) or one ``.onnx``/``.xml``/``.tflite`` file.

        Args:
            backend: ``onnxruntime`` (``ort``), ``openvino`` (``ov``) or ``litert`` (``tflite``);
                default: the artifact's native runtime, onnxruntime first.
            threads: intra-op threads (default: the runtime's choice).
            precision: pick this precision from an export directory (``fp32``, ``int8``, ...).
            part: ``classifier`` or ``embedding`` from an export directory.
            target: execution device (OpenVINO: ``CPU``, ``GPU``, ``NPU``).
            config: runtime settings (default: the manifest's ``runtime_config`` for the
                artifact's own runtime).
        """
        artifacts = find_artifacts(path)
        if backend is None:
            backend = ("onnxruntime" if any(a.runtime == "onnxruntime" for a in artifacts)
                       else default_backend(artifacts[0].path))
        name = canonical_name(backend)
        chosen = select_artifact(artifacts, name, precision=precision, part=part)
        # The exporter's runtime_config applies to the runtime it was validated on.
        if config is None and chosen.runtime == name:
            config = chosen.runtime_config
        opened = open_backend(chosen.path, name, threads=threads, target=target, config=config)
        return cls(opened, artifact=chosen, siblings=artifacts)

    # -- description -----------------------------------------------------------------------
    @property
    def task(self) -> str | None:
        """``classifier``, ``embedding``, or None when the model has no edgekt metadata."""
        return self.meta.task if self.meta else None

    @property
    def labels(self) -> list[str] | None:
        return list(self.meta.labels) if self.meta and self.meta.labels else None

    def describe(self) -> dict[str, Any]:
        """What was loaded, for logs and profiles."""
        return {"path": str(self.artifact.path), "backend": self.backend.name,
                "input": {"name": self.backend.input.name, "shape": list(self.backend.input.shape),
                          "dtype": self.backend.input.dtype},
                "task": self.task, "has_metadata": self.meta is not None,
                "preprocessing": "known" if self.meta else "unknown",
                "precision": self.artifact.precision
                or (self.meta.precision if self.meta else None),
                "model_name": self.meta.model_name if self.meta else None}

    # -- inference -------------------------------------------------------------------------
    def _run(self, batch: np.ndarray) -> np.ndarray:
        n, fixed = len(batch), self.fixed_batch
        if fixed is None or n == fixed:
            return self.backend.run(batch)[0]
        if n % fixed:
            # A model exported with a fixed batch B takes exactly B samples per call.
            raise EdgektError(f"this model was exported with a fixed batch of {fixed}; pass a "
                              f"multiple of {fixed} samples (got {n}) or re-export with a dynamic "
                              "batch")
        return np.concatenate([self.backend.run(batch[i:i + fixed])[0]
                               for i in range(0, n, fixed)])

    def _forward(self, x: Any) -> tuple[np.ndarray, bool]:
        batch, single = self.preprocess(x)
        return self._run(batch), single

    def logits(self, x: Any) -> np.ndarray:
        """Raw model output: (N, classes), or (classes,) for a single input."""
        out, single = self._forward(x)
        return out[0] if single else out

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities (softmax of the logits)."""
        self._require("classifier", "predict_proba")
        out, single = self._forward(x)
        z = out - out.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return p[0] if single else p

    def predict(self, x: Any) -> Any:
        """Class labels (strings from the metadata; class indices when it has none)."""
        self._require("classifier", "predict")
        out, single = self._forward(x)
        idx = out.argmax(axis=1)
        labels = self.labels
        names = [labels[i] if labels and i < len(labels) else int(i) for i in idx]
        return names[0] if single else names

    def embed(self, x: Any) -> np.ndarray:
        """Embedding vectors: this model's output, or the export's embedding part."""
        if self.task == "classifier":
            return self._embedding_model().embed(x)
        out, single = self._forward(x)
        return out[0] if single else out

    def _require(self, task: str, method: str) -> None:
        if self.task not in (None, task):
            raise EdgektError(f"{method}() needs a {task} model; this one is a {self.task} model "
                              f"({self.artifact.path.name}); use embed()")

    def _embedding_model(self) -> EdgeModel:
        with self._lock:
            if self._embedder is None:
                try:
                    chosen = select_artifact(self._siblings, self.backend.name,
                                             precision=self.artifact.precision, part="embedding")
                except EdgektError:
                    chosen = None
                if chosen is None or chosen.part != "embedding":
                    raise EdgektError(
                        f"{self.artifact.path.name} is a classifier and its export has no "
                        "embedding part; export with the embedding part to use embed()")
                config = chosen.runtime_config if chosen.runtime == self.backend.name else None
                backend = open_backend(chosen.path, self.backend.name, config=config,
                                       threads=self.backend.threads, target=self.backend.target)
                self._embedder = EdgeModel(backend, artifact=chosen, siblings=self._siblings)
            return self._embedder

    def __repr__(self) -> str:
        return (f"EdgeModel({self.artifact.path.name!r}, backend={self.backend.name!r}, "
                f"task={self.task!r})")

