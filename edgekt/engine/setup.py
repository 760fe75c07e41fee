"""Build models from a config or a checkpoint, and apply transfer-learning freezing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgekt.config import FinetuneConfig, ModelConfig
from edgekt.data import DatasetInfo
from edgekt.errors import EdgektError
from edgekt.models import EdgeNet, create_model, load_weights
from edgekt.pruning.recipe import ATTR as PRUNE_ATTR
from edgekt.pruning.recipe import apply as apply_prune_recipe


def build_model(cfg: ModelConfig, info: DatasetInfo, finetune: FinetuneConfig | None = None
                ) -> EdgeNet:
    """Create the configured model for ``info``'s data, load local weights, freeze stages."""
    model = create_model(cfg.name, num_classes=info.num_classes, in_channels=info.in_channels,
                         image_size=info.image_size, **cfg.kwargs)
    ft = finetune or FinetuneConfig()
    if cfg.weights:
        load_weights(model, cfg.weights, keep_head=not ft.new_head)
    if ft.new_head:
        model.replace_head(info.num_classes)
    freeze(model, ft.freeze)
    return model


def frozen_modules(model: EdgeNet, spec: str | int) -> list[nn.Module]:
    if spec == "none":
        return []
    stages = model.stages()
    if spec == "backbone":
        return [m for name, m in model.named_children() if name != "head"]
    assert isinstance(spec, int)
    if not 0 <= spec <= len(stages):
        raise EdgektError(
            f"finetune.freeze: {spec} is out of range (the model has {len(stages)} stages)")
    return stages[:spec]


def freeze(model: EdgeNet, spec: str | int) -> None:
    for m in frozen_modules(model, spec):
        m.requires_grad_(False)


def set_train_mode(model: EdgeNet, spec: str | int) -> None:
    """model.train(), but frozen parts stay in eval so their BatchNorm statistics do not move."""
    model.train()
    for m in frozen_modules(model, spec):
        m.eval()


def model_record(cfg: ModelConfig, info: DatasetInfo, model: EdgeNet) -> dict[str, Any]:
    """Everything needed to rebuild the model without its config file."""
    prune = getattr(model, PRUNE_ATTR, None)  # a pruned model: its base and rebuild recipe
    return {
        "name": prune["base"]["name"] if prune else cfg.name,
        "kwargs": dict(prune["base"]["kwargs"] if prune else cfg.kwargs),
        **({"prune": prune} if prune else {}),
        "num_classes": int(model.head.out_features),
        "embedding_dim": int(model.embedding_dim),
        "in_channels": info.in_channels,
        "image_size": info.image_size,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def info_record(info: DatasetInfo) -> dict[str, Any]:
    return dict(vars(info))


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint", *,
                          weights: bool = True) -> tuple[EdgeNet, DatasetInfo]:
    """Rebuild the model (eval mode, on CPU) and the data description stored in a checkpoint.

    ``weights=False`` keeps the fresh initialisation (the architecture alone).
    """
    try:
        rec, data = ckpt["model"], ckpt["data"]
        info = DatasetInfo(**data)
        model = create_model(rec["name"], num_classes=rec["num_classes"],
                             in_channels=rec["in_channels"], image_size=rec["image_size"],
                             **rec["kwargs"])
        if "prune" in rec:
            apply_prune_recipe(model, rec["prune"], source)
        if weights:
            model.load_state_dict(rec["state_dict"])
    except (KeyError, TypeError) as exc:
        raise EdgektError(f"{source}: not an edgekt model checkpoint (missing {exc})") from None
    except RuntimeError as exc:
        raise EdgektError(f"{source}: weights do not fit the recorded model: {exc}") from None
    return model.eval(), info


def to_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
