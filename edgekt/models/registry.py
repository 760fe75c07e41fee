"""The model registry: name -> factory(num_classes, in_channels, image_size, **kwargs)."""

from edgekt.registry import Registry

MODELS: Registry = Registry("model")
