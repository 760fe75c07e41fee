"""The dataset registry: name -> source(data_dir) returning raw uint8 splits."""

from edgekt.registry import Registry

DATASETS: Registry = Registry("dataset")
