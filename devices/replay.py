"""Class-balanced reservoir buffer of latent features under a fixed byte budget.

Every array is allocated once, at construction, from ``buffer_bytes``; the buffer never grows.
When it is full, a sample of a class that is not among the largest replaces a random sample
of the largest class; a sample of a largest class replaces one of its own class with the
reservoir probability ``count/seen`` (class-balanced reservoir sampling, Chrysakis & Moens,
ICML 2020). So every class keeps about ``capacity / n_classes`` slots and, within a class, a
uniform sample of everything it has seen. Latents are float32 or int8 with a per-row scale.

A fraction of the slots is marked *holdout*: never replayed, used to judge a candidate head
before it replaces the current one (guarded updates).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekt.errors import EdgektError

_LABEL_DTYPE = np.int16
MAX_CLASSES = 1024


def item_bytes(dim: int, int8: bool) -> int:
    """Bytes one stored sample costs: latent (+ its scale when int8), label and holdout flag."""
    latent = dim + 4 if int8 else 4 * dim
    return latent + np.dtype(_LABEL_DTYPE).itemsize + 1


class ReplayBuffer:
    """Latent replay memory; ``nbytes`` never exceeds ``buffer_bytes``.

    Args:
        dim: embedding size.
        buffer_bytes: total budget for all arrays (samples and per-class counters).
        int8: store latents as int8 with a float32 scale per row (4x more samples).
        holdout_fraction: share of stored samples kept out of replay for guarded updates.
        max_classes: classes the per-class counters are allocated for.
        seed: seed of the buffer's own random generator.
    """

    def __init__(self, dim: int, buffer_bytes: int, *, int8: bool = False,
                 holdout_fraction: float = 0.1, max_classes: int = 256, seed: int = 0) -> None:
        if dim <= 0 or buffer_bytes < 0 or not 0.0 <= holdout_fraction < 1.0:
            raise EdgektError(f"ReplayBuffer: need dim > 0, buffer_bytes >= 0 and 0 <= "
                              f"holdout_fraction < 1 (got {dim}, {buffer_bytes}, "
                              f"{holdout_fraction})")
        if not 0 < max_classes <= MAX_CLASSES:
            raise EdgektError(f"ReplayBuffer: max_classes must be in 1..{MAX_CLASSES}")
        self.dim, self.budget, self.int8 = dim, int(buffer_bytes), int8
        self.holdout_fraction = holdout_fraction
        counters = max_classes * (8 + 4)  # seen (int64) + count (int32) per class
        cap = max(0, (self.budget - counters) // item_bytes(dim, int8))
        self.latents = np.zeros((cap, dim), np.int8 if int8 else np.float32)
        self.scales = np.zeros(cap if int8 else 0, np.float32)
        self.labels = np.full(cap, -1, _LABEL_DTYPE)
        self.holdout = np.zeros(cap, bool)
        self.seen = np.zeros(max_classes, np.int64)
        self.counts = np.zeros(max_classes, np.int32)
        self.size = 0
        self.last_written = np.zeros(0, np.int64)
        """Slots the last ``add`` wrote (so callers can drop what they derived from them)."""
        self.rng = np.random.default_rng(seed)
        if cap and self.nbytes > self.budget:  # the arithmetic above guarantees this
            raise AssertionError("replay buffer sized past its budget")

    @property
    def capacity(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer's arrays (constant: everything is preallocated)."""
        arrays = (self.latents, self.scales, self.labels, self.holdout, self.seen, self.counts)
        return sum(a.nbytes for a in arrays)

    def _encode(self, z: np.ndarray, slots: np.ndarray) -> None:
        """Store rows ``z`` into ``slots`` (distinct), int8 with a per-row scale if asked."""
        if self.int8:
            scale = np.abs(z).max(axis=1) / 127.0
            scale[scale == 0] = 1.0
            # One temporary, rounded and clipped in place (the same values as the plain
            # ``clip(rint(z / scale))``).
            q = z / scale[:, None]
            np.rint(q, out=q)
            self.latents[slots] = np.clip(q, -127, 127, out=q)
            self.scales[slots] = scale
        else:
            self.latents[slots] = z

    def _decode(self, idx: np.ndarray) -> np.ndarray:
        if self.int8:
            # int8 * float32 is computed in float32: the same as astype then multiply, in one
            # pass and one allocation.
            return np.multiply(self.latents[idx], self.scales[idx, None], dtype=np.float32)
        return self.latents[idx]

    def _random_slot_of(self, cls: int, n_classes: int) -> int:
        # Rejection sampling in one vectorised draw: cls is a largest class here, so about
        # 1/n_classes of the draws hit it; fall back to a scan in the unlikely miss.
        cand = self.rng.integers(self.size, size=8 * n_classes + 8)
        hit = self.labels[cand] == cls
        first = int(hit.argmax())
        if hit[first]:
            return int(cand[first])
        return int(self.rng.choice(np.flatnonzero(self.labels[: self.size] == cls)))

    def add(self, z: np.ndarray, y: np.ndarray) -> int:
        """Offer samples ``z`` (n, dim) with class indices ``y``; returns how many were stored."""
        cap = self.capacity
        if cap == 0:
            return 0
        ys = np.asarray(y).tolist()
        top = max(ys, default=0)
        if top >= len(self.seen) or min(ys, default=0) < 0:
            raise EdgektError(f"ReplayBuffer: class index {top} outside 0..max_classes-1 "
                              f"(max_classes={len(self.seen)}); create the learner with a "
                              "larger max_classes")
        # This loop runs on every device update (the mlp head's budget is 2 ms): it works on
        # Python lists of the first ``top`` classes' counters (the others are zero, so never
        # the largest), keeps the largest class and the number of classes present up to date
        # instead of recounting them, and makes the same random draws, in the same order, as
        # the plain version (so what is stored is the same, sample for sample).
        present = np.flatnonzero(self.counts)
        top = max(top + 1, int(present[-1]) + 1 if len(present) else 0)
        seen, counts = self.seen[:top].tolist(), self.counts[:top].tolist()
        labels, holdout = self.labels, self.holdout
        rand, frac = self.rng.random, self.holdout_fraction
        n_classes = len(present)
        size = self.size
        by_count = counts.__getitem__
        largest = max(range(top), key=by_count)  # the first of the largest, as argmax
        written: dict[int, int] = {}  # slot -> row of z (a slot written twice keeps the last)
        for row, c in enumerate(ys):
            seen[c] += 1
            if size < cap:
                slot = size
                size += 1
            else:
                if counts[c] < counts[largest]:
                    self.size = size
                    slot = self._random_slot_of(largest, n_classes)
                elif rand() * seen[c] < counts[c]:
                    self.size = size
                    slot = self._random_slot_of(c, n_classes)
                else:
                    continue
                old = int(labels[slot])
                counts[old] -= 1
                n_classes -= counts[old] == 0
            labels[slot] = c
            n_classes += counts[c] == 0
            counts[c] += 1
            if size == cap:  # the largest class only matters once the buffer is full
                largest = max(range(top), key=by_count)
            holdout[slot] = rand() < frac
            written.pop(slot, None)
            written[slot] = row
        self.size = size
        self.seen[:top], self.counts[:top] = seen, counts
        slots = np.fromiter(written.keys(), np.int64, len(written))
        if len(slots):  # one vectorised encode for the batch
            self._encode(np.asarray(z, np.float32)[np.fromiter(written.values(), np.int64,
                                                                len(written))], slots)
        self.last_written = slots
        return len(slots)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``n`` replay samples (never holdout ones), drawn uniformly without replacement."""
        train = np.flatnonzero(~self.holdout[: self.size])
        if len(train) == 0 or n <= 0:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        idx = self.rng.choice(train, size=min(n, len(train)), replace=False)
        return self._decode(idx), self.labels[idx].astype(np.int64)

    def holdout_set(self) -> tuple[np.ndarray, np.ndarray]:
        """All holdout samples (latents, class indices)."""
        return self.holdout_slots()[1:]

    def holdout_slots(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All holdout samples: (slots, latents, class indices)."""
        idx = np.flatnonzero(self.holdout[: self.size])
        return idx, self._decode(idx), self.labels[idx].astype(np.int64)

    def restart_reservoir(self) -> None:
        """After a drift: count each class as newly filled, so new samples replace old ones fast."""
        self.seen[:] = self.counts

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"latents": self.latents, "scales": self.scales, "labels": self.labels,
                  "holdout": self.holdout, "seen": self.seen, "counts": self.counts}
        meta = {"size": self.size, "rng": self.rng.bit_generator.state}
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore a saved buffer; its arrays must match this buffer's layout exactly."""
        for name, current in self.get_state()[0].items():
            got = arrays.get(name)
            if got is None or got.shape != current.shape or got.dtype != current.dtype:
                raise EdgektError(
                    f"replay buffer state: {name} is {None if got is None else got.shape} "
                    f"{None if got is None else got.dtype}, this buffer needs {current.shape} "
                    f"{current.dtype} (buffer_bytes/int8/dim changed since it was saved?)")
            current[...] = got
        self.size = int(meta["size"])
        self.rng.bit_generator.state = meta["rng"]
