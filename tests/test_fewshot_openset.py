"""Open-set rejection of the few-shot classifier: the normalised rule's maths (whitening,
per-class spread, single-shot fallback), state format 1 -> 2 compatibility, and the rule on
synthetic classes of unequal spread. The real-data comparison of the rules (Fashion-MNIST
novel classes) is in test_fewshot_device.py, which has the trained embedding."""

from __future__ import annotations

import numpy as np
import pytest

from edgekt.devices.fewshot import (
    FORMAT,
    PrototypeClassifier,
    calibrate,
    fit_normalizer,
    merge_scatter,
    scatter_of,
)
from edgekt.devices.state import State, StateCorruptError, load_state, save_state
from edgekt.errors import EdgektError


class Identity:
    """Embedder whose 'images' are already embeddings (N, D)."""

    def embed(self, raw):
        return np.asarray(raw, np.float64)


def _classes(rng, n_classes=8, dim=6, per_class=120, spreads=None):
    """Gaussian classes; ``spreads`` gives each class its own standard deviation."""
    spreads = spreads if spreads is not None else np.full(n_classes, 0.5)
    centres = rng.normal(0, 3.0, (n_classes, dim))
    x = np.concatenate([c + rng.normal(0, s, (per_class, dim))
                        for c, s in zip(centres, spreads, strict=True)])
    return x, np.repeat(np.arange(n_classes), per_class)


def test_whitening_scatter_and_prior_by_hand():
    rng = np.random.default_rng(0)
    # Anisotropic within-class noise: full whitening (shrinkage 0) makes it isotropic.
    scale = np.array([5.0, 1.0, 0.2])
    x = np.concatenate([m + rng.normal(0, 1, (2000, 3)) * scale for m in np.eye(3) * 10])
    y = np.repeat(np.arange(3), 2000)
    n = fit_normalizer(x, y, shrinkage=0.0)
    dev = np.concatenate([n.project(x[y == c]) - n.project(x[y == c]).mean(0) for c in range(3)])
    assert np.cov(dev.T) == pytest.approx(np.eye(3), abs=0.01)
    assert n.prior_var == pytest.approx(3.0, rel=0.01)  # E|x - mu_c|^2 = trace(I) = D
    # Shrinkage 1 only rescales: distances keep their ratios.
    iso = fit_normalizer(x, y, shrinkage=1.0)
    assert np.allclose(iso.whiten, iso.whiten[0, 0] * np.eye(3))
    # Scatter of shots folded in twice equals the scatter of all shots at once.
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 3))
    assert merge_scatter(scatter_of(a), a.mean(0), 4, b) == pytest.approx(
        scatter_of(np.concatenate([a, b])))
    with pytest.raises(EdgektError, match=">= 2 classes"):
        fit_normalizer(x[:5], np.zeros(5))
    with pytest.raises(EdgektError, match="shrinkage"):
        fit_normalizer(x, y, shrinkage=2.0)


def test_per_class_radius_equalises_false_rejects_of_tight_and_diffuse_classes():
    """One global distance threshold rejects none of a tight class's samples and too many of
    a diffuse one's; radii from each class's own shots bring both near the calibrated 10%.
    (A weak prior, so the shots' spread dominates the estimate.)"""
    rng = np.random.default_rng(1)
    x, y = _classes(rng, spreads=np.array([0.5, 1.0] * 4), per_class=200)
    norm = fit_normalizer(x, y, prior_shots=1.0)
    per_rule = {}
    for name, n in (("distance", None), ("normalized", norm)):
        thr = calibrate(x, y, shots=5, target_frr=0.1, trials=40, normalizer=n).threshold
        frr = []
        for cls in (0, 1):  # a tight and a diffuse class, each enrolled from 5 shots
            rejected = []
            for _ in range(30):
                idx = rng.permutation(np.flatnonzero(y == cls))
                shots, queries = x[idx[:5]], x[idx[5:]]
                if n is None:
                    score = ((queries - shots.mean(0)) ** 2).sum(1)
                else:
                    score = n.scores(queries, shots.mean(0)[None], np.array([5]),
                                     np.array([scatter_of(n.project(shots))]))[:, 0]
                rejected.append((score > thr).mean())
            frr.append(float(np.mean(rejected)))
        per_rule[name] = frr
    tight, diffuse = per_rule["distance"]
    assert tight < 0.01 and diffuse > 0.15, per_rule  # the global threshold fits neither
    gap = diffuse - tight
    tight, diffuse = per_rule["normalized"]
    assert abs(diffuse - tight) < gap / 2 and 0.02 < tight and diffuse < 0.14, per_rule


def test_classifier_normalized_rule_single_shot_fallback_and_persistence(tmp_path):
    rng = np.random.default_rng(2)
    x, y = _classes(rng, n_classes=6, dim=5, spreads=np.array([0.3, 1.0] * 3))
    clf = PrototypeClassifier(Identity(), tmp_path / "s.npz")
    assert clf.rejection == "distance" and clf.normalizer is None  # a new, uncalibrated state
    rates = clf.calibrate_threshold(x, y, shots=5, target_frr=0.05, trials=30)
    assert clf.rejection == "normalized" and rates.false_reject_rate == pytest.approx(0.05,
                                                                                     abs=0.02)
    assert rates.false_accept_rate < 0.15  # separated synthetic classes (accept-all: 1.0)
    # A single shot: no spread to measure, the base prior is used (the documented fallback).
    clf.enroll("one", x[y == 0][:1])
    assert clf.normalizer.class_var(np.array([1]), clf._scatter[:1])[0] == \
        pytest.approx(clf.normalizer.prior_var)
    p = clf.predict(x[y == 0][5])
    assert p.novelty is not None and np.isfinite(p.novelty) and p.label == "one"
    assert clf.predict(x[y == 3][0]).label is None  # another class: rejected
    # Re-enrolling extends the spread exactly as enrolling all shots at once.
    clf.enroll("one", x[y == 0][1:5])
    once = PrototypeClassifier(Identity(), tmp_path / "once.npz")
    once.calibrate_threshold(x, y, shots=5, target_frr=0.05, trials=30)
    once.enroll("one", x[y == 0][:5])
    assert clf._scatter[0] == pytest.approx(once._scatter[0])
    # Everything survives a restart.
    again = PrototypeClassifier(Identity(), tmp_path / "s.npz")
    assert again.rejection == "normalized" and again.threshold == clf.threshold
    assert again.predict(x[y == 0][7]).novelty == pytest.approx(clf.predict(x[y == 0][7]).novelty)
    assert load_state(tmp_path / "s.npz").meta["format"] == FORMAT == "edgekt.fewshot/2"
    # The old rule on request, keeping the normaliser for the novelty score.
    clf.calibrate_threshold(x, y, shots=5, target_frr=0.05, trials=30, rejection="distance")
    assert clf.rejection == "distance" and clf.predict(x[0]).novelty is not None
    with pytest.raises(EdgektError, match="rejection rule"):
        clf.calibrate_threshold(x, y, rejection="magic")  # type: ignore[arg-type]


def test_format_1_state_loads_with_the_distance_rule_and_upgrades(tmp_path):
    """A state written before format 2 (no rejection, scatter or normaliser) keeps working."""
    protos = np.array([[0.0, 0.0], [10.0, 0.0]])
    meta = {"format": "edgekt.fewshot/1", "labels": ["a", "b"], "metric": "euclidean",
            "transform": "none", "scale": 1.0, "threshold": 4.0,
            "calibration": {"threshold": 4.0}, "saved_at": 0.0}
    save_state(tmp_path / "s.npz", State({"prototypes": protos,
                                         "counts": np.array([5, 5])}, meta))
    clf = PrototypeClassifier(Identity(), tmp_path / "s.npz")
    assert clf.rejection == "distance" and clf.threshold == 4.0 and clf.normalizer is None
    assert [p.label for p in clf.predict_batch(np.array([[1.0, 1.0], [5.0, 0.0], [9.0, 0.0]]))
            ] == ["a", None, "b"]  # squared distances 2, 25, 1 against threshold 4
    assert clf.predict(np.array([1.0, 1.0])).novelty is None
    # Calibrating upgrades it to format 2; the old classes use the prior spread.
    rng = np.random.default_rng(3)
    x, y = _classes(rng, n_classes=4, dim=2)
    clf.calibrate_threshold(x, y, shots=5, trials=20)
    assert np.isnan(clf._scatter).all() and clf.labels() == ["a", "b"]
    state = load_state(tmp_path / "s.npz")
    assert state.meta["format"] == "edgekt.fewshot/2" and state.meta["rejection"] == "normalized"
    assert PrototypeClassifier(Identity(), tmp_path / "s.npz").rejection == "normalized"


def test_inconsistent_format_2_states_are_refused(tmp_path):
    base = {"format": "edgekt.fewshot/2", "labels": ["a"], "metric": "euclidean",
            "transform": "none", "scale": 1.0, "threshold": 2.0}
    arrays = {"prototypes": np.zeros((1, 2)), "counts": np.array([3])}
    for meta, extra, why in (
            ({**base, "rejection": "normalized"}, {}, "without its normaliser"),
            ({**base, "rejection": "bogus"}, {}, "rejection 'bogus'"),
            ({**base, "rejection": "distance"}, {"scatter": np.zeros(2)}, "2 spreads"),
            ({**base, "rejection": "normalized", "norm": {"prior_var": 1.0, "prior_shots": 5.0,
                                                          "shrinkage": 0.5}},
             {"norm_mean": np.zeros(3), "norm_whiten": np.eye(3)}, "normaliser of shape")):
        path = tmp_path / f"{len(why)}.npz"
        save_state(path, State({**arrays, **extra}, meta))
        with pytest.raises(StateCorruptError, match=why):
            PrototypeClassifier(Identity(), path)
