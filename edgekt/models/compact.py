"""Compact CNN students sized for microcontroller-class and IoT CPUs (about 20k to 300k params)."""

from __future__ import annotations

import torch
from torch import nn

from edgekt.models.base import EdgeNet
from edgekt.models.registry import MODELS

# Base channel widths per stage; width_mult scales them.
SIZES: dict[str, tuple[int, int, int]] = {
    "cnn_xs": (8, 16, 32),
    "cnn_s": (16, 32, 64),
    "cnn_m": (24, 48, 96),
    "cnn_l": (32, 64, 128),
    "cnn_xl": (64, 128, 256),
}


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class CompactCNN(EdgeNet):
    """Three stages of two 3x3 conv-BN-ReLU blocks, max-pool between stages, global average pool."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
        width_mult: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c1, c2, c3 = (max(4, int(round(w * width_mult))) for w in widths)
        self.stage1 = nn.Sequential(_conv_bn(in_channels, c1), _conv_bn(c1, c1))
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), _conv_bn(c1, c2), _conv_bn(c2, c2))
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), _conv_bn(c2, c3), _conv_bn(c3, c3))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.embedding_dim = c3
        self.head = nn.Linear(c3, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage3(self.stage2(self.stage1(x))))

    def stages(self) -> list[nn.Module]:
        return [self.stage1, self.stage2, self.stage3]


def _make(widths: tuple[int, int, int]):
    def factory(num_classes: int, in_channels: int, image_size: int, **kw) -> CompactCNN:
        return CompactCNN(num_classes, in_channels, widths, **kw)

    return factory


for _name, _widths in SIZES.items():
    MODELS.register(_name)(_make(_widths))
