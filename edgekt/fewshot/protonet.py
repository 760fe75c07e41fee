"""Prototypical networks (Snell et al., 2017) as an engine method: one episode per step.

Classify a query by the nearest class mean ("prototype") of the support embeddings. Training
runs inside the ordinary ``fit()`` loop: each step the task ignores the loader's batch for the
prototypical loss and draws its own episode from the training split (base classes, set by
``data.classes``). The loader's batch still sets the number of steps (an epoch has
``ceil(len(train) / data.batch_size)`` episodes), and the episode's embeddings train the
classifier head as a linear probe on detached features, so the loop's validation accuracy
tracks embedding quality (with ``ce_weight > 0`` the cross-entropy also trains the backbone).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgekt.config import Config, Strict, validate
from edgekt.data import Splits
from edgekt.data.base import random_crop_flip
from edgekt.devices.fewshot import transform_embeddings
from edgekt.engine.tasks import METHODS, StepOutput, Task
from edgekt.errors import EdgektError
from edgekt.fewshot.episodes import EpisodeSampler, EpisodeSpec, normalise
from edgekt.fewshot.evaluate import (
    TorchEmbedder,
    default_transform,
    nearest_prototype,
    raw_images,
    run_episodes,
)
from edgekt.fewshot.losses import Metric, prototypical_loss, rotate_batch


class ProtoNetArgs(Strict):
    """``method_args`` of the ``protonet`` method."""

    n_way: int = Field(5, ge=2)
    """Classes per training episode (at most the number of base classes)."""
    k_shot: int = Field(5, ge=1)
    n_query: int = Field(15, ge=1)
    metric: Metric = "euclidean"
    """Squared Euclidean distance (the paper's) or cosine similarity."""
    scale: float | None = Field(None, gt=0)
    """Logit temperature: -scale * d2 or scale * cos. Default 1 (euclidean), 10 (cosine)."""
    learn_scale: bool = False
    """Learn the temperature (stored in the checkpoint with the task's state)."""
    ce_weight: float = Field(0.0, ge=0)
    """Weight of an auxiliary base-class cross-entropy through the backbone (0: probe only)."""
    rotation_weight: float = Field(0.0, ge=0)
    """Weight of an auxiliary rotation-prediction loss (a 4-way head on the embedding of a
    randomly rotated copy of each episode image; Gidaris et al. 2019): a self-supervised task
    that keeps features the base classes alone would not need. 0: off."""
    transform: Literal["auto", "none", "l2"] = "auto"
    """Embedding transform few-shot evaluation and the package use for this checkpoint (its
    ``auto``: as trained, L2 for cosine). ``l2`` on a Euclidean-trained embedding compares
    directions only, which transfers better across domains (SimpleShot, Wang et al. 2019)."""
    eval_episodes: int = Field(200, ge=2)
    """Episodes (same spec, base-class val/test images) for the loop's val/test accuracy."""
    eval_images: int = Field(2000, ge=10)
    """At most this many val/test images are embedded for those episodes."""


@METHODS.register("protonet")
class ProtoNetTask(Task):
    """Episodic prototypical-network training (see the module docstring)."""

    args_model = ProtoNetArgs

    def __init__(self, cfg: Config, model: nn.Module, splits: Splits, device: torch.device):
        super().__init__(cfg, model, splits, device)
        self.args: ProtoNetArgs = validate(ProtoNetArgs, cfg.method_args, "method_args (protonet)")
        a = self.args
        self.spec = EpisodeSpec(a.n_way, a.k_shot, a.n_query)
        self.split, self.info = splits.train, splits.info
        self.splits_eval = {"val": splits.val, "test": splits.test}
        self.sampler = EpisodeSampler(self.split.targets, self.spec, seed=cfg.train.seed,
                                      source="training split (data.classes = base classes)")
        h, w = self.split.images.shape[-2:]
        if a.rotation_weight > 0 and h != w:
            raise EdgektError(f"method_args.rotation_weight needs square images (a 90-degree "
                              f"rotation keeps the shape); {cfg.data.name} images are {h}x{w}: "
                              f"set data.image_size or rotation_weight: 0")
        self.rot_head = nn.Linear(model.embedding_dim, 4) if a.rotation_weight > 0 else None
        self.augment = cfg.data.augment
        self.transform = default_transform("protonet", a.metric) if a.transform == "auto" \
            else a.transform
        init = a.scale if a.scale is not None else (10.0 if a.metric == "cosine" else 1.0)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)), requires_grad=a.learn_scale)
        # Counts episodes drawn (a buffer, so it is checkpointed and a resumed run continues
        # with the episode an uninterrupted run would have drawn, also under grad_accum).
        self.register_buffer("episodes_drawn", torch.zeros((), dtype=torch.long))

    def training_step(self, model: nn.Module, batch: tuple, step: int) -> StepOutput:
        a, index = self.args, self._next_episode_index()
        ep = self.sampler.sample(index)
        pos = torch.cat([ep.support, ep.query])
        images = self.split.images[pos].float()
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + index)
        if self.augment:
            images = random_crop_flip(images, g)
        n = len(images)
        if self.rot_head is not None:  # one forward pass for the episode and its rotated copy
            rotated, rot_k = rotate_batch(images, g)
            images = torch.cat([images, rotated])
        x = normalise(images, self.info).to(self.log_scale.device)
        emb, head_logits = self._forward(model, x)
        dev = emb.device
        n_s = len(ep.support)
        loss, logits = prototypical_loss(
            emb[:n_s], ep.support_labels.to(dev), emb[n_s:n], ep.query_labels.to(dev),
            self.spec.n_way, metric=self.args.metric, scale=self.log_scale.exp())
        ce = F.cross_entropy(head_logits[:n].float(), self.split.targets[pos].to(dev))
        total = loss + (a.ce_weight if a.ce_weight > 0 else 1.0) * ce
        terms = {"proto": loss.detach(), "ce": ce.detach(), "scale": self.log_scale.exp().detach()}
        if self.rot_head is not None:
            rot = F.cross_entropy(self.rot_head(emb[n:]).float(), rot_k.to(dev))
            total = total + a.rotation_weight * rot
            terms["rotation"] = rot.detach()
        return StepOutput(total, logits, ep.query_labels.to(dev), terms)

    def _next_episode_index(self) -> int:
        drawn = int(self.episodes_drawn.item())
        self.episodes_drawn += 1
        # Each rank draws its own episodes: interleave the index sequence across ranks.
        return drawn * self.world + self.rank

    def _forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and head logits from one ``model(x)`` call.

        Going through ``model(x)`` (not ``forward_features``) keeps DDP's gradient hooks and
        torch.compile in play; a pre-hook on the head captures its input (the embedding) and,
        in probe mode (``ce_weight == 0``), detaches it so the CE trains the head only.
        """
        net = model
        while hasattr(net, "module") or hasattr(net, "_orig_mod"):  # DDP / torch.compile
            net = getattr(net, "module", None) or net._orig_mod
        captured: list[torch.Tensor] = []
        probe = self.args.ce_weight == 0

        def hook(_mod: nn.Module, args: tuple) -> tuple | None:
            captured.append(args[0])
            return (args[0].detach(),) if probe else None

        handle = net.head.register_forward_pre_hook(hook)
        try:
            head_logits = model(x)
        finally:
            handle.remove()
        return captured[0], head_logits

    @torch.no_grad()
    def extra_metrics(self, model: nn.Module, split: str) -> dict[str, float]:
        """Episode accuracy on the base classes' ``split`` images (replaces the loop's
        ``acc``, so ``best.pt`` is the checkpoint whose embedding classifies episodes best)."""
        data = self.splits_eval[split]
        if len(data) > self.args.eval_images:  # a fixed random subset keeps epochs cheap
            g = torch.Generator().manual_seed(54321)
            data = data.subset(torch.randperm(len(data), generator=g)[: self.args.eval_images])
        n_way = min(self.spec.n_way, len(torch.unique(data.targets)))
        spec = EpisodeSpec(n_way, self.spec.k_shot, self.spec.n_query)
        was_training = model.training
        try:
            emb = TorchEmbedder(model, self.info).embed(raw_images(data))
        finally:
            model.train(was_training)
        emb = transform_embeddings(emb, self.transform)  # as evaluation and the device do
        res = run_episodes(emb, data.targets.numpy(), spec, episodes=self.args.eval_episodes,
                           seed=12345, classify=nearest_prototype("euclidean"))
        return {"acc": res.mean, "episode_ci95": res.ci95}

    def export_metadata(self) -> dict[str, Any]:
        return {"method": "protonet", **self.args.model_dump(),
                "scale": float(self.log_scale.exp()), "transform": self.transform}

