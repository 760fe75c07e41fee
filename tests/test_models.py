import pytest
import torch
from _model_support import assert_embedding_head_split

from edgekt.errors import EdgektError
from edgekt.models import MODELS, Embedding, count_params, create_model, load_weights

SMALL = ["cnn_xs", "cnn_s", "cnn_m", "cnn_l", "cnn_xl", "resnet18", "mobilenet_v3_small",
         "shufflenet_v2", "squeezenet", "mobilenet_v2", "efficientnet_b0", "regnet_y_400mf"]


@pytest.mark.parametrize("name", SMALL)
def test_every_model_splits_embedding_and_head(name):
    m = create_model(name, num_classes=7, in_channels=1, image_size=28).eval()
    x, emb = assert_embedding_head_split(m)
    with torch.no_grad():
        assert torch.allclose(Embedding(m)(x), emb)
    assert m.head.out_features == 7 and len(m.stages()) >= 1


def test_registry_covers_the_zoo():
    for name in ["resnet34", "resnet50", "mobilenet_v3_large"]:
        assert name in MODELS


def test_compact_sizes_span_20k_to_300k():
    sizes = [count_params(create_model(n, num_classes=10, in_channels=1, image_size=28))
             for n in ["cnn_xs", "cnn_s", "cnn_m", "cnn_l"]]
    assert sizes == sorted(sizes) and 15_000 < sizes[0] < 30_000 and 250_000 < sizes[-1] < 320_000
    wide = create_model("cnn_s", num_classes=10, in_channels=1, image_size=28, width_mult=2.0)
    assert count_params(wide) > 3 * sizes[1]


def test_bad_model_kwargs_is_a_user_error():
    with pytest.raises(EdgektError, match="bad model.kwargs"):
        create_model("cnn_s", num_classes=10, in_channels=1, image_size=28, nonsense=1)


def test_torchvision_pth_loads_with_rgb_stem_summed(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(num_classes=10)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    m = create_model("resnet18", num_classes=10, in_channels=1, image_size=224, stem="imagenet")
    missing = load_weights(m, tmp_path / "resnet18.pth")
    assert missing == []
    assert torch.allclose(m.backbone.conv1.weight, tv.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(m.head.weight, tv.fc.weight)


def test_safetensors_and_mismatched_head(tmp_path):
    from safetensors.torch import save_file

    src = create_model("cnn_s", num_classes=10, in_channels=1, image_size=28)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    dst = create_model("cnn_s", num_classes=4, in_channels=1, image_size=28)
    missing = load_weights(dst, tmp_path / "w.safetensors")
    assert set(missing) == {"head.weight", "head.bias"}
    assert torch.equal(dst.stage1[0][0].weight, src.stage1[0][0].weight)


def test_weights_for_another_architecture_are_refused(tmp_path):
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "x.pt")
    m = create_model("cnn_s", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(EdgektError, match="no tensor matches"):
        load_weights(m, tmp_path / "x.pt")
