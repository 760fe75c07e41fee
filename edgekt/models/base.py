"""The interface every edgekt model follows: an embedding trunk and a linear head, kept apart.

Distillation taps intermediate features, few-shot uses the embedding, and the on-device loop
retrains only the head, so each model exposes ``forward_features`` and ``head`` separately.
"""

from __future__ import annotations

import torch
from torch import nn


class EdgeNet(nn.Module):
    """Base class: ``forward(x) == head(forward_features(x))``."""

    embedding_dim: int
    head: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the (batch, embedding_dim) embedding."""
        raise NotImplementedError

    def stages(self) -> list[nn.Module]:
        """Backbone stages from input to output (used to freeze the first N, and for LR decay)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def replace_head(self, num_classes: int) -> None:
        """Swap in a fresh classifier for ``num_classes`` outputs."""
        self.head = nn.Linear(self.embedding_dim, num_classes)


class Embedding(nn.Module):
    """The trunk of an EdgeNet as a module of its own (for embedding export)."""

    def __init__(self, net: EdgeNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)
