"""N-way K-shot Q-query episodes over a labelled split, seeded and reproducible.

An episode picks ``n_way`` classes, then ``k_shot`` support and ``n_query`` query samples of
each, without overlap. Episode ``i`` of a sampler depends only on ``(seed, i)``, so training
resumed at step ``i`` and evaluations rerun later draw exactly the same episodes. Every
episodic method (ProtoNet, matching, relation, MAML, ...) shares this sampler::

    sampler = EpisodeSampler(split.targets, EpisodeSpec(n_way=5, k_shot=1, n_query=15), seed=0)
    ep = sampler.sample(0)
    xs, ys, xq, yq = episode_batch(split, ep, info)   # normalised floats, labels 0..n_way-1
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from edgekt.data import DatasetInfo, TensorSplit
from edgekt.errors import EdgektError


@dataclass(frozen=True)
class EpisodeSpec:
    """Shape of an episode."""

    n_way: int
    k_shot: int
    n_query: int

    def __post_init__(self) -> None:
        for name in ("n_way", "k_shot", "n_query"):
            if getattr(self, name) < 1:
                raise EdgektError(f"episode {name} must be >= 1, got {getattr(self, name)}")

    def __str__(self) -> str:
        return f"{self.n_way}-way {self.k_shot}-shot {self.n_query}-query"


@dataclass
class Episode:
    """Positions into the split and episode-local labels (0..n_way-1, class-major order)."""

    classes: torch.Tensor
    """(n_way,) the split's class ids, in episode-label order."""
    support: torch.Tensor
    """(n_way * k_shot,) positions into the split; sample j has label j // k_shot."""
    query: torch.Tensor
    """(n_way * n_query,) positions into the split; sample j has label j // n_query."""
    support_labels: torch.Tensor
    query_labels: torch.Tensor


class EpisodeSampler:
    """Draws episodes from the samples of ``targets`` (optionally of some classes only).

    Raises EdgektError up front when ``n_way`` exceeds the number of classes or a class has
    fewer than ``k_shot + n_query`` samples, rather than failing on some later episode.
    """

    def __init__(self, targets: torch.Tensor, spec: EpisodeSpec, *, seed: int = 0,
                 classes: Sequence[int] | None = None, source: str = "split") -> None:
        self.spec, self.seed = spec, seed
        targets = torch.as_tensor(targets).long()
        present = torch.unique(targets).tolist()
        chosen = list(present if classes is None else classes)
        missing = sorted(set(chosen) - set(present))
        if missing:
            raise EdgektError(f"{source}: classes {missing} have no samples (present: {present})")
        if spec.n_way > len(chosen):
            raise EdgektError(
                f"{source}: {spec} needs {spec.n_way} classes but only {len(chosen)} are "
                f"available ({chosen}); lower n_way or add classes")
        need = spec.k_shot + spec.n_query
        self.classes = torch.tensor(chosen, dtype=torch.long)
        self.pools = [torch.nonzero(targets == c).flatten() for c in chosen]
        short = {c: len(p) for c, p in zip(chosen, self.pools, strict=True) if len(p) < need}
        if short:
            raise EdgektError(
                f"{source}: {spec} needs {need} samples per class (k_shot + n_query) but "
                f"class(es) {short} (class: count) have fewer; lower k_shot/n_query or drop "
                f"those classes")

    def sample(self, index: int) -> Episode:
        """Episode number ``index`` (a pure function of the seed and the index)."""
        s = self.spec
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        pick = torch.randperm(len(self.classes), generator=g)[: s.n_way]
        support, query = [], []
        for c in pick.tolist():
            pool = self.pools[c]
            take = pool[torch.randperm(len(pool), generator=g)[: s.k_shot + s.n_query]]
            support.append(take[: s.k_shot])
            query.append(take[s.k_shot:])
        ways = torch.arange(s.n_way)
        return Episode(self.classes[pick], torch.cat(support), torch.cat(query),
                       ways.repeat_interleave(s.k_shot), ways.repeat_interleave(s.n_query))

    def episodes(self, n: int, start: int = 0) -> Iterator[Episode]:
        """Episodes ``start .. start+n-1``."""
        for i in range(start, start + n):
            yield self.sample(i)


def normalise(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float model input, exactly as ``BatchLoader`` does."""
    mean = torch.tensor(info.mean).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(info.std).view(1, -1, 1, 1) * 255.0
    return (images.float() - mean) / std


def episode_batch(split: TensorSplit, ep: Episode, info: DatasetInfo
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support images, support labels, query images, query labels (normalised floats)."""
    return (normalise(split.images[ep.support], info), ep.support_labels,
            normalise(split.images[ep.query], info), ep.query_labels)
