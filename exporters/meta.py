"""Build the self-description (``edgekt.metadata.ModelMeta``) of a model about to be exported."""

from __future__ import annotations

from typing import Literal

import edgekt
from edgekt.data import DatasetInfo
from edgekt.metadata import InputSpec, ModelMeta, Preprocess


def build_meta(
    info: DatasetInfo,
    *,
    part: Literal["classifier", "embedding"],
    model_name: str,
    embedding_dim: int,
    batch: int = 1,
    dynamic_batch: bool = False,
    source_sha256: str = "",
    precision: str = "fp32",
) -> ModelMeta:
    size = info.image_size
    return ModelMeta(
        task=part,
        input=InputSpec(name="input", shape=[-1 if dynamic_batch else batch, info.in_channels,
                                              size, size]),
        output_name="embedding" if part == "embedding" else "logits",
        preprocess=Preprocess(image_size=[size, size], channels=info.in_channels,
                              color=info.color, mean=list(info.mean), std=list(info.std)),
        labels=list(info.labels),
        embedding_dim=embedding_dim,
        num_classes=info.num_classes,
        model_name=model_name,
        edgekt_version=edgekt.__version__,
        source_sha256=source_sha256,
        precision=precision,
    )
