"""Trainable modules between feature taps and KD losses: FitNets adapters and the CRD memory.

They are sub-modules of the distillation task, so their weights and buffers (the memory bank,
the NCE constants) are trained, checkpointed and restored with the run.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from edgekt.errors import EdgektError


class Adapter(nn.Module):
    """Maps a student tap onto the teacher tap's shape: a 1x1 conv (feature maps) or a linear
    layer (vectors), then pooling/upsampling when the spatial sizes differ."""

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...], where: str) -> None:
        super().__init__()
        if len(s_shape) != len(t_shape) or len(s_shape) not in (2, 4):
            raise EdgektError(
                f"{where}: no adapter bridges student shape {tuple(s_shape)} and teacher shape "
                f"{tuple(t_shape)} (need two feature maps (B,C,H,W) or two vectors (B,D)); tap "
                f"layers of the same kind"
            )
        self.size = tuple(t_shape[2:]) if len(t_shape) == 4 else None
        self.proj: nn.Module
        if len(s_shape) == 4:
            self.proj = nn.Sequential(nn.Conv2d(s_shape[1], t_shape[1], 1, bias=False),
                                      nn.BatchNorm2d(t_shape[1]))
        else:
            self.proj = nn.Linear(s_shape[1], t_shape[1])
        self.resize = self.size is not None and tuple(s_shape[2:]) != self.size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.resize:
            h, w = x.shape[-2:]
            if h >= self.size[0] and w >= self.size[1]:
                x = F.adaptive_avg_pool2d(x, self.size)
            else:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x


class CRDMemory(nn.Module):
    """CRD's projection heads and momentum memory bank (Tian et al. 2020, official design).

    Both embeddings are linearly projected to ``feat_dim`` and L2-normalised; each sample has a
    row in a student bank and a teacher bank (indexed by its dataset position). Each view is
    contrasted with its positive and ``nce_k`` uniformly drawn negatives of the *other* view's
    bank; the banks are then updated with momentum.
    """

    def __init__(self, s_dim: int, t_dim: int, positions: torch.Tensor, *, feat_dim: int = 128,
                 nce_k: int = 4096, momentum: float = 0.5) -> None:
        super().__init__()
        n = len(positions)
        self.nce_k = min(nce_k, n - 1)
        self.momentum = momentum
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        std = 1.0 / math.sqrt(feat_dim / 3)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("memory_s", (torch.rand(n, feat_dim, generator=g) * 2 - 1) * std)
        self.register_buffer("memory_t", (torch.rand(n, feat_dim, generator=g) * 2 - 1) * std)
        # log Z per view, NaN until the first batch fixes it (as the paper's code does).
        self.register_buffer("log_z", torch.full((2,), math.nan))
        rows = torch.full((int(positions.max()) + 1,), -1, dtype=torch.long)
        rows[positions] = torch.arange(n)
        self.register_buffer("row_of", rows, persistent=False)

    @property
    def n_data(self) -> int:
        return self.memory_s.shape[0]

    def forward(self, s: torch.Tensor, t: torch.Tensor, pos: torch.Tensor, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (student scores, teacher scores, log Z), scores of shape (B, 1 + K)."""
        with torch.autocast(s.device.type, enabled=False):  # similarities / T: keep fp32
            return self._scores(s.float(), t.float(), self.row_of[pos], temperature)

    def _scores(self, s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = F.normalize(self.embed_s(s), dim=1)
        t = F.normalize(self.embed_t(t), dim=1)
        # Column 0 is the positive (the sample's own row), the rest uniform negatives.
        neg = torch.randint(0, self.n_data, (len(idx), self.nce_k), device=idx.device)
        rows = torch.cat([idx.unsqueeze(1), neg], 1)
        s_scores = torch.bmm(self.memory_t[rows].detach(), s.unsqueeze(2)).squeeze(2)
        t_scores = torch.bmm(self.memory_s[rows].detach(), t.unsqueeze(2)).squeeze(2)
        with torch.no_grad():
            if torch.isnan(self.log_z).any():  # Z = mean(exp(score / T)) * n_data, in log space
                for i, sc in enumerate((s_scores, t_scores)):
                    z = torch.logsumexp(sc.flatten() / temperature, 0)
                    self.log_z[i] = z - math.log(sc.numel()) + math.log(self.n_data)
                if _distributed():  # one Z for all ranks: rank 0's
                    dist.broadcast(self.log_z, 0)
            if _distributed():  # every rank's bank sees every rank's samples
                idx, s, t = (_all_gather(v) for v in (idx, s.detach(), t.detach()))
            self._update(self.memory_s, idx, s)
            self._update(self.memory_t, idx, t)
        return s_scores, t_scores, self.log_z.clone()

    def _update(self, bank: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> None:
        new = bank[idx] * self.momentum + v.detach().to(bank.dtype) * (1 - self.momentum)
        bank[idx] = F.normalize(new, dim=1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather(v: torch.Tensor) -> torch.Tensor:
    """Concatenate ``v`` from every rank (the loader gives all ranks equal batch sizes)."""
    out = [torch.empty_like(v) for _ in range(dist.get_world_size())]
    dist.all_gather(out, v.contiguous())
    return torch.cat(out)
