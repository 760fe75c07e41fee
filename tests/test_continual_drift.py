"""Page-Hinkley and ADWIN (numpy) against river's implementations on the same sequences."""

from __future__ import annotations

import numpy as np
import pytest
from river import drift as river_drift

from edgekt.devices.continual import ContinualLearner, LearnerConfig
from edgekt.devices.drift import ADWIN, PageHinkley, create_detector
from edgekt.errors import EdgektError


def sequences():
    rng = np.random.default_rng(0)
    errors = (rng.random(3000) < np.r_[np.full(1500, 0.1), np.full(1500, 0.4)]).astype(float)
    yield "error-rate 10%->40%", errors
    yield "mean shift", np.r_[rng.normal(0, 1, 2000), rng.normal(1.5, 1, 2000)]
    yield "three regimes", np.r_[rng.normal(0, 1, 1000), rng.normal(3, 2, 1000),
                                 rng.normal(-1, 0.5, 2000)]
    yield "stationary", rng.random(6000)


PARAMS = [
    (ADWIN, river_drift.ADWIN, {}),
    (ADWIN, river_drift.ADWIN, {"delta": 0.05, "clock": 1, "grace_period": 30}),
    (PageHinkley, river_drift.PageHinkley, {}),
    (PageHinkley, river_drift.PageHinkley, {"threshold": 5.0, "min_instances": 10,
                                            "mode": "up"}),
]


@pytest.mark.parametrize("ours,theirs,kwargs", PARAMS)
def test_same_detections_as_river(ours, theirs, kwargs):
    total = 0
    for name, seq in sequences():
        a, b = ours(**kwargs), theirs(**kwargs)
        mine, ref = [], []
        for i, x in enumerate(seq):
            if a.update(x):
                mine.append(i)
            b.update(x)
            if b.drift_detected:
                ref.append(i)
            if isinstance(a, ADWIN) and not b.drift_detected:
                assert a.width == b.width, (name, i)
        assert mine == ref, name
        total += len(ref)
    assert total > 0  # the sequences do exercise detections


@pytest.mark.parametrize("ours,_,kwargs", PARAMS)
def test_update_many_is_update_in_a_loop(ours, _, kwargs):
    """The learner feeds a batch at once (``update_many``): same detections, same state."""
    for name, seq in sequences():
        a, b = ours(**kwargs), ours(**kwargs)
        for start in range(0, len(seq), 32):  # batches of 32, as the device learner's
            chunk = seq[start:start + 32]
            one = [a.update(x) for x in chunk]
            assert b.update_many(chunk.tolist()) == any(one), (name, start)
            sa, sb = a.get_state(), b.get_state()
            assert sa[1] == sb[1], (name, start)
            for k in sa[0]:
                np.testing.assert_array_equal(sa[0][k], sb[0][k], err_msg=f"{name} {start} {k}")


@pytest.mark.parametrize("name", ["adwin", "page-hinkley"])
def test_detector_state_roundtrip_mid_stream(name):
    rng = np.random.default_rng(1)
    seq = np.r_[rng.normal(0, 1, 1500), rng.normal(2, 1, 1500)]
    a = create_detector(name)
    for x in seq[:1200]:
        a.update(x)
    arrays, meta = a.get_state()
    b = create_detector(name)
    b.set_state({k: v.copy() for k, v in arrays.items()}, dict(meta))
    assert [a.update(x) for x in seq[1200:]] == [b.update(x) for x in seq[1200:]]


def test_unknown_detector_lists_valid_names():
    with pytest.raises(EdgektError, match="adwin"):
        create_detector("cusum")


def test_learner_signals_drift_when_inputs_shift():
    """Errors jump when the 'camera' changes; ADWIN on the error stream notices it."""
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(4, 16)) * 3
    shift = rng.normal(size=16) * 6

    class Identity:
        embedding_dim = 16

        def embed(self, raw):
            return np.asarray(raw, np.float32)

    learner = ContinualLearner(Identity(), LearnerConfig(buffer_bytes=30_000, drift="adwin"))
    events = []
    for step in range(120):
        y = rng.integers(4, size=32)
        x = centers[y] + rng.normal(size=(32, 16)) + (shift if step >= 60 else 0)
        if learner.observe(x, [f"k{c}" for c in y]).drift:
            events.append(step)
    assert learner.counters["drift_events"] == len(events) >= 1
    assert min(e for e in events if e >= 60) <= 70  # detected within 10 batches of the shift
    assert not [e for e in events if 20 <= e < 60]  # no alarm while the input is stationary
