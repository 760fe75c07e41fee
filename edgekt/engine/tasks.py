"""Training methods as task objects: each owns forward + loss; the loop in ``fit`` stays one.

A task receives the whole batch tuple from the loader and returns a ``StepOutput``. Methods
register here by name (``method:`` in the config) and may carry state (adapters, memory banks)
that goes into the checkpoint through ``state_dict``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from edgekt.config import Config, validate
from edgekt.data import BatchLoader, Splits
from edgekt.data.base import PairedLoader, StepCounter
from edgekt.errors import EdgektError
from edgekt.registry import Registry

METHODS: Registry = Registry("method")

# Method families register themselves on import; the engine imports them explicitly here.
METHOD_PACKAGES = ("edgekt.distill", "edgekt.fewshot", "edgekt.methods")


def check_method_args(cfg: Config) -> None:
    """Validate ``cfg.method_args`` with the method's own typed model, before any data loads:
    a misspelt key names the config file, the key and the closest valid key."""
    args_model = get_method(cfg.method).args_model
    source = f"{cfg.source}: method_args (method: {cfg.method})"
    if args_model is None:
        if cfg.method_args:
            raise EdgektError(f"{source}: this method takes no method_args (got "
                              f"{', '.join(sorted(cfg.method_args))})")
        return
    validate(args_model, cfg.method_args, source)


def get_method(name: str) -> type[Task]:
    """The Task class registered as ``name`` (importing every method family first)."""
    for package in METHOD_PACKAGES:
        importlib.import_module(package)
    return METHODS.get(name)


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named loss components for logging (detached by the loop)."""


class Task(nn.Module):
    """Base task. Subclasses override ``training_step``; ``nn.Module`` so extra trainable parts
    (adapters) register as parameters and save with ``state_dict``."""

    args_model: ClassVar[type[BaseModel] | None] = None
    """The typed model of this method's ``method_args`` (None: it takes none)."""
    needs_index: bool = False
    """Ask the loader for each sample's dataset position (e.g. for a teacher-output cache)."""
    steps_per_epoch: int = 1
    """Optimiser steps per epoch; the loop sets it, with ``total_steps``, ``rank`` and
    ``world``, once its loader exists (warm-up ramps, schedules, per-rank episode streams)."""
    total_steps: int = 1
    rank: int = 0
    world: int = 1
    ddp_find_unused: ClassVar[bool] = True
    """Under DDP, let some parameters go without a gradient in a step (e.g. the classifier head
    of a method that trains on embeddings)."""

    def __init__(self, cfg: Config, model: nn.Module, splits: Splits, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.label_smoothing = cfg.train.label_smoothing

    def extra_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train_loader(self, loader: BatchLoader) -> BatchLoader | PairedLoader | StepCounter:
        """The loader the loop iterates: ``loader`` (the labelled training split) by default; a
        task may pair it with a stream of its own (unlabelled transfer images) or replace it
        with a step counter when it draws its own samples (episodes)."""
        return loader

    def training_step(self, model: nn.Module, batch: tuple, step: int) -> StepOutput:
        raise NotImplementedError

    def export_metadata(self) -> dict[str, Any]:
        """What the saved checkpoint should record about this method."""
        return {"method": self.cfg.method}

    def extra_metrics(self, model: nn.Module, split: str) -> dict[str, float]:
        """Method-specific metrics on ``split`` ("val" or "test"), e.g. per-task or target-domain
        accuracy; the loop logs them as ``{split}_{name}``. Returning ``acc``/``loss`` replaces
        the loop's own (``model(x)`` on the split), which also selects ``best.pt``."""
        return {}


class StepModule(nn.Module):
    """The model and the task as one module: what DDP wraps, so every trainable part (the model,
    adapters, relation modules, domain classifiers) is broadcast at start and all-reduced after
    each backward, whatever parts of the model the task calls."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: tuple, step: int) -> StepOutput:
        return self.task.training_step(self.model, batch, step)


@METHODS.register("supervised")
class SupervisedTask(Task):
    """Plain cross-entropy classification (teachers, students from scratch, fine-tuning)."""

    ddp_find_unused = False

    def training_step(self, model: nn.Module, batch: tuple, step: int) -> StepOutput:
        x, y = batch[0], batch[1]
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return StepOutput(loss, logits, y, {"ce": loss})
