"""Load local weights (edgekt checkpoints, torchvision ``.pth``, ``.safetensors``) into an EdgeNet.

Nothing is ever unpickled: ``.pt``/``.pth`` files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from edgekt.errors import EdgektError
from edgekt.models.base import EdgeNet

log = logging.getLogger(__name__)

_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file; an edgekt checkpoint yields its model weights."""
    from edgekt.checkpoint import load_checkpoint

    p = Path(path)
    if not p.is_file():
        raise EdgektError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            raise EdgektError(f"{p}: not a valid safetensors file ({exc})") from None
    obj = load_checkpoint(p)
    if "model" in obj and isinstance(obj["model"], dict) and "state_dict" in obj["model"]:
        return obj["model"]["state_dict"]
    if isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise EdgektError(f"{p}: holds no recognisable state dict (keys: {sorted(obj)[:8]})")


def load_weights(model: EdgeNet, path: str | Path, *, keep_head: bool = True) -> list[str]:
    """Load ``path`` into ``model``, adapting torchvision keys; return the names left untouched.

    torchvision keys (``conv1.weight``, ``fc.weight``) are mapped onto ``backbone.*``/``head.*``;
    an RGB first conv is summed over channels for 1-channel inputs; tensors whose shape still
    differs (a 7x7 stem vs our 3x3 small-image stem, a 1000-class head) are skipped and reported.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    if not any(k in own for k in state):
        state = _map_torchvision_keys(model, state)
    stem = _first_conv_key(model)
    loaded, skipped = {}, []
    for key, value in state.items():
        if key not in own:
            skipped.append(key)
            continue
        if not keep_head and key.startswith("head."):
            continue
        target = own[key]
        if value.shape != target.shape and value.dim() == 4 and target.dim() == 4:
            if value.shape[1] == 3 and target.shape[1] == 1 and value.shape[2:] == target.shape[2:]:
                value = value.sum(dim=1, keepdim=True)
        if value.shape != target.shape:
            # Only the adapted stem and the classifier may legitimately differ; any other
            # shape mismatch means the file is for another architecture or width.
            if key != stem and not key.startswith("head."):
                raise EdgektError(
                    f"{path}: tensor {key!r} has shape {tuple(value.shape)} but the model "
                    f"expects {tuple(target.shape)}: the file is for another architecture")
            skipped.append(key)
            continue
        loaded[key] = value
    if not loaded:
        first = next(iter(state), None)
        raise EdgektError(f"{path}: no tensor matches the model (is it for another "
                          f"architecture? first tensor in the file: {first!r}, the model's: "
                          f"{next(iter(own), None)!r})")
    model.load_state_dict(loaded, strict=False)
    missing = sorted(set(own) - set(loaded))
    if skipped or missing:
        log.warning("%s: skipped %d tensors, %d left at init: %s", path, len(skipped), len(missing),
                    ", ".join((skipped + missing)[:6]))
    return missing


def _first_conv_key(model: EdgeNet) -> str | None:
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            return f"{name}.weight"
    return None


def _map_torchvision_keys(model: EdgeNet, state: dict[str, torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    out = {}
    head_w = {k for k, v in state.items() if v.dim() == 2 and v.shape[1] == model.embedding_dim}
    for key, value in state.items():
        # torchvision's published DenseNet files use legacy names ("norm.1" for "norm1").
        key = _DENSENET_LEGACY.sub(r"\1\2", key)
        prefix, _, leaf = key.rpartition(".")
        if prefix and (f"{prefix}.weight" in head_w) and f"backbone.{key}" not in own:
            out[f"head.{leaf}"] = value
        else:
            out[f"backbone.{key}"] = value
    return out
