"""Batch mixing for function matching (Beyer et al. 2022): mixup (Zhang et al. 2018) and cutmix
(Yun et al. 2019), seeded by a generator so a resumed run mixes exactly as the original."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Mix:
    """How a batch was mixed: ``x' = lam * x + (1 - lam) * x[perm]`` (by area for cutmix)."""

    lam: float
    perm: torch.Tensor


def mix_batch(x: torch.Tensor, mode: str, alpha: float, g: torch.Generator
              ) -> tuple[torch.Tensor, Mix]:
    """Mix ``x`` (B, C, H, W) with a shuffled copy of itself. ``mode``: mixup, cutmix or both
    (one of the two, chosen at random per batch)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=g).to(x.device)
    if mode == "both":
        mode = "mixup" if torch.rand(1, generator=g).item() < 0.5 else "cutmix"
    if mode == "mixup":
        return lam * x + (1 - lam) * x[perm], Mix(lam, perm)
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(round(h * cut)), int(round(w * cut))
    cy, cx = (int(v) for v in torch.randint(0, 1 << 30, (2,), generator=g))
    cy, cx = cy % h, cx % w
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, Mix(1.0 - (y1 - y0) * (x1 - x0) / (h * w), perm)
