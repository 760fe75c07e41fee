"""torchvision classifiers adapted to the dataset: input channels, small images, class count."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgekt.errors import EdgektError
from edgekt.models.base import EdgeNet
from edgekt.models.registry import MODELS

# name -> (torchvision builder name, attribute path of the classifier Linear, stage attributes)
TORCHVISION: dict[str, tuple[str, str, list[str]]] = {
    "resnet18": ("resnet18", "fc", ["layer1", "layer2", "layer3", "layer4"]),
    "resnet34": ("resnet34", "fc", ["layer1", "layer2", "layer3", "layer4"]),
    "resnet50": ("resnet50", "fc", ["layer1", "layer2", "layer3", "layer4"]),
    "mobilenet_v2": ("mobilenet_v2", "classifier.1", ["features"]),
    "mobilenet_v3_small": ("mobilenet_v3_small", "classifier.3", ["features"]),
    "mobilenet_v3_large": ("mobilenet_v3_large", "classifier.3", ["features"]),
    "efficientnet_b0": ("efficientnet_b0", "classifier.1", ["features"]),
    "shufflenet_v2": (
        "shufflenet_v2_x1_0", "fc", ["stage2", "stage3", "stage4", "conv5"],
    ),
    "regnet_y_400mf": ("regnet_y_400mf", "fc", ["trunk_output"]),
    "squeezenet": ("squeezenet1_1", "classifier", ["features"]),
}


class TorchvisionNet(EdgeNet):
    """A torchvision classifier split into ``backbone`` (head removed) and a linear ``head``."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, num_classes: int,
                 stages: list[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        self.head = nn.Linear(embedding_dim, num_classes)
        self._stage_names = stages

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.backbone(x), 1)

    def stages(self) -> list[nn.Module]:
        mods: list[nn.Module] = []
        for name in self._stage_names:
            m = self.backbone.get_submodule(name)
            # A single Sequential "features" is split into its children for finer control.
            mods.extend(m.children() if len(self._stage_names) == 1 else [m])
        return mods


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            return name, mod
    raise EdgektError("model has no Conv2d to adapt")


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def adapt_stem(model: nn.Module, in_channels: int, image_size: int, stem: str) -> None:
    """Replace the first conv for ``in_channels``; for small images use a 3x3 stride-1 stem.

    ``stem``: ``auto`` (small stem when image_size <= 64), ``small``, or ``imagenet`` (original).
    """
    name, conv = _first_conv(model)
    small = stem == "small" or (stem == "auto" and image_size <= 64)
    kernel, stride, padding = (3, 1, 1) if small else (conv.kernel_size, conv.stride, conv.padding)
    if in_channels == conv.in_channels and not small:
        return
    _set_module(
        model,
        name,
        nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding,
                  bias=conv.bias is not None),
    )


def _split_head(model: nn.Module, head_path: str) -> int:
    """Remove the classifier, returning the embedding size it consumed."""
    head = model.get_submodule(head_path)
    if isinstance(head, nn.Linear):
        _set_module(model, head_path, nn.Identity())
        return head.in_features
    # squeezenet: classifier = Dropout, Conv2d(512, classes, 1), ReLU, AvgPool
    conv = head[1]
    _set_module(model, head_path, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    return conv.in_channels


def _make(tv_name: str, head_path: str, stages: list[str]) -> Callable[..., TorchvisionNet]:
    def factory(
        num_classes: int, in_channels: int, image_size: int, stem: str = "auto", **kw
    ) -> TorchvisionNet:
        import torchvision

        model = torchvision.models.get_model(tv_name, weights=None, **kw)
        adapt_stem(model, in_channels, image_size, stem)
        dim = _split_head(model, head_path)
        return TorchvisionNet(model, dim, num_classes, stages)

    return factory


for _name, (_tv, _head, _stages) in TORCHVISION.items():
    MODELS.register(_name)(_make(_tv, _head, _stages))


class VGGNet(TorchvisionNet):
    """VGG whose stages are its conv blocks (each ends with a max-pool), for freezing by block."""

    def stages(self) -> list[nn.Module]:
        blocks, current = [], []
        for m in self.backbone.features.children():
            current.append(m)
            if isinstance(m, nn.MaxPool2d | nn.Identity):
                blocks.append(nn.Sequential(*current))
                current = []
        return blocks + ([nn.Sequential(*current)] if current else [])


def _make_vgg(tv_name: str) -> Callable[..., VGGNet]:
    def factory(
        num_classes: int, in_channels: int, image_size: int, stem: str = "auto", **kw
    ) -> VGGNet:
        """ImageNet-sized inputs keep VGG's 4096-wide MLP as the embedding; small images
        (``stem: small``, or ``auto`` at <= 64 px) use the globally pooled 512 conv features and
        keep only as many 2x2 max-pools as the image size allows (28 px: 2 of 5)."""
        import torchvision

        model = torchvision.models.get_model(tv_name, weights=None, **kw)
        adapt_stem(model, in_channels, image_size, "imagenet")  # VGG's stem is already 3x3/1
        small = stem == "small" or (stem == "auto" and image_size <= 64)
        if not small:
            dim = _split_head(model, "classifier.6")
            return VGGNet(model, dim, num_classes, ["features"])
        pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
        keep = max(0, min(len(pools), image_size.bit_length() - 3))  # leave >= 2x2 maps
        for i in pools[keep:]:
            model.features[i] = nn.Identity()
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Identity()
        return VGGNet(model, 512, num_classes, ["features"])

    return factory


for _name in ("vgg11_bn", "vgg13_bn", "vgg16_bn"):
    MODELS.register(_name)(_make_vgg(_name))
MODELS.register("densenet121")(_make("densenet121", "classifier", ["features"]))
