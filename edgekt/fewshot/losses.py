"""Prototypical-network maths as pure tensor functions (no engine import, so any method module
can use them without an import cycle)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Metric = Literal["euclidean", "cosine"]


def pairwise_logits(query: torch.Tensor, prototypes: torch.Tensor, metric: Metric,
                    scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """(Q, D) x (N, D) -> (Q, N) logits: ``-scale * ||q - p||^2`` or ``scale * cos(q, p)``."""
    if metric == "cosine":
        return scale * F.normalize(query, dim=1) @ F.normalize(prototypes, dim=1).T
    return -scale * torch.cdist(query, prototypes).pow(2)


def prototypes_of(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means of the support embeddings: (N*K, D) -> (N, D)."""
    sums = torch.zeros(n_way, support.shape[1], dtype=support.dtype, device=support.device)
    sums.index_add_(0, labels, support)
    counts = torch.bincount(labels, minlength=n_way).clamp_min(1).to(support.dtype)
    return sums / counts[:, None]


def prototypical_loss(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                      query_labels: torch.Tensor, n_way: int, *, metric: Metric = "euclidean",
                      scale: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the queries against the support prototypes; returns (loss, logits).

    Computed in fp32 so the squared distances cannot overflow under fp16 autocast.
    """
    protos = prototypes_of(support.float(), support_labels, n_way)
    logits = pairwise_logits(query.float(), protos, metric, scale)
    return F.cross_entropy(logits, query_labels), logits


def rotate_batch(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each image by a random multiple of 90 degrees; returns (images, k in 0..3), the
    targets of the rotation-prediction task (Gidaris et al., ICLR 2018; as an auxiliary
    few-shot loss: Gidaris et al., ICCV 2019). Square images only."""
    k = torch.randint(0, 4, (len(x),), generator=g)
    out = x.clone()
    for r in (1, 2, 3):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    return out, k
