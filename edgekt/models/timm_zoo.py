"""timm models as EdgeNets: ``model.name: timm:<name>`` (e.g. ``timm:repvit_m0_9``).

Built with ``pretrained=False`` so nothing is downloaded; weights come from a local file through
``model.weights`` like every other model. Re-parameterisable families (RepViT, FastViT, MobileOne,
RepVGG, ...) are trained in their multi-branch form and fused by :func:`fuse_for_export`.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from edgekt.errors import EdgektError
from edgekt.models.base import EdgeNet

PREFIX = "timm:"


class TimmNet(EdgeNet):
    """A timm classifier with its classifier removed (``backbone``) and a linear ``head``."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        self.head = nn.Linear(embedding_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # With num_classes=0 timm's forward is features -> pool -> pre-logits: the embedding.
        return torch.flatten(self.backbone(x), 1)

    def stages(self) -> list[nn.Module]:
        for attr in ("stages", "blocks", "layers"):
            mods = getattr(self.backbone, attr, None)
            if isinstance(mods, nn.Sequential | nn.ModuleList) and len(mods):
                return list(mods)
        # ResNet-like models: layer1..layer4.
        layers = [getattr(self.backbone, f"layer{i}") for i in range(1, 5)
                  if hasattr(self.backbone, f"layer{i}")]
        if layers:
            return layers
        return [m for name, m in self.backbone.named_children()]


def timm_model_names() -> list[str]:
    import timm

    return timm.list_models()


def create_timm(name: str, *, num_classes: int, in_channels: int, image_size: int,
                **kwargs: Any) -> TimmNet:
    """Build ``timm:<name>`` for ``in_channels`` x ``image_size`` inputs and ``num_classes``."""
    try:
        import timm
    except ImportError:
        raise EdgektError("timm models need the timm package: pip install 'edgekt[train]'") \
            from None
    arch = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise EdgektError(f"unknown timm model {arch!r}{hint} (all names: python -c "
                          f"'import timm; print(timm.list_models())')")
    if kwargs.pop("pretrained", False):
        raise EdgektError(f"timm:{arch}: pretrained=True would download weights; put a local "
                          f".safetensors/.pth file in model.weights instead")
    common = {"pretrained": False, "num_classes": 0, "in_chans": in_channels, **kwargs}
    try:
        # Models with a fixed token grid / attention resolution (ViTs, EfficientViT-M) need the
        # image size; pure CNNs do not accept it, so retry without.
        backbone = timm.create_model(arch, img_size=image_size, **common)
    except TypeError:
        try:
            backbone = timm.create_model(arch, **common)
        except TypeError as exc:
            raise EdgektError(f"timm:{arch}: bad model.kwargs {kwargs}: {exc}") from None
    dim = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
    return TimmNet(backbone, dim, num_classes)


def is_reparameterisable(model: nn.Module) -> bool:
    """True when some submodule has a fuse/reparameterize method (MobileOne, RepViT, ...)."""
    return any(hasattr(m, "reparameterize") or hasattr(m, "fuse")
               for m in model.modules() if m is not model)


def fuse_for_export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with multi-branch re-parameterisable blocks fused to single convs.

    Returns ``model`` itself when nothing fuses. The caller keeps the unfused model as the
    parity reference, so the exported fused graph is checked against the trained network.
    """
    if not is_reparameterisable(model):
        return model
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model.eval(), inplace=False).eval()
