"""On-device continual learning: a frozen embedder, a small numpy head, latent replay.

Three heads: a softmax linear layer, nearest class means, and ``mlp``, a small block
(standardise, linear, ReLU, linear) trained from the replay buffer above the backbone's latent
layer (latent replay, Pellegrini et al., IROS 2020): the layers below the latent layer stay
frozen and exported, the block above learns on the device.

The app feeds labelled samples as they come (``learner.observe(x, y)``) and asks for
predictions (``learner.predict(x)``). Each observed batch is embedded by the frozen exported
model, scored by the current head (the per-sample errors feed a drift detector), mixed with
replayed latents from a class-balanced byte-budgeted buffer, and used for a candidate head
update. The candidate replaces the head only if it keeps the accuracy on the buffer's holdout
samples of already known classes within ``guard_tolerance``; otherwise it is rolled back and
the reason is logged. Head, buffer, detector, counters and the label map are committed
atomically with :mod:`edgekt.devices.state` every ``save_every`` batches and on ``save()``.

Bad input never reaches the head: unlabelled samples, NaN/inf inputs, a sample shape other
than the first one seen, a label type change (e.g. ``int`` then ``str``) and embeddings of the
wrong size are rejected, counted and reported in the returned :class:`ObserveResult`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from edgekt.devices.drift import DriftDetector, create_detector
from edgekt.devices.lock import DEFAULT_TIMEOUT, state_lock
from edgekt.devices.replay import ReplayBuffer
from edgekt.devices.state import State, StateCorruptError, load_state, save_state
from edgekt.errors import EdgektError
from edgekt.io import check_writable

log = logging.getLogger(__name__)

STATE_FORMAT = 1


class Embedder(Protocol):
    """Anything that turns a batch of raw inputs into a (batch, dim) float array."""

    def embed(self, raw: np.ndarray) -> np.ndarray: ...


@dataclass
class LearnerConfig:
    """Hyper-parameters of the on-device learner (all plain values, saved with the state)."""

    head: Literal["softmax", "ncm", "mlp"] = "softmax"
    """Softmax linear layer trained by SGD, nearest-class-mean prototypes, or a hidden layer
    plus softmax trained by SGD (latent replay's trainable block)."""
    lr: float = 0.5
    """SGD learning rate of the softmax and mlp heads."""
    hidden: int = 128
    """Hidden units of the mlp head."""
    standardize_samples: int = 1024
    """mlp head: per-dimension mean and variance of the latents are estimated from the first
    N samples of the stream, then frozen (a moving input scale would undo what was learnt)."""
    steps: int = 1
    """SGD steps per observed batch (each on the batch plus a fresh replay draw)."""
    replay_batch: int = 32
    """Replayed latents mixed into every step."""
    buffer_bytes: int = 1_000_000
    """Byte budget of the replay buffer (0: no replay, no guard)."""
    int8: bool = False
    """Store replayed latents as int8 (about 4x more samples in the same budget)."""
    holdout_fraction: float = 0.1
    """Share of buffered samples reserved for judging updates."""
    guard: bool = True
    """Roll back updates that lose more than ``guard_tolerance`` on known classes."""
    guard_tolerance: float = 0.05
    """Largest drop of holdout accuracy among the known classes an update may cause."""
    guard_backoff: int = 2
    """Retries of a rejected update, each with a 4x smaller learning rate."""
    guard_min_holdout: int = 20
    """Fewer holdout samples of known classes than this: accept without judging."""
    normalize: bool = True
    """L2-normalise embeddings (False when starting from an exported head, which was trained
    on raw embeddings)."""
    drift: Literal["adwin", "page-hinkley", "none"] = "adwin"
    """Detector on the stream of per-sample errors (prequential, before the update)."""
    drift_args: dict[str, Any] = field(default_factory=dict)
    ncm_window: int = 200
    """NCM on drift: each prototype keeps the weight of at most this many samples."""
    max_classes: int = 256
    save_every: int = 0
    """Commit the state every N observed batches (0: only on ``save()``)."""
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "head": self.head in HEADS, "lr": 0 < self.lr < float("inf"),
            "hidden": 1 <= self.hidden <= 65_536,
            "standardize_samples": self.standardize_samples >= 1, "steps": self.steps >= 1,
            "replay_batch": self.replay_batch >= 0, "buffer_bytes": self.buffer_bytes >= 0,
            "holdout_fraction": 0 <= self.holdout_fraction < 1,
            "guard_tolerance": 0 <= self.guard_tolerance <= 1,
            "drift": self.drift in ("adwin", "page-hinkley", "none"),
            "ncm_window": self.ncm_window >= 1, "guard_backoff": self.guard_backoff >= 0,
            "save_every": self.save_every >= 0,
            "max_classes": 1 <= self.max_classes <= 1024,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            raise EdgektError(f"LearnerConfig: invalid {values}")

    # Fields that fix the layout of the saved state; the others may change across restarts.
    STRUCTURAL = ("head", "buffer_bytes", "int8", "holdout_fraction", "normalize", "drift",
                  "drift_args", "max_classes", "hidden")


@dataclass
class ObserveResult:
    """What one ``observe`` call did."""

    accepted: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """(index in the batch, reason) of every rejected sample."""
    updated: bool = False
    rolled_back: bool = False
    reason: str = ""
    """Why the update was rolled back (empty otherwise)."""
    drift: bool = False
    new_labels: list[str] = field(default_factory=list)
    errors: int = 0
    """Samples the head got wrong before learning from them (prequential)."""
    update_ms: float = 0.0
    """Time of the head update, guard and buffer insertion (embedding excluded)."""
    update_cpu_ms: float = 0.0
    """The same, in CPU time of this process (what the update costs, without the time other
    processes held the core)."""


# --------------------------------------------------------------------------- heads


def _balanced_xent_grad(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of class-balanced cross-entropy with respect to ``logits`` (overwritten).

    Every class in the batch weighs the same, however many of its samples the batch has:
    ``(softmax - onehot) / (classes in the batch * samples of the row's class)``, the softmax
    taken in log space for stability.
    """
    shifted = np.subtract(logits, logits.max(axis=1, keepdims=True), out=logits)
    log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    g = np.exp(np.subtract(shifted, log_z, out=shifted), out=shifted)
    rows = np.arange(len(y))
    g[rows, y] -= 1.0
    counts = np.bincount(y)
    g *= (1.0 / (np.count_nonzero(counts) * counts[y]))[:, None]
    return g


class SoftmaxHead:
    """Linear layer + softmax; rows are added (zero-initialised) as labels appear."""

    kind = "softmax"

    def __init__(self, dim: int, weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None) -> None:
        self.weight = np.zeros((0, dim), np.float32) if weight is None else weight.astype(
            np.float32)
        self.bias = np.zeros(len(self.weight), np.float32) if bias is None else bias.astype(
            np.float32)

    @property
    def num_classes(self) -> int:
        return len(self.weight)

    def grow(self, n: int) -> None:
        extra = n - self.num_classes
        if extra > 0:
            rows = np.zeros((extra, self.weight.shape[1]), np.float32)
            self.weight = np.vstack([self.weight, rows])
            self.bias = np.concatenate([self.bias, np.zeros(extra, np.float32)])

    def logits(self, z: np.ndarray) -> np.ndarray:
        return z @ self.weight.T + self.bias

    def prepare(self, z: np.ndarray) -> np.ndarray:
        """What :meth:`logits_prepared` takes (here the embeddings themselves)."""
        return z

    def logits_prepared(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x)

    def input_key(self) -> float:
        """Changes whenever :meth:`prepare` would map an embedding differently."""
        return 0.0

    def clone(self) -> SoftmaxHead:
        return copy.deepcopy(self)

    def learn(self, z: np.ndarray, y: np.ndarray, lr: float) -> None:
        """One SGD step of class-balanced cross-entropy on (z, y).

        Every class in the batch weighs the same, however many of its samples the batch has:
        a batch of new-class samples mixed with replayed ones would otherwise pull the head
        towards the newest classes (the recency bias of replay on a linear head).
        """
        p = _balanced_xent_grad(self.logits(z), y)
        self.weight -= lr * (p.T @ z)
        self.bias -= lr * p.sum(axis=0)

    def on_drift(self, window: int) -> None:
        """Nothing to reset: the replay buffer restart does the adapting."""

    def see(self, z: np.ndarray) -> None:
        """Nothing to estimate from new inputs."""

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    @classmethod
    def from_arrays(cls, dim: int, a: dict[str, np.ndarray]) -> SoftmaxHead:
        return cls(dim, a["weight"], a["bias"])


class NCMHead:
    """Nearest class mean: a running mean embedding (prototype) per class."""

    kind = "ncm"

    def __init__(self, dim: int, sums: np.ndarray | None = None,
                 counts: np.ndarray | None = None) -> None:
        self.sums = np.zeros((0, dim), np.float64) if sums is None else sums.astype(np.float64)
        self.counts = np.zeros(len(self.sums)) if counts is None else counts.astype(np.float64)

    @property
    def num_classes(self) -> int:
        return len(self.sums)

    def grow(self, n: int) -> None:
        extra = n - self.num_classes
        if extra > 0:
            self.sums = np.vstack([self.sums, np.zeros((extra, self.sums.shape[1]))])
            self.counts = np.concatenate([self.counts, np.zeros(extra)])

    def logits(self, z: np.ndarray) -> np.ndarray:
        """Negative squared distance to each prototype (classes never seen: -inf)."""
        means = (self.sums / np.maximum(self.counts, 1.0)[:, None]).astype(np.float32)
        scores = 2.0 * z @ means.T - (means * means).sum(axis=1)
        scores[:, self.counts == 0] = -np.inf
        return scores

    prepare = SoftmaxHead.prepare
    input_key = SoftmaxHead.input_key

    def logits_prepared(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x)

    def clone(self) -> NCMHead:
        return copy.deepcopy(self)

    def learn(self, z: np.ndarray, y: np.ndarray, lr: float) -> None:
        np.add.at(self.sums, y, z)
        self.counts += np.bincount(y, minlength=self.num_classes)

    def on_drift(self, window: int) -> None:
        """Shrink each prototype's weight to ``window`` samples so new data moves it fast."""
        factor = np.minimum(1.0, window / np.maximum(self.counts, 1.0))
        self.sums *= factor[:, None]
        self.counts *= factor

    def see(self, z: np.ndarray) -> None:
        """Nothing to estimate from new inputs (the prototypes learn in ``learn``)."""

    def arrays(self) -> dict[str, np.ndarray]:
        return {"sums": self.sums, "counts": self.counts}

    @classmethod
    def from_arrays(cls, dim: int, a: dict[str, np.ndarray]) -> NCMHead:
        return cls(dim, a["sums"], a["counts"])


class MLPHead:
    """Latent replay block: standardise, ``Linear(dim, hidden)``, ReLU, ``Linear(hidden, C)``.

    The input statistics come from the first ``standardize_samples`` new samples (Welford's
    running mean and variance, then frozen); the hidden layer is He-initialised from the
    learner's seed, and output rows are added (zero-initialised) as labels appear. ``learn``
    is one SGD step of the same class-balanced cross-entropy as :class:`SoftmaxHead`, back-
    propagated through both layers.
    """

    kind = "mlp"
    INPUT_NORM = 5.0
    """Standardised inputs are scaled to this expected L2 norm, whatever the latent width, so
    one learning rate suits any latent layer (5 was best of 1, 5 and 10 on Split-Fashion-MNIST
    over an MNIST-trained backbone)."""

    def __init__(self, dim: int, hidden: int = 128, *, seed: int = 0,
                 standardize_samples: int = 1024) -> None:
        rng = np.random.default_rng(seed)
        self.w1 = (rng.standard_normal((dim, hidden)) * np.sqrt(2.0 / dim)).astype(np.float32)
        self.b1 = np.zeros(hidden, np.float32)
        self.w2 = np.zeros((0, hidden), np.float32)
        self.b2 = np.zeros(0, np.float32)
        self.stats = np.zeros((3, dim), np.float64)  # count (broadcast), mean, M2
        self.standardize_samples = standardize_samples
        self._scale_cache: tuple[np.ndarray, np.ndarray] | None = None
        self.steps: list[tuple[np.ndarray, np.ndarray, float]] = []
        """(inputs, hidden-layer gradient, lr) of each ``learn`` since ``clone``: the first
        layer moved by ``-lr * inputs.T @ gradient`` (what the learner's guard reuses)."""

    @property
    def num_classes(self) -> int:
        return len(self.w2)

    def grow(self, n: int) -> None:
        extra = n - self.num_classes
        if extra > 0:
            self.w2 = np.vstack([self.w2, np.zeros((extra, self.w2.shape[1]), np.float32)])
            self.b2 = np.concatenate([self.b2, np.zeros(extra, np.float32)])

    def see(self, z: np.ndarray) -> None:
        """Fold new (never replayed) samples into the input statistics until they freeze."""
        n0 = float(self.stats[0, 0])
        if n0 >= self.standardize_samples:
            return
        take = z[: int(self.standardize_samples - n0)].astype(np.float64)
        if not len(take):
            return
        # Chan et al.'s parallel update of (count, mean, M2) by a batch.
        n1, mean1 = float(len(take)), take.mean(axis=0)
        m2_1 = ((take - mean1) ** 2).sum(axis=0)
        delta, n = mean1 - self.stats[1], n0 + n1
        self.stats[1] += delta * n1 / n
        self.stats[2] += m2_1 + delta ** 2 * n0 * n1 / n
        self.stats[0] = n
        self._scale_cache = None

    def _input(self, z: np.ndarray) -> np.ndarray:
        if self._scale_cache is None:
            n = max(float(self.stats[0, 0]), 1.0)
            std = np.sqrt(self.stats[2] / n) + 1e-3
            scale = self.INPUT_NORM / np.sqrt(len(std)) / std
            self._scale_cache = (self.stats[1].astype(np.float32), scale.astype(np.float32))
        mean, scale = self._scale_cache
        x = np.subtract(z, mean, dtype=np.float32)
        return np.multiply(x, scale, out=x)

    def _hidden(self, x: np.ndarray) -> np.ndarray:
        h = x @ self.w1
        h += self.b1
        return np.maximum(h, 0.0, out=h)

    def _forward(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = self._input(z)
        h = self._hidden(x)
        return x, h, self._output(h)

    def _output(self, h: np.ndarray) -> np.ndarray:
        logits = h @ self.w2.T
        logits += self.b2
        return logits

    def logits(self, z: np.ndarray) -> np.ndarray:
        return self._forward(z)[2]

    def prepare(self, z: np.ndarray) -> np.ndarray:
        """Standardised inputs (what :meth:`logits_prepared` takes)."""
        return self._input(z)

    def logits_prepared(self, x: np.ndarray) -> np.ndarray:
        return self._output(self._hidden(x))

    def input_key(self) -> float:
        """Samples folded into the input statistics (they freeze after the first N)."""
        return float(self.stats[0, 0])

    def clone(self) -> MLPHead:
        """A candidate to train: ``learn`` rebinds the weights, so they are shared, not copied
        (the 400 KB first layer would otherwise be copied on every update); ``see`` updates
        the statistics in place, so they are copied."""
        twin = copy.copy(self)
        twin.steps = []
        if not self.frozen:
            twin.stats = self.stats.copy()
        return twin

    @property
    def frozen(self) -> bool:
        """Whether the input statistics are final (``see`` no longer changes them)."""
        return self.stats[0, 0] >= self.standardize_samples

    def learn(self, z: np.ndarray, y: np.ndarray, lr: float,
              head_rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """One SGD step of class-balanced cross-entropy through both layers.

        ``head_rows``: standardised inputs, hidden activations and logits of the batch's first
        rows, already computed with these very weights and statistics (the learner's
        prequential forward pass), so they are not computed twice; ``z`` then holds the
        latents of the remaining rows only (none when ``head_rows`` covers the batch).
        """
        if head_rows is None:
            x, h, logits = self._forward(z)
        elif not len(z):
            x, h, logits = head_rows[0], head_rows[1], head_rows[2].copy()
        else:
            x_rest = self._input(z)
            x = np.concatenate([head_rows[0], x_rest])
            h = np.concatenate([head_rows[1], self._hidden(x_rest)])
            logits = self._output(h)
        g = _balanced_xent_grad(logits, y)
        gh = g @ self.w2
        np.multiply(gh, h > 0.0, out=gh)  # ReLU' (h is 0 where the unit is off)
        # New arrays, not in-place updates (a clone shares its parent's weights); the first
        # layer's step is scaled and subtracted inside its own gradient buffer, so the 400 KB
        # layer costs one allocation per step, not three.
        step2 = g.T @ h
        step2 *= lr
        self.w2 = np.subtract(self.w2, step2, out=step2)
        self.b2 = self.b2 - lr * g.sum(axis=0)
        step = x.T @ gh
        step *= lr
        self.w1 = np.subtract(self.w1, step, out=step)
        self.steps.append((x, gh, lr))
        self.b1 = self.b1 - lr * gh.sum(axis=0)

    def on_drift(self, window: int) -> None:
        """Nothing to reset: the replay buffer restart does the adapting."""

    def arrays(self) -> dict[str, np.ndarray]:
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2, "stats": self.stats}

    @classmethod
    def from_arrays(cls, dim: int, a: dict[str, np.ndarray], **kwargs: Any) -> MLPHead:
        head = cls(dim, int(a["w1"].shape[1]), **kwargs)
        if a["w1"].shape != (dim, head.b1.shape[0]) or a["stats"].shape != (3, dim) \
                or a["w2"].shape[1:] != (head.b1.shape[0],) or a["b2"].shape != (len(a["w2"]),):
            raise ValueError(f"mlp head arrays do not fit dim={dim}: "
                             f"{ {k: v.shape for k, v in a.items()} }")
        head.w1, head.b1 = a["w1"].astype(np.float32), a["b1"].astype(np.float32)
        head.w2, head.b2 = a["w2"].astype(np.float32), a["b2"].astype(np.float32)
        head.stats = a["stats"].astype(np.float64)
        return head


HEADS = {"softmax": SoftmaxHead, "ncm": NCMHead, "mlp": MLPHead}
Head = SoftmaxHead | NCMHead | MLPHead


def load_head_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read an exported head (``weight`` (C, D), ``bias`` (C,), ``labels`` (C,) strings)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            weight, bias, labels = z["weight"], z["bias"], [str(s) for s in z["labels"]]
    except (OSError, ValueError, KeyError) as exc:
        raise EdgektError(f"{path}: not an exported head (.npz with weight, bias, labels): "
                          f"{exc}") from None
    if weight.ndim != 2 or bias.shape != (len(weight),) or len(labels) != len(weight):
        raise EdgektError(f"{path}: inconsistent head: weight {weight.shape}, bias {bias.shape}, "
                          f"{len(labels)} labels")
    return weight, bias, labels


class _SlotRows:
    """Prepared head inputs of holdout slots, cached per slot (derived, never saved).

    Decoding int8 latents and standardising them cost about as much as the guard's forward
    pass; a slot only changes by ``buffer.add`` (which ``drop`` s it here) and the preparation
    only while the mlp head's input statistics are still being estimated (the head's
    ``input_key``). The rows are kept dense (a dropped row is replaced by the last one), so
    when they hold exactly the slots the guard asks for, it runs on them without a copy.
    They exceed the most holdout slots seen at once by at most 16 (about 620 KB of RAM with
    the pre-activations, beside a 1 MB buffer of 800-d latents and a 128-unit block).
    """

    def __init__(self, capacity: int, dim: int) -> None:
        self.key: float | None = None
        self.row = np.full(capacity, -1, np.int64)  # slot -> row of ``x``, -1: not cached
        self.slots = np.zeros(0, np.int64)  # row -> slot
        self.x = np.empty((0, dim), np.float32)
        self.n = 0
        # The mlp head's first-layer pre-activations ``x @ w1`` of these rows, for the weights
        # ``pre_w1`` (compared by identity: every SGD step makes a new array); ``pre_ok``
        # is False for rows added since. ``approx``: updates since they were last computed
        # exactly (see ``ContinualLearner._guard_logits``).
        self.pre = np.empty((0, 0), np.float32)
        self.pre_ok = np.zeros(0, bool)
        self.pre_w1: np.ndarray | None = None
        self.approx = 0

    def drop(self, slots: np.ndarray) -> None:
        rows = self.row[slots]
        # Highest row first: the last row, moved into a dropped one, is then never dropped.
        for r in sorted(rows[rows >= 0].tolist(), reverse=True):
            last = self.n - 1
            if r != last:
                moved = self.slots[last]
                self.x[r], self.slots[r], self.row[moved] = self.x[last], moved, r
                if len(self.pre):
                    self.pre[r], self.pre_ok[r] = self.pre[last], self.pre_ok[last]
            self.n -= 1
        self.row[slots] = -1

    def get(self, idx: np.ndarray, key: float, prepare: Callable[[np.ndarray], np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray]:
        """(slots, rows) holding the slots of ``idx`` in some order; ``prepare(slots)``
        computes the missing rows. ``rows`` is a view of the cache: read it, do not keep it."""
        if key != self.key:
            self.key, self.n, self.pre_w1 = key, 0, None
            self.row.fill(-1)
        miss = idx[self.row[idx] < 0]
        if len(miss):
            n, m = self.n, len(miss)
            if n + m > len(self.x):
                grow = max(n + m - len(self.x), 16)  # rare: the holdout grows slowly
                self.x = np.concatenate([self.x, np.empty((grow, self.x.shape[1]), np.float32)])
                self.slots = np.concatenate([self.slots, np.zeros(grow, np.int64)])
                self.pre_ok = np.concatenate([self.pre_ok, np.zeros(grow, bool)])
                if len(self.pre):
                    self.pre = np.concatenate(
                        [self.pre, np.empty((grow, self.pre.shape[1]), np.float32)])
            self.x[n:n + m] = prepare(miss)
            self.slots[n:n + m] = miss
            self.pre_ok[n:n + m] = False
            self.row[miss] = np.arange(n, n + m)
            self.n += m
        if self.n == len(idx):  # the rows are exactly the slots asked for
            return self.slots[: self.n], self.x[: self.n]
        rows = self.row[idx]
        return idx, self.x[rows]


# --------------------------------------------------------------------------- learner


class ContinualLearner:
    """Learns new classes and adapts to drift from a labelled stream, on the device.

    Args:
        embedder: the frozen feature extractor (``embed(raw) -> (n, dim)``), e.g. the
            ``EdgeModel`` of an exported embedding model.
        config: hyper-parameters (default :class:`LearnerConfig`).
        state_path: where the state is committed; an existing state there is resumed.
        head_path: exported ``head.npz`` to start from (ignored when a state is resumed).
        dim: embedding size, when it cannot be read from the embedder or the head (otherwise
            it is taken from the first embedded batch).
    """

    def __init__(self, embedder: Embedder | None, config: LearnerConfig | None = None, *,
                 state_path: str | Path | None = None, head_path: str | Path | None = None,
                 dim: int | None = None) -> None:
        self.embedder = embedder
        self.config = config or LearnerConfig()
        self.state_path = (check_writable(state_path, "state file") if state_path is not None
                           else None)
        self.lock_timeout = DEFAULT_TIMEOUT
        self.labels: list[str] = []
        self.label_kind: str | None = None
        self.sample_shape: list[int] | None = None
        self.counters = {"samples": 0, "batches": 0, "rejected": 0, "updates_accepted": 0,
                         "updates_rolled_back": 0, "drift_events": 0, "new_labels": 0}
        self.last_rollback = ""
        self.generation = 0
        self.recovered_from: str | None = None
        self.rng = np.random.default_rng(self.config.seed)
        self.detector: DriftDetector | None = (
            None if self.config.drift == "none"
            else create_detector(self.config.drift, **self.config.drift_args))
        self.head: Head | None = None
        self.buffer: ReplayBuffer | None = None
        # (known classes, prediction per buffer slot or -1): derived, never saved.
        self._pred_cache: tuple[int, np.ndarray] | None = None
        self._candidate_preds: tuple[int, np.ndarray, np.ndarray] | None = None
        self._candidate_pre: tuple[np.ndarray, np.ndarray, int] | None = None
        # Prepared inputs of holdout slots: derived, never saved.
        self._holdout_cache: _SlotRows | None = None
        self.dim = dim or getattr(embedder, "embedding_dim", None)
        state = load_state(self.state_path) if self.state_path is not None else None
        if state is not None:
            self._restore(state)
        elif head_path is not None:
            self._start_from_head(head_path)
        elif self.dim:
            self._allocate(int(self.dim))

    # ----------------------------------------------------------------- set-up

    def _new_head(self, dim: int, arrays: dict[str, np.ndarray] | None = None) -> Head:
        cls = HEADS[self.config.head]
        if cls is MLPHead:
            kw = {"seed": self.config.seed, "standardize_samples": self.config.standardize_samples}
            return (MLPHead(dim, self.config.hidden, **kw) if arrays is None
                    else MLPHead.from_arrays(dim, arrays, **kw))
        return cls(dim) if arrays is None else cls.from_arrays(dim, arrays)

    def _allocate(self, dim: int) -> None:
        self.dim = dim
        self._holdout_cache = None
        self.head = self._new_head(dim)
        self.head.grow(len(self.labels))
        if self.config.buffer_bytes:
            self.buffer = ReplayBuffer(dim, self.config.buffer_bytes, int8=self.config.int8,
                                       holdout_fraction=self.config.holdout_fraction,
                                       max_classes=self.config.max_classes, seed=self.config.seed)

    def _start_from_head(self, path: str | Path) -> None:
        weight, bias, labels = load_head_npz(path)
        if self.config.head != "softmax":
            raise EdgektError(f"{path}: an exported linear head needs head='softmax'")
        if self.config.normalize:
            # The exported head was trained on raw embeddings; normalising would break it.
            log.info("starting from %s: embeddings are not L2-normalised", path)
            self.config = replace(self.config, normalize=False)
        self.labels = labels
        self.label_kind = "str"
        self._allocate(weight.shape[1])
        self.head = SoftmaxHead(weight.shape[1], weight, bias)
        self._pred_cache = None

    # ----------------------------------------------------------------- validation

    def _label_kind(self, label: Any) -> str | None:
        if isinstance(label, (bool, np.bool_)) or label is None:
            return None
        if isinstance(label, (int, np.integer)):
            return "int"
        if isinstance(label, (str, np.str_)):
            return "str"
        return None

    def _as_batch(self, x: Any, y: Any) -> tuple[np.ndarray | None, list[Any], str]:
        """Interpret (x, y) as a batch: a scalar label means one sample."""
        if isinstance(y, (str, int, np.integer, np.str_)) or y is None:
            ys = [y]
            xb = np.asarray(x)[None] if x is not None else None
        else:
            ys = list(y)
            xb = np.asarray(x) if x is not None else None
        if xb is None or xb.ndim < 2 or len(xb) != len(ys):
            n = 0 if xb is None else (len(xb) if xb.ndim else 0)
            return None, ys, (f"{n} inputs for {len(ys)} labels" if xb is not None
                              else "no input")
        return xb, ys, ""

    def _validate(self, x: Any, y: Any) -> tuple[np.ndarray, list[Any], list[int],
                                                  list[tuple[int, str]]]:
        xb, ys, why = self._as_batch(x, y)
        if xb is None:
            return np.zeros(0), [], [], [(i, why) for i in range(max(len(ys), 1))]
        rejected: list[tuple[int, str]] = []
        shape = list(xb.shape[1:])
        if self.sample_shape is not None and shape != self.sample_shape:
            why = f"sample shape {shape} differs from the stream's {self.sample_shape}"
            return xb, ys, [], [(i, why) for i in range(len(ys))]
        if xb.dtype == bool or not np.issubdtype(xb.dtype, np.integer) \
                and not np.issubdtype(xb.dtype, np.floating):
            why = f"input dtype {xb.dtype} is not a real number type"
            return xb, ys, [], [(i, why) for i in range(len(ys))]
        finite = (np.isfinite(xb.reshape(len(xb), -1)).all(axis=1)
                  if np.issubdtype(xb.dtype, np.floating) else np.ones(len(xb), bool))
        kind = self.label_kind
        keep = []
        for i, label in enumerate(ys):
            k = self._label_kind(label)
            if k is None:
                rejected.append((i, "unlabelled" if label is None else
                                 f"label {label!r} is not a str or int"))
            elif kind is not None and k != kind:
                rejected.append((i, f"label type changed mid-stream: {k} label {label!r}, the "
                                    f"stream's labels are {kind}"))
            elif not finite[i]:
                rejected.append((i, "input contains NaN or inf"))
            else:
                kind = kind or k
                keep.append(i)
        return xb, ys, keep, rejected

    # ----------------------------------------------------------------- public API

    def observe(self, x: Any, y: Any) -> ObserveResult:
        """Learn from labelled raw input: one sample (``y`` a scalar label) or a batch."""
        xb, ys, keep, rejected = self._validate(x, y)
        z = None
        if keep:
            if self.embedder is None:
                raise EdgektError("ContinualLearner has no embedder: use observe_embeddings")
            try:
                z = np.asarray(self.embedder.embed(xb[keep]), np.float32)
            except Exception as exc:  # noqa: BLE001 - a runtime error rejects the batch, not the app
                rejected += [(i, f"embedding failed: {exc}") for i in keep]
                keep = []
        result = self._learn(z, [ys[i] for i in keep], keep, rejected)
        if result.accepted and self.sample_shape is None:
            self.sample_shape = list(xb.shape[1:])
        return result

    def observe_embeddings(self, z: np.ndarray, y: Any) -> ObserveResult:
        """Learn from already embedded samples (the host simulator embeds a stream once)."""
        zb, ys, keep, rejected = self._validate(z, y)
        zk = zb[keep].astype(np.float32) if keep else None
        return self._learn(zk, [ys[i] for i in keep], keep, rejected)

    def predict(self, x: Any) -> list[Any]:
        """Labels for a batch of raw inputs (in the stream's label type)."""
        return self.predict_embeddings(np.asarray(self.embedder.embed(np.asarray(x)), np.float32))

    def predict_embeddings(self, z: np.ndarray) -> list[Any]:
        idx = self.predict_indices(z)
        cast = int if self.label_kind == "int" else str
        return [cast(self.labels[i]) for i in idx]

    def predict_indices(self, z: np.ndarray) -> np.ndarray:
        """Class indices (positions in ``self.labels``) for embedded samples."""
        if self.head is None or self.head.num_classes == 0:
            raise EdgektError("ContinualLearner.predict: no label learnt yet; observe first")
        return self.head.logits(self._prep(np.asarray(z, np.float32))).argmax(axis=1)

    # ----------------------------------------------------------------- learning

    def _prep(self, z: np.ndarray) -> np.ndarray:
        # The mlp head standardises its inputs itself (per dimension, from the stream's start).
        if self.config.normalize and self.config.head != "mlp":
            z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        return z

    def _learn(self, z: np.ndarray | None, labels: list[Any], keep: list[int],
               rejected: list[tuple[int, str]]) -> ObserveResult:
        res = ObserveResult(rejected=rejected)
        if z is not None and self.dim is None:
            self._allocate(z.shape[1] if z.ndim == 2 else 0)
        if z is not None:
            bad = (f"embedding is not (n, dim={self.dim})"
                   if z.ndim != 2 or z.shape[1] != self.dim else "")
            ok = np.isfinite(z).all(axis=1) if not bad else np.zeros(len(keep), bool)
            for j in np.flatnonzero(~ok):
                res.rejected.append((keep[j], bad or "embedding contains NaN or inf"))
            if not bad:
                z, labels = z[ok], [lab for lab, o in zip(labels, ok, strict=True) if o]
                keep = [k for k, o in zip(keep, ok, strict=True) if o]
            else:
                z, labels, keep = None, [], []
        if res.rejected:
            self.counters["rejected"] += len(res.rejected)
            log.warning("rejected %d sample(s): %s", len(res.rejected), res.rejected[0][1])
        if z is not None and len(labels):
            # process_time, not thread_time: the latter is a slow syscall on some VMs (43 us
            # here); the head's BLAS runs on one thread, so the two agree.
            c0 = time.process_time()
            t0 = time.perf_counter()
            self._update(self._prep(z), labels, keep, res)
            res.update_ms = (time.perf_counter() - t0) * 1e3
            res.update_cpu_ms = (time.process_time() - c0) * 1e3
        self.counters["batches"] += 1
        if self.config.save_every and self.state_path is not None \
                and self.counters["batches"] % self.config.save_every == 0:
            self.save()
        return res

    def _class_indices(self, labels: list[Any], res: ObserveResult) -> np.ndarray:
        """Class index per label, new labels appended; -1 where the label table is full."""
        if self.label_kind is None:
            self.label_kind = self._label_kind(labels[0])
        index = {name: i for i, name in enumerate(self.labels)}
        out = []
        for label in labels:
            key = str(label)
            if key not in index:
                if len(self.labels) >= self.config.max_classes:
                    out.append(-1)
                    continue
                index[key] = len(self.labels)
                self.labels.append(key)
                res.new_labels.append(key)
            out.append(index[key])
        return np.array(out, np.int64)

    def _update(self, z: np.ndarray, labels: list[Any], positions: list[int],
                res: ObserveResult) -> None:
        assert self.head is not None
        known_before = len(self.labels)
        y = self._class_indices(labels, res)
        self.counters["new_labels"] += len(res.new_labels)
        if (y < 0).any():
            # A class cannot be evicted without forgetting acknowledged samples, so a label
            # beyond max_classes is refused (the app sees why) and the batch's other samples
            # are learnt as usual.
            why = (f"label table full: max_classes={self.config.max_classes} labels are known "
                   "(create the learner with a larger max_classes)")
            full = np.flatnonzero(y < 0)
            res.rejected += [(positions[j], why) for j in full]
            self.counters["rejected"] += len(full)
            log.warning("rejected %d sample(s): %s", len(full), why)
            z, y = z[y >= 0], y[y >= 0]
            if not len(y):
                return
        self.head.grow(len(self.labels))
        res.accepted = len(y)
        self.counters["samples"] += len(y)
        # Drawn before the prequential pass (the detector draws no random numbers, so these
        # are the same draws): the mlp head's forward pass then covers both at once.
        replay = [self.buffer.sample(self.config.replay_batch)
                  if self.buffer is not None and self.config.replay_batch
                  and self.head.kind != "ncm" else None for _ in range(self.config.steps)]
        # Prequential errors: how the current head does on samples it has not learnt yet.
        head_rows = None
        if known_before:
            if isinstance(self.head, MLPHead):
                # One pass over the new samples and the first replay draw: its rows of the
                # new samples are the prequential test, all its rows the first SGD step's
                # forward pass (same inputs, same weights).
                z_all = z if replay[0] is None else np.concatenate([z, replay[0][0]])
                x_all, h_all, logits_all = self.head._forward(z_all)
                logits = logits_all[: len(z)]
                head_rows = (x_all, h_all, logits_all, self.head.input_key())
            else:
                logits = self.head.logits(z)
            wrong = logits.argmax(axis=1) != y
            res.errors = int(wrong.sum())
            if self.detector is not None:
                res.drift = self.detector.update_many(wrong.tolist())
        if res.drift:
            self.counters["drift_events"] += 1
            log.info("drift detected after %d samples: restarting the replay reservoir",
                     self.counters["samples"])
            self.head.on_drift(self.config.ncm_window)
            self._pred_cache = None
            if self.buffer is not None:
                self.buffer.restart_reservoir()
        # A rejected step is retried with a 4x smaller learning rate (guard_backoff times):
        # a new class's first steps may disturb the known ones at full rate but not at a
        # smaller one, while a harmful batch stays harmful at any rate.
        self._candidate_preds = None
        for attempt in range(self.config.guard_backoff + 1):
            self._candidate_preds = self._candidate_pre = None
            candidate = self.head.clone()
            candidate.see(z)
            lr = self.config.lr / 4 ** attempt
            for step, extra in enumerate(replay):
                ys = y if extra is None else np.concatenate([y, extra[1]])
                if step == 0 and head_rows is not None \
                        and head_rows[3] == candidate.input_key():
                    candidate.learn(z[:0], ys, lr, head_rows=head_rows[:3])
                else:
                    candidate.learn(z if extra is None else np.concatenate([z, extra[0]]),
                                    ys, lr)
            reason = self._judge(candidate, known_before)
            if not reason:
                break
        if reason:
            res.rolled_back, res.reason = True, reason
            self.last_rollback = reason
            self.counters["updates_rolled_back"] += 1
            log.warning("update rolled back: %s", reason)
            return  # the batch is not stored either: replaying it would redo the damage
        self.head = candidate
        if self._candidate_pre is not None and self._holdout_cache is not None:
            # The guard's pre-activations are the new head's: keep them for the next guard.
            pre, w1, approx = self._candidate_pre
            cache = self._holdout_cache
            cache.pre[: len(pre)], cache.pre_ok[: len(pre)] = pre, True
            cache.pre_w1, cache.approx = w1, approx
        if self._candidate_preds is not None and self.buffer is not None:
            # The guard has just computed the new head's predictions on these holdout slots.
            known, idx, preds = self._candidate_preds
            cache = self._pred_cache[1] if self._pred_cache is not None \
                else np.empty(self.buffer.capacity, np.int16)
            cache.fill(-1)
            cache[idx] = preds
            self._pred_cache = (known, cache)
        else:
            self._pred_cache = None
        res.updated = True
        self.counters["updates_accepted"] += 1
        if self.buffer is not None:
            self.buffer.add(z, y)
            written = self.buffer.last_written
            if self._pred_cache is not None:
                self._pred_cache[1][written] = -1
            if self._holdout_cache is not None:
                self._holdout_cache.drop(written)

    def _holdout_inputs(self, head: Head, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slots, ``head.prepare`` of their latents) for holdout slots ``idx``, cached."""
        assert self.buffer is not None
        if self._holdout_cache is None:
            self._holdout_cache = _SlotRows(self.buffer.capacity, self.dim or 0)
        buffer = self.buffer
        return self._holdout_cache.get(idx, head.input_key(),
                                       lambda miss: head.prepare(buffer._decode(miss)))

    def _holdout_predictions(self, idx: np.ndarray, known: int) -> np.ndarray:
        """The current head's predictions among ``known`` classes on holdout slots ``idx``.

        Cached per slot: the head only changes by accepting a candidate, whose predictions the
        guard has just computed, and a slot only by ``buffer.add``. This halves the guard's
        cost (the mlp head's update budget is 2 ms).
        """
        assert self.buffer is not None and self.head is not None
        if self._pred_cache is None or self._pred_cache[0] != known:
            self._pred_cache = (known, np.full(self.buffer.capacity, -1, np.int16))
        preds = self._pred_cache[1]
        out = preds[idx]
        todo = idx[out < 0]
        if len(todo):
            preds[todo] = self.head.logits(self.buffer._decode(todo))[:, :known].argmax(axis=1)
            out = preds[idx]
        return out

    # Exact first-layer pre-activations of the holdout rows at least this often (updates).
    EXACT_EVERY = 32

    def _guard_logits(self, candidate: Head, slots: np.ndarray, xh: np.ndarray) -> np.ndarray:
        """The candidate's logits on the holdout rows ``xh`` (of ``slots``).

        For the mlp head after one SGD step from the current head, the first layer moved by
        ``-lr * x.T @ gh`` (x: the step's 64 inputs), so its pre-activations on the holdout
        rows are the current head's (cached per row) minus ``lr * (xh @ x.T) @ gh``: fewer
        multiply-adds than ``xh @ w1`` when the hidden layer is wider than the batch (half at
        128 units and 64 rows; at 64 units the direct product is used). It equals the direct
        product up to float32 rounding (about 1e-6 relative, re-anchored by an exact product
        every ``EXACT_EVERY`` updates), which can flip only a prediction tied to that precision.
        """
        cache = self._holdout_cache
        if not isinstance(candidate, MLPHead) or cache is None or len(slots) != cache.n \
                or not np.shares_memory(xh, cache.x):
            return candidate.logits_prepared(xh)
        head, n = self.head, len(slots)
        assert isinstance(head, MLPHead)
        if len(cache.pre) != len(cache.x):
            cache.pre = np.empty((len(cache.x), len(candidate.b1)), np.float32)
            cache.pre_ok[:] = False
        x_rows = len(candidate.steps[0][0]) if len(candidate.steps) == 1 else 0
        dim, hidden = xh.shape[1], len(candidate.b1)
        # Cheaper only when the hidden layer is wider than about the step's batch (x_rows):
        # n*dim*hidden multiply-adds against n*x_rows*(dim + hidden).
        if cache.pre_w1 is head.w1 and 0 < x_rows * (dim + hidden) < dim * hidden \
                and cache.approx < self.EXACT_EVERY:
            todo = np.flatnonzero(~cache.pre_ok[:n])
            if len(todo):  # rows new since the last update: their current pre-activations
                cache.pre[todo] = xh[todo] @ head.w1
                cache.pre_ok[todo] = True
            x, gh, lr = candidate.steps[0]
            pre = (xh @ x.T) @ gh
            pre *= -lr
            pre += cache.pre[:n]
            approx = cache.approx + 1
        else:
            pre, approx = xh @ candidate.w1, 0
        self._candidate_pre = (pre, candidate.w1, approx)
        h = pre + candidate.b1
        return candidate._output(np.maximum(h, 0.0, out=h))

    def _judge(self, candidate: Head, known_before: int) -> str:
        """Empty if the candidate may replace the head, else why not."""
        params = candidate.arrays().values()
        if not all(np.isfinite(a).all() for a in params):
            return "candidate head has NaN/inf weights"
        if not self.config.guard or self.buffer is None or not known_before:
            return ""
        size, labels = self.buffer.size, self.buffer.labels
        idx = np.flatnonzero(self.buffer.holdout[:size] & (labels[:size] < known_before))
        if len(idx) < self.config.guard_min_holdout:
            return ""
        # Accuracy among the known classes only: a new class must be allowed to take its
        # share of the predictions (that is learning it), but not to blur the known ones.
        idx, xh = self._holdout_inputs(candidate, idx)
        yh = labels[idx]
        pred_after = self._guard_logits(candidate, idx, xh)[:, :known_before].argmax(axis=1)
        before = float((self._holdout_predictions(idx, known_before) == yh).mean())
        after = float((pred_after == yh).mean())
        self._candidate_preds = (known_before, idx, pred_after)
        if after < before - self.config.guard_tolerance:
            return (f"holdout accuracy among the {known_before} known classes would drop from "
                    f"{before:.3f} to {after:.3f} (tolerance {self.config.guard_tolerance})")
        return ""

    # ----------------------------------------------------------------- state

    def save(self) -> int:
        """Commit the whole state atomically; returns the generation written."""
        if self.state_path is None:
            raise EdgektError("ContinualLearner.save: no state_path was given")
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {
            "format": STATE_FORMAT, "config": asdict(self.config), "labels": self.labels,
            "label_kind": self.label_kind, "sample_shape": self.sample_shape, "dim": self.dim,
            "counters": self.counters, "last_rollback": self.last_rollback,
            "rng": self.rng.bit_generator.state,
        }
        if self.head is not None:
            arrays.update({f"head/{k}": v for k, v in self.head.arrays().items()})
        if self.buffer is not None:
            a, m = self.buffer.get_state()
            arrays.update({f"buffer/{k}": v for k, v in a.items()})
            meta["buffer"] = m
        if self.detector is not None:
            a, m = self.detector.get_state()
            arrays.update({f"drift/{k}": v for k, v in a.items()})
            meta["drift"] = m
        state = State(arrays, meta, self.generation)
        with state_lock(self.state_path, self.lock_timeout):
            # A learner's state is one whole model: another process's commit cannot be merged
            # into it, and overwriting it would lose that process's learning without a word.
            on_disk = load_state(self.state_path)
            if on_disk is not None and on_disk.generation != self.generation:
                raise EdgektError(
                    f"{self.state_path} holds generation {on_disk.generation}, written by another "
                    f"learner since this one loaded generation {self.generation}; refusing to "
                    "overwrite it. One learner (one process) should own a state file.")
            self.generation = save_state(self.state_path, state)
        return self.generation

    def _restore(self, state: State) -> None:
        try:
            self._restore_unchecked(state)
        except EdgektError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            # A checksummed file that is not a learner state (another tool's, or another
            # version's): refuse it by name rather than start empty over it.
            raise StateCorruptError(
                f"{self.state_path}: not a valid continual-learner state ({type(exc).__name__}: "
                f"{exc}); move it away to start afresh") from None

    def _restore_unchecked(self, state: State) -> None:
        meta = state.meta
        if meta.get("format") != STATE_FORMAT:
            raise EdgektError(f"{self.state_path}: state format {meta.get('format')}, "
                              f"this edgekt reads {STATE_FORMAT}")
        saved = meta["config"]
        changed = [k for k in LearnerConfig.STRUCTURAL if saved.get(k) != asdict(self.config)[k]]
        if changed:
            was = ", ".join(f"{k}={saved[k]!r}" for k in changed)
            now = ", ".join(f"{k}={getattr(self.config, k)!r}" for k in changed)
            raise EdgektError(f"{self.state_path}: saved with {was}; this learner has {now}. Use "
                              "the saved settings, or move the state file away to start afresh.")
        self.labels, self.label_kind = list(meta["labels"]), meta["label_kind"]
        self.sample_shape, self.counters = meta["sample_shape"], dict(meta["counters"])
        self.last_rollback = meta["last_rollback"]
        self.rng.bit_generator.state = meta["rng"]
        self.generation = state.generation
        self.recovered_from = meta.get("_recovered_from")
        part = {p: {k.split("/", 1)[1]: v for k, v in state.arrays.items() if k.startswith(p + "/")}
                for p in ("head", "buffer", "drift")}
        if meta["dim"] is not None:
            self._allocate(int(meta["dim"]))
            self.head = self._new_head(self.dim, part["head"])
            if self.buffer is not None:
                self.buffer.set_state(part["buffer"], meta["buffer"])
            self._pred_cache = None
            self._holdout_cache = None
        if self.detector is not None and "drift" in meta:
            self.detector.set_state(part["drift"], meta["drift"])
        log.info("resumed continual state generation %d from %s (%d labels, %d samples)",
                 self.generation, self.state_path, len(self.labels), self.counters["samples"])

    @property
    def memory_bytes(self) -> int:
        """Bytes of the learnable state: head parameters plus the replay buffer."""
        head = sum(a.nbytes for a in self.head.arrays().values()) if self.head else 0
        return head + (self.buffer.nbytes if self.buffer is not None else 0)


__all__ = ["ContinualLearner", "Embedder", "LearnerConfig", "NCMHead", "ObserveResult",
           "SoftmaxHead", "load_head_npz"]
