"""The package schema (torch-free): the metadata every model file carries and ``manifest.json``.

The exporters write it, ``edgekt.devices`` reads it and the tests build it, all through this
module, so the format is typed in exactly one place.

``ModelMeta`` is stored as one JSON string under the key ``edgekt``: in the ONNX
``metadata_props``, the OpenVINO ``rt_info`` and the LiteRT (.tflite) flatbuffer's ``metadata``
list, so a plain runtime user can read it without edgekt::

    meta = json.loads(session.get_modelmeta().custom_metadata_map["edgekt"])
    x = (raw_uint8_hwc.astype("float32") * meta["preprocess"]["scale"] - mean) / std  # per channel

Keys of ``ModelMeta.extra`` that a runtime needs:
    quantization     how an INT8 artifact was made (tool, calib_method, calib_samples, ...)
    io_quantization  for models whose input/output tensors are int8 (fully quantized LiteRT):
                     ``{"input": {"dtype": "int8", "scale": s, "zero_point": z}, "output": ...}``;
                     feed ``round(x / s) + z`` (clipped to int8), read ``(y - z) * s``.

``manifest.json`` (schema ``edgekt.package/1``, stable; new keys may be added, none renamed)::

    format          "edgekt.package/1"
    created, edgekt_version
    source          {checkpoint, sha256, model, dataset, method}
    part            "classifier" | "embedding"
    meta            the ModelMeta embedded in every model file (precision: fp32)
    artifacts       [{file, files, target, runtime, precision, part, runtime_config,
                      quantization, parity, export_s}]
                    file: what the runtime opens; runtime: a name of the
                    ``edgekt.devices.backends.BACKENDS`` registry ("onnxruntime", "openvino",
                    "litert"); precision: "fp32" | "fp16" | "int8"; runtime_config: settings
                    to pass when compiling (OpenVINO FP32: {"INFERENCE_PRECISION_HINT": "f32"});
                    parity: {max_abs_diff, mean_abs_diff, agreement, test_agreement, val_acc,
                    test_acc, n_val, n_test, min_agreement, passed}
    head            {file: "head.npz", keys: [weight, bias, labels]} | null
    reference       PyTorch's {val_acc, test_acc, n_val, n_test}
    calibration     {split, samples, method, seed, indices_sha256}
    options, gate   export options and the parity thresholds / verdict
    files           {name: {sha256, bytes}} for every file except manifest.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from edgekt.errors import EdgektError

METADATA_KEY = "edgekt"
FORMAT_VERSION = 1
PACKAGE_FORMAT = "edgekt.package/1"
MANIFEST_NAME = "manifest.json"


@dataclass
class InputSpec:
    name: str
    shape: list[int]
    """Static shape; a dynamic batch is written as -1."""
    dtype: str = "float32"
    layout: str = "NCHW"


@dataclass
class Preprocess:
    """How raw images become model input: ``(resize(raw) * scale - mean) / std`` per channel."""

    image_size: list[int]
    """[height, width] the model expects."""
    channels: int
    color: Literal["L", "RGB"]
    mean: list[float]
    std: list[float]
    scale: float = 1.0 / 255.0


@dataclass
class ModelMeta:
    task: Literal["classifier", "embedding"]
    input: InputSpec
    preprocess: Preprocess
    labels: list[str]
    output_name: str = "output"
    embedding_dim: int | None = None
    num_classes: int | None = None
    model_name: str = ""
    edgekt_version: str = ""
    source_sha256: str = ""
    precision: str = "fp32"
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        raw = json.loads(text)
        raw["input"] = InputSpec(**raw["input"])
        raw["preprocess"] = Preprocess(**raw["preprocess"])
        return cls(**raw)


@dataclass
class ArtifactEntry:
    """One model file set of a package, as listed under ``artifacts`` in the manifest."""

    file: str
    """The file a runtime opens (``model.onnx``, ``model.fp16.xml``, ``model.int8.tflite``)."""
    files: list[str]
    """Every file of the artifact (``.xml`` and its ``.bin``)."""
    target: str
    runtime: str
    precision: str
    part: str
    runtime_config: dict[str, Any] = field(default_factory=dict)
    """Settings the runtime needs to reproduce the parity numbers (e.g. OpenVINO's precision)."""
    quantization: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    export_s: float | None = None


@dataclass
class Manifest:
    """``manifest.json``: what a package holds, how it was made and how well each file matches.

    ``artifacts`` stay plain dicts (the JSON as written), so a reader never loses keys added by
    a newer edgekt; :class:`ArtifactEntry` is the typed shape a writer fills them from.
    """

    artifacts: list[dict[str, Any]]
    format: str = PACKAGE_FORMAT
    created: str = ""
    edgekt_version: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    part: str = "classifier"
    meta: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] | None = None
    reference: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    unknown: dict[str, Any] = field(default_factory=dict, compare=False)
    """Keys written by a newer edgekt, kept and written back as they were."""
    path: Path | None = field(default=None, compare=False)
    """Where it was read from or written to (not serialised)."""

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        data.update(data.pop("unknown"))
        return json.dumps(data, indent=2)

    def save(self, path: Path) -> None:
        from edgekt.io import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read a package's manifest (a directory or the file); errors name the file and key."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_NAME
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EdgektError(f"{p}: cannot read the package manifest ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != PACKAGE_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise EdgektError(f"{p}: not a valid edgekt manifest (format {got!r}, expected "
                              f"{PACKAGE_FORMAT!r})")
        arts = data.get("artifacts")
        if not isinstance(arts, list) or not all(
                isinstance(a, dict) and isinstance(a.get("file"), str) for a in arts):
            raise EdgektError(f"{p}: not a valid edgekt manifest: 'artifacts' must be a list of "
                              "objects with a 'file' "
                              "(expected {\"artifacts\": [{\"file\": ..., \"runtime\": ...}]})")
        if not arts:
            raise EdgektError(f"{p}: lists no artifacts")
        known = {f.name for f in fields(cls)} - {"unknown", "path"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   unknown={k: v for k, v in data.items() if k not in known}, path=p)

    def artifact(self, runtime: str, precision: str) -> dict[str, Any]:
        """The artifact for ``runtime`` and ``precision``; a clear error lists what exists."""
        for a in self.artifacts:
            if a.get("runtime") == runtime and a.get("precision") == precision:
                return a
        have = ", ".join(f"{a.get('runtime')}/{a.get('precision')}" for a in self.artifacts)
        raise EdgektError(f"{self.path}: no {runtime}/{precision} artifact (has: {have})")
