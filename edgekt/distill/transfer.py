"""Unlabelled transfer images for distillation: a dataset's training images with labels dropped,
or a flat folder of images, at the student's channel count and image size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgekt.config import DataConfig
from edgekt.data import DatasetInfo, TensorSplit, build_splits
from edgekt.errors import EdgektError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def transfer_split(spec: str, data: DataConfig, info: DatasetInfo) -> TensorSplit:
    """The transfer images named by ``spec`` (``method_args.transfer``; ``train`` is the
    student's own dataset, all of its training images), labels set to 0.

    A dataset's *training* split is used (the same deterministic validation hold-out as the
    student's data), so no validation or test image reaches the student through the teacher.
    """
    where = f"method_args.transfer {spec!r}"
    if spec == "train":
        spec = data.name
    if spec.startswith("imagefolder:") and _is_flat(Path(spec.split(":", 1)[1])):
        images = flat_images(Path(spec.split(":", 1)[1]), info)
    else:
        cfg = data.model_copy(update={"name": spec, "label_fraction": 1.0,
                                      "classes": None, "image_size": info.image_size})
        images = build_splits(cfg).train.images
        if images.shape[1] != info.in_channels:
            raise EdgektError(f"{where}: its images have {images.shape[1]} channel(s), the "
                              f"student takes {info.in_channels}; use a transfer set with the "
                              f"same colour mode")
    if len(images) == 0:
        raise EdgektError(f"{where}: holds no images")
    return TensorSplit(images, torch.zeros(len(images), dtype=torch.long))


def _is_flat(root: Path) -> bool:
    if not root.is_dir():
        raise EdgektError(f"method_args.transfer: {root} is not a directory")
    return not any(p.is_dir() for p in root.iterdir())


def flat_images(root: Path, info: DatasetInfo) -> torch.Tensor:
    """Every image directly inside ``root``, decoded to the student's mode and size (uint8)."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EdgektError(f"method_args.transfer: {root} holds no images "
                          f"({', '.join(IMAGE_SUFFIXES)})")
    mode, size = ("L" if info.in_channels == 1 else "RGB"), info.image_size
    out = np.empty((len(files), size, size, info.in_channels), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR))
        except (UnidentifiedImageError, OSError) as exc:
            raise EdgektError(f"method_args.transfer: cannot read image {f}: {exc}") from None
        out[i] = arr.reshape(size, size, info.in_channels)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
