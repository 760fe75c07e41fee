"""timm models: creation, local weights, re-parameterisation and export parity on tiny inputs."""

from __future__ import annotations

import onnx
import pytest
import torch

from edgekt.errors import EdgektError
from edgekt.models import create_model, load_weights
from edgekt.models.timm_zoo import fuse_for_export, is_reparameterisable

pytest.importorskip("timm")

# Three edge families: two re-parameterisable (RepViT, FastViT) and MobileNetV4.
FAMILIES = ["timm:repvit_m0_9", "timm:fastvit_t8", "timm:mobilenetv4_conv_small"]


def _settled(name: str, num_classes: int = 10) -> torch.nn.Module:
    """A timm EdgeNet whose BatchNorm statistics saw a few batches (random init is degenerate)."""
    torch.manual_seed(0)
    m = create_model(name, num_classes=num_classes, in_channels=1, image_size=28).train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 28, 28))
    return m.eval()


def test_timm_model_adapts_channels_classes_and_splits_head():
    m = create_model("timm:mobilenetv4_conv_small", num_classes=7, in_channels=1, image_size=28)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        emb = m.eval().forward_features(x)
        assert emb.shape == (2, m.embedding_dim)
        assert torch.allclose(m(x), m.head(emb), atol=1e-5)
    assert m.head.out_features == 7 and len(m.stages()) >= 3


def test_unknown_timm_name_lists_close_ones():
    with pytest.raises(EdgektError, match="close names: .*repvit_m0_9"):
        create_model("timm:repvit_m09", num_classes=10, in_channels=1, image_size=28)


def test_pretrained_download_is_refused():
    with pytest.raises(EdgektError, match="model.weights"):
        create_model("timm:mobilenetv4_conv_small", num_classes=10, in_channels=1,
                     image_size=28, pretrained=True)


def test_raw_timm_safetensors_load_and_wrong_architecture_is_named(tmp_path):
    import timm
    from safetensors.torch import save_file

    raw = timm.create_model("mobilenetv4_conv_small", pretrained=False, num_classes=10,
                            in_chans=1)
    save_file(raw.state_dict(), str(tmp_path / "mnv4.safetensors"))
    m = create_model("timm:mobilenetv4_conv_small", num_classes=10, in_channels=1, image_size=28)
    assert load_weights(m, tmp_path / "mnv4.safetensors") == []
    assert torch.equal(m.head.weight, raw.classifier.weight)
    assert torch.equal(m.backbone.conv_stem.weight, raw.conv_stem.weight)

    other = timm.create_model("mobilenetv4_conv_medium", pretrained=False, num_classes=10,
                              in_chans=1)
    torch.save(other.state_dict(), tmp_path / "medium.pth")
    with pytest.raises(EdgektError, match=r"tensor 'backbone\.[\w.]+' has shape"):
        load_weights(m, tmp_path / "medium.pth")


def test_fusion_changes_the_graph_not_the_function():
    m = _settled("timm:repvit_m0_9")
    assert is_reparameterisable(m)
    fused = fuse_for_export(m)
    convs = lambda net: sum(isinstance(x, torch.nn.Conv2d) for x in net.modules())  # noqa: E731
    assert convs(fused) < convs(m)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(fused(x), m(x), atol=1e-4, rtol=1e-4)
    cnn = create_model("cnn_xs", num_classes=10, in_channels=1, image_size=28)
    assert not is_reparameterisable(cnn) and fuse_for_export(cnn) is cnn


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_family_exports_with_parity(name, tmp_path, fashion_tiny):
    """ONNX and OpenVINO, and LiteRT where its converter is installed (scripts/test.sh does)."""
    from edgekt.checkpoint import save_checkpoint
    from edgekt.config import ModelConfig
    from edgekt.engine.setup import info_record, model_record
    from edgekt.exporters import export_package
    from edgekt.exporters.base import target_installed

    torch.set_num_threads(1)
    info = fashion_tiny.info
    m = _settled(name, info.num_classes)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, {"model": model_record(ModelConfig(name=name), info, m),
                           "data": info_record(info)})
    targets = ["onnx", "openvino", *(["litert"] if target_installed("litert") else [])]
    man = export_package(ckpt, tmp_path / "pkg", targets=targets, precisions=["fp32"],
                         splits=fashion_tiny, val_samples=64, test_samples=64, threads=1)
    assert man.gate["passed"] and {a["target"] for a in man.artifacts} == set(targets)
    for a in man.artifacts:
        assert a["parity"]["agreement"] >= 0.99 and a["parity"]["max_abs_diff"] < 1e-3
    # The ONNX graph is the fused one: fewer convolutions than the trained multi-branch model.
    graph = onnx.load(str(tmp_path / "pkg" / "model.onnx")).graph
    n_conv = sum(node.op_type == "Conv" for node in graph.node)
    n_torch = sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())
    assert n_conv < n_torch if is_reparameterisable(m) else n_conv == n_torch
