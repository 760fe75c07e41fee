"""Structured channel pruning (torch-pruning) that stores a rebuild recipe, never a pickled module.

``prune_checkpoint`` prunes an edgekt checkpoint; :mod:`edgekt.pruning.recipe` rebuilds the
pruned shape from plain values so that eval, info, export and distill load it like any model.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prune_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "prune_checkpoint":
        from edgekt.pruning.prune import prune_checkpoint

        return prune_checkpoint
    raise AttributeError(name)
