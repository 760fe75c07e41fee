"""ContinualLearner: head learning, replay budget, guarded rollback, bad input, state files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgekt.devices.continual import ContinualLearner, LearnerConfig, ObserveResult
from edgekt.devices.replay import ReplayBuffer, item_bytes
from edgekt.devices.state import StateCorruptError
from edgekt.errors import EdgektError

D_IN, N_CLASSES = 20, 6


class Projection:
    """A fixed linear embedder (stands in for the exported model in the fast tests)."""

    embedding_dim = 16

    def __init__(self) -> None:
        self.w = np.random.default_rng(1).normal(size=(D_IN, 16)).astype(np.float32)

    def embed(self, raw: np.ndarray) -> np.ndarray:
        return np.asarray(raw, np.float32).reshape(len(raw), -1) @ self.w


CENTERS = np.random.default_rng(0).normal(size=(N_CLASSES, D_IN)) * 3


def batch(rng, classes, n=32):
    y = rng.choice(classes, n)
    return (CENTERS[y] + rng.normal(size=(n, D_IN))).astype(np.float32), [f"c{c}" for c in y]


def accuracy(learner, rng, classes, n=600):
    x, y = batch(rng, classes, n)
    return float(np.mean(np.array(learner.predict(x)) == np.array(y)))


def run_incremental(cfg, rng, steps=40):
    learner = ContinualLearner(Projection(), cfg)
    for exp in [(0, 1), (2, 3), (4, 5)]:
        for _ in range(steps):
            learner.observe(*batch(rng, exp))
    return learner


def test_replay_learns_new_classes_without_forgetting():
    rng = np.random.default_rng(0)
    replay = run_incremental(LearnerConfig(buffer_bytes=40_000), rng)
    naive = run_incremental(LearnerConfig(buffer_bytes=0, drift="none"), rng)
    assert sorted(replay.labels) == [f"c{i}" for i in range(N_CLASSES)]  # grew per new label
    assert replay.head.weight.shape == (N_CLASSES, 16)
    acc_replay = accuracy(replay, rng, range(N_CLASSES))
    old_naive, old_replay = accuracy(naive, rng, [0, 1]), accuracy(replay, rng, [0, 1])
    assert acc_replay > 0.9
    assert old_replay > old_naive + 0.3  # naive fine-tuning forgets the first classes


def test_ncm_head_and_int_labels():
    rng = np.random.default_rng(1)
    learner = ContinualLearner(Projection(), LearnerConfig(head="ncm", buffer_bytes=0))
    for c in range(N_CLASSES):
        x, _ = batch(rng, [c], 20)
        learner.observe(x, [c] * 20)
    x, y = batch(rng, range(N_CLASSES), 300)
    pred = learner.predict(x)
    assert all(isinstance(p, int) for p in pred)  # labels come back in the stream's type
    assert np.mean(np.array(pred) == np.array([int(s[1:]) for s in y])) > 0.95


def test_start_from_exported_head(tmp_path):
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(3, 16)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    np.savez(tmp_path / "head.npz", weight=w, bias=b, labels=np.array(["a", "b", "c"]))
    learner = ContinualLearner(Projection(), head_path=tmp_path / "head.npz")
    assert learner.config.normalize is False  # the exported head was trained on raw embeddings
    x = rng.normal(size=(50, D_IN)).astype(np.float32)
    expected = np.array(["a", "b", "c"])[(Projection().embed(x) @ w.T + b).argmax(1)]
    assert learner.predict(x) == expected.tolist()
    res = learner.observe(x[:8], ["d"] * 8)
    assert res.new_labels == ["d"] and learner.head.weight.shape == (4, 16)
    np.savez(tmp_path / "bad.npz", weight=w, bias=b[:2], labels=np.array(["a", "b", "c"]))
    with pytest.raises(EdgektError, match="inconsistent head"):
        ContinualLearner(Projection(), head_path=tmp_path / "bad.npz")


@pytest.mark.parametrize("int8", [False, True])
def test_replay_buffer_stays_in_budget_and_balanced(int8):
    budget = 20_000
    buf = ReplayBuffer(16, budget, int8=int8, max_classes=32, seed=0)
    shapes = [a.shape for a in buf.get_state()[0].values()]
    assert buf.nbytes <= budget
    assert buf.capacity == (budget - 32 * 12) // item_bytes(16, int8)
    rng = np.random.default_rng(0)
    for step in range(60):  # classes arrive one after another, then all mixed
        y = np.full(50, step // 6) if step < 36 else rng.integers(6, size=50)
        z = rng.normal(size=(50, 16)).astype(np.float32) + y[:, None]
        buf.add(z, y)
        assert buf.nbytes <= budget
    assert [a.shape for a in buf.get_state()[0].values()] == shapes  # never reallocated
    counts = np.bincount(buf.labels[: buf.size], minlength=6)
    assert buf.size == buf.capacity and counts.max() - counts.min() <= 2
    zs, ys = buf.sample(64)
    assert len(zs) == 64
    n_train = int((~buf.holdout[: buf.size]).sum())
    assert len(buf.sample(10 * buf.capacity)[0]) == n_train  # holdout slots are never replayed
    err = np.abs(zs - ys[:, None]).mean()  # decoded latents still sit around their class mean
    assert err < 1.0
    if int8:
        # 16 + 4 (scale) + 3 bytes against 64 + 3: about 3x the samples at this small dim
        assert buf.capacity > 2.8 * ReplayBuffer(16, budget, max_classes=32).capacity


def test_reservoir_keeps_a_uniform_sample_of_a_class():
    buf = ReplayBuffer(4, 4_000, holdout_fraction=0.0, max_classes=4, seed=3)
    values = np.arange(20_000, dtype=np.float32)
    for s in range(0, len(values), 500):
        buf.add(np.repeat(values[s:s + 500, None], 4, 1), np.zeros(500, np.int64))
    kept = buf.latents[: buf.size, 0]
    assert abs(kept.mean() - values.mean()) < 0.1 * values.mean()  # not just the latest ones


def test_guard_rolls_back_a_damaging_update_and_keeps_the_head():
    rng = np.random.default_rng(4)

    def trained(guard):
        cfg = LearnerConfig(buffer_bytes=40_000, guard=guard, lr=0.5, drift="none", seed=1)
        learner = ContinualLearner(Projection(), cfg)
        for _ in range(30):
            learner.observe(*batch(rng, [0, 1, 2, 3]))
        return learner

    learner = trained(True)
    before = learner.head.weight.copy()
    x, y = batch(rng, [0, 1, 2, 3], 64)
    wrong = [f"c{(int(s[1:]) + 1) % 4}" for s in y]  # systematically mislabelled
    learner.config.lr = 500.0  # a wild step (still wild after the guard's 16x backoff)
    res = learner.observe(x, wrong)
    assert res.rolled_back and "known classes would drop" in res.reason
    assert np.array_equal(learner.head.weight, before)
    assert learner.counters["updates_rolled_back"] == 1
    assert learner.last_rollback == res.reason
    assert accuracy(learner, rng, [0, 1, 2, 3]) > 0.9
    unguarded = trained(False)  # the same batch does damage without the guard
    unguarded.config.lr = 500.0
    assert not unguarded.observe(x, wrong).rolled_back
    assert accuracy(unguarded, rng, [0, 1, 2, 3]) < 0.6


class NaNEmbedder(Projection):
    def embed(self, raw):
        z = super().embed(raw)
        z[0] = np.nan
        return z


@pytest.mark.parametrize("case", ["nan", "shape", "label_type", "unlabelled", "bool_label",
                                  "count", "nan_embedding"])
def test_bad_input_is_rejected_and_never_poisons_the_head(case):
    rng = np.random.default_rng(5)
    emb = NaNEmbedder() if case == "nan_embedding" else Projection()
    learner = ContinualLearner(emb, LearnerConfig(buffer_bytes=20_000))
    if case == "nan_embedding":
        learner.embedder = Projection()
    learner.observe(*batch(rng, [0, 1]))
    learner.embedder = emb
    head = learner.head.weight.copy()
    x, y = batch(rng, [0, 1], 4)
    bad = {
        "nan": lambda: learner.observe(np.where(np.arange(D_IN) == 3, np.nan, x), y),
        "shape": lambda: learner.observe(x[:, :-1], y),
        "label_type": lambda: learner.observe(x, [0, 1, 0, 1]),
        "unlabelled": lambda: learner.observe(x, [None] * 4),
        "bool_label": lambda: learner.observe(x, [True] * 4),
        "count": lambda: learner.observe(x, y[:3]),
        "nan_embedding": lambda: learner.observe(x[:1], y[:1]),
    }[case]
    res: ObserveResult = bad()
    assert res.accepted == 0 and res.rejected and not res.updated
    assert np.array_equal(learner.head.weight, head)
    assert learner.counters["rejected"] == len(res.rejected)
    assert np.isfinite(learner.head.weight).all()


def test_mixed_batch_keeps_the_good_samples():
    rng = np.random.default_rng(6)
    learner = ContinualLearner(Projection(), LearnerConfig(buffer_bytes=20_000))
    x, y = batch(rng, [0, 1], 8)
    x[2, 0] = np.inf
    y[5] = None
    res = learner.observe(x, y)
    assert res.accepted == 6 and sorted(i for i, _ in res.rejected) == [2, 5]
    assert learner.buffer.size == 6 and np.isfinite(learner.head.weight).all()


def test_state_roundtrip_resumes_exactly(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "state.npz"
    cfg = LearnerConfig(buffer_bytes=30_000, int8=True, drift="page-hinkley",
                        drift_args={"threshold": 5.0, "min_instances": 10})
    a = ContinualLearner(Projection(), cfg, state_path=path)
    for _ in range(20):
        a.observe(*batch(rng, [0, 1, 2]))
    assert a.save() == 1 and path.exists()
    b = ContinualLearner(Projection(), cfg, state_path=path)
    assert b.generation == 1 and b.labels == a.labels and b.counters == a.counters
    np.testing.assert_array_equal(b.head.weight, a.head.weight)
    np.testing.assert_array_equal(b.buffer.latents, a.buffer.latents)
    assert b.detector.get_state()[1] == a.detector.get_state()[1]
    for _ in range(10):  # the same stream leads both to the same decisions and weights
        x, y = batch(rng, [0, 1, 2, 3])
        ra, rb = a.observe(x, y), b.observe(x, y)
        assert (ra.updated, ra.drift, ra.errors) == (rb.updated, rb.drift, rb.errors)
    np.testing.assert_allclose(b.head.weight, a.head.weight)
    with pytest.raises(EdgektError, match="buffer_bytes"):
        ContinualLearner(Projection(), LearnerConfig(buffer_bytes=10_000, int8=True,
                                                     drift="page-hinkley"), state_path=path)


def test_save_schedule_and_corrupt_state_fallback(tmp_path, caplog):
    rng = np.random.default_rng(8)
    path = tmp_path / "state.npz"
    learner = ContinualLearner(Projection(), LearnerConfig(buffer_bytes=20_000, save_every=2),
                               state_path=path)
    for _ in range(6):
        learner.observe(*batch(rng, [0, 1]))
    assert learner.generation == 3  # committed after batches 2, 4 and 6
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a torn write (what atomic saves prevent)
    resumed = ContinualLearner(Projection(), LearnerConfig(buffer_bytes=20_000), state_path=path)
    assert resumed.generation == 2 and resumed.counters["batches"] == 4
    assert resumed.recovered_from and "falling back" in caplog.text
    prev = path.with_name(path.name + ".prev")
    raw = bytearray(prev.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip a bit inside the previous generation too
    prev.write_bytes(bytes(raw))
    with pytest.raises(StateCorruptError):
        ContinualLearner(Projection(), LearnerConfig(buffer_bytes=20_000), state_path=path)


def test_config_is_validated():
    with pytest.raises(EdgektError, match="lr"):
        LearnerConfig(lr=-1)
    with pytest.raises(EdgektError, match="drift"):
        LearnerConfig(drift="cusum")  # type: ignore[arg-type]


def test_continual_modules_do_not_import_torch():
    code = ("import sys, edgekt.devices.continual, edgekt.devices.drift, "
            "edgekt.devices.replay, edgekt.continual.crash; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
