"""The self-description every exported model carries (torch-free; shared by exporters and devices).

It is stored as one JSON string under the key ``edgekt`` in the ONNX ``metadata_props`` and
in the OpenVINO ``rt_info``, so a plain onnxruntime user can read it without edgekt::

    meta = json.loads(session.get_modelmeta().custom_metadata_map["edgekt"])
    x = (raw_uint8_hwc.astype("float32") * meta["preprocess"]["scale"] - mean) / std  # per channel
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

METADATA_KEY = "edgekt"
FORMAT_VERSION = 1


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
