"""VGG (batch norm) and DenseNet-121 in the torchvision zoo: adaptation, local weights, freezing,
per-layer learning rates and export parity, on 28 px inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _model_support import assert_embedding_head_split

from edgekt.models import create_model, load_weights

CONFIGS = Path(__file__).resolve().parents[1] / "edgekt" / "configs"


@pytest.mark.parametrize("name", ["vgg11_bn", "densenet121"])
def test_classic_splits_embedding_and_head(name):
    m = create_model(name, num_classes=7, in_channels=1, image_size=28).eval()
    assert_embedding_head_split(m)
    assert m.head.out_features == 7


def test_vgg_stages_are_conv_blocks_and_imagenet_size_keeps_the_mlp():
    m = create_model("vgg11_bn", num_classes=10, in_channels=1, image_size=28)
    assert len(m.stages()) == 5 and m.embedding_dim == 512
    big = create_model("vgg11_bn", num_classes=10, in_channels=3, image_size=224)
    assert big.embedding_dim == 4096


def test_densenet_published_legacy_keys_load_with_rgb_stem_summed(tmp_path):
    import torchvision

    tv = torchvision.models.densenet121(num_classes=10)
    # torchvision's published file spells "norm1" as "norm.1" (its own loader renames them).
    legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
              for k, v in tv.state_dict().items()}
    assert any(".norm.1." in k for k in legacy)
    torch.save(legacy, tmp_path / "densenet121.pth")
    m = create_model("densenet121", num_classes=10, in_channels=1, image_size=224,
                     stem="imagenet")
    assert load_weights(m, tmp_path / "densenet121.pth") == []
    assert torch.allclose(m.backbone.features.conv0.weight,
                          tv.features.conv0.weight.sum(1, keepdim=True))


def test_vgg_finetune_example_freezes_bottom_blocks_with_per_layer_lrs(tmp_path):
    import torchvision

    from edgekt.config import load_config
    from edgekt.data import DatasetInfo
    from edgekt.engine.optim import param_groups
    from edgekt.engine.setup import build_model

    weights = tmp_path / "vgg11_bn.pth"
    torch.save(torchvision.models.vgg11_bn().state_dict(), weights)
    cfg = load_config(CONFIGS / "finetune_vgg.yaml", [f"model.weights={weights}"])
    info = DatasetInfo(name="fashion-mnist", num_classes=10, in_channels=1, image_size=28,
                       mean=(0.286,), std=(0.353,), labels=[str(i) for i in range(10)])
    m = build_model(cfg.model, info, cfg.finetune)
    blocks = m.stages()
    assert not any(p.requires_grad for b in blocks[:2] for p in b.parameters())
    assert all(p.requires_grad for b in blocks[2:] for p in b.parameters())
    lrs = {g["name"]: g["lr"] for g in param_groups(m, cfg.optim, [])}
    assert lrs["head"] == pytest.approx(0.05)
    assert lrs["stage4"] > lrs["stage3"] > lrs["stage2"] and "stage0" not in lrs


@pytest.mark.parametrize("name", ["vgg11_bn", "densenet121"])
def test_classic_exports_with_parity(name, tmp_path, fashion_tiny):
    from edgekt.checkpoint import save_checkpoint
    from edgekt.config import ModelConfig
    from edgekt.engine.setup import info_record, model_record
    from edgekt.exporters import export_package

    torch.set_num_threads(1)
    info = fashion_tiny.info
    torch.manual_seed(0)
    m = create_model(name, num_classes=10, in_channels=1, image_size=28).train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(16, 1, 28, 28))
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, {"model": model_record(ModelConfig(name=name), info, m.eval()),
                           "data": info_record(info)})
    man = export_package(ckpt, tmp_path / "pkg", targets=["onnx", "openvino"],
                         precisions=["fp32"], splits=fashion_tiny, val_samples=64,
                         test_samples=64, threads=1)
    assert man.gate["passed"]
    assert all(a["parity"]["agreement"] >= 0.99 for a in man.artifacts)
