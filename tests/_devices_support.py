"""Test models for the device runtime tests: a tiny trained CNN exported to ONNX/OpenVINO.

Built once per session on disk (several test modules import ``device_models``); torch is
used here only to export and to compute the reference outputs the runtime must reproduce.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass
class DeviceModels:
    root: Path
    classifier: Path
    """Dynamic batch, with edgekt metadata."""
    fixed: Path
    """Batch fixed at 2."""
    embedding: Path
    nometa: Path
    """The classifier without its edgekt metadata."""
    package: Path
    """Export directory: manifest.json (edgekt.package/1) + ONNX classifier/embedding + IR."""
    images: np.ndarray
    """(N, 28, 28) uint8 real Fashion-MNIST test images."""
    logits: np.ndarray
    """PyTorch's logits for ``images``."""
    embeddings: np.ndarray
    labels: list[str]


def build(root: Path, checkpoint: Path, splits) -> DeviceModels:
    import onnx
    import openvino as ov
    import torch

    from edgekt.checkpoint import load_checkpoint
    from edgekt.engine.setup import model_from_checkpoint
    from edgekt.exporters.meta import build_meta
    from edgekt.exporters.onnx_export import export_onnx
    from edgekt.metadata import METADATA_KEY, ArtifactEntry, Manifest
    from edgekt.models.base import Embedding

    torch.set_num_threads(1)
    net, info = model_from_checkpoint(load_checkpoint(checkpoint))
    common = {"model_name": "cnn_xs", "embedding_dim": net.embedding_dim}
    cls_meta = build_meta(info, part="classifier", dynamic_batch=True, **common)
    emb_meta = build_meta(info, part="embedding", dynamic_batch=True, **common)
    root.mkdir(parents=True)
    paths = {n: root / f"{n}.onnx" for n in ("classifier", "fixed", "embedding", "nometa")}
    export_onnx(net, cls_meta, paths["classifier"])
    export_onnx(net, build_meta(info, part="classifier", batch=2, **common), paths["fixed"])
    export_onnx(Embedding(net), emb_meta, paths["embedding"])
    bare = onnx.load(paths["classifier"])
    del bare.metadata_props[:]
    onnx.save(bare, paths["nometa"])

    pkg = root / "package"
    pkg.mkdir()
    shutil.copy(paths["classifier"], pkg / "model.onnx")
    shutil.copy(paths["embedding"], pkg / "model.embedding.onnx")
    ir = ov.convert_model(str(paths["classifier"]))
    ir.set_rt_info(cls_meta.to_json(), METADATA_KEY)
    ov.save_model(ir, str(pkg / "model.fp32.xml"), compress_to_fp16=False)
    # Written through the package schema the exporter uses (edgekt.metadata), not re-typed.
    common_art = {"target": "onnx", "runtime": "onnxruntime", "precision": "fp32",
                  "part": "classifier"}
    Manifest(part="classifier", artifacts=[asdict(a) for a in (
        ArtifactEntry(file="model.onnx", files=["model.onnx"], **common_art,
                      parity={"test_acc": 0.81, "val_acc": 0.8}),
        ArtifactEntry(file="model.embedding.onnx", files=["model.embedding.onnx"],
                      **{**common_art, "part": "embedding"}),
        ArtifactEntry(file="model.fp32.xml", files=["model.fp32.xml", "model.fp32.bin"],
                      **{**common_art, "target": "openvino", "runtime": "openvino"},
                      runtime_config={"INFERENCE_PRECISION_HINT": "f32"},
                      parity={"test_acc": 0.8}),
    )]).save(pkg / "manifest.json")

    images = splits.test.images[:16, 0].numpy()
    x = (torch.from_numpy(images.astype(np.float32))[:, None] / 255 - info.mean[0]) / info.std[0]
    with torch.no_grad():
        logits = net(x).numpy()
        emb = net.forward_features(x).numpy()
    np.savez(root / "reference.npz", images=images, logits=logits, embeddings=emb)
    (root / "labels.json").write_text(json.dumps(list(info.labels)))
    return load(root)


def load(root: Path) -> DeviceModels:
    ref = np.load(root / "reference.npz", allow_pickle=False)
    return DeviceModels(root, root / "classifier.onnx", root / "fixed.onnx",
                        root / "embedding.onnx", root / "nometa.onnx", root / "package",
                        ref["images"], ref["logits"], ref["embeddings"],
                        json.loads((root / "labels.json").read_text()))


@pytest.fixture(scope="session")
def device_models(tmp_path_factory, tiny_checkpoint, fashion_splits) -> DeviceModels:
    root = tmp_path_factory.getbasetemp() / "device_models"
    if (root / "labels.json").is_file():  # already built by another test module
        return load(root)
    return build(root, tiny_checkpoint, fashion_splits)


@dataclass
class LiteRTModels:
    classifier: Path
    """FP32 .tflite of the device_models classifier (static batch 1), edgekt metadata embedded."""
    nometa: Path
    """The same model without the metadata."""


@pytest.fixture(scope="session")
def litert_models(device_models, tiny_checkpoint) -> LiteRTModels:
    """.tflite twins of ``device_models`` (built with litert-torch, about 5 s)."""
    root = device_models.root / "litert"
    out = LiteRTModels(root / "classifier.tflite", root / "nometa.tflite")
    if out.classifier.is_file():
        return out
    import torch

    from edgekt.checkpoint import load_checkpoint
    from edgekt.engine.setup import model_from_checkpoint
    from edgekt.exporters.litert_export import convert, embed_metadata
    from edgekt.exporters.meta import build_meta

    torch.set_num_threads(1)
    net, info = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    meta = build_meta(info, part="classifier", model_name="cnn_xs",
                      embedding_dim=net.embedding_dim)
    data = convert(net, meta.input.shape)
    root.mkdir()
    out.nometa.write_bytes(data)
    out.classifier.write_bytes(embed_metadata(data, meta.to_json()))
    return out
