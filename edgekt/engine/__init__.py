"""The training engine: one loop (``fit``), checkpoints, optimisers, tasks."""

from edgekt.engine.fit import FitResult, Trainer, evaluate, fit
from edgekt.engine.tasks import METHODS, StepOutput, Task

__all__ = ["METHODS", "FitResult", "StepOutput", "Task", "Trainer", "evaluate", "fit"]

# Registers the methods of edgekt.methods in METHODS (imported last: they import the engine).
from edgekt import methods as _methods  # noqa: E402,F401
from edgekt import distill as _distill  # noqa: E402,F401  (registers "distill")
from edgekt import fewshot as _fewshot  # noqa: E402,F401  (registers "protonet")
