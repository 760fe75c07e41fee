"""One writer at a time for device state, across real processes (torch-free, so they start fast)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edgekt.devices.fewshot import PrototypeClassifier
from edgekt.devices.lock import StateLockedError, lock_path, state_lock
from edgekt.errors import EdgektError

EMBEDDER = """
import numpy as np

class Embedder:
    def embed(self, raw):
        return np.asarray(raw, np.float64).reshape(len(raw), -1)[:, :4]
"""

FEWSHOT_WORKER = EMBEDDER + """
import sys, time
from pathlib import Path
from edgekt.devices import PrototypeClassifier

state, worker, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
clf = PrototypeClassifier(Embedder(), state)  # opened once, like a long-running app
while not go.exists():
    time.sleep(0.001)
for i in range(n):
    clf.enroll(f"w{worker}-{i}", np.full((2, 2, 2), i, np.uint8))
"""

CONTINUAL_WORKER = """
import sys, time
from pathlib import Path
import numpy as np
from edgekt.devices import ContinualLearner, EdgektError, LearnerConfig

state, worker, ready, go = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
learner = ContinualLearner(None, LearnerConfig(buffer_bytes=10_000), state_path=state, dim=4)
learner.observe_embeddings(np.random.default_rng(int(worker)).normal(size=(8, 4)), ["a", "b"] * 4)
ready.touch()
while not go.exists():
    time.sleep(0.001)
try:
    learner.save()
    print("saved")
except EdgektError as exc:
    print("refused:", exc)
"""


def _spawn(code: str, *args: object) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


class _Embedder:
    def embed(self, raw):
        return np.asarray(raw, np.float64).reshape(len(raw), -1)[:, :4]


def test_concurrent_enrollments_from_processes_are_all_kept(tmp_path):
    state, go = tmp_path / "state.npz", tmp_path / "go"
    workers, per_worker = 3, 25
    procs = [_spawn(FEWSHOT_WORKER, state, w, per_worker, go) for w in range(workers)]
    time.sleep(1.0)  # let every worker open the (empty) state before any enrolls
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    clf = PrototypeClassifier(_Embedder(), state)
    expected = {f"w{w}-{i}" for w in range(workers) for i in range(per_worker)}
    assert set(clf.labels()) == expected  # no enrollment lost
    assert all(clf.shots(label) == 2 for label in expected)
    assert clf.generation == workers * per_worker  # every change committed exactly once


def test_a_held_lock_gives_a_clear_message_naming_the_holder(tmp_path):
    state = tmp_path / "state.npz"
    clf = PrototypeClassifier(_Embedder(), state, lock_timeout=0.2)
    clf.enroll("a", np.zeros((1, 2, 2, 2), np.uint8))
    with state_lock(state):  # another writer (a second open file description) holds it
        t0 = time.monotonic()
        with pytest.raises(StateLockedError, match=f"pid {os.getpid()}") as info:
            clf.enroll("b", np.ones((1, 2, 2, 2), np.uint8))
        assert time.monotonic() - t0 < 5
    assert str(state) in str(info.value) and str(lock_path(state)) in str(info.value)
    assert clf.labels() == ["a"]  # the refused change changed nothing
    clf.enroll("b", np.ones((1, 2, 2, 2), np.uint8))  # released: it goes through
    assert PrototypeClassifier(_Embedder(), state).labels() == ["a", "b"]


def test_two_continual_learners_on_one_file_never_overwrite_each_other(tmp_path):
    state, go = tmp_path / "cl.npz", tmp_path / "go"
    ready = [tmp_path / f"ready{w}" for w in range(2)]
    procs = [_spawn(CONTINUAL_WORKER, state, w, ready[w], go) for w in range(2)]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    results = sorted(o.strip().split(":")[0] for o, _ in outs)
    assert results == ["refused", "saved"], outs
    refused = next(o for o, _ in outs if o.startswith("refused"))
    assert str(state) in refused and "another learner" in refused


def test_continual_save_after_another_learner_committed_is_refused(tmp_path):
    from edgekt.devices import ContinualLearner, LearnerConfig

    path = tmp_path / "cl.npz"
    first = ContinualLearner(None, LearnerConfig(buffer_bytes=0), state_path=path, dim=4)
    second = ContinualLearner(None, LearnerConfig(buffer_bytes=0), state_path=path, dim=4)
    first.observe_embeddings(np.eye(4)[:2], ["a", "b"])
    assert first.save() == 1
    with pytest.raises(EdgektError, match="generation 1"):
        second.save()
    assert first.save() == 2  # the owner goes on
    reopened = ContinualLearner(None, LearnerConfig(buffer_bytes=0), state_path=path, dim=4)
    assert reopened.labels == ["a", "b"] and reopened.generation == 2


def test_lock_file_is_beside_the_state_and_kept(tmp_path):
    state = tmp_path / "sub" / "s.npz"
    with state_lock(state):
        pass
    assert lock_path(state) == tmp_path / "sub" / "s.npz.lock" and lock_path(state).exists()
    assert Path(lock_path(state)).read_text().strip() == str(os.getpid())


def test_public_names_import_lazily_and_torch_free():
    code = ("import sys, edgekt.devices as d; assert 'edgekt.devices.fewshot' not in sys.modules; "
            "from edgekt.devices import PrototypeClassifier, ContinualLearner, LearnerConfig; "
            "from edgekt.devices.lock import state_lock; "
            "assert PrototypeClassifier.__module__ == 'edgekt.devices.fewshot'; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
