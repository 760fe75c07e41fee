"""MACs and parameters of the pipeline's models, counted the way ``edgekt prune`` targets them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgekt.pipeline.config import PipelineConfig


def checkpoint_size(path: str) -> tuple[int, int]:
    """(MACs, params) per image of a checkpoint's model (torch-pruning's count)."""
    import torch

    from edgekt.checkpoint import load_checkpoint
    from edgekt.engine.setup import model_from_checkpoint
    from edgekt.pruning.prune import count

    model, info = model_from_checkpoint(load_checkpoint(path), path)
    return count(model, torch.zeros(1, info.in_channels, info.image_size, info.image_size))


def teacher_size(cfg: PipelineConfig) -> tuple[int, int]:
    """(MACs, params) of the pipeline's teacher: its checkpoint, or the model its training
    config would build for the pipeline's data (no training needed)."""
    import torch

    from edgekt.data import build_splits
    from edgekt.models import create_model
    from edgekt.pipeline.config import resolve_config_path
    from edgekt.pipeline.run import run_config
    from edgekt.pruning.prune import count

    if cfg.teacher.checkpoint:
        return checkpoint_size(cfg.teacher.checkpoint)
    run_cfg = run_config(resolve_config_path(cfg.teacher.config), {"data": cfg.data},
                         cfg.teacher.set, Path(cfg.run_dir) / "teacher")
    info = build_splits(run_cfg.data).info
    model = create_model(run_cfg.model.name, num_classes=info.num_classes,
                         in_channels=info.in_channels, image_size=info.image_size,
                         **run_cfg.model.kwargs)
    return count(model, torch.zeros(1, info.in_channels, info.image_size, info.image_size))
