"""Distillation: KD losses as pure tensor functions and the ``distill`` training method."""

from edgekt.distill.losses import KD_LOSSES, KDLoss
from edgekt.distill.task import DistillOptions, DistillTask

__all__ = ["KD_LOSSES", "DistillOptions", "DistillTask", "KDLoss"]
