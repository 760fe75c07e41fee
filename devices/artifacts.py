"""Find the model files of an export: a directory with ``manifest.json``, or a single file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekt.devices.backends import backend_class, default_backend, model_suffixes
from edgekt.errors import EdgektError
from edgekt.metadata import MANIFEST_NAME, Manifest


@dataclass(frozen=True)
class Artifact:
    """One model file of an export, as listed in its manifest (or guessed from the file)."""

    path: Path
    runtime: str
    precision: str | None = None
    part: str | None = None
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """The manifest entry as written (accuracy, sha256, ...)."""

    @property
    def runtime_config(self) -> dict[str, Any]:
        """Settings the exporter validated parity with (e.g. OpenVINO's f32 precision hint)."""
        return dict(self.info.get("runtime_config") or {})

    @property
    def accuracy(self) -> float | None:
        """Test (else validation) accuracy the exporter measured for this artifact."""
        parity = self.info.get("parity") or {}
        value = parity.get("test_acc", parity.get("val_acc", self.info.get("accuracy")))
        return float(value) if value is not None else None

    def files(self) -> list[Path]:
        """Every file needed to open it (an IR's ``.bin`` too)."""
        if self.info.get("files"):
            names = [self.path.name] + [f for f in self.info["files"] if f != self.path.name]
            return [self.path.parent / f for f in names]
        return backend_class(self.runtime).files_of(self.path)


def find_artifacts(path: str | Path) -> list[Artifact]:
    """All artifacts at ``path`` (an export directory or one model file)."""
    path = Path(path)
    if not path.exists():
        raise EdgektError(f"{path}: no such file or directory")
    suffixes = model_suffixes()
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise EdgektError(f"{path}: not a model file; expected a {'/'.join(suffixes)} model "
                              f"file or an export directory (with {MANIFEST_NAME})")
        return [Artifact(path, default_backend(path))]
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        return _from_manifest(manifest)
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
    if not found:
        raise EdgektError(f"{path}: no {MANIFEST_NAME} and no {'/'.join(suffixes)} model in this "
                          "directory")
    return [Artifact(p, default_backend(p)) for p in found]


def _from_manifest(manifest: Path) -> list[Artifact]:
    m = Manifest.load(manifest)
    return [Artifact(manifest.parent / e["file"], e.get("runtime") or default_backend(e["file"]),
                     e.get("precision"), e.get("part"), dict(e)) for e in m.artifacts]


def select_artifact(artifacts: list[Artifact], backend: str, *, precision: str | None = None,
                    part: str | None = None) -> Artifact:
    """The artifact ``backend`` should open: its native format first, then ONNX (OpenVINO reads
    ONNX too); the classifier before the embedding part and fp32 before other precisions unless
    asked otherwise."""
    def ok(a: Artifact) -> bool:
        return ((precision is None or a.precision in (None, precision))
                and (part is None or a.part in (None, part)))

    native = [a for a in artifacts if a.runtime == backend and ok(a)]
    opens = backend_class(backend).suffixes
    fallback = [a for a in artifacts if a.path.suffix.lower() in opens and ok(a)]
    pool = native or fallback
    if not pool:
        have = ", ".join(f"{a.path.name} ({a.runtime}, {a.precision or '?'}, {a.part or '?'})"
                         for a in artifacts)
        want = ", ".join(x for x in (backend, precision, part) if x)
        raise EdgektError(f"no artifact for {want} in this export (it has: {have})")
    return min(pool, key=lambda a: (a.part not in (None, "classifier"),
                                    a.precision not in (None, "fp32")))
