"""Siamese networks for one-shot learning (Koch, Zemel & Salakhutdinov, ICML-W 2015).

A shared embedding ``f``; the similarity of two images is ``sigmoid(w . |f(a) - f(b)| + b)``,
trained with binary cross-entropy on same/different pairs drawn by ``sample_pairs`` from the
base classes. A few-shot query takes the class whose support images it matches best (mean
similarity logit over the shots).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekt.config import Config, validate
from edgekt.data import Splits
from edgekt.engine.tasks import METHODS, StepOutput
from edgekt.errors import EdgektError
from edgekt.fewshot.episodes import normalise
from edgekt.methods.episodic import EpisodeArgs, EpisodicTask, unwrap


class SiameseArgs(EpisodeArgs):
    """``method_args`` of ``method: siamese`` (episode fields are used for evaluation)."""

    pairs: int = Field(64, ge=2)
    """Pairs per training step, half same-class and half different-class."""


def sample_pairs(targets: torch.Tensor, n_pairs: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_pairs`` index pairs (a, b) into ``targets`` and their labels (1 same class, 0 not):
    the first half same-class (a != b), the rest different-class."""
    classes, counts = torch.unique(targets, return_counts=True)
    if len(classes) < 2 or int(counts.max()) < 2:
        raise EdgektError("siamese pairs need at least 2 classes and a class with 2+ samples "
                          f"(got classes {classes.tolist()} with counts {counts.tolist()})")
    pools = [torch.nonzero(targets == c).flatten() for c in classes.tolist()]
    eligible = [i for i, p in enumerate(pools) if len(p) >= 2]
    n_pos = n_pairs // 2
    a, b = [], []
    pos_cls = torch.tensor(eligible)[torch.randint(len(eligible), (n_pos,), generator=generator)]
    for c in pos_cls.tolist():
        pick = torch.randperm(len(pools[c]), generator=generator)[:2]
        a.append(pools[c][pick[0]])
        b.append(pools[c][pick[1]])
    for _ in range(n_pairs - n_pos):
        ca, cb = torch.randperm(len(pools), generator=generator)[:2].tolist()
        a.append(pools[ca][torch.randint(len(pools[ca]), (1,), generator=generator)[0]])
        b.append(pools[cb][torch.randint(len(pools[cb]), (1,), generator=generator)[0]])
    same = torch.cat([torch.ones(n_pos), torch.zeros(n_pairs - n_pos)])
    return torch.stack(a), torch.stack(b), same


class PairScorer(nn.Module):
    """``|f(a) - f(b)|`` -> one similarity logit (a weighted L1 distance)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 1)

    def forward(self, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        return self.fc((za - zb).abs()).squeeze(-1)


@METHODS.register("siamese")
class SiameseTask(EpisodicTask):
    """Pair-wise BCE training; episodes only for evaluation."""

    args_model = SiameseArgs

    def __init__(self, cfg: Config, model: nn.Module, splits: Splits, device: torch.device):
        args = validate(SiameseArgs, cfg.method_args, "method_args (siamese)")
        super().__init__(cfg, model, splits, device, args)
        self.scorer = PairScorer(model.embedding_dim)

    def training_step(self, model: nn.Module, batch: tuple, step: int) -> StepOutput:
        # Pair set i depends only on (seed, i): a resumed run draws the same pairs; under DDP
        # the ranks interleave the index sequence, so each draws its own.
        index = int(self.episodes_drawn) * self.world + self.rank
        self.episodes_drawn += 1
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + index)
        a, b, same = sample_pairs(self.split.targets, self.args.pairs, g)
        x = normalise(self.split.images[torch.cat([a, b])], self.info).to(self.device)
        z = unwrap(model).forward_features(x).float()
        logit = self.scorer(z[: len(a)], z[len(a):])
        same = same.to(logit.device)
        loss = F.binary_cross_entropy_with_logits(logit, same)
        # Report pair verification as 2-class logits so the loop's running accuracy is meaningful.
        logits2 = torch.stack([-logit, logit], 1).detach()
        return StepOutput(loss, logits2, same.long(), {"bce": loss.detach()})

    def scores(self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor,
               n_way: int) -> torch.Tensor:
        """(Q, n_way): mean similarity logit of each query to each class's shots."""
        q, s = query.float(), support.float()
        sim = self.scorer(q[:, None, :], s[None, :, :])  # (Q, S)
        out = torch.zeros(len(q), n_way, device=q.device).index_add_(1, labels, sim)
        return out / torch.bincount(labels, minlength=n_way).clamp_min(1)
