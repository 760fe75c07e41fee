"""Shared machinery of the episodic methods (siamese, matching, relation, MAML).

Each is a ``Task`` in the one ``fit()`` loop, like ``protonet``: every step it draws its own
N-way K-shot episode from the training split (the base classes, ``data.classes``) with the
shared ``edgekt.fewshot.episodes.EpisodeSampler``; the loader's batch only sets the number of
steps per epoch. Evaluation uses the few-shot protocol of ``edgekt.fewshot.evaluate`` (same
sampler, same seeds, mean +- 95% CI), with each method's own episode classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from edgekt.config import Config, Strict
from edgekt.data import BatchLoader, DatasetInfo, Splits, TensorSplit
from edgekt.data.base import StepCounter
from edgekt.engine.tasks import StepOutput, Task
from edgekt.fewshot.episodes import Episode, EpisodeSampler, EpisodeSpec, normalise
from edgekt.fewshot.evaluate import FewShotResult, mean_ci95, run_episodes

TorchClassifier = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(support embeddings, support labels, query embeddings, n_way) -> (Q, n_way) scores."""


class EpisodeArgs(Strict):
    """Episode shape and evaluation options shared by the episodic methods."""

    n_way: int = Field(5, ge=2)
    """Classes per training episode (at most the number of base classes)."""
    k_shot: int = Field(5, ge=1)
    n_query: int = Field(15, ge=1)
    episodes_per_epoch: int | None = Field(None, gt=0)
    """Training episodes (optimiser steps) per epoch; default: one per ``data.batch_size``
    images of the training split (the convention of earlier configs)."""
    eval_episodes: int = Field(100, ge=2)
    """Episodes on the base classes' val/test images for the loop's val/test accuracy."""
    eval_images: int = Field(1000, ge=10)
    """At most this many val/test images are used for those episodes."""


def unwrap(model: nn.Module) -> nn.Module:
    """The EdgeNet behind a torch.compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def eval_subset(split: TensorSplit, limit: int, seed: int = 54321) -> TensorSplit:
    """A fixed random subset of at most ``limit`` images (keeps per-epoch evaluation cheap)."""
    if len(split) <= limit:
        return split
    g = torch.Generator().manual_seed(seed)
    return split.subset(torch.randperm(len(split), generator=g)[:limit])


@torch.no_grad()
def embed_split(model: nn.Module, split: TensorSplit, info: DatasetInfo,
                batch_size: int = 512) -> torch.Tensor:
    """Embeddings (``forward_features``) of a whole split, eval mode, on the model's device."""
    net = unwrap(model)
    was = net.training
    net.eval()
    dev = next(net.parameters()).device
    out = [net.forward_features(normalise(split.images[i:i + batch_size], info).to(dev)).float()
           for i in range(0, len(split), batch_size)]
    net.train(was)
    return torch.cat(out)


def as_episode_classifier(scores: TorchClassifier, device: torch.device
                          ) -> Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]:
    """Wrap a torch scoring function for ``edgekt.fewshot.evaluate.run_episodes``."""

    @torch.no_grad()
    def classify(support: np.ndarray, labels: np.ndarray, query: np.ndarray, n_way: int
                 ) -> np.ndarray:
        s = scores(torch.from_numpy(support).to(device), torch.from_numpy(labels).to(device),
                   torch.from_numpy(query).to(device), n_way)
        return s.argmax(1).cpu().numpy()

    return classify


def evaluate_embedding_method(model: nn.Module, scores: TorchClassifier, split: TensorSplit,
                              info: DatasetInfo, spec: EpisodeSpec, *, episodes: int = 600,
                              seed: int = 0) -> FewShotResult:
    """The few-shot protocol with an embedding-based method's own classifier: the split is
    embedded once, then ``episodes`` seeded episodes (identical to ProtoNet's for the same
    split, spec and seed) are classified by ``scores``."""
    emb = embed_split(model, split, info)
    return run_episodes(emb.cpu().numpy(), split.targets.numpy(), spec, episodes=episodes,
                        seed=seed, classify=as_episode_classifier(scores, emb.device))


def evaluate_image_episodes(classify: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int],
                                               torch.Tensor],
                            split: TensorSplit, info: DatasetInfo, spec: EpisodeSpec, *,
                            episodes: int = 600, seed: int = 0) -> FewShotResult:
    """The same protocol for methods that must see the images of each episode (MAML adapts
    the network per episode): ``classify(xs, ys, xq, n_way) -> predicted query labels``."""
    sampler = EpisodeSampler(split.targets, spec, seed=seed, source="novel classes")
    accs = np.empty(episodes)
    preds = np.empty((episodes, spec.n_way * spec.n_query), np.int64)
    for i, ep in enumerate(sampler.episodes(episodes)):
        p = classify(normalise(split.images[ep.support], info), ep.support_labels,
                     normalise(split.images[ep.query], info), spec.n_way).cpu()
        preds[i] = p.numpy()
        accs[i] = float((p == ep.query_labels).float().mean())
    mean, ci = mean_ci95(accs)
    return FewShotResult(spec, episodes, seed, mean, ci, preds)


class EpisodicTask(Task):
    """Base of the episodic methods: draws the step's episode and scores base-class episodes.

    Subclasses implement ``episode_step`` (loss and query logits of one episode) and, when they
    classify from embeddings, ``scores`` (used by evaluation).
    """

    args: EpisodeArgs

    def __init__(self, cfg: Config, model: nn.Module, splits: Splits, device: torch.device,
                 args: EpisodeArgs) -> None:
        super().__init__(cfg, model, splits, device)
        self.args, self.device = args, device
        self.spec = EpisodeSpec(args.n_way, args.k_shot, args.n_query)
        self.split, self.info = splits.train, splits.info
        self.eval_splits = {"val": splits.val, "test": splits.test}
        self.sampler = EpisodeSampler(self.split.targets, self.spec, seed=cfg.train.seed,
                                      source="training split (data.classes = base classes)")
        # Episodes drawn so far: a buffer, so a resumed run continues with the same episodes.
        self.register_buffer("episodes_drawn", torch.zeros((), dtype=torch.long))

    def train_loader(self, loader: BatchLoader) -> StepCounter:
        """Episodes are drawn by the task: the loop gets a step counter, not image batches."""
        return StepCounter(self.args.episodes_per_epoch or len(loader))

    def next_episode(self) -> tuple[Episode, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor]:
        """The next training episode: (episode, xs, ys, xq, yq) on the task's device."""
        # Under DDP each rank draws its own episodes: the index sequence interleaves the ranks.
        ep = self.sampler.sample(int(self.episodes_drawn) * self.world + self.rank)
        self.episodes_drawn += 1
        d = self.device
        return (ep, normalise(self.split.images[ep.support], self.info).to(d),
                ep.support_labels.to(d), normalise(self.split.images[ep.query], self.info).to(d),
                ep.query_labels.to(d))

    def training_step(self, model: nn.Module, batch: tuple, step: int) -> StepOutput:
        del batch  # only the step number (the episode is drawn here)
        _, xs, ys, xq, yq = self.next_episode()
        loss, logits, terms = self.episode_step(unwrap(model), xs, ys, xq, yq)
        return StepOutput(loss, logits, yq, terms)

    def episode_step(self, net: nn.Module, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                     yq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                dict[str, torch.Tensor]]:
        raise NotImplementedError

    def scores(self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor,
               n_way: int) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: TensorSplit, spec: EpisodeSpec, *,
                 episodes: int = 600, seed: int = 0) -> FewShotResult:
        """Few-shot accuracy of this method on ``split`` (e.g. the novel classes)."""
        was = self.training
        self.eval()
        try:
            return evaluate_embedding_method(model, self.scores, split, self.info, spec,
                                             episodes=episodes, seed=seed)
        finally:
            self.train(was)

    def extra_metrics(self, model: nn.Module, split: str) -> dict[str, float]:
        """Episode accuracy on the base classes' ``split`` images (replaces the loop's ``acc``,
        so ``best.pt`` is the checkpoint that classifies episodes best)."""
        data = eval_subset(self.eval_splits[split], self.args.eval_images)
        n_way = min(self.spec.n_way, len(torch.unique(data.targets)))
        spec = EpisodeSpec(n_way, self.spec.k_shot, self.spec.n_query)
        res = self.evaluate(model, data, spec, episodes=self.args.eval_episodes, seed=12345)
        return {"acc": res.mean, "episode_ci95": res.ci95}

    def export_metadata(self) -> dict[str, Any]:
        return {"method": self.cfg.method, **self.args.model_dump()}


def evaluate_checkpoint(path: str | Path, *, novel_classes: list[int], ways: int,
                        shots: tuple[int, ...] = (1, 5), queries: int = 15,
                        episodes: int = 600, seed: int = 0) -> dict[str, Any]:
    """Few-shot accuracy of an episodic-method checkpoint with the method's *own* classifier
    (siamese scores, matching attention, relation module, MAML adaptation) on the test images
    of ``novel_classes`` of its dataset; same episodes as ``edgekt fewshot eval`` (which uses
    the device's nearest-prototype rule on the embedding)."""
    from edgekt.checkpoint import load_checkpoint
    from edgekt.config import DataConfig, validate
    from edgekt.data import build_splits
    from edgekt.engine.setup import model_from_checkpoint
    from edgekt.engine.tasks import get_method
    from edgekt.errors import EdgektError

    ckpt = load_checkpoint(path)
    cfg: Config = validate(Config, ckpt.get("config", {}), f"{path} (stored config)")
    model, _ = model_from_checkpoint(ckpt, str(path))
    task = get_method(cfg.method)(cfg, model, build_splits(cfg.data), torch.device("cpu"))
    if not isinstance(task, EpisodicTask):
        raise EdgektError(f"{path}: method {cfg.method!r} is not an episodic method "
                          f"(use edgekt fewshot eval)")
    task.load_state_dict(ckpt["task"])
    overlap = set(novel_classes) & set(cfg.data.classes or [])
    if overlap:
        raise EdgektError(f"novel classes {sorted(overlap)} were base (training) classes")
    novel = build_splits(DataConfig(name=cfg.data.name, data_dir=cfg.data.data_dir,
                                    classes=novel_classes, val_fraction=0.0,
                                    image_size=cfg.data.image_size)).test
    res = {k: task.evaluate(model, novel, EpisodeSpec(ways, k, queries), episodes=episodes,
                            seed=seed).as_dict() for k in shots}
    return {"checkpoint": str(path), "method": cfg.method, "novel_classes": novel_classes,
            "results": [res[k] for k in shots]}
