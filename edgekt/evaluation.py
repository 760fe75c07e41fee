"""Evaluate and describe saved checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgekt.checkpoint import load_checkpoint
from edgekt.config import Config, DataConfig, validate
from edgekt.data import build_splits, make_loader
from edgekt.engine.fit import evaluate
from edgekt.engine.runtime import Runtime, select_device
from edgekt.engine.setup import model_from_checkpoint
from edgekt.errors import EdgektError
from edgekt.models import count_params


def checkpoint_data_config(ckpt: dict[str, Any], source: str, data_dir: str | None) -> DataConfig:
    cfg: Config = validate(Config, ckpt.get("config", {}), f"{source} (stored config)")
    data = cfg.data.model_copy()
    if data_dir is not None:
        data.data_dir = data_dir
    data.limit = None
    return data


def evaluate_checkpoint_file(path: str | Path, *, split: str = "test", data_dir: str | None = None,
                             device: str = "auto") -> dict[str, Any]:
    """Accuracy and loss of a checkpoint's model on its dataset split."""
    if split not in ("test", "val"):
        raise EdgektError(f"--split must be test or val, not {split!r}")
    ckpt = load_checkpoint(path)
    model, info = model_from_checkpoint(ckpt, str(path))
    data_cfg = checkpoint_data_config(ckpt, str(path), data_dir)
    splits = build_splits(data_cfg)
    rt = Runtime(select_device(device), None)
    loader = make_loader(getattr(splits, split), info, data_cfg, train=False)
    res = evaluate(model.to(rt.device), loader, rt)
    return {**res, "n": len(getattr(splits, split)), "split": split}


def count_flops(model: torch.nn.Module, in_channels: int, image_size: int) -> int:
    """Forward FLOPs for one image (torch's FlopCounterMode counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, in_channels, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return int(counter.get_total_flops())


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    model, info = model_from_checkpoint(ckpt, str(path))
    return {
        "model": ckpt["model"]["name"],
        "method": ckpt.get("method", {}).get("method", "?"),
        "dataset": info.name,
        "params": count_params(model),
        "flops": count_flops(model, info.in_channels, info.image_size),
        "file_mb": round(Path(path).stat().st_size / 1e6, 3),
        "epoch": ckpt.get("epoch"),
        "step": ckpt.get("step"),
        "metrics": ckpt.get("metrics", {}),
        "labels": info.labels,
        "config": ckpt.get("config", {}),
        "pruning": ckpt["model"].get("prune", {}).get("record"),
    }
