"""Model zoo: torchvision classifiers and compact students, all split into embedding + head."""

from __future__ import annotations

from typing import Any

from edgekt.models import compact, tv  # noqa: F401  (registration)
from edgekt.models.base import EdgeNet, Embedding
from edgekt.models.registry import MODELS
from edgekt.models.timm_zoo import PREFIX, create_timm
from edgekt.models.weights import load_weights

PRUNED_PREFIX = "pruned:"

__all__ = ["MODELS", "EdgeNet", "Embedding", "create_model", "load_weights", "count_params"]


def create_model(
    name: str, *, num_classes: int, in_channels: int, image_size: int, **kwargs: Any
) -> EdgeNet:
    """Build a registered model (or ``timm:<name>``, ``pruned:<checkpoint>``) for the data shape."""
    if name.startswith(PREFIX):
        return create_timm(name, num_classes=num_classes, in_channels=in_channels,
                           image_size=image_size, **kwargs)
    if name.startswith(PRUNED_PREFIX):
        from edgekt.pruning.recipe import load_pruned

        return load_pruned(name[len(PRUNED_PREFIX):], num_classes=num_classes,
                           in_channels=in_channels, image_size=image_size, **kwargs)
    factory = MODELS.get(name)
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                       **kwargs)
    except TypeError as exc:
        from edgekt.errors import EdgektError

        raise EdgektError(f"model {name!r}: bad model.kwargs {kwargs}: {exc}") from None


def count_params(model: Any, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
