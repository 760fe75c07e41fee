"""Where a request's work runs: on the event loop when it is short, in a worker thread if not.

Handing a call to a worker thread and back costs two thread wake-ups, a GIL hand-over and
anyio's bookkeeping. Measured on the serve benchmark's 0.1 ms student (2 shared cores, an
ASGI call without sockets): 1.2 ms of CPU per prediction through the thread pool against
0.57 ms on the loop. For such a model the hop is most of the request. A 20 ms model, on the
other hand, must not block the loop: every other request would wait behind it.

:class:`Offload` times every call (wall clock: the time it would block the loop) and keeps the
last few per kind of call. While the shortest of them is under the budget and the input is
small, the next call runs on the loop, otherwise in a worker thread. The shortest, not the
mean: on a busy machine the scheduler preempts calls at random and inflates their mean, but
never makes a call faster than its work, so the minimum tracks the call's own cost. The first
call of each kind runs in a thread, so an unknown cost never blocks the loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")


class Offload:
    """Run a call inline or in a worker thread by its recent cost.

    Args:
        budget_ms: longest average call run on the event loop (0: always a worker thread).
        max_inline_bytes: larger request bodies always go to a thread (a big photo's decode
            can take tens of ms even when the model is fast).
        window: how many recent calls of a kind are remembered.
    """

    def __init__(self, budget_ms: float = 2.0, max_inline_bytes: int = 256 * 1024,
                 window: int = 16) -> None:
        self.budget_s = budget_ms / 1e3
        self.max_inline_bytes = max_inline_bytes
        self.window = window
        self.recent_s: dict[str, deque[float]] = {}
        self.counts = {"inline": 0, "thread": 0}

    def inline(self, kind: str, nbytes: int | None) -> bool:
        """Whether the next ``kind`` call with a body of ``nbytes`` runs on the loop."""
        recent = self.recent_s.get(kind)
        return (bool(recent) and min(recent) < self.budget_s  # type: ignore[arg-type]
                and nbytes is not None and nbytes <= self.max_inline_bytes)

    async def run(self, kind: str, fn: Callable[[], T], *, nbytes: int | None) -> T:
        """``fn()`` on the loop or in a worker thread; its duration is remembered."""
        def timed() -> tuple[T, float]:
            t0 = time.perf_counter()
            return fn(), time.perf_counter() - t0

        if self.inline(kind, nbytes):
            self.counts["inline"] += 1
            result, seconds = timed()
        else:
            self.counts["thread"] += 1
            result, seconds = await run_in_threadpool(timed)
        # Recorded here, on the loop: a worker appending while the loop reads the window
        # would be a race.
        recent = self.recent_s.get(kind)
        if recent is None:
            recent = self.recent_s[kind] = deque(maxlen=self.window)
        recent.append(seconds)
        return result

__all__ = ["Offload"]
