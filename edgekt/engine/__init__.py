"""The training engine: one loop (``fit``), checkpoints, optimisers, tasks."""

from edgekt.engine.fit import FitResult, Trainer, evaluate, fit
from edgekt.engine.tasks import METHODS, StepOutput, Task

__all__ = ["METHODS", "FitResult", "StepOutput", "Task", "Trainer", "evaluate", "fit"]
