"""The rebuild recipe of a pruned model: per-module sizes and tensor shapes as plain values.

A pruned checkpoint's model record keeps the base architecture (``name``, ``kwargs``) and adds
``prune``: for every module whose size changed, its changed integer attributes (``out_channels``,
``num_features``, ``in_features``, the net's ``embedding_dim``, ...) and the new shape of each of
its own parameters and buffers. Readers build the base model, apply the recipe, then load the
weights; the checkpoint stays loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgekt.errors import EdgektError

FORMAT = "edgekt.prune/1"
READABLE = {FORMAT}
ATTR = "edgekt_prune"
"""Attribute on a rebuilt model that carries its prune record (so a distilled copy keeps it)."""


def _size_attrs(mod: nn.Module) -> dict[str, Any]:
    out = {}
    for key, value in vars(mod).items():
        if key.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int) or (isinstance(value, tuple | list) and value
                                      and all(isinstance(v, int) for v in value)):
            out[key] = list(value) if isinstance(value, tuple | list) else value
    return out


def _own_tensors(mod: nn.Module) -> dict[str, torch.Tensor]:
    return {**{k: v for k, v in mod.named_parameters(recurse=False) if v is not None},
            **{k: v for k, v in mod.named_buffers(recurse=False) if v is not None}}


def capture(pruned: nn.Module, original: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module of ``pruned`` whose sizes differ from ``original``: changed attrs + shapes."""
    before = dict(original.named_modules())
    modules: dict[str, dict[str, Any]] = {}
    for path, mod in pruned.named_modules():
        ref = before.get(path)
        if ref is None:
            raise EdgektError(f"pruning added a module {path!r}; it cannot be rebuilt")
        new_attrs, old_attrs = _size_attrs(mod), _size_attrs(ref)
        attrs = {k: v for k, v in new_attrs.items() if old_attrs.get(k) != v}
        shapes = {k: list(t.shape) for k, t in _own_tensors(mod).items()
                  if k not in _own_tensors(ref) or _own_tensors(ref)[k].shape != t.shape}
        if attrs or shapes:
            modules[path] = {"attrs": attrs, "shapes": shapes}
    return modules


def apply(model: nn.Module, prune: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """Resize ``model`` (a freshly built base) in place to the recipe; weights come after."""
    fmt = prune.get("format")
    if fmt not in READABLE:
        raise EdgektError(
            f"{source}: the pruned model is stored in format {fmt!r}; this edgekt reads "
            f"{', '.join(sorted(READABLE))}. Upgrade edgekt to load it.")
    for path, spec in prune["modules"].items():
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            raise EdgektError(f"{source}: pruning recipe names module {path!r}, which the base "
                              f"model {prune['base']['name']!r} does not have") from None
        for key, value in spec["attrs"].items():
            old = getattr(mod, key, None)
            setattr(mod, key, tuple(value) if isinstance(old, tuple) else value)
        for key, shape in spec["shapes"].items():
            old = getattr(mod, key)
            new = _cut(old.detach(), shape)
            if isinstance(old, nn.Parameter):
                setattr(mod, key, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                mod.register_buffer(key, new)
    setattr(model, ATTR, prune)
    return model


def _cut(old: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """``old`` cut to ``shape`` (pruning only shrinks): the values are those of the freshly
    initialised base, so a model that is not loaded afterwards is still properly initialised."""
    if old.dim() == len(shape) and all(n <= m for n, m in zip(shape, old.shape, strict=True)):
        return old[tuple(slice(0, n) for n in shape)].clone()
    return torch.empty(shape, dtype=old.dtype)


def load_pruned(path: str, *, num_classes: int, in_channels: int, image_size: int,
                reinit: bool = False, **kwargs: Any) -> nn.Module:
    """``model.name: pruned:PATH``: the pruned architecture and weights from an edgekt checkpoint.

    The pruned model inherits its weights from the checkpoint (that is the point of pruning), so
    ``model.weights`` is not needed; the data shape must match the one it was pruned for.
    ``model.kwargs: {reinit: true}`` gives the same pruned architecture freshly initialised (the
    base model's own initialisation, each pruned tensor cut to its new shape): the scratch
    baseline of a pruned student.
    """
    from edgekt.checkpoint import load_checkpoint
    from edgekt.engine.setup import model_from_checkpoint

    if kwargs:
        raise EdgektError(f"model pruned:{path}: model.kwargs {kwargs} cannot change a pruned "
                          f"model (its base kwargs are stored in the checkpoint; the only "
                          f"kwarg is reinit: true)")
    ckpt = load_checkpoint(path)
    model, info = model_from_checkpoint(ckpt, path, weights=not reinit)
    if getattr(model, ATTR, None) is None:
        raise EdgektError(f"model pruned:{path}: the checkpoint holds an unpruned model; use "
                          f"its name with model.weights, or run edgekt prune on it first")
    got = (info.in_channels, info.image_size, int(model.head.out_features))
    if got != (in_channels, image_size, num_classes):
        raise EdgektError(
            f"model pruned:{path}: pruned for {got[0]}-channel {got[1]} px inputs and {got[2]} "
            f"classes, but the data has {in_channels}-channel {image_size} px and {num_classes}")
    return model.train()
