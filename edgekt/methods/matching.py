"""Matching networks (Vinyals et al., NeurIPS 2016).

A query's class distribution is an attention-weighted sum of the support labels, the attention
being a softmax over similarities of embeddings: cosine (the paper's, scaled by a fixed or
learned temperature) or negative squared Euclidean distance (``metric: euclidean``; with one
shot this is ProtoNet's classifier, Snell et al. 2017, sec. 2.4; with more it is a soft nearest
neighbour over the individual shots). With ``fce: true`` the embeddings are "fully conditioned"
on the support set: a bidirectional LSTM over the support embeddings (``g``) and an attention
LSTM that reads the support set ``fce_steps`` times for each query (``f``), as in the paper's
appendix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekt.config import Config, validate
from edgekt.data import Splits
from edgekt.engine.tasks import METHODS
from edgekt.fewshot.losses import Metric, pairwise_logits
from edgekt.methods.episodic import EpisodeArgs, EpisodicTask


class MatchingArgs(EpisodeArgs):
    """``method_args`` of ``method: matching``."""

    fce: bool = False
    """Full-context embeddings (support BiLSTM + query attention LSTM)."""
    fce_steps: int = Field(3, ge=1)
    """Attention-LSTM read steps over the support set (with ``fce``)."""
    metric: Metric = "cosine"
    """Attention similarity: cosine (the paper's) or negative squared Euclidean distance."""
    temperature: float | None = Field(None, gt=0)
    """Scale of the similarities before the softmax attention; default 10 (cosine: a scale
    of 1 makes the attention nearly uniform over [-1, 1] similarities) or 1 (euclidean)."""
    learn_temperature: bool = False
    """Meta-learn the temperature (saved with the task's state), initialised as above."""


class FullContext(nn.Module):
    """The paper's ``g`` (support BiLSTM with skip) and ``f`` (query attention LSTM)."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(dim, dim)

    def forward(self, support: torch.Tensor, query: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.support_lstm(support[None])  # (1, S, 2D): forward and backward halves
        d = support.shape[1]
        g = support + out[0, :, :d] + out[0, :, d:]
        h = torch.zeros_like(query)
        c = torch.zeros_like(query)
        r = torch.zeros_like(query)
        for _ in range(self.steps):
            h, c = self.query_cell(query, (h + r, c))
            h = h + query
            r = torch.softmax(h @ g.T, dim=1) @ g
        return g, h


@METHODS.register("matching")
class MatchingTask(EpisodicTask):
    """Episodic training with the attention classifier (NLL of the attended label mix)."""

    args_model = MatchingArgs

    def __init__(self, cfg: Config, model: nn.Module, splits: Splits, device: torch.device):
        args = validate(MatchingArgs, cfg.method_args, "method_args (matching)")
        super().__init__(cfg, model, splits, device, args)
        self.margs: MatchingArgs = args
        self.fce = FullContext(model.embedding_dim, args.fce_steps) if args.fce else None
        init = args.temperature or (10.0 if args.metric == "cosine" else 1.0)
        # A parameter only when learned, so checkpoints of fixed-temperature runs keep the
        # task state they always had.
        self.log_temperature = (nn.Parameter(torch.tensor(math.log(init)))
                                if args.learn_temperature else None)
        self.fixed_temperature = init

    def temperature(self) -> torch.Tensor | float:
        """The attention temperature (learned or fixed)."""
        if self.log_temperature is None:
            return self.fixed_temperature
        return self.log_temperature.exp()

    def scores(self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor,
               n_way: int) -> torch.Tensor:
        """(Q, n_way) log-probabilities: log of the attention mass on each class."""
        s, q = support.float(), query.float()
        if self.fce is not None:
            s, q = self.fce(s, q)
        att = torch.softmax(pairwise_logits(q, s, self.margs.metric, self.temperature()),
                            dim=1)
        probs = att @ F.one_hot(labels, n_way).float()
        return probs.clamp_min(1e-8).log()

    def episode_step(self, net, xs, ys, xq, yq):
        z = net.forward_features(torch.cat([xs, xq]))
        logp = self.scores(z[: len(xs)], ys, z[len(xs):], self.spec.n_way)
        loss = F.nll_loss(logp, yq)
        return loss, logp, {"nll": loss.detach(),
                            "temperature": torch.as_tensor(self.temperature()).detach()}
