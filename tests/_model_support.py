"""Checks shared by the model-zoo tests."""

from __future__ import annotations

import torch


def assert_embedding_head_split(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward`` is ``head(forward_features(x))`` with embeddings of ``embedding_dim``;
    returns the input and its embeddings."""
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        emb = m.forward_features(x)
        assert emb.shape == (2, m.embedding_dim)
        assert torch.allclose(m(x), m.head(emb), atol=1e-5)
    return x, emb
