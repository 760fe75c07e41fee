"""On-device few-shot classification: enroll new classes from a few images, no backprop.

A ``PrototypeClassifier`` sits on an exported embedding model (anything with
``embed(raw) -> (N, D) array``, e.g. ``edgekt.devices.EdgeModel``). Each class is the running
mean ("prototype") of its enrolled embeddings; a query gets the nearest prototype's label, or
``None`` ("unknown") when the query is too far from that prototype. Labels are arbitrary
non-empty strings.

Open-set rejection has two rules (``rejection`` in the state):

* ``normalized`` (what ``calibrate_threshold`` sets up by default): the query's squared
  distance to the predicted class's prototype in a *whitened* space (base-class within-class
  covariance, shrunk towards isotropic), divided by the distance a sample of that class is
  expected to have, estimated from the spread of its own enrolled shots. The threshold is
  therefore per prototype: a diffuse class gets a wide radius, a tight one a narrow radius.
  With one shot (no spread to measure) the class uses the base classes' average spread: the
  documented fallback, also used for classes enrolled before the whitening was fitted.
* ``distance`` (states written before format 2, or ``rejection="distance"``): one global
  threshold on the raw nearest-prototype distance.

Policies (documented because an app depends on them):

* **Re-enrolling a label extends it**: the new shots are folded into the running mean as if
  all shots had been enrolled at once (``replace=True`` starts the class over).
* **Persistence**: every change (enroll, remove, calibrate, threshold) is committed to the
  state file with ``edgekt.devices.state.save_state`` (temp file, fsync, rename, previous
  generation kept as ``.prev``) *before* the call returns, so a returned enrollment survives a
  SIGKILL or power cut. The state is reloaded on start.
* **Several processes may share a state file**: each change takes an advisory file lock
  (``edgekt.devices.lock``), reloads what another process committed meanwhile, applies itself
  and commits, so concurrent enrollments are all kept. A process that waits longer than
  ``lock_timeout`` seconds gets ``StateLockedError`` naming the holder's pid.
* **State format**: ``edgekt.fewshot/2`` adds the normalised rule (arrays ``scatter``,
  ``norm_mean``, ``norm_whiten``; meta ``rejection``, ``norm``). Format 1 files load unchanged
  and keep the ``distance`` rule until recalibrated.
* **A damaged state file is refused** (``StateCorruptError``), never replaced by an empty
  classifier. When the previous generation is intact, ``recover=True`` restores it (the damaged
  file is kept beside it as ``NAME.corrupt``); it then lacks only the last change.

The maths is shared with host-side evaluation (``edgekt.fewshot.evaluate``), so a host
benchmark and the device agree by construction.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from edgekt.devices.lock import DEFAULT_TIMEOUT, state_lock
from edgekt.devices.state import State, StateCorruptError, load_state, save_state
from edgekt.errors import EdgektError
from edgekt.io import check_writable

log = logging.getLogger(__name__)

Metric = Literal["euclidean", "cosine"]
Transform = Literal["none", "l2", "cl2n"]
Rejection = Literal["normalized", "distance"]
FORMAT = "edgekt.fewshot/2"
FORMATS_READ = ("edgekt.fewshot/1", FORMAT)
METRICS = ("euclidean", "cosine")
TRANSFORMS = ("none", "l2", "cl2n")
REJECTIONS = ("normalized", "distance")


class Embedder(Protocol):
    """What the classifier needs from a model: raw samples (N, ...) -> embeddings (N, D)."""

    def embed(self, raw: np.ndarray) -> np.ndarray: ...


# ---- pure functions (shared with the host evaluation) -------------------------------------------
def transform_embeddings(emb: np.ndarray, transform: str, center: np.ndarray | None = None
                         ) -> np.ndarray:
    """Apply the feature transform: ``none``, ``l2`` (unit length) or ``cl2n`` (SimpleShot:
    subtract the base-class mean ``center``, then unit length)."""
    x = np.asarray(emb, dtype=np.float64)
    if transform == "cl2n":
        if center is None:
            raise EdgektError("transform 'cl2n' needs the base-class mean embedding (center)")
        x = x - center
    if transform in ("l2", "cl2n"):
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    elif transform != "none":
        raise EdgektError(f"unknown embedding transform {transform!r} (valid: {TRANSFORMS})")
    return x


def distances(queries: np.ndarray, prototypes: np.ndarray, metric: str) -> np.ndarray:
    """(Q, D) x (N, D) -> (Q, N): squared Euclidean distance, or cosine distance 1 - cos."""
    q, p = np.asarray(queries, np.float64), np.asarray(prototypes, np.float64)
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        pn = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        return 1.0 - qn @ pn.T
    if metric != "euclidean":
        raise EdgektError(f"unknown metric {metric!r} (valid: {METRICS})")
    d = (q * q).sum(1)[:, None] - 2.0 * q @ p.T + (p * p).sum(1)[None, :]
    return np.maximum(d, 0.0)


def class_means(emb: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Prototypes: the mean embedding of each class 0..n_classes-1."""
    sums = np.zeros((n_classes, emb.shape[1]))
    np.add.at(sums, labels, emb)
    return sums / np.maximum(np.bincount(labels, minlength=n_classes), 1)[:, None]


# ---- open-set score normalisation ----
@dataclass(frozen=True)
class Normalizer:
    """Open-set score normalisation fitted on base-class embeddings (``fit_normalizer``).

    ``score = |W(q - p_c)|^2 / ((1 + 1/k_c) * var_c)``: the whitened squared distance of a
    query to class c's prototype over the one a sample of c is expected to have. ``var_c`` is
    c's per-sample variance in the whitened space, estimated from its ``k_c`` shots and shrunk
    towards the base classes' average ``prior_var`` with the weight of ``prior_shots`` extra
    shots (a conjugate-prior style estimate); one shot gives ``prior_var`` alone. Known
    queries score about 1 whatever the class, so one threshold fits tight and diffuse classes.
    """

    mean: np.ndarray
    """(D,) base-class mean embedding (the whitening's origin)."""
    whiten: np.ndarray
    """(D, D) inverse square root of the shrunk pooled within-class covariance."""
    prior_var: float
    """Base classes' mean squared distance of a sample to its class mean, whitened."""
    prior_shots: float = 5.0
    shrinkage: float = 0.5

    def project(self, emb: np.ndarray) -> np.ndarray:
        return (np.asarray(emb, np.float64) - self.mean) @ self.whiten

    def class_var(self, counts: np.ndarray, scatter: np.ndarray) -> np.ndarray:
        """Per-class variance estimate; an unknown (NaN) scatter counts as a single shot."""
        counts = np.asarray(counts, np.float64)
        known = np.isfinite(scatter)
        ss = np.where(known, scatter, 0.0)
        k = np.where(known, counts, 1.0)
        return (ss + self.prior_shots * self.prior_var) / (k - 1.0 + self.prior_shots)

    def scores(self, queries: np.ndarray, protos: np.ndarray, counts: np.ndarray,
               scatter: np.ndarray) -> np.ndarray:
        """(Q, D) queries x N prototypes -> (Q, N) normalised scores (≈ 1 for known samples)."""
        d = distances(self.project(queries), self.project(protos), "euclidean")
        counts = np.asarray(counts, np.float64)
        return d / ((1.0 + 1.0 / counts) * self.class_var(counts, scatter))[None, :]


def fit_normalizer(emb: np.ndarray, labels: np.ndarray, *, shrinkage: float = 0.5,
                   prior_shots: float = 5.0) -> Normalizer:
    """Fit the whitening and the prior spread on labelled base-class embeddings.

    ``shrinkage`` mixes the pooled within-class covariance with an isotropic one of the same
    trace (0: full whitening, 1: none) so that directions the base classes barely use are
    amplified but not blown up by estimation noise. Needs >= 2 classes with >= 2 samples each.
    """
    x, y = np.asarray(emb, np.float64), np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        found = dict(zip(classes.tolist(), counts.tolist(), strict=True))
        raise EdgektError(f"fitting the open-set normalisation needs >= 2 classes with >= 2 "
                          f"samples each; got class: count {found}")
    if not 0.0 <= shrinkage <= 1.0 or not prior_shots > 0:
        raise EdgektError(f"shrinkage must be in [0, 1] and prior_shots > 0 (got {shrinkage}, "
                          f"{prior_shots})")
    dev = x - np.stack([x[y == c].mean(0) for c in classes])[np.searchsorted(classes, y)]
    cov = dev.T @ dev / (len(x) - len(classes))
    dim = len(cov)
    cov = (1.0 - shrinkage) * cov + shrinkage * np.trace(cov) / dim * np.eye(dim)
    w, v = np.linalg.eigh(cov)
    w = np.maximum(w, 1e-12 * max(float(w.max()), 1e-300))
    whiten = (v / np.sqrt(w)) @ v.T
    prior = float(((dev @ whiten) ** 2).sum() / (len(x) - len(classes)))
    return Normalizer(x.mean(0), whiten, prior, float(prior_shots), float(shrinkage))


def scatter_of(shots: np.ndarray) -> float:
    """Sum of squared deviations of (projected) shots from their mean."""
    return float(((shots - shots.mean(0)) ** 2).sum())


def merge_scatter(scatter: float, mean: np.ndarray, n: int, batch: np.ndarray) -> float:
    """A class's scatter after adding ``batch`` (projected shots) to its ``n`` shots of
    projected mean ``mean``: as if all had been enrolled at once (Chan et al. 1979)."""
    m = len(batch)
    delta = batch.mean(0) - mean
    return scatter + scatter_of(batch) + float(delta @ delta) * n * m / (n + m)


@dataclass(frozen=True)
class OpenSetRates:
    """Open-set rejection quality of a threshold."""

    threshold: float
    false_accept_rate: float
    """Share of samples from classes *not* enrolled that were accepted (given a label)."""
    false_reject_rate: float
    """Share of samples from enrolled classes that were rejected as unknown."""
    n_known: int
    n_unknown: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in vars(self).items()}


def open_set_trials(emb: np.ndarray, labels: np.ndarray, *, shots: int, metric: str,
                    trials: int = 20, seed: int = 0, normalizer: Normalizer | None = None,
                    outsiders: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Open-set scores of known and unknown samples over random trials.

    Each trial enrolls half of the classes from ``shots`` random samples each; the other
    samples of enrolled classes are "known" queries, all samples of the other classes
    "unknown" ones (or, when given, the ``outsiders`` embeddings: e.g. other domains). A
    query's score is its distance to the nearest prototype, or with ``normalizer`` its
    normalised score for that class (the ``normalized`` rule). Needs at least 2 classes and
    more than ``shots`` samples per class.
    """
    classes = np.unique(labels)
    if len(classes) < 2:
        raise EdgektError(f"open-set calibration needs samples of >= 2 classes, got {len(classes)}")
    counts = {int(c): int((labels == c).sum()) for c in classes}
    short = {c: n for c, n in counts.items() if n <= shots}
    if short:
        raise EdgektError(f"open-set calibration with {shots} shots needs more than {shots} "
                          f"samples per class; class: count {short}")
    rng = np.random.default_rng(seed)
    known, unknown = [], []
    n_enroll = max(1, len(classes) // 2)
    for _ in range(trials):
        enrolled = rng.permutation(classes)[:n_enroll]
        protos, scatter, query_mask = [], [], np.zeros(len(labels), bool)
        for c in enrolled:
            idx = rng.permutation(np.flatnonzero(labels == c))
            protos.append(emb[idx[:shots]].mean(0))
            if normalizer is not None:
                scatter.append(scatter_of(normalizer.project(emb[idx[:shots]])))
            query_mask[idx[shots:]] = True
        score = _open_score(emb, np.stack(protos), shots, np.asarray(scatter), metric, normalizer)
        known.append(score[query_mask])
        unknown.append(score[~np.isin(labels, enrolled)] if outsiders is None else
                       _open_score(outsiders, np.stack(protos), shots, np.asarray(scatter),
                                   metric, normalizer))
    return np.concatenate(known), np.concatenate(unknown)


def _open_score(queries: np.ndarray, protos: np.ndarray, shots: int, scatter: np.ndarray,
                metric: str, normalizer: Normalizer | None) -> np.ndarray:
    """Each query's open-set score for its nearest prototype (as ``predict`` computes it)."""
    d = distances(queries, protos, metric)
    if normalizer is None:
        return d.min(1)
    s = normalizer.scores(queries, protos, np.full(len(protos), shots), scatter)
    return s[np.arange(len(s)), d.argmin(1)]


def rates_at(threshold: float, known: np.ndarray, unknown: np.ndarray) -> OpenSetRates:
    """False-accept and false-reject rates when scores above ``threshold`` are rejected."""
    return OpenSetRates(float(threshold), float((unknown <= threshold).mean()),
                        float((known > threshold).mean()), len(known), len(unknown))


def calibrate(emb: np.ndarray, labels: np.ndarray, *, shots: int = 5, metric: str = "euclidean",
              target_frr: float = 0.05, trials: int = 20, seed: int = 0,
              normalizer: Normalizer | None = None) -> OpenSetRates:
    """Pick the threshold that rejects ``target_frr`` of known samples (on the distance, or
    with ``normalizer`` on the normalised score).

    ``emb`` must already be transformed (``transform_embeddings``) as the classifier will.
    """
    if not 0.0 <= target_frr < 1.0:
        raise EdgektError(f"target_frr must be in [0, 1), got {target_frr}")
    known, unknown = open_set_trials(emb, labels, shots=shots, metric=metric, trials=trials,
                                     seed=seed, normalizer=normalizer)
    return rates_at(float(np.quantile(known, 1.0 - target_frr)), known, unknown)


# ---- the classifier ----
@dataclass(frozen=True)
class Prediction:
    """Result of ``PrototypeClassifier.predict``."""

    label: str | None
    """The predicted label, or None when rejected as unknown (nearest prototype too far)."""
    nearest: str
    """The nearest enrolled label (even when rejected)."""
    distance: float
    """Distance to the nearest prototype (squared Euclidean or cosine distance)."""
    score: float
    """Softmax probability of ``nearest`` over all enrolled classes (logits = -scale * d)."""
    novelty: float | None = None
    """Normalised open-set score for ``nearest`` (about 1 for a typical sample of that class,
    larger = more unusual); None when the classifier has no normaliser (distance rule)."""

    @property
    def known(self) -> bool:
        return self.label is not None


class PrototypeClassifier:
    """Nearest-prototype classifier with incremental enrollment and persisted state.

    Args:
        embedder: anything with ``embed(raw) -> (N, D)``.
        state_path: the state file; loaded if it exists, written after every change.
        metric, transform, center, scale, threshold: settings for a *new* state; a loaded
            state keeps its own (change the threshold with ``calibrate_threshold`` or
            ``set_threshold``). A threshold given here is a distance (``distance`` rule);
            ``calibrate_threshold`` switches to the ``normalized`` rule.
        recover: accept the previous generation when the state file is damaged.
        lock_timeout: seconds a change waits for another process's change to the same file.
    """

    def __init__(self, embedder: Embedder, state_path: str | Path, *, metric: Metric = "euclidean",
                 transform: Transform = "none", center: np.ndarray | None = None,
                 scale: float = 1.0, threshold: float | None = None, recover: bool = False,
                 lock_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.embedder = embedder
        self.path = check_writable(state_path, "state file")
        self.lock_timeout = lock_timeout
        # Changes are read-modify-commit sequences: one at a time per classifier (this lock)
        # and per state file across processes (``_changing``); readers take a consistent
        # (labels, prototypes) snapshot.
        self._lock = threading.RLock()
        loaded = self._load(recover)
        if loaded is None:
            if metric not in METRICS:
                raise EdgektError(f"unknown metric {metric!r} (valid: {METRICS})")
            if transform not in TRANSFORMS:
                raise EdgektError(f"unknown transform {transform!r} (valid: {TRANSFORMS})")
            if transform == "cl2n" and center is None:
                raise EdgektError("transform 'cl2n' needs center= (the base-class mean embedding)")
            self.metric, self.transform, self.scale = metric, transform, float(scale)
            self.center = None if center is None else np.asarray(center, np.float64).ravel()
            self.threshold = None if threshold is None else float(threshold)
            self.rejection: Rejection = "distance"
            self.normalizer: Normalizer | None = None
            self._labels: list[str] = []
            self._protos = np.zeros((0, 0))
            self._counts = np.zeros(0, np.int64)
            self._scatter = np.zeros(0)
            self.calibration: dict[str, Any] = {}
            self._generation = 0

    # ---- queries ------------------------------------------------------------------------------
    def labels(self) -> list[str]:
        """Enrolled labels, in enrollment order."""
        return list(self._labels)

    def shots(self, label: str) -> int:
        """How many samples ``label``'s prototype averages."""
        return int(self._counts[self._index(label)])

    @property
    def generation(self) -> int:
        """Generation of the state last committed (0: never saved)."""
        return self._generation

    def embed(self, samples: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Validated raw samples -> transformed embeddings (N, D), float64."""
        batch = self._as_batch(samples)
        try:
            emb = np.asarray(self.embedder.embed(batch))
        except EdgektError:
            raise
        except Exception as exc:  # noqa: BLE001 - a runtime's own error types vary by backend
            raise EdgektError(f"embedding {len(batch)} samples failed: {exc}") from exc
        if emb.ndim != 2 or emb.shape[0] != len(batch):
            raise EdgektError(f"embedder returned shape {emb.shape} for {len(batch)} samples; "
                              f"expected (N, D). Pass a list of images or a batch (N, H, W[, C]); "
                              f"the model must output embeddings (export its embedding part)")
        if not np.isfinite(emb).all():
            raise EdgektError("the embedding of these samples is not finite (NaN/inf); "
                              "check the input images")
        if self._protos.size and emb.shape[1] != self._protos.shape[1]:
            raise EdgektError(f"embedding size {emb.shape[1]} differs from the enrolled "
                              f"prototypes' {self._protos.shape[1]}: state {self.path} belongs "
                              f"to another model")
        if self.center is not None and emb.shape[1] != len(self.center):
            raise EdgektError(f"embedding size {emb.shape[1]} differs from the calibration "
                              f"center's {len(self.center)} (state {self.path})")
        norm = self.normalizer
        if norm is not None and emb.shape[1] != len(norm.mean):
            raise EdgektError(f"embedding size {emb.shape[1]} differs from the open-set "
                              f"normaliser's {len(norm.mean)}: state {self.path} belongs to "
                              f"another model")
        return transform_embeddings(emb, self.transform, self.center)

    def predict(self, x: np.ndarray) -> Prediction:
        """Classify one sample."""
        return self.predict_batch([x])[0]

    def predict_batch(self, samples: Sequence[np.ndarray] | np.ndarray) -> list[Prediction]:
        """Classify several samples (one embedding call)."""
        with self._lock:
            labels, protos, counts, scatter = self._labels, self._protos, self._counts, \
                self._scatter
            threshold, rejection, norm = self.threshold, self.rejection, self.normalizer
        if not labels:
            raise EdgektError("no class enrolled yet: enroll at least one label before predict")
        emb = self.embed(samples)
        d = distances(emb, protos, self.metric)
        nearest = d.argmin(1)
        rows = np.arange(len(d))
        novelty = None if norm is None else \
            norm.scores(emb, protos, counts, scatter)[rows, nearest]
        open_score = novelty if rejection == "normalized" else d[rows, nearest]
        logits = -self.scale * d
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out = []
        for i, j in enumerate(nearest.tolist()):
            far = threshold is not None and open_score[i] > threshold
            out.append(Prediction(None if far else labels[j], labels[j], float(d[i, j]),
                                  float(p[i, j]),
                                  None if novelty is None else float(novelty[i])))
        return out

    # ---- changes (each one committed before returning) ----------------------------------------
    def enroll(self, label: str, samples: Sequence[np.ndarray] | np.ndarray, *,
               replace: bool = False) -> int:
        """Add ``samples`` (raw images, first axis = samples) to ``label``; returns its shot count.

        An existing label is extended: its prototype becomes the mean over old and new shots
        (``replace=True`` discards the old ones). Nothing changes if any sample is bad.
        """
        _check_label(label)
        emb = self.embed(samples)
        with self._changing():
            return self._enroll(label, emb, replace)

    def _enroll(self, label: str, emb: np.ndarray, replace: bool) -> int:
        protos, counts, labels = self._protos, self._counts.copy(), list(self._labels)
        scatter = self._scatter.copy()
        if not protos.size:
            protos = np.zeros((0, emb.shape[1]))
        # The spread of the shots in the normaliser's space (NaN: unknown, the prior is used).
        proj = None if self.normalizer is None else self.normalizer.project(emb)
        new_ss = np.nan if proj is None else scatter_of(proj)
        if label in labels and not replace:
            j = labels.index(label)
            n, m = counts[j], len(emb)
            if proj is not None and np.isfinite(scatter[j]):
                old_mean = self.normalizer.project(protos[j][None])[0]
                scatter[j] = merge_scatter(float(scatter[j]), old_mean, int(n), proj)
            else:
                scatter[j] = np.nan
            protos = protos.copy()
            protos[j] = (protos[j] * n + emb.sum(0)) / (n + m)
            counts[j] = n + m
        elif label in labels:
            j = labels.index(label)
            protos = protos.copy()
            protos[j], counts[j], scatter[j] = emb.mean(0), len(emb), new_ss
        else:
            protos = np.concatenate([protos, emb.mean(0, keepdims=True)])
            counts = np.append(counts, len(emb))
            scatter = np.append(scatter, new_ss)
            labels.append(label)
        self._commit(labels, protos, counts, scatter)
        return int(counts[labels.index(label)])

    def remove(self, label: str) -> None:
        """Forget ``label`` (EdgektError if it is not enrolled)."""
        with self._changing():
            j = self._index(label)
            keep = [i for i in range(len(self._labels)) if i != j]
            self._commit([self._labels[i] for i in keep], self._protos[keep], self._counts[keep],
                         self._scatter[keep])

    def set_threshold(self, threshold: float | None) -> None:
        """Set the rejection threshold in the current rule's units (``rejection``: a distance,
        or a normalised score where about 1 is a typical known sample); None: never reject."""
        if threshold is not None and not (np.isfinite(threshold) and threshold >= 0):
            raise EdgektError(f"threshold must be a finite distance >= 0 or None, got {threshold}")
        with self._changing():
            old = self.threshold
            self.threshold = None if threshold is None else float(threshold)
            try:
                self._commit(self._labels, self._protos, self._counts, self._scatter)
            except BaseException:
                self.threshold = old
                raise

    def calibrate_threshold(self, samples: Sequence[np.ndarray] | np.ndarray,
                            labels: Sequence[Any], *, shots: int = 5, target_frr: float = 0.05,
                            trials: int = 20, seed: int = 0,
                            rejection: Rejection = "normalized", shrinkage: float = 0.5,
                            prior_shots: float = 5.0) -> OpenSetRates:
        """Calibrate unknown rejection on labelled base-class samples.

        With ``rejection="normalized"`` (default) first fits the normaliser (whitening with
        ``shrinkage``, prior spread worth ``prior_shots`` shots) on the samples. Then
        simulates enrolling half of the classes from ``shots`` samples and sets the threshold
        that wrongly rejects ``target_frr`` of their other samples; returns the false-accept
        and false-reject rates measured in that simulation (base classes: optimistic for
        novel ones; ``edgekt fewshot eval`` measures them on novel classes). Enrolled classes
        are kept; when the normaliser changes, their spreads fall back to the prior until
        re-enrolled (the spread is only known in the space it was measured in).
        """
        if rejection not in REJECTIONS:
            raise EdgektError(f"unknown rejection rule {rejection!r} (valid: {REJECTIONS})")
        y = np.asarray(labels)
        emb = self.embed(samples)
        if len(y) != len(emb):
            raise EdgektError(f"{len(emb)} samples but {len(y)} labels")
        _, codes = np.unique(y, return_inverse=True)
        norm = fit_normalizer(emb, codes, shrinkage=shrinkage, prior_shots=prior_shots) \
            if rejection == "normalized" else self.normalizer
        rates = calibrate(emb, codes, shots=shots, metric=self.metric, target_frr=target_frr,
                          trials=trials, seed=seed,
                          normalizer=norm if rejection == "normalized" else None)
        with self._changing():
            old = (self.threshold, self.calibration, self.rejection, self.normalizer)
            scatter = self._scatter
            if norm is not self.normalizer and len(scatter) and np.isfinite(scatter).any():
                log.warning("%s: the open-set normaliser changed; the %d enrolled class(es) use "
                            "the prior spread until re-enrolled", self.path, len(scatter))
                scatter = np.full(len(scatter), np.nan)
            self.threshold, self.rejection, self.normalizer = rates.threshold, rejection, norm
            self.calibration = {**rates.as_dict(), "shots": shots, "target_frr": target_frr,
                                "trials": trials, "rejection": rejection}
            try:
                self._commit(self._labels, self._protos, self._counts, scatter)
            except BaseException:
                self.threshold, self.calibration, self.rejection, self.normalizer = old
                raise
        return rates

    # ---- state ---------------------------------------------------------------------------------
    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Exclusive access to the state file, with what other processes committed adopted."""
        with self._lock, state_lock(self.path, self.lock_timeout):
            state = load_state(self.path)
            if state is not None and state.generation != self._generation:
                if "_recovered_from" in state.meta:
                    raise StateCorruptError(f"{self.path} was damaged after this classifier "
                                            "loaded it; reopen it (with --recover) to go on")
                self._adopt(state)
            yield

    def _commit(self, labels: list[str], protos: np.ndarray, counts: np.ndarray,
                scatter: np.ndarray) -> None:
        """Write the new state, then adopt it in memory (a failed write changes nothing)."""
        arrays = {"prototypes": np.asarray(protos, np.float64),
                  "counts": np.asarray(counts, np.int64),
                  "scatter": np.asarray(scatter, np.float64)}
        if self.center is not None:
            arrays["center"] = self.center
        meta = {"format": FORMAT, "labels": labels, "metric": self.metric,
                "transform": self.transform, "scale": self.scale, "threshold": self.threshold,
                "rejection": self.rejection, "calibration": self.calibration,
                "saved_at": time.time()}
        if self.normalizer is not None:
            n = self.normalizer
            arrays["norm_mean"], arrays["norm_whiten"] = n.mean, n.whiten
            meta["norm"] = {"prior_var": n.prior_var, "prior_shots": n.prior_shots,
                            "shrinkage": n.shrinkage}
        self._generation = save_state(self.path, State(arrays, meta, self._generation))
        self._labels, self._protos, self._counts, self._scatter = list(labels), \
            arrays["prototypes"], arrays["counts"], arrays["scatter"]

    def _load(self, recover: bool) -> State | None:
        state = load_state(self.path)
        if state is None:
            return None
        source = state.meta.pop("_recovered_from", None)
        if source is not None:
            if not recover:
                raise StateCorruptError(
                    f"{self.path} is damaged; the previous generation {source} is intact but "
                    f"lacks the last change. Refusing to guess: pass recover=True (CLI: "
                    f"--recover) to restore it, or inspect/move the files yourself.")
            corrupt = self.path.with_name(self.path.name + ".corrupt")
            if self.path.exists():
                os.replace(self.path, corrupt)
            log.warning("%s was damaged: kept as %s, restored generation %d from %s",
                        self.path, corrupt, state.generation, source)
        self._adopt(state)
        if source is not None:
            with state_lock(self.path, self.lock_timeout):
                self._commit(self._labels, self._protos, self._counts, self._scatter)
        return state

    def _adopt(self, state: State) -> None:
        m, a = state.meta, state.arrays
        try:
            if m.get("format") not in FORMATS_READ:
                raise ValueError(f"format {m.get('format')!r}, expected one of {FORMATS_READ}")
            labels = [str(s) for s in m["labels"]]
            protos, counts = a["prototypes"], a["counts"]
            if len(labels) != len(protos) or len(labels) != len(counts):
                raise ValueError(f"{len(labels)} labels, {len(protos)} prototypes, "
                                 f"{len(counts)} counts")
            if m["metric"] not in METRICS or m["transform"] not in TRANSFORMS:
                raise ValueError(f"metric {m['metric']!r} / transform {m['transform']!r}")
            # Format 1 has neither: the distance rule and unknown spreads (NaN: the prior).
            rejection = m.get("rejection", "distance")
            scatter = a.get("scatter", np.full(len(labels), np.nan))
            if rejection not in REJECTIONS or len(scatter) != len(labels):
                raise ValueError(f"rejection {rejection!r}, {len(scatter)} spreads")
            norm = None
            if "norm" in m:
                n = m["norm"]
                norm = Normalizer(a["norm_mean"], a["norm_whiten"], float(n["prior_var"]),
                                  float(n["prior_shots"]), float(n["shrinkage"]))
                dim = len(norm.mean)
                if norm.whiten.shape != (dim, dim) or (protos.size and protos.shape[1] != dim):
                    raise ValueError(f"normaliser of shape {norm.whiten.shape} for prototypes "
                                     f"of shape {protos.shape}")
            elif rejection == "normalized":
                raise ValueError("rejection 'normalized' without its normaliser")
            self.metric, self.transform = m["metric"], m["transform"]
            self.scale = float(m["scale"])
            self.threshold = None if m["threshold"] is None else float(m["threshold"])
            self.rejection, self.normalizer = rejection, norm
            self.calibration = dict(m.get("calibration") or {})
            self.center = a.get("center")
        except (KeyError, ValueError, TypeError) as exc:
            raise StateCorruptError(f"{self.path}: not a valid few-shot classifier state "
                                    f"({exc}); refusing to start empty over it") from None
        self._labels, self._protos, self._counts = labels, protos, counts
        self._scatter = np.asarray(scatter, np.float64)
        self._generation = state.generation

    def _index(self, label: str) -> int:
        try:
            return self._labels.index(label)
        except ValueError:
            raise EdgektError(f"label {label!r} is not enrolled (enrolled: {self._labels})"
                              ) from None

    @staticmethod
    def _as_batch(samples: Sequence[np.ndarray] | np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Check count, dtype and finiteness; shapes are the embedder's business (an
        ``EdgeModel`` resizes and converts colour, and names what it expected otherwise)."""
        if isinstance(samples, np.ndarray):
            if samples.ndim < 2 or len(samples) == 0:
                raise EdgektError(f"no samples in an array of shape {samples.shape}: pass a list "
                                  f"of images or a batch whose first axis indexes samples")
            items = [samples]
        else:
            try:
                items = [np.asarray(s) for s in samples]
            except (TypeError, ValueError) as exc:
                raise EdgektError(f"cannot read the samples as arrays ({exc})") from None
            if not items:
                raise EdgektError("no samples given: enroll/predict need at least one image")
        for item in items:
            if item.dtype.kind not in "uif":
                raise EdgektError(f"samples must be numeric images, got dtype {item.dtype}")
            if item.dtype.kind == "f" and not np.isfinite(item).all():
                raise EdgektError("samples contain NaN or infinite values")
        return samples if isinstance(samples, np.ndarray) else items


def _check_label(label: object) -> None:
    if not isinstance(label, str) or not label.strip():
        raise EdgektError(f"a label must be a non-empty string, got {label!r}")


STATE_FILE = "fewshot_state.npz"


def default_state_path(package: str | Path) -> Path:
    """Where a package's classifier state lives: ``DIR/fewshot_state.npz`` for an export
    directory, ``MODEL.fewshot.npz`` beside a single model file."""
    p = Path(package)
    return p / STATE_FILE if p.is_dir() else p.with_name(p.stem + ".fewshot.npz")


def open_classifier(package: str | Path, state: str | Path | None = None, *,
                    threads: int | None = None, backend: str | None = None,
                    recover: bool = False) -> PrototypeClassifier:
    """A ``PrototypeClassifier`` on a package's embedding model and its saved state.

    Without a state file (``edgekt fewshot package`` writes one with the calibration) the
    classifier starts empty with default settings and never rejects (no threshold).
    """
    from edgekt.devices.model import EdgeModel

    model = EdgeModel.load(package, backend=backend, threads=threads, part="embedding")
    if model.task not in (None, "embedding"):
        raise EdgektError(f"{package}: holds a {model.task} model; few-shot needs an embedding "
                          f"model (edgekt export CHECKPOINT --part embedding, or edgekt fewshot "
                          f"package)")
    return PrototypeClassifier(model, state or default_state_path(package), recover=recover)
