"""Kill trials: SIGKILL a learning process at random moments and check its state survives.

A child process (``python -m edgekt.continual.crash STATE SEED HEAD``) resumes the learner from
``STATE``, reports the generation it loaded, then observes batches forever, committing the
state after every batch and reporting each committed generation. The parent kills it at a
random moment (often in the middle of a save) and starts the next child. Checked per trial:
the state loads, its generation is never below the last one reported committed, and its
content matches its generation (``counters['batches'] == generation``: no torn state), and
head, label table and buffer agree with each other.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHILD_DIM_IN, CHILD_DIM, CHILD_CLASSES = 32, 24, 6


class _Projection:
    """A fixed random projection standing in for the exported embedder (no runtime needed)."""

    embedding_dim = CHILD_DIM

    def __init__(self) -> None:
        rng = np.random.default_rng(1234)
        self.weight = rng.normal(size=(CHILD_DIM_IN, CHILD_DIM)).astype(np.float32)

    def embed(self, raw: np.ndarray) -> np.ndarray:
        return np.asarray(raw, np.float32).reshape(len(raw), -1) @ self.weight


def child(state_path: str, seed: int, head: str = "softmax") -> None:
    from edgekt.devices.continual import ContinualLearner, LearnerConfig

    lr = 0.1 if head == "mlp" else 0.5
    cfg = LearnerConfig(head=head, lr=lr, hidden=32, standardize_samples=256,
                        buffer_bytes=64_000, int8=True, save_every=1, drift="adwin")
    learner = ContinualLearner(_Projection(), cfg, state_path=state_path)
    print(f"loaded {learner.generation} {learner.counters['batches']} "
          f"{int(learner.recovered_from is not None)} {int(_consistent(learner))}", flush=True)
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).normal(size=(CHILD_CLASSES, CHILD_DIM_IN)) * 2
    while True:
        y = rng.integers(CHILD_CLASSES, size=16)
        x = (centers[y] + rng.normal(size=(16, CHILD_DIM_IN))).astype(np.float32)
        learner.observe(x, [f"class-{c}" for c in y])
        print(f"committed {learner.generation}", flush=True)


def _consistent(learner) -> bool:
    """Head rows, label table and buffered labels agree (no half-written learner state)."""
    if learner.head is None:
        return learner.generation == 0
    buf = learner.buffer
    stored = buf.labels[: buf.size] if buf is not None else []
    return (learner.head.num_classes == len(learner.labels)
            and all(0 <= c < len(learner.labels) for c in stored)
            and all(np.isfinite(a).all() for a in learner.head.arrays().values()))


@dataclass
class KillReport:
    trials: int
    final_generation: int = 0
    fallbacks: int = 0
    """Restarts that had to use the ``.prev`` generation (allowed, but reported)."""
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0


def kill_trials(n: int, workdir: str | Path, *, seed: int = 0, max_delay_s: float = 0.15,
                head: str = "softmax") -> KillReport:
    """Run ``n`` start/SIGKILL cycles of the learning child (with ``head``) on one state file."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    path = Path(workdir) / "continual_state.npz"
    rng = np.random.default_rng(seed)
    report = KillReport(n)
    committed = 0
    t0 = time.perf_counter()
    for trial in range(n + 1):  # the last start only verifies what the last kill left
        proc = subprocess.Popen([sys.executable, "-m", "edgekt.continual.crash", str(path),
                                 str(seed * 100_000 + trial), head], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline().split()
        if len(first) != 5 or first[0] != "loaded":
            proc.kill()
            err = proc.communicate()[1]
            report.violations.append(f"trial {trial}: child failed to load: {err.strip()[-300:]}")
            break
        gen, batches, recovered = int(first[1]), int(first[2]), int(first[3])
        report.fallbacks += recovered
        if first[4] != "1":
            report.violations.append(f"trial {trial}: head, labels and buffer disagree")
        if gen < committed:
            report.violations.append(f"trial {trial}: loaded generation {gen} < committed "
                                     f"{committed}")
        if batches != gen:
            report.violations.append(f"trial {trial}: generation {gen} holds {batches} batches")
        committed = max(committed, gen)
        if trial == n:
            proc.kill()
            proc.communicate()
            report.final_generation = gen
            break
        time.sleep(rng.uniform(0.0, max_delay_s))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        lines = out.split("\n")[:-1]  # complete lines only
        done = [int(line.split()[1]) for line in lines if line.startswith("committed ")]
        committed = max([committed, *done])
    report.seconds = time.perf_counter() - t0
    return report


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
