"""Latent replay (the mlp head) on real data: learns above naive fine-tuning and NCM, and the
bad-input cases of a full learner (new label, no budget left)."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest

from edgekt.continual.simulate import class_incremental, run_strategy
from edgekt.devices.continual import ContinualLearner, LearnerConfig, MLPHead
from edgekt.devices.replay import ReplayBuffer
from edgekt.devices.state import load_state

D = 24
CENTERS = np.random.default_rng(0).normal(size=(12, D)).astype(np.float32) * 3


@pytest.fixture(scope="module")
def fashion_latents(tmp_path_factory):
    """Split-Fashion-MNIST (500 / 100 real images per class) in the latent space of a cnn_xs
    trained for one epoch on mnist-5k (digits only: no Fashion-MNIST image or label),
    cut after stage 2 and pooled to a 5x5 grid (16 x 25 = 400 values)."""
    import torch

    from edgekt.checkpoint import load_checkpoint
    from edgekt.config import load_config
    from edgekt.continual.simulate import grid_embedding, load_stream
    from edgekt.engine import fit
    from edgekt.engine.setup import model_from_checkpoint

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("mnist_backbone")
    fit(load_config(None, [f"run.dir={run}", "data.name=mnist-5k", "model.name=cnn_xs",
                           "train.epochs=1", "optim.lr=0.005", "data.batch_size=32",
                           "sched.name=none", "train.progress=false", "train.threads=1"]),
        force=True)
    net, info = model_from_checkpoint(load_checkpoint(run / "last.pt"))
    trunk = grid_embedding(net, 5, stage=2)
    x_tr, y_tr, x_te, y_te, labels = load_stream(500, 100, seed=0)

    def embed(x: np.ndarray) -> np.ndarray:
        t = (torch.from_numpy(x).float().div(255).unsqueeze(1) - info.mean[0]) / info.std[0]
        with torch.no_grad():
            return trunk(t).numpy()

    return class_incremental(embed(x_tr), y_tr, embed(x_te), y_te, labels), labels


def test_latent_replay_learns_above_naive_and_ncm(fashion_latents):
    exps, labels = fashion_latents
    cfg = LearnerConfig(head="mlp", hidden=128, lr=0.1, buffer_bytes=200_000, int8=True)
    acc = {s: run_strategy(s, exps, labels, cfg, seed=0).final_avg_acc
           for s in ("replay", "naive", "ncm")}
    linear = run_strategy("replay", exps, labels, LearnerConfig(lr=2.0, buffer_bytes=200_000,
                                                                int8=True), seed=0)
    # measured: replay 0.732, naive 0.246, ncm 0.631, linear replay 0.652
    assert acc["naive"] < 0.3  # fine-tuning without memory keeps only the last 2 classes
    assert acc["replay"] > acc["naive"] + 0.4
    assert acc["replay"] > acc["ncm"] + 0.05
    assert acc["replay"] > linear.final_avg_acc + 0.03


def blobs(rng, classes, n=32):
    y = rng.choice(classes, n)
    return (CENTERS[y] + rng.normal(size=(n, D))).astype(np.float32), [f"c{c}" for c in y]


def full_learner(head, path=None, **kw):
    """A learner whose replay buffer is full (5 classes seen, about 60 slots)."""
    cfg = LearnerConfig(head=head, lr=0.1 if head == "mlp" else 0.5, buffer_bytes=6_000,
                        max_classes=8, standardize_samples=64, **kw)
    learner = ContinualLearner(None, cfg, state_path=path, dim=D)
    rng = np.random.default_rng(1)
    for _ in range(20):
        learner.observe_embeddings(*blobs(rng, range(5)))
    assert learner.buffer.size == learner.buffer.capacity  # no budget left
    return learner, rng


@pytest.mark.parametrize("head", ["mlp", "softmax"])
def test_new_label_with_no_budget_left_evicts_from_the_largest_class(head):
    learner, rng = full_learner(head)
    buf = learner.buffer
    nbytes, before = buf.nbytes, np.bincount(buf.labels[: buf.size], minlength=5)
    for _ in range(3):
        x, _ = blobs(rng, [5], 16)
        res = learner.observe_embeddings(x, ["c5"] * 16)
        assert res.accepted == 16 and not res.rejected
    after = np.bincount(buf.labels[: buf.size], minlength=6)
    assert buf.nbytes == nbytes and buf.size == buf.capacity  # the budget still holds
    assert after[5] >= buf.capacity // 6 - 1  # the new class got its share of the slots...
    assert after[:5].min() >= before.min() - after[5]  # ...taken from the largest classes
    assert (after[:5] > 0).all()  # every acknowledged class is still replayed
    x, y = blobs(rng, range(6), 300)
    pred = np.array(learner.predict_embeddings(x))
    assert (pred == np.array(y)).mean() > 0.8  # the old classes and the new one
    assert learner.head.num_classes == 6


def test_label_beyond_max_classes_is_rejected_not_raised():
    learner, rng = full_learner("mlp")
    for c in (5, 6, 7):  # fill the label table (max_classes=8)
        learner.observe_embeddings(blobs(rng, [c], 8)[0], [f"c{c}"] * 8)
    w1 = learner.head.w1.copy()
    x, y = blobs(rng, [0, 8], 16)
    res = learner.observe_embeddings(x, y)
    new = [i for i, lab in enumerate(y) if lab == "c8"]
    assert sorted(i for i, _ in res.rejected) == new
    assert all("max_classes=8" in why for _, why in res.rejected)
    assert res.accepted == 16 - len(new) and res.updated  # the known label is still learnt
    assert "c8" not in learner.labels and learner.head.num_classes == 8
    assert not np.array_equal(learner.head.w1, w1)


CHILD = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_continual_latent import blobs, full_learner
learner, rng = full_learner("mlp", {path!r}, save_every=1)
x, _ = blobs(rng, [5], 16)
res = learner.observe_embeddings(x, ["c5"] * 16)
print("acked", res.accepted, learner.generation, flush=True)
import time
time.sleep(60)
"""


def test_acknowledged_new_label_survives_sigkill(tmp_path):
    path = tmp_path / "state.npz"
    code = CHILD.format(tests=str(__import__("pathlib").Path(__file__).parent), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert line[:2] == ["acked", "16"]
    state = load_state(path)
    assert state.generation == int(line[2])
    resumed = ContinualLearner(None, LearnerConfig(head="mlp", lr=0.1, buffer_bytes=6_000,
                                                   max_classes=8, standardize_samples=64),
                               state_path=path, dim=D)
    assert "c5" in resumed.labels and resumed.head.num_classes == 6
    assert (resumed.buffer.labels[: resumed.buffer.size] == resumed.labels.index("c5")).any()
    assert isinstance(resumed.head, MLPHead)


def test_mlp_head_state_roundtrip(tmp_path):
    learner, rng = full_learner("mlp", tmp_path / "s.npz")
    learner.save()
    again = ContinualLearner(None, learner.config, state_path=tmp_path / "s.npz", dim=D)
    for k, v in learner.head.arrays().items():
        np.testing.assert_array_equal(again.head.arrays()[k], v)
    x, y = blobs(rng, range(5))
    assert learner.observe_embeddings(x, y).updated == again.observe_embeddings(x, y).updated
    np.testing.assert_allclose(again.head.w1, learner.head.w1)
    assert again.head.stats[0, 0] == 64  # the input statistics froze after 64 samples


# --------------------------------------------------------------------------- fast update paths
# The update of the mlp head is optimised (budget: 2 ms p50 on 2 cores); these tests pin the
# optimised paths to the plain computations they replace.


class PlainBuffer(ReplayBuffer):
    """The reservoir insert as first written (numpy counters, recounted every sample)."""

    def _random_slot_of(self, cls, n_classes):
        cand = self.rng.integers(self.size, size=8 * n_classes + 8)
        hits = np.flatnonzero(self.labels[cand] == cls)
        if len(hits):
            return int(cand[hits[0]])
        return int(self.rng.choice(np.flatnonzero(self.labels[: self.size] == cls)))

    def add(self, z, y):
        stored = set()
        for row, c in enumerate(np.asarray(y).tolist()):
            self.seen[c] += 1
            n_classes = int(np.count_nonzero(self.counts))
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                largest = int(self.counts.argmax())
                if self.counts[c] < self.counts[largest]:
                    slot = self._random_slot_of(largest, n_classes)
                elif self.rng.random() * self.seen[c] < self.counts[c]:
                    slot = self._random_slot_of(c, n_classes)
                else:
                    continue
                self.counts[self.labels[slot]] -= 1
            self.labels[slot] = c
            self.counts[c] += 1
            self.holdout[slot] = self.rng.random() < self.holdout_fraction
            self._encode(np.asarray(z[row:row + 1], np.float32), np.array([slot]))
            stored.add(slot)
        return len(stored)


@pytest.mark.parametrize("int8", [True, False])
def test_reservoir_insert_draws_and_stores_as_the_plain_loop(int8):
    fast, plain = (cls(D, 5_000, int8=int8, max_classes=16, seed=5)
                   for cls in (ReplayBuffer, PlainBuffer))
    rng = np.random.default_rng(2)
    for step in range(60):  # classes arrive two at a time (evictions), then all mixed
        y = rng.choice([2 * (step // 10), 2 * (step // 10) + 1] if step < 50 else range(12), 32)
        z = (CENTERS[y] + rng.normal(size=(32, D))).astype(np.float32)
        assert fast.add(z, y) == plain.add(z, y)
    assert fast.size == plain.size == fast.capacity
    for k, v in plain.get_state()[0].items():
        np.testing.assert_array_equal(fast.get_state()[0][k], v, err_msg=k)
    assert fast.rng.bit_generator.state == plain.rng.bit_generator.state


def test_reused_forward_pass_gives_the_same_sgd_step():
    rng = np.random.default_rng(3)
    z, _ = blobs(rng, range(4), 64)
    y = rng.integers(4, size=64)
    a = MLPHead(D, 16, seed=1)
    a.see(z)
    a.grow(4)
    a.w2 = rng.normal(size=a.w2.shape).astype(np.float32)
    b = a.clone()
    x, h, logits = a._forward(z)
    a.learn(z[:0], y, 0.1, head_rows=(x, h, logits))  # the learner's path: no second pass
    b.learn(z, y, 0.1)
    for k, v in b.arrays().items():
        np.testing.assert_array_equal(a.arrays()[k], v, err_msg=k)


def test_guard_caches_agree_with_a_fresh_pass():
    """Holdout rows, their pre-activations (low-rank updated) and the head's cached
    predictions equal what a fresh pass over the buffer computes, after evictions."""
    dim = 200  # wide enough latents (and batch 16 + 16) for the low-rank guard to pay
    centers = np.random.default_rng(7).normal(size=(6, dim)).astype(np.float32)
    cfg = LearnerConfig(head="mlp", lr=0.1, buffer_bytes=100_000, int8=True, max_classes=8,
                        standardize_samples=64, replay_batch=16)
    learner = ContinualLearner(None, cfg, dim=dim)
    rng = np.random.default_rng(1)
    for step in range(120):  # two classes at a time: new ones evict, holdout rows turn over
        y = rng.choice([2 * (step // 40), 2 * (step // 40) + 1], 16)
        z = centers[y] + rng.normal(size=(16, dim)).astype(np.float32)
        learner.observe_embeddings(z, [f"c{c}" for c in y])
    assert learner.buffer.size == learner.buffer.capacity
    assert learner.counters["updates_accepted"] > 100
    cache, buf, head = learner._holdout_cache, learner.buffer, learner.head
    n = cache.n
    assert n >= learner.config.guard_min_holdout and cache.pre_w1 is head.w1
    assert cache.approx > 0  # the last guards took the low-rank path
    slots = cache.slots[:n]
    assert buf.holdout[slots].all() and len(set(slots.tolist())) == n
    np.testing.assert_array_equal(cache.x[:n], head.prepare(buf._decode(slots)))
    ok = cache.pre_ok[:n]
    assert ok.all()
    np.testing.assert_allclose(cache.pre[:n], cache.x[:n] @ head.w1, rtol=1e-4, atol=1e-4)
    known, preds = learner._pred_cache
    fresh = head.logits(buf._decode(slots))[:, :known].argmax(axis=1)
    cached = preds[slots]
    assert (cached[cached >= 0] == fresh[cached >= 0]).all()
