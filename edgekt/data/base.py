"""Dataset bundle types and the in-memory batch loader used by every built-in dataset."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class DatasetInfo:
    """What export and the device need to know about the data."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    labels: list[str]

    @property
    def color(self) -> str:
        return "L" if self.in_channels == 1 else "RGB"


@dataclass
class TensorSplit:
    """A split held in memory: uint8 images (N, C, H, W) and int64 targets."""

    images: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor | None = field(default=None)
    """Positions in the original split (for the teacher-output cache)."""

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, idx: torch.Tensor) -> TensorSplit:
        base = self.indices if self.indices is not None else torch.arange(len(self))
        return TensorSplit(self.images[idx], self.targets[idx], base[idx])


@dataclass
class Splits:
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    info: DatasetInfo


class BatchLoader:
    """Yields normalised float batches from a TensorSplit.

    Far faster than a per-sample DataLoader for small images. The order of epoch ``e`` depends
    only on (seed, e) and augmentation on (seed, e, batch), so a run resumed mid-epoch sees
    exactly the batches an uninterrupted run would. With ``rank``/``world`` each process gets a
    disjoint, equal-sized shard (the DistributedSampler contract).
    """

    def __init__(
        self,
        split: TensorSplit,
        info: DatasetInfo,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
        with_index: bool = False,
    ) -> None:
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.augment, self.drop_last, self.rank, self.world = augment, drop_last, rank, world
        self.with_index = with_index
        self.info = info
        self.mean = torch.tensor(info.mean).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(info.std).view(1, -1, 1, 1) * 255.0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.split)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world > 1:
            if self.shuffle:  # training shards are padded to equal length, as DistributedSampler
                per = -(-n // self.world)
                order = torch.cat([order, order[: per * self.world - n]])
            order = order[self.rank :: self.world]
        return order

    def __len__(self) -> int:
        n = len(self._order()) if self.world > 1 else len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self._order()
        for b in range(start_batch, len(self)):
            yield self._batch(order, b)

    def batch_at(self, epoch: int, b: int) -> tuple[torch.Tensor, ...]:
        """Batch ``b`` of epoch ``epoch``, exactly as iteration would yield it."""
        saved, self.epoch = self.epoch, epoch
        try:
            return self._batch(self._order(), b)
        finally:
            self.epoch = saved

    def _batch(self, order: torch.Tensor, b: int) -> tuple[torch.Tensor, ...]:
        idx = order[b * self.batch_size : (b + 1) * self.batch_size]
        x = self.split.images[idx].float()
        if self.augment is not None:
            g = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 10_007 + b)
            x = self.augment(x, g)
        x = (x - self.mean) / self.std
        y = self.split.targets[idx]
        if self.with_index:
            pos = self.split.indices[idx] if self.split.indices is not None else idx
            return x, y, pos
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.iter_from(0)


class PairedLoader:
    """Batches of a large (unlabelled) ``primary`` loader, each paired with the next batch of a
    small labelled ``secondary`` loader, cycled: yields ``(x_labelled, y_labelled, x_primary)``.

    An epoch is one pass over ``primary``; the secondary batch is a pure function of the global
    batch number, so a run resumed mid-epoch sees the same pairs.
    """

    def __init__(self, primary: BatchLoader, secondary: BatchLoader) -> None:
        self.primary, self.secondary = primary, secondary
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.primary.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.primary)

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        per = len(self.secondary)
        for b, batch in enumerate(self.primary.iter_from(start_batch), start=start_batch):
            k = self.epoch * len(self.primary) + b
            x_l, y_l = self.secondary.batch_at(k // per, k % per)[:2]
            yield x_l, y_l, batch[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.iter_from(0)


class StepCounter:
    """``n`` data-free steps per epoch, for tasks that draw their own samples (episodes): yields
    ``(batch_index,)`` so the loop's bookkeeping (resume mid-epoch, progress) is unchanged."""

    def __init__(self, n: int) -> None:
        self.n = n

    def set_epoch(self, epoch: int) -> None:
        del epoch  # the task's own sampler carries the position

    def __len__(self) -> int:
        return self.n

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        for b in range(start_batch, self.n):
            yield (torch.tensor(b),)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.iter_from(0)


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Batched random crop (zero padding ``pad``) and horizontal flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    out = padded.gather(2, rows.expand(n, x.shape[1], h, w + 2 * pad))
    out = out.gather(3, cols.expand(n, x.shape[1], h, w))
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def random_erasing(x: torch.Tensor, g: torch.Generator, p: float = 0.5,
                   area: tuple[float, float] = (0.02, 0.25), ratio: float = 3.0) -> torch.Tensor:
    """Batched random erasing (Zhong et al. 2020): with probability ``p`` per image, a rectangle
    of ``area`` (fraction of the image) and aspect ratio in [1/ratio, ratio] is filled with
    uniform noise in the pixel range (0..255, before normalisation)."""
    n, _, h, w = x.shape
    frac = torch.empty(n).uniform_(*area, generator=g)
    log_r = torch.empty(n).uniform_(-math.log(ratio), math.log(ratio), generator=g)
    eh = (frac * h * w * log_r.exp()).sqrt().round().clamp(1, h).long()
    ew = (frac * h * w / log_r.exp()).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n, generator=g) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=g) * (w - ew + 1)).long()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
           & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)))
    box &= (torch.rand(n, generator=g) < p).view(n, 1, 1)
    noise = torch.rand(x.shape, generator=g) * 255.0
    return torch.where(box.unsqueeze(1), noise, x)
