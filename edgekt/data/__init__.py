"""Datasets by name, split into train/val/test with their normalisation statistics recorded."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from edgekt.config import DataConfig
from edgekt.data import sources
from edgekt.data.base import (
    BatchLoader,
    DatasetInfo,
    Splits,
    TensorSplit,
    random_crop_flip,
    random_erasing,
)
from edgekt.data.registry import DATASETS
from edgekt.errors import EdgektError

__all__ = ["DATASETS", "BatchLoader", "DatasetInfo", "Splits", "TensorSplit", "build_splits",
           "make_loader"]

# Published statistics where they exist; otherwise computed on the training split.
KNOWN_STATS = {"fashion-mnist": ([0.2860], [0.3530])}


def load_raw(cfg: DataConfig) -> tuple[str, sources.Raw]:
    if cfg.name.startswith("imagefolder:"):
        return "imagefolder", sources.image_folder(cfg.name.split(":", 1)[1], cfg.image_size or 64)
    return cfg.name, DATASETS.get(cfg.name)(cfg.data_dir)


def build_splits(cfg: DataConfig) -> Splits:
    """Load a dataset and split it deterministically (the validation split never depends on
    the training seed, so every run of a project validates on the same images)."""
    name, (xtr, ytr, xte, yte, labels) = load_raw(cfg)
    if cfg.classes is not None:
        bad = [c for c in cfg.classes if not 0 <= c < len(labels)]
        if bad:
            raise EdgektError(f"data.classes: {bad} out of range 0..{len(labels) - 1}")
        xtr, ytr = _keep_classes(xtr, ytr, cfg.classes)
        xte, yte = _keep_classes(xte, yte, cfg.classes)
        labels = [labels[c] for c in cfg.classes]
    if cfg.image_size and cfg.image_size != xtr.shape[-1]:
        xtr, xte = _resize(xtr, cfg.image_size), _resize(xte, cfg.image_size)
    g = torch.Generator().manual_seed(20240601)
    order = torch.randperm(len(ytr), generator=g)
    n_val = int(round(len(ytr) * cfg.val_fraction))
    full = TensorSplit(xtr, ytr)
    val, train = full.subset(order[:n_val]), full.subset(order[n_val:])
    if cfg.limit is not None:
        train = train.subset(torch.arange(min(cfg.limit, len(train))))
    if cfg.label_fraction < 1.0:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(20240602))
        train = train.subset(keep[: max(1, round(len(train) * cfg.label_fraction))].sort().values)
    test = TensorSplit(xte, yte)
    mean, std = KNOWN_STATS.get(name, (None, None)) if cfg.classes is None else (None, None)
    if mean is None:
        f = train.images.float() / 255.0
        mean = f.mean(dim=(0, 2, 3)).tolist()
        std = f.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    info = DatasetInfo(name=cfg.name, num_classes=len(labels), in_channels=xtr.shape[1],
                       image_size=xtr.shape[-1], mean=mean, std=std, labels=list(labels))
    return Splits(train, val, test, info)


def make_loader(split: TensorSplit, info: DatasetInfo, cfg: DataConfig, *, train: bool,
                seed: int = 0, rank: int = 0, world: int = 1, with_index: bool = False
                ) -> BatchLoader:
    return BatchLoader(
        split, info, cfg.batch_size if train else cfg.eval_batch_size, shuffle=train, seed=seed,
        augment=augmenter(cfg) if train else None, rank=rank, world=world, with_index=with_index,
    )


def augmenter(cfg: DataConfig) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """The training-batch augmentation ``cfg`` asks for (None: the input is deterministic)."""
    if not cfg.augment:
        return None
    if not cfg.erasing:
        return random_crop_flip
    p = cfg.erasing
    return lambda x, g: random_erasing(random_crop_flip(x, g), g, p=p)


def _keep_classes(x: torch.Tensor, y: torch.Tensor, classes: list[int]):
    remap = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    keep = remap[y] >= 0
    return x[keep], remap[y[keep]]


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)
