"""Drift detectors for the device: Page-Hinkley and ADWIN, in plain Python/numpy.

Both follow the published algorithms and the conventions of river (``river.drift``) so a
test can compare detections on the same sequences: ``update(x)`` returns whether a drift was
signalled at ``x``, and the detector starts afresh on the value after a detection (as river
does). Each detector turns its full state into arrays + JSON-able meta (``get_state``) so
``ContinualLearner`` can commit it with ``edgekt.devices.state`` and resume mid-stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from edgekt.errors import EdgektError
from edgekt.registry import Registry

DETECTORS: Registry = Registry("drift detector")


class DriftDetector:
    """Interface: feed one value at a time (a per-sample loss or 0/1 error)."""

    name = ""

    def update(self, x: float) -> bool:
        """Add ``x``; True when a change is detected at this value."""
        raise NotImplementedError

    def update_many(self, xs: Iterable[float]) -> bool:
        """Add the values in order; True when a change was detected at any of them."""
        detected = False
        for x in xs:
            detected |= self.update(x)
        return detected

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, meta) that :meth:`set_state` restores exactly."""
        raise NotImplementedError

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        raise NotImplementedError


@DETECTORS.register("page-hinkley")
class PageHinkley(DriftDetector):
    """Page-Hinkley test (Page 1954) on a fading mean; two-sided by default.

    Args:
        min_instances: values seen before any detection.
        delta: tolerated change of the mean.
        threshold: detection threshold (lambda); for 0/1 error streams use a few units.
        alpha: forgetting factor of the cumulative sums.
        mode: "up" (only increases of the monitored value), "down" or "both".
    """

    name = "page-hinkley"

    def __init__(self, min_instances: int = 30, delta: float = 0.005, threshold: float = 50.0,
                 alpha: float = 1 - 0.0001, mode: str = "both") -> None:
        if mode not in ("up", "down", "both"):
            raise EdgektError(f"PageHinkley mode {mode!r}: expected 'up', 'down' or 'both'")
        self.min_instances, self.delta, self.threshold = min_instances, delta, threshold
        self.alpha, self.mode = alpha, mode
        self.drift_detected = False
        self._reset()

    def _reset(self) -> None:
        self.n = 0.0
        self.mean = 0.0
        self.sum_inc = 0.0
        self.sum_dec = 0.0
        self.min_inc = math.inf
        self.max_dec = -1.0

    def update(self, x: float) -> bool:
        if self.drift_detected:
            self._reset()
        x = float(x)
        self.n += 1.0
        self.mean += (x - self.mean) / self.n
        dev = x - self.mean
        self.sum_inc = self.alpha * self.sum_inc + dev - self.delta
        self.sum_dec = self.alpha * self.sum_dec + dev + self.delta
        self.min_inc = min(self.min_inc, self.sum_inc)
        self.max_dec = max(self.max_dec, self.sum_dec)
        detected = False
        if self.n >= self.min_instances:
            up = self.sum_inc - self.min_inc > self.threshold
            down = self.max_dec - self.sum_dec > self.threshold
            detected = {"up": up, "down": down, "both": up or down}[self.mode]
        self.drift_detected = detected
        return detected

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        values = [self.n, self.mean, self.sum_inc, self.sum_dec, self.min_inc, self.max_dec]
        return {"values": np.array(values, np.float64)}, {"drift_detected": self.drift_detected}

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        (self.n, self.mean, self.sum_inc, self.sum_dec, self.min_inc,
         self.max_dec) = (float(v) for v in arrays["values"])
        self.drift_detected = bool(meta["drift_detected"])


@DETECTORS.register("adwin")
class ADWIN(DriftDetector):
    """ADWIN2 adaptive windowing (Bifet & Gavaldà 2007) with exponential-histogram buckets.

    Level ``i`` holds up to ``max_buckets`` summaries (sum, variance) of ``2**i`` values each,
    oldest first; when a level overflows its two oldest summaries merge into the next level.
    Every ``clock`` values all cut points are tested; a cut whose sub-window means differ by
    more than the Hoeffding/Bernstein bound drops the oldest bucket and signals drift.
    """

    name = "adwin"

    def __init__(self, delta: float = 0.002, clock: int = 32, max_buckets: int = 5,
                 min_window_length: int = 5, grace_period: int = 10) -> None:
        self.delta, self.clock, self.max_buckets = delta, clock, max_buckets
        self.min_window_length, self.grace_period = float(min_window_length), float(grace_period)
        self.drift_detected = False
        self._reset()

    def _reset(self) -> None:
        self.total = 0.0
        self.variance = 0.0
        self.width = 0.0
        self.tick = 0
        # levels[i] = list of [sum, variance] summaries of 2**i values, oldest first.
        self.levels: list[list[list[float]]] = [[]]

    @property
    def estimation(self) -> float:
        return self.total / self.width if self.width else 0.0

    def update(self, x: float) -> bool:
        if self.drift_detected:
            self._reset()
        self._insert(float(x))
        self.drift_detected = self._detect()
        return self.drift_detected

    def update_many(self, xs: Iterable[float]) -> bool:
        """As ``update`` on each value, the same arithmetic in the same order, with the
        per-value work inlined on local variables (this runs on every batch of the device
        learner); the cut-point scan still runs every ``clock`` values."""
        detected = False
        clock, grace, full = self.clock, self.grace_period, self.max_buckets + 1
        levels, width, total = self.levels, self.width, self.total
        variance, tick, drift = self.variance, self.tick, self.drift_detected
        for x in xs:
            if drift:
                self._reset()
                levels, width, total, variance, tick = self.levels, 0.0, 0.0, 0.0, 0
            x = float(x)
            level0 = levels[0]
            level0.append([x, 0.0])
            width += 1.0
            if width > 1.0:
                d = x - total / (width - 1.0)
                variance += (width - 1.0) * d * d / width
            total += x
            if len(level0) == full:  # _compress's first merge, inlined (2**0 values a bucket)
                (t0, v0), (t1, v1) = level0[0], level0[1]
                d = t0 - t1
                if len(levels) == 1:
                    levels.append([])
                levels[1].append([t0 + t1, v0 + v1 + 0.5 * d * d])
                del level0[:2]
                if len(levels[1]) == full:
                    self._compress(1)
            tick += 1
            if tick % clock or width <= grace:
                drift = False
                continue
            self.width, self.total, self.variance, self.tick = width, total, variance, tick - 1
            drift = self._detect()  # counts this value's tick itself; may drop buckets
            detected |= drift
            levels, width, total = self.levels, self.width, self.total
            variance, tick = self.variance, self.tick
        self.width, self.total, self.variance, self.tick = width, total, variance, tick
        self.drift_detected = drift
        return detected

    def _insert(self, x: float) -> None:
        self.levels[0].append([x, 0.0])
        self.width += 1.0
        if self.width > 1.0:
            d = x - self.total / (self.width - 1.0)
            self.variance += (self.width - 1.0) * d * d / self.width
        self.total += x
        self._compress()

    def _compress(self, i: int = 0) -> None:
        """Merge the two oldest buckets of each full level into the next, from level ``i``."""
        while len(self.levels[i]) == self.max_buckets + 1:
            (t0, v0), (t1, v1) = self.levels[i][0], self.levels[i][1]
            n = float(2 ** i)
            m0, m1 = t0 / n, t1 / n
            merged = [t0 + t1, v0 + v1 + n * 0.5 * (m0 - m1) * (m0 - m1)]
            if i + 1 == len(self.levels):
                self.levels.append([])
            self.levels[i + 1].append(merged)
            del self.levels[i][:2]
            if len(self.levels[i + 1]) <= self.max_buckets:
                break
            i += 1

    def _drop_oldest(self) -> None:
        last = len(self.levels) - 1
        n = float(2 ** last)
        u, v = self.levels[last][0]
        self.width -= n
        self.total -= u
        mu, mu_w = u / n, self.total / self.width
        self.variance -= v + n * self.width * (mu - mu_w) * (mu - mu_w) / (n + self.width)
        del self.levels[last][0]
        if not self.levels[last] and last > 0:
            self.levels.pop()

    def _detect(self) -> bool:
        self.tick += 1
        if self.tick % self.clock or self.width <= self.grace_period:
            return False
        detected, shrink = False, True
        m = self.min_window_length
        while shrink:
            shrink = False
            n0, n1, u0, u1 = 0.0, self.width, 0.0, self.total
            # Hoeffding/Bernstein bound; its window terms are hoisted out of the scan (this
            # loop runs in the device learner's update, on every batch).
            delta_prime = math.log(2.0 * math.log(self.width) / self.delta)
            var_w, dp23 = self.variance / self.width, 2.0 / 3.0 * delta_prime
            # Scan cut points from the oldest bucket to the newest (the newest is never a cut).
            for i in range(len(self.levels) - 1, -1, -1):
                size = float(2 ** i)
                level = self.levels[i]
                last = len(level) - 1 if i == 0 else -1
                for k, (t, _) in enumerate(level):
                    n0 += size
                    n1 -= size
                    u0 += t
                    u1 -= t
                    if k == last:
                        break
                    if n1 >= m and n0 >= m:
                        m_recip = 1.0 / (n0 - m + 1.0) + 1.0 / (n1 - m + 1.0)
                        eps = math.sqrt(2.0 * m_recip * var_w * delta_prime) + dp23 * m_recip
                        if abs(u0 / n0 - u1 / n1) > eps:
                            shrink = detected = True
                            if self.width > 0:
                                self._drop_oldest()
                            break
                if shrink:
                    break
        return detected

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        rows = [(i, t, v) for i, level in enumerate(self.levels) for t, v in level]
        buckets = np.array(rows, np.float64).reshape(-1, 3)
        meta = {"drift_detected": self.drift_detected, "tick": self.tick,
                "n_levels": len(self.levels)}
        return {"scalars": np.array([self.total, self.variance, self.width]),
                "buckets": buckets}, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.total, self.variance, self.width = (float(v) for v in arrays["scalars"])
        self.levels = [[] for _ in range(int(meta["n_levels"]))]
        for i, t, v in arrays["buckets"]:
            self.levels[int(i)].append([float(t), float(v)])
        self.tick = int(meta["tick"])
        self.drift_detected = bool(meta["drift_detected"])


def create_detector(name: str, **kwargs: Any) -> DriftDetector:
    """A registered detector by name (``page-hinkley`` or ``adwin``) with its parameters."""
    try:
        return DETECTORS.get(name)(**kwargs)
    except TypeError as exc:
        raise EdgektError(f"drift detector {name!r}: bad parameters {kwargs} ({exc})") from None
